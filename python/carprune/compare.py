"""Comparing two layers of two networks through the classes their filters are important for
(the CAR paper's Discussion: "any two layers in any two networks").

Each filter of each layer gets its class-wise importance profile (CAR_c for the default top-1
metric): which classes lose accuracy without it. Profiles are compared by cosine similarity;
filters are matched one-to-one by the Hungarian method (maximum total similarity,
`scipy.optimize.linear_sum_assignment`); the layers' similarity is the matched similarity
weighted by how much the matched filters matter; class coverage says, per class, how much the
most needed filter of the layer is needed. Both layers are scored on the same images.

`compare(model_a, layer_a, model_b, layer_b, data)` returns a `Comparison`, which saves to one
.npz (arrays + JSON metadata, no pickle) and renders an offline HTML page with both layers side
by side (`save_html`).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import graph, surgery
from .data.batches import DataLike
from .io import atomic_write
from .scores import LayerScores

FORMAT = "carprune.Comparison"
VERSION = 1
NPZ_NAME = "comparison.npz"


@dataclass
class Match:
    """Filter `filter_a` of layer A matched with filter `filter_b` of layer B."""

    filter_a: int
    filter_b: int
    similarity: float


def profile_similarity(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """float64 [n_a, n_b]: cosine similarity of every pair of rows of `pa` [n_a, K] and `pb`
    [n_b, K]; 0 for a row that is all zeros (a filter no class needs nor is hindered by)."""
    a = np.asarray(pa, dtype=np.float64)
    b = np.asarray(pb, dtype=np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    num = a @ b.T
    den = np.outer(na, nb)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def match_filters(sim: np.ndarray) -> list[tuple[int, int]]:
    """A one-to-one matching of rows to columns of `sim` with the largest total similarity
    (min(n_a, n_b) pairs; the Hungarian method), as (row, column) pairs sorted by row."""
    from scipy.optimize import linear_sum_assignment

    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or 0 in s.shape:
        raise ValueError(f"a similarity matrix [n_a, n_b] with n_a, n_b >= 1 is needed, got {s.shape}")
    rows, cols = linear_sum_assignment(s, maximize=True)
    return sorted((int(r), int(c)) for r, c in zip(rows, cols, strict=True))


def layer_similarity(sim: np.ndarray, pairs: Sequence[tuple[int, int]], mass_a: np.ndarray,
                     mass_b: np.ndarray) -> float:
    """The matched pairs' similarity, each weighted by its filters' profile norms
    (|p_a| + |p_b|), over the total norm of all filters of both layers: unmatched filters count
    as similarity 0, filters whose removal changes nothing hardly count. In [-1, 1]; 1 when every
    filter is matched to one with a parallel profile (and the layers are equally wide)."""
    total = float(np.sum(mass_a) + np.sum(mass_b))
    if total <= 0:
        return 0.0
    return float(sum(sim[i, j] * (mass_a[i] + mass_b[j]) for i, j in pairs) / total)


@dataclass
class Comparison:
    """Two layers compared through their filters' class-wise importance profiles.

    `filters_a`/`filters_b` name the filters as original indices (a pruned layer's kept filters
    keep their original numbers); `profile_*` [n, K] are their importance per class (CAR_c for
    top-1), `importance_*` [n] overall (CAR). `similarity_matrix` [n_a, n_b] holds the cosine
    similarity of every pair of profiles; `matches` the one-to-one matching; `similarity` the
    layer similarity (`layer_similarity`); `coverage_*` [K] per class the largest importance
    any single filter of the layer has for it, `coverage_filter_*` [K] which filter that is.
    `weights_*` hold the filters' weights when the layer is a first layer (drawn on the page).
    """

    model_a: str
    layer_a: str
    model_b: str
    layer_b: str
    metric: str
    classes: list[str]
    num_images: int
    base_value_a: float
    base_value_b: float
    base_value_c_a: np.ndarray       # [K] the metric per class (accuracy for top-1)
    base_value_c_b: np.ndarray
    filters_a: np.ndarray            # int64 [n_a]
    filters_b: np.ndarray
    importance_a: np.ndarray         # float64 [n_a]
    importance_b: np.ndarray
    profile_a: np.ndarray            # float64 [n_a, K]
    profile_b: np.ndarray
    similarity_matrix: np.ndarray    # float64 [n_a, n_b]
    matches: list[Match]
    similarity: float
    coverage_a: np.ndarray           # float64 [K]
    coverage_b: np.ndarray
    coverage_filter_a: np.ndarray    # int64 [K]
    coverage_filter_b: np.ndarray
    weights_a: np.ndarray | None = None   # [n_a, C, kh, kw] for a first layer
    weights_b: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    _ARRAYS = ("base_value_c_a", "base_value_c_b", "filters_a", "filters_b", "importance_a",
               "importance_b", "profile_a", "profile_b", "similarity_matrix", "coverage_a",
               "coverage_b", "coverage_filter_a", "coverage_filter_b")

    @property
    def coverage(self) -> dict[str, np.ndarray]:
        """{'a': coverage_a, 'b': coverage_b}: per class, how strongly any filter is needed."""
        return {"a": self.coverage_a, "b": self.coverage_b}

    def match_of(self, filter_a: int) -> Match | None:
        """The match of filter `filter_a` of layer A (None: unmatched)."""
        return next((m for m in self.matches if m.filter_a == filter_a), None)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON values."""
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        for k in ("model_a", "layer_a", "model_b", "layer_b", "metric", "classes", "num_images",
                  "base_value_a", "base_value_b", "similarity", "notes"):
            d[k] = getattr(self, k)
        d["matches"] = [vars(m).copy() for m in self.matches]
        for k in self._ARRAYS:
            d[k] = np.asarray(getattr(self, k)).tolist()
        return d

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """One .npz: the arrays, and the rest as JSON metadata; written atomically."""
        path = Path(path)
        meta = {k: v for k, v in self.to_dict().items() if k not in self._ARRAYS}
        arrays = {k: np.asarray(getattr(self, k)) for k in self._ARRAYS}
        for k in ("weights_a", "weights_b"):
            if getattr(self, k) is not None:
                arrays[k] = np.asarray(getattr(self, k), dtype=np.float32)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Comparison:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"comparison file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("meta").tobytes().decode())
        except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable Comparison file ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a Comparison file (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path}: Comparison version {meta.get('version')} is not supported "
                             f"(this carprune reads version {VERSION})")
        missing = [k for k in cls._ARRAYS if k not in arrays]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}")
        return cls(**{k: meta[k] for k in ("model_a", "layer_a", "model_b", "layer_b", "metric",
                                           "classes", "num_images", "base_value_a", "base_value_b",
                                           "similarity", "notes")},
                   matches=[Match(**m) for m in meta["matches"]],
                   weights_a=arrays.get("weights_a"), weights_b=arrays.get("weights_b"),
                   **{k: arrays[k] for k in cls._ARRAYS})

    def save_html(self, path: str | os.PathLike) -> Path:
        """One self-contained page (figures as data URIs, no scripts or external resources), with
        the comparison's data (`comparison.npz`) and each figure as a PNG beside it."""
        from .compare_html import figures, render

        path = Path(path)
        figs = figures(self)
        for name, data in figs.items():
            atomic_write(path.parent / name, lambda f, data=data: f.write(data))
        self.save(path.parent / NPZ_NAME)
        page = render(self, figs, NPZ_NAME)
        atomic_write(path, lambda f: f.write(page.encode("utf-8")))
        return path

    def summary(self, top: int = 5) -> str:
        """A few lines: the layers, their similarity, the best and worst matches, coverage."""
        lines = [f"{self.model_a}:{self.layer_a} ({len(self.filters_a)} filters) vs "
                 f"{self.model_b}:{self.layer_b} ({len(self.filters_b)} filters), metric "
                 f"{self.metric} {self.base_value_a:.4f} vs {self.base_value_b:.4f}, "
                 f"{self.num_images} images: similarity {self.similarity:.3f}"]
        ms = sorted(self.matches, key=lambda m: -m.similarity)
        lines.append("  closest matches: " + ", ".join(
            f"{m.filter_a}~{m.filter_b} ({m.similarity:.2f})" for m in ms[:top]))
        lines.append("  farthest matches: " + ", ".join(
            f"{m.filter_a}~{m.filter_b} ({m.similarity:.2f})" for m in ms[::-1][:top]))
        cov = ", ".join(f"{c} {100 * a:+.1f}/{100 * b:+.1f}" for c, a, b in
                        zip(self.classes, self.coverage_a, self.coverage_b, strict=True))
        lines.append(f"  coverage A/B (points): {cov}")
        return "\n".join(lines)


