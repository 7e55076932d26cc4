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
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import surgery
from ..callbacks import Callbacks, Event, log
from ..data.batches import DataLike, num_items
from ..evaluate import accuracy
from ..training import Schedule, train
from .fileformat import CompressedModel, EncodedLayer, section_overhead, write_atomic
from .layers import check_bits, compressible_layers, layer_kind, resolve, select_layers
from .prune import PruneSpec, apply_mask, magnitude_mask, parse_prune
from .quantize import quantize_weight, write_shared

DEFAULT_PRUNE: dict[str, float] = {"conv": 0.6, "linear": 0.9}
DEFAULT_BITS: dict[str, int] = {"conv": 8, "linear": 5}
DEFAULT_INDEX_BITS: dict[str, int] = {"conv": 8, "linear": 5}
DEFAULT_WARN_DROP = 0.02  # accuracy (a fraction: 2 points) a phase may lose before a warning

# on_progress(phase, done, total, info): phase is one of PHASES; done of total steps (layers for
# prune / quantise / encode, iterations for the two trainings, 0 then 1 for an evaluation);
# info: the layer, the loss, or the stage and its accuracy.
ProgressCallback = Callable[[str, int, int, Mapping[str, Any]], None]
PHASES = ("prune", "retrain", "quantise", "fine-tune shared values", "encode", "evaluate")


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
    eval_images: int | None = None  # images each accuracy was measured on
    # a phase that lost more accuracy than config["warn_drop"]: {"phase", "stage", "compared_to",
    # "before", "after", "drop", "message"}; empty when none did (or without eval data)
    warnings: list[dict[str, Any]] = field(default_factory=list)

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
        """Per-layer table plus totals, accuracies and warnings, for READMEs and benchmark
        output. Every column says its unit: code widths and stream lengths in bits, sizes in
        bytes."""
        rows = [
            "| layer | shape | params | nonzero | code width (bits, weight/index) | weights (bits) "
            "| indices (bits) | codebook (bits) | Huffman tables (bits) | dense (bytes) "
            "| before Huffman (bytes) | after (bytes) | ratio |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.layers:
            rows.append(
                f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.params:,} | "
                f"{r.nonzeros:,} ({100 * r.density:.1f} %) | {r.bits}/{r.index_bits} | "
                f"{r.weight_bits:,} | {r.index_code_bits:,} | {r.codebook_bits:,} | "
                f"{r.huffman_table_bits:,} | {r.bytes_before:,} | {r.bytes_before_huffman:,} | "
                f"{r.bytes_after:,} | {r.ratio:.1f}x |"
            )
        rows.append(
            f"\nSelected layers: {self.layers_bytes_before:,} -> {self.layers_bytes_after:,} bytes "
            f"({self.layers_ratio:.1f}x). Whole model: {self.model_bytes_before:,} -> "
            f"{self.file_bytes:,} bytes in the .cpz file ({self.ratio:.1f}x; other tensors "
            f"{self.rest_bytes:,} bytes, container {self.container_bytes:,} bytes)."
        )
        acc = ", ".join(f"{k} {100 * v:.2f} %" for k, v in self.accuracy.items() if v is not None)
        if acc:
            on = f" on {self.eval_images:,} images" if self.eval_images else ""
            rows.append(f"Accuracy{on}: {acc}.")
        rows += [f"WARNING: {w['message']}" for w in self.warnings]
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


def _structure_of(model: nn.Module) -> dict[str, Any] | None:
    """`surgery.pruned_structure(model)` when `surgery` narrowed any of its modules, else None."""
    if not any(hasattr(m, surgery.LINEAGE_ATTR) for m in model.modules()):
        return None
    return surgery.pruned_structure(model)


