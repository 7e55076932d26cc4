"""The report's figures as PNG bytes (matplotlib's Agg canvas, no pyplot global state).

Each function takes plain numbers and pixels, so the same figures can be redrawn from a
report's JSON by scripts and papers.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

REMOVED = "#d62728"
KEPT = "#1f77b4"
NEUTRAL = "#7f7f7f"


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes of uint8 pixels [H, W, C] (C = 1 or 3) or [H, W]."""
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a.astype(np.uint8))).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _save(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight",
                metadata={"Software": None})
    return buf.getvalue()


def _status_colour(removed: bool | None) -> str:
    return NEUTRAL if removed is None else (REMOVED if removed else KEPT)


def car_chart(filters: Sequence[int], car: Sequence[float], removed: Sequence[bool | None],
              layer: str) -> bytes:
    """CAR per filter, most important first; removed filters in red."""
    order = np.argsort(-np.asarray(car, dtype=float), kind="stable")
    n = len(order)
    fig = Figure(figsize=(min(13.5, 3 + 0.18 * n), 3.2))
    ax = fig.add_subplot()
    vals = 100 * np.asarray(car, dtype=float)[order]
    ax.bar(np.arange(n), vals, color=[_status_colour(removed[i]) for i in order], width=0.85)
    ax.axhline(0, color="black", lw=0.6)
    if n <= 64:
        ax.set_xticks(np.arange(n))
        ax.set_xticklabels([str(filters[i]) for i in order], rotation=90, fontsize=8)
    ax.set_xlabel("filter (ordered by CAR)")
    ax.set_ylabel("CAR (accuracy points lost)")
    ax.set_title(f"{layer}: CAR of each filter"
                 + ("" if all(r is None for r in removed) else "  (red: removed, blue: kept)"))
    ax.set_xlim(-0.6, n - 0.4)
    return _save(fig)


def weight_pixels(w: np.ndarray) -> np.ndarray:
    """Filters [F, C, kh, kw] as uint8 images [F, kh, kw, 3]: grey = 0, each filter scaled to
    its own largest weight (as first-layer filters are usually shown), so weak filters still
    show their pattern and colour."""
    scale = np.abs(w).reshape(len(w), -1).max(1)
    scale = np.where(scale > 0, scale, 1.0).reshape(-1, 1, 1, 1)
    img = 0.5 + 0.5 * np.transpose(w, (0, 2, 3, 1)) / scale
    if img.shape[3] == 1:
        img = np.repeat(img, 3, axis=3)
    elif img.shape[3] != 3:
        img = np.repeat(img.mean(axis=3, keepdims=True), 3, axis=3)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def fit(tile: np.ndarray, size: int) -> np.ndarray:
    """A tile [h, w, C] scaled (nearest neighbour: pixels stay sharp) to fit size x size, centred
    on white, as RGB."""
    t = np.asarray(tile, dtype=np.uint8)
    if t.ndim == 2:
        t = t[..., None]
    if t.shape[2] == 1:
        t = np.repeat(t, 3, axis=2)
    h, w = t.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    t = np.asarray(Image.fromarray(t).resize((nw, nh), Image.Resampling.NEAREST))
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[y:y + nh, x:x + nw] = t
    return out


LABEL_PT = 9          # grid labels: 9 pt at 100 dpi = 12.5 px in the PNG
CHAR_PX = 7.5         # rough width of one label character at LABEL_PT


