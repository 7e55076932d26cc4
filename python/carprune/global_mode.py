"""Compression across several layers: in sequence (one greedy run per layer, each on the result
of the last), and a global mode that removes, at each step, the filter with the lowest CAR per
FLOP saved among all chosen layers until a FLOPs target is met (CAR, or the importance under any
`metric`, see `score_layer`).

The global mode scores on a private copy of the network in which removed filters are silenced
exactly: their conv weights and bias and their BatchNorm's affine parameters are set to zero, so
the channel is 0 at the cut, which is what removal means. Only the final model is cut
physically (surgery), and FLOPs are counted on physically pruned copies.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import graph, metrics, preempt, surgery
from .cost import count_cost
from .data.batches import DataLike, load_batch
from .engine import LayerScorer
from .greedy import CompressionResult, compress_layer
from .io import read_json, write_json
from .results import PrunedModelResult


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
class GlobalStep:
    step: int
    layer: str
    removed: int               # original filter index in `layer`
    car: float                 # its importance (CAR for top-1; the metric's otherwise)
    flops_saved: int           # per image, by this removal
    flops: int                 # whole network after the step
    params: int
    score_accuracy: float      # the metric's mean (top-k: accuracy)
    holdout_accuracy: float | None
    seconds: float = 0.0


@dataclass
class GlobalCompressionResult(PrunedModelResult):
    """The outcome of a global run: per-step choices across layers, removed filters, the model."""

    FORMAT: ClassVar[str] = "carprune.GlobalCompressionResult"
    VERSION: ClassVar[int] = 1

    layers: list[str]
    flops_target: float
    trajectory: list[GlobalStep]
    removed: dict[str, list[int]]
    base_flops: int
    base_score_accuracy: float
    base_holdout_accuracy: float | None
    config: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], model: nn.Module | None) -> GlobalCompressionResult:
        return cls(**{**obj, "trajectory": [GlobalStep(**s) for s in obj["trajectory"]]},
                   model=model)


def _silence(model: nn.Module, layer: str, filters: list[int]) -> None:
    """Make `filters` of `layer` output exactly 0 at the cut (weights, bias, BN affine = 0)."""
    gm = graph.trace(model)
    cut = graph.find_cut(gm, layer)
    node = cut.conv_node
    chain = []
    while node is not cut.node:
        (node,) = node.users
        chain.append(node)
    mods = dict(model.named_modules())
    conv = mods[layer]
    with torch.no_grad():
        conv.weight[filters] = 0
        if conv.bias is not None:
            conv.bias[filters] = 0
        for n in chain:
            m = mods.get(str(n.target)) if n.op == "call_module" else None
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                if m.weight is not None:
                    m.weight[filters] = 0
                    m.bias[filters] = 0
                else:  # no affine: subtract the mean instead
                    m.running_mean[filters] = 0
            elif not _maps_zero_to_zero(n, m):
                raise graph.CutError(
                    f"global compression silences removed filters by zeroing their weights; "
                    f"{layer!r} is followed by {n.format_node()}, which does not map 0 to 0")


def _maps_zero_to_zero(node, module) -> bool:
    ok = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
          nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
          nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)
    if module is not None:
        return isinstance(module, ok)
    name = getattr(node.target, "__name__", str(node.target))
    return name in ("relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "tanh", "max_pool2d",
                    "avg_pool2d", "adaptive_avg_pool2d", "dropout", "contiguous", "clone")


def _physical(model: nn.Module, removed: dict[str, list[int]]) -> nn.Module:
    out = model
    for layer, filt in removed.items():
        if filt:
            out = surgery.prune_filters(out, layer, filt)
    return out


def compress_global(
    model: nn.Module,
    layers: list[str],
    score_data: DataLike,
    *,
    flops_target: float,
    eval_data: DataLike | None = None,
    score_images: int | None = None,
    eval_images: int | None = None,
    filters_per_step: int = 1,
    min_filters: int = 1,
    checkpoint: str | os.PathLike | None = None,
    memory_budget: int | str | None = None,
    seed: int = 0,
    progress: bool | None = None,
    metric: str | metrics.Metric | metrics.PerSample | None = None,
    bins: int | Sequence[float] | None = None,
) -> GlobalCompressionResult:
    """Remove filters across `layers` until the network's FLOPs are at most `flops_target` x the
    original, each step taking the filter(s) with the lowest CAR (importance under `metric`) per
    FLOP saved; the trajectory tracks `metric`."""
    if not 0 < flops_target < 1:
        raise ValueError(f"flops_target is a fraction of the original FLOPs in (0, 1), got {flops_target}")
    if not layers:
        raise ValueError("compress_global needs at least one layer")
    show = sys.stderr.isatty() if progress is None else progress
    work = surgery.copy_model(model).eval()
    x, _ = load_batch(score_data, [0])
    shape = tuple(x.shape[1:])
    base_cost = count_cost(model, shape)
    nfilt = {}
    for layer in layers:
        cut = graph.find_cut(graph.trace(work), layer)  # validates every layer up front
        nfilt[layer] = cut.num_filters
    removed: dict[str, list[int]] = {layer: [] for layer in layers}
    trajectory: list[GlobalStep] = []
    config = {"layers": layers, "flops_target": flops_target, "score_images": score_images,
              "eval_images": eval_images, "filters_per_step": filters_per_step,
              "min_filters": min_filters, "seed": seed}
    name = metrics.get_metric(metric).name
    if name != "top1" or bins is not None:   # (top-1 runs keep their checkpoints)
        config.update(metric=name, bins=bins if not hasattr(bins, "__len__") else list(bins))
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state = read_json(ckpt, "checkpoint")
        if state.get("config") != config:
            raise ValueError(f"checkpoint {ckpt} belongs to a different run; use another path")
        trajectory = [GlobalStep(**s) for s in state["trajectory"]]
        for s in trajectory:
            removed[s.layer].append(s.removed)
        for layer, filt in removed.items():
            if filt:
                _silence(work, layer, filt)

    def accuracy(data, n_images) -> float:
        return LayerScorer(work, layers[0], data, num_images=n_images, seed=seed,
                           memory_budget=memory_budget, progress=False, metric=metric,
                           bins=bins).score([]).base_value

    base_s = accuracy(score_data, score_images)
    base_h = accuracy(eval_data, eval_images) if eval_data is not None else None
    flops = count_cost(_physical(model, removed), shape).total_flops
    while flops > flops_target * base_cost.total_flops:
        t0 = time.perf_counter()
        current = _physical(model, removed)
        cands = []
        for layer in layers:
            alive = [f for f in range(nfilt[layer]) if f not in set(removed[layer])]
            if len(alive) <= min_filters:
                continue
            # FLOPs saved by one more filter of this layer, counted on the pruned network
            positions = surgery.channel_origins(dict(current.named_modules())[layer])
            one = surgery.prune_filters(current, layer, [positions.index(alive[0])])
            saved = flops - count_cost(one, shape).total_flops
            sc = LayerScorer(work, layer, score_data, num_images=score_images, seed=seed,
                             memory_budget=memory_budget, progress=False, metric=metric, bins=bins)
            s = sc.score(alive)
            for f, c in zip(s.filters.tolist(), s.importance.tolist(), strict=True):
                cands.append((c / max(1, saved), layer, f, c, saved))
        if not cands:
            break
        cands.sort(key=lambda t: (t[0], layers.index(t[1]), t[2]))
        for _, layer, f, car, saved in cands[:filters_per_step]:
            removed[layer].append(f)
            _silence(work, layer, [f])
            cost = count_cost(_physical(model, removed), shape)
            flops, pa = cost.total_flops, cost.total_params
            acc_s = accuracy(score_data, score_images)
            acc_h = accuracy(eval_data, eval_images) if eval_data is not None else None
            trajectory.append(GlobalStep(len(trajectory) + 1, layer, f, car, saved, flops, pa, acc_s,
                                         acc_h, time.perf_counter() - t0))
            if show:
                print(f"[global] step {len(trajectory)}: {layer} filter {f} (importance {car:+.4f}, "
                      f"{saved} FLOPs) -> {flops / base_cost.total_flops:.3f} of the FLOPs",
                      file=sys.stderr, flush=True)
            if flops <= flops_target * base_cost.total_flops:
                break
        if ckpt is not None:
            write_json(ckpt, {"config": config, "trajectory": [asdict(s) for s in trajectory]})
        preempt.check(f"global step {len(trajectory)}")
    return GlobalCompressionResult(layers=layers, flops_target=flops_target, trajectory=trajectory,
                                   removed=removed, base_flops=base_cost.total_flops,
                                   base_score_accuracy=base_s, base_holdout_accuracy=base_h,
                                   config=config, model=_physical(model, removed))
