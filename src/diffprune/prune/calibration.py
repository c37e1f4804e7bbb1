"""Steps 1 and 2 of Diff-Pruning: the calibration batch and noise, and the gradient walk over the timesteps."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _cond
from ..adapters import resolve_adapter
from ..errors import DiffPruneError, require, require_int
from ..objective import is_flow_matching
from ..timesteps import TimestepStrategy
from .config import DATA_FREE, CalibrationResult


def calibration_noise(shape, seed: int, device=None, dtype=torch.float32, draws: int = 1) -> torch.Tensor:
    """The fixed calibration noise: ``torch.randn(shape, generator=Generator().manual_seed(seed))`` on the CPU; with
    ``draws=k``, ``k`` such draws one after the other from that generator, stacked ``[k, *shape]`` (the first is the
    single draw)."""
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for _ in range(draws)])
    return (noise if draws > 1 else noise[0]).to(device=device, dtype=dtype)


def _check_tensor(x: torch.Tensor, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    c, h, w = shape
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise DiffPruneError(
            f"{what} have shape {tuple(x.shape)} but the model takes [N, {c}, {h}, {w}]; "
            f"resize them to {h}x{w} with {c} channel(s) (or pass a folder/dataset name, which is fitted)"
        )
    require(x.shape[0] >= 1, f"{what} are empty")
    if x.dtype == torch.uint8:
        return x
    require(x.is_floating_point(), f"{what} must be float in [-1, 1] or uint8, got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    require(lo >= -1.0 - 1e-4 and hi <= 1.0 + 1e-4,
            f"{what} range [{lo:.3g}, {hi:.3g}] is outside [-1, 1]; map uint8 images with diffprune.data.to_model_range")
    return x.float()


def _load_tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (and labels, key ``labels`` of a safetensors file) from a ``.npy`` or ``.safetensors`` file."""
    if path.suffix == ".npy":
        import numpy as np

        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)), None
        except ValueError as e:
            raise DiffPruneError(f"cannot read {str(path)!r} without pickle ({e}); save a plain numeric array") from None
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    labels = tensors.pop("labels", None)
    require(len(tensors) == 1 or "images" in tensors,
            f"{str(path)!r} holds tensors {sorted(tensors)}; store the images under the key 'images'")
    return (tensors["images"] if "images" in tensors else next(iter(tensors.values()))), labels


