"""Turning the strings of a command line or config file into a model and a data set.

Models: ``lenet5`` and the CIFAR ResNets ``resnet20``..``resnet110`` (and ``resnet1202``) built in;
any torchvision classification model by name (``resnet18`` or ``torchvision:resnet18``) when
torchvision is installed; or the user's own ``package.module:function`` or
``path/to/file.py:function`` that returns an ``nn.Module`` (called with `model_kwargs`), so a
cluster job can compress a model that is not part of any package. Weights come from a checkpoint
file (a state dict, possibly under 'state_dict'/'model', 'module.' prefixes stripped).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .data.arrays import ImageArrayDataset
from .data.folder import load_images
from .models import lenet5, load_checkpoint, resnet_cifar

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
BUILTIN_MODELS = ("lenet5", *(f"resnet{d}" for d in CIFAR_DEPTHS))


def _torchvision_models() -> list[str] | None:
    try:
        import torchvision
    except ImportError:
        return None
    return list(torchvision.models.list_models())


def _call(fn: Any, kwargs: Mapping[str, Any], what: str) -> nn.Module:
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{what} cannot be called with {dict(kwargs)} ({exc})") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what} returned {type(model).__name__}, not a torch nn.Module")
    return model


def _user_function(spec: str) -> Any:
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name.isidentifier():
        raise ValueError(f"model {spec!r}: expected package.module:function or file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        name = "carprune_user_" + re.sub(r"\W", "_", path.stem)
        mod_spec = importlib.util.spec_from_file_location(name, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # so the model pickles and its classes resolve
        mod_spec.loader.exec_module(module)
    else:
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)  # the console script, unlike `python -m`, omits it
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ValueError(f"model {spec!r}: cannot import {target!r} ({exc}); is it on "
                             "PYTHONPATH?") from exc
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"model {spec!r}: {target} has no callable {fn_name!r}")
    return fn


def build_model(spec: str, num_classes: int | None = None,
                model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """An (untrained) model from its spec; see the module docstring for the forms."""
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    if ":" in spec and not spec.startswith("torchvision:"):
        fn = _user_function(spec)
        if "num_classes" in kwargs and "num_classes" not in inspect.signature(fn).parameters \
                and not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
            raise ValueError(f"model {spec!r} takes no num_classes argument")
        return _call(fn, kwargs, f"model function {spec!r}")
    name = spec.removeprefix("torchvision:")
    if spec == "lenet5":
        return _call(lenet5, kwargs, "lenet5")
    m = re.fullmatch(r"resnet(\d+)", spec)
    if m and int(m.group(1)) in CIFAR_DEPTHS:  # the CIFAR depths; resnet18/50 are torchvision's
        return _call(lambda **kw: resnet_cifar(int(m.group(1)), **kw), kwargs, spec)
    tv = _torchvision_models()
    if tv is not None and name in tv:
        import torchvision

        return _call(lambda **kw: torchvision.models.get_model(name, weights=None, **kw), kwargs,
                     f"torchvision model {name!r}")
    hint = ("" if tv is not None else "; torchvision models by name need torchvision installed")
    if spec.startswith("torchvision:") and tv is not None:
        hint = "; torchvision has no such model"
    raise ValueError(f"unknown model {spec!r}: built-in models are {', '.join(BUILTIN_MODELS)} "
                     f"(other CIFAR depths: carprune.models:resnet_cifar with model_kwargs depth){hint}; "
                     "or give package.module:function")


def load_model(spec: str, weights: str | os.PathLike | None = None, *,
               num_classes: int | None = None, model_kwargs: Mapping[str, Any] | None = None
               ) -> nn.Module:
    """The model of `spec` with `weights` loaded strictly (mismatches are named), in eval mode."""
    model = build_model(spec, num_classes, model_kwargs)
    if weights is not None:
        load_checkpoint(model, weights)
    return model.eval()


def load_data(path: str | os.PathLike, split: str | None = None, *,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              classes: Sequence[str] | None = None, channels: int | None = None
              ) -> ImageArrayDataset:
    """The data set at `path` (ImageFolder directory, tar of one, or .npz), normalised."""
    return load_images(path, split, mean=mean, std=std, classes=classes, channels=channels)
