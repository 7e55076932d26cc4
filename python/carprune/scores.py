"""LayerScores: the per-(unit, group) metric sums of one scoring pass (for top-1: correct counts
per class), and the importance indices derived from them (for top-1: CAR and class-wise CAR_c)."""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .io import atomic_write

FORMAT_VERSION = 2  # 2: metric, direction, scale, grouping (version 1 files: top-k)


def ranked_classes(car_c: np.ndarray | torch.Tensor, k: int, sign: int) -> list[int]:
    """Up to `k` classes on one side of a filter's CAR_c row: sign +1, the classes that lose
    accuracy without the filter (CAR_c > 0, highest first); sign -1, those that gain (CAR_c < 0,
    lowest first). Ties go to the lower class index. A class with CAR_c exactly 0 (its accuracy
    does not change) is on neither side, so fewer than `k` (or none) may come back."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    row = np.asarray(car_c, dtype=np.float64)
    idx = np.flatnonzero(sign * row > 0)
    order = np.lexsort((idx, -sign * row[idx]))
    return [int(c) for c in idx[order][:k]]


def shortfall_note(found: int, requested: int, sign: int) -> str:
    """What to say when fewer than `requested` classes have a non-zero effect on one side
    (see `ranked_classes`): '' when there are enough, else e.g. 'only 2 classes lose accuracy
    without it' or 'no class gains accuracy without it'."""
    if found >= requested:
        return ""
    verb = ("loses", "lose") if sign > 0 else ("gains", "gain")
    if found == 0:
        return f"no class {verb[0]} accuracy without it"
    if found == 1:
        return f"only 1 class {verb[0]} accuracy without it"
    return f"only {found} classes {verb[1]} accuracy without it"


