"""Where a filter's removal takes effect in a network, and the network cut in two there.

Units are the filters of a conv layer (nn.Conv2d, nn.Conv1d: output channels) and the neurons of
a linear layer (nn.Linear on [batch, features]: output features); "channel i" below is unit i.
Removing filter i of conv layer L with all its outgoing connections is exactly zeroing channel
i where L's output is consumed: after the channel-wise operations that follow the conv
(BatchNorm, activation, pooling, dropout) and before the first operation that mixes channels
(a conv, a linear layer after flattening, a residual add). `find_cut` locates that point in
the torch.fx graph; `split_at` cuts the graph into a prefix (computed once per image) and a
tail (run once per ablation), with every tensor that is live across the cut cached.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

# Modules and functions that act on each channel separately: zeroing a channel before them or
# after them is the same as far as later layers can tell, so the cut moves past them.
CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
    nn.Dropout1d,
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
    nn.Dropout2d, nn.Identity,
)
CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardtanh, torch.sigmoid, torch.tanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.dropout, F.dropout2d, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d,
    F.adaptive_max_pool1d, F.dropout1d,
}
CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}


# Layers whose units (output channels or features) are scored and removed.
UNIT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d, nn.Linear)


def num_units(module: nn.Module) -> int:
    """Output channels of a conv, output features of a linear layer."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


class CutError(ValueError):
    """The layer cannot be scored or pruned; the message says why."""


class _Tracer(fx.Tracer):
    """The default tracer, except that carprune's own modules marked `carprune_leaf` (e.g. the
    pruned `surgery.ScatteredConv2d`) stay single call_module nodes, so a pruned layer is still
    found by name."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(getattr(type(m), "carprune_leaf", False)) or super().is_leaf_module(
            m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """A traced copy of `model` in eval mode, with in-place operations made out-of-place (the
    tail runs many times on cached tensors, which an in-place op would corrupt)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    try:
        tracer = _Tracer()
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


def _is_channelwise(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    if not node.args or node.args[0] is not src:
        return False
    if any(a is src for a in list(node.args[1:]) + list(node.kwargs.values())):
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in CHANNELWISE_METHODS
    return False


@dataclass
class Cut:
    """Where the filters of `layer` are removed: channel i of node `node` is zeroed."""

    layer: str
    conv: nn.Module                # the unit layer: Conv2d, Conv1d or Linear
    conv_node: fx.Node
    node: fx.Node
    chain: list[str] = field(default_factory=list)

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
    """The point after `layer`'s channel-wise followers where its filters' outputs are consumed."""
    conv_node = node = conv_call(gm, layer)
    conv = gm.get_submodule(layer)
    chain: list[str] = []
    while len(node.users) == 1:
        (user,) = node.users
        if not _is_channelwise(gm, user, node):
            break
        chain.append(str(user.target) if user.op == "call_module" else
                     getattr(user.target, "__name__", str(user.target)))
        node = user
    if any(u.op == "output" for u in node.users):
        raise CutError(f"layer {layer!r} has no valid cut: its filters' outputs are the network's "
                       "output itself, so no filter can be removed without changing the output size")
    if not node.users:
        raise CutError(f"layer {layer!r} has no valid cut: its output is never used")
    return Cut(layer=layer, conv=conv, conv_node=conv_node, node=node, chain=chain)


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
    extended over a following BatchNorm (eval statistics) and ReLU when each is its sole user."""
    for user in cut.node.users:
        if user.op != "call_module" or user.args[:1] != (cut.node,) or len(user.args) != 1:
            continue
        conv = gm.get_submodule(user.target)
        if not (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
                and isinstance(conv.padding, tuple)):
            continue
        nodes, end, bn, relu = [user], user, None, False
        if len(end.users) == 1:
            (nxt,) = end.users
            if nxt.op == "call_module" and type(gm.get_submodule(nxt.target)) is nn.BatchNorm2d:
                cand = gm.get_submodule(nxt.target)
                if cand.track_running_stats and cand.running_mean is not None:
                    bn, end = cand, nxt
                    nodes.append(nxt)
        if len(end.users) == 1:
            (nxt,) = end.users
            is_relu = (nxt.op == "call_module" and type(gm.get_submodule(nxt.target)) is nn.ReLU) \
                or (nxt.op == "call_function" and nxt.target in (F.relu, torch.relu)
                    and len(nxt.args) == 1) \
                or (nxt.op == "call_method" and nxt.target == "relu" and len(nxt.args) == 1)
            if is_relu and nxt.args[0] is end:
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
