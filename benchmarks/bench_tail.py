"""Greedy CAR compression and scoring through the fused residual-network ending
(`ops.ablate_conv_head`) against a naive masked forward at its best batch size, in one run.

    python -m benchmarks.bench_tail                  # all rows (the resnet18 row needs torchvision)
    python -m benchmarks.bench_tail --part greedy    # the CIFAR ResNets only

torchvision is not in the CPU dev venv: run everything with the CUDA venv (it runs on CPU), after
`bash scripts/cuda_build_check.sh` has installed this tree's carprune into it:
    ~/.cache/carprune/venv-cuda/bin/python -m benchmarks.bench_tail

Rows:
- ResNet-20 layer3.2.conv1 and ResNet-32 layer3.4.conv1 (pretrained), greedy 64 -> 1 filters
  scored on 2,000 seeded CIFAR-10 test images: `compress_layer` with the fused ending, the same
  with the generic tail (`fused_head=False`, the path before the fused ending), and a naive
  greedy, which per step runs one masked full forward per remaining filter (2,079 in all). The
  naive passes are timed on the first step's first `--naive-ablations` candidates and
  extrapolated; they must give carprune's counts for those candidates.
- torchvision resnet18 layer4.1.conv1 (random init, 10 classes, CIFAR-10 test images upsampled
  to 64 x 64): all 512 filters scored (`score_layer`), naive passes timed on `--naive-filters`
  filters plus the unablated pass and extrapolated to 513.

FLOP bound: the naive run's multiply-adds over carprune's, counting conv and linear layers: one
prefix pass and the consumer conv once, then per ablation the removed channel's k*k
multiply-adds per consumer output plus the linear layer. Share of bound: measured speed-up over
that bound. Results: a table on stdout, out/bench/tail/results.md and results.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import carprune as cp

from .common import DATA, OUT, best_batch, cifar_test, flop_bound, resnet20

GREEDY = [("resnet20", "layer3.2.conv1", "layer3.2.bn1"),
          ("resnet32", "layer3.4.conv1", "layer3.4.bn1")]
# the cut's ReLU module is shared in torchvision's BasicBlock: zero the BN output instead
RESNET18 = ("resnet18", "layer4.1.conv1", "layer4.1.bn1")


def _model(net: str) -> nn.Module:
    if net == "resnet20":
        return resnet20()
    if net == "resnet32":
        return cp.models.load_checkpoint(cp.models.resnet_cifar(32),
                                         DATA / "models" / "resnet32-d509ac18.th")
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def masked_counts(model: nn.Module, zero_module: str, removed: list[int], filters: list[int | None],
                  x: torch.Tensor, y: torch.Tensor, batch: int, k: int = 10) -> torch.Tensor:
    """The naive pass: per filter (None: none), a hook zeroes its channel and the `removed`
    channels at `zero_module`'s output and the whole network runs; int64 [len(filters), k]."""
    module = dict(model.named_modules())[zero_module]
    counts = torch.zeros(len(filters), k, dtype=torch.int64)
    with torch.no_grad():
        for row, f in enumerate(filters):
            zero = removed + ([f] if f is not None else [])

            def hook(mod, inp, out, zero=zero):
                out = out.clone()
                out[:, zero] = 0
                return out

            h = module.register_forward_hook(hook)
            for s in range(0, len(y), batch):
                ok = model(x[s:s + batch]).argmax(1) == y[s:s + batch]
                counts[row] += torch.bincount(y[s:s + batch][ok], minlength=k)
            h.remove()
    return counts


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def greedy_row(net: str, layer: str, zero_module: str, data, x, y, args) -> dict:
    model = _model(net)
    n = dict(model.named_modules())[layer].out_channels
    res, t_head = _timed(lambda: cp.compress_layer(model, layer, data, progress=False))

    generic = functools.partial(cp.LayerScorer, fused_head=False)  # the same run, generic tail
    gen, t_generic = _timed(lambda: cp.compress_layer(model, layer, data, progress=False,
                                                      scorer_factory=generic))
    scorer = cp.LayerScorer(model, layer, data, progress=False)
    first = scorer.score()
    batch, _ = best_batch(model, x[:1000])
    cand = list(range(min(args.naive_ablations, n)))
    ref, t_naive_part = _timed(lambda: masked_counts(model, zero_module, [], cand, x, y, batch))
    ablations = sum(range(2, n + 1))  # every remaining filter at every step, n -> 1
    t_naive = t_naive_part / len(cand) * ablations
    b = flop_bound(model, layer, x[:1])
    bound = ablations * b["full"] / (b["prefix"] + ablations * b["tail"])
    mismatch = int((first.counts[cand] - ref).abs().sum())
    return {"run": f"{net} {layer} greedy {n} -> 1", "ablations": ablations, "images": len(y),
            "path": scorer.path, "plan": scorer.describe(), "naive_batch": batch,
            "naive_timed_ablations": len(cand), "naive_timed_s": t_naive_part, "naive_s": t_naive,
            "head_s": t_head, "generic_s": t_generic, "bound": bound, "flops": b,
            "same_picks_as_generic": res.removed == gen.removed,
            "count_mismatch": mismatch, "count_total": len(cand) * len(y)}


