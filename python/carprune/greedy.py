"""Greedy structural compression (the CAR paper's Algorithm 1) and its baselines.

Each CAR step re-scores every remaining filter on the current structure and removes the least
important. One `LayerScorer` serves the whole run: the activations at the cut are computed once,
and each removal updates the consumer's cached pre-activation incrementally. Baseline criteria
(random, mean_in, mean_out, l1, kse: `criteria.LayerCriterion` objects, or one of the user's)
rank the filters once (their scores do not depend on which other filters of the layer are gone;
a criterion with `rescore` re-ranks after every step) and go through the same driver, so every
curve is measured the same way. A checkpoint is written after every step; a restarted run
resumes from it.

The run itself neither prints nor reads process-wide flags: it reports each step to its
`callbacks` (`carprune.callbacks`) and asks them whether to stop right after each checkpoint is
written (raising `callbacks.Stopped`, from which the same call resumes). How the remaining
filters are scored is the scorer's business: `scorer_factory` builds it (e.g. split across
ranks, `distributed.ShardedScorer`).

`metric` (default top-1) is what CAR ranks by and what the trajectory tracks on the scoring and
hold-out splits: e.g. metric='mae' on a regression network is greedy RAR, with the hold-out
mean absolute error at every step, for every criterion. Units may be conv filters or the neurons
of a linear layer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import criteria, graph, metrics, surgery
from .callbacks import Callbacks, Event, ProgressBar, show_progress, stop_point
from .cost import count_cost
from .data.batches import DataLike, num_items, run_identity
from .engine import LayerScorer, parse_bytes
from .evaluate import metric_value
from .finetune import FineTune, finetune
from .io import config_difference, fingerprint, read_json, same_run, write_json
from .results import PrunedModelResult

CRITERIA = ("car", "random", "mean_in", "mean_out", "l1", "kse")


@dataclass
class Step:
    """One greedy step: which filters went, what they scored, and the network after it."""

    step: int
    removed: list[int]            # original filter indices removed at this step
    scores: list[float]           # their criterion value (CAR: accuracy lost, a fraction)
    kept: int                     # filters left in the layer
    score_accuracy: float         # the metric's mean on the scoring split (top-k: accuracy)
    holdout_accuracy: float | None  # the same on the hold-out split
    flops: int                    # whole network, per image (conv + linear MACs as FLOPs)
    params: int
    layer_flops: int              # the compressed layer alone (paper: k^2 n_L f^2 n_{L-1})
    layer_bytes: int              # the compressed layer's weights (paper: 4 f^2 n_{L-1} n_L)
    # (as `cost.count_cost` counts the pruned network: step 0 measured, later steps analytic)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        """The metric on the hold-out split when the run had one, else on the scoring split:
        what `max_drop` is measured by and what summaries report."""
        return self.holdout_accuracy if self.holdout_accuracy is not None else self.score_accuracy

    @property
    def accuracy_on(self) -> str:
        """Which split `accuracy` comes from: 'hold-out' or 'scoring'."""
        return "hold-out" if self.holdout_accuracy is not None else "scoring"


@dataclass
class CompressionResult(PrunedModelResult):
    """The outcome of compressing one layer: trajectory, removed/kept filters, smaller model."""

    FORMAT: ClassVar[str] = "carprune.CompressionResult"
    VERSION: ClassVar[int] = 1

    layer: str
    criterion: str
    num_filters: int
    removed: list[int]
    kept: list[int]
    trajectory: list[Step]
    config: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    finetuned_holdout_accuracy: float | None = None
    metric: str = "top1"          # what CAR ranked by and the trajectory tracks

    @property
    def compression_ratio(self) -> float:
        return self.num_filters / max(1, len(self.kept))

    @property
    def final_step(self) -> Step:
        """The trajectory step whose network `model` is: the one that left `kept` filters. With
        `max_drop` the run went one step past it (the step that fell below the floor); a result
        whose trajectory lists no such step gives its last."""
        kept = len(self.kept)
        return next((s for s in self.trajectory if s.kept == kept), self.trajectory[-1])

    def step_of(self, filt: int) -> int | None:
        """The greedy step at which original filter `filt` was removed (None: kept)."""
        for s in self.trajectory:
            if filt in s.removed:
                return s.step
        return None

    @classmethod
    def from_dict(cls, obj: dict[str, Any], model: nn.Module | None) -> CompressionResult:
        return cls(layer=obj["layer"], criterion=obj["criterion"], num_filters=obj["num_filters"],
                   removed=list(obj["removed"]), kept=list(obj["kept"]),
                   trajectory=[Step(**s) for s in obj["trajectory"]], config=obj["config"],
                   model=model, finetuned_holdout_accuracy=obj["finetuned_holdout_accuracy"],
                   metric=obj.get("metric", "top1"))


def _target_kept(num_filters: int, keep: float | int | None) -> int:
    if keep is None:
        return 1
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"keep as a fraction must lie in (0, 1], got {keep}")
        return max(1, round(keep * num_filters))
    if not 1 <= int(keep) <= num_filters:
        raise ValueError(f"keep must be between 1 and {num_filters} filters, got {keep}")
    return int(keep)


class _Tracker:
    """The metric on the scoring and hold-out splits as filters go (base sums only)."""

    def __init__(self, score: LayerScorer, holdout: LayerScorer | None) -> None:
        self.score, self.holdout = score, holdout

    def remove(self, filters: Sequence[int]) -> None:
        self.score.remove(filters)
        if self.holdout is not None:
            self.holdout.remove(filters)

    def accuracies(self) -> tuple[float, float | None]:
        s = self.score.score([]).base_value
        h = self.holdout.score([]).base_value if self.holdout is not None else None
        return s, h


def _within(value: float, limit: float | None, higher_is_better: bool) -> bool:
    """Whether `value` is no worse than `limit` (None: no limit)."""
    return limit is None or (value >= limit if higher_is_better else value <= limit)


def _base_cost(model: nn.Module, layer: str, input_shape: tuple[int, ...]
               ) -> tuple[int, int, int, int]:
    """(FLOPs, params, layer FLOPs, layer bytes) of the unpruned `model` (`count_cost`: one
    batch-1 forward, on one intra-op thread: these tiny ops only wait on each other with more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = count_cost(model, input_shape)
    finally:
        torch.set_num_threads(threads)
    lay = rep.layer(layer)
    return rep.total_flops, rep.total_params, lay.flops, lay.bytes


def _cost(base: Step, per: graph.FilterCost, removed: int) -> tuple[int, int, int, int]:
    """The cost after `removed` filters are gone: step 0's less `removed` times what one filter
    accounts for (`graph.LayerAnalysis.per_filter`; every term is linear in the count), equal to
    `count_cost` of the pruned network (tests/test_greedy.py compares them)."""
    return (base.flops - removed * per.flops, base.params - removed * per.params,
            base.layer_flops - removed * per.layer_flops,
            base.layer_bytes - removed * per.layer_bytes)


def compress_layer(
    model: nn.Module,
    layer: str,
    score_data: DataLike,
    *,
    eval_data: DataLike | None = None,
    criterion: str | criteria.LayerCriterion = "car",
    metric: str | metrics.Metric | metrics.PerSample | None = None,
    bins: int | Sequence[float] | None = None,
    keep: float | int | None = None,
    max_drop: float | None = None,
    filters_per_step: int = 1,
    score_images: int | None = None,
    eval_images: int | None = None,
    finetune: FineTune | None = None,
    checkpoint: str | os.PathLike | None = None,
    lazy: bool = False,
    seed: int = 0,
    memory_budget: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
    callbacks: Callbacks | None = None,
    scorer_factory: Callable[..., LayerScorer] | None = None,
) -> CompressionResult:
    """Greedily remove filters of conv `layer` (or neurons of linear `layer`) until `keep`
    remain (a fraction or a count; default 1) or, with `max_drop`, while the metric stays within
    a relative `max_drop` of the original: accuracy-like metrics above (1 - max_drop) x, error-like
    ones below (1 + max_drop) x (hold-out if `eval_data` is given, else the scoring split).

    criterion: 'car' re-scores every remaining filter after each removal (Algorithm 1) by the
    importance under `metric` (default top-1: CAR; 'nll', 'mse', 'mae' (RAR), a callable: see
    `score_layer`; `bins` groups regression targets); the baselines ('random', 'mean_in',
    'mean_out', 'l1', 'kse', or any `criteria.LayerCriterion` object) rank once, or, when the
    object's `rescore` is True, after every step on the network with the removed filters taken
    out (`surgery.prune_filters`; its values are then for the remaining filters in original
    order). The result and checkpoint name the criterion by the string given, or the object's
    `name`. Whatever the criterion, the trajectory tracks `metric`. `lazy` (CAR only) re-scores
    only filters that can still be the minimum, trusting earlier scores as bounds: faster, and
    measured in benchmarks/ against the default.

    `checkpoint`: a JSON file written after every step; a call with the same settings resumes
    from it (ValueError if it belongs to another run).

    `callbacks` (`carprune.callbacks.Callbacks`) get an `Event` ("greedy") when the run starts
    (step 0) and after every step, once its checkpoint is written, and a last one with
    ``data["finished"]``; right after each step's checkpoint, `should_stop()` may end the run
    with `callbacks.Stopped` (call again with the same checkpoint to resume; the result is the
    one an uninterrupted run gives). Event data: "label" ("compress <layer>"), "layer", "unit"
    ("filter"), "done"/"total" (filters removed so far / to remove), and per step "removed",
    "scores", "kept", "score_accuracy", "holdout_accuracy". Without callbacks, `progress`
    (True; None: on a terminal, as `callbacks.show_progress` decides) shows a bar
    (`callbacks.ProgressBar`).

    Each step's FLOPs and parameters (`Step`) are analytic: the unpruned network's
    (`count_cost`, once) less what the removed filters account for (`graph.analyze`'s
    `per_filter`), as `count_cost` counts the pruned network.

    `scorer_factory` builds the scorer of the scoring split (default `LayerScorer`; it is called
    with LayerScorer's arguments): ``functools.partial(distributed.ShardedScorer, ctx=ctx)``
    splits each step's scoring across torchrun ranks, ``functools.partial(LayerScorer,
    fused_head=False)`` forces the generic tail.
    """
    if isinstance(criterion, str) and criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)} "
                         "or pass a criteria.LayerCriterion object")
    if not isinstance(criterion, str):
        criteria.get_criterion(criterion)     # TypeError unless a LayerCriterion
    if filters_per_step < 1:
        raise ValueError(f"filters_per_step must be >= 1, got {filters_per_step}")
    if max_drop is not None and not 0 <= max_drop < 1:
        raise ValueError(f"max_drop is a relative accuracy drop in [0, 1), got {max_drop}")
    if lazy and not (isinstance(criterion, str) and criterion == "car"):
        raise ValueError("lazy re-scoring applies to the 'car' criterion only")
    own = None
    if callbacks is None and show_progress(progress):
        callbacks = own = ProgressBar(f"compress {layer}", unit="filter")
    try:
        return _compress_layer(model, layer, score_data, eval_data, criterion, metric, bins, keep,
                               max_drop, filters_per_step, score_images, eval_images, finetune,
                               checkpoint, lazy, seed, memory_budget, dtype, callbacks,
                               scorer_factory or LayerScorer)
    finally:
        if own is not None:
            own.close()