def load_compressed(
    path: str | os.PathLike[str], architecture: nn.Module | Callable[[], nn.Module]
) -> nn.Module:
    """Load a ``.cpz`` file into ``architecture`` (a module, or a factory of one); returns the
    model.

    A file that records a pruned structure (format version 2: `deep_compress` of a network
    `surgery` pruned) takes the ORIGINAL architecture: a copy is narrowed as the structure says
    (`surgery.apply_structure`, as `surgery.load_pruned` does), then the weights are loaded; an
    architecture that already has exactly that structure is filled in place. Otherwise (nothing
    pruned, or a version 1 file, which never recorded it) the architecture must have exactly
    the file's tensors with the same shapes and is filled in place: a network shrunk by other
    means needs its shrunk architecture. A mismatch raises ``ValueError`` naming the first
    difference; corrupt files raise :class:`CorruptFileError` naming the section.
    """
    cm = read_compressed(path)
    model = architecture if isinstance(architecture, nn.Module) else architecture()
    if not isinstance(model, nn.Module):
        raise TypeError(f"architecture must be an nn.Module or return one, got {type(model)}")
    if cm.structure is not None:
        have = _structure_of(model)
        if have is None:
            try:
                model = surgery.apply_structure(model, cm.structure)
            except ValueError as exc:
                raise ValueError(f"{os.fspath(path)!r}: {exc}") from exc
        elif have != cm.structure:
            raise ValueError(
                f"architecture {type(model).__name__} is pruned differently from "
                f"{os.fspath(path)!r} (its pruned layers: {sorted(have['layers'])}; the file's: "
                f"{sorted(cm.structure['layers'])}): pass the original, unpruned architecture, "
                "and the file's structure is re-applied to it")
    state = cm.state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    old = (f" (a version {cm.version} file records no pruned structure: for a pruned network "
           "pass the pruned architecture)" if cm.version < 2 else "")
    if missing or extra:
        raise ValueError(
            f"architecture {type(model).__name__} does not match {os.fspath(path)!r} "
            f"(file arch {cm.arch!r}): missing in file {missing[:5]}, not in architecture "
            f"{extra[:5]}{old}"
        )
    for k, t in state.items():
        if tuple(own[k].shape) != tuple(t.shape):
            raise ValueError(
                f"architecture {type(model).__name__} does not match {os.fspath(path)!r}: "
                f"{k} has shape {tuple(own[k].shape)}, the file holds {tuple(t.shape)}{old}"
            )
        if own[k].dtype != t.dtype:
            raise ValueError(f"{k}: architecture dtype {own[k].dtype}, file dtype {t.dtype}")
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------- training


def _reporter(on_progress: ProgressCallback | None) -> ProgressCallback:
    return on_progress if on_progress is not None else (lambda phase, done, total, info: None)


@dataclass(frozen=True)
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

    def schedule(self, iters: int) -> Schedule:
        """`iters` steps of the training loop on shuffled passes over the data (drawn as a
        seeded shuffling DataLoader draws them), BatchNorm statistics frozen (fine-tuning
        batches are small, their statistics would be noise)."""
        return Schedule(iters=iters, batch_size=self.batch_size, lr=self.lr,
                        optimizer=self.optimizer, momentum=self.momentum,
                        weight_decay=self.weight_decay, seed=self.seed, sampling="loader",
                        mode="frozen_bn")


def _run(model: nn.Module, data: DataLike, iters: int, cfg: TrainConfig, params: list[torch.Tensor],
         trainable: list[torch.Tensor], after_backward: Callable[[], None],
         after_step: Callable[[], None], phase: str, report: ProgressCallback,
         callbacks: Callbacks | None) -> float:
    """`iters` steps of `training.train` (cross-entropy) on `params`; after each step
    ``report(phase, step, iters, {"loss": running mean})``. Returns the mean loss of the last
    10 % of steps."""
    running = math.nan

    def step_done(step: int, loss: float) -> None:
        nonlocal running
        after_step()
        running = loss if step == 1 else 0.9 * running + 0.1 * loss
        report(phase, step, iters, {"loss": running})

    report(phase, 0, iters, {})
    return train(model, data, cfg.schedule(iters), params=params, trainable=trainable,
                 after_backward=after_backward, after_step=step_done, callbacks=callbacks,
                 name="deep-compress", phase=phase).final_loss


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
    train_data: DataLike,
    iters: int,
    cfg: TrainConfig | None = None,
    *,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    callbacks: Callbacks | None = None,
) -> float:
    """Retrain ``model`` in place with the pruned weights (``masks[layer]`` False) held at
    exactly zero: their gradients are masked before and the masks re-applied after every
    step, so neither momentum nor weight decay can revive them. Returns the final loss.
    Progress goes to ``on_progress("retrain", step, iters, {"loss": ...})`` and, per epoch,
    to ``callbacks.on_event``; ``progress`` is accepted for existing callers and has no
    effect (the run layer draws progress)."""
    del progress
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
    return _run(model, train_data, iters, cfg, params, params, mask_grads, remask, "retrain",
                _reporter(on_progress), callbacks)


