"""Built-in models and checkpoint loading."""

from .checkpoint import load_checkpoint, read_state_dict
from .lenet5 import LeNet5, lenet5
from .resnet_cifar import BasicBlock, PadShortcut, ResNetCifar, resnet_cifar
from .train import pretrained_lenet5, train_lenet5

__all__ = [
    "BasicBlock",
    "LeNet5",
    "PadShortcut",
    "ResNetCifar",
    "lenet5",
    "load_checkpoint",
    "pretrained_lenet5",
    "read_state_dict",
    "resnet_cifar",
    "train_lenet5",
]
