"""``diffprune prune``: structurally prune a diffusion model's denoiser (UNet or transformer; Diff-Pruning and baselines) and save it safely.

Prints params and MACs before -> after and a per-layer width table; ``--dry-run`` prints the same and writes
nothing. The output folder holds config.json + pruning.json + diffusion_pytorch_model.safetensors (+ scheduler/).
"""
from __future__ import annotations

from .._units import si
from ._common import add_device_flag, add_prediction_type_flag, add_prompt_flags, device_of, read_prompts


def _config_defaults():
    """``PruneConfig``'s field defaults by name: the flags show and pass the API's own defaults."""
    import dataclasses
    import types

    from ..prune import PruneConfig

    return types.SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(PruneConfig)})


def add_parser(sub) -> None:
    from .._torch import DTYPES
    from ..layout import FREE, LAYOUTS
    from ..prune import LATENCY_DTYPES

    d = _config_defaults()
    p = sub.add_parser("prune", description=__doc__,
                       help="prune a denoiser, UNet or transformer (diff-pruning, taylor, magnitude, random, reinit, "
                            "depth)")
    p.add_argument("--model", required=True,
                   help="model folder (diffusers model or pipeline, or a pruned folder), shipped name or hub id")
    p.add_argument("--data", default=None,
                   help="calibration images for gradient methods: an image folder, a bundled dataset (mnist, "
                        "digits), a Hugging Face id, a .npy/.safetensors tensor [N,C,H,W] of the model's exact "
                        "shape, or 'data-free' (images sampled from the model itself); a text-to-image pipeline "
                        "needs captions (a folder with metadata.jsonl, or a dataset with a 'text' column)")
    add_prompt_flags(p, "to generate calibration inputs from with --data data-free")
    p.add_argument("--split", default="train", help="dataset split used for --data (default: train)")
    p.add_argument("--method", default=d.method,
                   help=f"importance: {d.method} (default), taylor, magnitude, random, reinit, or depth (whole DiT "
                        "blocks)")
    p.add_argument("--ratio", type=float, default=None, help="fraction of channels to remove, in (0, 1), e.g. 0.3")
    p.add_argument("--ratio-mode", default=None,
                   help="paper (default with --ratio: the Diff-Pruning repository's per-GroupNorm-group rule) or "
                        "uniform (Torch-Pruning 1.6.1's semantics; default with --target-macs)")
    p.add_argument("--target-macs", type=float, default=None,
                   help="keep this fraction of the MACs of one denoiser call, in (0, 1), found within "
                        "--macs-tolerance (instead of --ratio)")
    # in help, argparse prints "%%" as "%": ":.0%" gives "2%", the extra "%" escapes it
    p.add_argument("--macs-tolerance", type=float, default=d.macs_tolerance,
                   help=f"relative tolerance for --target-macs (default {d.macs_tolerance} = "
                        f"+-{d.macs_tolerance:.0%}%)")
    p.add_argument("--target-latency", type=float, default=None,
                   help="keep this fraction of the measured latency of one denoiser call, in (0, 1), timed on --device "
                        "at --latency-batch in --latency-dtype (instead of --ratio / --target-macs)")
    p.add_argument("--latency-batch", type=int, default=d.latency_batch,
                   help=f"batch size of the latency target (default {d.latency_batch})")
    p.add_argument("--latency-dtype", default=d.latency_dtype, choices=list(LATENCY_DTYPES),
                   help=f"dtype the latency target is timed in (default {d.latency_dtype})")
    p.add_argument("--latency-tolerance", type=float, default=d.latency_tolerance,
                   help=f"relative tolerance for --target-latency (default {d.latency_tolerance} = "
                        f"+-{d.latency_tolerance:.0%}%: timings on a shared machine vary by a few percent)")
    p.add_argument("--latency-repeats", type=int, default=d.latency_repeats,
                   help="timed runs per probe, after warm-up; the median counts (>= 10)")
    p.add_argument("--ranking", default=None,
                   help="local (per layer) or global (across layers, Torch-Pruning's global pruning; needs "
                        "--ratio-mode uniform); default: global with --target-macs, local with --ratio")
    p.add_argument("--round-to", type=int, default=d.round_to,
                   help="keep every pruned width a multiple of N (e.g. 8 for tensor cores); 1 = no rounding")
    p.add_argument("--allocation", default=d.allocation,
                   help="global ranking: score (rank positions by importance alone, the paper's; default), cost "
                        "(importance per MAC its removal saves) or latency (importance per second it saves, from "
                        "per-layer latency tables measured on --device at --latency-batch/--latency-dtype, cached)")
    p.add_argument("--normalize", default=d.normalize,
                   help="global ranking: none (default) or mean (each group's scores over their mean)")
    p.add_argument("--max-layer-ratio", type=float, default=d.max_layer_ratio,
                   help="global ranking: no layer group loses more than this share of its channels, in (0, 1)")
    p.add_argument("--conditioning-floor", type=float, default=d.conditioning_floor,
                   help="global ranking: the conditioning pathways (timestep/class embedders, adaLN inputs) keep at "
                        "least this share of their channels, in [0, 1); default: the method's (diff-pruning 0.5, "
                        "measured best; others 0); 0 = no floor (the paper's ranking)")
    p.add_argument("--prune-heads", action="store_true",
                   help="remove whole attention heads instead of shrinking head dims (needs --ratio-mode uniform)")
    p.add_argument("--thr", type=float, default=None,
                   help="threshold rule (diff-pruning's default timesteps) in [0, 1): stop at the first t with "
                        "L_t < thr * max L (default 0.05; 0 = all t)")
    p.add_argument("--threshold-semantics", default=None,
                   help="accumulate-trigger (default, diffusers reference: the stopping step is accumulated) or "
                        "exclude-trigger (the paper's experiment code)")
    p.add_argument("--timesteps", default=None,
                   help="timestep strategy: threshold, all or strided (default: threshold for diff-pruning, "
                        "all for taylor)")
    p.add_argument("--stride", type=int, default=None,
                   help="walk every k-th timestep, each loss weighted by k (threshold: an approximate Diff-Pruning "
                        "walk, ~k times cheaper; strided: all of 0..T-1)")
    p.add_argument("--max-timesteps", type=int, default=None,
                   help="cap on the number of calibration timesteps (the rule never fires on an untrained model)")
    p.add_argument("--taylor-form", default=None,
                   help="diff-pruning score: abs (sum |w*g|, default) or squared (sum (w*g)^2, paper experiments)")
    p.add_argument("--calib-batch", type=int, default=None,
                   help="number of calibration images, for gradient methods (default 64)")
    p.add_argument("--timestep-batch", type=int, default=None,
                   help="timesteps per calibration pass (default 1, the reference's walk): k > 1 gives the same "
                        "scores from fewer, larger passes, with k times the memory")
    p.add_argument("--noise-draws", type=int, default=None,
                   help="calibration noise draws of the same batch, gradients summed over all (default 1, the paper): "
                        "k draws give scores that depend less on one draw, at k times the calibration cost")
    p.add_argument("--data-free-steps", type=int, default=None,
                   help="DDIM steps used to sample calibration images with --data data-free (default 10)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the calibration noise, image subset, random scores")
    p.add_argument("--out", default=None, help="output folder (new or empty unless --overwrite; not with --dry-run)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--dry-run", action="store_true", help="prune in memory and print the numbers; write nothing")
    p.add_argument("--json", action="store_true", help="also print the pruning record (pruning.json) to stdout")
    p.add_argument("--cache-dir", default=None,
                   help="cache of encoded latents for latent pipelines (default: $DIFFPRUNE_CACHE or ~/.cache/diffprune)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="dtype the denoiser is loaded, pruned and saved in (default auto: the dtype its weights are "
                        "stored in, so bfloat16 weights stay bfloat16); scores are computed in float32 either way")
    p.add_argument("--layout", default=FREE, choices=list(LAYOUTS),
                   help="free (default: any widths; the folder loads with diffprune) or stock (loads with plain "
                        "diffusers from_pretrained: UNet2DModel widths one per level; transformer families with "
                        "--method depth, whole blocks removed)")
    add_prediction_type_flag(p)
    add_device_flag(p)
    p.set_defaults(func=run)


def width_table(before: dict, after: dict) -> str:
    """Per-layer widths ``in -> out`` before and after, one row per Conv/Linear/GroupNorm layer."""
    rows = [("layer", "before (in->out)", "after (in->out)", "")]
    for name, (i0, o0) in before.items():
        i1, o1 = after.get(name, [0, 0])
        rows.append((name, f"{i0}->{o0}", f"{i1}->{o1}", "" if (i0, o0) == (i1, o1) else "*"))
    w = [max(len(r[k]) for r in rows) for k in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}} {r[3]}".rstrip() for r in rows)


