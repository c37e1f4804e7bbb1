"""Sampling: DDIM with uniform or quadratic timestep spacing, and DDPM, reproducible per sample; for a flow-matching
model (SD3, Flux: a ``FlowMatch*`` scheduler), Euler steps over its scheduler's own sigmas (:class:`FlowEuler`).

Image i always comes from seed ``seeds[i]``: its starting noise and (for stochastic samplers) every step's noise
are drawn from its own generator, so a seed gives the same image at every batch size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from . import _cond
from ._torch import eval_mode
from .adapters import resolve_adapter
from .errors import DiffPruneError, require
from .objective import default_scheduler, is_flow_matching  # noqa: F401 (re-exported: callers import it from here)

SAMPLERS = ("ddim", "ddpm")

SKIPS = ("uniform", "quad")


def skip_timesteps(num_train_timesteps: int, num_inference_steps: int, skip: str) -> np.ndarray:
    """Descending timesteps of a strided sampler, as in the DDIM paper's code.

    ``uniform``: range(0, T, T // S). ``quad``: int(linspace(0, sqrt(0.8 T), S) ** 2); for large S (S > 1 +
    sqrt(0.8 T): 30 of 1,000) its first values repeat, and each repeat is moved to one past the value before it, so
    exactly S distinct steps remain (the DDIM paper's code drops the repeats and runs fewer steps than asked).
    """
    T, S = num_train_timesteps, num_inference_steps
    require(1 <= S <= T, f"num_inference_steps={S} must be in [1, {T}] (the scheduler's num_train_timesteps)")
    require(skip in SKIPS, f"unknown skip {skip!r}; choose from {list(SKIPS)}")
    if skip == "uniform":
        seq = np.arange(0, T, T // S)[:S]
    else:
        seq = (np.linspace(0, np.sqrt(0.8 * T), S) ** 2).astype(np.int64)
        seq = np.maximum.accumulate(seq - np.arange(S)) + np.arange(S)  # a_i = max(q_i, a_(i-1) + 1): distinct
    return seq[::-1].copy()


class QuadDDIMScheduler(DDIMScheduler):
    """DDIM whose every step goes to the *true* previous timestep of an arbitrary (e.g. quadratic) sequence.

    Stock ``DDIMScheduler.step`` assumes even spacing (prev = t - T // S), which is wrong for quadratic spacing.
    Supports ``prediction_type`` epsilon, sample and v_prediction.
    """

    def set_timesteps(self, num_inference_steps: int, device=None, skip: str = "uniform"):  # type: ignore[override]
        seq = skip_timesteps(self.config.num_train_timesteps, num_inference_steps, skip)
        self.num_inference_steps = len(seq)
        self.timesteps = torch.from_numpy(seq).to(device)
        self._prev = {int(t): int(p) for t, p in zip(seq, list(seq[1:]) + [-1])}

    def previous_timestep(self, timestep) -> int:
        return self._prev[int(timestep)]

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        t = int(timestep)
        prev = self._prev[t]
        a_t = self.alphas_cumprod[t].to(sample.device, sample.dtype)
        a_prev = (self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod).to(sample.device, sample.dtype)
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
            x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        elif kind == "v_prediction":
            x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
            eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * sample
        else:
            raise ValueError(f"prediction_type {kind!r} is not supported; use epsilon, sample or v_prediction")
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
            if use_clipped_model_output:
                eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var.clamp(min=0).sqrt()
        prev_sample = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            require(variance_noise is not None, "eta > 0 needs variance_noise (per-sample noise for reproducibility)")
            prev_sample = prev_sample + std * variance_noise
        if not return_dict:
            return (prev_sample, x0)
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class FlowEuler:
    """Deterministic Euler steps of a flow-matching model, ``x ← x + (σ_next − σ) v``, over the sigmas that
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes from the model's scheduler config: what its ``step``
    computes (in float32), but stateless, so every batch walks the same schedule. ``timesteps`` are what the stock
    pipelines call the model with (``σ · T``).

    ``sigmas``: the pipeline's own spacing when it passes one (FluxPipeline: ``linspace(1, 1/n, n)``; None: the
    scheduler's). ``image_tokens``: the image sequence length, from which a resolution-dependent scheduler
    (``use_dynamic_shifting``) gets its shift ``mu`` by diffusers' ``calculate_shift``, as the pipelines compute it.
    """

    def __init__(self, scheduler, num_inference_steps: int, *, image_tokens: int, sigmas=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = scheduler.config
        require(num_inference_steps >= 1, f"num_inference_steps={num_inference_steps} must be >= 1")
        require(not cfg.get("stochastic_sampling", False), "the scheduler config sets stochastic_sampling, which "
                                                           "diffprune's reproducible Euler sampler does not do; set it "
                                                           "false in scheduler_config.json")
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        kwargs = {"mu": flow_shift(cfg, image_tokens)} if cfg.get("use_dynamic_shifting", False) else {}
        if sigmas is None or cfg.get("use_flow_sigmas", False):
            sched.set_timesteps(num_inference_steps, **kwargs)
        else:
            sched.set_timesteps(sigmas=list(sigmas), **kwargs)
        self.timesteps, self.sigmas = sched.timesteps, sched.sigmas
        self._next = {float(t): (self.sigmas[i], self.sigmas[i + 1]) for i, t in enumerate(self.timesteps)}

    def step(self, model_output, timestep, sample, eta: float = 0.0, variance_noise=None):
        sigma, sigma_next = self._next[float(timestep)]
        out = (sample.to(torch.float32) + (sigma_next - sigma) * model_output).to(model_output.dtype)
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=out)


def flow_shift(config, image_tokens: int) -> float:
    """``mu`` of a resolution-dependent flow-matching scheduler for ``image_tokens`` image tokens: diffusers'
    ``calculate_shift`` with the scheduler config's bounds, as FluxPipeline and StableDiffusion3Pipeline compute it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def labels_for(model, seeds: Sequence[int], class_labels=None, num_classes: int | None = None, *,
               adapter=None) -> torch.Tensor | None:
    """The class label of each seed for a class-conditional model (None for an unconditional one).

    ``class_labels``: one label per seed, or a single label for all; None balances the classes by seed: seed ``s``
    draws class ``s mod num_classes``, so a seed always comes with the same label, whatever the batch or subset.
    ``num_classes``: the classes the model was trained on (``LoadedModel.class_names``), when fewer than its label
    table has rows (a 10-digit DiT with DiT-XL/2's 1,000-class table); default: the whole table.
    """
    spec = resolve_adapter(model, adapter).conditioning(model)
    if spec is None:
        require(class_labels is None, "this model is unconditional: it takes no class labels (drop --class-labels)")
        return None
    if class_labels is None:
        n = min(num_classes or spec.num_classes, spec.num_classes)
        return torch.tensor([int(s) % n for s in seeds], dtype=torch.long)
    given = torch.as_tensor(class_labels).reshape(-1)
    require(not given.is_floating_point() or bool((given == given.round()).all()),
            f"class labels {given[given != given.round()].tolist()[:5]} are not whole numbers; give class ids")
    labels = given.to(torch.long)
    if labels.numel() == 1:
        labels = labels.expand(len(seeds)).clone()
    require(labels.numel() == len(seeds), f"{labels.numel()} class labels for {len(seeds)} seeds; give one label, "
                                          "or one per image")
    trained = min(num_classes or spec.num_classes, spec.num_classes)
    bad = sorted(set(labels[(labels < 0) | (labels >= trained)].tolist()))
    require(not bad, f"class labels {bad[:5]} are out of range: this model was trained on {trained} classes "
                     f"(0..{trained - 1})")
    return labels


def prompts_for(seeds: Sequence[int], prompts: Sequence[str]) -> list[str]:
    """The prompt of each seed: seed ``s`` takes ``prompts[s mod len(prompts)]`` (the rule labels follow), so a seed
    always comes with the same prompt, whatever the batch or subset."""
    require(len(prompts) >= 1, "no prompts given; pass at least one (--prompt TEXT or --prompt-file FILE)")
    return [str(prompts[int(s) % len(prompts)]) for s in seeds]


def conditioning_for(model, seeds: Sequence[int], class_labels=None, prompt_embeds=None,
                     num_classes: int | None = None, *, adapter=None) -> torch.Tensor | None:
    """Each seed's conditioning: class labels (:func:`labels_for`) for a class-conditional model, the context
    ``prompt_embeds`` (``[N, L, D]``, or ``[1, L, D]`` for all) for a text-conditioned one, None for an
    unconditional one."""
    adapter = resolve_adapter(model, adapter)
    spec = adapter.conditioning(model)
    if spec is None or spec.kind != "text":
        require(prompt_embeds is None, "this model is not text-conditioned: it takes no prompt (drop --prompt)")
        return labels_for(model, seeds, class_labels, num_classes, adapter=adapter)
    require(class_labels is None, "this model is text-conditioned: it takes a prompt, not class labels")
    require(prompt_embeds is not None, "this model is text-conditioned: pass prompt_embeds (TextEncoder.encode"
                                       "(prompts); CLI: --prompt TEXT or --prompt-file FILE)")
    return _per_seed(spec.check_context(prompt_embeds, "prompt_embeds"), len(seeds), "prompt_embeds")


def _per_seed(cond, n: int, what: str):
    size = _cond.batch_size(cond)
    require(size in (1, n), f"{size} {what} for {n} seeds; give one, or one per image")
    return _cond.expand(cond, n)


def guided_prediction(adapter, model, x: torch.Tensor, t: torch.Tensor, cond, guidance_scale: float,
                      null_cond, embedded: float | None = None) -> torch.Tensor:
    """The model's prediction, with classifier-free guidance ``u + s (c - u)`` when ``guidance_scale != 1``
    (``null_cond``: the unconditional conditioning, one per input or ``[1, ...]``). ``embedded``: the guidance value
    a guidance-distilled model (FLUX.1-dev) takes as an input instead (one call, no unconditional branch)."""
    if embedded is not None:
        return adapter.forward(model, x, t, cond, guidance=embedded)
    if cond is None or guidance_scale == 1.0:
        return adapter.forward(model, x, t, cond)
    null = _cond.to(_cond.expand(null_cond, _cond.batch_size(cond)), x.device, x.dtype)
    both = adapter.forward(model, torch.cat([x, x]), torch.cat([t, t]), _cond.cat([cond, null]))
    c, u = both.chunk(2)
    return u + guidance_scale * (c - u)


@torch.no_grad()
def sample(model, scheduler, *, seeds: Sequence[int], class_labels=None, prompt_embeds=None,
           negative_prompt_embeds=None, guidance_scale: float | None = None, codec=None, num_inference_steps: int = 50,
           sampler: str = "ddim", skip: str = "uniform", eta: float | None = None, batch_size: int = 64,
           device=None, decode: bool = True, num_classes: int | None = None, progress: bool = True,
           adapter=None) -> torch.Tensor:
    """Generate ``len(seeds)`` images; returns float32 ``[N, C, H, W]`` in [-1, 1] on the CPU.

    ``sampler="ddim"`` is deterministic (eta 0 unless given). ``sampler="ddpm"`` is DDIM with eta 1, which over all
    T steps is exactly ancestral DDPM with the posterior variance (and its strided generalisation for fewer steps).
    A flow-matching model (its scheduler a ``FlowMatch*`` one: SD3, Flux) is sampled by :class:`FlowEuler`, Euler
    steps over its scheduler's sigmas, as its stock pipeline does; ``sampler``, ``skip`` and ``eta`` are DDIM's and
    are refused for it unless left at their defaults (ddim, uniform, 0).
    A class-conditional model takes ``class_labels`` (see :func:`labels_for`, with ``num_classes``); a
    text-conditioned one ``prompt_embeds`` (its text encoder's context, one per seed or one for all, a dict for
    the families that take several text inputs; see :func:`prompts_for` and
    :class:`~diffprune.components.TextEncoder`). ``guidance_scale``: classifier-free guidance (default 1 = none)
    through the model's null label, or for a text model the ``negative_prompt_embeds`` (the empty prompt's
    context, ``TextEncoder.null()``, for plain guidance), as diffusers names them. A guidance-distilled model
    (FLUX.1-dev, ``guidance_embeds``) takes its guidance as an input, as ``FluxPipeline``'s ``guidance_scale``:
    here too ``guidance_scale`` sets it (default: the adapter's, 3.5), with one model call per step and no
    unconditional branch, so ``negative_prompt_embeds`` are not used. ``codec``: a latent pipeline's autoencoder;
    the latents are decoded into images unless ``decode=False``, and predicted latents are never clipped to [-1, 1]
    (a scheduler's ``clip_sample`` is meant for pixels; latents range wider). ``device`` defaults to the model's.
    """
    require(sampler in SAMPLERS, f"unknown sampler {sampler!r}; choose from {list(SAMPLERS)}")
    require(batch_size >= 1, f"batch_size={batch_size} must be >= 1")
    adapter = resolve_adapter(model, adapter)
    seeds = [int(s) for s in seeds]
    conds = conditioning_for(model, seeds, class_labels, prompt_embeds, num_classes, adapter=adapter)
    guidance_scale, embedded = _guidance(adapter, model, guidance_scale)
    null = None if embedded is not None else _null_conditioning(adapter.conditioning(model), len(seeds),
                                                                guidance_scale, negative_prompt_embeds)
    device = device if device is not None else next(model.parameters()).device
    sched, eta = _schedule(adapter, model, scheduler, num_inference_steps, (sampler, skip, eta), codec)
    dtype = next(model.parameters()).dtype
    out = []
    bar = tqdm(total=len(seeds) * len(sched.timesteps), desc="sampling", unit="step", disable=not progress)
    with eval_mode(model):
        for i in range(0, len(seeds), batch_size):
            chunk = seeds[i:i + batch_size]
            y = _cond.to(_cond.take(conds, slice(i, i + batch_size)), device, dtype)
            y_null = _cond.take(null, slice(i, i + batch_size))
            x = _denoise(adapter, model, sched, chunk, (y, y_null, guidance_scale, embedded), eta, device, dtype, bar)
            out.append(_finish(x, chunk, codec, decode))
    bar.close()
    return torch.cat(out)


def _guidance(adapter, model, guidance_scale) -> tuple[float, float | None]:
    """``(classifier-free scale, embedded guidance)``: a guidance-distilled model's ``guidance_scale`` is its embedded
    guidance (None: the adapter's default) and its classifier-free scale 1; any other model's default scale is 1."""
    default = adapter.embedded_guidance(model)
    if default is None:
        return (1.0 if guidance_scale is None else guidance_scale), None
    value = default if guidance_scale is None else guidance_scale
    require(isinstance(value, (int, float)) and value >= 0, f"guidance_scale={value!r} must be a number >= 0 (this "
                                                            f"guidance-distilled model takes it as an input; default "
                                                            f"{default})")
    return 1.0, float(value)


def _schedule(adapter, model, scheduler, steps: int, how: tuple, codec) -> tuple:
    """``(schedule, eta)``: :class:`FlowEuler` for a flow-matching scheduler, else :class:`QuadDDIMScheduler` from
    the scheduler's config (``how``: the sampler, skip and eta asked for)."""
    sampler, skip, eta = how
    if is_flow_matching(scheduler):
        asked = [f"{k}={v!r}" for k, v, ok in (("sampler", sampler, "ddim"), ("skip", skip, "uniform"))
                 if v != ok] + ([f"eta={eta!r}"] if eta not in (None, 0) else [])
        require(not asked, f"{', '.join(asked)} cannot be used with a flow-matching model (its scheduler is "
                           f"{type(scheduler).__name__}): it is sampled by Euler steps over its scheduler's sigmas; "
                           "only num_inference_steps and guidance_scale apply (CLI: drop --sampler/--skip)")
        return FlowEuler(scheduler, steps, image_tokens=adapter.image_tokens(model),
                         sigmas=adapter.sampling_sigmas(model, steps)), 0.0
    eta = (0.0 if sampler == "ddim" else 1.0) if eta is None else float(eta)
    sched = QuadDDIMScheduler.from_config(scheduler.config, **({"clip_sample": False} if codec is not None else {}))
    sched.set_timesteps(steps, skip=skip)
    return sched, eta


def _null_conditioning(spec, n: int, guidance_scale: float, negative_prompt_embeds) -> torch.Tensor | None:
    """The unconditional branch of classifier-free guidance, one per seed (None: the model has none): a text model's
    ``negative_prompt_embeds``, a class model's null label. Refuses guidance a model cannot do."""
    require(isinstance(guidance_scale, (int, float)) and guidance_scale >= 1.0,
            f"guidance_scale={guidance_scale!r} must be >= 1 (1 = no guidance)")
    null = None
    if spec is not None and spec.kind == "text":
        if negative_prompt_embeds is not None:
            null = _per_seed(spec.check_context(negative_prompt_embeds, "negative_prompt_embeds"), n,
                             "negative_prompt_embeds")
        require(guidance_scale == 1.0 or null is not None,
                "classifier-free guidance of a text model needs negative_prompt_embeds (the empty prompt's: "
                "TextEncoder.null()); or use guidance_scale 1")
    elif spec is not None and spec.null() is not None:
        null = spec.null().expand(n)
    if guidance_scale != 1.0:
        require(null is not None, "classifier-free guidance needs a conditional model with a null label (e.g. a "
                                  "DiT) or a text model; this model has none: use --guidance-scale 1")
    return null


def _denoise(adapter, model, sched, chunk: list[int], guidance: tuple, eta: float, device, dtype,
             bar) -> torch.Tensor:
    """One batch, from its seeds' starting noise through every timestep. ``guidance``: ``(cond, null_cond,
    scale, embedded)`` of these seeds. Each seed draws its starting and (eta > 0) step noise from its own generator,
    so an image does not depend on the batch it is in."""
    cond, null_cond, scale, embedded = guidance
    shape = adapter.input_shape(model)
    gens = [torch.Generator().manual_seed(s) for s in chunk]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
    for t in sched.timesteps:
        pred = guided_prediction(adapter, model, x, t.to(device).expand(len(chunk)), cond, scale, null_cond, embedded)
        noise = None
        if eta > 0:
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
        x = sched.step(pred, t, x, eta=eta, variance_noise=noise).prev_sample
        bar.update(len(chunk))
    return x


def _finish(x: torch.Tensor, chunk: list[int], codec, decode: bool) -> torch.Tensor:
    """A denoised batch as :func:`sample` returns it: decoded (latent models, unless ``decode=False``), checked
    finite, pixels clamped to [-1, 1], float32 on the CPU."""
    if codec is not None and decode:
        x = codec.decode(x)
    bad = [s for s, ok in zip(chunk, torch.isfinite(x).flatten(1).all(1).tolist()) if not ok]
    if bad:  # NaN would silently become black pixels
        raise DiffPruneError(f"sampling gave non-finite values (NaN/inf) for seed(s) {bad[:5]}; the model "
                             "has diverged or damaged weights (check them with diffprune info), or the "
                             "scheduler is misconfigured")
    return (x.clamp(-1, 1) if codec is None or decode else x).float().cpu()
