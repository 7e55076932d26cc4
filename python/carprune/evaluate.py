"""The one evaluator: top-1 accuracy of a whole network, overall (`accuracy`) and per class
(`class_correct`), on data read through `data.batches` (Datasets, Subsets, DataLoaders,
(images, labels) tensors or numpy arrays). Deep Compression's stages, KSE's and the command
line's hold-out accuracies and the interpretation pages' per-class accuracy all use it.

Batch sizes come from a memory budget by one estimate (`rows_for`): the engine's measurement
(`engine._SizeRecorder`: every tensor a traced graph computes for one image) and one rule
(`batch_rows`: as many images as fit the budget). The patch search uses the same two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import fx, nn

from . import graph
from .callbacks import Callbacks, Event, log
from .data.batches import DataLike, load_batch, num_items, pick_indices
from .engine import _SizeRecorder, parse_bytes

MAX_ROWS = 4096
DEFAULT_ROWS = 256  # images per batch for a model torch.fx cannot trace (nothing to measure)


def batch_rows(per_image: int, budget: int, n: int) -> int:
    """Images per batch: `per_image` bytes each within `budget`, at most `MAX_ROWS` and `n`,
    at least one."""
    return int(max(1, min(budget // max(1, per_image), MAX_ROWS, n)))


def bytes_per_image(gm: fx.GraphModule, x0: torch.Tensor) -> int:
    """Bytes one image costs when `gm` runs on a batch: every tensor the graph computes for it
    (the engine's `_SizeRecorder` on the one-image batch `x0`, its input included) plus the
    image as loaded (the source batch the input is converted from)."""
    rec = _SizeRecorder(gm)
    with torch.no_grad():
        rec.run(x0[:1])
    return rec.total_bytes + x0[0].numel() * x0.element_size()


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
    return batch_rows(bytes_per_image(gm, x0), budget, n)


def _device_dtype(model: nn.Module, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    params = [p for p in model.parameters() if p.is_floating_point()]
    if params:
        return params[0].device, params[0].dtype
    return x.device, x.dtype


@torch.no_grad()
def class_correct(model: nn.Module, data: DataLike, indices: Sequence[int] | np.ndarray | None = None,
                  *, num_classes: int | None = None, batch_size: int | None = None,
                  memory_budget: int | str | None = None, callbacks: Callbacks | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(correct [K], totals [K]): per class, the images of `data[indices]` (default all) whose
    top-1 prediction by `model` is their label, and the images.

    The model runs in eval mode (its modules' states are restored afterwards) on its device
    and dtype; K is `num_classes`, else the model's number of outputs. Batches of
    `batch_size` images in index order, else sized by `rows_for` within `memory_budget`.
    `callbacks.on_event` hears of every batch (algorithm "evaluate"; data: "done" of "total"
    images, "unit" "img", and the same as "images" of "of")."""
    idx = (np.arange(num_items(data), dtype=np.int64) if indices is None
           else np.asarray(indices, dtype=np.int64))
    if idx.size == 0:
        raise ValueError("no images to evaluate (the data or the index list is empty)")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    states = {m: m.training for m in model.modules()}
    model.eval()
    try:
        x0, y0 = load_batch(data, idx[:1])
        if y0.is_floating_point():
            raise ValueError("accuracy needs class labels, but the data's targets are floating "
                             f"point ({y0.dtype}, a regression task): measure it with a metric "
                             "(carprune.metrics)")
        dev, dtype = _device_dtype(model, x0)
        rows = batch_size or rows_for(model, x0.to(dev, dtype), memory_budget, len(idx))
        k = num_classes
        correct = totals = None
        batches = -(-len(idx) // rows)
        for b, s in enumerate(range(0, len(idx), rows)):
            x, y = load_batch(data, idx[s:s + rows])
            logits = model(x.to(dev, dtype))
            if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
                raise ValueError("the model must return logits [batch, classes], got "
                                 f"{type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}")
            k = k or int(logits.shape[1])
            if logits.shape[1] != k:
                raise ValueError(f"the model returns {logits.shape[1]} outputs, expected "
                                 f"num_classes={k}")
            yn = y.numpy()
            if yn.size and (yn.min() < 0 or yn.max() >= k):
                raise ValueError(f"labels must lie in [0, {k}) (the model's classes), got "
                                 f"[{yn.min()}, {yn.max()}]")
            ok = (logits.argmax(1).cpu() == y).numpy()
            if correct is None:
                correct = np.zeros(k, dtype=np.int64)
                totals = np.zeros(k, dtype=np.int64)
            totals += np.bincount(yn, minlength=k)
            correct += np.bincount(yn[ok], minlength=k)
            if callbacks is not None:
                done = min(s + rows, len(idx))
                callbacks.on_event(Event("evaluate", b + 1, f"evaluate: {done}/{len(idx)} images",
                                         total=batches, data={"images": done, "of": len(idx),
                                                              "done": done, "total": len(idx),
                                                              "unit": "img"}))
    finally:
        for m, state in states.items():
            m.training = state
    return correct, totals


def accuracy(model: nn.Module, data: DataLike, *, num_images: int | None = None, seed: int = 0,
             batch_size: int | None = None, memory_budget: int | str | None = None,
             callbacks: Callbacks | None = None) -> float:
    """Top-1 accuracy of `model` on `data`: all images, or the seeded subset of `num_images`
    that scoring uses (`data.batches.pick_indices`). Batches as in `class_correct`."""
    idx = pick_indices(num_items(data), num_images, seed)
    correct, totals = class_correct(model, data, idx, batch_size=batch_size,
                                    memory_budget=memory_budget, callbacks=callbacks)
    return int(correct.sum()) / int(totals.sum())


__all__ = ["accuracy", "batch_rows", "bytes_per_image", "class_correct", "rows_for"]