def summary_lines(rec: dict) -> list[str]:
    """``params``/``MACs`` before -> after lines of a pruning record."""
    p0, p1, m0, m1 = rec["base_params"], rec["params"], rec["base_macs"], rec["macs"]
    return [
        f"params: {si(p0)} -> {si(p1, like=p0)} ({p1 / p0:.1%})",
        f"MACs:   {si(m0)} -> {si(m1, like=m0)} ({m1 / m0:.1%}, one call at batch 1)",
    ]


def _ranking(value):
    from ..errors import require

    require(value in (None, "local", "global"), f"unknown --ranking {value!r}; choose from ['global', 'local']")
    return None if value is None else value == "global"


def run(args) -> int:
    import contextlib

    from .._fs import check_output_dir, output_lock
    from ..errors import require
    from ..prune import PruneConfig

    config = PruneConfig(
        method=args.method, ratio=args.ratio, ratio_mode=args.ratio_mode, target_macs=args.target_macs,
        global_ranking=_ranking(args.ranking), prune_heads=args.prune_heads, round_to=args.round_to, thr=args.thr,
        allocation=args.allocation, normalize=args.normalize, max_layer_ratio=args.max_layer_ratio,
        conditioning_floor=args.conditioning_floor,
        threshold_semantics=args.threshold_semantics, timesteps=args.timesteps, stride=args.stride,
        max_timesteps=args.max_timesteps, taylor_form=args.taylor_form, calib_batch=args.calib_batch,
        seed=args.seed, data_free_steps=args.data_free_steps, macs_tolerance=args.macs_tolerance,
        timestep_batch=args.timestep_batch, noise_draws=args.noise_draws, target_latency=args.target_latency,
        latency_batch=args.latency_batch, latency_dtype=args.latency_dtype, latency_tolerance=args.latency_tolerance,
        latency_repeats=args.latency_repeats, layout=args.layout,
    )
    inputs = (args.model, args.data)
    if not args.dry_run:
        require(args.out is not None, "--out DIR is required (or pass --dry-run to only print the numbers)")
        check_output_dir(args.out, args.overwrite, inputs)
    with output_lock(args.out) if not args.dry_run else contextlib.nullcontext():
        return _prune(args, config, inputs)


