"""Compression across several layers: in sequence (`compress_layers`: one greedy run per layer,
each on the result of the last), and globally over whole-network units (`compress_global`).

Global greedy compression (`compress_global`) works on units (`carprune.units`): every group of
channels that must go together (a conv's filters, a residual stream's channel in every conv
that adds into it, a squeeze-excite gate with its channel, concatenated channels). Each ROUND:

1. every remaining channel of every candidate unit is scored on the network as it is now,
   physically pruned (CAR by default, exact, through the engine: `importance.CAR`);
2. each channel's cost is the FLOPs its removal saves now, analytically (`UnitAnalysis.cost`;
   no surgery is run just to count FLOPs);
3. channels are ranked by importance per FLOP saved (lowest first; a channel whose removal
   loses nothing, or gains, ranks before all others, larger savings first), and the round removes
   the first-ranked one (`per_round=1`, the default: strict greedy). `per_round=k` removes the
   first-ranked channel of up to k different units (at most ONE channel per unit per round:
   removing several channels of one layer on the same scores is known to go wrong). That is an
   option, not the default: on ResNet-20 to 0.9 FLOPs (200 scoring images) k = 3 ran 1.9x
   faster but shared 2 of 17 choices with strict greedy and lost 4.4 more points of hold-out;
4. the network is pruned physically (`surgery.prune_units`) and the next round re-scores.

The run stops when the FLOPs reach `flops_target` x the original, or before the round that
would take the metric beyond a relative `max_drop` of the original, as `compress_layer` measures
it (accuracy-like metrics below (1 - max_drop) x, error-like ones above (1 + max_drop) x; hold-out
split if given, else the scoring split; that round is undone, or, when it removes several
channels (`per_round` > 1, or a criterion that is not re-scored, which takes its whole ranking in
one round), it keeps the longest prefix of its order within `max_drop`, found by bisection), or
when no unit can lose another channel (`min_channels`). A JSON checkpoint is written after every
round; the same call resumes from it (after the end too: it records why the run stopped). The run
reports each round to its `callbacks` and stops (raising `callbacks.Stopped`) when they ask, right
after a checkpoint.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import metrics, surgery
from .callbacks import Callbacks, Event, stop_point
from .data.batches import DataLike, load_batch, run_identity
from .evaluate import metric_value
from .greedy import CompressionResult, compress_layer
from .importance import CAR, Importance, get_importance
from .io import config_difference, fingerprint, read_json, same_run, write_json
from .results import PrunedModelResult
from .units import UnitAnalysis, prunable_units


def compress_layers(model: nn.Module, layers: list[str], score_data: DataLike, **kwargs: Any
                    ) -> list[CompressionResult]:
    """Compress `layers` one after another, each greedy run on the model the previous produced.

    Keyword arguments are those of `compress_layer`; a `checkpoint` path gets the layer name
    appended so each layer resumes on its own."""
    ckpt = kwargs.pop("checkpoint", None)
    results = []
    current = model
    for layer in layers:
        path = None if ckpt is None else f"{ckpt}.{layer}"
        res = compress_layer(current, layer, score_data, checkpoint=path, **kwargs)
        results.append(res)
        current = res.model
    return results


@dataclass
class RemovedChannel:
    """One channel removed in a round: `channel` numbers the unit's ORIGINAL channels."""

    unit: str
    channel: int
    importance: float      # the criterion's value when chosen (CAR: accuracy lost, a fraction)
    flops_saved: int       # per image, when it was removed


