"""Structural pruning: remove conv filters (or the neurons of a linear layer) and their outgoing
connections for real, so the pruned network is smaller and computes exactly what the masked
network (channel zeroed at the cut) computes.

Units are the output channels of an nn.Conv2d or nn.Conv1d and the output features of an
nn.Linear on [batch, features] inputs. Two forms, chosen from where the layer's output is
consumed (`graph.find_cut`):

* narrow: every consumer of the cut is a conv of the same kind (groups 1), a linear layer after
  a flatten, or (for a linear layer's features) a linear layer directly. The layer loses its
  units, its channel-wise followers (BatchNorm, per-channel PReLU) shrink with it and the
  consumers lose the matching inputs (a linear layer after a flatten loses the column block of
  each channel: in_features // channels columns).
* scatter: the cut also feeds something whose width cannot change (a residual add, an identity
  or padding shortcut, a concatenation, ...). The conv becomes a `ScatteredConv2d` that computes
  only the kept filters and writes them into a zero tensor of the full width; its BatchNorm keeps
  full width with weight 0 and bias 0 on the removed channels, so they stay exactly 0 up to the
  cut. Consumers keep their width. Every operation between conv and cut must map 0 to 0.
  Conv2d layers only: a Conv1d or Linear layer whose output feeds such an operation is not pruned.

Indices always number the layer's output channels as the model computes them now: for a narrowed
conv, its current filters; for a scattered conv, whose output keeps the full width, the channels
of that output (the original filters). Each pruned conv remembers which ORIGINAL filters it kept
(`kept_channels`), which is all `save_pruned` writes besides the weights: `load_pruned` re-applies
the surgery to the original architecture, so no code is ever pickled.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from . import graph
from .graph import UNIT_LAYERS
from .graph import num_units as _num_units
from .io import atomic_open, read_json, read_tensor_file, write_json

STRUCTURE_FORMAT = "carprune.PrunedStructure"
STRUCTURE_VERSION = 1
WEIGHTS_FILE = "weights.pt"
STRUCTURE_FILE = "structure.json"
# attribute of a pruned conv: {"kept": original filter indices kept, "filters": original count}
LINEAGE_ATTR = "carprune_lineage"

# Channel-wise operations that map an all-zero channel to an all-zero channel (f(0) = 0), so a
# removed filter's zero output stays zero up to the cut. BatchNorm is made so (weight = bias = 0).
_ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.PReLU, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity,
)
_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    torch.tanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.dropout, F.dropout2d,
}
_ZERO_PRESERVING_METHODS = {"relu", "tanh", "contiguous", "clone"}
# element-wise modules allowed between a flatten and the linear layer consuming it
_ELEMENTWISE_AFTER_FLATTEN: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
    nn.Sigmoid,
)


class ScatteredConv2d(nn.Conv2d):
    """A conv that computes only its kept filters and scatters them into a zero tensor of full
    width (`out_channels`), so that a residual add or shortcut downstream keeps its width.

    `weight` holds the kept filters only ([len(out_index), in/groups, kh, kw]); the buffer
    `out_index` says which output channel each of them fills.
    """

    carprune_leaf = True  # graph.trace keeps it a single call_module node
    out_index: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any,
                 out_index: Sequence[int] | torch.Tensor, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: Any = None, dtype: Any = None) -> None:
        idx = torch.as_tensor(out_index, dtype=torch.int64).flatten().cpu()
        if idx.numel() == 0:
            raise ValueError("a ScatteredConv2d needs at least one kept filter")
        if bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= out_channels:
            raise ValueError(f"out_index must be increasing indices in [0, {out_channels}), "
                             f"got {idx.tolist()}")
        if groups != 1:
            raise ValueError("a ScatteredConv2d supports groups=1 only")
        super().__init__(in_channels, idx.numel(), kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self.out_channels = out_channels
        self.register_buffer("out_index", idx.to(device))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rows: Sequence[int], out_index: Sequence[int]
                  ) -> ScatteredConv2d:
        """The conv's weight rows `rows`, filling output channels `out_index` of its full width."""
        w = conv.weight
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, out_index, conv.stride,
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                  conv.padding_mode, device=w.device, dtype=w.dtype)
        r = torch.as_tensor(list(rows), dtype=torch.int64, device=w.device)
        with torch.no_grad():
            new.weight.copy_(w.detach()[r])
            if conv.bias is not None:
                new.bias.copy_(conv.bias.detach()[r])
        new.weight.requires_grad_(w.requires_grad)
        if conv.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        new.train(conv.training)
        return new

    @property
    def num_kept(self) -> int:
        return int(self.out_index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        out = y.new_zeros((y.shape[0], self.out_channels, *y.shape[2:]))
        return out.index_copy(1, self.out_index, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept={self.num_kept}"


# -- helpers -------------------------------------------------------------------------------------
def copy_model(model: nn.Module) -> nn.Module:
    """An independent deep copy (what `prune_filters` returns when nothing is removed)."""
    return copy.deepcopy(model)


def _lineage(conv: nn.Module) -> tuple[list[int], int]:
    """(original filter index of each current output channel, original filter count).

    For a narrowed conv the output channels are its kept filters; a scattered conv's output
    channels are the full width it had when it was scattered (normally the original filters)."""
    lin = getattr(conv, LINEAGE_ATTR, None)
    if lin is None:
        return list(range(_num_units(conv))), _num_units(conv)
    return list(lin["positions"]), int(lin["filters"])


def channel_origins(conv: nn.Module) -> list[int]:
    """The original filter index behind each output channel of `conv` as numbered now (the
    numbering `prune_filters` takes): `channel_origins(conv).index(f)` is original filter f's
    current index. A scattered conv's removed channels are listed too (they stay, as zeros)."""
    return _lineage(conv)[0]


def kept_channels(model: nn.Module) -> dict[str, list[int]]:
    """{layer: original filter (unit) indices it keeps} for every pruned layer of `model`."""
    out = {}
    for name, m in model.named_modules():
        lin = getattr(m, LINEAGE_ATTR, None)
        if isinstance(m, UNIT_LAYERS) and lin is not None:
            out[name] = [int(i) for i in lin["kept"]]
    return out


def _as_index_list(indices: Any, layer: str) -> list[int]:
    if isinstance(indices, torch.Tensor | np.ndarray):
        if indices.ndim > 1:
            raise ValueError(f"filter indices for {layer!r} must be one-dimensional, "
                             f"got shape {tuple(indices.shape)}")
        indices = indices.tolist()
    elif isinstance(indices, int | np.integer):
        raise ValueError(f"filter indices for {layer!r} must be a sequence, got the single "
                         f"integer {indices}; wrap it in a list")
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise ValueError(f"filter indices for {layer!r} must be integers, got {i!r}")
        out.append(int(i))
    return out


def _check_indices(indices: Any, layer: str, width: int, present: Sequence[int]) -> list[int]:
    """Validated, sorted filter positions to remove; `present` are the positions that still
    carry a filter (all of them for a narrowed conv)."""
    idx = _as_index_list(indices, layer)
    if not idx:
        raise ValueError(f"no filters given to remove from {layer!r} (empty index list)")
    dup = sorted({i for i in idx if idx.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate filter indices {dup} for {layer!r}")
    bad = sorted(i for i in idx if not 0 <= i < width)
    if bad:
        raise ValueError(f"filter indices {bad} are out of range for {layer!r}, which has "
                         f"{width} output channels (valid: 0..{width - 1})")
    alive = set(present)
    gone = sorted(i for i in idx if i not in alive)
    if gone:
        raise ValueError(f"filters {gone} of {layer!r} are already removed (the layer keeps output "
                         f"channels {sorted(alive)})")
    if len(alive - set(idx)) == 0:
        raise ValueError(f"cannot remove all {len(alive)} remaining filters of {layer!r}: at least "
                         "one must stay")
    return sorted(idx)


def _call_count(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _is_flatten(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
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
    return False


def linears_after_flatten(gm: fx.GraphModule, flat: fx.Node) -> list[str] | None:
    """The Linear layers that consume the flattened tensor `flat` (through element-wise modules
    such as Dropout); None if anything else uses it."""
    out: list[str] = []
    stack = [flat]
    while stack:
        node = stack.pop()
        if not node.users:
            return None
        for u in node.users:
            if u.op != "call_module" or u.args != (node,) or u.kwargs:
                return None
            m = gm.get_submodule(u.target)
            if isinstance(m, nn.Linear):
                if _call_count(gm, u.target) != 1:
                    return None
                out.append(str(u.target))
            elif isinstance(m, _ELEMENTWISE_AFTER_FLATTEN):
                stack.append(u)
            else:
                return None
    return out


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "output":
        return "the network output"
    return f"{node.op} {getattr(node.target, '__name__', str(node.target))}"


def _plan_consumers(gm: fx.GraphModule, cut: graph.Cut) -> tuple[list[str], list[str], list[str]]:
    """(conv consumers, linear consumers (after a flatten, or of a linear layer's features
    directly), descriptions of other users)."""
    convs: list[str] = []
    linears: list[str] = []
    other: list[str] = []
    kind = next((k for k in UNIT_LAYERS if isinstance(cut.conv, k)), None)
    for u in cut.node.users:
        if u.op == "call_module" and u.args == (cut.node,) and not u.kwargs:
            m = gm.get_submodule(u.target)
            once = _call_count(gm, u.target) == 1
            # a conv reads channels of a conv of its own kind; a linear layer reads the last
            # dimension, which is the unit dimension only for a linear layer's [batch, features]
            if kind in (nn.Conv2d, nn.Conv1d) and isinstance(m, kind) and m.groups == 1 and once:
                convs.append(str(u.target))
                continue
            if kind is nn.Linear and isinstance(m, nn.Linear) and once:
                linears.append(str(u.target))
                continue
        if _is_flatten(gm, u, cut.node):
            lins = linears_after_flatten(gm, u)
            if lins is not None:
                linears.extend(lins)
                continue
        other.append(_describe(u))
    return convs, linears, other


def _chain_nodes(cut: graph.Cut) -> list[fx.Node]:
    nodes, node = [], cut.conv_node
    while node is not cut.node:
        (node,) = node.users
        nodes.append(node)
    return nodes


def _zero_preserving(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Hardtanh):  # also ReLU6
            return m.min_val <= 0 <= m.max_val
        return isinstance(m, _ZERO_PRESERVING_MODULES)
    if node.op == "call_function":
        return node.target in _ZERO_PRESERVING_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ZERO_PRESERVING_METHODS
    return False


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _narrow_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, keep: torch.Tensor) -> None:
    if bn.affine:
        bn.weight = _param(bn.weight[keep.to(bn.weight.device)], bn.weight)
        bn.bias = _param(bn.bias[keep.to(bn.bias.device)], bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep.to(bn.running_mean.device)].clone()
        bn.running_var = bn.running_var[keep.to(bn.running_var.device)].clone()
    bn.num_features = int(keep.numel())


def _chain_module(model: nn.Module, gm: fx.GraphModule, node: fx.Node, layer: str) -> nn.Module | None:
    if node.op != "call_module":
        return None
    if _call_count(gm, node.target) != 1 and any(True for _ in gm.get_submodule(node.target).parameters()):
        raise graph.CutError(f"{node.target!r} after {layer!r} is called more than once in forward(); "
                             "a shared module with per-channel parameters cannot be pruned for one "
                             "of its uses")
    return model.get_submodule(str(node.target))


# -- surgery -------------------------------------------------------------------------------------
def _prune_inplace(model: nn.Module, layer: str, indices: Any) -> None:
    gm = graph.trace(model)
    cut = graph.find_cut(gm, layer)
    conv = model.get_submodule(layer)
    if getattr(conv, "groups", 1) != 1:
        raise graph.CutError(f"layer {layer!r} is a grouped conv (groups={conv.groups}); removing its "
                             "filters would break the grouping, so only groups=1 convs are pruned")
    width = _num_units(conv)
    scattered = isinstance(conv, ScatteredConv2d)
    present = conv.out_index.tolist() if scattered else list(range(width))
    remove = _check_indices(indices, layer, width, present)
    convs, linears, other = _plan_consumers(gm, cut)
    chain = _chain_nodes(cut)
    origin, total = _lineage(conv)
    gone = set(remove)
    dev = conv.weight.device
    if not scattered and not other:
        # narrow: conv, per-channel followers and consumers all shrink
        keep_l = [i for i in range(width) if i not in gone]
        keep = torch.tensor(keep_l, dtype=torch.int64, device=dev)
        followers = [m for m in (_chain_module(model, gm, node, layer) for node in chain) if m is not None]
        for m in followers:  # validate everything before changing anything
            if not isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.PReLU) and \
                    any(True for _ in m.parameters()):
                raise graph.CutError(f"{type(m).__name__} between {layer!r} and its cut has "
                                     "parameters that carprune does not know how to narrow")
        for name in linears:
            if model.get_submodule(name).in_features % width:
                raise graph.CutError(f"linear layer {name!r} after {layer!r} has "
                                     f"{model.get_submodule(name).in_features} inputs, not a multiple "
                                     f"of the {width} channels it flattens")
        for m in followers:
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                _narrow_bn(m, keep)
            elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
                m.weight = _param(m.weight[keep.to(m.weight.device)], m.weight)
                m.num_parameters = len(keep_l)
        conv.weight = _param(conv.weight[keep], conv.weight)
        if conv.bias is not None:
            conv.bias = _param(conv.bias[keep], conv.bias)
        if isinstance(conv, nn.Linear):
            conv.out_features = len(keep_l)
        else:
            conv.out_channels = len(keep_l)
        for name in convs:
            c = model.get_submodule(name)
            k = keep.to(c.weight.device)
            c.weight = _param(c.weight[:, k], c.weight)
            c.in_channels = len(keep_l)
        for name in linears:
            lin = model.get_submodule(name)
            block = lin.in_features // width
            cols = (keep.to(lin.weight.device)[:, None] * block
                    + torch.arange(block, device=lin.weight.device)[None, :]).flatten()
            lin.weight = _param(lin.weight[:, cols], lin.weight)
            lin.in_features = int(cols.numel())
        kept_orig = [origin[i] for i in keep_l]
        setattr(conv, LINEAGE_ATTR, {"kept": kept_orig, "positions": kept_orig, "filters": total})
        return
    # scatter: the output keeps its width; removed channels are exactly 0 up to the cut
    why = ", ".join(other) if other else "an earlier scatter"
    if not isinstance(conv, nn.Conv2d):
        raise graph.CutError(
            f"layer {layer!r} ({type(conv).__name__}) feeds {why}, which cannot lose inputs; only "
            "Conv2d layers keep their width by scattering, so its units cannot be removed here")
    for node in chain:
        if not _zero_preserving(gm, node):
            raise graph.CutError(
                f"layer {layer!r} feeds {why}, so its width must stay and removed filters must be "
                f"exactly zero at the cut, but {_describe(node)} does not map 0 to 0 "
                "(e.g. sigmoid(0) = 0.5): the filters cannot be removed without changing the output")
    bns = []
    for node in chain:
        m = _chain_module(model, gm, node, layer)
        if isinstance(m, nn.BatchNorm2d):
            bns.append(m)
    # weight row r of the conv fills output channel present[r] (row r = channel r unless scattered)
    new_idx = [i for i in present if i not in gone]
    rows = [r for r, i in enumerate(present) if i not in gone]
    new = ScatteredConv2d.from_conv(conv, rows, new_idx)
    setattr(new, LINEAGE_ATTR, {"kept": [origin[i] for i in new_idx], "positions": origin,
                                "filters": total})
    _set_submodule(model, layer, new)
    with torch.no_grad():
        for bn in bns:
            ch = torch.tensor(remove, dtype=torch.int64)
            if bn.affine:
                bn.weight[ch.to(bn.weight.device)] = 0
                bn.bias[ch.to(bn.bias.device)] = 0
            elif bn.running_mean is not None:
                # BN(0) = (0 - 0) / sqrt(var + eps) = 0
                bn.running_mean[ch.to(bn.running_mean.device)] = 0


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def prune_filters(model: nn.Module, layer: str, indices: Sequence[int] | torch.Tensor | np.ndarray
                  ) -> nn.Module:
    """A new model with filters `indices` of conv `layer` (or neurons of linear `layer`) and all
    their outgoing connections removed; `model` itself is not changed.

    `indices` number the layer's output channels as the model computes them now (see the module
    docstring). The pruned model's outputs equal those of `model` with these channels zeroed at
    the layer's cut. Raises ValueError for an empty, duplicate, out-of-range or all-filters index
    list and `graph.CutError` when the layer cannot be pruned (the message says why).
    """
    new = copy.deepcopy(model)
    _prune_inplace(new, layer, indices)
    return new


# -- save / load ---------------------------------------------------------------------------------
def save_pruned(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `weights.pt` (the state_dict, plain tensors) and `structure.json` (which original
    filters each pruned layer keeps) into `directory`, each atomically. No code is pickled:
    `load_pruned` rebuilds the structure from the original architecture."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, m in model.named_modules():
        lin = getattr(m, LINEAGE_ATTR, None)
        if isinstance(m, UNIT_LAYERS) and lin is not None:
            layers[name] = {"kept": [int(i) for i in lin["kept"]], "filters": int(lin["filters"])}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_open(d / WEIGHTS_FILE, "wb") as f:
        torch.save(state, f)
    write_json(d / STRUCTURE_FILE, {"format": STRUCTURE_FORMAT, "version": STRUCTURE_VERSION,
                                    "layers": layers})
    return d


def _read_structure(path: Path) -> dict[str, dict[str, Any]]:
    obj = read_json(path, "pruned-model structure")
    if not isinstance(obj, dict) or obj.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"{path} is not a carprune pruned-model structure "
                         f"(format {obj.get('format') if isinstance(obj, dict) else None!r}, "
                         f"expected {STRUCTURE_FORMAT!r})")
    if obj.get("version") != STRUCTURE_VERSION:
        raise ValueError(f"{path}: structure version {obj.get('version')!r} is not supported "
                         f"(this carprune reads version {STRUCTURE_VERSION})")
    layers = obj.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: 'layers' must map layer names to kept filters")
    for name, entry in layers.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("filters"), int)
              and isinstance(entry.get("kept"), list) and entry["kept"]
              and all(isinstance(i, int) and not isinstance(i, bool) for i in entry["kept"]))
        if not ok:
            raise ValueError(f"{path}: entry for layer {name!r} must be {{'kept': [int, ...], "
                             f"'filters': int}}, got {entry!r}")
        kept = entry["kept"]
        if sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= entry["filters"]:
            raise ValueError(f"{path}: kept filters of layer {name!r} must be increasing indices in "
                             f"[0, {entry['filters']}), got {kept}")
    return layers


def load_pruned(directory: str | os.PathLike, architecture: nn.Module) -> nn.Module:
    """Rebuild a model saved by `save_pruned` from `architecture`, an instance of the ORIGINAL
    unpruned network (its weights do not matter): the recorded surgery is re-applied, then the
    saved weights are loaded strictly. `architecture` itself is not changed."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"pruned-model directory not found: {d}")
    layers = _read_structure(d / STRUCTURE_FILE)
    wpath = d / WEIGHTS_FILE
    if not wpath.is_file():
        raise FileNotFoundError(f"pruned-model weights not found: {wpath}")
    state = read_tensor_file(wpath, "pruned-model weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pruned-model weights {wpath} do not hold a state_dict of tensors")
    already = kept_channels(architecture)
    if already:
        raise ValueError("load_pruned needs the original, unpruned architecture, but layers "
                         f"{sorted(already)} of the given model are already pruned")
    model = copy.deepcopy(architecture)
    modules = dict(model.named_modules())
    order = [n for n in modules if n in layers]
    missing = [n for n in layers if n not in modules]
    if missing:
        convs = graph.conv_layers(model)
        raise ValueError(f"{d / STRUCTURE_FILE} names layer(s) {missing} that "
                         f"{type(architecture).__name__} lacks; its conv layers are: {', '.join(convs)}")
    for name in order:
        m, entry = modules[name], layers[name]
        if not isinstance(m, UNIT_LAYERS):
            raise ValueError(f"{d / STRUCTURE_FILE} names layer {name!r}, but in "
                             f"{type(architecture).__name__} it is a {type(m).__name__}, not a "
                             "Conv2d, Conv1d or Linear layer")
        if _num_units(m) != entry["filters"]:
            raise ValueError(f"layer {name!r} has {_num_units(m)} filters in the given architecture "
                             f"but {entry['filters']} in the saved structure: not the same network")
        kept = set(entry["kept"])
        removed = [i for i in range(_num_units(m)) if i not in kept]
        if removed:
            _prune_inplace(model, name, removed)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {wpath} do not fit the rebuilt pruned model: {exc}") from exc
    return model


__all__ = [
    "ScatteredConv2d",
    "channel_origins",
    "copy_model",
    "kept_channels",
    "linears_after_flatten",
    "load_pruned",
    "prune_filters",
    "save_pruned",
]
