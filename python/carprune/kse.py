"""KSE as a whole compression method (Li et al., CVPR 2019), beside CAR.

For each compressed conv layer with weight W [N, C, kh, kw] (N filters over C input maps):

1. **Indicator per input map.** Input map c's 2-D kernels are W[:, c] (one per filter). Their
   kernel sparsity s_c and kNN kernel entropy e_c give v_c = sqrt(s_c / (1 + alpha e_c)) with s
   and e min-max normalised over the layer's maps (`criteria.kse_scores`, the same indicator the
   ``kse`` filter criterion uses). v is then min-max normalised to [0, 1] within the layer, as
   the authors' implementation does, so the most important map keeps all its kernels and the
   least important loses them all. A layer with one input map, or whose maps all score the same,
   keeps every map whole (v = 1).
2. **Clusters per map** (`cluster_counts`, the paper's rule with granularity G and T):
   q_c = 0 when floor(v_c G) = 0; q_c = N when ceil(v_c G) = G; otherwise
   q_c = ceil(N / 2^(G - ceil(v_c G) + T)).
3. **Kernel clustering.** The N kernels of map c are clustered into q_c centroids by k-means
   (`kmeans`: k-means++ seeding from a generator keyed by the seed, the layer name and the map,
   so runs are deterministic and a layer's clusters do not depend on which other layers are
   compressed). Maps with q_c = N keep their kernels as they are; maps with q_c = 0 are removed.
4. **Compressed convolution** (`KSEConv2d`). Every kept map is convolved once with each of its
   centroids (one grouped convolution per level of equal q_c); output channel n then adds, over
   the kept maps, the result for the centroid its kernel was replaced by (a sparse 0/1 product:
   one addition per kept map). Maps kept whole are one ordinary convolution. It computes
   exactly the dense convolution whose kernels are the centroids (`KSEConv2d.dense_weight`),
   with fewer parameters and FLOPs (`count_cost` counts them by `kse_layer_cost`, which this
   module registers with `cost.register_layer_cost`). On CPU it is still slower than
   the dense convolution: grouped convolutions and sparse products run far below the speed of
   the dense kernels (measured in benchmarks/bench_kse.py).

`kse_compress` does this for every chosen layer at once, reading no data; fine-tuning (optional)
uses the project's one loop, `carprune.finetune`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import criteria, graph, surgery
from .callbacks import Callbacks, Event, ProgressBar, log, show_progress
from .cost import LayerCost, count_cost, register_layer_cost
from .data.batches import DataLike
from .evaluate import accuracy
from .finetune import FineTune, finetune
from .io import atomic_open, read_json, read_tensor_file, write_json
from .results import PrunedModelResult

STRUCTURE_FORMAT = "carprune.KSEStructure"
STRUCTURE_VERSION = 1
WEIGHTS_FILE = "weights.pt"
STRUCTURE_FILE = "structure.json"


# -- the rule and the clustering -----------------------------------------------------------------
def check_settings(G: Any, alpha: Any, T: Any = 0) -> None:
    """Raise ValueError naming the argument unless G is an integer >= 2, alpha a finite number
    >= 0 and T an integer >= 0."""
    if isinstance(G, bool) or not isinstance(G, int | np.integer) or G < 2:
        raise ValueError(f"G (the number of indicator levels) must be an integer >= 2, got {G!r}")
    if (isinstance(alpha, bool) or not isinstance(alpha, int | float | np.floating)
            or not math.isfinite(alpha) or alpha < 0):
        raise ValueError(f"alpha (the entropy weight) must be a finite number >= 0, got {alpha!r}")
    if isinstance(T, bool) or not isinstance(T, int | np.integer) or T < 0:
        raise ValueError(f"T (the cluster granularity) must be an integer >= 0, got {T!r}")


def cluster_counts(indicator: Sequence[float] | torch.Tensor | np.ndarray, n_kernels: int, G: int,
                   T: int = 0) -> list[int]:
    """Number of centroids q_c for each input map from its indicator v_c in [0, 1] (the paper's
    rule): 0 when floor(v_c G) = 0, N = `n_kernels` when ceil(v_c G) = G, otherwise
    ceil(N / 2^(G - ceil(v_c G) + T)). Maps below 1/G lose all their kernels; maps above
    (G - 1)/G keep all N; in between, each level up doubles the count."""
    check_settings(G, 0.0, T)
    v = np.asarray(indicator, dtype=np.float64).reshape(-1)
    if v.size and (not np.isfinite(v).all() or v.min() < 0 or v.max() > 1):
        raise ValueError(f"indicator values must lie in [0, 1], got {v.tolist()}")
    out = []
    for x in v.tolist():
        lo, hi = math.floor(x * G), math.ceil(x * G)
        if lo == 0:
            out.append(0)
        elif hi == G:
            out.append(int(n_kernels))
        else:
            out.append(math.ceil(n_kernels / 2 ** (G - hi + T)))
    return out


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    centres = [x[int(rng.integers(n))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.stack(centres).astype(np.float64)


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 5,
           max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on vectors ([n, d] -> float64 centroids [k, d], labels [n] int64), from
    `n_init` k-means++ seedings drawn from `rng`; the run of lowest inertia wins (ties: the
    first). Ties in assignment go to the lower centroid index; an empty cluster keeps its
    centroid, as in Deep Compression's `kmeans_1d`.

    Deep Compression's `deepcompress.quantize.kmeans_1d` stays separate: on scalars it runs in
    O(k log n) per iteration on sorted values with a linear initialisation (Han et al.), which a
    general distance-matrix k-means (O(n k d)) would lose on layers of 10^5-10^6 weights; here
    the points are N <= a few hundred kernels of kh*kw values, where that cost is negligible."""
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs points [n, d] and 1 <= k <= n, got shape {x.shape} and k={k}")
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(max(1, n_init)):
        c = _kmeanspp(x, k, rng)
        labels = None
        for _ in range(max_iter):
            new = ((x[:, None, :] - c[None]) ** 2).sum(2).argmin(1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            counts = np.bincount(labels, minlength=k)
            sums = np.zeros_like(c)
            np.add.at(sums, labels, x)
            filled = counts > 0
            c[filled] = sums[filled] / counts[filled, None]
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(2)
        labels = d2.argmin(1)
        inertia = float(d2[np.arange(x.shape[0]), labels].sum())
        if best is None or inertia < best[0]:
            best = (inertia, c.copy(), labels.astype(np.int64))
    assert best is not None
    return best[1], best[2]


# -- the compressed convolution ------------------------------------------------------------------
class _Fuse(torch.autograd.Function):
    """y = S @ z for dense z [Q, cols] and a constant sparse (CSR) 0/1 matrix S [N, Q]; the
    gradient is St @ grad with St = S^T, also sparse, so each addition of the channel fusion is
    done once, forward and backward."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, s: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
        ctx.st = st
        return torch.mm(s, z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return torch.mm(ctx.st, grad.contiguous()), None, None


class KSEConv2d(nn.Module):
    """A conv layer whose 2-D kernels are shared per input map (KSE's compressed convolution).

    Kept input maps `maps` with `clusters[i]` centroids for map maps[i], in canonical order:
    sorted by (clusters, map index), so maps with the same count form contiguous levels and maps
    kept whole (clusters = out_channels) come last. Parameters: `centroids` [Q, 1, kh, kw]
    (Q = sum(clusters), map by map in that order) and `bias` [out_channels] or None. Buffer
    `assign` [len(maps), out_channels]: the index into `centroids` of the kernel that replaced
    W[n, maps[i]]; a whole map's kernels keep their order (assign = its block in order).

    forward: each level of m clustered maps with q centroids each is one grouped convolution
    (m groups, each convolving its map with its q centroids); the channel fusion adds, for output
    n, the results assign[i, n] over the clustered maps (a sparse 0/1 product: one addition per
    term); the whole maps are one ordinary convolution over those maps. Equal, up to float
    rounding, to F.conv2d with `dense_weight()`. Only groups=1 convs with zero padding.
    """

    carprune_leaf = True  # graph.trace keeps it a single call_module node
    maps: torch.Tensor
    assign: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, maps: Sequence[int],
                 clusters: Sequence[int], stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        maps = [int(m) for m in maps]
        clusters = [int(q) for q in clusters]
        if not maps:
            raise ValueError("a KSEConv2d needs at least one kept input map")
        if len(maps) != len(clusters):
            raise ValueError(f"maps ({len(maps)}) and clusters ({len(clusters)}) must pair up")
        if len(set(maps)) != len(maps) or min(maps) < 0 or max(maps) >= in_channels:
            raise ValueError(f"maps must be distinct indices in [0, {in_channels}), got {maps}")
        if any(not 1 <= q <= out_channels for q in clusters):
            raise ValueError(f"clusters per map must lie in [1, {out_channels}], got {clusters}")
        if list(zip(clusters, maps, strict=True)) != sorted(zip(clusters, maps, strict=True)):
            raise ValueError("maps must be in canonical order, sorted by (clusters, map index)")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = padding if isinstance(padding, str) else nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.clusters = clusters
        self.centroids = nn.Parameter(torch.zeros(sum(clusters), 1, *self.kernel_size, device=device,
                                                  dtype=dtype))
        self.bias = (nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias
                     else None)
        self.register_buffer("maps", torch.tensor(maps, dtype=torch.int64, device=device))
        offsets = np.concatenate([[0], np.cumsum(clusters)[:-1]]).astype(np.int64)
        assign = np.repeat(offsets[:, None], out_channels, 1)
        whole = np.asarray(clusters) == out_channels
        assign[whole] += np.arange(out_channels)
        self.register_buffer("assign", torch.as_tensor(assign, device=device))
        # levels: (first map, end map, first centroid, end centroid, q) of equal q < out_channels
        self._levels: list[tuple[int, int, int, int, int]] = []
        i = 0
        while i < len(maps) and clusters[i] < out_channels:
            j = i
            while j < len(maps) and clusters[j] == clusters[i]:
                j += 1
            self._levels.append((i, j, int(offsets[i]), int(offsets[i]) + (j - i) * clusters[i],
                                 clusters[i]))
            i = j
        self._n_clustered = i            # maps[:i] are clustered, maps[i:] kept whole
        self._q_clustered = int(offsets[i]) if i < len(maps) else sum(clusters)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, maps: Sequence[int], centroids: Sequence[torch.Tensor],
                  labels: Sequence[torch.Tensor]) -> KSEConv2d:
        """Replace `conv` by shared kernels: kept map maps[i] gets the centroids `centroids[i]`
        [q_i, kh, kw], and W[n, maps[i]] becomes centroids[i][labels[i][n]]. A map with q_i =
        out_channels must have labels that are a permutation (its kernels are kept, reordered)."""
        check_convertible(conv, "conv")
        w = conv.weight
        n = conv.out_channels
        items = []
        for m, c, lab in zip(maps, centroids, labels, strict=True):
            c = torch.as_tensor(c).reshape(-1, *conv.kernel_size)
            lab = torch.as_tensor(lab, dtype=torch.int64).reshape(-1)
            if lab.shape != (n,) or int(lab.min()) < 0 or int(lab.max()) >= c.shape[0]:
                raise ValueError(f"labels of map {m} must be {n} indices into its {c.shape[0]} "
                                 "centroids")
            if c.shape[0] == n:
                if sorted(lab.tolist()) != list(range(n)):
                    raise ValueError(f"map {m} has {n} centroids for {n} kernels but its labels "
                                     "are not a permutation")
                c, lab = c[lab], torch.arange(n)
            items.append((int(c.shape[0]), int(m), c, lab))
        items.sort(key=lambda t: (t[0], t[1]))
        new = cls(conv.in_channels, n, conv.kernel_size, [t[1] for t in items],
                  [t[0] for t in items], conv.stride, conv.padding, conv.dilation,
                  conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.centroids.copy_(torch.cat([t[2] for t in items]).reshape(-1, 1, *new.kernel_size)
                                .to(w.dtype))
            offset = 0
            for i, (q, _, _, lab) in enumerate(items):
                new.assign[i] = lab.to(new.assign.device) + offset
                offset += q
            if conv.bias is not None:
                new.bias.copy_(conv.bias.detach())
        new.train(conv.training)
        return new

    @property
    def num_centroids(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def num_maps(self) -> int:
        return int(self.maps.numel())

    @property
    def index_bytes(self) -> int:
        """Bytes of the kernel-to-centroid indices: ceil(log2 q_c) bits for each of the N
        kernels of a map with 1 < q_c < N (q_c = N keeps its kernels in order: no index; q_c =
        1 needs none), packed."""
        bits = sum(self.out_channels * math.ceil(math.log2(q)) for q in self.clusters
                   if 1 < q < self.out_channels)
        return (bits + 7) // 8

    def check(self) -> None:
        """Raise ValueError unless every index in `assign` points at a centroid of its own map
        and whole maps keep their kernels in order (used after loading weights from a file)."""
        offsets = np.concatenate([[0], np.cumsum(self.clusters)]).tolist()
        a = self.assign.detach().cpu()
        if a.shape != (self.num_maps, self.out_channels):
            raise ValueError(f"assign has shape {tuple(a.shape)}, expected "
                             f"{(self.num_maps, self.out_channels)}")
        for i, q in enumerate(self.clusters):
            if int(a[i].min()) < offsets[i] or int(a[i].max()) >= offsets[i + 1]:
                raise ValueError(f"assign of input map {int(self.maps[i])} points outside its "
                                 f"centroids [{offsets[i]}, {offsets[i + 1]})")
            if q == self.out_channels and not torch.equal(a[i], torch.arange(q) + offsets[i]):
                raise ValueError(f"input map {int(self.maps[i])} is kept whole, so its kernels must "
                                 "stay in order")

    def dense_weight(self) -> torch.Tensor:
        """The equivalent ordinary conv weight [N, C, kh, kw]: W[n, maps[i]] = the centroid
        assigned to it, 0 for removed maps."""
        w = self.centroids.new_zeros(self.out_channels, self.in_channels, *self.kernel_size)
        kernels = self.centroids[:, 0][self.assign]            # [maps, N, kh, kw]
        w[:, self.maps] = kernels.transpose(0, 1)
        return w

    def _fusion(self, i: int, j: int, c0: int, c1: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR matrices S [N, Q_level] (S[n, assign[a, n] - c0] = 1 for maps a in [i, j)) and
        St = S^T of one level: its channel fusion as a sparse product."""
        n = self.out_channels
        cols = self.assign[i:j].reshape(-1) - c0
        outs = torch.arange(n, device=device).repeat(j - i)
        ones = torch.ones(cols.numel(), device=device, dtype=dtype)
        with warnings.catch_warnings():  # torch's notice that CSR support is in beta
            warnings.simplefilter("ignore", UserWarning)
            s = torch.sparse_coo_tensor(torch.stack([outs, cols]), ones, (n, c1 - c0),
                                        check_invariants=False).coalesce()
            st = torch.sparse_coo_tensor(torch.stack([cols, outs]), ones, (c1 - c0, n),
                                         check_invariants=False).coalesce()
            return s.to_sparse_csr(), st.to_sparse_csr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.out_channels
        kh, kw = self.kernel_size
        out = None
        if self._n_clustered < self.num_maps:                      # maps kept whole
            m = self.num_maps - self._n_clustered
            w = self.centroids[self._q_clustered:].view(m, n, kh, kw).transpose(0, 1)
            out = F.conv2d(x.index_select(1, self.maps[self._n_clustered:]), w, None, self.stride,
                           self.padding, self.dilation)
        for i, j, c0, c1, _ in self._levels:
            z = F.conv2d(x.index_select(1, self.maps[i:j]), self.centroids[c0:c1], None, self.stride,
                         self.padding, self.dilation, groups=j - i)   # [B, Q_level, H', W']
            b, q, h, w_ = z.shape
            s, st = self._fusion(i, j, c0, c1, z.device, z.dtype)
            y = _Fuse.apply(z.transpose(0, 1).reshape(q, b * h * w_), s, st)
            y = y.view(n, b, h, w_).transpose(0, 1)
            out = y if out is None else out + y
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, maps={self.num_maps}, "
                f"centroids={self.num_centroids}, bias={self.bias is not None}")


def kse_layer_cost(name: str, mod: KSEConv2d, out: torch.Tensor) -> LayerCost:
    """`count_cost`'s rule for a `KSEConv2d` (kind "kse"), registered at import: kept input maps
    n' each have q_c shared kernels (Q = sum q_c) feeding n_L outputs, so FLOPs =
    k^2 (f^2 Q + n_L (n' - 1)), one f x f convolution per centroid (f^2 multiply-accumulates per
    position) plus, per output channel and position, n' - 1 additions fusing the kept maps'
    results; params = f^2 Q (+ bias); bytes = 4 f^2 Q + the packed kernel-to-centroid indices
    (`KSEConv2d.index_bytes`). `inputs` is n'."""
    w = mod.centroids
    fh, fw = mod.kernel_size
    ho, wo = int(out.shape[-2]), int(out.shape[-1])
    n_l, kept, q = mod.out_channels, mod.num_maps, mod.num_centroids
    params = w.numel() + (mod.bias.numel() if mod.bias is not None else 0)
    return LayerCost(name, "kse", (ho, wo), n_l, (fh, fw), kept,
                     ho * wo * (fh * fw * q + n_l * (kept - 1)), params,
                     4 * w.numel() + mod.index_bytes)


register_layer_cost(KSEConv2d, kse_layer_cost)


def check_convertible(conv: nn.Module, layer: str) -> None:
    """Raise ValueError unless `conv` is a plain Conv2d that KSE can represent."""
    if isinstance(conv, KSEConv2d):
        raise ValueError(f"layer {layer!r} is already KSE-compressed")
    if not isinstance(conv, nn.Conv2d) or isinstance(conv, surgery.ScatteredConv2d):
        raise ValueError(f"layer {layer!r} is a {type(conv).__name__}; KSE compresses plain "
                         "Conv2d layers")
    if conv.groups != 1:
        raise ValueError(f"layer {layer!r} is a grouped conv (groups={conv.groups}); KSE "
                         "compresses groups=1 convs only")
    if conv.padding_mode != "zeros":
        raise ValueError(f"layer {layer!r} pads with {conv.padding_mode!r}; KSE supports zero "
                         "padding only")


def default_layers(model: nn.Module) -> list[str]:
    """Every groups=1 Conv2d except the stem: convs with no conv or linear layer between the
    network's input and them (`graph.is_first_layer`; their few colour maps are left dense, as
    the KSE authors' CIFAR ResNets do)."""
    gm = graph.trace(model)
    calls: dict[str, list] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    out = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and not isinstance(m, surgery.ScatteredConv2d)
                and m.groups == 1 and m.padding_mode == "zeros"
                and not any(graph.is_first_layer(gm, n) for n in calls.get(name, []))):
            out.append(name)
    return out