def calibration_batch(model, source, *, batch_size: int, seed: int = 0, scheduler=None, codec=None,
                      split: str = "train", data_free_steps: int = 10, device=None, cache_dir=None,
                      num_classes: int | None = None, text_encoder=None, prompts=None, progress: bool = False,
                      adapter=None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The calibration batch: clean inputs ``x0`` in model range (images in [-1, 1], or latents for a latent
    model), each image's conditioning (its label for a class-conditional model, its caption's context for a
    text-conditioned one, encoded with ``text_encoder``; else None), and a JSON description of the source.

    ``source``: a tuple ``(x0, cond)`` of inputs already in the denoiser's space (latents for a latent model) and
    their conditioning; a tensor ``[N, C, H, W]`` (float in [-1, 1] or uint8) of exactly the image shape; a ``.npy`` or
    ``.safetensors`` file holding one (key ``images``, optional ``labels``); a folder of images, a bundled dataset
    name or a Hugging Face id (:func:`diffprune.data.load_data`, fitted to the model; class sub-folders give
    labels); or ``"data-free"``: inputs sampled from the model itself with ``data_free_steps`` DDIM steps (latents
    for a latent model; class labels balanced by seed over ``num_classes``, default the model's label table; for a
    text model, seed ``s`` is generated from ``prompts[s mod len(prompts)]``, without guidance). When more than
    ``batch_size`` images are available a seeded random subset is used. ``adapter``: the model's (default: its
    family's).
    """
    from .._hashing import content_sha256
    from ..data import ImageData
    from ..inputs import denoiser_data, pixel_shape

    adapter = resolve_adapter(model, adapter)
    device = device if device is not None else next(model.parameters()).device
    spec = adapter.conditioning(model)
    require(prompts is None or (isinstance(source, str) and source == DATA_FREE and spec is not None
                                and spec.kind == "text"),
            "prompts are for data-free calibration of a text-to-image model (--data data-free); this calibration "
            "takes its conditioning from the data (captions or labels): drop --prompt/--prompt-file")
    if isinstance(source, tuple):
        return _given_batch(source, adapter, model, batch_size, seed, device)
    if isinstance(source, str) and source == DATA_FREE:
        return _data_free_batch(model, adapter, scheduler, seeds=list(range(seed, seed + batch_size)), codec=codec,
                                steps=data_free_steps, device=device, num_classes=num_classes,
                                text_encoder=text_encoder, prompts=prompts, progress=progress)
    images, labels, captions, desc = _source_images(source, pixel_shape(model, codec, adapter=adapter), split)
    if images.shape[0] > batch_size:
        idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:batch_size]
        images, labels = images[idx], (None if labels is None else labels[idx])
        captions = None if captions is None else tuple(captions[i] for i in idx.tolist())
        desc["subset_seed"] = int(seed)
    data = ImageData(images, labels, None, {"source": desc["source"], "sha256": content_sha256(images, labels,
                                                                                             captions)}, captions)
    prepared = denoiser_data(model, data, codec=codec, text_encoder=text_encoder, cache_dir=cache_dir,
                             adapter=adapter)
    x0, y = prepared.batch(torch.arange(len(prepared)), device=device)
    desc["batch"] = int(x0.shape[0])
    return x0, y, desc


def _given_batch(source: tuple, adapter, model, batch_size: int, seed: int, device):
    """A batch given in memory: ``(x0, cond)``, inputs already in the denoiser's space (latents for a latent model)
    with their conditioning (None, labels, a text context or a dict of text tensors)."""
    require(len(source) == 2, f"a calibration batch given as a tuple is (x0, cond); got {len(source)} items")
    x0, cond = source
    spec = adapter.conditioning(model)
    x0, shape = torch.as_tensor(x0), tuple(adapter.input_shape(model))
    require(x0.ndim == 4 and tuple(x0.shape[1:]) == shape and x0.is_floating_point() and len(x0) >= 1,
            f"calibration inputs x0 have shape {tuple(x0.shape)} ({x0.dtype}), but the model takes float [N, "
            f"{', '.join(map(str, shape))}] (latents for a latent model)")
    if spec is None:
        require(cond is None, "this model is unconditional: give (x0, None)")
    else:
        cond = spec.check_context(cond, "calibration conditioning") if spec.kind == "text" else spec.check_labels(cond)
        require(_cond.batch_size(cond) == len(x0), f"{_cond.batch_size(cond)} conditionings for {len(x0)} inputs; "
                                                   "give one per input")
    desc = {"source": "tensors"}
    if len(x0) > batch_size:
        idx = torch.randperm(len(x0), generator=torch.Generator().manual_seed(int(seed)))[:batch_size]
        x0, cond, desc["subset_seed"] = x0[idx], _cond.take(cond, idx), int(seed)
    desc["batch"] = int(len(x0))
    return x0.float().to(device), _cond.to(cond, device), desc


def _data_free_batch(model, adapter, scheduler, *, seeds: list[int], codec, steps: int, device, num_classes,
                     text_encoder, prompts, progress: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Data-free calibration: inputs sampled from the model itself, one per seed (see :func:`calibration_batch`)."""
    require(scheduler is not None, "data-free calibration samples from the model and needs its noise scheduler")
    from ..sampling import labels_for, prompts_for, sample

    # ddim_steps: the sampler's steps (Euler steps for a flow-matching model; the key keeps its name for old records)
    desc = {"source": DATA_FREE, "ddim_steps": steps, "sample_seeds": [seeds[0], seeds[-1]]}
    spec = adapter.conditioning(model)
    labels = context = None
    if spec is not None and spec.kind == "text":
        require(text_encoder is not None and prompts,
                "data-free calibration of a text model generates its inputs from prompts: pass the pipeline's "
                "text encoder and prompts (CLI: --prompt-file FILE, one prompt per line)")
        context = text_encoder.encode(prompts_for(seeds, prompts))
        desc["prompts"] = len(prompts)
    else:
        labels = labels_for(model, seeds, num_classes=num_classes, adapter=adapter)
    x0 = sample(model, scheduler, seeds=seeds, class_labels=labels, prompt_embeds=context, num_inference_steps=steps,
                device=device, progress=progress, codec=codec, decode=False, adapter=adapter)
    cond = labels if context is None else context
    return x0.to(device), _cond.to(cond, device), {**desc, "batch": len(seeds)}


def _source_images(source, shape: tuple[int, int, int], split: str):
    """``(images, labels, captions, description)`` from a tensor, a tensor file, or a folder or dataset name
    (fitted to ``shape``, the model's ``(C, H, W)``)."""
    labels = captions = None
    if isinstance(source, torch.Tensor):
        images, desc = _check_tensor(source, shape, "calibration images"), {"source": "tensor"}
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_file() and Path(source).suffix in (".npy",
                                                                                                      ".safetensors"):
        images, labels = _load_tensor_file(Path(source))
        images = _check_tensor(images, shape, f"calibration images in {str(source)!r}")
        desc = {"source": str(source)}
    elif isinstance(source, (str, os.PathLike)):
        from ..data import load_data

        require(shape[1] == shape[2], f"the model takes {shape[1]}x{shape[2]} images; pass a tensor of that shape")
        data = load_data(source, resolution=shape[1], channels=shape[0], split=split)
        images, labels, captions = data.images, data.labels, data.captions
        desc = {"source": str(source), "split": split, "revision": data.record.get("revision")}
    else:
        raise DiffPruneError(f"calibration must be a tensor, a path/dataset name or {DATA_FREE!r}, got "
                             f"{type(source).__name__}")
    return images, labels, captions, desc


