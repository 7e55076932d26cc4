"""What `carprune report` writes at the top of its output: `index.html`, a landing page with one
table of the layers (key figures of each score or compress output, each layer linking to its
interpretation page when there is one) and one of the Deep Compression outputs; the same tables
as Markdown (`report.md`, printed by the command too).

Rows come from `read_output`, one per output directory. Accuracies are on the images the run
measured them on: a compress run's hold-out images when it had them, else its scoring images;
each row says which (`accuracy_on`, `accuracy_images`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import read_json


def read_output(d: Path) -> dict[str, Any]:
    """One output directory (compress of one layer or of the whole network, kse-compress, score
    or deep-compress) as a row of key figures."""
    d = Path(d)
    if (d / "result.json").is_file():
        from ..global_mode import GlobalCompressionResult
        from ..greedy import CompressionResult
        from ..kse import KSEResult

        fmt = read_json(d / "result.json", "result").get("format")
        if fmt == GlobalCompressionResult.FORMAT:
            return _network_row(d, GlobalCompressionResult.load(d))
        if fmt == KSEResult.FORMAT:
            return _network_row(d, KSEResult.load(d))
        r = CompressionResult.load(d)
        first, last = r.trajectory[0], r.final_step
        cfg = r.config or {}
        hold = first.accuracy_on == "hold-out"
        return {"kind": "compress", "dir": str(d), "layer": r.layer, "criterion": r.criterion,
                "filters": r.num_filters, "kept": len(r.kept), "ratio": r.compression_ratio,
                "accuracy_before": first.accuracy, "accuracy_after": last.accuracy,
                "accuracy_on": first.accuracy_on,
                "accuracy_images": cfg.get("eval_images" if hold else "score_images"),
                "score_images": cfg.get("score_images"),
                "finetuned_accuracy": r.finetuned_holdout_accuracy,
                "flops_before": first.flops, "flops_after": last.flops,
                "params_before": first.params, "params_after": last.params,
                "layer_bytes_before": first.layer_bytes, "layer_bytes_after": last.layer_bytes,
                "steps": len(r.trajectory) - 1}
    if (d / "scores.json").is_file():
        doc = read_json(d / "scores.json", "scores")
        if doc.get("format") == "carprune.scores-index":
            raise ValueError(f"{d} holds several layers' scores; pass its layer directories")
        car = [float(c) for c in doc["car"]]
        return {"kind": "score", "dir": str(d), "layer": doc["layer"], "filters": len(car),
                "num_images": doc["num_images"], "base_accuracy": doc["base_accuracy"],
                "accuracy_on": "scoring", "accuracy_images": doc["num_images"],
                "max_car": max(car) if car else None,
                "mean_car": sum(car) / len(car) if car else None,
                "zero_car_filters": sum(1 for c in car if c <= 0),
                "least_important": doc["least_important_first"][:5]}
    if (d / "report.json").is_file():
        r = read_json(d / "report.json", "deep-compress report")
        acc = {k: v for k, v in r["accuracy"].items() if v is not None}
        stages = list(acc)
        return {"kind": "deep-compress", "dir": str(d), "arch": r["arch"],
                "layers": [lay["name"] for lay in r["layers"]],
                "bytes_before": r["model_bytes_before"], "file_bytes": r["file_bytes"],
                "ratio": r["model_bytes_before"] / r["file_bytes"], "accuracy": r["accuracy"],
                "accuracy_before": acc[stages[0]] if stages else None,
                "accuracy_after": acc[stages[-1]] if stages else None,
                "final_stage": stages[-1] if stages else None,
                "eval_images": r.get("eval_images"),
                "warnings": [w["message"] for w in r.get("warnings", [])]}
    raise FileNotFoundError(f"{d}: no result.json, scores.json or report.json (an unfinished or "
                            "failed run?)")


def _network_row(d: Path, r: Any) -> dict[str, Any]:
    """A whole-network run (`compress --layer all`, `kse-compress`) as a row."""
    if hasattr(r, "trajectory"):    # GlobalCompressionResult
        last = r.trajectory[-1] if r.trajectory else None
        hold = r.base_holdout_accuracy is not None
        before = r.base_holdout_accuracy if hold else r.base_score_accuracy
        cfg = r.config or {}
        return {"kind": "network", "dir": str(d), "method": f"global {r.criterion}",
                "flops_before": r.base_flops, "flops_after": r.flops,
                "params_before": r.base_params,
                "params_after": last.params if last else r.base_params,
                "accuracy_before": before, "accuracy_after": last.accuracy if last else before,
                "finetuned_accuracy": None, "accuracy_on": "hold-out" if hold else "scoring",
                "accuracy_images": cfg.get("eval_images" if hold else "score_images"),
                "steps": len(r.trajectory),
                "channels_removed": sum(len(v) for v in r.removed.values()),
                "stopped": r.stopped}
    return {"kind": "network", "dir": str(d), "method": f"KSE G={r.G}",
            "flops_before": r.flops_before, "flops_after": r.flops_after,
            "params_before": r.params_before, "params_after": r.params_after,
            "accuracy_before": r.holdout_accuracy_before, "accuracy_after": r.holdout_accuracy,
            "finetuned_accuracy": r.finetuned_holdout_accuracy, "accuracy_on": "hold-out",
            "accuracy_images": (r.config or {}).get("eval_images"), "steps": len(r.layers),
            "channels_removed": None, "stopped": ""}


def _network_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The whole-network rows' table: header and cells (plain text)."""
    head = ["directory", "method", "FLOPs before", "after", "params before", "after",
            "accuracy before", "after", "fine-tuned", "accuracy on (images)", "stopped"]
    cells = [[r["dir"], r["method"], f"{r['flops_before']:,}",
              f"{r['flops_after']:,} ({r['flops_after'] / max(1, r['flops_before']):.3f})",
              f"{r['params_before']:,}", f"{r['params_after']:,}", _pct(r["accuracy_before"]),
              _pct(r["accuracy_after"]), _pct(r["finetuned_accuracy"]), _images(r),
              r["stopped"] or "-"] for r in rows]
    return head, cells


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _images(r: dict[str, Any]) -> str:
    n = r.get("accuracy_images")
    what = {"hold-out": "hold-out", "scoring": "scoring"}[r["accuracy_on"]]
    return f"{n:,} {what}" if n is not None else what


