"""How much to prune: the ratio search for a MACs or latency target, and depth pruning's choice of blocks."""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..errors import DiffPruneError, require
from ..macs import count_macs
from .config import LATENCY_DTYPES, PruneConfig
from .selection import _copy_with_grads, _meta_copy, _prune_once, scores_in_place

_MAX_SEARCH_RATIO = 0.9
_MIN_RATIO_STEP = 2e-3  # the search stops once its bracket is narrower (ratios a few channels per thousand apart)
_MAX_FILL = 4  # positions the target search may keep out of rank order to step past a jump in the cost
_MAX_STOCK_MIXES = 62  # stock layout: mixes of the two nearest probes' config widths the search may try (6 widths)


@dataclass(frozen=True)
class _Target:
    """What the ratio search aims at: ``measure(pruned copy)`` -> fraction of the original, within ``tolerance``."""

    name: str  # "macs" | "latency"
    value: float
    tolerance: float
    measure: Any
    flag: str


def _macs_target(config: PruneConfig, macs_before: int, adapter) -> _Target:
    return _Target("macs", float(config.target_macs), float(config.macs_tolerance),
                   lambda m: count_macs(m, adapter=adapter).macs / macs_before, "--macs-tolerance")


def _latency_target(config: PruneConfig, timer, base_s: float) -> _Target:
    return _Target("latency", float(config.target_latency), float(config.latency_tolerance),
                   lambda m: timer(m) / base_s, "--latency-tolerance")


def latency_timer(config: PruneConfig, device, adapter=None):
    """``timer(model) -> seconds``: the median of ``latency_repeats`` denoiser calls at ``latency_batch``, in
    ``latency_dtype``, on ``device``, after warm-up (as :mod:`diffprune.latency` measures)."""
    from ..latency import denoiser_latency

    dtype = LATENCY_DTYPES[config.latency_dtype]

    def timer(model) -> float:
        timed = copy.deepcopy(model).to(device=device, dtype=dtype)
        rec = denoiser_latency(timed, device=device, batch_sizes=(config.latency_batch,),
                               repeats=config.latency_repeats, adapter=adapter)
        return rec[str(config.latency_batch)]["median_s"]

    return timer


class _Pruned(NamedTuple):
    """What the selection step did: the ratio, the search's probes, the replayable structure (Torch-Pruning's
    history and the adapter's metadata), the scores, and the positions kept out of rank order."""

    ratio: float
    search: list[dict]
    history: list
    meta: dict
    scores: dict
    skip: list


def _prune_channels(unet, adapter, config: PruneConfig, importance, snapshot, macs_before: int, progress: bool,
                    target: _Target | None, costs: dict | None = None) -> _Pruned:
    """Channel pruning in place: at ``config.ratio``, or at the ratio :func:`_search_ratio` finds for ``target``.
    ``costs``: the cost table of a cost-aware allocation."""
    search, skip, widths = [], [], None
    if target is not None:
        ratio, search, skip, widths = _search_ratio(unet, adapter, config, importance, snapshot, macs_before, progress,
                                                    target, costs)
    else:
        ratio = float(config.ratio)
    history, heads, scores, _ = _prune_once(unet, adapter, config, ratio, importance, skip=skip, costs=costs,
                                            widths=widths)
    return _Pruned(ratio, search, history, adapter.finalize_(unet, snapshot, heads), scores, skip)


