"""What each operation does to the channel dimension: the one table every stage reads.

Scoring (where a filter's removal takes effect), surgery (what must shrink with it), global
compression and whole-network units, criteria, fine-tuning groups, folding and interpretation
all ask the predicates here instead of keeping their own lists. Users extend the table:

    cp.register_channelwise(MyActivation, keeps_zero=True)   # output channel i reads only input
                                                              # channel i; f(0) = 0
    cp.register_leaf(MyBlock)                                 # torch.fx must not trace into it;
                                                              # its channels are not removable
    cp.register_channel_map(MyShortcut, mapping=..., narrow=...)   # reorders/pads channels

Facts each rule records:

* channel-wise: output channel i depends on input channel i only (activations, BatchNorm,
  pooling, dropout, spatial slicing). Removing a channel before or after such an op is the same
  removal; ZEROING is not the same unless the op keeps zero:
* keeps zero: f(all-zero channel) = all-zero channel (ReLU, tanh, max pooling, ...). Sigmoid,
  Hardsigmoid (f(0) = 1/2) and BatchNorm (f(0) = shift) do not. Removal is therefore defined
  as zeroing the channel where a channel-MIXING op reads it (after every channel-wise op), which
  is what the engine does; zeroing earlier is removal only through ops that keep zero.
* params: per-channel parameters that shrink with the channel: "bn" (BatchNorm), "prelu"
  (PReLU with one weight per channel), "depthwise" (a conv with groups = in = out channels).
* element-wise binary ops (add, sub, mul) couple the channels of their two inputs: channel i of
  one can only be removed together with channel i of the other. A multiply by a squeeze-excite
  gate couples the gate's channel with the main path's channel.
* concatenation along dim 1 places its inputs' channels side by side; flatten(start_dim=1)
  turns channel i into a block of columns that a linear layer reads.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class OpRule:
    """How one channel-wise operation treats channels (see the module docstring)."""

    keeps_zero: bool
    params: str | None = None        # None, "bn", "prelu" or "depthwise"
    relu: bool = False               # exactly max(x, 0): the fused kernels can apply it


@dataclass(frozen=True)
class ChannelMap:
    """A module that moves channels: output channel j is input channel mapping(m, in_width)[j],
    or a constant zero channel where that entry is None (e.g. an option-A padding shortcut).
    `narrow(module, in_width, kept_in, kept_out)` returns the module that computes the map
    restricted to the kept input and output positions (increasing positions in the current
    numbering of its `in_width` inputs and its outputs)."""

    mapping: Callable[[nn.Module, int], list[int | None]]
    narrow: Callable[[nn.Module, int, list[int], list[int]], nn.Module]


_ZERO = OpRule(keeps_zero=True)
_NONZERO = OpRule(keeps_zero=False)

_MODULE_RULES: dict[type, OpRule | Callable[[nn.Module], OpRule | None]] = {}
_FUNCTION_RULES: dict[object, OpRule] = {}
_METHOD_RULES: dict[str, OpRule] = {}
# functions of other libraries, by "module.qualname" (no import of those libraries needed)
_FUNCTION_NAME_RULES: dict[str, OpRule] = {
    # identity in eval mode, a per-sample scale in training: channel-wise, keeps zero
    "torchvision.ops.stochastic_depth.stochastic_depth": OpRule(keeps_zero=True),
}
_LEAVES: set[type] = set()
_TRACED_AS_CALLS: dict[Callable, None] = {}   # registered Python functions, in order
_CHANNEL_MAPS: dict[type, ChannelMap] = {}


def _hardtanh_rule(m: nn.Module) -> OpRule:
    return OpRule(keeps_zero=bool(m.min_val <= 0 <= m.max_val))


def _prelu_rule(m: nn.Module) -> OpRule:
    return OpRule(keeps_zero=True, params="prelu" if m.num_parameters > 1 else None)


def _bn_rule(m: nn.Module) -> OpRule:
    return OpRule(keeps_zero=False, params="bn")


def _install_defaults() -> None:
    for t in (nn.ReLU,):
        _MODULE_RULES[t] = OpRule(keeps_zero=True, relu=True)
    for t in (nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
              nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
              nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
              nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
              nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
              nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d):
        _MODULE_RULES[t] = _ZERO
    for t in (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus):
        _MODULE_RULES[t] = _NONZERO
    _MODULE_RULES[nn.Hardtanh] = _hardtanh_rule          # ReLU6 is a Hardtanh(0, 6)
    _MODULE_RULES[nn.PReLU] = _prelu_rule
    for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        _MODULE_RULES[t] = _bn_rule
    for f in (F.relu, torch.relu, torch.relu_):
        _FUNCTION_RULES[f] = OpRule(keeps_zero=True, relu=True)
    for f in (F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
              F.hardtanh, torch.tanh, F.tanh, F.max_pool1d, F.max_pool2d, F.avg_pool1d,
              F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
              F.adaptive_max_pool2d, F.dropout, F.dropout1d, F.dropout2d, F.interpolate):
        _FUNCTION_RULES[f] = _ZERO
    for f in (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus):
        _FUNCTION_RULES[f] = _NONZERO
    _METHOD_RULES["relu"] = OpRule(keeps_zero=True, relu=True)
    _METHOD_RULES["relu_"] = OpRule(keeps_zero=True, relu=True)
    for name in ("tanh", "contiguous", "clone", "detach", "float", "to"):
        _METHOD_RULES[name] = _ZERO
    _METHOD_RULES["sigmoid"] = _NONZERO


_install_defaults()

ELEMENTWISE_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, torch.add, torch.sub,
                                torch.mul}
ELEMENTWISE_BINARY_METHODS = {"add", "sub", "mul"}
CONCAT_FUNCTIONS = {torch.cat, torch.concat}


# -- registration ----------------------------------------------------------------------------
def register_channelwise(target: type[nn.Module] | Callable | str, *, keeps_zero: bool,
                         params: str | None = None) -> None:
    """Declare `target` channel-wise: output channel i depends on input channel i only.

    `target`: an nn.Module subclass (matched with isinstance), a function called in forward()
    (e.g. a custom activation function) or a Tensor method name. `keeps_zero`: f(0) = 0 for an
    all-zero channel. `params`: None, or "bn" / "prelu" when the module holds one parameter per
    channel laid out like BatchNorm's / PReLU's (surgery shrinks them with the channel).
    Scoring, surgery, global compression, whole-network units, criteria and interpretation all
    read this table. A module type is also made a torch.fx leaf, so it is seen as one op.
    """
    if params not in (None, "bn", "prelu"):
        raise ValueError(f"params must be None, 'bn' or 'prelu', got {params!r}")
    rule = OpRule(keeps_zero=bool(keeps_zero), params=params)
    if isinstance(target, str):
        _METHOD_RULES[target] = rule
    elif isinstance(target, type) and issubclass(target, nn.Module):
        _MODULE_RULES[target] = rule
        _LEAVES.add(target)
    elif callable(target):
        _FUNCTION_RULES[target] = rule
        if inspect.isfunction(target):   # a Python function: traced as one call, not entered
            _TRACED_AS_CALLS[target] = None
    else:
        raise TypeError(f"target must be an nn.Module subclass, a function or a method name, got "
                        f"{target!r}")


def register_leaf(module_type: type[nn.Module]) -> None:
    """Make `module_type` a torch.fx leaf: it is traced as one call and never entered (use it
    for modules whose forward() cannot be traced). Unless also declared channel-wise or a
    channel map, such a module mixes channels opaquely: the channels it reads cannot be
    removed, and the channels it writes are not prunable units."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_leaf takes an nn.Module subclass, got {module_type!r}")
    _LEAVES.add(module_type)


