"""diffprune: structural pruning for diffusion models (Diff-Pruning, Fang, Ma & Wang, NeurIPS 2023)."""
__version__ = "0.1.0"

# Public API, imported lazily so that ``import diffprune`` (and the CLI's start-up) stays light.
_LAZY = {
    # pruning engine
    "PruneConfig": "prune", "PruneReport": "prune", "prune_": "prune", "DATA_FREE": "prune",
    "accumulate_gradients": "prune", "calibration_batch": "prune", "prune_model": "prune",
    "METHODS": "importance", "TIMESTEP_STRATEGIES": "timesteps", "make_strategy": "timesteps",
    "count_macs": "macs", "count_params": "macs", "MacsReport": "macs",
    "ADAPTERS": "adapters", "adapter_for": "adapters", "Conditioning": "adapters", "PIPELINES": "adapters.pipelines",
    # safe model format
    "save_pruned": "io", "load_pruned": "io", "load_model": "io", "load_pipeline": "io", "LoadedModel": "io",
    # recovery, sampling, evaluation, the whole pipeline (the verbs train/finetune/evaluate share their module's
    # name, which shadows a package attribute once imported: call diffprune.train.train etc.)
    "TrainConfig": "train", "sample": "sampling", "EvalConfig": "evaluate",
    "load_run_config": "pipeline", "run_pipeline": "pipeline", "seed_everything": "seed",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'diffprune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
