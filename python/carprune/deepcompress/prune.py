"""Magnitude pruning (Han et al. 2015, section 2): keep the largest weights of each layer.

The threshold comes either from a target sparsity (exact count of pruned weights, ties broken
by position so the result is deterministic) or from a quality factor times the standard
deviation of the layer's weights, as in Han et al.'s pruning paper (NIPS 2015).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PruneSpec:
    """How one layer is pruned: exactly one of ``sparsity`` (fraction pruned) or ``quality``."""

    sparsity: float | None = None
    quality: float | None = None

    def describe(self) -> str:
        if self.quality is not None:
            return f"|w| <= {self.quality:g} std"
        return f"sparsity {self.sparsity:g}"


def parse_prune(where: str, value: Any) -> PruneSpec:
    """Normalise a pruning setting: a float sparsity in [0, 1), ``None`` (no pruning),
    ``{"sparsity": s}`` or ``{"quality": q}`` with q >= 0."""
    if value is None:
        return PruneSpec(sparsity=0.0)
    if isinstance(value, PruneSpec):
        value = (
            {"sparsity": value.sparsity} if value.quality is None else {"quality": value.quality}
        )
    if isinstance(value, Mapping):
        if set(value) == {"sparsity"}:
            value = value["sparsity"]
        elif set(value) == {"quality"}:
            q = value["quality"]
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not q >= 0:
                raise ValueError(f"{where}: quality factor must be a number >= 0, got {q!r}")
            return PruneSpec(quality=float(q))
        else:
            raise ValueError(
                f"{where}: expected {{'sparsity': s}} or {{'quality': q}}, got keys {sorted(value)}"
            )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: sparsity must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: sparsity must be in [0, 1), got {value}")
    return PruneSpec(sparsity=float(value))


def magnitude_mask(weight: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    """Boolean mask (same shape as ``weight``) of the weights that survive pruning."""
    w = weight.detach()
    flat = w.reshape(-1).abs()
    if spec.quality is not None:
        threshold = spec.quality * w.float().std(correction=0) if w.numel() > 1 else 0.0
        return (w.abs() > threshold).reshape(w.shape)
    n = flat.numel()
    n_pruned = int(round(float(spec.sparsity or 0.0) * n))
    mask = torch.ones(n, dtype=torch.bool, device=w.device)
    if n_pruned:
        order = torch.argsort(flat, stable=True)
        mask[order[:n_pruned]] = False
    return mask.reshape(w.shape)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the pruned weights in place (keeps the parameter object, so optimisers stay valid)."""
    with torch.no_grad():
        weight.mul_(mask.to(weight.dtype))
