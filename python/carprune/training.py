"""The one training loop: CAR fine-tuning (`finetune`), Deep Compression's retraining and
shared-value fine-tuning (`deepcompress`) and the seeded training of the project's models
(`models.train.fit`) are thin users of `train`.

`train` takes the model, the data (anything `data.batches` reads: a Dataset, Subset,
DataLoader, (images, labels) tensors or numpy arrays), a `Schedule` (optimiser, learning rate,
batch sampling, seed), a loss (cross-entropy by default), hooks run after each backward pass and
after each optimiser step (Deep Compression masks or clusters gradients there, and re-masks or
rewrites weights), and `callbacks` that hear of every epoch. It never prints.

Batches are read by index through `data.batches.load_batch` (a DataLoader is read through its
dataset: its own batch size, sampler and collate order do not matter). Three seeded samplings
reproduce what each former loop drew, so the same seed gives the same numbers as before:

* ``"random"``: every step draws `batch_size` indices with replacement from a numpy generator
  (the CAR paper's fine-tuning);
* ``"epochs"``: a numpy permutation per epoch, cut into batches (the project's model training);
* ``"loader"``: a torch generator permutation per epoch, drawn as
  ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` draws it, the
  images laid out as its collation lays them out (Deep Compression's retraining).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .callbacks import Callbacks, Event
from .data.batches import DataLike, load_batch, num_items

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLINGS = ("random", "epochs", "loader")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
# "eval": every module in eval mode (BatchNorm statistics frozen, dropout off); "frozen_bn":
# train mode but BatchNorm in eval mode; "train": train mode throughout
MODES = ("eval", "frozen_bn", "train")


@dataclass(frozen=True)
class Schedule:
    """How a training run steps: `iters` optimiser steps, or `epochs` passes over the data
    (ceil(n / batch_size) steps each) when given; batches of `batch_size` drawn by `sampling`
    from `seed`; SGD with momentum or Adam at `lr` (param groups may set their own), with
    `weight_decay`; ``lr_schedule="cosine"`` anneals the learning rate to 0 over the run
    (stepped per epoch when counted in epochs, per step otherwise); `mode` is the modules'
    train/eval state during the run (see MODES)."""

    iters: int = 0
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    sampling: str = "random"
    lr_schedule: str = "constant"
    mode: str = "eval"

    def __post_init__(self) -> None:
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("sampling", self.sampling, SAMPLINGS),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("mode", self.mode, MODES)):
            if value not in allowed:
                raise ValueError(f"Schedule.{name} must be one of {', '.join(allowed)}; "
                                 f"got {value!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"Schedule.iters must be an int >= 0, got {self.iters!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool)
                                        or not isinstance(self.epochs, int) or self.epochs < 0):
            raise ValueError(f"Schedule.epochs must be None or an int >= 0, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ValueError(f"Schedule.batch_size must be an int >= 1, got {self.batch_size!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"Schedule.lr must be a finite number >= 0, got {self.lr!r}")
        if not self.momentum >= 0 or not self.weight_decay >= 0:
            raise ValueError(f"Schedule.momentum and weight_decay must be >= 0, got "
                             f"{self.momentum!r} and {self.weight_decay!r}")

    def steps_per_epoch(self, n: int) -> int:
        return max(1, math.ceil(n / self.batch_size))

    def steps(self, n: int) -> int:
        """Optimiser steps of a run over `n` items."""
        return self.epochs * self.steps_per_epoch(n) if self.epochs is not None else self.iters


@dataclass
class TrainLog:
    """What a run did: the loss of every step, and the mean loss of each epoch (the last one
    partial when the steps do not fill it)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10 % of steps (NaN without steps)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float(np.mean(tail)) if tail else math.nan


def sample_batches(n: int, schedule: Schedule) -> Iterator[np.ndarray]:
    """The index batches `schedule.sampling` draws from `n` items, without end (see the
    module docstring)."""
    bs, seed = schedule.batch_size, schedule.seed
    if schedule.sampling == "random":
        rng = np.random.default_rng(seed)
        while True:
            yield rng.integers(0, n, size=min(bs, n))
    elif schedule.sampling == "epochs":
        rng = np.random.default_rng(seed)
        while True:
            perm = rng.permutation(n)
            for s in range(0, n, bs):
                yield perm[s:s + bs]
    else:
        g = torch.Generator().manual_seed(seed)
        while True:
            # per epoch a DataLoader iterator draws its workers' base seed, then torch's
            # RandomSampler the permutation, and, once it is used up, an empty tail (a second
            # permutation of which it keeps none)
            torch.empty((), dtype=torch.int64).random_(generator=g)
            perm = torch.randperm(n, generator=g).numpy()
            for s in range(0, n, bs):
                yield perm[s:s + bs]
            torch.randperm(n, generator=g)


