"""Scoring across processes: `torchrun --nproc_per_node N -m carprune score|compress ...`.

Each rank holds the whole model and the same images (same seed, same subset), and scores a
contiguous share of the filters; the int64 correct counts are all-gathered, so the LayerScores
is the one a single process computes (counts are integers and a filter's count does not depend
on which other filters share its batch). Base counts need no exchange, every rank computes them;
they are gathered anyway and compared, so ranks that were given different data fail loudly
instead of producing a silently wrong ranking. Removals are applied on every rank from the
gathered (identical) scores, so all ranks stay in lockstep through a greedy compression. Float
metrics are integer fixed-point sums too (`carprune.metrics`), exchanged the same way.

Preemption: a scheduler signals every rank, but not at the same instant. A rank stopping one
step before another would leave the other blocked in a collective forever, so with several
ranks the signal handler only records the signal, and at each step boundary the ranks agree
(`sync_stop`, an all-reduce of the flags) before any of them stops. The algorithms ask at their
step boundaries through `carprune.callbacks` (`should_stop`), which the run layer's
`logging_utils.RunCallbacks` answers with `sync_stop`.

Whole-network compression (`global_mode.compress_global`) shards its unit scoring the same way
with `ShardedCAR`: each rank scores whole units (balanced by channels x tail cost) and the integer
sums are all-gathered, so every rank ranks the same numbers one process computes.

Only rank 0 writes outputs and checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import graph, preempt
from .cost import count_cost
from .engine import LayerScorer
from .importance import CAR, BlockSums
from .scores import LayerScores
from .units import UnitAnalysis


@dataclass
class Context:
    """Where this process sits: rank, world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (e.g. decodes data into the cache), then the others."""
        if self.is_main:
            try:
                yield
            finally:
                self.barrier()
        else:
            self.barrier()
            yield

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def pick_device(device: str | None, local_rank: int = 0) -> torch.device:
    """'auto' (or None): this rank's GPU if there is one, else the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if d.index is None:
            d = torch.device("cuda", local_rank % torch.cuda.device_count())
    return d


def init_from_env(device: str | None = "auto", timeout_s: float | None = None) -> Context:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU);
    without WORLD_SIZE > 1 (a plain run) return a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world <= 1:
        return Context(device=dev)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        kwargs: dict[str, Any] = {"backend": backend}
        if timeout_s is not None:
            from datetime import timedelta

            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        owns = True
    else:
        backend = dist.get_backend()
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                   device=dev, backend=backend, owns_group=owns)


