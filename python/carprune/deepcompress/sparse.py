"""Sparse storage with relative indices (Han et al. 2015, section 2, figure 2).

The surviving weights are listed in flat (row-major) order; each entry stores the distance to
the previous entry in ``index_bits`` bits, i.e. a gap of 1 .. 2**index_bits coded as gap - 1.
A larger gap is bridged by filler entries at the maximal distance whose weight is zero; they
carry the reserved weight symbol ``2**bits`` (one past the codebook), which the decoder writes
as an exact zero. Everything here is vectorised numpy: no Python loop over weights.
"""

from __future__ import annotations

import numpy as np


def encode_relative(
    positions: np.ndarray, labels: np.ndarray, index_bits: int, filler: int
) -> tuple[np.ndarray, np.ndarray]:
    """(index-difference symbols, weight symbols) for the sorted flat ``positions``."""
    positions = np.asarray(positions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if positions.shape != labels.shape:
        raise ValueError("positions and labels differ in length")
    span = 1 << index_bits
    gaps = np.diff(positions, prepend=-1)
    if gaps.size and gaps.min() < 1:
        raise ValueError("positions must be strictly increasing and >= 0")
    n_fill = (gaps - 1) // span  # fillers needed in front of each entry
    per_entry = n_fill + 1
    total = int(per_entry.sum())
    diff = np.full(total, span - 1, dtype=np.int64)
    sym = np.full(total, filler, dtype=np.int64)
    last = np.cumsum(per_entry) - 1  # slot of each real entry, after its fillers
    diff[last] = gaps - n_fill * span - 1
    sym[last] = labels
    return diff, sym


def decode_relative(
    diff: np.ndarray, sym: np.ndarray, filler: int, numel: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_relative`: (positions, labels) of the real entries.

    Raises ``ValueError`` when an entry falls outside a tensor of ``numel`` elements.
    """
    if diff.shape != sym.shape:
        raise ValueError(f"{diff.size} index differences for {sym.size} weights")
    positions = np.cumsum(diff + 1) - 1
    if positions.size and positions[-1] >= numel:
        raise ValueError(f"sparse index {int(positions[-1])} outside a tensor of {numel} elements")
    real = sym != filler
    return positions[real], sym[real]
