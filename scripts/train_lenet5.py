"""Train (seeded) and cache LeNet-5 on ../shared/data/mnist_5k.npz; print its test accuracy.

    python scripts/train_lenet5.py [--data ../shared/data/mnist_5k.npz]

The model is cached under carprune's cache directory (``$CARPRUNE_CACHE`` or
``~/.cache/carprune``), never in the repository; `carprune.models.pretrained_lenet5()` reuses it.
"""

import argparse

import torch

import carprune as cp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mnist_5k.npz")
    args = ap.parse_args()
    model = cp.models.pretrained_lenet5(args.data, progress=True)
    test = cp.data.mnist5k(args.data, "test")
    x, y = test.batch(slice(None))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    print(f"LeNet-5 test accuracy on {len(test)} held-out digits: {100 * acc:.2f} %")


if __name__ == "__main__":
    main()