def finetune_codebooks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    codebooks: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    train_data: DataLike,
    iters: int,
    cfg: TrainConfig | None = None,
    *,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    callbacks: Callbacks | None = None,
) -> dict[str, torch.Tensor]:
    """Trained quantisation (Han et al. section 3.3): the gradient of each shared value is the
    sum of the gradients of the weights in its cluster; after each step every layer's weights
    are rewritten from its codebook, pruned ones as zero. Returns the tuned codebooks.
    Progress as `retrain_pruned`, phase "fine-tune shared values"."""
    del progress
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

    _run(model, train_data, iters, cfg, list(cents.values()) + others,
         list(weights.values()) + others, cluster_grads, rewrite, "fine-tune shared values",
         _reporter(on_progress), callbacks)
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
    train_data: DataLike | None = None,
    eval_data: DataLike | None = None,
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
    warn_drop: float | None = DEFAULT_WARN_DROP,
    on_progress: ProgressCallback | None = None,
    callbacks: Callbacks | None = None,
    progress: bool | None = None,
) -> DeepCompressionResult:
    """Deep-compress the conv/linear layers of ``model`` (all, or those named in ``layers``).

    ``prune``, ``bits`` and ``index_bits`` take one value for all layers or a mapping keyed by
    ``"conv"``, ``"linear"`` or a layer name, on top of the defaults (prune conv 0.6 / linear
    0.9, bits 8/5, index bits 8/5, as Han et al. use). A prune value is a sparsity in [0, 1),
    ``{"quality": q}`` (prune |w| <= q * std(w)) or ``{"sparsity": s}``. ``finetune_iters``
    (an int, or a pair for the two phases) steps of ``train_data`` retrain after pruning, with
    pruned weights held at zero, and then fine-tune the shared values. ``eval_data`` adds the
    accuracy after each stage to the report (`evaluate.accuracy`). Data of any form
    `data.batches` reads; a DataLoader is read through its dataset (batches of ``batch_size``
    drawn by the seeded loop, `training.train`). The model is copied unless ``inplace``.

    A CAR-pruned model's structure (`surgery.pruned_structure`: the original positions each
    narrowed module keeps) is recorded in the result and the ``.cpz`` file, so
    `load_compressed` rebuilds the network from the original architecture.

    Retraining budget: on the whole pretrained ResNet-20 at the defaults, hold-out accuracy went
    81.35 % -> 55.45 % without retraining, 74.10 % with (20, 10) iterations and 81.05 % with
    (200, 100) (lr 1e-3, batch 64, 10,000 CIFAR-10 training images; README, Deep Compression).

    warn_drop: with ``eval_data``, a phase (pruning + retraining, weight sharing + fine-tuning,
    or both together) that loses more than this much accuracy (a fraction; 0.02 = 2 points) is
    logged as a warning and listed in ``report.warnings``; None: no check.
    on_progress: called as ``on_progress(phase, done, total, info)`` through every phase (see
    ``PHASES``). callbacks: ``on_event`` per training epoch (algorithm "deep-compress", the
    phase in ``data``) and per accuracy measured. ``progress`` is accepted for existing callers
    and has no effect: the run layer draws progress from these callbacks.
    """
    del progress
    prune_iters, quant_iters = _iters(finetune_iters)
    cfg = TrainConfig(lr, optimizer, momentum, weight_decay, batch_size, seed, train_scope)
    if (prune_iters or quant_iters) and train_data is None:
        raise ValueError("finetune_iters > 0 needs train_data")
    if kmeans_iters < 1:
        raise ValueError(f"kmeans_iters must be >= 1, got {kmeans_iters}")
    if warn_drop is not None and not 0 <= warn_drop < 1:
        raise ValueError(f"warn_drop is an accuracy drop in [0, 1) (0.02 = 2 points), got "
                         f"{warn_drop}")

    return _deep_compress(model, train_data, eval_data, layers, prune, bits, index_bits,
                          prune_iters, quant_iters, cfg, kmeans_iters, inplace, warn_drop,
                          _reporter(on_progress), callbacks)


