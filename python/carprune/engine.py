"""The CAR scoring engine: every single-filter ablation of a conv layer scored from one pass of
the network prefix per image.

Per chunk of images, the prefix (everything before the cut) runs once and the tensors live
across the cut are cached. Ablations are then evaluated in batches of m filters through the
tail only. When the cut feeds one conv (+ BatchNorm + ReLU), that conv is not recomputed per
ablation: its full pre-activation Z is computed once and the fused `ablate_conv` kernel takes
out the removed channel's contribution. When the rest of the tail is the standard residual-network
ending (residual add, ReLU, global average pool, linear; `head.find_fused_head`), the
`ablate_conv_head` kernel evaluates consumer and ending together and returns the logits, with
the unablated network as one more row. Logits become per-(ablation, class) correct counts in
the `class_correct_counts` kernel, or, for any other metric (`carprune.metrics`: top-k, NLL,
squared or absolute error of regression outputs per target bin, a per-sample function), per-
(ablation, group) sums of the per-sample values in fixed point. All sums are integers, so the
result does not depend on chunk sizes, m or the thread count (up to float rounding inside the
tail's own layers). Units are the filters of a conv layer (Conv2d, Conv1d) or the neurons of a
linear layer (on [batch, features] outputs); whole-network units (`unit_engine.UnitScorer`)
reuse this class's plan, chunks and loops.

Zero-activation savings (`zero_skip`, exact): an (image, filter) pair whose channel is all zero
at the cut cannot change that image's outputs; outside the fused ending (whose kernel skips zero
pixels itself) it takes the unablated outputs, kept per chunk, and its tail is not run.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _ops, graph, metrics
from .callbacks import log, progress_callbacks, show_progress
from .data.batches import (
    DataLike,
    class_names,
    load_batch,
    load_targets,
    num_items,
    pick_indices,
    resolve,
)
from .fold import conv_out_shape, fold_conv_bn, fuse_conv_pointwise, reads_channels_last
from .head import FusedHead, find_fused_head
from .scores import LayerScores
from .screen import Screen, check_screen

DEFAULT_MEMORY_BUDGET = 2 * 2**30
# Rows per tail/prefix call are sized so that the largest intermediate tensor of one call stays
# near this many bytes: on a 2-core CPU with a few MB of cache, ResNet-20 ran about twice as fast
# in batches of 50-100 images as in batches of 500 (see benchmarks/bench_batch_size.py).
TARGET_CALL_BYTES = 4 * 2**20
MAX_CALL_ROWS = 4096
# (ablation, image) pairs per call of the fused-head kernel: each pair costs only its logits
# (and, on CUDA, its pooled features), so calls are large and few.
MAX_HEAD_PAIRS = 2**18

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_bytes(value: int | str | None) -> int:
    """Bytes from an int or a string such as '2GiB', '512M', '1.5 GB'."""
    if value is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(value, (int, np.integer)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read a memory size from {value!r} (e.g. '2GiB', '512MB')")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return n


class BufferPool:
    """Large tensors handed out by shape, dtype, device and memory format and taken back, for a
    caller that builds the same tensors again and again (`importance.CAR.search`, once per greedy
    round: the kept prefix and each fused unit's Z). Fresh memory costs a zero-filled page per 4
    KiB on first touch: about 1 GB and 0.3-0.7 s per ResNet-20 round on 2 threads, and none of
    it when the last round's tensors are reused. What is handed out is uninitialised (callers
    overwrite it whole) and must not be used after `reclaim`."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lent: list[tuple[tuple, torch.Tensor]] = []

    def empty(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """An uninitialised tensor: one taken back earlier with the same key, else a new one."""
        key = (tuple(int(d) for d in shape), dtype, torch.device(device), memory_format)
        free = self._free.get(key)
        t = free.pop() if free else torch.empty(key[0], dtype=dtype, device=device,
                                                memory_format=memory_format)
        self._lent.append((key, t))
        return t

    def reclaim(self) -> None:
        """Takes back everything handed out since the last call, for the next requests, and
        lets go of what was free and not asked for again (so it holds one round at most)."""
        free: dict[tuple, list[torch.Tensor]] = {}
        for key, t in self._lent:
            free.setdefault(key, []).append(t)
        self._free, self._lent = free, []


# bytes of freed CPU blocks `block_cache` may hold at once (a ResNet-20 search on 1,000 images
# held at most 470 MiB; blocks freed beyond it go back to the system)
BLOCK_CACHE_LIMIT = 2 << 30


@contextlib.contextmanager
def block_cache(limit_bytes: int = BLOCK_CACHE_LIMIT) -> Iterator[None]:
    """Within the block, CPU tensors of 4 KiB or more come from a size-class cache of freed
    blocks (csrc/block_cache.cpp) instead of the C heap; on exit the previous allocator is back
    and every cached block is freed. A greedy run's rounds each allocate thousands of large
    temporaries of new sizes, and glibc's allocator slows on the fragmented heap this leaves
    (measured: its share of a late ResNet-20 round more than doubled after earlier rounds).
    Values are unchanged; tensors made inside may outlive the block (their memory then goes
    back to the system). Nested blocks share the outermost one's cache. The allocator is
    process-wide: other threads' CPU tensors use it too while it is installed.
    `CARPRUNE_BLOCK_CACHE=0` in the environment makes it a no-op."""
    if os.environ.get("CARPRUNE_BLOCK_CACHE", "1") == "0":
        yield
        return
    if limit_bytes < 0:
        raise ValueError(f"block_cache: limit_bytes must be >= 0, got {limit_bytes}")
    _ops._C.block_cache_install(int(limit_bytes))
    try:
        yield
    finally:
        _ops._C.block_cache_uninstall()


def _empty(pool: BufferPool | None, shape: Sequence[int], *, dtype: torch.dtype,
           device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
           ) -> torch.Tensor:
    """`pool.empty(...)`, or a fresh tensor without a pool."""
    if pool is not None:
        return pool.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)


