"""Structural pruning: remove conv filters (or the neurons of a linear layer) and their outgoing
connections for real, so the pruned network is smaller and computes exactly what the masked
network computes. Two entry points:

* `prune_units(model, {unit: channels})`: whole-network units (`units.prunable_units`). Every
  producer, through module (BatchNorm, per-channel PReLU, depthwise conv), consumer (conv input
  channels; linear input columns after a flatten) and registered channel map of each unit loses
  the channels, so FLOPs fall everywhere the channel went, residual streams and concatenations
  included. The result equals `units.masked_forward` (the channels zeroed wherever a consumer
  reads them).
* `prune_filters(model, layer, indices)`: one layer's filters, the paper's per-layer protocol.
  Units are the output channels of an nn.Conv2d or nn.Conv1d and the output features of an
  nn.Linear on [batch, features] inputs. Two forms, chosen from where the layer's output is
  consumed (`graph.analyze`: the cut and its consumers classified):

  - narrow: every consumer of the cut is a conv of the same kind (groups 1), a linear layer
    after a flatten, or (for a linear layer's features) a linear layer directly. The layer loses
    its units, its channel-wise followers (BatchNorm, per-channel PReLU, a depthwise conv) shrink
    with it and the
    consumers lose the matching inputs (a linear layer after a flatten loses the column block of
    each channel: in_features // channels columns).
  - scatter: the cut also feeds something whose width cannot change (a residual add, an
    identity or padding shortcut, a concatenation, ...). The conv becomes a `ScatteredConv2d`
    that computes only the kept filters and writes them into a zero tensor of the full width;
    its BatchNorm keeps full width with weight 0 and bias 0 on the removed channels, so they stay
    exactly 0 up to the cut. Consumers keep their width. Every operation between conv and cut
    must map 0 to 0 (`opsem.keeps_zero`). Conv2d layers only: a Conv1d or Linear layer whose
    output feeds such an operation is not pruned.

Both compute, for every module they touch, the input and output positions it keeps, and narrow
each module from those lists (`_narrow_module`): one code path.

Indices always number channels as the model computes them now: a unit's channels as
`prunable_units` of the current model lists them; a narrowed conv's current filters; a scattered
conv's output (the full width it had when it was scattered). Every narrowed or scattered module
remembers which ORIGINAL input and output positions it keeps (its lineage, `LINEAGE_ATTR`), which
is all `save_pruned` writes besides the weights: `load_pruned` narrows each module of the
original architecture to its recorded positions, so no code is ever pickled.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from . import graph, opsem
from .graph import UNIT_LAYERS
from .graph import num_units as _num_units
from .io import atomic_open, read_json, read_tensor_file, write_json

STRUCTURE_FORMAT = "carprune.PrunedStructure"
STRUCTURE_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "weights.pt"
STRUCTURE_FILE = "structure.json"
# Attribute of every narrowed or scattered module (its lineage), a dict:
#   "kind": how it is narrowed ("conv", "linear", "depthwise", "bn", "prelu" or "map"),
#   "type": the class name of the original module,
#   "positions": the original output position behind each current output position,
#   "filters": the original output width,
#   "kept": the original output positions that are computed (== positions, except for a
#           ScatteredConv2d, whose other outputs are constant zero),
#   "inputs": the original input position behind each current input position (input COLUMNS for
#           a linear layer; == positions for the one-width kinds bn, prelu, depthwise),
#   "in_width": the original input width.
LINEAGE_ATTR = "carprune_lineage"
_KINDS = ("conv", "linear", "depthwise", "bn", "prelu", "map")


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
    def from_conv(cls, conv: nn.Conv2d, rows: Sequence[int], out_index: Sequence[int],
                  out_channels: int | None = None) -> ScatteredConv2d:
        """The conv's weight rows `rows`, filling output channels `out_index` of a full width of
        `out_channels` (default: the conv's `out_channels`)."""
        w = conv.weight
        width = conv.out_channels if out_channels is None else out_channels
        new = cls(conv.in_channels, width, conv.kernel_size, out_index, conv.stride,
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


def _bn_width(m: nn.Module) -> int:
    n = getattr(m, "num_features", None)
    if isinstance(n, int):
        return n
    for attr in ("weight", "running_mean"):
        t = getattr(m, attr, None)
        if isinstance(t, torch.Tensor):
            return int(t.shape[0])
    raise ValueError(f"{type(m).__name__} has neither num_features nor a per-channel weight")


def _widths(m: nn.Module, kind: str, in_width: int | None = None) -> tuple[int, int]:
    """(input width, output width) of module `m` as it computes now, narrowed as `kind`.
    A channel map has no width of its own: `in_width` (or its lineage) gives it."""
    if kind == "map":
        if in_width is None:
            lin = getattr(m, LINEAGE_ATTR, None)
            if lin is None:
                raise ValueError(f"the input width of channel map {type(m).__name__} is not known")
            in_width = len(lin["inputs"])
        return in_width, len(opsem.channel_map(m).mapping(m, in_width))
    if kind in ("conv", "depthwise"):
        return int(m.in_channels), int(m.out_channels)
    if kind == "linear":
        return int(m.in_features), int(m.out_features)
    if kind == "prelu":
        return int(m.weight.numel()), int(m.weight.numel())
    n = _bn_width(m)
    return n, n


def _module_kind(m: nn.Module) -> str | None:
    """How module `m` is narrowed when it loses channels (None: it has no per-channel state)."""
    if opsem.channel_map(m) is not None:
        return "map"
    if opsem.is_depthwise(m):
        return "depthwise"
    if isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups == 1:
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(m, nn.PReLU) and m.num_parameters > 1:
        return "prelu"
    return None


def _kind_error(m: nn.Module, kind: str) -> str | None:
    """Why module `m` cannot be narrowed as `kind` (None when it can)."""
    want = {"conv": "a Conv1d/Conv2d with groups=1", "linear": "an nn.Linear",
            "depthwise": "a depthwise conv (groups = in = out channels)",
            "bn": "a module with BatchNorm-like per-channel weight/bias/running statistics",
            "prelu": "a module with one weight per channel (like nn.PReLU)",
            "map": "a registered channel map (opsem.register_channel_map)"}
    if kind not in want:
        return f"unknown kind {kind!r} (expected one of {', '.join(_KINDS)})"
    ok = {"conv": lambda: isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups == 1,
          "linear": lambda: isinstance(m, nn.Linear),
          "depthwise": lambda: opsem.is_depthwise(m),
          "bn": lambda: any(isinstance(getattr(m, a, None), torch.Tensor)
                            for a in ("weight", "running_mean")),
          "prelu": lambda: isinstance(getattr(m, "weight", None), torch.Tensor),
          "map": lambda: opsem.channel_map(m) is not None}[kind]()
    return None if ok else f"it is a {type(m).__name__}, not {want[kind]}"


def _lineage_of(m: nn.Module, kind: str, in_width: int | None = None) -> dict[str, Any]:
    """The lineage of `m` (see LINEAGE_ATTR); an unpruned module's is the identity."""
    lin = getattr(m, LINEAGE_ATTR, None)
    if lin is not None and "inputs" in lin:
        return lin
    w_in, w_out = _widths(m, kind, in_width)
    out = {"kind": kind, "type": type(m).__name__, "positions": list(range(w_out)),
           "filters": w_out, "kept": list(range(w_out)), "inputs": list(range(w_in)),
           "in_width": w_in}
    if lin is not None:  # an output-only lineage
        out.update(positions=list(lin["positions"]), filters=int(lin["filters"]),
                   kept=list(lin["kept"]))
    return out


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
    """{layer: original filter (unit) indices it keeps} for every conv or linear layer of `model`
    that lost filters (layers that only lost inputs are not listed)."""
    out = {}
    for name, m in model.named_modules():
        lin = getattr(m, LINEAGE_ATTR, None)
        if isinstance(m, UNIT_LAYERS) and lin is not None and len(lin["kept"]) < int(lin["filters"]):
            out[name] = [int(i) for i in lin["kept"]]
    return out


def _as_index_list(indices: Any, what: str) -> list[int]:
    if isinstance(indices, torch.Tensor | np.ndarray):
        if indices.ndim > 1:
            raise ValueError(f"{what} must be one-dimensional, got shape {tuple(indices.shape)}")
        indices = indices.tolist()
    elif isinstance(indices, int | np.integer):
        raise ValueError(f"{what} must be a sequence, got the single integer {indices}; wrap it "
                         "in a list")
    elif isinstance(indices, str | bytes | Mapping) or not hasattr(indices, "__iter__"):
        raise ValueError(f"{what} must be a sequence of integers, got {indices!r}")
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise ValueError(f"{what} must be integers, got {i!r}")
        out.append(int(i))
    return out


def _check_indices(indices: Any, layer: str, width: int, present: Sequence[int]) -> list[int]:
    """Validated, sorted filter positions to remove; `present` are the positions that still
    carry a filter (all of them for a narrowed conv)."""
    idx = _as_index_list(indices, f"filter indices for {layer!r}")
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


def _zero_at_cut(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A removed filter's zero channel is still zero after `node`: the op keeps zero
    (`opsem.keeps_zero`), or it is a BatchNorm2d, which the scatter sets to weight = bias = 0."""
    if opsem.keeps_zero(gm, node):
        return True
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.BatchNorm2d)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _narrow_bn(bn: nn.Module, keep: torch.Tensor) -> None:
    """BatchNorm (or a module with BatchNorm-like per-channel tensors) keeps channels `keep`:
    weight, bias, running statistics and num_features."""
    width = _bn_width(bn)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, attr, None)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != width:
            continue
        k = keep.to(t.device)
        if isinstance(t, nn.Parameter):
            setattr(bn, attr, _param(t[k], t))
        else:
            setattr(bn, attr, t[k].clone())
    if isinstance(getattr(bn, "num_features", None), int):
        bn.num_features = int(keep.numel())


def _plain_conv(conv: nn.Conv2d, rows: Sequence[int]) -> nn.Conv2d:
    """An nn.Conv2d with `conv`'s weight rows `rows` (e.g. a ScatteredConv2d whose outputs are
    all computed again after its zero channels were removed)."""
    w = conv.weight
    new = nn.Conv2d(conv.in_channels, len(rows), conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    r = torch.as_tensor(list(rows), dtype=torch.int64, device=w.device)
    new.weight = _param(w[r], w)
    if conv.bias is not None:
        new.bias = _param(conv.bias[r], conv.bias)
    new.train(conv.training)
    return new


def _narrow_module(m: nn.Module, kind: str, kept_in: Sequence[int], kept_out: Sequence[int],
                   in_width: int | None = None) -> nn.Module:
    """Module `m` restricted to input positions `kept_in` (input columns for a linear layer) and
    output positions `kept_out` (increasing, in its current numbering), with its lineage
    composed. Convs, linear layers, BatchNorms and PReLUs are changed in place and returned;
    a channel map or a ScatteredConv2d is replaced by the returned module. `in_width`: the
    current input width of a channel map that has no lineage yet. The one narrowing primitive
    of `prune_units`, `prune_filters` (narrow form) and `load_pruned`."""
    lin = _lineage_of(m, kind, in_width)
    kept_in, kept_out = list(kept_in), list(kept_out)
    if kind in ("bn", "prelu", "depthwise"):
        kept_in = kept_out
    w_in, w_out = len(lin["inputs"]), len(lin["positions"])
    positions = [lin["positions"][k] for k in kept_out]
    alive = set(positions)
    new_lin = {**lin, "positions": positions, "kept": [o for o in lin["kept"] if o in alive],
               "inputs": [lin["inputs"][k] for k in kept_in]}
    ko = torch.tensor(kept_out, dtype=torch.int64)
    ki = torch.tensor(kept_in, dtype=torch.int64)
    new = m
    if kind == "map":
        new = opsem.channel_map(m).narrow(m, w_in, kept_in, kept_out)
    elif kind == "conv" and isinstance(m, ScatteredConv2d):
        dev = m.weight.device
        if len(kept_in) != w_in:
            m.weight = _param(m.weight[:, ki.to(dev)], m.weight)
            m.in_channels = len(kept_in)
        newpos = {p: q for q, p in enumerate(kept_out)}
        index = m.out_index.tolist()
        rows = [r for r, p in enumerate(index) if p in newpos]
        if len(rows) == len(kept_out):
            new = _plain_conv(m, rows)
        else:
            new = ScatteredConv2d.from_conv(m, rows, [newpos[index[r]] for r in rows],
                                            out_channels=len(kept_out))
    elif kind in ("conv", "linear", "depthwise"):
        dev = m.weight.device
        w = m.weight.detach()
        if len(kept_out) != w_out:
            w = w.index_select(0, ko.to(dev))
        if kind != "depthwise" and len(kept_in) != w_in:
            w = w.index_select(1, ki.to(dev))
        if w.data_ptr() != m.weight.data_ptr():  # index_select made a new tensor: no second copy
            m.weight = nn.Parameter(w.contiguous(), requires_grad=m.weight.requires_grad)
        if m.bias is not None and len(kept_out) != w_out:
            m.bias = _param(m.bias[ko.to(dev)], m.bias)
        if kind == "linear":
            m.in_features, m.out_features = len(kept_in), len(kept_out)
        else:
            m.in_channels, m.out_channels = len(kept_in), len(kept_out)
            if kind == "depthwise":
                m.groups = len(kept_out)
    elif kind == "bn":
        _narrow_bn(m, ko)
    elif kind == "prelu":
        m.weight = _param(m.weight[ko.to(m.weight.device)], m.weight)
        if isinstance(getattr(m, "num_parameters", None), int):
            m.num_parameters = len(kept_out)
    else:
        raise ValueError(f"unknown narrowing kind {kind!r} (expected one of {', '.join(_KINDS)})")
    setattr(new, LINEAGE_ATTR, new_lin)
    return new


def _scatter_outputs(conv: nn.Module, kept: Sequence[int]) -> nn.Module:
    """A narrowed conv (lineage positions P) made a ScatteredConv2d that computes only the
    original filters `kept` (a subset of P) and keeps the others as zero channels."""
    lin = dict(getattr(conv, LINEAGE_ATTR))
    where = {o: p for p, o in enumerate(lin["positions"])}
    rows = [where[o] for o in kept]
    new = ScatteredConv2d.from_conv(conv, rows, rows)
    setattr(new, LINEAGE_ATTR, {**lin, "kept": list(kept)})
    return new


def _apply_narrowing(model: nn.Module, plan: Mapping[str, tuple[str, list[int], list[int],
                                                                int | None]]) -> None:
    """Narrow every module of `model` named in `plan` ({name: (kind, kept input positions,
    kept output positions, input width of a channel map)}), replacing submodules where the
    narrowed module is a new object. Channel maps are narrowed first (they only build new
    modules), so a map that refuses leaves `model` unchanged."""
    new: dict[str, nn.Module] = {}
    for name, (kind, kin, kout, width) in plan.items():
        if kind == "map":
            new[name] = _narrow_module(model.get_submodule(name), kind, kin, kout, width)
    for name, (kind, kin, kout, width) in plan.items():
        if kind != "map":
            m = model.get_submodule(name)
            n = _narrow_module(m, kind, kin, kout, width)
            if n is not m:
                new[name] = n
    for name, m in new.items():
        _set_submodule(model, name, m)


def _chain_module(model: nn.Module, gm: fx.GraphModule, node: fx.Node, layer: str) -> nn.Module | None:
    if node.op != "call_module":
        return None
    if _call_count(gm, node.target) != 1 and any(True for _ in gm.get_submodule(node.target).parameters()):
        raise graph.CutError(f"{node.target!r} after {layer!r} is called more than once in forward(); "
                             "a shared module with per-channel parameters cannot be pruned for one "
                             "of its uses")
    return model.get_submodule(str(node.target))


# -- surgery of one layer ------------------------------------------------------------------------
def _prune_inplace(model: nn.Module, layer: str, indices: Any) -> None:
    la = graph.analyze(model, layer)   # the cut, its chain and its consumers classified
    gm = la.gm
    conv = model.get_submodule(layer)
    if getattr(conv, "groups", 1) != 1:
        raise graph.CutError(f"layer {layer!r} is a grouped conv (groups={conv.groups}); removing its "
                             "filters would break the grouping, so only groups=1 convs are pruned")
    width = _num_units(conv)
    scattered = isinstance(conv, ScatteredConv2d)
    present = conv.out_index.tolist() if scattered else list(range(width))
    remove = _check_indices(indices, layer, width, present)
    chain = list(la.chain)
    other = [c.description for c in la.other_consumers]
    gone = set(remove)
    if not scattered and not other:
        # narrow: conv, per-channel followers and consumers all shrink
        keep_l = [i for i in range(width) if i not in gone]
        kind = "linear" if isinstance(conv, nn.Linear) else "conv"
        plan: dict[str, tuple[str, list[int], list[int], int | None]] = {
            layer: (kind, list(range(_widths(conv, kind)[0])), keep_l, None)}
        for node in chain:  # validate everything before changing anything
            m = _chain_module(model, gm, node, layer)
            if m is None:
                continue
            r = opsem.rule(gm, node)
            params = r.params if r is not None else None
            if params is not None:
                plan[str(node.target)] = (params, keep_l, keep_l, None)
            elif any(True for _ in m.parameters()) and not isinstance(m, nn.PReLU):
                raise graph.CutError(f"{type(m).__name__} between {layer!r} and its cut has "
                                     "parameters that carprune does not know how to narrow")
        for c in la.consumers:
            m = model.get_submodule(c.module)
            if c.kind == "conv":
                plan[c.module] = ("conv", keep_l, list(range(m.out_channels)), None)
                continue
            block = 1
            if c.kind == "linear_flat":
                if m.in_features % width:
                    raise graph.CutError(f"linear layer {c.module!r} after {layer!r} has "
                                         f"{m.in_features} inputs, not a multiple of the {width} "
                                         "channels it flattens")
                block = m.in_features // width
            cols = [i * block + j for i in keep_l for j in range(block)]
            plan[c.module] = ("linear", cols, list(range(m.out_features)), None)
        _apply_narrowing(model, plan)
        return
    # scatter: the output keeps its width; removed channels are exactly 0 up to the cut
    why = ", ".join(other) if other else "an earlier scatter"
    if not isinstance(conv, nn.Conv2d):
        raise graph.CutError(
            f"layer {layer!r} ({type(conv).__name__}) feeds {why}, which cannot lose inputs; only "
            "Conv2d layers keep their width by scattering, so its units cannot be removed here")
    for node in chain:
        if not _zero_at_cut(gm, node):
            raise graph.CutError(
                f"layer {layer!r} feeds {why}, so its width must stay and removed filters must be "
                f"exactly zero at the cut, but {opsem.describe(node)} does not map 0 to 0 "
                "(e.g. sigmoid(0) = 0.5): the filters cannot be removed without changing the output")
    bns = []
    for node in chain:
        m = _chain_module(model, gm, node, layer)
        if isinstance(m, nn.BatchNorm2d):
            bns.append(m)
    lin = _lineage_of(conv, "conv")
    origin = lin["positions"]
    # weight row r of the conv fills output channel present[r] (row r = channel r unless scattered)
    new_idx = [i for i in present if i not in gone]
    rows = [r for r, i in enumerate(present) if i not in gone]
    new = ScatteredConv2d.from_conv(conv, rows, new_idx)
    setattr(new, LINEAGE_ATTR, {**lin, "kept": [origin[i] for i in new_idx]})
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


# -- surgery of whole-network units --------------------------------------------------------------
def _input_width(gm: fx.GraphModule, name: str) -> int | None:
    """Channels of the tensor that module `name` reads in the traced graph (its shape metadata)."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == name and n.args and isinstance(n.args[0], fx.Node):
            tm = n.args[0].meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "shape") and len(tm.shape) > 1:
                return int(tm.shape[1])
    return None


def _unit_plan(model: nn.Module, analysis: Any, removed: Mapping[str, Any]
               ) -> dict[str, tuple[str, list[int], list[int], int | None]]:
    """Validate `removed` against `analysis` and `model`; the kept positions of every module
    the removal touches. Raises before anything is changed."""
    if not isinstance(removed, Mapping):
        raise TypeError(f"removed must map unit names to channel indices, e.g. {{'conv1': [3, 7]}}, "
                        f"got {type(removed).__name__}")
    chosen = []
    for name, indices in removed.items():
        if not isinstance(name, str) or name not in {u.name for u in analysis.units}:
            raise ValueError(f"removed names unit {name!r}, which the network does not have; its "
                             f"units are: {', '.join(u.name for u in analysis.units)}")
        unit = analysis.unit(name)
        what = f"channel indices for unit {name!r}"
        idx = _as_index_list(indices, what)
        if not idx:
            continue
        dup = sorted({i for i in idx if idx.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate {what}: {dup}")
        bad = sorted(i for i in idx if not 0 <= i < unit.num_channels)
        if bad:
            raise ValueError(f"{what} must be in 0..{unit.num_channels - 1} (the unit has "
                             f"{unit.num_channels} channels), got {bad}")
        if len(idx) == unit.num_channels:
            raise ValueError(f"cannot remove all {unit.num_channels} channels of unit {name!r}: at "
                             "least one must stay")
        chosen.append((unit, sorted(idx)))
    gm = analysis.gm
    modules = dict(model.named_modules())
    traced = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    touched: dict[str, dict[str, Any]] = {}
    for unit, idx in chosen:
        for use in unit.uses:
            e = touched.setdefault(use.module, {"roles": set(), "params": set(), "out": set(),
                                                "in": set(), "unit": unit.name})
            e["roles"].add(use.role)
            pos = [use.positions[i] for i in idx]
            if use.role in ("producer", "through"):
                e["out"].update(pos)
                if use.role == "through":
                    e["params"].add(use.params)
            elif use.role == "consumer":
                e["in"].update(p * use.block + j for p in pos for j in range(use.block))
            elif use.role == "map":
                e["out"].update(pos)
                e["in"].update(use.in_positions[i] for i in idx if use.in_positions[i] is not None)
            else:
                raise ValueError(f"unit {unit.name!r} uses module {use.module!r} as {use.role!r}, "
                                 "a role prune_units does not know")
    plan: dict[str, tuple[str, list[int], list[int], int | None]] = {}
    for name, e in touched.items():
        m = modules.get(name)
        ref = traced.get(name)
        if m is None or ref is None or type(m) is not type(ref) or \
                [tuple(t.shape) for t in m.state_dict().values()] != \
                [tuple(t.shape) for t in ref.state_dict().values()]:
            raise ValueError(f"analysis does not describe this model: module {name!r} is "
                             f"{'missing' if m is None else type(m).__name__} in the model but "
                             f"{'missing' if ref is None else type(ref).__name__} in the analysis "
                             "(or has other shapes); pass analysis=prunable_units(model, x) of the "
                             "model being pruned")
        roles = e["roles"]
        if roles == {"map"}:
            kind = "map"
        elif roles == {"through"} and len(e["params"]) == 1:
            kind = next(iter(e["params"]))
        elif roles <= {"producer", "consumer"}:
            kind = "linear" if isinstance(m, nn.Linear) else "conv"
        else:
            raise ValueError(f"module {name!r} is used as {' and '.join(sorted(roles))} "
                             f"(params {sorted(map(str, e['params']))}) by the removed units: "
                             "it cannot be narrowed for all of them")
        why = _kind_error(m, kind)
        if why is not None:
            raise ValueError(f"unit {e['unit']!r} needs module {name!r} narrowed as {kind}, but "
                             f"{why}; it cannot lose channels")
        if calls.get(name, 0) != 1:
            raise ValueError(f"module {name!r} is called {calls.get(name, 0)} times in forward(); "
                             "a shared module cannot lose channels for one of its uses")
        in_width = _input_width(gm, name) if kind == "map" and \
            getattr(m, LINEAGE_ATTR, None) is None else None
        w_in, w_out = _widths(m, kind, in_width)
        if any(not 0 <= p < w_out for p in e["out"]) or any(not 0 <= p < w_in for p in e["in"]):
            raise ValueError(f"analysis does not describe this model: positions of module {name!r} "
                             f"exceed its {w_in} inputs / {w_out} outputs")
        kept_out = [p for p in range(w_out) if p not in e["out"]]
        kept_in = kept_out if kind in ("bn", "prelu", "depthwise") else \
            [p for p in range(w_in) if p not in e["in"]]
        if not kept_out or not kept_in:
            side = "output channels" if not kept_out else "inputs"
            raise ValueError(f"removed takes away every one of the {w_out if not kept_out else w_in} "
                             f"{side} of module {name!r}; at least one must stay")
        if isinstance(m, ScatteredConv2d) and e["out"] and \
                all(p in e["out"] for p in m.out_index.tolist()):
            raise ValueError(f"removed takes away every computed filter of the scattered conv "
                             f"{name!r} (its other outputs are zero); at least one must stay")
        plan[name] = (kind, kept_in, kept_out, in_width)
    return plan


def prune_units(model: nn.Module, removed: Mapping[str, Sequence[int]],
                example_input: torch.Tensor | None = None, *, analysis: Any = None) -> nn.Module:
    """A new model with channels `removed[unit]` of whole-network units physically removed from
    every producer, through module, consumer and channel map of the unit; `model` itself is not
    changed and the input is the same.

    `removed`: {unit name: channel indices}, the indices numbering the unit's channels as the
    given model has them now (`units.prunable_units(model, x).unit(name)`; an empty list removes
    nothing). Give `example_input` (a batch such as torch.zeros(1, 3, 32, 32)) or the
    `analysis` of this very model. The result equals `units.masked_forward(analysis, x, removed)`
    and its cost is `analysis.cost(removed)`; each narrowed module records the original input
    and output positions it keeps (`save_pruned` / `load_pruned`). Pruning an already pruned
    model composes.

    Raises ValueError, before changing anything, for an unknown unit, duplicate or out-of-range
    indices, all channels of a unit, a module that cannot be narrowed or is called more than
    once, and an analysis that does not describe `model`.
    """
    from . import units as _units  # units does not import surgery; keep surgery light to import

    if analysis is None:
        if example_input is None:
            raise ValueError("prune_units needs example_input (a batch such as "
                             "torch.zeros(1, 3, 32, 32)) or analysis=prunable_units(model, x)")
        analysis = _units.prunable_units(model, example_input)
    elif not isinstance(analysis, _units.UnitAnalysis):
        raise TypeError(f"analysis must be a UnitAnalysis (prunable_units(model, x)), got "
                        f"{type(analysis).__name__}")
    plan = _unit_plan(model, analysis, removed)
    new = copy.deepcopy(model)
    _apply_narrowing(new, plan)
    return new


# -- save / load ---------------------------------------------------------------------------------
def pruned_structure(model: nn.Module) -> dict[str, Any]:
    """The JSON-able structure of a pruned `model` (what `save_pruned` writes to structure.json):
    "layers" ({conv or linear layer: {"kept": original filters, "filters": original count}},
    for reading) and "modules" ({module: its lineage}, which `apply_structure` rebuilds from)."""
    layers = {name: {"kept": kept, "filters": int(getattr(model.get_submodule(name),
                                                          LINEAGE_ATTR)["filters"])}
              for name, kept in kept_channels(model).items()}
    modules = {}
    for name, m in model.named_modules():
        lin = getattr(m, LINEAGE_ATTR, None)
        if lin is None:
            continue
        kind = lin.get("kind") or _module_kind(m)
        lin = _lineage_of(m, kind)
        entry = {"kind": kind, "type": str(lin["type"]),
                 "in": [int(i) for i in lin["inputs"]], "in_width": int(lin["in_width"]),
                 "out": [int(i) for i in lin["positions"]], "out_width": int(lin["filters"])}
        if list(lin["kept"]) != list(lin["positions"]):
            entry["kept"] = [int(i) for i in lin["kept"]]
        modules[name] = entry
    return {"format": STRUCTURE_FORMAT, "version": STRUCTURE_VERSION, "layers": layers,
            "modules": modules}


def save_pruned(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `weights.pt` (the state_dict, plain tensors) and `structure.json`
    (`pruned_structure`: which original input and output positions each narrowed module keeps)
    into `directory`, each atomically. No code is pickled: `load_pruned` rebuilds the structure
    from the original architecture."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    structure = pruned_structure(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_open(d / WEIGHTS_FILE, "wb") as f:
        torch.save(state, f)
    write_json(d / STRUCTURE_FILE, structure)
    return d


def _increasing(v: Any, width: Any) -> bool:
    return (isinstance(v, list) and bool(v) and isinstance(width, int)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            and sorted(set(v)) == v and v[0] >= 0 and v[-1] < width)


def check_structure(obj: Any, where: str = "structure") -> tuple[int, dict, dict]:
    """Validate a pruned-model structure (`pruned_structure`, version 1 or 2); returns
    (version, layers, modules). ValueError naming `where` and the bad entry otherwise."""
    if not isinstance(obj, dict) or obj.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"{where} is not a carprune pruned-model structure "
                         f"(format {obj.get('format') if isinstance(obj, dict) else None!r}, "
                         f"expected {STRUCTURE_FORMAT!r})")
    version = obj.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{where}: structure version {version!r} is not supported "
                         f"(this carprune reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    layers = obj.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: 'layers' must map layer names to kept filters")
    for name, entry in layers.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("filters"), int)
              and isinstance(entry.get("kept"), list) and entry["kept"]
              and all(isinstance(i, int) and not isinstance(i, bool) for i in entry["kept"]))
        if not ok:
            raise ValueError(f"{where}: entry for layer {name!r} must be {{'kept': [int, ...], "
                             f"'filters': int}}, got {entry!r}")
        if not _increasing(entry["kept"], entry["filters"]):
            raise ValueError(f"{where}: kept filters of layer {name!r} must be increasing indices "
                             f"in [0, {entry['filters']}), got {entry['kept']}")
    if version == 1:
        return version, layers, {}
    modules = obj.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{where}: 'modules' must map module names to their kept positions")
    for name, e in modules.items():
        shape = "{'kind', 'type', 'in', 'in_width', 'out', 'out_width'[, 'kept']}"
        if not isinstance(e, dict) or e.get("kind") not in _KINDS or not isinstance(e.get("type"), str):
            raise ValueError(f"{where}: entry for module {name!r} must be {shape} with kind one of "
                             f"{', '.join(_KINDS)}, got {e!r}")
        for key, wkey in (("in", "in_width"), ("out", "out_width")):
            if not _increasing(e.get(key), e.get(wkey)):
                raise ValueError(f"{where}: {key!r} of module {name!r} must be increasing indices in "
                                 f"[0, {wkey}={e.get(wkey)!r}), got {e.get(key)!r}")
        if "kept" in e and (not _increasing(e["kept"], e["out_width"])
                            or not set(e["kept"]) <= set(e["out"])):
            raise ValueError(f"{where}: 'kept' of module {name!r} must be increasing indices "
                             f"among its 'out' {e['out']}, got {e['kept']!r}")
        if e["kind"] in ("bn", "prelu", "depthwise") and e["in"] != e["out"]:
            raise ValueError(f"{where}: a {e['kind']} module keeps the same inputs as outputs, but "
                             f"{name!r} has in {e['in']} and out {e['out']}")
        if e.get("kind") != "conv" and "kept" in e:
            raise ValueError(f"{where}: only a conv can compute a subset of its outputs ('kept'), "
                             f"but module {name!r} is a {e['kind']}")
    for name, entry in layers.items():
        e = modules.get(name)
        if e is None or e.get("kept", e["out"]) != entry["kept"] or e["out_width"] != entry["filters"]:
            raise ValueError(f"{where}: layer {name!r} keeps filters {entry['kept']} of "
                             f"{entry['filters']} in 'layers' but "
                             f"{None if e is None else e.get('kept', e['out'])} in 'modules'")
    return version, layers, modules


