"""Importance of whole-network unit channels: small criterion objects for global compression.

An importance object ranks the channels of units of a network (`units.UnitAnalysis`): called
as ``imp(model, analysis, unit_names)`` it returns, per unit, a float64 tensor with one value per
channel as the model has them now (higher = more important). `rescore` says whether the values
change when other channels are removed (CAR: yes, every round; weight magnitudes: no).

* `CAR`: accuracy lost (or the `metric`'s loss) when the channel is removed, scored exactly by
  the engine on `data` (`engine.score_units`); the last scores (with per-class CAR_c) stay in
  `last`.
* `Magnitude`: group magnitude of every weight the channel's removal deletes (producers,
  BatchNorms, consumers), as Torch-Pruning's GroupMagnitudeImportance defines it.
* `Taylor`: first-order Taylor |w dL/dw| over the same weights (Torch-Pruning's
  GroupTaylorImportance).
* `Random`: seeded uniform values (a control).

Users add their own by implementing the same call (a `Protocol`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import metrics
from .data.batches import DataLike
from .scores import LayerScores
from .units import UnitAnalysis


@runtime_checkable
class Importance(Protocol):
    name: str
    rescore: bool

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        """Per unit, float64 [channels]: importance of each of its current channels."""


class CAR:
    """Exact CAR (or the importance under `metric`) of each channel on `data`."""

    name = "car"
    rescore = True

    def __init__(self, data: DataLike, *, num_images: int | None = None, seed: int = 0,
                 memory_budget: int | str | None = None,
                 metric: str | metrics.Metric | metrics.PerSample | None = None,
                 bins: int | Sequence[float] | None = None, zero_skip: bool = True,
                 **engine_options: Any) -> None:
        self.data = data
        self.options = dict(num_images=num_images, seed=seed, memory_budget=memory_budget,
                            metric=metric, bins=bins, **engine_options)
        self.zero_skip = zero_skip
        self.metric_name = metrics.get_metric(metric).name
        self.last: dict[str, LayerScores] = {}
        self.last_cost: Any = None

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        from .unit_engine import score_units

        out = score_units(model, self.data, list(units), analysis=analysis, progress=False,
                          zero_skip=self.zero_skip, **self.options)
        self.last_cost = getattr(out, "cost", None)
        self.last = dict(out)
        return {u: s.importance.to(torch.float64) for u, s in self.last.items()}

    def base_value(self) -> float:
        """The metric's mean on the scoring images for the model last scored."""
        return next(iter(self.last.values())).base_value


