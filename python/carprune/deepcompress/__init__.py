"""Deep Compression (Han et al. 2015): magnitude pruning, trained quantisation by k-means
weight sharing, and Huffman-coded sparse storage in a checksummed ``.cpz`` file."""

from .fileformat import CompressedModel, CorruptFileError, EncodedLayer
from .huffman import HuffmanTable, huffman_decode, huffman_encode
from .pipeline import (
    DeepCompressionReport,
    DeepCompressionResult,
    LayerReport,
    TrainConfig,
    deep_compress,
    finetune_codebooks,
    load_compressed,
    read_compressed,
    retrain_pruned,
    save_compressed,
)
from .prune import PruneSpec, magnitude_mask
from .quantize import kmeans_1d

__all__ = [
    "CompressedModel",
    "CorruptFileError",
    "DeepCompressionReport",
    "DeepCompressionResult",
    "EncodedLayer",
    "HuffmanTable",
    "LayerReport",
    "TrainConfig",
    "PruneSpec",
    "deep_compress",
    "finetune_codebooks",
    "huffman_decode",
    "huffman_encode",
    "kmeans_1d",
    "load_compressed",
    "magnitude_mask",
    "read_compressed",
    "retrain_pruned",
    "save_compressed",
]
