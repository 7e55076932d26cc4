"""Beyond top-1: exactness of every built-in metric, greedy RAR on a regression network, CAR on
LeNet-5's fully-connected neurons, and two network comparisons through CAR_c.

    python -m benchmarks.bench_metrics --part exactness
    python -m benchmarks.bench_metrics --part rar       [--seeds 10]
    python -m benchmarks.bench_metrics --part lenet-fc1 [--seeds 10 --per-step 1]
    python -m benchmarks.bench_metrics --part compare   [--images 2000]

Outputs in out/bench/metrics/ (exactness.md, rar-*.png, rar.csv, rar_table.md, lenet-fc1.png,
lenet-fc1.csv, lenet_fc1_table.md) and out/bench/compare/ (one report folder per comparison and
summary.md).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import carprune as cp

from .common import DATA, OUT, ROOT, cifar_test, masked_outputs, resnet20

MNIST = DATA / "mnist_5k.npz"
BASELINES = ["mean_in", "mean_out", "l1"]
COLOURS = {"car": "purple", "rar": "purple", "mean_out": "black", "mean_in": "green", "l1": "orange"}


# -- exactness ------------------------------------------------------------------------------------
def _per_sample(metric: str, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The metric per image, written out plainly in float64."""
    out = out.double()
    if metric == "nll":
        return -torch.log_softmax(out, 1).gather(1, t[:, None])[:, 0]
    if metric.startswith("top"):
        k = int(metric[3:])
        higher = (out > out.gather(1, t[:, None])).sum(1)
        return (higher < k).double()
    d = out[:, 0] - t.double()
    return d * d if metric == "mse" else d.abs()


def _reference(model, cut_module, units, x, t, groups, ngroups, metric, scale):
    def sums(out):
        v = torch.round(_per_sample(metric, out, t) * scale).to(torch.int64)
        return torch.zeros(ngroups, dtype=torch.int64).index_add_(0, groups, v)

    return (torch.stack([sums(masked_outputs(model, cut_module, u, x)) for u in units]),
            sums(masked_outputs(model, cut_module, None, x)))


def exactness(args) -> None:
    out = OUT / "metrics"
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| network | layer | metric | units | images | equal to the float64 masked reference "
             "| over 3 other chunkings, 1 and 2 threads |", "|---|---|---|---:|---:|---|---|"]
    r20 = resnet20()
    data = cifar_test().sample(args.images, seed=4)
    angle = cp.models.pretrained_angle_cnn(MNIST)
    rot = cp.data.rotated_mnist5k(MNIST, "test")
    cases = [("resnet20", r20, data, "layer2.0.conv1", "layer2.0.relu1", m, list(range(0, 32, 3)))
             for m in ("top1", "top5", "nll")]
    cases += [("resnet20", r20, data, "layer3.2.conv1", "layer3.2.relu1", "nll", list(range(0, 64, 6)))]
    angle_layers = (("conv2", "pool2", list(range(32))), ("fc1", "relu3", list(range(64))))
    cases += [("angle_cnn", angle, rot, layer, cut, m, units)
              for layer, cut, units in angle_layers for m in ("mse", "mae")]
    for net, model, ds, layer, cut, metric, units in cases:
        x, t = ds.batch(slice(None))
        m64 = copy.deepcopy(model).double()
        kw = {"filters": units, "metric": metric, "dtype": torch.float64, "progress": False}
        if metric in ("mse", "mae"):
            kw["bins"] = 5
        got = cp.score_layer(model, layer, ds, **kw)
        if got.grouping == "bin":
            edges = torch.tensor(got.bin_edges, dtype=torch.float64)
            groups = torch.bucketize(t.double(), edges[1:-1], right=True)
        else:
            groups = t
        ref, base = _reference(m64, cut, units, x.double(), t, groups, got.num_classes, metric,
                               got.scale)
        equal = torch.equal(got.counts, ref) and torch.equal(got.base_counts, base)
        threads = torch.get_num_threads()
        worst, entries = 0, 0
        for opts, nthreads in (({"rows": 37}, 1), ({"memory_budget": "3MiB"}, 2),
                               ({"fused": False, "rows": 64}, 2)):
            torch.set_num_threads(nthreads)
            try:
                v = cp.score_layer(model, layer, ds, **kw, **opts)
            finally:
                torch.set_num_threads(threads)
            d = torch.cat([(v.counts - got.counts).abs().flatten(),
                           (v.base_counts - got.base_counts).abs()])
            worst, entries = max(worst, int(d.max())), entries + int((d > 0).sum())
        same = ("identical" if worst == 0 else
                f"{entries} of {3 * (got.counts.numel() + got.num_classes)} sums differ, by at most "
                f"{worst} unit{'s' if worst > 1 else ''} of 1/{got.scale}")
        lines.append(f"| {net} | {layer} | {metric} | {len(units)} | {len(t)} | "
                     f"{'yes' if equal else 'NO'} | {same} |")
        print(lines[-1], flush=True)
        (out / "exactness.md").write_text("\n".join(lines) + "\n")
    lines.append("")
    lines.append(_two_processes(args))
    (out / "exactness.md").write_text("\n".join(lines) + "\n")
    print(lines[-1])


