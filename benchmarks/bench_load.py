"""Scoring under load: carprune against the naive pass when other processes hold cores.

    python -m benchmarks.bench_load [--images 500] [--layer layer1.0.conv1] [--busy 0 1 3]
    python -m benchmarks.bench_load --midrun 30 [--leave] [--flops-target 0.9] [--images 300]

Users run on shared nodes and several processes per node. For each load (0, 1 or more busy
single-thread processes, each a loop of 512x512 fp32 matrix products) this scores every filter
of a ResNet-20 layer with carprune and with the naive pass (a hook zeroes the channel, the whole
network runs, batch 500 as a user would; plus the unablated pass CAR needs), with 2 threads,
1 thread, and `carprune.threads.auto_threads()` (what `--threads auto`, the command line's
default, picks). Both are timed in the same process, back to back, under the same load; counts
are checked equal. Results: a table on stdout and out/bench/load.md (and .json).

`--midrun S`: a neighbour arrives during a long run. `carprune compress --layer all` on ResNet-20
(--flops-target, --images scoring images) runs twice, with `--threads 2` and with `--threads
auto` (which re-checks the free cores at round boundaries, `threads.ThreadGovernor`); in each, one
busy process starts S seconds after the command and runs to its end. With `--leave` the
neighbour is there from the start and stops S seconds in, and the fixed count is `--threads 1`
(what `auto` picked at the start before it re-checked). Same choices checked; results in
out/bench/load-midrun[-leave].md (and .json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import carprune as cp
from carprune.threads import auto_threads, usable_cpus

from .common import DATA, OUT, cifar_test, naive_counts, resnet20, timed

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


def _midrun(args: argparse.Namespace) -> int:
    rows = []
    for threads in ("1" if args.leave else "2", "auto"):
        out = Path(tempfile.mkdtemp(prefix="carprune-midrun-"))
        cmd = [sys.executable, "-m", "carprune", "compress", "--model", "resnet20", "--weights",
               str(DATA / "models" / "resnet20-12fca82f.th"), "--data",
               str(DATA / "cifar10-jpeg.tar.gz"), "--split", "test", "--num-images",
               str(args.images), "--layer", "all", "--flops-target", str(args.flops_target),
               "--threads", threads, "--progress", "log", "--out", str(out / "run")]
        busy = _start_busy(1) if args.leave else []
        t0 = time.perf_counter()
        log_path = out / "stderr.log"   # a file, not a pipe: a full pipe would stall the run
        log_file = log_path.open("w")
        proc = subprocess.Popen(cmd, stderr=log_file, text=True)
        try:
            while proc.poll() is None and time.perf_counter() - t0 < args.midrun:
                time.sleep(0.2)
            if args.leave:
                _stop(busy)
                busy = []
            elif proc.poll() is None:
                busy = [subprocess.Popen([sys.executable, "-c", BUSY])]
            proc.wait()
        finally:
            _stop(busy)
            log_file.close()
        err = log_path.read_text()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(err, file=sys.stderr)
            raise SystemExit(f"carprune compress --threads {threads} failed ({proc.returncode})")
        result = json.loads((out / "run" / "result.json").read_text())
        removed = [r.get("removed") for r in result.get("trajectory", [])]
        changes = [ln.split("INFO ")[-1] for ln in err.splitlines() if "CPU threads" in ln]
        rows.append({"threads": threads, "seconds": wall, "rounds": len(removed),
                     "removed": removed, "thread_changes": changes})
        print(f"--threads {threads}: {wall:.1f} s, {len(removed)} rounds; {changes}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    same = rows[0]["removed"] == rows[1]["removed"]
    text = (f"ResNet-20, `carprune compress --layer all --flops-target {args.flops_target}` on "
            f"{args.images} CIFAR-10 test images; one busy process "
            + (f"from the start to {args.midrun} s" if args.leave else
               f"from {args.midrun} s after the start to the end")
            + f"; {len(usable_cpus())} usable CPUs.\n\n"
            "| --threads | wall (s) | rounds | thread changes |\n|---|---:|---:|---|\n"
            + "".join(f"| {r['threads']} | {r['seconds']:.1f} | {r['rounds']} | "
                      f"{'; '.join(r['thread_changes']) or '-'} |\n" for r in rows)
            + f"\nSame channels removed round by round: {same}; fixed {rows[0]['threads']} "
            f"thread(s) against auto: {rows[0]['seconds'] / rows[1]['seconds']:.2f}x.\n")
    print("\n" + text)
    OUT.mkdir(parents=True, exist_ok=True)
    name = "load-midrun-leave" if args.leave else "load-midrun"
    (OUT / f"{name}.md").write_text(text)
    (OUT / f"{name}.json").write_text(json.dumps(rows, indent=2))
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--layer", default="layer1.0.conv1")
    ap.add_argument("--cut", default="layer1.0.relu1", help="module whose output the naive hook zeroes")
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--naive-batch", type=int, default=500)
    ap.add_argument("--midrun", type=float, default=None,
                    help="seconds after the start when a neighbour arrives (see the docstring)")
    ap.add_argument("--leave", action="store_true",
                    help="with --midrun: the neighbour is there from the start and leaves")
    ap.add_argument("--flops-target", type=float, default=0.9)
    args = ap.parse_args(argv)
    if args.leave and args.midrun is None:
        ap.error("--leave needs --midrun SECONDS (when the neighbour leaves)")
    if args.midrun is not None:
        if not args.midrun >= 0:
            ap.error(f"--midrun must be seconds >= 0, got {args.midrun}")
        return _midrun(args)
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
