"""A small CNN that regresses the rotation angle of a 28x28 digit (the RAR demonstration):
conv 16 and conv 32 filters of 5x5, each followed by ReLU and 2x2 max pooling, then fully
connected 512->64 (ReLU) and 64->1. The output is the angle in degrees: 60 x the last layer's
output, so the trained weights stay of the usual size."""

from __future__ import annotations

import torch
from torch import nn

from ..data.regression import MAX_ANGLE

ANGLE_CNN_LAYOUT = ("conv5x5:16", "conv5x5:32", "fc:64", "fc:1", f"x{MAX_ANGLE}")


class AngleCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x)))) * MAX_ANGLE


def angle_cnn() -> AngleCNN:
    """`AngleCNN` for 1x28x28 inputs, randomly initialised (see `pretrained_angle_cnn`)."""
    return AngleCNN()
