"""Loading weights into the built-in models from plain or wrapped state dicts."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..io import read_tensor_file


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a plain state dict, or one under 'state_dict'/'model'.

    A 'module.' prefix (from DataParallel) is stripped.
    """
    path = Path(path)
    obj = read_tensor_file(path, "checkpoint")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into `model` strictly, naming missing, unexpected and mis-shaped keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    # BatchNorm's step counter is absent from older checkpoints and does not affect inference.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the file: {', '.join(missing[:10])}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:10])}"
                         + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:10]))
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: "
                         + " | ".join(parts))
    model.load_state_dict(state, strict=False)
    return model.eval()