def _deep_compress(model: nn.Module, train_data: DataLike | None, eval_data: DataLike | None,
                   layers: Iterable[str] | str | None, prune: Any, bits: Any, index_bits: Any,
                   prune_iters: int, quant_iters: int, cfg: TrainConfig, kmeans_iters: int,
                   inplace: bool, warn_drop: float | None, report: ProgressCallback,
                   callbacks: Callbacks | None) -> DeepCompressionResult:
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
    names = list(weights)

    acc: dict[str, float | None] = {}
    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        if eval_data is None:
            acc[name] = None
            return
        report("evaluate", 0, 1, {"stage": name})
        acc[name] = accuracy(m, eval_data, batch_size=max(cfg.batch_size, 256))
        report("evaluate", 1, 1, {"stage": name, "accuracy": acc[name]})
        if callbacks is not None:
            measured = [k for k, v in acc.items() if v is not None]
            callbacks.on_event(Event("deep-compress", len(measured),
                                     f"deep compression: stage {name}, accuracy "
                                     f"{100 * acc[name]:.2f} %",
                                     data={"phase": "evaluate", "stage": name,
                                           "accuracy": acc[name]}))

    stage("original")

    # 1. magnitude pruning, then retraining with pruned weights held at zero
    t0 = time.perf_counter()
    masks = {}
    for i, (n, w) in enumerate(weights.items()):
        report("prune", i, len(names), {"layer": n})
        masks[n] = magnitude_mask(w, prune_of[n])
        apply_mask(w, masks[n])
    report("prune", len(names), len(names), {})
    seconds["prune"] = time.perf_counter() - t0
    stage("pruned")
    if prune_iters:
        t0 = time.perf_counter()
        retrain_pruned(m, masks, train_data, prune_iters, cfg, on_progress=report,
                       callbacks=callbacks)
        seconds["retrain"] = time.perf_counter() - t0
        stage("pruned+retrained")

    # 2. weight sharing: k-means per layer over the surviving weights, then fine-tuning
    t0 = time.perf_counter()
    positions, codebooks, labels = {}, {}, {}
    for i, (n, w) in enumerate(weights.items()):
        positions[n] = masks[n].reshape(-1).nonzero().squeeze(1)
        # no more shared values than surviving weights: in a small layer (a 3-channel stem, a
        # CAR-narrowed conv) a 2**bits codebook would outweigh the weights it encodes
        bits_of[n] = min(bits_of[n], max(1, int(positions[n].numel()).bit_length() - 1))
        report("quantise", i, len(names), {"layer": n, "bits": bits_of[n]})
        codebooks[n], labels[n] = quantize_weight(w, masks[n], bits_of[n], kmeans_iters)
        write_shared(w, positions[n], codebooks[n], labels[n])
    report("quantise", len(names), len(names), {})
    seconds["quantize"] = time.perf_counter() - t0
    stage("quantized")
    if quant_iters:
        t0 = time.perf_counter()
        codebooks = finetune_codebooks(
            m, masks, codebooks, labels, train_data, quant_iters, cfg, on_progress=report,
            callbacks=callbacks,
        )
        seconds["finetune"] = time.perf_counter() - t0
        stage("quantized+finetuned")

    # 3. sparse relative-index encoding + Huffman coding, then a decode check
    t0 = time.perf_counter()
    encoded = []
    for i, n in enumerate(names):
        report("encode", i, len(names) + 1, {"layer": n})
        encoded.append(EncodedLayer.encode(
            n,
            layer_kind(selected[n]) or "",
            weights[n].detach(),
            positions[n].cpu().numpy(),
            codebooks[n],
            labels[n].cpu().numpy(),
            bits_of[n],
            ibits_of[n],
        ))
    state = m.state_dict()
    weight_keys = {f"{n}.weight" if n else "weight" for n in weights}
    rest = {k: t.detach().cpu().clone() for k, t in state.items() if k not in weight_keys}
    cm = CompressedModel(arch=type(m).__name__, layers=encoded, rest=rest,
                         structure=_structure_of(m))
    data = cm.to_bytes()
    seconds["encode"] = time.perf_counter() - t0
    report("encode", len(names), len(names) + 1, {"layer": "(decode check)"})
    t0 = time.perf_counter()
    decoded = CompressedModel.from_bytes(data).state_dict()
    seconds["decode"] = time.perf_counter() - t0
    for k in weight_keys:
        if not torch.equal(decoded[k], state[k].cpu()):
            raise RuntimeError(f"internal error: {k} does not decode to the quantised weights")
    report("encode", len(names) + 1, len(names) + 1, {})

    rep = _report(m, cm, data, encoded, prune_of, acc, seconds, cfg, (prune_iters, quant_iters))
    rep.config["warn_drop"] = warn_drop
    rep.eval_images = num_items(eval_data) if eval_data is not None else None
    rep.warnings = accuracy_warnings(acc, warn_drop, (prune_iters, quant_iters))
    for w in rep.warnings:
        log.warning("%s", w["message"])
    return DeepCompressionResult(
        model=m,
        report=rep,
        compressed=cm,
        masks={n: mk.detach() for n, mk in masks.items()},
        codebooks=codebooks,
    )