def _two_processes(args) -> str:
    """`carprune score --metric nll` in one process and with torchrun over 2 processes."""
    tmp = OUT / "metrics" / "torchrun"
    res = {}
    for procs in (1, 2):
        d = tmp / f"np{procs}"
        cmd = [sys.executable, "-m", "carprune"] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            "-m", "carprune"]
        cmd += ["score", "--model", "resnet20", "--weights", str(DATA / "models" / "resnet20-12fca82f.th"),
                "--data", str(DATA / "cifar10-jpeg.tar.gz"), "--split", "test", "--layer",
                "layer2.0.conv1", "--num-images", str(args.images), "--metric", "nll", "--dtype",
                "float64", "--out", str(d), "--progress", "none", "--threads", "1"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            return f"torchrun comparison failed: {p.stderr[-1500:]}"
        res[procs] = cp.LayerScores.load(d / "scores.npz")
    same = torch.equal(res[1].counts, res[2].counts) and torch.equal(res[1].base_counts, res[2].base_counts)
    return (f"`carprune score --metric nll --dtype float64` on ResNet-20 layer2.0.conv1 "
            f"({args.images} images, 32 filters): 1 process and `torchrun --nproc_per_node 2` give "
            f"{'identical' if same else 'DIFFERENT'} fixed-point sums.")


# -- greedy curves --------------------------------------------------------------------------------
def _curves(model, layer, score, hold, metric, crits, seeds, per_step):
    runs = {}
    for crit in crits:
        t0 = time.perf_counter()
        runs[crit] = [cp.compress_layer(model, layer, score, eval_data=hold, criterion=crit,
                                        metric=metric, filters_per_step=per_step, progress=False)]
        print(f"   {crit}: {time.perf_counter() - t0:.1f} s", flush=True)
    runs["random"] = [cp.compress_layer(model, layer, score, eval_data=hold, criterion="random",
                                        metric=metric, filters_per_step=per_step, seed=s,
                                        progress=False) for s in range(seeds)]
    return runs


def _ratio_within(res, tol, higher_is_better) -> float:
    """The largest compression ratio whose hold-out value stays within a relative `tol`."""
    base = res.trajectory[0]
    limit = (1 - tol if higher_is_better else 1 + tol) * base.holdout_accuracy
    ok = [s for s in res.trajectory
          if (s.holdout_accuracy >= limit if higher_is_better else s.holdout_accuracy <= limit)]
    return base.kept / min(s.kept for s in ok)


def _plot(path, title, ylabel, runs, factor, label_car):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = runs["car"][0].num_filters
    for crit, results in runs.items():
        if crit == "random":
            acc = np.array([[s.holdout_accuracy for s in r.trajectory] for r in results])
            ratio = [n / s.kept for s in results[0].trajectory]
            ax.errorbar(ratio, factor * acc.mean(0), yerr=factor * acc.std(0), color="red",
                        label="random (±std)", capsize=2, lw=1)
            continue
        tr = results[0].trajectory
        ax.plot([n / s.kept for s in tr], [factor * s.holdout_accuracy for s in tr],
                color=COLOURS[crit], label=label_car if crit == "car" else crit,
                lw=1.5 if crit == "car" else 1)
    ax.axhline(factor * runs["car"][0].trajectory[0].holdout_accuracy, ls="--", color="red", lw=0.8,
               label="original")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (units before / after)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rows(net, layer, runs):
    for crit, results in runs.items():
        for seed, res in enumerate(results):
            for s in res.trajectory:
                yield {"net": net, "layer": layer, "criterion": crit, "seed": seed, "kept": s.kept,
                       "ratio": res.num_filters / s.kept, "holdout": s.holdout_accuracy,
                       "score": s.score_accuracy}


def _table(net, layer, runs, higher_is_better, unit, factor, crit_names):
    base = runs["car"][0].trajectory[0].holdout_accuracy
    cells = []
    for crit in crit_names:
        r = [_ratio_within(res, 0.05, higher_is_better) for res in runs[crit]]
        cells.append(f"{np.mean(r):.2f}x" + (f" (±{np.std(r):.2f})" if len(r) > 1 else ""))
    return f"| {net} | {layer} | {factor * base:.2f} {unit} | " + " | ".join(cells) + " |"


def rar(args) -> None:
    """Greedy RAR (metric 'mae') on the rotated-MNIST angle regressor against the baselines."""
    out = OUT / "metrics"
    out.mkdir(parents=True, exist_ok=True)
    model = cp.models.pretrained_angle_cnn(MNIST)
    score, hold = cp.data.rotated_mnist5k(MNIST, "test").split(0.5, seed=0)
    crits = ["car", *BASELINES]
    head = ["| net | layer | original hold-out MAE | RAR | mean_in | mean_out | l1 | random |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    head2 = ["| layer | units kept | RAR | mean_in | mean_out | l1 | random (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows, table, table2 = [], [], []
    for layer in args.layers or ["conv1", "conv2", "fc1"]:
        print(f"== angle_cnn {layer}", flush=True)
        runs = _curves(model, layer, score, hold, "mae", crits, args.seeds, 1)
        rows += list(_rows("angle_cnn", layer, runs))
        table.append(_table("angle_cnn", layer, runs, False, "deg", 1.0, crits + ["random"]))
        n = runs["car"][0].num_filters
        table2 += _at_kept(runs, [n // 2, n // 4], 1.0, " deg", prefix=f"| {layer} ")
        _plot(out / f"rar-{layer}.png", f"angle CNN {layer}: greedy RAR (MAE)",
              "hold-out mean absolute error (degrees)", runs, 1.0, "RAR (mae)")
        _write_csv(out / "rar.csv", rows)
        (out / "rar_table.md").write_text("\n".join(head + table + [""] + head2 + table2) + "\n")
        print(table[-1], flush=True)


def lenet_fc1(args) -> None:
    """CAR on LeNet-5's 500 fc1 neurons against L1, mean in/out and random."""
    out = OUT / "metrics"
    out.mkdir(parents=True, exist_ok=True)
    model = cp.models.pretrained_lenet5(MNIST)
    score, hold = cp.data.mnist5k(MNIST, "test").split(0.5, seed=0)
    crits = ["car", *BASELINES]
    print(f"== lenet5 fc1 ({args.per_step} neurons per step)", flush=True)
    runs = _curves(model, "fc1", score, hold, None, crits, args.seeds, args.per_step)
    _write_csv(out / "lenet-fc1.csv", list(_rows("lenet5", "fc1", runs)))
    _plot(out / "lenet-fc1.png", f"LeNet-5 fc1 (500 neurons, {args.per_step} per step)",
          "hold-out top-1 accuracy (%)", runs, 100.0, "CAR")
    head = ["| net | layer | original hold-out | CAR | mean_in | mean_out | l1 | random |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    line = _table("lenet5", "fc1", runs, True, "%", 100.0, crits + ["random"])
    accs = ["| kept neurons | " + " | ".join(["CAR", *BASELINES, "random (mean)"]) + " |",
            "|---:|" + "---:|" * (len(crits) + 1)]
    accs += _at_kept(runs, [250, 100, 50, 25, 10, 5], 100.0, " %")
    (out / "lenet_fc1_table.md").write_text("\n".join(head + [line, ""] + accs) + "\n")
    print("\n".join(head + [line, ""] + accs), flush=True)


def _at_kept(runs, kept_points, factor, unit, prefix="") -> list[str]:
    """Table rows: per number of units kept, each criterion's hold-out value (random: mean)."""
    lines = []
    for k in kept_points:
        cells = []
        for results in runs.values():
            vals = [next((s.holdout_accuracy for s in r.trajectory if s.kept == k), None)
                    for r in results]
            vals = [v for v in vals if v is not None]
            cells.append(f"{factor * np.mean(vals):.1f}{unit}" if vals else "n/a")
        lines.append(f"{prefix}| {k} | " + " | ".join(cells) + " |")
    return lines


def _write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# -- comparisons ----------------------------------------------------------------------------------
def compare(args) -> None:
    out = OUT / "compare"
    out.mkdir(parents=True, exist_ok=True)
    test = cifar_test()
    r20 = resnet20()
    r32 = cp.models.load_checkpoint(cp.models.resnet_cifar(32), DATA / "models" / "resnet32-d509ac18.th")
    pool = test.sample(args.images + 1000, seed=0)
    data, comp_score = pool.split(args.images / (args.images + 1000), seed=0)
    lines = []
    t0 = time.perf_counter()
    c1 = cp.compare(r20, "layer3.2.conv1", r32, "layer3.4.conv1", data, names=("ResNet-20", "ResNet-32"),
                    progress=False)
    c1.save_html(out / "resnet20-vs-resnet32" / "index.html")
    lines += [f"## ResNet-20 layer3.2.conv1 vs ResNet-32 layer3.4.conv1 ({time.perf_counter() - t0:.0f} s)",
              "", "```", c1.summary(), "```", ""]
    lines += _coverage_lines(c1)
    # the original against its CAR-compressed self: greedy CAR on 1,000 other test images, stopped
    # within a relative 5 % of the original accuracy on them
    t0 = time.perf_counter()
    res = cp.compress_layer(r20, "layer3.2.conv1", comp_score, max_drop=0.05, progress=False)
    c2 = cp.compare(r20, "layer3.2.conv1", res.model, "layer3.2.conv1", data,
                    names=("ResNet-20", "ResNet-20, CAR-compressed"), progress=False)
    c2.save_html(out / "resnet20-vs-car" / "index.html")
    same = sum(m.filter_a == m.filter_b for m in c2.matches)
    lines += [f"## ResNet-20 layer3.2.conv1: original vs CAR-compressed ({len(res.kept)} of 64 filters "
              f"kept; {time.perf_counter() - t0:.0f} s)", "", "```", c2.summary(), "```", "",
              f"Kept filters matched to themselves in the original: {same} of {len(c2.matches)}.", ""]
    lines += _coverage_lines(c2)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _coverage_lines(c) -> list[str]:
    rows = ["| class | A accuracy | B accuracy | A coverage (pts) | B coverage (pts) |",
            "|---|---:|---:|---:|---:|"]
    for k, name in enumerate(c.classes):
        rows.append(f"| {name} | {100 * c.base_value_c_a[k]:.1f} % | {100 * c.base_value_c_b[k]:.1f} % | "
                    f"{100 * c.coverage_a[k]:+.1f} (#{c.coverage_filter_a[k]}) | "
                    f"{100 * c.coverage_b[k]:+.1f} (#{c.coverage_filter_b[k]}) |")
    return rows + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["exactness", "rar", "lenet-fc1", "compare"], required=True)
    ap.add_argument("--images", type=int, default=None,
                    help="exactness: CIFAR-10 images (default 200); compare: images (default 2000)")
    ap.add_argument("--seeds", type=int, default=10, help="random-criterion seeds")
    ap.add_argument("--per-step", type=int, default=1, help="lenet-fc1: neurons removed per step")
    ap.add_argument("--layers", nargs="*", default=None, help="rar: only these layers")
    args = ap.parse_args()
    if args.images is None:
        args.images = 2000 if args.part == "compare" else 200
    {"exactness": exactness, "rar": rar, "lenet-fc1": lenet_fc1, "compare": compare}[args.part](args)


if __name__ == "__main__":
    main()
