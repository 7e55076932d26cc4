"""Importance of whole-network unit channels: small criterion objects for global compression.

An importance object ranks the channels of units of a network (`units.UnitAnalysis`): called
as ``imp(model, analysis, unit_names)`` it returns, per unit, a float64 tensor with one value per
channel as the model has them now (higher = more important). `rescore` says whether the values
change when other channels are removed (CAR: yes, every round; weight magnitudes: no).

* `CAR`: accuracy lost (or the `metric`'s loss) when the channel is removed, scored exactly by
  the engine on `data` (`engine.score_units`); the last scores (with per-class CAR_c) stay in
  `last`.
* `Magnitude`: group magnitude of every weight the channel's removal deletes (producers,
  BatchNorms, consumers), as Torch-Pruning's GroupMagnitudeImportance defines it.
* `Taylor`: first-order Taylor |w dL/dw| over the same weights (Torch-Pruning's
  GroupTaylorImportance).
* `Random`: seeded uniform values (a control).

Users add their own by implementing the same call (a `Protocol`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from . import metrics
from .data.batches import DataLike
from .engine import BufferPool, block_cache
from .scores import LayerScores
from .units import UnitAnalysis


@runtime_checkable
class Importance(Protocol):
    name: str
    rescore: bool

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        """Per unit, float64 [channels]: importance of each of its current channels."""


@dataclass
class BlockSums:
    """What one block of images gives `CAR.search` for one unit: the unablated network's
    correct count, and per channel in `filters` (the order asked for) the count with that
    channel removed (int64). Sums over images, so blocks and shares of channels add up."""

    filters: list[int]
    base: int
    correct: torch.Tensor


# a unit's tail sums in another order than the plain forward that orders the images: an image
# the forward puts further than this (x the largest |margin|, at least 1) inside the boundary is
# taken to be right in every tail too (float32 differences are about 1e-6 of the outputs); the
# search checks it on every block it scores and counts exactly when it fails
MARGIN_SLACK = 1e-3


def _count_value(count: int, scale: float, n: int) -> float:
    """A channel's importance from its summed count over n images (the metric's fixed-point
    `scale`)."""
    return float(torch.tensor(count, dtype=torch.int64).double() / (scale * max(1, n)))


def _after(per_block: np.ndarray) -> np.ndarray:
    """[t]: the sum of `per_block` over the blocks after block t."""
    return np.concatenate([np.cumsum(per_block[::-1])[::-1][1:], [0]])


def _bound_search(run: Callable[[np.ndarray, dict[str, list[int]]], dict[str, BlockSums]],
                  order: list[np.ndarray], alive: dict[str, list[int]],
                  later: dict[str, np.ndarray], rank: Callable[[str, int, float], Any], n: int,
                  picks: int, promote: int, near: np.ndarray | None, state: dict[str, float]
                  ) -> tuple[dict, dict, dict, dict] | None:
    """The steps of `CAR.search` on the image blocks `order`: `later[u][t]` bounds what unit u's
    unablated network gets wrong in blocks t + 1 onwards. Returns per unit the partial counts,
    the blocks scored, the leaders and the channels scored to the end; None as soon as a block
    scored shows a unit getting more images wrong than `near` (per block, what `later` was
    built from) allows, from the first block the bound uses on."""
    units = list(alive)
    pos = {u: {c: j for j, c in enumerate(alive[u])} for u in units}
    part = {u: torch.zeros(len(alive[u]), dtype=torch.int64) for u in units}
    seen = {u: torch.zeros(len(alive[u]), dtype=torch.int64) for u in units}
    first = min(2, len(order))   # every channel is scored on these blocks

    def add(t: int, chans: dict[str, list[int]], until: int | None = None) -> bool:
        """Score `chans` on blocks t .. until - 1 (default: block t alone) in one run; False
        when a unit got more of them wrong than `near` allows."""
        chans = {u: c for u, c in chans.items() if c}
        if not chans:
            return True
        ts = range(t, t + 1 if until is None else until)
        block = order[t] if len(ts) == 1 else np.concatenate([order[k] for k in ts])
        ok = True
        for u, got in run(block, chans).items():
            j = torch.tensor([pos[u][c] for c in got.filters], dtype=torch.int64)
            part[u][j] += got.base - got.correct
            seen[u][j] += len(ts)
            if near is not None and t >= first and len(block) - got.base > int(near[ts].sum()):
                ok = False
        return ok

    def key(u: str, j: int, count: int) -> Any:
        return rank(u, alive[u][j], _count_value(count, state["scale"], n))

    for t in range(first):
        add(t, {u: list(alive[u]) for u in units})
    # the candidates ranked best so far, scored to the end: they fix the threshold
    est = sorted((key(u, j, int(part[u][j])), u, j) for u in units for j in range(len(alive[u])))
    lead: dict[str, set[int]] = {u: set() for u in units}
    for _, u, j in est:
        if len([v for v in lead.values() if v]) >= picks + 2:
            break
        if not lead[u]:
            lead[u].add(j)
    for _, u, j in est[:picks + 2]:
        lead[u].add(j)
    for t in range(first, len(order)):
        if not add(t, {u: [alive[u][j] for j in sorted(js)] for u, js in lead.items()}):
            return None
    finished = {u: set(js) for u, js in lead.items()}   # scored on every block

    def threshold() -> Any:
        best = sorted(min(key(u, j, int(part[u][j])) for j in js)
                      for u, js in finished.items() if js)
        return best[picks - 1] if len(best) >= picks else None

    def bound(u: str, j: int, t: int) -> Any:
        """The best key channel j of unit u can still reach before block t."""
        return key(u, j, int(part[u][j]) - int(later[u][t - 1]))

    thr = threshold()
    live = {u: [j for j in range(len(alive[u])) if j not in lead[u]] for u in units}
    for t in range(first, len(order)):
        for _ in range(promote):
            cand = [(bound(u, j, t), u, j) for u, js in live.items() for j in js]
            if not cand:
                break
            low, u, j = min(cand)
            if thr is not None and not low < thr:
                break
            if not add(t, {u: [alive[u][j]]}, until=len(order)):
                return None
            live[u].remove(j)
            finished[u].add(j)
            thr = threshold()
        if thr is not None:
            live = {u: [j for j in js if not bound(u, j, t) > thr] for u, js in live.items()}
        if not add(t, {u: [alive[u][j] for j in js] for u, js in live.items()}):
            return None
    return part, seen, lead, finished


class CAR:
    """Exact CAR (or the importance under `metric`) of each channel on `data`."""

    name = "car"
    rescore = True

    def __init__(self, data: DataLike, *, num_images: int | None = None, seed: int = 0,
                 memory_budget: int | str | None = None,
                 metric: str | metrics.Metric | metrics.PerSample | None = None,
                 bins: int | Sequence[float] | None = None, zero_skip: bool = True,
                 **engine_options: Any) -> None:
        self.data = data
        self.options = dict(num_images=num_images, seed=seed, memory_budget=memory_budget,
                            metric=metric, bins=bins, **engine_options)
        self.zero_skip = zero_skip
        self.metric_name = metrics.get_metric(metric).name
        self.last: dict[str, LayerScores] = {}
        self.last_cost: Any = None
        self.last_search: dict[str, int] = {}
        self._buffers: BufferPool | None = None   # `search(..., keep_buffers=True)`

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        from .unit_engine import score_units

        out = score_units(model, self.data, list(units), analysis=analysis, progress=False,
                          zero_skip=self.zero_skip, **self.options)
        self.last_cost = getattr(out, "cost", None)
        self.last = dict(out)
        return {u: s.importance.to(torch.float64) for u, s in self.last.items()}

    def search(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str],
               rank: Callable[[str, int, float], Any], picks: int = 1,
               blocks: int = 8, promote: int = 3, keep_buffers: bool = False
               ) -> dict[str, torch.Tensor]:
        """Per unit, float64 [channels]: the exact CAR of every channel that can be among the
        first `picks` channels by `rank` (at most one per unit, lowest first), NaN for the
        channels proven not to be; the same choices as ranking `self(...)`, for less work.

        `rank(unit, channel, value)` is the sort key of a channel with importance `value`; it
        must not decrease when `value` grows. The bound is not statistical (see MARGIN_SLACK): a top-k
        count is a sum over images of base - ablated, each term -1, 0 or +1, and an image the
        unablated network gets wrong can only add 0 or -1. The images are ordered by their margin in a plain
        forward: those the network gets wrong first, then the rest, nearest to flipping first,
        in `blocks` blocks. Every
        channel is scored on the wrong ones and the first block; the few channels ranked best
        so far are scored to the end, which fixes the threshold (the `picks`-th best unit's
        best key among the channels scored to the end); a channel is then dropped as soon as
        its partial count minus the images still to come that its unit's unablated network can
        get wrong ranks above the threshold. Those are the images the plain forward gets wrong
        or puts within `MARGIN_SLACK` of the boundary (the tails sum in another order than the
        forward, a float32 difference of about 1e-6 of the outputs): no unablated pass per
        block is needed. Every block a unit scores checks it with the engine's own counts, and
        a unit that gets more wrong than that allows makes the search count them exactly, per
        unit and block, and start again (`last_search['recounted']`). Before each later
        block, up to `promote` times, the remaining channel with the lowest such bound, if it
        ranks below the threshold, is scored on all the blocks left at once and its exact value
        tightens the threshold (when the first estimate picked the leaders badly, as late in a
        greedy run, this saves much: round 101 of the ResNet-20 run of benchmarks/bench_global
        scored 103,681 image-ablations instead of 180,231 and took 21 s instead of 36 s; 0 turns
        it off). Metrics that are not top-k counts have no such bound: everything is scored
        (`self(...)`). The cost of all the runs is in `last_cost`, what the search saved in
        `last_search`.

        `keep_buffers`: the search's large tensors (the kept prefix, each fused unit's Z) stay
        with this object for the next search, which reuses those of the same shape instead of
        fresh memory (a greedy run's rounds build nearly the same ones; `release_buffers`
        lets them go). The search runs inside `engine.block_cache` (freed CPU blocks reused
        by size class instead of the C heap, which slows as a greedy run's rounds fragment it;
        `CARPRUNE_BLOCK_CACHE=0` turns it off). Values are the same either way."""
        t_start = time.perf_counter()
        measure = metrics.get_metric(self.options["metric"], self.options.get("topk", 1))
        if not measure.exact_counts or not measure.higher_is_better:
            self.last_search = {}
            return self(model, analysis, units)
        pool = None
        if keep_buffers:
            if self._buffers is None:
                self._buffers = BufferPool()
            pool = self._buffers
        try:
            with block_cache():
                return self._search(model, analysis, units, rank, picks, blocks, promote, pool,
                                    t_start)
        finally:
            if pool is not None:
                pool.reclaim()

    def release_buffers(self) -> None:
        """Lets go of the tensors `search(..., keep_buffers=True)` kept."""
        self._buffers = None

    def _search(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str],
                rank: Callable[[str, int, float], Any], picks: int, blocks: int, promote: int,
                pool: BufferPool | None, t_start: float) -> dict[str, torch.Tensor]:
        """`search`'s work (its arguments; the tensors `keep` holds from `pool`)."""
        from .unit_engine import ScoringCost, UnitCost, UnitScoring

        sc = UnitScoring(model, self.data, list(units), analysis=analysis,
                         zero_skip=self.zero_skip, pool=pool, **self.options)
        idx = sc.indices
        n = len(idx)
        margin = self._search_margins(model, sc)
        ranked = np.argsort(margin, kind="stable")
        wrong_first = idx[ranked]   # then the nearest to flipping
        cut = int((margin <= 0).sum())
        spans = [p for p in [np.arange(cut), *np.array_split(np.arange(cut, n), max(1, blocks))]
                 if len(p)]
        order = [wrong_first[p] for p in spans]
        # per block, the images a unit's own tail could get wrong: those the plain forward gets
        # wrong or puts within float32 noise of the boundary (the tails sum in other orders)
        slack = MARGIN_SLACK * max(1.0, float(np.abs(margin).max(initial=0.0)))
        near = np.array([int((margin[ranked[p]] <= slack).sum()) for p in spans], dtype=np.int64)
        # the round scores these images many times, a few channels at a time: their prefix
        # (and each unit's chunk) computed once, when the memory budget allows (exact)
        prefix_kept = sc.keep(wrong_first)
        alive = {u: sc.scorers[u].alive for u in units}
        costs: dict[str, UnitCost] = {}
        state = {"prefix": prefix_kept, "scale": 1.0}

        def run(block: np.ndarray, chans: dict[str, list[int]]) -> dict[str, BlockSums]:
            sums, unit_costs, sec, got_scale = self._search_block(sc, block, chans)
            state["prefix"] += sec
            if got_scale is not None:
                state["scale"] = got_scale
            for c in unit_costs:
                if c.unit in costs:
                    costs[c.unit].add(c, same_channels=True)
                else:
                    costs[c.unit] = c
            return sums

        later = {u: _after(near) for u in units}
        found = _bound_search(run, order, alive, later, rank, n, picks, promote, near, state)
        recounted = found is None
        if recounted:
            # a unit's tail got an image wrong that the plain forward had well inside the
            # boundary: count what each unit's unablated network gets wrong, per block (the
            # engine's own counts), and search again with those
            wrong = {u: np.zeros(len(order), dtype=np.int64) for u in units}
            for t, block in enumerate(order):
                for u, got in run(block, {u: [] for u in units}).items():
                    wrong[u][t] = len(block) - got.base
            later = {u: _after(w) for u, w in wrong.items()}
            found = _bound_search(run, order, alive, later, rank, n, picks, promote, None, state)
        part, seen, lead, finished = found
        out = {}
        for u in units:
            v = torch.full((len(alive[u]),), float("nan"), dtype=torch.float64)
            exact = seen[u] == len(order)   # scored on every block
            for j in exact.nonzero().flatten().tolist():
                v[j] = _count_value(int(part[u][j]), state["scale"], n)
            out[u] = v
        full = sum(len(alive[u]) for u in units) * n
        self.last = {}
        self.last_cost = ScoringCost(images=n, prefix_macs=sc.prefix_macs,
                                     prefix_seconds=state["prefix"],
                                     seconds=time.perf_counter() - t_start,
                                     threads=torch.get_num_threads(),
                                     units=[costs[u] for u in units if u in costs])
        done = sum(c.pairs for c in self.last_cost.units)
        self.last_search = {"pairs": done, "full_pairs": full,
                            "exact": int(sum(int((~out[u].isnan()).sum()) for u in units)),
                            "channels": sum(len(alive[u]) for u in units),
                            "wrong": cut, "blocks": len(order),
                            "promoted": sum(len(finished[u]) - len(lead[u]) for u in units),
                            "recounted": int(recounted)}
        return out

    def _search_margins(self, model: nn.Module, sc: Any) -> np.ndarray:
        """The margins that order `search`'s images (`UnitScoring.margins`)."""
        return sc.margins()

    def _search_block(self, sc: Any, block: np.ndarray, chans: dict[str, list[int]]
                      ) -> tuple[dict[str, BlockSums], list[Any], float, float | None]:
        """One step of `search`: `chans` ({unit: channels}, [] for the unablated counts only)
        scored on the images `block`. Per unit its `BlockSums`; the units' `UnitCost`s; the
        prefix seconds; the metric's scale (None when no unit ran)."""
        res = sc.run(block, chans)
        sums = {u: BlockSums(filters=[int(c) for c in s.filters], base=int(s.base_counts.sum()),
                             correct=s.counts.sum(1).to(torch.int64))
                for u, s in res.items()}
        scale = next(iter(res.values())).scale if len(res) else None
        return sums, list(res.cost.units), res.cost.prefix_seconds, scale

    def base_value(self) -> float:
        """The metric's mean on the scoring images for the model last scored."""
        return next(iter(self.last.values())).base_value


