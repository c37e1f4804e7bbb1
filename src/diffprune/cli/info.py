"""``diffprune info DIR``: summary of a saved model (pruned or not); ``--json`` prints a JSON object with at least
``params``, ``macs``, ``base_params``, ``base_macs``, ``method`` and ``family``."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="summarise a saved model (family, params, MACs, pruning method and settings)",
                       description=__doc__)
    p.add_argument("model", help="a pruned model folder, a diffusers model/pipeline folder, a shipped name or hub id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def summarize(name_or_path: str) -> dict:
    """The info dict of a model: counts from pruning.json when present, else counted on the loaded model."""
    from .._torch import dtype_name, weights_dtype
    from ..io import load_model
    from ..macs import count_macs

    loaded = load_model(name_or_path, dtype="auto")  # as stored: nothing is computed with the weights
    model = loaded.denoiser
    adapter = loaded.adapter  # looked up once, handed down
    macs = count_macs(model, adapter=adapter, shapes_only=True)
    rec = loaded.pruning or {}
    cfg = rec.get("config", {})
    calibration = rec.get("calibration") or {}
    spec = adapter.conditioning(model)
    return {
        "source": loaded.source,
        "revision": loaded.revision,
        "model_class": type(model).__name__,
        "family": adapter.name,
        "pipeline": loaded.pipeline.family.pipeline_class if loaded.pipeline is not None else None,
        "latent": loaded.codec is not None,
        "conditioning": None if spec is None else {"kind": spec.kind, "num_classes": spec.num_classes,
                                                   "null_label": spec.null_label, "class_names": loaded.class_names,
                                                   "context_dim": spec.context_dim,
                                                   "keys": list(spec.keys) if spec.keys else None},
        "pruned": loaded.pruning is not None,
        "dtype": dtype_name(weights_dtype(model)),
        "layout": rec.get("layout", "free") if loaded.pruning is not None else None,
        "method": rec.get("method"),
        "params": macs.params,
        "macs": macs.macs,
        "base_params": rec.get("base_params", macs.params),
        "base_macs": rec.get("base_macs", macs.macs),
        "ratio": rec.get("ratio"),
        "ratio_mode": cfg.get("ratio_mode"),
        "target_macs": cfg.get("target_macs"),
        "target_latency": cfg.get("target_latency"),
        "latency": rec.get("latency"),
        "kept_out_of_order": rec.get("kept_out_of_order") or [],
        "seed": cfg.get("seed"),
        "thr": cfg.get("thr") if rec.get("method") == "diff-pruning" else None,
        "cutoff_t": calibration.get("cutoff_t"),
        "calibration_timesteps": len(calibration.get("accumulated", [])) if calibration else None,
        "scheduler": type(loaded.scheduler).__name__ if loaded.scheduler is not None else None,
        "diffprune_version": rec.get("diffprune_version"),
        "input_shape": list(adapter.input_shape(model)),
    }


def run(args) -> int:
    import json

    from .prune import summary_lines

    info = summarize(args.model)
    if args.json:
        print(json.dumps(info, sort_keys=True, default=str))
        return 0
    c, h, w = info["input_shape"]
    where = f" in a {info['pipeline']}" if info["pipeline"] else ""
    space = "latents" if info["latent"] else "pixels"
    print(f"{info['source']}: {info['model_class']} (family {info['family']}){where}, input {c}x{h}x{w} {space}")
    if info["conditioning"] and info["conditioning"]["kind"] == "text":
        keys = info["conditioning"]["keys"]
        form = f"attention, a dict with keys {', '.join(keys)}" if keys else "cross-attention"
        print(f"conditioning: text, {info['conditioning']['context_dim']}-wide text-encoder context through {form} "
              "(prompts: --prompt / --prompt-file)")
    elif info["conditioning"]:
        cond = info["conditioning"]
        null = f", null class {cond['null_label']} (guidance)" if cond["null_label"] is not None else ""
        names = cond["class_names"]
        trained = f"{len(names)} trained classes ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}) in " \
            if names else ""
        print(f"conditioning: {trained}{cond['num_classes']} class labels{null}")
    if info["pruned"]:
        extra = f", thr {info['thr']}, cutoff t={info['cutoff_t']}" if info["thr"] is not None else ""
        how = f"ratio {info['ratio']:.4f} ({info['ratio_mode']})" if info["ratio"] is not None else ""
        print(f"pruned with {info['method']}: {how}{extra}, seed {info['seed']}")
        print("layout: stock (plain diffusers from_pretrained loads it)" if info["layout"] == "stock" else
              "layout: free (load it with diffprune.load_model / load_pipeline)")
    else:
        print("not pruned")
    for line in summary_lines(info):
        print(line)
    print(f"weights: {info['dtype']}")
    if info["kept_out_of_order"]:
        kept = ", ".join(f"{layer} position {pos}" for layer, pos in info["kept_out_of_order"])
        print(f"kept out of rank order to land on the target: {kept}")
    if info["latency"]:
        lat = info["latency"]
        print(f"latency: {lat['base_s'] * 1e3:.2f} -> {lat['s'] * 1e3:.2f} ms per call ({lat['fraction']:.1%}; batch "
              f"{lat['batch']}, {lat['dtype']}, {lat['device']}, {lat['threads']} threads, when pruned)")
    if info["scheduler"]:
        print(f"scheduler: {info['scheduler']}")
    return 0
