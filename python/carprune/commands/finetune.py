"""``carprune finetune``: fine-tune a compressed model with the CAR paper's per-layer learning
rates (`finetune.finetune`).

With --result DIR (a compress output) the fine-tuned model is saved as a result again
(``result.json`` + ``model/``, with its hold-out accuracy); with --layer alone, the weights go to
``model.pt``. ``finetune.json`` records the settings and the hold-out accuracy before and after.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..callbacks import Event
from ..config import ConfigError, Option, settings_object
from ..evaluate import accuracy
from ..io import atomic_open, write_json
from ..logging_utils import RunCallbacks
from . import _common as common

NAME = "finetune"
HELP = "fine-tune a compressed model (the CAR paper's per-layer learning rates)"


def options() -> list[Option]:
    return common.common_options() + common.MODEL_OPTS + \
        common.data_options(help_role="training images") + common.EVAL_OPTS + [
            Option("result", "path", None, "a compress output directory to fine-tune (the model "
                   "and weights give its original architecture)", metavar="DIR"),
            Option("layer", "str", None, "the compressed layer (taken from --result when given)"),
            Option("iters", "int", 500, "iterations"),
            Option("batch_size", "int", 64, "batch size"),
            Option("lr_layer", "float", 0.0, "learning rate of the compressed layer (default 0: "
                   "its kept filters stay as CAR chose them)"),
            Option("lr_next", "float", 1e-3, "learning rate of the layers consuming it"),
            Option("lr_other", "float", 1e-4, "learning rate of all other layers"),
            Option("momentum", "float", 0.9, "SGD momentum"),
            Option("weight_decay", "float", 0.0, "weight decay"),
        ]


@dataclass(frozen=True, kw_only=True)
class Settings(common.EvalSettings, common.DataSettings, common.ModelSettings,
               common.CommonSettings):
    data: str
    result: str | None
    layer: str | None
    iters: int
    batch_size: int
    lr_layer: float
    lr_next: float
    lr_other: float
    momentum: float
    weight_decay: float

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.result and not self.layer:
            raise ConfigError("finetune needs --result DIR (a compress output) or --layer")


def run(settings: Mapping[str, Any], ctx: distributed.Context, run: common.Run, mode: str) -> int:
    from ..finetune import FineTune, finetune

    s = settings_object(Settings, settings)
    out = Path(s.out)
    arch = common.load_model(s, ctx, architecture=bool(s.result))
    result = None
    if s.result:
        from ..greedy import CompressionResult

        result = CompressionResult.load(s.result, architecture=arch)
        model, layer = result.model.to(ctx.device), result.layer
        if s.layer and s.layer != layer:
            raise ConfigError(f"--layer {s.layer} differs from the result's layer {layer}")
    else:
        model, layer = arch, s.layer
    train = common.load_data(s, ctx, s.data, s.split)
    if s.num_images:
        train = train.sample(min(s.num_images, len(train)), s.seed)
    train, evald = common.other_data(s, s.seed, ctx, "eval", s.eval_data, s.eval_split, train)
    cfg = FineTune(train_data=train, iters=s.iters, batch_size=s.batch_size, lr_layer=s.lr_layer,
                   lr_next=s.lr_next, lr_other=s.lr_other, momentum=s.momentum,
                   weight_decay=s.weight_decay, seed=s.seed)
    before = (None if evald is None else accuracy(model, evald, num_images=s.eval_images, seed=s.seed))
    t0 = time.monotonic()
    # an event per epoch (bar or log line), a heartbeat between them in batch logs;
    # --threads auto re-checked at each
    with RunCallbacks(mode, interval=s.log_interval, ctx=ctx,
                      threads=common.thread_governor(s, ctx)) as callbacks:
        callbacks.on_event(Event("finetune", 0, f"fine-tuning {layer}: {cfg.iters} iterations"))
        finetune(model, layer, cfg, callbacks)
    after = (None if evald is None else accuracy(model, evald, num_images=s.eval_images, seed=s.seed))
    doc = {"format": "carprune.finetune", "layer": layer, "settings": cfg.describe(),
           "accuracy_before": before, "accuracy_after": after,
           "seconds": round(time.monotonic() - t0, 3), "result": s.result}
    if result is not None:
        result.model = model.cpu()
        result.finetuned_holdout_accuracy = after
        common.save_result(result, out)
    else:
        with atomic_open(out / "model.pt") as f:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f)
    write_json(out / "finetune.json", doc)
    if before is not None:
        print(f"{layer}: hold-out accuracy {100 * before:.2f} % -> {100 * after:.2f} % after "
              f"{cfg.iters} iterations", flush=True)
    return common.EXIT_OK