def _flops_saved(r: dict[str, Any]) -> float:
    return 1 - r["flops_after"] / r["flops_before"] if r["flops_before"] else 0.0


def markdown(title: str, rows: Sequence[dict[str, Any]]) -> str:
    """The tables as Markdown: compressed layers, scored layers, Deep Compression outputs."""
    lines = [f"# {title}", ""]
    comp = [r for r in rows if r["kind"] == "compress"]
    if comp:
        lines += ["## Compressed layers", "",
                  "| layer | criterion | filters | kept | ratio | accuracy before | after | fine-tuned "
                  "| accuracy on (images) | FLOPs before | after | layer bytes before | after |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in comp:
            lines.append(f"| {r['layer']} | {r['criterion']} | {r['filters']} | {r['kept']} | "
                         f"{r['ratio']:.2f}x | {_pct(r['accuracy_before'])} | "
                         f"{_pct(r['accuracy_after'])} | {_pct(r['finetuned_accuracy'])} | "
                         f"{_images(r)} | {r['flops_before']:,} | {r['flops_after']:,} | "
                         f"{r['layer_bytes_before']:,} | {r['layer_bytes_after']:,} |")
        lines.append("")
    sc = [r for r in rows if r["kind"] == "score"]
    if sc:
        lines += ["## Scored layers", "", "| layer | filters | images | base accuracy | max CAR | "
                  "mean CAR | filters with CAR <= 0 | least important |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in sc:
            lines.append(f"| {r['layer']} | {r['filters']} | {r['num_images']} | "
                         f"{_pct(r['base_accuracy'])} | {100 * r['max_car']:+.2f} pts | "
                         f"{100 * r['mean_car']:+.2f} pts | {r['zero_car_filters']} | "
                         f"{', '.join(map(str, r['least_important']))} |")
        lines.append("")
    net = [r for r in rows if r["kind"] == "network"]
    if net:
        head, cells = _network_table(net)
        lines += ["## Whole-network compression", "", "| " + " | ".join(head) + " |",
                  "|---|---|" + "---:|" * 8 + "---|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        lines.append("")
    dc = [r for r in rows if r["kind"] == "deep-compress"]
    if dc:
        lines += ["## Deep Compression", "",
                  "| directory | arch | bytes before | .cpz bytes | ratio | accuracy before | after |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in dc:
            lines.append(f"| {r['dir']} | {r['arch']} | {r['bytes_before']:,} | {r['file_bytes']:,} | "
                         f"{r['ratio']:.1f}x | {_pct(r['accuracy_before'])} | "
                         f"{_pct(r['accuracy_after'])} |")
        for r in dc:
            lines += [f"- warning ({r['dir']}): {w}" for w in r["warnings"]]
        lines.append("")
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1400px;padding:0 16px 40px;color:#222;line-height:1.4;font-size:16px}
h1{font-size:1.5em;margin:18px 0 4px}h2{font-size:1.2em;border-bottom:1px solid #ddd;
padding-bottom:3px;margin-top:28px}p{font-size:15px}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}.num{text-align:right;
font-variant-numeric:tabular-nums;white-space:nowrap}.muted{color:#555}.warn{color:#8a5a00}
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _layer_rows(rows: Sequence[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        name = _esc(r["layer"])
        cell = f'<a href="{_esc(r["page"])}">{name}</a>' if r.get("page") else name
        if r["kind"] == "compress":
            ft = r["finetuned_accuracy"]
            figures = [
                f"{r['kept']} of {r['filters']} ({r['ratio']:.2f}&times;)",
                _pct(r["accuracy_before"]).replace(" ", "&nbsp;"),
                _pct(r["accuracy_after"]).replace(" ", "&nbsp;")
                + (f"<br><span class='muted'>fine-tuned {_pct(ft)}</span>" if ft is not None else ""),
                _esc(_images(r)), f"{100 * _flops_saved(r):.1f} %",
                f"{r['layer_bytes_before']:,} &rarr; {r['layer_bytes_after']:,}", "&ndash;"]
            what = f"compress ({_esc(r['criterion'])})"
        else:
            figures = [f"{r['filters']} (scored)", _pct(r["base_accuracy"]).replace(" ", "&nbsp;"),
                       "&ndash;", _esc(_images(r)), "&ndash;", "&ndash;",
                       f"{100 * r['max_car']:+.2f} pts" if r["max_car"] is not None else "&ndash;"]
            what = "score"
        nums = "".join(f'<td class="num">{v}</td>' for v in figures)
        out.append(f"<tr><td>{cell}</td><td>{what}</td>{nums}"
                   f'<td class="muted">{_esc(r["dir"])}</td></tr>')
    return "".join(out)


def landing_page(title: str, rows: Sequence[dict[str, Any]]) -> str:
    """The landing page (self-contained HTML): the layers' key figures, each layer linking to its
    interpretation page (a row's 'page', relative to the page), then the Deep Compression
    outputs; report.md and report.json are linked as downloads."""
    layers = [r for r in rows if r["kind"] in ("compress", "score")]
    dc = [r for r in rows if r["kind"] == "deep-compress"]
    pages = sum(1 for r in layers if r.get("page"))
    parts = [f"<h1>{_esc(title)}</h1>",
             f"<p>{len(layers)} layer result{'s' if len(layers) != 1 else ''}"
             + (f" ({pages} with an interpretation page: click the layer)" if pages else
                " (no interpretation pages: run <code>carprune report</code> with --model and "
                "--data for them)")
             + (f" and {len(dc)} Deep Compression output{'s' if len(dc) != 1 else ''}" if dc else "")
             + ". Accuracies are measured on the images named in the <i>images</i> column: a "
               "compress run's hold-out images (never used for scoring) when it had them, else "
               "the images it scored on. The same tables: <a href='report.md'>report.md</a> "
               "(Markdown), <a href='report.json'>report.json</a>.</p>"]
    if layers:
        head = ["layer", "run", "filters kept", "accuracy before", "after", "images",
                "FLOPs saved (whole network)", "layer bytes", "max CAR", "directory"]
        parts += ["<h2>Layers</h2>", "<table><thead><tr>"
                  + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
                  + _layer_rows(layers) + "</tbody></table>"]
    net = [r for r in rows if r["kind"] == "network"]
    if net:
        head, cells = _network_table(net)
        parts += ["<h2>Whole-network compression</h2>", "<table><thead><tr>"
                  + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
                  + "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
                            for row in cells) + "</tbody></table>"]
    if dc:
        head = ["directory", "arch", "compressed layers", "dense bytes", ".cpz bytes", "ratio",
                "accuracy before", "after", "warnings"]
        body = []
        for r in dc:
            warn = "<br>".join(f"<span class='warn'>{_esc(w)}</span>" for w in r["warnings"])
            after = _pct(r["accuracy_after"]) + (f" ({_esc(r['final_stage'])})"
                                                 if r["final_stage"] else "")
            cells = [_esc(r["dir"]), _esc(r["arch"]), str(len(r["layers"])),
                     f"{r['bytes_before']:,}", f"{r['file_bytes']:,}", f"{r['ratio']:.1f}&times;",
                     _pct(r["accuracy_before"]), after, warn or "none"]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts += ["<h2>Deep Compression</h2>", "<table><thead><tr>"
                  + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
                  + "".join(body) + "</tbody></table>"]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