def resnet18_row(args) -> dict:
    net, layer, zero_module = RESNET18
    model = _model(net)
    xs, y = cifar_test().sample(args.resnet18_images, seed=0).batch(slice(None))
    x = F.interpolate(xs, size=(64, 64), mode="bilinear", align_corners=False)
    n = dict(model.named_modules())[layer].out_channels
    ours, t_head = _timed(lambda: cp.score_layer(model, layer, (x, y), progress=False))
    generic = cp.LayerScorer(model, layer, (x, y), fused_head=False, progress=False)
    _, t_generic = _timed(generic.score)
    head = cp.LayerScorer(model, layer, (x, y), progress=False)
    batch, _ = best_batch(model, x)
    filt = list(range(0, n, max(1, n // args.naive_filters)))[:args.naive_filters]
    ref, t_part = _timed(lambda: masked_counts(model, zero_module, [], [None, *filt], x, y, batch))
    t_naive = t_part / (len(filt) + 1) * (n + 1)
    b = flop_bound(model, layer, x[:1])
    mismatch = int((ours.counts[filt] - ref[1:]).abs().sum()) + int(
        (ours.base_counts - ref[0]).abs().sum())
    return {"run": f"{net} {layer} score all {n}", "ablations": n, "images": len(y),
            "path": head.path, "plan": head.describe(), "naive_batch": batch,
            "naive_timed_ablations": len(filt) + 1, "naive_timed_s": t_part, "naive_s": t_naive,
            "head_s": t_head, "generic_s": t_generic, "bound": b["bound"], "flops": b,
            "count_mismatch": mismatch, "count_total": (len(filt) + 1) * len(y)}


def _table(rows: list[dict]) -> str:
    lines = ["| run | images | naive (s) | fused ending (s) | generic tail (s) | speed-up | "
             "generic speed-up | FLOP bound | share of bound |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp, sg = r["naive_s"] / r["head_s"], r["naive_s"] / r["generic_s"]
        lines.append(f"| {r['run']} | {r['images']} | {r['naive_s']:.0f} | {r['head_s']:.1f} | "
                     f"{r['generic_s']:.1f} | {sp:.0f}x | {sg:.0f}x | {r['bound']:.0f}x | "
                     f"{100 * sp / r['bound']:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "greedy", "resnet18"], default="all")
    ap.add_argument("--images", type=int, default=2000, help="score images of the greedy runs")
    ap.add_argument("--naive-ablations", type=int, default=16,
                    help="naive masked passes timed per greedy run (extrapolated)")
    ap.add_argument("--resnet18-images", type=int, default=500)
    ap.add_argument("--naive-filters", type=int, default=8,
                    help="resnet18 filters timed naively (plus the unablated pass)")
    ap.add_argument("--out", default=None, help="output folder (default out/bench/tail)")
    args = ap.parse_args()
    if args.part in ("all", "resnet18"):
        try:
            import torchvision  # noqa: F401
        except ImportError as exc:
            raise SystemExit("the resnet18 row needs torchvision: run with "
                             "~/.cache/carprune/venv-cuda/bin/python (after scripts/"
                             "cuda_build_check.sh), or pass --part greedy") from exc
    out = OUT / "tail" if args.out is None else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    rows = []
    if args.part in ("all", "greedy"):
        data = cifar_test().sample(args.images, seed=0)
        x, y = data.batch(slice(None))
        for net, layer, zero in GREEDY:
            print(f"== {net} {layer}", flush=True)
            rows.append(greedy_row(net, layer, zero, data, x, y, args))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("plan", "flops")}),
                  flush=True)
    if args.part in ("all", "resnet18"):
        print(f"== {' '.join(RESNET18[:2])}", flush=True)
        rows.append(resnet18_row(args))
    load1 = os.getloadavg()
    text = (f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
            f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end (this run adds up to "
            f"{torch.get_num_threads()}).\n\n" + _table(rows) + "\n\n" + "\n".join(
                f"- {r['run']}: naive at batch {r['naive_batch']}, {r['naive_timed_ablations']} "
                f"passes timed ({r['naive_timed_s']:.1f} s) and extrapolated to "
                f"{r['ablations'] + (1 if 'score' in r['run'] else 0)}; counts differing from "
                f"carprune's on those passes: {r['count_mismatch']} of {r['count_total']}"
                + (f"; same picks with the generic tail: {r['same_picks_as_generic']}"
                   if "same_picks_as_generic" in r else "") + "\n  plan: "
                + r["plan"].replace("\n", "\n  ") for r in rows) + "\n")
    print("\n" + text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"load_average": [load0, load1],
                                                  "threads": torch.get_num_threads(),
                                                  "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