def _present(model: nn.Module, layer: str) -> tuple[list[int], list[int], nn.Module]:
    """(current output positions that carry a filter, their original filter indices, module)."""
    mod = model.get_submodule(layer)
    origins = surgery.channel_origins(mod)
    if isinstance(mod, surgery.ScatteredConv2d):
        positions = mod.out_index.tolist()
    else:
        positions = list(range(len(origins)))
    return positions, [origins[p] for p in positions], mod


def _first_layer_weights(model: nn.Module, layer: str, positions: list[int]) -> np.ndarray | None:
    """The weights of the filters at `positions` when `layer` is a conv reading the input."""
    mod = model.get_submodule(layer)
    if not isinstance(mod, nn.Conv2d):
        return None
    if not graph.analyze(model, layer).first_layer:
        return None
    w = mod.weight.detach().cpu().to(torch.float32).numpy()
    if isinstance(mod, surgery.ScatteredConv2d):
        rows = {p: r for r, p in enumerate(mod.out_index.tolist())}
        return w[[rows[p] for p in positions]]
    return w[positions]


def _check_scores(s: LayerScores, layer: str, which: str) -> None:
    if not isinstance(s, LayerScores):
        raise ValueError(f"scores_{which} must be a LayerScores, got {type(s).__name__}")
    if s.layer != layer:
        raise ValueError(f"scores_{which} are for layer {s.layer!r}, not {layer!r}")


