"""Whole-network units: the groups of channel positions that can only be removed together.

A unit is found on the traced graph by following every channel through the network:

* a conv (groups 1) or linear layer PRODUCES new channels (its filters / neurons) and CONSUMES
  the channels of its input (it mixes them);
* channel-wise ops (`opsem`: activations, BatchNorm, pooling, dropout, spatial slicing) and
  depthwise convs pass channel i to channel i (BatchNorm, per-channel PReLU and the depthwise
  conv hold per-channel parameters: THROUGH modules, which shrink with the channel);
* an element-wise add / sub / mul joins channel i of both operands into one channel: every conv
  adding into a residual stream is a producer of the same unit, and a squeeze-excite gate's
  channel joins the main path's channel it multiplies;
* concatenation along dim 1 lays its inputs' channels side by side (DenseNet);
* registered channel maps (`opsem.register_channel_map`, e.g. the option-A padding shortcut of
  the CIFAR ResNets) move channels and add constant-zero channels;
* flatten(start_dim=1) turns a channel into a block of columns a linear layer reads.

Channels that reach the network's input or output, a grouped conv, or an op without a channel
rule cannot be removed; `strict=True` turns the last case into an error that names the op.
Channels with the same set of places form one `Unit`; its channel i is the i-th of them in the
first tensor (in graph order) that holds them.

REMOVAL of channel i of a unit means: deleted from every producer's output, every through
module and every consumer's input. Its exact masked equivalent zeroes the channel in every
tensor a consumer reads (`Unit.mask`, after all channel-wise ops), which is what scoring does
and what `masked_forward` computes as the reference. For channels whose path to the consumers
only has ops that keep zero (a post-activation ResNet stream), that is the same as zeroing the
channel at every producer after its channel-wise ops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import graph, opsem
from .callbacks import log


class UnitError(ValueError):
    """The network's channels cannot be followed (the message names the op and the place)."""


@dataclass(frozen=True)
class Site:
    """Where a unit's channels sit in one tensor of the traced graph: channel i of the unit is
    position `positions[i]` along dim 1 of node `node`'s value; a flattened tensor (`block` > 1)
    holds it in columns positions[i] * block ... + block - 1."""

    node: str
    positions: tuple[int, ...]
    block: int = 1


@dataclass(frozen=True)
class ModuleUse:
    """How a module's parameters hold a unit's channels. `role`: "producer" (output channels =
    filters / neurons), "through" (per-channel parameters on the way: BatchNorm, PReLU,
    depthwise conv; `params` says which), "consumer" (input channels of a conv, input columns of a
    linear layer, `block` columns per channel), "map" (a registered channel map: `positions`
    are output channels, `in_positions` the input channel each reads, None for a zero channel)."""

    module: str
    role: str
    positions: tuple[int, ...]
    in_positions: tuple[int | None, ...] = ()
    block: int = 1
    params: str | None = None


@dataclass(frozen=True)
class Unit:
    """A group of `num_channels` channels that are removed together (see the module docstring).

    `producers`, `consumers`, `through`: module names. `flops_per_channel`: multiply-accumulates
    per image saved by removing one channel from the unpruned network (producers, through
    modules and consumers together); `params_per_channel` likewise. `kind`: "filter" (one conv
    writes the channels), "neuron" (one linear layer), "coupled" (several producers: a residual
    stream, a gated or concatenated channel).
    """

    name: str
    kind: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    through: tuple[str, ...]
    num_channels: int
    flops_per_channel: int
    params_per_channel: int
    uses: tuple[ModuleUse, ...] = field(repr=False)
    mask: tuple[Site, ...] = field(repr=False)

    def describe(self) -> str:
        return (f"{self.name} ({self.kind}, {self.num_channels} channels): producers "
                f"{', '.join(self.producers)}; consumers {', '.join(self.consumers) or '-'}; "
                f"through {', '.join(self.through) or '-'}; {self.flops_per_channel:,} FLOPs and "
                f"{self.params_per_channel:,} params per channel")


