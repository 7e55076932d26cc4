"""carprune's three layers import downward only, and the library leaves the terminal to the run
layer.

    core        ops, op semantics, graph analysis, units, engine, scores, surgery, criteria, cost,
                metrics, io, data, models, callbacks, evaluation and the training loop
    algorithms  greedy, global mode, fine-tuning, KSE, Deep Compression, interpretation,
                comparison, and the package's public API (carprune/__init__.py)
    run         the command line (cli, commands/), config, distributed, preemption, logging and
                progress

Every import of the package's source is read with `ast` (module level and inside functions, under
``if TYPE_CHECKING`` too): no module may import a module of a higher layer. The library (core and
algorithms) also must not print (``print()``, ``sys.stdout/stderr.write``), ask whether stderr is a
terminal (``.isatty()``), draw progress bars (``tqdm``) or read preemption flags (``preempt``, a run
module): it takes ``carprune.callbacks.Callbacks`` and its caller decides. One core module is the
exception, `TERMINAL_MODULE` (``carprune.callbacks``): the library's own optional bar for a call
made with ``progress=True`` (`callbacks.progress_callbacks`, drawn with tqdm) and the package's
single ``.isatty()`` (`callbacks.stderr_is_terminal`, which the run layer calls too).

Above the core, stages take the one analysis of a layer (`graph.analyze`) instead of walking the
graph themselves: the algorithms and the run layer must not read a node's ``.users``, locate a
cut (``find_cut``, ``find_fused_consumer``, ``linears_after_flatten``, ``split_at``) or trace the
model (``graph.trace``, ``graph.conv_call``) except where `GRAPH_ALLOWED` says why.

`ALLOWED` lists the violations present when this test was written, each with its reason; the test
fails on any violation not in it, and on any entry that no longer happens (so the list only
shrinks); `GRAPH_ALLOWED` is exact in the same way. A new module must be placed in `LAYERS`.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "carprune"

CORE, ALGORITHMS, RUN = 0, 1, 2
LAYER_NAMES = {CORE: "core", ALGORITHMS: "algorithms", RUN: "run"}

# module (or "package.*": the package and everything under it) -> layer
LAYERS = {
    # core: the analysis of a network, the scoring engine and what every algorithm builds on
    "carprune._C": CORE,  # the native extension (not a .py file)
    "carprune._ops": CORE,
    "carprune.opsem": CORE,
    "carprune.graph": CORE,
    "carprune.units": CORE,
    "carprune.unit_engine": CORE,
    "carprune.fold": CORE,
    "carprune.head": CORE,
    "carprune.engine": CORE,
    "carprune.metrics": CORE,
    "carprune.scores": CORE,
    "carprune.screen": CORE,
    "carprune.surgery": CORE,
    "carprune.criteria": CORE,
    "carprune.importance": CORE,  # criterion objects ranking unit channels (CAR among them)
    "carprune.cost": CORE,
    "carprune.io": CORE,
    "carprune.results": CORE,
    "carprune.callbacks": CORE,  # the protocol the algorithms take and the run layer implements
    "carprune.evaluate": CORE,  # the one evaluator
    "carprune.training": CORE,  # the one training loop (fine-tuning, Deep Compression, models.train)
    "carprune.threads": CORE,  # free cores -> thread count; no terminal, no flags
    "carprune.specs": CORE,  # model and data from spec strings: data + models only
    "carprune.data.*": CORE,
    "carprune.models.*": CORE,
    # algorithms: compression and interpretation methods, built on the core
    "carprune": ALGORITHMS,  # the public API re-exports core and algorithms, never the run layer
    "carprune.greedy": ALGORITHMS,
    "carprune.global_mode": ALGORITHMS,
    "carprune.finetune": ALGORITHMS,
    "carprune.kse": ALGORITHMS,  # KSE as a whole method (kse_compress, with fine-tuning)
    "carprune.compare": ALGORITHMS,  # reads interpret.receptive
    "carprune.compare_html": ALGORITHMS,  # reads interpret.figures/html
    "carprune.deepcompress.*": ALGORITHMS,
    "carprune.interpret.*": ALGORITHMS,
    # run: the command line and what only a batch run needs
    "carprune.__main__": RUN,
    "carprune.cli": RUN,
    "carprune.commands.*": RUN,
    "carprune.config": RUN,
    "carprune.distributed": RUN,
    "carprune.preempt": RUN,
    "carprune.logging_utils": RUN,
}

# (module, violation) -> how many times it may occur. Every entry is a known violation to remove;
# shrink the list as they go (the test fails on entries that no longer occur).
ALLOWED: dict[tuple[str, str], int] = {}

# third-party modules the library must not import (they draw on the terminal)
LIBRARY_FORBIDDEN_IMPORTS = ("tqdm",)

# the one library module that may ask whether stderr is a terminal (once) and import tqdm
TERMINAL_MODULE = "carprune.callbacks"

# (module, what) -> how many times: graph access above the core that is not a consumer walk
GRAPH_ALLOWED: dict[tuple[str, str], int] = {
    # default_layers: is_first_layer for every call of every conv (the analysis is per layer)
    ("carprune.kse", "calls graph.trace"): 1,
    # the patch search and the receptive field run the network only up to the layer: a
    # truncated copy of the graph upstream of the layer's node, not who reads it
    ("carprune.interpret.patches", "calls graph.trace"): 1,
    ("carprune.interpret.patches", "calls graph.conv_call"): 2,
    ("carprune.interpret.receptive", "calls graph.trace"): 1,
    ("carprune.interpret.receptive", "calls graph.conv_call"): 2,
}
GRAPH_WALKS = ("find_cut", "find_fused_consumer", "linears_after_flatten", "split_at")
GRAPH_TRACES = ("trace", "conv_call")


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every .py module of the package by dotted name (packages by their own name)."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))
            if "__pycache__" not in p.parts}


def layer_of(module: str) -> int | None:
    """The layer of `module` from `LAYERS` (exact names first, then the longest package.*)."""
    if module in LAYERS:
        return LAYERS[module]
    best = None
    for key, layer in LAYERS.items():
        if key.endswith(".*"):
            pkg = key[:-2]
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > best[0]):
                best = (len(pkg), layer)
    return None if best is None else best[1]


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import anywhere in `tree`; ``from X import y`` counts as
    an import of ``X.y`` when that is a module of the package, else of ``X``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in known else source, node.lineno))
    return found


def _is_std_stream(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr")
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def terminal_calls(tree: ast.AST) -> list[tuple[str, int]]:
    """(what, line) for print(), any .isatty() and sys.stdout/stderr.write in `tree`."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "print":
            found.append(("calls print()", node.lineno))
        elif isinstance(f, ast.Attribute) and f.attr == "isatty":
            found.append(("calls .isatty()", node.lineno))
        elif isinstance(f, ast.Attribute) and f.attr == "write" and _is_std_stream(f.value):
            found.append(("writes to sys.stdout/stderr", node.lineno))
    return found


