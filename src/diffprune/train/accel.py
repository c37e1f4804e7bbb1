"""Training's glue to ``accelerate``: the accelerator for a device, and the settings of it that a run records."""
from __future__ import annotations

from ..errors import require


def make_accelerator(device=None):
    """An ``accelerate.Accelerator`` for the caller's ``device``: None leaves the choice to accelerate (its launch
    config, else CUDA when present), "cpu" forces the CPU, "cuda" uses the GPU accelerate assigns each process."""
    from accelerate import Accelerator

    check_training_device(device)
    kind = None if device is None else str(device).split(":")[0]
    return Accelerator(cpu=kind == "cpu")


def check_training_device(device) -> None:
    """Refuse a device that training cannot honour (it runs where accelerate places each process)."""
    require(device is None or str(device) in ("cpu", "cuda", "cuda:0"),
            f"device={str(device)!r} cannot be honoured by training, which runs where accelerate places each "
            "process; pass cpu or cuda and choose GPUs with CUDA_VISIBLE_DEVICES (or accelerate launch --gpu_ids)")


def accelerate_settings(acc) -> dict:
    """The accelerate settings that change what a step computes (from its launch config or environment)."""
    plugin = getattr(acc.state, "dynamo_plugin", None)
    backend = getattr(plugin, "backend", None)
    return {"mixed_precision": str(acc.mixed_precision),
            "gradient_accumulation_steps": int(acc.gradient_accumulation_steps),
            "dynamo_backend": str(getattr(backend, "value", backend) or "no").lower()}