def grid_figure(tiles: Sequence[np.ndarray | None], labels: Sequence[str], cols: int, title: str,
                frames: Sequence[str | None] | None = None, colours: Sequence[str] | None = None,
                size: int = 48, row_labels: Sequence[str] | None = None) -> bytes:
    """Tiles in a grid with a label above each and an optional coloured frame: one image drawn
    once (fast for hundreds of tiles), text added on top. None tiles leave a gap (their label,
    if any, is still drawn). Labels are 9 pt (12.5 px at the PNG's 100 dpi); cells widen to fit
    them."""
    n = len(tiles)
    rows = -(-n // cols)
    pad = 4
    lines = [lab.split("\n") for lab in labels]
    head = 8 + 13 * max((len(ls) for ls in lines if any(ls)), default=1)
    widest = max((len(x) for ls in lines for x in ls), default=0)
    cw = max(size + 2 * pad, int(CHAR_PX * widest) + 8)
    ch = size + 2 * pad + head
    canvas = np.full((rows * ch, cols * cw, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        if t is None:
            continue
        r, c = divmod(i, cols)
        y, x = r * ch + head, c * cw + (cw - size) // 2 - pad
        fr = frames[i] if frames else None
        if fr:
            rgb = tuple(int(fr[k:k + 2], 16) for k in (1, 3, 5))
            canvas[y + 1:y + size + 2 * pad - 1, x + 1:x + size + 2 * pad - 1] = rgb
        canvas[y + pad:y + pad + size, x + pad:x + pad + size] = fit(t, size)
    dpi = 100
    left = 1.1 if row_labels else 0.0
    fig = Figure(figsize=(max(3.0, canvas.shape[1] / dpi + left), canvas.shape[0] / dpi + 0.4))
    ax = fig.add_axes((left / (canvas.shape[1] / dpi + left), 0,
                       1 - left / (canvas.shape[1] / dpi + left),
                       canvas.shape[0] / dpi / (canvas.shape[0] / dpi + 0.4)))
    ax.imshow(canvas, interpolation="nearest")
    for i, lab in enumerate(labels):
        if not lab:
            continue
        r, c = divmod(i, cols)
        ax.text(c * cw + cw / 2, r * ch + head - 2, lab, ha="center", va="bottom",
                fontsize=LABEL_PT, color=colours[i] if colours else "black", linespacing=1.0)
    for r, lab in enumerate(row_labels or []):
        ax.text(-6, r * ch + head + pad + size / 2, lab, ha="right", va="center", fontsize=LABEL_PT)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=11, y=1.0, va="bottom")
    return _save(fig, dpi=dpi)


def first_layer_filters(weight: np.ndarray, order: Sequence[int], car: dict[int, float],
                        removed: dict[int, int | None], layer: str) -> bytes:
    """Figure 5: first-layer filters drawn from their weights, in the given order (most important
    first), removed ones framed in red with their removal step."""
    pix = weight_pixels(np.asarray(weight, dtype=np.float64))
    labels, frames, colours = [], [], []
    for f in order:
        step, c = removed.get(f), car.get(f)
        labels.append(f"#{f}" + (f" {100 * c:+.1f}" if c is not None else "")
                      + (f"\nstep {step}" if step is not None else ""))
        frames.append(REMOVED if step is not None else "#cccccc")
        colours.append(REMOVED if step is not None else "black")
    title = (f"{layer} filters ordered by CAR (most important first; label: filter, CAR in points)"
             + ("; red: removed at step" if any(v is not None for v in removed.values()) else ""))
    return grid_figure([pix[f] for f in order], labels, min(len(order), 16), title, frames, colours,
                       size=56)


def colour_figure(indices: Sequence[float], order: Sequence[int], threshold: float, k: int,
                  cumulative: Sequence[int], order_source: str, layer: str) -> bytes:
    """Colour-selectivity index in pruning order, and colour filters among the first j pruned
    against the count expected from a random order."""
    idx = np.asarray(indices, dtype=float)
    n = len(order)
    fig = Figure(figsize=(11, 3.4))
    ax, bx = fig.subplots(1, 2)
    vals = idx[list(order)]
    ax.bar(np.arange(n), vals, color=[REMOVED if v > threshold else NEUTRAL for v in vals])
    ax.axhline(threshold, color="black", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    ax.axvline(k - 0.5, color="black", lw=0.8, ls=":")
    if n <= 64:
        ax.set_xticks(np.arange(n))
        ax.set_xticklabels([str(f) for f in order], rotation=90, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"filter, in pruning order ({order_source})")
    ax.set_ylabel("colour-selectivity index")
    ax.set_title(f"{layer}: colour filters (red) in pruning order", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    j = np.arange(1, n + 1)
    total = int((idx > threshold).sum())
    bx.step(j, cumulative, where="post", color=REMOVED, label="colour filters among first j")
    bx.plot(j, j * total / max(1, len(idx)), color=NEUTRAL, ls="--", label="expected, random order")
    bx.axvline(k, color="black", lw=0.8, ls=":")
    bx.set_xlabel("j (filters pruned)")
    bx.set_ylabel("colour filters")
    bx.set_title(f"{cumulative[k - 1]} of the first {k} pruned are colour filters "
                 f"({total} of {len(idx)} overall)", fontsize=10)
    bx.legend(fontsize=8, loc="upper left")
    return _save(fig)


def patch_overview(tiles: dict[int, np.ndarray], order: Sequence[int], car: dict[int, float],
                   removed: dict[int, int | None], layer: str, max_cols: int = 16) -> bytes:
    """Figures 6-7: each filter's top patches (a small mosaic per filter), most important first,
    removed filters framed in red."""
    order = [f for f in order if f in tiles]
    marked = any(v is not None for v in removed.values())
    labels = [f"#{f}" + (f" {100 * car[f]:+.1f}" if f in car else "") for f in order]
    frames = [REMOVED if removed.get(f) is not None else None for f in order]
    colours = [REMOVED if removed.get(f) is not None else "black" for f in order]
    size = int(min(112, max(72, max(tiles[order[0]].shape[:2]))))
    return grid_figure([tiles[f] for f in order], labels, min(len(order), max_cols),
                       f"{layer}: top activating patches per filter (most important first"
                       + ("; red frame: removed" if marked else "") + ")", frames, colours, size=size)


def class_accuracy_figure(original: Sequence[float | None], compressed: Sequence[float | None],
                          classes: Sequence[str], within: float, share: float, layer: str,
                          highlight: dict[int, str] | None = None) -> bytes:
    """Figure 8: per-class accuracy of the compressed against the original network."""
    a0 = np.array([np.nan if v is None else v for v in original], dtype=float) * 100
    a1 = np.array([np.nan if v is None else v for v in compressed], dtype=float) * 100
    fig = Figure(figsize=(4.6, 4.6))
    ax = fig.add_subplot()
    ok = a1 >= a0 - 100 * within - 1e-9
    ax.scatter(a0[ok], a1[ok], s=18, color=KEPT, label=f"within {100 * within:g} points")
    ax.scatter(a0[~ok], a1[~ok], s=18, color=REMOVED, label="more than that below")
    lo = float(np.nanmin(np.concatenate([a0, a1]))) if np.isfinite(a0).any() else 0.0
    lo = max(0.0, np.floor(lo / 10) * 10 - 5)
    ax.plot([lo, 100], [lo, 100], color="black", lw=0.8)
    ax.plot([lo, 100], [lo - 100 * within, 100 - 100 * within], color=NEUTRAL, lw=0.8, ls="--")
    if len(classes) <= 20:
        for c, name in enumerate(classes):
            if np.isfinite(a0[c]):
                ax.annotate(name, (a0[c], a1[c]), fontsize=8.5, xytext=(3, -3),
                            textcoords="offset points")
    for c, colour in (highlight or {}).items():
        ax.scatter([a0[c]], [a1[c]], s=70, facecolors="none", edgecolors=colour, lw=1.5)
    ax.set_xlim(lo, 100.5)
    ax.set_ylim(lo, 100.5)
    ax.set_aspect("equal")
    ax.set_xlabel("original accuracy per class (%)")
    ax.set_ylabel("compressed accuracy per class (%)")
    ax.set_title(f"{layer} compressed: {100 * share:.0f}% of classes within "
                 f"{100 * within:g} points", fontsize=9)
    ax.legend(fontsize=8.5, loc="upper left")
    return _save(fig)


def class_panels(rows: Sequence[dict], layer: str) -> bytes:
    """Figure 9 A-C: per filter, its top patches (A) and the classes that lose most accuracy
    without it (B, CAR_c > 0) and gain most (C, CAR_c < 0), each with a sample image. Classes
    whose accuracy does not change are not shown; a short list ends with its 'top_note' /
    'bottom_note' (e.g. 'only 2 classes lose accuracy without it'). rows: {'filter', 'car',
    'patches' (pixels), 'top'/'bottom': [(name, car_c, pixels)], 'top_note'/'bottom_note'}."""
    k = max(1, max(len(r[side]) + bool(r.get(f"{side}_note")) for r in rows
                   for side in ("top", "bottom")))
    cols = 2 * k + 3
    tiles: list[np.ndarray | None] = []
    labels: list[str] = []
    for r in rows:
        tiles += [r["patches"], None]
        labels += [f"A: filter {r['filter']}", ""]
        for side, tag in (("top", "B"), ("bottom", "C")):
            items: list = list(r[side])
            note = r.get(f"{side}_note") or ""
            if note:
                items.append(("__note__", note))
            items += [None] * (k - len(items))
            for j, it in enumerate(items):
                prefix = f"{tag}: " if j == 0 else ""
                if it is None:
                    tiles.append(None)
                    labels.append("")
                elif it[0] == "__note__":
                    tiles.append(None)
                    text = it[1].removesuffix(" without it")
                    cut = text.rfind(" ", 0, text.rfind(" accuracy"))
                    labels.append(prefix + text[:cut] + "\n" + text[cut + 1:])
                else:
                    tiles.append(it[2])
                    labels.append(prefix + f"{it[0][:12]}\n{100 * it[1]:+.1f}")
            if side == "top":
                tiles.append(None)
                labels.append("")
    return grid_figure(tiles, labels, cols,
                       f"{layer}: (A) top patches; classes that lose most (B, CAR_c > 0) and gain "
                       "most (C, CAR_c < 0) without the filter (points), with a sample image",
                       size=56,
                       row_labels=[f"filter {r['filter']}\nCAR {100 * r['car']:+.2f}" for r in rows])
