"""carprune: structural compression and interpretation of CNNs by CAR importance."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ops, data, models  # noqa: F401  (_ops registers the native ops)
from ._ops import ablate_conv, class_correct_counts
from .engine import LayerScorer, score_layer
from .graph import CutError, conv_layers
from .scores import LayerScores

__version__ = "0.1.0"

__all__ = [
    "CutError",
    "LayerScorer",
    "LayerScores",
    "ablate_conv",
    "class_correct_counts",
    "conv_layers",
    "data",
    "models",
    "score_layer",
]