def compare(
    model_a: nn.Module,
    layer_a: str,
    model_b: nn.Module,
    layer_b: str,
    data: DataLike | None = None,
    *,
    num_images: int | None = None,
    seed: int = 0,
    metric: Any = None,
    scores_a: LayerScores | None = None,
    scores_b: LayerScores | None = None,
    names: tuple[str, str] | None = None,
    memory_budget: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> Comparison:
    """Compare layer `layer_a` of `model_a` with layer `layer_b` of `model_b` through the classes
    their filters are important for (see the module docstring).

    Both layers are scored with `score_layer` on the same seeded images of `data` (`num_images`,
    `seed`, `metric`: default top-1, so profiles are CAR_c), or `scores_a`/`scores_b` are given
    (then `data` is not needed). A pruned layer is scored on its kept filters, named by their
    original indices. `names` label the two models (default: their class names).
    """
    from .engine import score_layer

    pos_a, orig_a, _ = _present(model_a, layer_a)
    pos_b, orig_b, _ = _present(model_b, layer_b)
    if (scores_a is None or scores_b is None) and data is None:
        raise ValueError("compare needs data to score the layers on, or both scores_a and scores_b")
    kw = {"num_images": num_images, "seed": seed, "memory_budget": memory_budget, "dtype": dtype,
          "progress": progress}
    if metric is not None:
        kw["metric"] = metric
    if scores_a is None:
        scores_a = score_layer(model_a, layer_a, data, filters=pos_a, **kw)
    if scores_b is None:
        scores_b = score_layer(model_b, layer_b, data, filters=pos_b, **kw)
    _check_scores(scores_a, layer_a, "a")
    _check_scores(scores_b, layer_b, "b")
    if scores_a.classes != scores_b.classes:
        raise ValueError(f"the two layers were scored on different classes or bins: "
                         f"{scores_a.classes} vs {scores_b.classes}")
    if scores_a.metric != scores_b.metric:
        raise ValueError(f"the two layers were scored with different metrics: {scores_a.metric!r} "
                         f"vs {scores_b.metric!r}")
    if not torch.equal(scores_a.class_totals, scores_b.class_totals):
        raise ValueError("the two layers were scored on different images (class totals "
                         f"{scores_a.class_totals.tolist()} vs {scores_b.class_totals.tolist()})")
    fa = scores_a.filters.tolist()
    fb = scores_b.filters.tolist()
    name_a = [orig_a[pos_a.index(f)] if f in pos_a else f for f in fa]
    name_b = [orig_b[pos_b.index(f)] if f in pos_b else f for f in fb]
    pa = scores_a.importance_c.numpy()
    pb = scores_b.importance_c.numpy()
    sim = profile_similarity(pa, pb)
    pairs = match_filters(sim)
    ma, mb = np.linalg.norm(pa, axis=1), np.linalg.norm(pb, axis=1)
    label_a, label_b = names or (type(model_a).__name__, type(model_b).__name__)
    notes = []
    if len(fa) != len(fb):
        wider = "A" if len(fa) > len(fb) else "B"
        notes.append(f"layer {wider} has {abs(len(fa) - len(fb))} more filters; they stay unmatched")
    return Comparison(
        model_a=label_a, layer_a=layer_a, model_b=label_b, layer_b=layer_b,
        metric=str(scores_a.metric), classes=list(scores_a.classes),
        num_images=scores_a.num_images, base_value_a=scores_a.base_value,
        base_value_b=scores_b.base_value, base_value_c_a=scores_a.base_value_c.numpy(),
        base_value_c_b=scores_b.base_value_c.numpy(),
        filters_a=np.asarray(name_a, dtype=np.int64), filters_b=np.asarray(name_b, dtype=np.int64),
        importance_a=scores_a.importance.numpy(), importance_b=scores_b.importance.numpy(),
        profile_a=pa, profile_b=pb, similarity_matrix=sim,
        matches=[Match(int(name_a[i]), int(name_b[j]), float(sim[i, j])) for i, j in pairs],
        similarity=layer_similarity(sim, pairs, ma, mb),
        coverage_a=pa.max(0), coverage_b=pb.max(0),
        coverage_filter_a=np.asarray(name_a, dtype=np.int64)[pa.argmax(0)],
        coverage_filter_b=np.asarray(name_b, dtype=np.int64)[pb.argmax(0)],
        weights_a=_first_layer_weights(model_a, layer_a, fa),
        weights_b=_first_layer_weights(model_b, layer_b, fb),
        notes=notes)


__all__ = ["Comparison", "Match", "compare", "layer_similarity", "match_filters",
           "profile_similarity"]
