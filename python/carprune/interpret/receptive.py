"""Receptive-field geometry of a conv layer: which input pixels each output position sees.

Computed exactly from the network's kernels, strides, dilations and paddings along every path
from the input to the layer, by walking the torch.fx graph (residual branches are united), so the
patches cut for a filter are the input region that can influence its activation, and nothing is
guessed from the layer's name or the model's class.

Per spatial axis an activation map is described by (offset, size, stride): output position i
sees input pixels [offset + i * stride, offset + i * stride + size). Offsets go negative where
padding reaches outside the image; boxes are clipped to the image when patches are cut.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import graph, opsem

Axis = tuple[int, int, int]          # (offset, size, stride) along one spatial axis
Geometry = tuple[Axis, Axis]          # (rows, cols)

_POOL_FUNCTIONS = {F.max_pool2d: "max", F.avg_pool2d: "avg", torch.max_pool2d: "max"}
_ADAPTIVE_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_UNSUPPORTED_MODULES = (nn.Upsample, nn.ConvTranspose2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Fold,
                        nn.Unfold)
_UNSUPPORTED_FUNCTIONS = {F.interpolate, F.conv_transpose2d, F.pixel_shuffle, F.grid_sample}


@dataclass(frozen=True)
class ReceptiveField:
    """Where in the input each position of a layer's output looks (per axis: rows, cols)."""

    size: tuple[int, int]     # extent in input pixels
    stride: tuple[int, int]   # input pixels between neighbouring output positions
    offset: tuple[int, int]   # input coordinate of the first pixel seen by output position 0

    def unclipped_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), end exclusive, possibly outside the image."""
        y0 = self.offset[0] + row * self.stride[0]
        x0 = self.offset[1] + col * self.stride[1]
        return y0, x0, y0 + self.size[0], x0 + self.size[1]

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The field of output position (row, col) clipped to a height x width image."""
        y0, x0, y1, x1 = self.unclipped_box(row, col)
        return max(0, y0), max(0, x0), min(height, y1), min(width, x1)

    def to_dict(self) -> dict[str, list[int]]:
        return {"size": list(self.size), "stride": list(self.stride), "offset": list(self.offset)}

    @classmethod
    def from_dict(cls, d: dict[str, list[int]]) -> ReceptiveField:
        return cls(size=tuple(d["size"]), stride=tuple(d["stride"]), offset=tuple(d["offset"]))


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return int(v), int(v)


def _window(g: Geometry, kernel, stride, padding, dilation) -> Geometry:
    """A sliding window (conv or pool) applied to a map of geometry g."""
    k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    out = []
    for ax in range(2):
        off, size, jump = g[ax]
        span = d[ax] * (k[ax] - 1) + 1
        out.append((off - p[ax] * jump, size + (span - 1) * jump, jump * s[ax]))
    return out[0], out[1]


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0
        # 'same': total padding d*(k-1), the smaller half before (as PyTorch pads)
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    return _pair(conv.padding)


def _union(geoms: list[Geometry], node: fx.Node) -> Geometry:
    out = []
    for ax in range(2):
        axes = [g[ax] for g in geoms]
        jumps = {a[2] for a in axes}
        if len(jumps) != 1:
            raise ValueError(f"cannot follow the receptive field through {node.format_node()}: "
                             f"its inputs have different strides {sorted(jumps)} along one axis")
        start = min(a[0] for a in axes)
        end = max(a[0] + a[1] for a in axes)
        out.append((start, end - start, axes[0][2]))
    return out[0], out[1]


def _spatial(node: fx.Node) -> tuple[int, int] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != 4:
        return None
    return int(shape[2]), int(shape[3])


def _adaptive(g: Geometry, node: fx.Node, src: fx.Node) -> Geometry:
    hin, hout = _spatial(src), _spatial(node)
    if hin is None or hout is None:
        raise ValueError(f"no shape known for {node.format_node()}")
    out = []
    for ax in range(2):
        off, size, jump = g[ax]
        i, o = hin[ax], hout[ax]
        if i % o:
            raise ValueError(f"cannot follow the receptive field through {node.format_node()}: "
                             f"adaptive pooling from {i} to {o} has unequal windows")
        s = i // o
        k = i - (o - 1) * s
        out.append((off, size + (k - 1) * jump, jump * s))
    return out[0], out[1]


