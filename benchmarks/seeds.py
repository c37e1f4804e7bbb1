"""Compare pruning arms over several seeds: mean ± std, 95% intervals, and paired differences to a reference arm.

    python benchmarks/seeds.py --config demo --arms diff-pruning taylor magnitude random reinit --seeds 0 1 2
    python benchmarks/seeds.py --config demo --arms thr=0 thr=0.02 diff-pruning thr=0.1 thr=0.2 \
        --reference diff-pruning --against thr --pruned-ssim --name thr-ablation --runs unet-methods
    python benchmarks/seeds.py --config demo-dit --arms diff-pruning taylor magnitude random depth
    python benchmarks/seeds.py --config demo --arms diff-pruning magnitude --budgets 0 300 1500 3000 6000 \
        --name budget --runs unet-methods

An arm is ``default`` (the shipped config as it is), a method name (``magnitude``) or ``key=value`` overrides of
the prune section (``thr=0.02``; several joined by ``,``); see benchmarks/_arms.py. Every (arm, seed) runs the demo pipeline of ``--config`` (a shipped demo config: same MAC target,
fine-tuning budget and evaluation for every arm; the seed sets the calibration subset and noise, the data order and
the evaluation seeds) in its own run folder under ``--work``: a killed benchmark resumes, and finished stages are
skipped by their hashes. With ``--pruned-ssim`` each pruned model is also compared with the teacher before any
fine-tuning. Per metric: mean ± std over seeds, a 95% t-interval, and for each arm the per-seed paired difference
to the reference arm (``--reference``, default the first) with its 95% interval and a paired t-test (with 3 seeds
only large effects can show), and the kept output channels of every layer whose width differs between the runs.
Writes benchmarks/results/<name>.json, .md and .png.

``--budgets`` repeats every (arm, seed) at several fine-tuning step counts, each a run of its own with the config's
other settings (its own EMA horizon and schedule, exactly as a user would run that many steps), so that the run
at the config's own step count is the plain benchmark's run (``--runs`` shares it) and the others reuse its
finished prune stage. Budget 0 is the pruned model before fine-tuning. One table per budget and a curve per metric.

``--against thr`` also plots every metric against that prune setting of the arms (``<name>-against-thr.png``).
``--report`` runs nothing: it writes the tables from the runs already finished under ``--work`` (those whose every
stage is complete with the current settings), e.g. to commit a partial result while the benchmark runs elsewhere.

Every row of the results file carries its run's eval-stage hash (which covers every stage's settings and the inputs'
content). A row already in ``benchmarks/results/<name>.json`` with the hash the current settings give is kept as it
is, not run again: the committed results are the durable record, so a benchmark resumes on a machine that has lost
its run folders (or on another machine) without repeating what it measured. A row also carries the device, torch
threads and versions its evaluation recorded (the .md names them). ``--report`` does not overwrite a results file
with fewer rows than it holds.
"""
import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from scipy import stats

from _arms import arm_config as _arm_config, demo_config
from diffprune.cli.demo import DEMOS
from diffprune._fs import atomic_write_bytes, read_json
from diffprune.pipeline import STAGES, load_run_config, run_pipeline, stage_complete, stage_hashes
from diffprune.records import read_metrics
from diffprune.report import width_changes

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", default="demo", choices=sorted(DEMOS.values()))
p.add_argument("--arms", nargs="+", required=True)
p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
p.add_argument("--budgets", nargs="+", type=int, default=None,
               help="fine-tuning step counts to run each (arm, seed) at (0: before fine-tuning); replaces --steps")
p.add_argument("--n", type=int, default=None, help="evaluation samples (default: the config's)")
p.add_argument("--reference", default=None, help="the arm the others are compared with (default: the first; "
                                                  "--arms also sets the order of the plots)")
p.add_argument("--pruned-ssim", action="store_true", help="also measure SSIM to the teacher right after pruning")
p.add_argument("--name", default=None, help="results name (default: <config>-arms)")
p.add_argument("--runs", default=None, help="run folders under --work (default: the results name); two benchmarks "
                                            "that share an arm share its finished runs")
