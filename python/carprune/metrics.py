"""What a unit's removal is measured by: top-1 (CAR), top-k, negative log-likelihood, squared or
absolute error (RAR, for regression outputs), or any per-sample function of (outputs, targets).

A metric gives one value per image; a unit's **importance** is how much worse the mean value
gets when the unit is removed: base - ablated for accuracy-like metrics (higher is better, so
top-1 importance is CAR), ablated - base for error-like ones (NLL, squared error). The values are
summed per group of images: per class for classification targets (integer labels), per target
bin for regression targets (floating point): quantiles of the scored targets, or given edges.

Exact sums. Top-k metrics count images (integers, from the `class_correct_counts` kernel). Float
metrics are summed in fixed point: each per-sample value v (float64) becomes the integer
round(v * 2^24) and these are added in int64. Integer addition is associative, so a sum does not
depend on chunk sizes, on how the images are batched with which ablations, on the thread count
or on how scoring is split over processes (the distributed gather stays an integer exchange like
the counts). Each value is resolved to 2^-24 (6e-8); a mean over N images is exact for the
rounded values. float64 accumulation would need one fixed order of additions instead, i.e. every
per-sample value held until the end. The range is checked: N * max|v| * 2^24 must stay below
2^61, so the sums and their differences cannot overflow (e.g. |v| < 2.7e7 for 5,000 images).

What the sums cannot remove is the rounding inside the network itself: a per-sample value is
computed by the tail's own layers, whose float arithmetic (BLAS blocking) may depend on the batch
shape. In float32 that moves values by ~1e-7 relative; in float64 by ~1e-16, which moves a
rounded value by one unit only when it lies that close to a rounding boundary (measured: one of
64,000 squared errors of up to 10^4 deg^2; never for NLL). Top-1 counts have the same caveat at
near-ties.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _ops

FIXED_POINT_BITS = 24
FIXED_POINT_SCALE = 1 << FIXED_POINT_BITS
# sums of |fixed-point values| stay below this, so sums and their differences fit in int64
FIXED_POINT_LIMIT = 1 << 61
DEFAULT_BINS = 10
BUILTIN = ("top1", "top5", "topK (any K >= 1)", "nll", "mse", "mae")

PerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A per-sample measure of a network's output.

    `topk` set: the metric is top-k accuracy, counted exactly by the `class_correct_counts`
    kernel. Otherwise `fn(outputs [N, D], targets [N] or [N, D]) -> [N]` gives one float value
    per sample, summed in fixed point. `higher_is_better` says which way is worse (accuracy-like:
    True; error-like: False). `task` is 'classification' (integer targets), 'regression'
    (floating targets) or 'any' (a user function: decided by the targets' dtype).
    """

    name: str
    higher_is_better: bool
    task: str
    topk: int | None = None
    fn: PerSample | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.task not in ("classification", "regression", "any"):
            raise ValueError(f"Metric.task must be 'classification', 'regression' or 'any', "
                             f"got {self.task!r}")
        if (self.topk is None) == (self.fn is None):
            raise ValueError("a Metric is either a top-k count (topk) or a per-sample function (fn)")

    @property
    def kind(self) -> str:
        """'accuracy' (importance = base - ablated) or 'error' (ablated - base)."""
        return "accuracy" if self.higher_is_better else "error"

    @property
    def exact_counts(self) -> bool:
        """Whether the values are image counts (top-k), not fixed-point sums."""
        return self.topk is not None

    @property
    def scale(self) -> int:
        """What one unit of value is in the integer sums: 1 for counts, 2^24 for fixed point."""
        return 1 if self.exact_counts else FIXED_POINT_SCALE

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """float64 [N]: the metric of each sample (per-sample functions only)."""
        if self.fn is None:
            raise ValueError(f"metric {self.name!r} is a top-k count; it has no per-sample function")
        v = self.fn(outputs, targets)
        if not isinstance(v, torch.Tensor) or v.shape != (outputs.shape[0],):
            raise ValueError(f"metric {self.name!r} must return one value per sample, a tensor "
                             f"[{outputs.shape[0]}], got {type(v).__name__} "
                             f"{tuple(getattr(v, 'shape', ()))}")
        return v.detach().to(torch.float64)


