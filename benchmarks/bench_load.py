"""Scoring under load: carprune against the naive pass when other processes hold cores.

    python -m benchmarks.bench_load [--images 500] [--layer layer1.0.conv1] [--busy 0 1 3]

Users run on shared nodes and several processes per node. For each load (0, 1 or more busy
single-thread processes, each a loop of 512x512 fp32 matrix products) this scores every filter
of a ResNet-20 layer with carprune and with the naive pass (a hook zeroes the channel, the whole
network runs, batch 500 as a user would; plus the unablated pass CAR needs), with 2 threads,
1 thread, and `carprune.threads.auto_threads()` (what `--threads auto`, the command line's
default, picks). Both are timed in the same process, back to back, under the same load; counts
are checked equal. Results: a table on stdout and out/bench/load.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

import carprune as cp
from carprune.threads import auto_threads, usable_cpus

from .common import OUT, cifar_test, naive_counts, resnet20, timed

BUSY = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
        "while True:\n    a = (a @ a).clamp_(-1, 1)\n")


def _start_busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    time.sleep(2.0 if n else 0.0)  # let them reach their loop
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--layer", default="layer1.0.conv1")
    ap.add_argument("--cut", default="layer1.0.relu1", help="module whose output the naive hook zeroes")
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--naive-batch", type=int, default=500)
    args = ap.parse_args(argv)
    model = resnet20()
    data = cifar_test().sample(args.images, seed=0)
    x, y = data.batch(slice(None))
    filters = list(range(model.get_submodule(args.layer).out_channels))
    rows = []
    for busy in args.busy:
        procs = _start_busy(busy)
        try:
            auto = auto_threads()
            for label, n in (("2 threads", 2), ("1 thread", 1), (f"auto ({auto})", auto)):
                torch.set_num_threads(n)
                s, t_ours = timed(lambda: cp.score_layer(model, args.layer, data, progress=False))
                ref, t_naive = timed(lambda: naive_counts(model, args.cut, [None, *filters], x, y,
                                                          args.naive_batch))
                assert torch.equal(ref[0], s.base_counts)
                mismatch = int((ref[1:] - s.counts).abs().sum())
                rows.append({"busy": busy, "threads": label, "carprune": t_ours, "naive": t_naive,
                             "ratio": t_naive / t_ours, "count_mismatch": mismatch})
                print(f"busy {busy}, {label}: carprune {t_ours:.1f} s, naive {t_naive:.1f} s, "
                      f"{t_naive / t_ours:.2f}x (count mismatches {mismatch})", flush=True)
        finally:
            _stop(procs)
    lines = ["| busy processes | threads | carprune (s) | naive (s) | carprune vs naive |",
             "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['busy']} | {r['threads']} | {r['carprune']:.1f} | {r['naive']:.1f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    text = (f"ResNet-20 {args.layer}, all filters, {args.images} CIFAR-10 test images; naive at "
            f"batch {args.naive_batch}; {len(usable_cpus())} usable CPUs.\n\n"
            + "\n".join(lines) + "\n")
    print("\n" + text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load.md").write_text(text)
    (OUT / "load.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
