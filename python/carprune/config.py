"""Command settings from three layers: built-in defaults < a TOML config file < command-line flags.

A batch job usually keeps the long-lived choices (model, weights, data, normalisation) in a
config file and varies one or two flags per task (``--layer``, ``--out``), so every setting has
one name used in both places (``--num-images`` on the command line is ``num_images`` in the
file) and one converter, so a value means the same wherever it comes from.

File layout: top-level keys apply to every command; a table named after a command
(``[compress]``, ``[deep-compress]``) applies to that command only and wins over the top level.
A top-level key that no command knows is an error (a typo must not silently fall back to a
default); one that another command knows is ignored, so one file can serve several commands.
Relative paths in a file are relative to the file's directory, so a job can run from anywhere.

A command then turns the merged mapping into its typed, frozen settings object with
`settings_object`, which checks every value against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ImportError:
        tomllib = None  # type: ignore[assignment]


class ConfigError(ValueError):
    """A setting is missing, unknown or malformed; the message names it and where it came from."""


KINDS = ("str", "int_or_auto", "int", "float", "number", "bool", "path", "paths", "model", "floats",
         "ints", "strs", "spec", "iters", "table")


@dataclass(frozen=True)
class Option:
    """One setting: its name (``num_images``), how values are read, its default and help.

    kinds: str, int, float, number (int count or float fraction), bool, path (resolved against
    the config file's directory), model (a model spec, whose ``file.py:fn`` part is a path),
    floats/ints/strs/paths (lists; on the command line comma-separated), spec (a number or a mapping
    of names to numbers, e.g. ``conv=0.6,linear=0.9``), iters (an int or a pair ``a,b``),
    table (a TOML table; JSON on the command line). `minimum`: the smallest value a number
    (int, float, number) may take.
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    required: bool = False
    metavar: str | None = None
    minimum: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _split_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _number(text: str) -> int | float:
    t = text.strip()
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    return float(t)


def convert(opt: Option, value: Any, where: str, base: Path | None = None) -> Any:
    """`value` for `opt` as the program uses it; `where` says where it came from, for errors.

    `base` is the directory relative paths are resolved against (None: keep them as given,
    relative to the working directory, as flags are).
    """
    what = f"{where}: {opt.name}"
    try:
        out = _convert(opt, value, base)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if (opt.minimum is not None and isinstance(out, (int, float)) and not isinstance(out, bool)
            and not out >= opt.minimum):
        raise ConfigError(f"{what}: expected a number >= {opt.minimum:g}, got {out!r}")
    if opt.choices is not None:
        bad = [v for v in (out if isinstance(out, list) else [out]) if v not in opt.choices]
        if bad:
            raise ConfigError(f"{what}: {bad[0]!r} is not one of {', '.join(map(str, opt.choices))}")
    return out


def _resolve_path(text: str, base: Path | None) -> str:
    p = Path(os.path.expanduser(os.path.expandvars(text)))
    if base is not None and not p.is_absolute():
        p = base / p
    return str(p)


def _convert(opt: Option, value: Any, base: Path | None) -> Any:
    k = opt.kind
    if value is None:
        return None
    if k == "int_or_auto":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"expected a positive integer or 'auto', got {value!r}")
        try:
            n = int(value)
        except ValueError:
            raise TypeError(f"expected a positive integer or 'auto', got {value!r}") from None
        if n < 1:
            raise TypeError(f"expected a positive integer or 'auto', got {value!r}")
        return n
    if k == "str":
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if k == "path":
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
            raise TypeError(f"expected a path, got {value!r}")   # "" would mean the cwd
        return _resolve_path(os.fspath(value), base)
    if k == "model":
        if not isinstance(value, str):
            raise TypeError(f"expected a model name or module:function, got {value!r}")
        head, sep, fn = value.rpartition(":")
        if sep and head.endswith(".py"):
            return _resolve_path(head, base) + ":" + fn
        return value
    if k == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                          "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise TypeError(f"expected true or false, got {value!r}")
    if k == "int":
        if isinstance(value, bool):
            raise TypeError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise TypeError(f"expected an integer, got {value!r}")
    if k in ("float", "number"):
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value) if k == "float" else value
        if isinstance(value, str):
            try:
                n = _number(value)
            except ValueError:
                raise TypeError(f"expected a number, got {value!r}") from None
            return float(n) if k == "float" else n
        raise TypeError(f"expected a number, got {value!r}")
    if k in ("floats", "ints", "strs", "paths"):
        item = Option(opt.name, {"floats": "float", "ints": "int", "strs": "str", "paths": "path"}[k])
        return [_convert(item, v, base) for v in _split_list(value)]
    if k == "iters":
        items = _split_list(value)
        ints = [_convert(Option(opt.name, "int"), v, base) for v in items]
        if len(ints) == 1:
            return ints[0]
        if len(ints) == 2:
            return tuple(ints)
        raise TypeError(f"expected an int or a pair of ints, got {value!r}")
    if k == "spec":
        return _spec(value)
    if k == "table":
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, str):
            import json

            try:
                obj = json.loads(value)
            except json.JSONDecodeError as exc:
                raise TypeError(f"expected a JSON object, got {value!r} ({exc})") from None
            if isinstance(obj, dict):
                return obj
        raise TypeError(f"expected a table (JSON object on the command line), got {value!r}")
    raise AssertionError(k)


