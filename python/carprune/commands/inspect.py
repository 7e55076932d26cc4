"""``carprune inspect PATH``: what a ``.cpz`` file or an output directory holds.

For a ``.cpz`` file: its architecture name, every compressed layer (shape, code widths,
nonzeros, bytes per section) and the other tensors, after reading the whole file the way
`load_compressed` does (every section checksum verified, every stream decoded). A
``report.json`` of the same run beside it adds the accuracy recorded at each stage.

For an output directory (score, compress, finetune, deep-compress, report): the state of the
run (``run.json``: command, exit code, settings), every file with its size and an integrity
check (JSON parses, zip CRCs of .npz/.pt files, section CRCs of .cpz files), the accuracy the
run recorded and on which images, and the filters each pruned layer keeps (for a
deep-compress run of a CAR-pruned model, those of the compress output it started from: what
`load_compressed` needs to rebuild the architecture).

A corrupt or truncated file ends the command with exit code 2 and one line naming the file
(and, in a ``.cpz``, the section).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "inspect"
HELP = ("show what a .cpz file or an output directory holds: layers, sizes, checksums verified, "
        "the accuracy recorded, the filters kept")
POSITIONAL = "path"


def options() -> list:
    from ..config import Option

    return [
        Option("path", "path", None, "a .cpz file, or an output directory of score, compress, "
               "finetune, deep-compress or report [required]", metavar="PATH"),
        Option("json", "bool", False, "print one JSON document (machine-readable) instead of "
               "tables"),
    ]


@dataclass(frozen=True, kw_only=True)
class Settings:
    path: str | None
    json: bool

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("inspect needs the PATH of a .cpz file or an output directory, e.g. "
                             "carprune inspect out/dc/model.cpz")


def run(settings: Mapping[str, Any], ctx: Any, run: Any, mode: str) -> int:
    from ..config import settings_object

    s = settings_object(Settings, settings)
    doc = inspect_path(Path(s.path))
    print(json.dumps(doc, indent=1) if s.json else render(doc), flush=True)
    return 0


# -- reading -------------------------------------------------------------------------------------
def inspect_path(path: Path) -> dict[str, Any]:
    """The description of a .cpz file or an output directory (see the module docstring).
    Raises FileNotFoundError for a missing path and ValueError naming the file (and section)
    for a corrupt one."""
    if path.is_dir():
        return inspect_dir(path)
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(4)
        from ..deepcompress.fileformat import MAGIC

        if head == MAGIC or path.suffix == ".cpz":
            return inspect_cpz(path)
        raise ValueError(f"{path}: expected a .cpz file or an output directory, got a "
                         f"{path.suffix or 'suffix-less'} file")
    raise FileNotFoundError(f"{path}: no such file or directory")


def inspect_cpz(path: Path) -> dict[str, Any]:
    """Layers, sizes per section and verified checksums of a .cpz file."""
    from ..deepcompress.fileformat import (
        FORMAT_VERSION,
        LAYER_SECTIONS,
        PREAMBLE,
        CorruptFileError,
        read_sections,
    )

    data = path.read_bytes()
    try:
        cm, sections = read_sections(data)
    except CorruptFileError as exc:
        raise ValueError(f"{path}: {exc}") from None
    size = {s.name: s.payload_bytes for s in sections}
    layers = []
    for e in cm.layers:
        per = {s: size[f"{e.name}/{s}"] for s in LAYER_SECTIONS}
        layers.append({"name": e.name, "kind": e.kind, "shape": list(e.shape), "dtype": e.dtype,
                       "bits": e.bits, "index_bits": e.index_bits, "params": e.numel,
                       "nonzeros": e.nonzeros, "entries": e.entries,
                       "density": e.nonzeros / e.numel if e.numel else 0.0,
                       "section_bytes": per, "bytes": sum(per.values())})
    rest_bytes = size["rest"]
    framing = len(PREAMBLE) + sum(s.frame_bytes - s.payload_bytes for s in sections)
    doc: dict[str, Any] = {
        "kind": "cpz", "path": str(path), "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "format_version": FORMAT_VERSION,
        "arch": cm.arch, "sections": len(sections), "checksums_verified": True,
        "layers": layers, "rest": {"tensors": len(cm.rest), "bytes": rest_bytes},
        "header_bytes": size["header"], "framing_bytes": framing,
    }
    doc.update(_recorded_beside(path, len(data)))
    return doc


def _recorded_beside(cpz: Path, nbytes: int) -> dict[str, Any]:
    """What the deep-compress run that wrote `cpz` recorded beside it (report.json, run.json)."""
    out: dict[str, Any] = {}
    rep = cpz.parent / "report.json"
    if rep.is_file():
        r = _json(rep)
        if isinstance(r, dict) and r.get("file_bytes") == nbytes:
            out["recorded"] = {"accuracy": r.get("accuracy"), "eval_images": r.get("eval_images"),
                               "warnings": [w.get("message") for w in r.get("warnings", [])],
                               "model_bytes_before": r.get("model_bytes_before"),
                               "config": r.get("config")}
    runj = cpz.parent / "run.json"
    if runj.is_file():
        r = _json(runj)
        src = (r.get("settings") or {}).get("result") if isinstance(r, dict) else None
        if src:
            kept = _structure(Path(src) / "model" / "structure.json")
            out["pruned_from"] = {"result": src, "kept": kept}
    return out


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None


def _structure(path: Path) -> dict[str, Any] | None:
    """{layer: {'kept': [...], 'filters': N}} of a saved pruned model, or None without one."""
    if not path.is_file():
        return None
    doc = _json(path)
    return dict(doc.get("layers", {})) if isinstance(doc, dict) else None


def _check_file(p: Path) -> str:
    """An integrity check of one result file; ValueError naming the file when it fails."""
    suffix = p.suffix.lower()
    if suffix == ".json":
        _json(p)
        return "JSON parses"
    if suffix in (".npz", ".pt", ".pth"):
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{p}: not a readable zip archive ({exc})") from None
        if bad is not None:
            raise ValueError(f"{p}: member {bad!r} fails its CRC check (file altered)")
        return "zip CRCs ok"
    if suffix == ".cpz":
        doc = inspect_cpz(p)
        return f"{doc['sections']} section CRCs ok"
    return "-"


def _accuracies(d: Path, contents: str) -> list[dict[str, Any]]:
    """The accuracies a run recorded, each with the images it was measured on."""
    out: list[dict[str, Any]] = []
    if contents in ("compress", "finetune") and (d / "result.json").is_file():
        from ..greedy import CompressionResult

        r = CompressionResult.from_dict(_json(d / "result.json"), None)
        cfg = r.config or {}
        first, last = r.trajectory[0], r.final_step
        hold = first.accuracy_on == "hold-out"
        out.append({"what": f"{r.layer} before -> after compression",
                    "images": (f"{cfg['eval_images']:,} hold-out images" if hold and
                               cfg.get("eval_images") else "hold-out images" if hold else
                               f"{cfg.get('score_images', '?')} scoring images"),
                    "before": first.accuracy, "after": last.accuracy})
        if r.finetuned_holdout_accuracy is not None:
            out.append({"what": f"{r.layer} after fine-tuning", "images": "hold-out images",
                        "before": last.accuracy, "after": r.finetuned_holdout_accuracy})
    if (d / "finetune.json").is_file():
        r = _json(d / "finetune.json")
        if r.get("accuracy_before") is not None:
            out.append({"what": f"{r.get('layer')} fine-tuning", "images": "hold-out images",
                        "before": r["accuracy_before"], "after": r["accuracy_after"]})
    if contents == "score":
        r = _json(d / "scores.json")
        out.append({"what": f"{r['layer']} base accuracy", "images":
                    f"{r['num_images']:,} scoring images", "before": r["base_accuracy"],
                    "after": None})
    if contents == "deep-compress":
        r = _json(d / "report.json")
        acc = {k: v for k, v in r["accuracy"].items() if v is not None}
        n = r.get("eval_images")
        if acc:
            out.append({"what": "deep compression, by stage",
                        "images": f"{n:,} images" if n else "evaluation images",
                        "before": None, "after": None, "stages": acc})
    return out


def inspect_dir(d: Path) -> dict[str, Any]:
    """State, files (sizes, integrity), recorded accuracy and kept filters of an output
    directory."""
    files = []
    for p in sorted(q for q in d.rglob("*") if q.is_file()):
        rel = p.relative_to(d)
        temp = any(part.startswith(".") for part in rel.parts)
        files.append({"path": str(rel), "bytes": p.stat().st_size,
                      "check": "temporary (an unfinished write)" if temp else _check_file(p)})
    contents = "unknown"
    if (d / "result.json").is_file():
        contents = "finetune" if (d / "finetune.json").is_file() else "compress"
    elif (d / "finetune.json").is_file():
        contents = "finetune"
    elif (d / "scores.json").is_file():
        contents = "score" if _json(d / "scores.json").get("format") != "carprune.scores-index" \
            else "scores of several layers"
    elif (d / "report.json").is_file():
        fmt = _json(d / "report.json").get("format")
        contents = "report" if fmt == "carprune.report" else "deep-compress"
    run = _json(d / "run.json") if (d / "run.json").is_file() else None
    doc: dict[str, Any] = {"kind": "directory", "path": str(d), "contents": contents}
    if isinstance(run, dict):
        doc["run"] = {k: run.get(k) for k in ("command", "state", "exit_code", "message",
                                              "started", "seconds", "carprune_version",
                                              "world_size", "argv")}
        doc["settings"] = {k: v for k, v in (run.get("settings") or {}).items()
                           if v not in (None, False, [], {})}
    else:
        doc["run"] = None
    doc["files"] = files
    doc["accuracy"] = _accuracies(d, contents)
    kept: dict[str, Any] = {}
    if contents in ("compress", "finetune") and (d / "result.json").is_file():
        r = _json(d / "result.json")
        kept[r["layer"]] = {"kept": r["kept"], "filters": r["num_filters"]}
    kept.update(_structure(d / "model" / "structure.json") or {})
    src = (doc.get("settings") or {}).get("result")
    if src and not kept:
        kept.update(_structure(Path(src) / "model" / "structure.json") or {})
        doc["pruned_from"] = src
    doc["kept"] = kept
    if contents == "scores of several layers":
        doc["layers"] = _json(d / "scores.json").get("layers")
    if (d / "model.cpz").is_file():
        cpz = inspect_cpz(d / "model.cpz")
        doc["cpz"] = {k: cpz[k] for k in ("bytes", "sha256", "arch", "sections",
                                          "checksums_verified")}
        doc["cpz"]["layers"] = len(cpz["layers"])
    if contents == "deep-compress":
        r = _json(d / "report.json")
        doc["warnings"] = [w.get("message") for w in r.get("warnings", [])]
    return doc


# -- rendering -----------------------------------------------------------------------------------
def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def _table(head: list[str], rows: list[list[Any]], right: set[int]) -> list[str]:
    cells = [[str(c) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(head)]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w[i]) if i in right else c.ljust(w[i])
                         for i, c in enumerate(r)).rstrip()

    return [line(head), line(["-" * x for x in w])] + [line(r) for r in cells]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _kept_lines(kept: dict[str, Any]) -> list[str]:
    return [f"  {layer}: {len(e['kept'])} of {e['filters']} filters kept: {_ranges(e['kept'])}"
            for layer, e in kept.items()]


def render(doc: dict[str, Any]) -> str:
    """`doc` (from `inspect_path`) as text tables."""
    lines: list[str] = []
    if doc["kind"] == "cpz":
        lines.append(f"{doc['path']}: carprune .cpz version {doc['format_version']}, arch "
                     f"{doc['arch']}, {doc['bytes']:,} bytes; all {doc['sections']} section "
                     "checksums verified, every layer decoded")
        lines.append(f"sha256 {doc['sha256']}")
        rows = [[e["name"], e["kind"], "x".join(map(str, e["shape"])), e["dtype"],
                 f"{e['bits']}/{e['index_bits']}", f"{e['nonzeros']:,}",
                 f"{100 * e['density']:.1f} %", f"{e['section_bytes']['codebook']:,}",
                 f"{e['section_bytes']['weights']:,}", f"{e['section_bytes']['indices']:,}",
                 f"{e['section_bytes']['weights.huffman'] + e['section_bytes']['indices.huffman']:,}",
                 f"{e['bytes']:,}"] for e in doc["layers"]]
        lines += [""] + _table(["layer", "kind", "shape", "dtype", "code bits (w/idx)", "nonzero",
                                "density", "codebook (bytes)", "weights (bytes)",
                                "indices (bytes)", "Huffman tables (bytes)", "total (bytes)"],
                               rows, {4, 5, 6, 7, 8, 9, 10, 11})
        lines.append(f"\nother tensors: {doc['rest']['tensors']} ({doc['rest']['bytes']:,} bytes); "
                     f"header {doc['header_bytes']:,} bytes; framing and checksums "
                     f"{doc['framing_bytes']:,} bytes")
        rec = doc.get("recorded")
        if rec:
            acc = ", ".join(f"{k} {_pct(v)}" for k, v in (rec["accuracy"] or {}).items()
                            if v is not None)
            on = f" on {rec['eval_images']:,} images" if rec.get("eval_images") else ""
            lines.append(f"recorded beside it (report.json): accuracy{on}: {acc or 'not measured'}")
            lines += [f"WARNING: {w}" for w in rec["warnings"]]
        pf = doc.get("pruned_from")
        if pf:
            lines.append(f"CAR-pruned model from {pf['result']}: build that architecture to load "
                         "this file (README, Deep Compression)")
            lines += _kept_lines(pf["kept"] or {})
        return "\n".join(lines)

    run = doc.get("run")
    head = f"{doc['path']}: {doc['contents']} output"
    if run:
        head += (f"; run {run['state']} (exit code {run.get('exit_code')}), "
                 f"{run.get('seconds')} s, started {run.get('started')}, carprune "
                 f"{run.get('carprune_version')}")
    else:
        head += " (no run.json: not written by the carprune command, or an older version)"
    lines.append(head)
    if run:
        if run.get("message"):
            lines.append(f"message: {run['message']}")
        lines.append("command: carprune " + " ".join(run.get("argv") or [run.get("command", "")]))
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in doc["settings"].items()))
    if doc["accuracy"]:
        lines += ["", "accuracy recorded:"]
        for a in doc["accuracy"]:
            if a.get("stages"):
                val = " -> ".join(f"{_pct(v)} {k}" for k, v in a["stages"].items())
            elif a["before"] is not None:
                val = f"{_pct(a['before'])} -> {_pct(a['after'])}"
            else:
                val = _pct(a["after"])
            lines.append(f"  {a['what']}: {val} (on {a['images']})")
    lines += [f"WARNING: {w}" for w in doc.get("warnings", [])]
    if doc["kept"]:
        src = f" (of the compress output {doc['pruned_from']})" if doc.get("pruned_from") else ""
        lines += ["", f"filters kept{src}:"] + _kept_lines(doc["kept"])
    if doc.get("layers"):
        lines += ["", "layers: " + ", ".join(doc["layers"])]
    if doc.get("cpz"):
        c = doc["cpz"]
        lines += ["", f"model.cpz: arch {c['arch']}, {c['layers']} compressed layers, "
                      f"{c['bytes']:,} bytes, all {c['sections']} section checksums verified "
                      f"(carprune inspect {Path(doc['path']) / 'model.cpz'} for the layers)"]
    lines += ["", "files:"] + ["  " + x for x in _table(
        ["file", "bytes", "check"], [[f["path"], f"{f['bytes']:,}", f["check"]]
                                      for f in doc["files"]], {1})]
    return "\n".join(lines)
