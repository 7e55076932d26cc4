"""The CAR paper's Figure 2/3 curves and Table 1 on real networks, lazy vs full re-scoring, and
the wall time of a full greedy run against a naive greedy.

    python -m benchmarks.bench_greedy --part curves  [--score-images 1000 --eval-images 1000]
    python -m benchmarks.bench_greedy --part timing
    python -m benchmarks.bench_greedy --part ft-reference  [same split and fine-tuning flags]

Scores come from one seeded half of the CIFAR-10 test images (MNIST test digits for LeNet-5),
hold-out accuracy from the other half, as in the paper. Outputs in out/bench/greedy/: one CSV
of every trajectory, a PNG per layer, table1.md, lazy.md, timing.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

import carprune as cp

from .common import DATA, OUT, cifar_test, resnet20

RESNET_LAYERS = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.2.conv1"]
LENET_LAYERS = ["conv1", "conv2"]
BASELINES = ["mean_in", "mean_out", "l1", "kse"]


def _models_and_data(score_images: int, eval_images: int):
    test = cifar_test()
    pool = test.sample(score_images + eval_images, seed=0)
    score, hold = pool.split(score_images / (score_images + eval_images), seed=0)
    train = cp.data.cifar10(DATA / "cifar10-jpeg.tar.gz", "train")
    mnist_test = cp.data.mnist5k(DATA / "mnist_5k.npz", "test")
    m_score, m_hold = mnist_test.split(0.5, seed=0)
    mnist_train = cp.data.mnist5k(DATA / "mnist_5k.npz", "train")
    return [("lenet5", cp.models.pretrained_lenet5(DATA / "mnist_5k.npz"), LENET_LAYERS,
             m_score, m_hold, mnist_train),
            ("resnet20", resnet20(), RESNET_LAYERS, score, hold, train)]


def curves(args) -> None:
    out = Path(args.out) if args.out else OUT / "greedy"
    out.mkdir(parents=True, exist_ok=True)
    rows, table, lazy_rows = [], [], []
    for net, model, layers, score, hold, train in _models_and_data(args.score_images, args.eval_images):
        if args.nets and net not in args.nets:
            continue
        for layer in layers:
            if args.layers and layer not in args.layers:
                continue
            print(f"== {net} {layer}", flush=True)
            runs: dict[str, list] = {}
            t0 = time.perf_counter()
            car = cp.compress_layer(model, layer, score, eval_data=hold, progress=False)
            t_car = time.perf_counter() - t0
            runs["car"] = [car]
            t0 = time.perf_counter()
            lazy = cp.compress_layer(model, layer, score, eval_data=hold, lazy=True, progress=False)
            t_lazy = time.perf_counter() - t0
            differ = _first_difference(car.removed, lazy.removed)
            lazy_rows.append((net, layer, car.num_filters, t_car, t_lazy, differ,
                              _holdout_gap(car, lazy)))
            for crit in BASELINES:
                runs[crit] = [cp.compress_layer(model, layer, score, eval_data=hold, criterion=crit,
                                                progress=False)]
            runs["random"] = [cp.compress_layer(model, layer, score, eval_data=hold, criterion="random",
                                                seed=s, progress=False) for s in range(args.seeds)]
            ft = _finetuned_points(model, layer, car, score, hold, train, args)
            for crit, results in runs.items():
                for seed, res in enumerate(results):
                    for s in res.trajectory:
                        rows.append({"net": net, "layer": layer, "criterion": crit, "seed": seed,
                                     "kept": s.kept, "ratio": res.num_filters / s.kept,
                                     "holdout": s.holdout_accuracy, "score": s.score_accuracy,
                                     "flops": s.flops, "params": s.params, "layer_bytes": s.layer_bytes})
            for kept, acc in ft:
                rows.append({"net": net, "layer": layer, "criterion": "car+finetune", "seed": 0,
                             "kept": kept, "ratio": car.num_filters / kept, "holdout": acc,
                             "score": None, "flops": None, "params": None, "layer_bytes": None})
            table.extend(_table1(net, layer, runs, ft))
            _plot(out / f"{net}-{layer}.png", net, layer, runs, ft)
            _write(out, rows, table, lazy_rows)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i + 1
    return None


def _holdout_gap(a, b) -> float:
    pairs = zip(a.trajectory, b.trajectory, strict=False)
    return max(abs(x.holdout_accuracy - y.holdout_accuracy) for x, y in pairs)


def _finetuned_points(model, layer, car, score, hold, train, args):
    """Hold-out accuracy of CAR-pruned models fine-tuned with the paper's schedule: at the
    `--ft-points` fractions (for the curve), and by bisection for the smallest filter count whose
    fine-tuned accuracy stays within a relative 5 % of the original (for Table 1), searching
    below the CAR-only 5 % point and assuming accuracy falls as filters are removed."""
    n = car.num_filters
    base = car.trajectory[0].holdout_accuracy
    done: dict[int, float] = {}

    def at(kept: int) -> float:
        if kept not in done:
            done[kept] = _finetuned_accuracy(model, layer, car.removed[: n - kept], train, hold, args)
            print(f"   fine-tuned at {kept}/{n} filters: hold-out {100 * done[kept]:.2f} %", flush=True)
        return done[kept]

    for frac in args.ft_points:
        at(max(1, round(frac * n)))
    lo, hi = 1, min(s.kept for s in car.trajectory if s.holdout_accuracy >= 0.95 * base)
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid) >= 0.95 * base:
            hi = mid
        else:
            lo = mid + 1
    if hi not in done:  # the CAR-only point itself, fine-tuned, for the table's accuracy
        at(hi)
    return sorted(done.items(), reverse=True)


def _finetuned_accuracy(model, layer, removed, train, hold, args) -> float:
    """Hold-out accuracy after removing `removed` from `layer` and the paper's fine-tuning."""
    pruned = cp.prune_filters(model, layer, removed) if removed else cp.surgery.copy_model(model)
    cp.finetune(pruned, layer, cp.FineTune(train_data=train, iters=args.ft_iters,
                                           batch_size=args.ft_batch), progress=False)
    return cp.score_layer(pruned, layer, hold, filters=[], progress=False).base_accuracy