def _group_weights(model: nn.Module, unit, grads: bool = False) -> list[torch.Tensor]:
    """For every parameter the unit's removal deletes, a [channels, -1] float64 view with one
    row per unit channel (producer filter rows and biases, through-module per-channel
    parameters, consumer input columns): the weights (or, with `grads`, their .grad)."""
    mods = dict(model.named_modules())
    rows: list[torch.Tensor] = []
    n = unit.num_channels

    def get(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.grad if grads else t
        return None if t is None else t.detach().to(torch.float64).cpu()

    for use in unit.uses:
        m = mods[use.module]
        pos = list(use.positions)
        if use.role in ("producer", "through"):
            for t in (get(getattr(m, "weight", None)), get(getattr(m, "bias", None))):
                if t is not None:
                    rows.append(t[pos].reshape(n, -1))
        elif use.role == "consumer":
            w = get(m.weight)
            if w is None:
                continue
            if isinstance(m, nn.Linear):
                cols = [p * use.block + j for p in pos for j in range(use.block)]
                rows.append(w[:, cols].reshape(w.shape[0], n, use.block).transpose(0, 1)
                            .reshape(n, -1))
            else:
                rows.append(w[:, pos].transpose(0, 1).reshape(n, -1))
    return rows


def _mean_normalised(v: torch.Tensor) -> torch.Tensor:
    mean = v.mean()
    return v / mean if mean > 0 else v


class Magnitude:
    """Group magnitude: for each parameter the channel's removal deletes (producers' filter
    rows and biases, BatchNorm / PReLU / depthwise parameters, consumers' input columns), the
    sum of |w|^p over the channel's entries; averaged over those parameters and divided by the
    mean over the unit's channels (the definition of Torch-Pruning's GroupMagnitudeImportance
    with group_reduction='mean', normalizer='mean'). `scope='producers'` sums the L-p norm of
    the producers' filter rows only (p = 1: Li et al.'s filter L1)."""

    rescore = False

    def __init__(self, p: int = 1, scope: str = "group") -> None:
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        if scope not in ("group", "producers"):
            raise ValueError(f"scope must be 'group' or 'producers', got {scope!r}")
        self.p, self.scope = p, scope
        self.name = f"l{p}" if scope == "group" else f"l{p}-producers"

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        mods = dict(model.named_modules())
        out = {}
        for name in units:
            unit = analysis.unit(name)
            if self.scope == "producers":
                total = torch.zeros(unit.num_channels, dtype=torch.float64)
                for use in unit.uses:
                    if use.role == "producer":
                        w = mods[use.module].weight.detach().to(torch.float64).cpu()
                        r = w[list(use.positions)].reshape(unit.num_channels, -1)
                        total += r.abs().sum(1) if self.p == 1 else r.pow(2).sum(1).sqrt()
                out[name] = total
                continue
            rows = _group_weights(model, unit)
            local = torch.stack([r.abs().pow(self.p).sum(1) for r in rows])
            out[name] = _mean_normalised(local.mean(0))
        return out


class Taylor:
    """First-order Taylor importance: for each parameter the channel's removal deletes, the sum
    of |w * dL/dw| over the channel's entries, with the gradient of the cross-entropy summed over
    `num_images` images of `data` (batches of `batch_size`); averaged over the parameters and
    mean-normalised per unit (the definition of Torch-Pruning's GroupTaylorImportance with its
    defaults). Gradients are taken anew for the model each call."""

    name = "taylor"
    rescore = False

    def __init__(self, data: DataLike, *, num_images: int | None = 256, batch_size: int = 64,
                 seed: int = 0) -> None:
        self.data, self.num_images, self.batch_size, self.seed = data, num_images, batch_size, seed

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        from .data.batches import load_batch, num_items, pick_indices

        work = copy.deepcopy(model).eval()
        work.zero_grad(set_to_none=True)
        idx = pick_indices(num_items(self.data), self.num_images, self.seed)
        for s in range(0, len(idx), self.batch_size):
            x, y = load_batch(self.data, idx[s:s + self.batch_size])
            p0 = next(work.parameters())
            loss = nn.functional.cross_entropy(work(x.to(p0.device, p0.dtype)), y.to(p0.device),
                                               reduction="sum")
            loss.backward()
        out = {}
        for name in units:
            unit = analysis.unit(name)
            w = _group_weights(work, unit)
            g = _group_weights(work, unit, grads=True)
            if len(w) != len(g):
                raise RuntimeError(f"unit {name!r}: some of its parameters got no gradient")
            local = torch.stack([(a * b).abs().sum(1) for a, b in zip(w, g, strict=True)])
            out[name] = _mean_normalised(local.mean(0))
        return out


class Random:
    """Seeded uniform values in [0, 1), drawn afresh for each call (a control)."""

    name = "random"
    rescore = False

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(int(seed))

    def __call__(self, model: nn.Module, analysis: UnitAnalysis, units: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
        return {u: torch.rand(analysis.unit(u).num_channels, generator=self.gen,
                              dtype=torch.float64) for u in units}


def get_importance(criterion: str | Importance, data: DataLike | None = None, *, seed: int = 0,
                   **car_options: Any) -> Importance:
    """An importance object from a name ('car', 'l1', 'l2', 'taylor', 'random') or an object as is."""
    if not isinstance(criterion, str):
        if not isinstance(criterion, Importance):
            raise TypeError("criterion must be 'car', 'l1', 'l2', 'taylor', 'random' or an object with "
                            f"name, rescore and __call__(model, analysis, units); got {criterion!r}")
        return criterion
    if criterion == "car":
        if data is None:
            raise ValueError("criterion 'car' needs scoring data")
        return CAR(data, seed=seed, **car_options)
    if criterion in ("l1", "l2"):
        return Magnitude(int(criterion[1]))
    if criterion == "taylor":
        if data is None:
            raise ValueError("criterion 'taylor' needs scoring data (for the gradients)")
        return Taylor(data, seed=seed, num_images=car_options.get("num_images") or 256)
    if criterion == "random":
        return Random(seed)
    raise ValueError(f"unknown criterion {criterion!r}; choose from 'car', 'l1', 'l2', 'taylor', 'random' "
                     "or pass an Importance object")


__all__ = ["CAR", "Importance", "Magnitude", "Random", "Taylor", "get_importance"]