def resolve_layers(model: nn.Module, layers: Sequence[str] | str | None) -> list[str]:
    """The layers to compress: `layers` checked (each a plain groups=1 Conv2d of `model`, no
    repeats), or `default_layers` for None. Errors name the layer and the conv layers there are."""
    if layers is None:
        out = default_layers(model)
        if not out:
            raise ValueError("the model has no conv layer KSE can compress (besides the stem)")
        return out
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one conv layer (or be None for all)")
    modules = dict(model.named_modules())
    convs = graph.conv_layers(model)
    for name in layers:
        if not isinstance(name, str) or name not in modules or not name:
            raise ValueError(f"unknown layer {name!r}; the conv layers are: {', '.join(convs)}")
        check_convertible(modules[name], name)
    dup = sorted({n for n in layers if layers.count(n) > 1})
    if dup:
        raise ValueError(f"layers lists {dup} more than once")
    return layers


# -- results -------------------------------------------------------------------------------------
@dataclass
class KSELayer:
    """What KSE did to one conv layer (per image: FLOPs as `count_cost` counts them)."""

    layer: str
    in_channels: int
    out_channels: int
    kernel: list[int]
    indicator: list[float]      # v per input map, normalised to [0, 1]
    clusters: list[int]         # centroids per input map (0: map removed, out_channels: kept whole)
    maps_removed: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass
