"""Where a filter's removal takes effect in a network, and the network cut in two there.

Units are the filters of a conv layer (nn.Conv2d, nn.Conv1d: output channels) and the neurons of
a linear layer (nn.Linear on [batch, features]: output features); "channel i" below is unit i.

Removing filter i of layer L with all its outgoing connections deletes channel i from L, from
the per-channel parameters of the channel-wise operations that follow it (`opsem`: BatchNorm,
PReLU, a depthwise conv; activations, pooling and dropout have none) and from the input of every
operation that mixes channels where L's output is consumed (a conv, a linear layer after
flattening). Its exact masked equivalent zeroes channel i at the CUT: after the channel-wise
operations that follow the layer and before the first operation that mixes channels. Zeroing
earlier is the same only through operations that keep zero (ReLU, max pooling: f(0) = 0);
BatchNorm (f(0) = shift), Sigmoid and Hardsigmoid (f(0) = 1/2) and a depthwise conv with a bias
do not, so the cut is always placed after them. `find_cut` locates that point in the torch.fx
graph, following `opsem` (the one op-semantics table; `opsem.register_channelwise` extends it):

* a depthwise conv after the layer is channel-wise: the cut moves past it, so removing a
  MobileNet expansion filter also removes the depthwise filter that reads only its channel
  (zeroing before that conv would leave a constant channel, its BatchNorm shift, downstream);
* a cut that a tensor not computed from it multiplies element-wise (a squeeze-excite gate:
  conv -> sigmoid -> mul into the main path) has no removal defined by the cut alone: the gate's
  channel i is coupled with channel i of the path it scales, so `find_cut` raises `CutError`
  and points to whole-network units (`carprune.prunable_units`). A product with a tensor
  computed from the cut itself (the main path times its own squeeze-excite gate, x * sigmoid(x))
  is fine: zeroing channel i of the cut zeroes the product's channel i, and the other factor's
  channel i is read nowhere else.

`analyze` builds a `LayerAnalysis` once per (model, layer): the traced module, the cut, the chain
of nodes from the layer to the cut, the consumers of the cut classified, the weights that read
the layer's channels, the fused consumer and the cost each filter accounts for. Stages take it
instead of walking the graph again. `split_at` cuts the graph into a prefix (computed once per
image) and a tail (run once per ablation), with every tensor that is live across the cut cached.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import opsem

# Layers whose units (output channels or features) are scored and removed.
UNIT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d, nn.Linear)


def num_units(module: nn.Module) -> int:
    """Output channels of a conv, output features of a linear layer."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


class CutError(ValueError):
    """The layer cannot be scored or pruned; the message says why."""


class _Tracer(fx.Tracer):
    """The default tracer, except that carprune's own modules marked `carprune_leaf` (e.g. the
    pruned `surgery.ScatteredConv2d`) and the types registered in `opsem` (`register_leaf`,
    `register_channelwise`, `register_channel_map`) stay single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return opsem.is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def propagate_shapes(gm: fx.GraphModule, x: torch.Tensor, what: str) -> None:
    """torch.fx ShapeProp of `gm` on `x` (tensor shapes recorded on the nodes). An input that
    does not fit raises ValueError naming its shape, `what` (the model) and the error's own
    cause, not ShapeProp's dump of the node (whose traceback is not printed)."""
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(x)
    except Exception as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise ValueError(f"an input of shape {tuple(x.shape[1:])} does not fit {what} "
                         f"({type(cause).__name__}: {str(cause).splitlines()[0]})") from exc


