"""``carprune score``: CAR and class-wise CAR_c (or the importance under --metric) of every
filter of one or more layers.

Writes ``scores.npz`` (`LayerScores`) and ``scores.json`` (the same in JSON, the fingerprint of
the settings, the scoring plan) into --out, or one directory per layer with ``--layer all`` or a
list (plus an index ``scores.json``). A layer whose ``scores.json`` carries the same fingerprint
is not scored again, so a stopped multi-layer run resumes where it stopped. Under torchrun the
filters are split across ranks (`distributed.ShardedScorer`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import distributed, graph
from ..callbacks import stop_point
from ..config import Option, settings_object
from ..graph import CutError
from ..io import file_identity, fingerprint, read_json, same_run, write_json
from ..logging_utils import RunCallbacks, format_seconds, heartbeat, log
from ..scores import LayerScores
from . import _common as common

NAME = "score"
HELP = "CAR and class-wise CAR_c of every filter of conv layer(s)"
DISTRIBUTED = True
CHECKPOINTED = True


def options() -> list[Option]:
    return common.common_options() + common.MODEL_OPTS + common.data_options() + \
        common.SCORING_OPTS + [
            Option("layer", "strs", None, "conv or linear layer(s) to score, comma-separated, or "
                   "'all' (every conv layer)",
                   required=True),
            Option("filters", "ints", None, "score only these filters (default: all)"),
            Option("removed", "ints", None, "filters to treat as already removed"),
            Option("topk", "int", 1, "a prediction counts as correct if the label is in the top k "
                   "(when --metric is not given)", minimum=1),
            Option("screen", "str", None, "run the tails in bfloat16 and again in float32 where a "
                   "verdict is in doubt (faster on CPUs with AMX; a measured bound, not an exact "
                   "one: see carprune.screen)", choices=("bf16",)),
        ]


@dataclass(frozen=True, kw_only=True)
class Settings(common.ScoringSettings, common.DataSettings, common.ModelSettings,
               common.CommonSettings):
    # (bases in reverse: the fields, and so scores.json's settings, follow the options' order)
    data: str
    layer: tuple[str, ...]
    filters: tuple[int, ...] | None
    removed: tuple[int, ...] | None
    topk: int
    screen: str | None

    def fingerprint_basis(self) -> dict[str, Any]:
        """What determines a layer's scores: a rerun with the same basis resumes."""
        basis = {k: getattr(self, k) for k in ("model", "num_classes", "model_kwargs", "data",
                                               "split", "mean", "std", "classes", "channels",
                                               "num_images", "seed", "filters", "removed", "topk",
                                               "dtype")}
        if self.metric is not None:   # (runs without --metric keep their fingerprints)
            basis["metric"] = self.metric
        if self.screen is not None:
            basis["screen"] = self.screen
        basis["weights"] = file_identity(self.weights)
        basis["data"] = file_identity(self.data)
        return basis

    def same_scores(self, record: Path, fp: str, layer: str) -> bool:
        """Whether `record` (a scores.json) holds `layer`'s scores from a run with fingerprint
        `fp` (the fingerprint leaves the layer out: one run's layers share it)."""
        if not (record.with_name("scores.npz").is_file() and same_run(record, fp, "scores")):
            return False
        return read_json(record, "scores").get("layer") == layer


def layers_of(model: nn.Module, wanted: Sequence[str]) -> tuple[list[str], bool]:
    """The layers to score, and whether they are 'all' (then a layer without a cut is skipped)."""
    if [w.lower() for w in wanted] == ["all"]:
        return graph.conv_layers(model), True
    return list(wanted), False


def run(settings: Mapping[str, Any], ctx: distributed.Context, run: common.Run, mode: str) -> int:
    s = settings_object(Settings, settings)
    out = Path(s.out)
    model = common.load_model(s, ctx)
    data = common.load_data(s, ctx, s.data, s.split)
    layers, every = layers_of(model, s.layer)
    fp = fingerprint(s.fingerprint_basis())
    multi = len(layers) > 1
    done: list[str] = []
    callbacks = RunCallbacks(mode, interval=s.log_interval, ctx=ctx, preemptible=True,
                             threads=common.thread_governor(s, ctx))
    for i, layer in enumerate(layers):
        callbacks.recheck_threads()   # scoring sends no events: between layers
        d = out / common.safe_name(layer) if multi else out
        prev = d / "scores.json"
        same = ctx.is_main and s.same_scores(prev, fp, layer)
        if ctx.broadcast_object(same):  # rank 0 decides: other nodes may not see its files
            log.info("%s: already scored in %s (resuming)", layer, d)
            if ctx.is_main:
                print(LayerScores.load(d / "scores.npz").summary(), flush=True)
            done.append(layer)
            continue
        try:
            scorer = distributed.ShardedScorer(
                model, layer, data, ctx=ctx, num_images=s.num_images, seed=s.seed,
                memory_budget=s.memory_budget, device=ctx.device, dtype=s.torch_dtype, topk=s.topk,
                metric=s.metric, screen=s.screen, progress=mode == "bar" and ctx.is_main)
        except CutError as exc:
            if not every:
                raise
            log.warning("skipping %s: %s", layer, exc)
            continue
        if s.removed:
            scorer.remove(s.removed)
        n = len(s.filters) if s.filters is not None else len(scorer.alive)
        log.info("%s: plan\n  %s", layer, scorer.describe().replace("\n", "\n  "))
        log.info("%s: scoring %d filters on %d images%s", layer, n, len(scorer.indices),
                 f" across {ctx.world_size} ranks" if ctx.world_size > 1 else "")
        t0 = time.monotonic()
        with heartbeat(f"scoring {layer}", s.log_interval, mode == "log" and ctx.is_main):
            res = scorer.score(s.filters)
        seconds = time.monotonic() - t0
        log.info("%s: scored in %s", layer, format_seconds(seconds))
        if ctx.is_main:
            res.save(d / "scores.npz")
            doc = scores_doc(res, fp, s)
            doc.update(seconds=round(seconds, 3), world_size=ctx.world_size,
                       path=scorer.path, plan=scorer.describe())
            write_json(prev, doc)  # last: marks the layer complete
            print(res.summary(), flush=True)
        done.append(layer)
        ctx.barrier()
        if i < len(layers) - 1:
            stop_point(callbacks, f"scoring {layer} ({len(done)} of {len(layers)} layers done)")
    if multi and ctx.is_main:
        write_json(out / "scores.json", {"format": "carprune.scores-index", "fingerprint": fp,
                                         "layers": {lay: f"{common.safe_name(lay)}/scores.npz"
                                                    for lay in done}})
    return common.EXIT_OK


def scores_doc(s: LayerScores, fp: str, settings: Settings) -> dict[str, Any]:
    """scores.json: the scores in JSON, least important first, with the settings."""
    order = s.order().tolist()
    return {
        "format": "carprune.scores", "layer": s.layer, "fingerprint": fp,
        "num_images": s.num_images, "topk": s.topk, "classes": s.classes,
        "removed": s.removed, "metric": s.metric, "higher_is_better": s.higher_is_better,
        "base_value": s.base_value, "filters": s.filters.tolist(),
        "importance": s.importance.tolist(), "importance_c": s.importance_c.tolist(),
        "value": s.value.tolist(),
        # the CAR names, for top-k accuracy
        **({"base_accuracy": s.base_accuracy, "car": s.car.tolist(), "car_c": s.car_c.tolist(),
            "accuracy": s.accuracy.tolist()} if s.is_accuracy else {}),
        "least_important_first": [int(s.filters[i]) for i in order],
        "settings": common.jsonable(settings),
    }
