"""``carprune kse-compress``: KSE (Li et al., CVPR 2019) on every conv layer at once, data-free.

Writes into --out: the result (``result.json`` + ``model/``, loadable with
``KSEResult.load(dir, architecture)``) and ``summary.md`` (the per-layer table), each atomically;
``result.json`` is renamed into place last. --data, when given, is only used for hold-out
accuracy (a seeded subset of --num-images) and the input size the FLOPs are counted for;
fine-tuning needs training images (--train-data / --train-split).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..config import ConfigError, Option, settings_object
from ..io import atomic_write
from ..logging_utils import RunCallbacks, format_seconds, log
from . import _common as common

NAME = "kse-compress"
HELP = "KSE: cluster the 2-D kernels of every conv layer by kernel sparsity and entropy (data-free)"


def options() -> list[Option]:
    return common.common_options() + common.MODEL_OPTS + common.data_options(
        required=False, help_role="hold-out images for accuracy (KSE itself reads no data)") + \
        common.TRAIN_OPTS + [
        Option("G", "int", 4, "indicator levels: maps below 1/G lose all kernels, above (G-1)/G "
               "keep all, each level between doubles the centroids (the paper uses 4 and 5)"),
        Option("alpha", "float", 1.0, "weight of the kernel entropy in the indicator"),
        Option("T", "int", 0, "extra halvings of the centroid counts"),
        Option("layers", "strs", None, "conv layers to compress, comma-separated (default: every "
               "conv but the stem)"),
        Option("input_shape", "ints", None, "C,H,W of one image for the FLOP counts (default: the "
               "images of --data, else 3,32,32)"),
        Option("finetune_iters", "int", 0, "fine-tune this many iterations after compressing "
               "(needs training data)"),
        Option("finetune_batch_size", "int", 64, "fine-tuning batch size"),
        Option("finetune_lr", "float", 1e-4, "fine-tuning learning rate (every parameter)"),
    ]


@dataclass(frozen=True, kw_only=True)
class Settings(common.TrainSettings, common.DataSettings, common.ModelSettings,
               common.CommonSettings):
    G: int
    alpha: float
    T: int
    layers: tuple[str, ...] | None
    input_shape: tuple[int, ...] | None
    finetune_iters: int
    finetune_batch_size: int
    finetune_lr: float

    def __post_init__(self) -> None:
        from ..kse import check_settings

        check_settings(self.G, self.alpha, self.T)
        if self.finetune_iters < 0:
            raise ValueError(f"--finetune-iters must be >= 0, got {self.finetune_iters}")


def run(settings: Mapping[str, Any], ctx: distributed.Context, run: common.Run, mode: str) -> int:
    from ..finetune import FineTune
    from ..kse import kse_compress, resolve_layers

    s = settings_object(Settings, settings)
    out = Path(s.out)
    model = common.load_model(s, ctx)
    # a bad layer fails before any data is read
    layers = resolve_layers(model, None if s.layers is None else list(s.layers))
    evald = common.load_data(s, ctx, s.data, s.split) if s.data else None
    train = None
    if s.finetune_iters:
        if s.train_data is None and s.train_split is None:
            raise ConfigError("--finetune-iters needs training images (--train-data/--train-split)")
        if s.train_data is None and evald is None:
            raise ConfigError("--train-split needs --train-data or --data")
        evald, train = common.other_data(s, s.seed, ctx, "train", s.train_data, s.train_split, evald)
    shape = s.input_shape
    if shape is None:
        shape = tuple(evald.image_shape) if evald is not None else (3, 32, 32)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape must be C,H,W (three positive sizes), got {shape}")
    if s.input_shape is None and evald is None:   # the (3, 32, 32) default: say how to change it
        from ..cost import count_cost

        try:
            count_cost(model, shape)
        except ValueError as exc:
            raise ConfigError(f"{exc}; without --data, give the model's input as --input-shape "
                              "C,H,W") from None
    ft = None
    if train is not None:
        ft = FineTune(train_data=train, iters=s.finetune_iters,
                      batch_size=s.finetune_batch_size, lr_other=s.finetune_lr, seed=s.seed)
    t0 = time.monotonic()
    # an event per layer and per fine-tuning epoch (bar or log line), a heartbeat between
    # them in batch logs; --threads auto re-checked at each
    with RunCallbacks(mode, interval=s.log_interval, ctx=ctx,
                      threads=common.thread_governor(s, ctx)) as callbacks:
        res = kse_compress(model, G=s.G, alpha=s.alpha, layers=layers, T=s.T,
                           seed=s.seed, input_shape=shape, finetune=ft, eval_data=evald,
                           eval_images=s.num_images, callbacks=callbacks)
    res.model = res.model.cpu()
    md = res.to_markdown()
    atomic_write(out / "summary.md", lambda f: f.write(f"# KSE, G={res.G}\n\n{md}\n"), mode="w")
    common.save_result(res, out)  # result.json last: marks the output complete
    log.info("kse-compress finished in %s", format_seconds(time.monotonic() - t0))
    print(md, flush=True)
    print(f"KSE G={res.G}: FLOPs {res.flops_reduction:.2f}x fewer, params {res.params_reduction:.2f}x "
          f"fewer, {res.seconds:.1f} s; result: {out / 'result.json'}", flush=True)
    return common.EXIT_OK