def _search_ratio(unet, adapter, config, importance, snapshot, macs_before: int, progress: bool, target: _Target,
                  costs: dict | None = None):
    """Bisection on the ratio so that ``target.measure`` lands within the tolerance; returns ``(ratio, trials,
    skip, widths)``.

    The channel scores are computed once, on the model itself with nothing pruned (:func:`scores_in_place`; for
    Torch-Pruning's own pruner, which scores on a pruned model, on a copy holding the calibration gradients), and
    replayed by every probe, so a probe is a copy, a prune and a measurement; a MAC probe works on a meta-device
    copy (shapes only: no weights copied, no arithmetic in its traces and counts), so a MACs target costs no copy
    of the weights. The deepest ratio is probed first: a
    target beyond it fails at once. Every probe also records its MAC fraction.

    The fill (global ranking): when one more pruned position moves the cost past the whole tolerance band (a
    position of a group coupled through many layers), the search finds that position by bisecting the number of
    pruned positions, keeps it (``skip``) and prunes the next-ranked positions instead, up to ``_MAX_FILL`` times.
    The positions kept out of rank order are recorded with each probe (``kept_out_of_order``).

    The stock layout's step (:meth:`_Search.step_widths`): where the ratio moves several config widths past the
    target together (one level narrows only with another), the search tries the mixes of the two nearest probes'
    widths, forcing them (``widths``, recorded with each probe, and ``forced``).
    """
    search = _Search(unet, adapter, config, importance, snapshot, macs_before, target, progress, costs)
    search.check_reachable()
    done = search.bisect(0.0, _MAX_SEARCH_RATIO, _MIN_RATIO_STEP)  # the ratios left prune nearly the same channels
    if search.totals and not adapter.stock:  # tied widths move in steps a kept position cannot bridge
        search.fill(done)
    elif adapter.stock and not any(search.close(t[search.key], 1) for t in search.trials):
        search.step_widths()
    search.bar.close()
    return search.best()


