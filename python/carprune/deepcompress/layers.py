"""Which layers Deep Compression touches, and how per-layer settings are resolved.

Settings are given either as one value for every selected layer, or as a mapping whose keys
are a layer kind (``"conv"``, ``"linear"``) or a layer name; a layer name overrides its kind,
and a user mapping overrides the defaults. Resolving early turns typos into errors that name
the offending key instead of silently compressing with a default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from torch import nn

KINDS = ("conv", "linear")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

T = TypeVar("T")


def layer_kind(module: nn.Module) -> str | None:
    """``"conv"`` or ``"linear"`` for a compressible module, else ``None``."""
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All conv/linear modules of ``model`` (with a weight), in module order."""
    return {
        name: m
        for name, m in model.named_modules()
        if layer_kind(m) is not None and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def select_layers(model: nn.Module, layers: Iterable[str] | str | None) -> dict[str, nn.Module]:
    """The selected compressible layers (all of them for ``None``), in module order."""
    available = compressible_layers(model)
    if layers is None:
        if not available:
            raise ValueError(f"{type(model).__name__} has no conv or linear layer to compress")
        return available
    wanted = [layers] if isinstance(layers, str) else list(layers)
    if not wanted:
        raise ValueError("layers= selects no layer (empty selection)")
    for name in wanted:
        if name not in available:
            raise ValueError(
                f"unknown layer {name!r} in layers= (compressible layers: {', '.join(available)})"
            )
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"layers= names a layer twice: {wanted}")
    return {name: m for name, m in available.items() if name in wanted}


def resolve(
    what: str,
    spec: Any,
    default: Mapping[str, T] | T,
    selected: Mapping[str, nn.Module],
    all_layers: Mapping[str, nn.Module],
    check: Callable[[str, Any], T],
) -> dict[str, T]:
    """Per-layer values of setting ``what`` for every selected layer.

    ``check(where, value)`` validates one value and returns it normalised; ``where`` names the
    layer or kind for the error message.
    """
    merged: dict[str, Any] = {}
    for source in (default, spec):
        if source is None:
            continue
        if isinstance(source, Mapping):
            for key in source:
                if key not in KINDS and key not in all_layers:
                    raise ValueError(
                        f"unknown layer {key!r} in {what}= (use 'conv', 'linear' or one of: "
                        f"{', '.join(all_layers)})"
                    )
                if key not in KINDS and key not in selected:
                    raise ValueError(
                        f"layer {key!r} in {what}= is not among the selected layers "
                        f"({', '.join(selected)})"
                    )
            merged.update(source)
        else:
            merged = {kind: source for kind in KINDS}
    out: dict[str, T] = {}
    for name, module in selected.items():
        kind = layer_kind(module)
        assert kind is not None
        if name in merged:
            out[name] = check(f"{what}[{name!r}]", merged[name])
        elif kind in merged:
            out[name] = check(f"{what}[{kind!r}] (layer {name!r})", merged[kind])
        else:
            raise ValueError(f"{what}= gives no value for layer {name!r} (kind {kind!r})")
    return out


def check_bits(where: str, value: Any) -> int:
    """A code width in bits: an int in 1..16."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: bits must be an int in 1..16, got {value!r}")
    if not 1 <= value <= 16:
        raise ValueError(f"{where}: bits must be in 1..16, got {value}")
    return value
