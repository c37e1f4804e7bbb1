"""The pruning verb: ``report = prune_(unet, PruneConfig(...), calibration, scheduler=...)`` (in place).

Diff-Pruning, exactly (``method="diff-pruning"``):

1. One calibration batch ``x0`` (``calib_batch`` images in [-1, 1], or their latents for a latent pipeline; with
   each image's label for a class-conditional model) and one fixed noise
   ``eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))`` (drawn on the CPU).
2. For ``t = 0, 1, 2, ...``: ``x_t = scheduler.add_noise(x0, eps, t)``, ``L_t = mse(f(x_t, t, cond), target)``
   (the model called through its adapter; the target is ``eps``, ``v`` or ``x0`` as the scheduler's
   ``prediction_type`` says, :mod:`diffprune.objective`), ``L_t.backward()`` **without zeroing gradients**, until
   the timestep strategy stops (by default the threshold rule ``L_t < thr * max(L_0..L_t)``, see
   :mod:`diffprune.timesteps`).
3. Channel scores from the accumulated gradients (:mod:`diffprune.importance`), then structural pruning with
   Torch-Pruning's dependency graph, model surgery by the adapter (:mod:`diffprune.adapters`).

How much to prune (exactly one of):

``ratio`` with ``ratio_mode="paper"`` (default for ``ratio``)
    Local pruning as in the Diff-Pruning repository's bundled Torch-Pruning: for each group with ``n`` channels,
    ``n_pruned = n - int(n * (1 - ratio))``; a group coupled to GroupNorm (or to attention heads) is split into
    ``num_groups`` contiguous chunks and each chunk drops its own ``n_pruned // num_groups`` lowest-scoring
    channels. google/ddpm-cifar10-32 at ratio 0.3: 35.75M -> 19.85M parameters.
``ratio`` with ``ratio_mode="uniform"``
    Torch-Pruning 1.6.1's own semantics: per-chunk scores are averaged over the chunks and each chunk keeps
    ``int(chunk_size * (1 - ratio))`` channels (35.75M -> 13.95M at 0.3). ``global_ranking`` ranks all groups
    together (Torch-Pruning's global pruning).
``target_macs=F``
    Bisection on the ratio until the MACs of one UNet call are ``F`` x the original within ``macs_tolerance``
    (relative, default 2%). Uses ``ratio_mode="uniform"`` with global ranking unless told otherwise: per-layer
    (local) rounding moves MACs in steps that are often coarser than the tolerance; when the target cannot be
    reached the error names the nearest achievable fraction.
"""
from ..importance import METHODS
from ..structure import STRUCTURE_FORMAT, TORCH_PRUNING_VERSION, chain_records, layer_widths, replay_structure_
from .api import prune_, prune_model
from .calibration import accumulate_gradients, calibration_batch, calibration_noise
from .config import DATA_FREE, LATENCY_DTYPES, RATIO_MODES, CalibrationResult, PruneConfig, PruneReport
from .search import latency_timer
from .selection import GlobalPruner, PaperPruner, _prune_once

__all__ = [
    "PruneConfig", "PruneReport", "CalibrationResult", "PaperPruner", "GlobalPruner", "prune_", "prune_model",
    "accumulate_gradients", "calibration_batch", "calibration_noise", "latency_timer", "layer_widths",
    "replay_structure_", "chain_records", "STRUCTURE_FORMAT", "TORCH_PRUNING_VERSION", "RATIO_MODES",
    "LATENCY_DTYPES", "DATA_FREE", "METHODS",
    "_prune_once",  # internals the tests reach through the package
]