class KSEResult(PrunedModelResult):
    """A KSE-compressed network with its per-layer report.

    `model` computes with `KSEConv2d` layers; `dense_state_dict()` writes it back as ordinary
    conv weights for the original architecture. Accuracies are top-1 on the hold-out images, when
    evaluation data was given."""

    FORMAT: ClassVar[str] = "carprune.KSEResult"
    VERSION: ClassVar[int] = 1

    G: int
    alpha: float
    T: int
    seed: int
    layers: list[str]
    report: list[KSELayer]
    input_shape: list[int]
    flops_before: int            # whole network, per image
    flops_after: int
    params_before: int           # every parameter of the network
    params_after: int
    seconds: float               # compression wall time (data-free; fine-tuning excluded)
    holdout_accuracy_before: float | None = None
    holdout_accuracy: float | None = None
    finetuned_holdout_accuracy: float | None = None
    finetune_seconds: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def flops_reduction(self) -> float:
        return self.flops_before / max(1, self.flops_after)

    @property
    def params_reduction(self) -> float:
        return self.params_before / max(1, self.params_after)

    def layer(self, name: str) -> KSELayer:
        for r in self.report:
            if r.layer == name:
                return r
        raise KeyError(f"layer {name!r} was not compressed; compressed: {', '.join(self.layers)}")

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The compressed network as a state dict of the original architecture: each KSE layer's
        `weight` is its `dense_weight()` (removed maps 0), its bias kept; everything else as is."""
        if self.model is None:
            raise ValueError("this KSEResult holds no model (load it with an architecture)")
        kse = {name: m for name, m in self.model.named_modules() if isinstance(m, KSEConv2d)}
        state = {}
        for key, value in self.model.state_dict().items():
            owner = key.rpartition(".")[0]
            if owner not in kse:
                state[key] = value.detach().clone()
        for name, m in kse.items():
            state[f"{name}.weight"] = m.dense_weight().detach().clone()
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach().clone()
        return state

    def to_markdown(self) -> str:
        """The per-layer table and the whole-network line."""
        rows = ["| layer | maps | removed | clusters per kept map (min / mean / max) | params | "
                "FLOPs |", "|---|---:|---:|---|---:|---:|"]
        for r in self.report:
            kept = [q for q in r.clusters if q]
            rows.append(f"| {r.layer} | {r.in_channels} | {r.maps_removed} | {min(kept)} / "
                        f"{sum(kept) / len(kept):.1f} / {max(kept)} of {r.out_channels} | "
                        f"{r.params_before:,} -> {r.params_after:,} | {r.flops_before:,} -> "
                        f"{r.flops_after:,} |")
        rows.append(f"| **network** | | | G={self.G}, alpha={self.alpha:g}, T={self.T} | "
                    f"{self.params_before:,} -> {self.params_after:,} ({self.params_reduction:.2f}x) | "
                    f"{self.flops_before:,} -> {self.flops_after:,} ({self.flops_reduction:.2f}x) |")
        acc = [(label, a) for label, a in (("original", self.holdout_accuracy_before),
                                           ("KSE", self.holdout_accuracy),
                                           ("KSE + fine-tune", self.finetuned_holdout_accuracy))
               if a is not None]
        if acc:
            rows.append("")
            rows.append("hold-out accuracy: " + ", ".join(f"{k} {100 * a:.2f} %" for k, a in acc))
        return "\n".join(rows)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], model: nn.Module | None) -> KSEResult:
        obj = dict(obj)
        obj["report"] = [KSELayer(**r) for r in obj["report"]]
        return cls(**obj, model=model)

    def _save_model(self, directory: Path) -> None:
        save_kse_model(self.model, directory)

    @classmethod
    def _load_model(cls, directory: Path, architecture: nn.Module) -> nn.Module:
        return load_kse_model(directory, architecture)


def save_kse_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """`weights.pt` (the state dict: plain tensors) and `structure.json` (which maps each KSE layer
    keeps and their centroid counts), each written atomically; no code is pickled."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, KSEConv2d):
            layers[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels,
                            "kernel_size": list(m.kernel_size), "maps": m.maps.tolist(),
                            "clusters": list(m.clusters)}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_open(d / WEIGHTS_FILE, "wb") as f:
        torch.save(state, f)
    write_json(d / STRUCTURE_FILE, {"format": STRUCTURE_FORMAT, "version": STRUCTURE_VERSION,
                                    "layers": layers})
    return d