def _slice_axis(a: Axis, sl: object, length: int, node: fx.Node) -> Axis:
    if not isinstance(sl, slice):
        raise ValueError(f"cannot follow the receptive field through {node.format_node()}: "
                         f"it indexes a spatial axis with {sl!r}")
    start, _, step = sl.indices(length)
    off, size, jump = a
    return off + start * jump, size, jump * step


def _getitem(g: Geometry, node: fx.Node, src: fx.Node) -> Geometry | None:
    idx = node.args[1]
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(i is Ellipsis or i is None for i in idx):
        raise ValueError(f"cannot follow the receptive field through {node.format_node()}")
    hw = _spatial(src)
    if hw is None:
        return None
    rows = _slice_axis(g[0], idx[2], hw[0], node) if len(idx) > 2 else g[0]
    cols = _slice_axis(g[1], idx[3], hw[1], node) if len(idx) > 3 else g[1]
    for i in idx[:2]:
        if not isinstance(i, slice):
            return None   # batch or channel picked by an integer: no longer a 4-D map
    return rows, cols


def _pad(g: Geometry, node: fx.Node) -> Geometry:
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    pad = [int(p) for p in pad]
    left = pad[0] if len(pad) >= 2 else 0
    top = pad[2] if len(pad) >= 4 else 0
    (oy, sy, jy), (ox, sx, jx) = g
    return (oy - top * jy, sy, jy), (ox - left * jx, sx, jx)


def _conv_function(g: Geometry, node: fx.Node) -> Geometry:
    args = list(node.args) + [None] * 7
    weight = args[1] if args[1] is not None else node.kwargs.get("weight")
    meta = weight.meta.get("tensor_meta") if isinstance(weight, fx.Node) else None
    if meta is None:
        raise ValueError(f"no weight shape known for {node.format_node()}")
    kernel = tuple(meta.shape[2:])
    stride = node.kwargs.get("stride", args[3] if args[3] is not None else 1)
    padding = node.kwargs.get("padding", args[4] if args[4] is not None else 0)
    dilation = node.kwargs.get("dilation", args[5] if args[5] is not None else 1)
    if isinstance(padding, str):
        raise ValueError(f"cannot follow the receptive field through {node.format_node()}: "
                         f"padding {padding!r}")
    return _window(g, kernel, stride, padding, dilation)


def _pool_function(g: Geometry, node: fx.Node) -> Geometry:
    args = list(node.args) + [None] * 5
    kernel = node.kwargs.get("kernel_size", args[1])
    stride = node.kwargs.get("stride", args[2])
    padding = node.kwargs.get("padding", args[3] if args[3] is not None else 0)
    dilation = 1
    if _POOL_FUNCTIONS[node.target] == "max":
        dilation = node.kwargs.get("dilation", args[4] if args[4] is not None else 1)
    if stride is None or (isinstance(stride, (list, tuple)) and not stride):
        stride = kernel
    return _window(g, kernel, stride, padding, dilation)


def _node_geometry(gm: fx.GraphModule, node: fx.Node, geo: dict[fx.Node, Geometry | None]
                   ) -> Geometry | None:
    inputs = [a for a in node.all_input_nodes if geo.get(a) is not None]
    if node.op == "placeholder":
        return ((0, 1, 1), (0, 1, 1)) if _spatial(node) is not None else None
    if not inputs:
        return None
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else inputs[0]
    g = geo.get(src)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if opsem.is_leaf(m) and g is not None:
            return _leaf_geometry(m, g, node, src)
        if isinstance(m, _UNSUPPORTED_MODULES):
            raise ValueError(f"cannot follow the receptive field through {node.target} "
                             f"({type(m).__name__})")
        if isinstance(m, nn.Conv2d):
            return _window(g, m.kernel_size, m.stride, _conv_padding(m), m.dilation)
        if isinstance(m, nn.MaxPool2d):
            return _window(g, m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation)
        if isinstance(m, nn.AvgPool2d):
            return _window(g, m.kernel_size, m.stride or m.kernel_size, m.padding, 1)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return _adaptive(g, node, src)
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
            p = m.padding
            p = (p, p, p, p) if isinstance(p, int) else tuple(p)
            (oy, sy, jy), (ox, sx, jx) = g
            return (oy - p[2] * jy, sy, jy), (ox - p[0] * jx, sx, jx)
    elif node.op == "call_function":
        if node.target in _UNSUPPORTED_FUNCTIONS:
            raise ValueError(f"cannot follow the receptive field through {node.format_node()}")
        if node.target is F.conv2d or node.target is torch.conv2d:
            return _conv_function(g, node)
        if node.target in _POOL_FUNCTIONS:
            return _pool_function(g, node)
        if node.target in _ADAPTIVE_FUNCTIONS:
            return _adaptive(g, node, src)
        if node.target is operator.getitem and src in geo and geo[src] is not None:
            return _getitem(g, node, src)
        if node.target is F.pad:
            return _pad(g, node)
    # anything else: element-wise or channel-wise when the spatial size is unchanged
    out_hw = _spatial(node)
    if out_hw is None:
        return None
    same = [a for a in inputs if _spatial(a) == out_hw]
    if len(same) != len(inputs):
        raise ValueError(f"cannot follow the receptive field through {node.format_node()}: it "
                         f"changes the spatial size from {[_spatial(a) for a in inputs]} to {out_hw}")
    return _union([geo[a] for a in same], node)