def register_channel_map(module_type: type[nn.Module], *,
                         mapping: Callable[[nn.Module, int], list[int | None]],
                         narrow: Callable[[nn.Module, int, list[int], list[int]], nn.Module]
                         ) -> None:
    """Declare a module that moves channels (see `ChannelMap`); it becomes a torch.fx leaf."""
    _CHANNEL_MAPS[module_type] = ChannelMap(mapping=mapping, narrow=narrow)
    _LEAVES.add(module_type)


# -- queries ---------------------------------------------------------------------------------
def _lookup_module(m: nn.Module) -> OpRule | None:
    for t in type(m).__mro__:
        if t in _MODULE_RULES:
            r = _MODULE_RULES[t]
            return r(m) if callable(r) and not isinstance(r, OpRule) else r
    return None


def wrapped_functions() -> tuple[Callable, ...]:
    """The Python functions registered channel-wise: torch.fx keeps each a single call (its
    `autowrap_functions`) instead of tracing into its body, so the rule applies."""
    return tuple(_TRACED_AS_CALLS)


def is_leaf(m: nn.Module) -> bool:
    """Whether torch.fx must keep `m` as one call (registered leaves and carprune's own modules
    marked `carprune_leaf`)."""
    return bool(getattr(type(m), "carprune_leaf", False)) or any(
        t in _LEAVES for t in type(m).__mro__)


