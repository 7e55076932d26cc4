"""CAR scoring speed: carprune against the naive hook-per-filter pass and Captum's
LayerFeatureAblation, side by side in one run, with the FLOP ratio that bounds the speed-up.

    python -m pytest benchmarks/bench_score.py --benchmark-enable -s

Each baseline runs at its best batch size (measured first). Results: a table on stdout and in
out/bench/score_speed.md (and .json).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import carprune as cp

from .common import OUT, best_batch, cifar_test, flop_bound, naive_counts, resnet20, timed

LAYERS = {"layer1.0.conv1": "layer1.0.relu1", "layer2.0.conv1": "layer2.0.relu1",
          "layer3.2.conv1": "layer3.2.relu1"}
N_IMAGES = 2000
CAPTUM_ROWS = 100  # rows per Captum forward (perturbations_per_eval x batch); see _captum
ROWS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def setup():
    model = resnet20()
    data = cifar_test().sample(N_IMAGES, seed=0)
    x, y = data.batch(slice(None))
    batch, per_image = best_batch(model, x[:1000])
    print("\nfull forward, seconds per image by batch size: "
          + ", ".join(f"{b}: {1e3 * t:.3f} ms" for b, t in per_image.items()) + f" -> best {batch}")
    yield model, data, x, y, batch
    _report(batch)


def _report(batch: int) -> None:
    if not ROWS:
        return
    lines = ["| layer | filters | naive (s) | Captum (s) | carprune (s) | speed-up vs naive | "
             "vs Captum | FLOP bound | share of bound |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layer, r in ROWS.items():
        cap = r.get("captum")
        lines.append(
            f"| {layer} | {r['filters']} | {r['naive']:.2f} | {cap:.2f} | {r['carprune']:.2f} | "
            f"{r['naive'] / r['carprune']:.1f}x | {cap / r['carprune']:.1f}x | {r['bound']:.2f}x | "
            f"{100 * r['naive'] / r['carprune'] / r['bound']:.0f} % |"
            if cap is not None else
            f"| {layer} | {r['filters']} | {r['naive']:.2f} | - | {r['carprune']:.2f} | "
            f"{r['naive'] / r['carprune']:.1f}x | - | {r['bound']:.2f}x | "
            f"{100 * r['naive'] / r['carprune'] / r['bound']:.0f} % |")
    text = (f"{N_IMAGES} CIFAR-10 test images (seeded subset), ResNet-20, "
            f"{torch.get_num_threads()} threads; naive and Captum at batch {batch}.\n\n"
            + "\n".join(lines) + "\n")
    print("\n" + text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "score_speed.md").write_text(text)
    (OUT / "score_speed.json").write_text(json.dumps(ROWS, indent=2))


@pytest.mark.parametrize("layer", list(LAYERS))
def test_score_speed(benchmark, setup, layer):
    model, data, x, y, batch = setup
    bound = flop_bound(model, layer, x[:1])
    got = {}

    def run_carprune():
        got["scores"], got["t"] = timed(lambda: cp.score_layer(model, layer, data, progress=False))

    benchmark.pedantic(run_carprune, rounds=1, iterations=1)
    ours, t_ours = got["scores"], got["t"]
    filters = list(range(bound["filters"]))
    # CAR needs the unablated accuracy too: the naive pass runs it as one more forward
    ref, t_naive = timed(lambda: naive_counts(model, LAYERS[layer], [None, *filters], x, y, batch))
    assert torch.equal(ref[0], ours.base_counts)
    ref = ref[1:]
    mismatch = (ours.counts - ref).abs().sum().item() / (len(filters) * len(y))
    row = {"filters": bound["filters"], "carprune": t_ours, "naive": t_naive,
           "bound": bound["bound"], "count_mismatch": mismatch}
    with contextlib.suppress(ImportError):  # captum is an optional benchmark dependency
        row["captum"] = _captum(model, LAYERS[layer], x, y, batch)
    ROWS[layer] = row
    benchmark.extra_info.update(row)
    print(f"\n{layer}: {row}")
    assert mismatch <= 1e-3


def _captum(model, cut_module: str, x, y, batch) -> float:
    """Captum's LayerFeatureAblation with one feature per channel of the cut module's output.

    Captum selects a tensor target only for the unexpanded batch, so the forward returns each
    image's true-class logit itself; that lets perturbations_per_eval batch the ablations."""
    from captum.attr import LayerFeatureAblation

    module = dict(model.named_modules())[cut_module]
    acts = {}
    h = module.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    with torch.no_grad():
        model(x[:1])
    h.remove()
    channels = acts["a"].shape[1]
    mask = torch.arange(channels).view(1, channels, 1, 1)
    per_eval = max(1, min(channels, CAPTUM_ROWS // batch))
    labels = {}

    def true_logit(inp):
        out = model(inp)
        yb = labels["y"]
        return out.gather(1, yb.repeat(out.shape[0] // len(yb)).view(-1, 1)).squeeze(1)

    abl = LayerFeatureAblation(true_logit, module)

    def run():
        with torch.no_grad():
            for s in range(0, len(y), batch):
                labels["y"] = y[s:s + batch]
                abl.attribute(x[s:s + batch], layer_mask=mask, layer_baselines=0.0,
                              perturbations_per_eval=per_eval)

    _, t = timed(run)
    return t