def _spec(value: Any) -> Any:
    """A number, or a mapping of kind/layer names to numbers (or to tables such as
    ``{quality = 1.2}``): '0.6' or 'conv=0.6,linear=0.9' on the command line."""
    if isinstance(value, bool):
        raise TypeError(f"expected a number or name=value pairs, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _spec(v) if not isinstance(v, Mapping) else dict(v) for k, v in value.items()}
    if isinstance(value, str):
        if "=" not in value:
            try:
                return _number(value)
            except ValueError:
                raise TypeError(f"expected a number or name=value pairs, got {value!r}") from None
        out: dict[str, Any] = {}
        for part in _split_list(value):
            key, sep, num = part.partition("=")
            if not sep or not key.strip():
                raise TypeError(f"expected name=value, got {part!r}")
            try:
                out[key.strip()] = _number(num)
            except ValueError:
                raise TypeError(f"{key.strip()}: expected a number, got {num!r}") from None
        return out
    raise TypeError(f"expected a number or name=value pairs, got {value!r}")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML config file (errors name the file and the TOML problem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if tomllib is None:
        raise ConfigError("reading TOML config files needs Python 3.11+ or `pip install tomli`")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _normalise_key(key: str) -> str:
    return key.replace("-", "_")


def _unknown(key: str, known: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown setting {key!r}{hint}")


def merge_settings(
    command: str,
    options: Sequence[Option],
    flags: Mapping[str, Any],
    file_config: Mapping[str, Any] | None = None,
    config_path: str | os.PathLike | None = None,
    all_commands: Mapping[str, Sequence[Option]] | None = None,
) -> dict[str, Any]:
    """Settings of `command`: defaults, then the file's top level, then its ``[command]`` table,
    then the flags given explicitly (`flags` holds only those, as raw strings or values).

    `all_commands` (name -> options) lets a shared file carry other commands' keys and tables.
    """
    by_name = {o.name: o for o in options}
    commands = dict(all_commands or {command: options})
    known_anywhere = {o.name for opts in commands.values() for o in opts}
    table_names = {c for c in commands} | {c.replace("-", "_") for c in commands}
    out: dict[str, Any] = {o.name: o.default for o in options}
    source: dict[str, str] = {o.name: "default" for o in options}
    if file_config:
        where = f"config file {config_path}" if config_path else "config file"
        base = Path(config_path).resolve().parent if config_path else None
        layers: list[tuple[Mapping[str, Any], str, bool]] = [(file_config, where, False)]
        for key in (command, command.replace("-", "_")):
            if isinstance(file_config.get(key), Mapping):
                layers.append((file_config[key], f"{where} [{key}]", True))
                break
        for table, tw, own in layers:
            for raw_key, value in table.items():
                key = _normalise_key(raw_key)
                if not own and raw_key in table_names and isinstance(value, Mapping):
                    continue  # a command's table: applied above (or another command's)
                if key in by_name:
                    out[key] = convert(by_name[key], value, tw, base)
                    source[key] = tw
                elif own or key not in known_anywhere:
                    raise _unknown(raw_key, by_name if own else known_anywhere, tw)
    for key, value in flags.items():
        opt = by_name[key]
        out[key] = convert(opt, value, opt.flag)
        source[key] = "command line"
    missing = [o for o in options if o.required and out.get(o.name) is None]
    if missing:
        names = ", ".join(f"{o.flag} (or {o.name} in the config file)" for o in missing)
        raise ConfigError(f"{command}: missing required setting{'s' if len(missing) > 1 else ''}: "
                          f"{names}")
    out["_sources"] = source
    return out


T = TypeVar("T")


def settings_object(cls: type[T], settings: Mapping[str, Any]) -> T:
    """The frozen dataclass `cls` built from a command's merged settings (`merge_settings`).

    Each field takes the setting of the same name (a field the mapping lacks takes its default;
    keys the class does not name, such as ``_sources``, are ignored). Lists become tuples, so
    the object is immutable through and through. Every value is checked against the field's
    annotation (str, int, float, bool, None, tuple[X, ...], dict, unions, Any): a wrong one is a
    ConfigError naming the setting, what it expects and the value. A ValueError raised by the
    class's own ``__post_init__`` checks becomes a ConfigError with the same message.
    """
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} is not a frozen dataclass")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in settings:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{f.name}: a required setting of {cls.__name__} is missing")
            continue
        value = _freeze(settings[f.name])
        tp = hints[f.name]
        if not _matches(value, tp):
            raise ConfigError(f"{f.name}: expected {_describe(tp)}, got {value!r}")
        values[f.name] = value
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if origin is not None:
        return isinstance(value, origin)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    if tp is type(None) or tp is None:
        return "nothing (None)"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
            return f"a list of {plural.get(args[0], _describe(args[0]) + ' items')}"
        return f"a tuple ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return "a table"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))
