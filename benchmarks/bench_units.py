"""Scoring every unit of the pretrained ResNet-20 (`carprune.unit_engine`), side by side in one run.

    python -m benchmarks.bench_units [--images 500] [--threads 2]

Rows, all on the same seeded CIFAR-10 test images, float32:
- `score_units`, zero-activation savings on: one prefix pass per chunk for all 12 units;
- the same with the savings off (`zero_skip=False`); these two alternate `--repeats` times and
  the best of each is reported (the cost model is that run's);
- one `UnitScorer` per unit (each runs its own prefix), savings on.
Counts must be identical in all three. Reported: seconds per row, the cost model of the first
(per unit: path, (image, ablation) pairs, how many were run, tail multiply-accumulates per pair,
seconds, GFLOP/s = 2 x MACs run / s against the 98 GFLOP/s fp32 GEMM of these machines) and a
full ResNet-20 forward's GFLOP/s at batch 100 measured in the same run. Results: stdout and
out/bench/units/results.json.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import carprune as cp
from carprune import units as U
from carprune.io import write_json
from carprune.unit_engine import REFERENCE_GEMM_GFLOPS, UnitScorer, score_units

from .common import OUT, cifar_test, resnet20


def forward_gflops(model: torch.nn.Module, x: torch.Tensor, batch: int = 100) -> float:
    macs = cp.count_cost(model, tuple(x.shape[1:])).total_flops
    with torch.no_grad():
        model(x[:batch])
        t0 = time.perf_counter()
        for s in range(0, len(x), batch):
            model(x[s:s + batch])
        dt = time.perf_counter() - t0
    return 2 * macs * len(x) / dt / 1e9


def gemm_gflops() -> float:
    """fp32 2048^3 matrix product throughput (the figure tails are compared with)."""
    return cp.cost.gemm_gflops(2048, 10, fresh=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = resnet20()
    data = cifar_test().sample(args.images, seed=0)
    x, _ = data.batch(slice(None))
    analysis = U.prunable_units(model, x[:1])
    load0 = os.getloadavg()[0]
    out = {"images": args.images, "threads": args.threads}
    out["forward_gflops_b100"] = forward_gflops(model, x)
    out["gemm_gflops"] = gemm_gflops()

    # alternated and repeated (the machine is shared: the best of each is compared)
    times: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.repeats):
        for key in ("on", "off"):
            t0 = time.perf_counter()
            r = score_units(model, data, analysis=analysis, zero_skip=key == "on")
            times[key].append(time.perf_counter() - t0)
            if key == "on" and times[key][-1] == min(times[key]):
                on = r
            if key == "off" and times[key][-1] == min(times[key]):
                off = r
    out["shared_on_s"], out["shared_off_s"] = min(times["on"]), min(times["off"])
    out["shared_on_all_s"], out["shared_off_all_s"] = times["on"], times["off"]
    t0 = time.perf_counter()
    single = {u.name: UnitScorer(model, u.name, data, analysis=analysis, progress=False).score()
              for u in analysis.units}
    out["per_unit_s"] = time.perf_counter() - t0
    out["forward_gflops_b100_end"] = forward_gflops(model, x)
    out["gemm_gflops_end"] = gemm_gflops()
    out["load_start_end"] = [load0, os.getloadavg()[0]]
    mismatch = 0
    for name in on:
        for other in (off[name], single[name]):
            mismatch += int((on[name].counts != other.counts).sum())
            mismatch += int((on[name].base_counts != other.base_counts).sum())
    out["count_mismatches"] = mismatch
    out["cost_on"] = [vars(u) for u in on.cost.units]
    out["cost_off"] = [vars(u) for u in off.cost.units]
    out["prefix_on_s"] = on.cost.prefix_seconds
    out["tail_gflops_on"] = on.cost.gflops
    out["tail_gflops_off"] = off.cost.gflops
    print(f"ResNet-20, all {len(analysis)} units, {args.images} images, {args.threads} threads, "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"full forward at batch 100: {out['forward_gflops_b100']:.1f} GFLOP/s (start), "
          f"{out['forward_gflops_b100_end']:.1f} (end)")
    print(f"fp32 GEMM 2048^3: {out['gemm_gflops']:.1f} GFLOP/s (start), "
          f"{out['gemm_gflops_end']:.1f} (end)")
    print(f"score_units, zero skip on : {out['shared_on_s']:.1f} s (best of "
          f"{', '.join(f'{t:.1f}' for t in times['on'])})")
    print(f"score_units, zero skip off: {out['shared_off_s']:.1f} s (best of "
          f"{', '.join(f'{t:.1f}' for t in times['off'])})")
    print(f"UnitScorer per unit       : {out['per_unit_s']:.1f} s")
    print(f"count mismatches: {mismatch}")
    gemm = max(out["gemm_gflops"], out["gemm_gflops_end"])
    print(f"cost model, skip on (ratio to the GEMM measured here, {gemm:.0f} GFLOP/s):\n"
          + on.cost.describe(gemm))
    print("cost model, skip off (ratio to the GEMM measured here):\n" + off.cost.describe(gemm))
    print(f"(issue 12's reference figure: {REFERENCE_GEMM_GFLOPS:g} GFLOP/s)")
    d = OUT / "units"
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "results.json", out)


if __name__ == "__main__":
    main()
