"""Weight sharing by 1-D k-means (Han et al. 2015, section 3).

Centroids start linearly spaced between the smallest and largest remaining weight, which Han et
al. found best because it keeps a few large weights representable. In one dimension a Lloyd
iteration only needs the cluster boundaries (midpoints between sorted centroids), so each
iteration is a binary search over the sorted weights plus prefix sums: O(k log n).
"""

from __future__ import annotations

import numpy as np
import torch


def linear_init(values: np.ndarray, k: int) -> np.ndarray:
    """``k`` centroids evenly spaced over [min, max] of ``values`` (zeros when empty)."""
    if values.size == 0:
        return np.zeros(k, dtype=np.float64)
    return np.linspace(float(values.min()), float(values.max()), k, dtype=np.float64)


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (``centroids`` sorted ascending; ties go to the lower)."""
    mids = (centroids[:-1] + centroids[1:]) / 2.0
    return np.searchsorted(mids, values, side="left").astype(np.int64)


def kmeans_1d(
    values: np.ndarray, k: int, max_iter: int = 300, init: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars. Returns (sorted float64 centroids [k], labels [n]).

    Empty clusters keep their centroid (they cannot capture weights later in 1-D Lloyd, and
    keeping them preserves the sorted order that the boundary search relies on).
    """
    if k < 1:
        raise ValueError(f"k-means needs k >= 1, got {k}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.sort(linear_init(v, k) if init is None else np.asarray(init, dtype=np.float64))
    if v.size == 0:
        return c, np.zeros(0, dtype=np.int64)
    vs = np.sort(v)
    csum = np.concatenate([[0.0], np.cumsum(vs)])
    cuts = None
    for _ in range(max_iter):
        mids = (c[:-1] + c[1:]) / 2.0
        new_cuts = np.concatenate([[0], np.searchsorted(vs, mids, side="right"), [vs.size]])
        if cuts is not None and np.array_equal(new_cuts, cuts):
            break
        cuts = new_cuts
        counts = np.diff(cuts)
        sums = csum[cuts[1:]] - csum[cuts[:-1]]
        nonempty = counts > 0
        c = c.copy()
        c[nonempty] = sums[nonempty] / counts[nonempty]
        c = np.sort(c)
    return c, assign(v, c)


def quantize_weight(
    weight: torch.Tensor, mask: torch.Tensor, bits: int, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the unpruned weights of one layer into ``2**bits`` shared values.

    Returns ``(codebook, labels)``: ``codebook`` float32 [2**bits] on the weight's device, exactly
    representable in the weight's dtype, and ``labels`` int64 [nnz], the cluster of each
    surviving weight in flat (row-major) order.
    """
    values = weight.detach()[mask].double().cpu().numpy()
    centroids, _ = kmeans_1d(values, 2**bits, max_iter=max_iter)
    # Round the codebook to what the layer can hold, then assign against the rounded values so
    # every weight gets its nearest representable shared value.
    codebook = torch.from_numpy(centroids).to(weight.dtype).to(torch.float32)
    labels = assign(values, np.sort(codebook.double().numpy()))
    return codebook.to(weight.device), torch.from_numpy(labels).to(weight.device)


def write_shared(
    weight: torch.Tensor, positions: torch.Tensor, codebook: torch.Tensor, labels: torch.Tensor
) -> None:
    """Set ``weight`` (in place) to the shared values; every position not listed becomes 0."""
    with torch.no_grad():
        flat = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        flat[positions] = codebook[labels].to(weight.dtype)
        weight.copy_(flat.view_as(weight))