def _compress_layer(model, layer, score_data, eval_data, criterion, metric, bins, keep, max_drop,
                    filters_per_step, score_images, eval_images, finetune, checkpoint, lazy, seed,
                    memory_budget, dtype, callbacks, make_scorer) -> CompressionResult:
    # the score and hold-out scorers live side by side for the whole run: they share the budget
    share = parse_bytes(memory_budget) // (1 if eval_data is None else 2)
    scorer = make_scorer(model, layer, score_data, num_images=score_images, seed=seed,
                         memory_budget=share, dtype=dtype, progress=False, metric=metric, bins=bins)
    holdout = None
    if eval_data is not None:
        holdout = LayerScorer(model, layer, eval_data, num_images=eval_images, seed=seed,
                              memory_budget=share, dtype=dtype, progress=False, metric=metric,
                              bins=bins)
    measure = scorer.metric
    if finetune is not None and scorer.bound.grouping.kind != "class":
        raise ValueError("fine-tuning trains with cross-entropy on class labels; these targets "
                         "are regression targets, so compress without finetune=")
    n = scorer.num_filters
    target = _target_kept(n, keep)
    input_shape = tuple(_input_shape(score_data))
    analysis = graph.analyze(model, layer, torch.zeros(1, *input_shape))
    # CAR: the scorer; any other criterion: its object (built-ins keep their names in config)
    rank = None if isinstance(criterion, str) and criterion == "car" else \
        criteria.get_criterion(criterion, seed=seed)
    label = criterion if isinstance(criterion, str) else rank.name
    config = {"layer": layer, "criterion": label, "keep": keep, "max_drop": max_drop,
              "filters_per_step": filters_per_step, "score_images": len(scorer.indices),
              "eval_images": len(holdout.indices) if holdout is not None else None,
              "score_size": num_items(score_data),
              "eval_size": num_items(eval_data) if eval_data is not None else None,
              "lazy": lazy, "seed": seed, "dtype": str(dtype),
              "finetune": finetune.describe() if finetune is not None else None}
    if measure.name != "top1" or bins is not None:   # (top-1 runs keep their fingerprints)
        config.update(metric=measure.name, bins=bins if not hasattr(bins, "__len__") else list(bins))
    if checkpoint is not None:   # a checkpoint resumes only the same model on the same images
        config.update(run_identity(model, score_data, score_images, eval_data, eval_images, seed))
    fp = fingerprint(config)
    tracker = _Tracker(scorer, holdout)
    trajectory: list[Step] = []
    ckpt = Path(checkpoint) if checkpoint is not None else None
    same = same_run(ckpt, fp, "checkpoint", strict=True) if ckpt is not None else None
    if same is False:
        raise ValueError(f"checkpoint {ckpt} belongs to a different run ("
                         f"{config_difference(read_json(ckpt, 'checkpoint').get('config'), config)}"
                         "); use another path, or delete it to start over")
    if same:
        state = read_json(ckpt, "checkpoint")
        trajectory = [Step(**s) for s in state["trajectory"]]
        for s in trajectory[1:]:
            tracker.remove(s.removed)
    if not trajectory:
        acc_s, acc_h = tracker.accuracies()
        fl, pa, lf, lb = _base_cost(model, layer, input_shape)
        trajectory.append(Step(0, [], [], n, acc_s, acc_h, fl, pa, lf, lb))
    base_acc = trajectory[0].accuracy
    better = measure.higher_is_better
    floor = None if max_drop is None else (1 - max_drop if better else 1 + max_drop) * base_acc
    order = None
    if rank is not None and not rank.rescore:
        imp = criteria.filter_importance(analysis, layer, rank, seed=seed)
        order = sorted(range(n), key=lambda f: (float(imp[f]), f))
    per_filter = analysis.per_filter
    del analysis  # (its traced copy of the model is not needed any more)
    stale: dict[int, float] = {}
    head = {"label": f"compress {layer}", "layer": layer, "unit": "filter", "total": n - target}
    if callbacks is not None:
        callbacks.on_event(Event("greedy", 0, f"compress {layer}: {n} filters, {n - target} to "
                                 f"remove, {len(trajectory) - 1} steps done",
                                 data={**head, "done": n - len(scorer.alive)}))
    while True:
        alive = scorer.alive
        last = trajectory[-1]
        if len(alive) <= target:
            break
        if floor is not None and not _within(last.accuracy, floor, better):
            break
        t0 = time.perf_counter()
        k = min(filters_per_step, len(alive) - target)
        if rank is None:
            picks, vals = _car_pick(scorer, alive, k, lazy, stale)
        elif rank.rescore:
            now = _rescore(model, layer, rank, scorer.removed, alive, input_shape)
            picks = sorted(alive, key=lambda f: (now[f], f))[:k]
            vals = [now[f] for f in picks]
        else:
            gone = set(scorer.removed)
            picks = [f for f in order if f not in gone][:k]
            vals = [float(imp[f]) for f in picks]
        tracker.remove(picks)
        acc_s, acc_h = tracker.accuracies()
        fl, pa, lf, lb = _cost(trajectory[0], per_filter, len(scorer.removed))
        step = Step(len(trajectory), picks, vals, len(alive) - len(picks), acc_s, acc_h, fl, pa,
                    lf, lb, time.perf_counter() - t0)
        trajectory.append(step)
        if ckpt is not None:
            write_json(ckpt, {"fingerprint": fp, "config": config,
                              "trajectory": [asdict(s) for s in trajectory]})
        if callbacks is not None:
            callbacks.on_event(Event(
                "greedy", step.step, _step_message(layer, step, n, label, measure),
                data={**head, "done": n - step.kept, "removed": picks, "scores": vals,
                      "kept": step.kept, "score_accuracy": acc_s, "holdout_accuracy": acc_h}))
            stop_point(callbacks, f"step {step.step} of {layer}")
    # with a floor, the final model is the last step that stayed above it
    final = len(trajectory) - 1
    if floor is not None:
        ok = [s.step for s in trajectory if _within(s.accuracy, floor, better)]
        final = max(ok) if ok else 0
    removed = [f for s in trajectory[1:final + 1] for f in s.removed]
    kept = [f for f in range(n) if f not in set(removed)]
    pruned = surgery.prune_filters(model, layer, removed) if removed else surgery.copy_model(model)
    result = CompressionResult(layer=layer, criterion=label, num_filters=n, removed=removed,
                               kept=kept, trajectory=trajectory, config=config, model=pruned,
                               metric=measure.name)
    if callbacks is not None:
        callbacks.on_event(Event("greedy", len(trajectory) - 1,
                                 f"compress {layer}: kept {len(kept)} of {n} filters",
                                 data={**head, "done": n - len(kept), "finished": True}))
    if finetune is not None:   # its epochs are events of their own ("finetune")
        del tracker, scorer, holdout  # release the cached activations before fine-tuning
        _finetune_and_evaluate(result, finetune, eval_data, eval_images, seed, callbacks,
                               memory_budget, measure)
    return result


