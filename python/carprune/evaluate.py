"""The one evaluator: the metric's mean over a whole network's outputs (`metric_value`: top-1,
top-k, NLL, squared or absolute error, any `carprune.metrics` metric), top-1 accuracy
(`accuracy`) and per-class correct counts (`class_correct`), on data read through
`data.batches` (Datasets, Subsets, DataLoaders, (images, labels) tensors or numpy arrays).
Deep Compression's stages, KSE's and the command line's hold-out accuracies, global
compression's trajectory and the interpretation pages' per-class accuracy all use it.

Values are counted as the engine counts them (`metrics.bind` and `BoundMetric.measure`): top-k
as image counts from the `class_correct_counts` kernel (ties broken as torch.argmax breaks them),
float metrics as fixed-point sums; the mean is the engine's `LayerScores.base_value`. Only the
network's own float rounding may differ: the engine runs a traced copy with BatchNorm folded,
this runs the model as it is (see `carprune.metrics` on what that moves).

Batch sizes come from one measurement and one rule (`rows_for`): the engine's measurement
(`engine._SizeRecorder`: every tensor a traced graph computes for one image, and the largest)
and the engine's rule for its own calls (`batch_rows`: the largest tensor of a batch near
`engine.TARGET_CALL_BYTES`, all of them within the memory budget). Batches that fit the cache run
about twice as fast on these CPUs as batches that fill the budget (ResNet-20 on the 10,000
CIFAR-10 test images, 2 threads, 3 alternating runs: 5.1-5.2 s in batches of 64, the rule's
choice, against 11.5-11.7 s in batches of 722, what the budget alone allowed). The patch search
uses the same two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import fx, nn

from . import graph, metrics
from .callbacks import Callbacks, Event, log
from .data.batches import DataLike, load_batch, load_targets, num_items, pick_indices, resolve
from .engine import _rows_for, _SizeRecorder, parse_bytes

DEFAULT_ROWS = 256  # images per batch for a model torch.fx cannot trace (nothing to measure)


def batch_rows(per_image: int, budget: int, n: int, largest: int) -> int:
    """Images per batch, by the engine's rule for its calls (`engine._rows_for`): the largest
    tensor one image adds (`largest` bytes) times the batch near `engine.TARGET_CALL_BYTES`,
    `per_image` bytes each within `budget`, at most `engine.MAX_CALL_ROWS` and `n`, at least
    one."""
    return int(max(1, min(_rows_for(largest, per_image, budget), n)))


def bytes_per_image(gm: fx.GraphModule, x0: torch.Tensor) -> tuple[int, int]:
    """(largest, total): the bytes of the largest tensor `gm` computes for one image, and of
    every tensor it computes for it (the engine's `_SizeRecorder` on the one-image batch `x0`,
    its input included) plus the image as loaded (the source batch the input is converted
    from)."""
    rec = _SizeRecorder(gm)
    with torch.no_grad():
        rec.run(x0[:1])
    image = x0[0].numel() * x0.element_size()
    return max(rec.max_bytes, image), rec.total_bytes + image


def rows_for(model: nn.Module, x0: torch.Tensor, memory_budget: int | str | None, n: int) -> int:
    """Images per batch for a forward pass of `model` over `n` images like `x0` (a batch on the
    model's device) within `memory_budget` (bytes or '512MiB'; None: the engine's default).
    A model torch.fx cannot trace is run `DEFAULT_ROWS` images at a time."""
    budget = parse_bytes(memory_budget)
    try:
        gm = graph.trace(model)
    except graph.CutError as exc:
        log.debug("batch size not measured (%s): %d images per batch", exc, DEFAULT_ROWS)
        return min(DEFAULT_ROWS, max(1, n))
    largest, per_image = bytes_per_image(gm, x0)
    return batch_rows(per_image, budget, n, largest)


def _device_dtype(model: nn.Module, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    params = [p for p in model.parameters() if p.is_floating_point()]
    if params:
        return params[0].device, params[0].dtype
    return x.device, x.dtype


@torch.no_grad()
def _metric_sums(model: nn.Module, data: DataLike, idx: np.ndarray, metric: metrics.Metric, *,
                 bins: int | Sequence[float] | None, num_classes: int | None,
                 batch_size: int | None, memory_budget: int | str | None,
                 callbacks: Callbacks | None) -> tuple[np.ndarray, np.ndarray, metrics.Grouping]:
    """(sums [G], totals [G], grouping): per group (class, or target bin of regression
    targets, as `metrics.bind` groups them) the metric summed over the images `data[idx]` as
    `BoundMetric.measure` sums it (top-k: image counts; float metrics: fixed point, units of
    1/metric.scale), and the images. The one forward loop behind every function here."""
    if idx.size == 0:
        raise ValueError("no images to evaluate (the data or the index list is empty)")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    data = resolve(data)
    states = {m: m.training for m in model.modules()}
    model.eval()
    try:
        x0, y0 = load_batch(data, idx[:1])
        regression = y0.is_floating_point()
        if regression and metric.task == "classification":
            raise ValueError(f"metric {metric.name!r} needs class labels, but the data's targets "
                             f"are floating point ({y0.dtype}, a regression task): measure it "
                             "with metric='mse', 'mae' or a per-sample function (carprune.metrics)")
        dev, dtype = _device_dtype(model, x0)
        rows = batch_size or rows_for(model, x0.to(dev, dtype), memory_budget, len(idx))
        k = num_classes
        bound = None
        sums = totals = None
        batches = -(-len(idx) // rows)
        for b, s in enumerate(range(0, len(idx), rows)):
            x, y = load_batch(data, idx[s:s + rows])
            out = model(x.to(dev, dtype))
            if not (isinstance(out, torch.Tensor) and out.dim() == 2):
                raise ValueError("the model must return logits [batch, classes], got "
                                 f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
            k = k or int(out.shape[1])
            if out.shape[1] != k:
                raise ValueError(f"the model returns {out.shape[1]} outputs, expected "
                                 f"num_classes={k}")
            if not regression and y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
                raise ValueError(f"labels must lie in [0, {k}) (the model's classes), got "
                                 f"[{int(y.min())}, {int(y.max())}]")
            if bound is None:   # as the engine binds it: all targets for the quantile bins
                targets = load_targets(data, idx) if regression else y
                bound = metrics.bind(metric, targets, k, [str(c) for c in range(k)],
                                     num_images=len(idx), bins=bins)
                sums = np.zeros(bound.grouping.size, dtype=np.int64)
                totals = np.zeros(bound.grouping.size, dtype=np.int64)
            y = y.to(out.device)
            groups = bound.grouping.assign(y)
            sums += bound.measure(out.unsqueeze(0), y, groups)[0].cpu().numpy()
            totals += np.bincount(groups.cpu().numpy(), minlength=bound.grouping.size)
            if callbacks is not None:
                done = min(s + rows, len(idx))
                callbacks.on_event(Event("evaluate", b + 1, f"evaluate: {done}/{len(idx)} images",
                                         total=batches, data={"images": done, "of": len(idx),
                                                              "done": done, "total": len(idx),
                                                              "unit": "img"}))
    finally:
        for m, state in states.items():
            m.training = state
    return sums, totals, bound.grouping


def class_correct(model: nn.Module, data: DataLike, indices: Sequence[int] | np.ndarray | None = None,
                  *, num_classes: int | None = None, batch_size: int | None = None,
                  memory_budget: int | str | None = None, callbacks: Callbacks | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(correct [K], totals [K]): per class, the images of `data[indices]` (default all) whose
    top-1 prediction by `model` is their label (ties: the first class, as torch.argmax), and
    the images.

    The model runs in eval mode (its modules' states are restored afterwards) on its device
    and dtype; K is `num_classes`, else the model's number of outputs. Batches of
    `batch_size` images in index order, else sized by `rows_for` within `memory_budget`.
    `callbacks.on_event` hears of every batch (algorithm "evaluate"; data: "done" of "total"
    images, "unit" "img", and the same as "images" of "of")."""
    idx = (np.arange(num_items(data), dtype=np.int64) if indices is None
           else np.asarray(indices, dtype=np.int64))
    correct, totals, _ = _metric_sums(model, data, idx, metrics.top_k(1), bins=None,
                                      num_classes=num_classes, batch_size=batch_size,
                                      memory_budget=memory_budget, callbacks=callbacks)
    return correct, totals


