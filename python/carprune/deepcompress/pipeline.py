"""The Deep Compression driver (Han et al. 2015): prune, retrain, share weights, fine-tune the
shared values, and encode with relative indices and Huffman coding.

``deep_compress`` works on any ``nn.Module`` (including one whose conv layers were physically
shrunk by CAR) and on any subset of its conv/linear layers, so a single layer can be compressed
and measured on its own, as in the CAR paper's Table 2.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .fileformat import CompressedModel, EncodedLayer, section_overhead, write_atomic
from .layers import check_bits, compressible_layers, layer_kind, resolve, select_layers
from .prune import PruneSpec, apply_mask, magnitude_mask, parse_prune
from .quantize import quantize_weight, write_shared

DEFAULT_PRUNE: dict[str, float] = {"conv": 0.6, "linear": 0.9}
DEFAULT_BITS: dict[str, int] = {"conv": 8, "linear": 5}
DEFAULT_INDEX_BITS: dict[str, int] = {"conv": 8, "linear": 5}

Data = Dataset | DataLoader


# ----------------------------------------------------------------------------- reports


@dataclass
class LayerReport:
    """Storage of one compressed layer. Sizes in bits are the exact lengths in the file;
    ``bytes_after`` is the layer's five section payloads (each padded to a byte)."""

    name: str
    kind: str
    shape: list[int]
    prune: str
    bits: int
    index_bits: int
    params: int
    nonzeros: int
    entries: int  # stored sparse entries: nonzeros + filler zeros
    fillers: int
    weight_bits: int  # Huffman-coded cluster indices
    index_code_bits: int  # Huffman-coded relative index differences
    codebook_bits: int
    huffman_table_bits: int  # both canonical tables
    weight_fixed_bits: int  # the cluster indices at fixed width, before Huffman coding
    index_fixed_bits: int  # the index differences at fixed width, before Huffman coding
    bytes_before: int  # dense weight tensor in its dtype
    bytes_after: int

    @property
    def density(self) -> float:
        return self.nonzeros / self.params if self.params else 0.0

    @property
    def bytes_before_huffman(self) -> int:
        """Size with fixed-width codes (pruning + quantisation only), for Han's table."""
        return math.ceil((self.weight_fixed_bits + self.index_fixed_bits + self.codebook_bits) / 8)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf


@dataclass
class DeepCompressionReport:
    """What Deep Compression did to a model: per-layer storage, whole-file size, accuracy at
    each stage (``None`` without eval data) and timings. ``file_bytes`` is exactly the size
    :func:`save_compressed` writes: layer payloads + ``rest_bytes`` + ``container_bytes``."""

    arch: str
    layers: list[LayerReport]
    accuracy: dict[str, float | None]
    model_bytes_before: int  # every state_dict tensor, dense, in its dtype
    file_bytes: int
    rest_bytes: int  # uncompressed tensors (biases, BatchNorm, unselected layers)
    container_bytes: int  # preamble, header JSON, section framing and checksums
    config: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Whole-model compression ratio: dense state_dict bytes / .cpz file bytes."""
        return self.model_bytes_before / self.file_bytes

    @property
    def layers_bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def layers_bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def layers_ratio(self) -> float:
        """Compression ratio of the selected layers' weights alone."""
        return self.layers_bytes_before / self.layers_bytes_after

    def layer(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(
            f"no layer {name!r} in the report ({', '.join(r.name for r in self.layers)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeepCompressionReport:
        d = dict(d)
        d["layers"] = [LayerReport(**r) for r in d["layers"]]
        return cls(**d)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the report as JSON (atomically)."""
        write_atomic(path, json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeepCompressionReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_markdown(self) -> str:
        """Per-layer table plus totals and accuracies, for READMEs and benchmark output."""
        rows = [
            "| layer | shape | params | nonzero | bits (w/idx) | weights | indices | codebook "
            "| tables | bytes before | before Huffman | after | ratio |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.layers:
            rows.append(
                f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.params} | "
                f"{r.nonzeros} ({100 * r.density:.1f} %) | {r.bits}/{r.index_bits} | "
                f"{r.weight_bits} b | {r.index_code_bits} b | {r.codebook_bits} b | "
                f"{r.huffman_table_bits} b | {r.bytes_before} | {r.bytes_before_huffman} | "
                f"{r.bytes_after} | {r.ratio:.1f}x |"
            )
        rows.append(
            f"\nSelected layers: {self.layers_bytes_before} -> {self.layers_bytes_after} bytes "
            f"({self.layers_ratio:.1f}x). Whole model: {self.model_bytes_before} -> "
            f"{self.file_bytes} bytes in the .cpz file ({self.ratio:.1f}x; other tensors "
            f"{self.rest_bytes} B, container {self.container_bytes} B)."
        )
        acc = ", ".join(f"{k} {100 * v:.2f} %" for k, v in self.accuracy.items() if v is not None)
        if acc:
            rows.append(f"Accuracy: {acc}.")
        return "\n".join(rows)


@dataclass
class DeepCompressionResult:
    """The compressed model (decoded weights, ready to run), its report, and the encoding that
    :func:`save_compressed` writes. ``masks``/``codebooks`` are per compressed layer."""

    model: nn.Module
    report: DeepCompressionReport
    compressed: CompressedModel
    masks: dict[str, torch.Tensor]
    codebooks: dict[str, torch.Tensor]

    def save(self, path: str | os.PathLike[str]) -> int:
        """Same as ``save_compressed(self, path)``."""
        return save_compressed(self, path)


# ----------------------------------------------------------------------------- file API


def save_compressed(
    dc: DeepCompressionResult | CompressedModel, path: str | os.PathLike[str]
) -> int:
    """Write a ``.cpz`` file (temp file + rename); returns the number of bytes written."""
    cm = dc.compressed if isinstance(dc, DeepCompressionResult) else dc
    data = cm.to_bytes()
    write_atomic(path, data)
    return len(data)


def read_compressed(path: str | os.PathLike[str]) -> CompressedModel:
    """Parse and verify a ``.cpz`` file without building a model."""
    return CompressedModel.from_bytes(Path(path).read_bytes())


def load_compressed(
    path: str | os.PathLike[str], architecture: nn.Module | Callable[[], nn.Module]
) -> nn.Module:
    """Load a ``.cpz`` file into ``architecture`` (a module, filled in place, or a factory).

    The architecture must have exactly the file's tensors with the same shapes (for a
    CAR-shrunk model, build the shrunk architecture); otherwise ``ValueError`` names the first
    mismatch. Corrupt files raise :class:`CorruptFileError` naming the section.
    """
    cm = read_compressed(path)
    model = architecture if isinstance(architecture, nn.Module) else architecture()
    if not isinstance(model, nn.Module):
        raise TypeError(f"architecture must be an nn.Module or return one, got {type(model)}")
    state = cm.state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise ValueError(
            f"architecture {type(model).__name__} does not match {os.fspath(path)!r} "
            f"(file arch {cm.arch!r}): missing in file {missing[:5]}, not in architecture "
            f"{extra[:5]}"
        )
    for k, t in state.items():
        if tuple(own[k].shape) != tuple(t.shape):
            raise ValueError(
                f"architecture {type(model).__name__} does not match {os.fspath(path)!r}: "
                f"{k} has shape {tuple(own[k].shape)}, the file holds {tuple(t.shape)}"
            )
        if own[k].dtype != t.dtype:
            raise ValueError(f"{k}: architecture dtype {own[k].dtype}, file dtype {t.dtype}")
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------- training


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _loader(data: Data, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_data yields no batch")


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``data`` of (image, label) pairs."""
    was_training = model.training
    model.eval()
    device = _device(model)
    correct = total = 0
    for x, y in _loader(data, batch_size, shuffle=False, seed=0):
        y = torch.as_tensor(y).to(device)
        pred = model(x.to(device)).argmax(1)
        correct += int((pred == y).sum())
        total += int(y.numel())
    model.train(was_training)
    if total == 0:
        raise ValueError("eval_data is empty")
    return correct / total


@dataclass
class TrainConfig:
    """Fine-tuning settings shared by the retraining after pruning and the codebook tuning."""

    lr: float = 1e-3
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    train_scope: str = "selected"  # "selected": only the compressed layers; "all": every param

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.train_scope not in ("selected", "all"):
            raise ValueError(f"train_scope must be 'selected' or 'all', got {self.train_scope!r}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ValueError(f"need lr > 0 and batch_size >= 1, got {self.lr}, {self.batch_size}")


def _train(
    model: nn.Module,
    data: Data,
    iters: int,
    params: list[torch.Tensor],
    needs_grad: Iterable[torch.Tensor],
    cfg: TrainConfig,
    after_backward: Callable[[], None],
    after_step: Callable[[], None],
    desc: str,
    progress: bool | None,
) -> float:
    """``iters`` steps of cross-entropy training on ``params``; BatchNorm stays in eval mode
    (fine-tuning batches are small, their statistics would be noise). Returns the mean loss of
    the last 10 % of steps."""
    device = _device(model)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    flags = {p: p.requires_grad for p in model.parameters()}
    grad_set = {id(t) for t in needs_grad}
    for p in model.parameters():
        p.requires_grad_(id(p) in grad_set)
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    losses: list[float] = []
    batches = _cycle(_loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed))
    try:
        for _ in tqdm(range(iters), desc=desc, disable=not _show_progress(progress), leave=False):
            x, y = next(batches)
            model.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.to(device)), torch.as_tensor(y).to(device))
            loss.backward()
            after_backward()
            opt.step()
            after_step()
            losses.append(float(loss.detach()))
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    tail = losses[-max(1, len(losses) // 10) :]
    return float(np.mean(tail)) if tail else math.nan


def _layer_params(
    model: nn.Module, names: Iterable[str], scope: str
) -> tuple[dict[str, nn.Parameter], list[nn.Parameter]]:
    """The named layers' weights, and the other parameters trained alongside them: the
    layers' biases (scope "selected") or every other parameter (scope "all")."""
    weights = {n: model.get_submodule(n).weight for n in names}
    ids = {id(w) for w in weights.values()}
    if scope == "all":
        others = [p for p in model.parameters() if id(p) not in ids]
    else:
        mods = [model.get_submodule(n) for n in names]
        others = [b for b in (getattr(mod, "bias", None) for mod in mods) if b is not None]
    return weights, others


def retrain_pruned(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    train_data: Data,
    iters: int,
    cfg: TrainConfig | None = None,
    *,
    progress: bool | None = None,
) -> float:
    """Retrain ``model`` in place with the pruned weights (``masks[layer]`` False) held at
    exactly zero: their gradients are masked before and the masks re-applied after every
    step, so neither momentum nor weight decay can revive them. Returns the final loss."""
    cfg = cfg or TrainConfig()
    weights, others = _layer_params(model, masks, cfg.train_scope)

    def mask_grads() -> None:
        for n, w in weights.items():
            if w.grad is not None:
                w.grad.mul_(masks[n].to(w.grad.dtype))

    def remask() -> None:
        for n, w in weights.items():
            apply_mask(w, masks[n])

    params = list(weights.values()) + others
    return _train(
        model,
        train_data,
        iters,
        params,
        params,
        cfg,
        mask_grads,
        remask,
        "retrain pruned",
        progress,
    )


def finetune_codebooks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    codebooks: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    train_data: Data,
    iters: int,
    cfg: TrainConfig | None = None,
    *,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Trained quantisation (Han et al. section 3.3): the gradient of each shared value is the
    sum of the gradients of the weights in its cluster; after each step every layer's weights
    are rewritten from its codebook, pruned ones as zero. Returns the tuned codebooks."""
    cfg = cfg or TrainConfig()
    weights, others = _layer_params(model, masks, cfg.train_scope)
    positions = {n: mk.reshape(-1).nonzero().squeeze(1) for n, mk in masks.items()}
    cents = {
        n: cb.detach().clone().to(torch.float32).requires_grad_(True) for n, cb in codebooks.items()
    }

    def cluster_grads() -> None:
        for n, w in weights.items():
            cents[n].grad = torch.zeros_like(cents[n])
            if w.grad is not None:
                g = w.grad.reshape(-1)[positions[n]].to(torch.float32)
                cents[n].grad.index_add_(0, labels[n], g)

    def rewrite() -> None:
        with torch.no_grad():
            for n, w in weights.items():
                cents[n].copy_(cents[n].to(w.dtype).to(torch.float32))  # representable values
                write_shared(w, positions[n], cents[n], labels[n])

    _train(
        model,
        train_data,
        iters,
        list(cents.values()) + others,
        list(weights.values()) + others,
        cfg,
        cluster_grads,
        rewrite,
        "fine-tune codebooks",
        progress,
    )
    return {n: c.detach() for n, c in cents.items()}


# ----------------------------------------------------------------------------- driver


def _iters(finetune_iters: int | tuple[int, int]) -> tuple[int, int]:
    pair = (
        (finetune_iters, finetune_iters)
        if isinstance(finetune_iters, int) and not isinstance(finetune_iters, bool)
        else tuple(finetune_iters)
    )
    if len(pair) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in pair):
        raise ValueError(
            f"finetune_iters must be an int >= 0 or a pair (prune_iters, quant_iters), "
            f"got {finetune_iters!r}"
        )
    return pair[0], pair[1]


def deep_compress(
    model: nn.Module,
    train_data: Data | None = None,
    eval_data: Data | None = None,
    *,
    layers: Iterable[str] | str | None = None,
    prune: Any = None,
    bits: Mapping[str, int] | int | None = None,
    index_bits: Mapping[str, int] | int | None = None,
    finetune_iters: int | tuple[int, int] = 0,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    train_scope: str = "selected",
    kmeans_iters: int = 300,
    seed: int = 0,
    inplace: bool = False,
    progress: bool | None = None,
) -> DeepCompressionResult:
    """Deep-compress the conv/linear layers of ``model`` (all, or those named in ``layers``).

    ``prune``, ``bits`` and ``index_bits`` take one value for all layers or a mapping keyed by
    ``"conv"``, ``"linear"`` or a layer name, on top of the defaults (prune conv 0.6 / linear
    0.9, bits 8/5, index bits 8/5, as Han et al. use). A prune value is a sparsity in [0, 1),
    ``{"quality": q}`` (prune |w| <= q * std(w)) or ``{"sparsity": s}``. ``finetune_iters``
    (an int, or a pair for the two phases) steps of ``train_data`` retrain after pruning, with
    pruned weights held at zero, and then fine-tune the shared values. ``eval_data`` adds the
    accuracy after each stage to the report. The model is copied unless ``inplace``.
    """
    prune_iters, quant_iters = _iters(finetune_iters)
    cfg = TrainConfig(lr, optimizer, momentum, weight_decay, batch_size, seed, train_scope)
    if (prune_iters or quant_iters) and train_data is None:
        raise ValueError("finetune_iters > 0 needs train_data")
    if kmeans_iters < 1:
        raise ValueError(f"kmeans_iters must be >= 1, got {kmeans_iters}")

    m = model if inplace else copy.deepcopy(model)
    everything = compressible_layers(m)
    selected = select_layers(m, layers)
    prune_of: dict[str, PruneSpec] = resolve(
        "prune", prune, DEFAULT_PRUNE, selected, everything, parse_prune
    )
    bits_of = resolve("bits", bits, DEFAULT_BITS, selected, everything, check_bits)
    ibits_of = resolve(
        "index_bits", index_bits, DEFAULT_INDEX_BITS, selected, everything, check_bits
    )
    weights = {n: mod.weight for n, mod in selected.items()}
    for n, w in weights.items():
        if not w.is_floating_point():
            raise ValueError(f"layer {n!r}: weight dtype {w.dtype} is not floating point")

    acc: dict[str, float | None] = {}
    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        acc[name] = (
            accuracy(m, eval_data, max(cfg.batch_size, 256)) if eval_data is not None else None
        )

    stage("original")

    # 1. magnitude pruning, then retraining with pruned weights held at zero
    t0 = time.perf_counter()
    masks = {n: magnitude_mask(w, prune_of[n]) for n, w in weights.items()}
    for n, w in weights.items():
        apply_mask(w, masks[n])
    seconds["prune"] = time.perf_counter() - t0
    stage("pruned")
    if prune_iters:
        t0 = time.perf_counter()
        retrain_pruned(m, masks, train_data, prune_iters, cfg, progress=progress)
        seconds["retrain"] = time.perf_counter() - t0
        stage("pruned+retrained")

    # 2. weight sharing: k-means per layer over the surviving weights, then fine-tuning
    t0 = time.perf_counter()
    positions, codebooks, labels = {}, {}, {}
    for n, w in weights.items():
        positions[n] = masks[n].reshape(-1).nonzero().squeeze(1)
        # no more shared values than surviving weights: in a small layer (a 3-channel stem, a
        # CAR-narrowed conv) a 2**bits codebook would outweigh the weights it encodes
        bits_of[n] = min(bits_of[n], max(1, int(positions[n].numel()).bit_length() - 1))
        codebooks[n], labels[n] = quantize_weight(w, masks[n], bits_of[n], kmeans_iters)
        write_shared(w, positions[n], codebooks[n], labels[n])
    seconds["quantize"] = time.perf_counter() - t0
    stage("quantized")
    if quant_iters:
        t0 = time.perf_counter()
        codebooks = finetune_codebooks(
            m, masks, codebooks, labels, train_data, quant_iters, cfg, progress=progress
        )
        seconds["finetune"] = time.perf_counter() - t0
        stage("quantized+finetuned")

    # 3. sparse relative-index encoding + Huffman coding, then a decode check
    t0 = time.perf_counter()
    encoded = [
        EncodedLayer.encode(
            n,
            layer_kind(selected[n]) or "",
            weights[n].detach(),
            positions[n].cpu().numpy(),
            codebooks[n],
            labels[n].cpu().numpy(),
            bits_of[n],
            ibits_of[n],
        )
        for n in weights
    ]
    state = m.state_dict()
    weight_keys = {f"{n}.weight" if n else "weight" for n in weights}
    rest = {k: t.detach().cpu().clone() for k, t in state.items() if k not in weight_keys}
    cm = CompressedModel(arch=type(m).__name__, layers=encoded, rest=rest)
    data = cm.to_bytes()
    seconds["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = CompressedModel.from_bytes(data).state_dict()
    seconds["decode"] = time.perf_counter() - t0
    for k in weight_keys:
        if not torch.equal(decoded[k], state[k].cpu()):
            raise RuntimeError(f"internal error: {k} does not decode to the quantised weights")

    report = _report(m, cm, data, encoded, prune_of, acc, seconds, cfg, (prune_iters, quant_iters))
    return DeepCompressionResult(
        model=m,
        report=report,
        compressed=cm,
        masks={n: mk.detach() for n, mk in masks.items()},
        codebooks=codebooks,
    )


def _report(
    model: nn.Module,
    cm: CompressedModel,
    data: bytes,
    encoded: list[EncodedLayer],
    prune_of: Mapping[str, PruneSpec],
    acc: dict[str, float | None],
    seconds: dict[str, float],
    cfg: TrainConfig,
    iters: tuple[int, int],
) -> DeepCompressionReport:
    sections = cm.sections()
    payload = {name: len(p) for name, p in sections}
    rows = []
    for e in encoded:
        fillers = e.entries - e.nonzeros
        alphabet = (1 << e.bits) + (1 if fillers else 0)
        rows.append(
            LayerReport(
                name=e.name,
                kind=e.kind,
                shape=list(e.shape),
                prune=prune_of[e.name].describe(),
                bits=e.bits,
                index_bits=e.index_bits,
                params=e.numel,
                nonzeros=e.nonzeros,
                entries=e.entries,
                fillers=fillers,
                weight_bits=len(e.weight_stream),
                index_code_bits=len(e.index_stream),
                codebook_bits=32 * e.codebook.size,
                huffman_table_bits=8
                * (payload[f"{e.name}/weights.huffman"] + payload[f"{e.name}/indices.huffman"]),
                weight_fixed_bits=e.entries * max(1, math.ceil(math.log2(alphabet))),
                index_fixed_bits=e.entries * e.index_bits,
                bytes_before=e.numel
                * torch.empty((), dtype=getattr(torch, e.dtype)).element_size(),
                bytes_after=sum(len(p) for _, p in e.sections()),
            )
        )
    container = len(data) - sum(payload.values()) + payload["header"]
    assert container == 6 + sum(section_overhead(n) for n, _ in sections) + payload["header"]
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    config = {"train": asdict(cfg), "finetune_iters": list(iters)}
    return DeepCompressionReport(
        arch=cm.arch,
        layers=rows,
        accuracy=acc,
        model_bytes_before=before,
        file_bytes=len(data),
        rest_bytes=payload["rest"],
        container_bytes=container,
        config=config,
        seconds=seconds,
    )
