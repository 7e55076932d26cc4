"""The ``carprune`` command (also ``python -m carprune``; under torchrun for several processes).

Every subcommand reads its settings from flags and an optional TOML file (``--config``; flags
win, see `config`), writes its results into ``--out`` (atomically: a reader never sees a
half-written file, and ``run.json`` records the state of the run for batch scripts), shows
progress bars on a terminal and plain log lines in batch logs, and ends with an exit code a
batch script can act on (see `EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__, distributed, graph, preempt, specs
from .config import ConfigError, Option, merge_settings, read_config
from .data.arrays import ImageArrayDataset
from .graph import CutError
from .io import read_json, write_json
from .logging_utils import (
    MODES,
    PhaseProgress,
    StepLogger,
    format_seconds,
    heartbeat,
    log,
    resolve_mode,
    setup_logging,
)
from .scores import LayerScores
from .threads import resolve_threads

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = preempt.EXIT_PREEMPTED
EXIT_INTERRUPTED = 130
EXIT_CODES = {
    EXIT_OK: "success: the results in --out are complete",
    EXIT_FAILED: "unexpected error (a bug or a system problem; the traceback is on stderr)",
    EXIT_USAGE: "usage or input error: bad flag or config, unknown layer or model, unreadable "
                "file (one line on stderr says which); rerunning will not help",
    EXIT_PREEMPTED: "stopped by SIGTERM/SIGINT after writing a complete checkpoint; run the same "
                    "command again to resume (score and compress)",
    EXIT_INTERRUPTED: "interrupted by a second Ctrl-C (or SIGINT/SIGTERM in a command that keeps "
                      "no checkpoint); outputs already written are complete",
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CRITERIA = ("car", "random", "mean_in", "mean_out", "l1", "kse")
SUITES = ("quick", "score", "deepcompress", "distributed", "all")


# -- settings ------------------------------------------------------------------------------------
def _common(out_required: bool = True, out_default: str | None = None) -> list[Option]:
    return [
        Option("out", "path", out_default, "output directory (created)", required=out_required,
               metavar="DIR"),
        Option("seed", "int", 0, "seed of the random image subsets and of training"),
        Option("device", "str", "auto", "cpu, cuda, cuda:N or auto (this rank's GPU if any)"),
        Option("threads", "int_or_auto", "auto", "torch CPU threads: a number, or auto = the usable cores "
               "that are idle when the command starts (sampled for 0.25 s; on a shared node this "
               "keeps the run from waiting on cores other processes hold). Under torchrun: 1 per "
               "rank unless set"),
        Option("progress", "str", "auto", "auto: bars on a terminal, log lines otherwise",
               choices=MODES),
        Option("log_interval", "float", 60.0, "seconds between 'still running' log lines in log "
               "mode (0: none)"),
        Option("log_level", "str", "info", "log level", choices=("debug", "info", "warning", "error")),
    ]


MODEL_OPTS = [
    Option("model", "model", None, "lenet5, resnet20/32/44/56/110, a torchvision model name, or "
           "package.module:function / file.py:function returning an nn.Module", required=True,
           metavar="SPEC"),
    Option("weights", "path", None, "checkpoint (state dict) to load into the model", metavar="FILE"),
    Option("num_classes", "int", None, "number of classes, for models that take it"),
    Option("model_kwargs", "table", None, "keyword arguments of the model function (a TOML table; "
           "JSON on the command line)", metavar="JSON"),
]


def _data_opts(required: bool = True, help_role: str = "images to score") -> list[Option]:
    return [
        Option("data", "path", None, f"{help_role}: an ImageFolder directory, a .tar[.gz] of one, "
               "or an .npz of images (uint8) and labels", required=required, metavar="PATH"),
        Option("split", "str", None, "the split folder (train, test, ...) when the data has them; "
               "for an .npz, the key suffix (x_<split>)"),
        Option("mean", "floats", None, "per-channel normalisation mean (images scaled to [0, 1] "
               "first); default: CIFAR-10's for its archive, else 0"),
        Option("std", "floats", None, "per-channel normalisation std; default: CIFAR-10's for its "
               "archive, else 1"),
        Option("classes", "strs", None, "class folder names in label order (default: sorted)"),
        Option("channels", "int", None, "convert images to 1 (grey) or 3 (RGB) channels",
               choices=(1, 3)),
        Option("num_images", "int", None, "score on a seeded random subset of this many images"),
    ]


EVAL_OPTS = [
    Option("eval_data", "path", None, "hold-out images (default: --data, when --eval-split is set)",
           metavar="PATH"),
    Option("eval_split", "str", None, "split of the hold-out images; the same split as --data is "
           "divided into two disjoint halves"),
    Option("eval_images", "int", None, "seeded random subset of the hold-out images"),
]
TRAIN_OPTS = [
    Option("train_data", "path", None, "training images for fine-tuning (default: --data, when "
           "--train-split is set)", metavar="PATH"),
    Option("train_split", "str", None, "split of the training images"),
]
SCORING_OPTS = [
    Option("memory_budget", "str", None, "bound on what scoring holds: cached activations and each "
           "batch (e.g. 2GiB, 512MB; default 2GiB)"),
    Option("dtype", "str", "float32", "scoring precision", choices=tuple(DTYPES)),
    Option("metric", "str", None, "what a removal is measured by: top1 (CAR), topK (e.g. top5), nll, "
           "or for regression targets mse, mae (RAR); default: top-k accuracy with --topk"),
]


def command_options() -> dict[str, list[Option]]:
    """Every subcommand's settings (the flags and the config keys are the same names)."""
    return {
        "score": _common() + MODEL_OPTS + _data_opts() + SCORING_OPTS + [
            Option("layer", "strs", None, "conv or linear layer(s) to score, comma-separated, or "
                   "'all' (every conv layer)",
                   required=True),
            Option("filters", "ints", None, "score only these filters (default: all)"),
            Option("removed", "ints", None, "filters to treat as already removed"),
            Option("topk", "int", 1, "a prediction counts as correct if the label is in the top k "
                   "(when --metric is not given)"),
        ],
        "compress": _common() + MODEL_OPTS + _data_opts() + EVAL_OPTS + TRAIN_OPTS + SCORING_OPTS + [
            Option("layer", "str", None, "conv or linear layer to compress", required=True),
            Option("criterion", "str", "car", "filter ranking", choices=CRITERIA),
            Option("keep", "number", None, "filters to keep: a count, or a fraction like 0.5 "
                   "(default 1, or as many as --max-drop allows)"),
            Option("max_drop", "float", None, "stop before accuracy falls below (1 - max_drop) x "
                   "the original (hold-out accuracy if given)"),
            Option("filters_per_step", "int", 1, "filters removed per greedy step"),
            Option("lazy", "bool", False, "re-score only filters that can still be the minimum"),
            Option("checkpoint", "path", None, "checkpoint file (default: <out>/checkpoint.json); "
                   "the same command resumes from it", metavar="FILE"),
            Option("finetune_iters", "int", 0, "fine-tune this many iterations after compressing "
                   "(needs training data)"),
            Option("finetune_batch_size", "int", 64, "fine-tuning batch size"),
        ],
        "finetune": _common() + MODEL_OPTS + _data_opts(help_role="training images") + EVAL_OPTS + [
            Option("result", "path", None, "a compress output directory to fine-tune (the model "
                   "and weights give its original architecture)", metavar="DIR"),
            Option("layer", "str", None, "the compressed layer (taken from --result when given)"),
            Option("iters", "int", 500, "iterations"),
            Option("batch_size", "int", 64, "batch size"),
            Option("lr_layer", "float", 0.0, "learning rate of the compressed layer"),
            Option("lr_next", "float", 1e-3, "learning rate of the layers consuming it"),
            Option("lr_other", "float", 1e-4, "learning rate of all other layers"),
            Option("momentum", "float", 0.9, "SGD momentum"),
            Option("weight_decay", "float", 0.0, "weight decay"),
        ],
        "deep-compress": _common() + MODEL_OPTS + _data_opts(False, "evaluation images") + TRAIN_OPTS + [
            Option("result", "path", None, "deep-compress the pruned model of this compress output "
                   "directory (the model and weights give its original architecture)",
                   metavar="DIR"),
            Option("layers", "strs", None, "conv/linear layers to compress (default: all)"),
            Option("prune", "spec", None, "sparsity: 0.6, or conv=0.6,linear=0.9,<layer>=...; in "
                   "the config also {quality = q} (default conv 0.6, linear 0.9)"),
            Option("bits", "spec", None, "weight-sharing bits: 8, or conv=8,linear=5,<layer>=..."),
            Option("index_bits", "spec", None, "relative-index bits: as --bits"),
            Option("finetune_iters", "iters", 0, "retraining iterations after pruning and of the "
                   "shared values: N, or N1,N2. The budget that keeps accuracy: 200,100 (measured on the "
                   "whole ResNet-20 at the default pruning, lr 1e-3, batch 64, 10,000 CIFAR-10 "
                   "training images: hold-out accuracy 81.35 -> 81.05 percent; with 20,10 it fell "
                   "to 74.10, with 0 to 55.45; README, Deep Compression)"),
            Option("lr", "float", 1e-3, "retraining learning rate"),
            Option("optimizer", "str", "sgd", "retraining optimiser", choices=("sgd", "adam")),
            Option("batch_size", "int", 64, "retraining batch size"),
            Option("train_scope", "str", "selected", "retrain only the compressed layers or all",
                   choices=("selected", "all")),
            Option("kmeans_iters", "int", 300, "k-means iterations"),
            Option("warn_drop", "float", 0.02, "warn (log line, and 'warnings' in report.json) "
                   "when a phase - pruning + retraining, or weight sharing + fine-tuning - loses "
                   "more accuracy than this on --data (a fraction: 0.02 = 2 points)"),
        ],
        "report": _common() + [
            Option("inputs", "paths", None, "output directories of score, compress or deep-compress "
                   "(e.g. one per array task)", required=True),
            Option("title", "str", "carprune report", "report title"),
            *[Option(o.name, o.kind, o.default, o.help + " (with --data: an interpretation page "
                     "per layer)" if o.name == "model" else o.help, o.choices, False, o.metavar)
              for o in MODEL_OPTS + _data_opts(False, "images for the interpretation pages")],
            Option("search_images", "int", None, "images searched for top activating patches "
                   "(default: all)"),
            Option("patches", "int", 9, "top activating patches per filter"),
            Option("top_classes", "int", 5, "per filter, at most this many classes that lose "
                   "(CAR_c > 0) and that gain (CAR_c < 0) most accuracy without it; classes "
                   "whose accuracy does not change are not listed"),
            Option("memory_budget", "str", None, "memory bound of any scoring the pages need"),
        ],
        "bench": _common(out_required=False, out_default="out/bench") + [
            Option("suite", "str", "quick", "quick: built-in timing of score vs the naive pass; "
                   "score/deepcompress/distributed/all: the benchmarks/ suites (source checkout)",
                   choices=SUITES),
            *[Option(o.name, o.kind, o.default, o.help, o.choices, False, o.metavar)
              for o in MODEL_OPTS + _data_opts()],
            Option("layer", "str", None, "conv layer for the quick benchmark"),
        ],
        "layers": [Option(o.name, o.kind, o.default, o.help, o.choices, False, o.metavar)
                   for o in _common(out_required=False) if o.name in ("log_level",)] + MODEL_OPTS,
        **{name: options() for name, options in EXTRA_OPTIONS.items()},
    }


