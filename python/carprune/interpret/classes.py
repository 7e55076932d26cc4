"""Class-based interpretation (CAR paper Section 3.3, Figures 8 and 9).

For each filter, the classes whose accuracy drops most when it is removed (highest CAR_c) and
least (lowest CAR_c) name what the filter is for. And per class, the accuracy of the compressed
network against the original shows which categories a compression costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from torch import nn

from ..callbacks import progress_callbacks
from ..data.batches import DataLike, num_items, pick_indices
from ..evaluate import class_correct
from ..scores import LayerScores, ranked_classes, shortfall_note


@dataclass
class ClassScore:
    index: int
    name: str
    car_c: float               # class accuracy lost without the filter (fraction)
    sample: int | None = None  # dataset index of a sample image of the class


@dataclass
class ClassImportance:
    """The classes one filter affects most, by CAR_c: `top` lose accuracy without it (CAR_c > 0,
    highest first), `bottom` gain accuracy without it (CAR_c < 0, lowest first). A class whose
    accuracy does not change is in neither list, so a list may hold fewer than `requested`
    classes (`positive`/`negative` count every class on each side)."""

    filter: int
    car: float
    top: list[ClassScore]
    bottom: list[ClassScore]
    requested: int = 5
    positive: int = 0
    negative: int = 0

    def note(self, side: str) -> str:
        """'' when `side` ('top' or 'bottom') lists `requested` classes, else what to say
        instead, e.g. 'only 2 classes lose accuracy without it'."""
        if side not in ("top", "bottom"):
            raise ValueError(f"side must be 'top' or 'bottom', got {side!r}")
        found = self.positive if side == "top" else self.negative
        return shortfall_note(found, self.requested, +1 if side == "top" else -1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassImportance:
        return cls(**{**d, "top": [ClassScore(**c) for c in d["top"]],
                      "bottom": [ClassScore(**c) for c in d["bottom"]]})


def class_importance(scores: LayerScores, top: int = 5, samples: dict[int, int] | None = None
                     ) -> list[ClassImportance]:
    """Per scored filter (in `scores.filters` order) up to `top` classes of highest positive
    CAR_c and up to `top` of lowest negative CAR_c (`scores.ranked_classes`: ties go to the lower
    class index; classes with CAR_c 0 are not listed). `samples` maps class -> a sample image
    index."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    samples = samples or {}
    car_c = scores.importance_c.numpy()   # CAR_c for top-1; the importance per class otherwise
    car = scores.importance.numpy()
    out = []
    for i, f in enumerate(scores.filters.tolist()):
        row = car_c[i]

        def pick(cs: list[int], row: np.ndarray = row) -> list[ClassScore]:
            return [ClassScore(c, scores.classes[c], float(row[c]), samples.get(c)) for c in cs]

        out.append(ClassImportance(filter=int(f), car=float(car[i]),
                                   top=pick(ranked_classes(row, top, +1)),
                                   bottom=pick(ranked_classes(row, top, -1)), requested=top,
                                   positive=int((row > 0).sum()), negative=int((row < 0).sum())))
    return out


@dataclass
class ClassAccuracy:
    """Per-class top-1 accuracy of the original and the compressed network (Figure 8)."""

    classes: list[str]
    counts: list[int]
    original: list[float | None]   # None: no image of the class
    compressed: list[float | None]
    within: float               # tolerance, a fraction (0.03 = 3 points)
    share_within: float         # classes with compressed >= original - within
    original_overall: float
    compressed_overall: float
    images: str = ""            # which images these accuracies were measured on, in words

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassAccuracy:
        return cls(**d)


def per_class_correct(model: nn.Module, data: DataLike, indices: np.ndarray, num_classes: int,
                      memory_budget: int | str | None = None, progress: bool | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(correct [K], totals [K]) of top-1 predictions of `model` over data[indices]
    (`evaluate.class_correct`)."""
    with progress_callbacks(progress, "class accuracy", total=len(indices), unit="img",
                            leave=False) as bar:
        return class_correct(model, data, indices, num_classes=num_classes,
                             memory_budget=memory_budget, callbacks=bar)


def class_accuracy(original: nn.Module, compressed: nn.Module, data: DataLike, classes: list[str], *,
                   num_images: int | None = None, seed: int = 0, within: float = 0.03,
                   memory_budget: int | str | None = None, progress: bool | None = None
                   ) -> ClassAccuracy:
    """Per-class accuracy of both networks on the same images, and the share of classes whose
    compressed accuracy is no more than `within` below the original's (the paper: 3 points)."""
    idx = pick_indices(num_items(data), num_images, seed)
    k = len(classes)
    c0, tot = per_class_correct(original, data, idx, k, memory_budget, progress)
    c1, _ = per_class_correct(compressed, data, idx, k, memory_budget, progress)
    present = tot > 0
    a0 = np.where(present, c0 / np.maximum(tot, 1), np.nan)
    a1 = np.where(present, c1 / np.maximum(tot, 1), np.nan)
    ok = (a1[present] >= a0[present] - within - 1e-12)
    return ClassAccuracy(
        classes=list(classes), counts=tot.tolist(),
        original=[None if np.isnan(v) else float(v) for v in a0],
        compressed=[None if np.isnan(v) else float(v) for v in a1], within=float(within),
        share_within=float(ok.mean()) if ok.size else 0.0,
        original_overall=float(c0.sum() / max(1, tot.sum())),
        compressed_overall=float(c1.sum() / max(1, tot.sum())), images=f"{len(idx)} images")
