"""The benchmarks' one way to name a model: a preset name builds that architecture with random weights, anything
else is loaded as diffprune loads a model (a shipped name, a folder or a hub id)."""
import torch

from diffprune.io import LoadedModel, load_model
from diffprune.presets import PRESETS, build_model


def benchmark_model(name: str, seed: int = 0) -> LoadedModel:
    """``name``'s denoiser in eval mode (a preset's weights from ``torch.manual_seed(seed)``; no scheduler)."""
    if name in PRESETS:
        torch.manual_seed(seed)
        return LoadedModel(denoiser=build_model(name).eval(), scheduler=None, pruning=None, source=f"preset {name}")
    loaded = load_model(name)
    loaded.denoiser.eval()
    return loaded
