"""Deep Compression benchmark: LeNet-5 on MNIST (beside Han et al. 2015) and the CAR paper's
Table 2 for ResNet-20 on CIFAR-10 (single layers, before / after CAR / after CAR + DC).

    python benchmarks/bench_deepcompress.py [--out out/bench] [--part lenet|resnet|resnet-file|all]

Writes CSV, JSON and markdown under ``--out``. The ResNet part takes any model per layer:
``resnet_table(original, layers, car_models={"conv1": shrunk_model, ...})`` compresses each
CAR-shrunk model's layer with Deep Compression. The command CAR-compresses each layer first
(``--max-drop 0.05``: within a relative 5 % of the original hold-out accuracy).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import carprune as cp
import carprune.deepcompress as dc
from carprune.deepcompress.pipeline import accuracy

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# Han et al. 2015, Table 1 and Table 2: LeNet-5 weights kept per layer (66 %, 12 %, 8 %, 19 %),
# 8-bit conv / 5-bit fc codebooks; 1720 KB -> 44 KB (39x), top-1 error 0.80 % -> 0.74 %.
HAN_LENET_PRUNE = {"conv1": 0.34, "conv2": 0.88, "fc1": 0.92, "fc2": 0.81}
HAN_LENET = {"ratio": 39.0, "error_before": 0.80, "error_after": 0.74}
TABLE2_LAYERS = ("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.2.conv1")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def decode_seconds(path: Path, architecture: nn.Module, repeats: int = 5) -> float:
    """Median wall time of ``load_compressed`` (parse, verify, decode, load) over repeats."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dc.load_compressed(path, architecture)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------- LeNet-5


def bench_lenet(out: Path, iters: tuple[int, int], lr: float, progress: bool) -> dict[str, Any]:
    mnist = DATA / "mnist_5k.npz"
    model = cp.models.pretrained_lenet5(mnist)
    train, test = cp.data.mnist5k(mnist, "train"), cp.data.mnist5k(mnist, "test")
    t = time.perf_counter()
    res = dc.deep_compress(
        model,
        train,
        test,
        prune=HAN_LENET_PRUNE,
        bits={"conv": 8, "linear": 5},
        index_bits={"conv": 8, "linear": 5},
        finetune_iters=iters,
        lr=lr,
        progress=progress,
    )
    total = time.perf_counter() - t
    path = out / "lenet5.cpz"
    size = res.save(path)
    rep = res.report
    acc0, acc1 = rep.accuracy["original"], rep.accuracy["quantized+finetuned"]
    assert acc0 is not None and acc1 is not None
    summary = {
        "model": "LeNet-5 (MNIST 5k: 4000 train / 1000 test)",
        "params": sum(r.params for r in rep.layers),
        "bytes_before": rep.model_bytes_before,
        "bytes_after": size,
        "ratio": round(rep.ratio, 2),
        "weights_only_ratio": round(rep.layers_ratio, 2),
        "error_before_pct": round(100 * (1 - acc0), 2),
        "error_after_pct": round(100 * (1 - acc1), 2),
        "error_change_pct": round(100 * (acc0 - acc1), 2),
        "han_ratio": HAN_LENET["ratio"],
        "han_error_before_pct": HAN_LENET["error_before"],
        "han_error_after_pct": HAN_LENET["error_after"],
        "finetune_iters": list(iters),
        "compress_seconds": round(total, 1),
        "encode_seconds": round(rep.seconds["encode"], 4),
        "decode_seconds": round(decode_seconds(path, cp.models.lenet5()), 4),
    }
    rep.save(out / "lenet5_report.json")
    write_csv(
        out / "lenet5_layers.csv",
        [
            {
                **{k: v for k, v in asdict(r).items() if k != "shape"},
                "shape": "x".join(map(str, r.shape)),
                "bytes_before_huffman": r.bytes_before_huffman,
                "ratio": round(r.ratio, 2),
            }
            for r in rep.layers
        ],
    )
    write_csv(out / "lenet5_summary.csv", [summary])
    accs = ", ".join(f"{k} {100 * v:.2f} %" for k, v in rep.accuracy.items() if v is not None)
    md = [
        "## LeNet-5 on MNIST: Deep Compression",
        "",
        rep.to_markdown(),
        "",
        "| | ratio | error before | error after |",
        "|---|---:|---:|---:|",
        f"| carprune | {summary['ratio']}x | {summary['error_before_pct']} % | "
        f"{summary['error_after_pct']} % |",
        f"| Han et al. 2015 | {HAN_LENET['ratio']:.0f}x | {HAN_LENET['error_before']} % | "
        f"{HAN_LENET['error_after']} % |",
        "",
        f"Accuracy by stage: {accs}. Fine-tuning {iters[0]} + {iters[1]} iterations; "
        f"decode (load_compressed) {1000 * summary['decode_seconds']:.1f} ms.",
    ]
    (out / "lenet5.md").write_text("\n".join(md) + "\n")
    return summary