def trace(model: nn.Module) -> fx.GraphModule:
    """A traced copy of `model` in eval mode, with in-place operations made out-of-place (the
    tail runs many times on cached tensors, which an in-place op would corrupt)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    try:
        tracer = _Tracer(autowrap_functions=opsem.wrapped_functions())
        g = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, g, type(model).__name__)
    except Exception as exc:
        raise CutError(
            f"{type(model).__name__} cannot be traced with torch.fx ({type(exc).__name__}: {exc}). "
            "Data-dependent control flow in forward() prevents finding where a filter's output "
            "is consumed; wrap such code in a leaf module or rewrite it without branching on "
            "tensor values."
        ) from exc
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target in ("relu_", "add_", "mul_", "sigmoid_"):
            node.target = node.target[:-1]
    gm.recompile()
    return gm


@dataclass
class Cut:
    """Where the filters of `layer` are removed: channel i of node `node` is zeroed.
    `chain_nodes`: the channel-wise nodes from the layer (excluded) to `node` (included), in
    order; `chain`: their names."""

    layer: str
    conv: nn.Module                # the unit layer: Conv2d, Conv1d or Linear
    conv_node: fx.Node
    node: fx.Node
    chain: list[str] = field(default_factory=list)
    chain_nodes: list[fx.Node] = field(default_factory=list)

    @property
    def num_filters(self) -> int:
        return num_units(self.conv)

    def describe(self) -> str:
        ops = " -> ".join([self.layer, *self.chain])
        users = ", ".join(u.format_node() if u.op == "output" else str(u.target)
                          for u in self.node.users)
        return f"{ops} | cut | consumed by: {users}"


def conv_layers(model: nn.Module) -> list[str]:
    """Names of every Conv2d in `model`, in definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def unit_layers(model: nn.Module) -> list[str]:
    """Names of every layer whose units can be scored (Conv2d, Conv1d, Linear), in order."""
    return [name for name, m in model.named_modules() if isinstance(m, UNIT_LAYERS)]


def conv_call(gm: fx.GraphModule, layer: str) -> fx.Node:
    """The single call of conv (or linear) `layer` in the traced graph; errors name what is wrong."""
    modules = dict(gm.named_modules())
    if layer not in modules:
        raise CutError(f"unknown layer {layer!r}; the conv and linear layers are: "
                       f"{', '.join(unit_layers(gm))}")
    conv = modules[layer]
    if not isinstance(conv, UNIT_LAYERS):
        raise CutError(f"layer {layer!r} is a {type(conv).__name__}, not a Conv2d, Conv1d or "
                       "Linear layer; only conv filters and linear neurons are scored. Such "
                       f"layers: {', '.join(unit_layers(gm))}")
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise CutError(f"layer {layer!r} is called {len(calls)} times in forward(); a filter of "
                       "a shared (or unused) layer has no single place where it is removed")
    return calls[0]


def reachable(node: fx.Node, downstream: bool = True) -> set[fx.Node]:
    """Every node that depends on `node` (downstream) or that it depends on, `node` excluded."""
    seen: set[fx.Node] = set()
    step = (lambda n: n.users) if downstream else (lambda n: n.all_input_nodes)
    stack = list(step(node))
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def find_cut(gm: fx.GraphModule, layer: str) -> Cut:
    """The point after `layer`'s channel-wise followers (`opsem.is_channelwise`: activations,
    BatchNorm, pooling, dropout, depthwise convs, registered ops) where its filters' outputs are
    consumed. Raises `CutError` when there is none: the layer's output is the network output or
    unused, or it is a gate multiplied into another path (see the module docstring)."""
    conv_node = node = conv_call(gm, layer)
    conv = gm.get_submodule(layer)
    chain: list[str] = []
    chain_nodes: list[fx.Node] = []
    while len(node.users) == 1:
        (user,) = node.users
        if not opsem.is_channelwise(gm, user, node):
            break
        chain.append(str(user.target) if user.op == "call_module" else
                     getattr(user.target, "__name__", str(user.target)))
        chain_nodes.append(user)
        node = user
    if any(u.op == "output" for u in node.users):
        raise CutError(f"layer {layer!r} has no valid cut: its filters' outputs are the network's "
                       "output itself, so no filter can be removed without changing the output size")
    if not node.users:
        raise CutError(f"layer {layer!r} has no valid cut: its output is never used")
    for user in node.users:
        gate = _gated_path(gm, node, user)
        if gate is not None:
            ops = " -> ".join([layer, *chain])
            raise CutError(
                f"layer {layer!r} has no removal defined by its cut alone: its output ({ops}) "
                f"multiplies {opsem.describe(gate)} element-wise in {opsem.describe(user)}, like "
                "a squeeze-excite gate. Channel i of a gate is coupled with channel i of the path "
                "it scales: removing it means removing both, which is a whole-network unit. Use "
                "carprune.prunable_units(model, example_input) to find and score such units.")
    return Cut(layer=layer, conv=conv, conv_node=conv_node, node=node, chain=chain,
               chain_nodes=chain_nodes)


