"""The standard residual-network ending, evaluated with the fused consumer in one kernel.

After the fused consumer conv (+ BatchNorm [+ ReLU], `graph.find_fused_consumer`) most
classification ResNets end the same way: the block's shortcut is added (or not), a ReLU
follows, then a global average pool, a flatten and one Linear layer. When the tail graph is
exactly that, `ops.ablate_conv_head` computes per (ablation, image) the pooled features and
the logits directly, never writing the ablated [m * B, F, H, W] feature map that the separate
tail ops would read and write once per op. `find_fused_head` recognises the ending whatever
spelling the model's forward() uses; any other tail keeps the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _ops, opsem
from .graph import FusedConsumer, Split

# Modules that are the identity in eval mode (graph.trace puts the model in eval mode).
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass
class FusedHead:
    """The tail after the fused consumer: [+ residual] -> [ReLU] -> global average pool ->
    flatten -> Linear, with `residual` the name of the cached tensor added (None: no add)."""

    residual: str | None
    relu: bool            # a ReLU after the add (or after the consumer when there is no add)
    linear: nn.Linear
    steps: list[str]      # the matched tail ops, for describe()

    def describe(self) -> str:
        return " -> ".join(self.steps)

    def logits(self, fused: FusedConsumer, a: torch.Tensor, weight: torch.Tensor, z: torch.Tensor,
               scale: torch.Tensor, shift: torch.Tensor, channels: torch.Tensor,
               residual: torch.Tensor | None) -> torch.Tensor:
        """[m, B, K] logits with channel channels[j] of `a` removed (-1: nothing removed)."""
        c = fused.conv
        bias = self.linear.bias.detach() if self.linear.bias is not None else None
        return _ops.ablate_conv_head(a, weight, z, scale, shift, channels, c.stride, c.padding,
                                     c.dilation, fused.relu, residual, self.relu,
                                     self.linear.weight.detach(), bias)


def _module(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def _arg(n: fx.Node, i: int, name: str, default: object) -> object:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _only_kwargs(n: fx.Node, allowed: set[str]) -> bool:
    return set(n.kwargs) <= allowed


def _is_relu(gm: fx.GraphModule, n: fx.Node, x: fx.Node) -> bool:
    if not n.args or n.args[0] is not x:
        return False
    if n.op == "call_module":
        return type(_module(gm, n)) is nn.ReLU and len(n.args) == 1 and not n.kwargs
    if n.op == "call_function" and n.target in (F.relu, torch.relu):
        return _arg(n, 1, "inplace", False) is False and _only_kwargs(n, {"inplace"}) \
            and len(n.args) <= 2
    return n.op == "call_method" and n.target == "relu" and len(n.args) == 1 and not n.kwargs


def _is_one(size: object) -> bool:
    return size == 1 or (isinstance(size, tuple | list) and tuple(size) == (1, 1))


def _global_pool(gm: fx.GraphModule, n: fx.Node, x: fx.Node) -> bool | None:
    """If `n` averages x over its two spatial dimensions: whether the result keeps them
    ([B, F, 1, 1]); None if `n` is not such a pool."""
    if not n.args or n.args[0] is not x:
        return None
    if n.op == "call_module":
        m = _module(gm, n)
        if type(m) is nn.AdaptiveAvgPool2d and _is_one(m.output_size) and len(n.args) == 1:
            return True
        return None
    if n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
        ok = _is_one(_arg(n, 1, "output_size", None)) and _only_kwargs(n, {"output_size"})
        return True if ok else None
    if (n.op == "call_method" and n.target == "mean") or \
            (n.op == "call_function" and n.target is torch.mean):
        dims = _arg(n, 1, "dim", None)
        keep = _arg(n, 2, "keepdim", False)
        if not _only_kwargs(n, {"dim", "keepdim"}) or len(n.args) > 3 or not isinstance(keep, bool):
            return None
        if isinstance(dims, tuple | list) and len(dims) == 2 and \
                all(isinstance(d, int) for d in dims) and {d % 4 for d in dims} == {2, 3}:
            return keep
    return None


def _flatten(gm: fx.GraphModule, x: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """If x's users flatten it to [B, F]: (the flattened node, every node used)."""
    users = list(x.users)
    if len(users) == 2:  # x.view(x.size(0), -1) / x.reshape(x.size(0), -1)
        size = next((u for u in users if u.op == "call_method" and u.target == "size"), None)
        view = next((u for u in users if u is not size), None)
        if size is None or size.args != (x, 0) or size.kwargs or list(size.users) != [view]:
            return None
        if view.op == "call_method" and view.target in ("view", "reshape") and \
                view.args == (x, size, -1) and not view.kwargs:
            return view, [size, view]
        return None
    if len(users) != 1:
        return None
    (n,) = users
    if not n.args or n.args[0] is not x:
        return None
    if n.op == "call_module":
        m = _module(gm, n)
        ok = type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim in (-1, 3)
        return (n, [n]) if ok and len(n.args) == 1 else None
    if (n.op == "call_function" and n.target is torch.flatten) or \
            (n.op == "call_method" and n.target == "flatten"):
        start, end = _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1)
        ok = start == 1 and end in (-1, 3) and _only_kwargs(n, {"start_dim", "end_dim"})
        return (n, [n]) if ok else None
    return None