def _group_weights(model: nn.Module, unit, grads: bool = False) -> list[torch.Tensor]:
    """For every parameter the unit's removal deletes, a [channels, -1] float64 view with one
    row per unit channel (producer filter rows and biases, through-module per-channel
    parameters, consumer input columns): the weights (or, with `grads`, their .grad)."""
    mods = dict(model.named_modules())
    rows: list[torch.Tensor] = []
    n = unit.num_channels

    def get(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.grad if grads else t
        return None if t is None else t.detach().to(torch.float64).cpu()

    for use in unit.uses:
        m = mods[use.module]
        pos = list(use.positions)
        if use.role in ("producer", "through"):
            for t in (get(getattr(m, "weight", None)), get(getattr(m, "bias", None))):
                if t is not None:
                    rows.append(t[pos].reshape(n, -1))
        elif use.role == "consumer":
            w = get(m.weight)
            if w is None:
                continue
            if isinstance(m, nn.Linear):
                cols = [p * use.block + j for p in pos for j in range(use.block)]
                rows.append(w[:, cols].reshape(w.shape[0], n, use.block).transpose(0, 1)
                            .reshape(n, -1))
            else:
                rows.append(w[:, pos].transpose(0, 1).reshape(n, -1))
    return rows


def _mean_normalised(v: torch.Tensor) -> torch.Tensor:
    mean = v.mean()
    return v / mean if mean > 0 else v


class Magnitude:
    """Group magnitude: for each parameter the channel's removal deletes (producers' filter
    rows and biases, BatchNorm / PReLU / depthwise parameters, consumers' input columns), the
    sum of |w|^p over the channel's entries; averaged over those parameters and divided by the
    mean over the unit's channels (the definition of Torch-Pruning's GroupMagnitudeImportance
    with group_reduction='mean', normalizer='mean'). `scope='producers'` sums the L-p norm of
    the producers' filter rows only (p = 1: Li et al.'s filter L1)."""

    rescore = False

    def __init__(self, p: int = 1, scope: str = "group") -> None:
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        if scope not in ("group", "producers"):
            raise ValueError(f"scope must be 'group' or 'producers', got {scope!r}")
        self.p, self.scope = p, scope
        self.name = f"l{p}" if scope == "group" else f"l{p}-producers"

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        mods = dict(model.named_modules())
        out = {}
        for name in units:
            unit = analysis.unit(name)
            if self.scope == "producers":
                total = torch.zeros(unit.num_channels, dtype=torch.float64)
                for use in unit.uses:
                    if use.role == "producer":
                        w = mods[use.module].weight.detach().to(torch.float64).cpu()
                        r = w[list(use.positions)].reshape(unit.num_channels, -1)
                        total += r.abs().sum(1) if self.p == 1 else r.pow(2).sum(1).sqrt()
                out[name] = total
                continue
            rows = _group_weights(model, unit)
            local = torch.stack([r.abs().pow(self.p).sum(1) for r in rows])
            out[name] = _mean_normalised(local.mean(0))
        return out


class Taylor:
    """First-order Taylor importance: for each parameter the channel's removal deletes, the sum
    of |w * dL/dw| over the channel's entries, with the gradient of the cross-entropy summed over
    `num_images` images of `data` (batches of `batch_size`); averaged over the parameters and
    mean-normalised per unit (the definition of Torch-Pruning's GroupTaylorImportance with its
    defaults). Gradients are taken anew for the model each call."""

    name = "taylor"
    rescore = False

    def __init__(self, data: DataLike, *, num_images: int | None = 256, batch_size: int = 64,
                 seed: int = 0) -> None:
        self.data, self.num_images, self.batch_size, self.seed = data, num_images, batch_size, seed

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        from .data.batches import load_batch, num_items, pick_indices

        work = copy.deepcopy(model).eval()
        work.zero_grad(set_to_none=True)
        idx = pick_indices(num_items(self.data), self.num_images, self.seed)
        for s in range(0, len(idx), self.batch_size):
            x, y = load_batch(self.data, idx[s:s + self.batch_size])
            p0 = next(work.parameters())
            loss = nn.functional.cross_entropy(work(x.to(p0.device, p0.dtype)), y.to(p0.device),
                                               reduction="sum")
            loss.backward()
        out = {}
        for name in units:
            unit = analysis.unit(name)
            w = _group_weights(work, unit)
            g = _group_weights(work, unit, grads=True)
            if len(w) != len(g):
                raise RuntimeError(f"unit {name!r}: some of its parameters got no gradient")
            local = torch.stack([(a * b).abs().sum(1) for a, b in zip(w, g, strict=True)])
            out[name] = _mean_normalised(local.mean(0))
        return out


class Random:
    """Seeded uniform values in [0, 1), drawn afresh for each call (a control)."""

    name = "random"
    rescore = False

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(int(seed))

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        return {u: torch.rand(analysis.unit(u).num_channels, generator=self.gen,
                              dtype=torch.float64) for u in units}


def get_importance(criterion: str | Importance, data: DataLike | None = None, *, seed: int = 0,
                   **car_options: Any) -> Importance:
    """An importance object from a name ('car', 'l1', 'l2', 'taylor', 'random') or an object as is."""
    if not isinstance(criterion, str):
        if not isinstance(criterion, Importance):
            raise TypeError("criterion must be 'car', 'l1', 'l2', 'taylor', 'random' or an object with "
                            f"name, rescore and __call__(model, analysis, units); got {criterion!r}")
        return criterion
    if criterion == "car":
        if data is None:
            raise ValueError("criterion 'car' needs scoring data")
        return CAR(data, seed=seed, **car_options)
    if criterion in ("l1", "l2"):
        return Magnitude(int(criterion[1]))
    if criterion == "taylor":
        if data is None:
            raise ValueError("criterion 'taylor' needs scoring data (for the gradients)")
        return Taylor(data, seed=seed, num_images=car_options.get("num_images") or 256)
    if criterion == "random":
        return Random(seed)
    raise ValueError(f"unknown criterion {criterion!r}; choose from 'car', 'l1', 'l2', 'taylor', 'random' "
                     "or pass an Importance object")


__all__ = ["CAR", "Importance", "Magnitude", "Random", "Taylor", "get_importance"]
