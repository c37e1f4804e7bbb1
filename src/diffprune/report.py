"""The evaluation report: ``report.html`` (self-contained, images inlined) and ``report.md`` with PNGs beside it.

Figures (matplotlib, Agg backend), each written only when its data exists:

* ``samples.png``: teacher vs student, side by side, the same seeds;
* ``channel_widths.png``: per-layer channel width before/after pruning (from ``pruning.json``);
* ``timestep_loss.png``: the calibration loss per timestep recorded at pruning, with the threshold cutoff;
* ``finetune_loss.png``: the fine-tuning loss (from the model folder's ``train_log.csv``);

followed by the metrics table. :func:`width_changes` and :func:`timestep_losses` are the only places that read
``pruning.json``'s layout.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ._fs import atomic_write_text
from ._units import si
from .card import write_eval_card
from .samples import image_grid

__all__ = ["busy_timings", "width_changes", "timestep_losses", "metrics_rows", "write_report"]

FIGURES = {
    "samples": "samples.png",
    "widths": "channel_widths.png",
    "timesteps": "timestep_loss.png",
    "finetune": "finetune_loss.png",
    "classes": "class_accuracy.png",
    "class_grid": "class_grid.png",
}


# --- pruning.json accessors ------------------------------------------------------------------------------------

def width_changes(pruning: dict | None) -> dict[str, tuple[int, int]]:
    """Output channels ``{layer name: (before, after)}`` of the layers pruning changed (``{}`` if none recorded).

    Reads ``pruning.json``'s ``base_widths`` / ``widths`` (``{name: [in, out]}`` of every Conv, Linear and
    GroupNorm layer, see :func:`diffprune.prune.layer_widths`); norm layers, which mirror their conv, are left out.
    """
    if not isinstance(pruning, dict):
        return {}
    before, after = pruning.get("base_widths") or {}, pruning.get("widths") or {}
    out = {}
    for name, b in before.items():
        if name in after and "norm" not in name.rsplit(".", 1)[-1]:
            out[name] = (int(b[-1]), int(after[name][-1]))
    return out


class TimestepCurve(NamedTuple):
    t: list[int]
    loss: list[float]
    cutoff_t: int | None
    stopped_by: str | None
    thr: float | None = None


def timestep_losses(pruning: dict | None) -> TimestepCurve:
    """The calibration walk recorded in ``pruning.json``: timesteps, losses, last accumulated t, why it stopped.

    Reads ``calibration.losses`` (``{"t": [...], "loss": [...]}`` or ``[[t, loss], ...]``), ``calibration.cutoff_t``
    and ``calibration.stopped_by``; data-free methods record no calibration: empty lists.
    """
    cal = pruning.get("calibration") if isinstance(pruning, dict) else None
    raw = cal.get("losses") if isinstance(cal, dict) else None
    if not raw:
        return TimestepCurve([], [], None, None)
    if isinstance(raw, dict):
        ts, losses = [int(t) for t in raw["t"]], [float(v) for v in raw["loss"]]
    else:
        ts, losses = [int(t) for t, _ in raw], [float(v) for _, v in raw]
    cutoff = cal.get("cutoff_t")
    strategy = cal.get("timesteps") if isinstance(cal.get("timesteps"), dict) else {}
    thr = strategy.get("thr") if strategy.get("name") == "threshold" else None
    return TimestepCurve(ts, losses, None if cutoff is None else int(cutoff), cal.get("stopped_by"),
                         None if thr is None else float(thr))


# --- figures ---------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid_array(images: torch.Tensor, nrow: int) -> np.ndarray:
    return np.asarray(image_grid(images, nrow=nrow))


def plot_samples(path: Path, student: torch.Tensor, teacher: torch.Tensor | None, seeds: Sequence[int]) -> None:
    plt = _plt()
    n = len(student)
    nrow = min(8, n)
    panels = [("teacher", teacher), ("student (pruned)", student)] if teacher is not None else [("student", student)]
    grids = [(title, _grid_array(x, nrow)) for title, x in panels]
    h, w = grids[0][1].shape[:2]
    fig_w = 4.2 * len(grids)
    fig, axes = plt.subplots(1, len(grids), figsize=(fig_w, 4.2 * h / w + 0.9), squeeze=False)
    for ax, (title, g) in zip(axes[0], grids):
        ax.imshow(g, cmap="gray" if g.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=12)
        ax.axis("off")
    s = list(seeds)
    fig.suptitle(f"DDIM samples, image i from seed {s[0]}+i (seeds {s[0]}..{s[-1]}), same seeds in both panels"
                 if teacher is not None else f"DDIM samples, seeds {s[0]}..{s[-1]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(name: str, limit: int = 42) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def layer_order(pruning: dict | None) -> Callable[[str], tuple]:
    """Sort key of a pruned model's layer names, input to output: its family's (``pruning.json``'s ``family``, see
    :meth:`~diffprune.adapters.ModelAdapter.layer_order`); the recorded order for an unknown family."""
    from .adapters import ModelAdapter, adapter_named

    family = pruning.get("family") if isinstance(pruning, dict) else None
    return (adapter_named(family) or ModelAdapter()).layer_order


def plot_widths(path: Path, widths: dict[str, tuple[int, int]], order: Callable[[str], tuple] | None = None) -> None:
    """Before/after output channels of each pruned layer, in ``order`` (a sort key; default the recorded order)."""
    plt = _plt()
    changed = [k for k, (b, a) in widths.items() if a != b]
    unchanged = len(widths) - len(changed)
    names = sorted(changed or list(widths), key=order or (lambda name: ()))
    before = np.array([widths[k][0] for k in names])
    after = np.array([widths[k][1] for k in names])
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.26 * len(names)))
    ax.barh(y, before, height=0.8, color="#c7d3e3", label="before (teacher)")
    ax.barh(y, after, height=0.5, color="#2f5d9a", label="after (pruned)")
    for yi, (b, a) in enumerate(zip(before, after)):
        ax.text(b, yi, f" {a}/{b}", va="center", fontsize=7, color="#333")
    ax.set_yticks(y)
    ax.set_yticklabels([_short(n) for n in names], fontsize=7)
    ax.margins(y=0.01)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.set_xlim(0, before.max() * 1.18 if len(before) else 1)
    all_b = sum(b for b, _ in widths.values())
    kept = sum(a for _, a in widths.values()) / max(all_b, 1)
    note = f"; {unchanged} unchanged layers not shown" if changed and unchanged else ""
    ax.set_title(f"Output channels per pruned layer ({kept:.0%} of all channels kept{note})", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timestep_losses(path: Path, curve: TimestepCurve) -> None:
    plt = _plt()
    ts, losses, cutoff = curve.t, curve.loss, curve.cutoff_t
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    ax.plot(ts, losses, color="#2f5d9a", lw=1.6, marker="o" if len(ts) <= 40 else None, ms=3, label="loss at t")
    if cutoff is not None:
        why = {"threshold": "threshold cutoff", "cap": "max_timesteps cap (threshold not reached)",
            "end": "last timestep (threshold not reached)"}.get(
            str(curve.stopped_by), f"last accumulated ({curve.stopped_by})" if curve.stopped_by else "cutoff")
        ax.axvline(cutoff, color="#c0392b", ls="--", lw=1.4, label=f"{why}: t = {cutoff}")
        ax.axvspan(min(ts + [cutoff]), cutoff, color="#c0392b", alpha=0.07, label="timesteps used for importance")
    if curve.thr:
        level = curve.thr * max(losses)
        label = f"stop level thr × max L = {curve.thr:g} × {max(losses):.3g} = {level:.3g}"
        if level >= 0.5 * min(losses):
            ax.axhline(level, color="#7f8c8d", ls=":", lw=1.2, label=label)
        else:  # far below the curve: drawing it would flatten the curve, so only name it
            ax.plot([], [], color="#7f8c8d", ls=":", label=label + " (below the plot)")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("denoising loss")
    ax.set_title("Calibration loss per timestep (recorded at pruning)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_class_accuracy(path: Path, detail: dict) -> None:
    """Per-class accuracy bars, teacher beside student."""
    plt = _plt()
    roles = [r for r in ("teacher", "student") if r in detail]
    n = len(detail[roles[0]]["per_class"])
    names = detail.get("class_names") or [str(c) for c in range(n)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * n + 2), 3.2))
    width = 0.8 / len(roles)
    for k, role in enumerate(roles):
        acc = [np.nan if a is None else a for a in detail[role]["per_class"]]
        ax.bar(np.arange(n) + (k - (len(roles) - 1) / 2) * width, acc, width, label=role,
               color="#8aa1c1" if role == "teacher" else "#d9822b")
    ax.set_xticks(np.arange(n), names[:n])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("classified as requested")
    ax.set_title(f"Class accuracy per requested class ({detail.get('classifier')})", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_class_grid(path: Path, student: torch.Tensor, teacher: torch.Tensor | None, seeds: Sequence[int],
                    labels: dict, class_names: list[str] | None, per_class: int = 6) -> None:
    """One row per class (or prompt): the first samples requested with it, teacher (left) and student (right)."""
    plt = _plt()
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(seeds):
        by_class.setdefault(int(labels[s]), []).append(i)
    classes = sorted(by_class)
    rows = []
    for c in classes:
        idx = by_class[c][:per_class]
        parts = ([teacher[idx]] if teacher is not None else []) + [student[idx]]
        rows.append([_grid_array(p, per_class) for p in parts])
    fig, axes = plt.subplots(len(classes), len(rows[0]), figsize=(2.2 * len(rows[0]) * per_class / 4,
                                                                  0.9 * len(classes) + 0.6), squeeze=False)
    for r, (c, row) in enumerate(zip(classes, rows)):
        for k, g in enumerate(row):
            ax = axes[r][k]
            ax.imshow(g, cmap="gray" if g.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                name = class_names[c] if class_names and c < len(class_names) else str(c)
                ax.set_ylabel(name if len(name) <= 24 else name[:23] + "…", rotation=0, labelpad=8, fontsize=9,
                              ha="right", va="center")
            if r == 0:
                ax.set_title("teacher" if teacher is not None and k == 0 else "student (pruned)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_finetune(path: Path, log: dict) -> None:
    plt = _plt()
    step, loss = np.asarray(log["step"]), np.asarray(log["loss"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    k = max(1, len(loss) // 20)
    ax.plot(step, loss, color="#9ab3d5" if k > 1 else "#2f5d9a", lw=1 if k > 1 else 1.8, label="loss (logged)")
    if k > 1:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(step[k - 1:], smooth, color="#2f5d9a", lw=2, label=f"moving mean of {k}")
    if len(loss) and loss.min() > 0 and loss.max() / loss.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Fine-tuning loss", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the table and the documents -------------------------------------------------------------------------------

def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return "—"
    if kind in ("count", "macs"):
        return si(v, sep=" ") if v >= 1e5 else f"{int(v):,}"
    if kind == "s":
        return f"{v * 1e3:.2f} ms"
    if kind == "x":
        return f"{v:.2f}×"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def metrics_rows(m: dict) -> list[tuple[str, str, str]]:
    """``(metric, teacher, student)`` rows of the metrics table."""
    latency = m.get("latency", {})
    sc, tc = latency.get("student", {}), latency.get("teacher", {})
    ext = (m.get("fid_setup") or {}).get("extractor", {}).get("extractor", "")
    rows = [
        ("Parameters", _fmt(m.get("base_params"), "count"), _fmt(m.get("params"), "count")),
        ("MACs per denoiser call (batch 1)", _fmt(m.get("base_macs"), "macs"), _fmt(m.get("macs"), "macs")),
        ("MACs per image (all steps)", _fmt(m.get("base_macs_per_image"), "macs"),
         _fmt(m.get("macs_per_image"), "macs")),
        (f"FID vs data ({ext or 'no data'})", _fmt(m.get("fid_teacher")), _fmt(m.get("fid"))),
    ]
    if m.get("clip_score") is not None:
        rows.append(("CLIP score (samples vs their prompts)", _fmt(m.get("clip_score_teacher")),
                     _fmt(m.get("clip_score"))))
    if m.get("class_accuracy") is not None:
        rows.append(("Class accuracy (classified as requested)", _fmt(m.get("class_accuracy_teacher")),
                     _fmt(m.get("class_accuracy"))))
    for b, rec in (sc.get("latency_unet") or {}).items():
        trec = (tc.get("latency_unet") or {}).get(b, {})
        rows.append((f"Denoiser call latency, batch {b} (median)", _timed(trec), _timed(rec)))
    if "latency_sampler" in sc:
        rows.append((f"Sampler latency per image ({sc['latency_sampler']['steps']} steps, batch "
                     f"{sc['latency_sampler']['batch_size']})",
                     _timed(tc.get("latency_sampler", {}), "per_image_s"),
                     _timed(sc["latency_sampler"], "per_image_s")))
    return rows


BUSY_SPREAD = 1.5  # slowest / fastest repeat of one timing above this: the machine was busy


def _spread(rec: dict) -> float | None:
    lo, hi = rec.get("min_s"), rec.get("max_s")
    return hi / lo if lo and hi else None


def _timed(rec: dict, key: str = "median_s") -> str:
    """A timing, flagged when its repeats spread more than :data:`BUSY_SPREAD`."""
    text = _fmt(rec.get(key), "s")
    spread = _spread(rec)
    return f"{text} ⚠ repeats spread {spread:.1f}×" if spread is not None and spread > BUSY_SPREAD else text


def busy_timings(m: dict) -> list[str]:
    """The timings of ``metrics.json`` whose repeats spread more than :data:`BUSY_SPREAD` (slowest / fastest)."""
    out = []
    for role, rec in (m.get("latency") or {}).items():
        timed = {f"{role} denoiser call, batch {b}": r for b, r in (rec.get("latency_unet") or {}).items()}
        if rec.get("latency_sampler"):
            timed[f"{role} sampler"] = rec["latency_sampler"]
        out += [f"{name} ({_spread(r):.1f}×)" for name, r in timed.items()
                if _spread(r) is not None and _spread(r) > BUSY_SPREAD]
    return out


def _timing_check(m: dict) -> str:
    busy = busy_timings(m)
    if not busy:
        return "ok (every timing's repeats within 1.5× of each other)" if m.get("latency") else "—"
    return (f"⚠ the machine was busy, re-measure on an idle one (`diffprune eval` again, or `diffprune run ... "
            f"--force eval`): the repeats of {', '.join(busy)} spread more than {BUSY_SPREAD}× (slowest / fastest)")


def summary_rows(m: dict) -> list[tuple[str, str]]:
    c = m.get("consistency", {})
    rows = [
        ("MAC reduction (teacher / student)", _fmt(m.get("mac_ratio"), "x")),
        ("Measured speedup (sampler, per image)", _fmt(m.get("speedup"), "x")),
        ("Speedup ÷ MAC ratio", _fmt(m.get("speedup_over_mac_ratio"))),
        ("Timing check", _timing_check(m)),
        ("SSIM teacher↔student (same seeds)", _fmt(m.get("ssim"))),
        ("MS-SSIM", _fmt(m.get("ms_ssim")) if m.get("ms_ssim") is not None else
         "— (" + str(c.get("ms_ssim_note", "not computed")) + ")"),
        ("MSE teacher↔student (pixels in [0, 1])", _fmt(m.get("mse"))),
        ("FID student vs teacher samples", _fmt(m.get("fid_student_vs_teacher"))),
        ("Device / threads", f"{m.get('device')} / {m.get('threads')}"),
        ("Samples (seeds)", f"{m.get('seeds', {}).get('n')} (from {m.get('seeds', {}).get('first')})"),
    ]
    lat = (m.get("latency", {}).get("student", {}).get("latency_sampler") or {})
    if lat.get("peak_memory_kind"):
        rows.append(("Peak memory (student run)", f"{lat['peak_memory_bytes'] / 2**20:.0f} MiB — "
                                                   f"{lat['peak_memory_kind']}"))
    return rows


def _md_table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CAPTIONS = {
    "samples": "Teacher vs pruned student, sampled from the same seeds (DDIM, η = 0).",
    "widths": "Output channels of each pruned layer before and after pruning.",
    "timesteps": "Per-timestep calibration loss at pruning; importance is accumulated up to the cutoff.",
    "finetune": "Loss of the fine-tuning run that recovered the pruned model.",
    "classes": "Share of samples the classifier assigns to the class that was asked for, per class.",
    "class_grid": "One row per requested class (or prompt), same seeds: teacher (left) and pruned student (right).",
}

CSS = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
       "td:first-child,th:first-child{text-align:left}th{background:#f2f4f8}img{max-width:100%}"
       "figure{margin:1.5em 0}figcaption{color:#555;font-size:90%}")


def write_report(out_dir, metrics: dict, *, student_images: torch.Tensor, teacher_images: torch.Tensor | None,
                 seeds: Sequence[int], pruning: dict | None = None, train_log: dict | None = None,
                 grid_count: int = 32, labels: dict | None = None,
                 label_names: list[str] | None = None) -> dict[str, str]:
    """Write the figures, ``report.md`` and ``report.html`` (UTF-8) into ``out_dir``; returns ``{what: file name}``.

    ``labels``: seed -> requested class (or prompt index), for a conditional model (adds the per-class figures);
    ``label_names``: the name of each (default: the class names of the class-accuracy detail)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _write_figures(out, metrics, student_images, teacher_images, seeds, pruning=pruning,
                             train_log=train_log, grid_count=grid_count, labels=labels, label_names=label_names)
    names = metrics.get("names") or {}
    doc = _Document(
        title=f"Diff-Pruning evaluation: {names.get('student', 'student')}" + (
            f" vs {names['teacher']}" if names.get("teacher") else ""),
        table=metrics_rows(metrics), summary=summary_rows(metrics), figures=dict(written),
        missing=[CAPTIONS[k].split(";")[0] for k in ("widths", "timesteps", "finetune") if k not in written],
        versions=", ".join(f"{k} {v}" for k, v in (metrics.get("versions") or {}).items() if v))
    # UTF-8 whatever the locale: the tables hold "—", "×" and "↔"
    atomic_write_text(out / "report.md", _markdown(doc))
    atomic_write_text(out / "report.html", _html(doc, out))
    written["html"], written["md"] = "report.html", "report.md"
    if pruning is not None:  # the evaluated model's card, beside its report
        written["card"] = write_eval_card(out, metrics, pruning, grid=written.get("samples"),
                                          labelled=labels is not None)
    return written


