"""The pruning verb: :func:`prune_` (a model in memory, in place) and :func:`prune_model` (a model by name)."""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from .._torch import dtype_name, float32_while, state_shapes
from ..adapters import resolve_adapter
from ..errors import require
from ..importance import METHODS
from ..macs import count_macs
from ..structure import STRUCTURE_FORMAT, TORCH_PRUNING_VERSION, chain_records, layer_widths
from .calibration import accumulate_gradients, calibration_batch, calibration_noise
from .config import DATA_FREE, PruneConfig, PruneReport
from .costs import layer_costs
from .search import _latency_target, _macs_target, _prune_blocks, _prune_channels, _Pruned, latency_timer
from .selection import check_round_to

def prune_(unet: nn.Module, config: PruneConfig, calibration=None, *, scheduler=None, codec=None, device=None,
           split: str = "train", cache_dir=None, num_classes: int | None = None, text_encoder=None, prompts=None,
           timer=None, progress: bool = True, adapter=None) -> PruneReport:
    """Prune the denoiser ``unet`` (any supported family) in place according to ``config``; returns a
    :class:`PruneReport`.

    ``calibration`` (gradient methods only): see :func:`calibration_batch`; a tensor, a file, a folder, a
    dataset name or ``"data-free"`` (a class-conditional model needs labelled data: each image is calibrated with
    its own label). ``scheduler``: the model's noise scheduler (``add_noise``, ``num_train_timesteps`` and the
    ``prediction_type`` the loss targets), required by gradient methods. ``codec``: a latent pipeline's
    autoencoder (:class:`~diffprune.components.LatentCodec`): calibration images are encoded with it
    (cached under ``cache_dir``). ``num_classes``: the classes a conditional model was trained on, for data-free
    calibration. ``text_encoder`` (a text-to-image pipeline's :class:`~diffprune.components.TextEncoder`):
    encodes the calibration captions, or the ``prompts`` of data-free calibration. ``device``: where to run
    (default: where the model is; the model is moved there); a ``target_latency`` is timed there. ``timer(model) ->
    seconds``: replaces the latency measurement (tests, or a timer of your own, e.g. of a whole pipeline call).
    ``adapter``: the model's adapter (default: its family's), resolved once and handed to every step.
    """
    require(isinstance(config, PruneConfig), f"config must be a PruneConfig, got {type(config).__name__}")
    t0 = time.time()
    adapter = _checked_adapter(unet, config, adapter)
    method = METHODS.get(config.method)
    if device is not None:
        unet.to(device)
    device = next(unet.parameters()).device
    calibration_record = latency = None
    # a half-precision model is calibrated and scored in float32 (gradient methods), its kept weights cast back
    with adapter.tracing(unet), float32_while(unet, method.needs_gradients) as dtype:
        before = count_macs(unet, adapter=adapter, shapes_only=True)  # shapes only: no weight is read
        widths_before, snapshot = layer_widths(unet), adapter.snapshot(unet)
        if method.needs_gradients:
            calibration_record = _calibrate(unet, adapter, config, calibration, scheduler, device, progress,
                                            codec=codec, split=split, cache_dir=cache_dir, num_classes=num_classes,
                                            text_encoder=text_encoder, prompts=prompts)
        importance = method.make(config)
        if config.target_latency is not None:
            timer = timer or latency_timer(config, device, adapter)
            base_s = timer(unet)
        if method.removes == "blocks":
            pruned = _prune_blocks(unet, adapter, config, importance, before.macs)
        else:
            pruned = _select_channels(unet, adapter, config, importance, snapshot, before, progress,
                                      (timer, base_s) if config.target_latency is not None else None, device, cache_dir)
        unet.zero_grad(set_to_none=True)
        if method.after_pruning is not None:
            method.after_pruning(unet, config.seed)
            adapter.check(unet)
        after = count_macs(unet, adapter=adapter, shapes_only=True)
        if config.target_latency is not None:  # the pruned model itself, timed as the probes were
            achieved = timer(unet)
            latency = {"base_s": base_s, "s": achieved, "fraction": achieved / base_s, "batch": config.latency_batch,
                       "dtype": config.latency_dtype, "device": str(device), "threads": torch.get_num_threads(),
                       "repeats": config.latency_repeats}
    return _report(unet, config, adapter, pruned, before, after, widths_before, calibration_record, latency,
                   seconds=round(time.time() - t0, 3), dtype=dtype_name(dtype))


def _select_channels(unet, adapter, config: PruneConfig, importance, snapshot, before, progress: bool,
                     timing, device, cache_dir) -> _Pruned:
    """Channel pruning in place: the target (MACs, or latency with ``timing`` = (timer, seconds before)), the cost
    table of a cost-aware allocation (from ``before``, the MAC count of the unpruned model), then the selection."""
    target = (_macs_target(config, before.macs, adapter) if config.target_macs is not None else
              _latency_target(config, *timing) if timing is not None else None)
    costs = layer_costs(unet, adapter, config, per_layer=before.per_layer, device=device, cache_dir=cache_dir,
                        progress=progress)
    return _prune_channels(unet, adapter, config, importance, snapshot, before.macs, progress, target, costs)