@dataclass
class GlobalRound:
    """One round of global compression and the network after it."""

    round: int
    removed: list[RemovedChannel]
    flops: int                      # conv + linear multiply-accumulates per image, after the round
    params: int
    score_accuracy: float           # the metric's mean on the scoring split (top-k: accuracy)
    holdout_accuracy: float | None
    seconds: float = 0.0            # the whole round
    score_seconds: float = 0.0      # of which scoring
    image_ablations: int = 0        # (image, channel) ablations scored (the cost model)
    ablations_run: int = 0          # of which evaluated (the rest: channel all zero, exact skip)
    tail_flops: float = 0.0         # floating-point operations (2 per MAC) of the tails run
    tail_seconds: float = 0.0
    ablations_full: int = 0         # what scoring every candidate on every image would have been
                                    # (more than image_ablations when the exact search ran)
    screened: int = 0               # tail rows through the bfloat16 screen (`carprune.screen`)
    rechecked: int = 0              # of which computed again in float32 (in doubt, or audited)

    @property
    def accuracy(self) -> float:
        """Hold-out when the run had one, else scoring: what `max_drop` is measured by."""
        return self.holdout_accuracy if self.holdout_accuracy is not None else self.score_accuracy

    @property
    def gflops(self) -> float:
        """Tail throughput of the round's scoring in GFLOP/s (compare with the machine's fp32
        GEMM throughput: 98 GFLOP/s on 2 threads here)."""
        return self.tail_flops / self.tail_seconds / 1e9 if self.tail_seconds > 0 else 0.0


@dataclass
class GlobalCompressionResult(PrunedModelResult):
    """The outcome of a global run: per-round choices across units, removed channels, the
    physically pruned model (`save` / `load(directory, original_architecture)`)."""

    FORMAT: ClassVar[str] = "carprune.GlobalCompressionResult"
    VERSION: ClassVar[int] = 2

    units: list[str]
    criterion: str
    flops_target: float | None
    max_drop: float | None
    trajectory: list[GlobalRound]
    removed: dict[str, list[int]]   # unit -> original channel indices removed, in removal order
    base_flops: int
    base_params: int
    base_score_accuracy: float
    base_holdout_accuracy: float | None
    input_shape: list[int]
    stopped: str = ""               # why the run ended
    config: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], model: nn.Module | None) -> GlobalCompressionResult:
        rounds = [GlobalRound(**{**r, "removed": [RemovedChannel(**c) for c in r["removed"]]})
                  for r in obj["trajectory"]]
        return cls(**{**obj, "trajectory": rounds}, model=model)

    @property
    def flops(self) -> int:
        return self.trajectory[-1].flops if self.trajectory else self.base_flops

    @property
    def flops_ratio(self) -> float:
        """FLOPs after / before."""
        return self.flops / self.base_flops

    def summary(self) -> str:
        acc = self.trajectory[-1] if self.trajectory else None
        split = "hold-out" if self.base_holdout_accuracy is not None else "scoring"
        base = (self.base_holdout_accuracy if self.base_holdout_accuracy is not None
                else self.base_score_accuracy)
        lines = [f"global {self.criterion}: {len(self.trajectory)} rounds, "
                 f"{sum(len(v) for v in self.removed.values())} channels removed; FLOPs "
                 f"{self.flops:,} of {self.base_flops:,} ({self.flops_ratio:.3f}); {split} "
                 f"{base:.4f} -> {acc.accuracy if acc else base:.4f}; stopped: {self.stopped}"]
        for u in self.units:
            if self.removed.get(u):
                lines.append(f"  {u}: {len(self.removed[u])} removed")
        return "\n".join(lines)


def _resolve_units(analysis: UnitAnalysis, layers: str | Sequence[str]) -> list[str]:
    """'all', or unit names / names of layers that produce a unit's channels."""
    if isinstance(layers, str):
        if layers == "all":
            return [u.name for u in analysis.units]
        layers = [layers]
    if not layers:
        raise ValueError("compress_global needs 'all' or at least one layer or unit name")
    out: list[str] = []
    for name in layers:
        hit = [u.name for u in analysis.units if u.name == name] or \
            [u.name for u in analysis.units if name in u.producers]
        if not hit:
            skipped = dict(analysis.skipped)
            why = f" ({skipped[name]})" if name in skipped else ""
            raise ValueError(f"{name!r} is neither a unit nor a layer that writes one{why}; the "
                             f"units are: {', '.join(u.name for u in analysis.units)}")
        out.extend(h for h in hit if h not in out)
    return out