def _describe(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return f"{n.target} ({type(_module(gm, n)).__name__})"
    name = getattr(n.target, "__name__", str(n.target))
    return f"{name}()" if n.op == "call_function" else f".{name}()"


def find_fused_head(split: Split) -> FusedHead | None:
    """The fused ending of `split`'s tail, if the whole tail is exactly
    [+ cached tensor] -> [ReLU] -> global average pool -> [flatten] -> Linear -> output;
    otherwise None (the tail then runs as its own graph)."""
    fused = split.fused
    if fused is None:
        return None
    gm = split.tail
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    out = next(n for n in nodes if n.op == "output")
    if not inputs or inputs[0].target != split.tail_inputs[0]:
        return None

    used: list[fx.Node] = []

    def step(n: fx.Node) -> tuple[fx.Node | None, fx.Node]:
        """(n's single user, the node it reads), skipping eval-mode identities (dropout,
        Identity); (None, n) if n has other users."""
        while len(n.users) == 1:
            (u,) = n.users
            if u.op == "call_module" and isinstance(_module(gm, u), _PASS_THROUGH) and \
                    u.args == (n,) and not u.kwargs:
                used.append(u)
                n = u
                continue
            return u, n
        return None, n

    steps = []
    nxt, x = step(inputs[0])
    if nxt is None:
        return None
    residual = None
    other = opsem.added_operand(nxt, x)
    if other is not None:
        # the shortcut must be a cached tensor that no ablation changes: a tail input other
        # than the consumer's output and the cut activation itself
        if other.op != "placeholder" or other is inputs[0] or other.target == split.live[0]:
            return None
        residual = str(other.target)
        steps.append(f"+ {residual}")
        used.append(nxt)
        nxt, x = step(nxt)
        if nxt is None:
            return None
    relu = False
    if _is_relu(gm, nxt, x):
        relu = True
        steps.append(_describe(gm, nxt))
        used.append(nxt)
        nxt, x = step(nxt)
        if nxt is None:
            return None
    keep = _global_pool(gm, nxt, x)
    if keep is None:
        return None
    steps.append(_describe(gm, nxt))
    used.append(nxt)
    flat = _flatten(gm, nxt)
    if flat is not None:  # required after a pool that keeps [B, F, 1, 1]; harmless after [B, F]
        nxt, flat_nodes = flat
        steps.append(_describe(gm, nxt))
        used.extend(flat_nodes)
    elif keep:
        return None
    lin, x = step(nxt)
    if lin is None or lin.op != "call_module" or lin.args != (x,) or lin.kwargs:
        return None
    linear = _module(gm, lin)
    if type(linear) is not nn.Linear or linear.in_features != fused.conv.out_channels:
        return None
    steps.append(_describe(gm, lin))
    used.append(lin)
    if list(lin.users) != [out] or out.args[0] is not lin:
        return None
    # nothing else may happen in the tail
    rest = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
    if set(rest) != set(used):
        return None
    return FusedHead(residual=residual, relu=relu, linear=linear, steps=steps)
