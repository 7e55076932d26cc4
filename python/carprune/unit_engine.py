"""Exact scoring of whole-network units through the engine (`units.Unit`).

Removing channel i of a unit is zeroing position `positions[i]` at every site of `Unit.mask`
(the tensors its consumers read; `units.masked_forward` is the reference). `UnitScorer` scores
every channel of one unit that way, with the engine's plan:

* the PREFIX is everything that is not downstream of any mask site: it runs once per image and
  its outputs that the rest still needs (the live tensors) are cached, as `LayerScorer` does;
* the TAIL is everything downstream of a site. It runs once per batch of ablations, rows
  ablation-major as in `LayerScorer`; at each site (a cached one or one computed inside the
  tail) a mask input zeroes each row's ablated channel (and the unit's removed channels);
* a plain filter (or neuron) unit whose single site is exactly `graph.find_cut(gm, producer)`
  with positions 0..n-1 and a fusable consumer IS a layer: it takes `LayerScorer`'s fused
  `ablate_conv` / `ablate_conv_head` paths (same object, same loops);
* zero-activation savings (`zero_skip`, exact): an (image, channel) pair whose channel is all
  zero at every site in the unablated network cannot change that image's outputs; it counts as
  the unablated result and its tail is not run. Sites in the prefix are checked on the cached
  tensors, sites in the tail on the unablated pass (which the base counts need anyway).

Channels of OTHER units already removed (the state of a global run) are passed as `removed`
({unit: channels}) and zeroed at their sites for good, in the prefix or the tail as they fall;
the unit's own removed channels stay zero in every row. Scoring the physically pruned model
(`surgery.prune_units`) with its own `units.prunable_units` analysis is the same computation on
smaller tensors, and needs nothing from here: pass that model.

`score_units` scores many units of one network on the same images with ONE prefix pass per chunk
of images: the network runs once, every tensor any unit's tail needs is kept for that chunk,
and each unit's scorer takes its own live tensors from it. It reports the cost model
(`ScoringCost`): per unit, (image, ablation) pairs x tail multiply-accumulates, and seconds.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from . import graph, metrics
from .callbacks import Callbacks, Event, progress_callbacks
from .cost import CostReport, count_cost
from .cost import gemm_gflops as gemm_measured
from .data.batches import DataLike, load_batch, num_items, resolve
from .engine import (
    BufferPool,
    LayerScorer,
    _bytes_per_row,
    _Chunk,
    _gather_rows,
    _nonzero_channels,
    _rows_for,
    _SizeRecorder,
    parse_bytes,
)
from .fold import fold_conv_bn, fuse_conv_pointwise, reads_channels_last
from .io import read_json, write_json
from .scores import LayerScores
from .units import Site, Unit, UnitAnalysis, prunable_units

# fp32 GEMM throughput on 2 threads that issue 12 quotes for the project's machines; the
# machines measured since are faster (`cost.gemm_gflops`: 400-430 GFLOP/s at 1024^3 on 2 idle
# threads), so `ScoringCost.describe` compares with a measurement by default.
REFERENCE_GEMM_GFLOPS = 98.0


# -- masks inside the private graphs -----------------------------------------------------------
class _ZeroChannels(nn.Module):
    """Zeroes fixed channel positions of its input (removed channels of other units)."""

    carprune_leaf = True

    def __init__(self, positions: Sequence[int], width: int) -> None:
        super().__init__()
        self.width = int(width)
        self.register_buffer("index", torch.tensor(sorted(set(int(p) for p in positions)),
                                                   dtype=torch.int64))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[1] == self.width:   # in v's own memory format (channels_last stays so)
            return v.index_fill(1, self.index, 0)
        n = v.shape[0]
        return v.reshape(n, self.width, -1).index_fill(1, self.index, 0).reshape(v.shape)


def _mask_channels(v: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """`v` ([R, C, ...], or [R, C * block]) with channel c of row r zeroed where drop[r, c]
    (in v's own memory format). A product with the 0/1 keep mask: the same values as writing
    zeros wherever v is finite (a zeroed channel then feeds the next layer +-0, which adds
    nothing), and 3.3x faster than torch.where on ResNet-20's channels_last maps (measured
    [64, 16, 32, 32], 2 threads; an out-of-place masked_fill also returns NCHW)."""
    r, c = drop.shape
    keep = (~drop).to(v.dtype)
    if v.shape[1] == c:
        return v * keep.view(r, c, *([1] * (v.dim() - 2)))
    return (v.reshape(r, c, -1) * keep.unsqueeze(-1)).reshape(v.shape)


def _module_name(unit: str, site: str) -> str:
    return "carprune_removed__" + "".join(ch if ch.isalnum() else "_" for ch in f"{unit}__{site}")


def _site_width(analysis: UnitAnalysis, site: Site) -> int:
    """Channels of the tensor at `site` (for a flattened one, before flattening)."""
    tm = analysis._node(site.node).meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape") or len(tm.shape) < 2:
        raise ValueError(f"the analysis has no shape for node {site.node!r}")
    return int(tm.shape[1]) // site.block


def _check_removed(analysis: UnitAnalysis, removed: Mapping[str, Sequence[int]] | None
                   ) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, idx in (removed or {}).items():
        unit = analysis.unit(name)
        chans = sorted(set(int(i) for i in idx))
        bad = [i for i in chans if not 0 <= i < unit.num_channels]
        if bad:
            raise ValueError(f"removed: channels {bad} are out of range for unit {name!r} "
                             f"({unit.num_channels} channels)")
        if len(chans) >= unit.num_channels:
            raise ValueError(f"removed: every channel of unit {name!r} is removed "
                             f"({unit.num_channels}); a unit keeps at least one channel")
        if chans:
            out[unit.name] = chans
    return out


def _insert_removed(gm: fx.GraphModule, analysis: UnitAnalysis,
                    removed: Mapping[str, Sequence[int]], skip: str | None = None) -> None:
    """Zero the `removed` channels ({unit: channels}, unit `skip` excepted) at their units'
    sites in `gm`, in place: each site node's users read a `_ZeroChannels` node instead."""
    nodes = {n.name: n for n in gm.graph.nodes}
    ref = next(iter(gm.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    for name, chans in removed.items():
        if name == skip:
            continue
        unit = analysis.unit(name)
        for site in unit.mask:
            node = nodes[site.node]
            mod = _ZeroChannels([site.positions[i] for i in chans], _site_width(analysis, site))
            target = _module_name(unit.name, site.node)
            gm.add_submodule(target, mod.to(device))
            with gm.graph.inserting_after(node):
                z = gm.graph.call_module(target, (node,))
            node.replace_all_uses_with(z, delete_user_cb=lambda u, z=z: u is not z)
    gm.graph.lint()
    gm.recompile()


def trace_for_units(model: nn.Module, analysis: UnitAnalysis) -> fx.GraphModule:
    """`graph.trace(model)`, checked against `analysis` (every unit's sites are nodes of it)."""
    gm = graph.trace(model)
    names = {n.name for n in gm.graph.nodes}
    missing = sorted({s.node for u in analysis.units for s in u.mask} - names)
    if missing:
        raise ValueError(f"the analysis does not belong to this {type(model).__name__}: its "
                         f"sites {missing[:5]} are not nodes of the model's graph (run "
                         "carprune.prunable_units on this model)")
    return gm


# -- the unit's split --------------------------------------------------------------------------
@dataclass
class _SiteInfo:
    node: str
    positions: torch.Tensor   # int64 [channels]: the unit's channel i sits at positions[i]
    width: int                # channels of the tensor there
    block: int
    in_prefix: bool


@dataclass
class UnitSplit:
    """A network cut at a unit's mask sites: ``prefix(x) -> live``; ``tail(*live, *drops) ->
    outputs`` with drops[k] a bool [rows, width_k] mask of the channels zeroed at site k per row;
    ``probe`` is the tail that also returns the unmasked values of the sites inside it."""

    prefix: fx.GraphModule
    tail: fx.GraphModule
    probe: fx.GraphModule
    live: list[str]
    tail_inputs: list[str]
    sites: list[_SiteInfo]
    tail_modules: list[str]   # modules called in the tail (the cost model)
    fused: None = None


def split_unit(gm: fx.GraphModule, sites: Sequence[Site], widths: Sequence[int],
               device: torch.device, fold_cache: dict | None = None) -> UnitSplit:
    """Cut `gm` at `sites` (see the module docstring; `widths`: channels of each site's
    tensor); BatchNorm folded in the private graphs (sharing `fold_cache`)."""
    order = list(gm.graph.nodes)
    by_name = {n.name: n for n in order}
    site_nodes = [by_name[s.node] for s in sites]
    desc: set[fx.Node] = set()
    for n in site_nodes:
        desc |= graph.reachable(n)
    out_node = next(n for n in order if n.op == "output")
    placeholders = [n for n in order if n.op == "placeholder"]
    prefix_nodes = [n for n in order
                    if n not in desc and n.op not in ("placeholder", "output", "get_attr")]
    before = set(prefix_nodes) | set(placeholders)
    live = [n for n in order if n in before and any(u in desc for u in n.users)]
    tail_nodes = [n for n in order if n in desc and n.op != "output"]
    # sites holding the unit at the same positions share one tensor (and one mask per call)
    pos: dict[tuple, torch.Tensor] = {}
    infos = [_SiteInfo(s.node, pos.setdefault((w, s.positions), torch.tensor(
                 s.positions, dtype=torch.int64, device=device)), w, s.block,
                       by_name[s.node] not in desc)
             for s, w in zip(sites, widths, strict=True)]
    prefix = graph._subgraph(gm, placeholders, prefix_nodes, live, placeholders_from_inputs=False)

    def tail_graph(probe: bool) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in live:
            env[n] = g.placeholder(n.name)
        drops = {n: g.placeholder(f"carprune_drop_{k}") for k, n in enumerate(site_nodes)}
        raw: list[fx.Node] = []
        for n in live:
            if n in drops:
                env[n] = g.call_function(_mask_channels, (env[n], drops[n]))
        for n in tail_nodes:
            for a in n.all_input_nodes:
                if a not in env and a.op == "get_attr":
                    env[a] = g.node_copy(a, env.__getitem__)
            v = g.node_copy(n, env.__getitem__)
            if n in drops:
                raw.append(v)
                v = g.call_function(_mask_channels, (v, drops[n]))
            env[n] = v
        result = fx.map_arg(out_node.args[0], env.__getitem__)
        g.output((result, *raw) if probe else result)
        sub = fx.GraphModule(gm, g)
        sub.graph.eliminate_dead_code()
        sub.recompile()
        return fuse_conv_pointwise(fold_conv_bn(sub, fold_cache))

    fold_conv_bn(prefix, fold_cache)
    tail, probe = tail_graph(False), tail_graph(True)
    tail_modules = list(dict.fromkeys(str(n.target) for n in tail_nodes if n.op == "call_module"))
    return UnitSplit(prefix=prefix, tail=tail, probe=probe, live=[n.name for n in live],
                     tail_inputs=[n.name for n in live] +
                     [f"carprune_drop_{k}" for k in range(len(site_nodes))],
                     sites=infos, tail_modules=tail_modules)


def _plain_layer(gm: fx.GraphModule, unit: Unit) -> str | None:
    """The producer of `unit` when scoring it is scoring that layer's filters (one site: the
    layer's cut, positions 0..n-1) and the layer has a fusable consumer; else None."""
    if unit.kind not in ("filter", "neuron") or len(unit.producers) != 1 or len(unit.mask) != 1:
        return None
    site = unit.mask[0]
    if site.block != 1 or site.positions != tuple(range(unit.num_channels)):
        return None
    try:
        cut = graph.find_cut(gm, unit.producers[0])
    except graph.CutError:
        return None
    if cut.node.name != site.node or cut.num_filters != unit.num_channels:
        return None
    return unit.producers[0] if graph.find_fused_consumer(gm, cut) is not None else None


# -- the scorer --------------------------------------------------------------------------------
class UnitScorer(LayerScorer):
    """Scores the channels of one unit (`units.Unit`) of `model` on `data`, exactly.

    `unit`: a unit name of `analysis` (default: `units.prunable_units(model, <first image>)`)
    or a `Unit`. `removed`: {unit name: channels} already removed in the network (other units
    are zeroed at their sites for good; the unit's own channels as `remove` does). `fused`:
    let a plain filter unit take the layer's fused kernels (else every unit takes the masked
    tail). `zero_skip`: the exact zero-activation savings. `screen`: the bfloat16 tail screen
    (`carprune.screen`, off by default). Everything else as `LayerScorer`;
    `score()` returns `LayerScores` with `layer` = the unit's name and `filters` = its channel
    indices; `path` is 'head' / 'fused' (the layer's kernels) or 'masked'.
    """

    def __init__(
        self,
        model: nn.Module,
        unit: str | Unit,
        data: DataLike,
        *,
        analysis: UnitAnalysis | None = None,
        removed: Mapping[str, Sequence[int]] | None = None,
        num_images: int | None = None,
        seed: int = 0,
        memory_budget: int | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        topk: int = 1,
        fused: bool = True,
        fused_head: bool = True,
        zero_skip: bool = True,
        rows: int | None = None,
        progress: bool | None = None,
        classes: Sequence[str] | None = None,
        metric: str | metrics.Metric | metrics.PerSample | None = None,
        bins: int | Sequence[float] | None = None,
        screen: str | None = None,
        _graph: fx.GraphModule | None = None,
        _fold_cache: dict | None = None,
    ) -> None:
        self._init_run(model, data, num_images=num_images, seed=seed,
                       memory_budget=memory_budget, device=device, dtype=dtype, topk=topk,
                       progress=progress, classes=classes, metric=metric, bins=bins,
                       zero_skip=zero_skip, screen=screen)
        if _fold_cache is not None:
            self._fold_cache = _fold_cache
        if analysis is None:
            x0, _ = load_batch(self.data, self.indices[:1])
            analysis = prunable_units(model, x0)
        self.analysis = analysis
        self.unit = analysis.unit(unit.name if isinstance(unit, Unit) else unit)
        self.layer = self.unit.name
        self.num_filters = self.unit.num_channels
        rem = _check_removed(analysis, removed)
        self.removed_elsewhere = {k: v for k, v in rem.items() if k != self.unit.name}
        if _graph is None:
            _graph = trace_for_units(model, analysis).to(device=self.device, dtype=dtype)
        # a private graph over the same modules (nothing here changes a module)
        gm = fx.GraphModule(_graph, copy.deepcopy(_graph.graph))
        _insert_removed(gm, analysis, rem, skip=self.unit.name)
        self._graph = gm
        layer = _plain_layer(gm, self.unit) if fused else None
        self._as_layer = layer is not None
        if layer is not None:
            self._build_layer(gm, layer, fused=True, fused_head=fused_head)
            self.sites: list[_SiteInfo] = []
            self.tail_modules = list(dict.fromkeys(
                str(n.target) for n in graph.reachable(self.cut.node) if n.op == "call_module"))
        else:
            widths = [_site_width(analysis, s) for s in self.unit.mask]
            self.split = split_unit(gm, self.unit.mask, widths, self.device, self._fold_cache)
            self.fused = None
            self.head = None
            self.sites = self.split.sites
            self.tail_modules = self.split.tail_modules
        self._removed_t: torch.Tensor | None = None
        self._plan(rows)
        self._chunks: list[_Chunk] | None = None
        self._base = None
        own = rem.get(self.unit.name)
        if own:
            self.remove(own)

    # -- the masked path -----------------------------------------------------------------------
    @property
    def path(self) -> str:
        return super().path if self._as_layer else "masked"

    def _check_live(self, live: Sequence[torch.Tensor]) -> None:
        if self._as_layer:
            super()._check_live(live)

    def _make_chunk(self, live: list[torch.Tensor], labels: torch.Tensor,
                    pool: BufferPool | None = None) -> _Chunk:
        if self._as_layer:
            return super()._make_chunk(live, labels, pool)
        others = dict(zip(self.split.live, live, strict=True))
        alive = None
        if self.zero_skip:
            alive = torch.zeros(labels.shape[0], self.num_filters, dtype=torch.bool,
                                device=self.device)
            for s in self.sites:
                if s.in_prefix:
                    alive |= _nonzero_channels(others[s.node], s.positions, s.block)
        return _Chunk(labels=labels, a=None, z=None, others=others, alive=alive)

    def _drops(self, rows: int, channels: torch.Tensor | None) -> list[torch.Tensor]:
        """Per site, bool [rows, width]: the removed channels, and row r's channels[r]."""
        if self._removed_t is None and self.removed:
            self._removed_t = torch.tensor(self.removed, dtype=torch.int64, device=self.device)
        out = []
        made: dict[tuple, torch.Tensor] = {}
        for s in self.sites:
            key = id(s.positions)
            if key not in made:
                d = torch.zeros(rows, s.width, dtype=torch.bool, device=self.device)
                if self.removed:
                    d[:, s.positions[self._removed_t]] = True
                if channels is not None:
                    d[torch.arange(rows, device=self.device), s.positions[channels]] = True
                made[key] = d
            out.append(made[key])
        return out

    def _tail_inputs(self, ch: _Chunk, b0: int, b1: int, channels: torch.Tensor | None,
                     sel: torch.Tensor | None = None) -> list[torch.Tensor]:
        if self._as_layer:
            return super()._tail_inputs(ch, b0, b1, channels, sel)
        b = b1 - b0
        if channels is None:
            return [ch.others[n][b0:b1] for n in self.split.live] + self._drops(b, None)
        m = int(channels.numel())
        if sel is None:
            sel = torch.arange(m * b, device=self.device)
        ir = sel % b + b0
        return ([_gather_rows(ch.others[n], ir) for n in self.split.live]
                + self._drops(int(sel.numel()), channels[sel // b]))

    def _base_out(self, ch: _Chunk, b0: int, b1: int) -> torch.Tensor:
        if self._as_layer or not self.zero_skip:
            return super()._base_out(ch, b0, b1)
        if ch.known is None:
            ch.known = torch.zeros(ch.labels.shape[0], dtype=torch.bool)
        if not bool(ch.known[b0:b1].all()):
            # the unablated pass, with the sites inside the tail checked for zero channels
            out, *raw = self.split.probe(*self._tail_inputs(ch, b0, b1, None))
            out = out.view(out.shape[0], -1)
            tail_sites = [s for s in self.sites if not s.in_prefix]
            for s, v in zip(tail_sites, raw, strict=True):
                ch.alive[b0:b1] |= _nonzero_channels(v, s.positions, s.block)
            ch.base_store(out)[b0:b1] = out
            ch.known[b0:b1] = True
        return ch.base_out[b0:b1]

    def _needed(self, ch: _Chunk, b0: int, b1: int, channels: torch.Tensor) -> torch.Tensor:
        if not self._as_layer and any(not s.in_prefix for s in self.sites):
            self._base_out(ch, b0, b1)   # completes `alive` with the sites inside the tail
        return super()._needed(ch, b0, b1, channels)

    def remove(self, filters: Sequence[int]) -> None:
        """Remove channels of the unit for all later scoring."""
        if self._as_layer:
            return super().remove(filters)
        filt = self._check_filters(filters)
        self._base = None
        self.removed.extend(filt)
        self._removed_t = None
        for ch in self._chunks or ():
            ch.known = None
            if ch.alive is not None:   # tail sites are re-checked on the next unablated pass
                ch.alive = self._make_chunk(
                    [ch.others[n] for n in self.split.live], ch.labels).alive
        return None

    # -- reporting -----------------------------------------------------------------------------
    def tail_macs(self, report: CostReport | None = None) -> tuple[int, int]:
        """(dense, run) multiply-accumulates per (image, ablation) pair: `dense`, of every conv
        and linear layer downstream of the sites (what a masked forward of the tail costs);
        `run`, what this path computes (the fused consumer removes one input channel's share;
        the fused ending runs that and the linear layer, before zero pixels are skipped).
        `report`: `cost.count_cost` of the network on the scored images' shape."""
        if report is None:
            x, _ = self._images(self.indices[:1])
            report = count_cost(self._graph, tuple(x.shape[1:]))
        layers = {lay.name: lay for lay in report.layers}
        dense = sum(layers[m].flops for m in self.tail_modules if m in layers)
        if self.path == "masked":
            return dense, dense
        consumer = layers[str(self.fused.nodes[0].target)]
        one = consumer.flops // max(1, consumer.inputs)
        if self.path == "fused":
            return dense, dense - consumer.flops + one
        linear = sum(layers[m].flops for m in self.tail_modules
                     if m in layers and layers[m].kind == "linear")
        return dense, one + linear

    def describe(self) -> str:
        lines = [f"unit: {self.unit.describe()}"]
        sites = ", ".join(f"{s.node}{'' if s.block == 1 else f' (x{s.block} columns)'}"
                          for s in self.unit.mask)
        lines.append(f"mask sites: {sites}")
        if self.removed_elsewhere:
            lines.append("removed elsewhere (zeroed at their sites): " + ", ".join(
                f"{k}: {len(v)}" for k, v in self.removed_elsewhere.items()))
        if self._as_layer:
            lines.append("a plain filter unit: scored as the layer " + self.cut.layer)
            lines.extend(super().describe().splitlines())
            return "\n".join(lines)
        n_pre = sum(s.in_prefix for s in self.sites)
        lines.append(f"prefix: cached once per image, {len(self.split.live)} live tensors "
                     f"({', '.join(self.split.live)})")
        lines.append(f"ablations: the tail graph with the channel zeroed at {len(self.sites)} "
                     f"sites ({n_pre} cached, {len(self.sites) - n_pre} inside the tail)")
        if self.zero_skip:
            lines.append("zero activations: an (image, channel) pair whose channel is all zero "
                         "at every site keeps the unablated result (tail not run)")
        lines.append(f"images: {len(self.indices)}, " + (
            "activations cached once" if self.cache_all else
            f"prefix recomputed per pass in chunks of {self.chunk_images}"))
        return "\n".join(lines)


# -- many units, one prefix pass ---------------------------------------------------------------
@dataclass
class UnitCost:
    """What scoring one unit cost. `pairs`: (image, ablation) pairs scored; `pairs_run`: of
    those, evaluated (the rest were all-zero channels); `tail_macs`: multiply-accumulates per
    pair of every conv/linear layer downstream of the sites; `run_macs`: what the unit's path
    computes per pair (see `UnitScorer.tail_macs`); `seconds`: tails and chunk set-up;
    `screened` / `rechecked`: rows run through the bfloat16 screen, and of those (or audited)
    computed again in float32 (`carprune.screen`; 0 when it is off)."""

    unit: str
    path: str
    channels: int
    pairs: int
    pairs_run: int
    tail_macs: int
    run_macs: int
    seconds: float
    screened: int = 0
    rechecked: int = 0

    def add(self, other: UnitCost, *, same_channels: bool) -> None:
        """Adds `other`'s work on the same unit: pairs, pairs run and seconds. `same_channels`:
        `other` scored (some of) the same channels on other images (channels: the larger);
        else other channels (channels: the sum, e.g. shares of one step across ranks)."""
        self.pairs += other.pairs
        self.pairs_run += other.pairs_run
        self.seconds += other.seconds
        self.screened += other.screened
        self.rechecked += other.rechecked
        self.channels = (max(self.channels, other.channels) if same_channels
                         else self.channels + other.channels)

    @property
    def gflops(self) -> float:
        """Tail throughput: 2 x run_macs x pairs_run / seconds, in GFLOP/s."""
        return 2 * self.run_macs * self.pairs_run / max(self.seconds, 1e-12) / 1e9


@dataclass
class ScoringCost:
    """The cost model of a `score_units` run: the shared prefix (one forward pass over every
    image, `prefix_macs` per image) and each unit's tails."""

    images: int
    prefix_macs: int
    prefix_seconds: float
    seconds: float
    threads: int
    units: list[UnitCost] = field(default_factory=list)

    @property
    def tail_flops(self) -> int:
        """Floating-point operations of the tails run (2 per multiply-accumulate)."""
        return sum(2 * u.run_macs * u.pairs_run for u in self.units)

    @property
    def tail_seconds(self) -> float:
        return sum(u.seconds for u in self.units)

    @property
    def gflops(self) -> float:
        return self.tail_flops / max(self.tail_seconds, 1e-12) / 1e9

    def describe(self, gemm_gflops: float | None = None) -> str:
        """Readable cost; the tail throughput as a fraction of `gemm_gflops` (default: this
        machine's fp32 GEMM throughput at the current thread count, `cost.gemm_gflops`)."""
        if gemm_gflops is None:
            gemm_gflops = gemm_measured()
        pairs = sum(u.pairs for u in self.units)
        run = sum(u.pairs_run for u in self.units)
        lines = [f"{len(self.units)} units on {self.images} images, {self.threads} threads: "
                 f"{self.seconds:.2f} s (prefix {self.prefix_seconds:.2f} s, tails "
                 f"{self.tail_seconds:.2f} s); {pairs:,} (image, ablation) pairs, {run:,} run "
                 f"({100 * (pairs - run) / max(1, pairs):.1f} % all-zero, skipped); tails "
                 f"{self.tail_flops / 1e9:.2f} GFLOP at {self.gflops:.1f} GFLOP/s = "
                 f"{100 * self.gflops / gemm_gflops:.0f} % of {gemm_gflops:.0f} GFLOP/s fp32 GEMM"]
        screened = sum(u.screened for u in self.units)
        if screened:
            again = sum(u.rechecked for u in self.units)
            lines.append(f"bfloat16 screen: {screened:,} rows, {again:,} computed again in "
                         f"float32 ({100 * again / screened:.1f} %)")
        for u in self.units:
            lines.append(f"  {u.unit} [{u.path}]: {u.channels} channels, {u.pairs:,} pairs "
                         f"({u.pairs_run:,} run) x {u.run_macs:,} MACs (dense tail "
                         f"{u.tail_macs:,}), {u.seconds:.2f} s, {u.gflops:.1f} GFLOP/s")
        return "\n".join(lines)


@dataclass
class UnitScores(Mapping[str, LayerScores]):
    """The scores of `score_units`: a mapping {unit name: LayerScores}, with the run's `cost`."""

    scores: dict[str, LayerScores]
    cost: ScoringCost

    FORMAT = "carprune.UnitScores"
    VERSION = 1

    def __getitem__(self, name: str) -> LayerScores:
        return self.scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def save(self, directory: str | os.PathLike) -> Path:
        """`directory`/units.json (the units in order and the cost) and one LayerScores file
        per unit (`scores/<k>.npz`)."""
        d = Path(directory)
        (d / "scores").mkdir(parents=True, exist_ok=True)
        files = {}
        for k, (name, s) in enumerate(self.scores.items()):
            files[name] = f"scores/{k}.npz"
            s.save(d / files[name])
        doc = {"format": self.FORMAT, "version": self.VERSION, "files": files,
               "cost": {**{k: v for k, v in asdict(self.cost).items() if k != "units"},
                        "units": [asdict(u) for u in self.cost.units]}}
        write_json(d / "units.json", doc)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UnitScores:
        d = Path(directory)
        doc = read_json(d / "units.json", "UnitScores file")
        try:
            if doc.get("format") != cls.FORMAT or doc.get("version") != cls.VERSION:
                raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
            c = dict(doc["cost"])
            units = [UnitCost(**u) for u in c.pop("units")]
            cost = ScoringCost(**c, units=units)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{d} is not a readable UnitScores directory ({exc})") from exc
        return cls({name: LayerScores.load(d / f) for name, f in doc["files"].items()}, cost)


def score_units(
    model: nn.Module,
    data: DataLike,
    units: Sequence[str] | None = None,
    *,
    analysis: UnitAnalysis | None = None,
    removed: Mapping[str, Sequence[int]] | None = None,
    num_images: int | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    topk: int = 1,
    metric: str | metrics.Metric | metrics.PerSample | None = None,
    bins: int | Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    fused: bool = True,
    fused_head: bool = True,
    zero_skip: bool = True,
    rows: int | None = None,
    screen: str | None = None,
    progress: bool = False,
    callbacks: Callbacks | None = None,
) -> UnitScores:
    """Scores of every remaining channel of `units` (names; default: every unit of
    `analysis`, itself by default `units.prunable_units(model, <first image>)`) on the same
    `num_images` seeded images, as `UnitScorer` computes them (exact, equal to a
    `units.masked_forward` reference). `removed`: {unit name: channels} already removed (zeroed
    at their sites; those channels are not scored).

    The network's prefix runs ONCE per chunk of images for all units: every tensor that some
    unit's tail reads is kept for the chunk (chunk size from `memory_budget`) and each unit's
    tails run on it. The result maps unit names to `LayerScores` and carries `cost`
    (`ScoringCost`: pairs x tail MACs and seconds per unit, for the GEMM-throughput ratio).
    `callbacks.on_event` hears of every chunk (algorithm "score-units"). `UnitScoring` is the
    same work split into calls on chosen images and channels. `screen='bf16'`: tails run in
    bfloat16, and again in float32 where a row's verdict is in doubt (`carprune.screen`: a
    measured bound, not an exact one; off by default).
    """
    t_start = time.perf_counter()
    scoring = UnitScoring(model, data, units, analysis=analysis, removed=removed,
                          num_images=num_images, seed=seed, memory_budget=memory_budget,
                          device=device, dtype=dtype, topk=topk, metric=metric, bins=bins,
                          classes=classes, fused=fused, fused_head=fused_head,
                          zero_skip=zero_skip, rows=rows, screen=screen)
    return scoring.run(progress=progress, callbacks=callbacks, _since=t_start)


class UnitScoring:
    """The scorers of many units of one network, built once (`score_units`' arguments), and
    `run(indices, channels)`: the scores of chosen channels on chosen images, with ONE prefix
    pass per chunk of those images for all units. Counts are sums over images, so the counts
    of runs on disjoint image sets add up to the counts of one run on their union (what a
    search that drops candidates part-way relies on: `importance.CAR.search`).

    `indices`: the seeded scoring images (`num_images`, `seed`); a run takes any of them.
    `pool` (`engine.BufferPool`): where `keep` takes its large tensors (the kept prefix, the
    fused units' Z), lent until the pool's owner reclaims them after the last `run`."""

    def __init__(self, model: nn.Module, data: DataLike, units: Sequence[str] | None = None, *,
                 analysis: UnitAnalysis | None = None,
                 removed: Mapping[str, Sequence[int]] | None = None,
                 num_images: int | None = None, seed: int = 0,
                 memory_budget: int | str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 topk: int = 1, metric: str | metrics.Metric | metrics.PerSample | None = None,
                 bins: int | Sequence[float] | None = None,
                 classes: Sequence[str] | None = None, fused: bool = True,
                 fused_head: bool = True, zero_skip: bool = True, rows: int | None = None,
                 screen: str | None = None, pool: BufferPool | None = None) -> None:
        t0 = time.perf_counter()
        self.pool = pool
        data = resolve(data)
        if analysis is None:
            from .data.batches import pick_indices
            x0, _ = load_batch(data, pick_indices(num_items(data), num_images, seed)[:1])
            analysis = prunable_units(model, x0)
        names = [u.name for u in analysis.units] if units is None else \
            [analysis.unit(u).name for u in units]
        if not names:
            raise ValueError("no units to score (the analysis has none, or units=[] was passed)")
        rem = _check_removed(analysis, removed)
        params = list(model.parameters())
        dev = torch.device(device) if device is not None else (
            params[0].device if params else torch.device("cpu"))
        base = trace_for_units(model, analysis).to(device=dev, dtype=dtype)
        common = dict(num_images=num_images, seed=seed, memory_budget=memory_budget, device=dev,
                      dtype=dtype, topk=topk, metric=metric, bins=bins, classes=classes,
                      fused=fused, fused_head=fused_head, zero_skip=zero_skip, rows=rows,
                      screen=screen, progress=False)
        fold_cache: dict = {}
        self.scorers = {name: UnitScorer(model, name, data, analysis=analysis, removed=rem,
                                         _graph=base, _fold_cache=fold_cache, **common)
                        for name in names}
        scorers = list(self.scorers.values())
        # the shared prefix: every live tensor of every scorer, all removals applied
        gm = fx.GraphModule(base, copy.deepcopy(base.graph))
        _insert_removed(gm, analysis, rem)
        by_name = {n.name: n for n in gm.graph.nodes}
        self.wanted = list(dict.fromkeys(n for s in scorers for n in s.split.live))
        needed: set[fx.Node] = set()
        for n in self.wanted:
            needed |= {by_name[n]} | graph.reachable(by_name[n], downstream=False)
        order = list(gm.graph.nodes)
        self.shared = graph._subgraph(gm, [n for n in order if n.op == "placeholder"],
                                      [n for n in order if n in needed and n.op not in
                                       ("placeholder", "output", "get_attr")],
                                      [by_name[n] for n in self.wanted],
                                      placeholders_from_inputs=False)
        # both run over every image in each round of a search: BatchNorm folded, oneDNN
        # convolutions fused with their ReLU / residual add (`fold.fuse_conv_pointwise`;
        # ResNet-20, 1,000 images, 2 threads: `margins` 0.46 -> 0.30 s, `keep` 0.65 -> 0.52 s)
        fuse_conv_pointwise(fold_conv_bn(self.shared, fold_cache))
        # the whole network, removals applied (`margins`)
        self._network = fuse_conv_pointwise(fold_conv_bn(
            fx.GraphModule(gm, copy.deepcopy(gm.graph)), fold_cache))
        self.lead = lead = scorers[0]
        self.indices = lead.indices
        self.metric = lead.metric
        x, y1 = lead._images(self.indices[:1])
        self.report = count_cost(gm, tuple(x.shape[1:]))
        prefix_modules = {str(n.target) for n in needed if n.op == "call_module"}
        self.prefix_macs = sum(lay.flops for lay in self.report.layers
                               if lay.name in prefix_modules)
        rec = _SizeRecorder(self.shared)
        with torch.no_grad():
            # in the formats `keep` holds them in (a unit's chunk copies what is in another)
            live1 = {name: v.contiguous(memory_format=torch.channels_last)
                     if cl and v.dim() == 4 else v.contiguous()
                     for name, v, cl in zip(self.wanted, rec.run(x), self._channels_last(),
                                            strict=True)}
            self._chunk_bytes = {s.unit.name: _chunk_bytes(s, live1, y1) for s in scorers}
        budget = parse_bytes(memory_budget)
        self._live_bytes = sum(_bytes_per_row(t) for t in live1.values())
        per_image = self._live_bytes + max(self._chunk_bytes.values())
        self.chunk_images = max(1, min(len(self.indices), (budget // 2) // max(1, per_image)))
        self.prefix_rows = _rows_for(rec.max_bytes, rec.total_bytes, budget // 4)
        self._budget = budget
        self._kept: _Kept | None = None
        self.build_seconds = time.perf_counter() - t0

    def keep(self, order: Sequence[int] | np.ndarray) -> float:
        """Computes the shared prefix over images `order` (scoring images, in any order) once
        and keeps it, when it fits in half the memory budget together with one unit's extra
        tensors; later `run` calls on a contiguous stretch of `order` read views of it instead of
        running the prefix again, and each unit's chunk over all of `order` (its consumer's
        pre-activation, its zero-channel flags, the unablated outputs found so far) is built on
        first use and kept too, for as many units as fit (the smallest chunks first). Exact: the
        same tensors, computed once.
        (`importance.CAR.search` keeps its images in its block order: a round scores the same
        images many times, a few channels at a time.) The kept tensors and the fused units' Z
        come from `pool` when there is one. Returns the prefix seconds (0 when nothing is
        kept)."""
        idx = np.asarray(order, dtype=np.int64)
        n = len(idx)
        self._kept = None
        if not n or (self._live_bytes + max(self._chunk_bytes.values())) * n > self._budget // 2:
            return 0.0
        t0 = time.perf_counter()
        with torch.no_grad():
            vals, y = self.lead._prefix_values(self.shared, idx, self.prefix_rows,
                                               self._channels_last(), self.pool)
        # the units whose chunks fit beside it, smallest first: rebuilding a chunk costs about
        # the same per image for every unit (one consumer convolution), so the most units
        spare = self._budget // 2 - self._live_bytes * n
        fit = set()
        for name in sorted(self.scorers, key=lambda u: self._chunk_bytes[u]):
            if self._chunk_bytes[name] * n <= spare:
                fit.add(name)
                spare -= self._chunk_bytes[name] * n
        self._kept = _Kept(order=idx, where={int(i): p for p, i in enumerate(idx)},
                           values=dict(zip(self.wanted, vals, strict=True)), labels=y, fit=fit)
        return time.perf_counter() - t0

    def _channels_last(self) -> list[bool]:
        """Per shared prefix tensor (`wanted` order), whether `keep` holds it in channels_last:
        where a oneDNN tail reads it (rows gathered from it keep it, `_gather_rows`), never a
        fused consumer's input (`_ops.ablate_conv` reads NCHW)."""
        scorers = self.scorers.values()
        nchw = {s.split.live[0] for s in scorers if s.fused is not None}
        nhwc = {name for s in scorers if reads_channels_last(s.split.tail)
                for name in s.split.live} - nchw
        return [name in nhwc for name in self.wanted]

    def _span(self, idx: np.ndarray) -> tuple[int, int] | None:
        """(p0, p1) when images `idx` are kept[p0:p1], else None."""
        k = self._kept
        if k is None or not len(idx):
            return None
        p0 = k.where.get(int(idx[0]))
        if p0 is None or p0 + len(idx) > len(k.order) or not np.array_equal(
                k.order[p0:p0 + len(idx)], idx):
            return None
        return p0, p0 + len(idx)

    def _kept_chunk(self, s: UnitScorer, p0: int, p1: int) -> _Chunk | None:
        """Unit `s`'s chunk of kept images p0:p1 (views of its chunk over all kept images,
        built on first use), or None when `keep` did not plan room for it."""
        k = self._kept
        if s.unit.name not in k.fit:
            return None
        ch = k.chunks.get(s.unit.name)
        if ch is None:
            ch = s._chunk_from([k.values[n] for n in s.split.live], k.labels, self.pool)
            ch.known = torch.zeros(len(k.order), dtype=torch.bool)
            k.chunks[s.unit.name] = ch
        return _Chunk(labels=ch.labels[p0:p1], a=None if ch.a is None else ch.a[p0:p1],
                      z=None if ch.z is None else ch.z[p0:p1],
                      others={n: v[p0:p1] for n, v in ch.others.items()},
                      groups=ch.groups[p0:p1],
                      alive=None if ch.alive is None else ch.alive[p0:p1],
                      base_out=None if ch.base_out is None else ch.base_out[p0:p1],
                      known=ch.known[p0:p1], parent=ch, offset=p0)

    def margins(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float64 per image of `indices` (default `self.indices`): how far the network
        (removals applied, BatchNorm folded) is from changing its top-k verdict: the label's
        output minus the k-th largest other output (> 0: the label is in the top k). A plain
        forward, for ORDERING images only: the engine's counts may differ on a borderline image."""
        idx = self.indices if indices is None else np.asarray(indices, dtype=np.int64)
        k = self.lead.topk
        out = []
        with torch.no_grad():
            for s0 in range(0, len(idx), self.prefix_rows):
                x, y = self.lead._images(idx[s0:s0 + self.prefix_rows])
                logits = self._network(x)
                logits = logits.reshape(logits.shape[0], -1).double()
                y = y.reshape(-1, 1).to(logits.device).long()
                own = logits.gather(1, y).squeeze(1)
                others = logits.scatter(1, y, float("-inf"))
                kth = others.topk(min(k, others.shape[1] - 1), dim=1).values[:, -1]
                out.append((own - kth).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def run(self, indices: Sequence[int] | np.ndarray | None = None,
            channels: Mapping[str, Sequence[int]] | None = None, *, progress: bool = False,
            callbacks: Callbacks | None = None, _since: float | None = None) -> UnitScores:
        """Scores on images `indices` (default: all of `self.indices`) of `channels`
        ({unit: channel indices}; an empty list gives the unit's unablated counts only; units
        left out are not run; default: every remaining channel of every unit)."""
        t_start = time.perf_counter() if _since is None else _since
        idx = self.indices if indices is None else np.asarray(indices, dtype=np.int64)
        if channels is None:
            todo = [(s, None) for s in self.scorers.values()]
        else:
            unknown = sorted(set(channels) - set(self.scorers))
            if unknown:
                raise ValueError(f"channels: units {unknown} are not among the scored units "
                                 f"({', '.join(self.scorers)})")
            todo = [(self.scorers[u], list(c)) for u, c in channels.items()]
        runs = []
        before = []
        for s, filt in todo:
            s._base = None   # the unablated counts of THESE images
            before.append((s.pairs, s.pairs_run, _screen_counts(s)))
            runs.append(s._score_begin(filt))
        seconds = [0.0] * len(todo)
        prefix_seconds = 0.0
        size = self.chunk_images
        chunks = -(-len(idx) // size)
        bar = progress_callbacks(progress, "score units", total=chunks * len(todo), unit="batch",
                                 leave=False)
        with torch.no_grad():
            for c, s0 in enumerate(range(0, len(idx), size)):
                t0 = time.perf_counter()
                span = self._span(idx[s0:s0 + size])
                if span is not None:   # kept (`keep`): views
                    p0, p1 = span
                    values = {n: v[p0:p1] for n, v in self._kept.values.items()}
                    y = self._kept.labels[p0:p1]
                else:
                    vals, y = self.lead._prefix_values(self.shared, idx[s0:s0 + size],
                                                       self.prefix_rows)
                    values = dict(zip(self.wanted, vals, strict=True))
                    del vals
                prefix_seconds += time.perf_counter() - t0
                for k, ((s, _), run) in enumerate(zip(todo, runs, strict=True)):
                    t0 = time.perf_counter()
                    ch = self._kept_chunk(s, *span) if span is not None else None
                    if ch is None:
                        ch = s._chunk_from([values[n] for n in s.split.live], y)
                    s._score_chunk(run, ch)
                    del ch
                    seconds[k] += time.perf_counter() - t0
                    bar.update(1)
                del values
                if callbacks is not None:
                    done = min(len(idx), s0 + size)
                    callbacks.on_event(Event("score-units", c + 1, f"{done}/{len(idx)} images, "
                                             f"{len(todo)} units", total=chunks,
                                             data={"images": done, "units": len(todo)}))
        bar.close()
        out = {s.unit.name: s._score_end(run) for (s, _), run in zip(todo, runs, strict=True)}
        costs = []
        for (s, _), sec, (p0, r0, (q0, c0)) in zip(todo, seconds, before, strict=True):
            dense, run_macs = s.tail_macs(self.report)
            q1, c1 = _screen_counts(s)
            costs.append(UnitCost(unit=s.unit.name, path=s.path,
                                  channels=len(out[s.unit.name].filters), pairs=s.pairs - p0,
                                  pairs_run=s.pairs_run - r0, tail_macs=dense,
                                  run_macs=run_macs, seconds=sec, screened=q1 - q0,
                                  rechecked=c1 - c0))
        cost = ScoringCost(images=len(idx), prefix_macs=self.prefix_macs,
                           prefix_seconds=prefix_seconds,
                           seconds=time.perf_counter() - t_start,
                           threads=torch.get_num_threads(), units=costs)
        return UnitScores(out, cost)


@dataclass
class _Kept:
    """What `UnitScoring.keep` holds: the images in their kept order, each image's position,
    the shared prefix's tensors and labels over them, the units whose chunks over all of them
    fit in the budget's half, and those chunks (built on first use)."""

    order: np.ndarray
    where: dict[int, int]
    values: dict[str, torch.Tensor]
    labels: torch.Tensor
    fit: set[str]
    chunks: dict[str, _Chunk] = field(default_factory=dict)


def _screen_counts(scorer: UnitScorer) -> tuple[int, int]:
    """(rows screened, rows computed in float32 again or audited) by `scorer` so far."""
    st = scorer.screen.stats if scorer.screen is not None else None
    return (st.rows, st.rechecked + st.audited) if st is not None else (0, 0)


def _chunk_bytes(scorer: UnitScorer, values: Mapping[str, torch.Tensor], labels: torch.Tensor
                 ) -> int:
    """Bytes per image that a chunk of `scorer` holds of its own beside the shared prefix tensors
    `values` (of one image): the fused consumer's Z, a copy of the cut activation when the unit
    has removed channels, the zero-channel flags and the unablated outputs."""
    ch = scorer._chunk_from([values[n] for n in scorer.split.live], labels)
    shared = {v.untyped_storage().data_ptr() for v in values.values()}
    own = [ch.z, ch.alive] + ([ch.a] if ch.a is not None and
                              ch.a.untyped_storage().data_ptr() not in shared else [])
    return (sum(_bytes_per_row(t) for t in own if t is not None)
            + scorer.num_outputs * torch.empty((), dtype=scorer.dtype).element_size())


__all__ = ["REFERENCE_GEMM_GFLOPS", "ScoringCost", "UnitCost", "UnitScorer", "UnitScores",
           "UnitScoring", "UnitSplit", "score_units", "split_unit", "trace_for_units"]
