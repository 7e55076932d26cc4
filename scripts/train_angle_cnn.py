"""Train (seeded) and cache the rotated-MNIST angle regressor; print its hold-out errors.

    python scripts/train_angle_cnn.py [--data ../shared/data/mnist_5k.npz]

Each of the 5,000 digits is rotated by its own seeded angle in [-60, 60] degrees
(`carprune.data.rotated_mnist5k`); `AngleCNN` is trained on the 4,000 'train' digits and
evaluated on the 1,000 'test' digits. The model is cached under carprune's cache directory
(``$CARPRUNE_CACHE`` or ``~/.cache/carprune``), never in the repository;
`carprune.models.pretrained_angle_cnn()` reuses it.
"""

import argparse

import torch

import carprune as cp
from carprune.callbacks import Event


class _EpochLines:
    """Prints a line per training epoch (only when the model is not cached yet)."""

    def on_event(self, event: Event) -> None:
        print(event.message, flush=True)

    def should_stop(self) -> bool:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mnist_5k.npz")
    args = ap.parse_args()
    model = cp.models.pretrained_angle_cnn(args.data, callbacks=_EpochLines())
    test = cp.data.rotated_mnist5k(args.data, "test")
    x, y = test.batch(slice(None))
    with torch.no_grad():
        err = model(x)[:, 0] - y
    print(f"AngleCNN on {len(test)} held-out rotated digits: mean absolute error "
          f"{err.abs().mean().item():.2f} deg, RMSE {err.square().mean().sqrt().item():.2f} deg "
          f"(targets: std {y.std().item():.2f} deg)")


if __name__ == "__main__":
    main()