# Commands written in their own module under carprune/commands/ (one module per command): each
# defines NAME, HELP, options() -> list[Option] and run(settings, ctx, run, mode) -> exit code,
# and is registered with `register_command` at the end of this module.
EXTRA_OPTIONS: dict[str, Callable[[], list[Option]]] = {}


def register_command(module: Any) -> None:
    """Add the subcommand defined by `module` (NAME, HELP, options, run) to the command line.
    An optional POSITIONAL names the one setting given without its flag (``inspect PATH``)."""
    EXTRA_OPTIONS[module.NAME] = module.options
    HELP[module.NAME] = module.HELP
    COMMANDS[module.NAME] = module.run
    if getattr(module, "POSITIONAL", None):
        POSITIONAL[module.NAME] = module.POSITIONAL


POSITIONAL: dict[str, str] = {}  # command -> the setting given as a positional argument


HELP = {
    "score": "CAR and class-wise CAR_c of every filter of conv layer(s)",
    "compress": "greedy structural compression of one conv layer (checkpointed, resumable)",
    "finetune": "fine-tune a compressed model (the CAR paper's per-layer learning rates)",
    "deep-compress": "Deep Compression: prune, share weights, Huffman-code into a .cpz file",
    "report": "merge output directories (e.g. one per array task) into one report: index.html, "
              "a table of the layers, each linking to its interpretation page (with --model and "
              "--data)",
    "bench": "timing benchmarks",
    "layers": "list the conv layers of a model (one per line: name, filters), e.g. for array jobs",
}


