"""carprune: structural compression and interpretation of CNNs by CAR importance."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ops, data, models
from ._ops import ablate_conv, class_correct_counts

__version__ = "0.1.0"

__all__ = ["ablate_conv", "class_correct_counts", "data", "models", "_ops"]
