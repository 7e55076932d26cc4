"""The image patches that activate each filter most (Zeiler & Fergus; the CAR paper's Figures 6,
7 and 9A), found in one streaming pass over a dataset.

Only the network up to the layer runs. Per batch, each filter's activation map is reduced to its
spatial maximum and that position, and merged into a running top-k per filter, so the state is
O(filters x k) whatever the dataset size; the batch is sized from a memory budget. Patches are
cut from the input at the receptive field of the winning position (see receptive.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import fx, nn

from .. import graph, opsem
from ..callbacks import progress_callbacks
from ..data.batches import DataLike, load_batch, num_items, pick_indices
from ..engine import parse_bytes
from ..evaluate import batch_rows, bytes_per_image
from .receptive import ReceptiveField, receptive_field_of

Activation = Literal["conv", "bn"]


class TopK:
    """Running top-k of per-image scores for each of F filters (ties: earlier image first)."""

    def __init__(self, num_filters: int, k: int, device: torch.device | str = "cpu") -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.values = torch.full((num_filters, 0), float("-inf"), device=device)
        self.images = torch.zeros((num_filters, 0), dtype=torch.int64, device=device)
        self.positions = torch.zeros((num_filters, 0), dtype=torch.int64, device=device)

    def update(self, values: torch.Tensor, positions: torch.Tensor, images: torch.Tensor) -> None:
        """values/positions [B, F] for the images [B], which come after all earlier ones."""
        b = values.shape[0]
        v = torch.cat([self.values, values.t().float()], dim=1)
        v = torch.nan_to_num(v, nan=float("-inf"))
        p = torch.cat([self.positions, positions.t()], dim=1)
        i = torch.cat([self.images, images.to(self.images.device).view(1, b).expand(v.shape[0], b)],
                      dim=1)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.values = v.gather(1, order)
        self.positions = p.gather(1, order)
        self.images = i.gather(1, order)

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.images, self.positions))


@dataclass
class PatchSearch:
    """Top-k activating images per filter, with where in the activation map the maximum was."""

    layer: str
    activation: str                 # 'conv' or 'bn': where the activation was read
    receptive_field: ReceptiveField
    map_shape: tuple[int, int]      # activation map (rows, cols)
    image_shape: tuple[int, int, int]
    values: np.ndarray              # float32 [F, k], descending
    images: np.ndarray              # int64 [F, k], dataset indices
    rows: np.ndarray                # int64 [F, k]
    cols: np.ndarray                # int64 [F, k]
    labels: np.ndarray              # int64 [F, k]
    class_first: dict[int, int]     # class -> first dataset index with that label
    class_counts: dict[int, int]
    num_images: int
    stats: dict[str, int] = field(default_factory=dict)

    def box(self, f: int, j: int) -> tuple[int, int, int, int]:
        """Clipped input box (y0, x0, y1, x1) of the j-th patch of filter f."""
        _, h, w = self.image_shape
        return self.receptive_field.box(int(self.rows[f, j]), int(self.cols[f, j]), h, w)


def _activation_node(gm: fx.GraphModule, conv: fx.Node, at: Activation) -> fx.Node:
    """The conv's node, or for 'bn' the BatchNorm right after it (`opsem.bn_after`) if any."""
    if at not in ("conv", "bn"):
        raise ValueError(f"activation must be 'conv' or 'bn', got {at!r}")
    bn = opsem.bn_after(gm, conv) if at == "bn" else None
    return bn if bn is not None else conv