def _epilog() -> str:
    codes = "\n".join(f"  {c:3d}  {text}" for c, text in EXIT_CODES.items())
    return (f"exit codes:\n{codes}\n\nEvery setting can also be given in a TOML file (--config): "
            "num_images = 2000 for --num-images; a [command] table applies to one command; flags "
            "override the file; relative paths in the file are relative to the file.\n"
            "Several processes: torchrun --nproc_per_node N -m carprune score|compress ... "
            "(gloo on CPU, NCCL on GPU; results identical to one process).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carprune", description="Structural compression of CNNs by Classification Accuracy "
        "Reduction (CAR).", epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"carprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, opts in command_options().items():
        p = sub.add_parser(name, help=HELP[name], description=HELP[name], epilog=_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE", default=None, help="TOML file of settings "
                       "(flags override it)")
        for o in opts:
            text = o.help + (f" (one of: {', '.join(map(str, o.choices))})" if o.choices else "")
            text += f" (default: {o.default})" if o.default not in (None, False) else ""
            if o.required:
                text += " [required]"
            if name == "report" and o.name == "inputs":
                p.add_argument("inputs", nargs="*", default=argparse.SUPPRESS, metavar="DIR", help=text)
            elif POSITIONAL.get(name) == o.name:
                p.add_argument(o.name, nargs="?", default=argparse.SUPPRESS,
                               metavar=o.metavar or o.name.upper(), help=text)
            elif o.kind == "bool":
                p.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
            else:
                p.add_argument(o.flag, dest=o.name, default=argparse.SUPPRESS,
                               metavar=o.metavar or o.name.upper(), help=text)
    return parser


def settings_for(command: str, ns: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < flags, converted and checked."""
    opts = command_options()
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config")}
    if command == "report" and flags.get("inputs") == []:
        del flags["inputs"]
    file_cfg = read_config(ns.config) if ns.config else None
    s = merge_settings(command, opts[command], flags, file_cfg, ns.config, opts)
    s["_config"] = ns.config
    return s


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()
            if not k.startswith("_")}


def _file_id(path: str | None) -> Any:
    """A checkpoint or data file as (path, size, mtime): a resumed run must use the same files."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return str(p)
    st = p.stat()
    return [str(p.resolve()), st.st_size if p.is_file() else None, st.st_mtime_ns]


# -- run bookkeeping -----------------------------------------------------------------------------
class Run:
    """`<out>/run.json`: command, settings, state (running / done / preempted / failed) and exit
    code, written atomically by rank 0. Under torchrun the launcher's exit code is its own; a
    batch script reads the state here instead."""

    def __init__(self, command: str, settings: Mapping[str, Any], ctx: distributed.Context,
                 argv: Sequence[str]) -> None:
        self.command, self.ctx = command, ctx
        self.out = Path(settings["out"]) if settings.get("out") else None
        self.t0 = time.time()
        self.doc: dict[str, Any] = {
            "format": "carprune.run", "command": command, "argv": list(argv),
            "carprune_version": __version__, "world_size": ctx.world_size,
            "settings": _jsonable(settings), "state": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t0)),
        }

    def write(self, **update: Any) -> None:
        self.doc.update(update)
        if self.out is not None and self.ctx.is_main:
            write_json(self.out / "run.json", self.doc)

    def finish(self, state: str, code: int, message: str | None = None) -> None:
        self.write(state=state, exit_code=code, message=message,
                   seconds=round(time.time() - self.t0, 3))


