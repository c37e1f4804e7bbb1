"""Measured latency: the median of >= 10 timed runs after warm-up, with the threads and device of each timing.

On CUDA every run is bracketed by ``torch.cuda.synchronize`` and peak memory is
``torch.cuda.max_memory_allocated`` (reset before each measurement). On the CPU peak memory is the process's
peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``): it cannot be reset, so it covers everything the
process did before, not one model alone — the record says which kind it is.

Library code never picks a device: callers pass ``device``.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ._torch import eval_mode
from .errors import require

__all__ = ["MIN_REPEATS", "denoiser_latency", "measure", "peak_memory", "sampler_latency"]

MIN_REPEATS = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """``{"peak_memory_bytes", "peak_memory_kind"}`` for ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda max_memory_allocated since the measurement began"}
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            info = psutil.Process().memory_info()
            return {"peak_memory_bytes": int(getattr(info, "peak_wset", info.rss)),
                    "peak_memory_kind": "process peak working set (psutil), whole process"}
        except ImportError:
            return {"peak_memory_bytes": None, "peak_memory_kind": "unavailable (no resource or psutil module)"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_memory_bytes": int(rss * scale),
            "peak_memory_kind": "process peak RSS (getrusage ru_maxrss), whole process since start"}


def measure(fn: Callable[[], object], *, device, repeats: int = MIN_REPEATS, warmup: int = 2,
            progress: str | None = None) -> dict:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` (>= 10) timed ones; returns the median and more.
    ``progress``: a progress bar with this description, one tick per call (warm-up included)."""

    require(isinstance(repeats, int) and repeats >= MIN_REPEATS,
            f"repeats={repeats!r} must be an integer >= {MIN_REPEATS} (a median needs enough runs)")
    require(isinstance(warmup, int) and warmup >= 0, f"warmup={warmup!r} must be an integer >= 0")
    device = torch.device(device)
    _reset_peak(device)
    bar = tqdm(total=warmup + repeats, desc=progress, disable=progress is None, unit="call")
    for _ in range(warmup):
        fn()
        bar.update()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        bar.update()  # after the clock stopped: the bar is not timed
    bar.close()
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "min_s": min(times),
            "max_s": max(times), "repeats": repeats, "warmup": warmup, "device": str(device),
            "threads": torch.get_num_threads(), **peak_memory(device)}


@torch.no_grad()
def denoiser_latency(model, *, device, batch_sizes: Sequence[int] = (1, 16, 64), repeats: int = MIN_REPEATS,
                     warmup: int = 2, timestep: int = 500, adapter=None, progress: bool = False) -> dict[str, dict]:
    """Latency of one denoiser call (conditioning included) per batch size: ``{"1": {median_s, per_image_s, ...}}``;
    ``progress``: a bar per batch size.

    The model runs where its parameters are; ``device`` must be that device (checked).
    """
    from .adapters import resolve_adapter

    device = torch.device(device)
    p = next(model.parameters())
    require(p.device.type == device.type, f"the model is on {p.device} but device={device}; move it first")
    adapter = resolve_adapter(model, adapter)
    shape = adapter.input_shape(model)
    out = {}
    with eval_mode(model):
        for b in batch_sizes:
            require(isinstance(b, int) and b >= 1, f"latency batch size {b!r} must be a positive integer")
            x = torch.randn((b, *shape), generator=torch.Generator().manual_seed(0)).to(device, p.dtype)
            t = torch.full((b,), timestep, dtype=torch.long, device=device)
            cond = adapter.example_cond(model, b, device)
            rec = measure(lambda: adapter.forward(model, x, t, cond), device=device, repeats=repeats, warmup=warmup,
                          progress=f"latency (batch {b})" if progress else None)
            rec["batch_size"] = b
            rec["per_image_s"] = rec["median_s"] / b
            out[str(b)] = rec
    return out


def sampler_latency(model, scheduler, *, device, steps: int, batch_size: int = 16, repeats: int = MIN_REPEATS,
                    warmup: int = 1, skip: str = "uniform", codec=None, guidance_scale: float = 1.0,
                    adapter=None, progress: bool = False) -> dict:
    """Latency of the full DDIM sampler (``steps`` steps, η = 0, decoding included) on a batch; ``per_image_s`` =
    median / batch. A text model runs on an all-zero context of its ``context_length`` (the text encoder, called
    once per prompt, is not the denoiser's cost)."""
    from .adapters import resolve_adapter
    from .sampling import sample

    adapter = resolve_adapter(model, adapter)
    seeds = list(range(batch_size))
    spec = adapter.conditioning(model)
    context = spec.example(1) if spec is not None and spec.kind == "text" else None
    rec = measure(lambda: sample(model, scheduler, seeds=seeds, num_inference_steps=steps, sampler="ddim",
                                 skip=skip, batch_size=batch_size, device=device, progress=False, codec=codec,
                                 guidance_scale=guidance_scale, prompt_embeds=context,
                                 negative_prompt_embeds=context, adapter=adapter),
                  device=device, repeats=repeats, warmup=warmup,
                  progress=f"sampler latency (batch {batch_size}, {steps} steps)" if progress else None)
    rec.update(batch_size=batch_size, steps=steps, per_image_s=rec["median_s"] / batch_size)
    return rec