p.add_argument("--work", default="benchmarks/runs")
p.add_argument("--against", default=None, metavar="SETTING",
               help="also plot every metric against this prune setting of the arms (the threshold ablation: thr)")
p.add_argument("--report", action="store_true", help="run nothing: write the tables from the finished runs")
args = p.parse_args()
reference = args.reference or args.arms[0]
if reference not in args.arms:
    p.error(f"--reference {reference!r} is not one of --arms {args.arms}")
if args.budgets and args.steps is not None:
    p.error("--budgets replaces --steps; give one of them")
if args.budgets and any(b < 0 for b in args.budgets):
    p.error(f"--budgets {args.budgets}: every budget must be >= 0 fine-tuning steps")
name = args.name or f"{args.config}-arms"
base = demo_config(args.config)
default_steps = args.steps if args.steps is not None else base["finetune"]["steps"]
budgets = sorted(set(args.budgets)) if args.budgets else [default_steps]


def arm_config(arm: str, seed: int, steps: int) -> dict:
    return _arm_config(base, arm, seed, steps, args.n)


def pruned_eval(run: Path, cfg) -> dict:
    """The pruned (not fine-tuned) model evaluated against the teacher as the eval stage does (same samples,
    seeds, sampler and FID reference; no latency)."""
    import dataclasses

    from diffprune.evaluate import evaluate, load_for_eval

    out = run / "pruned-ssim"
    if (out / "metrics.json").is_file():
        cached = read_metrics(out / "metrics.json")
        if cached.get("fid") is not None or args.report:  # folders written before FID was measured are redone
            return cached
    if args.report:
        return {}
    student, _ = load_for_eval(run / "prune" / "model")
    teacher, _ = load_for_eval(cfg.model)
    return evaluate(student.denoiser, teacher.denoiser, config=dataclasses.replace(cfg.eval, latency_batches=()),
                    out_dir=out, scheduler=student.scheduler, codec=student.codec, class_names=student.class_names,
                    overwrite=True)


METRICS = {"params": "parameters", "fid": "FID (student)", "ssim": "SSIM to teacher",
           "class_accuracy": "class accuracy", "speedup": "measured speedup",
           "calibration_timesteps": "calibration timesteps", "calibration_seconds": "calibration (wall s)",
           "calibration_cpu_seconds": "calibration (CPU s)", "prune_seconds": "prune stage (s)",
           "pruned_ssim": "SSIM before fine-tuning"}
DECIMALS = {"params": 0, "fid": 2, "ssim": 3, "class_accuracy": 3, "speedup": 2, "calibration_timesteps": 0,
            "calibration_seconds": 0, "calibration_cpu_seconds": 0, "prune_seconds": 0, "pruned_ssim": 3}
BOUNDED = {"ssim", "pruned_ssim", "class_accuracy"}  # plotted on a linear axis whatever their spread
TIMED = {"calibration_seconds", "calibration_cpu_seconds", "prune_seconds", "speedup"}


def environment(metrics: dict) -> dict:
    """Where a row was measured, as its evaluation recorded it: device, torch threads and versions."""
    return {k: metrics.get(k) for k in ("device", "threads", "versions")}


def environments(results: list[dict]) -> str:
    """One line naming every environment the rows were measured in, with how many rows each."""
    counts: dict[str, int] = {}
    for r in results:
        e = r.get("environment")
        key = ("not recorded: measured before rows carried it" if not e else
               f"{e['device']} with {e['threads']} torch threads, "
               + ", ".join(f"{k} {v}" for k, v in sorted((e.get("versions") or {}).items()) if v))
        counts[key] = counts.get(key, 0) + 1
    recorded_first = sorted(counts.items(), key=lambda kv: kv[0].startswith("not recorded"))
    return "Measured on: " + "; ".join(f"{k} ({n} rows)" for k, n in recorded_first) + ".\n"