def _gated_path(gm: fx.GraphModule, cut: fx.Node, user: fx.Node) -> fx.Node | None:
    """The other factor when `user` multiplies the cut element-wise by a tensor whose channels
    zeroing the cut does not remove (None when it does, or `user` is not such a product).

    Zeroing channel i of the cut zeroes channel i of the product. That is a removal only if the
    other factor's channel i is read by nothing else: a constant or parameter, or a tensor
    computed from the cut that reaches only this product (x * sigmoid(x), the main path times
    its own squeeze-excite gate). A tensor not computed from the cut (the gate's side of a
    squeeze-excite block, a second branch) keeps its channel i elsewhere."""
    if not (opsem.is_elementwise_binary(user) and
            (user.target in (operator.mul, torch.mul) or user.target == "mul")):
        return None
    others = [a for a in user.args if isinstance(a, fx.Node) and a is not cut
              and a.op != "get_attr"]
    if not others:
        return None
    (other,) = others
    if other not in reachable(cut):
        return other
    n = other
    while n is not cut:
        if len(n.users) != 1:
            return other
        if not (n.args and isinstance(n.args[0], fx.Node) and opsem.is_channelwise(gm, n, n.args[0])):
            break        # the op that writes the other factor's channels: read only here
        n = n.args[0]
    return None


@dataclass
class FusedConsumer:
    """The single conv (+ BatchNorm, + ReLU) that consumes the cut, evaluated by the fused
    kernel as act(scale * (z - contribution of the ablated channel) + shift)."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    relu: bool
    end: fx.Node          # the node whose value the kernel produces
    nodes: list[fx.Node]  # conv [, bn [, relu]] nodes replaced by the kernel

    def scale_shift(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchNorm folded into a per-channel affine map (identity without BatchNorm)."""
        f = self.conv.out_channels
        if self.bn is None:
            return (torch.ones(f, dtype=dtype, device=device),
                    torch.zeros(f, dtype=dtype, device=device))
        bn = self.bn
        var, mean = bn.running_var.to(dtype), bn.running_mean.to(dtype)
        gamma = bn.weight.to(dtype) if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.to(dtype) if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        return scale.to(device).contiguous(), (beta - mean * scale).to(device).contiguous()


def find_fused_consumer(gm: fx.GraphModule, cut: Cut) -> FusedConsumer | None:
    """The conv fed by the cut, if the fused kernel can evaluate it (groups 1, zero padding),
    extended over a following BatchNorm (eval statistics, `opsem.bn_after`) and ReLU
    (`opsem.is_relu`) when each is its sole user."""
    for user in cut.node.users:
        if user.op != "call_module" or user.args[:1] != (cut.node,) or len(user.args) != 1:
            continue
        conv = gm.get_submodule(user.target)
        if not (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
                and isinstance(conv.padding, tuple)):
            continue
        nodes, end, bn, relu = [user], user, None, False
        bn_node = opsem.bn_after(gm, end)
        if bn_node is not None:
            bn, end = gm.get_submodule(bn_node.target), bn_node
            nodes.append(bn_node)
        if len(end.users) == 1:
            (nxt,) = end.users
            if opsem.is_relu(gm, nxt, end):
                relu, end = True, nxt
                nodes.append(nxt)
        return FusedConsumer(conv=conv, bn=bn, relu=relu, end=end, nodes=nodes)
    return None


@dataclass
class Split:
    """The network cut in two: ``prefix(x) -> live`` and ``tail(*live) -> logits``.

    `live` holds every tensor computed before the cut that the tail still needs: the cut
    activation first, then e.g. a residual block's input that the shortcut carries past it.
    With a fused consumer, `tail` starts after the consumer and takes its output first.
    """

    prefix: fx.GraphModule
    tail: fx.GraphModule
    live: list[str]          # names of the prefix outputs, cut first
    tail_inputs: list[str]   # names the tail takes, in order
    fused: FusedConsumer | None


def _subgraph(gm: fx.GraphModule, inputs: list[fx.Node], nodes: list[fx.Node],
              outputs: list[fx.Node] | fx.Node, placeholders_from_inputs: bool) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = g.placeholder(n.name) if placeholders_from_inputs else g.node_copy(n, env.__getitem__)
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = g.node_copy(a, env.__getitem__)
        env[n] = g.node_copy(n, env.__getitem__)
    if isinstance(outputs, list):
        g.output(tuple(env[o] for o in outputs))
    else:
        g.output(fx.map_arg(outputs, env.__getitem__))
    sub = fx.GraphModule(gm, g)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub


def split_at(gm: fx.GraphModule, cut: Cut, fuse: bool = True) -> Split:
    """Cut `gm` at `cut`; with `fuse`, leave a fusable consumer conv to the fused kernel."""
    order = list(gm.graph.nodes)
    out_node = next(n for n in order if n.op == "output")
    desc = reachable(cut.node)
    fused = find_fused_consumer(gm, cut) if fuse else None
    prefix_nodes = [n for n in order
                    if n not in desc and n.op not in ("placeholder", "output", "get_attr")]
    placeholders = [n for n in order if n.op == "placeholder"]
    tail_nodes = [n for n in order if n in desc and n.op != "output"]
    skip = set(fused.nodes) if fused else set()
    rest = [n for n in tail_nodes if n not in skip]
    prefix_set = set(prefix_nodes) | set(placeholders)
    live = [cut.node] + [n for n in prefix_nodes + placeholders
                         if n is not cut.node and any(u in desc for u in n.users)]
    if fused:
        needed = {a for n in rest + [out_node] for a in n.all_input_nodes}
        tail_in = [fused.end] + [n for n in live if n in needed]
    else:
        tail_in = live
    # the conv feeding the fused kernel needs the cut itself, which is live already
    assert all(n in prefix_set for n in live)
    prefix = _subgraph(gm, placeholders, prefix_nodes, live, placeholders_from_inputs=False)
    tail = _subgraph(gm, tail_in, rest, out_node.args[0], placeholders_from_inputs=True)
    return Split(prefix=prefix, tail=tail, live=[n.name for n in live],
                 tail_inputs=[n.name for n in tail_in], fused=fused)


# -- the analysis of one layer -------------------------------------------------------------------
CONSUMER_KINDS = ("conv", "linear_flat", "linear", "add", "concat", "mul", "other")


@dataclass(frozen=True)
class Consumer:
    """One operation that reads the cut. `kind` (one of `CONSUMER_KINDS`):

    * "conv": a conv of the layer's own kind (groups 1, called once) reading the cut alone;
    * "linear_flat": a linear layer reading the cut flattened from dim 1 (`node` is the flatten,
      possibly followed by element-wise ops that keep zero, such as Dropout): channel i is the
      block of `block` input columns i * block ... (i + 1) * block - 1;
    * "linear": a linear layer (called once) reading a linear layer's features directly;
    * "add" (add or sub), "mul": an element-wise binary op (a residual add, a gated product);
    * "concat": concatenation along the channel dimension;
    * "other": anything else (a grouped conv, a shortcut module, the network output, ...).

    `module`: the conv / linear module for the first three kinds, else None; `description`: the
    op as error messages name it (`opsem.describe`)."""

    kind: str
    node: fx.Node
    module: str | None = None
    block: int = 1
    description: str = ""


@dataclass(frozen=True)
class Reader:
    """A conv or linear weight that reads channel i of a layer's output at input index i (a
    conv's input channel i; a linear layer's column block i, `block` columns), found by following
    the cut through operations that keep the channel index: channel-wise ops and element-wise
    add / sub / mul (a residual stream carries it to every block that reads the stream)."""

    module: str
    kind: str        # "conv" or "linear"
    block: int = 1


@dataclass(frozen=True)
class FilterCost:
    """What removing ONE filter (neuron) of the layer saves per image, as `cost.count_cost`
    counts it: `flops` (multiply-accumulates of every conv and linear layer), `params` (every
    parameter), `bytes` (4 bytes per conv/linear weight), `layer_flops` and `layer_bytes` (the
    layer's own row). Removing k filters saves k times as much (every term is linear in k)."""

    flops: int
    params: int
    bytes: int
    layer_flops: int
    layer_bytes: int


