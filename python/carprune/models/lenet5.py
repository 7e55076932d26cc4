"""LeNet-5 as in the CAR paper (Caffe's MNIST LeNet): conv 20 and conv 50 filters of 5x5, each
followed by 2x2 max pooling, then fully connected 800->500 (ReLU) and 500->10."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def lenet5(num_classes: int = 10) -> LeNet5:
    """LeNet-5 for 1x28x28 inputs, randomly initialised (see `pretrained_lenet5`)."""
    return LeNet5(num_classes)
