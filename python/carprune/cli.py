"""The ``carprune`` command (also ``python -m carprune``; under torchrun for several processes).

Every subcommand reads its settings from flags and an optional TOML file (``--config``; flags
win, see `config`), writes its results into ``--out`` (atomically: a reader never sees a
half-written file, and ``run.json`` records the state of the run for batch scripts), shows
progress bars on a terminal and plain log lines in batch logs, and ends with an exit code a
batch script can act on (see `EXIT_CODES`).

This module is the parser and the dispatch: each subcommand lives in its own module under
`carprune.commands` (NAME, HELP, options(), run(settings, ctx, run, mode); optional POSITIONAL,
DISTRIBUTED, CHECKPOINTED) and is registered with `register_command` at the end of this file.
What the commands share (option lists, typed settings, the run record, loading models and data)
is `carprune.commands._common`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, distributed, preempt
from .callbacks import Stopped
from .commands import _common as common
from .commands._common import (  # noqa: F401  (the names commands and tests use through cli)
    DTYPES,
    EVAL_OPTS,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    MODEL_OPTS,
    SCORING_OPTS,
    TRAIN_OPTS,
    Run,
    save_result,
)
from .config import ConfigError, Option, merge_settings, read_config, settings_object
from .data.arrays import ImageArrayDataset
from .graph import CutError
from .logging_utils import log, resolve_mode, setup_logging
from .threads import is_auto, resolve_threads

# -- the commands --------------------------------------------------------------------------------
COMMANDS: dict[str, Callable[..., int]] = {}   # name -> run(settings, ctx, run, mode)
OPTIONS: dict[str, Callable[[], list[Option]]] = {}
HELP: dict[str, str] = {}
POSITIONAL: dict[str, str] = {}  # command -> the setting given as a positional argument
DISTRIBUTED: list[str] = []      # commands that run under torchrun
CHECKPOINTED: list[str] = []     # commands that stop at a checkpoint on SIGTERM/SIGINT (exit 75)


def register_command(module: Any) -> None:
    """Add the subcommand defined by `module` to the command line: NAME, HELP, options() ->
    list[Option], run(settings, ctx, run, mode) -> exit code. Optional: POSITIONAL names the one
    setting given without its flag (``inspect PATH``; a "paths" setting takes several,
    ``report DIR...``); DISTRIBUTED (runs under torchrun) and CHECKPOINTED (SIGTERM/SIGINT stop
    it at a complete checkpoint with exit code 75, instead of interrupting it), both False by
    default."""
    OPTIONS[module.NAME] = module.options
    HELP[module.NAME] = module.HELP
    COMMANDS[module.NAME] = module.run
    if getattr(module, "POSITIONAL", None):
        POSITIONAL[module.NAME] = module.POSITIONAL
    if getattr(module, "DISTRIBUTED", False):
        DISTRIBUTED.append(module.NAME)
    if getattr(module, "CHECKPOINTED", False):
        CHECKPOINTED.append(module.NAME)


def command_options() -> dict[str, list[Option]]:
    """Every subcommand's settings (the flags and the config keys are the same names)."""
    return {name: options() for name, options in OPTIONS.items()}


# -- compatibility: the helpers of commands written against the settings mapping -----------------
_common = common.common_options
_data_opts = common.data_options


def _load_model(s: Mapping[str, Any], ctx: distributed.Context) -> nn.Module:
    return common.load_model(settings_object(common.ModelSettings, s), ctx)


def _load_data(s: Mapping[str, Any], ctx: distributed.Context, path: str | None,
               split: str | None) -> ImageArrayDataset:
    return common.load_data(_data_settings(s), ctx, path, split)


def _other_data(s: Mapping[str, Any], ctx: distributed.Context, role: str,
                main: ImageArrayDataset | None
                ) -> tuple[ImageArrayDataset | None, ImageArrayDataset | None]:
    return common.other_data(_data_settings(s), s["seed"], ctx, role, s.get(f"{role}_data"),
                             s.get(f"{role}_split"), main)


def _data_settings(s: Mapping[str, Any]) -> common.DataSettings:
    return settings_object(common.DataSettings, {f: s.get(f) for f in (
        "data", "split", "mean", "std", "classes", "channels", "num_images")})


# -- the parser ----------------------------------------------------------------------------------
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
            if POSITIONAL.get(name) == o.name and o.kind == "paths":
                p.add_argument(o.name, nargs="*", default=argparse.SUPPRESS, metavar="DIR", help=text)
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
    positional = POSITIONAL.get(command)
    if positional is not None and flags.get(positional) == []:
        del flags[positional]   # no DIR given: the config file's, or "missing required setting"
    file_cfg = read_config(ns.config) if ns.config else None
    s = merge_settings(command, opts[command], flags, file_cfg, ns.config, opts)
    s["_config"] = ns.config
    return s


# -- running a command ---------------------------------------------------------------------------
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


def stop_message(exc: BaseException) -> str:
    """What a stopped run says (log line, run.json): where it stopped and on whose request."""
    text = str(exc)
    reason = preempt.reason()
    if isinstance(exc, Stopped) and reason and text.startswith("stopped after"):
        text = f"stopped by {reason}" + text[len("stopped"):]
    return text


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
        if world > 1 and is_auto(threads):
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
        if s.get("out"):
            _check_out(Path(s["out"]))
            run = Run(cmd, s, ctx, argv)
            run.write()
        code = COMMANDS[cmd](s, ctx, run, mode)
        if run is not None:
            run.finish("done", code)
        return code
    except (Stopped, preempt.Preempted) as exc:
        msg = stop_message(exc)
        log.warning("%s", msg)
        if run is not None:
            run.finish("preempted", EXIT_PREEMPTED, msg)
        return EXIT_PREEMPTED
    except (ValueError, FileNotFoundError, CutError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"carprune {cmd}: error: {exc}", file=sys.stderr, flush=True)
        if run is not None:
            run.finish("failed", EXIT_USAGE, str(exc))
        return EXIT_USAGE
    except BrokenPipeError:   # stdout closed by its reader (`carprune inspect ... | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # (Python's own flush at exit would fail again)
        if run is not None:
            run.finish("failed", EXIT_FAILED, "standard output was closed")
        return EXIT_FAILED
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


# -- the subcommands, one module each (in the order --help lists them) ---------------------------
from .commands import score as _score  # noqa: E402

register_command(_score)
from .commands import compress as _compress  # noqa: E402

register_command(_compress)
from .commands import finetune as _finetune  # noqa: E402

register_command(_finetune)
from .commands import deep_compress as _deep_compress  # noqa: E402

register_command(_deep_compress)
from .commands import report as _report  # noqa: E402

register_command(_report)
from .commands import bench as _bench  # noqa: E402

register_command(_bench)
from .commands import layers as _layers  # noqa: E402

register_command(_layers)
from .commands import inspect as _inspect  # noqa: E402

register_command(_inspect)
from .commands import kse_compress as _kse_compress  # noqa: E402

register_command(_kse_compress)
CRITERIA = _compress.CRITERIA
SUITES = _bench.SUITES