class _Search:
    """One target search: its probes (``trials``), the scores they replay, the positions kept out of rank order
    (``skip``) and, under global ranking, each probe's pruned positions (``picks``) and how many there are."""

    def __init__(self, unet, adapter, config, importance, snapshot, macs_before: int, target: _Target, progress,
                 costs: dict | None = None):
        self.unet, self.adapter, self.config, self.importance, self.costs = unet, adapter, config, importance, costs
        self.snapshot = snapshot
        self.macs_before, self.target, self.tol = macs_before, target, target.tolerance
        self.key = f"{target.name}_fraction"
        self.trials: list[dict] = []
        self.cache: dict[str, torch.Tensor] = {}
        self.skip: list[tuple[str, int]] = []
        self.picks: dict[tuple[int, int], list] = {}  # (len(skip), positions pruned) -> the positions, in pick order
        self.totals: list[int] = []  # global ranking: the positions a ratio is a share of
        self.bar = tqdm(total=None, desc=f"target-{target.name} search", disable=not progress)

    def probe(self, ratio: float, widths: dict | None = None) -> float:
        """Prune a copy at ``ratio`` (with the current ``skip``; in the stock layout, ``widths`` forced) and measure
        it; records the trial."""
        key, skip, target = self.key, self.skip, self.target
        n = self.totals[0] - int(self.totals[0] * (1 - ratio)) if self.totals else None  # positions it prunes
        if widths is None and (len(skip), n) in self.picks:  # probed already (a ratio rounding to the same positions)
            return next(t[key] for t in reversed(self.trials) if t.get("positions") == n
                        and len(t.get("kept_out_of_order", ())) == len(skip))
        if not self.cache:  # score once, on the model itself (no copy of weights and gradients) where possible
            self.cache = scores_in_place(self.unet, self.adapter, self.config, self.importance, self.costs) or {}
        twin = (_copy_with_grads(self.unet) if not self.cache else _meta_copy(self.unet) if target.name == "macs" else
                copy.deepcopy(self.unet))
        with self.adapter.tracing(twin):
            _, heads, scores, pruner = _prune_once(twin, self.adapter, self.config, ratio, self.importance,
                                                   cached=self.cache or None, skip=skip, costs=self.costs,
                                                   widths=widths)
            self.adapter.finalize_(twin, self.snapshot, heads)
        self.cache.update(scores)
        rel = target.measure(twin)
        macs = rel if target.name == "macs" else count_macs(twin, adapter=self.adapter).macs / self.macs_before
        trial = {"ratio": ratio, key: rel, "macs_fraction": macs}
        if pruner.total_positions is not None:  # global ranking: positions are what the ratio counts
            trial["positions"] = len(pruner.picks)
            self.picks[len(skip), len(pruner.picks)] = pruner.picks
            self.totals.append(pruner.total_positions)
        if skip:
            trial["kept_out_of_order"] = [list(x) for x in skip]
        if self.adapter.stock:
            trial["widths"] = dict(pruner.chosen)
            trial.update({"forced": True} if widths else {})
        self.trials.append(trial)
        self.bar.update()
        self.bar.set_postfix(ratio=f"{ratio:.4f}", **{target.name: f"{rel:.4f}"})
        return rel

    def close(self, rel: float, share: float) -> bool:
        return abs(rel / self.target.value - 1) <= self.tol * share

    def bisect(self, lo: float, hi: float, step: float) -> bool:
        """Ratios in (lo, hi): True once a probe lands within a quarter of the tolerance."""
        while hi - lo >= step:
            mid = (lo + hi) / 2
            rel = self.probe(mid)
            if self.close(rel, 1 / 4):
                return True
            lo, hi = (mid, hi) if rel > self.target.value else (lo, mid)
        return False

    def check_reachable(self) -> None:
        """Probe the deepest ratio first: a target beyond it fails at once, naming what can be asked for."""
        target = self.target
        deepest = self.probe(_MAX_SEARCH_RATIO)
        if deepest > target.value * (1 + self.tol):
            ignored_layers = self.adapter.ignored_layers(self.unet)
            per_layer = count_macs(self.unet, adapter=self.adapter).per_layer
            ignored = sum(per_layer.get(n, 0) for n, m in self.unet.named_modules() if m in ignored_layers)
            raise DiffPruneError(
                f"target_{target.name}={target.value} is out of reach: pruning {_MAX_SEARCH_RATIO:.0%} of the channels "
                f"still keeps {deepest:.4f} of the {'MACs' if target.name == 'macs' else target.name} (the layers "
                f"that are never pruned do {ignored / self.macs_before:.1%} of the MACs, and every group keeps at "
                f"least one channel); ask for {deepest:.2f} or more")

    def fill(self, done: bool) -> None:
        """Global ranking: step past a position whose removal jumps over the tolerance band (see
        :func:`_search_ratio`), up to ``_MAX_FILL`` times."""
        key, value, totals = self.key, self.target.value, self.totals
        floor = None  # positions pruned at which the current skip is known to stay above the target
        for _ in range(_MAX_FILL):
            if done or any(self.close(t[key], 1) for t in self.trials):
                break
            now = [t for t in self.trials if len(t.get("kept_out_of_order", ())) == len(self.skip)]
            known = [floor] if floor is not None else []
            above = max([t["positions"] for t in now if t[key] > value] + known, default=None)
            below = min((t["positions"] for t in now if t[key] < value), default=None)
            if above is None or below is None:
                break
            while below - above > 1:  # narrow to one position: the one whose removal steps over the band
                n = (above + below) // 2
                rel = self.probe((n - 0.5) / totals[0])  # exactly n positions
                if self.close(rel, 1 / 4):
                    break
                above, below = (n, below) if rel > value else (above, n)
            if below - above > 1:  # landed
                break
            self.skip.append(self.picks[len(self.skip), below][above])  # keep it; the next-ranked positions go instead
            floor = above
            done = self.bisect((above - 0.5) / totals[0], _MAX_SEARCH_RATIO, 1 / totals[0])

    def step_widths(self) -> None:
        """The stock layout's step past a jump: the two probes nearest the target on either side differ in a few
        config widths that the ratio moves together; probe every mix of the two (each differing width from one or
        the other; ``_MAX_STOCK_MIXES`` at most, combinations the config cannot build passed over)."""
        key, value = self.key, self.target.value
        above = [t for t in self.trials if t[key] > value and "widths" in t]
        below = [t for t in self.trials if t[key] < value and "widths" in t]
        if not above or not below:
            return
        start = min(above, key=lambda t: t[key])
        wide, narrow = start["widths"], max(below, key=lambda t: t[key])["widths"]
        differ = [k for k in wide if wide[k] != narrow[k]]
        mixes = itertools.product(*((wide[k], narrow[k]) for k in differ))  # the first (all wide) was probed
        for mix in itertools.islice(mixes, 1, min(2 ** len(differ) - 1, _MAX_STOCK_MIXES + 1)):  # so was the last
            try:
                self.probe(start["ratio"], {**wide, **dict(zip(differ, mix))})
            except DiffPruneError:  # neighbouring levels made equal, or another combination it cannot build
                continue

    def best(self) -> tuple[float, list[dict], list[tuple[str, int]], dict | None]:
        """The probe nearest the target, ``(ratio, trials, skip, forced widths or None)``; an error naming the
        nearest steps if it is not within the tolerance."""
        key, target, tol = self.key, self.target, self.tol
        best = min(self.trials, key=lambda r: abs(r[key] / target.value - 1))
        if abs(best[key] / target.value - 1) > tol:
            above = min((r[key] for r in self.trials if r[key] > target.value), default=None)
            below = max((r[key] for r in self.trials if r[key] < target.value), default=None)
            steps = " and ".join(f"{v:.4f}" for v in (above, below) if v is not None)
            hint = (f"; in the stock layout each level keeps one width its config allows, so the cost moves in "
                    f"large steps: ask for one of {steps}, or prune in the free layout (the default)"
                    if self.adapter.stock else
                    "; per-layer steps are coarse: try global ranking (--ranking global --ratio-mode uniform)"
                    if not self.config.global_ranking else
                    "; channels coupled through GroupNorm groups and shared layers go together, so the cost moves "
                    f"in steps here: ask for one of {steps}, or widen {target.flag} (now {tol:.0%})")
            how = (f"ratio {best['ratio']:.4f} with --ratio-mode {self.config.ratio_mode}"
                   + (" --ranking global" if self.config.global_ranking else "")
                   + (", widths forced" if best.get("forced") else
                      ", positions kept out of order" if best.get("kept_out_of_order") else ""))
            raise DiffPruneError(
                f"target_{target.name}={target.value} cannot be reached within +-{tol:.0%}: the nearest pruning "
                f"keeps {best[key]:.4f} of the {'MACs' if target.name == 'macs' else target.name} ({how}){hint}")
        return (best["ratio"], self.trials, [tuple(x) for x in best.get("kept_out_of_order", ())],
                best["widths"] if best.get("forced") else None)


