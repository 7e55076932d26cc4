"""Fine-tuning after compression with the CAR paper's per-layer learning rates (Section 3.1):
0 for the compressed layer, 1e-3 for the layer(s) consuming it, 1e-4 for all others, 500
iterations. BatchNorm statistics stay frozen (eval mode): short runs on small batches would
otherwise replace well-estimated statistics with noisy ones."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import graph
from .data.batches import DataLike, load_batch, num_items


@dataclass
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
            raise ValueError("FineTune needs iters >= 0 and batch_size >= 1")

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("train_data")
        return d


def layer_groups(model: nn.Module, layers: list[str]) -> tuple[set[str], set[str]]:
    """Parameter-name prefixes of the compressed layers (+ their channel-wise followers such as
    BatchNorm) and of the layers that consume their outputs."""
    gm = graph.trace(model)
    own, nxt = set(), set()
    for layer in layers:
        cut = graph.find_cut(gm, layer)
        own.add(layer)
        node = cut.conv_node
        while node is not cut.node:
            (node,) = node.users
            if node.op == "call_module":
                own.add(str(node.target))
        stack = list(cut.node.users)
        seen = set()
        while stack:  # through parameter-free ops (flatten, add, pad) to the next layers
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters()):
                nxt.add(str(n.target))
            elif n.op != "output":
                stack.extend(n.users)
    return own, nxt - own


def finetune(model: nn.Module, layers: str | list[str], cfg: FineTune,
             progress: bool | None = None) -> nn.Module:
    """Fine-tune `model` in place on `cfg.train_data`; returns it in eval mode."""
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
    for p in groups["own"] if cfg.lr_layer == 0 else []:
        p.requires_grad_(False)
    n = num_items(cfg.train_data)
    if n == 0:
        raise ValueError("the fine-tuning data set is empty")
    device = next(model.parameters()).device
    rng = np.random.default_rng(cfg.seed)
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show and cfg.iters:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iters, desc="fine-tune", unit="it", leave=False)
    model.eval()  # BatchNorm statistics frozen; no dropout in the models used here
    try:
        if params and cfg.iters:
            opt = torch.optim.SGD(params, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            for _ in range(cfg.iters):
                idx = rng.integers(0, n, size=min(cfg.batch_size, n))
                x, y = load_batch(cfg.train_data, idx)
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        for p in groups["own"]:
            p.requires_grad_(True)
    return model.eval()
