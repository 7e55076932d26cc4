"""carprune: structural compression and interpretation of CNNs by CAR importance.

Score every filter of a conv layer or neuron of a linear layer (`score_layer`, by top-1 CAR or
any `metric`: top-k, NLL, RAR's squared/absolute error, a per-sample function), compress
greedily (`compress_layer`, `compress_layers`, `compress_global`), cut networks physically
(`prune_filters`), add Deep Compression (`deep_compress`), explain filters (`interpret`) and
compare two layers of two networks (`compare`).
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ops, data, io, metrics, models, threads  # noqa: F401  (_ops registers the native ops)
from ._ops import ablate_conv, ablate_conv_head, class_correct_counts
from .compare import Comparison, compare
from .cost import CostReport, LayerCost, count_cost
from .criteria import filter_importance
from .deepcompress import (
    CorruptFileError,
    DeepCompressionReport,
    DeepCompressionResult,
    LayerReport,
    deep_compress,
    load_compressed,
    read_compressed,
    save_compressed,
)
from .engine import LayerScorer, score_layer
from .finetune import FineTune, finetune
from .global_mode import GlobalCompressionResult, compress_global, compress_layers
from .graph import CutError, conv_layers
from .greedy import CompressionResult, Step, compress_layer
from .interpret import InterpretationReport, build_report, interpret
from .kse import KSEConv2d, KSELayer, KSEResult, kse_compress
from .scores import LayerScores
from .surgery import (
    ScatteredConv2d,
    channel_origins,
    copy_model,
    kept_channels,
    load_pruned,
    prune_filters,
    save_pruned,
)

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "CompressionResult",
    "CorruptFileError",
    "CostReport",
    "CutError",
    "DeepCompressionReport",
    "DeepCompressionResult",
    "FineTune",
    "GlobalCompressionResult",
    "InterpretationReport",
    "KSEConv2d",
    "KSELayer",
    "KSEResult",
    "LayerCost",
    "LayerReport",
    "LayerScorer",
    "LayerScores",
    "ScatteredConv2d",
    "Step",
    "ablate_conv",
    "ablate_conv_head",
    "build_report",
    "channel_origins",
    "class_correct_counts",
    "compare",
    "compress_global",
    "compress_layer",
    "compress_layers",
    "conv_layers",
    "copy_model",
    "count_cost",
    "data",
    "deep_compress",
    "filter_importance",
    "finetune",
    "interpret",
    "io",
    "kept_channels",
    "kse_compress",
    "load_compressed",
    "load_pruned",
    "metrics",
    "models",
    "prune_filters",
    "read_compressed",
    "save_compressed",
    "save_pruned",
    "score_layer",
]
