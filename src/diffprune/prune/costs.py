"""What removing one channel of a layer saves: the cost tables of cost-aware allocation.

``allocation="cost"`` counts MACs (one call at batch 1); ``allocation="latency"`` measures time: a per-layer latency
table, HALP-style, on the device, dtype and batch of the target. Each convolution and linear layer is timed alone on
inputs of the shape it sees in the model (found by one forward pass on a shapes-only copy): whole, with half its
output channels and with half its input channels; each attention's products (q·kᵀ and the weighted sum of v) at its
head width and at half of it. The marginal time per channel (whole minus half, over the channels removed; never
negative) is what one pruned channel saves, so a layer whose time does not fall with its width (call overhead,
memory-bound) is worth little to cut. Layers of the same shape are timed once; every timing is cached
(:mod:`diffprune._cache`, kind "latency") under the layer's shapes, the device (its name; on CPUs the thread
count), the dtype, the torch version and the repeats.

A table maps a module's qualified name to ``{"out": cost per output channel, "in": cost per input channel}``, and an
attention module's to ``{"attn": cost per channel of its inner width}`` (q and k carry a quarter each, v half).
"""
from __future__ import annotations

import json
import platform

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._torch import eval_mode, meta_copy
from ..structure import layer_widths

LATENCY_FORMAT = 1  # bump when what a cached timing means changes


def layer_costs(model: nn.Module, adapter, config, *, per_layer: dict, device=None, cache_dir=None,
                progress: bool = False):
    """The cost table of ``config.allocation`` for ``model`` (None for ``"score"``, which needs none); ``per_layer``:
    its MAC count's own MACs per module (:class:`~diffprune.macs.MacsReport`)."""
    if config.allocation == "cost":
        return mac_costs(model, per_layer)
    if config.allocation == "latency":
        from .config import LATENCY_DTYPES

        return latency_costs(model, adapter, device=device, dtype=LATENCY_DTYPES[config.latency_dtype],
                             batch=config.latency_batch, repeats=config.latency_repeats, cache_dir=cache_dir,
                             progress=progress)
    return None


_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def mac_costs(model: nn.Module, per_layer: dict) -> dict:
    """MACs (one call at batch 1) per channel of each layer's own work, from ``per_layer`` (its MAC count's)."""
    modules, widths = dict(model.named_modules()), layer_widths(model)
    table = {}
    for name, macs in per_layer.items():
        module = modules.get(name)
        if isinstance(module, _LAYERS):
            inp, out = widths[name]
            table[name] = {"out": macs / out, "in": macs / inp}
        elif module is not None and isinstance(getattr(module, "to_q", None), nn.Linear):
            table[name] = {"attn": macs / module.to_q.out_features}
    return table


