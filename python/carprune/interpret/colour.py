"""Colour selectivity of first-layer filters, and how many colour filters CAR prunes first.

The CAR paper (Section 3.2, Figure 5) counts 15 colour filters among the first 20 filters pruned
from AlexNet's first layer. Here "colour filter" is made measurable: each spatial tap of an RGB
filter is a vector in colour space; its projection on the achromatic direction (1,1,1)/sqrt(3)
responds to brightness, the residual to hue. The colour-selectivity index is the share of the
filter's energy in the residual (0: a pure luminance filter, 1: no response to brightness at all;
a random filter scores 2/3 on average). A filter is a colour filter when the index exceeds a
threshold (default 0.5: most of its energy is chromatic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

DEFAULT_THRESHOLD = 0.5


def colour_selectivity(weight: torch.Tensor | np.ndarray, std: Sequence[float] | None = None
                       ) -> np.ndarray:
    """Index per filter of an RGB conv weight [F, 3, kh, kw].

    With the input normalisation's per-channel `std`, the weights are first mapped to pixel
    space (w_c / std_c), since "grey" means equal change of R, G and B pixel values.
    """
    w = torch.as_tensor(weight).detach().double().cpu()
    if w.dim() != 4 or w.shape[1] != 3:
        raise ValueError(f"colour selectivity needs RGB filters [F, 3, kh, kw], got {tuple(w.shape)}")
    if std is not None:
        if len(std) != 3:
            raise ValueError(f"std needs 3 values, got {len(std)}")
        w = w / torch.tensor([float(s) for s in std], dtype=torch.float64).view(1, 3, 1, 1)
    v = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1, 3)        # [F, taps, RGB]
    grey = v.sum(-1, keepdim=True) / 3.0                         # (v . u) u, u = (1,1,1)/sqrt(3)
    total = (v ** 2).sum((1, 2))
    chroma = ((v - grey) ** 2).sum((1, 2))
    return (chroma / total.clamp_min(1e-300)).where(total > 0, torch.zeros_like(total)).numpy()


def hypergeom_tail(observed: int, population: int, successes: int, draws: int) -> float:
    """P(X >= observed) for X ~ Hypergeometric: `draws` filters picked at random without
    replacement from `population` of which `successes` are colour filters."""
    denom = math.comb(population, draws)
    lo = max(observed, 0)
    hi = min(successes, draws)
    return float(sum(math.comb(successes, x) * math.comb(population - successes, draws - x)
                     for x in range(lo, hi + 1)) / denom) if denom else 1.0


@dataclass
class ColourSummary:
    """Colour filters among the first k pruned, against all filters of the layer."""

    threshold: float
    order_source: str          # 'greedy removal' or 'CAR, lowest first'
    order: list[int]           # filters in pruning order
    indices: list[float]       # colour index per filter (original filter order)
    k: int
    colour_in_first_k: int
    colour_total: int
    num_filters: int
    expected_in_first_k: float   # under a random order
    p_value: float               # P(at least that many by chance), hypergeometric
    cumulative: list[int]        # colour filters among the first j, j = 1..len(order)

    @property
    def colour_filters(self) -> list[int]:
        return [f for f, v in enumerate(self.indices) if v > self.threshold]

    def sentence(self) -> str:
        return (f"{self.colour_in_first_k} of the first {self.k} filters pruned ({self.order_source}) "
                f"are colour filters (index > {self.threshold:g}), against {self.colour_total} of "
                f"{self.num_filters} overall (expected by chance {self.expected_in_first_k:.1f}, "
                f"P(>= {self.colour_in_first_k}) = {self.p_value:.3f})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ColourSummary:
        return cls(**d)


def colour_summary(indices: np.ndarray, order: Sequence[int], k: int, *,
                   threshold: float = DEFAULT_THRESHOLD, order_source: str = "CAR, lowest first"
                   ) -> ColourSummary:
    """Count colour filters among the first k of `order` (pruning order)."""
    n = len(indices)
    order = [int(f) for f in order]
    if not 1 <= k <= len(order):
        raise ValueError(f"k must lie in [1, {len(order)}] (filters in the pruning order), got {k}")
    is_colour = np.asarray(indices) > threshold
    cum = np.cumsum(is_colour[order]).astype(int).tolist()
    total = int(is_colour.sum())
    first = cum[k - 1]
    return ColourSummary(threshold=float(threshold), order_source=order_source, order=order,
                         indices=[float(v) for v in indices], k=int(k), colour_in_first_k=int(first),
                         colour_total=total, num_filters=n, expected_in_first_k=k * total / max(1, n),
                         p_value=hypergeom_tail(first, n, total, k), cumulative=cum)