# -- shared pieces -------------------------------------------------------------------------------
def _load_model(s: Mapping[str, Any], ctx: distributed.Context) -> nn.Module:
    model = specs.load_model(s["model"], s.get("weights"), num_classes=s.get("num_classes"),
                             model_kwargs=s.get("model_kwargs"))
    return model.to(ctx.device)


def _load_data(s: Mapping[str, Any], ctx: distributed.Context, path: str | None,
               split: str | None) -> ImageArrayDataset:
    with ctx.main_first():  # rank 0 decodes into the cache; the others read the cache
        return specs.load_data(path, split, mean=s.get("mean"), std=s.get("std"),
                               classes=s.get("classes"), channels=s.get("channels"))


def _other_data(s: Mapping[str, Any], ctx: distributed.Context, role: str, main: ImageArrayDataset | None
                ) -> tuple[ImageArrayDataset | None, ImageArrayDataset | None]:
    """(main, other) data for role 'eval' or 'train'. Same path and split as the main data:
    the main set is divided into two disjoint seeded halves, the second for `role`."""
    path, split = s.get(f"{role}_data"), s.get(f"{role}_split")
    if path is None and split is None:
        return main, None
    path = path or s["data"]
    if main is not None and Path(path).resolve() == Path(s["data"]).resolve() and split == s.get("split"):
        a, b = main.split(0.5, seed=s["seed"])
        log.info("%s images come from the same split as --data: using two disjoint halves (%d / %d)",
                 role, len(a), len(b))
        return a, b
    return main, _load_data(s, ctx, path, split)


def _layers(model: nn.Module, wanted: Sequence[str]) -> tuple[list[str], bool]:
    if [w.lower() for w in wanted] == ["all"]:
        return graph.conv_layers(model), True
    return list(wanted), False


def _safe_name(layer: str) -> str:
    return layer.replace("/", "_")