def _calibrate(unet, adapter, config: PruneConfig, calibration, scheduler, device, progress: bool, **sources) -> dict:
    """The gradient step (Diff-Pruning's steps 1 and 2): the calibration batch and noise, then the gradients
    accumulated over the timesteps; returns the calibration record. ``sources``: :func:`calibration_batch`'s."""
    require(calibration is not None,
            f"method {config.method!r} scores channels with gradients and needs calibration images: pass a "
            f"tensor, an image folder or dataset name, or {DATA_FREE!r} (CLI: --data DIR_OR_NAME)")
    require(scheduler is not None,
            f"method {config.method!r} needs the model's noise scheduler (scheduler=...) to add noise")
    x0, cond, desc = calibration_batch(
        unet, calibration, batch_size=config.calib_batch, seed=config.seed, scheduler=scheduler,
        data_free_steps=config.data_free_steps, device=device, progress=progress, adapter=adapter, **sources)
    draws = config.noise_draws
    noise = calibration_noise(x0.shape, config.seed, device=device, draws=draws).view(draws, *x0.shape)
    results = [accumulate_gradients(unet, scheduler, x0, noise[k], config.timestep_strategy(), cond=cond,
                                    adapter=adapter, timestep_batch=config.timestep_batch, progress=progress,
                                    zero_grad=k == 0) for k in range(draws)]
    record = {**desc, "noise_seed": config.seed, **results[0].to_dict()}
    if draws > 1:  # the first draw's walk above; every draw's accumulated timesteps, and the total time
        record.update(noise_draws=draws, accumulated_per_draw=[r.accumulated for r in results],
                      seconds=round(sum(r.seconds for r in results), 3),
                      cpu_seconds=round(sum(r.cpu_seconds for r in results), 3))
    return record


def _checked_adapter(unet, config: PruneConfig, adapter):
    """``unet``'s adapter as ``config.layout`` sees it, after every check that needs no calibration pass (which may
    take minutes): the layout, finite weights, ``round_to``."""
    from .._torch import require_finite_weights
    from ..io.save import layout_adapter

    adapter = layout_adapter(resolve_adapter(unet, adapter), config)
    require_finite_weights(unet, "model to prune")
    check_round_to(unet, adapter, config.round_to)
    return adapter


def _report(unet, config: PruneConfig, adapter, pruned: _Pruned, before, after, widths_before, calibration_record,
            latency, seconds: float, dtype: str) -> PruneReport:
    """The :class:`PruneReport` of a pruned model: the figures before and after, and the replayable structure."""
    structure = {
        "format": STRUCTURE_FORMAT, "adapter": adapter.name, "torch_pruning": TORCH_PRUNING_VERSION,
        "history": pruned.history, "meta": pruned.meta,
        "shapes": state_shapes(unet),
    }
    return PruneReport(
        config=config.to_dict(), method=config.method, ratio=pruned.ratio, family=adapter.name,
        base_params=before.params, params=after.params, base_macs=before.macs, macs=after.macs,
        structure=structure, calibration=calibration_record, search=pruned.search,
        base_widths=widths_before, widths=layer_widths(unet),
        base_macs_per_layer=before.per_layer, macs_per_layer=after.per_layer,
        seconds=seconds, scores=pruned.scores, latency=latency,
        kept_out_of_order=[list(x) for x in pruned.skip], dtype=dtype,
    )


def prune_model(model: str | os.PathLike, config: PruneConfig, calibration=None, *, device=None,
                split: str = "train", cache_dir=None, prediction_type: str | None = None, prompts=None,
                progress: bool = True, dtype: torch.dtype | str = "auto"):
    """Load ``model`` (a shipped name, a folder — bare model or pipeline, pruned or not — or a hub id) and prune its
    denoiser in place; returns ``(loaded, report)`` with ``loaded.pruning`` set to the record to save (chained
    onto the previous one for a model pruned again) and ``loaded.scheduler`` to the scheduler used.
    ``prediction_type``: what the model predicts, for a model without a scheduler (checked against one it has).
    ``prompts``: for a text-to-image pipeline calibrated ``"data-free"``, the prompts its inputs are generated from.
    ``dtype``: the dtype the denoiser is loaded, pruned and saved in (``"auto"``: the one its weights are stored in,
    so a bfloat16 model stays bfloat16; scores are computed in float32 whatever it is). ``config.layout`` is
    recorded in the pruning record ("stock": saved so that plain diffusers ``from_pretrained`` loads it).

    Save it with ``save_pruned(loaded.denoiser, out, loaded.pruning, scheduler=loaded.scheduler,
    pipeline=loaded.pipeline)``.
    """
    from ..io import load_model
    from ..io.save import with_layout
    from ..objective import resolve_scheduler

    loaded = load_model(model, dtype=dtype)
    require(not (loaded.pruning or {}).get("structure", {}).get("meta", {}).get("removed_blocks"),
            f"{str(model)!r} was depth-pruned (whole blocks removed); prune the original model instead")
    scheduler = resolve_scheduler(loaded.scheduler, prediction_type)
    for part in (loaded.codec, loaded.text_encoder):
        if part is not None and device is not None:
            part.to(device)
    names = loaded.class_names
    report = prune_(loaded.denoiser, config, calibration, scheduler=scheduler, codec=loaded.codec, device=device,
                    split=split, cache_dir=cache_dir, num_classes=len(names) if names else None,
                    text_encoder=loaded.text_encoder, prompts=prompts, progress=progress)
    record = {**report.to_dict(), "model_source": str(model), "model_revision": loaded.revision,
              "scheduler_source": "model" if loaded.scheduler is not None else
              f"default (DDPM, 1000 steps, linear, {scheduler.config.prediction_type})"}
    record = with_layout(record, loaded.denoiser, config.layout)
    if loaded.pruning is not None:
        record = chain_records(loaded.pruning, record)
    loaded.pruning, loaded.scheduler = record, scheduler
    return loaded, report
