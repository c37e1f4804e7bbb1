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


def sharding(acc) -> str | None:
    """"fsdp2" when accelerate shards the model with FSDP2, None when every process holds it whole (one process,
    DDP). Refused: FSDP1 and DeepSpeed, whose state training cannot checkpoint and resume exactly."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    require(kind != DistributedType.DEEPSPEED,
            "DeepSpeed is not supported by diffprune's training (its checkpoints and EMA are not handled); shard with "
            "FSDP2 instead: accelerate launch --use_fsdp --fsdp_version 2 ...")
    if kind != DistributedType.FSDP:
        return None
    require(acc.is_fsdp2, "FSDP version 1 is not supported by diffprune's training (only FSDP2 keeps named, "
                          "per-parameter shards); pass --fsdp_version 2 to accelerate launch (or fsdp_version: 2 "
                          "in its config)")
    return "fsdp2"


def shard_frozen(acc, model):
    """``model`` (frozen, no optimizer: the teacher) sharded as accelerate shards the student under FSDP2, and
    resharded after every call (FSDP2 keeps a root gathered after a forward, awaiting a backward that never comes).
    Through ``fsdp2_prepare_model``, not ``acc.prepare``: accelerate < 1.16 refuses a model prepared without its
    optimizer under FSDP2 (seen with 1.15 on a GPU)."""
    from accelerate.utils import fsdp2_prepare_model

    model = fsdp2_prepare_model(acc, model)
    model.register_forward_hook(_reshard)
    return model


def _reshard(module, args, output) -> None:
    module.reshard()


def accelerate_settings(acc) -> dict:
    """The accelerate settings that change what a step computes (from its launch config or environment); "sharding"
    only when FSDP shards the model, so that records of unsharded runs keep their form."""
    plugin = getattr(acc.state, "dynamo_plugin", None)
    backend = getattr(plugin, "backend", None)
    settings = {"mixed_precision": str(acc.mixed_precision),
                "gradient_accumulation_steps": int(acc.gradient_accumulation_steps),
                "dynamo_backend": str(getattr(backend, "value", backend) or "no").lower()}
    sharded = sharding(acc)
    if sharded:
        settings["sharding"] = sharded
    return settings