def load_kse_model(directory: str | os.PathLike, architecture: nn.Module) -> nn.Module:
    """Rebuild a model written by `save_kse_model` from `architecture` (a model with the
    structure of the one KSE was given; its weights do not matter, and it is not changed)."""
    import copy

    d = Path(directory)
    obj = read_json(d / STRUCTURE_FILE, "KSE model structure")
    if not isinstance(obj, dict) or obj.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"{d / STRUCTURE_FILE} is not a KSE model structure (format "
                         f"{obj.get('format') if isinstance(obj, dict) else None!r})")
    if obj.get("version") != STRUCTURE_VERSION:
        raise ValueError(f"{d / STRUCTURE_FILE}: version {obj.get('version')!r} is not supported "
                         f"(this carprune reads version {STRUCTURE_VERSION})")
    model = copy.deepcopy(architecture)
    modules = dict(model.named_modules())
    for name, entry in obj["layers"].items():
        conv = modules.get(name)
        if conv is None:
            raise ValueError(f"{d / STRUCTURE_FILE} names layer {name!r}, which "
                             f"{type(architecture).__name__} lacks")
        check_convertible(conv, name)
        if (conv.in_channels, conv.out_channels, list(conv.kernel_size)) != (
                entry["in_channels"], entry["out_channels"], entry["kernel_size"]):
            raise ValueError(f"layer {name!r} is {conv.in_channels}->{conv.out_channels} "
                             f"{list(conv.kernel_size)} in the given architecture but "
                             f"{entry['in_channels']}->{entry['out_channels']} {entry['kernel_size']} "
                             "in the saved structure: not the same network")
        new = KSEConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, entry["maps"],
                        entry["clusters"], conv.stride, conv.padding, conv.dilation,
                        conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        surgery._set_submodule(model, name, new)
    state = read_tensor_file(d / WEIGHTS_FILE, "KSE model weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{d / WEIGHTS_FILE} does not hold a state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {d / WEIGHTS_FILE} do not fit the rebuilt model: {exc}") from exc
    for m in model.modules():
        if isinstance(m, KSEConv2d):
            m.check()
    return model.eval()