def _step_message(layer: str, step: Step, n: int, criterion: str, measure: metrics.Metric) -> str:
    """One line for a batch log: which filters went, with their score, and how many are left."""
    if criterion == "car" and measure.name.startswith("top"):
        what = [f"{f} (CAR {100 * v:+.2f} pts)" for f, v in zip(step.removed, step.scores, strict=True)]
    elif criterion == "car":
        what = [f"{f} ({measure.name} importance {v:+.4g})"
                for f, v in zip(step.removed, step.scores, strict=True)]
    else:
        what = [f"{f} ({criterion} {v:.4g})" for f, v in zip(step.removed, step.scores, strict=True)]
    return f"{layer}: removed filter {', '.join(what)}; {step.kept} of {n} left"


def _rescore(model: nn.Module, layer: str, rank: criteria.LayerCriterion, removed: list[int],
             alive: list[int], input_shape: tuple[int, ...]) -> dict[int, float]:
    """A re-scoring criterion's value of each filter in `alive` (original numbers, ascending) on
    `model` with `removed` taken out physically (the pruned layer numbers `alive` in order)."""
    net = surgery.prune_filters(model, layer, removed) if removed else model
    v = criteria.filter_importance(graph.analyze(net, layer, torch.zeros(1, *input_shape)), None,
                                   rank)
    return dict(zip(alive, v.tolist(), strict=True))