def _write_figures(out: Path, metrics: dict, student_images: torch.Tensor, teacher_images: torch.Tensor | None,
                   seeds: Sequence[int], *, pruning, train_log, grid_count: int, labels, label_names) -> dict[str, str]:
    """Each figure whose data exists, into ``out``; returns ``{what: file name}`` in the report's order."""
    k = min(grid_count, len(student_images))
    written: dict[str, str] = {}
    plot_samples(out / FIGURES["samples"], student_images[:k], None if teacher_images is None else teacher_images[:k],
                 list(seeds)[:k])
    written["samples"] = FIGURES["samples"]
    widths = width_changes(pruning)
    if widths:
        plot_widths(out / FIGURES["widths"], widths, layer_order(pruning))
        written["widths"] = FIGURES["widths"]
    curve = timestep_losses(pruning)
    if curve.t:
        plot_timestep_losses(out / FIGURES["timesteps"], curve)
        written["timesteps"] = FIGURES["timesteps"]
    if train_log and len(train_log.get("step", [])) >= 2:
        plot_finetune(out / FIGURES["finetune"], train_log)
        written["finetune"] = FIGURES["finetune"]
    detail = metrics.get("class_accuracy_detail")
    if detail:
        plot_class_accuracy(out / FIGURES["classes"], detail)
        written["classes"] = FIGURES["classes"]
    if labels:
        plot_class_grid(out / FIGURES["class_grid"], student_images, teacher_images, seeds, labels,
                        label_names or (detail or {}).get("class_names"))
        written["class_grid"] = FIGURES["class_grid"]
    return written


