"""Fine-tuning after compression with the CAR paper's per-layer learning rates (Section 3.1):
0 for the compressed layer, 1e-3 for the layer(s) consuming it, 1e-4 for all others, 500
iterations. BatchNorm statistics stay frozen (eval mode): short runs on small batches would
otherwise replace well-estimated statistics with noisy ones. The steps are taken by the one
training loop, `training.train`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from . import graph
from .callbacks import Callbacks
from .data.batches import DataLike, num_items
from .training import Schedule, train


@dataclass(frozen=True)
class FineTune:
    """Settings of a fine-tuning run (the defaults are the CAR paper's)."""

    train_data: DataLike = field(repr=False, default=None)
    iters: int = 500
    batch_size: int = 64
    lr_layer: float = 0.0
    lr_next: float = 1e-3
    lr_other: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    when: str = "end"  # "end": once after compression; "step": after every greedy step

    def __post_init__(self) -> None:
        if self.when not in ("end", "step"):
            raise ValueError(f"FineTune.when must be 'end' or 'step', got {self.when!r}")
        if self.iters < 0 or self.batch_size < 1:
            raise ValueError(f"FineTune needs iters >= 0 and batch_size >= 1, got iters="
                             f"{self.iters!r}, batch_size={self.batch_size!r}")

    def describe(self) -> dict[str, Any]:
        """The settings without the data (JSON types)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "train_data"}

    def schedule(self) -> Schedule:
        """The loop's schedule: `iters` SGD steps on batches drawn with replacement, every
        module in eval mode (the learning rates per layer group are set by `finetune`)."""
        return Schedule(iters=self.iters, batch_size=self.batch_size, lr=self.lr_other,
                        momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed,
                        sampling="random", mode="eval")


def layer_groups(model: nn.Module, layers: list[str]) -> tuple[set[str], set[str]]:
    """(own, next): parameter-name prefixes of the compressed layers with their channel-wise
    followers (the chain from each layer to its cut: BatchNorm, a depthwise conv, ...), and of
    the layers that read their channels: `graph.LayerAnalysis.readers`, the conv and linear
    layers reached from the cut through operations that keep the channel index (channel-wise
    ops and element-wise add / sub / mul, so every block that reads a residual stream counts;
    a linear layer after a flatten counts). One analysis (`graph.analyze`) per layer.

    This differs from the walk it replaced, which followed every parameter-free op to the first
    module with parameters: an op that moves channels is no longer followed, so for a layer that
    feeds a ResNet stage's residual stream, the layers behind the next stage's option-A padding
    shortcut (`models.resnet_cifar.PadShortcut`: the later stages' blocks and the classifier)
    are no longer "next" (they train at `lr_other`), while the next stage's first conv, which
    reads the stream itself, still is; and a module with parameters that keeps channels (a
    BatchNorm reading the stream in a pre-activation block) is passed through to the layers
    behind it instead of being "next" itself."""
    own: set[str] = set()
    nxt: set[str] = set()
    for layer in layers:
        analysis = graph.analyze(model, layer)
        own.add(layer)
        own.update(analysis.chain_modules)
        nxt.update(r.module for r in analysis.readers)
    return own, nxt - own


def finetune(model: nn.Module, layers: str | list[str], cfg: FineTune,
             callbacks: Callbacks | None = None, *, progress: bool | None = None) -> nn.Module:
    """Fine-tune `model` in place on `cfg.train_data`; returns it in eval mode.

    `layers`: the compressed layer(s), trained at `cfg.lr_layer` with their channel-wise
    followers; the layers consuming them train at `cfg.lr_next`, every other parameter at
    `cfg.lr_other` (none given: every parameter at `lr_other`). A group at learning rate 0
    is frozen. `callbacks.on_event` hears of every epoch (see `training.train`).
    `progress` is accepted for existing callers and has no effect: the run layer draws
    progress from `callbacks`."""
    del progress
    if cfg.train_data is None:
        raise ValueError("fine-tuning needs training data (FineTune(train_data=...))")
    layers = [layers] if isinstance(layers, str) else list(layers)
    own, nxt = layer_groups(model, layers)

    def group(name: str) -> str:
        mod = name.rsplit(".", 1)[0]
        if any(mod == p or mod.startswith(p + ".") for p in own):
            return "own"
        if any(mod == p or mod.startswith(p + ".") for p in nxt):
            return "next"
        return "other"

    lrs = {"own": cfg.lr_layer, "next": cfg.lr_next, "other": cfg.lr_other}
    groups: dict[str, list[nn.Parameter]] = {"own": [], "next": [], "other": []}
    for name, p in model.named_parameters():
        groups[group(name)].append(p)
    params = [{"params": ps, "lr": lrs[g]} for g, ps in groups.items() if ps and lrs[g] > 0]
    if num_items(cfg.train_data) == 0:
        raise ValueError("the fine-tuning data set is empty")
    if params and cfg.iters:
        train(model, cfg.train_data, cfg.schedule(), params=params, callbacks=callbacks,
              name="finetune")
    return model.eval()
