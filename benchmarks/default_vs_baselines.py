"""The default against the baselines, per family: rows of the two allocation benchmarks, named as issue 29 asks.

    python benchmarks/default_vs_baselines.py

Reads ``benchmarks/results/unet-allocation.json`` (shipped UNet, ``demo`` config) and ``dit-allocation.json`` (shipped
DiT, ``demo-dit``), both written by ``benchmarks/seeds.py`` (their .md files hold the commands), and writes
``benchmarks/results/default-vs-baselines.json`` and ``.md``. Arms: ``default`` (``diffprune prune`` without
``--method``), ``paper`` (Diff-Pruning as published: threshold rule, score-only global ranking,
``conditioning_floor=0``), ``magnitude``, ``taylor``, and the variant ``cost-allocation``. Every row is checked
before it is written: its eval-stage hash must be the one the arm's settings give with the code as it is now, so a
row labelled ``default`` is what ``prune`` does today, not what it did when the row was measured.
"""
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from _arms import arm_config, demo_config
from diffprune._fs import atomic_write_bytes
from diffprune.pipeline import load_run_config, stage_hashes

RESULTS = Path("benchmarks/results")
FAMILIES = {"unet": ("demo", "unet-allocation"), "dit": ("demo-dit", "dit-allocation")}
# arm here: (arm as the source benchmark ran it, the same settings as an arm today)
ARMS = {"default": ("conditioning_floor=0.5", "default"), "paper": ("diff-pruning", "conditioning_floor=0"),
        "magnitude": ("magnitude", "magnitude"), "taylor": ("taylor", "taylor"),
        "cost-allocation": ("allocation=cost", "allocation=cost,conditioning_floor=0")}
BASELINES = ("paper", "magnitude", "taylor")


def family_rows(family: str) -> list[dict]:
    config, source = FAMILIES[family]
    base = demo_config(config)
    rows, stale = [], []
    for r in json.loads((RESULTS / f"{source}.json").read_text())["rows"]:
        arm = next((a for a, (ran, _) in ARMS.items() if ran == r["arm"]), None)
        if arm is None:
            continue
        cfg = load_run_config(arm_config(base, ARMS[arm][1], r["seed"], r["steps"]))
        if stage_hashes(cfg)["eval"] != r["hash"]:
            stale.append(f"{family}/{arm}/seed {r['seed']}")
            continue
        rows.append({"family": family, "arm": arm, "settings": ARMS[arm][1], "seed": r["seed"], "fid": r["fid"],
                     "ssim": r["ssim"], "params": r["params"], "macs_ratio": r["macs_fraction"],
                     "steps": r["steps"], "speedup_loaded_machine": r["speedup"], "hash": r["hash"],
                     "source": f"benchmarks/results/{source}.json"})
    if stale:
        sys.exit(f"rows whose settings are no longer what their arm means (re-run them with benchmarks/seeds.py): "
                 f"{stale}")
    return rows


def by_seed(rows: list[dict], family: str, arm: str) -> dict[int, dict]:
    return {r["seed"]: r for r in rows if r["family"] == family and r["arm"] == arm}


def mean_std(values: list[float], digits: int) -> str:
    sd = np.std(values, ddof=1) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}"


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> tuple[float, float, int]:
    """Mean of a − b over the seeds both hold, the paired t-test's p, and the number of pairs."""
    seeds = sorted(set(a) & set(b))
    d = [a[s][key] - b[s][key] for s in seeds]
    p = float(stats.ttest_rel([a[s][key] for s in seeds], [b[s][key] for s in seeds]).pvalue) if len(seeds) > 1 \
        else float("nan")
    return float(np.mean(d)) if d else float("nan"), p, len(seeds)


def family_table(rows: list[dict], family: str) -> list[str]:
    out = [f"## {family}", "", "| arm | seeds | FID | SSIM to teacher | parameters | MACs ratio | FID − default "
           "(paired) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    default = by_seed(rows, family, "default")
    for arm in ARMS:
        mine = by_seed(rows, family, arm)
        if not mine:
            continue
        v = list(mine.values())
        diff, p, n = paired(mine, default, "fid")
        vs = "—" if arm == "default" else f"{diff:+.2f} (p = {p:.3f}, {n} pairs)"
        out.append(f"| {arm} | {len(v)} | {mean_std([r['fid'] for r in v], 2)} | "
                   f"{mean_std([r['ssim'] for r in v], 3)} | {np.mean([r['params'] for r in v]):,.0f} | "
                   f"{np.mean([r['macs_ratio'] for r in v]):.3f} | {vs} |")
    return out + [""] + goals(rows, family) + [""]


def goals(rows: list[dict], family: str) -> list[str]:
    """Issue 29's goals, each as measured."""
    default = by_seed(rows, family, "default")
    fid = {a: np.mean([r["fid"] for r in by_seed(rows, family, a).values()]) for a in BASELINES
           if by_seed(rows, family, a)}
    best = min(fid, key=fid.get)
    d_fid = np.mean([r["fid"] for r in default.values()])
    paper = by_seed(rows, family, "paper")
    diff, p, n = paired(default, paper, "fid")
    sdiff, sp, _ = paired(default, paper, "ssim")
    spread = np.std([r["fid"] for r in default.values()], ddof=1) / np.std([r["fid"] for r in paper.values()], ddof=1)
    return [f"- Default mean FID {d_fid:.2f} against the best baseline's ({best}) {fid[best]:.2f}: "
            f"{'at most' if d_fid <= fid[best] else 'ABOVE'} it.",
            f"- Against paper, paired over {n} seeds: FID {diff:+.2f} (p = {p:.3f}), SSIM {sdiff:+.4f} (p = {sp:.3f}).",
            f"- Seed spread of the default's FID: {spread:.2f}× paper's std "
            f"({'at most' if spread <= 0.5 else 'more than'} half)."]


def main() -> None:
    rows = [r for family in FAMILIES for r in family_rows(family)]
    atomic_write_bytes(RESULTS / "default-vs-baselines.json", (json.dumps(rows, indent=1) + "\n").encode())
    lines = ["# The default against the baselines (issue 29)", "",
             "`python benchmarks/default_vs_baselines.py` — rows of `unet-allocation.json` and `dit-allocation.json` "
             "(paired by seed, 0.5× MACs, the demo configs' fine-tuning and evaluation; their .md hold the "
             "`benchmarks/seeds.py` commands), each checked against the hash its arm gives today.", "",
             "`default` is `diffprune prune` without `--method`: diff-pruning's score with half of every conditioning "
             "pathway kept (`conditioning_floor=0.5`). `paper` is Diff-Pruning as published (`--conditioning-floor 0`)."
             " `cost-allocation` ranks by importance per MAC saved (`--allocation cost`).", ""]
    for family in FAMILIES:
        lines += family_table(rows, family)
    atomic_write_bytes(RESULTS / "default-vs-baselines.md", "\n".join(lines).encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
