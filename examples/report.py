"""Build the interpretation reports of the CAR paper's Figures 5-9 on the shared data:

  resnet20-conv1/           ResNet-20 stem on CIFAR-10, with a greedy CAR compression to half
                            its filters (Figure 5, colour filters, Figure 8)
  resnet20-layer3.2.conv1/  a deep ResNet-20 layer (Figures 6-7, 9)
  lenet5-conv1/             LeNet-5's first layer on MNIST

Each directory holds index.html (self-contained), the PNGs and report.json; summary.json collects
the headline numbers. CPU-sized defaults; raise the image counts for the real thing:

    python examples/report.py out/ --score-images 2000 --search-images 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import carprune as cp
from carprune.interpret import InterpretationReport, colour_summary, interpret
from carprune.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def headline(rep: InterpretationReport) -> dict:
    out = {"layer": rep.layer, "model": rep.model, "filters": rep.num_filters,
           "scored_images": rep.scored_images, "base_accuracy": rep.base_accuracy,
           "searched_images": rep.searched_images,
           "most_important": [{"filter": ci.filter, "car": ci.car,
                               "top_classes": [c.name for c in ci.top],
                               "bottom_classes": [c.name for c in ci.bottom]}
                              for ci in sorted(rep.class_importance, key=lambda c: -c.car)[:3]]}
    if rep.colour is not None:
        c = rep.colour
        out["colour"] = {"summary": c.sentence(), "k": c.k, "colour_in_first_k": c.colour_in_first_k,
                         "colour_total": c.colour_total, "threshold": c.threshold,
                         "order_source": c.order_source, "order": c.order,
                         "colour_filters": c.colour_filters, "p_value": c.p_value,
                         "indices": [round(v, 3) for v in c.indices]}
        if c.order_source != "CAR, lowest first":   # also the one-shot CAR order, for comparison
            scored = sorted((i for i in rep.filters if i.rank is not None), key=lambda i: -i.rank)
            one = colour_summary(np.array(c.indices), [i.filter for i in scored], c.k,
                                 threshold=c.threshold)
            out["colour"]["one_shot"] = {"summary": one.sentence(), "order": one.order,
                                         "colour_in_first_k": one.colour_in_first_k}
    if rep.compression is not None:
        out["compression"] = {k: rep.compression[k] for k in
                              ("removed", "kept", "base_accuracy", "final_accuracy")}
    if rep.class_accuracy is not None:
        a = rep.class_accuracy
        out["class_accuracy"] = {"share_within_3_points": a.share_within,
                                 "original": a.original_overall, "compressed": a.compressed_overall}
    out["notes"] = rep.notes
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                   help="the shared data directory (CIFAR-10 archive, MNIST sample, ResNet weights)")
    p.add_argument("--score-images", type=int, default=500,
                   help="images CAR is scored on (and the greedy compression scores on)")
    p.add_argument("--holdout-images", type=int, default=1000,
                   help="hold-out images the compression tracks accuracy on")
    p.add_argument("--search-images", type=int, default=5000,
                   help="images searched for top patches and used for per-class accuracy")
    p.add_argument("--no-compress", action="store_true",
                   help="skip the greedy compression of ResNet-20 conv1")
    p.add_argument("--memory-budget", default="1GiB")
    p.add_argument("--only", nargs="*", help="build only these reports (directory names)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse scores.npz and compression/ saved in the output directory by an "
                        "earlier run (only the report is rebuilt)")
    args = p.parse_args(argv)

    cifar = cp.data.cifar10(args.data / "cifar10-jpeg.tar.gz", "test")
    score_half, holdout = cifar.split(0.5, seed=0)
    resnet = cp.models.load_checkpoint(cp.models.resnet_cifar(20),
                                       args.data / "models" / "resnet20-12fca82f.th")
    mnist = cp.data.mnist5k(args.data / "mnist_5k.npz", "test")
    lenet = cp.models.pretrained_lenet5(args.data / "mnist_5k.npz")
    common = {"memory_budget": args.memory_budget, "progress": None}

    # CIFAR-10 test: CAR (and the greedy compression) on one half, patches and per-class
    # accuracy on the other, so Figure 8 is measured on images the compression never saw
    jobs = {
        "resnet20-conv1": (resnet, "conv1", holdout, score_half, not args.no_compress),
        "resnet20-layer3.2.conv1": (resnet, "layer3.2.conv1", holdout, score_half, False),
        "lenet5-conv1": (lenet, "conv1", mnist, mnist, False),
    }
    summary: dict[str, dict] = {}
    for name, (model, layer, data, score_data, compress) in jobs.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        n_score = min(args.score_images, len(score_data))
        saved_scores, saved_comp = args.out / name / "scores.npz", args.out / name / "compression"
        if args.reuse and saved_scores.is_file():
            scores = cp.LayerScores.load(saved_scores)
        else:
            scores = cp.score_layer(model, layer, score_data, num_images=n_score, **common)
        comp = None
        if compress and args.reuse and (saved_comp / "result.json").is_file():
            from carprune.greedy import CompressionResult

            comp = CompressionResult.load(saved_comp, architecture=model)
        elif compress:
            try:
                from carprune.greedy import compress_layer

                comp = compress_layer(model, layer, score_data, eval_data=holdout, keep=0.5,
                                      score_images=n_score,
                                      eval_images=min(args.holdout_images, len(holdout)), **common)
                comp.save(saved_comp)
            except Exception:   # the report is still useful without it: say so and go on
                print(f"{name}: greedy compression failed, reporting without it:\n"
                      f"{traceback.format_exc()}", file=sys.stderr)
        rep = interpret(model, layer, data, scores=scores, compression=comp,
                        search_images=min(args.search_images, len(data)), **common)
        scores.save(args.out / name / "scores.npz")
        rep.save_html(args.out / name / "index.html")
        summary[name] = {**headline(rep), "seconds": round(time.time() - t0, 1)}
        print(f"{name}: {args.out / name / 'index.html'} ({summary[name]['seconds']} s)")
        if rep.colour is not None:
            print("  " + rep.colour.sentence())
    write_json(args.out / "summary.json", summary)
    print(json.dumps({k: v.get("colour", {}).get("summary") for k, v in summary.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
