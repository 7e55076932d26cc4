"""Shared pieces of the benchmarks: the shared data, the pretrained models, the naive reference,
and FLOP counting from the traced graph."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import fx, nn

import carprune as cp
from carprune import graph

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "out" / "bench"


def resnet20() -> nn.Module:
    return cp.models.load_checkpoint(cp.models.resnet_cifar(20), DATA / "models" / "resnet20-12fca82f.th")


def resnet32() -> nn.Module:
    return cp.models.load_checkpoint(cp.models.resnet_cifar(32), DATA / "models" / "resnet32-d509ac18.th")


def cifar_test() -> cp.data.ImageArrayDataset:
    return cp.data.cifar10(DATA / "cifar10-jpeg.tar.gz", "test")


def cifar_train() -> cp.data.ImageArrayDataset:
    return cp.data.cifar10(DATA / "cifar10-jpeg.tar.gz", "train")


def naive_counts(model: nn.Module, cut_module: str, filters, x: torch.Tensor, y: torch.Tensor,
                 batch: int, k: int = 10) -> torch.Tensor:
    """The naive CAR pass: per filter, a hook zeroes its channel and the full network runs
    (filter None: no channel zeroed, the base accuracy)."""
    module = dict(model.named_modules())[cut_module]
    counts = torch.zeros(len(filters), k, dtype=torch.int64)
    with torch.no_grad():
        for row, f in enumerate(filters):
            def zero(mod, inp, out, f=f):
                out = out.clone()
                out[:, f] = 0
                return out

            h = module.register_forward_hook(zero) if f is not None else None
            for s in range(0, len(y), batch):
                ok = model(x[s:s + batch]).argmax(1) == y[s:s + batch]
                counts[row] += torch.bincount(y[s:s + batch][ok], minlength=k)
            if h is not None:
                h.remove()
    return counts


def masked_outputs(model: nn.Module, cut_module: str, unit, x: torch.Tensor, batch: int = 100
                   ) -> torch.Tensor:
    """The whole network's outputs on `x` with channel `unit` zeroed after `cut_module` by a
    forward hook (None: nothing zeroed)."""
    h = None
    if unit is not None:
        def zero(mod, inp, out):
            out = out.clone()
            out[:, unit] = 0
            return out

        h = dict(model.named_modules())[cut_module].register_forward_hook(zero)
    try:
        with torch.no_grad():
            return torch.cat([model(x[s:s + batch]) for s in range(0, len(x), batch)])
    finally:
        if h is not None:
            h.remove()


def best_batch(model: nn.Module, x: torch.Tensor, sizes=(32, 64, 100, 200, 500)) -> tuple[int, dict]:
    """The batch size at which a full forward runs fastest here (per image), by measurement."""
    per_image = {}
    with torch.no_grad():
        model(x[:sizes[0]])
        for b in sizes:
            n = max(b, (len(x) // b) * b) if len(x) >= b else len(x)
            t0 = time.perf_counter()
            for s in range(0, n, b):
                model(x[s:s + b])
            per_image[b] = (time.perf_counter() - t0) / n
    return min(per_image, key=per_image.get), per_image


class _MacCounter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.macs = 0

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        m = self.module.get_submodule(target)
        if isinstance(m, nn.Conv2d):
            self.macs += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            self.macs += out[0].numel() * m.in_features
        return out


def macs(gm: fx.GraphModule, *inputs) -> int:
    counter = _MacCounter(gm)
    with torch.no_grad():
        counter.run(*inputs)
    return counter.macs


def flop_bound(model: nn.Module, layer: str, image: torch.Tensor) -> dict:
    """F x full forward / (prefix + F x per-ablation tail), in multiply-accumulates per image.

    The per-ablation tail of the fused path is the kernel's single-channel conv (k*k MACs per
    consumer output) plus everything after the consumer."""
    gm = graph.trace(model)
    cut = graph.find_cut(gm, layer)
    split = graph.split_at(gm, cut)
    full = macs(gm, image)
    live = split.prefix(image)
    prefix = macs(split.prefix, image)
    if split.fused is not None:
        conv = split.fused.conv
        z = conv(live[0])
        prefix += z[0].numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        kernel = z[0].numel() * conv.kernel_size[0] * conv.kernel_size[1]
        env = dict(zip(split.live, live, strict=True))
        env[split.fused.end.name] = z
        rest = macs(split.tail, *[env[n] for n in split.tail_inputs])
        tail = kernel + rest
    else:
        tail = macs(split.tail, *live)
    f = cut.num_filters
    return {"filters": f, "full": full, "prefix": prefix, "tail": tail,
            "bound": f * full / (prefix + f * tail)}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
