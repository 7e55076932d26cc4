"""``carprune report DIR...``: one report over output directories (e.g. one per array task).

Writes ``index.html``, a landing page with one table of the layers (`interpret.landing`), and
the same table as ``report.md`` and ``report.json``; with --model and --data also an
interpretation page per scored or compressed layer (`interpret.build_report`), linked from the
table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..config import ConfigError, Option, settings_object
from ..io import atomic_write, write_json
from ..logging_utils import heartbeat, log
from . import _common as common

NAME = "report"
HELP = ("merge output directories (e.g. one per array task) into one report: index.html, a table "
        "of the layers, each linking to its interpretation page (with --model and --data)")
POSITIONAL = "inputs"


def options() -> list[Option]:
    return common.common_options() + [
        Option("inputs", "paths", None, "output directories of score, compress (one layer or "
               "the whole network), kse-compress or deep-compress (e.g. one per array task)",
               required=True),
        Option("title", "str", "carprune report", "report title"),
        *[Option(o.name, o.kind, o.default, o.help + " (with --data: an interpretation page "
                 "per layer)" if o.name == "model" else o.help, o.choices, False, o.metavar)
          for o in common.MODEL_OPTS + common.data_options(False, "images for the interpretation pages")],
        Option("search_images", "int", None, "images searched for top activating patches "
               "(default: all)"),
        Option("patches", "int", 9, "top activating patches per filter"),
        Option("top_classes", "int", 5, "per filter, at most this many classes that lose "
               "(CAR_c > 0) and that gain (CAR_c < 0) most accuracy without it; classes "
               "whose accuracy does not change are not listed"),
        Option("memory_budget", "str", None, "memory bound of any scoring the pages need"),
    ]


@dataclass(frozen=True, kw_only=True)
class Settings(common.DataSettings, common.ModelSettings, common.CommonSettings):
    inputs: tuple[str, ...]
    title: str
    model: str | None
    search_images: int | None
    patches: int
    top_classes: int
    memory_budget: str | None

    def __post_init__(self) -> None:
        if (self.model is None) != (self.data is None):
            raise ConfigError("interpretation pages need both --model and --data")


def run(settings: Mapping[str, Any], ctx: distributed.Context, run: common.Run, mode: str) -> int:
    from ..interpret.landing import landing_page, markdown, read_output

    s = settings_object(Settings, settings)
    out = Path(s.out)
    dirs = [Path(p) for p in s.inputs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a directory: {', '.join(missing)}")
    rows = [read_output(d) for d in dirs]
    rows.sort(key=lambda r: (r["kind"], r.get("layer", ""), r["dir"]))
    if s.model is not None:
        interpretation_pages(rows, out, s, ctx, mode)
    md = markdown(s.title, rows)
    atomic_write(out / "report.md", lambda f: f.write(md + "\n"), mode="w")
    write_json(out / "report.json", {"format": "carprune.report", "title": s.title, "rows": rows})
    page = landing_page(s.title, rows)
    atomic_write(out / "index.html", lambda f: f.write(page), mode="w")
    print(md, flush=True)
    print(f"report: {out / 'index.html'}", flush=True)
    return common.EXIT_OK


def interpretation_pages(rows: list[dict[str, Any]], out: Path, s: Settings,
                         ctx: distributed.Context, mode: str) -> None:
    """An interpretation page per scored or compressed layer, each in its own directory; the
    row gets the link ("page")."""
    from ..interpret import build_report

    model = common.load_model(s, ctx)
    data = common.load_data(s, ctx, s.data, s.split)
    used: set[str] = set()
    for r in rows:
        if r["kind"] not in ("score", "compress"):
            continue
        d = Path(r["dir"])
        name = common.safe_name(r["layer"])
        while name in used:
            name += "_"
        used.add(name)
        scores = d / "scores.npz"
        log.info("%s: interpretation page in %s", r["layer"], out / name)
        with heartbeat(f"interpreting {r['layer']}", s.log_interval, mode == "log"):
            build_report(model, r["layer"], data, out / name,
                         scores_path=scores if scores.is_file() else None,
                         compression_dir=d if r["kind"] == "compress" else None,
                         top_classes=s.top_classes, patches=s.patches,
                         num_images=s.num_images, search_images=s.search_images,
                         seed=s.seed, memory_budget=s.memory_budget,
                         device=str(ctx.device), progress=mode == "bar",
                         back_link="../index.html")
        r["page"] = f"{name}/index.html"