def make_optimizer(params: Iterable[Any], schedule: Schedule) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over `params` (tensors or param-group dicts) at `schedule.lr`."""
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum,
                               weight_decay=schedule.weight_decay)
    return torch.optim.Adam(params, lr=schedule.lr, weight_decay=schedule.weight_decay)


def _set_mode(model: nn.Module, mode: str) -> None:
    if mode == "eval":
        model.eval()
        return
    model.train()
    if mode == "frozen_bn":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _tensors(params: Sequence[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in params:
        if isinstance(p, dict):
            out.extend(p["params"])
        else:
            out.append(p)
    return out


def train(
    model: nn.Module,
    data: DataLike,
    schedule: Schedule,
    *,
    params: Sequence[Any] | None = None,
    trainable: Iterable[torch.Tensor] | None = None,
    loss: LossFn | None = None,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[int, float], None] | None = None,
    callbacks: Callbacks | None = None,
    name: str = "train",
    phase: str | None = None,
) -> TrainLog:
    """Train `model` in place for `schedule.steps(len(data))` steps; returns the `TrainLog`.

    params: what the optimiser updates: tensors or param-group dicts (a group's "lr" overrides
    `schedule.lr`); default every parameter of `model`. trainable: the model parameters that
    need gradients (default: those in `params`); every other parameter of `model` has
    ``requires_grad`` off during the run, and all flags are restored afterwards, as are the
    modules' train/eval states. loss: ``loss(outputs, targets)``, default cross-entropy.
    after_backward(): after each backward pass, before the step (e.g. mask gradients);
    after_step(step, loss): after each optimiser step, `step` counting from 1 (e.g. re-apply
    masks, report progress). callbacks.on_event: after every epoch (ceil(n / batch_size)
    steps) and at the end, an `Event` with algorithm `name`, the epoch, and data {"phase",
    "epoch", "epochs", "steps", "loss"} (the epoch's mean loss).
    """
    n = num_items(data)
    if n == 0:
        raise ValueError("the training data is empty")
    steps = schedule.steps(n)
    groups = list(params) if params is not None else list(model.parameters())
    if not groups or not _tensors(groups):
        raise ValueError("nothing to train: params is empty")
    loss_fn = loss if loss is not None else F.cross_entropy
    log = TrainLog(steps=steps)
    if steps == 0:
        return log
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    opt = make_optimizer(groups, schedule)
    per_epoch = schedule.steps_per_epoch(n)
    epochs = math.ceil(steps / per_epoch)
    sched = None
    if schedule.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=schedule.epochs if schedule.epochs is not None else steps)
    grad_ids = {id(t) for t in (trainable if trainable is not None else _tensors(groups))}
    flags = {p: p.requires_grad for p in model.parameters()}
    states = {m: m.training for m in model.modules()}
    for p in model.parameters():
        p.requires_grad_(id(p) in grad_ids)
    _set_mode(model, schedule.mode)
    batches = sample_batches(n, schedule)
    epoch_sum = 0.0
    try:
        for step in range(1, steps + 1):
            x, y = load_batch(data, next(batches))
            if schedule.sampling == "loader":
                # laid out as a DataLoader's collation (torch.stack) lays it out: a one-channel
                # batch from ImageArrayDataset.batch has other, equally contiguous strides, for
                # which the CPU convolutions round differently
                x = x.clone(memory_format=torch.contiguous_format)
            model.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            value = loss_fn(model(x.to(device)), y.to(device))
            value.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            v = float(value.detach())
            log.losses.append(v)
            epoch_sum += v
            if after_step is not None:
                after_step(step, v)
            if sched is not None and schedule.epochs is None:
                sched.step()
            if step % per_epoch == 0 or step == steps:
                done = len(log.epoch_losses) + 1
                mean = epoch_sum / (step - (done - 1) * per_epoch)
                log.epoch_losses.append(mean)
                epoch_sum = 0.0
                if sched is not None and schedule.epochs is not None:
                    sched.step()
                if callbacks is not None:
                    what = f"{name} {phase}" if phase else name
                    callbacks.on_event(Event(
                        algorithm=name, step=done, total=epochs,
                        message=f"{what}: epoch {done}/{epochs}, step {step}/{steps}, "
                                f"loss {mean:.4g}",
                        data={"phase": phase, "epoch": done, "epochs": epochs, "steps": step,
                              "loss": mean}))
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, state in states.items():
            m.training = state
    return log


__all__ = ["MODES", "SAMPLINGS", "Schedule", "TrainLog", "make_optimizer", "sample_batches", "train"]
