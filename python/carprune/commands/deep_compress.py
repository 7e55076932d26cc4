"""``carprune deep-compress``: Deep Compression (magnitude pruning, k-means weight sharing,
Huffman coding) of a model, or of the pruned model of a compress output (--result), into a
checksummed ``model.cpz``; ``report.md`` and ``report.json`` (written last) say what each phase
did to size and accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..config import ConfigError, Option, settings_object
from ..io import atomic_write
from ..logging_utils import PhaseProgress
from . import _common as common

NAME = "deep-compress"
HELP = "Deep Compression: prune, share weights, Huffman-code into a .cpz file"


def options() -> list[Option]:
    return common.common_options() + common.MODEL_OPTS + \
        common.data_options(False, "evaluation images") + common.TRAIN_OPTS + [
            Option("result", "path", None, "deep-compress the pruned model of this compress output "
                   "directory (the model and weights give its original architecture)",
                   metavar="DIR"),
            Option("layers", "strs", None, "conv/linear layers to compress (default: all)"),
            Option("prune", "spec", None, "sparsity: 0.6, or conv=0.6,linear=0.9,<layer>=...; in "
                   "the config also {quality = q} (default conv 0.6, linear 0.9)"),
            Option("bits", "spec", None, "weight-sharing bits: 8, or conv=8,linear=5,<layer>=..."),
            Option("index_bits", "spec", None, "relative-index bits: as --bits"),
            Option("finetune_iters", "iters", 0, "retraining iterations after pruning and of the "
                   "shared values: N, or N1,N2. The budget that keeps accuracy: 200,100 (measured on the "
                   "whole ResNet-20 at the default pruning, lr 1e-3, batch 64, 10,000 CIFAR-10 "
                   "training images: hold-out accuracy 81.35 -> 81.05 percent; with 20,10 it fell "
                   "to 74.10, with 0 to 55.45; README, Deep Compression)"),
            Option("lr", "float", 1e-3, "retraining learning rate"),
            Option("optimizer", "str", "sgd", "retraining optimiser", choices=("sgd", "adam")),
            Option("batch_size", "int", 64, "retraining batch size"),
            Option("train_scope", "str", "selected", "retrain only the compressed layers or all",
                   choices=("selected", "all")),
            Option("kmeans_iters", "int", 300, "k-means iterations"),
            Option("warn_drop", "float", 0.02, "warn (log line, and 'warnings' in report.json) "
                   "when a phase - pruning + retraining, or weight sharing + fine-tuning - loses "
                   "more accuracy than this on --data (a fraction: 0.02 = 2 points)"),
        ]


Spec = int | float | dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class Settings(common.TrainSettings, common.DataSettings, common.ModelSettings,
               common.CommonSettings):
    result: str | None
    layers: tuple[str, ...] | None
    prune: Spec
    bits: Spec
    index_bits: Spec
    finetune_iters: int | tuple[int, int]
    lr: float
    optimizer: str
    batch_size: int
    train_scope: str
    kmeans_iters: int
    warn_drop: float

    def __post_init__(self) -> None:
        if self.train_data or self.train_split:
            if not (self.train_data or self.data):
                raise ConfigError("--train-split needs --train-data or --data")
        elif self.finetune_iters not in (0, (0, 0)):
            raise ConfigError("--finetune-iters needs training images (--train-data/--train-split)")


def run(settings: Mapping[str, Any], ctx: distributed.Context, run: common.Run, mode: str) -> int:
    from ..deepcompress import deep_compress, save_compressed

    s = settings_object(Settings, settings)
    out = Path(s.out)
    model = common.load_model(s, ctx, architecture=bool(s.result))
    if s.result:
        from ..greedy import CompressionResult

        model = CompressionResult.load(s.result, architecture=model).model.to(ctx.device)
    evald = None
    if s.data:
        evald = common.load_data(s, ctx, s.data, s.split)
        if s.num_images and s.num_images < len(evald):
            evald = evald.sample(s.num_images, s.seed)
    train = None
    if s.train_data or s.train_split:
        train = common.load_data(s, ctx, s.train_data or s.data, s.train_split)
    # progress per phase: bars on a terminal; in batch logs a line per phase and every
    # --log-interval seconds (phase, step, loss); --threads auto re-checked at its steps
    with PhaseProgress(mode, s.log_interval, "deep compression",
                       threads=common.thread_governor(s, ctx)) as on_progress:
        res = deep_compress(model, train, evald, layers=None if s.layers is None else list(s.layers),
                            prune=s.prune, bits=s.bits, index_bits=s.index_bits,
                            finetune_iters=s.finetune_iters, lr=s.lr, optimizer=s.optimizer,
                            batch_size=s.batch_size, train_scope=s.train_scope,
                            kmeans_iters=s.kmeans_iters, seed=s.seed, warn_drop=s.warn_drop,
                            on_progress=on_progress)
    size = save_compressed(res, out / "model.cpz")
    md = res.report.to_markdown()
    atomic_write(out / "report.md", lambda f: f.write(md + "\n"), mode="w")
    res.report.save(out / "report.json")  # last: marks the output complete
    print(md, flush=True)
    print(f"wrote {out / 'model.cpz'} ({size:,} bytes)", flush=True)
    return common.EXIT_OK