def apply_structure(architecture: nn.Module, structure: Mapping[str, Any]) -> nn.Module:
    """A copy of `architecture` (the ORIGINAL unpruned network; its weights do not matter)
    narrowed as `structure` (`pruned_structure` of a pruned model, version 1 or 2) says, ready
    for that model's state_dict. `architecture` itself is not changed."""
    version, layers, modules = check_structure(dict(structure))
    already = sorted(n for n, m in architecture.named_modules() if hasattr(m, LINEAGE_ATTR))
    if already:
        raise ValueError("the architecture must be the original, unpruned network, but modules "
                         f"{already} of the given model are already pruned")
    model = copy.deepcopy(architecture)
    present = dict(model.named_modules())
    arch = type(architecture).__name__
    names = modules if version == 2 else layers
    missing = [n for n in names if n not in present]
    if missing:
        convs = graph.conv_layers(model)
        raise ValueError(f"the structure names module(s) {missing} that {arch} lacks; its conv "
                         f"layers are: {', '.join(convs)}")
    if version == 1:
        for name in (n for n in present if n in layers):
            m, entry = present[name], layers[name]
            if not isinstance(m, UNIT_LAYERS):
                raise ValueError(f"the structure names layer {name!r}, but in {arch} it is a "
                                 f"{type(m).__name__}, not a Conv2d, Conv1d or Linear layer")
            if _num_units(m) != entry["filters"]:
                raise ValueError(f"layer {name!r} has {_num_units(m)} filters in the given "
                                 f"architecture but {entry['filters']} in the saved structure: not "
                                 "the same network")
            kept = set(entry["kept"])
            removed = [i for i in range(_num_units(m)) if i not in kept]
            if removed:
                _prune_inplace(model, name, removed)
        return model
    new: dict[str, nn.Module] = {}
    for name in (n for n in present if n in modules):   # validate everything first
        m, e = present[name], modules[name]
        if type(m).__name__ != e["type"]:
            raise ValueError(f"the structure has module {name!r} as a {e['type']}, but in {arch} it "
                             f"is a {type(m).__name__}: not the same network")
        why = _kind_error(m, e["kind"])
        if why is not None:
            raise ValueError(f"the structure narrows module {name!r} as {e['kind']}, but {why}")
        w_in, w_out = _widths(m, e["kind"], e["in_width"])
        if (w_in, w_out) != (e["in_width"], e["out_width"]):
            raise ValueError(f"module {name!r} has {w_out} output channels and {w_in} inputs in "
                             f"the given architecture but {e['out_width']} and {e['in_width']} in "
                             "the saved structure: not the same network")
    for name in (n for n in present if n in modules):
        m, e = present[name], modules[name]
        n = _narrow_module(m, e["kind"], e["in"], e["out"], e["in_width"])
        if "kept" in e:
            n = _scatter_outputs(n, e["kept"])
        if n is not m:
            new[name] = n
    for name, m in new.items():
        _set_submodule(model, name, m)
    return model


