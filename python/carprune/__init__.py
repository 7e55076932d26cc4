"""carprune: structural compression and interpretation of CNNs by CAR importance.

Score every filter of a conv layer or neuron of a linear layer (`score_layer`, by top-1 CAR or
any `metric`: top-k, NLL, RAR's squared/absolute error, a per-sample function), compress
greedily (`compress_layer`, `compress_layers`), cut networks physically (`prune_filters`),
add Deep Compression (`deep_compress`), explain filters (`interpret`) and compare two layers of
two networks (`compare`).

Whole networks: `prunable_units` finds every group of channels that must go together
(residual streams, concatenations, depthwise pairs, squeeze-excite gates), `score_units`
scores them exactly, `prune_units` removes them physically and `compress_global` runs greedy
CAR to a FLOPs target. `register_channelwise` / `register_leaf` / `register_channel_map` teach
every stage about a custom module.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import (  # noqa: F401
    _ops,
    callbacks,
    cost,
    criteria,
    data,
    evaluate,
    importance,
    io,
    metrics,
    models,
    threads,
)
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
from .global_mode import (
    GlobalCompressionResult,
    GlobalRound,
    RemovedChannel,
    compress_global,
    compress_layers,
)
from .graph import CutError, conv_layers
from .greedy import CompressionResult, Step, compress_layer
from .interpret import InterpretationReport, build_report, interpret
from .kse import KSEConv2d, KSELayer, KSEResult, kse_compress
from .opsem import register_channel_map, register_channelwise, register_leaf
from .scores import LayerScores
from .surgery import (
    ScatteredConv2d,
    channel_origins,
    copy_model,
    kept_channels,
    load_pruned,
    prune_filters,
    prune_units,
    save_pruned,
)
from .unit_engine import UnitScorer, UnitScores, score_units
from .units import Unit, UnitAnalysis, UnitError, masked_forward, prunable_units

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
    "GlobalRound",
    "InterpretationReport",
    "KSEConv2d",
    "KSELayer",
    "KSEResult",
    "LayerCost",
    "LayerReport",
    "LayerScorer",
    "LayerScores",
    "RemovedChannel",
    "ScatteredConv2d",
    "Step",
    "Unit",
    "UnitAnalysis",
    "UnitError",
    "UnitScorer",
    "UnitScores",
    "ablate_conv",
    "ablate_conv_head",
    "build_report",
    "callbacks",
    "channel_origins",
    "class_correct_counts",
    "compare",
    "compress_global",
    "compress_layer",
    "compress_layers",
    "conv_layers",
    "copy_model",
    "cost",
    "count_cost",
    "criteria",
    "data",
    "deep_compress",
    "evaluate",
    "filter_importance",
    "finetune",
    "importance",
    "interpret",
    "io",
    "kept_channels",
    "kse_compress",
    "load_compressed",
    "load_pruned",
    "masked_forward",
    "metrics",
    "models",
    "prunable_units",
    "prune_filters",
    "prune_units",
    "read_compressed",
    "register_channel_map",
    "register_channelwise",
    "register_leaf",
    "save_compressed",
    "save_pruned",
    "score_layer",
    "score_units",
]
