"""The training state as whole tensors, whether every process holds the model whole (one process, DDP) or
accelerate's FSDP2 shards it (``accelerate launch --use_fsdp --fsdp_version 2``).

Checkpoints, the final save and sample grids need whole tensors; resuming puts them back where each process keeps
them. Under FSDP2 the gathering functions are collectives: every process calls them, the main process receives the
tensors and the others empty results. Without sharding they do what a plain ``state_dict`` does, on the main
process only. Checkpoints have one format either way (parameter order, not FSDP's names), so a run checkpointed
under FSDP holds the same files as one that was not.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model``'s parameters (they are DTensors)."""
    return any(isinstance(p, _dtensor()) for p in model.parameters())


def plain_model(shell_model: nn.Module, tensors: dict) -> nn.Module:
    """An ordinary module built on ``shell_model`` (the unsharded model's ``meta_copy(model, buffers=False)``:
    parameters shapes only, buffers real) with the whole ``tensors`` (by state-dict name: every parameter, and
    buffers where given; the others keep the shell's): how a sharded run rebuilds a module to save or sample from."""
    model = copy.deepcopy(shell_model)
    state = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    model.load_state_dict({**state, **tensors}, assign=True)
    return model.eval()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def whole_state(model: nn.Module, main: bool) -> dict:
    """``model``'s state dict, whole and on the CPU, on the main process ({} elsewhere)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_options(cpu_offload=True))
        return state if main else {}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()} if main else {}


def whole_tensors(tensors, main: bool) -> list:
    """Each tensor whole and on the CPU (a sharded one gathered), on the main process ([] elsewhere)."""
    out = []
    for t in tensors:
        if isinstance(t, _dtensor()):
            t = t.full_tensor()
        elif not main:
            continue
        if main:
            out.append(t.detach().cpu().contiguous())
    return out


def like(whole: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``whole`` placed as ``ref`` is: sharded the same way if ``ref`` is a DTensor, else on ``ref``'s device."""
    if isinstance(ref, _dtensor()):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(ref.device_mesh.device_type, ref.dtype), ref.device_mesh, ref.placements)
    return whole.to(ref.device)


def load_whole_state(model: nn.Module, state: dict) -> None:
    """Load the whole ``state`` (every process holds it) into ``model``, sharded or not; strict."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_options())
    else:
        model.load_state_dict(state)


def whole_optimizer_state(model: nn.Module, optimizer, main: bool) -> dict:
    """The optimizer's state dict in torch's own format (parameters by position), whole, on the main process."""
    if not is_sharded(model):
        return optimizer.state_dict() if main else {}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not main:
        return {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {"state": {index[name]: st for name, st in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def load_whole_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Load a state dict of :func:`whole_optimizer_state`'s format (every process holds it), sharded or not."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    named = {"state": {names[int(i)]: st for i, st in state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=_options())


def all_finite(tensors, acc) -> bool:
    """Whether every tensor (this process's shard of a sharded one) is finite on every process."""
    local = [t.to_local() if isinstance(t, _dtensor()) else t for t in tensors]
    ok = torch.tensor([float(all(bool(torch.isfinite(t).all()) for t in local))], device=acc.device)
    if acc.num_processes > 1:
        ok = acc.gather(ok)
    return bool(ok.all())