def ft_reference(args) -> None:
    """The unpruned network fine-tuned with the same schedule as each layer's CAR + fine-tune
    points: how much of their accuracy comes from fine-tuning itself (e.g. adapting to the
    JPEG-compressed CIFAR-10 images) rather than from what pruning kept."""
    out = Path(args.out) if args.out else OUT / "greedy"
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| net | layer | original hold-out | unpruned, fine-tuned as for this layer |",
             "|---|---|---:|---:|"]
    for net, model, layers, _, hold, train in _models_and_data(args.score_images, args.eval_images):
        if args.nets and net not in args.nets:
            continue
        base = cp.score_layer(model, layers[0], hold, filters=[], progress=False).base_accuracy
        for layer in layers:
            if args.layers and layer not in args.layers:
                continue
            acc = _finetuned_accuracy(model, layer, [], train, hold, args)
            lines.append(f"| {net} | {layer} | {100 * base:.1f} % | {100 * acc:.1f} % |")
            print(lines[-1], flush=True)
            (out / "ft_reference.md").write_text("\n".join(lines) + "\n")


def _table1(net, layer, runs, ft):
    """Per criterion: the most filters removed while hold-out accuracy stays >= 95 % of the
    original (the paper's Table 1 criterion), with the network's FLOPs and parameters saved."""
    first = runs["car"][0].trajectory[0]
    out = [(net, layer, "(original)", 1.0, 0.0, 0.0, first.kept, first.holdout_accuracy)]
    for crit, results in list(runs.items()) + [("car+finetune", None)]:
        if crit == "car+finetune":
            base = runs["car"][0].trajectory[0]
            ok = [(k, a) for k, a in ft if a >= 0.95 * base.holdout_accuracy]
            if not ok:
                continue
            kept, acc = min(ok)
            step = next(s for s in runs["car"][0].trajectory if s.kept == kept)
            out.append((net, layer, crit, base.kept / kept, 1 - step.flops / base.flops,
                        1 - step.params / base.params, kept, acc))
            continue
        vals = []
        for res in results:
            base = res.trajectory[0]
            ok = [s for s in res.trajectory if s.holdout_accuracy >= 0.95 * base.holdout_accuracy]
            s = min(ok, key=lambda s: s.kept)
            vals.append((base.kept / s.kept, 1 - s.flops / base.flops, 1 - s.params / base.params,
                         s.kept, s.holdout_accuracy))
        v = np.array(vals, dtype=float)
        out.append((net, layer, crit, *v.mean(0)))
    return out