def _bytes_per_row(t: object) -> int:
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        return t[0].numel() * t.element_size() if t.shape[0] else 0
    return 0


class _SizeRecorder(fx.Interpreter):
    """Runs a graph on a one-image batch, recording the largest and the total intermediate size."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.max_bytes = 0
        self.total_bytes = 0

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        b = _bytes_per_row(out)
        self.max_bytes = max(self.max_bytes, b)
        self.total_bytes += b
        return out


def _rows_for(max_bytes: int, total_bytes: int, budget: int) -> int:
    rows = TARGET_CALL_BYTES // max(1, max_bytes)
    rows = min(rows, budget // max(1, total_bytes), MAX_CALL_ROWS)
    return max(1, int(rows))


@dataclass
class _Chunk:
    labels: torch.Tensor                 # [B] class labels, or regression targets [B(, D)]
    a: torch.Tensor                      # the cut activation [B, C, H, W], removed channels zero
    z: torch.Tensor | None               # fused consumer's pre-activation [B, F, Ho, Wo]
    others: dict[str, torch.Tensor]      # other live tensors the tail needs
    groups: torch.Tensor | None = None   # [B] int64: each image's class or target bin
    # zero-activation savings (`LayerScorer.zero_skip`): alive[i, c] is False when channel c is
    # all zero for image i wherever a removal zeroes it (then removing it changes nothing);
    # base_out[i] the unablated network's output, valid where known[i]
    alive: torch.Tensor | None = None    # bool [B, channels]
    base_out: torch.Tensor | None = None  # [B, K]
    known: torch.Tensor | None = None    # bool [B]
    # a chunk of views into images offset.. of `parent` (`UnitScoring.keep`): the unablated
    # outputs it finds are stored in the parent's base_out
    parent: _Chunk | None = None
    offset: int = 0

    def base_store(self, like: torch.Tensor) -> torch.Tensor:
        """`base_out`, allocated like `like` ([rows, K]) on first use (in the parent)."""
        if self.base_out is None:
            if self.parent is not None:
                n = self.labels.shape[0]
                self.base_out = self.parent.base_store(like)[self.offset:self.offset + n]
            else:
                self.base_out = like.new_empty((self.labels.shape[0], like.shape[1]))
        return self.base_out


@dataclass
class _ScoreRun:
    """The state of one scoring pass (`LayerScorer._score_begin`)."""

    filters: list[int]
    chan: torch.Tensor       # ablation rows: [-1 (the unablated row of the fused head)] + filters
    extra: int               # 1 when row 0 is the unablated network
    need_base: bool
    active: bool             # anything to compute
    b: int                   # images per tail call
    m: int                   # ablations per tail call
    base: torch.Tensor
    totals: torch.Tensor
    rows: torch.Tensor       # int64 [len(chan), G]
    bar: object


class LayerScorer:
    """Holds one layer's cut, its cached activations and the current set of removed filters.

    `score()` scores filters on the current structure; `remove()` takes filters out, updating the
    cached activation and the consumer's pre-activation incrementally. Greedy compression reuses
    one scorer for a whole run: nothing before the cut is ever recomputed.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        data: DataLike,
        *,
        num_images: int | None = None,
        seed: int = 0,
        memory_budget: int | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        topk: int = 1,
        fused: bool = True,
        rows: int | None = None,
        progress: bool | None = None,
        classes: Sequence[str] | None = None,
        fused_head: bool = True,
        metric: str | metrics.Metric | metrics.PerSample | None = None,
        bins: int | Sequence[float] | None = None,
        zero_skip: bool = True,
        screen: str | None = None,
    ) -> None:
        self._init_run(model, data, num_images=num_images, seed=seed,
                       memory_budget=memory_budget, device=device, dtype=dtype, topk=topk,
                       progress=progress, classes=classes, metric=metric, bins=bins,
                       zero_skip=zero_skip, screen=screen)
        self.layer = layer
        gm = graph.trace(model).to(device=self.device, dtype=dtype)
        self._build_layer(gm, layer, fused=fused, fused_head=fused_head)
        self._plan(rows)
        self._chunks: list[_Chunk] | None = None
        self._base: tuple[torch.Tensor, torch.Tensor] | None = None  # (base, totals) for `removed`

    def _init_run(self, model: nn.Module, data: DataLike, *, num_images: int | None, seed: int,
                  memory_budget: int | str | None, device: torch.device | str | None,
                  dtype: torch.dtype, topk: int, progress: bool | None,
                  classes: Sequence[str] | None,
                  metric: str | metrics.Metric | metrics.PerSample | None,
                  bins: int | Sequence[float] | None, zero_skip: bool,
                  screen: str | None = None) -> None:
        """What every scorer needs besides its graphs: device, dtype, metric, budget, images."""
        self.zero_skip = bool(zero_skip)
        self._screen_kind = screen
        self.screen: Screen | None = None   # built by `_plan` once the outputs are known
        self._fold_cache: dict = {}
        self.pairs = 0        # (ablation, image) pairs scored so far
        self.pairs_run = 0    # of which evaluated (the others were all-zero channels)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        params = list(model.parameters())
        self.device = torch.device(device) if device is not None else (
            params[0].device if params else torch.device("cpu"))
        self.dtype = dtype
        self.metric = metrics.get_metric(metric, topk)
        self.topk = self.metric.topk or 1
        self._bins = bins
        self.budget = parse_bytes(memory_budget)
        if model.training:
            log.warning("%s is in train mode: it is scored in eval mode (BatchNorm running "
                        "statistics, no dropout); call model.eval() first to make that explicit",
                        type(model).__name__)
        self.progress = show_progress(progress)
        self.data = resolve(data)
        self._classes = classes
        self.indices = pick_indices(num_items(data), num_images, seed)
        self.removed: list[int] = []

    def _build_layer(self, gm: fx.GraphModule, layer: str, *, fused: bool, fused_head: bool
                     ) -> None:
        """The cut of `layer` in `gm` (traced, on the scorer's device and dtype), the prefix/tail
        split, BatchNorm folded into the private graphs, the fused consumer and ending."""
        self.cut = graph.find_cut(gm, layer)
        self.split = graph.split_at(gm, self.cut, fuse=fused)
        self.fused = self.split.fused
        # BatchNorm folded into convs inside the private prefix/tail graphs (never the cut's
        # own chain: the prefix ends at the cut, so its BN-then-ReLU is folded exactly too)
        fold_conv_bn(self.split.prefix, self._fold_cache)
        fold_conv_bn(self.split.tail, self._fold_cache)
        # the standard ending after the fused consumer, evaluated inside the ablation kernel
        self.head: FusedHead | None = find_fused_head(self.split) if fused_head else None
        if self.head is None:
            fuse_conv_pointwise(self.split.tail)
        # the fused consumer's Z in channels_last when the tail reads it (`_ops.ablate_conv`
        # then writes its output in that layout)
        self._z_format = (torch.channels_last if self.head is None and
                          reads_channels_last(self.split.tail) else torch.contiguous_format)
        self.num_filters = self.cut.num_filters
        if self.fused is not None:
            conv = self.fused.conv
            self._w = conv.weight.detach().contiguous()
            self._b = conv.bias.detach() if conv.bias is not None else None
            self._scale, self._shift = self.fused.scale_shift(self.dtype, self.device)

    # -- planning ----------------------------------------------------------------------------
    def _images(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = load_batch(self.data, idx)
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point tensors, got {x.dtype}")
        return x.to(self.device, self.dtype), y.to(self.device)

    def _plan(self, rows: int | None) -> None:
        x, y0 = self._images(self.indices[:1])
        with torch.no_grad():
            rec = _SizeRecorder(self.split.prefix)
            try:
                live = rec.run(x)
            except RuntimeError as exc:
                raise ValueError(f"images of shape {tuple(x.shape[1:])} do not fit the model "
                                 f"({str(exc).splitlines()[0]})") from exc
            for name, t in zip(self.split.live, live, strict=True):
                if not isinstance(t, torch.Tensor):
                    raise graph.CutError(
                        f"layer {self.layer!r}: the value {name!r} ({type(t).__name__}) computed "
                        "before the cut is used after it; batch-size dependent values (e.g. "
                        "x.size(0)) must be computed from tensors after the cut")
            self._check_live(live)
            self.prefix_rows = _rows_for(rec.max_bytes, rec.total_bytes, self.budget // 4)
            inputs = self._tail_inputs(self._probe_chunk(live, torch.zeros(1)), 0, 1, None)
            trec = _SizeRecorder(self.split.tail)
            try:
                logits = trec.run(*inputs)
            except RuntimeError as exc:   # e.g. a linear layer sized for other images
                raise ValueError(f"images of shape {tuple(x.shape[1:])} do not fit the model "
                                 f"after {self.layer!r} ({str(exc).splitlines()[0]})") from exc
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
            got = (f"a tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor)
                   else f"a {type(logits).__name__}")
            raise ValueError(f"the model must return logits [batch, classes], got {got} (wrap "
                             "a model with several outputs in a module that returns one)")
        self.num_outputs = int(logits.shape[1])
        kind = check_screen(self._screen_kind, dtype=self.dtype, device=self.device,
                            topk=self.metric.topk, num_outputs=self.num_outputs)
        regression = y0.is_floating_point()
        targets = load_targets(self.data, self.indices) if regression else y0
        names = [] if regression else class_names(self.data, self.num_outputs, self._classes)
        self.bound = metrics.bind(self.metric, targets, self.num_outputs, names,
                                  num_images=len(self.indices), bins=self._bins)
        if self.metric.topk is not None and self.metric.topk >= self.num_outputs:
            raise ValueError(f"metric {self.metric.name}: the model has {self.num_outputs} "
                             f"outputs, so every prediction is in the top {self.metric.topk} "
                             "and nothing could be measured; use a k below the number of classes")
        self.num_classes = self.bound.grouping.size    # groups: classes or target bins
        self.classes = list(self.bound.grouping.names)
        if self.head is not None and self.head.residual is not None:
            res = inputs[self.split.tail_inputs.index(self.head.residual)]
            if res.shape != inputs[0].shape:  # e.g. broadcast in the add: keep the tail graph
                self.head = None
        if kind is not None and self.head is None:   # (the fused ending never runs the tail)
            self.screen = Screen(self.split.tail, self.topk)
        per_pair = self.num_outputs + (self.fused.conv.out_channels if self.fused else 0)
        self.head_rows = max(1, min(MAX_HEAD_PAIRS, (self.budget // 4) // (
            per_pair * torch.empty((), dtype=self.dtype).element_size())))
        tail_row = sum(_bytes_per_row(t) for t in inputs) + trec.total_bytes
        self.rows = rows or _rows_for(max(trec.max_bytes, _bytes_per_row(inputs[0])), tail_row,
                                      self.budget // 4)
        cached = sum(_bytes_per_row(t) for t in live) + (
            _bytes_per_row(inputs[0]) if self.fused is not None else 0)
        # The budget: at most half for the cached activations (all images, or one streamed
        # chunk at a time), a quarter for one prefix or tail call's intermediates (never both at
        # once), a quarter left for the allocator's slack, the image batch and the counts.
        self.cache_all = cached * len(self.indices) <= self.budget // 2
        self.chunk_images = len(self.indices) if self.cache_all else max(
            1, (self.budget // 2) // max(1, cached))

    def _check_live(self, live: Sequence[torch.Tensor]) -> None:
        """Checks of the prefix outputs for one image (the plan's probe)."""
        if isinstance(self.cut.conv, nn.Linear) and live[0].dim() != 2:
            raise graph.CutError(
                f"layer {self.layer!r} is a Linear layer whose output here has shape "
                f"{tuple(live[0].shape)}; its neurons are scored on [batch, features] outputs "
                "only (a linear layer over a longer shape mixes a different dimension)")

    def _probe_chunk(self, live: Sequence[torch.Tensor], labels: torch.Tensor) -> _Chunk:
        return self._make_chunk(list(live), labels)

    # -- chunks ------------------------------------------------------------------------------
    def _make_chunk(self, live: list[torch.Tensor], labels: torch.Tensor,
                    pool: BufferPool | None = None) -> _Chunk:
        a = live[0]
        others = dict(zip(self.split.live[1:], live[1:], strict=True))
        if self.removed or any(t.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
                               for t in others.values()):
            # `a` is zeroed in place on removal: never through an alias (nor in a tensor
            # `score_units` shares between units)
            a = a.clone()
        if self.removed:
            a[:, self.removed] = 0
        z = None
        if self.fused is not None:
            z = self._consumer_z(a, pool)
        alive = None
        if self.zero_skip and self.head is None:
            alive = _nonzero_channels(a)
        return _Chunk(labels=labels, a=a.contiguous(), z=z, others=others, alive=alive)

    def _consumer_z(self, a: torch.Tensor, pool: BufferPool | None = None) -> torch.Tensor:
        """The fused consumer's pre-activation Z of `a` (all its images) in `_z_format`, from
        `a` in that format (oneDNN's channels_last kernels: 1.4-1.7x faster than the NCHW ones on
        ResNet-20's narrow 32 x 32 consumers at these call sizes), in calls of about
        TARGET_CALL_BYTES of output (per image 1.6-1.8x faster than one call over 1,000 images
        there, 2 threads) written into one tensor (from `pool` when given)."""
        c = self.fused.conv
        z = _empty(pool, conv_out_shape(c, a.shape), dtype=a.dtype, device=a.device,
                   memory_format=self._z_format)
        step = max(1, TARGET_CALL_BYTES // max(1, _bytes_per_row(z)))
        for s in range(0, a.shape[0], step):
            z[s:s + step] = F.conv2d(a[s:s + step].contiguous(memory_format=self._z_format),
                                     self._w, self._b, c.stride, c.padding, c.dilation)
        return z

    def _prefix_values(self, prefix: fx.GraphModule, idx: np.ndarray, rows: int | None = None,
                       channels_last: Sequence[bool] = (), pool: BufferPool | None = None
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`prefix` (a graph returning a tuple of tensors) over images `idx`, in calls of `rows`
        (default `prefix_rows`) written straight into chunk-sized tensors (no list of parts and
        no concatenation holding the chunk twice; the k-th in channels_last if 4-D and
        channels_last[k]; from `pool` when given); with the images' labels."""
        live: list[torch.Tensor] = []
        labels = []
        rows = rows or self.prefix_rows
        for s in range(0, len(idx), rows):
            x, y = self._images(idx[s:s + rows])
            try:
                outs = prefix(x)
            except RuntimeError as exc:
                raise ValueError(f"images of shape {tuple(x.shape[1:])} do not fit the model "
                                 f"({str(exc).splitlines()[0]})") from exc
            if not live:
                nhwc = list(channels_last) + [False] * (len(outs) - len(channels_last))
                live = [_empty(pool, (len(idx), *t.shape[1:]), dtype=t.dtype, device=t.device,
                               memory_format=torch.channels_last if cl and t.dim() == 4
                               else torch.contiguous_format)
                        for t, cl in zip(outs, nhwc, strict=True)]
            for dst, t in zip(live, outs, strict=True):
                dst[s:s + len(y)].copy_(t)
            labels.append(y)
            del x, outs
        return live, torch.cat(labels)

    def _chunk_from(self, live: list[torch.Tensor], y: torch.Tensor,
                    pool: BufferPool | None = None) -> _Chunk:
        """A chunk from the prefix outputs `live` (in `split.live` order) of images labelled `y`
        (its large tensors from `pool` when given)."""
        if self.bound.grouping.kind == "class" and y.numel() and (
                int(y.min()) < 0 or int(y.max()) >= self.num_outputs):
            raise ValueError(f"labels must lie in [0, {self.num_outputs}) for a model with "
                             f"{self.num_outputs} outputs, got [{int(y.min())}, {int(y.max())}]")
        chunk = self._make_chunk(live, y, pool)
        chunk.groups = self.bound.grouping.assign(y)
        return chunk

    def _compute_chunk(self, idx: np.ndarray) -> _Chunk:
        """The prefix over images `idx`, as a chunk."""
        return self._chunk_from(*self._prefix_values(self.split.prefix, idx))

    def _iter_chunks(self) -> Iterator[_Chunk]:
        if self._chunks is not None:
            yield from self._chunks
            return
        groups = [self.indices[s:s + self.chunk_images]
                  for s in range(0, len(self.indices), self.chunk_images)]
        if self.cache_all:
            with torch.no_grad():
                self._chunks = [self._compute_chunk(g) for g in groups]
            yield from self._chunks
            return
        for g in groups:
            with torch.no_grad():
                chunk = self._compute_chunk(g)
            yield chunk
            # the caller's loop variable still refers to this chunk while the next one is
            # built: empty it so that only one streamed chunk is ever held
            chunk.a = chunk.z = None
            chunk.others.clear()
            del chunk

    # -- the tail ----------------------------------------------------------------------------
    def _tail_inputs(self, ch: _Chunk, b0: int, b1: int, channels: torch.Tensor | None,
                     sel: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Tail inputs for images b0:b1 under each ablation in `channels` (None: no ablation),
        stacked ablation-major: row j * b + i is image i with channel channels[j] removed.
        `sel`: only those rows (int64 indices j * b + i, increasing)."""
        m = 1 if channels is None else int(channels.numel())
        b = b1 - b0
        a = ch.a[b0:b1]
        if sel is not None:
            jr, ir = sel // b, sel % b
        out = []
        for name in self.split.tail_inputs:
            if self.fused is not None and name == self.fused.end.name:
                c = self.fused.conv
                z = ch.z[b0:b1]
                if channels is None:
                    v = z * self._scale.view(1, -1, 1, 1) + self._shift.view(1, -1, 1, 1)
                    out.append(v.clamp_min(0) if self.fused.relu else v)
                else:
                    v = _ops.ablate_conv(a, self._w, z, self._scale, self._shift, channels,
                                         c.stride, c.padding, c.dilation, self.fused.relu)
                    v = v.view(m * b, *v.shape[2:])
                    out.append(v if sel is None else _gather_rows(v, sel))
            elif name == self.split.live[0]:
                if channels is None:
                    out.append(a)
                elif sel is None:
                    v = a.unsqueeze(0).repeat(m, *([1] * a.dim()))
                    v[torch.arange(m, device=a.device), :, channels] = 0
                    out.append(v.view(m * b, *a.shape[1:]))
                else:
                    v = a.index_select(0, ir)
                    v[torch.arange(len(sel), device=a.device), channels[jr]] = 0
                    out.append(v)
            else:
                t = ch.others[name][b0:b1]
                if channels is None or m == 1 and sel is None:
                    out.append(t)
                elif sel is None:
                    out.append(_gather_rows(t, torch.arange(m * b, device=t.device) % b))
                else:
                    out.append(_gather_rows(t, ir))
        return out

    def _run_tail(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """[rows, K]: the tail graph on stacked inputs (through the bfloat16 screen, if on)."""
        if self.screen is not None:
            return self.screen(inputs)
        out = self.split.tail(*inputs)
        return out.view(out.shape[0], -1)

    def _base_out(self, ch: _Chunk, b0: int, b1: int) -> torch.Tensor:
        """[b1 - b0, K]: the unablated network's outputs (current removals applied), kept in the
        chunk for the zero-activation savings."""
        if not self.zero_skip:
            return self._run_tail(self._tail_inputs(ch, b0, b1, None))
        if ch.known is None:
            ch.known = torch.zeros(ch.labels.shape[0], dtype=torch.bool)
        if not bool(ch.known[b0:b1].all()):
            out = self._run_tail(self._tail_inputs(ch, b0, b1, None))
            ch.base_store(out)[b0:b1] = out
            ch.known[b0:b1] = True
        return ch.base_out[b0:b1]

    def _needed(self, ch: _Chunk, b0: int, b1: int, channels: torch.Tensor) -> torch.Tensor:
        """bool [m, b1 - b0]: the (ablation, image) pairs whose channel is not all zero wherever
        the removal zeroes it (the others leave the network unchanged)."""
        return ch.alive[b0:b1][:, channels].t()

    def _logits(self, ch: _Chunk, b0: int, b1: int, channels: torch.Tensor | None
                ) -> torch.Tensor:
        """[m, b1 - b0, K]: the network's outputs for images b0:b1 under each ablation in
        `channels` (None: no ablation; with the fused head also channel -1)."""
        if self.head is not None:
            if channels is None:
                channels = torch.full((1,), -1, dtype=torch.int64, device=self.device)
            else:
                real = int((channels >= 0).sum()) * (b1 - b0)   # not the unablated row -1
                self.pairs += real
                self.pairs_run += real
            res = ch.others[self.head.residual][b0:b1] if self.head.residual is not None else None
            return self.head.logits(self.fused, ch.a[b0:b1], self._w, ch.z[b0:b1], self._scale,
                                    self._shift, channels, res)
        if channels is None:
            return self._base_out(ch, b0, b1).unsqueeze(0)
        m, b = int(channels.numel()), b1 - b0
        self.pairs += m * b
        if self.zero_skip:
            need = self._needed(ch, b0, b1, channels)
            if not bool(need.all()):
                # an all-zero channel changes nothing: those pairs keep the unablated outputs
                base = self._base_out(ch, b0, b1)
                grid = base.unsqueeze(0).repeat(m, 1, 1)
                sel = need.reshape(-1).nonzero().squeeze(1).to(self.device)
                if sel.numel():
                    self.pairs_run += int(sel.numel())
                    out = self._run_tail(self._tail_inputs(ch, b0, b1, channels, sel))
                    grid.view(m * b, -1)[sel] = out
                return grid
        self.pairs_run += m * b
        return self._run_tail(self._tail_inputs(ch, b0, b1, channels)).view(m, b, -1)

    def _correct(self, ch: _Chunk, b0: int, b1: int, channels: torch.Tensor | None) -> torch.Tensor:
        """int64 [m, G]: the metric summed per group (class or target bin) over images b0:b1
        under each ablation: correct counts for top-k (the `class_correct_counts` kernel),
        fixed-point sums otherwise (`carprune.metrics`)."""
        return self.bound.measure(self._logits(ch, b0, b1, channels), ch.labels[b0:b1],
                                  ch.groups[b0:b1])

    # -- public ------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """How an ablation is evaluated: 'head' (the `ablate_conv_head` kernel: consumer conv and
        the network's ending, logits out), 'fused' (`ablate_conv`, then the tail graph) or
        'tail' (the tail graph alone)."""
        return "head" if self.head is not None else "fused" if self.fused is not None else "tail"

    def describe(self) -> str:
        """The scoring plan, readable: the cut, how ablations are evaluated, the memory plan."""
        lines = [f"cut: {self.cut.describe()}"]
        if self.fused is not None:
            consumer = " -> ".join(str(n.target) if n.op == "call_module" else
                                   getattr(n.target, "__name__", str(n.target))
                                   for n in self.fused.nodes)
        if self.head is not None:
            lines.append(f"ablations: fused kernel ablate_conv_head: {consumer} -> "
                         f"{self.head.describe()} (logits per filter and image, no feature map)")
        elif self.fused is not None:
            lines.append(f"ablations: fused kernel ablate_conv: {consumer}, then the tail graph")
        else:
            lines.append("ablations: the tail graph, once per batch of ablated filters")
        if self.zero_skip and self.head is None:
            lines.append("zero activations: an (image, filter) pair whose channel is all zero at "
                         "the cut keeps the unablated result (tail not run)")
        lines.append(f"images: {len(self.indices)}, " + (
            "activations cached once" if self.cache_all else
            f"prefix recomputed per pass in chunks of {self.chunk_images}"))
        return "\n".join(lines)

    @property
    def alive(self) -> list[int]:
        gone = set(self.removed)
        return [f for f in range(self.num_filters) if f not in gone]

    def _check_filters(self, filters: Sequence[int]) -> list[int]:
        out = [int(f) for f in filters]
        bad = [f for f in out if not 0 <= f < self.num_filters]
        if bad:
            raise ValueError(f"filters {bad} are out of range for {self.layer!r} "
                             f"({self.num_filters} filters)")
        gone = sorted(set(out) & set(self.removed))
        if gone:
            raise ValueError(f"filters {gone} of {self.layer!r} are already removed")
        twice = sorted({f for f in out if out.count(f) > 1})
        if twice:
            raise ValueError(f"filters {twice} are listed more than once")
        return out

    def score(self, filters: Sequence[int] | None = None) -> LayerScores:
        """CAR counts for `filters` (default: every filter not yet removed)."""
        run = self._score_begin(filters)
        with torch.no_grad():
            for ch in self._iter_chunks() if run.active else ():
                self._score_chunk(run, ch)
        return self._score_end(run)

    def _batch_shape(self, nj: int) -> tuple[int, int]:
        """(images b, ablations m) per tail call for `nj` ablation rows."""
        n_img = len(self.indices)
        if self.head is not None:
            b = min(n_img, self.chunk_images, max(1, self.head_rows // max(1, nj)))
            m = max(1, min(nj, self.head_rows // b)) if nj else 1
        else:
            b = min(n_img, self.chunk_images, self.rows)
            m = max(1, min(nj, self.rows // b)) if nj else 1
        return b, m

    def _score_begin(self, filters: Sequence[int] | None) -> _ScoreRun:
        """A scoring pass over `filters`: `_score_chunk` for every chunk, then `_score_end`.
        (`score` runs it over the scorer's own chunks; `score_units` feeds every unit's scorer
        the chunks of one shared prefix pass.)"""
        filt = self.alive if filters is None else self._check_filters(filters)
        n, k = len(filt), self.num_classes
        need_base = self._base is None
        # with the fused head the unablated network is one more row of the kernel (channel -1)
        extra = [-1] if need_base and self.head is not None else []
        chan = torch.tensor(extra + filt, dtype=torch.int64, device=self.device)
        nj, n_img = len(chan), len(self.indices)
        b, m = self._batch_shape(nj)
        calls = sum(-(-min(self.chunk_images, n_img - s) // b)
                    for s in range(0, n_img, self.chunk_images)) * -(-nj // m)
        active = bool(n or need_base)
        if not active:
            calls = 0
        return _ScoreRun(filters=filt, chan=chan, extra=len(extra), need_base=need_base,
                         active=active, b=b, m=m,
                         base=torch.zeros(k, dtype=torch.int64),
                         totals=torch.zeros(k, dtype=torch.int64),
                         rows=torch.zeros(nj, k, dtype=torch.int64),
                         bar=progress_callbacks(self.progress, f"CAR {self.layer}", total=calls,
                                                unit="batch", leave=False))

    def _score_chunk(self, run: _ScoreRun, ch: _Chunk) -> None:
        """Adds one chunk's sums to `run`."""
        bsz = ch.labels.shape[0]
        nj, b, m = len(run.chan), run.b, run.m
        run.totals += torch.bincount(ch.groups.cpu(), minlength=self.num_classes)
        with torch.no_grad():
            for b0 in range(0, bsz, b):
                b1 = min(bsz, b0 + b)
                if run.need_base and not run.extra:
                    run.base += self._correct(ch, b0, b1, None)[0].cpu()
                for j0 in range(0, nj, m):
                    run.rows[j0:j0 + m] += self._correct(ch, b0, b1, run.chan[j0:j0 + m]).cpu()
                    run.bar.update(1)

    def _score_end(self, run: _ScoreRun) -> LayerScores:
        run.bar.close()
        base = run.rows[0] if run.extra else run.base
        counts = run.rows[run.extra:]
        if run.need_base:
            self._base = (base, run.totals)
        base, totals = self._base
        g = self.bound.grouping
        return LayerScores(layer=self.layer, filters=torch.tensor(run.filters, dtype=torch.int64),
                           counts=counts, base_counts=base, class_totals=totals,
                           classes=self.classes, topk=self.topk, removed=list(self.removed),
                           metric=self.metric.name, higher_is_better=self.metric.higher_is_better,
                           scale=self.metric.scale, grouping=g.kind,
                           bin_edges=list(g.edges) if g.edges is not None else None)

    def remove(self, filters: Sequence[int]) -> None:
        """Remove filters for all later scoring: their channels are zeroed at the cut and their
        contribution is subtracted from the consumer's cached pre-activation."""
        filt = self._check_filters(filters)
        self._base = None
        if self._chunks is not None:
            with torch.no_grad():
                for ch in self._chunks:
                    for s in filt:
                        if ch.z is not None:
                            c = self.fused.conv
                            one = torch.ones_like(self._scale)
                            sel = torch.tensor([s], dtype=torch.int64, device=self.device)
                            ch.z = _ops.ablate_conv(ch.a, self._w, ch.z, one, torch.zeros_like(one),
                                                    sel, c.stride, c.padding, c.dilation, False)[0]
                        ch.a[:, s] = 0
                    ch.known = None
        self.removed.extend(filt)


def _gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows] along dim 0, in t's memory format (index_select returns a channels_last tensor
    in NCHW, which a oneDNN tail would then convert back: two copies instead of one)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        return t[rows]
    return t.index_select(0, rows)


def _nonzero_channels(v: torch.Tensor, positions: torch.Tensor | None = None, block: int = 1
                      ) -> torch.Tensor:
    """bool [N, len(positions)]: whether channel positions[c] (default: every channel) of `v`
    ([N, C, ...], or [N, C * block] for a flattened tensor) has a nonzero value, per image."""
    n = v.shape[0]
    v = v.reshape(n, v.shape[1] // block, -1)
    if positions is not None:
        v = v.index_select(1, positions)
    return (v != 0).any(-1)


def score_layer(
    model: nn.Module,
    layer: str,
    data: DataLike,
    *,
    num_images: int | None = None,
    seed: int = 0,
    filters: Sequence[int] | None = None,
    removed: Sequence[int] = (),
    memory_budget: int | str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    topk: int = 1,
    fused: bool = True,
    rows: int | None = None,
    progress: bool | None = None,
    classes: Sequence[str] | None = None,
    metric: str | metrics.Metric | metrics.PerSample | None = None,
    bins: int | Sequence[float] | None = None,
    zero_skip: bool = True,
    screen: str | None = None,
) -> LayerScores:
    """CAR (and class-wise CAR_c) of every filter of conv `layer` (or neuron of linear `layer`)
    of `model` on `data`; with `metric`, the importance under that metric instead.

    `metric`: 'top1' (default, or top-`topk`), 'top5'/'topK', 'nll', and for regression targets
    (floating point) 'mse'/'mae' (RAR), or a per-sample function fn(outputs, targets) -> [B]
    (error-like unless it has `higher_is_better = True`; see `carprune.metrics.custom`).
    Importance is how much worse the mean metric gets without the unit (`LayerScores.importance`,
    per class or target bin `importance_c`); regression targets are grouped into `bins` (a
    number of quantile bins of the scored targets, default 10, or the bin edges).
    `num_images` takes a seeded random subset; `removed` filters count as already gone;
    `memory_budget` (bytes or '2GiB') bounds the cached activations and each tail batch.
    `data` is any `carprune.data.batches.DataLike` (a Dataset, Subset, DataLoader, or an
    (images, labels) pair of tensors or numpy arrays); `classes` names the classes when the data
    does not. `zero_skip`: an (image, filter) pair whose channel is all zero at the cut leaves
    the network unchanged and is counted as the unablated result without running the tail
    (exact; the fused ending skips zero pixels inside its kernel instead). `screen='bf16'`: run
    the tail in bfloat16 and again in float32 only where a row's top-k verdict is in doubt
    (`carprune.screen`; faster on CPUs with AMX, a measured bound rather than an exact one, so
    off by default).
    """
    scorer = LayerScorer(model, layer, data, num_images=num_images, seed=seed,
                         memory_budget=memory_budget, device=device, dtype=dtype, topk=topk,
                         fused=fused, rows=rows, progress=progress, classes=classes,
                         metric=metric, bins=bins, zero_skip=zero_skip, screen=screen)
    if removed:
        scorer.remove(removed)
    return scorer.score(filters)