def load_pruned(directory: str | os.PathLike, architecture: nn.Module) -> nn.Module:
    """Rebuild a model saved by `save_pruned` from `architecture`, an instance of the ORIGINAL
    unpruned network (its weights do not matter): every recorded module is narrowed to its kept
    positions (`apply_structure`; a version-1 structure re-applies the per-layer surgery), then
    the saved weights are loaded strictly. `architecture` itself is not changed."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"pruned-model directory not found: {d}")
    spath = d / STRUCTURE_FILE
    structure = read_json(spath, "pruned-model structure")
    check_structure(structure, str(spath))
    wpath = d / WEIGHTS_FILE
    if not wpath.is_file():
        raise FileNotFoundError(f"pruned-model weights not found: {wpath}")
    state = read_tensor_file(wpath, "pruned-model weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pruned-model weights {wpath} do not hold a state_dict of tensors")
    try:
        model = apply_structure(architecture, structure)
    except ValueError as exc:
        raise ValueError(f"{spath}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {wpath} do not fit the rebuilt pruned model: {exc}") from exc
    return model


__all__ = [
    "ScatteredConv2d",
    "apply_structure",
    "channel_origins",
    "check_structure",
    "copy_model",
    "kept_channels",
    "load_pruned",
    "prune_filters",
    "prune_units",
    "pruned_structure",
    "save_pruned",
]
