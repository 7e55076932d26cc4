"""``carprune layers``: the conv layers of a model, one per line (name, filters), e.g. to make
one array task per layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import distributed, graph
from ..config import Option, settings_object
from . import _common as common

NAME = "layers"
HELP = "list the conv layers of a model (one per line: name, filters), e.g. for array jobs"


def options() -> list[Option]:
    return common.optional([o for o in common.common_options(out_required=False)
                            if o.name == "log_level"]) + common.MODEL_OPTS


@dataclass(frozen=True, kw_only=True)
class Settings(common.ModelSettings):
    log_level: str


def run(settings: Mapping[str, Any], ctx: distributed.Context, run: common.Run | None,
        mode: str) -> int:
    s = settings_object(Settings, settings)
    model = common.load_model(s, ctx, architecture=True)
    mods = dict(model.named_modules())
    for name in graph.conv_layers(model):
        print(f"{name} {mods[name].out_channels}")
    return common.EXIT_OK
