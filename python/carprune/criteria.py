"""Data-free filter importance criteria: the baselines CAR is compared with.

Each returns one score per filter of a conv layer, or per neuron (output feature) of a linear
layer (higher = more important; greedy compression removes the lowest first):

* ``random``: seeded uniform scores in [0, 1) (a control).
* ``mean_in``: mean |w| over the filter's incoming weights W[i] (He et al. 2014, node pruning).
* ``mean_out``: mean |w| over every weight that reads channel i downstream (He et al. 2014):
  W_next[:, i] of each consuming conv and the column block of channel i in a linear layer after a
  flatten (block = in_features // channels), or column i of a linear layer reading a linear
  layer's features directly. These are `graph.LayerAnalysis.readers`: found by following the
  output through operations that keep the channel index (channel-wise ops, element-wise
  add/sub/mul such as a residual add, identity shortcuts); paths through anything else (e.g. a
  padding shortcut) are not followed.
* ``l1``: sum |w| over W[i] (Li et al. 2016, "Pruning filters for efficient ConvNets").
* ``kse``: the kernel sparsity and entropy indicator (Li et al., CVPR 2019), see `kse_scores`.

Each is a small object (`Random`, `MeanIn`, `MeanOut`, `L1`, `KSE`) following the
`LayerCriterion` protocol: ``crit(analysis)`` takes the layer's `graph.LayerAnalysis` and returns
float64 [filters]; `name` identifies it (in results and checkpoint fingerprints; objects with
parameters name them) and `rescore` says whether greedy compression (`greedy.compress_layer`)
re-ranks after every step (on the network with the removed filters taken out) or ranks once.
`get_criterion` turns a name into its object; users write their own (e.g. BatchNorm scales) with
the same three members. `filter_importance` is the checked call of any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from . import graph
from .graph import num_units as _num_units
from .surgery import ScatteredConv2d

CRITERIA = ("random", "mean_in", "mean_out", "l1", "kse")
KSE_NEIGHBOURS = 5
KSE_ALPHA = 1.0


@dataclass
class Outgoing:
    """The weights through which channel i of a layer's output is read: `kernels[i]` holds one
    row per kernel (a conv's W_next[o, i] flattened, or a linear row's column block of i)."""

    consumer: str
    kind: str                  # "conv" or "linear"
    kernels: torch.Tensor      # [channels, kernels per channel, kernel size]


def outgoing_weights(model: nn.Module | graph.LayerAnalysis, layer: str | None = None
                     ) -> list[Outgoing]:
    """Every conv/linear weight block that reads `layer`'s output channels (see the module
    docstring): one `Outgoing` per `LayerAnalysis.readers` entry, sorted by consumer name.
    `model` may be the layer's `LayerAnalysis` (then `layer` may be omitted)."""
    analysis = graph.analysis_of(model, layer)
    channels = analysis.num_filters
    found: list[Outgoing] = []
    for r in analysis.readers:
        w = analysis.gm.get_submodule(r.module).weight.detach()
        if r.kind == "conv":
            kernels = w.transpose(0, 1).reshape(channels, w.shape[0], -1)
        else:   # column block of each channel (one column: a linear layer's features)
            kernels = w.reshape(w.shape[0], channels, r.block).permute(1, 0, 2)
        found.append(Outgoing(r.module, r.kind, kernels))
    if not found:
        raise graph.CutError(f"no conv or linear layer reads the output of {analysis.layer!r} "
                             "through channel-preserving operations, so it has no outgoing "
                             "weights to score")
    return found


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def kernel_entropy(kernels: torch.Tensor, neighbours: int = KSE_NEIGHBOURS) -> torch.Tensor:
    """KSE's kernel entropy per channel from `kernels` [channels, N, d] (float64 result).

    For each of the N kernels of a channel, the density metric dm_j is the sum of the Euclidean
    distances to its k = min(neighbours, N - 1) nearest other kernels; with p_j = dm_j / sum dm,
    e = -sum_j p_j log2 p_j (0 log 0 = 0; e = 0 when every dm is 0 or N = 1)."""
    c, n, _ = kernels.shape
    k = min(neighbours, n - 1)
    if k <= 0:
        return torch.zeros(c, dtype=torch.float64)
    x = kernels.to(torch.float64)
    dist = torch.cdist(x, x)                                         # [c, n, n]
    dist = dist + torch.diag_embed(torch.full((c, n), math.inf, dtype=torch.float64))
    dm = dist.topk(k, dim=2, largest=False).values.sum(2)            # [c, n]
    total = dm.sum(1, keepdim=True)
    p = torch.where(total > 0, dm / total.clamp_min(1e-300), torch.zeros_like(dm))
    return -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(1)


