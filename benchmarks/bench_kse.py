"""KSE (Li et al., CVPR 2019) beside CAR on the same networks and images, at matched FLOPs.

    python -m benchmarks.bench_kse [--nets resnet20 resnet32] [--G 4 5] [--threads 2]

For each pretrained CIFAR ResNet (../shared/data) and each G:
- KSE on every conv but the stem (data-free): FLOPs and parameter reduction, wall time,
  hold-out accuracy without and with fine-tuning (the project's loop, `carprune.finetune`).
- CAR, whole network: `compress_global` over the first conv of every residual block (the
  convs CAR can narrow) down to the smallest KSE FLOPs of the run; for each G the model is
  taken at the first step whose FLOPs are at most KSE's, then fine-tuned with the CAR paper's
  schedule (0 for the pruned layers, 1e-3 for the layers reading them, 1e-4 elsewhere).
- CAR, one layer (ResNet-20, `--layer-pairs`): KSE on the second conv of a block alone (its
  input maps are the first conv's filters) against greedy CAR on that first conv, at matched
  whole-network FLOPs.
- References: the uncompressed network fine-tuned with either schedule (the JPEG copy of
  CIFAR-10 here gains accuracy from any fine-tuning; see README).

Hold-out: `--holdout` seeded CIFAR-10 test images; CAR scores on `--score-images` others.
Fine-tuning: `--ft-iters` iterations of batch `--ft-batch` on the training images, seed 0, the
same for every model; KSE trains every parameter at 1e-4 (`kse_compress`'s rule).
Writes out/bench/kse/results.json and kse.md (tables) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import carprune as cp
from carprune import kse, surgery

from .common import DATA, OUT, cifar_test

MODELS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}


def _model(net: str) -> torch.nn.Module:
    depth = int(net.removeprefix("resnet"))
    return cp.models.load_checkpoint(cp.models.resnet_cifar(depth), DATA / "models" / MODELS[net])


def _block_conv1(model: torch.nn.Module) -> list[str]:
    return [n for n in cp.conv_layers(model) if n.startswith("layer") and n.endswith(".conv1")]


def _prune(model, removed: dict[str, list[int]]):
    out = model
    for layer, filt in removed.items():
        if filt:
            out = surgery.prune_filters(out, layer, filt)
    return out


def _ft(model, layers, cfg, kind: str) -> float:
    t0 = time.perf_counter()
    if kind == "kse":
        kse.finetune_kse(model, cfg, progress=False)
    else:
        cp.finetune(model, layers, cfg, progress=False)
    return time.perf_counter() - t0


def _load() -> tuple[float, str]:
    la = os.getloadavg()[0]
    return la, f"load average {la:.1f} on {os.cpu_count()} cores"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else OUT / "kse"
    out.mkdir(parents=True, exist_ok=True)
    test = cifar_test()
    hold, score = test.sample(2 * args.holdout, seed=0).split(0.5, seed=0)
    train = cp.data.cifar10(DATA / "cifar10-jpeg.tar.gz", "train")
    shape = tuple(hold.image_shape)
    results = {"settings": vars(args), "nets": {}}
    path = out / "results.json"
    if path.exists() and args.resume:
        results = json.loads(path.read_text())

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    def cfg() -> cp.FineTune:
        return cp.FineTune(train_data=train, iters=args.ft_iters, batch_size=args.ft_batch, seed=0)

    for net in args.nets:
        r = results["nets"].setdefault(net, {})
        model = _model(net).eval()
        base = cp.count_cost(model, shape)
        r["base"] = {"flops": base.total_flops, "params": base.total_params,
                     "acc": cp.evaluate.accuracy(model, hold)}
        print(f"== {net}: {base.total_flops:,} FLOPs, {base.total_params:,} params, hold-out "
              f"{100 * r['base']['acc']:.2f} %", flush=True)
        convs = _block_conv1(model)
        if "ref" not in r:
            ref = {}
            for kind in ("kse", "car"):
                m = cp.copy_model(model)
                sec = _ft(m, convs, cfg(), kind)
                ref[kind] = {"acc": cp.evaluate.accuracy(m, hold), "ft_seconds": sec}
            r["ref"] = ref
            save()
        print(f"   uncompressed fine-tuned: every parameter at 1e-4 {100 * r['ref']['kse']['acc']:.2f} %,"
              f" CAR schedule {100 * r['ref']['car']['acc']:.2f} %", flush=True)
        for G in args.G:
            key = f"kse_G{G}"
            if key in r:
                continue
            la, _ = _load()
            res = cp.kse_compress(model, G=G, progress=False)
            acc = cp.evaluate.accuracy(res.model, hold)
            sec = _ft(res.model, [], cfg(), "kse")
            r[key] = {"flops": res.flops_after, "params": res.params_after,
                      "flops_reduction": res.flops_reduction, "params_reduction": res.params_reduction,
                      "flops_reduction_no_adds": base.total_flops / (
                          base.total_flops - sum(x.flops_before for x in res.report) + sum(
                              9 * sum(x.clusters) * (x.flops_before // (x.in_channels * x.out_channels * 9))
                              for x in res.report)),
                      "seconds": res.seconds, "acc": acc, "ft_acc": cp.evaluate.accuracy(res.model, hold),
                      "ft_seconds": sec, "load": la,
                      "maps_removed": sum(x.maps_removed for x in res.report),
                      "maps": sum(x.in_channels for x in res.report)}
            save()
            print(f"   KSE G={G}: {res.flops_reduction:.2f}x FLOPs, {res.params_reduction:.2f}x params in "
                  f"{res.seconds:.1f} s; hold-out {100 * acc:.2f} %, fine-tuned "
                  f"{100 * r[key]['ft_acc']:.2f} %", flush=True)
        targets = {G: r[f"kse_G{G}"]["flops"] for G in args.G}
        if "car_global" not in r:
            la, _ = _load()
            t0 = time.perf_counter()
            fps = args.filters_per_step.get(net, 8)
            # whole-network units: each conv1 here is its own unit; a round removes at most one
            # filter per unit, so `fps` filters a round across the blocks
            g = cp.compress_global(model, convs, score, flops_target=min(targets.values()) / base.total_flops,
                                   score_images=args.score_images, per_round=fps)
            r["car_global"] = {"seconds": time.perf_counter() - t0, "load": la, "filters_per_step": fps,
                               "steps": [[c.unit, c.channel, s.flops, s.params] for s in g.trajectory
                                         for c in s.removed]}
            save()
        steps = r["car_global"]["steps"]
        for G, target in targets.items():
            key = f"car_global_G{G}"
            if key in r:
                continue
            removed: dict[str, list[int]] = {}
            last = None
            for layer, f, flops, params in steps:
                removed.setdefault(layer, []).append(f)
                last = (flops, params)
                if flops <= target:
                    break
            m = _prune(model, removed)
            acc = cp.evaluate.accuracy(m, hold)
            pruned = [layer for layer, fs in removed.items() if fs]
            sec = _ft(m, pruned, cfg(), "car")
            r[key] = {"flops": last[0], "params": last[1], "flops_reduction": base.total_flops / last[0],
                      "params_reduction": base.total_params / last[1], "acc": acc,
                      "ft_acc": cp.evaluate.accuracy(m, hold), "ft_seconds": sec,
                      "filters_removed": sum(len(v) for v in removed.values()),
                      "filters": sum(model.get_submodule(c).out_channels for c in convs)}
            save()
            print(f"   CAR global at KSE G={G} FLOPs: {r[key]['flops_reduction']:.2f}x FLOPs, "
                  f"hold-out {100 * acc:.2f} %, fine-tuned {100 * r[key]['ft_acc']:.2f} %", flush=True)
        if net == "resnet20":
            car_runs: dict[str, tuple] = {}
            for kse_layer in args.layer_pairs:
                car_layer = kse_layer.removesuffix("conv2") + "conv1"
                for G in args.G:
                    key = f"pair_{kse_layer}_G{G}"
                    if key in r:
                        continue
                    t0 = time.perf_counter()
                    res = cp.kse_compress(model, G=G, layers=[kse_layer], progress=False)
                    t_kse = time.perf_counter() - t0
                    if car_layer not in car_runs:
                        t0 = time.perf_counter()
                        car_runs[car_layer] = (cp.compress_layer(model, car_layer, score, progress=False,
                                                                 score_images=args.score_images),
                                               time.perf_counter() - t0)
                    car, t_car = car_runs[car_layer]
                    st = next(s for s in car.trajectory if s.flops <= res.flops_after)
                    removed = [f for s in car.trajectory[1:st.step + 1] for f in s.removed]
                    m = surgery.prune_filters(model, car_layer, removed) if removed else model
                    r[key] = {"kse_layer": kse_layer, "car_layer": car_layer,
                              "kse_flops": res.flops_after, "kse_params": res.params_after,
                              "kse_acc": cp.evaluate.accuracy(res.model, hold), "kse_seconds": t_kse,
                              "maps_removed": res.report[0].maps_removed,
                              "car_flops": st.flops, "car_params": st.params, "car_kept": st.kept,
                              "car_acc": cp.evaluate.accuracy(m, hold), "car_seconds": t_car}
                    save()
                    print(f"   pair {kse_layer} (KSE G={G}) / {car_layer} (CAR): acc "
                          f"{100 * r[key]['kse_acc']:.2f} % / {100 * r[key]['car_acc']:.2f} % at "
                          f"{res.flops_after:,} / {st.flops:,} FLOPs", flush=True)
    (out / "kse.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    rows = ["| net | method | FLOPs | params | FLOPs reduction | params reduction | hold-out | "
            "fine-tuned | compression time (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for net, r in results["nets"].items():
        b = r["base"]
        rows.append(f"| {net} | original | {b['flops']:,} | {b['params']:,} | 1.00x | 1.00x | "
                    f"{100 * b['acc']:.2f} % | {100 * r['ref']['kse']['acc']:.2f} % / "
                    f"{100 * r['ref']['car']['acc']:.2f} % | |")
        for key in sorted(k for k in r if k.startswith("kse_G")):
            G = key.removeprefix("kse_G")
            for name, k, sec in ((f"KSE G={G}", key, r[key]["seconds"]),
                                 (f"CAR global at KSE G={G} FLOPs", f"car_global_G{G}",
                                  r.get("car_global", {}).get("seconds"))):
                if k not in r:
                    continue
                x = r[k]
                rows.append(f"| {net} | {name} | {x['flops']:,} | {x['params']:,} | "
                            f"{x['flops_reduction']:.2f}x | {x['params_reduction']:.2f}x | "
                            f"{100 * x['acc']:.2f} % | {100 * x['ft_acc']:.2f} % | "
                            f"{'' if sec is None else f'{sec:.1f}'} |")
    pairs = [(net, k, v) for net, r in results["nets"].items() for k, v in r.items()
             if k.startswith("pair_")]
    if pairs:
        rows += ["", "| net | KSE layer (G) | CAR layer | KSE FLOPs | CAR FLOPs | KSE hold-out | "
                 "CAR hold-out | KSE time (s) | CAR time (s) |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for net, k, v in pairs:
            rows.append(f"| {net} | {v['kse_layer']} ({k.rsplit('_G', 1)[1]}) | {v['car_layer']} "
                        f"(kept {v['car_kept']}) | {v['kse_flops']:,} | {v['car_flops']:,} | "
                        f"{100 * v['kse_acc']:.2f} % | {100 * v['car_acc']:.2f} % | "
                        f"{v['kse_seconds']:.1f} | {v['car_seconds']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="*", default=["resnet20", "resnet32"], choices=list(MODELS))
    ap.add_argument("--G", nargs="*", type=int, default=[4, 5])
    ap.add_argument("--holdout", type=int, default=2000)
    ap.add_argument("--score-images", type=int, default=500)
    ap.add_argument("--ft-iters", type=int, default=300)
    ap.add_argument("--ft-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--filters-per-step", type=json.loads, default={"resnet20": 16, "resnet32": 32},
                    help='JSON: filters removed per global CAR step, per net')
    ap.add_argument("--layer-pairs", nargs="*",
                    default=["layer1.2.conv2", "layer2.2.conv2", "layer3.2.conv2"])
    ap.add_argument("--resume", action="store_true", help="keep finished parts of results.json")
    ap.add_argument("--out", default=None)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
