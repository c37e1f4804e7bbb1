import pytest
import torch

# Tiny models run fastest on one thread, and CI's two cores must not be oversubscribed.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def save_tiny_model(folder, scheduler=None, seed: int = 0):
    """A tiny UNet2DModel (preset "tiny", seeded) saved as a diffusers folder with its scheduler; returns the UNet."""
    from diffprune.presets import build_model
    from diffprune.sampling import default_scheduler

    torch.manual_seed(seed)
    unet = build_model("tiny")
    unet.save_pretrained(folder, safe_serialization=True)
    (scheduler or default_scheduler()).save_pretrained(folder / "scheduler")
    return unet
