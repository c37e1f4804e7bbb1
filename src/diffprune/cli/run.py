"""``diffprune run CONFIG.yaml``: prune -> finetune -> eval (with report), resumable, skipping finished stages."""
from __future__ import annotations

from ._common import add_device_flag


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline from a YAML config", description=__doc__)
    p.add_argument("config", help="a YAML run config, or a shipped config name (diffprune config lists them)")
    p.add_argument("--out", required=True, help="the run folder (re-running it skips finished stages)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE (prune, finetune or eval) and every stage after it; repeatable")
    add_device_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pipeline import load_run_config

    config = load_run_config(args.config)
    return execute(config, args.out, force=tuple(args.force), device=args.device)


def execute(config, out, *, force=(), device=None) -> int:
    """Run the pipeline and print the summary table (shared with ``diffprune demo``)."""
    import time

    from ..pipeline import run_pipeline
    from ._common import check_device, default_device

    t0 = time.time()
    device = check_device(device or config.device) if (device or config.device) else default_device()
    metrics = run_pipeline(config, out, force=force, device=device)
    print(summary_table(metrics, out, time.time() - t0))
    return 0


def summary_table(m: dict, out, seconds: float) -> str:
    from ..records import read_metrics

    m = read_metrics(m)  # a finished run's eval stage may be an older metrics.json

    def num(key, fmt):
        v = m.get(key)
        return "n/a" if v is None else format(v, fmt)

    def ratio(a, b):
        va, vb = m.get(a), m.get(b)
        return f"{va / vb:.2f}x" if va and vb else "n/a"

    rows = [
        ("", "teacher", "student", "ratio"),
        ("params", num("base_params", ",d"), num("params", ",d"), ratio("params", "base_params")),
        ("MACs / denoiser call", num("base_macs", ",d"), num("macs", ",d"), ratio("macs", "base_macs")),
        ("FID", num("fid_teacher", ".2f"), num("fid", ".2f"), ""),
        ("speedup (measured)", "", "", num("speedup", ".2f") + "x"),
        ("SSIM teacher<->student", "", num("ssim", ".3f"), ""),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    from ..report import BUSY_SPREAD, busy_timings

    busy = busy_timings(m)
    if busy:
        lines.append(f"warning: timings spread more than {BUSY_SPREAD}x between repeats ({', '.join(busy)}): the "
                     "machine was busy; re-measure on an idle one (--force eval)")
    lines.append(f"report: {out}/eval/report.html   ({seconds / 60:.1f} min)")
    return "\n".join(lines)