def _scores_doc(s: LayerScores, fingerprint: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    order = s.order().tolist()
    return {
        "format": "carprune.scores", "layer": s.layer, "fingerprint": fingerprint,
        "num_images": s.num_images, "topk": s.topk, "classes": s.classes,
        "removed": s.removed, "metric": s.metric, "higher_is_better": s.higher_is_better,
        "base_value": s.base_value, "filters": s.filters.tolist(),
        "importance": s.importance.tolist(), "importance_c": s.importance_c.tolist(),
        "value": s.value.tolist(),
        # the CAR names, for top-k accuracy
        **({"base_accuracy": s.base_accuracy, "car": s.car.tolist(), "car_c": s.car_c.tolist(),
            "accuracy": s.accuracy.tolist()} if s.is_accuracy else {}),
        "least_important_first": [int(s.filters[i]) for i in order],
        "settings": _jsonable(settings),
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- score ---------------------------------------------------------------------------------------
SCORE_KEYS = ("model", "num_classes", "model_kwargs", "data", "split", "mean", "std", "classes",
              "channels", "num_images", "seed", "filters", "removed", "topk", "dtype")


def cmd_score(s: dict[str, Any], ctx: distributed.Context, run: Run, mode: str) -> int:
    out = Path(s["out"])
    model = _load_model(s, ctx)
    data = _load_data(s, ctx, s["data"], s.get("split"))
    layers, every = _layers(model, s["layer"])
    basis = {k: s.get(k) for k in SCORE_KEYS}
    if s.get("metric") is not None:   # (runs without --metric keep their fingerprints)
        basis["metric"] = s["metric"]
    basis["weights"] = _file_id(s.get("weights"))
    basis["data"] = _file_id(s["data"])
    fp = _digest(basis)
    multi = len(layers) > 1
    done: list[str] = []
    for i, layer in enumerate(layers):
        d = out / _safe_name(layer) if multi else out
        prev = d / "scores.json"
        same = False
        if ctx.is_main and prev.is_file() and (d / "scores.npz").is_file():
            try:
                same = read_json(prev, "scores").get("fingerprint") == fp
            except ValueError:
                same = False
        if ctx.broadcast_object(same):  # rank 0 decides: other nodes may not see its files
            log.info("%s: already scored in %s (resuming)", layer, d)
            if ctx.is_main:
                print(LayerScores.load(d / "scores.npz").summary(), flush=True)
            done.append(layer)
            continue
        try:
            scorer = _make_scorer(model, layer, data, s, ctx, mode)
        except CutError as exc:
            if not every:
                raise
            log.warning("skipping %s: %s", layer, exc)
            continue
        if s.get("removed"):
            scorer.remove(s["removed"])
        ds = distributed.DistributedScorer(scorer, ctx)
        n = len(s["filters"]) if s.get("filters") is not None else len(scorer.alive)
        log.info("%s: plan\n  %s", layer, scorer.describe().replace("\n", "\n  "))
        log.info("%s: scoring %d filters on %d images%s", layer, n, len(scorer.indices),
                 f" across {ctx.world_size} ranks" if ctx.world_size > 1 else "")
        t0 = time.monotonic()
        with heartbeat(f"scoring {layer}", s["log_interval"], mode == "log" and ctx.is_main):
            res = ds.score(s.get("filters"))
        seconds = time.monotonic() - t0
        log.info("%s: scored in %s", layer, format_seconds(seconds))
        if ctx.is_main:
            res.save(d / "scores.npz")
            doc = _scores_doc(res, fp, s)
            doc.update(seconds=round(seconds, 3), world_size=ctx.world_size,
                       path=scorer.path, plan=scorer.describe())
            write_json(prev, doc)  # last: marks the layer complete
            print(res.summary(), flush=True)
        done.append(layer)
        ctx.barrier()
        if distributed.sync_stop(ctx) and i < len(layers) - 1:
            preempt.check(f"scoring {layer} ({len(done)} of {len(layers)} layers done)")
    if multi and ctx.is_main:
        write_json(out / "scores.json", {"format": "carprune.scores-index", "fingerprint": fp,
                                         "layers": {lay: f"{_safe_name(lay)}/scores.npz" for lay in done}})
    return EXIT_OK


def _make_scorer(model: nn.Module, layer: str, data: Any, s: Mapping[str, Any],
                 ctx: distributed.Context, mode: str) -> Any:
    from .engine import LayerScorer

    return LayerScorer(model, layer, data, num_images=s.get("num_images"), seed=s["seed"],
                       memory_budget=s.get("memory_budget"), device=ctx.device,
                       dtype=DTYPES[s["dtype"]], topk=s.get("topk", 1), metric=s.get("metric"),
                       progress=mode == "bar" and ctx.is_main)


# -- compress ------------------------------------------------------------------------------------
COMPRESS_KEYS = ("model", "num_classes", "model_kwargs", "data", "split", "mean", "std", "classes",
                 "channels", "eval_data", "eval_split", "train_data", "train_split")


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        aside = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)


def save_result(result: Any, out: Path) -> None:
    """Save a CompressionResult into `out` so that a reader never sees a half-written one: all
    files go to a temporary directory beside it and are renamed into place, result.json last
    (an older result.json is removed first, so it never describes newer model files)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".result-"))
    try:
        result.save(tmp)
        (out / "result.json").unlink(missing_ok=True)
        for p in sorted(tmp.iterdir()):
            if p.name != "result.json":
                _replace(p, out / p.name)
        os.replace(tmp / "result.json", out / "result.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sidecar(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".settings.json")


def _checkpoint_for_rank(ckpt: Path, basis: Mapping[str, Any], ctx: distributed.Context
                         ) -> tuple[Path, Path | None]:
    """The checkpoint path this rank passes to compress_layer.

    Rank 0 owns the real one. Greedy compression's own check covers its settings but not which
    weights or data files were used; a sidecar `<checkpoint>.settings.json` records those, so a
    rerun with other files is refused instead of resuming someone else's trajectory. Other ranks
    get a private copy of the checkpoint (broadcast, so no shared file system is needed), which
    they may write freely."""
    side = _sidecar(ckpt)
    fp = _digest(basis)
    msg, text = None, None
    if ctx.is_main:
        if ckpt.exists():
            old = None
            if side.is_file():
                try:
                    old = read_json(side, "checkpoint settings").get("fingerprint")
                except ValueError:
                    old = None
            if old is not None and old != fp:
                msg = (f"{ckpt} belongs to a run with other model/data settings (see {side}); use "
                       "another --out or --checkpoint, or delete the checkpoint to start over")
            else:
                text = ckpt.read_text()
        if msg is None:
            write_json(side, {"fingerprint": fp, "settings": dict(basis)})
    msg, text = ctx.broadcast_object((msg, text))
    if msg:
        raise ConfigError(msg)
    if ctx.is_main:
        return ckpt, None
    private = Path(tempfile.mkdtemp(prefix=f"carprune-rank{ctx.rank}-"))
    if text is not None:
        (private / "checkpoint.json").write_text(text)
    return private / "checkpoint.json", private


def cmd_compress(s: dict[str, Any], ctx: distributed.Context, run: Run, mode: str) -> int:
    from . import greedy
    from .finetune import FineTune

    out = Path(s["out"])
    model = _load_model(s, ctx)
    data = _load_data(s, ctx, s["data"], s.get("split"))
    data, eval_data = _other_data(s, ctx, "eval", data)
    train_data = None
    if s["finetune_iters"]:
        if s.get("train_data") is None and s.get("train_split") is None:
            raise ConfigError("--finetune-iters needs training images (--train-data/--train-split)")
        _, train_data = _other_data(s, ctx, "train", None)
    basis = {k: s.get(k) for k in COMPRESS_KEYS}
    basis.update(weights=_file_id(s.get("weights")), data=_file_id(s["data"]))
    ckpt = Path(s["checkpoint"]) if s.get("checkpoint") else out / "checkpoint.json"
    side_existed = _sidecar(ckpt).exists()
    my_ckpt, private = _checkpoint_for_rank(ckpt, basis, ctx)
    if ctx.is_main and my_ckpt.exists():
        log.info("resuming from %s", my_ckpt)
    ft = None
    if train_data is not None:
        ft = FineTune(train_data=train_data, iters=s["finetune_iters"],
                      batch_size=s["finetune_batch_size"], seed=s["seed"])

    def wrap(scorer: Any) -> Any:
        return StepLogger(distributed.DistributedScorer(scorer, ctx),
                          enabled=mode == "log" and ctx.is_main, interval=s["log_interval"])

    try:
        result = greedy.compress_layer(
            model, s["layer"], data, eval_data=eval_data, criterion=s["criterion"],
            metric=s.get("metric"), keep=s.get("keep"),
            max_drop=s.get("max_drop"), filters_per_step=s["filters_per_step"],
            score_images=s.get("num_images"), eval_images=s.get("eval_images"), finetune=ft,
            checkpoint=my_ckpt, lazy=s["lazy"], seed=s["seed"], memory_budget=s.get("memory_budget"),
            dtype=DTYPES[s["dtype"]], progress=mode == "bar" and ctx.is_main, scorer_wrapper=wrap)
    except BaseException:
        # a run that failed before its first checkpoint leaves no sidecar describing none
        if ctx.is_main and not side_existed and not ckpt.exists():
            _sidecar(ckpt).unlink(missing_ok=True)
        raise
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    if ctx.is_main:
        save_result(result, out)
        first, last = result.trajectory[0], _final_step(result)
        acc = (lambda st: st.holdout_accuracy if st.holdout_accuracy is not None else st.score_accuracy)
        if re.fullmatch(r"top\d+", result.metric):
            change = f"accuracy {100 * acc(first):.2f} % -> {100 * acc(last):.2f} %"
        else:
            change = f"{result.metric} {acc(first):.4g} -> {acc(last):.4g}"
        print(f"{result.layer}: kept {len(result.kept)} of {result.num_filters} filters "
              f"({result.compression_ratio:.2f}x), {change}, FLOPs {first.flops:,} -> {last.flops:,}, "
              f"params {first.params:,} -> {last.params:,}"
              + (f", fine-tuned {100 * result.finetuned_holdout_accuracy:.2f} %"
                 if result.finetuned_holdout_accuracy is not None else ""), flush=True)
        print(f"result: {out / 'result.json'}", flush=True)
    ctx.barrier()
    return EXIT_OK


def _final_step(result: Any) -> Any:
    kept = len(result.kept)
    for st in result.trajectory:
        if st.kept == kept:
            return st
    return result.trajectory[-1]


# -- finetune ------------------------------------------------------------------------------------
def _accuracy(model: nn.Module, data: ImageArrayDataset | None, n: int | None, seed: int) -> float | None:
    if data is None:
        return None
    from .deepcompress.pipeline import accuracy

    if n is not None and n < len(data):
        data = data.sample(n, seed)
    return accuracy(model, data)


def cmd_finetune(s: dict[str, Any], ctx: distributed.Context, run: Run, mode: str) -> int:
    from .finetune import FineTune, finetune

    out = Path(s["out"])
    arch = _load_model(s, ctx)
    result = None
    if s.get("result"):
        from .greedy import CompressionResult

        result = CompressionResult.load(s["result"], architecture=arch)
        model, layer = result.model.to(ctx.device), result.layer
        if s.get("layer") and s["layer"] != layer:
            raise ConfigError(f"--layer {s['layer']} differs from the result's layer {layer}")
    else:
        if not s.get("layer"):
            raise ConfigError("finetune needs --result DIR (a compress output) or --layer")
        model, layer = arch, s["layer"]
    train = _load_data(s, ctx, s["data"], s.get("split"))
    if s.get("num_images"):
        train = train.sample(min(s["num_images"], len(train)), s["seed"])
    train, evald = _other_data(s, ctx, "eval", train)
    cfg = FineTune(train_data=train, iters=s["iters"], batch_size=s["batch_size"],
                   lr_layer=s["lr_layer"], lr_next=s["lr_next"], lr_other=s["lr_other"],
                   momentum=s["momentum"], weight_decay=s["weight_decay"], seed=s["seed"])
    before = _accuracy(model, evald, s.get("eval_images"), s["seed"])
    t0 = time.monotonic()
    with heartbeat(f"fine-tuning {layer}", s["log_interval"], mode == "log"):
        finetune(model, layer, cfg, progress=mode == "bar")
    after = _accuracy(model, evald, s.get("eval_images"), s["seed"])
    doc = {"format": "carprune.finetune", "layer": layer, "settings": cfg.describe(),
           "accuracy_before": before, "accuracy_after": after,
           "seconds": round(time.monotonic() - t0, 3), "result": s.get("result")}
    if result is not None:
        result.model = model.cpu()
        result.finetuned_holdout_accuracy = after
        save_result(result, out)
    else:
        from .io import atomic_open

        with atomic_open(out / "model.pt") as f:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f)
    write_json(out / "finetune.json", doc)
    if before is not None:
        print(f"{layer}: hold-out accuracy {100 * before:.2f} % -> {100 * after:.2f} % after "
              f"{cfg.iters} iterations", flush=True)
    return EXIT_OK


# -- deep-compress -------------------------------------------------------------------------------
def cmd_deep_compress(s: dict[str, Any], ctx: distributed.Context, run: Run, mode: str) -> int:
    from .deepcompress import deep_compress, save_compressed
    from .io import atomic_write

    out = Path(s["out"])
    model = _load_model(s, ctx)
    if s.get("result"):
        from .greedy import CompressionResult

        model = CompressionResult.load(s["result"], architecture=model).model.to(ctx.device)
    evald = None
    if s.get("data"):
        evald = _load_data(s, ctx, s["data"], s.get("split"))
        if s.get("num_images") and s["num_images"] < len(evald):
            evald = evald.sample(s["num_images"], s["seed"])
    train = None
    if s.get("train_data") or s.get("train_split"):
        if not (s.get("train_data") or s.get("data")):
            raise ConfigError("--train-split needs --train-data or --data")
        train = _load_data(s, ctx, s.get("train_data") or s["data"], s.get("train_split"))
    elif s["finetune_iters"] not in (0, (0, 0)):
        raise ConfigError("--finetune-iters needs training images (--train-data/--train-split)")
    # progress per phase: bars on a terminal; in batch logs a line per phase and every
    # --log-interval seconds (phase, step, loss)
    with PhaseProgress(mode, s["log_interval"], "deep compression") as on_progress:
        res = deep_compress(model, train, evald, layers=s.get("layers"), prune=s.get("prune"),
                            bits=s.get("bits"), index_bits=s.get("index_bits"),
                            finetune_iters=s["finetune_iters"], lr=s["lr"], optimizer=s["optimizer"],
                            batch_size=s["batch_size"], train_scope=s["train_scope"],
                            kmeans_iters=s["kmeans_iters"], seed=s["seed"],
                            warn_drop=s["warn_drop"], on_progress=on_progress)
    size = save_compressed(res, out / "model.cpz")
    md = res.report.to_markdown()
    atomic_write(out / "report.md", lambda f: f.write(md + "\n"), mode="w")
    res.report.save(out / "report.json")  # last: marks the output complete
    print(md, flush=True)
    print(f"wrote {out / 'model.cpz'} ({size:,} bytes)", flush=True)
    return EXIT_OK


# -- report --------------------------------------------------------------------------------------
def cmd_report(s: dict[str, Any], ctx: distributed.Context, run: Run, mode: str) -> int:
    """index.html, a landing page with one table over all inputs (also report.md/.json;
    `interpret.landing`); with --model and --data also an interpretation page per scored or
    compressed layer (`interpret.build_report`), linked from the table."""
    from .interpret.landing import landing_page, markdown, read_output
    from .io import atomic_write

    out = Path(s["out"])
    dirs = [Path(p) for p in s["inputs"]]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a directory: {', '.join(missing)}")
    rows = [read_output(d) for d in dirs]
    rows.sort(key=lambda r: (r["kind"], r.get("layer", ""), r["dir"]))
    if s.get("model") is not None and s.get("data") is not None:
        _interpretation_pages(rows, out, s, ctx, mode)
    elif s.get("model") is not None or s.get("data") is not None:
        raise ConfigError("interpretation pages need both --model and --data")
    md = markdown(s["title"], rows)
    atomic_write(out / "report.md", lambda f: f.write(md + "\n"), mode="w")
    write_json(out / "report.json", {"format": "carprune.report", "title": s["title"], "rows": rows})
    page = landing_page(s["title"], rows)
    atomic_write(out / "index.html", lambda f: f.write(page), mode="w")
    print(md, flush=True)
    print(f"report: {out / 'index.html'}", flush=True)
    return EXIT_OK


def _interpretation_pages(rows: list[dict[str, Any]], out: Path, s: Mapping[str, Any],
                          ctx: distributed.Context, mode: str) -> None:
    from .interpret import build_report

    model = _load_model(s, ctx)
    data = _load_data(s, ctx, s["data"], s.get("split"))
    used: set[str] = set()
    for r in rows:
        if r["kind"] not in ("score", "compress"):
            continue
        d = Path(r["dir"])
        name = _safe_name(r["layer"])
        while name in used:
            name += "_"
        used.add(name)
        scores = d / "scores.npz"
        log.info("%s: interpretation page in %s", r["layer"], out / name)
        with heartbeat(f"interpreting {r['layer']}", s["log_interval"], mode == "log"):
            build_report(model, r["layer"], data, out / name,
                         scores_path=scores if scores.is_file() else None,
                         compression_dir=d if r["kind"] == "compress" else None,
                         top_classes=s["top_classes"], patches=s["patches"],
                         num_images=s.get("num_images"), search_images=s.get("search_images"),
                         seed=s["seed"], memory_budget=s.get("memory_budget"),
                         device=str(ctx.device), progress=mode == "bar",
                         back_link="../index.html")
        r["page"] = f"{name}/index.html"


# -- layers --------------------------------------------------------------------------------------
def cmd_layers(s: dict[str, Any], ctx: distributed.Context, run: Run, mode: str) -> int:
    model = _load_model(s, ctx)
    mods = dict(model.named_modules())
    for name in graph.conv_layers(model):
        print(f"{name} {mods[name].out_channels}")
    return EXIT_OK


# -- bench ---------------------------------------------------------------------------------------
def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks").is_dir() else None


SUITE_FILES = {"score": ["bench_score.py"], "deepcompress": ["bench_deepcompress.py"],
               "distributed": ["bench_distributed.py"]}


def cmd_bench(s: dict[str, Any], ctx: distributed.Context, run: Run, mode: str) -> int:
    if s["suite"] != "quick":
        root = _repo_root()
        if root is None:
            raise ConfigError("the benchmark suites live in the source checkout's benchmarks/; "
                              "this installation has none (use --suite quick)")
        names = [f for k, fs in SUITE_FILES.items() for f in fs] if s["suite"] == "all" \
            else SUITE_FILES[s["suite"]]
        files = [str(root / "benchmarks" / f) for f in names if (root / "benchmarks" / f).is_file()]
        if not files:
            raise ConfigError(f"no benchmark files for suite {s['suite']!r} in {root / 'benchmarks'}")
        cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-enable", "-s", "-q"]
        log.info("running %s", " ".join(cmd))
        rc = subprocess.call(cmd, cwd=root)
        return EXIT_OK if rc == 0 else EXIT_FAILED
    for k in ("model", "data", "layer"):
        if s.get(k) is None:
            raise ConfigError(f"bench --suite quick needs --{k} (or {k} in the config file)")
    return _quick_bench(s, ctx)


def naive_counts(model: nn.Module, layer: str, data: ImageArrayDataset, indices: np.ndarray,
                 filters: Sequence[int], batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive CAR pass: per filter, zero its channel at the cut and run the whole network.

    Returns (counts [filters, classes], base counts [classes])."""
    gm = graph.trace(model)
    cut = graph.find_cut(gm, layer)
    if cut.node.op != "call_module":
        raise ValueError(f"the naive reference needs {layer!r}'s cut to be a module output")
    module = gm.get_submodule(str(cut.node.target))
    x, y = data.batch(indices)
    k = len(data.classes)
    device = next(gm.parameters()).device
    counts = torch.zeros(len(filters), k, dtype=torch.int64)
    base = torch.zeros(k, dtype=torch.int64)

    def run_all() -> torch.Tensor:
        c = torch.zeros(k, dtype=torch.int64)
        for s0 in range(0, len(y), batch):
            ok = gm(x[s0:s0 + batch].to(device)).argmax(1).cpu() == y[s0:s0 + batch]
            c += torch.bincount(y[s0:s0 + batch][ok], minlength=k)
        return c

    with torch.no_grad():
        base += run_all()
        for row, f in enumerate(filters):
            def zero(mod: nn.Module, inp: Any, out: torch.Tensor, f: int = f) -> torch.Tensor:
                out = out.clone()
                out[:, f] = 0
                return out

            h = module.register_forward_hook(zero)
            try:
                counts[row] = run_all()
            finally:
                h.remove()
    return counts, base


def _quick_bench(s: dict[str, Any], ctx: distributed.Context) -> int:
    from .engine import LayerScorer

    out = Path(s["out"])
    model = _load_model(s, ctx)
    data = _load_data(s, ctx, s["data"], s.get("split"))
    n = s.get("num_images") or 256
    t0 = time.perf_counter()
    scorer = LayerScorer(model, s["layer"], data, num_images=n, seed=s["seed"], device=ctx.device,
                         progress=False)
    res = scorer.score()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, base = naive_counts(model, s["layer"], data, scorer.indices, res.filters.tolist())
    t_naive = time.perf_counter() - t0
    mismatch = int((ref - res.counts).abs().sum())
    doc = {"format": "carprune.bench.quick", "layer": s["layer"], "model": s["model"],
           "images": len(scorer.indices), "filters": len(res.filters), "threads": torch.get_num_threads(),
           "device": str(ctx.device), "carprune_seconds": t_ours, "naive_seconds": t_naive,
           "speedup": t_naive / t_ours, "count_mismatch": mismatch,
           "base_equal": bool(torch.equal(base, res.base_counts))}
    write_json(out / "bench.json", doc)
    print(f"{s['model']} {s['layer']}: {len(res.filters)} filters x {len(scorer.indices)} images, "
          f"{torch.get_num_threads()} threads on {ctx.device}\n"
          f"  carprune score: {t_ours:8.2f} s\n  naive pass:     {t_naive:8.2f} s\n"
          f"  speed-up:       {t_naive / t_ours:8.1f}x   (count mismatches: {mismatch} of "
          f"{len(res.filters) * len(scorer.indices)})", flush=True)
    return EXIT_OK


# -- main ----------------------------------------------------------------------------------------
COMMANDS: dict[str, Callable[..., int]] = {
    "score": cmd_score, "compress": cmd_compress, "finetune": cmd_finetune,
    "deep-compress": cmd_deep_compress, "report": cmd_report, "bench": cmd_bench,
    "layers": cmd_layers,
}
DISTRIBUTED = ("score", "compress")
CHECKPOINTED = ("score", "compress")


def _interrupt_on_sigterm() -> None:
    """Commands without a checkpoint stop at once on SIGTERM, as on Ctrl-C (exit 130, run.json
    'interrupted'); their outputs are written atomically, so nothing is left half-written."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading_is_main():
        signal.signal(signal.SIGTERM, handler)


def _check_out(out: Path) -> None:
    """--out must be a directory this process can create and write in; say so before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the output directory "
                          f"({exc.strerror or type(exc).__name__})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the output directory is not writable")


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (see `EXIT_CODES`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return int(exc.code or 0)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    cmd = ns.command
    ctx = distributed.Context()
    run: Run | None = None
    try:
        s = settings_for(cmd, ns)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and cmd not in DISTRIBUTED:
            raise ConfigError(f"'{cmd}' runs in one process; only {' and '.join(DISTRIBUTED)} run "
                              "under torchrun")
        threads = s.get("threads")
        if world > 1 and threads == "auto":
            threads = None  # torchrun sets OMP_NUM_THREADS=1 per rank
        threads = resolve_threads(threads)
        if threads:
            torch.set_num_threads(threads)
            log.debug("%d CPU threads", threads)
        ctx = distributed.init_from_env(s.get("device", "auto"))
        mode = resolve_mode(s.get("progress", "auto"), ctx.rank)
        setup_logging(mode, ctx.rank, ctx.world_size, s.get("log_level", "info"))
        if cmd in CHECKPOINTED:
            distributed.install_signal_handlers(ctx)
        else:
            _interrupt_on_sigterm()
        if s.get("out") and cmd != "layers":
            _check_out(Path(s["out"]))
            run = Run(cmd, s, ctx, argv)
            run.write()
        code = COMMANDS[cmd](s, ctx, run, mode)
        if run is not None:
            run.finish("done", code)
        return code
    except preempt.Preempted as exc:
        log.warning("%s", exc)
        if run is not None:
            run.finish("preempted", EXIT_PREEMPTED, str(exc))
        return EXIT_PREEMPTED
    except (ValueError, FileNotFoundError, CutError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"carprune {cmd}: error: {exc}", file=sys.stderr, flush=True)
        if run is not None:
            run.finish("failed", EXIT_USAGE, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"carprune {cmd}: interrupted", file=sys.stderr, flush=True)
        if run is not None:
            run.finish("interrupted", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Exception as exc:
        traceback.print_exc()
        if run is not None:
            run.finish("failed", EXIT_FAILED, f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        ctx.close()


# -- commands in their own modules (imported last: they build on the pieces above) ---------------
from .commands import inspect as _inspect  # noqa: E402

register_command(_inspect)
from .commands import kse_compress as _kse_compress  # noqa: E402

register_command(_kse_compress)