def shard(items: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous share of `items` (sizes differ by at most one, earlier ranks
    larger), so gathering the shares in rank order restores the original order."""
    n = len(items)
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return list(items[start:start + q + (1 if rank < r else 0)])


# -- preemption agreement ------------------------------------------------------------------------
_pending = threading.Event()
_pending_name: list[str] = []


def install_signal_handlers(ctx: Context) -> None:
    """One process: `preempt`'s handlers (stop at the next step). Several: record the signal
    only; `sync_stop` turns it into a stop on every rank at the same step boundary."""
    if ctx.world_size <= 1:
        preempt.install_signal_handlers()
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and _pending.is_set():
            raise KeyboardInterrupt
        _pending_name[:] = [signal.Signals(signum).name]
        _pending.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def sync_stop(ctx: Context) -> bool:
    """Whether any rank was asked to stop; if so, request the stop on this rank too. Every rank
    must call this at the same point (it is a collective)."""
    if ctx.active:
        flag = torch.tensor([1 if _pending.is_set() else 0], dtype=torch.int32, device=_comm_device(ctx))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and not preempt.stop_requested():
            preempt.request_stop(_pending_name[0] if _pending_name else "a signal to another rank")
    return preempt.stop_requested()


def clear_stop() -> None:
    _pending.clear()
    _pending_name.clear()
    preempt.clear()


def _comm_device(ctx: Context) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


# -- sharded scoring -----------------------------------------------------------------------------
class ShardedScorer(LayerScorer):
    """A `LayerScorer` whose `score()` is split across the ranks of `ctx`: each rank scores a
    contiguous share of the filters, and the integer sums are all-gathered, so every rank returns
    exactly the LayerScores one process computes. Everything else (removals, base sums, the
    plan) is the LayerScorer's own, on every rank.

    Greedy compression takes it as its scorer: ``compress_layer(..., scorer_factory=
    functools.partial(ShardedScorer, ctx=ctx))``. Without an active process group (one process)
    it is a plain LayerScorer.
    """

    def __init__(self, *args: Any, ctx: Context | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctx = ctx or Context()

    def score(self, filters: Sequence[int] | None = None) -> LayerScores:
        ctx = self.ctx
        filt = self.alive if filters is None else [int(f) for f in filters]
        if not ctx.active or not filt:
            return super().score(filt)
        # check the whole list on every rank: a bad filter in one rank's share alone would fail
        # that rank and leave the others waiting in the gather
        self._check_filters(filt)
        mine = shard(filt, ctx.rank, ctx.world_size)
        s = super().score(mine)
        k = s.num_classes
        rows = -(-len(filt) // ctx.world_size)  # the largest share
        dev = _comm_device(ctx)
        # one message per rank: its counts padded to `rows`, then its base counts
        buf = torch.zeros(rows + 1, k, dtype=torch.int64, device=dev)
        buf[:len(mine)] = s.counts.to(dev)
        buf[rows] = s.base_counts.to(dev)
        parts = [torch.empty_like(buf) for _ in range(ctx.world_size)]
        dist.all_gather(parts, buf)
        parts = [p.cpu() for p in parts]
        for r, p in enumerate(parts):
            if not torch.equal(p[rows], s.base_counts):
                raise RuntimeError(
                    f"rank {r} computed base counts {p[rows].tolist()} but rank {ctx.rank} "
                    f"{s.base_counts.tolist()}: the ranks score different images or models "
                    "(same seed, data and weights on every rank are required)")
        counts = torch.cat([p[:len(shard(filt, r, ctx.world_size))] for r, p in enumerate(parts)])
        # every other field (metric, scale, groups) is the same on every rank
        return dataclasses.replace(s, filters=torch.tensor(filt, dtype=torch.int64), counts=counts,
                                   removed=list(s.removed))


# -- sharded unit scoring (whole-network compression) --------------------------------------------
def unit_weights(analysis: UnitAnalysis, units: Sequence[str]) -> list[int]:
    """Per unit, the work of scoring it: channels x the multiply-accumulates per image of every
    conv and linear layer downstream of its mask sites (the tail each ablation runs), at least 1."""
    macs = {lay.name: lay.flops for lay in count_cost(analysis.gm, analysis.input_shape).layers}
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    out = []
    for name in units:
        u = analysis.unit(name)
        tail: set[Any] = set()
        for site in u.mask:
            tail |= graph.reachable(nodes[site.node])
        tail_macs = sum(macs.get(str(n.target), 0) for n in tail if n.op == "call_module")
        out.append(u.num_channels * max(1, tail_macs))
    return out


def assign_units(weights: Sequence[int], world_size: int) -> list[int]:
    """The rank that scores each unit: heaviest first, each to the least loaded rank (ties: the
    lower rank), so the ranks' shares of `weights` are balanced. Deterministic: every rank
    computes the same assignment from the same weights."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owner = [0] * len(weights)
    load = [0] * world_size
    for i in sorted(range(len(weights)), key=lambda i: (-int(weights[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += int(weights[i])
    return owner


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(v.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_SHARED_FIELDS = ("class_totals", "classes", "topk", "metric", "higher_is_better", "scale",
                  "grouping", "bin_edges")


class ShardedCAR(CAR):
    """`importance.CAR` with its unit scoring split across the ranks of `ctx` (torchrun).

    Each rank scores whole units with `unit_engine.score_units` (every rank holds the whole
    model and the same images): the units are assigned by `assign_units` on `unit_weights`
    (channels x tail cost). The int64 sums of every unit (per channel and base) are then
    all-gathered, so every rank returns, and keeps in `last`, exactly the `LayerScores` one
    process computes (integer sums; a unit's sums do not depend on which other units are scored
    with it). `last_cost` merges the ranks' `ScoringCost`: every unit's pairs and MACs; the
    prefix and total seconds are the slowest rank's. The ranks first compare a digest of the model
    and the images' class totals and fail loudly when they differ. Every rank must call it with
    the same arguments (it is a collective). Without an active process group it is `CAR`.

    `search` (`CAR.search`, the exact bound search) is split too, step by step: every step's
    channels in contiguous shares across the ranks, the int64 sums all-reduced, rank 0's image
    order on every rank; so every rank makes one process's choices with one process's work
    figures (pairs scored, pairs run), only the seconds differ.
    """

    def __init__(self, data: Any, *, ctx: Context | None = None, **options: Any) -> None:
        super().__init__(data, **options)
        self.ctx = ctx or Context()

    def _search_margins(self, model: nn.Module, sc: Any) -> np.ndarray:
        """Rank 0's margins, on every rank (the block order must be the same everywhere, and
        float margins from other thread counts may differ in the last bit); first the ranks
        compare the weights digest and the scoring images, and fail loudly when they differ."""
        if not self.ctx.active:
            return super()._search_margins(model, sc)
        own = {"digest": state_digest(model), "indices": [int(i) for i in sc.indices],
               "margins": super()._search_margins(model, sc).tolist()}
        box: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(box, own)
        for r, m in enumerate(box):
            if m["digest"] != box[0]["digest"] or m["indices"] != box[0]["indices"]:
                raise RuntimeError(
                    f"rank {r} scores another model or other images than rank 0 (weights digest "
                    "or scoring image indices differ): the same seed, data and weights on every "
                    "rank are required")
        return np.asarray(box[0]["margins"], dtype=np.float64)

    def _search_block(self, sc: Any, block: np.ndarray, chans: dict[str, list[int]]
                      ) -> tuple[dict[str, BlockSums], list[Any], float, float | None]:
        """`CAR._search_block` split across the ranks: each unit's channels in contiguous
        shares, one per rank (a unit asked for its unablated counts only goes to one rank,
        round robin); the int64 sums are all-reduced and the costs all-gathered, so every rank
        gets exactly one process's sums, and the pairs of the whole step."""
        ctx = self.ctx
        if not ctx.active:
            return super()._search_block(sc, block, chans)
        from .unit_engine import UnitCost

        world, me = ctx.world_size, ctx.rank
        mine: dict[str, list[int]] = {}   # this rank's share of every unit
        first: dict[str, int] = {}        # where that share starts in chans[u]
        base_rank: dict[str, int] = {}    # the rank that reports the unit's unablated count
        for i, (u, cs) in enumerate(chans.items()):
            # np.array_split's shares: the first ones are the larger, so rank 0 always has one
            bounds = np.cumsum([0] + [len(cs) // world + (r < len(cs) % world)
                                      for r in range(world)])
            base_rank[u] = 0 if cs else i % world
            if cs and bounds[me + 1] > bounds[me]:
                mine[u] = [int(c) for c in cs[bounds[me]:bounds[me + 1]]]
                first[u] = int(bounds[me])
            elif base_rank[u] == me:
                mine[u], first[u] = [], 0
        sums, costs, prefix_s, scale = (super()._search_block(sc, block, mine) if mine
                                        else ({}, [], 0.0, None))
        # one int64 vector: per unit of `chans`, its unablated count then its channels' counts
        at, total = {}, 0
        for u, cs in chans.items():
            at[u] = total
            total += 1 + len(cs)
        vec = torch.zeros(total, dtype=torch.int64)
        for u, got in sums.items():
            if base_rank[u] == me:
                vec[at[u]] = got.base
            start = at[u] + 1 + first[u]
            vec[start:start + len(got.filters)] = got.correct
        dev = _comm_device(ctx)
        vec = vec.to(dev)
        dist.all_reduce(vec)
        vec = vec.cpu()
        box: list[Any] = [None] * world
        dist.all_gather_object(box, {"costs": [dataclasses.asdict(c) for c in costs],
                                     "prefix": prefix_s, "scale": scale})
        merged: dict[str, UnitCost] = {}
        for m in box:
            for d in m["costs"]:
                c = UnitCost(**d)
                if c.unit in merged:
                    merged[c.unit].add(c, same_channels=False)
                else:
                    merged[c.unit] = c
        scales = [m["scale"] for m in box if m["scale"] is not None]
        out = {u: BlockSums(filters=[int(c) for c in cs], base=int(vec[at[u]]),
                            correct=vec[at[u] + 1:at[u] + 1 + len(cs)].clone())
               for u, cs in chans.items()}
        return (out, [merged[u] for u in chans if u in merged],
                max(m["prefix"] for m in box), scales[0] if scales else None)

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        ctx = self.ctx
        names = [analysis.unit(u).name for u in units]
        if not ctx.active or not names:
            return super().__call__(model, analysis, names)
        from .unit_engine import ScoringCost, UnitCost, score_units

        owner = assign_units(unit_weights(analysis, names), ctx.world_size)
        mine = [u for u, r in zip(names, owner, strict=True) if r == ctx.rank]
        got = (score_units(model, self.data, mine, analysis=analysis, progress=False,
                           **self.options) if mine else None)
        shared = None
        if got is not None:
            first = got[mine[0]]
            shared = {f: getattr(first, f) for f in _SHARED_FIELDS}
            shared["class_totals"] = first.class_totals.tolist()
        msg = {"digest": state_digest(model), "shared": shared,
               "units": {u: {"filters": got[u].filters.tolist(), "removed": list(got[u].removed)}
                         for u in mine},
               "cost": None if got is None else {
                   **{k: v for k, v in dataclasses.asdict(got.cost).items() if k != "units"},
                   "units": [dataclasses.asdict(c) for c in got.cost.units]}}
        box: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(box, msg)
        ref = next(m for m in box if m["shared"] is not None)
        for r, m in enumerate(box):
            if m["digest"] != box[0]["digest"] or (m["shared"] is not None
                                                   and m["shared"] != ref["shared"]):
                raise RuntimeError(
                    f"rank {r} scores another model or other images than rank 0 (weights digest "
                    f"or class totals differ): the same seed, data and weights on every rank are "
                    "required")
        k = len(ref["shared"]["classes"])
        rows = [sum(len(m["units"][u]["filters"]) + 1 for u in m["units"]) for m in box]
        dev = _comm_device(ctx)
        # one message per rank: per unit of its share, the channels' sums then the base sums
        buf = torch.zeros(max(rows), k, dtype=torch.int64, device=dev)
        at = 0
        for u in mine:
            s = got[u]
            n = len(s.filters)
            buf[at:at + n] = s.counts.to(dev)
            buf[at + n] = s.base_counts.to(dev)
            at += n + 1
        parts = [torch.empty_like(buf) for _ in range(ctx.world_size)]
        dist.all_gather(parts, buf)
        sh = dict(ref["shared"])
        sh["class_totals"] = torch.tensor(sh["class_totals"], dtype=torch.int64)
        scores: dict[str, LayerScores] = {}
        unit_costs: dict[str, Any] = {}
        for m, p in zip(box, parts, strict=True):
            p = p.cpu()
            at = 0
            for u, info in m["units"].items():
                n = len(info["filters"])
                scores[u] = LayerScores(layer=u, filters=torch.tensor(info["filters"],
                                                                      dtype=torch.int64),
                                        counts=p[at:at + n].clone(), base_counts=p[at + n].clone(),
                                        removed=list(info["removed"]), **sh)
                at += n + 1
            for c in (m["cost"] or {}).get("units", []):
                unit_costs[c["unit"]] = UnitCost(**c)
        costs = [m["cost"] for m in box if m["cost"] is not None]
        self.last_cost = ScoringCost(
            images=costs[0]["images"], prefix_macs=max(c["prefix_macs"] for c in costs),
            prefix_seconds=max(c["prefix_seconds"] for c in costs),
            seconds=max(c["seconds"] for c in costs), threads=costs[0]["threads"],
            units=[unit_costs[u] for u in names])
        self.last = {u: scores[u] for u in names}
        return {u: s.importance.to(torch.float64) for u, s in self.last.items()}