def kse_scores(outgoing: list[Outgoing], alpha: float = KSE_ALPHA,
               neighbours: int = KSE_NEIGHBOURS) -> torch.Tensor:
    """The KSE indicator per channel (Li et al., CVPR 2019, Eq. for v_c), float64.

    For channel c, its kernels are the consumer's 2-D kernels W_next[:, c] (a linear consumer:
    the column block of c in each output row). Sparsity s_c = sum |W_next[:, c]|; entropy e_c
    from `kernel_entropy`. With several consumers, s_c and e_c are summed over them. Both are
    min-max normalised over the channels (all-equal values give 0), then
    v_c = sqrt(s_c / (1 + alpha e_c)).
    """
    s = sum(o.kernels.to(torch.float64).abs().sum((1, 2)) for o in outgoing)
    e = sum(kernel_entropy(o.kernels, neighbours) for o in outgoing)
    return torch.sqrt(_minmax(s) / (1 + alpha * _minmax(e)))


@runtime_checkable
class LayerCriterion(Protocol):
    """A per-layer filter criterion: `name` (str, identifies it in results and checkpoints),
    `rescore` (bool: whether greedy compression re-ranks after every step) and
    ``__call__(analysis)``: the importance of each filter of ``analysis.layer`` (a
    `graph.LayerAnalysis`; read weights from ``analysis.gm``), float64 [filters], higher = more
    important."""

    name: str
    rescore: bool

    def __call__(self, analysis: graph.LayerAnalysis) -> torch.Tensor:
        """float64 [filters]: the importance of each filter of the analysed layer."""


def _weight(analysis: graph.LayerAnalysis) -> torch.Tensor:
    """The layer's weight, float64 on the CPU, one row per filter (refusing a scattered layer)."""
    conv = analysis.conv
    if isinstance(conv, ScatteredConv2d):
        raise ValueError(f"layer {analysis.layer!r} is already pruned by scattering; score its "
                         "filters on the original model")
    return conv.weight.detach().to(torch.float64).cpu().reshape(_num_units(conv), -1)


class Random:
    """Seeded uniform values in [0, 1) (a control); the same values for every call."""

    rescore = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.name = f"random(seed={self.seed})"

    def __call__(self, analysis: graph.LayerAnalysis) -> torch.Tensor:
        n = _weight(analysis).shape[0]
        return torch.rand(n, generator=torch.Generator().manual_seed(self.seed),
                          dtype=torch.float64)


class MeanIn:
    """Mean |w| over the filter's incoming weights W[i] (He et al. 2014)."""

    name = "mean_in"
    rescore = False

    def __call__(self, analysis: graph.LayerAnalysis) -> torch.Tensor:
        return _weight(analysis).abs().mean(1)


class L1:
    """Sum |w| over W[i] (Li et al. 2016)."""

    name = "l1"
    rescore = False

    def __call__(self, analysis: graph.LayerAnalysis) -> torch.Tensor:
        return _weight(analysis).abs().sum(1)


class MeanOut:
    """Mean |w| over the weights that read channel i downstream (`outgoing_weights`)."""

    name = "mean_out"
    rescore = False

    def __call__(self, analysis: graph.LayerAnalysis) -> torch.Tensor:
        _weight(analysis)
        out = outgoing_weights(analysis)
        total = sum(o.kernels.to(torch.float64).abs().sum((1, 2)).cpu() for o in out)
        count = sum(o.kernels.shape[1] * o.kernels.shape[2] for o in out)
        return total / count