def metric_value(model: nn.Module, data: DataLike, *,
                 metric: str | metrics.Metric | metrics.PerSample | None = None,
                 bins: int | Sequence[float] | None = None, num_images: int | None = None,
                 seed: int = 0, memory_budget: int | str | None = None,
                 batch_size: int | None = None, callbacks: Callbacks | None = None) -> float:
    """The mean of `metric` (`metrics.get_metric`: 'top1' (default), 'top5'/'topK', 'nll',
    'mse', 'mae', a `Metric` or a per-sample function) over the outputs of `model` on `data`:
    all images, or the seeded subset of `num_images` that scoring uses
    (`data.batches.pick_indices`). Counted as the engine counts it, so it equals
    `engine.LayerScorer(model, layer, data, num_images=..., seed=..., metric=..., bins=...)
    .score([]).base_value` for any layer, up to the network's own float rounding (module
    docstring). `bins` are checked as the engine checks them (regression targets only; the mean
    does not depend on them). Batches and events as in `class_correct`."""
    m = metrics.get_metric(metric)
    idx = pick_indices(num_items(data), num_images, seed)
    sums, totals, _ = _metric_sums(model, data, idx, m, bins=bins, num_classes=None,
                                   batch_size=batch_size, memory_budget=memory_budget,
                                   callbacks=callbacks)
    # the same operations as LayerScores.base_value, so the float is the same
    return float(sums.sum()) / m.scale / max(1, int(totals.sum()))


def accuracy(model: nn.Module, data: DataLike, *, num_images: int | None = None, seed: int = 0,
             batch_size: int | None = None, memory_budget: int | str | None = None,
             callbacks: Callbacks | None = None) -> float:
    """Top-1 accuracy of `model` on `data`: `metric_value` with metric 'top1'."""
    return metric_value(model, data, metric="top1", num_images=num_images, seed=seed,
                        batch_size=batch_size, memory_budget=memory_budget, callbacks=callbacks)


__all__ = ["accuracy", "batch_rows", "bytes_per_image", "class_correct", "metric_value",
           "rows_for"]
