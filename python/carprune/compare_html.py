"""The `Comparison` page: one self-contained HTML file (figures as data URIs, inline styles and
SVG, no scripts, fonts or links), with both layers' filters side by side.

Sections: summary; class coverage (per class, how much the most needed filter of each layer is
needed, and each network's per-class value); the matches (a row per matched pair: each filter's
image when the layer is a first layer, its importance, its class profile as a small bar chart,
and their similarity); the two profile heatmaps with matched filters on the same row; the
similarity matrix; the files.
"""

from __future__ import annotations

import base64
import html
import re
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .interpret.figures import KEPT, REMOVED, _save, fit, grid_figure, png, weight_pixels
from .interpret.html import CSS

if TYPE_CHECKING:
    from .compare import Comparison

PAGE_CSS = """
.pair{display:flex;gap:18px;flex-wrap:wrap}.pair figure{flex:1 1 600px}
svg.prof{vertical-align:middle}td.sim{font-weight:600}
.a{color:#1f77b4}.b{color:#d62728}
"""


def _unit(cmp: Comparison) -> tuple[float, str]:
    """(factor, unit) for importance values: accuracy points for top-k, the metric otherwise."""
    if re.fullmatch(r"top\d+", cmp.metric):
        return 100.0, "points"
    return 1.0, cmp.metric


def _order(cmp: Comparison) -> tuple[list[int], list[int]]:
    """Row order of both layers: matched pairs by similarity (highest first), then the unmatched
    filters of each layer by importance; positions into filters_a / filters_b."""
    ia = {int(f): i for i, f in enumerate(cmp.filters_a)}
    ib = {int(f): i for i, f in enumerate(cmp.filters_b)}
    ms = sorted(cmp.matches, key=lambda m: (-m.similarity, m.filter_a))
    ra = [ia[m.filter_a] for m in ms]
    rb = [ib[m.filter_b] for m in ms]
    ra += [i for i in np.argsort(-cmp.importance_a, kind="stable").tolist() if i not in set(ra)]
    rb += [i for i in np.argsort(-cmp.importance_b, kind="stable").tolist() if i not in set(rb)]
    return ra, rb