# ----------------------------------------------------------------------------- ResNet-20


@dataclass
class Table2Row:
    """One row of the CAR paper's Table 2: a layer before, after CAR, after CAR + DC."""

    layer: str
    bytes_original: int
    bytes_car: int | None
    bytes_car_dc: int
    ratio_car: float | None
    ratio_car_dc: float
    accuracy_original: float
    accuracy_car: float | None
    accuracy_car_dc: float
    shape_original: str
    shape_compressed: str
    nonzeros: int


def _weight_bytes(model: nn.Module, layer: str) -> tuple[int, str]:
    w = model.get_submodule(layer).weight
    return w.numel() * w.element_size(), "x".join(map(str, w.shape))


def resnet_table(
    original: nn.Module,
    eval_data: Any,
    train_data: Any,
    layers: Sequence[str] = TABLE2_LAYERS,
    car_models: Mapping[str, nn.Module] | None = None,
    **dc_kwargs: Any,
) -> list[Table2Row]:
    """Table 2 rows: each layer of ``layers`` compressed on its own by Deep Compression, applied
    to ``car_models[layer]`` (the model whose ``layer`` CAR shrank) or to the original."""
    car_models = car_models or {}
    acc0 = accuracy(original, eval_data)
    rows = []
    for layer in layers:
        b0, s0 = _weight_bytes(original, layer)
        car = car_models.get(layer)
        base = car if car is not None else original
        b_car = _weight_bytes(car, layer)[0] if car is not None else None
        acc_car = accuracy(car, eval_data) if car is not None else None
        res = dc.deep_compress(base, train_data, eval_data, layers=[layer], **dc_kwargs)
        r = res.report.layer(layer)
        acc_dc = res.report.accuracy[
            "quantized+finetuned" if res.report.config["finetune_iters"][1] else "quantized"
        ]
        assert acc_dc is not None
        rows.append(
            Table2Row(
                layer=layer,
                bytes_original=b0,
                bytes_car=b_car,
                bytes_car_dc=r.bytes_after,
                ratio_car=round(b0 / b_car, 2) if b_car else None,
                ratio_car_dc=round(b0 / r.bytes_after, 2),
                accuracy_original=round(acc0, 4),
                accuracy_car=None if acc_car is None else round(acc_car, 4),
                accuracy_car_dc=round(acc_dc, 4),
                shape_original=s0,
                shape_compressed="x".join(map(str, r.shape)),
                nonzeros=r.nonzeros,
            )
        )
    return rows