def accuracy_warnings(acc: Mapping[str, float | None], warn_drop: float | None,
                      iters: tuple[int, int] = (0, 0)) -> list[dict[str, Any]]:
    """The phases of a Deep Compression run that lost more than `warn_drop` accuracy, from the
    accuracy after each stage (`DeepCompressionReport.accuracy`): pruning (+ retraining) against
    the original, weight sharing (+ fine-tuning) against the pruned model, and, when neither
    alone did but both together did, the whole run against the original."""
    if warn_drop is None or acc.get("original") is None:
        return []

    def last(*keys: str) -> tuple[str, float] | None:
        for k in keys:
            if acc.get(k) is not None:
                return k, float(acc[k])  # type: ignore[arg-type]
        return None

    orig = ("original", float(acc["original"]))  # type: ignore[arg-type]
    pruned = last("pruned+retrained", "pruned")
    shared = last("quantized+finetuned", "quantized")
    checks = [("pruning" + (" + retraining" if iters[0] else " (no retraining)"), orig, pruned),
              ("weight sharing" + (" + fine-tuning" if iters[1] else " (no fine-tuning)"),
               pruned, shared)]
    out = []
    for phase, a, b in checks:
        if a is not None and b is not None and a[1] - b[1] > warn_drop:
            out.append((phase, a, b))
    if not out and shared is not None and orig[1] - shared[1] > warn_drop:
        out.append(("the whole run", orig, shared))
    advice = ("retrain longer (finetune_iters: 200,100 kept the whole ResNet-20 within 0.3 "
              "points; README, Deep Compression), or prune less / use more bits")
    return [{"phase": phase, "stage": b[0], "compared_to": a[0], "before": a[1], "after": b[1],
             "drop": a[1] - b[1],
             "message": f"accuracy fell {100 * (a[1] - b[1]):.1f} points in {phase} "
                        f"({100 * a[1]:.2f} % {a[0]} -> {100 * b[1]:.2f} % {b[0]}), more than "
                        f"the {100 * warn_drop:g} points allowed (warn_drop); {advice}"}
            for phase, a, b in out]


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
