"""What the ``carprune`` subcommands share: exit codes, option lists, typed settings, the run
record (``run.json``) and the helpers that load models and data and publish results.

Each option list here has a frozen dataclass with the same field names (`CommonSettings`,
`ModelSettings`, ...); a command's own settings class inherits those of the lists it uses and
adds its own fields, and `carprune.config.settings_object` builds it from the merged settings
on entry to the command, so command bodies read typed attributes, never ``settings["..."]``.
A dataclass lists the fields of its bases last base first, so a command names its bases in the
reverse order of its option lists (``Settings(ScoringSettings, DataSettings, ModelSettings,
CommonSettings)``) to keep its fields in the order of its options.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__, distributed, preempt, specs
from ..config import ConfigError, Option
from ..data.arrays import ImageArrayDataset
from ..io import atomic_write, update_directory, write_json
from ..logging_utils import MODES, log
from ..threads import ThreadGovernor, is_auto

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


# -- option lists --------------------------------------------------------------------------------
def common_options(out_required: bool = True, out_default: str | None = None) -> list[Option]:
    """Every command's run settings: output directory, seed, device, threads, progress, logs."""
    return [
        Option("out", "path", out_default, "output directory (created)", required=out_required,
               metavar="DIR"),
        Option("seed", "int", 0, "seed of the random image subsets and of training", minimum=0),
        Option("device", "str", "auto", "cpu, cuda, cuda:N or auto (this rank's GPU if any)"),
        Option("threads", "int_or_auto", "auto", "torch CPU threads: a number, or auto = the usable cores "
               "that are idle when the command starts (sampled for 0.25 s; on a shared node this "
               "keeps the run from waiting on cores other processes hold), re-checked at most "
               "every 10 s during the run (compress: rounds and steps; score: between layers; "
               "finetune: epochs; kse-compress: layers and epochs; deep-compress: steps). "
               "Under torchrun: 1 per rank unless set"),
        Option("progress", "str", "auto", "auto: bars on a terminal, log lines otherwise",
               choices=MODES),
        Option("log_interval", "float", 60.0, "seconds without progress before a 'still "
               "running' log line in log mode (0: none)", minimum=0),
        Option("log_level", "str", "info", "log level", choices=("debug", "info", "warning", "error")),
    ]


MODEL_OPTS = [
    Option("model", "model", None, "lenet5, resnet20/32/44/56/110, a torchvision model name, or "
           "package.module:function / file.py:function returning an nn.Module", required=True,
           metavar="SPEC"),
    Option("weights", "path", None, "checkpoint (state dict) to load into the model (without "
           "it a built-in model is untrained)", metavar="FILE"),
    Option("num_classes", "int", None, "number of classes, for models that take it"),
    Option("model_kwargs", "table", None, "keyword arguments of the model function (a TOML table; "
           "JSON on the command line)", metavar="JSON"),
]


def data_options(required: bool = True, help_role: str = "images to score") -> list[Option]:
    """Where the images come from and how they are read and normalised."""
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
        Option("num_images", "int", None, "use a seeded random subset of this many of these "
               "images (default: all)", minimum=1),
    ]


EVAL_OPTS = [
    Option("eval_data", "path", None, "hold-out images (default: --data, when --eval-split is set)",
           metavar="PATH"),
    Option("eval_split", "str", None, "split of the hold-out images; the same split as --data is "
           "divided into two disjoint halves"),
    Option("eval_images", "int", None, "seeded random subset of the hold-out images", minimum=1),
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


def optional(options: Sequence[Option]) -> list[Option]:
    """The same options, none of them required."""
    return [Option(o.name, o.kind, o.default, o.help, o.choices, False, o.metavar) for o in options]


# -- typed settings (one class per option list; fields named like the options) -------------------
@dataclass(frozen=True, kw_only=True)
class CommonSettings:
    out: str
    seed: int
    device: str
    threads: int | str
    progress: str
    log_interval: float
    log_level: str


def thread_governor(s: CommonSettings, ctx: distributed.Context) -> ThreadGovernor | None:
    """With ``--threads auto`` in one process, a `threads.ThreadGovernor` for the command's
    `RunCallbacks` (the free cores re-checked at step boundaries, at most every 10 s); else
    None (a fixed count, or torchrun's 1 thread per rank)."""
    if not is_auto(s.threads) or ctx.world_size > 1:
        return None
    return ThreadGovernor()


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    model: str
    weights: str | None
    num_classes: int | None
    model_kwargs: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    data: str | None
    split: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    classes: tuple[str, ...] | None
    channels: int | None
    num_images: int | None


def _next_post_init(obj: Any, cls: type) -> None:
    """The next settings mixin's check after `cls`'s in `obj`'s class order (the mixins'
    `__post_init__` chain: each runs the next, and a command's own calls the first)."""
    nxt = getattr(super(cls, obj), "__post_init__", None)
    if nxt is not None:
        nxt()


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    eval_data: str | None
    eval_split: str | None
    eval_images: int | None

    def __post_init__(self) -> None:   # (subclasses defining their own call it)
        _next_post_init(self, EvalSettings)
        if self.eval_images is not None and self.eval_data is None and self.eval_split is None:
            raise ConfigError("--eval-images needs hold-out images (--eval-data and/or "
                              "--eval-split); without them the run measures on the scoring "
                              "images")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    train_data: str | None
    train_split: str | None


@dataclass(frozen=True, kw_only=True)
class ScoringSettings:
    memory_budget: str | None
    dtype: str
    metric: str | None

    def __post_init__(self) -> None:   # (before any output is read: a resumed run checks it too)
        _next_post_init(self, ScoringSettings)
        from ..engine import parse_bytes

        try:
            parse_bytes(self.memory_budget)
        except ValueError as exc:
            raise ConfigError(f"--memory-budget: {exc}") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def jsonable(settings: Any) -> dict[str, Any]:
    """Settings (a mapping or a settings object) as JSON types, private keys left out."""
    items = settings.items() if isinstance(settings, Mapping) else asdict(settings).items()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in items if not k.startswith("_")}