def table2_markdown(rows: Sequence[Table2Row], note: str) -> str:
    def pct(a: float | None) -> str:
        return "n/a" if a is None else f"{100 * a:.2f} %"

    md = [
        "## ResNet-20 on CIFAR-10: single layers, CAR then Deep Compression (CAR Table 2)",
        "",
        "| layer | bytes | after CAR | after CAR + DC | ratio CAR | ratio CAR + DC "
        "| acc. original | acc. CAR | acc. CAR + DC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r.layer} ({r.shape_original}) | {r.bytes_original} | "
            f"{r.bytes_car if r.bytes_car is not None else 'n/a'} | {r.bytes_car_dc} | "
            f"{f'{r.ratio_car}x' if r.ratio_car else 'n/a'} | {r.ratio_car_dc}x | "
            f"{pct(r.accuracy_original)} | {pct(r.accuracy_car)} | {pct(r.accuracy_car_dc)} |"
        )
    return "\n".join([*md, "", note]) + "\n"


def pretrained_resnet20() -> nn.Module:
    return cp.models.load_checkpoint(
        cp.models.resnet_cifar(20), DATA / "models" / "resnet20-12fca82f.th"
    )


def bench_resnet_file(out: Path) -> dict[str, Any]:
    """The whole pretrained ResNet-20 through Deep Compression's defaults, without fine-tuning:
    file size, ratio, and the time to encode and to decode it (the issue asks under 1 s)."""
    original = pretrained_resnet20()
    t = time.perf_counter()
    res = dc.deep_compress(original)
    compress = time.perf_counter() - t
    path = out / "resnet20.cpz"
    size = res.save(path)
    summary = {
        "bytes_before": res.report.model_bytes_before,
        "bytes_after": size,
        "ratio": round(res.report.model_bytes_before / size, 2),
        "compress_seconds": round(compress, 2),
        "encode_seconds": round(res.report.seconds["encode"], 4),
        "decode_seconds": round(decode_seconds(path, cp.models.resnet_cifar(20)), 4),
    }
    (out / "resnet20_file.md").write_text(
        "## ResNet-20, whole network, Deep Compression defaults (no fine-tuning)\n\n"
        f"{summary['bytes_before']} -> {summary['bytes_after']} bytes ({summary['ratio']}x); "
        f"k-means and pruning {summary['compress_seconds']} s, encoding "
        f"{1000 * summary['encode_seconds']:.0f} ms, decoding (load_compressed, median of 5) "
        f"{1000 * summary['decode_seconds']:.0f} ms.\n")
    return summary


def car_compress(original: nn.Module, score_data: Any, eval_data: Any, max_drop: float,
                 progress: bool, saved: Path) -> dict[str, cp.CompressionResult]:
    """Each Table 2 layer CAR-compressed on its own (greedy, re-scoring after every removal)
    while hold-out accuracy stays within a relative `max_drop` of the original. A result saved
    under `saved` by an earlier run with the same settings is loaded instead of recomputed."""
    out = {}
    for layer in TABLE2_LAYERS:
        d = saved / layer
        want = {"max_drop": max_drop, "score_images": len(score_data), "eval_images": len(eval_data)}
        if (d / "result.json").is_file():
            old = cp.CompressionResult.load(d, original)
            if all(old.config.get(k) == v for k, v in want.items()):
                out[layer] = old
                continue
        out[layer] = cp.compress_layer(original, layer, score_data, eval_data=eval_data,
                                       max_drop=max_drop, progress=progress)
        out[layer].save(d)
    return out


