"""KSE as a whole method (`carprune.kse`): the paper's cluster-count rule, the indicator per input
map, the compressed convolution against a dense conv with centroid kernels (float64, real images
through the pretrained ResNet-20), cost counting, determinism, save/load and the command line.
References are written here independently of the implementation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import carprune as cp
from carprune import cli, kse

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR = DATA / "cifar10-jpeg.tar.gz"
RESNET20 = DATA / "models" / "resnet20-12fca82f.th"


def _rule(v: float, n: int, G: int, T: int = 0) -> int:
    """The paper's q_c written from its cases: v G < 1 -> 0; v G > G - 1 -> N; else N halved
    once per level below the top, T more times, rounded up."""
    level = math.ceil(v * G)
    if v * G < 1:
        return 0
    if v * G > G - 1:
        return n
    return -(-n // 2 ** (G - level + T))


def _indicator(weight: torch.Tensor, alpha: float, k: int = 5) -> np.ndarray:
    """KSE indicator per input map with plain loops: s_c = sum |W[:, c]|; dm_j = sum of the
    distances from kernel j to its k nearest other kernels of the map; e_c = -sum p log2 p with
    p = dm / sum dm; min-max normalise s and e; v = sqrt(s / (1 + alpha e)); min-max normalise v."""
    w = weight.detach().double().numpy()
    n, c = w.shape[:2]
    s, e = np.zeros(c), np.zeros(c)
    for ci in range(c):
        kern = w[:, ci].reshape(n, -1)
        s[ci] = np.abs(kern).sum()
        dm = np.zeros(n)
        for j in range(n):
            d = sorted(np.linalg.norm(kern[j] - kern[i]) for i in range(n) if i != j)
            dm[j] = sum(d[:k])
        p = dm / dm.sum()
        e[ci] = -sum(pj * math.log2(pj) for pj in p if pj > 0)

    def mm(a):
        return (a - a.min()) / (a.max() - a.min())

    return mm(np.sqrt(mm(s) / (1 + alpha * mm(e))))


@pytest.fixture(scope="module")
def res4(resnet20):
    return cp.kse_compress(resnet20, G=4, progress=False)


def test_cluster_counts_follow_the_papers_rule():
    # hand-computed: G = 4, N = 64 (levels [0, .25) -> 0, [.25, .5] -> 8, (.5, .75] -> 16/32, > .75 -> 64)
    v = [0.0, 0.2, 0.25, 0.3, 0.5, 0.6, 0.75, 0.76, 1.0]
    assert kse.cluster_counts(v, 64, 4) == [0, 0, 8, 16, 16, 32, 32, 64, 64]
    # G = 5, N = 10, T = 1: ceil(10 / 2^(5 - 2 + 1)) = 1, ceil(10 / 2^2) = 3, top level -> 10
    assert kse.cluster_counts([0.1, 0.3, 0.7, 0.9], 10, 5, T=1) == [0, 1, 3, 10]
    grid = np.linspace(0, 1, 241)
    for G in (2, 3, 4, 5, 6):
        for T in (0, 1, 2):
            for n in (10, 16, 64):
                assert kse.cluster_counts(grid, n, G, T) == [_rule(x, n, G, T) for x in grid]


@pytest.mark.parametrize("bad, needle", [
    (dict(G=1), "G (the number of indicator levels) must be an integer >= 2, got 1"),
    (dict(G=4.5), "got 4.5"),
    (dict(alpha=-1.0), "alpha (the entropy weight) must be a finite number >= 0, got -1.0"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(T=-1), "T (the cluster granularity) must be an integer >= 0, got -1"),
    (dict(layers=["layer9.conv1"]), "unknown layer 'layer9.conv1'; the conv layers are: conv1, "),
    (dict(layers=["linear"]), "layer 'linear' is a Linear; KSE compresses plain Conv2d layers"),
    (dict(layers=["layer1.0.conv1", "layer1.0.conv1"]), "more than once"),
])
def test_bad_settings_name_the_argument(resnet20, bad, needle):
    with pytest.raises(ValueError) as exc:
        cp.kse_compress(resnet20, progress=False, **bad)
    assert needle in str(exc.value)


def test_indicator_and_clusters_match_an_independent_computation(resnet20, res4):
    assert res4.layers == [n for n in cp.conv_layers(resnet20) if n != "conv1"]  # the stem stays dense
    for name in ("layer1.1.conv2", "layer2.0.conv1", "layer3.2.conv1"):
        conv = resnet20.get_submodule(name)
        rep = res4.layer(name)
        v = _indicator(conv.weight, 1.0)
        assert np.allclose(rep.indicator, v, rtol=1e-9, atol=1e-12)
        assert rep.clusters == [_rule(x, conv.out_channels, 4) for x in rep.indicator]
        assert rep.maps_removed == rep.clusters.count(0) >= 1
        assert max(rep.clusters) == conv.out_channels      # the top map keeps every kernel
    v2 = _indicator(resnet20.get_submodule("layer3.2.conv1").weight, 2.5)
    assert np.allclose(kse.layer_indicator(resnet20.get_submodule("layer3.2.conv1").weight, 2.5), v2)


def _layer_input(model, name, x):
    got = {}

    def keep(mod, inp, out):
        got["x"] = inp[0]

    h = model.get_submodule(name).register_forward_hook(keep)
    with torch.no_grad():
        model(x)
    h.remove()
    return got["x"]


@pytest.mark.parametrize("name", ["layer2.0.conv1", "layer3.2.conv1", "layer1.2.conv2"])
def test_compressed_conv_equals_dense_conv_with_centroid_kernels_float64(resnet20, res4, cifar_test,
                                                                         name):
    idx = np.random.default_rng(3).choice(len(cifar_test), 16, replace=False)
    x, _ = cifar_test.batch(idx)
    ref = cp.copy_model(resnet20).double().eval()
    a = _layer_input(ref, name, x.double())                    # real activations entering the layer
    conv = ref.get_submodule(name)
    mod = cp.copy_model(res4.model).double().get_submodule(name)
    assert isinstance(mod, cp.KSEConv2d)
    # every kernel replaced by its centroid, written here from the module's parts
    w = torch.zeros_like(conv.weight)
    orig = resnet20.get_submodule(name).weight.detach().double()
    clusters = res4.layer(name).clusters
    for i, c in enumerate(mod.maps.tolist()):
        for n in range(mod.out_channels):
            w[n, c] = mod.centroids[mod.assign[i, n], 0]
        q = clusters[c]
        assert mod.clusters[i] == q > 0
        members = {}
        for n in range(mod.out_channels):
            members.setdefault(int(mod.assign[i, n]), []).append(n)
        assert len(members) <= q
        for j, ns in members.items():  # a centroid is the mean of the kernels it replaced
            assert torch.allclose(mod.centroids[j, 0], orig[ns, c].mean(0), atol=1e-6)
        if q == mod.out_channels:      # a map kept whole keeps its kernels exactly
            assert torch.equal(w[:, c], orig[:, c])
    removed = [c for c, q in enumerate(clusters) if q == 0]
    assert removed and sorted(set(mod.maps.tolist()) | set(removed)) == list(range(conv.in_channels))
    with torch.no_grad():
        want = F.conv2d(a, w, None, conv.stride, conv.padding)
        got = mod(a)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        assert torch.allclose(mod.dense_weight(), w, rtol=0, atol=0)
    # the gradient of a centroid is the sum of the dense gradients of the kernels it replaced
    wd = w.detach().clone().requires_grad_(True)
    F.conv2d(a, wd, None, conv.stride, conv.padding).square().sum().backward()
    mod.zero_grad()
    mod(a).square().sum().backward()
    g = torch.zeros_like(mod.centroids)
    for i, c in enumerate(mod.maps.tolist()):
        for n in range(mod.out_channels):
            g[mod.assign[i, n], 0] += wd.grad[n, c]
    assert torch.allclose(mod.centroids.grad, g, rtol=1e-10, atol=1e-10)


def test_whole_network_equals_dense_state_dict_in_the_original_architecture(res4, cifar_test):
    idx = np.random.default_rng(4).choice(len(cifar_test), 32, replace=False)
    x, _ = cifar_test.batch(idx)
    dense = cp.models.resnet_cifar(20)
    dense.load_state_dict(res4.dense_state_dict(), strict=True)
    dense = dense.double().eval()
    net = cp.copy_model(res4.model).double().eval()
    with torch.no_grad():
        a, b = net(x.double()), dense(x.double())
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_count_cost_counts_the_kse_layer_as_documented(resnet20, res4):
    before = cp.count_cost(resnet20, (3, 32, 32))
    after = cp.count_cost(res4.model, (3, 32, 32))
    name = "layer2.0.conv1"                      # stride 2: 16 maps -> 32 filters, 16 x 16 out
    q = res4.layer(name).clusters
    kept = sum(1 for c in q if c)
    flops = 16 * 16 * (9 * sum(q) + 32 * (kept - 1))
    bits = sum(32 * math.ceil(math.log2(c)) for c in q if 1 < c < 32)
    lay = after.layer(name)
    assert (lay.kind, lay.flops, lay.params, lay.inputs) == ("kse", flops, 9 * sum(q), kept)
    assert lay.bytes == 4 * 9 * sum(q) + (bits + 7) // 8
    assert res4.layer(name).flops_after == flops and res4.layer(name).flops_before == 16 * 16 * 32 * 16 * 9
    # the stem and the linear layer are untouched; the totals add up
    assert after.layer("conv1").flops == before.layer("conv1").flops
    assert after.total_flops == sum(r.flops_after for r in res4.report) + before.layer(
        "conv1").flops + before.layer("linear").flops == res4.flops_after
    assert res4.flops_before == before.total_flops and res4.params_after == sum(
        p.numel() for p in res4.model.parameters())
    assert res4.flops_after < res4.flops_before and res4.params_after < res4.params_before


def test_deterministic_under_a_seed_and_per_layer(resnet20, res4):
    again = cp.kse_compress(resnet20, G=4, progress=False)
    sa, sb = res4.model.state_dict(), again.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = cp.kse_compress(resnet20, G=4, seed=1, progress=False).model.state_dict()
    assert any(not torch.equal(sa[k], other[k]) for k in sa if k.endswith("centroids"))
    # one layer alone is clustered exactly as in the whole-network run
    one = cp.kse_compress(resnet20, G=4, layers=["layer3.1.conv2"], progress=False)
    for k in ("centroids", "assign", "maps"):
        assert torch.equal(one.model.state_dict()[f"layer3.1.conv2.{k}"], sa[f"layer3.1.conv2.{k}"])
    assert isinstance(one.model.get_submodule("layer3.1.conv1"), torch.nn.Conv2d)


def test_save_load_round_trip_gives_equal_outputs(res4, tmp_path, cifar_test):
    res4.save(tmp_path / "r")
    back = cp.KSEResult.load(tmp_path / "r", cp.models.resnet_cifar(20))
    assert back.to_dict() == res4.to_dict()
    x, _ = cifar_test.batch(np.arange(0, 10000, 625))
    with torch.no_grad():
        assert torch.equal(back.model(x), res4.model.eval()(x))
    meta = cp.KSEResult.load(tmp_path / "r")            # without an architecture: the report only
    assert meta.model is None and meta.report == res4.report
    with pytest.raises(ValueError, match="not the same network"):
        cp.KSEResult.load(tmp_path / "r", _wider())
    doc = json.loads((tmp_path / "r" / "model" / "structure.json").read_text())
    doc["layers"]["layer1.0.conv1"]["clusters"][0] += 1
    (tmp_path / "r" / "model" / "structure.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError):
        cp.KSEResult.load(tmp_path / "r", cp.models.resnet_cifar(20))


def _wider():
    m = cp.models.resnet_cifar(20)
    m.layer3[2].conv1 = torch.nn.Conv2d(64, 32, 3, padding=1, bias=False)
    return m


def test_finetuning_trains_the_centroids_with_the_project_loop(resnet20, cifar_test):
    train = cifar_test.sample(256, seed=5)
    events = []   # callbacks: an event per compressed layer, then one per fine-tuning epoch
    rec = SimpleNamespace(on_event=events.append, should_stop=lambda: False)
    res = cp.kse_compress(resnet20, G=4, eval_data=cifar_test, eval_images=64, callbacks=rec,
                          finetune=cp.FineTune(train_data=train, iters=3, batch_size=8))
    plain = cp.kse_compress(resnet20, G=4, progress=False)
    kse = [e for e in events if e.algorithm == "kse"]
    assert [(e.step, e.total, e.data["layer"]) for e in kse] == [
        (i + 1, len(res.layers), name) for i, name in enumerate(res.layers)]
    assert events[:len(kse)] == kse and [e.algorithm for e in events[len(kse):]] == ["finetune"]
    assert events[-1].data["steps"] == 3
    assert kse[0].data["removed_maps"] == res.report[0].maps_removed
    a, b = res.model.state_dict(), plain.model.state_dict()
    assert not torch.equal(a["layer2.1.conv1.centroids"], b["layer2.1.conv1.centroids"])
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(("assign", "maps")))
    assert res.holdout_accuracy_before == pytest.approx(
        cp.evaluate.accuracy(resnet20, cifar_test, num_images=64))
    assert None not in (res.holdout_accuracy, res.finetuned_holdout_accuracy, res.finetune_seconds)
    dense = cp.models.resnet_cifar(20)
    dense.load_state_dict(res.dense_state_dict())
    x, _ = cifar_test.batch(np.arange(8))
    with torch.no_grad():
        assert torch.allclose(dense.eval()(x), res.model.eval()(x), atol=1e-4)


def _kse_args(out, *extra):
    return ["kse-compress", "--model", "resnet20", "--weights", str(RESNET20), "--out", str(out),
            "--progress", "none", *extra]


def test_cli_writes_result_and_summary(tmp_path, resnet20, capsys, monkeypatch):
    out = tmp_path / "kse"
    checks = []   # --threads auto (the default): the free cores re-checked at every layer's event
    monkeypatch.setattr(cp.threads.ThreadGovernor, "update", lambda self: checks.append(1))
    assert cli.main(_kse_args(out, "--data", str(CIFAR), "--split", "test", "--num-images", "100",
                              "--G", "5")) == 0
    assert len(checks) == 18
    res = cp.KSEResult.load(out, cp.models.resnet_cifar(20))
    ref = cp.kse_compress(resnet20, G=5, progress=False)
    assert res.report == ref.report and res.holdout_accuracy is not None
    assert json.loads((out / "run.json").read_text())["state"] == "done"
    summary = (out / "summary.md").read_text()
    assert "layer3.2.conv2" in summary and f"{res.flops_reduction:.2f}x" in summary
    assert f"{res.flops_reduction:.2f}x fewer" in capsys.readouterr().out
    # the report command tabulates it with the other whole-network runs
    assert cli.main(["report", str(out), "--out", str(tmp_path / "r"), "--progress", "none"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert (f"| {out} | KSE G=5 | {res.flops_before:,} | {res.flops_after:,} "
            f"({res.flops_after / res.flops_before:.3f}) | {res.params_before:,} | "
            f"{res.params_after:,} | {100 * res.holdout_accuracy_before:.2f} % | "
            f"{100 * res.holdout_accuracy:.2f} % | - | 100 hold-out | - |") in md


def test_cli_without_data_or_weights_says_what_is_missing(tmp_path, capsys):
    code = cli.main(["kse-compress", "--model", "lenet5", "--out", str(tmp_path / "o"),
                     "--progress", "log"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "no --weights: lenet5 keeps its random initialisation (an untrained network)" in err
    assert "an input of shape (3, 32, 32) does not fit the model" in err
    assert "without --data, give the model's input as --input-shape C,H,W" in err
    assert cli.main(["kse-compress", "--model", "lenet5", "--out", str(tmp_path / "o"),
                     "--progress", "none", "--input-shape", "1,28,28"]) == 0


@pytest.mark.parametrize("extra, needle", [
    (["--G", "1"], "G (the number of indicator levels) must be an integer >= 2, got 1"),
    (["--alpha=-1"], "alpha (the entropy weight) must be a finite number >= 0"),
    (["--layers", "layer1.0.conv9"], "unknown layer 'layer1.0.conv9'"),
    (["--finetune-iters", "5"], "--finetune-iters needs training images"),
])
def test_cli_bad_settings_exit_2_with_one_line(tmp_path, capsys, extra, needle):
    assert cli.main(_kse_args(tmp_path / "bad", *extra)) == cli.EXIT_USAGE
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("carprune kse-compress: error:") and needle in err[0], err
    assert not (tmp_path / "bad" / "result.json").exists()