def graph_access(tree: ast.AST) -> list[tuple[str, int]]:
    """(what, line) for every read of ``.users``, every call of a cut-finding function of graph
    (`GRAPH_WALKS`, by name or as ``graph.name``) and every ``graph.trace`` / ``graph.conv_call``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "users":
            found.append(("reads .users", node.lineno))
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        on_graph = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "graph"
        if name in GRAPH_WALKS and (on_graph or isinstance(f, ast.Name)):
            found.append((f"calls {name}", node.lineno))
        elif name in GRAPH_TRACES and on_graph:
            found.append((f"calls graph.{name}", node.lineno))
    return found


def violations(package: Path = PACKAGE) -> tuple[Counter, dict[tuple[str, str], list[str]], list[str]]:
    """(count per (module, violation), where each occurs as "file:line", unclassified modules)."""
    modules = source_modules(package)
    known = set(modules) | {m for m in LAYERS if not m.endswith(".*")}
    unclassified = sorted(m for m in modules if layer_of(m) is None)
    count: Counter = Counter()
    where: dict[tuple[str, str], list[str]] = {}

    def add(module: str, what: str, path: Path, line: int, once: bool) -> None:
        key = (module, what)
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if f"{shown}:{line}" not in where.setdefault(key, []):
            where[key].append(f"{shown}:{line}")
        count[key] = 1 if once else count[key] + 1

    for module, path in modules.items():
        layer = layer_of(module)
        if layer is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, line in imports_of(tree, module, path.name == "__init__.py", known):
            top = target.split(".")[0]
            if top == "carprune":
                t_layer = layer_of(target)
                if t_layer is None:
                    add(module, f"imports unclassified {target}", path, line, once=True)
                elif t_layer > layer:
                    add(module, f"imports {target} ({LAYER_NAMES[t_layer]})", path, line, once=True)
            elif layer < RUN and top in LIBRARY_FORBIDDEN_IMPORTS and module != TERMINAL_MODULE:
                add(module, f"imports {top}", path, line, once=True)
        if layer < RUN:
            for what, line in terminal_calls(tree):
                if not (module == TERMINAL_MODULE and what == "calls .isatty()"):
                    add(module, what, path, line, once=False)
    return count, where, unclassified


def graph_violations(package: Path = PACKAGE) -> tuple[Counter, dict[tuple[str, str], list[str]]]:
    """(count per (module, access), where) of `graph_access` in the algorithm and run layers."""
    count: Counter = Counter()
    where: dict[tuple[str, str], list[str]] = {}
    for module, path in source_modules(package).items():
        layer = layer_of(module)
        if layer is None or layer < ALGORITHMS:
            continue
        for what, line in graph_access(ast.parse(path.read_text(), filename=str(path))):
            count[(module, what)] += 1
            where.setdefault((module, what), []).append(f"{path.name}:{line}")
    return count, where


def test_every_module_has_a_layer_and_every_entry_a_module():
    modules = set(source_modules())
    _, _, unclassified = violations()
    assert not unclassified, f"modules without a layer: add them to LAYERS in {__file__}: {unclassified}"
    stale = [k for k in LAYERS if k != "carprune._C"
             and not (k[:-2] in modules if k.endswith(".*") else k in modules)]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_imports_go_downward_and_the_library_leaves_the_terminal_alone():
    count, where, _ = violations()
    new = {k: n for k, n in count.items() if n > ALLOWED.get(k, 0)}
    assert not new, "layering violations not in ALLOWED:\n" + "\n".join(
        f"  {m}: {what} ({', '.join(where[(m, what)])})" for (m, what) in sorted(new))


def test_allowed_violations_still_exist():
    """ALLOWED only shrinks: an entry that no longer occurs (or occurs fewer times) must go."""
    count, _, _ = violations()
    gone = {k: (n, count.get(k, 0)) for k, n in ALLOWED.items() if count.get(k, 0) < n}
    assert not gone, "fixed, remove from (or lower in) ALLOWED in tests/test_layering.py: " + ", ".join(
        f"{m}: {what} (allowed {n}, found {found})" for (m, what), (n, found) in sorted(gone.items()))


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    """The analysis itself: a scratch package with one violation of each kind, at module level and
    inside functions, relative and absolute."""
    pkg = tmp_path / "carprune"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import graph\n")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "batches.py").write_text("def f():\n    from .. import cli\n")
    (pkg / "graph.py").write_text("import sys\nfrom carprune.greedy import x\n"
                                  "def g():\n    if sys.stderr.isatty():\n        print('hi')\n"
                                  "    sys.stderr.write('x')\n    from tqdm import tqdm\n")
    (pkg / "greedy.py").write_text("from . import preempt\nfrom .graph import y\n")
    (pkg / "cli.py").write_text("import sys\nprint(sys.stderr.isatty())\nfrom . import greedy\n")
    (pkg / "preempt.py").write_text("")
    (pkg / "newthing.py").write_text("")
    count, where, unclassified = violations(pkg)
    assert unclassified == ["carprune.newthing"]
    assert dict(count) == {
        ("carprune.data.batches", "imports carprune.cli (run)"): 1,
        ("carprune.graph", "imports carprune.greedy (algorithms)"): 1,
        ("carprune.graph", "calls .isatty()"): 1,
        ("carprune.graph", "calls print()"): 1,
        ("carprune.graph", "writes to sys.stdout/stderr"): 1,
        ("carprune.graph", "imports tqdm"): 1,
        ("carprune.greedy", "imports carprune.preempt (run)"): 1,
    }
    assert where[("carprune.data.batches", "imports carprune.cli (run)")][0].endswith("batches.py:2")


def test_the_terminal_is_asked_once_in_the_package():
    """`callbacks.stderr_is_terminal` holds the package's only ``.isatty()`` (run layer included)
    and `callbacks` is the only library module importing tqdm (its `ProgressBar`)."""
    calls = {m: [ln for what, ln in terminal_calls(ast.parse(p.read_text())) if what == "calls .isatty()"]
             for m, p in source_modules().items()}
    calls = {m: ln for m, ln in calls.items() if ln}
    allowed_elsewhere = {m for (m, what), _ in ALLOWED.items() if what == "calls .isatty()"}
    assert set(calls) - allowed_elsewhere == {TERMINAL_MODULE} and len(calls[TERMINAL_MODULE]) == 1
    tree = ast.parse((PACKAGE / "callbacks.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "stderr_is_terminal")
    assert [what for what, _ in terminal_calls(fn)] == ["calls .isatty()"]


def test_stages_above_the_core_take_the_analysis():
    count, where = graph_violations()
    new = {k: n for k, n in count.items() if n > GRAPH_ALLOWED.get(k, 0)}
    assert not new, "graph walks above the core (take graph.analyze instead):\n" + "\n".join(
        f"  {m}: {what} ({', '.join(where[(m, what)])})" for (m, what) in sorted(new))
    gone = {k: (n, count.get(k, 0)) for k, n in GRAPH_ALLOWED.items() if count.get(k, 0) < n}
    assert not gone, "fixed, remove from (or lower in) GRAPH_ALLOWED: " + ", ".join(
        f"{m}: {what} (allowed {n}, found {found})" for (m, what), (n, found) in sorted(gone.items()))


def test_the_graph_checker_sees_each_access(tmp_path):
    pkg = tmp_path / "carprune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "graph.py").write_text("def f(n):\n    return n.users\n")    # core: may walk
    (pkg / "greedy.py").write_text(
        "from . import graph\nfrom .graph import find_cut\n"
        "def g(m, gm):\n    c = find_cut(gm, 'a')\n    gm = graph.trace(m)\n"
        "    graph.conv_call(gm, 'a')\n    return [u for u in c.node.users], graph.split_at(gm, c)\n")
    count, _ = graph_violations(pkg)
    assert dict(count) == {("carprune.greedy", "calls find_cut"): 1,
                           ("carprune.greedy", "calls graph.trace"): 1,
                           ("carprune.greedy", "calls graph.conv_call"): 1,
                           ("carprune.greedy", "reads .users"): 1,
                           ("carprune.greedy", "calls split_at"): 1}
