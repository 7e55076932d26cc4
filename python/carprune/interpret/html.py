"""The report as one self-contained HTML page: every image is a base64 data URI, styles are
inline, and there are no scripts, fonts or links to fetch, so the page works offline and can be
mailed or archived as a single file.

Class sample images appear in many table cells; each is embedded once, as a CSS class with a
background image, instead of once per cell.
"""

from __future__ import annotations

import base64
import html
import re
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import InterpretationReport

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1400px;padding:0 16px 40px;color:#222;line-height:1.4;font-size:16px}
h1{font-size:1.5em;margin:18px 0 4px}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:3px;
margin-top:28px}nav a{margin-right:12px;font-size:14px}
figure{margin:8px 0}figure img{max-width:100%;height:auto}figcaption{font-size:14px;color:#555}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ddd;padding:3px 6px;
vertical-align:middle;text-align:left}th{background:#f4f4f4;position:sticky;top:0}
tr.removed td:first-child{border-left:4px solid #d62728}tr.kept td:first-child{border-left:4px solid #1f77b4}
.num{text-align:right;font-variant-numeric:tabular-nums}.cls{display:inline-block;margin:1px 5px 1px 0;
white-space:nowrap}.cs{display:inline-block;width:28px;height:28px;background-size:100% 100%;
image-rendering:pixelated;vertical-align:middle;margin-right:2px;border:1px solid #ccc}
i.tile{display:inline-block;background-size:100% 100%;background-repeat:no-repeat;
vertical-align:middle;image-rendering:pixelated}
img.px{image-rendering:pixelated}.pos{color:#b01c1c}.neg{color:#1c5fb0}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{font-weight:600}dd{margin:0}
.gallery figure{display:inline-block;margin:4px 8px;text-align:center}.note{color:#8a5a00}
.grid{display:flex;flex-wrap:wrap;gap:10px 12px;align-items:flex-start}
.grid figure{margin:0;padding:4px;text-align:center;border:3px solid transparent;border-radius:3px}
.grid figure.removed{border-color:#d62728}.grid figcaption{font-size:13px;color:#222;line-height:1.3}
.panel figure{display:inline-block;margin:2px 6px 2px 0;text-align:center;vertical-align:top}
.panel figcaption{font-size:13px;color:#222}
"""

TITLES = {
    "summary": "Summary",
    "car": "CAR importance of each filter",
    "first-layer": "First-layer filters ordered by CAR (Figure 5)",
    "colour": "Colour filters among the pruned filters",
    "patches": "Top activating patches (Figures 6-7)",
    "class-panels": "Class-based interpretation of the most important filters (Figure 9)",
    "class-accuracy": "Per-class accuracy, compressed vs original (Figure 8)",
    "filters": "All filters",
    "class-samples": "Class sample images",
    "files": "Files",
}


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return 0, 0
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def _img(rep: InterpretationReport, name: str, alt: str, css: str = "", min_px: int = 0) -> str:
    data = rep.figures.get(name)
    if data is None:
        return f'<p class="note">(figure {html.escape(name)} is not available)</p>'
    w, h = _png_size(data)
    size = ""
    if min_px and w and h and max(w, h) < min_px:   # enlarge tiny pixel art
        s = min_px / max(w, h)
        size = f' width="{round(w * s)}" height="{round(h * s)}"'
        css = (css + " px").strip()
    cls = f' class="{css}"' if css else ""
    return (f'<img{cls} src="{_uri(data)}" alt="{html.escape(alt)}" '
            f'data-figure="{html.escape(name)}"{size}>')


def css_class(name: str) -> str:
    """The CSS class that carries figure `name` (e.g. 'patches/filter_0003.png') as a
    background image: small figures used in several places are embedded once, in the style."""
    return "f-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


SHARED_PREFIXES = ("patches/", "samples/", "weights/")


def _tile(rep: InterpretationReport, name: str, label: str, min_px: int, css: str = "tile") -> str:
    """An element showing figure `name` (one of the shared small figures) at its size, enlarged
    (pixelated) to `min_px` on its longer side when smaller."""
    data = rep.figures.get(name)
    if data is None:
        return f'<span class="note">({html.escape(name)} is not available)</span>'
    w, h = _png_size(data)
    s = max(1.0, min_px / max(w, h, 1))
    return (f'<i class="{css} {css_class(name)}" role="img" aria-label="{html.escape(label)}" '
            f'data-figure="{html.escape(name)}" style="width:{round(w * s)}px;'
            f'height:{round(h * s)}px"></i>')


def _fig(rep: InterpretationReport, name: str, alt: str, caption: str) -> str:
    return f"<figure>{_img(rep, name, alt)}<figcaption>{caption}</figcaption></figure>"


def _pts(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "&ndash;"
    cls = "pos" if v > 0 else ("neg" if v < 0 else "")
    return f'<span class="{cls}">{100 * v:+.{digits}f}</span>'


def _sample_name(c: int) -> str:
    return f"samples/class_{c:04d}.png"


def _classes_html(rep: InterpretationReport, scores, note: str) -> str:
    out = []
    for s in scores:
        name = _sample_name(s.index)
        thumb = (f'<i class="cs {css_class(name)}" role="img" aria-label="{html.escape(s.name)}" '
                 f'data-figure="{name}"></i>') if name in rep.figures else ""
        out.append(f'<span class="cls">{thumb}{html.escape(s.name)} {_pts(s.car_c, 1)}</span>')
    if note:
        out.append(f'<span class="note">({html.escape(note)})</span>')
    return "".join(out)


def _n(v: int | None, what: str) -> str:
    return f"{v:,} {what}" if v is not None else what


def _compression_accuracy(c: dict) -> str:
    """'accuracy 79.00% &rarr; 77.00% on <which images>' for the compression summary line."""
    if c.get("base_accuracy") is None or c.get("final_accuracy") is None:
        return ""
    n = c.get("accuracy_images")
    if c.get("accuracy_on") == "scoring":
        where = (f"on the {_n(n, 'scoring images')} (no hold-out set was given: the images the "
                 "filters were chosen on)")
    else:
        scored = c.get("score_images")
        where = (f"on the hold-out: {_n(n, 'images')} never used for scoring"
                 + (f" (scoring used {scored:,} others)" if scored is not None else ""))
    return (f"; accuracy {100 * c['base_accuracy']:.2f}% &rarr; {100 * c['final_accuracy']:.2f}% "
            f"{where}")


def _summary(rep: InterpretationReport) -> str:
    rf = rep.receptive_field
    items = [
        ("Model / layer", f"{html.escape(rep.model)} / <code>{html.escape(rep.layer)}</code>"),
        ("Filters", str(rep.num_filters)),
        ("Input images", "&times;".join(str(v) for v in rep.image_shape)),
        ("Receptive field", f"{rf.size[0]}&times;{rf.size[1]} px, stride {rf.stride[0]}&times;"
                            f"{rf.stride[1]}, offset {rf.offset[0]},{rf.offset[1]}"),
        ("CAR scored on", f"{rep.scored_images:,} images"
                          + (" of the interpretation data (a seeded subset)" if rep.scored_here
                             else " (the scores given)")
                          + f", base accuracy {100 * rep.base_accuracy:.2f}% on them"),
        ("Patches searched in", f"{rep.searched_images:,} images (activation: "
                                f"{'after BatchNorm' if rep.activation == 'bn' else 'conv output'})"),
    ]
    c = rep.compression
    if c is not None:
        items.append(("Compression", f"{html.escape(str(c.get('criterion')))}: {len(c['removed'])} "
                                     f"of {c['num_filters']} filters removed in {c['steps']} steps, "
                                     f"{len(c['kept'])} kept{_compression_accuracy(c)}"))
    if rep.colour is not None:
        items.append(("Colour filters", html.escape(rep.colour.sentence())))
    if rep.class_accuracy is not None:
        a = rep.class_accuracy
        n_cls = sum(1 for v in a.original if v is not None)
        items.append((f"Classes within {100 * a.within:g} points",
                      f"{100 * a.share_within:.1f}% ({round(a.share_within * n_cls)} of {n_cls}); "
                      f"overall {100 * a.original_overall:.2f}% &rarr; "
                      f"{100 * a.compressed_overall:.2f}% on "
                      f"{html.escape(a.images or f'{sum(a.counts):,} images')}"))
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    notes = list(rep.notes)
    if c is not None and rep.class_accuracy is not None and c.get("base_accuracy") is not None:
        notes.append("The two accuracy pairs above come from different images, so they differ.")
    return f"<dl>{body}</dl>" + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)


def _patch_name(f: int) -> str:
    return f"patches/filter_{f:04d}.png"


def _order(rep: InterpretationReport) -> list:
    """Filters most important first (rank 1 first), unscored ones last by index."""
    return sorted(rep.filters, key=lambda i: (i.rank is None, i.rank or 0, i.filter))


def _status(i) -> str:
    if i.kept is None:
        return ""
    return "kept" if i.kept else f"removed at step {i.removed_step}"


def _patch_grid(rep: InterpretationReport, figure: str, min_px: int, what: str) -> str:
    """Figures 5-7 as HTML: per filter its `figure` (a format with the filter number) and a
    caption in page text: filter, CAR, and its fate in the compression."""
    cells = []
    for i in _order(rep):
        name = figure.format(i.filter)
        car = f" CAR {_pts(i.car)}" if i.car is not None else ""
        status = _status(i)
        removed = i.kept is False
        css = ' class="removed"' if removed else ""
        cells.append(
            f'<figure{css} id="{what}-{i.filter}">'
            f'{_tile(rep, name, f"filter {i.filter} {what}", min_px)}'
            f"<figcaption><b>#{i.filter}</b>{car}"
            + (f"<br>{status}" if status else "") + "</figcaption></figure>")
    return '<div class="grid">' + "".join(cells) + "</div>"


def _class_panels(rep: InterpretationReport) -> str:
    """Figure 9 as an HTML table: the most important filters, their top patches, and the
    classes that lose / gain most accuracy without them, each with a sample image."""
    rows = []
    for f in rep.highlight:
        ci = rep.classes_of(f)
        sides = []
        for side in ("top", "bottom"):
            figs = []
            for s in getattr(ci, side):
                thumb = _tile(rep, _sample_name(s.index), s.name, 48) \
                    if _sample_name(s.index) in rep.figures else ""
                figs.append(f"<figure>{thumb}<figcaption>{html.escape(s.name)} "
                            f"{_pts(s.car_c, 1)}</figcaption></figure>")
            note = ci.note(side)
            if note:
                figs.append(f'<span class="note">{html.escape(note)}</span>')
            sides.append("".join(figs))
        rows.append(f'<tr><td>filter {f}<br>CAR {_pts(ci.car)}</td>'
                    f"<td>{_tile(rep, _patch_name(f), f'filter {f} top patches', 72)}</td>"
                    f'<td class="panel">{sides[0]}</td><td class="panel">{sides[1]}</td></tr>')
    return ("<table><thead><tr><th>Filter</th><th>(A) Top patches</th><th>(B) Classes that lose "
            "most accuracy without it (CAR<sub>c</sub> &gt; 0, points)</th><th>(C) Classes that "
            "gain most (CAR<sub>c</sub> &lt; 0)</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _filters_table(rep: InterpretationReport) -> str:
    infos = _order(rep)
    has_comp = rep.compression is not None
    has_colour = any(i.colour_index is not None for i in infos)
    cls_of = {ci.filter: ci for ci in rep.class_importance}
    head = ["Filter", "Rank", "CAR (pts)"] + (["Status"] if has_comp else []) + \
        (["Colour index"] if has_colour else []) + \
        [f"Top {len(infos[0].patches) if infos else 0} patches",
         "Classes that lose most without it (CAR<sub>c</sub> &gt; 0)",
         "Classes that gain most (CAR<sub>c</sub> &lt; 0)"]
    rows = []
    for i in infos:
        status, tr = _status(i), ""
        if has_comp:
            tr = ' class="kept"' if i.kept else ' class="removed"'
        ci = cls_of.get(i.filter)
        rank = i.rank if i.rank is not None else "&ndash;"
        cells = [f"<td>{i.filter}</td>", f'<td class="num">{rank}</td>',
                 f'<td class="num">{_pts(i.car)}</td>']
        if has_comp:
            cells.append(f"<td>{status}</td>")
        if has_colour:
            flag = ""
            if rep.colour is not None and i.colour_index is not None and \
                    i.colour_index > rep.colour.threshold:
                flag = " (colour)"
            cells.append(f'<td class="num">{i.colour_index:.2f}{flag}</td>')
        cells.append("<td>" + _tile(rep, _patch_name(i.filter), f"filter {i.filter} top patches",
                                    72) + "</td>")
        for side in ("top", "bottom"):
            cells.append("<td>" + (_classes_html(rep, getattr(ci, side), ci.note(side)) if ci
                                   else "&ndash;") + "</td>")
        rows.append(f'<tr id="filter-{i.filter}"{tr}>' + "".join(cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _shared_css(rep: InterpretationReport) -> str:
    """One CSS class per shared small figure (patch mosaics, class samples, filter weights)."""
    return "\n".join(f".{css_class(name)}{{background-image:url({_uri(data)})}}"
                     for name, data in sorted(rep.figures.items())
                     if name.startswith(SHARED_PREFIXES))


def render(rep: InterpretationReport, json_name: str = "report.json",
           back_link: str | None = None) -> str:
    """The page as a string; `back_link` (e.g. '../index.html') adds a link back to the report's
    landing page."""
    sec: dict[str, str] = {"summary": _summary(rep)}
    removed_note = " Red: removed by the compression; blue: kept." if rep.compression else ""
    red_frame = " A red frame marks a filter the compression removed." if rep.compression else ""
    sec["car"] = _fig(rep, "car.png", "CAR per filter",
                      "Accuracy lost (percentage points) when each filter alone is removed, most "
                      "important first." + removed_note)
    if "first-layer" in rep.sections:
        sec["first-layer"] = ("<p>Filters drawn from their weights (grey = 0, each scaled to its "
                              "largest weight), most important first; under each its number and "
                              "CAR in points." + red_frame + " As one figure: "
                              "<a href='filters.png'>filters.png</a>.</p>"
                              + _patch_grid(rep, "weights/filter_{:04d}.png", 48, "weights"))
    if rep.colour is not None:
        c = rep.colour
        sec["colour"] = (f"<p>{html.escape(c.sentence())}.</p><p>Colour-selectivity index: share "
                         "of a filter's energy (weights mapped to pixel space) outside the "
                         "achromatic direction (1,1,1)/&radic;3; 0 for a pure brightness filter, "
                         "2/3 on average for random weights.</p>"
                         + _fig(rep, "colour.png", "colour selectivity",
                                "Left: index per filter in pruning order (red: colour filter). "
                                "Right: colour filters among the first j pruned vs. a random order."))
    rf = rep.receptive_field
    k = len(rep.filters[0].patches) if rep.filters else 0
    sec["patches"] = (f"<p>For each filter, the {k} images whose activation maximum is highest, "
                      "cut at the receptive field of the peak "
                      f"({rf.size[0]}&times;{rf.size[1]} px, clipped at image borders, grey "
                      "outside); most important filter first; under each its number and CAR in "
                      "points." + red_frame + " As one figure: "
                      "<a href='patches.png'>patches.png</a>.</p>"
                      + _patch_grid(rep, "patches/filter_{:04d}.png", 96, "patches"))
    if rep.highlight:
        sec["class-panels"] = ("<p>The most important filters by CAR: (A) their top patches, (B) "
                               "the classes whose accuracy drops most without the filter and (C) "
                               "those whose accuracy rises most, each with a sample image. A class "
                               "whose accuracy does not change is not listed. As one figure: "
                               "<a href='class_panels.png'>class_panels.png</a>.</p>"
                               + _class_panels(rep))
    else:
        sec["class-panels"] = '<p class="note">No scored filters.</p>'
    if rep.class_accuracy is not None:
        a = rep.class_accuracy
        sec["class-accuracy"] = _fig(rep, "class_accuracy.png", "per-class accuracy",
                                     f"One point per class; dashed: {100 * a.within:g} points below "
                                     f"the original. {100 * a.share_within:.1f}% of classes are "
                                     f"within that band. Measured on {html.escape(a.images)}.")
    sec["filters"] = _filters_table(rep)
    gallery = []
    for c, name in enumerate(rep.classes):
        key = _sample_name(c)
        if key in rep.figures:
            gallery.append(f"<figure>{_tile(rep, key, name, 64)}<figcaption>{c}: "
                           f"{html.escape(name)}</figcaption></figure>")
    sec["class-samples"] = f'<div class="gallery">{"".join(gallery)}</div>' if gallery else \
        '<p class="note">No sample images.</p>'
    files = [json_name] + sorted(k for k in rep.figures if "/" not in k)
    sec["files"] = ("<p>Beside this page: " + ", ".join(
        f'<a href="{html.escape(f)}">{html.escape(f)}</a>' for f in files)
        + "; per-filter patch mosaics in <code>patches/</code>, class samples in "
        "<code>samples/</code>"
        + (", filter weights in <code>weights/</code>" if rep.first_layer else "") + ".</p>")
    nav = "".join(f'<a href="#{s}">{TITLES[s]}</a>' for s in rep.sections)
    body = "\n".join(f'<section id="{s}"><h2>{TITLES[s]}</h2>\n{sec[s]}\n</section>' for s in rep.sections)
    title = f"CAR interpretation: {rep.model} {rep.layer}"
    up = (f'<p><a href="{html.escape(back_link)}">&larr; all layers</a></p>' if back_link else "")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}\n{_shared_css(rep)}</style></head>\n"
            f"<body><header>{up}<h1>{html.escape(title)}</h1><nav>{nav}</nav></header>\n{body}\n"
            "</body></html>\n")