def channel_map(m: nn.Module) -> ChannelMap | None:
    """The registered channel map of module `m`, if any."""
    for t in type(m).__mro__:
        if t in _CHANNEL_MAPS:
            return _CHANNEL_MAPS[t]
    return None


def is_depthwise(m: nn.Module) -> bool:
    """A conv with one filter per input channel (groups = in = out channels)."""
    return isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1 and \
        m.groups == m.in_channels == m.out_channels


def rule(gm: fx.GraphModule, node: fx.Node) -> OpRule | None:
    """The channel-wise rule of `node`, or None when it is not a known channel-wise op.
    Depthwise convs count as channel-wise with params "depthwise" (they do not keep zero when
    they have a bias)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if is_depthwise(m):
            return OpRule(keeps_zero=m.bias is None, params="depthwise")
        return _lookup_module(m)
    if node.op == "call_function":
        if node.target is operator.getitem and _is_spatial_slice(node):
            return _ZERO
        try:
            if node.target in _SPATIAL_FUNCTIONS and _spatial_dims_only(node):
                return _ZERO
            if node.target in _DIVISIONS and _by_a_number(node):
                return _ZERO
            r = _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
        if r is None:
            t = node.target
            r = _FUNCTION_NAME_RULES.get(f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', '')}")
        return r
    if node.op == "call_method":
        if node.target == "__getitem__" and _is_spatial_slice(node):
            return _ZERO
        if node.target in _SPATIAL_METHODS and _spatial_dims_only(node):
            return _ZERO
        if node.target in ("div", "true_divide") and _by_a_number(node):
            return _ZERO
        return _METHOD_RULES.get(node.target)
    return None


# reductions and squeezes that are channel-wise when their dims leave batch and channels whole:
# x.mean((2, 3)) as global average pooling, x.squeeze(-1) after it (all keep zero)
_SPATIAL_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.squeeze}
_SPATIAL_METHODS = {"mean", "sum", "amax", "squeeze"}


# x / 255, (a + b) / 2: division by a number keeps channels apart and zeros zero (a tensor
# divisor, even a per-channel constant, is not admitted: surgery would not narrow it)
_DIVISIONS = {operator.truediv, torch.div, torch.true_divide}


def _by_a_number(node: fx.Node) -> bool:
    return (len(node.args) == 2 and isinstance(node.args[1], (int, float))
            and not isinstance(node.args[1], bool) and node.args[1] != 0
            and node.kwargs.get("rounding_mode") is None)


def _spatial_dims_only(node: fx.Node) -> bool:
    """The op's `dim` names only dims 2 and above of its input (negative dims counted from its
    rank, read from the traced shapes); False when no dim is given (all dims, or for squeeze
    every size-1 dim, which may include the batch) or the input's rank is unknown."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    src = node.args[0] if node.args else None
    tm = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
    if dim is None or tm is None or not hasattr(tm, "shape"):
        return False
    rank = len(tm.shape)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not dims or not all(isinstance(d, int) and -rank <= d < rank for d in dims):
        return False
    return all(d % rank >= 2 for d in dims)