@dataclass(frozen=True)
class LayerAnalysis:
    """Everything the stages need to know about removing the filters of one layer, found once
    on one trace (`analyze`). Node attributes refer to `gm`, a traced COPY of the model (eval
    mode, in-place ops made out-of-place): read weights from it, change the model itself.

    `cut`: where removal takes effect (`find_cut`); `chain`: the channel-wise nodes from the
    layer (excluded) to the cut (included); `consumers`: who reads the cut (`Consumer`);
    `readers`: the weights that read each channel downstream, through channel-keeping ops
    (`Reader`; what the mean_out / kse criteria measure); `fused`: the conv (+ BN + ReLU) the
    fused kernel evaluates (`find_fused_consumer`), or None; `bn_node`: the BatchNorm right
    after the layer (`opsem.bn_after`), or None; `first_layer`: no conv or linear layer lies
    between the network input and the layer (its weights act on the input directly).

    `narrow`: every consumer is a conv or a linear layer ("conv", "linear", "linear_flat") and
    the layer is not already scattered, so removal shrinks the layer, the per-channel
    parameters of its chain and the consumers' inputs; otherwise the layer keeps its output
    width (`surgery.ScatteredConv2d`) and only its own filters are saved. `per_filter`: the cost
    one removed filter saves in that form (`FilterCost`), from tensor shapes found with one
    torch.fx ShapeProp run on `example_input`; None when `analyze` had no example input."""

    layer: str
    gm: fx.GraphModule
    cut: Cut
    chain: tuple[fx.Node, ...]
    consumers: tuple[Consumer, ...]
    readers: tuple[Reader, ...]
    fused: FusedConsumer | None
    bn_node: fx.Node | None
    first_layer: bool
    narrow: bool
    input_shape: tuple[int, ...] | None = None
    per_filter: FilterCost | None = None

    @property
    def conv(self) -> nn.Module:
        """The layer's module in `gm` (Conv2d, Conv1d or Linear)."""
        return self.cut.conv

    @property
    def conv_node(self) -> fx.Node:
        return self.cut.conv_node

    @property
    def node(self) -> fx.Node:
        """The cut node: channel i of its value is zeroed to remove filter i."""
        return self.cut.node

    @property
    def num_filters(self) -> int:
        return self.cut.num_filters

    @property
    def chain_modules(self) -> tuple[str, ...]:
        """Names of the modules in `chain` (BatchNorm, activations, depthwise convs...)."""
        return tuple(str(n.target) for n in self.chain if n.op == "call_module")

    def consumer_modules(self, *kinds: str) -> tuple[str, ...]:
        """The modules of the consumers of `kinds` ("conv", "linear", "linear_flat"), in order."""
        return tuple(c.module for c in self.consumers if c.kind in kinds and c.module is not None)

    @property
    def other_consumers(self) -> tuple[Consumer, ...]:
        """The consumers that cannot lose inputs (everything but conv and linear layers)."""
        return tuple(c for c in self.consumers if c.kind not in _NARROW_KINDS)

    def describe(self) -> str:
        lines = [self.cut.describe()]
        for c in self.consumers:
            extra = f" {c.module}" if c.module else ""
            extra += f" (block {c.block})" if c.kind == "linear_flat" else ""
            lines.append(f"  {c.kind}:{extra} {c.description}")
        form = "narrow" if self.narrow else "scatter"
        if self.per_filter is not None:
            lines.append(f"  {form}: {self.per_filter.flops:,} FLOPs and "
                         f"{self.per_filter.params:,} params per filter")
        return "\n".join(lines)


_NARROW_KINDS = ("conv", "linear", "linear_flat")