def _current_model(model: nn.Module, analysis: UnitAnalysis, removed: dict[str, list[int]],
                   x: torch.Tensor) -> nn.Module:
    """`model` with the ORIGINAL channels `removed` taken out physically."""
    rem = {u: sorted(c) for u, c in removed.items() if c}
    if not rem:
        return surgery.copy_model(model).eval()
    return surgery.prune_units(model, rem, x, analysis=analysis).eval()


def rank_key(val: float, saved: int, cost_aware: bool) -> tuple:
    """A channel's place in a round (lowest first): importance per FLOP saved; a channel whose
    removal loses nothing (or gains) before all others, the larger saving first. Never
    decreases when `val` grows (what `importance.CAR.search` needs)."""
    if not cost_aware:
        return (val, 0)
    if val > 0:
        return (val / max(1, saved), -saved)
    return (val * saved, -saved)


def _check_types(**values: tuple[Any, type, bool]) -> None:
    """Each keyword's (value, type, None allowed): a bool where a number is wanted, or a
    number where a bool is, is refused too."""
    for name, (v, kind, optional) in values.items():
        if v is None and optional:
            continue
        ok = isinstance(v, bool) if kind is bool else (not isinstance(v, bool) and isinstance(
            v, numbers.Integral if kind is int else numbers.Real))
        if not ok:
            want = {bool: "True or False", int: "an integer", float: "a number"}[kind]
            raise TypeError(f"{name} must be {want}{' or None' if optional else ''}, got {v!r}")