class KSE:
    """The KSE indicator sqrt(s / (1 + alpha e)) of the consumers' kernels (`kse_scores`), with
    kernel entropy over `neighbours` nearest kernels."""

    rescore = False

    def __init__(self, neighbours: int = KSE_NEIGHBOURS, alpha: float = KSE_ALPHA) -> None:
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"neighbours must be an int >= 1, got {neighbours!r}")
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.neighbours, self.alpha = neighbours, float(alpha)
        default = neighbours == KSE_NEIGHBOURS and self.alpha == KSE_ALPHA
        self.name = "kse" if default else f"kse(neighbours={neighbours}, alpha={self.alpha:g})"

    def __call__(self, analysis: graph.LayerAnalysis) -> torch.Tensor:
        _weight(analysis)
        out = outgoing_weights(analysis)
        return kse_scores([Outgoing(o.consumer, o.kind, o.kernels.cpu()) for o in out],
                          alpha=self.alpha, neighbours=self.neighbours)


def get_criterion(criterion: str | LayerCriterion, seed: int = 0) -> LayerCriterion:
    """The criterion object of a name in `CRITERIA` (random: `Random(seed)`), or a
    `LayerCriterion` object as it is. ValueError for an unknown name, TypeError for anything
    else."""
    if isinstance(criterion, str):
        made = {"random": lambda: Random(seed), "mean_in": MeanIn, "mean_out": MeanOut,
                "l1": L1, "kse": KSE}
        if criterion not in made:
            raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)} "
                             "or pass a LayerCriterion object")
        return made[criterion]()
    if not (isinstance(criterion, LayerCriterion) and isinstance(criterion.name, str)
            and isinstance(criterion.rescore, bool)):
        raise TypeError(f"criterion must be a name ({', '.join(CRITERIA)}) or a LayerCriterion: "
                        "an object with name (str), rescore (bool) and __call__(analysis: "
                        f"graph.LayerAnalysis) -> float64 tensor [filters]; got {criterion!r}")
    return criterion


def filter_importance(model: nn.Module | graph.LayerAnalysis, layer: str | None,
                      criterion: str | LayerCriterion, seed: int = 0) -> torch.Tensor:
    """Importance of each filter of conv `layer` (neuron of linear `layer`) under a data-free
    `criterion` (a name in `CRITERIA` or a `LayerCriterion` object, see `get_criterion`),
    float64 [n_filters]; higher = more important, so greedy removal takes the lowest. `model`
    may be the layer's `LayerAnalysis` (`layer` then None or its name); otherwise one is built
    (`graph.analyze`). The criterion's values are checked: a tensor of one finite value per
    filter (the rows of the layer's weight).

    random: seeded U[0, 1); mean_in: mean |W[i]|; l1: sum |W[i]|; mean_out: mean |w| over the
    outgoing weights of channel i (`outgoing_weights`); kse: sqrt(s / (1 + e)) with min-max
    normalised kernel sparsity s and kNN (k = 5) kernel entropy e of the consumers' kernels of
    channel i (`kse_scores`). Only the weights are read; the model is not changed."""
    crit = get_criterion(criterion, seed)
    analysis = graph.analysis_of(model, layer)
    n = int(analysis.conv.weight.shape[0])
    v = crit(analysis)
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,):
        raise ValueError(f"criterion {crit.name!r} must return a tensor [{n}] (one value per "
                         f"filter of {analysis.layer!r}), got {type(v).__name__} "
                         f"{tuple(getattr(v, 'shape', ()))}")
    v = v.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"criterion {crit.name!r} gave non-finite values for {analysis.layer!r}: "
                         "filters cannot be ranked")
    return v


__all__ = ["CRITERIA", "KSE", "L1", "LayerCriterion", "MeanIn", "MeanOut", "Outgoing", "Random",
           "filter_importance", "get_criterion", "kernel_entropy", "kse_scores",
           "outgoing_weights"]