# -- built-in per-sample functions ----------------------------------------------------------------
def _class_targets(outputs: torch.Tensor, targets: torch.Tensor, name: str) -> torch.Tensor:
    if targets.is_floating_point() or targets.dim() != 1:
        raise ValueError(f"metric {name!r} needs integer class labels [N], got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if outputs.dim() != 2:
        raise ValueError(f"metric {name!r} needs logits [N, classes], got {tuple(outputs.shape)}")
    return targets.long()


def nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the label under softmax(outputs), in float64."""
    y = _class_targets(outputs, targets, "nll")
    x = outputs.to(torch.float64)
    return torch.logsumexp(x, 1) - x.gather(1, y[:, None])[:, 0]


def _regression_pair(outputs: torch.Tensor, targets: torch.Tensor, name: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if not targets.is_floating_point():
        raise ValueError(f"metric {name!r} compares outputs with regression targets (floating "
                         f"point), but the targets are {targets.dtype} class labels; use 'top1' or "
                         "'nll' for classification")
    o = outputs.to(torch.float64).reshape(outputs.shape[0], -1)
    t = targets.to(torch.float64).reshape(targets.shape[0], -1)
    if o.shape != t.shape:
        raise ValueError(f"metric {name!r}: outputs {tuple(outputs.shape)} and targets "
                         f"{tuple(targets.shape)} do not have one output per target value")
    return o, t


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over output dimensions of (output - target)^2, in float64."""
    o, t = _regression_pair(outputs, targets, "mse")
    return (o - t).square().mean(1)


def absolute_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over output dimensions of |output - target|, in float64."""
    o, t = _regression_pair(outputs, targets, "mae")
    return (o - t).abs().mean(1)


NLL = Metric("nll", higher_is_better=False, task="classification", fn=nll)
MSE = Metric("mse", higher_is_better=False, task="regression", fn=squared_error)
MAE = Metric("mae", higher_is_better=False, task="regression", fn=absolute_error)


def top_k(k: int) -> Metric:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top-k needs an integer k >= 1, got {k!r}")
    return Metric(f"top{k}", higher_is_better=True, task="classification", topk=k)


def custom(fn: PerSample, *, name: str | None = None, higher_is_better: bool = False) -> Metric:
    """A user metric: `fn(outputs [N, D], targets [N, ...]) -> [N]`, one value per sample (e.g. a
    loss with reduction='none'). Error-like (lower is better) unless `higher_is_better`."""
    if not callable(fn):
        raise ValueError(f"a custom metric must be callable, got {type(fn).__name__}")
    label = name or getattr(fn, "__name__", None) or type(fn).__name__
    if label == "<lambda>":
        label = "custom"
    return Metric(str(label), higher_is_better=bool(higher_is_better), task="any", fn=fn)


def get_metric(metric: str | Metric | PerSample | None = None, topk: int = 1) -> Metric:
    """A `Metric` from a name ('top1', 'top5', 'topK', 'nll', 'mse', 'mae'), a Metric, or a
    per-sample callable (see `custom`; its `higher_is_better` attribute is honoured, default
    False). None means top-`topk` accuracy (the engine's historical `topk` argument)."""
    if metric is None:
        return top_k(topk)
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        key = metric.strip().lower()
        m = re.fullmatch(r"top-?(\d+)", key)
        if m:
            return top_k(int(m.group(1)))
        named = {"nll": NLL, "mse": MSE, "mae": MAE}
        if key in named:
            return named[key]
        raise ValueError(f"unknown metric {metric!r}; built-in metrics: {', '.join(BUILTIN)}, "
                         "or pass a per-sample function fn(outputs, targets) -> [N]")
    if callable(metric):
        return custom(metric, higher_is_better=getattr(metric, "higher_is_better", False))
    raise ValueError(f"metric must be a name, a carprune.metrics.Metric or a callable, got "
                     f"{type(metric).__name__}")


# -- groups: per class or per target bin ---------------------------------------------------------
def _bin_label(lo: float, hi: float, last: bool) -> str:
    return f"[{lo:.4g}, {hi:.4g}{']' if last else ')'}"


@dataclass(frozen=True)
class Grouping:
    """How images are grouped for per-group importance: 'class' (the label is the group) or
    'bin' (the target falls into [edges[g], edges[g + 1]); the last bin is closed)."""

    kind: str
    names: tuple[str, ...]
    edges: tuple[float, ...] | None = None

    @property
    def size(self) -> int:
        return len(self.names)

    def assign(self, targets: torch.Tensor) -> torch.Tensor:
        """int64 [N]: the group of each target (labels are checked by the caller)."""
        if self.kind == "class":
            return targets.long()
        if self.size == 1:
            return torch.zeros(targets.shape[0], dtype=torch.int64, device=targets.device)
        t = _scalar_targets(targets).to(torch.float64)
        edges = torch.tensor(self.edges, dtype=torch.float64, device=t.device)
        outside = (t < edges[0]) | (t > edges[-1]) | torch.isnan(t)
        if bool(outside.any()):
            bad = t[outside][:3].tolist()
            raise ValueError(f"{int(outside.sum())} targets lie outside the bins "
                             f"[{self.edges[0]:.6g}, {self.edges[-1]:.6g}] (e.g. {bad}); give bin "
                             "edges that cover every target")
        return torch.bucketize(t, edges[1:-1], right=True)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names),
                "edges": list(self.edges) if self.edges is not None else None}


def _scalar_targets(targets: torch.Tensor) -> torch.Tensor:
    if targets.dim() == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.dim() != 1:
        raise ValueError(f"target bins need one target value per sample, got targets of shape "
                         f"{tuple(targets.shape)}; pass bins=1 for multi-output regression")
    return targets


def class_grouping(names: Sequence[str]) -> Grouping:
    return Grouping("class", tuple(str(n) for n in names))


