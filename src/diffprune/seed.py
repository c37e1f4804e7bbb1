"""The one seeding helper. Per-sample generators make results independent of the batch size."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def per_sample_noise(seeds, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Noise of shape ``(len(seeds), *shape)`` where row i depends only on ``seeds[i]``.

    Drawn on the CPU so that a seed gives the same image on every device and at every batch size.
    """
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)