def _leaf_geometry(m: nn.Module, g: Geometry, node: fx.Node, src: fx.Node) -> Geometry | None:
    """Geometry after a module that carprune's tracer keeps whole (a registered leaf or channel
    map, e.g. the CIFAR ResNets' padding shortcut): its own forward() traced and walked, from
    an input of `src`'s recorded shape."""
    meta = src.meta.get("tensor_meta")
    if len(node.all_input_nodes) != 1 or meta is None or not hasattr(meta, "shape"):
        raise ValueError(f"cannot follow the receptive field through {node.format_node()}")
    try:
        tracer = fx.Tracer()
        sub = fx.GraphModule(m, tracer.trace(m))
        ref = next(iter(m.parameters()), None)
        graph.propagate_shapes(sub, torch.zeros(tuple(meta.shape), dtype=meta.dtype,
                                                device=ref.device if ref is not None else "cpu"),
                               type(m).__name__)
    except Exception as exc:
        raise ValueError(f"cannot follow the receptive field through {node.format_node()}: "
                         f"its forward() cannot be traced ({type(exc).__name__})") from exc
    geo: dict[fx.Node, Geometry | None] = {}
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            geo[n] = g
        elif n.op == "output":
            out = n.args[0]
            return geo.get(out) if isinstance(out, fx.Node) else None
        else:
            geo[n] = _node_geometry(sub, n, geo)
    return None


def receptive_field_of(gm: fx.GraphModule, node: fx.Node) -> ReceptiveField:
    """Geometry of `node`'s output in a shape-annotated graph (see `graph.propagate_shapes`)."""
    need = graph.reachable(node, downstream=False) | {node}
    geo: dict[fx.Node, Geometry | None] = {}
    for n in gm.graph.nodes:
        if n in need:
            geo[n] = _node_geometry(gm, n, geo)
        if n is node:
            break
    g = geo[node]
    if g is None:
        raise ValueError(f"{node.format_node()} is not computed from a spatial map of the input")
    (oy, sy, jy), (ox, sx, jx) = g
    return ReceptiveField(size=(sy, sx), stride=(jy, jx), offset=(oy, ox))


def receptive_field(model: nn.Module | fx.GraphModule, layer: str,
                    input_shape: tuple[int, int, int]) -> ReceptiveField:
    """Receptive field of the output of conv `layer` for inputs of shape (C, H, W)."""
    from .patches import truncate

    gm = model if isinstance(model, fx.GraphModule) else graph.trace(model)
    sub = truncate(gm, graph.conv_call(gm, layer))
    params = list(sub.parameters())
    dev = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    graph.propagate_shapes(sub, torch.zeros((1, *input_shape), device=dev, dtype=dtype), "the model")
    return receptive_field_of(sub, graph.conv_call(sub, layer))


def is_first_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True if no conv or linear layer lies between the input and `node` (its weights then act
    on image pixels directly and can be drawn as images): `graph.is_first_layer`, also
    `graph.LayerAnalysis.first_layer`."""
    return graph.is_first_layer(gm, node)


def box_area(box: tuple[int, int, int, int]) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


__all__ = ["ReceptiveField", "box_area", "is_first_layer",
           "receptive_field", "receptive_field_of"]