def _plot(path: Path, net, layer, runs, ft) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"car": "purple", "mean_out": "black", "mean_in": "green", "l1": "orange", "kse": "teal"}
    base = runs["car"][0].trajectory[0].holdout_accuracy
    n = runs["car"][0].num_filters
    for crit, results in runs.items():
        if crit == "random":
            kept = [s.kept for s in results[0].trajectory]
            acc = np.array([[s.holdout_accuracy for s in r.trajectory] for r in results])
            ratio = [n / k for k in kept]
            ax.errorbar(ratio, 100 * acc.mean(0), yerr=100 * acc.std(0), color="red", label="random (±std)",
                        capsize=2, lw=1)
            continue
        tr = results[0].trajectory
        ax.plot([n / s.kept for s in tr], [100 * s.holdout_accuracy for s in tr], color=colors[crit],
                label=crit.replace("car", "CAR"), lw=1.5 if crit == "car" else 1)
    if ft:
        ax.plot([n / k for k, _ in ft], [100 * a for _, a in ft], "o-", color="blue", label="CAR + fine-tune")
    ax.axhline(100 * base, ls="--", color="red", lw=0.8, label="original")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (filters before / after)")
    ax.set_ylabel("hold-out top-1 accuracy (%)")
    ax.set_title(f"{net} {layer}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table1_summary(table) -> str:
    """Table 1 pivoted: one row per layer, the compression ratio per criterion (network FLOPs
    saved in brackets for CAR and CAR + fine-tuning)."""
    crits = ["car", "car+finetune", "mean_in", "mean_out", "l1", "kse", "random"]
    by = {(net, layer, crit): (ratio, fl) for net, layer, crit, ratio, fl, *_ in table}
    orig = {(net, layer): acc for net, layer, crit, *_, acc in table if crit == "(original)"}
    lines = ["| net | layer | original hold-out | " + " | ".join(crits) + " |",
             "|---|---|---:|" + "---:|" * len(crits)]
    for net, layer in orig:
        cells = []
        for c in crits:
            if (net, layer, c) not in by:
                cells.append("n/a")
                continue
            ratio, fl = by[net, layer, c]
            cells.append(f"{ratio:.2f}x ({100 * fl:.1f} %)" if c.startswith("car") else f"{ratio:.2f}x")
        lines.append(f"| {net} | {layer} | {100 * orig[net, layer]:.1f} % | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, rows, table, lazy_rows) -> None:
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| net | layer | criterion | compression ratio | network FLOPs saved | params saved "
             "| filters kept | hold-out accuracy |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for net, layer, crit, ratio, fl, pa, kept, acc in table:
        lines.append(f"| {net} | {layer} | {crit} | {ratio:.2f} | {100 * fl:.1f} % | {100 * pa:.1f} % "
                     f"| {kept:.1f} | {100 * acc:.1f} % |")
    (out / "table1.md").write_text("\n".join(lines) + "\n")
    (out / "table1_summary.md").write_text(_table1_summary(table))
    lines = ["| net | layer | filters | full re-scoring (s) | lazy (s) | first differing step "
             "| max hold-out gap |", "|---|---|---:|---:|---:|---:|---:|"]
    for net, layer, n, tf, tl, d, gap in lazy_rows:
        lines.append(f"| {net} | {layer} | {n} | {tf:.1f} | {tl:.1f} | {d if d else 'none'} "
                     f"| {100 * gap:.2f} pts |")
    (out / "lazy.md").write_text("\n".join(lines) + "\n")


def timing(args) -> None:
    """A full greedy run of layer3.2.conv1 (64 -> 1) on 2,000 score images, against a naive
    greedy (a masked full forward per candidate per step) timed on its first steps and
    extrapolated over the whole run (sum over steps of the candidates left)."""
    model = resnet20()
    data = cifar_test().sample(args.score_images, seed=0)
    t0 = time.perf_counter()
    res = cp.compress_layer(model, "layer3.2.conv1", data, progress=False)
    t_ours = time.perf_counter() - t0
    x, y = data.batch(slice(None))
    steps = args.naive_steps
    removed: list[int] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        alive = [f for f in range(64) if f not in removed]
        counts = naive_counts_masked(model, removed, alive, x, y)
        removed.append(alive[int(np.argmax(counts))])
    t_naive_steps = time.perf_counter() - t0
    candidates_timed = sum(64 - i for i in range(steps))
    candidates_total = sum(range(2, 65))
    t_naive = t_naive_steps / candidates_timed * candidates_total
    agree = removed == res.removed[:steps]
    text = (f"ResNet-20 layer3.2.conv1, 64 -> 1 filters, {args.score_images} score images, "
            f"{torch.get_num_threads()} threads.\n\n"
            f"| | wall time |\n|---|---:|\n| carprune full greedy | {t_ours:.1f} s |\n"
            f"| naive greedy, first {steps} steps | {t_naive_steps:.1f} s |\n"
            f"| naive greedy, extrapolated to 63 steps | {t_naive:.0f} s ({t_naive / 60:.1f} min) |\n"
            f"| speed-up | {t_naive / t_ours:.0f}x |\n\n"
            f"Naive and carprune picked the same first {steps} filters: {agree}.\n")
    print(text)
    (OUT / "greedy").mkdir(parents=True, exist_ok=True)
    (OUT / "greedy" / "timing.md").write_text(text)
    (OUT / "greedy" / "timing.json").write_text(json.dumps(
        {"carprune_s": t_ours, "naive_steps": steps, "naive_steps_s": t_naive_steps,
         "naive_extrapolated_s": t_naive, "agree": agree}))


def naive_counts_masked(model, removed, alive, x, y, batch=100):
    """Correct predictions per candidate with `removed` + candidate zeroed after layer3.2.relu1."""
    module = model.layer3[2].relu1
    out = []
    with torch.no_grad():
        for f in alive:
            zero = removed + [f]

            def hook(mod, inp, o, zero=zero):
                o = o.clone()
                o[:, zero] = 0
                return o

            h = module.register_forward_hook(hook)
            out.append(sum(int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
                           for s in range(0, len(y), batch)))
            h.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["curves", "timing", "ft-reference"], required=True)
    ap.add_argument("--score-images", type=int, default=1000)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--nets", nargs="*", default=None)
    ap.add_argument("--layers", nargs="*", default=None, help="only these layers")
    ap.add_argument("--out", default=None, help="output folder (default out/bench/greedy)")
    ap.add_argument("--ft-points", type=float, nargs="*", default=[0.75, 0.5, 0.25])
    ap.add_argument("--ft-iters", type=int, default=500)
    ap.add_argument("--ft-batch", type=int, default=64)
    ap.add_argument("--naive-steps", type=int, default=2)
    args = ap.parse_args()
    {"curves": curves, "timing": timing, "ft-reference": ft_reference}[args.part](args)


if __name__ == "__main__":
    main()