def _input_shape(data: DataLike) -> tuple[int, ...]:
    from .data.batches import load_batch

    x, _ = load_batch(data, [0])
    return tuple(x.shape[1:])


def _car_pick(scorer, alive: list[int], k: int, lazy: bool, stale: dict[int, float]
              ) -> tuple[list[int], list[float]]:
    """The k filters of lowest importance (CAR for top-1) on the current structure (ties: lower
    index)."""
    if not lazy or not stale:
        s = scorer.score(alive)
        car = s.importance.tolist()
        stale.clear()
        stale.update({int(f): c for f, c in zip(s.filters.tolist(), car, strict=True)})
        order = s.order()[:k].tolist()
        return [int(s.filters[i]) for i in order], [car[i] for i in order]
    # lazy: re-score the stalest-lowest candidates until the fresh minimum is no larger than
    # every remaining stale score (exact if removals never lowered another filter's CAR).
    fresh: dict[int, float] = {}
    for f in list(stale):
        if f not in alive:
            del stale[f]
    while True:
        cand = sorted((f for f in alive if f not in fresh), key=lambda f: (stale[f], f))
        picked = sorted(fresh.items(), key=lambda t: (t[1], t[0]))[:k]
        if len(picked) == k and (not cand or picked[-1][1] <= stale[cand[0]]):
            break
        batch = cand[:max(k, 4)]
        s = scorer.score(batch)
        for f, c in zip(s.filters.tolist(), s.importance.tolist(), strict=True):
            fresh[int(f)] = c
            stale[int(f)] = c
    return [f for f, _ in picked], [c for _, c in picked]


def _finetune_and_evaluate(result: CompressionResult, cfg: FineTune, eval_data, eval_images, seed,
                           callbacks, memory_budget, metric=None) -> None:
    finetune(result.model, result.layer, cfg, callbacks)
    if eval_data is not None:
        result.finetuned_holdout_accuracy = metric_value(
            result.model, eval_data, metric=metric, num_images=eval_images, seed=seed,
            memory_budget=memory_budget)