# -- the run record ------------------------------------------------------------------------------
class Run:
    """`<out>/run.json`: command, settings, state (running / done / preempted / failed) and exit
    code, written atomically by rank 0. Under torchrun the launcher's exit code is its own; a
    batch script reads the state here instead."""

    def __init__(self, command: str, settings: Mapping[str, Any], ctx: distributed.Context,
                 argv: Sequence[str]) -> None:
        self.command, self.ctx = command, ctx
        self.out = Path(settings["out"]) if settings.get("out") else None
        self.t0 = time.time()
        self._done: bytes | None = None   # the record of a complete earlier run in `out`
        if self.out is not None and ctx.is_main:
            try:
                before = (self.out / "run.json").read_bytes()
                if json.loads(before).get("state") == "done":
                    self._done = before
            except (OSError, ValueError, AttributeError):
                pass
        self.doc: dict[str, Any] = {
            "format": "carprune.run", "command": command, "argv": list(argv),
            "carprune_version": __version__, "world_size": ctx.world_size,
            "settings": jsonable(settings), "state": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t0)),
        }

    def write(self, **update: Any) -> None:
        self.doc.update(update)
        if self.out is not None and self.ctx.is_main:
            write_json(self.out / "run.json", self.doc)

    def finish(self, state: str, code: int, message: str | None = None) -> None:
        """The final record. A rerun refused as a usage error (exit 2: other settings, a bad
        value) changed nothing in `out`, so a complete earlier run's record is put back: the
        outputs there are still that run's."""
        if state == "failed" and code == EXIT_USAGE and self._done is not None:
            self.doc.update(state=state, exit_code=code, message=message)
            if self.ctx.is_main:
                atomic_write(self.out / "run.json", lambda f: f.write(self._done))
                log.info("%s keeps the record of the complete earlier run (this one was refused)",
                         self.out / "run.json")
            return
        self.write(state=state, exit_code=code, message=message,
                   seconds=round(time.time() - self.t0, 3))


# -- models, data, results -----------------------------------------------------------------------
def load_model(m: ModelSettings, ctx: distributed.Context, *, architecture: bool = False
               ) -> nn.Module:
    """The model of --model/--weights/--num-classes/--model-kwargs, on this rank's device. A
    built-in or torchvision model without --weights is untrained: said in a warning (a
    package.module:function may load its own weights), unless only its `architecture` is
    needed (the weights come from a result, or none are used)."""
    model = specs.load_model(m.model, m.weights, num_classes=m.num_classes,
                             model_kwargs=m.model_kwargs)
    if m.weights is None and not architecture and (
            ":" not in m.model or m.model.startswith("torchvision:")):
        log.warning("no --weights: %s keeps its random initialisation (an untrained network)",
                    m.model)
    return model.to(ctx.device)


def load_data(d: DataSettings, ctx: distributed.Context, path: str | None, split: str | None
              ) -> ImageArrayDataset:
    """Images at `path` (`split`), read with the data settings' normalisation and classes."""
    with ctx.main_first():  # rank 0 decodes into the cache; the others read the cache
        return specs.load_data(path, split, mean=d.mean, std=d.std, classes=d.classes,
                               channels=d.channels)


def other_data(d: DataSettings, seed: int, ctx: distributed.Context, role: str, path: str | None,
               split: str | None, main: ImageArrayDataset | None
               ) -> tuple[ImageArrayDataset | None, ImageArrayDataset | None]:
    """(main, other) data for `role` ('eval' or 'train', read from `path`/`split`, the role's
    settings; path None: --data). Same path and split as the main data: the main set is divided
    into two disjoint seeded halves, the second for `role`."""
    if path is None and split is None:
        return main, None
    path = path or d.data
    if main is not None and Path(path).resolve() == Path(d.data).resolve() and split == d.split:
        a, b = main.split(0.5, seed=seed)
        log.info("%s images come from the same split as --data: using two disjoint halves (%d / %d)",
                 role, len(a), len(b))
        return a, b
    return main, load_data(d, ctx, path, split)


def safe_name(layer: str) -> str:
    """A layer name as a directory name."""
    return layer.replace("/", "_")


def save_result(result: Any, out: Path) -> None:
    """Save a result (anything with ``save(directory)`` writing result.json) into `out` so that a
    reader never sees a half-written one (`io.update_directory`: result.json last; an older
    result.json is removed first, so it never describes newer model files)."""
    update_directory(out, result.save, last="result.json")
