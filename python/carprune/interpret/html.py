"""The report as one self-contained HTML page: every image is a base64 data URI, styles are
inline, and there are no scripts, fonts or links to fetch, so the page works offline and can be
mailed or archived as a single file.

Class sample images appear in many table cells; each is embedded once, as a CSS class with a
background image, instead of once per cell.
"""

from __future__ import annotations

import base64
import html
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import InterpretationReport

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1400px;padding:0 16px 40px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:18px 0 4px}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:3px;
margin-top:28px}nav a{margin-right:12px;font-size:.9em}
figure{margin:8px 0}figure img{max-width:100%;height:auto}figcaption{font-size:.88em;color:#555}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ddd;padding:3px 6px;
vertical-align:middle;text-align:left}th{background:#f4f4f4;position:sticky;top:0}
tr.removed td:first-child{border-left:4px solid #d62728}tr.kept td:first-child{border-left:4px solid #1f77b4}
.num{text-align:right;font-variant-numeric:tabular-nums}.cls{display:inline-block;margin:1px 5px 1px 0;
white-space:nowrap}.cs{display:inline-block;width:28px;height:28px;background-size:100% 100%;
image-rendering:pixelated;vertical-align:middle;margin-right:2px;border:1px solid #ccc}
img.px{image-rendering:pixelated}.pos{color:#b01c1c}.neg{color:#1c5fb0}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{font-weight:600}dd{margin:0}
.gallery figure{display:inline-block;margin:4px 8px;text-align:center}.note{color:#8a5a00}
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


def _fig(rep: InterpretationReport, name: str, alt: str, caption: str) -> str:
    return f"<figure>{_img(rep, name, alt)}<figcaption>{caption}</figcaption></figure>"


def _pts(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "&ndash;"
    cls = "pos" if v > 0 else ("neg" if v < 0 else "")
    return f'<span class="{cls}">{100 * v:+.{digits}f}</span>'


def _classes_html(scores) -> str:
    out = []
    for s in scores:
        thumb = f'<i class="cs c{s.index}" role="img" aria-label="{html.escape(s.name)}"></i>' \
            if s.sample is not None else ""
        out.append(f'<span class="cls">{thumb}{html.escape(s.name)} {_pts(s.car_c, 1)}</span>')
    return "".join(out)


def _summary(rep: InterpretationReport) -> str:
    rf = rep.receptive_field
    items = [
        ("Model / layer", f"{html.escape(rep.model)} / <code>{html.escape(rep.layer)}</code>"),
        ("Filters", str(rep.num_filters)),
        ("Input images", "&times;".join(str(v) for v in rep.image_shape)),
        ("Receptive field", f"{rf.size[0]}&times;{rf.size[1]} px, stride {rf.stride[0]}&times;"
                            f"{rf.stride[1]}, offset {rf.offset[0]},{rf.offset[1]}"),
        ("CAR scored on", f"{rep.scored_images} images, base accuracy "
                          f"{100 * rep.base_accuracy:.2f}%"),
        ("Patches searched in", f"{rep.searched_images} images (activation: "
                                f"{'after BatchNorm' if rep.activation == 'bn' else 'conv output'})"),
    ]
    c = rep.compression
    if c is not None:
        acc = ""
        if c.get("base_accuracy") is not None and c.get("final_accuracy") is not None:
            acc = (f"; accuracy {100 * c['base_accuracy']:.2f}% &rarr; "
                   f"{100 * c['final_accuracy']:.2f}%")
        items.append(("Compression", f"{html.escape(str(c.get('criterion')))}: {len(c['removed'])} "
                                     f"of {c['num_filters']} filters removed in {c['steps']} steps, "
                                     f"{len(c['kept'])} kept{acc}"))
    if rep.colour is not None:
        items.append(("Colour filters", html.escape(rep.colour.sentence())))
    if rep.class_accuracy is not None:
        a = rep.class_accuracy
        n_cls = sum(1 for v in a.original if v is not None)
        items.append((f"Classes within {100 * a.within:g} points",
                      f"{100 * a.share_within:.1f}% ({round(a.share_within * n_cls)} of {n_cls}); "
                      f"overall {100 * a.original_overall:.2f}% &rarr; "
                      f"{100 * a.compressed_overall:.2f}%"))
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in rep.notes)
    return f"<dl>{body}</dl>{notes}"


def _filters_table(rep: InterpretationReport) -> str:
    infos = sorted(rep.filters, key=lambda i: (i.rank is None, i.rank or 0, i.filter))
    has_comp = rep.compression is not None
    has_colour = any(i.colour_index is not None for i in infos)
    cls_of = {ci.filter: ci for ci in rep.class_importance}
    head = ["Filter", "Rank", "CAR (pts)"] + (["Status"] if has_comp else []) + \
        (["Colour index"] if has_colour else []) + \
        [f"Top {len(infos[0].patches) if infos else 0} patches", "Highest CAR<sub>c</sub> classes",
         "Lowest CAR<sub>c</sub> classes"]
    rows = []
    for i in infos:
        status, tr = "", ""
        if has_comp:
            if i.kept:
                status, tr = "kept", ' class="kept"'
            else:
                status, tr = f"removed at step {i.removed_step}", ' class="removed"'
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
        cells.append("<td>" + _img(rep, f"patches/filter_{i.filter:04d}.png",
                                   f"filter {i.filter} top patches", min_px=72) + "</td>")
        cells.append(f"<td>{_classes_html(ci.top) if ci else '&ndash;'}</td>")
        cells.append(f"<td>{_classes_html(ci.bottom) if ci else '&ndash;'}</td>")
        rows.append(f'<tr id="filter-{i.filter}"{tr}>' + "".join(cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _sample_css(rep: InterpretationReport) -> str:
    out = []
    for c in range(len(rep.classes)):
        data = rep.figures.get(f"samples/class_{c:04d}.png")
        if data is not None:
            out.append(f".c{c}{{background-image:url({_uri(data)})}}")
    return "\n".join(out)


def render(rep: InterpretationReport, json_name: str = "report.json") -> str:
    """The page as a string."""
    sec: dict[str, str] = {"summary": _summary(rep)}
    removed_note = " Red: removed by the compression; blue: kept." if rep.compression else ""
    sec["car"] = _fig(rep, "car.png", "CAR per filter",
                      "Accuracy lost (percentage points) when each filter alone is removed, most "
                      "important first." + removed_note)
    if "first-layer" in rep.sections:
        sec["first-layer"] = _fig(rep, "filters.png", "first-layer filters",
                                  "Filters drawn from their weights (grey = 0, each scaled to its "
                                  "largest weight), ordered by CAR, with filter number and CAR in "
                                  "points."
                                  + (" Removed filters are framed red with their greedy step."
                                     if rep.compression else ""))
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
    sec["patches"] = _fig(rep, "patches.png", "top patches per filter",
                          f"For each filter, the {len(rep.filters[0].patches)} images whose "
                          "activation maximum is highest, cut at the receptive field of the peak "
                          f"({rf.size[0]}&times;{rf.size[1]} px, clipped at image borders, grey "
                          "outside); most important filter first." + removed_note)
    if "class-panels" in rep.figures or rep.highlight:
        sec["class-panels"] = _fig(rep, "class_panels.png", "class panels",
                                   "The most important filters by CAR: (A) top patches, (B) the "
                                   "classes whose accuracy drops most without the filter (highest "
                                   "CAR<sub>c</sub>, points) and (C) the least, each with a sample "
                                   "image.")
    else:
        sec["class-panels"] = '<p class="note">No scored filters.</p>'
    if rep.class_accuracy is not None:
        a = rep.class_accuracy
        sec["class-accuracy"] = _fig(rep, "class_accuracy.png", "per-class accuracy",
                                     f"One point per class; dashed: {100 * a.within:g} points below "
                                     f"the original. {100 * a.share_within:.1f}% of classes are "
                                     "within that band.")
    sec["filters"] = _filters_table(rep)
    gallery = []
    for c, name in enumerate(rep.classes):
        key = f"samples/class_{c:04d}.png"
        if key in rep.figures:
            gallery.append(f"<figure>{_img(rep, key, name, min_px=64)}<figcaption>{c}: "
                           f"{html.escape(name)}</figcaption></figure>")
    sec["class-samples"] = f'<div class="gallery">{"".join(gallery)}</div>' if gallery else \
        '<p class="note">No sample images.</p>'
    files = [json_name] + sorted(k for k in rep.figures if "/" not in k)
    sec["files"] = ("<p>Beside this page: " + ", ".join(
        f'<a href="{html.escape(f)}">{html.escape(f)}</a>' for f in files)
        + "; per-filter patch mosaics in <code>patches/</code>, class samples in "
        "<code>samples/</code>.</p>")
    nav = "".join(f'<a href="#{s}">{TITLES[s]}</a>' for s in rep.sections)
    body = "\n".join(f'<section id="{s}"><h2>{TITLES[s]}</h2>\n{sec[s]}\n</section>' for s in rep.sections)
    title = f"CAR interpretation: {rep.model} {rep.layer}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}\n{_sample_css(rep)}</style></head>\n"
            f"<body><header><h1>{html.escape(title)}</h1><nav>{nav}</nav></header>\n{body}\n"
            "</body></html>\n")