def _is_spatial_slice(node: fx.Node) -> bool:
    """x[:, :, ...] indexing that keeps dims 0 and 1 whole (e.g. x[:, :, ::2, ::2])."""
    idx = node.args[1] if len(node.args) > 1 else None
    if not isinstance(idx, tuple) or len(idx) < 2:
        return False
    full = slice(None, None, None)
    return idx[0] == full and idx[1] == full and all(
        isinstance(i, slice) or i is Ellipsis for i in idx[2:])


def is_channelwise(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """`node` applies a channel-wise op to `src` (its first argument) and to nothing else that
    depends on data."""
    if not node.args or node.args[0] is not src:
        return False
    if any(a is src for a in list(node.args[1:]) + list(node.kwargs.values())):
        return False
    if any(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args[1:]):
        return False
    return rule(gm, node) is not None


def keeps_zero(gm: fx.GraphModule, node: fx.Node) -> bool:
    """`node` maps an all-zero channel to an all-zero channel."""
    r = rule(gm, node)
    return r is not None and r.keeps_zero


def is_relu(gm: fx.GraphModule, node: fx.Node, src: fx.Node | None = None) -> bool:
    """`node` is exactly relu(src) (module, function or method; no other arguments)."""
    r = rule(gm, node)
    if r is None or not r.relu or len(node.args) != 1:
        return False
    return src is None or node.args[0] is src


def bn_after(gm: fx.GraphModule, node: fx.Node, kinds: tuple[type, ...] = (nn.BatchNorm2d,)
             ) -> fx.Node | None:
    """The BatchNorm node that is `node`'s only user and reads only it, with running
    statistics (what folding and the fused kernels can absorb), else None."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op != "call_module" or user.args != (node,) or user.kwargs:
        return None
    bn = gm.get_submodule(user.target)
    if type(bn) not in kinds or not bn.track_running_stats or bn.running_mean is None:
        return None
    return user


def is_elementwise_binary(node: fx.Node) -> bool:
    """add / sub / mul of two operands (tensors or scalars)."""
    if node.op == "call_function":
        try:
            ok = node.target in ELEMENTWISE_BINARY_FUNCTIONS
        except TypeError:
            return False
    else:
        ok = node.op == "call_method" and node.target in ELEMENTWISE_BINARY_METHODS
    return ok and len(node.args) == 2 and not {k for k in node.kwargs if k != "alpha"}


def added_operand(n: fx.Node, x: fx.Node) -> fx.Node | None:
    """The other operand if `n` is exactly x + other, out of place (operator.add, torch.add or
    Tensor.add, no alpha), other a tensor node that is not x itself; else None."""
    plain = (n.op == "call_function" and n.target in (operator.add, torch.add)) or \
        (n.op == "call_method" and n.target == "add")
    if not plain or len(n.args) != 2 or n.kwargs:
        return None
    a, b = n.args
    other = b if a is x else a if b is x else None
    return other if isinstance(other, fx.Node) and other is not x else None


def concat_dim(node: fx.Node) -> int | None:
    """The dim of a torch.cat node, or None if `node` is not a concatenation."""
    if node.op != "call_function":
        return None
    try:
        if node.target not in CONCAT_FUNCTIONS:
            return None
    except TypeError:
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def is_flatten(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """`node` flattens `src` from dim 1 to the end (nn.Flatten, torch.flatten, Tensor.flatten)."""
    if not node.args or node.args[0] is not src:
        return False
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3:
        # x.view(x.size(0), -1)
        return node.args[2] == -1
    return False


def describe(node: fx.Node) -> str:
    """A short name of the op at `node` for error messages."""
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "output":
        return "the network output"
    if node.op == "placeholder":
        return f"the input {node.name}"
    return f"{node.op} {getattr(node.target, '__name__', str(node.target))} (node {node.name})"


__all__ = [
    "ChannelMap",
    "OpRule",
    "bn_after",
    "channel_map",
    "concat_dim",
    "describe",
    "is_channelwise",
    "is_depthwise",
    "is_elementwise_binary",
    "is_flatten",
    "is_leaf",
    "is_relu",
    "keeps_zero",
    "register_channel_map",
    "register_channelwise",
    "register_leaf",
    "rule",
]
