"""``carprune bench``: timing benchmarks.

``--suite quick`` (built in) times `carprune score` of one layer against the naive pass (per
filter, its channel zeroed at the cut by a forward hook and the whole network run) on the same
images, and checks that the two agree count for count (``bench.json``). The other suites run
the source checkout's benchmarks/ with pytest.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed, graph
from ..config import ConfigError, Option, settings_object
from ..data.arrays import ImageArrayDataset
from ..io import write_json
from ..logging_utils import log
from . import _common as common

NAME = "bench"
HELP = "timing benchmarks"
SUITES = ("quick", "score", "deepcompress", "distributed", "all")
SUITE_FILES = {"score": ["bench_score.py"], "deepcompress": ["bench_deepcompress.py"],
               "distributed": ["bench_distributed.py"]}


def options() -> list[Option]:
    return common.common_options(out_required=False, out_default="out/bench") + [
        Option("suite", "str", "quick", "quick: built-in timing of score vs the naive pass; "
               "score/deepcompress/distributed/all: the benchmarks/ suites (source checkout)",
               choices=SUITES),
        *common.optional(common.MODEL_OPTS + common.data_options()),
        Option("layer", "str", None, "conv layer for the quick benchmark (needed, with --model "
               "and --data, by --suite quick)"),
    ]


@dataclass(frozen=True, kw_only=True)
class Settings(common.DataSettings, common.ModelSettings, common.CommonSettings):
    suite: str
    model: str | None
    layer: str | None


def repo_root() -> Path | None:
    """The source checkout this carprune runs from, if it has benchmarks/."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "benchmarks").is_dir() else None


def run(settings: Mapping[str, Any], ctx: distributed.Context, run: common.Run, mode: str) -> int:
    s = settings_object(Settings, settings)
    if s.suite != "quick":
        root = repo_root()
        if root is None:
            raise ConfigError("the benchmark suites live in the source checkout's benchmarks/; "
                              "this installation has none (use --suite quick)")
        names = [f for fs in SUITE_FILES.values() for f in fs] if s.suite == "all" \
            else SUITE_FILES[s.suite]
        files = [str(root / "benchmarks" / f) for f in names if (root / "benchmarks" / f).is_file()]
        if not files:
            raise ConfigError(f"no benchmark files for suite {s.suite!r} in {root / 'benchmarks'}")
        cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-enable", "-s", "-q"]
        log.info("running %s", " ".join(cmd))
        rc = subprocess.call(cmd, cwd=root)
        return common.EXIT_OK if rc == 0 else common.EXIT_FAILED
    for k, v in (("model", s.model), ("data", s.data), ("layer", s.layer)):
        if v is None:
            raise ConfigError(f"bench --suite quick needs --{k} (or {k} in the config file)")
    return quick_bench(s, ctx)


def naive_counts(model: nn.Module, layer: str, data: ImageArrayDataset, indices: np.ndarray,
                 filters: Sequence[int], batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive CAR pass the quick benchmark times: per filter, zero its channel at the cut (a
    forward hook on the traced module) and run the whole network.

    Returns (counts [filters, classes], base counts [classes])."""
    analysis = graph.analyze(model, layer)
    gm, cut = analysis.gm, analysis.node
    if cut.op != "call_module":
        raise ValueError(f"the naive reference needs {layer!r}'s cut to be a module output")
    module = gm.get_submodule(str(cut.target))
    x, y = data.batch(indices)
    k = len(data.classes)
    device = next(gm.parameters()).device
    counts = torch.zeros(len(filters), k, dtype=torch.int64)
    base = torch.zeros(k, dtype=torch.int64)

    def run_all() -> torch.Tensor:
        c = torch.zeros(k, dtype=torch.int64)
        for s0 in range(0, len(y), batch):
            ok = gm(x[s0:s0 + batch].to(device)).argmax(1).cpu() == y[s0:s0 + batch]
            c += torch.bincount(y[s0:s0 + batch][ok], minlength=k)
        return c

    with torch.no_grad():
        base += run_all()
        for row, f in enumerate(filters):
            def zero(mod: nn.Module, inp: Any, out: torch.Tensor, f: int = f) -> torch.Tensor:
                out = out.clone()
                out[:, f] = 0
                return out

            h = module.register_forward_hook(zero)
            try:
                counts[row] = run_all()
            finally:
                h.remove()
    return counts, base


def quick_bench(s: Settings, ctx: distributed.Context) -> int:
    from ..engine import LayerScorer

    out = Path(s.out)
    model = common.load_model(s, ctx)
    data = common.load_data(s, ctx, s.data, s.split)
    n = s.num_images or 256
    t0 = time.perf_counter()
    scorer = LayerScorer(model, s.layer, data, num_images=n, seed=s.seed, device=ctx.device,
                         progress=False)
    res = scorer.score()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, base = naive_counts(model, s.layer, data, scorer.indices, res.filters.tolist())
    t_naive = time.perf_counter() - t0
    mismatch = int((ref - res.counts).abs().sum())
    doc = {"format": "carprune.bench.quick", "layer": s.layer, "model": s.model,
           "images": len(scorer.indices), "filters": len(res.filters), "threads": torch.get_num_threads(),
           "device": str(ctx.device), "carprune_seconds": t_ours, "naive_seconds": t_naive,
           "speedup": t_naive / t_ours, "count_mismatch": mismatch,
           "base_equal": bool(torch.equal(base, res.base_counts))}
    write_json(out / "bench.json", doc)
    print(f"{s.model} {s.layer}: {len(res.filters)} filters x {len(scorer.indices)} images, "
          f"{torch.get_num_threads()} threads on {ctx.device}\n"
          f"  carprune score: {t_ours:8.2f} s\n  naive pass:     {t_naive:8.2f} s\n"
          f"  speed-up:       {t_naive / t_ours:8.1f}x   (count mismatches: {mismatch} of "
          f"{len(res.filters) * len(scorer.indices)})", flush=True)
    return common.EXIT_OK