def bench_resnet(
    out: Path,
    iters: tuple[int, int],
    lr: float,
    eval_n: int,
    train_n: int,
    progress: bool,
    score_n: int = 1000,
    max_drop: float | None = 0.05,
) -> list[Table2Row]:
    """Table 2: with `max_drop`, CAR first shrinks each layer (scored on `score_n` test images
    disjoint from the `eval_n` hold-out ones); Deep Compression then compresses that layer."""
    original = pretrained_resnet20()
    cifar = DATA / "cifar10-jpeg.tar.gz"
    test = cp.data.cifar10(cifar, "test")
    car_models = None
    if max_drop is None:
        eval_data = test.sample(eval_n, seed=0) if eval_n < len(test) else test
    else:
        score_data, eval_data = test.sample(score_n + eval_n, seed=0).split(
            score_n / (score_n + eval_n), seed=0)
        results = car_compress(original, score_data, eval_data, max_drop, progress,
                               out / "table2-car")
        car_models = {layer: r.model for layer, r in results.items()}
        for layer, r in results.items():
            print(f"CAR {layer}: {r.num_filters} -> {len(r.kept)} filters", flush=True)
    train = cp.data.cifar10(cifar, "train") if any(iters) else None
    train_data = None if train is None else train.sample(min(train_n, len(train)), seed=0)
    rows = resnet_table(
        original,
        eval_data,
        train_data,
        car_models=car_models,
        finetune_iters=iters,
        lr=lr,
        progress=progress,
    )
    write_csv(out / "resnet20_table2.csv", [asdict(r) for r in rows])
    note = (
        f"Hold-out: {len(eval_data)} seeded CIFAR-10 test images; Deep Compression with the "
        f"defaults (prune conv 60 %, 8-bit weights, 8-bit index differences), fine-tuning "
        f"{iters[0]} + {iters[1]} iterations on {train_n} training images. "
        + (
            f"CAR: greedy CAR compression of the layer alone, scored on {score_n} other test "
            f"images, stopped before hold-out accuracy fell below {1 - max_drop:.2f} x the "
            "original (results in table2-car/)."
            if car_models
            else "No CAR: Deep Compression ran on the original layers (CAR columns n/a)."
        )
    )
    (out / "resnet20_table2.md").write_text(table2_markdown(rows, note))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--part", choices=("lenet", "resnet", "resnet-file", "all"), default="all")
    ap.add_argument(
        "--lenet-iters", type=int, nargs=2, default=(2000, 500), metavar=("PRUNE", "QUANT")
    )
    ap.add_argument("--lenet-lr", type=float, default=0.01)
    ap.add_argument(
        "--resnet-iters", type=int, nargs=2, default=(200, 100), metavar=("PRUNE", "QUANT")
    )
    ap.add_argument("--resnet-lr", type=float, default=0.001)
    ap.add_argument("--eval-n", type=int, default=2000, help="CIFAR-10 hold-out images")
    ap.add_argument("--train-n", type=int, default=10000, help="CIFAR-10 fine-tuning images")
    ap.add_argument("--score-n", type=int, default=1000, help="CIFAR-10 images CAR scores on")
    ap.add_argument("--max-drop", type=float, default=0.05,
                    help="CAR's relative hold-out accuracy floor (negative: no CAR step)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty()
    results: dict[str, Any] = {}
    if args.part in ("lenet", "all"):
        results["lenet5"] = bench_lenet(args.out, tuple(args.lenet_iters), args.lenet_lr, progress)
        print((args.out / "lenet5.md").read_text())
    if args.part in ("resnet", "all"):
        rows = bench_resnet(
            args.out, tuple(args.resnet_iters), args.resnet_lr, args.eval_n, args.train_n, progress,
            score_n=args.score_n, max_drop=args.max_drop if args.max_drop >= 0 else None,
        )
        results["resnet20_table2"] = [asdict(r) for r in rows]
        print((args.out / "resnet20_table2.md").read_text())
    if args.part in ("resnet-file", "all"):
        results["resnet20_file"] = bench_resnet_file(args.out)
        print((args.out / "resnet20_file.md").read_text())
    # a part run alone keeps the other part's earlier results in the combined files
    combined = args.out / "deepcompress.json"
    if combined.is_file():
        results = {**json.loads(combined.read_text()), **results}
    combined.write_text(json.dumps(results, indent=2) + "\n")
    parts = [p for p in ("lenet5.md", "resnet20_table2.md", "resnet20_file.md")
             if (args.out / p).is_file()]
    (args.out / "deepcompress.md").write_text("\n".join((args.out / p).read_text() for p in parts))


if __name__ == "__main__":
    main()