def _elementwise_after_flatten(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """`node` applies an element-wise op that keeps zero and has no parameters to the flattened
    `src` (Dropout, Identity, ReLU, ...): columns stay columns and a zero column stays zero.
    Channel-wise pooling, upsampling and padding act along the flattened dimension: not these."""
    if node.op != "call_module" or node.args != (src,) or node.kwargs:
        return False
    m = gm.get_submodule(node.target)
    if type(m).__module__ in ("torch.nn.modules.pooling", "torch.nn.modules.upsampling",
                              "torch.nn.modules.padding") or any(True for _ in m.parameters()):
        return False
    return opsem.keeps_zero(gm, node) and opsem.is_channelwise(gm, node, src)


def linears_after_flatten(gm: fx.GraphModule, flat: fx.Node) -> list[str] | None:
    """The Linear layers (each called once) that read the flattened tensor `flat`, through
    element-wise ops that keep zero (Dropout, ReLU, ...); None if anything else reads it."""
    out: list[str] = []
    stack = [flat]
    while stack:
        node = stack.pop()
        if not node.users:
            return None
        for u in node.users:
            if u.op != "call_module" or u.args != (node,) or u.kwargs:
                return None
            if isinstance(gm.get_submodule(u.target), nn.Linear):
                if _call_count(gm, u.target) != 1:
                    return None
                out.append(str(u.target))
            elif _elementwise_after_flatten(gm, u, node):
                stack.append(u)
            else:
                return None
    return out


def _call_count(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def is_first_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True if no conv or linear layer lies between the network input and `node` (its weights
    then act on the input directly, e.g. on image pixels)."""
    for n in reachable(node, downstream=False):
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            return False
        if n.op == "call_function" and n.target in (torch.nn.functional.conv2d,
                                                    torch.nn.functional.linear, torch.conv2d):
            return False
    return True


def _classify(gm: fx.GraphModule, cut: Cut) -> tuple[Consumer, ...]:
    kind = next((k for k in UNIT_LAYERS if isinstance(cut.conv, k)), None)
    out: list[Consumer] = []
    for u in cut.node.users:
        desc = opsem.describe(u)
        if u.op == "call_module" and u.args == (cut.node,) and not u.kwargs:
            m = gm.get_submodule(u.target)
            once = _call_count(gm, u.target) == 1
            # a conv reads channels of a conv of its own kind; a linear layer reads the last
            # dimension, which is the unit dimension only for a linear layer's [batch, features]
            if kind in (nn.Conv2d, nn.Conv1d) and isinstance(m, kind) and m.groups == 1 and once:
                out.append(Consumer("conv", u, str(u.target), 1, desc))
                continue
            if kind is nn.Linear and isinstance(m, nn.Linear) and once:
                out.append(Consumer("linear", u, str(u.target), 1, desc))
                continue
        if opsem.is_flatten(gm, u, cut.node):
            lins = linears_after_flatten(gm, u)
            if lins is not None:
                for name in lins:
                    block = gm.get_submodule(name).in_features // cut.num_filters
                    out.append(Consumer("linear_flat", u, name, block, desc))
                continue
        if opsem.is_elementwise_binary(u):
            mul = u.target in (operator.mul, torch.mul) or u.target == "mul"
            out.append(Consumer("mul" if mul else "add", u, None, 1, desc))
            continue
        dim = opsem.concat_dim(u)
        if dim is not None:
            tm = cut.node.meta.get("tensor_meta")
            rank = len(tm.shape) if tm is not None and hasattr(tm, "shape") else None
            if dim == 1 or (dim < 0 and rank is not None and dim + rank == 1):
                out.append(Consumer("concat", u, None, 1, desc))
                continue
        out.append(Consumer("other", u, None, 1, desc))
    return tuple(out)


def _readers(gm: fx.GraphModule, cut: Cut) -> tuple[Reader, ...]:
    channels = cut.num_filters
    linear_units = isinstance(cut.conv, nn.Linear)
    found: list[Reader] = []
    seen: set[fx.Node] = set()
    stack: list[tuple[fx.Node, fx.Node]] = [(u, cut.node) for u in cut.node.users]
    while stack:
        node, src = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and node.args == (src,) and not node.kwargs:
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.Conv2d | nn.Conv1d) and m.groups == 1 and not linear_units:
                found.append(Reader(str(node.target), "conv"))
                continue
            if isinstance(m, nn.Linear) and linear_units:  # reads the features directly
                found.append(Reader(str(node.target), "linear"))
                continue
        if opsem.is_flatten(gm, node, src):
            for name in linears_after_flatten(gm, node) or []:
                inputs = gm.get_submodule(name).in_features
                if inputs % channels:
                    raise CutError(f"linear layer {name!r} has {inputs} inputs, not a multiple "
                                   f"of the {channels} channels of {cut.layer!r}")
                found.append(Reader(name, "linear", inputs // channels))
            continue
        if opsem.is_channelwise(gm, node, src) or (
                opsem.is_elementwise_binary(node) and not node.kwargs):
            stack.extend((u, node) for u in node.users)
    return tuple(sorted(found, key=lambda r: r.module))


def _shape(node: fx.Node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        raise CutError(f"no tensor shape was recorded for {opsem.describe(node)}")
    return tuple(int(s) for s in tm.shape)


def _rows(node: fx.Node, features: int) -> int:
    """Output positions per image of a conv (spatial size) or rows of a linear layer."""
    shape = _shape(node)
    return math.prod(shape) // max(1, shape[0] * features)


def _node_of(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _filter_cost(gm: fx.GraphModule, cut: Cut, consumers: tuple[Consumer, ...], narrow: bool
                 ) -> FilterCost:
    conv = cut.conv
    if isinstance(conv, nn.Linear):
        w_row = conv.in_features
        flops = _rows(cut.conv_node, conv.out_features) * w_row
    else:
        w_row = math.prod(conv.kernel_size) * (conv.in_channels // conv.groups)
        flops = _rows(cut.conv_node, conv.out_channels) * w_row
    layer_flops, layer_bytes = flops, 4 * w_row
    params, nbytes = w_row + (1 if conv.bias is not None else 0), 4 * w_row
    if narrow:
        channels = cut.num_filters
        for n in cut.chain_nodes:
            r = opsem.rule(gm, n)
            if n.op != "call_module" or r is None or r.params is None:
                continue
            m = gm.get_submodule(n.target)
            params += sum(p.numel() for p in m.parameters()) // channels
            if r.params == "depthwise":     # one k x k filter per channel
                k = math.prod(m.kernel_size)
                flops += _rows(n, m.out_channels) * k
                nbytes += 4 * k
        for c in consumers:
            if c.kind not in _NARROW_KINDS:
                continue
            m = gm.get_submodule(c.module)
            node = c.node if c.kind == "conv" else _node_of(gm, c.module)
            if c.kind == "conv":
                w = math.prod(m.kernel_size) * m.out_channels
                flops += _rows(node, m.out_channels) * w
            else:
                w = c.block * m.out_features
                flops += _rows(node, m.out_features) * w
            params += w
            nbytes += 4 * w
    return FilterCost(flops=flops, params=params, bytes=nbytes, layer_flops=layer_flops,
                      layer_bytes=layer_bytes)


def analyze(model: nn.Module, layer: str, example_input: torch.Tensor | None = None
            ) -> LayerAnalysis:
    """The `LayerAnalysis` of `layer` (a Conv2d, Conv1d or Linear of `model`), from one trace.

    `example_input`: a batch such as torch.zeros(1, 3, 32, 32) (only its shape matters); with
    it, tensor shapes are recorded on the graph (torch.fx ShapeProp, one image) and
    `per_filter` is filled. Raises `CutError` as `trace` and `find_cut` do, ValueError when the
    input does not fit the model."""
    gm = trace(model)
    input_shape = None
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
            raise ValueError("example_input must be a batch tensor [N, C, ...] such as "
                             f"torch.zeros(1, 3, 32, 32), got {type(example_input).__name__} "
                             f"{tuple(getattr(example_input, 'shape', ()))}")
        ref = next(iter(gm.parameters()), None)
        x = example_input[:1].to(ref.device if ref is not None else "cpu",
                                 ref.dtype if ref is not None and ref.is_floating_point()
                                 else torch.float32)
        propagate_shapes(gm, x, type(model).__name__)
        input_shape = tuple(int(s) for s in x.shape[1:])
    cut = find_cut(gm, layer)
    consumers = _classify(gm, cut)
    # a scattered conv (`surgery.ScatteredConv2d`) computes fewer filters than its width
    scattered = isinstance(cut.conv, nn.Conv2d) and cut.conv.weight.shape[0] != cut.conv.out_channels
    narrow = not scattered and all(c.kind in _NARROW_KINDS for c in consumers)
    return LayerAnalysis(
        layer=layer, gm=gm, cut=cut, chain=tuple(cut.chain_nodes), consumers=consumers,
        readers=_readers(gm, cut), fused=find_fused_consumer(gm, cut),
        bn_node=opsem.bn_after(gm, cut.conv_node), first_layer=is_first_layer(gm, cut.conv_node),
        narrow=narrow, input_shape=input_shape,
        per_filter=_filter_cost(gm, cut, consumers, narrow) if input_shape is not None else None)


def analysis_of(model: nn.Module | LayerAnalysis, layer: str | None = None,
                example_input: torch.Tensor | None = None) -> LayerAnalysis:
    """`model` itself when it is already a `LayerAnalysis` (of `layer`, when given), else
    `analyze(model, layer, example_input)`: how stages accept either."""
    if isinstance(model, LayerAnalysis):
        if layer is not None and layer != model.layer:
            raise ValueError(f"the analysis is of layer {model.layer!r}, not {layer!r}")
        return model
    if layer is None:
        raise ValueError("layer must name a conv or linear layer when a model is given")
    return analyze(model, layer, example_input)
