"""Datasets: CIFAR-10 JPEG archive, the MNIST 5k sample (and its rotated-digit angle regression
task), in-memory image arrays."""

from .arrays import ImageArrayDataset
from .cache import cache_dir
from .cifar import CIFAR10_CLASSES, cifar10, read_image_tar
from .mnist import MNIST_CLASSES, mnist5k
from .regression import TargetArrayDataset, rotated_mnist5k

__all__ = [
    "CIFAR10_CLASSES",
    "MNIST_CLASSES",
    "ImageArrayDataset",
    "TargetArrayDataset",
    "cache_dir",
    "cifar10",
    "mnist5k",
    "read_image_tar",
    "rotated_mnist5k",
]
