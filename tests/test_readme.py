"""README.md's "Layout" section is complete and true.

The section is a code block of entries: a name column (paths, comma-separated, under the
``python/carprune/`` heading indented by two spaces) and a description, continued on deeper indented
lines. A package entry (``data/``) covers its ``__init__.py`` and the modules its description
names (``batches.py``); a module is also covered by its own path (``data/batches.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "carprune"
PY_NAME = re.compile(r"(?<![\w./-])([\w/]+\.py)\b")
# the name column: paths joined by ", " (a description never starts right after a comma)
ENTRY = re.compile(r"^([\w.*/-]+(?:, [\w.*/-]+)*)(?:\s+(.*))?$")


def split_entry(text: str) -> tuple[list[str], str]:
    """(names, description) of one entry line without its indentation."""
    m = ENTRY.match(text.strip())
    assert m, f"README.md's Layout: cannot read the names of {text.strip()!r}"
    return m.group(1).split(", "), (m.group(2) or "").strip()


def layout_block(readme: str) -> list[str]:
    """The lines of the first code block after the "## Layout" heading."""
    section = readme.split("\n## Layout\n", 1)
    assert len(section) == 2, 'README.md has no "## Layout" section'
    body = section[1].split("\n## ", 1)[0]
    m = re.search(r"^```[^\n]*\n(.*?)^```", body, re.S | re.M)
    assert m, 'README.md\'s "## Layout" section has no code block'
    return m.group(1).splitlines()


def package_entries(lines: list[str], heading: str = "python/carprune/") -> list[tuple[list[str], str]]:
    """(names, description) of each entry under `heading`, in order."""
    start = next((i for i, line in enumerate(lines) if line.strip() and split_entry(line)[0] == [heading]),
                 None)
    assert start is not None, f"the layout has no {heading} line"
    entries: list[tuple[list[str], str]] = []
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break  # the next top-level entry (scripts/, tests/ ...)
        if line.startswith("  ") and not line.startswith("   "):
            entries.append(split_entry(line))
        elif entries:
            entries[-1] = (entries[-1][0], entries[-1][1] + " " + line.strip())
    return entries


def listed(entries: list[tuple[list[str], str]]) -> set[str]:
    """Package-relative paths the entries name: modules, package __init__s, and the modules a
    package entry's description names."""
    paths = set()
    for names, desc in entries:
        for name in names:
            if name.endswith("/"):
                paths.add(name + "__init__.py")
                paths |= {f"{name}{m}" for m in PY_NAME.findall(desc) if "/" not in m}
            else:
                paths.add(name)
    return paths


def modules(package: Path = PACKAGE) -> set[str]:
    return {p.relative_to(package).as_posix() for p in package.rglob("*.py")
            if "__pycache__" not in p.parts}


def readme_lines() -> list[str]:
    return layout_block((ROOT / "README.md").read_text())


def test_layout_lists_every_module():
    missing = sorted(modules() - listed(package_entries(readme_lines())))
    assert not missing, ("README.md's Layout section does not list these modules of python/carprune "
                         f"(one line each, or in their package's line): {missing}")


def test_layout_names_only_modules_that_exist():
    extra = sorted(listed(package_entries(readme_lines())) - modules())
    assert not extra, f"README.md's Layout section lists modules that do not exist: {extra}"


def test_layout_top_level_paths_exist():
    """The other entries (csrc/..., scripts/, tests/, benchmarks/): each path of the name column
    exists (a glob matches something; a bare name after a comma is in the first path's folder)."""
    wrong = []
    for line in readme_lines():
        if not line or line.startswith(" ") or line.startswith("python/carprune/"):
            continue
        names = split_entry(line)[0]
        folder = names[0].rsplit("/", 1)[0] if "/" in names[0].rstrip("/") else ""
        for i, name in enumerate(names):
            path = name if i == 0 or "/" in name else f"{folder}/{name}"
            if not any(ROOT.glob(path.rstrip("/"))):
                wrong.append(path)
    assert not wrong, f"README.md's Layout section names paths that do not exist: {wrong}"


def test_layout_parser():
    """The reading above on a made-up layout: entries, continuation lines, package descriptions."""
    readme = "\n".join([
        "# x", "## Layout", "", "```",
        "csrc/a.cpp            op schemas",
        "csrc/b/c.h, d.h overflowing name column, desc",
        "python/carprune/",
        "  __init__.py, cli.py   the API",
        "  data/                 datasets: arrays.py, batches.py (one",
        "                        access path), cache.py",
        "  models/train.py       training",
        "scripts/              env.sh, also.py",
        "```", "", "## Build", "```", "  nope.py  x", "```"])
    entries = package_entries(layout_block(readme))
    assert entries == [(["__init__.py", "cli.py"], "the API"),
                       (["data/"], "datasets: arrays.py, batches.py (one access path), cache.py"),
                       (["models/train.py"], "training")]
    assert split_entry(layout_block(readme)[1]) == (["csrc/b/c.h", "d.h"],
                                                    "overflowing name column, desc")
    assert listed(entries) == {"__init__.py", "cli.py", "data/__init__.py", "data/arrays.py",
                               "data/batches.py", "data/cache.py", "models/train.py"}
