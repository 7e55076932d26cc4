"""`interpret`: everything the CAR paper shows about one conv layer (Figures 5-9), as a typed
report that saves itself as one self-contained HTML page, PNG figures and a JSON of the numbers.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import graph
from ..data.batches import DataLike, dataset_classes, num_items
from ..engine import score_layer
from ..io import atomic_write, read_json, write_json
from ..scores import LayerScores
from . import figures
from .classes import ClassAccuracy, ClassImportance, class_accuracy, class_importance
from .colour import DEFAULT_THRESHOLD, ColourSummary, colour_selectivity, colour_summary
from .patches import Activation, PatchSearch, crop, display_images, mosaic, search_patches
from .receptive import ReceptiveField

if TYPE_CHECKING:
    from ..greedy import CompressionResult

REPORT_FORMAT = "carprune.InterpretationReport"
REPORT_VERSION = 2      # 2: class lists hold only classes with a non-zero CAR_c
JSON_NAME = "report.json"
TILE_MAX = 64          # display size cap (pixels) of one patch or class sample


@dataclass
class Patch:
    """One top-activating patch: the image, where the filter peaked and the input box cut."""

    image: int                       # dataset index
    label: int
    activation: float
    row: int                         # position in the activation map
    col: int
    box: tuple[int, int, int, int]   # (y0, x0, y1, x1) in input pixels, clipped, end exclusive


@dataclass
class FilterInfo:
    filter: int
    car: float | None                # None: the filter was not scored
    rank: int | None                 # 1 = most important
    kept: bool | None                # None: no compression result given
    removed_step: int | None         # greedy step that removed it
    removal_order: int | None        # 1 = removed first
    colour_index: float | None       # RGB first layers only
    patches: list[Patch]

    @classmethod
    def from_dict(cls, d: dict) -> FilterInfo:
        return cls(**{**d, "patches": [Patch(**{**p, "box": tuple(p["box"])}) for p in d["patches"]]})


@dataclass
class InterpretationReport:
    """CAR interpretation of the filters of one conv layer.

    `figures` maps relative file names (e.g. 'car.png', 'patches/filter_0003.png') to PNG bytes;
    everything else is plain numbers, saved by `save_json` and read back by `load`.
    """

    layer: str
    model: str
    num_filters: int
    image_shape: tuple[int, int, int]
    classes: list[str]
    class_samples: list[int | None]          # a sample image (dataset index) per class
    first_layer: bool
    activation: str                          # where patches were ranked: 'conv' or 'bn'
    receptive_field: ReceptiveField
    scored_images: int
    base_accuracy: float
    searched_images: int
    filters: list[FilterInfo]
    class_importance: list[ClassImportance]  # per scored filter: top/bottom classes by CAR_c
    colour: ColourSummary | None = None
    class_accuracy: ClassAccuracy | None = None
    compression: dict[str, Any] | None = None
    highlight: list[int] = field(default_factory=list)   # filters of the Figure-9 panels
    notes: list[str] = field(default_factory=list)
    scored_here: bool = False   # CAR was scored by `interpret` on the data given, not passed in
    figures: dict[str, bytes] = field(default_factory=dict, repr=False)

    # -- access ------------------------------------------------------------------------------
    def filter(self, f: int) -> FilterInfo:
        for info in self.filters:
            if info.filter == f:
                return info
        raise KeyError(f"{self.layer} has no filter {f} (0..{self.num_filters - 1})")

    def classes_of(self, f: int) -> ClassImportance:
        for ci in self.class_importance:
            if ci.filter == f:
                return ci
        raise KeyError(f"filter {f} of {self.layer} was not scored")

    @property
    def sections(self) -> list[str]:
        """Ids of the HTML sections this report has, in page order."""
        s = ["summary", "car"]
        if self.first_layer:
            s.append("first-layer")
        if self.colour is not None:
            s.append("colour")
        s += ["patches", "class-panels"]
        if self.class_accuracy is not None:
            s.append("class-accuracy")
        return s + ["filters", "class-samples", "files"]

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("figures",)}
        d["receptive_field"] = self.receptive_field.to_dict()
        d["image_shape"] = list(self.image_shape)
        for info in d["filters"]:
            for p in info["patches"]:
                p["box"] = list(p["box"])
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, **d,
                "sections": self.sections, "files": sorted(self.figures)}

    def save_json(self, path: str | os.PathLike) -> Path:
        """The numbers (no pixels), written atomically."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    def save_figures(self, directory: str | os.PathLike) -> list[Path]:
        d = Path(directory)
        out = []
        for name, data in sorted(self.figures.items()):
            p = d / name
            atomic_write(p, lambda f, data=data: f.write(data))
            out.append(p)
        return out

    def save_html(self, path: str | os.PathLike, back_link: str | None = None) -> Path:
        """One self-contained page (images as data URIs, no external resources), with every
        figure as a PNG and the numbers as report.json beside it. `back_link`: a link at the top
        back to a landing page (relative to `path`)."""
        from .html import render

        path = Path(path)
        self.save_figures(path.parent)
        self.save_json(path.parent / JSON_NAME)
        page = render(self, json_name=JSON_NAME, back_link=back_link)
        atomic_write(path, lambda f: f.write(page.encode("utf-8")))
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InterpretationReport:
        if d.get("format") != REPORT_FORMAT:
            raise ValueError(f"not an interpretation report (format {d.get('format')!r})")
        if d.get("version") != REPORT_VERSION:
            raise ValueError(f"interpretation report version {d.get('version')} is not supported "
                             f"(this carprune reads version {REPORT_VERSION})")
        return cls(
            layer=d["layer"], model=d["model"], num_filters=d["num_filters"],
            image_shape=tuple(d["image_shape"]), classes=list(d["classes"]),
            class_samples=list(d["class_samples"]), first_layer=d["first_layer"],
            activation=d["activation"], receptive_field=ReceptiveField.from_dict(d["receptive_field"]),
            scored_images=d["scored_images"], base_accuracy=d["base_accuracy"],
            searched_images=d["searched_images"],
            filters=[FilterInfo.from_dict(f) for f in d["filters"]],
            class_importance=[ClassImportance.from_dict(c) for c in d["class_importance"]],
            colour=ColourSummary.from_dict(d["colour"]) if d.get("colour") else None,
            class_accuracy=ClassAccuracy.from_dict(d["class_accuracy"]) if d.get("class_accuracy")
            else None,
            compression=d.get("compression"), highlight=list(d.get("highlight", [])),
            notes=list(d.get("notes", [])), scored_here=bool(d.get("scored_here", False)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> InterpretationReport:
        """Read a report's JSON; the PNGs saved beside it (if present) come back as `figures`,
        so `save_html` can write the page again."""
        path = Path(path)
        obj = read_json(path, "interpretation report")
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is not an interpretation report")
        rep = cls.from_dict(obj)
        for name in obj.get("files", []):
            p = path.parent / name
            if p.is_file():
                rep.figures[name] = p.read_bytes()
        return rep


# -- building ------------------------------------------------------------------------------------
def _check_scores(scores: LayerScores, layer: str, num_filters: int, num_classes: int | None) -> None:
    if not isinstance(scores, LayerScores):
        raise TypeError(f"scores must be a LayerScores, got {type(scores).__name__}")
    if scores.layer != layer:
        raise ValueError(f"the scores are for layer {scores.layer!r}, not {layer!r}")
    bad = [int(f) for f in scores.filters if not 0 <= int(f) < num_filters]
    if bad:
        raise ValueError(f"the scores name filters {bad[:5]} that {layer!r} ({num_filters} filters) "
                         "does not have: scores of another model?")
    if num_classes is not None and scores.num_classes != num_classes:
        raise ValueError(f"the scores have {scores.num_classes} classes but the data has "
                         f"{num_classes}: scores of another dataset?")


def _check_compression(comp: CompressionResult, layer: str, num_filters: int) -> None:
    for attr in ("layer", "removed", "kept", "num_filters", "trajectory"):
        if not hasattr(comp, attr):
            raise TypeError(f"compression must be a CompressionResult, got {type(comp).__name__}")
    if comp.layer != layer:
        raise ValueError(f"the compression result is for layer {comp.layer!r}, not {layer!r}")
    if comp.num_filters != num_filters:
        raise ValueError(f"the compression result is for a layer of {comp.num_filters} filters; "
                         f"{layer!r} has {num_filters}: another model?")
    bad = [f for f in list(comp.removed) + list(comp.kept) if not 0 <= int(f) < num_filters]
    if bad:
        raise ValueError(f"the compression result names filters {bad[:5]} out of range")


def _thumb(pixels: np.ndarray, cap: int = TILE_MAX) -> np.ndarray:
    """Downscale pixels [H, W, C] so the longer side is at most `cap` (display only)."""
    h, w, c = pixels.shape
    if max(h, w) <= cap:
        return pixels
    s = cap / max(h, w)
    im = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def _patch_tiles(search: PatchSearch, data: DataLike, f: int) -> list[np.ndarray]:
    imgs = display_images(data, search.images[f])
    return [_thumb(crop(imgs[j], search.receptive_field, int(search.rows[f, j]),
                        int(search.cols[f, j]))) for j in range(search.images.shape[1])]


def interpret(
    model: nn.Module,
    layer: str,
    data: DataLike,
    scores: LayerScores | None = None,
    compression: CompressionResult | None = None,
    top_classes: int = 5,
    patches: int = 9,
    *,
    num_images: int | None = None,
    search_images: int | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    activation: Activation = "bn",
    colour_threshold: float = DEFAULT_THRESHOLD,
    colour_k: int | None = None,
    highlight: int = 3,
    within: float = 0.03,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    classes: Sequence[str] | None = None,
    metric: Any = None,
) -> InterpretationReport:
    """Interpret the filters of conv `layer` of `model` on `data` (the CAR paper, Figures 5-9).

    scores: CAR scores of the layer (`LayerScores`); None computes them with `score_layer` on
      `num_images` images (a seeded subset; None = all) within `memory_budget`.
    compression: a `CompressionResult` of this layer; marks kept/removed filters and their greedy
      step, and with its pruned `model` adds per-class accuracy against the original (Figure 8).
    top_classes: classes of highest and of lowest CAR_c listed per filter.
    patches: top activating patches per filter, searched over `search_images` images (None: the
      whole dataset) in one streaming pass.
    colour_k: for RGB first layers, how many of the first pruned filters to count colour filters
      among (default: the filters the compression removed, else half the layer).
    classes: class names in label order, when `data` carries none (e.g. a tensor pair).
    metric: what the scores measure when they are computed here (default top-1: CAR; e.g. 'top5'
      or 'nll', see `score_layer`); the report's CAR values are then that metric's importance.
    """
    n_data = num_items(data)
    if n_data == 0:
        raise ValueError("the dataset is empty: nothing to interpret")
    if top_classes < 1:
        raise ValueError(f"top_classes must be >= 1, got {top_classes}")
    if patches < 1:
        raise ValueError(f"patches must be >= 1, got {patches}")
    analysis = graph.analyze(model, layer)
    conv = analysis.conv
    if not isinstance(conv, nn.Conv2d):
        raise graph.CutError(f"layer {layer!r} is a {type(conv).__name__}, not a Conv2d: "
                             "interpretation pages (patches, receptive fields) are drawn for conv "
                             "layers; score its units with score_layer, or compare layers with "
                             "compare")
    nf = int(conv.out_channels)
    data_classes = list(classes) if classes is not None else dataset_classes(data)
    if scores is not None:
        _check_scores(scores, layer, nf, len(data_classes) if data_classes is not None else None)
    if compression is not None:
        _check_compression(compression, layer, nf)
    notes: list[str] = []

    # CAR and CAR_c
    scored_here = scores is None
    if scores is None:
        scores = score_layer(model, layer, data, num_images=num_images, seed=seed,
                             memory_budget=memory_budget, device=device, progress=progress,
                             classes=classes, metric=metric)
    if not scores.is_accuracy:
        notes.append(f"Importance is measured by {scores.metric!r}, not top-1 accuracy: every CAR "
                     f"and CAR_c value here is how much worse the mean {scores.metric} gets without "
                     "the filter (in its units, shown x100), and the base accuracy is the mean "
                     f"{scores.metric}.")
    if scores.removed:
        notes.append(f"CAR was scored with filters {scores.removed} already removed.")
    classes = list(scores.classes)

    # top patches (one streaming pass) and a sample image per class
    search = search_patches(model, layer, data, k=patches, activation=activation,
                            num_images=search_images, seed=seed, memory_budget=memory_budget,
                            device=device, progress=progress)
    samples = {c: i for c, i in search.class_first.items() if 0 <= c < len(classes)}
    importance = class_importance(scores, top_classes, samples)
    car = {int(f): float(v) for f, v in zip(scores.filters.tolist(), scores.importance.tolist(),
                                            strict=True)}
    order_pos = scores.order().tolist()
    asc = [int(scores.filters[i]) for i in order_pos]          # least important first
    rank = {f: len(asc) - p for p, f in enumerate(asc)}
    most_first = asc[::-1] + [f for f in range(nf) if f not in car]

    # compression
    removed_step: dict[int, int | None] = {}
    comp_dict = None
    if compression is not None:
        steps = {int(f): s.step for s in compression.trajectory for f in s.removed}
        # a hand-made result may not list every removal in its trajectory: use the order then
        removed_step = {int(f): steps.get(int(f), i + 1) for i, f in enumerate(compression.removed)}
        first = compression.trajectory[0] if compression.trajectory else None
        fin = compression.final_step if compression.trajectory else None
        comp_dict = {"criterion": getattr(compression, "criterion", None),
                     "num_filters": compression.num_filters, "removed": list(compression.removed),
                     "kept": list(compression.kept), "steps": max(removed_step.values(), default=0),
                     "base_accuracy": first.accuracy if first else None,
                     "final_accuracy": fin.accuracy if fin else None,
                     "has_model": compression.model is not None,
                     "accuracy_on": first.accuracy_on if first else "hold-out"}
        cfg = getattr(compression, "config", None) or {}
        comp_dict["accuracy_images"] = cfg.get("eval_images" if comp_dict["accuracy_on"] ==
                                               "hold-out" else "score_images")
        comp_dict["score_images"] = cfg.get("score_images")
    marks = {f: removed_step.get(f) for f in range(nf)}

    # first layer: filters as images, colour selectivity
    c_img = search.image_shape[0]
    first = analysis.first_layer and conv.in_channels == c_img and conv.groups == 1
    colour = None
    cidx = None
    if first and c_img == 3:
        std = getattr(data, "std", None)
        cidx = colour_selectivity(conv.weight, std if std is not None and len(std) == 3 else None)
        if compression is not None and compression.removed:
            gone = [int(f) for f in compression.removed]
            order = gone + [f for f in asc if f not in set(gone)]
            order += [f for f in range(nf) if f not in set(order)]
            src, k_def = "greedy removal", len(gone)
        else:
            order = asc + [f for f in range(nf) if f not in car]
            src, k_def = "CAR, lowest first", max(1, nf // 2)
        colour = colour_summary(cidx, order, colour_k or k_def, threshold=colour_threshold,
                                order_source=src)
    elif first:
        notes.append(f"{layer} acts on {c_img}-channel images: no colour-selectivity index.")

    # per-class accuracy of the compressed network (Figure 8)
    acc = None
    if compression is not None:
        if compression.model is not None:
            acc = class_accuracy(model, compression.model, data, classes, num_images=search_images,
                                 seed=seed, within=within, memory_budget=memory_budget,
                                 progress=progress)
            acc.images = (f"{sum(acc.counts)} images of the interpretation data (those searched "
                          "for patches), not the compression's own scoring or hold-out images")
        else:
            notes.append("The compression result has no model (loaded without architecture): "
                         "no per-class accuracy.")

    filters = []
    for f in range(nf):
        ps = [Patch(image=int(search.images[f, j]), label=int(search.labels[f, j]),
                    activation=float(search.values[f, j]), row=int(search.rows[f, j]),
                    col=int(search.cols[f, j]), box=search.box(f, j))
              for j in range(search.images.shape[1])]
        filters.append(FilterInfo(
            filter=f, car=car.get(f), rank=rank.get(f),
            kept=None if compression is None else f not in removed_step,
            removed_step=removed_step.get(f),
            removal_order=(list(compression.removed).index(f) + 1) if f in removed_step else None,
            colour_index=None if cidx is None else float(cidx[f]), patches=ps))

    rep = InterpretationReport(
        layer=layer, model=type(model).__name__, num_filters=nf,
        image_shape=tuple(search.image_shape), classes=classes,
        class_samples=[samples.get(c) for c in range(len(classes))], first_layer=first,
        activation=search.activation, receptive_field=search.receptive_field,
        scored_images=scores.num_images, base_accuracy=scores.base_value,
        searched_images=search.num_images, filters=filters, class_importance=importance,
        colour=colour, class_accuracy=acc, compression=comp_dict,
        highlight=[f for f in most_first if f in car][:highlight], notes=notes,
        scored_here=scored_here)
    _draw(rep, data, search, conv, most_first, car, marks)
    return rep


def _draw(rep: InterpretationReport, data: DataLike, search: PatchSearch, conv: nn.Conv2d,
          most_first: list[int], car: dict[int, float], marks: dict[int, int | None]) -> None:
    """Render every figure into rep.figures (PNG bytes)."""
    figs = rep.figures
    has_comp = rep.compression is not None
    figs["car.png"] = figures.car_chart(
        list(car), list(car.values()),
        [((f in rep.compression["removed"]) if has_comp else None) for f in car], rep.layer)
    tiles: dict[int, np.ndarray] = {}
    for f in range(rep.num_filters):
        tiles[f] = mosaic(_patch_tiles(search, data, f), cols=3)
        figs[f"patches/filter_{f:04d}.png"] = figures.png(tiles[f])
    figs["patches.png"] = figures.patch_overview(tiles, most_first, car, marks, rep.layer)
    samples: dict[int, np.ndarray] = {}
    present = [(c, i) for c, i in enumerate(rep.class_samples) if i is not None]
    if present:
        pix = display_images(data, [i for _, i in present])
        for (c, _), p in zip(present, pix, strict=True):
            samples[c] = _thumb(p)
            figs[f"samples/class_{c:04d}.png"] = figures.png(samples[c])
    if rep.first_layer:
        w = conv.weight.detach().cpu().numpy()
        figs["filters.png"] = figures.first_layer_filters(w, most_first, car, marks, rep.layer)
        for f, pix in enumerate(figures.weight_pixels(w)):
            figs[f"weights/filter_{f:04d}.png"] = figures.png(pix)
    if rep.colour is not None:
        c = rep.colour
        figs["colour.png"] = figures.colour_figure(c.indices, c.order, c.threshold, c.k,
                                                   c.cumulative, c.order_source, rep.layer)
    blank = np.full((8, 8, 3), 255, np.uint8)
    rows = []
    for f in rep.highlight:
        ci = rep.classes_of(f)
        rows.append({"filter": f, "car": ci.car, "patches": _rgb(tiles[f]),
                     "top": [(s.name, s.car_c, _rgb(samples.get(s.index, blank))) for s in ci.top],
                     "bottom": [(s.name, s.car_c, _rgb(samples.get(s.index, blank)))
                                for s in ci.bottom],
                     "top_note": ci.note("top"), "bottom_note": ci.note("bottom")})
    if rows:
        figs["class_panels.png"] = figures.class_panels(rows, rep.layer)
    if rep.class_accuracy is not None:
        a = rep.class_accuracy
        hl = {}
        if rep.highlight:
            ci = rep.classes_of(rep.highlight[0])
            hl = {s.index: "#2ca02c" for s in ci.top[:3]}
            hl.update({s.index: "#9467bd" for s in ci.bottom[:3]})
        figs["class_accuracy.png"] = figures.class_accuracy_figure(
            a.original, a.compressed, a.classes, a.within, a.share_within, rep.layer, hl)


def _rgb(p: np.ndarray) -> np.ndarray:
    return np.repeat(p, 3, axis=2) if p.ndim == 3 and p.shape[2] == 1 else p


def build_report(
    model: nn.Module,
    layer: str | None,
    data: DataLike,
    out_dir: str | os.PathLike,
    *,
    scores_path: str | os.PathLike | None = None,
    compression_dir: str | os.PathLike | None = None,
    top_classes: int = 5,
    patches: int = 9,
    back_link: str | None = None,
    **kwargs: Any,
) -> InterpretationReport:
    """What `carprune report` runs: load saved scores (`LayerScores.save`) and/or a saved
    compression result (`CompressionResult.save`; its pruned model is rebuilt from `model`),
    interpret, and write out_dir/index.html with the PNGs and report.json beside it.

    `layer` may be None when a scores file or compression result names it. Other keyword
    arguments go to `interpret` (num_images, search_images, memory_budget, progress, ...);
    `back_link` links the page back to a landing page (`carprune report`: '../index.html').
    """
    scores = LayerScores.load(scores_path) if scores_path is not None else None
    compression = None
    if compression_dir is not None:
        from ..greedy import CompressionResult

        compression = CompressionResult.load(compression_dir, architecture=copy.deepcopy(model))
    if layer is None:
        named = compression.layer if compression is not None else (
            scores.layer if scores is not None else None)
        if named is None:
            raise ValueError("no layer given, and no scores or compression result to take it from")
        layer = named
    rep = interpret(model, layer, data, scores=scores, compression=compression,
                    top_classes=top_classes, patches=patches, **kwargs)
    rep.save_html(Path(out_dir) / "index.html", back_link=back_link)
    return rep