@dataclass(frozen=True)
class _ModuleCost:
    kind: str           # "conv", "depthwise", "linear", "bn", "prelu"
    rows: int           # output positions per image (conv: Ho*Wo; linear: rows per image)
    kernel: int         # kernel area (conv), 1 otherwise
    cin: int
    cout: int
    bias: bool
    calls: int = 1

    def flops(self, rin: int, rout: int, block: int) -> int:
        if self.kind == "conv":
            return self.calls * self.rows * self.kernel * (self.cin - rin) * (self.cout - rout)
        if self.kind == "depthwise":
            return self.calls * self.rows * self.kernel * (self.cout - rout)
        if self.kind == "linear":
            return self.calls * self.rows * (self.cin - rin * block) * (self.cout - rout)
        return 0

    def params(self, rin: int, rout: int, block: int) -> int:
        if self.kind == "conv":
            return self.kernel * (self.cin - rin) * (self.cout - rout) + (
                self.cout - rout if self.bias else 0)
        if self.kind == "depthwise":
            return self.kernel * (self.cout - rout) + (self.cout - rout if self.bias else 0)
        if self.kind == "linear":
            return (self.cin - rin * block) * (self.cout - rout) + (
                self.cout - rout if self.bias else 0)
        if self.kind == "bn":
            return 2 * (self.cout - rout) if self.bias else 0
        if self.kind == "prelu":
            return self.cout - rout
        return 0


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


_WARNED_UNTRACED: set[tuple[type, tuple[str, ...]]] = set()


