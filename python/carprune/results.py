"""Saving and loading of results that carry a pruned model: `result.json` beside the model
stored as weights plus a kept-channel JSON (rebuilt from the original architecture, no pickle)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from . import surgery
from .io import read_json, write_json


class PrunedModelResult:
    """Mixin for dataclasses with a `model` field: subclasses name their FORMAT and VERSION and
    rebuild themselves from the JSON dict (`from_dict`)."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    model: nn.Module | None

    def to_dict(self) -> dict[str, Any]:
        """Every dataclass field but the model (nested dataclasses become dicts)."""
        return {k: v for k, v in asdict(self).items() if k != "model"}

    @classmethod
    def from_dict(cls, obj: dict[str, Any], model: nn.Module | None):
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """`directory`/result.json, and the pruned model under `directory`/model."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.model is not None:
            self._save_model(d / "model")
        write_json(d / "result.json", {"format": self.FORMAT, "version": self.VERSION,
                                       **self.to_dict()})
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, architecture: nn.Module | None = None):
        """Read a saved result; with `architecture` (the unpruned model) rebuild the model, in
        eval mode (as the saved one computed its figures)."""
        d = Path(directory)
        obj = read_json(d / "result.json", cls.__name__)
        fmt, version = obj.pop("format", None), obj.pop("version", None)
        if fmt != cls.FORMAT:
            raise ValueError(f"{d / 'result.json'} holds {fmt!r}, not a {cls.__name__}")
        if version != cls.VERSION:
            raise ValueError(f"{cls.__name__} version {version} in {d / 'result.json'} is not "
                             f"supported (this carprune reads version {cls.VERSION})")
        model = cls._load_model(d / "model", architecture) if architecture is not None else None
        return cls.from_dict(obj, model.eval() if model is not None else None)

    def _save_model(self, directory: Path) -> None:
        """Write the model under `directory` (default: a filter-pruned model, `save_pruned`)."""
        surgery.save_pruned(self.model, directory)

    @classmethod
    def _load_model(cls, directory: Path, architecture: nn.Module) -> nn.Module:
        """Rebuild the model written by `_save_model` from `architecture`."""
        return surgery.load_pruned(directory, architecture)