def _prune(args, config, inputs) -> int:
    import json

    from .._torch import DTYPES
    from ..io import save_pruned
    from ..prune import prune_model

    loaded, report = prune_model(args.model, config, args.data, device=device_of(args), split=args.split,
                                 cache_dir=args.cache_dir, prediction_type=args.prediction_type,
                                 prompts=read_prompts(args),
                                 dtype=args.dtype if args.dtype == "auto" else DTYPES[args.dtype])
    record = loaded.pruning

    print(width_table(report.base_widths, report.widths))
    if report.calibration is not None:
        cal = report.calibration
        print(f"calibration: {cal['batch']} images from {cal['source']}, {len(cal['accumulated'])} timesteps "
              f"accumulated (cutoff t={cal['cutoff_t']}, stopped by {cal['stopped_by']})")
    if config.target_macs is not None:
        print(f"target MACs {config.target_macs:.3f}: ratio {report.ratio:.4f} ({config.ratio_mode} mode) keeps "
              f"{report.macs / report.base_macs:.4f}")
    if report.latency is not None:
        lat = report.latency
        print(f"target latency {config.target_latency:.3f}: ratio {report.ratio:.4f} keeps {lat['fraction']:.4f} "
              f"({lat['base_s'] * 1e3:.2f} -> {lat['s'] * 1e3:.2f} ms per call at batch {lat['batch']}, "
              f"{lat['dtype']}, {lat['device']}, {lat['threads']} threads)")
    for line in summary_lines(record):
        print(line)
    print(f"dtype:  {report.dtype} (scores computed in float32)")
    if args.json:
        print(json.dumps(record, sort_keys=True, default=str))
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    save_pruned(loaded.denoiser.to("cpu"), args.out, record, scheduler=loaded.scheduler, overwrite=args.overwrite,
                inputs=inputs, pipeline=loaded.pipeline)
    print(f"wrote {args.out}")
    return 0