# -- the method ----------------------------------------------------------------------------------
def layer_indicator(weight: torch.Tensor, alpha: float = criteria.KSE_ALPHA) -> torch.Tensor:
    """KSE indicator per input map of a conv weight [N, C, kh, kw], normalised to [0, 1] (float64;
    see the module docstring)."""
    n, c = weight.shape[:2]
    if c == 1:
        return torch.ones(1, dtype=torch.float64)
    kernels = weight.detach().to(torch.float64).cpu().permute(1, 0, 2, 3).reshape(c, n, -1)
    v = criteria.kse_scores([criteria.Outgoing("", "conv", kernels)], alpha=alpha)
    if float(v.max() - v.min()) <= 0:
        return torch.ones(c, dtype=torch.float64)
    return criteria._minmax(v)


def _compress_conv(conv: nn.Conv2d, layer: str, G: int, alpha: float, T: int, seed: int
                   ) -> tuple[KSEConv2d, list[float], list[int]]:
    v = layer_indicator(conv.weight, alpha)
    n = conv.out_channels
    q = cluster_counts(v, n, G, T)
    w = conv.weight.detach().to(torch.float64).cpu()
    maps, cents, labels = [], [], []
    key = zlib.crc32(layer.encode())
    for c, qc in enumerate(q):
        if qc == 0:
            continue
        kernels = w[:, c].reshape(n, -1).numpy()
        if qc == n:
            cen, lab = kernels, np.arange(n)
        else:
            cen, lab = kmeans(kernels, qc, np.random.default_rng([seed, key, c]))
        maps.append(c)
        cents.append(torch.from_numpy(np.ascontiguousarray(cen)).reshape(qc, *conv.kernel_size))
        labels.append(torch.from_numpy(np.asarray(lab, dtype=np.int64)))
    return KSEConv2d.from_conv(conv, maps, cents, labels), v.tolist(), q