def truncate(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    """A graph module computing only `node` (and what it needs) from the inputs."""
    need: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in need:
            need.add(n)
            stack.extend(n.all_input_nodes)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in need or n.op == "placeholder":
            env[n] = g.node_copy(n, env.__getitem__)
        if n is node:
            break
    g.output(env[node])
    sub = fx.GraphModule(gm, g)
    sub.recompile()
    return sub


def search_patches(
    model: nn.Module,
    layer: str,
    data: DataLike,
    *,
    k: int = 9,
    activation: Activation = "bn",
    num_images: int | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> PatchSearch:
    """The k images (and positions) that activate each filter of conv `layer` most.

    A filter's response to an image is the maximum over positions of its activation map:
    the conv output (`activation='conv'`) or the output of the BatchNorm that follows it
    ('bn', the default; the ReLU after it is monotone and would only merge negatives into ties).
    `memory_budget` (bytes or '512MiB') bounds the intermediate tensors of one batch.
    """
    n_total = num_items(data)
    if n_total == 0:
        raise ValueError("the dataset is empty: no patches to search")
    params = list(model.parameters())
    dev = torch.device(device) if device is not None else (
        params[0].device if params else torch.device("cpu"))
    gm = graph.trace(model).to(dev)
    target = _activation_node(gm, graph.conv_call(gm, layer), activation)
    sub = truncate(gm, target)          # only the network up to the layer ever runs
    conv = graph.conv_call(sub, layer)
    indices = pick_indices(n_total, num_images, seed)
    x0, _ = load_batch(data, indices[:1])
    if not x0.is_floating_point():
        raise TypeError(f"images must be floating point tensors, got {x0.dtype}")
    x0 = x0.to(dev, torch.float32)
    try:
        graph.propagate_shapes(sub, x0, "the model")
    except RuntimeError as exc:
        raise ValueError(f"images of shape {tuple(x0.shape[1:])} do not fit the model "
                         f"({str(exc).splitlines()[0]})") from exc
    rf = receptive_field_of(sub, conv)
    largest, per_image = bytes_per_image(sub, x0)   # the engine's measurement, input included
    budget = parse_bytes(memory_budget)
    rows = batch_rows(per_image, budget, len(indices), largest)
    out_meta = next(n for n in sub.graph.nodes if n.op == "output").args[0].meta["tensor_meta"]
    nf, map_h, map_w = (int(v) for v in out_meta.shape[1:])
    top = TopK(nf, k, dev)
    class_first: dict[int, int] = {}
    class_counts: dict[int, int] = {}
    max_batch = 0
    bar = progress_callbacks(progress, f"patches {layer}", total=len(indices), unit="img",
                             leave=False)
    with torch.no_grad():
        for s in range(0, len(indices), rows):
            idx = indices[s:s + rows]
            x, y = load_batch(data, idx)
            a = sub(x.to(dev, torch.float32))
            max_batch = max(max_batch, int(a.shape[0]))
            vals, pos = a.flatten(2).max(dim=2)     # spatial maximum, its first position
            top.update(vals, pos, torch.from_numpy(np.asarray(idx)))
            for lab, i in zip(y.tolist(), idx.tolist(), strict=True):
                class_first.setdefault(int(lab), int(i))
                class_counts[int(lab)] = class_counts.get(int(lab), 0) + 1
            bar.update(len(idx))
    bar.close()
    w = map_w
    pos = top.positions.cpu().numpy()
    images = top.images.cpu().numpy()
    keep = np.isfinite(top.values.cpu().numpy())
    if not keep.all():   # fewer than k images, or NaN activations: drop those entries
        k_eff = int(keep.sum(1).min())
        top.values, top.positions, top.images = (t[:, :k_eff] for t in
                                                 (top.values, top.positions, top.images))
        pos, images = pos[:, :k_eff], images[:, :k_eff]
    labels = _labels_at(data, images)
    return PatchSearch(
        layer=layer, activation="bn" if target.target != layer else "conv", receptive_field=rf,
        map_shape=(map_h, w), image_shape=tuple(int(v) for v in x0.shape[1:]),
        values=top.values.cpu().numpy().astype(np.float32), images=images.astype(np.int64),
        rows=(pos // w).astype(np.int64), cols=(pos % w).astype(np.int64), labels=labels,
        class_first=class_first, class_counts=class_counts, num_images=len(indices),
        stats={"batch_rows": rows, "bytes_per_image": per_image, "largest_bytes": largest,
               "budget": budget, "max_batch": max_batch, "state_bytes": top.state_bytes})


def _labels_at(data: DataLike, images: np.ndarray) -> np.ndarray:
    flat = images.reshape(-1)
    if flat.size == 0:
        return np.zeros(images.shape, dtype=np.int64)
    labels = getattr(data, "labels", None)
    if isinstance(labels, np.ndarray) and labels.ndim == 1:
        return labels[flat].reshape(images.shape).astype(np.int64)
    uniq, inv = np.unique(flat, return_inverse=True)
    _, y = load_batch(data, uniq)
    return y.numpy()[inv].reshape(images.shape).astype(np.int64)


# -- pixels for display ------------------------------------------------------------------------
def display_images(data: DataLike, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, C] images as a person should see them (un-normalised)."""
    idx = np.asarray(indices, dtype=np.int64)
    raw = getattr(data, "images", None)
    if isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.ndim == 4:
        return raw[idx]
    x, _ = load_batch(data, idx)
    x = x.detach().float().cpu()
    mean, std = getattr(data, "mean", None), getattr(data, "std", None)
    if mean is not None and std is not None and len(mean) == x.shape[1]:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        x = x.clamp(0, 1)
    else:   # unknown normalisation: stretch each image to [0, 1]
        lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = x.flatten(1).amax(1).view(-1, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def crop(image: np.ndarray, rf: ReceptiveField, row: int, col: int) -> np.ndarray:
    """The receptive field of (row, col) cut from image [H, W, C], placed on a grey canvas of the
    field's size (capped at the image size) so that a field clipped at a border keeps its place."""
    h, w = image.shape[:2]
    uy0, ux0, uy1, ux1 = rf.unclipped_box(row, col)
    y0, x0, y1, x1 = rf.box(row, col, h, w)
    ch, cw = min(rf.size[0], h), min(rf.size[1], w)
    canvas = np.full((ch, cw, image.shape[2]), 128, dtype=np.uint8)
    # clipped at the top/left: the patch sits at the bottom/right of its canvas
    oy = ch - (y1 - y0) if uy0 < 0 and uy1 <= h else 0
    ox = cw - (x1 - x0) if ux0 < 0 and ux1 <= w else 0
    canvas[oy:oy + (y1 - y0), ox:ox + (x1 - x0)] = image[y0:y1, x0:x1]
    return canvas


def mosaic(tiles: Sequence[np.ndarray], cols: int = 3, gap: int = 1, fill: int = 255) -> np.ndarray:
    """Tiles of equal shape [h, w, C] in a grid (rows filled first)."""
    if not tiles:
        return np.full((1, 1, 3), fill, dtype=np.uint8)
    h, w, c = tiles[0].shape
    rows = -(-len(tiles) // cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, c), fill, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, q = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = t
    return out