def metric_keys(summary: dict, steps: int) -> list[str]:
    """The metrics a table or plot shows. A budget benchmark shows timings only at budget 0 (the pruning's): a
    fine-tuning budget's run copies the shared run's prune stage (and its seconds) or, on a machine that lost that
    run, prunes again on whatever hardware it has, and its latency is that of the same architecture at every budget,
    measured on whichever machine ran it; across budgets and arms they would compare machines, not methods."""
    return [k for k in METRICS if any(k in summary[a] for a in args.arms)
            and not (args.budgets and 0 in budgets and steps and k in TIMED)]


def cell(key: str, e: dict) -> str:
    """mean ± std [95% half-width], or the one value where there is one seed; a metric that fewer seeds than
    asked for recorded says how many it has."""
    d = DECIMALS[key]
    if e["n"] < 2:
        return f"{e['mean']:.{d}f} (1 seed)"
    short = f" ({e['n']} seeds)" if e["n"] < len(args.seeds) else ""
    return f"{e['mean']:.{d}f} ± {e['std']:.{d}f} [±{e['ci95']:.{d}f}]{short}"


def interval(values: list[float]) -> tuple[float, float, float]:
    """mean, std, 95% t-interval half-width."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def summarise(rows: list[dict]) -> dict:
    """Per arm and metric: mean, std, 95% interval, and the paired difference to the reference arm."""
    summary = {}
    for arm in args.arms:
        summary[arm] = {}
        for key in METRICS:
            vals = [r[key] for r in rows if r["arm"] == arm and r.get(key) is not None]
            if not vals:
                continue
            mean, std, half = interval(vals)
            entry = {"mean": mean, "std": std, "ci95": half, "n": len(vals)}
            if arm != reference:
                pairs = [(r[key], q[key]) for r in rows if r["arm"] == arm and r.get(key) is not None
                         for q in rows if q["arm"] == reference and q["seed"] == r["seed"] and q.get(key) is not None]
                if len(pairs) >= 2:
                    diff = [a - b for a, b in pairs]
                    dm, _, dh = interval(diff)
                    test = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs])
                    entry.update(diff_vs_reference=dm, diff_ci95=dh, p_paired=float(test.pvalue),
                                 significant=bool(test.pvalue < 0.05))
            summary[arm][key] = entry
    return summary


def table(summary: dict, steps: int) -> list[str]:
    """The markdown tables of one summary: every arm, then every arm minus the reference arm."""
    keys = metric_keys(summary, steps)
    lines = ["| arm | " + " | ".join(METRICS[k] for k in keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for arm in args.arms:
        cells = []
        for k in keys:
            e = summary[arm].get(k)
            cells.append("—" if e is None else cell(k, e))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"| arm − {reference} | " + " | ".join(METRICS[k] for k in keys) + " |",
              "| --- |" + " ---: |" * len(keys)]
    for arm in [a for a in args.arms if a != reference]:
        cells = []
        for k in keys:
            e = summary[arm].get(k, {})
            d = DECIMALS[k]
            cells.append("—" if "diff_vs_reference" not in e else
                         f"{e['diff_vs_reference']:+.{d}f} [±{e['diff_ci95']:.{d}f}] p={e['p_paired']:.2f}"
                         + (" *" if e["significant"] else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def write_results(results: list[dict]) -> list[str]:
    """Summaries and tables of the runs so far (written after every run: a stopped benchmark leaves its partial
    result, headed by the seeds each arm has)."""
    summaries = {b: summarise([r for r in results if r["steps"] == b]) for b in budgets}
    command = (f"python benchmarks/seeds.py --config {args.config} --arms {' '.join(args.arms)} --seeds "
               f"{' '.join(map(str, args.seeds))}" + (f" --steps {args.steps}" if args.steps else "")
               + (f" --budgets {' '.join(map(str, args.budgets))}" if args.budgets else "")
               + (f" --reference {args.reference}" if args.reference else "")
               + (f" --against {args.against}" if args.against else "") + (f" --n {args.n}" if args.n else "")
               + (" --pruned-ssim" if args.pruned_ssim else "")
               + (f" --name {args.name}" if args.name else "") + (f" --runs {args.runs}" if args.runs else ""))
    out = results_path.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps({
        "command": command, "reference": reference, "rows": results, "teacher_widths": teacher_widths,
        **({"budgets": {str(b): summaries[b] for b in budgets}} if args.budgets
           else {"summary": summaries[budgets[0]]}),
    }, indent=2) + "\n").encode())
    done = {(a, b): sorted(r["seed"] for r in results if r["arm"] == a and r["steps"] == b)
            for a in args.arms for b in budgets}
    status = ("" if all(len(v) == len(args.seeds) for v in done.values()) else
              " (partial: " + "; ".join(f"{a}{f' at {b} steps' if args.budgets else ''} seeds {v}"
                                        for (a, b), v in done.items()) + ")")
    lines = [f"# {name}: {len(args.seeds)} seeds per arm{status}\n", f"`{command}`\n",
             "Mean ± std over seeds [95% t-interval]. Below: each arm minus the reference arm "
             f"(`{reference}`), paired by seed, with its 95% interval and paired t-test p.\n", environments(results)]
    for b in budgets:
        if args.budgets:
            lines += [f"## {b} fine-tuning steps" + (" (the pruned model, not fine-tuned)" if b == 0 else "")
                      + (f" ({100 * b / teacher_steps:.3g}% of the teacher's {teacher_steps})"
                         if teacher_steps and b else "")
                      + "\n"]
        finished = any(r["steps"] == b for r in results)
        lines += (table(summaries[b], b) if finished else ["No run at this budget has finished yet."]) + [""]
    lines += ["* p < 0.05 (paired t-test over seeds).", ""] + widths_table(results)
    # the largest budget any run has reached: a partial budget benchmark still shows its arms side by side
    shown = max((b for b in budgets if any(r["steps"] == b for r in results)), default=budgets[-1])
    if plot(results, summaries[shown], shown, out.with_suffix(".png")):
        lines += [f"![{name}]({out.with_suffix('.png').name})"]
    if args.budgets:
        plot_budgets(results, summaries, out.with_name(f"{name}-curve.png"))
        lines += ["", f"![{name}: metrics against fine-tuning steps]({name}-curve.png)"]
    if args.against:
        plot_against(results, summaries[budgets[-1]], out.with_name(f"{name}-against-{args.against}.png"))
        lines += ["", f"![{name}: metrics against {args.against}]({name}-against-{args.against}.png)"]
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    return lines


def widths_table(results: list[dict]) -> list[str]:
    """Kept output channels of each layer whose kept width differs between the runs, per arm one value per seed."""
    # one row per (arm, seed): every budget of a run shares its pruning
    rows = sorted({(r["arm"], r["seed"]): r for r in results if r.get("widths")}.values(), key=lambda r: r["seed"])
    from diffprune.io import load_model

    order = load_model(base["model"]).adapter.layer_order  # the teacher's family: its layers, input to output
    names = sorted(sorted({n for r in rows for n in r["widths"]}), key=order)
    varying = [n for n in names if len({r["widths"].get(n) for r in rows}) > 1]  # none when there are no rows
    if not varying:
        return []
    lines = ["## Kept output channels\n", "Layers whose kept width differs between runs, teacher width in brackets; "
             "per arm one value per seed, in seed order.\n", "| layer | " + " | ".join(args.arms) + " |",
             "| --- |" + " ---: |" * len(args.arms)]
    for n in varying:
        cells = ["/".join(str(r["widths"].get(n, "—")) for r in rows if r["arm"] == arm) or "—"
                 for arm in args.arms]
        lines.append(f"| {n} ({teacher_widths[n]}) | " + " | ".join(cells) + " |")
    return lines + [""]


def panels(plt, n: int):
    """A figure of n panels, at most 4 to a row, and its n axes."""
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def log_if_wide(ax, key: str, values: list[float]) -> None:
    """A log y axis where an unbounded metric's values span more than 4x, so one far-off arm or budget (reinit's
    FID, a student before fine-tuning) does not flatten the others into a line. SSIM and accuracy stay linear."""
    if key not in BOUNDED and values and min(values) > 0 and max(values) > 4 * min(values):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

        ax.set_yscale("log")  # labelled at 1, 2 and 5 per decade: a span under 10x would show one label or none
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())


def symlog_x(ax, xs: list[float]) -> None:
    """An x axis logarithmic above the smallest positive value and linear through 0 (budget 0, thr 0), ticked at
    the values shown."""
    ax.set_xscale("symlog", linthresh=min([x for x in xs if x > 0] or [1]))
    ax.margins(x=0.06)  # in the scaled space: after a log y axis the end points would otherwise sit on the frame
    ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=8)
    ax.minorticks_off()


def plot(results: list[dict], summary: dict, steps: int, path: Path) -> bool:
    """One panel per metric: each seed's value (dots) and the mean with its 95% interval (bar), arm by arm, at
    ``steps`` fine-tuning steps. False (and no file) where no run has finished there."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    keys = metric_keys(summary, steps)
    if not keys:  # no run at this budget yet
        return False
    rows_ = [r for r in results if r["steps"] == steps]
    fig, axes = panels(plt, len(keys))
    for ax, key in zip(axes, keys):
        shown = []  # every seed's value and every mean
        for i, arm in enumerate(args.arms):
            vals = [r[key] for r in rows_ if r["arm"] == arm and r.get(key) is not None]
            ax.scatter([i] * len(vals), vals, s=14, color="0.55", zorder=2)
            e = summary[arm].get(key)
            if e is not None:
                ax.errorbar([i], [e["mean"]], yerr=[0 if math.isnan(e["ci95"]) else e["ci95"]], fmt="o",
                            color="C0", capsize=4, zorder=3)
                shown += vals + [e["mean"]]
        log_if_wide(ax, key, shown)
        ax.set_xticks(range(len(args.arms)), args.arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(METRICS[key], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{name}: seeds (grey), mean and 95% interval (blue)"
                 + (f", {steps} steps" if args.budgets else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_budgets(results: list[dict], summaries: dict, path: Path) -> None:
    """FID and 1 − SSIM to the teacher against fine-tuning steps, both on log axes (lower is better; 1 − SSIM
    spreads the fine-tuned budgets' 0.9–0.97 apart): each seed's run (thin line), each arm's mean with its 95%
    interval, the arms drawn a little apart at each budget so their bars do not hide each other, and the teachers'
    mean FID (dashed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for ax, key in zip(axes, ("fid", "ssim")):
        y = (lambda v: 1 - v) if key == "ssim" else (lambda v: v)
        shown = []
        symlog_x(ax, budgets)
        scale = ax.xaxis.get_transform()  # the arms' offset is even on the scaled axis, whatever the budget
        step = 0.015 * float(scale.transform([max(budgets)])[0] - scale.transform([min(budgets)])[0])
        for i, arm in enumerate(args.arms):
            def shift(xs: list[float], d: float = step * (i - (len(args.arms) - 1) / 2)) -> list[float]:
                return list(scale.inverted().transform(scale.transform(xs) + d)) if xs else []

            for seed in args.seeds:
                line = sorted((r["steps"], r[key]) for r in results
                              if r["arm"] == arm and r["seed"] == seed and r.get(key) is not None)
                ax.plot(shift([b for b, _ in line]), [y(v) for _, v in line], color=f"C{i}", lw=0.7, alpha=0.35,
                        marker=".", ms=3, zorder=2)
                shown += [y(v) for _, v in line]
            pts = [(b, summaries[b][arm][key]) for b in budgets if key in summaries[b][arm]]
            if pts:
                ax.errorbar(shift([b for b, _ in pts]), [y(e["mean"]) for _, e in pts], capsize=3, marker="o", ms=4,
                            yerr=[0 if math.isnan(e["ci95"]) else e["ci95"] for _, e in pts], label=arm,
                            color=f"C{i}", zorder=3)
        # one teacher FID per seed (every row of a seed repeats it), so a seed with more finished budgets weighs no more
        teacher = {r["seed"]: r["fid_teacher"] for r in results if key == "fid" and r.get("fid_teacher") is not None}
        if teacher:
            ax.axhline(sum(teacher.values()) / len(teacher), color="0.3", ls="--", lw=0.8, label="teacher", zorder=1)
        log_if_wide(ax, "fid", shown)  # both unbounded here
        ax.set_xlabel("fine-tuning steps" + (f" (teacher: {teacher_steps})" if teacher_steps else ""))
        ax.set_title(("1 − " if key == "ssim" else "") + METRICS[key] + ": seeds (thin), mean, 95% interval",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_against(results: list[dict], summary: dict, path: Path) -> None:
    """Each metric against the arms' value of the ``--against`` prune setting: each seed's values joined across the
    setting (grey: the seeds are paired, so a seed's line shows the effect its spread would hide), and the mean with
    its 95% interval (blue)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    xs = {arm: arm_config(arm, args.seeds[0], budgets[-1])["prune"].get(args.against) for arm in args.arms}
    arms = sorted((a for a in args.arms if isinstance(xs[a], (int, float))), key=xs.get)
    keys = [k for k in METRICS if any(k in summary[a] for a in arms)]
    if not keys:
        return
    fig, axes = panels(plt, len(keys))
    rows_ = [r for r in results if r["steps"] == budgets[-1]]
    for ax, key in zip(axes, keys):
        shown = []
        for seed in args.seeds:
            line = [(xs[r["arm"]], r[key]) for a in arms for r in rows_
                    if r["arm"] == a and r["seed"] == seed and r.get(key) is not None]
            ax.plot([x for x, _ in line], [v for _, v in line], color="0.6", lw=0.8, marker=".", ms=5, zorder=2)
            shown += [v for _, v in line]
        pts = [(xs[a], summary[a][key]) for a in arms if key in summary[a]]
        ax.errorbar([x for x, _ in pts], [e["mean"] for _, e in pts], capsize=3, marker="o", ms=4, color="C0",
                    yerr=[0 if math.isnan(e["ci95"]) else e["ci95"] for _, e in pts], zorder=3)
        log_if_wide(ax, key, shown + [e["mean"] for _, e in pts])
        symlog_x(ax, [x for x, _ in pts])
        ax.set_xlabel(args.against, fontsize=8)
        ax.set_title(METRICS[key], fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name} against {args.against}: each seed (grey), mean and 95% interval over seeds (blue)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def teacher_training_steps() -> int | None:
    """The teacher's own training steps, from its train_config.json (shipped teachers have one)."""
    from diffprune.assets import shipped_model_path

    folder = shipped_model_path(base["model"]) or Path(base["model"])
    record = folder / "train_config.json"
    return read_json(record)["train"]["steps"] if record.is_file() else None


def run_folder(arm: str, seed: int, steps: int) -> Path:
    """The run of the config's own step count is the plain benchmark's; other budgets sit beside it."""
    arm_dir = Path(args.work) / (args.runs or name) / arm.replace("=", "-").replace(",", "_")
    return arm_dir / (f"seed-{seed}" if steps == default_steps else f"steps-{steps}/seed-{seed}")


teacher_steps = teacher_training_steps() if args.budgets else None
results_path = Path("benchmarks/results") / f"{name}.json"
previous = read_json(results_path) if results_path.is_file() else {}
# rows measured before, by (arm, seed, steps): kept where their hash is the one the current settings give
recorded = {(r["arm"], r["seed"], r["steps"]): r for r in previous.get("rows", []) if r.get("hash")}
teacher_widths = dict(previous.get("teacher_widths", {}))  # output channels of the teacher's layers
results = []
for seed in args.seeds:  # seed-major: a benchmark stopped early has every arm on its first seeds
    for arm in args.arms:
        finetuned = [b for b in budgets if b] or [default_steps]
        order = sorted(finetuned, key=lambda b: b != default_steps)  # the shared run first: the others copy its prune
        for steps in order:
            run = run_folder(arm, seed, steps)
            cfg = load_run_config(arm_config(arm, seed, steps))
            hashes = stage_hashes(cfg)  # reads the inputs' content: once per run
            digest = hashes["eval"]
            # this run's row, and budget 0's (the pruned model, evaluated in the shared run's folder)
            wanted = [b for b in (steps, 0) if b in budgets and (b == steps or steps == order[0])]
            kept = [recorded.get((arm, seed, b)) for b in wanted]
            if wanted and all(r is not None and r["hash"] == digest for r in kept):
                results += kept
                print(f"{arm} seed {seed} at {steps} steps: recorded in {results_path}", flush=True)
                continue
            # a run of this (arm, seed) that has pruned already, the shared one first (absent where it was recorded)
            pruned = (run_folder(arm, seed, b) for b in order)
            shared = next((f for f in pruned if stage_complete(f / "prune", hashes["prune"])), None)
            if not run.exists() and not args.report and shared is not None:
                # the same pruning (same hash): a run folder holding only it, whose prune stage is then skipped
                shutil.copytree(shared, run, ignore=shutil.ignore_patterns("finetune", "eval", "pruned-ssim"))
            t0 = time.time()
            if args.report:
                if not all(stage_complete(run / s, hashes[s]) for s in STAGES):
                    continue
                m = read_metrics(run / "eval" / "metrics.json")
            else:
                m = read_metrics(run_pipeline(cfg, run, device="cpu", progress=False))  # older run folders too
            # a bare model keeps pruning.json beside its weights, a pipeline in its denoiser's folder
            pruning = read_json(next((run / "prune" / "model").glob("**/pruning.json")))
            prune = {"calibration_timesteps": len((pruning.get("calibration") or {}).get("accumulated", [])) or None,
                     "calibration_seconds": (pruning.get("calibration") or {}).get("seconds"),
                     "calibration_cpu_seconds": (pruning.get("calibration") or {}).get("cpu_seconds"),
                     "prune_seconds": read_json(run / "prune" / "stage.json")["seconds"]}
            widths = width_changes(pruning)  # {layer: (teacher's output channels, kept)}
            row = {"arm": arm, "seed": seed, "steps": steps, "fid": m["fid"], "fid_teacher": m["fid_teacher"],
                   "ssim": m["ssim"], "class_accuracy": m.get("class_accuracy"), "speedup": m["speedup"],
                   "macs_fraction": m["macs"] / m["base_macs"], "params": m["params"], **prune,
                   "seconds": None if args.report else round(time.time() - t0, 1),
                   "widths": {n: kept for n, (_, kept) in widths.items()}, "hash": digest,
                   "environment": environment(m)}
            teacher_widths.update({n: full for n, (full, _) in widths.items()})
            before = {}
            if args.pruned_ssim or (0 in budgets and steps == order[0]):
                before = pruned_eval(shared or run, cfg)  # cached in the folder that pruned first
                if args.pruned_ssim and "ssim" in before:
                    row["pruned_ssim"] = before["ssim"]
            if steps in budgets:
                results.append(row)
                print(row, flush=True)
            if 0 in budgets and steps == order[0] and before.get("fid") is not None:
                results.append({"arm": arm, "seed": seed, "steps": 0, "fid": before["fid"],
                                "fid_teacher": before["fid_teacher"], "ssim": before["ssim"],
                                "class_accuracy": before.get("class_accuracy"), **prune, "hash": digest,
                                "environment": environment(before)})
            if not args.report:  # a stopped benchmark leaves its partial result
                write_results(results)

lost = len(previous.get("rows", [])) - len(results)
if args.report and lost > 0:  # e.g. --work without the run folders, for rows that carry no hash
    raise SystemExit(f"--report found {len(results)} of the {len(previous['rows'])} rows of {results_path} (the others "
                     f"have neither a run folder under --work {args.work} nor the hash the current settings give); "
                     "not overwriting it: point --work at the runs, or run without --report")
print("\n".join(write_results(results)))