def _input_shapes(model: nn.Module, adapter, batch: int) -> dict[str, tuple]:
    """The shape of the (first) input of every convolution and linear layer in one call at ``batch``."""
    meta = meta_copy(model)
    shapes, hooks = {}, []

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    for name, module in meta.named_modules():
        if isinstance(module, _LAYERS):
            hooks.append(module.register_forward_pre_hook(record(name)))
    try:
        with eval_mode(meta), torch.no_grad():
            meta(**adapter.example_inputs(meta, batch))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _jobs(model: nn.Module, shapes: dict) -> dict:
    """Layer name -> what to time: ("linear"|"conv", settings, input shape) or ("attn", (heads, head dim), q, k)."""
    jobs = {}
    for name, module in model.named_modules():
        if name in shapes and isinstance(module, nn.Linear):
            jobs[name] = ("linear", (module.out_features, module.in_features), shapes[name])
        elif name in shapes and isinstance(module, nn.Conv2d) and module.groups == 1:
            jobs[name] = ("conv", (module.out_channels, module.in_channels, *module.kernel_size, *module.stride,
                                   *_padding(module), *module.dilation), shapes[name])
        q, k = (getattr(module, a, None) for a in ("to_q", "to_k"))
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and getattr(module, "heads", None):
            qn, kn = f"{name}.to_q", f"{name}.to_k"
            if qn in shapes and kn in shapes and len(shapes[qn]) == 3 and len(shapes[kn]) == 3:
                heads = int(module.heads)
                jobs[name] = ("attn", (heads, q.out_features // heads), shapes[qn][:2], shapes[kn][:2])
    return jobs


def _padding(conv: nn.Conv2d) -> tuple:
    pad = conv.padding
    return tuple(pad) if isinstance(pad, (tuple, list)) else (pad, pad)  # "same"/"valid" kept as given


def latency_costs(model: nn.Module, adapter, *, device, dtype, batch: int, repeats: int, cache_dir=None,
                  progress: bool = False) -> dict:
    """The measured per-channel latency table of ``model`` (see the module docstring), in seconds."""
    device = torch.device(device if device is not None else next(model.parameters()).device)
    jobs = _jobs(model, _input_shapes(model, adapter, batch))
    timings: dict[str, list[float]] = {}
    bar = tqdm(total=len(jobs), desc="latency table", unit="layer", disable=not progress)
    table = {}
    for name, job in jobs.items():
        key = json.dumps([LATENCY_FORMAT, job, _device_key(device), str(dtype), torch.__version__, repeats])
        if key not in timings:
            timings[key] = _cached_timing(key, job, device, dtype, repeats, cache_dir)
        full, half_out, half_in = timings[key]
        if job[0] == "attn":
            heads, dim = job[1]
            table[name] = {"attn": _slope(full, half_out, dim) / heads}
        else:
            out, inp = job[1][:2]
            table[name] = {"out": _slope(full, half_out, out), "in": _slope(full, half_in, inp)}
        bar.update()
    bar.close()
    return table


def _half(n: int) -> int:
    return max(1, n // 2)


def _slope(full: float, half: float, n: int) -> float:
    """Seconds saved per channel between ``n`` channels and half of them (0 for a single channel)."""
    return max(full - half, 0.0) / (n - _half(n)) if n > 1 else 0.0


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}:{platform.processor()}:{torch.get_num_threads()} threads"


def _cached_timing(key: str, job, device, dtype, repeats: int, cache_dir) -> list[float]:
    from .._cache import cached
    from .._hashing import json_sha256

    tensors, _ = cached("latency", key, lambda: {"seconds": torch.tensor(_time_job(job, device, dtype, repeats),
                                                                         dtype=torch.float64)},
                        root=cache_dir, name=json_sha256(key, 32),
                        check=lambda t: None if t["seconds"].shape == (3,) else "not 3 timings")
    return [float(v) for v in tensors["seconds"]]


def _time_job(job, device, dtype, repeats: int) -> list[float]:
    """Median seconds of the layer whole, with half its outputs, with half its inputs (attention: whole and at half
    the head width, twice)."""
    from ..latency import measure

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    kind = job[0]
    if kind == "attn":
        (heads, dim), (b, lq), (_, lk) = job[1], job[2], job[3]
        calls = [(lambda d: (lambda q=rand(b, heads, lq, d), k=rand(b, heads, lk, d), v=rand(b, heads, lk, d):
                             F.scaled_dot_product_attention(q, k, v)))(d) for d in (dim, _half(dim), _half(dim))]
    else:
        out, inp = job[1][:2]
        shape = job[2]
        sizes = ((out, inp), (_half(out), inp), (out, _half(inp)))
        calls = [_layer_call(kind, job[1], o, i, shape, rand) for o, i in sizes]
    with torch.no_grad():
        return [measure(fn, device=device, repeats=repeats)["median_s"] for fn in calls]


def _layer_call(kind: str, settings: tuple, out: int, inp: int, shape: tuple, rand):
    x = rand(*shape[:-1], inp) if kind == "linear" else rand(shape[0], inp, *shape[2:])
    if kind == "linear":
        w, b = rand(out, inp), rand(out)
        return lambda: F.linear(x, w, b)
    kh, kw, sh, sw, ph, pw, dh, dw = settings[2:]
    w, b = rand(out, inp, kh, kw), rand(out)
    pad = (ph, pw) if not isinstance(ph, str) else ph
    return lambda: F.conv2d(x, w, b, (sh, sw), pad, (dh, dw))