@dataclass
class LayerScores:
    """Importance scores of the units (conv filters, linear neurons) of one layer under one metric.

    counts[i, g] is the metric summed over the images of group g (a class, or a target bin for
    regression) with unit `filters[i]` removed; base_counts[g] the same with none of `filters`
    removed (units in `removed` are absent in both); class_totals[g] the number of images in
    group g. For top-k metrics the sums are image counts (CAR: how many stay correct); for float
    metrics they are fixed-point integers in units of 1/`scale` (see `carprune.metrics`).
    Importance is how much worse the mean metric gets without the unit, higher = more important:
    base - ablated for accuracy-like metrics (`higher_is_better`), ablated - base otherwise.
    For top-k, `car`/`car_c` are the same numbers as `importance`/`importance_c`.
    """

    layer: str
    filters: torch.Tensor        # int64 [n]: indices of the scored filters in the original layer
    counts: torch.Tensor         # int64 [n, K]
    base_counts: torch.Tensor    # int64 [K]
    class_totals: torch.Tensor   # int64 [K]
    classes: list[str]           # group names: classes, or target bins such as '[-60, -36)'
    topk: int = 1
    removed: list[int] = field(default_factory=list)
    metric: str | None = None    # 'top1' (default: 'top<topk>'), 'top5', 'nll', 'mse', 'mae', ...
    higher_is_better: bool = True
    scale: int = 1               # the integer sums are in units of 1/scale of the metric
    grouping: str = "class"      # 'class' or 'bin'
    bin_edges: list[float] | None = None  # 'bin': group g holds targets in [edges[g], edges[g+1])

    def __post_init__(self) -> None:
        n, k = self.counts.shape
        if self.filters.shape != (n,) or self.base_counts.shape != (k,) or \
                self.class_totals.shape != (k,) or len(self.classes) != k:
            raise ValueError("LayerScores: inconsistent shapes of filters/counts/base_counts/"
                             "class_totals/classes")
        if self.metric is None:
            self.metric = f"top{self.topk}"
        m = re.fullmatch(r"top(\d+)", self.metric)
        if m:
            if int(m.group(1)) != self.topk and self.topk != 1:
                raise ValueError(f"LayerScores: metric {self.metric!r} but topk={self.topk}")
            self.topk = int(m.group(1))
            if self.scale != 1 or not self.higher_is_better:
                raise ValueError(f"LayerScores: a top-k metric counts images (scale 1, higher is "
                                 f"better), got scale {self.scale}, higher_is_better "
                                 f"{self.higher_is_better}")
        if self.grouping not in ("class", "bin"):
            raise ValueError(f"LayerScores.grouping must be 'class' or 'bin', got {self.grouping!r}")
        if self.grouping == "bin" and (self.bin_edges is None or len(self.bin_edges) != k + 1):
            raise ValueError(f"LayerScores: {k} target bins need {k + 1} bin_edges, got "
                             f"{self.bin_edges!r}")

    @property
    def num_images(self) -> int:
        return int(self.class_totals.sum())

    @property
    def num_classes(self) -> int:
        """The number of groups: classes, or target bins."""
        return len(self.classes)

    @property
    def is_accuracy(self) -> bool:
        """Whether the metric is top-k accuracy (CAR): only then are `car`, `accuracy` defined."""
        return re.fullmatch(r"top\d+", str(self.metric)) is not None

    def _need_accuracy(self, what: str) -> None:
        if not self.is_accuracy:
            raise ValueError(f"{what} is defined for top-k accuracy; these scores measure "
                             f"{self.metric!r}: use importance/importance_c and value/base_value")

    # -- the metric's values (means over the images) ------------------------------------------------
    @property
    def base_value(self) -> float:
        """The metric's mean over the images with none of `filters` removed."""
        return float(self.base_counts.sum()) / self.scale / max(1, self.num_images)

    @property
    def value(self) -> torch.Tensor:
        """float64 [n]: the metric's mean with each unit removed."""
        return self.counts.sum(1).double() / self.scale / max(1, self.num_images)

    @property
    def base_value_c(self) -> torch.Tensor:
        """float64 [K]: the metric's mean per group (class or bin), nothing removed."""
        return self.base_counts.double() / self.scale / self.class_totals.clamp(min=1).double()

    @property
    def importance(self) -> torch.Tensor:
        """float64 [n]: how much worse the mean metric gets without each unit (top-1: CAR)."""
        diff = self.base_counts.sum() - self.counts.sum(1)
        if not self.higher_is_better:
            diff = -diff
        return diff.double() / (self.scale * max(1, self.num_images))

    @property
    def importance_c(self) -> torch.Tensor:
        """float64 [n, K]: the same per group (top-1: CAR_c)."""
        diff = self.base_counts.unsqueeze(0) - self.counts
        if not self.higher_is_better:
            diff = -diff
        return diff.double() / (self.scale * self.class_totals.clamp(min=1).double())

    # -- CAR: the top-k accuracy names -------------------------------------------------------------
    @property
    def base_accuracy(self) -> float:
        self._need_accuracy("base_accuracy")
        return self.base_value

    @property
    def accuracy(self) -> torch.Tensor:
        """float64 [n]: accuracy with each filter removed."""
        self._need_accuracy("accuracy")
        return self.value

    @property
    def car(self) -> torch.Tensor:
        """float64 [n]: base accuracy - accuracy without the filter (fractions, not percent)."""
        self._need_accuracy("CAR")
        return self.importance

    @property
    def car_c(self) -> torch.Tensor:
        """float64 [n, K]: per class, base class accuracy - class accuracy without the filter."""
        self._need_accuracy("CAR_c")
        return self.importance_c

    def order(self) -> torch.Tensor:
        """Positions into `filters`, least important first; ties by lower filter index."""
        keys = self.importance.numpy()
        return torch.from_numpy(np.lexsort((self.filters.numpy(), keys)).astype(np.int64))

    def least_important(self, k: int = 1) -> list[int]:
        return [int(self.filters[i]) for i in self.order()[:k]]

    def summary(self, top: int = 5, classes: int = 3) -> str:
        """A few lines: base accuracy, the most and least important filters, and per filter the
        classes that need it most: up to `classes` classes with CAR_c > 0 (a class whose accuracy
        does not change without the filter is never listed; fewer than `classes` is said)."""
        acc = self.is_accuracy
        base = (f"base top-{self.topk} accuracy {100 * self.base_value:.2f} %" if acc else
                f"base {self.metric} {self.base_value:.6g}")
        lines = [f"{self.layer}: {len(self.filters)} filters scored on {self.num_images} images, "
                 + base]
        order = self.order().tolist()
        car, car_c = self.importance, self.importance_c.numpy()
        # top-k: CAR in accuracy points; other metrics: the importance in the metric's units
        name, f, unit, digits = ("CAR", 100.0, " pts", 2) if acc else ("importance", 1.0, "", 4)
        for title, picks in (("most important", order[::-1][:top]),
                             ("least important", order[:top])):
            lines.append(f"  {title}:")
            for i in picks:
                cc = car_c[i]
                most = ranked_classes(cc, classes, +1)
                named = ", ".join(f"{self.classes[c]} ({f * float(cc[c]):+.{digits - 1}f})"
                                  for c in most)
                note = shortfall_note(int((cc > 0).sum()), classes, +1)
                lines.append(
                    f"    filter {int(self.filters[i]):4d}  {name} {f * float(car[i]):+6.{digits}f}{unit}"
                    "  needed most by: " + (f"{named} ({note})" if named and note else
                                            named or note))
        return "\n".join(lines)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (arrays + JSON metadata) atomically. Top-k scores are written as format
        version 1 (what carprune always wrote); other metrics as version 2, which adds the
        metric, its direction, fixed-point scale and grouping."""
        path = Path(path)
        meta = {"format": "carprune.LayerScores", "version": 1, "layer": self.layer,
                "classes": self.classes, "topk": self.topk, "removed": self.removed}
        if not self.is_accuracy or self.grouping != "class":
            meta.update(version=FORMAT_VERSION, metric=self.metric,
                        higher_is_better=self.higher_is_better, scale=self.scale,
                        grouping=self.grouping, bin_edges=self.bin_edges)
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
        if meta.get("version") not in (1, FORMAT_VERSION):
            raise ValueError(f"{path}: LayerScores format version {meta.get('version')} is not "
                             f"supported (this carprune reads versions 1 to {FORMAT_VERSION})")
        extra = {}
        if meta["version"] >= 2:
            edges = meta.get("bin_edges")
            extra = {"metric": str(meta["metric"]), "higher_is_better": bool(meta["higher_is_better"]),
                     "scale": int(meta["scale"]), "grouping": str(meta["grouping"]),
                     "bin_edges": [float(e) for e in edges] if edges is not None else None}
        return cls(layer=meta["layer"], classes=list(meta["classes"]), topk=int(meta["topk"]),
                   removed=[int(r) for r in meta["removed"]], **extra,
                   **{k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items()})