def _prune_blocks(model, adapter, config: PruneConfig, score, macs_before: int) -> _Pruned:
    """Depth pruning: remove the lowest-scoring removable blocks, as many as ``ratio`` (a share of the blocks) or
    ``target_macs`` asks (no Torch-Pruning history: the removed blocks are in the metadata)."""
    blocks = adapter.blocks(model)
    require(blocks is not None, f"method {config.method!r} removes whole blocks, which the {adapter.name} adapter does "
                                "not define; use a channel method (diff-pruning, taylor, magnitude, random)")
    scores = torch.tensor([score(b) for b in blocks])
    order = [i for i in torch.argsort(scores).tolist() if i not in adapter.fixed_blocks(model)]
    trials: list[dict] = []
    for k in range(len(order) + 1):
        twin = copy.deepcopy(model)
        adapter.remove_blocks_(twin, order[:k])
        trials.append({"ratio": k / len(blocks), "blocks_removed": k,
                       "macs_fraction": count_macs(twin, adapter=adapter).macs / macs_before})
    if config.target_macs is not None:
        best = min(trials, key=lambda r: abs(r["macs_fraction"] / config.target_macs - 1))
        require(abs(best["macs_fraction"] / config.target_macs - 1) <= config.macs_tolerance,
                f"target_macs={config.target_macs} cannot be reached within +-{config.macs_tolerance:.0%} by removing "
                f"whole blocks: the nearest removes {best['blocks_removed']} of {len(blocks)} and keeps "
                f"{best['macs_fraction']:.4f} of the MACs; ask for that, or widen --macs-tolerance")
    else:
        best = min(trials, key=lambda r: abs(r["ratio"] - config.ratio))
    removed = sorted(order[:best["blocks_removed"]])
    adapter.remove_blocks_(model, removed)
    # the kept blocks are unchanged: their state, under their new names, is the replayable metadata
    meta = {"removed_blocks": removed, **adapter.finalize_(model, adapter.snapshot(model))}
    return _Pruned(best["ratio"], trials, [], meta, {"blocks": scores}, [])