def bin_grouping(targets: torch.Tensor, bins: int | Sequence[float] | None = None) -> Grouping:
    """Target bins: `bins` quantile bins of `targets` (default 10; fewer if values repeat), or
    the increasing edges given (len(edges) - 1 bins)."""
    bins = DEFAULT_BINS if bins is None else bins
    if isinstance(bins, bool):
        raise ValueError(f"bins must be a count or a list of edges, got {bins!r}")
    if isinstance(bins, int | np.integer):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if bins == 1:
            return Grouping("bin", ("all",), (-np.inf, np.inf))
        t = _scalar_targets(targets).to(torch.float64).cpu().numpy()
        if not np.isfinite(t).all():
            raise ValueError("regression targets must be finite to be binned")
        edges = np.unique(np.quantile(t, np.linspace(0, 1, int(bins) + 1)))
        if len(edges) < 2:
            edges = np.array([edges[0], edges[0]])
    else:
        edges = np.asarray(list(bins), dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 2 or not np.all(np.diff(edges) > 0):
            raise ValueError(f"bin edges must be at least 2 increasing numbers, got {list(bins)}")
    e = tuple(float(x) for x in edges)
    names = tuple(_bin_label(e[i], e[i + 1], i == len(e) - 2) for i in range(len(e) - 1))
    return Grouping("bin", names, e)


# -- measuring ----------------------------------------------------------------------------------
def to_fixed(values: torch.Tensor, limit: float, name: str) -> torch.Tensor:
    """int64: round(values * 2^24), after checking each |value| <= `limit` and finite."""
    v = values.to(torch.float64)
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        raise ValueError(f"metric {name!r} gave {int(bad.sum())} non-finite values (inf or nan); "
                         "an importance needs a finite value for every image")
    big = float(v.abs().max()) if v.numel() else 0.0
    if big > limit:
        raise ValueError(f"metric {name!r} gave a value of magnitude {big:.4g}; with this many "
                         f"images exact fixed-point sums hold values up to {limit:.4g}: rescale the "
                         "outputs or targets (e.g. predict in other units)")
    return torch.round(v * FIXED_POINT_SCALE).to(torch.int64)


@dataclass(frozen=True)
class BoundMetric:
    """A metric bound to a scoring run: its grouping and the fixed-point range for `num_images`."""

    metric: Metric
    grouping: Grouping
    num_images: int

    @property
    def limit(self) -> float:
        """Largest |value| per sample for which sums over the images cannot overflow."""
        return FIXED_POINT_LIMIT / FIXED_POINT_SCALE / max(1, self.num_images)

    def measure(self, outputs: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor
                ) -> torch.Tensor:
        """int64 [m, G]: per ablation j and group g, the summed metric over the images of group
        g in `outputs[j]` ([m, B, D] network outputs for targets [B]): image counts for top-k,
        fixed-point sums (units of 2^-24) otherwise."""
        m, b = outputs.shape[0], outputs.shape[1]
        if self.metric.exact_counts:
            return _ops.class_correct_counts(outputs, targets, self.metric.topk)
        flat = outputs.reshape(m * b, *outputs.shape[2:])
        tgt = targets.repeat(m, *([1] * (targets.dim() - 1)))
        fixed = to_fixed(self.metric.per_sample(flat, tgt), self.limit, self.metric.name).view(m, b)
        out = torch.zeros(m, self.grouping.size, dtype=torch.int64, device=fixed.device)
        return out.scatter_add_(1, groups.to(fixed.device).view(1, b).expand(m, b), fixed)


def bind(metric: Metric, targets: torch.Tensor, num_outputs: int, class_names: Sequence[str], *,
         num_images: int, bins: int | Sequence[float] | None = None) -> BoundMetric:
    """Check `metric` against the targets and choose its grouping: per class for integer labels,
    per target bin for floating targets. `targets`: for regression, every scored target (the
    quantile bins are theirs); for class labels, any of them (their range is checked here, and
    the engine checks each chunk's labels as it loads them). `num_images` scored in all."""
    regression = targets.is_floating_point()
    if metric.task == "classification" and regression:
        raise ValueError(f"metric {metric.name!r} needs integer class labels, but the targets are "
                         f"{targets.dtype} (regression?); use 'mse', 'mae' or a custom metric")
    if metric.task == "regression" and not regression:
        raise ValueError(f"metric {metric.name!r} compares outputs with regression targets "
                         f"(floating point), but the targets are {targets.dtype} class labels; use "
                         "'top1' or 'nll' for classification")
    if regression:
        return BoundMetric(metric, bin_grouping(targets, bins), int(num_images))
    if bins is not None:
        raise ValueError("bins group regression targets; these targets are class labels, grouped "
                         "per class")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_outputs):
        raise ValueError(f"labels must lie in [0, {num_outputs}) for a model with {num_outputs} "
                         f"outputs, got [{int(targets.min())}, {int(targets.max())}]")
    return BoundMetric(metric, class_grouping(class_names), int(num_images))


__all__ = [
    "FIXED_POINT_SCALE",
    "MAE",
    "MSE",
    "NLL",
    "BoundMetric",
    "Grouping",
    "Metric",
    "absolute_error",
    "bin_grouping",
    "bind",
    "class_grouping",
    "custom",
    "get_metric",
    "nll",
    "squared_error",
    "to_fixed",
    "top_k",
]
