"""``diffprune info DIR``: summary of a saved model (pruned or not); ``--json`` prints a JSON object with at least
``params``, ``macs``, ``base_params``, ``base_macs`` and ``method``."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="summarise a saved model (params, MACs, pruning method and settings)",
                       description=__doc__)
    p.add_argument("model", help="a pruned model folder, a diffusers model/pipeline folder, a shipped name or hub id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def summarize(name_or_path: str) -> dict:
    """The info dict of a model: counts from pruning.json when present, else counted on the loaded model."""
    from ..io import load_model
    from ..macs import count_macs

    loaded = load_model(name_or_path)
    macs = count_macs(loaded.unet)
    rec = loaded.pruning or {}
    cfg = rec.get("config", {})
    calibration = rec.get("calibration") or {}
    return {
        "source": loaded.source,
        "model_class": type(loaded.unet).__name__,
        "pruned": loaded.pruning is not None,
        "method": rec.get("method"),
        "params": macs.params,
        "macs": macs.macs,
        "base_params": rec.get("base_params", macs.params),
        "base_macs": rec.get("base_macs", macs.macs),
        "ratio": rec.get("ratio"),
        "ratio_mode": cfg.get("ratio_mode"),
        "target_macs": cfg.get("target_macs"),
        "seed": rec.get("seed"),
        "thr": cfg.get("thr") if rec.get("method") == "diff-pruning" else None,
        "cutoff_t": rec.get("cutoff_t"),
        "calibration_timesteps": len(calibration.get("accumulated", [])) if calibration else None,
        "scheduler": type(loaded.scheduler).__name__ if loaded.scheduler is not None else None,
        "diffprune_version": rec.get("diffprune_version"),
        "sample_size": loaded.unet.config.sample_size,
        "in_channels": loaded.unet.config.in_channels,
    }


def run(args) -> int:
    import json

    from .prune import summary_lines

    info = summarize(args.model)
    if args.json:
        print(json.dumps(info, sort_keys=True, default=str))
        return 0
    print(f"{info['source']}: {info['model_class']} {info['sample_size']}px, {info['in_channels']} channel(s)")
    if info["pruned"]:
        extra = f", thr {info['thr']}, cutoff t={info['cutoff_t']}" if info["thr"] is not None else ""
        how = f"ratio {info['ratio']:.4f} ({info['ratio_mode']})" if info["ratio"] is not None else ""
        print(f"pruned with {info['method']}: {how}{extra}, seed {info['seed']}")
    else:
        print("not pruned")
    for line in summary_lines(info):
        print(line)
    if info["scheduler"]:
        print(f"scheduler: {info['scheduler']}")
    return 0