class _Document(NamedTuple):
    """What both documents show: the title, the two tables, the figures, what has no data, the versions."""

    title: str
    table: list
    summary: list
    figures: dict[str, str]
    missing: list[str]
    versions: str


def _markdown(doc: _Document) -> str:
    md = [f"# {doc.title}", "", _md_table(["", "teacher", "student"], doc.table), "",
          _md_table(["summary", ""], doc.summary), ""]
    for key, fname in doc.figures.items():
        md += [f"![{key}]({fname})", "", f"*{CAPTIONS[key]}*", ""]
    if doc.missing:
        md += ["Not shown (no data recorded): " + "; ".join(doc.missing) + ".", ""]
    md += [f"Versions: {doc.versions}.", ""]
    return "\n".join(md)


def _html(doc: _Document, folder: Path) -> str:
    """One self-contained page: the figures (read from ``folder``) inlined as base64 PNGs."""
    figs = []
    for key, fname in doc.figures.items():
        data = base64.b64encode((folder / fname).read_bytes()).decode()
        figs.append(f'<figure><img alt="{key}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(CAPTIONS[key])}</figcaption></figure>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(doc.title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(doc.title)}</h1>"
            + _html_table(["", "teacher", "student"], doc.table) + _html_table(["summary", ""], doc.summary)
            + "".join(figs)
            + (f"<p>Not shown (no data recorded): {html.escape('; '.join(doc.missing))}.</p>" if doc.missing else "")
            + "<p><small>" + html.escape(doc.versions) + "</small></p></body></html>\n")
