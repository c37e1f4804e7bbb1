"""Step 3: which channels go. diffprune's channel selection on Torch-Pruning's pruner, and one pruning pass."""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .._torch import float32_params, meta_copy as _meta_copy
from ..adapters import ModelAdapter
from ..errors import require
from ..seed import seed_everything
from .config import PruneConfig


class _SelectingPruner(tp.pruner.BasePruner):
    """Torch-Pruning 1.6.1's pruner with diffprune's own channel selection (subclasses: :meth:`_select`).

    All groups are scored on the unpruned model first (as Torch-Pruning 1.6.1 does), then the selection picks the
    channels of every group, then the groups are pruned. Everything else (dependency graph, importance, pruning
    functions, history) is Torch-Pruning's. Groups are disjoint channel sets, so earlier prunes do not shift later
    groups' indices.
    """

    whole_heads: frozenset = frozenset()  # ids of projections whose attention loses whole heads (set per pass)
    stock = None  # the adapter whose width ties the stock layout keeps (_tie), or None
    widths = None  # the stock layout's {tie key: width} a target search forces (_tie), or None: the adapter chooses

    @torch.no_grad()
    def _prune(self):
        if self.current_step > self.iterative_steps:
            return
        records = []  # (module, pruning fn, scores, channel groups, current channels, initial channels)
        heads = []  # per record: 1, or the head dim of an attention that loses whole heads (its positions are heads)
        self.costs = []  # with cost-aware allocation: what one position of each record's group costs
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types):
            if not self._check_pruning_ratio(group):
                continue
            is_attn, _ = self._is_atten_group(group)
            if is_attn:
                group = self._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            group = self._narrowest_root(group)
            imp = self.estimate_importance(group)
            if imp is None:
                continue
            module, pruning_fn = group[0].dep.target.module, group[0].dep.handler
            is_out = self.DG.is_out_channel_pruning_fn(pruning_fn)
            current = (self.DG.get_out_channels if is_out else self.DG.get_in_channels)(module)
            initial = (self.layer_init_out_ch if is_out else self.layer_init_in_ch)[module]
            chunks, imp = self._get_channel_groups(group), imp.detach().cpu()
            qkv = self._whole_heads_projection(group) if chunks > 1 else None
            size = 1 if qkv is None else self.DG.get_out_channels(qkv) // chunks
            # an attention whose head dim is fixed (RoPE, QK-norm): its positions are whole heads, scored by their mean
            records.append((module, pruning_fn, imp, chunks, current, initial) if qkv is None else
                           (module, pruning_fn, imp.view(chunks, -1).mean(dim=1), 1, chunks,
                            self.layer_init_out_ch[qkv] // size))
            heads.append(size)
            if self.layer_costs is not None:
                self.costs.append(self._position_cost(group, chunks if qkv is None else size))
        picks = self._select(records)
        if self.stock is not None:
            picks = self._tie(records, picks, heads)
        for (module, pruning_fn, *_), idxs, size in zip(records, picks, heads):
            idxs = [int(i) * size + d for i in idxs for d in range(size)]  # a head's channels are contiguous
            if len(idxs) > 0:
                group = self.DG.get_pruning_group(module, pruning_fn, sorted(int(i) for i in idxs))
                if self.DG.check_pruning_group(group):
                    yield group

    def _select(self, records) -> list:
        """The channel indices to prune in each record's group."""
        raise NotImplementedError

    def _tie(self, records, picks: list, sizes: list[int]) -> list:
        """The stock layout: every group whose width one config value sets (the adapter's ``width_tie``, e.g. a UNet
        level) keeps that width, or a whole multiple of it where the group is that much wider (a feed-forward's hidden
        width, four times its transformer's); the adapter chooses it (``choose_widths``) among the widths the config
        allows, near the mean its groups kept under the selection (so global ranking still decides which levels
        narrow most); in each group the lowest-scoring positions go (the same ones in every GroupNorm group)."""
        ties, options, factors = self._ties(records, sizes), {}, {}
        records = [(*rec[:3], max(rec[3], self.stock.tie_chunks(self.model, self.module_names.get(id(rec[0]), "?"))),
                    *rec[4:]) for rec in records]  # a gated projection's halves: the same positions go in both
        for key, rs in ties.items():
            width = min(records[r][4] * sizes[r] for r in rs)  # channels: positions x head dim
            factors.update({r: records[r][4] * sizes[r] // width for r in rs})
            # whole GroupNorm groups and heads in every group, at its multiple of the width
            unit = math.lcm(*(records[r][3] * sizes[r] // math.gcd(records[r][3] * sizes[r], factors[r]) for r in rs))
            allowed = [w for w in self.stock.tie_widths(self.model, key, width) or range(unit, width + 1, unit)
                       if w % unit == 0] or [width]
            options[key] = (allowed, sum((records[r][4] - len(picks[r])) * sizes[r] / factors[r] for r in rs) / len(rs))
        for key, width in (self.widths or {}).items():
            allowed = options.get(key, ([], 0))[0]
            require(width in allowed, f"--layout stock: {key} cannot be {width} wide; its config allows {allowed}")
            options[key] = ([width], width)
        chosen = self.chosen = self.stock.choose_widths(self.model, options)  # read by the target search's probes
        out = list(picks)
        for key, rs in ties.items():
            for r in rs:
                chunks, current = records[r][3:5]
                per = current // chunks
                keep = chosen[key] * factors[r] // (chunks * sizes[r])
                out[r] = [i + g * per for g in range(chunks)
                          for i in torch.argsort(self._position_scores(records[r]))[:per - keep].tolist()]
        return out

    def _ties(self, records, sizes: list[int]) -> dict[str, list[int]]:
        """The records of each config width (:meth:`_tie`), checked: every group has one, and every group of a key is
        a whole multiple of the narrowest one's width."""
        ties: dict[str, list[int]] = {}
        kind = type(self.model).__name__
        for r, rec in enumerate(records):
            name = self.module_names.get(id(rec[0]), "?")
            key = self.stock.width_tie(self.model, name)
            require(key is not None, f"--layout stock: no {kind} config value sets the width of {name}; prune in the "
                                     "free layout (the default)")
            ties.setdefault(key, []).append(r)
        for key, rs in ties.items():
            widths = {records[r][4] * sizes[r] for r in rs}  # channels: positions x head dim
            require(all(w % min(widths) == 0 for w in widths),
                    f"--layout stock: the groups of {kind}'s {key} are {sorted(widths)} wide, which one config value "
                    "cannot set; prune in the free layout (the default)")
        return ties

    @staticmethod
    def _position_scores(record) -> torch.Tensor:
        """A record's score per position (averaged over its GroupNorm groups, as global ranking ranks them)."""
        imp, chunks = record[2], record[3]
        return imp.view(chunks, -1).mean(dim=0) if chunks > 1 else imp

    def _narrowest_root(self, group):
        """``group`` rooted at its narrowest layer whose output channels it prunes, where its root is wider: a
        projection whose output is split into parts that each act on the same channels (a ResNet's scale-and-shift
        time projection, ``2c`` wide for a ``c``-wide level) would make each part's channel a position of its own, so
        the parts lose different channels; rooted at the ``c``-wide layer, a position is one channel of every part."""
        root, fn = group[0].dep.target.module, group[0].dep.handler
        if not self.DG.is_out_channel_pruning_fn(fn):
            return group
        layers = [(self.DG.get_out_channels(item.dep.target.module), i) for i, item in enumerate(group)
                  if isinstance(item.dep.target.module, (nn.Conv2d, nn.Linear))
                  and self.DG.is_out_channel_pruning_fn(item.dep.handler)]
        width, i = min(layers, default=(None, 0))
        if width is None or width >= self.DG.get_out_channels(root):
            return group
        item = group[i].dep.target
        return self.DG.get_pruning_group(item.module, group[i].dep.handler, list(range(width)))

    def _whole_heads_projection(self, group):
        """A q/k/v projection of ``group`` whose attention may only lose whole heads (the adapter's
        ``whole_heads``), or None."""
        return next((item.dep.target.module for item in group if id(item.dep.target.module) in self.whole_heads
                     and self.DG.is_out_channel_pruning_fn(item.dep.handler)), None)

    def _position_cost(self, group, chunks: int) -> float:
        """What removing one position of ``group`` saves (MACs or seconds, :mod:`diffprune.prune.costs`): each
        coupled layer's cost per channel, in or out, for one channel in each of the ``chunks`` chunks. An
        attention's q/k/v channels also carry its attention products (q and k a quarter each, v half)."""
        cost, seen = 0.0, set()
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            is_out = self.DG.is_out_channel_pruning_fn(handler)
            if (id(module), is_out) in seen:
                continue
            seen.add((id(module), is_out))
            name = self.module_names.get(id(module), "")
            cost += self.layer_costs.get(name, {}).get("out" if is_out else "in", 0.0)
            parent, _, leaf = name.rpartition(".")
            if is_out and leaf in ("to_q", "to_k", "to_v"):
                cost += self.layer_costs.get(parent, {}).get("attn", 0.0) * (0.5 if leaf == "to_v" else 0.25)
        return cost * chunks

    def _kept(self, keep: int, size: int, chunks: int) -> int:
        """Positions per chunk to keep when the ratio asks for ``keep`` of ``size``: with ``round_to`` N, the most
        positions <= ``keep`` whose total width ``chunks * kept`` is a multiple of N (at least one; if only wider ones
        qualify, the narrowest of those; an untouched group stays whole)."""
        n = self.round_to or 1
        if n == 1 or keep >= size:
            return keep
        allowed = [p for p in range(1, size + 1) if (chunks * p) % n == 0] or [size]
        below = [p for p in allowed if p <= keep]
        return max(below) if below else min(allowed)


def check_round_to(unet: nn.Module, adapter: ModelAdapter, round_to: int) -> None:
    """Refuse a ``round_to`` at least as wide as every prunable layer: a pruned width is a smaller multiple of it, so
    every group would stay whole and the run would prune nothing (see :meth:`_SelectingPruner._kept`)."""
    if round_to == 1:
        return
    ignored = {id(m) for m in adapter.ignored_layers(unet)}  # their output channels are never pruned
    widths = {name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
              for name, m in unet.named_modules()
              if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and id(m) not in ignored}
    widest = max(widths, key=widths.get)
    require(round_to < widths[widest],
            f"round_to={round_to} leaves every layer whole: a pruned width is a smaller multiple of it, and the widest "
            f"prunable layer, {widest}, has {widths[widest]} channels; choose a round_to below {widths[widest]} "
            "(--round-to)")


class PaperPruner(_SelectingPruner):
    """The Diff-Pruning repository's local selection rule ("paper" mode).

    For each group: ``n_pruned = current - int(initial * (1 - ratio))``; with ``k`` channel groups (GroupNorm
    groups or attention heads) the channels form ``k`` contiguous chunks and each chunk drops its own
    ``n_pruned // k`` lowest-scoring channels; otherwise the ``n_pruned`` lowest-scoring channels go.
    All groups are scored on the unpruned model before any is pruned (the repository's old Torch-Pruning scored
    each group after pruning the previous ones, an ordering artefact that does not change the architecture).
    """

    def _select(self, records):
        out = []
        for module, _, imp, ch_groups, current, initial in records:
            n_pruned = current - int(initial * (1 - self.get_target_pruning_ratio(module)))
            if n_pruned <= 0:
                out.append([])
            elif ch_groups > 1:
                size = current // ch_groups
                per = size - self._kept(size - n_pruned // ch_groups, size, ch_groups)
                out.append(torch.cat([torch.argsort(imp[g * size:(g + 1) * size])[:per] + g * size
                                      for g in range(ch_groups)]).tolist())
            else:
                out.append(torch.argsort(imp)[:current - self._kept(current - n_pruned, current, 1)].tolist())
        return out


class GlobalPruner(_SelectingPruner):
    """Torch-Pruning 1.6.1's global ranking ("uniform" mode with ``global_ranking``), with every group keeping at least
    one position.

    As in Torch-Pruning, a group with ``k`` channel groups (GroupNorm groups, attention heads) is ranked by its
    position scores averaged over the ``k`` chunks, the same positions go in every chunk, and ``ratio`` is the share
    of all positions to remove, lowest scores first across groups. The difference: Torch-Pruning prunes every
    position below one global threshold, and a group whose positions all fall below it would lose every channel,
    which its dependency check refuses, so the group is left *whole*: the MACs then go back up at deeper cuts
    (measured on the MNIST configuration: ratio 0.6 kept 0.08 of the MACs, 0.75 kept 0.73). Here each group keeps its
    best position, the next-lowest positions elsewhere go instead, and the MACs fall monotonically with the ratio.
    """

    def _select(self, records):
        positions = [self._position_scores(rec) for rec in records]
        names = [self.module_names.get(id(rec[0]), "?") for rec in records]
        self.total_positions = total = sum(len(p) for p in positions)
        n_pruned = total - int(total * (1 - self.pruning_ratio))
        ranked = sorted((key, r, i) for r, keys in enumerate(self._rank_keys(positions))
                        for i, key in enumerate(keys.tolist()))
        left = [len(p) for p in positions]
        floors = [self._floor(name, len(pos)) for name, pos in zip(names, positions)]
        chosen: list[list[int]] = [[] for _ in records]
        for _, r, i in ranked:
            if n_pruned <= 0:
                break
            if left[r] > floors[r] and (names[r], i) not in self.skip:  # every group keeps at least its floor
                chosen[r].append(i)
                left[r] -= 1
                n_pruned -= 1
                self.picks.append((names[r], i))
        for r, pos in enumerate(positions):  # round_to: a group's kept width, then its lowest positions go
            kept = self._kept(len(pos) - len(chosen[r]), len(pos), records[r][3])
            chosen[r] = torch.argsort(pos)[:len(pos) - kept].tolist()
        return [[i + g * len(pos) for g in range(rec[3]) for i in picked]
                for rec, pos, picked in zip(records, positions, chosen)]

    def _rank_keys(self, positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """What positions are ranked by, lowest first: the score (``normalize="mean"``: over its group's mean), or
        with ``allocation="cost"``/``"latency"`` the score per MAC/second saved (a position that saves nothing goes
        last)."""
        keys = []
        for r, pos in enumerate(positions):
            pos = pos.double()
            if self.allocation.normalize == "mean" and float(pos.mean()) > 0:
                pos = pos / pos.mean()
            if self.allocation.allocation in ("cost", "latency"):
                cost = self.costs[r]
                pos = pos / cost if cost > 0 else torch.full_like(pos, float("inf"))
            keys.append(pos)
        return keys

    def _floor(self, name: str, size: int) -> int:
        """The positions a group keeps at least: one; ``size * (1 - max_layer_ratio)``; for a conditioning pathway
        the adapter names, ``size * conditioning_floor``."""
        floor = 1
        a = self.allocation
        if a.max_layer_ratio is not None:
            floor = max(floor, math.ceil(size * (1 - a.max_layer_ratio) - 1e-9))
        if a.conditioning_floor and any(name == p or name.startswith(p + ".") for p in self.conditioning):
            floor = max(floor, math.ceil(size * a.conditioning_floor - 1e-9))
        return min(floor, size)


class _RecordingImportance:
    """Wraps an importance: records each group's scores under its root module name (``report.scores``), or replays
    scores recorded before (``cached``: the target-MACs search scores once and probes many ratios)."""

    def __init__(self, importance, names: dict[int, str], cached: dict | None = None):
        self.importance, self.names, self.cached = importance, names, cached
        self.scores: dict[str, torch.Tensor] = {}

    def __call__(self, group):
        key = self.names.get(id(group[0].dep.target.module), "?")
        if self.cached is not None and key in self.cached:
            imp = self.cached[key].clone()
        else:  # a bfloat16/float16 model's scores are computed and summed in float32
            with float32_params(dep.target.module for dep, _ in group):
                imp = self.importance(group)
        if imp is not None:
            self.scores[key] = imp.detach().cpu().clone()
        return imp


def _prune_once(unet, adapter: ModelAdapter, config: PruneConfig, ratio: float, importance, cached: dict | None = None,
                skip=(), costs: dict | None = None,
                widths: dict | None = None) -> tuple[list, dict, dict, "_SelectingPruner"]:
    """Prune ``unet`` in place at ``ratio``; returns (Torch-Pruning history, heads per attention, scores, the
    pruner). ``cached``: scores recorded by an earlier call on the same unpruned model, used instead of
    ``importance``. ``skip``: positions global ranking keeps whatever their rank (:class:`GlobalPruner`).
    ``costs``: the cost table of a cost-aware allocation (:func:`diffprune.prune.costs.layer_costs`). ``widths``: the
    stock layout's width per tie key, forced (a target search's step past a jump, :meth:`_SelectingPruner._tie`)."""
    pruner, recorder = _pruner(unet, adapter, config, ratio, importance, cached, skip, costs)
    pruner.widths = widths
    pruner.step()
    heads = {}
    for name, m in unet.named_modules():
        q = getattr(m, "to_q", None)
        if q is not None and q in pruner.num_heads:
            heads[name] = int(pruner.num_heads[q])
    history = [[n, bool(out), [int(i) for i in idxs]] for n, out, idxs in pruner.pruning_history()]
    return history, heads, recorder.scores, pruner


def scores_in_place(unet, adapter: ModelAdapter, config: PruneConfig, importance,
                    costs: dict | None = None) -> dict[str, torch.Tensor] | None:
    """Every group's scores, computed on ``unet`` itself with nothing pruned (no copy of its weights or gradients:
    the target search replays them on shapes-only copies); None where the selection scores a group only after
    pruning the ones before it (Torch-Pruning's own pruner, ``prune_heads``), whose scores need a pruned copy."""
    if not issubclass(_pruner_class(config), _SelectingPruner):
        return None
    pruner, recorder = _pruner(unet, adapter, config, 0.5, importance, None, (), costs)
    for _ in pruner.step(interactive=True):  # every group is scored before the first is yielded; none is pruned
        pass
    return recorder.scores


def _pruner(unet, adapter: ModelAdapter, config: PruneConfig, ratio: float, importance, cached, skip, costs):
    """The pruner of one pass at ``ratio`` over ``unet``, and the importance recorder it scores through."""
    seed_everything(config.seed)  # random scores are reproducible
    names = {id(m): n for n, m in unet.named_modules()}
    recorder = _RecordingImportance(importance, names, cached)
    num_heads = adapter.num_heads(unet)
    kwargs: dict[str, Any] = dict(
        importance=recorder, pruning_ratio=float(ratio), global_pruning=config.global_ranking,
        ignored_layers=adapter.ignored_layers(unet), num_heads=dict(num_heads),
        in_channel_groups={}, out_channel_groups={}, channel_groups={},
    )
    if config.prune_heads:
        kwargs.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=float(ratio))
    pruner = _pruner_class(config)(unet, adapter.trace_inputs(unet), **kwargs)
    pruner.round_to = config.round_to  # read by diffprune's own selection (_SelectingPruner._kept)
    pruner.allocation, pruner.conditioning = config, adapter.conditioning_paths(unet)
    require(costs is not None or config.allocation == "score",
            f"allocation {config.allocation!r} needs its cost table (diffprune.prune.costs.layer_costs)")
    pruner.layer_costs = costs
    pruner.module_names, pruner.skip, pruner.picks, pruner.total_positions = names, frozenset(skip), [], None
    pruner.whole_heads = {id(m) for m in adapter.whole_heads(unet)}
    pruner.stock = adapter if adapter.stock else None  # read by _SelectingPruner._tie
    return pruner, recorder


def _pruner_class(config: PruneConfig) -> type:
    return (PaperPruner if config.ratio_mode == "paper" else
            GlobalPruner if config.global_ranking and not config.prune_heads else tp.pruner.BasePruner)


def _copy_with_grads(unet: nn.Module) -> nn.Module:
    twin = copy.deepcopy(unet)
    for p, q in zip(unet.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    return twin
