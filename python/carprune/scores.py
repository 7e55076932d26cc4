"""LayerScores: the per-(filter, class) correct counts of one CAR scoring pass, and the CAR and
class-wise CAR_c indices derived from them."""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .io import atomic_write

FORMAT_VERSION = 1


@dataclass
class LayerScores:
    """CAR scores of the filters of one conv layer.

    counts[i, c] is how many images of class c stay correctly classified with filter
    `filters[i]` removed; base_counts[c] the same with none of `filters` removed (filters in
    `removed` are absent in both). CAR is accuracy lost by the removal: higher = more important.
    """

    layer: str
    filters: torch.Tensor        # int64 [n]: indices of the scored filters in the original layer
    counts: torch.Tensor         # int64 [n, K]
    base_counts: torch.Tensor    # int64 [K]
    class_totals: torch.Tensor   # int64 [K]
    classes: list[str]
    topk: int = 1
    removed: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n, k = self.counts.shape
        if self.filters.shape != (n,) or self.base_counts.shape != (k,) or \
                self.class_totals.shape != (k,) or len(self.classes) != k:
            raise ValueError("LayerScores: inconsistent shapes of filters/counts/base_counts/"
                             "class_totals/classes")

    @property
    def num_images(self) -> int:
        return int(self.class_totals.sum())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def base_accuracy(self) -> float:
        return float(self.base_counts.sum()) / max(1, self.num_images)

    @property
    def accuracy(self) -> torch.Tensor:
        """float64 [n]: accuracy with each filter removed."""
        return self.counts.sum(1).double() / max(1, self.num_images)

    @property
    def car(self) -> torch.Tensor:
        """float64 [n]: base accuracy - accuracy without the filter (fractions, not percent)."""
        return (self.base_counts.sum() - self.counts.sum(1)).double() / max(1, self.num_images)

    @property
    def car_c(self) -> torch.Tensor:
        """float64 [n, K]: per class, base class accuracy - class accuracy without the filter."""
        totals = self.class_totals.clamp(min=1).double()
        return (self.base_counts.unsqueeze(0) - self.counts).double() / totals

    def order(self) -> torch.Tensor:
        """Positions into `filters`, least important first; ties by lower filter index."""
        keys = self.car.numpy()
        return torch.from_numpy(np.lexsort((self.filters.numpy(), keys)).astype(np.int64))

    def least_important(self, k: int = 1) -> list[int]:
        return [int(self.filters[i]) for i in self.order()[:k]]

    def summary(self, top: int = 5, classes: int = 3) -> str:
        """A few lines: base accuracy, the most and least important filters and their classes."""
        lines = [f"{self.layer}: {len(self.filters)} filters scored on {self.num_images} images, "
                 f"base top-{self.topk} accuracy {100 * self.base_accuracy:.2f} %"]
        order = self.order().tolist()
        car, car_c = self.car, self.car_c
        for title, picks in (("most important", order[::-1][:top]),
                             ("least important", order[:top])):
            lines.append(f"  {title}:")
            for i in picks:
                cc = car_c[i]
                most = torch.argsort(-cc, stable=True)[:classes].tolist()
                lines.append(
                    f"    filter {int(self.filters[i]):4d}  CAR {100 * float(car[i]):+6.2f} pts"
                    "  needed most by: "
                    + ", ".join(f"{self.classes[c]} ({100 * float(cc[c]):+.1f})" for c in most))
        return "\n".join(lines)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (arrays + JSON metadata) atomically."""
        path = Path(path)
        meta = {"format": "carprune.LayerScores", "version": FORMAT_VERSION, "layer": self.layer,
                "classes": self.classes, "topk": self.topk, "removed": self.removed}
        arrays = {"filters": self.filters.numpy(), "counts": self.counts.numpy(),
                  "base_counts": self.base_counts.numpy(),
                  "class_totals": self.class_totals.numpy(),
                  "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerScores:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scores file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("filters", "counts", "base_counts", "class_totals",
                                            "meta")}
            meta = json.loads(arrays.pop("meta").tobytes().decode())
        except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable LayerScores file ({exc})") from exc
        if meta.get("format") != "carprune.LayerScores":
            raise ValueError(f"{path} is not a LayerScores file (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: LayerScores format version {meta.get('version')} is not "
                             f"supported (this carprune reads version {FORMAT_VERSION})")
        return cls(layer=meta["layer"], classes=list(meta["classes"]), topk=int(meta["topk"]),
                   removed=[int(r) for r in meta["removed"]],
                   **{k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items()})
