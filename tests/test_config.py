"""Settings: `config.merge_settings` merges flags over a TOML file's tables and converts flag
strings; `config.settings_object` builds a command's frozen settings from the merged mapping,
checks every value against its field's type and names what is wrong."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest

from carprune import cli, config
from carprune.config import ConfigError, settings_object


@dataclass(frozen=True, kw_only=True)
class Example:
    name: str
    count: int
    rate: float
    flag: bool
    maybe: int | None
    items: tuple[float, ...] | None
    pair: int | tuple[int, int]
    table: dict[str, Any] | None
    default: str = "x"

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"--count must be >= 0, got {self.count}")


GOOD = {"name": "a", "count": 3, "rate": 1, "flag": True, "maybe": None, "items": [0.5, 2],
        "pair": [1, 2], "table": {"k": [1]}, "_sources": {}, "unrelated": object()}


def test_builds_an_immutable_object_from_the_mapping():
    s = settings_object(Example, GOOD)
    assert s.items == (0.5, 2) and s.pair == (1, 2) and s.rate == 1 and s.default == "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.count = 4  # type: ignore[misc]
    assert settings_object(Example, {**GOOD, "pair": 7, "default": "y"}).pair == 7


@pytest.mark.parametrize("key, value, expect", [
    ("count", "3", "count: expected an integer, got '3'"),
    ("count", True, "count: expected an integer, got True"),
    ("rate", "fast", "rate: expected a number, got 'fast'"),
    ("flag", 1, "flag: expected true or false, got 1"),
    ("maybe", 2.5, "maybe: expected an integer or nothing (None), got 2.5"),
    ("items", ["a"], "items: expected a list of numbers or nothing (None), got ('a',)"),
    ("pair", [1, 2, 3], "pair: expected an integer or a tuple (an integer, an integer), got (1, 2, 3)"),
    ("table", "k=1", "table: expected a table or nothing (None), got 'k=1'"),
])
def test_a_wrong_value_names_setting_expectation_and_value(key, value, expect):
    with pytest.raises(ConfigError) as info:
        settings_object(Example, {**GOOD, key: value})
    assert str(info.value) == expect


def test_checks_of_the_class_become_config_errors_and_missing_settings_are_named():
    with pytest.raises(ConfigError, match=r"^--count must be >= 0, got -1$"):
        settings_object(Example, {**GOOD, "count": -1})
    missing = {k: v for k, v in GOOD.items() if k != "rate"}
    with pytest.raises(ConfigError, match="rate: a required setting of Example is missing"):
        settings_object(Example, missing)

    @dataclass
    class Mutable:
        x: int

    with pytest.raises(TypeError, match="not a frozen dataclass"):
        settings_object(Mutable, {"x": 1})


def test_values_from_flags_and_files_pass_through_unchanged():
    """What `merge_settings` produces for each kind is what the typed classes accept."""
    opts = [config.Option("n", "int"), config.Option("f", "floats"), config.Option("k", "number"),
            config.Option("it", "iters"), config.Option("sp", "spec"), config.Option("t", "int_or_auto")]
    s = config.merge_settings("x", opts, {"n": "4", "f": "0.1,0.2", "k": "0.5", "it": "3,4",
                                          "sp": "conv=0.6", "t": "auto"})

    @dataclass(frozen=True, kw_only=True)
    class Kinds:
        n: int
        f: tuple[float, ...]
        k: int | float
        it: int | tuple[int, int]
        sp: int | float | dict[str, Any]
        t: int | str

    got = settings_object(Kinds, s)
    assert got == Kinds(n=4, f=(0.1, 0.2), k=0.5, it=(3, 4), sp={"conv": 0.6}, t="auto")


# -- merging flags over a file's tables; converting flag strings ----------------------------------
def test_merge_settings_order_and_conversion():
    opts = cli.command_options()
    file_cfg = {"num_images": 50, "prune": {"conv": 0.5}, "deep-compress": {"bits": 6},
                "score": {"layer": "a"}, "finetune_iters": [10, 20]}
    s = config.merge_settings("deep-compress", opts["deep-compress"],
                              {"prune": "conv=0.7,fc1=0.9", "model": "lenet5", "out": "o"},
                              file_cfg, None, opts)
    assert s["num_images"] == 50 and s["bits"] == 6 and s["finetune_iters"] == (10, 20)
    assert s["prune"] == {"conv": 0.7, "fc1": 0.9}        # the flag replaces the file's table
    assert s["_sources"]["bits"].endswith("[deep-compress]")
    with pytest.raises(config.ConfigError,
                       match=r"\[score\]: unknown setting 'layers' \(did you mean 'layer'"):
        config.merge_settings("score", opts["score"], {}, {"score": {"layer": "a", "layers": 1}},
                              None, opts)
    keep = opts["compress"][[o.name for o in opts["compress"]].index("keep")]
    assert config.convert(keep, "10", "flag") == 10 and config.convert(keep, "0.5", "flag") == 0.5
