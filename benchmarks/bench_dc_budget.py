"""How much retraining Deep Compression needs to keep accuracy: the whole pretrained ResNet-20
through `deep_compress` at the defaults (prune conv 60 % / linear 90 %, 8/5-bit weights and
index differences) with several retraining budgets, hold-out accuracy after every stage.

    python benchmarks/bench_dc_budget.py --threads 1 [--budgets 0,0 20,10 200,100 1000,500]

Writes out/bench/dc_budget.md and .json; the README's Deep Compression section and
`carprune deep-compress --help` quote the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import carprune as cp
import carprune.deepcompress as dc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STAGES = ("original", "pruned", "pruned+retrained", "quantized", "quantized+finetuned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--budgets", nargs="+", default=["0,0", "20,10", "200,100", "1000,500"],
                    help="retraining iterations after pruning,of the shared values")
    ap.add_argument("--eval-n", type=int, default=2000, help="hold-out CIFAR-10 test images")
    ap.add_argument("--train-n", type=int, default=10000, help="CIFAR-10 training images")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = cp.models.load_checkpoint(cp.models.resnet_cifar(20),
                                      DATA / "models" / "resnet20-12fca82f.th")
    cifar = DATA / "cifar10-jpeg.tar.gz"
    test = cp.data.cifar10(cifar, "test").sample(args.eval_n, seed=0)
    train = cp.data.cifar10(cifar, "train").sample(args.train_n, seed=0)
    rows = []
    for budget in args.budgets:
        iters = tuple(int(v) for v in budget.split(","))
        t = time.perf_counter()
        res = dc.deep_compress(model, train, test, finetune_iters=iters, lr=args.lr, progress=False)
        rows.append({"iters": list(iters), "accuracy": res.report.accuracy,
                     "seconds": round(time.perf_counter() - t, 1),
                     "file_bytes": res.report.file_bytes,
                     "warnings": [w["message"] for w in res.report.warnings]})
        print(json.dumps(rows[-1]), flush=True)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f} %"

    md = ["| retraining iterations | " + " | ".join(STAGES) + " | .cpz bytes | seconds |",
          "|---|" + "---:|" * (len(STAGES) + 2)]
    for r in rows:
        md.append(f"| {r['iters'][0]} + {r['iters'][1]} | "
                  + " | ".join(pct(r["accuracy"].get(s)) for s in STAGES)
                  + f" | {r['file_bytes']:,} | {r['seconds']} |")
    md.append(f"\nWhole ResNet-20, Deep Compression defaults; hold-out {args.eval_n} seeded CIFAR-10 "
              f"test images; retraining SGD lr {args.lr}, batch 64, on {args.train_n} seeded "
              f"training images; {torch.get_num_threads()} CPU thread(s).")
    (args.out / "dc_budget.md").write_text("\n".join(md) + "\n")
    (args.out / "dc_budget.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