def kse_compress(
    model: nn.Module,
    G: int = 4,
    alpha: float = criteria.KSE_ALPHA,
    layers: Sequence[str] | str | None = None,
    *,
    T: int = 0,
    seed: int = 0,
    input_shape: Sequence[int] = (3, 32, 32),
    finetune: FineTune | None = None,
    eval_data: DataLike | None = None,
    eval_images: int | None = None,
    progress: bool | None = None,
    callbacks: Callbacks | None = None,
) -> KSEResult:
    """Compress conv `layers` of `model` (default: every conv but the stem, `default_layers`) by
    KSE, all at once and without data; `model` itself is not changed.

    G: indicator levels (the paper uses 4 and 5; more levels keep more kernels); alpha: weight of
    the kernel entropy in the indicator; T: extra halving of the cluster counts (0 in the paper's
    CIFAR-10 runs). `input_shape` (one image, C x H x W) is what FLOPs are counted for.

    finetune: run the project's loop (`carprune.finetune`) on the compressed network after
    compression. KSE compresses every layer at once, so there is no single compressed layer
    with consumers: every parameter (centroids, biases, BatchNorm affine, dense layers) trains at
    `finetune.lr_other`; the other schedule fields (iterations, batch, momentum, seed) apply as
    given. eval_data/eval_images: hold-out accuracy of the original, compressed and fine-tuned
    networks on a seeded subset.

    callbacks: an `Event` ("kse") per compressed layer, then fine-tuning's per epoch. Without
    callbacks, `progress` (True; None: on a terminal) shows a bar (`callbacks.ProgressBar`),
    and otherwise each layer is logged at info level.
    """
    check_settings(G, alpha, T)
    own = None
    if callbacks is None and show_progress(progress):
        callbacks = own = ProgressBar("KSE", unit="layer", leave=False)
    try:
        return _kse_compress(model, int(G), float(alpha), layers, int(T), int(seed), input_shape,
                             finetune, eval_data, eval_images, callbacks)
    finally:
        if own is not None:
            own.close()