def coverage_figure(cmp: Comparison) -> bytes:
    """Per class: the largest importance of any filter of each layer, and each network's value."""
    k = len(cmp.classes)
    f, unit = _unit(cmp)
    fig = Figure(figsize=(min(13.0, 3.5 + 0.7 * k), 5.4))
    ax, bx = fig.subplots(2, 1, sharex=True)
    x = np.arange(k)
    ax.bar(x - 0.2, f * np.asarray(cmp.coverage_a), 0.4, color=KEPT,
           label=f"A {cmp.model_a}: {cmp.layer_a}")
    ax.bar(x + 0.2, f * np.asarray(cmp.coverage_b), 0.4, color=REMOVED,
           label=f"B {cmp.model_b}: {cmp.layer_b}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel(f"largest importance ({unit})")
    ax.set_title("class coverage: how much the most needed filter of each layer is needed", fontsize=10)
    ax.legend(fontsize=8)
    bx.plot(x, f * np.asarray(cmp.base_value_c_a), "o-", color=KEPT, label="A")
    bx.plot(x, f * np.asarray(cmp.base_value_c_b), "s--", color=REMOVED, label="B")
    bx.set_ylabel(f"{cmp.metric} per class" + (" (%)" if unit == "points" else ""))
    bx.legend(fontsize=8)
    bx.set_xticks(x)
    bx.set_xticklabels(cmp.classes, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center",
                       fontsize=8)
    return _save(fig)


def profiles_figure(cmp: Comparison) -> bytes:
    """Both layers' class profiles as heatmaps, matched filters on the same row."""
    ra, rb = _order(cmp)
    f, unit = _unit(cmp)
    pa, pb = f * np.asarray(cmp.profile_a)[ra], f * np.asarray(cmp.profile_b)[rb]
    vmax = float(max(np.abs(pa).max(initial=0), np.abs(pb).max(initial=0), 1e-12))
    rows = max(len(ra), len(rb))
    # the shorter side is padded with blank rows, so that row r of A and row r of B line up
    pad = np.full((rows, len(cmp.classes)), np.nan)
    pa, pb = np.vstack([pa, pad[len(ra):]]), np.vstack([pb, pad[len(rb):]])
    fig = Figure(figsize=(min(13.0, 4 + 0.9 * len(cmp.classes)), min(24.0, 2.2 + 0.16 * rows)))
    axes = fig.subplots(1, 2)
    for ax, p, filt, order, tag, layer in ((axes[0], pa, cmp.filters_a, ra, "A", cmp.layer_a),
                                           (axes[1], pb, cmp.filters_b, rb, "B", cmp.layer_b)):
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
        im = ax.imshow(np.ma.masked_invalid(p), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        ax.set_xticks(np.arange(len(cmp.classes)))
        ax.set_xticklabels(cmp.classes, rotation=90, fontsize=7)
        if len(order) <= 80:
            ax.set_yticks(np.arange(len(order)))
            ax.set_yticklabels([str(int(filt[i])) for i in order], fontsize=6)
        ax.set_title(f"{tag}: {layer}", fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.6, label=f"importance per class ({unit})")
    fig.suptitle("class profiles; row r of A is matched with row r of B (most similar first)",
                 fontsize=10)
    return _save(fig)


def similarity_figure(cmp: Comparison) -> bytes:
    """The cosine similarity of every pair of profiles, rows and columns in matched order."""
    ra, rb = _order(cmp)
    s = np.asarray(cmp.similarity_matrix)[np.ix_(ra, rb)]
    fig = Figure(figsize=(min(12.0, 3 + 0.09 * len(rb)), min(12.0, 2.5 + 0.09 * len(ra))))
    ax = fig.add_subplot()
    im = ax.imshow(s, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel(f"B filters ({cmp.layer_b}), matched order")
    ax.set_ylabel(f"A filters ({cmp.layer_a}), matched order")
    ax.set_title("profile similarity (cosine); the diagonal holds the matches", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.7)
    return _save(fig)


def filters_figure(w: np.ndarray, filt: np.ndarray, order: list[int], title: str) -> bytes:
    pix = weight_pixels(np.asarray(w, dtype=np.float64))
    return grid_figure([pix[i] for i in order], [f"#{int(filt[i])}" for i in order],
                       min(len(order), 16), title, size=48)


def figures(cmp: Comparison) -> dict[str, bytes]:
    """The page's PNG figures by file name."""
    ra, rb = _order(cmp)
    out = {"coverage.png": coverage_figure(cmp), "profiles.png": profiles_figure(cmp),
           "similarity.png": similarity_figure(cmp)}
    if cmp.weights_a is not None:
        out["filters_a.png"] = filters_figure(cmp.weights_a, cmp.filters_a, ra,
                                              f"A: {cmp.layer_a} filters, matched order")
    if cmp.weights_b is not None:
        out["filters_b.png"] = filters_figure(cmp.weights_b, cmp.filters_b, rb,
                                              f"B: {cmp.layer_b} filters, matched order")
    return out


# -- page ---------------------------------------------------------------------------------------
def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(figs: dict[str, bytes], name: str, alt: str) -> str:
    return f'<img src="{_uri(figs[name])}" alt="{html.escape(alt)}" data-figure="{name}">'


def profile_svg(row: np.ndarray, classes: list[str], scale: float, factor: float, unit: str) -> str:
    """A class profile as an inline SVG bar chart: one bar per class, up red (the class loses
    without the filter), down blue; every chart on the page shares `scale`."""
    bw, h = 9, 44
    mid = h / 2
    parts = [f'<svg class="prof" width="{bw * len(row) + 2}" height="{h}" role="img" '
             f'xmlns="http://www.w3.org/2000/svg"><line x1="0" y1="{mid}" x2="{bw * len(row) + 2}" '
             f'y2="{mid}" stroke="#999" stroke-width="0.5"/>']
    for c, v in enumerate(np.asarray(row, dtype=float)):
        hh = 0.0 if scale <= 0 else (mid - 1) * min(1.0, abs(v) / scale)
        y = mid - hh if v > 0 else mid
        colour = "#b01c1c" if v > 0 else "#1c5fb0"
        parts.append(f'<rect x="{1 + bw * c}" y="{y:.1f}" width="{bw - 2}" height="{hh:.1f}" '
                     f'fill="{colour}"><title>{html.escape(classes[c])}: {factor * v:+.2f} '
                     f'{html.escape(unit)}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def _thumb(w: np.ndarray | None, i: int) -> str:
    if w is None:
        return ""
    return (f'<img class="px" width="32" height="32" alt="filter weights" '
            f'src="{_uri(png(fit(weight_pixels(np.asarray(w[i:i + 1], dtype=np.float64))[0], 32)))}"> ')


def _matches_table(cmp: Comparison) -> str:
    ra, rb = _order(cmp)
    f, unit = _unit(cmp)
    scale = float(max(np.abs(cmp.profile_a).max(initial=0), np.abs(cmp.profile_b).max(initial=0)))
    ia = {int(x): i for i, x in enumerate(cmp.filters_a)}
    ib = {int(x): i for i, x in enumerate(cmp.filters_b)}
    rows = []
    ms = sorted(cmp.matches, key=lambda m: (-m.similarity, m.filter_a))

    def cell(side: str, i: int | None) -> str:
        if i is None:
            return '<td colspan="3">(unmatched)</td>'
        filt, imp, prof, w = ((cmp.filters_a, cmp.importance_a, cmp.profile_a, cmp.weights_a)
                              if side == "a" else
                              (cmp.filters_b, cmp.importance_b, cmp.profile_b, cmp.weights_b))
        return (f'<td>{_thumb(w, i)}<span class="{side}">#{int(filt[i])}</span></td>'
                f'<td class="num">{f * float(imp[i]):+.2f}</td>'
                f"<td>{profile_svg(prof[i], cmp.classes, scale, f, unit)}</td>")

    for m in ms:
        rows.append(f"<tr>{cell('a', ia[m.filter_a])}<td class='num sim'>{m.similarity:+.2f}</td>"
                    f"{cell('b', ib[m.filter_b])}</tr>")
    matched_a = {ia[m.filter_a] for m in ms}
    matched_b = {ib[m.filter_b] for m in ms}
    for i in ra:
        if i not in matched_a:
            rows.append(f"<tr>{cell('a', i)}<td></td>{cell('b', None)}</tr>")
    for j in rb:
        if j not in matched_b:
            rows.append(f"<tr>{cell('a', None)}<td></td>{cell('b', j)}</tr>")
    head = (f"<tr><th>A filter</th><th>importance ({unit})</th><th>A profile</th>"
            f"<th>similarity</th><th>B filter</th><th>importance ({unit})</th><th>B profile</th></tr>")
    return f'<table id="matches-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _coverage_table(cmp: Comparison) -> str:
    f, unit = _unit(cmp)
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td class='num'>{f * float(cmp.base_value_c_a[k]):.1f}</td>"
        f"<td class='num'>{f * float(cmp.base_value_c_b[k]):.1f}</td>"
        f"<td class='num'>{f * float(cmp.coverage_a[k]):+.2f} (#{int(cmp.coverage_filter_a[k])})</td>"
        f"<td class='num'>{f * float(cmp.coverage_b[k]):+.2f} (#{int(cmp.coverage_filter_b[k])})</td>"
        "</tr>" for k, c in enumerate(cmp.classes))
    return ("<table><thead><tr><th>class</th><th>A " + html.escape(cmp.metric) + "</th><th>B "
            + html.escape(cmp.metric) + f"</th><th>A coverage ({unit}, filter)</th>"
            f"<th>B coverage ({unit}, filter)</th></tr></thead><tbody>{rows}</tbody></table>")


def render(cmp: Comparison, figs: dict[str, bytes], npz_name: str) -> str:
    """The page as a string."""
    f, unit = _unit(cmp)
    e = html.escape
    sections = []
    summary = (
        f"<dl><dt>A</dt><dd><span class='a'>{e(cmp.model_a)}</span>, layer {e(cmp.layer_a)}: "
        f"{len(cmp.filters_a)} filters, {e(cmp.metric)} {f * cmp.base_value_a:.2f}"
        f"{' %' if unit == 'points' else ''}</dd>"
        f"<dt>B</dt><dd><span class='b'>{e(cmp.model_b)}</span>, layer {e(cmp.layer_b)}: "
        f"{len(cmp.filters_b)} filters, {e(cmp.metric)} {f * cmp.base_value_b:.2f}"
        f"{' %' if unit == 'points' else ''}</dd>"
        f"<dt>images</dt><dd>{cmp.num_images}, the same for both</dd>"
        f"<dt>layer similarity</dt><dd>{cmp.similarity:+.3f} (matched profile similarity weighted "
        "by the filters' profile norms; unmatched filters count 0)</dd>"
        f"<dt>matches</dt><dd>{len(cmp.matches)} one-to-one (Hungarian, maximum total cosine "
        "similarity of the class profiles)</dd></dl>"
        + "".join(f'<p class="note">{e(n)}</p>' for n in cmp.notes))
    sections.append(("summary", "Summary", summary))
    sections.append(("coverage", "Class coverage",
                     "<p>Per class, the largest importance any single filter of the layer has for "
                     "it (and which filter), and each network's value per class.</p>"
                     f"<figure>{_img(figs, 'coverage.png', 'class coverage')}</figure>"
                     + _coverage_table(cmp)))
    if "filters_a.png" in figs or "filters_b.png" in figs:
        imgs = "".join(f"<figure>{_img(figs, n, n)}</figure>" for n in ("filters_a.png", "filters_b.png")
                       if n in figs)
        sections.append(("filters", "First-layer filters", f'<div class="pair">{imgs}</div>'))
    sections.append(("matches", "Matched filters, side by side",
                     "<p>Each row: a filter of A, its match in B and their profile similarity; a "
                     "profile has one bar per class (up, red: the class loses without the filter; "
                     "down, blue: it gains; hover for the value). All profiles share one scale.</p>"
                     + _matches_table(cmp)))
    sections.append(("profiles", "Class profiles",
                     f"<figure>{_img(figs, 'profiles.png', 'class profiles')}</figure>"))
    sections.append(("similarity", "Similarity matrix",
                     f"<figure>{_img(figs, 'similarity.png', 'similarity matrix')}</figure>"))
    files = "".join(f"<li><a href='{e(n)}'>{e(n)}</a></li>" for n in [npz_name, *sorted(figs)])
    sections.append(("files", "Files", f"<ul>{files}</ul><p>Load the numbers with "
                     f"<code>carprune.Comparison.load('{e(npz_name)}')</code>.</p>"))
    nav = " ".join(f'<a href="#{sid}">{e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{e(title)}</h2>{content}</section>'
                   for sid, title, content in sections)
    title = f"{cmp.layer_a} vs {cmp.layer_b}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}{PAGE_CSS}</style></head><body><h1>Comparison: {e(cmp.model_a)} "
            f"{e(cmp.layer_a)} vs {e(cmp.model_b)} {e(cmp.layer_b)}</h1><nav>{nav}</nav>{body}"
            "</body></html>")
