"""CIFAR ResNets (He et al. 2016, Section 4.2) with the parameter-free "option A" shortcut.

Parameter names match the widely used pretrained CIFAR checkpoints (conv1/bn1/layerN.i/linear),
so `load_checkpoint` loads them directly. Every piece is an nn.Module (no lambdas), so the model
traces with torch.fx and the cut finder sees each operation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import opsem


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad `pad` channels on each side.

    After whole-network pruning (`carprune.prune_units`) the padding is no longer symmetric:
    `out_index[k]` is then the output channel that input channel k fills among `out_channels`
    (the rest are zero)."""

    def __init__(self, pad: int, out_index: list[int] | None = None,
                 out_channels: int | None = None) -> None:
        super().__init__()
        self.pad = pad
        self.out_channels = out_channels
        self.register_buffer("out_index", None if out_index is None else
                             torch.tensor(out_index, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_index is None:
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        y = x[:, :, ::2, ::2]
        out = y.new_zeros((y.shape[0], self.out_channels, *y.shape[2:]))
        return out.index_copy(1, self.out_index.to(y.device), y)


def _pad_mapping(m: PadShortcut, in_width: int) -> list[int | None]:
    """Output channel j of the shortcut reads input channel mapping[j] (None: a zero channel)."""
    if m.out_index is None:
        return [None] * m.pad + list(range(in_width)) + [None] * m.pad
    out: list[int | None] = [None] * m.out_channels
    for k, j in enumerate(m.out_index.tolist()):
        out[j] = k
    return out


def _pad_narrow(m: PadShortcut, in_width: int, kept_in: list[int], kept_out: list[int]
                ) -> PadShortcut:
    old = _pad_mapping(m, in_width)
    new_in = {j: k for k, j in enumerate(kept_in)}
    index = [0] * len(kept_in)
    for q, j in enumerate(kept_out):
        src = old[j]
        if src is not None:
            if src not in new_in:
                raise ValueError(f"PadShortcut: output channel {j} reads input channel {src}, "
                                 "which is removed while the output channel is kept")
            index[new_in[src]] = q
    return PadShortcut(m.pad, index, len(kept_out))


opsem.register_channel_map(PadShortcut, mapping=_pad_mapping, narrow=_pad_narrow)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes = 16
        layers = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


def resnet_cifar(depth: int = 20, num_classes: int = 10) -> ResNetCifar:
    """A CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110, ...), randomly initialised."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
    model = ResNetCifar(depth, num_classes)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model
