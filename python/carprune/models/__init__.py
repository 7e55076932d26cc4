"""Built-in models and checkpoint loading."""

from .anglecnn import AngleCNN, angle_cnn
from .checkpoint import load_checkpoint, read_state_dict
from .lenet5 import LeNet5, lenet5
from .resnet_cifar import BasicBlock, PadShortcut, ResNetCifar, resnet_cifar
from .train import fit, pretrained_angle_cnn, pretrained_lenet5, train_angle_cnn, train_lenet5

__all__ = [
    "AngleCNN",
    "BasicBlock",
    "LeNet5",
    "PadShortcut",
    "ResNetCifar",
    "angle_cnn",
    "fit",
    "lenet5",
    "load_checkpoint",
    "pretrained_angle_cnn",
    "pretrained_lenet5",
    "read_state_dict",
    "resnet_cifar",
    "train_angle_cnn",
    "train_lenet5",
]
