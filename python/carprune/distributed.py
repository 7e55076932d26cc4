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
(all-reduce of the flags) before any of them stops.

Only rank 0 writes outputs and checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import preempt
from .scores import LayerScores


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


# -- the scorer wrapper --------------------------------------------------------------------------
class DistributedScorer:
    """A LayerScorer whose `score()` is split across ranks; everything else is delegated.

    Pass it as ``compress_layer(..., scorer_wrapper=lambda s: DistributedScorer(s, ctx))``. Not
    initialised or one rank: it calls the scorer directly. `remove()` also agrees on preemption
    across ranks (see the module docstring): greedy compression calls it once per step on every
    rank, just before writing its checkpoint and checking for a stop.
    """

    def __init__(self, scorer: Any, ctx: Context | None = None) -> None:
        self._scorer = scorer
        self._ctx = ctx or Context()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scorer, name)

    @property
    def scorer(self) -> Any:
        return self._scorer

    def score(self, filters: Sequence[int] | None = None) -> LayerScores:
        ctx = self._ctx
        filt = list(self._scorer.alive) if filters is None else [int(f) for f in filters]
        if not ctx.active or not filt:
            return self._scorer.score(filt)
        # check the whole list on every rank: a bad filter in one rank's share alone would fail
        # that rank and leave the others waiting in the gather
        bad = [f for f in filt if not 0 <= f < self._scorer.num_filters]
        if bad:
            raise ValueError(f"filters {bad} are out of range for {self._scorer.layer!r} "
                             f"({self._scorer.num_filters} filters)")
        gone = sorted(set(filt) & set(self._scorer.removed))
        if gone:
            raise ValueError(f"filters {gone} of {self._scorer.layer!r} are already removed")
        mine = shard(filt, ctx.rank, ctx.world_size)
        s = self._scorer.score(mine)
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

    def remove(self, filters: Sequence[int]) -> None:
        self._scorer.remove(filters)
        sync_stop(self._ctx)