def compress_global(
    model: nn.Module,
    layers: str | Sequence[str],
    score_data: DataLike,
    *,
    flops_target: float | None = None,
    max_drop: float | None = None,
    criterion: str | Importance = "car",
    eval_data: DataLike | None = None,
    example_input: torch.Tensor | None = None,
    score_images: int | None = None,
    eval_images: int | None = None,
    per_round: int | None = None,
    cost_aware: bool = True,
    min_channels: int = 1,
    search: bool = True,
    checkpoint: str | os.PathLike | None = None,
    memory_budget: int | str | None = None,
    seed: int = 0,
    metric: str | metrics.Metric | metrics.PerSample | None = None,
    bins: int | Sequence[float] | None = None,
    screen: str | None = None,
    callbacks: Callbacks | None = None,
    strict: bool = True,
) -> GlobalCompressionResult:
    """Remove unit channels across the network until its FLOPs are at most `flops_target` x
    the original (and/or until the next round would drop the metric by more than the relative
    `max_drop`, as in `compress_layer`), each round taking
    the channels with the lowest importance per FLOP saved, at most one per unit (see the module
    docstring).

    `layers`: 'all' (every unit of the network), or unit names / names of layers whose
    channels they are. `criterion`: 'car' (default; exact, on `score_data`), 'l1', 'l2',
    'random', or an `importance.Importance` object. `per_round`: the most channels a round
    removes (default 1: strict greedy, full re-scoring after every channel; more per round is a
    faster shortcut that changes choices: measured in the README); criteria that are not
    re-scored (weight magnitudes, random) rank all channels once and remove them in that order
    without the one-per-unit limit, as one-shot global pruning does (with `max_drop`, the
    longest prefix of that order within it, by bisection). `cost_aware`: rank by
    importance per FLOP saved (default) or by importance alone. `example_input`: a batch with
    the input shape (default: the first scoring image). `metric`/`bins` as `score_layer`: what
    CAR ranks by and what the trajectory tracks. `search`: a criterion with a `search` method
    (CAR on a top-k metric) scores only what can change the round's choice, with an exact bound
    (`importance.CAR.search`): the same choices as scoring every channel, fewer image-ablations;
    False scores every channel on every image. `screen='bf16'` (criterion 'car' only): CAR's
    tails run in bfloat16 and again in float32 where a verdict is in doubt (`carprune.screen`:
    faster on CPUs with AMX; a measured bound, not an exact one, so off by default).
    `strict=False`: ops without a channel rule leave the channels they read or write out of
    the units instead of raising `units.UnitError` (as `prunable_units`).
    """
    _check_types(flops_target=(flops_target, float, True), max_drop=(max_drop, float, True),
                 score_images=(score_images, int, True), eval_images=(eval_images, int, True),
                 per_round=(per_round, int, True), min_channels=(min_channels, int, False),
                 seed=(seed, int, False), cost_aware=(cost_aware, bool, False),
                 search=(search, bool, False), strict=(strict, bool, False))
    for name, n in (("score_images", score_images), ("eval_images", eval_images)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be >= 1 (or None: every image), got {n}")
    if flops_target is None and max_drop is None:
        raise ValueError("compress_global needs flops_target (a fraction of the FLOPs in (0, 1)) "
                         "or max_drop (the largest relative drop of the metric), or both")
    if flops_target is not None and not 0 < flops_target < 1:
        raise ValueError(f"flops_target is a fraction of the original FLOPs in (0, 1), got "
                         f"{flops_target}")
    if max_drop is not None and not 0 <= max_drop < 1:
        raise ValueError(f"max_drop is a relative drop of the metric in [0, 1), got {max_drop}")
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    if per_round is not None and per_round < 1:
        raise ValueError(f"per_round must be >= 1, got {per_round}")
    model = model.eval()
    if example_input is None:
        example_input, _ = load_batch(score_data, [0])
    x = example_input[:1]
    analysis = prunable_units(model, x, strict=strict)
    names = _resolve_units(analysis, layers)
    if screen is not None and criterion != "car":
        raise ValueError(f"screen={screen!r} screens CAR's scoring; criterion is {criterion!r} "
                         "(pass screen to the importance object you built, or criterion='car')")
    extra = {"screen": screen} if screen is not None else {}
    imp = get_importance(criterion, score_data, seed=seed, num_images=score_images,
                         memory_budget=memory_budget, metric=metric, bins=bins, **extra)
    per_round = per_round or 1
    metric_name = metrics.get_metric(metric).name
    higher = metrics.get_metric(metric).higher_is_better
    config = {"units": names, "criterion": imp.name, "flops_target": flops_target,
              "max_drop": max_drop, "score_images": score_images, "eval_images": eval_images,
              "per_round": per_round, "cost_aware": cost_aware, "min_channels": min_channels,
              "seed": seed,
              "metric": metric_name, "bins": bins if not hasattr(bins, "__len__") else list(bins),
              "input_shape": list(x.shape[1:]), **extra}
    if checkpoint is not None:   # a checkpoint resumes only the same model on the same images
        config.update(run_identity(model, score_data, score_images, eval_data, eval_images, seed))
    fp = fingerprint(config)
    base_flops, _ = analysis.cost()
    base_params = analysis.total_params()
    removed: dict[str, list[int]] = {u: [] for u in names}
    trajectory: list[GlobalRound] = []
    finished = ""
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and same_run(ckpt, fp, "checkpoint", strict=True) is not None:
        if not same_run(ckpt, fp, "checkpoint", strict=True):
            old = read_json(ckpt, "checkpoint").get("config")
            raise ValueError(f"checkpoint {ckpt} belongs to a different run "
                             f"({config_difference(old, config)}); use another path, or delete "
                             "it to start over")
        state = read_json(ckpt, "checkpoint")
        trajectory = [GlobalRound(**{**r, "removed": [RemovedChannel(**c) for c in r["removed"]]})
                      for r in state["trajectory"]]
        for r in trajectory:
            for c in r.removed:
                removed[c.unit].append(c.channel)
        finished = state.get("stopped", "")   # the run had ended: the same result again

    def evaluate(m: nn.Module) -> tuple[float, float | None]:
        # the metric's mean as the engine counts it (`evaluate.metric_value`)
        s = metric_value(m, score_data, metric=metric, bins=bins, num_images=score_images,
                         seed=seed, memory_budget=memory_budget)
        h = (metric_value(m, eval_data, metric=metric, bins=bins, num_images=eval_images,
                          seed=seed, memory_budget=memory_budget)
             if eval_data is not None else None)
        return s, h

    base_s, base_h = evaluate(model)
    base_acc = base_h if base_h is not None else base_s

    def within(acc_s: float, acc_h: float | None) -> bool:
        """Whether a network measured at (`acc_s`, `acc_h`) is within `max_drop`."""
        acc = acc_h if acc_h is not None else acc_s
        return max_drop is None or (acc >= (1 - max_drop) * base_acc if higher
                                    else acc <= (1 + max_drop) * base_acc)

    target = None if flops_target is None else flops_target * base_flops
    cb = callbacks
    stopped = finished
    static: dict[str, torch.Tensor] | None = None   # criteria that never change: scored once
    current: nn.Module | None = None                # the pruned network for `removed`
    reuse = isinstance(imp, CAR)   # its search keeps the last round's large tensors
    try:
        while not finished:
            flops = analysis.cost(removed)[0]
            if target is not None and flops <= target:
                stopped = f"FLOPs {flops:,} reached the target {target:,.0f}"
                break
            t0 = time.perf_counter()
            if current is None:       # the network as the last accepted round left it
                current = _current_model(model, analysis, removed, x)
            cur_an = prunable_units(current, x, strict=strict)
            alive = {u: [c for c in range(analysis.unit(u).num_channels) if c not in set(removed[u])]
                     for u in names}
            cand_units = [u for u in names if len(alive[u]) > min_channels]
            if not cand_units:
                stopped = f"no unit has more than min_channels={min_channels} channels left"
                break
            ts = time.perf_counter()
            saved_now = {u: analysis.saved_flops(u, removed) for u in cand_units}

            def rank(u: str, c: int, val: float, saved_now: dict = saved_now,
                     alive: dict = alive) -> tuple:
                """The order of the round (lowest first): see the module docstring."""
                return (rank_key(val, saved_now[u], cost_aware), names.index(u), alive[u][c])

            searched: dict = {}
            if imp.rescore and search and hasattr(imp, "search"):
                values = imp.search(current, cur_an, cand_units, rank, picks=per_round,
                                    **({"keep_buffers": True} if reuse else {}))
                searched = getattr(imp, "last_search", None) or {}
            elif imp.rescore or static is None:
                values = imp(current, cur_an, cand_units)
                if not imp.rescore:
                    # current numbering -> original channel numbers, kept for later rounds
                    static = {u: dict(zip(alive[u], v.tolist(), strict=True)) for u, v in values.items()}
            else:
                values = {u: torch.tensor([static[u][c] for c in alive[u]], dtype=torch.float64)
                          for u in cand_units}
            score_s = time.perf_counter() - ts
            cands = []
            for u in cand_units:
                for j, c in enumerate(alive[u]):
                    val = float(values[u][j])
                    if val != val:   # NaN: proven not to be chosen this round (the search)
                        continue
                    cands.append((rank(u, j, val), c, u, val))
            cands.sort()
            chosen: list[RemovedChannel] = []
            trial = {u: list(c) for u, c in removed.items()}
            for _rank, c, u, value in cands:
                if imp.rescore and any(r.unit == u for r in chosen):
                    continue            # re-scored criteria: at most one channel per unit per round
                if len(alive[u]) - len(trial[u]) + len(removed[u]) <= min_channels:
                    continue
                saved = analysis.saved_flops(u, trial)
                trial[u].append(c)
                chosen.append(RemovedChannel(u, c, value, saved))
                if (imp.rescore and len(chosen) >= per_round) or (
                        target is not None and analysis.cost(trial)[0] <= target):
                    break

            def measured(k: int, removed: dict = removed, chosen: list = chosen
                         ) -> tuple[dict, nn.Module, float, float | None]:
                """`removed` plus the round's first `k` choices, its network and metric."""
                t = {u: removed[u] + [r.channel for r in chosen[:k] if r.unit == u] for u in names}
                m = _current_model(model, analysis, t, x)
                return (t, m, *evaluate(m))

            trial, after, acc_s, acc_h = measured(len(chosen))
            if not within(acc_s, acc_h):
                def over(acc_s: float, acc_h: float | None) -> str:
                    acc = acc_h if acc_h is not None else acc_s
                    return (f"{metric_name} from {base_acc:.4f} to {acc:.4f}, beyond the relative "
                            f"max_drop={max_drop}")

                if len(chosen) == 1:
                    stopped = (f"round {len(trajectory) + 1} would take {over(acc_s, acc_h)}; it "
                               "was undone")
                    break
                # a round of several channels (per_round > 1, or a ranking that is not re-scored:
                # its whole prefix): keep the longest prefix of the round's order within max_drop
                # (bisection: the metric taken to fall as the prefix grows)
                lo, hi, best, worst = 0, len(chosen), None, (acc_s, acc_h)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    got = measured(mid)
                    if within(*got[2:]):
                        lo, best = mid, got
                    else:
                        hi, worst = mid, got[2:]
                stopped = (f"removing the round's first {hi} channels would take "
                           f"{over(*worst)}; round {len(trajectory) + 1} kept the first {lo}")
                if best is None:
                    break
                chosen = chosen[:lo]
                trial, after, acc_s, acc_h = best
            removed, current = trial, after
            cost = getattr(imp, "last_cost", None) if imp.rescore else None
            fl, _ = analysis.cost(removed)
            rnd = GlobalRound(len(trajectory) + 1, chosen, fl, analysis.total_params(removed), acc_s,
                              acc_h, time.perf_counter() - t0, score_s,
                              sum(c.pairs for c in cost.units) if cost else 0,
                              sum(c.pairs_run for c in cost.units) if cost else 0,
                              float(cost.tail_flops) if cost else 0.0,
                              float(cost.tail_seconds) if cost else 0.0,
                              searched.get("full_pairs", sum(c.pairs for c in cost.units))
                              if cost else 0,
                              sum(c.screened for c in cost.units) if cost else 0,
                              sum(c.rechecked for c in cost.units) if cost else 0)
            trajectory.append(rnd)
            if ckpt is not None:
                write_json(ckpt, {"fingerprint": fp, "config": config,
                                  "trajectory": [asdict(r) for r in trajectory]})
            if cb is not None:
                cb.on_event(Event("global", rnd.round, (
                    f"round {rnd.round}: removed " + ", ".join(f"{r.unit}[{r.channel}]" for r in chosen)
                    + f"; FLOPs {fl / base_flops:.3f} of the original; {metric_name} {rnd.accuracy:.4f}"),
                    data={"flops": fl, "params": rnd.params, "accuracy": rnd.accuracy,
                          "removed": [asdict(r) for r in chosen], "seconds": rnd.seconds}))
            stop_point(cb, f"global round {rnd.round}")
            if stopped:   # a ranking's prefix cut at max_drop
                break
    finally:
        if reuse:
            imp.release_buffers()
    if ckpt is not None and not finished:   # the end, and why: a rerun returns this result
        write_json(ckpt, {"fingerprint": fp, "config": config, "stopped": stopped,
                          "trajectory": [asdict(r) for r in trajectory]})
    final = current if current is not None else _current_model(model, analysis, removed, x)
    return GlobalCompressionResult(
        units=names, criterion=imp.name, flops_target=flops_target, max_drop=max_drop,
        trajectory=trajectory, removed={u: c for u, c in removed.items()},
        base_flops=base_flops, base_params=base_params, base_score_accuracy=base_s,
        base_holdout_accuracy=base_h, input_shape=list(x.shape[1:]), stopped=stopped,
        config=config, model=final)


__all__ = ["GlobalCompressionResult", "GlobalRound", "RemovedChannel", "compress_global",
           "compress_layers", "rank_key"]