def _kse_compress(model, G, alpha, layers, T, seed, input_shape, finetune, eval_data, eval_images,
                  callbacks) -> KSEResult:
    shape = tuple(int(s) for s in input_shape)
    work = surgery.copy_model(model).eval()
    names = resolve_layers(work, layers)
    before = count_cost(work, shape)
    acc0 = accuracy(work, eval_data, num_images=eval_images, seed=seed) if eval_data is not None else None
    t0 = time.perf_counter()
    modules = dict(work.named_modules())
    done: list[tuple[str, list[float], list[int]]] = []
    for i, name in enumerate(names):
        t1 = time.perf_counter()
        new, v, q = _compress_conv(modules[name], name, G, alpha, T, seed)
        surgery._set_submodule(work, name, new)
        done.append((name, v, q))
        msg = (f"KSE {i + 1}/{len(names)} {name}: {q.count(0)} of {len(q)} input maps removed, "
               f"{sum(q)} centroids for {len(q) * new.out_channels} kernels")
        if callbacks is None:
            log.info("%s", msg)
        else:
            callbacks.on_event(Event("kse", i + 1, msg, total=len(names), data={
                "label": "KSE", "unit": "layer", "layer": name, "removed_maps": q.count(0),
                "centroids": sum(q), "seconds": time.perf_counter() - t1}))
    seconds = time.perf_counter() - t0
    after = count_cost(work, shape)
    report = []
    for name, v, q in done:
        b, a = before.layer(name), after.layer(name)
        conv = modules[name]
        report.append(KSELayer(name, conv.in_channels, conv.out_channels, list(conv.kernel_size), v, q,
                               q.count(0), b.params, a.params, b.flops, a.flops))
    config = {"G": G, "alpha": alpha, "T": T, "seed": seed,
              "layers": names, "input_shape": list(shape), "eval_images": eval_images,
              "finetune": finetune.describe() if finetune is not None else None}
    result = KSEResult(G=G, alpha=alpha, T=T, seed=seed, layers=names,
                       report=report, input_shape=list(shape), flops_before=before.total_flops,
                       flops_after=after.total_flops, params_before=before.total_params,
                       params_after=after.total_params, seconds=seconds,
                       holdout_accuracy_before=acc0, config=config, model=work)
    if eval_data is not None:
        result.holdout_accuracy = accuracy(work, eval_data, num_images=eval_images, seed=seed)
    if finetune is not None:
        t1 = time.perf_counter()
        finetune_kse(work, finetune, callbacks)
        result.finetune_seconds = time.perf_counter() - t1
        if eval_data is not None:
            result.finetuned_holdout_accuracy = accuracy(work, eval_data, num_images=eval_images, seed=seed)
    log.info("KSE G=%d: FLOPs %s -> %s (%.2fx), params %s -> %s (%.2fx) in %.1f s", G,
             f"{before.total_flops:,}", f"{after.total_flops:,}", result.flops_reduction,
             f"{before.total_params:,}", f"{after.total_params:,}", result.params_reduction, seconds)
    return result


def finetune_kse(model: nn.Module, cfg: FineTune, callbacks: Callbacks | None = None) -> nn.Module:
    """Fine-tune a KSE-compressed network in place with `carprune.finetune`: with no single
    compressed layer named, every parameter trains at `cfg.lr_other` (see `kse_compress`);
    `callbacks` hear of every epoch."""
    return finetune(model, [], cfg, callbacks)