class UnitAnalysis:
    """Every unit of a network, found once on its traced graph (see the module docstring).

    `units` in graph order; `unit(name)`; `skipped`: (description, reason) of channel groups that
    cannot be removed; `cost(removed)`: FLOPs and parameters of the network with some unit
    channels removed, analytically (equal to `cost.count_cost` on the pruned model);
    `gm`: the traced graph the units refer to (node names in `Site`)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, *, strict: bool = True
                 ) -> None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError("example_input must be a tensor batch such as torch.zeros(1, 3, 32, 32), "
                            f"got {type(example_input).__name__}")
        self.gm = graph.trace(model)
        ref = next(iter(self.gm.parameters()), None)
        x = example_input.to(ref.device if ref is not None else "cpu",
                             ref.dtype if ref is not None and ref.is_floating_point()
                             else torch.float32)
        if x.dim() < 2:
            raise ValueError(f"example_input must be a batch [N, C, ...], got shape {tuple(x.shape)}")
        graph.propagate_shapes(self.gm, x[:1], type(model).__name__)
        self.input_shape = tuple(int(s) for s in x.shape[1:])
        self._strict = strict
        self._build()
        # FLOPs of what no unit changes (grouped convs, modules called twice, leaves and modules
        # without a channel rule that hold convs): a constant, so that `cost` is the whole
        # network's, as count_cost measures it
        from .cost import count_cost

        self._fixed_flops = (count_cost(self.gm, self.input_shape).total_flops
                             - self._cost_of({})[0])
        # modules with parameters that the eval-mode forward never calls (a branch on
        # self.training, an unused head): surgery leaves them as they are
        traced = {name for name, _ in self.gm.named_parameters()}
        self.untraced = list(dict.fromkeys(
            name.rpartition(".")[0] or name for name, _ in model.named_parameters()
            if name not in traced))
        self._all_params = sum(p.numel() for p in model.parameters())
        if self.untraced and (type(model), tuple(self.untraced)) not in _WARNED_UNTRACED:
            # once per model type: global compression analyses the pruned network every round
            _WARNED_UNTRACED.add((type(model), tuple(self.untraced)))
            log.warning("%s: modules %s are not called in eval mode (does forward() branch on "
                        "self.training?); pruning leaves them as they are, so the pruned model "
                        "may not run in training mode", type(model).__name__,
                        ", ".join(self.untraced))

    # -- channel propagation -----------------------------------------------------------------
    def _shape(self, node: fx.Node) -> tuple[int, ...] | None:
        tm = node.meta.get("tensor_meta")
        return tuple(int(s) for s in tm.shape) if tm is not None and hasattr(tm, "shape") else None

    def _build(self) -> None:
        gm = self.gm
        uf = _UnionFind()
        self._uf = uf
        chan: dict[fx.Node, list[int]] = {}
        block: dict[fx.Node, int] = {}
        bad: dict[int, str] = {}
        unknown: dict[int, str] = {}
        uses: list[tuple[str, str, fx.Node, list[int], list[int | None] | None, int, str | None]] = []
        costs: dict[str, _ModuleCost] = {}
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[str(n.target)] = calls.get(str(n.target), 0) + 1

        def fresh(node: fx.Node, reason: str | None = None) -> list[int] | None:
            shape = self._shape(node)
            if shape is None or len(shape) < 2:
                return None
            ids = uf.add(shape[1])
            if reason:
                for i in ids:
                    bad[i] = reason
            return ids

        def spoil(node: fx.Node, reason: str, is_unknown: bool = False) -> None:
            for a in node.all_input_nodes:
                for i in chan.get(a, ()):
                    bad.setdefault(i, reason)
                    if is_unknown:
                        unknown.setdefault(i, reason)

        for n in gm.graph.nodes:
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            ids_in = chan.get(src) if src is not None else None
            blk = block.get(src, 1) if src is not None else 1
            out: list[int] | None = None
            if n.op == "placeholder":
                out = fresh(n, "the network input")
            elif n.op in ("get_attr", "output"):
                if n.op == "output":
                    spoil(n, "the network output")
                continue
            elif n.op == "call_module":
                name = str(n.target)
                m = gm.get_submodule(name)
                shape_in = self._shape(src) if src is not None else None
                shape_out = self._shape(n)
                if calls[name] > 1 and any(True for _ in m.parameters()):
                    spoil(n, f"{name} is called {calls[name]} times")
                    out = fresh(n, f"{name} is called {calls[name]} times")
                elif isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups == 1 and len(n.args) == 1:
                    if ids_in is not None:
                        uses.append((name, "consumer", src, ids_in, None, 1, None))
                    out = fresh(n)
                    uses.append((name, "producer", n, out, None, 1, None))
                    rows = math.prod(shape_out[2:])
                    costs[name] = _ModuleCost("conv", rows, math.prod(m.kernel_size),
                                              m.in_channels, m.out_channels, m.bias is not None,
                                              calls[name])
                elif isinstance(m, nn.Linear) and len(n.args) == 1:
                    if shape_in is None or len(shape_in) != 2:
                        spoil(n, f"linear layer {name} reads a tensor of shape {shape_in}")
                        out = fresh(n, f"linear layer {name} writes a tensor of shape {shape_out}")
                    else:
                        if ids_in is not None:
                            uses.append((name, "consumer", src, ids_in, None, blk, None))
                        out = fresh(n)
                        uses.append((name, "producer", n, out, None, 1, None))
                    rows = math.prod(shape_out[1:-1]) if shape_out else 1
                    costs[name] = _ModuleCost("linear", rows, 1, m.in_features, m.out_features,
                                              m.bias is not None, calls[name])
                elif opsem.channel_map(m) is not None and len(n.args) == 1 and ids_in is not None:
                    mapping = opsem.channel_map(m).mapping(m, len(ids_in))
                    out = []
                    for j in mapping:
                        if j is None:
                            out.extend(uf.add(1))   # a constant zero channel
                        else:
                            out.append(ids_in[j])
                    uses.append((name, "map", n, out, list(mapping), 1, None))
                elif src is not None and opsem.is_channelwise(gm, n, src):
                    r = opsem.rule(gm, n)
                    out = ids_in
                    if r.params is not None and ids_in is not None:
                        if blk != 1:
                            spoil(n, f"{name} has per-feature parameters on a flattened tensor")
                            out = fresh(n, f"{name} has per-feature parameters on a flattened "
                                        "tensor")
                        else:
                            uses.append((name, "through", n, ids_in, None, 1, r.params))
                            kind = "depthwise" if r.params == "depthwise" else r.params
                            rows = math.prod(shape_out[2:]) if shape_out else 1
                            ksz = math.prod(m.kernel_size) if r.params == "depthwise" else 1
                            # "bn": a weight and a bias per channel when they are parameters
                            # (a frozen BatchNorm may hold them as buffers)
                            costs[name] = _ModuleCost(
                                kind, rows, ksz, len(ids_in), len(ids_in),
                                bool(getattr(m, "bias", None) is not None if kind != "bn" else
                                     isinstance(getattr(m, "weight", None), nn.Parameter)),
                                calls[name])
                    block[n] = blk
                elif src is not None and opsem.is_flatten(gm, n, src):
                    shp = self._shape(src)
                    out = ids_in
                    block[n] = blk * (math.prod(shp[2:]) if shp and len(shp) > 2 else 1)
                elif isinstance(m, nn.Conv1d | nn.Conv2d):
                    why = f"grouped conv {name} (groups={m.groups})"
                    spoil(n, f"read by {why}")
                    out = fresh(n, f"written by {why}")
                elif opsem.is_leaf(m):   # declared opaque (register_leaf): known, not unknown
                    why = f"{type(m).__name__} module {name}, a leaf that mixes channels"
                    spoil(n, f"read by {why}")
                    out = fresh(n, f"written by {why}")
                else:
                    why = (f"{type(m).__name__} module {name}, which has no channel rule "
                           "(declare it with carprune.register_channelwise or "
                           "register_channel_map if it keeps channels apart, or register_leaf "
                           "if it mixes them)")
                    spoil(n, f"read by {why}", is_unknown=True)
                    out = fresh(n, f"written by {why}")
            else:  # call_function / call_method
                shape_out = self._shape(n)
                tensor_args = [a for a in n.all_input_nodes if a in chan]
                if not tensor_args:
                    out = None if shape_out is None else fresh(n)
                    if out is not None and n.all_input_nodes == []:
                        for i in out:
                            bad[i] = f"a constant made by {opsem.describe(n)}"
                elif src is not None and opsem.is_channelwise(gm, n, src):
                    out = ids_in
                    block[n] = blk
                elif opsem.is_flatten(gm, n, src) if src is not None else False:
                    shp = self._shape(src)
                    out = ids_in
                    block[n] = blk * (math.prod(shp[2:]) if shp and len(shp) > 2 else 1)
                elif opsem.is_elementwise_binary(n):
                    a, b = n.args[0], n.args[1]
                    ta, tb = a in chan if isinstance(a, fx.Node) else False, \
                        b in chan if isinstance(b, fx.Node) else False
                    if ta and tb:
                        ia, ib = chan[a], chan[b]
                        sa, sb = self._shape(a), self._shape(b)
                        if len(ia) == len(ib) and sa and sb and len(sa) == len(sb) and \
                                block.get(a, 1) == block.get(b, 1):
                            for i, j in zip(ia, ib, strict=True):
                                uf.union(i, j)
                            out = ia
                            block[n] = block.get(a, 1)
                        else:
                            spoil(n, f"{opsem.describe(n)} combines tensors of shapes {sa} and {sb}")
                            out = fresh(n, f"written by {opsem.describe(n)}")
                    elif ta or tb:
                        other = b if ta else a
                        if isinstance(other, fx.Node):   # a parameter tensor or a constant
                            spoil(n, f"{opsem.describe(n)} reads a tensor without channels")
                            out = fresh(n, f"written by {opsem.describe(n)}")
                        else:
                            t = a if ta else b
                            out = chan[t]
                            block[n] = block.get(t, 1)
                elif opsem.concat_dim(n) is not None:
                    parts = n.args[0]
                    dim = opsem.concat_dim(n)
                    shp = self._shape(n)
                    if shp is not None and dim < 0:
                        dim += len(shp)
                    if dim == 1 and all(isinstance(p, fx.Node) and p in chan and
                                        block.get(p, 1) == 1 for p in parts):
                        out = [i for p in parts for i in chan[p]]
                    elif all(isinstance(p, fx.Node) and p in chan for p in parts) and \
                            len({len(chan[p]) for p in parts}) == 1 and dim != 1:
                        for p in parts[1:]:
                            for i, j in zip(chan[parts[0]], chan[p], strict=True):
                                uf.union(i, j)
                        out = chan[parts[0]]
                    else:
                        spoil(n, f"{opsem.describe(n)} concatenates along dim {dim}")
                        out = fresh(n, f"written by {opsem.describe(n)}")
                elif n.op == "call_method" and n.target in ("size", "dim", "numel") or (
                        n.op == "call_function" and getattr(n.target, "__name__", "") == "getattr"):
                    continue      # shape queries: no channel data flows
                else:
                    why = (f"{opsem.describe(n)}, which has no channel rule (declare it with "
                           "carprune.register_channelwise if it keeps channels apart)")
                    spoil(n, f"read by {why}", is_unknown=True)
                    out = fresh(n, f"written by {why}") if shape_out is not None else None
            if out is not None:
                chan[n] = out
                block.setdefault(n, 1)

        if self._strict and unknown:
            reasons = list(dict.fromkeys(unknown.values()))
            raise UnitError("cannot follow the network's channels: they are " + "; ".join(reasons)
                            + ". Pass strict=False to leave those channels out of the units.")
        self._chan, self._block, self._costs = chan, block, costs
        self._collect(uf, chan, block, bad, uses)

    # -- grouping into units -----------------------------------------------------------------
    def _collect(self, uf, chan, block, bad, uses) -> None:
        bad_roots: dict[int, str] = {}
        for i, why in bad.items():
            bad_roots.setdefault(uf.find(i), why)
        # where each channel class sits: node -> position
        places: dict[int, list[tuple[fx.Node, int]]] = {}
        order = {n: k for k, n in enumerate(self.gm.graph.nodes)}
        for n, ids in chan.items():
            seen: set[int] = set()
            for p, i in enumerate(ids):
                r = uf.find(i)
                if r in seen:
                    bad_roots.setdefault(r, f"the same channel appears twice in {n.name}")
                seen.add(r)
                places.setdefault(r, []).append((n, p))
        role_of: dict[int, list[tuple]] = {}
        for use in uses:
            name, role, node, ids, mapping, blk, params = use
            for p, i in enumerate(ids):
                role_of.setdefault(uf.find(i), []).append((name, role, node, p, mapping, blk, params))
        groups: dict[tuple, list[int]] = {}
        skipped: dict[str, str] = {}
        for r, pl in places.items():
            roles = role_of.get(r, [])
            producers = [x for x in roles if x[1] == "producer"]
            if r in bad_roots or not producers:
                if producers:
                    skipped.setdefault(producers[0][0], bad_roots.get(r, "no layer writes it"))
                continue
            key = tuple(sorted({n.name for n, _ in pl}))
            groups.setdefault(key, []).append(r)
        self.skipped: list[tuple[str, str]] = sorted(skipped.items())
        units: list[Unit] = []
        names: set[str] = set()
        for roots in groups.values():
            pl0 = places[roots[0]]
            first = min((n for n, _ in pl0), key=order.__getitem__)
            pos_in_first = {r: next(p for n, p in places[r] if n is first) for r in roots}
            roots.sort(key=pos_in_first.__getitem__)
            units.append(self._make_unit(roots, places, role_of, order, names))
        units.sort(key=lambda u: order[self._first_node[u.name]])
        self.units = units
        self._by_name = {u.name: u for u in units}

    def _make_unit(self, roots, places, role_of, order, names) -> Unit:
        if not hasattr(self, "_first_node"):
            self._first_node: dict[str, fx.Node] = {}
        gm = self.gm
        # module uses: same modules for every root of the group (same places)
        per_module: dict[tuple[str, str], list] = {}
        for r in roots:
            by = {}
            for name, role, node, p, mapping, blk, params in role_of.get(r, []):
                by.setdefault((name, role), (node, p, mapping, blk, params))
            for k, v in by.items():
                per_module.setdefault(k, []).append(v)
        uses = []
        for (name, role), vals in per_module.items():
            node, _, mapping, blk, params = vals[0]
            pos = tuple(v[1] for v in vals)
            if role == "map":
                in_pos = tuple(mapping[p] for p in pos)
                uses.append(ModuleUse(name, role, pos, in_pos))
            else:
                uses.append(ModuleUse(name, role, pos, (), blk, params))
        node_of = {}
        for name, role, node, *_ in (x for r in roots[:1] for x in role_of.get(r, [])):
            node_of[(name, role)] = node
        uses.sort(key=lambda u: order[node_of[(u.module, u.role)]])
        producers = tuple(u.module for u in uses if u.role == "producer")
        consumers = tuple(u.module for u in uses if u.role == "consumer")
        through = tuple(u.module for u in uses if u.role == "through")
        # mask: every tensor a consumer reads
        sites: dict[str, Site] = {}
        for _name, role, node, *_rest in role_of.get(roots[0], []):
            if role != "consumer":
                continue
            pos = []
            for r in roots:
                p = next(pp for nn_, pp in places[r] if nn_ is node)
                pos.append(p)
            sites[node.name] = Site(node.name, tuple(pos), self._block.get(node, 1))
        mask = tuple(sorted(sites.values(), key=lambda s: order[self._node(s.node)]))
        mods = dict(gm.named_modules())
        first_prod = producers[0]
        kind = ("coupled" if len(producers) > 1 else
                "neuron" if isinstance(mods[first_prod], nn.Linear) else "filter")
        name = first_prod
        k = 2
        while name in names:
            name, k = f"{first_prod}:{k}", k + 1
        names.add(name)
        self._first_node[name] = min((n for n, _ in places[roots[0]]), key=order.__getitem__)
        unit = Unit(name=name, kind=kind, producers=producers, consumers=consumers,
                    through=through, num_channels=len(roots), flops_per_channel=0,
                    params_per_channel=0, uses=tuple(uses), mask=mask)
        base_f, base_p = self._cost_of({})
        one_f, one_p = self._cost_of({id(unit): (unit, 1)})
        return Unit(name=name, kind=kind, producers=producers, consumers=consumers,
                    through=through, num_channels=len(roots), flops_per_channel=base_f - one_f,
                    params_per_channel=base_p - one_p, uses=tuple(uses), mask=mask)

    def _node(self, name: str) -> fx.Node:
        if not hasattr(self, "_nodes"):
            self._nodes = {n.name: n for n in self.gm.graph.nodes}
        return self._nodes[name]

    # -- cost --------------------------------------------------------------------------------
    def _cost_of(self, removed: Mapping[int, tuple[Unit, int]]) -> tuple[int, int]:
        rin: dict[str, int] = {}
        rout: dict[str, int] = {}
        blocks: dict[str, int] = {}
        for unit, k in removed.values():
            for u in unit.uses:
                if u.role == "consumer":
                    rin[u.module] = rin.get(u.module, 0) + k
                    blocks[u.module] = u.block
                elif u.role in ("producer", "through"):
                    rout[u.module] = rout.get(u.module, 0) + k
        flops = params = 0
        for name, c in self._costs.items():
            a, b, blk = rin.get(name, 0), rout.get(name, 0), blocks.get(name, 1)
            flops += c.flops(a, b, blk)
            params += c.params(a, b, blk)
        return flops, params

    def cost(self, removed: Mapping[str, Sequence[int] | int] | None = None) -> tuple[int, int]:
        """(FLOPs, parameters) per image with `removed` ({unit name: channel indices, or a
        count}) taken out. FLOPs: the whole network's multiply-accumulates of conv and linear
        layers as `cost.count_cost` counts them (those of layers no unit changes, such as
        grouped convs, are a constant part). Parameters: those of conv, linear and per-channel
        layers that units touch; other modules' are not included: compare differences, or use
        `total_params(removed)`."""
        rem = {}
        for name, idx in (removed or {}).items():
            u = self.unit(name)
            k = idx if isinstance(idx, int) else len(set(int(i) for i in idx))
            rem[id(u)] = (u, k)
        flops, params = self._cost_of(rem)
        return flops + self._fixed_flops, params

    def total_params(self, removed: Mapping[str, Sequence[int] | int] | None = None) -> int:
        """Every parameter of the network (as `sum(p.numel())`, modules that the eval-mode
        forward does not call included) with `removed` taken out."""
        base = self._all_params
        return base - (self.cost({})[1] - self.cost(removed)[1])

    def saved_flops(self, name: str, removed: Mapping[str, Sequence[int] | int] | None = None
                    ) -> int:
        """FLOPs per image saved by removing one more channel of unit `name` after `removed`."""
        rem = dict(removed or {})
        cur = rem.get(name, 0)
        now = self.cost(rem)[0]
        rem[name] = (cur if isinstance(cur, int) else len(set(cur))) + 1
        return now - self.cost(rem)[0]

    # -- access ------------------------------------------------------------------------------
    def unit(self, name: str) -> Unit:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no unit {name!r}; the units are: "
                           f"{', '.join(u.name for u in self.units)}") from None

    def __iter__(self):
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> Unit:
        return self.units[i]

    def describe(self) -> str:
        lines = [u.describe() for u in self.units]
        lines += [f"not prunable: {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)


def prunable_units(model: nn.Module, example_input: torch.Tensor, *, strict: bool = True
                   ) -> UnitAnalysis:
    """Every unit of `model` (see the module docstring), found on a trace with `example_input`
    (a batch such as torch.zeros(1, 3, 32, 32); only its shape matters). A list-like
    `UnitAnalysis`: `units[0].name`, `.producers`, `.consumers`, `.num_channels`,
    `.flops_per_channel`; `.skipped` says which channels cannot be removed and why.

    Raises `UnitError` when an op without a channel rule reads prunable channels (strict=True;
    the message names the op and its node) and `graph.CutError` when the model cannot be traced.
    """
    return UnitAnalysis(model, example_input, strict=strict)


def masked_forward(analysis: UnitAnalysis, x: torch.Tensor,
                   removed: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """The reference: the traced network run on `x` with the channels `removed` ({unit name:
    channel indices}) zeroed in every tensor a consumer reads (`Unit.mask`). Equals the
    physically pruned network (`surgery.prune_units`) and is what unit scoring evaluates."""
    zero: dict[str, list[tuple[list[int], int]]] = {}
    for name, idx in removed.items():
        unit = analysis.unit(name)
        idx = [int(i) for i in idx]
        bad = [i for i in idx if not 0 <= i < unit.num_channels]
        if bad:
            raise ValueError(f"channels {bad} are out of range for unit {name!r} "
                             f"({unit.num_channels} channels)")
        for s in unit.mask:
            zero.setdefault(s.node, []).append(([s.positions[i] for i in idx], s.block))

    class _Masked(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n.name in zero:
                out = out.clone()
                for pos, blk in zero[n.name]:
                    if blk == 1:
                        out[:, pos] = 0
                    else:
                        cols = [p * blk + j for p in pos for j in range(blk)]
                        out[:, cols] = 0
            return out

    with torch.no_grad():
        return _Masked(analysis.gm).run(x)


__all__ = ["ModuleUse", "Site", "Unit", "UnitAnalysis", "UnitError", "masked_forward",
           "prunable_units"]