def accumulate_gradients(model: nn.Module, scheduler, x0: torch.Tensor, noise: torch.Tensor,
                         strategy: TimestepStrategy, *, cond=None, adapter=None, timestep_batch: int = 1,
                         progress: bool = True, zero_grad: bool = True) -> CalibrationResult:
    """Step 2 of Diff-Pruning: walk the strategy's timesteps, ``backward()`` each loss without zeroing gradients.

    Gradients are zeroed once at the start (``zero_grad=False``: added to those already there, for a further noise
    draw). Each planned ``(t, weight)`` gives ``L_t = mse(f(x_t, t, cond),
    target)`` (the target follows the scheduler's prediction type, :mod:`diffprune.objective`; ``cond``: each
    input's label for a conditional model); ``strategy.decide`` says whether it is accumulated
    (``(weight * L_t).backward()``) and whether to stop. ``adapter``: how to call the model (default: its family's).

    ``timestep_batch=k`` walks ``k`` timesteps per pass: one forward of the batch repeated at ``k`` timesteps gives
    their ``k`` losses, the stopping rule reads them in order, and one ``backward`` of the sum of the accumulated
    ones adds the same gradient as ``k`` separate passes (equal up to float summation order; the model's layers
    act on each sample alone). At most ``k - 1`` forward passes past the stop are wasted; memory grows ``k``-fold.
    """
    require_int("timestep_batch", timestep_batch, 1)
    started, started_cpu = time.perf_counter(), time.process_time()
    adapter = resolve_adapter(model, adapter)
    require(hasattr(scheduler, "add_noise") or is_flow_matching(scheduler),
            "the scheduler must have add_noise (a diffusers noise scheduler) or be a flow-matching one")
    T = int(scheduler.config.num_train_timesteps)
    plan = strategy.plan(T)
    full = len(type(strategy)(**{**dataclasses.asdict(strategy), "max_timesteps": None}).plan(T))
    if zero_grad:
        model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    x0, noise = x0.to(dtype=dtype), noise.to(device=x0.device, dtype=dtype)
    losses: list[tuple[int, float]] = []
    accumulated: list[int] = []
    stopped = False
    bar = tqdm(total=len(plan), desc="calibration", unit="t", disable=not progress)
    for start in range(0, len(plan), timestep_batch):
        chunk = plan[start:start + timestep_batch]
        total = None
        for (t, weight), loss in zip(chunk, _chunk_losses(model, adapter, scheduler, x0, noise, cond, chunk)):
            value = float(loss.detach())
            if not math.isfinite(value):  # a NaN score would prune arbitrary channels
                raise DiffPruneError(f"calibration loss at t={t} is {value}; the model has non-finite weights or the "
                                     "calibration images are broken; check the model (diffprune info) and --data")
            losses.append((t, value))
            accumulate, stop = strategy.decide([v for _, v in losses])
            if accumulate:
                term = loss * weight if weight != 1.0 else loss
                total = term if total is None else total + term
                accumulated.append(t)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if stop:
                stopped = True
                break
        if total is not None:
            total.backward()
        if stopped:
            break
    bar.close()
    stopped_by = "threshold" if stopped else ("cap" if len(plan) < full else "end")
    return CalibrationResult(losses, accumulated, accumulated[-1] if accumulated else None, stopped_by,
                             strategy.to_dict(), time.perf_counter() - started, time.process_time() - started_cpu)


def _chunk_losses(model, adapter, scheduler, x0, noise, cond, chunk: list[tuple[int, float]]) -> torch.Tensor:
    """The loss at each of the chunk's timesteps, from one forward pass of the batch repeated once per timestep."""
    from ..objective import model_timesteps, noisy, prediction_target

    k, B = len(chunk), x0.shape[0]
    tt = torch.tensor([t for t, _ in chunk], device=x0.device).repeat_interleave(B)
    xx0, nn_ = x0.repeat(k, *([1] * (x0.ndim - 1))), noise.repeat(k, *([1] * (x0.ndim - 1)))
    pred = adapter.forward(model, noisy(scheduler, xx0, nn_, tt), model_timesteps(scheduler, tt), _cond.repeat(cond, k))
    return (pred - prediction_target(scheduler, xx0, nn_, tt)).pow(2).flatten(1).mean(1).view(k, B).mean(1)
