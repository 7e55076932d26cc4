"""``carprune compress``: greedy structural compression of one layer (`greedy.compress_layer`),
or of the whole network to a FLOPs target (`global_mode.compress_global`), checkpointed after
every step (round) and resumable.

Which of the two runs (`Settings.is_global`): WHOLE-NETWORK compression when --flops-target is
given, or --layer is ``all`` or a comma-separated list of layers/units, or --per-round is given;
then the run stops at --flops-target and/or before a round would take accuracy below
(1 - --max-drop) x the original, and
the per-layer settings (--keep, --filters-per-step, --lazy, --finetune-iters) are refused.
Otherwise ONE LAYER, exactly as before. Whole-network runs show one log line (or bar step) per
round: channels removed, FLOPs fraction, accuracy, seconds (`RoundProgress`).

Writes the result (``result.json`` + ``model/``: `CompressionResult.load`, whole network
`GlobalCompressionResult.load`) into --out, result.json renamed into place last. The checkpoint
(default ``<out>/checkpoint.json``) resumes a stopped run to the identical result: SIGTERM/SIGINT
stop it after the next complete step (exit code 75).
Greedy compression's own checkpoint check covers its settings; a sidecar
``<checkpoint>.settings.json`` adds which model, weights and data files were used, so a rerun
with other files is refused instead of resuming someone else's trajectory. Under torchrun every
step's scoring is split across ranks (`distributed.ShardedScorer`; whole-network rounds:
`distributed.ShardedCAR`) and the ranks agree on a stop.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..callbacks import Callbacks, Event
from ..config import ConfigError, Option, settings_object
from ..io import config_difference, file_identity, fingerprint, read_json, same_run, write_json
from ..logging_utils import RunCallbacks, log
from . import _common as common

NAME = "compress"
HELP = ("greedy structural compression of one conv layer, or of the whole network to a FLOPs "
        "target (--layer all --flops-target 0.5) (checkpointed, resumable)")
DISTRIBUTED = True
CHECKPOINTED = True
CRITERIA = ("car", "random", "mean_in", "mean_out", "l1", "kse", "l2", "taylor")
LAYER_CRITERIA = ("car", "random", "mean_in", "mean_out", "l1", "kse")
GLOBAL_CRITERIA = ("car", "l1", "l2", "taylor", "random")


def options() -> list[Option]:
    return common.common_options() + common.MODEL_OPTS + common.data_options() + \
        common.EVAL_OPTS + common.TRAIN_OPTS + common.SCORING_OPTS + [
            Option("layer", "str", None, "conv or linear layer to compress (one-layer greedy). "
                   "Whole-network compression runs instead when LAYER is 'all' (every unit) or a "
                   "comma-separated list of layers/units, or when --flops-target or --per-round is "
                   "given; it stops at --flops-target and/or --max-drop", required=True),
            Option("criterion", "str", "car", "filter ranking; one layer: car, random, mean_in, "
                   "mean_out, l1 (filter L1), kse; whole network: car, l1, l2 (group magnitude), "
                   "taylor, random", choices=CRITERIA),
            Option("keep", "number", None, "filters to keep: a count, or a fraction like 0.5 "
                   "(default 1, or as many as --max-drop allows)"),
            Option("max_drop", "float", None, "stop before accuracy falls below (1 - max_drop) x "
                   "the original (hold-out accuracy if given; whole network: the round that "
                   "would cross it is undone)"),
            Option("flops_target", "float", None, "whole-network compression: remove channels "
                   "across the network until its FLOPs are at most this fraction of the original, "
                   "in (0, 1), e.g. 0.5"),
            Option("per_round", "int", None, "whole network: the most channels a round removes, "
                   "at most one per unit (default 1: strict greedy; more is faster but changes choices)"),
            Option("cost_aware", "bool", True, "whole network: rank channels by importance per FLOP "
                   "saved (--no-cost-aware: by importance alone)"),
            Option("filters_per_step", "int", 1, "filters removed per greedy step"),
            Option("lazy", "bool", False, "re-score only filters that can still be the minimum"),
            Option("checkpoint", "path", None, "checkpoint file (default: <out>/checkpoint.json); "
                   "the same command resumes from it", metavar="FILE"),
            Option("finetune_iters", "int", 0, "fine-tune this many iterations after compressing "
                   "(needs training data)"),
            Option("finetune_batch_size", "int", 64, "fine-tuning batch size"),
        ]


@dataclass(frozen=True, kw_only=True)
class Settings(common.ScoringSettings, common.TrainSettings, common.EvalSettings,
               common.DataSettings, common.ModelSettings, common.CommonSettings):
    data: str
    layer: str
    criterion: str
    keep: int | float | None
    max_drop: float | None
    flops_target: float | None
    per_round: int | None
    cost_aware: bool
    filters_per_step: int
    lazy: bool
    checkpoint: str | None
    finetune_iters: int
    finetune_batch_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_global:
            self._check_global()
        else:
            if self.criterion not in LAYER_CRITERIA:
                raise ConfigError(f"--criterion {self.criterion} ranks whole-network units: give "
                                  "--flops-target or --layer all; one layer takes one of "
                                  f"{', '.join(LAYER_CRITERIA)}")
            if not self.cost_aware:
                raise ConfigError("--no-cost-aware applies to whole-network compression "
                                  "(--flops-target or --layer all)")
        if self.finetune_iters and self.train_data is None and self.train_split is None:
            raise ConfigError("--finetune-iters needs training images (--train-data/--train-split)")

    @property
    def is_global(self) -> bool:
        """Whole-network compression (`compress_global`) rather than one layer: --flops-target
        or --per-round given, or --layer 'all' or a comma-separated list."""
        return (self.flops_target is not None or self.per_round is not None
                or self.layer.strip() == "all" or "," in self.layer)

    @property
    def layers(self) -> str | list[str]:
        """--layer as `compress_global` takes it: 'all' or a list of layer/unit names."""
        if self.layer.strip() == "all":
            return "all"
        return [name.strip() for name in self.layer.split(",") if name.strip()]

    def _check_global(self) -> None:
        if self.flops_target is not None and not 0 < self.flops_target < 1:
            raise ConfigError(f"--flops-target is a fraction of the original FLOPs in (0, 1) "
                              f"(0.5: half the FLOPs), got {self.flops_target:g}")
        if self.flops_target is None and self.max_drop is None:
            why = (f"--per-round {self.per_round}" if self.per_round is not None
                   and self.layer.strip() != "all" and "," not in self.layer
                   else f"--layer {self.layer}")
            raise ConfigError(f"{why} compresses the whole network: give --flops-target (a "
                              "fraction of the FLOPs in (0, 1)) and/or --max-drop (the largest "
                              "relative drop of accuracy allowed)")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise ConfigError(f"--max-drop is a relative accuracy drop in [0, 1), got "
                              f"{self.max_drop:g}")
        if self.per_round is not None and self.per_round < 1:
            raise ConfigError(f"--per-round must be >= 1, got {self.per_round}")
        if not self.layers:
            raise ConfigError(f"--layer {self.layer!r} names no layer")
        if self.criterion not in GLOBAL_CRITERIA:
            raise ConfigError(f"--criterion {self.criterion} ranks the filters of one layer; "
                              f"whole-network compression takes one of {', '.join(GLOBAL_CRITERIA)}")
        per_layer = [flag for flag, given in (
            ("--keep", self.keep is not None), ("--filters-per-step", self.filters_per_step != 1),
            ("--lazy", self.lazy), ("--finetune-iters", self.finetune_iters != 0)) if given]
        if per_layer:
            plural = "s" if len(per_layer) > 1 else ""
            raise ConfigError(f"{', '.join(per_layer)}: one-layer setting{plural}; whole-network "
                              "compression (--flops-target, --layer all or a list) stops at "
                              "--flops-target and/or --max-drop")

    def files_basis(self) -> dict[str, Any]:
        """Which model and data files the run reads (the sidecar's fingerprint)."""
        basis = {k: getattr(self, k) for k in ("model", "num_classes", "model_kwargs", "data",
                                               "split", "mean", "std", "classes", "channels",
                                               "eval_data", "eval_split", "train_data",
                                               "train_split")}
        basis.update({k: file_identity(getattr(self, k))
                      for k in ("weights", "data", "eval_data", "train_data")})
        return basis


def sidecar(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".settings.json")


def checkpoint_for_rank(ckpt: Path, basis: Mapping[str, Any], ctx: distributed.Context
                        ) -> tuple[Path, Path | None]:
    """The checkpoint path this rank passes to compress_layer, and a private directory to delete
    afterwards (None on rank 0).

    Rank 0 owns the real one and refuses it when its sidecar records other files. Other ranks
    get a private copy of the checkpoint (broadcast, so no shared file system is needed), which
    they may write freely."""
    side = sidecar(ckpt)
    fp = fingerprint(basis)
    msg, text = None, None
    if ctx.is_main:
        if ckpt.exists():
            if same_run(side, fp, "checkpoint settings") is False:
                old = read_json(side, "checkpoint settings").get("settings")
                msg = (f"{ckpt} belongs to a run with other model/data settings "
                       f"({config_difference(old, common.jsonable(basis))}; recorded in {side}); "
                       "use another --out or --checkpoint, or delete the checkpoint to start over")
            else:
                text = ckpt.read_text()
        if msg is None:
            write_json(side, {"fingerprint": fp, "settings": common.jsonable(basis)})
    msg, text = ctx.broadcast_object((msg, text))
    if msg:
        raise ConfigError(msg)
    if ctx.is_main:
        return ckpt, None
    private = Path(tempfile.mkdtemp(prefix=f"carprune-rank{ctx.rank}-"))
    if text is not None:
        (private / "checkpoint.json").write_text(text)
    return private / "checkpoint.json", private


def checkpointed_run(s: Settings, ctx: distributed.Context, out: Path, basis: Mapping[str, Any],
                     body: Callable[[Path], Any], describe: Callable[[Any], str]) -> int:
    """Both compress paths: the checkpoint (--checkpoint or <out>/checkpoint.json) and its
    settings sidecar per rank (`checkpoint_for_rank`), `body(checkpoint path)` for the run, no
    sidecar left behind by a run that failed before its first checkpoint, and on rank 0 the
    result saved to `out` and `describe(result)` printed."""
    ckpt = Path(s.checkpoint) if s.checkpoint else out / "checkpoint.json"
    side_existed = sidecar(ckpt).exists()
    my_ckpt, private = checkpoint_for_rank(ckpt, basis, ctx)
    if ctx.is_main and my_ckpt.exists():
        log.info("resuming from %s", my_ckpt)
    try:
        result = body(my_ckpt)
    except BaseException:
        # a run that failed before its first checkpoint leaves no sidecar describing none
        if ctx.is_main and not side_existed and not ckpt.exists():
            sidecar(ckpt).unlink(missing_ok=True)
        raise
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    if ctx.is_main:
        common.save_result(result, out)
        print(describe(result), flush=True)
        print(f"result: {out / 'result.json'}", flush=True)
    ctx.barrier()
    return common.EXIT_OK


def run(settings: Mapping[str, Any], ctx: distributed.Context, run: common.Run, mode: str) -> int:
    from .. import greedy
    from ..finetune import FineTune

    s = settings_object(Settings, settings)
    if s.is_global:
        return run_global(s, ctx, mode)
    out = Path(s.out)
    model = common.load_model(s, ctx)
    data = common.load_data(s, ctx, s.data, s.split)
    data, eval_data = common.other_data(s, s.seed, ctx, "eval", s.eval_data, s.eval_split, data)
    train_data = None
    if s.finetune_iters:
        _, train_data = common.other_data(s, s.seed, ctx, "train", s.train_data, s.train_split,
                                          None)
    ft = None
    if train_data is not None:
        ft = FineTune(train_data=train_data, iters=s.finetune_iters,
                      batch_size=s.finetune_batch_size, seed=s.seed)

    def body(my_ckpt: Path) -> Any:
        with RunCallbacks(mode, interval=s.log_interval, ctx=ctx, preemptible=True,
                          threads=common.thread_governor(s, ctx)) as callbacks:
            return greedy.compress_layer(
                model, s.layer, data, eval_data=eval_data, criterion=s.criterion, metric=s.metric,
                keep=s.keep, max_drop=s.max_drop, filters_per_step=s.filters_per_step,
                score_images=s.num_images, eval_images=s.eval_images, finetune=ft,
                checkpoint=my_ckpt, lazy=s.lazy, seed=s.seed, memory_budget=s.memory_budget,
                dtype=s.torch_dtype, progress=mode == "bar" and ctx.is_main, callbacks=callbacks,
                scorer_factory=functools.partial(distributed.ShardedScorer, ctx=ctx))

    return checkpointed_run(s, ctx, out, s.files_basis(), body, summary)


def summary(result: Any) -> str:
    """One line: filters kept, the metric before and after, FLOPs and parameters."""
    first, last = result.trajectory[0], result.final_step
    if re.fullmatch(r"top\d+", result.metric):
        change = f"accuracy {100 * first.accuracy:.2f} % -> {100 * last.accuracy:.2f} %"
    else:
        change = f"{result.metric} {first.accuracy:.4g} -> {last.accuracy:.4g}"
    return (f"{result.layer}: kept {len(result.kept)} of {result.num_filters} filters "
            f"({result.compression_ratio:.2f}x), {change}, FLOPs {first.flops:,} -> {last.flops:,}, "
            f"params {first.params:,} -> {last.params:,}"
            + (f", fine-tuned {100 * result.finetuned_holdout_accuracy:.2f} %"
               if result.finetuned_holdout_accuracy is not None else ""))


# -- whole-network compression -------------------------------------------------------------------
class RoundProgress:
    """The `Callbacks` a whole-network run gets: each round of `compress_global` (algorithm
    "global") shown through `inner` (`RunCallbacks`) as one log line, or one step of the bar
    "compress global" with the FLOPs and accuracy beside it: round number, channels removed
    (unit[channel], or how many of how many units), FLOPs as a fraction of the original (and the
    target), the accuracy the run tracks, and the round's seconds. Stops are `inner`'s."""

    def __init__(self, inner: Callbacks, base_flops: int, flops_target: float | None,
                 metric: str) -> None:
        self.inner, self.base_flops = inner, base_flops
        self.flops_target, self.metric = flops_target, metric

    def start(self, message: str) -> None:
        """The run's step 0 (starts the bar, and the heartbeat in log mode)."""
        self.inner.on_event(Event("global", 0, message, data={
            "label": "compress global", "unit": " rounds", "done": 0}))

    def on_event(self, event: Event) -> None:
        if event.algorithm != "global" or "flops" not in event.data:
            self.inner.on_event(event)
            return
        d = event.data
        removed = d.get("removed", [])
        units = list(dict.fromkeys(r["unit"] for r in removed))
        what = (", ".join(f"{r['unit']}[{r['channel']}]" for r in removed) if len(removed) <= 6
                else f"{len(removed)} channels of {len(units)} units")
        frac = d["flops"] / self.base_flops
        target = f" (target {self.flops_target:g})" if self.flops_target is not None else ""
        acc = f"{self.metric} {d['accuracy']:.4f}"
        msg = (f"round {event.step}: removed {len(removed)} channel{'s' if len(removed) != 1 else ''}"
               f" ({what}); FLOPs {frac:.3f} of the original{target}; {acc}")
        self.inner.on_event(Event("global", event.step, msg, total=event.total, data={
            **d, "label": "compress global", "unit": " rounds", "done": event.step,
            "postfix": f"FLOPs {frac:.3f}{target}, {acc}"}))

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def run_global(s: Settings, ctx: distributed.Context, mode: str) -> int:
    """`compress --flops-target/--layer all`: `compress_global` over the units of --layer, the
    checkpoint and its sidecar as the one-layer path keeps them, CAR sharded across the ranks
    under torchrun (`distributed.ShardedCAR`); rank 0 writes result.json + model/ and prints
    the summary."""
    from .. import metrics
    from ..cost import count_cost
    from ..data.batches import load_batch
    from ..global_mode import compress_global
    from ..importance import CAR

    out = Path(s.out)
    model = common.load_model(s, ctx)
    data = common.load_data(s, ctx, s.data, s.split)
    data, eval_data = common.other_data(s, s.seed, ctx, "eval", s.eval_data, s.eval_split, data)
    # compress_global's own checkpoint check covers its settings, not the scoring precision
    basis = {**s.files_basis(), "mode": "global", "dtype": s.dtype}
    criterion: Any = s.criterion
    if criterion == "car":
        car = distributed.ShardedCAR if ctx.world_size > 1 else CAR
        extra = {"ctx": ctx} if ctx.world_size > 1 else {}
        criterion = car(data, num_images=s.num_images, seed=s.seed, memory_budget=s.memory_budget,
                        metric=s.metric, dtype=s.torch_dtype, **extra)
    x, _ = load_batch(data, [0])
    base_flops = count_cost(model, tuple(x.shape[1:])).total_flops
    metric_name = metrics.get_metric(s.metric).name

    def body(my_ckpt: Path) -> Any:
        with RunCallbacks(mode, interval=s.log_interval, ctx=ctx, preemptible=True,
                          threads=common.thread_governor(s, ctx)) as inner:
            callbacks = RoundProgress(inner, base_flops, s.flops_target, metric_name)
            if ctx.is_main:
                log.info("whole-network compression of %s: %s, criterion %s%s",
                         "every unit" if s.layers == "all" else ", ".join(s.layers),
                         " and ".join(t for t in (
                             f"FLOPs target {s.flops_target:g}" if s.flops_target is not None
                             else "", f"max drop {s.max_drop:g}" if s.max_drop is not None
                             else "") if t),
                         s.criterion, f", scoring across {ctx.world_size} ranks"
                         if ctx.world_size > 1 and s.criterion == "car" else "")
            callbacks.start(f"compress global: {s.layer}")
            return compress_global(
                model, s.layers, data, flops_target=s.flops_target, max_drop=s.max_drop,
                criterion=criterion, eval_data=eval_data, example_input=x,
                score_images=s.num_images, eval_images=s.eval_images, per_round=s.per_round,
                cost_aware=s.cost_aware, checkpoint=my_ckpt, memory_budget=s.memory_budget,
                seed=s.seed, metric=s.metric, callbacks=callbacks)

    return checkpointed_run(s, ctx, out, basis, body, lambda r: r.summary())
