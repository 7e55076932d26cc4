"""Deep Compression on real weights and data, checked against independent references: a
brute-force numpy k-means, a hand-built canonical Huffman decoder, a hand-written frame parser
of the .cpz layout, and per-cluster gradient sums computed outside the library."""

from __future__ import annotations

import copy
import heapq
import json
import math
import os
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import carprune as cp
import carprune.deepcompress as dc
from carprune.deepcompress.fileformat import FORMAT_VERSION, MAGIC
from carprune.deepcompress.pipeline import TrainConfig, retrain_pruned
from carprune.deepcompress.quantize import linear_init
from carprune.deepcompress.sparse import decode_relative, encode_relative

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL = ["conv1", "layer3.2.conv1", "linear"]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small CPU models train several times faster on one thread when cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def frames(data: bytes) -> list[tuple[str, int, int, int]]:
    """Independent parser of the documented layout: (name, frame start, payload start, end)."""
    assert data[:4] == MAGIC and struct.unpack_from("<H", data, 4)[0] == FORMAT_VERSION
    out, pos = [], 6
    while pos < len(data):
        (n,) = struct.unpack_from("<H", data, pos)
        name = data[pos + 2 : pos + 2 + n].decode()
        (size,) = struct.unpack_from("<Q", data, pos + 2 + n)
        start = pos + 2 + n + 8
        out.append((name, pos, start, start + size + 4))
        pos = start + size + 4
    assert pos == len(data)
    return out


def numpy_kmeans(v: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Lloyd: argmin distance, mean per cluster, empty clusters stay put."""
    c = c.copy()
    labels = None
    for _ in range(1000):
        new = np.abs(v[:, None] - c[None, :]).argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(c.size):
            if (labels == j).any():
                c[j] = v[labels == j].mean()
    return c, labels


def huffman_cost(freq: list[int]) -> int:
    """Optimal total code length by the classic heap construction (independent of bitarray)."""
    if len(freq) == 1:
        return freq[0]
    heap = list(freq)
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def canonical_decode_py(table: dc.HuffmanTable, bits: str) -> list[int]:
    """Canonical Huffman decoding from first principles (code = previous + 1, shifted)."""
    codes, code, i = {}, 0, 0
    for length, count in enumerate(table.counts):
        for _ in range(count):
            codes[format(code, f"0{length}b")] = table.symbols[i]
            code, i = code + 1, i + 1
        code <<= 1
    out, cur = [], ""
    for b in bits:
        cur += b
        if cur in codes:
            out.append(codes[cur])
            cur = ""
    assert cur == ""
    return out


def shrink_out_channels(model: nn.Module, keep: int) -> nn.Module:
    """A CAR-like physical shrink of layer1.0.conv1 to its first ``keep`` filters."""
    blk = model.layer1[0]
    c1, bn, c2 = blk.conv1, blk.bn1, blk.conv2
    new1 = nn.Conv2d(c1.in_channels, keep, 3, padding=1, bias=False)
    new1.weight.data = c1.weight.data[:keep].clone()
    newbn = nn.BatchNorm2d(keep)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(newbn, name).data = getattr(bn, name).data[:keep].clone()
    new2 = nn.Conv2d(keep, c2.out_channels, 3, padding=1, bias=False)
    new2.weight.data = c2.weight.data[:, :keep].clone()
    blk.conv1, blk.bn1, blk.conv2 = new1, newbn, new2
    return model


@pytest.fixture(scope="module")
def cifar_small(cifar_test):
    """Two disjoint seeded samples of the CIFAR-10 test set: 256 to train on, 256 to score."""
    s = cifar_test.sample(512, seed=1)
    return s.subset(np.arange(256)), s.subset(np.arange(256, 512))


@pytest.fixture(scope="module")
def r20_dc(resnet20):
    """ResNet-20 compressed without fine-tuning (all layers, the issue's default settings)."""
    return dc.deep_compress(resnet20, prune={"conv": 0.6, "linear": 0.9})


# ----------------------------------------------------------------------------- components


def test_kmeans_matches_numpy_reference(resnet20):
    w = resnet20.layer2[0].conv1.weight.detach().double().numpy().ravel()
    v = w[np.abs(w) > np.quantile(np.abs(w), 0.6)]
    init = linear_init(v, 32)
    assert init[0] == v.min() and init[-1] == v.max()
    np.testing.assert_allclose(np.diff(init), (v.max() - v.min()) / 31)
    c, labels = dc.kmeans_1d(v, 32)
    c_ref, labels_ref = numpy_kmeans(v, init)
    np.testing.assert_allclose(c, c_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(labels, labels_ref)


def test_huffman_is_optimal_and_decodes_like_a_reference(resnet20):
    # real symbols: 5-bit cluster indices of the pretrained layer3.0.conv2 weights
    w = resnet20.layer3[0].conv2.weight.detach().double().numpy().ravel()
    _, sym = dc.kmeans_1d(w, 32)
    table, bits = dc.huffman_encode(sym)
    freq = Counter(sym.tolist())
    assert len(bits) == huffman_cost(list(freq.values()))
    assert canonical_decode_py(table, bits.to01()) == sym.tolist()
    np.testing.assert_array_equal(dc.huffman_decode(table, bits, sym.size), sym)
    again = dc.HuffmanTable.from_bytes(table.to_bytes(), 33)
    assert again == table
    with pytest.raises(ValueError, match="ends early"):
        dc.huffman_decode(table, bits[:-3], sym.size)
    with pytest.raises(ValueError, match="more than"):
        dc.huffman_decode(table, bits, sym.size - 1)
    one_table, one_bits = dc.huffman_encode(np.full(7, 4))
    np.testing.assert_array_equal(dc.huffman_decode(one_table, one_bits, 7), np.full(7, 4))


def test_relative_indices_insert_filler_zeros():
    # Han et al. figure 2 style, 3-bit differences (gaps 1..8): a gap of 11 needs one filler
    diff, sym = encode_relative(np.array([1, 4, 15]), np.array([5, 6, 7]), 3, filler=99)
    np.testing.assert_array_equal(diff, [1, 2, 7, 2])
    np.testing.assert_array_equal(sym, [5, 6, 99, 7])
    pos, lab = decode_relative(diff, sym, 99, 16)
    np.testing.assert_array_equal(pos, [1, 4, 15])
    np.testing.assert_array_equal(lab, [5, 6, 7])
    # a gap of exactly 2**bits needs no filler, a gap of 2**bits + 1 needs one
    diff, sym = encode_relative(np.array([7, 16]), np.array([0, 1]), 3, filler=9)
    np.testing.assert_array_equal(diff, [7, 7, 0])
    np.testing.assert_array_equal(sym, [0, 9, 1])
    with pytest.raises(ValueError, match="outside"):
        decode_relative(diff, sym, 9, 16)


def test_magnitude_pruning_sparsity_and_quality(resnet20):
    w = resnet20.layer3[1].conv1.weight.detach()
    mask = dc.magnitude_mask(w, dc.PruneSpec(sparsity=0.7))
    assert int((~mask).sum()) == round(0.7 * w.numel())
    assert w[mask].abs().min() >= w[~mask].abs().max()
    q = dc.magnitude_mask(w, dc.PruneSpec(quality=0.8))
    a = w.double().numpy()
    np.testing.assert_array_equal(q.numpy(), np.abs(a) > 0.8 * a.std())


# ----------------------------------------------------------------------------- round trip


def test_round_trip_resnet20_is_bit_exact(resnet20, r20_dc, tmp_path):
    path = tmp_path / "r20.cpz"
    n = dc.save_compressed(r20_dc, path)
    assert n == os.path.getsize(path)
    t = time.perf_counter()
    loaded = dc.load_compressed(path, cp.models.resnet_cifar(20))
    assert time.perf_counter() - t < 1.0
    ref, got = r20_dc.model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].dtype == got[k].dtype
        assert torch.equal(
            ref[k].reshape(-1).view(torch.uint8), got[k].reshape(-1).view(torch.uint8)
        ), k
    # independent check of the quantised values: each surviving weight is the codebook entry
    # nearest to its original value, each pruned weight is exactly +0.0
    for name, mask in r20_dc.masks.items():
        orig = resnet20.get_submodule(name).weight.detach().double()
        dec = got[f"{name}.weight"]
        cb = r20_dc.codebooks[name].double()
        nearest = cb[(orig[mask][:, None] - cb[None, :]).abs().argmin(1)]
        assert torch.equal(dec[mask].double(), nearest), name
        assert torch.equal(dec[~mask], torch.zeros_like(dec[~mask]))
        assert not torch.signbit(dec[~mask]).any()
        assert int(mask.sum()) == r20_dc.report.layer(name).nonzeros
    # the rest (BatchNorm, linear bias) is stored as is
    for k in ref:
        if "bn" in k or k == "linear.bias":
            assert torch.equal(got[k], resnet20.state_dict()[k]), k


def test_size_accounting_equals_bytes_written(r20_dc, tmp_path):
    path = tmp_path / "r20.cpz"
    r20_dc.save(path)
    data = path.read_bytes()
    rep = r20_dc.report
    assert rep.file_bytes == len(data)
    fr = {name: (f0, p0, end) for name, f0, p0, end in frames(data)}
    payload = {name: end - 4 - p0 for name, (_, p0, end) in fr.items()}
    for r in rep.layers:
        mine = {k: v for k, v in payload.items() if k.startswith(r.name + "/")}
        assert len(mine) == 5
        assert r.bytes_after == sum(mine.values())
        assert payload[f"{r.name}/weights"] == math.ceil(r.weight_bits / 8)
        assert payload[f"{r.name}/indices"] == math.ceil(r.index_code_bits / 8)
        assert payload[f"{r.name}/codebook"] * 8 == r.codebook_bits == 32 * 2**r.bits
        tables = payload[f"{r.name}/weights.huffman"] + payload[f"{r.name}/indices.huffman"]
        assert r.huffman_table_bits == 8 * tables
        assert r.bytes_before == 4 * r.params
        assert r.entries >= r.nonzeros
    assert payload["rest"] == rep.rest_bytes
    assert rep.layers_bytes_after + rep.rest_bytes + rep.container_bytes == len(data)
    assert rep.model_bytes_before == sum(
        t.numel() * t.element_size() for t in r20_dc.model.state_dict().values()
    )
    assert rep.ratio == pytest.approx(rep.model_bytes_before / len(data))
    # JSON round trip of the report
    rep.save(tmp_path / "report.json")
    assert dc.DeepCompressionReport.load(tmp_path / "report.json") == rep
    assert "layer3.2.conv1" in rep.to_markdown()


def test_fillers_round_trip_with_narrow_indices(resnet20, tmp_path):
    """2-bit differences on a 90 %-sparse layer force many filler zeros."""
    out = dc.deep_compress(resnet20, layers=["layer3.2.conv1"], prune=0.9, bits=4, index_bits=2)
    r = out.report.layer("layer3.2.conv1")
    assert r.fillers > 1000 and r.entries == r.nonzeros + r.fillers
    assert r.weight_fixed_bits == r.entries * 5  # 16 clusters + the filler symbol
    dc.save_compressed(out, tmp_path / "f.cpz")
    loaded = dc.load_compressed(tmp_path / "f.cpz", cp.models.resnet_cifar(20))
    w = loaded.layer3[2].conv1.weight
    assert torch.equal(w, out.model.layer3[2].conv1.weight)
    assert int((w != 0).sum()) == r.nonzeros and w.unique().numel() <= 17


def test_small_layer_gets_no_more_clusters_than_weights(resnet20, tmp_path):
    """The stem (432 weights, 43 kept) asked for 8 bits gets 5: 32 shared values <= 43 weights,
    so the codebook no longer outweighs the layer; it still decodes bit for bit."""
    out = dc.deep_compress(resnet20, layers=["conv1"], prune=0.9, bits=8)
    r = out.report.layer("conv1")
    assert r.nonzeros == 43 and r.bits == 5 and r.codebook_bits == 32 * 32
    assert r.bytes_after < r.bytes_before
    dc.save_compressed(out, tmp_path / "s.cpz")
    w = dc.load_compressed(tmp_path / "s.cpz", cp.models.resnet_cifar(20)).conv1.weight
    assert torch.equal(w, out.model.conv1.weight) and w[w != 0].unique().numel() <= 32


# ----------------------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def small_file(resnet20, tmp_path_factory):
    out = dc.deep_compress(resnet20, layers=SMALL)
    path = tmp_path_factory.mktemp("cpz") / "small.cpz"
    out.save(path)
    return path.read_bytes()


def test_every_altered_section_is_named(small_file, tmp_path):
    fr = frames(small_file)
    assert [f[0] for f in fr][:2] == ["header", "conv1/codebook"] and fr[-1][0] == "rest"
    assert len(fr) == 2 + 5 * len(SMALL)
    path = tmp_path / "bad.cpz"
    for name, f0, p0, end in fr:
        targets = {"name": f0 + 2, "payload": (p0 + end - 4) // 2, "crc": end - 1}
        for where, at in targets.items():
            bad = bytearray(small_file)
            bad[at] ^= 0x10
            path.write_bytes(bytes(bad))
            with pytest.raises(dc.CorruptFileError) as e:
                dc.load_compressed(path, cp.models.resnet_cifar(20))
            assert e.value.section == name, (name, where, str(e.value))
            assert repr(name) in str(e.value)


def test_truncated_file_is_named(small_file, tmp_path):
    path = tmp_path / "cut.cpz"
    fr = frames(small_file)
    for name, f0, p0, end in fr:
        for cut in (f0, p0 - 3, (p0 + end) // 2, end - 1):
            path.write_bytes(small_file[:cut])
            with pytest.raises(dc.CorruptFileError) as e:
                dc.read_compressed(path)
            assert e.value.section == name, (name, cut, str(e.value))
    path.write_bytes(small_file + b"\0")
    with pytest.raises(dc.CorruptFileError, match="unexpected bytes"):
        dc.read_compressed(path)
    path.write_bytes(b"PK" + small_file[2:])
    with pytest.raises(dc.CorruptFileError, match="preamble"):
        dc.read_compressed(path)


def test_failed_save_leaves_old_file(r20_dc, tmp_path, monkeypatch):
    path = tmp_path / "net.cpz"
    path.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        dc.save_compressed(r20_dc, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["net.cpz"]


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_retraining_holds_pruned_weights_at_zero(resnet20, cifar_small, optimizer):
    train, _ = cifar_small
    m = copy.deepcopy(resnet20)
    masks = {}
    for n in SMALL:
        w = m.get_submodule(n).weight
        masks[n] = dc.magnitude_mask(w, dc.PruneSpec(sparsity=0.7))
        with torch.no_grad():
            w.mul_(masks[n])
    before = {n: m.get_submodule(n).weight.detach().clone() for n in SMALL}
    cfg = TrainConfig(lr=0.05, optimizer=optimizer, weight_decay=1e-2, batch_size=32)
    retrain_pruned(m, masks, train, 3, cfg)
    for n, mask in masks.items():
        w = m.get_submodule(n).weight.detach()
        assert (w[~mask] == 0).all(), n
        assert (w[mask] != before[n][mask]).float().mean() > 0.5, n  # survivors did train
    # scope "selected": BatchNorm and unselected layers are untouched
    assert torch.equal(m.layer1[0].bn1.weight, resnet20.layer1[0].bn1.weight)
    assert torch.equal(m.layer2[1].conv2.weight, resnet20.layer2[1].conv2.weight)


def test_pruned_weights_stay_zero_through_finetuning(resnet20, cifar_small):
    train, test = cifar_small
    out = dc.deep_compress(
        resnet20,
        train,
        test,
        layers=SMALL,
        prune={"conv": 0.7, "linear": 0.9},
        bits={"conv": 4, "linear": 3},
        finetune_iters=(4, 4),
        lr=0.02,
        weight_decay=1e-3,
        batch_size=32,
    )
    base = dc.deep_compress(
        resnet20, layers=SMALL, prune={"conv": 0.7, "linear": 0.9}, bits={"conv": 4, "linear": 3}
    )
    for name, mask in out.masks.items():
        w = out.model.get_submodule(name).weight.detach()
        assert torch.equal(mask, base.masks[name])
        assert (w[~mask] == 0).all(), name
        cb = out.codebooks[name]
        # every surviving weight is a shared value; fine-tuning moved the shared values
        assert torch.isin(w[mask], cb).all()
        assert not torch.equal(cb, base.codebooks[name]), name
    assert set(out.report.accuracy) == {
        "original",
        "pruned",
        "pruned+retrained",
        "quantized",
        "quantized+finetuned",
    }
    assert all(0.0 <= a <= 1.0 for a in out.report.accuracy.values())
    # the untouched layers are bit for bit the originals
    assert torch.equal(out.model.layer2[1].conv2.weight, resnet20.layer2[1].conv2.weight)


def test_one_finetune_step_sums_cluster_gradients(resnet20, cifar_small):
    train, _ = cifar_small
    # a DataLoader is read through its dataset (its own batch size and order do not matter):
    # with batch_size 32 over 32 images, the one step sees all of them
    loader = DataLoader(train.subset(np.arange(32)), batch_size=5, shuffle=True)
    kw = dict(layers=["layer3.2.conv1", "linear"], prune=0.5, bits={"conv": 4, "linear": 3})
    before = dc.deep_compress(resnet20, **kw)
    after = dc.deep_compress(resnet20, loader, finetune_iters=(0, 1), lr=0.5, momentum=0.0,
                             batch_size=32, **kw)
    # reference gradient on the quantised model, computed outside the library
    m = before.model
    m.eval()
    x, y = train.batch(np.arange(32))
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    for name in ["layer3.2.conv1", "linear"]:
        w = m.get_submodule(name).weight
        mask = before.masks[name]
        cb = before.codebooks[name].double().numpy()
        labels = np.abs(w.detach()[mask].double().numpy()[:, None] - cb[None, :]).argmin(1)
        g = np.bincount(labels, weights=w.grad[mask].double().numpy(), minlength=cb.size)
        np.testing.assert_allclose(
            after.codebooks[name].numpy(), cb - 0.5 * g, rtol=1e-5, atol=1e-7
        )
        assert np.abs(g).max() > 0


def test_lenet5_end_to_end(lenet, mnist_test, tmp_path):
    train = cp.data.mnist5k(DATA / "mnist_5k.npz", "train").sample(512, seed=0)
    test = mnist_test.sample(300, seed=0)
    out = dc.deep_compress(lenet, train, test, finetune_iters=(20, 10), lr=0.01)
    acc = out.report.accuracy
    assert acc["original"] > 0.9
    assert acc["quantized+finetuned"] > acc["original"] - 0.05
    assert out.report.ratio > 10  # 431k float32 parameters in a file of a few dozen KB
    out.save(tmp_path / "lenet.cpz")
    loaded = dc.load_compressed(tmp_path / "lenet.cpz", cp.models.lenet5)
    x, _ = test.batch(np.arange(64))
    with torch.no_grad():
        assert torch.equal(loaded(x), out.model(x))


# ----------------------------------------------------------------------------- shrunk models


def test_single_layer_of_a_shrunk_model(resnet20, tmp_path):
    shrunk = shrink_out_channels(copy.deepcopy(resnet20), 10)
    out = dc.deep_compress(shrunk, layers="layer1.0.conv1", bits=6)
    assert [r.name for r in out.report.layers] == ["layer1.0.conv1"]
    assert out.report.layers[0].shape == [10, 16, 3, 3]
    path = tmp_path / "s.cpz"
    out.save(path)
    loaded = dc.load_compressed(path, shrink_out_channels(cp.models.resnet_cifar(20), 10))
    assert torch.equal(loaded.layer1[0].conv1.weight, out.model.layer1[0].conv1.weight)
    assert torch.equal(loaded.layer1[0].conv2.weight, shrunk.layer1[0].conv2.weight)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight has shape \(16, 16, 3, 3\)"):
        dc.load_compressed(path, cp.models.resnet_cifar(20))
    with pytest.raises(ValueError, match="missing in file"):
        dc.load_compressed(path, cp.models.lenet5())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["conv9"]}, "unknown layer 'conv9' in layers="),
        ({"bits": {"layer9.conv1": 4}}, "unknown layer 'layer9.conv1' in bits="),
        ({"layers": ["conv1"], "bits": {"linear": 4, "layer1.0.conv1": 4}}, "not among the"),
        ({"bits": 0}, "bits must be in 1..16, got 0"),
        ({"bits": {"conv": 17}}, "bits must be in 1..16, got 17"),
        ({"index_bits": {"linear": 0}}, "index_bits.*1..16, got 0"),
        ({"prune": {"conv": 1.0}}, r"sparsity must be in \[0, 1\), got 1.0"),
        ({"prune": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"prune": {"conv": {"quality": -1}}}, "quality factor"),
        ({"finetune_iters": 3}, "needs train_data"),
        ({"finetune_iters": (1, -1)}, "finetune_iters"),
        ({"optimizer": "lbfgs"}, "optimizer"),
    ],
)
def test_bad_arguments_are_named(resnet20, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dc.deep_compress(resnet20, **kwargs)


# ----------------------------------------------------------------------------- progress, warnings


LENET_LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def _runs(calls):
    """Consecutive calls of one phase grouped: [(phase, [(done, total, info), ...]), ...]."""
    runs: list = []
    for phase, done, total, info in calls:
        if not runs or runs[-1][0] != phase:
            runs.append((phase, []))
        runs[-1][1].append((done, total, dict(info)))
    return runs


def test_progress_reports_every_phase(lenet, mnist_test, capsys):
    train = cp.data.mnist5k(DATA / "mnist_5k.npz", "train").sample(256, seed=0)
    test = mnist_test.sample(200, seed=0)
    calls, events = [], []

    class Events:
        def on_event(self, e):
            events.append(e)

        def should_stop(self):
            return False

    capsys.readouterr()
    out = dc.deep_compress(lenet, train, test, finetune_iters=(6, 4), lr=0.01, kmeans_iters=20,
                           warn_drop=None, on_progress=lambda *a: calls.append(a),
                           callbacks=Events())
    assert capsys.readouterr() == ("", "")    # the callbacks report; the algorithm prints nothing
    # callbacks: an event per accuracy measured and per training epoch (256 images, batches of
    # 64: 4 steps an epoch, so 6 retraining steps are two epochs, 4 tuning steps one)
    assert [(e.data["phase"], e.step) for e in events] == [
        ("evaluate", 1), ("evaluate", 2), ("retrain", 1), ("retrain", 2), ("evaluate", 3),
        ("evaluate", 4), ("fine-tune shared values", 1), ("evaluate", 5)]
    assert all(e.algorithm == "deep-compress" for e in events)
    assert {e.data["stage"]: e.data["accuracy"] for e in events if e.data["phase"] == "evaluate"} \
        == out.report.accuracy
    runs = _runs(calls)
    assert [p for p, _ in runs] == ["evaluate", "prune", "evaluate", "retrain", "evaluate",
                                    "quantise", "evaluate", "fine-tune shared values",
                                    "evaluate", "encode"]
    for phase, steps in runs:
        dones = [d for d, _, _ in steps]
        assert dones == sorted(dones) and dones[-1] == steps[-1][1], (phase, steps)
        assert all(tot == steps[0][1] for _, tot, _ in steps)
    by = dict(runs)
    assert [d for d, _, _ in by["retrain"]] == list(range(7))
    assert [d for d, _, _ in by["fine-tune shared values"]] == list(range(5))
    assert all(math.isfinite(i["loss"]) for d, _, i in by["retrain"] if d)
    assert [i["layer"] for _, _, i in by["prune"][:-1]] == LENET_LAYERS
    assert {i["layer"]: i["bits"] for _, _, i in by["quantise"][:-1]} == \
        {r.name: r.bits for r in out.report.layers}
    evals = {i["stage"]: i["accuracy"] for p, s in runs if p == "evaluate" for _, _, i in s
             if "accuracy" in i}
    assert evals == out.report.accuracy
    # the retraining saw exactly the reported number of steps: the loss it reports is a running
    # mean of real cross-entropy values (positive, finite)
    assert 0 < by["fine-tune shared values"][-1][2]["loss"] < 10


def test_accuracy_drop_is_warned_and_recorded(lenet, mnist_test, tmp_path):
    import logging

    test = mnist_test.sample(300, seed=0)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("carprune")
    logger.addHandler(handler)
    try:
        out = dc.deep_compress(lenet, None, test, prune={"conv": 0.9, "linear": 0.99},
                               kmeans_iters=20)
    finally:
        logger.removeHandler(handler)
    acc = out.report.accuracy
    # independent: the original network with the same weights zeroed, evaluated by hand
    ref = copy.deepcopy(lenet)
    with torch.no_grad():
        for name, mask in out.masks.items():
            ref.get_submodule(name).weight.mul_(mask)
    x, y = test.batch(slice(None))
    with torch.no_grad():
        hand = float((ref.eval()(x).argmax(1) == y).double().mean())
    assert acc["pruned"] == pytest.approx(hand, abs=1e-12)
    assert acc["original"] - acc["pruned"] > 0.02
    w = out.report.warnings
    assert [v["phase"] for v in w][0] == "pruning (no retraining)"
    assert w[0]["drop"] == pytest.approx(acc["original"] - hand, abs=1e-12)
    assert any(r.levelno == logging.WARNING and "pruning (no retraining)" in r.getMessage()
               for r in records)
    assert out.report.config["warn_drop"] == 0.02 and out.report.eval_images == 300
    assert "WARNING: accuracy fell" in out.report.to_markdown()
    out.report.save(tmp_path / "r.json")
    assert dc.DeepCompressionReport.load(tmp_path / "r.json").warnings == w
    # a threshold above the drop, or none, warns nothing
    drop = acc["original"] - min(v for v in acc.values() if v is not None)
    calm = dc.deep_compress(lenet, None, test, prune={"conv": 0.9, "linear": 0.99},
                            kmeans_iters=20, warn_drop=drop + 0.01)
    assert calm.report.warnings == []
    assert dc.deep_compress(lenet, None, None, kmeans_iters=5,
                            warn_drop=None).report.warnings == []
    with pytest.raises(ValueError, match=r"warn_drop .* got 2"):
        dc.deep_compress(lenet, warn_drop=2)


def test_markdown_columns_state_their_units(r20_dc):
    md = r20_dc.report.to_markdown().splitlines()
    head = [c.strip() for c in md[0].strip("|").split("|")]
    assert head == ["layer", "shape", "params", "nonzero", "code width (bits, weight/index)",
                    "weights (bits)", "indices (bits)", "codebook (bits)", "Huffman tables (bits)",
                    "dense (bytes)", "before Huffman (bytes)", "after (bytes)", "ratio"]
    enc = {e.name: e for e in r20_dc.compressed.layers}
    rows = md[2:2 + len(r20_dc.report.layers)]
    for line, r in zip(rows, r20_dc.report.layers, strict=True):
        cells = [c.strip().replace(",", "") for c in line.strip("|").split("|")]
        e = enc[cells[0]]
        # bits columns hold stream lengths in bits, bytes columns sizes in bytes
        assert [int(c) for c in cells[5:9]] == [len(e.weight_stream), len(e.index_stream),
                                                32 * e.codebook.size, r.huffman_table_bits]
        assert int(cells[9]) == 4 * e.numel          # float32: 4 bytes per dense weight
        assert int(cells[11]) == sum(len(p) for _, p in e.sections())


def test_cli_shows_phases_in_logs_and_bars(lenet, mnist_test, tmp_path, capsys):
    from carprune import cli

    npz = tmp_path / "mnist.npz"
    tr = cp.data.mnist5k(DATA / "mnist_5k.npz", "train")
    np.savez(npz, x_train=tr.images[..., 0], y_train=tr.labels, x_test=mnist_test.images[..., 0],
             y_test=mnist_test.labels)
    weights = tmp_path / "lenet.pt"
    torch.save(lenet.state_dict(), weights)
    args = ["deep-compress", "--model", "lenet5", "--weights", str(weights), "--data", str(npz),
            "--split", "test", "--mean", "0", "--std", "1", "--num-images", "200",
            "--train-split", "train", "--finetune-iters", "5,3", "--kmeans-iters", "10",
            "--threads", "1", "--log-interval", "0"]
    capsys.readouterr()
    assert cli.main([*args, "--out", str(tmp_path / "log"), "--progress", "log"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    for line in ("deep compression: prune (4 steps)", "deep compression: retrain (5 steps)",
                 "deep compression: retrain done: 5/5", "deep compression: quantise (4 steps)",
                 "deep compression: fine-tune shared values done: 3/3",
                 "deep compression: encode done: 5/5"):
        assert line in err, line
    rep = json.loads((tmp_path / "log" / "report.json").read_text())
    for stage, acc in rep["accuracy"].items():
        assert f"stage {stage}, accuracy {100 * acc:.2f} %" in err
    assert cli.main([*args, "--out", str(tmp_path / "bar"), "--progress", "bar"]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "retrain" in err and "fine-tune shared values" in err


# ----------------------------------------------------------------------------- README route


def test_readme_route_loads_a_car_pruned_cpz(resnet20, cifar_test, tmp_path):
    """README, Deep Compression: the .cpz of a CAR-pruned network records the filters each
    layer keeps, so it loads from the original architecture alone (or into the pruned one)."""
    layer = "layer3.2.conv1"
    score, hold = cifar_test.sample(400, seed=2).split(0.5, seed=0)
    res = cp.compress_layer(resnet20, layer, score, eval_data=hold, keep=60, progress=False)
    assert len(res.removed) == 4
    res.save(tmp_path / "l3")
    out = cp.deep_compress(res.model, layers=[layer, "layer3.2.conv2"], finetune_iters=0)
    cp.save_compressed(out, tmp_path / "net.cpz")
    x, _ = hold.batch(np.arange(64))
    with torch.no_grad():
        want = out.model.eval()(x)
    # the README's route: the original architecture
    fresh = cp.models.resnet_cifar(20)
    net = cp.load_compressed(tmp_path / "net.cpz", fresh)
    assert cp.surgery.kept_channels(fresh) == {}          # the argument itself is not pruned
    assert net.get_submodule(layer).out_channels == 60
    assert cp.surgery.kept_channels(net) == {layer: res.kept}
    # the pruned architecture (rebuilt from the saved result) is filled in place
    arch = cp.CompressionResult.load(tmp_path / "l3", cp.models.resnet_cifar(20)).model
    assert cp.load_compressed(tmp_path / "net.cpz", arch) is arch
    with torch.no_grad():
        assert torch.equal(net.eval()(x), want)
        assert torch.equal(arch.eval()(x), want)
    # a network pruned otherwise is refused, naming both structures
    other = cp.prune_filters(cp.models.resnet_cifar(20), "layer2.0.conv1", [0])
    with pytest.raises(ValueError, match=r"pruned differently.*layer2\.0\.conv1.*layer3\.2\.conv1"):
        cp.load_compressed(tmp_path / "net.cpz", other)


def _rewrite_header(data: bytes, version: int, edit) -> bytes:
    """`data` (a .cpz image) with preamble version `version` and the header JSON passed
    through `edit`, its frame checksum recomputed: an older or altered writer's file."""
    import zlib

    fr = frames(data)
    name, start, payload, end = fr[0]
    assert name == "header"
    head = json.loads(data[payload:end - 4])
    head = edit(head)
    body = json.dumps(head).encode()
    frame = struct.pack("<H", 6) + b"header" + struct.pack("<Q", len(body)) + body
    return (MAGIC + struct.pack("<H", version) + frame + struct.pack("<I", zlib.crc32(frame))
            + data[end:])


def test_cpz_rebuilds_narrowed_and_scattered_layers_from_the_original(resnet20, cifar_test,
                                                                      tmp_path):
    """A network CAR-pruned in a narrowed layer (layer3.2.conv1, twice, as greedy steps do) and
    a scattered one (layer1.0.conv2 feeds a residual add), deep-compressed with a little
    retraining: the .cpz alone rebuilds it from a fresh original architecture, and its outputs
    equal the decoded model's exactly, in float32 and float64."""
    pruned = cp.prune_filters(resnet20, "layer3.2.conv1", [3, 17, 40])
    pruned = cp.prune_filters(pruned, "layer3.2.conv1", [0])          # original filter 0
    pruned = cp.prune_filters(pruned, "layer1.0.conv2", [2, 9])
    assert isinstance(pruned.layer1[0].conv2, cp.surgery.ScatteredConv2d)
    kept = cp.surgery.kept_channels(pruned)
    assert kept["layer3.2.conv1"] == [i for i in range(64) if i not in (0, 3, 17, 40)]
    train = cifar_test.sample(96, seed=4)
    out = dc.deep_compress(pruned, train, layers=["layer1.0.conv2", "layer3.2.conv1",
                                                   "layer3.2.conv2", "linear"],
                           finetune_iters=(2, 1), batch_size=32, kmeans_iters=20)
    assert out.compressed.structure == cp.surgery.pruned_structure(pruned)
    assert out.compressed.structure["layers"] == {
        n: {"kept": k, "filters": 64 if n.startswith("layer3") else 16} for n, k in kept.items()}
    path = tmp_path / "car.cpz"
    out.save(path)
    assert struct.unpack_from("<H", path.read_bytes(), 4)[0] == FORMAT_VERSION == 2
    net = dc.load_compressed(path, cp.models.resnet_cifar(20))
    assert cp.surgery.kept_channels(net) == kept
    assert isinstance(net.layer1[0].conv2, cp.surgery.ScatteredConv2d)
    assert net.layer3[2].conv1.out_channels == 60 and net.layer3[2].conv2.in_channels == 60
    x, _ = cifar_test.subset(np.arange(5000, 5064)).batch(slice(None))
    with torch.no_grad():
        assert torch.equal(net.eval()(x), out.model.eval()(x))
        want = copy.deepcopy(out.model).double()(x.double())
        got = copy.deepcopy(net).double()(x.double())
    assert torch.equal(got, want)
    # the decoded weights are the quantised ones, not the CAR-pruned originals
    assert not torch.equal(net.layer3[2].conv1.weight, pruned.layer3[2].conv1.weight)

    # an architecture without the pruned modules is named, with the file
    with pytest.raises(ValueError, match=r"car\.cpz.*names module\(s\) \['layer1\.0\.conv2'"):
        dc.load_compressed(path, cp.models.lenet5())
    # a malformed structure is a corrupt header
    def unordered(h):
        h["structure"]["layers"]["layer1.0.conv2"]["kept"] = [5, 2]
        return h

    with pytest.raises(dc.CorruptFileError, match=r"section 'header'.*increasing"):
        dc.CompressedModel.from_bytes(_rewrite_header(path.read_bytes(), 2, unordered))


def test_version_1_files_still_load_and_newer_ones_are_named(resnet20, tmp_path):
    """A version 1 file (no structure recorded) of a pruned network loads into the pruned
    architecture as before; into the original one the error says the version lacks the
    structure. A version this carprune does not know is named."""
    pruned = cp.prune_filters(resnet20, "layer3.2.conv1", [1, 2])
    out = dc.deep_compress(pruned, layers=["layer3.2.conv1"], kmeans_iters=10)

    def drop(h):
        h = dict(h, version=1)
        del h["structure"]
        return h

    v1 = _rewrite_header(out.compressed.to_bytes(), 1, drop)
    (tmp_path / "v1.cpz").write_bytes(v1)
    cm = dc.read_compressed(tmp_path / "v1.cpz")
    assert cm.version == 1 and cm.structure is None
    net = dc.load_compressed(tmp_path / "v1.cpz", cp.prune_filters(cp.models.resnet_cifar(20),
                                                                   "layer3.2.conv1", [1, 2]))
    assert torch.equal(net.layer3[2].conv1.weight, out.model.layer3[2].conv1.weight)
    with pytest.raises(ValueError, match=r"a version 1 file records no pruned structure"):
        dc.load_compressed(tmp_path / "v1.cpz", cp.models.resnet_cifar(20))
    v3 = bytearray(out.compressed.to_bytes())
    v3[4:6] = struct.pack("<H", 3)
    with pytest.raises(dc.CorruptFileError, match=r"unsupported format version 3 .*versions 1, 2"):
        dc.CompressedModel.from_bytes(bytes(v3))


def test_a_numpy_pair_is_taken_as_evaluation_and_training_data(lenet, mnist_test):
    """One data path: (images, labels) numpy arrays give the same Deep Compression, retraining
    included, as the dataset they came from."""
    train = cp.data.mnist5k(DATA / "mnist_5k.npz", "train").sample(100, seed=0)
    test = mnist_test.sample(100, seed=0)
    xs, ys = train.batch(np.arange(100))
    xt, yt = test.batch(np.arange(100))
    kw = dict(finetune_iters=(3, 2), lr=0.01, batch_size=32, kmeans_iters=10, warn_drop=None)
    ref = dc.deep_compress(lenet, train, test, **kw)
    got = dc.deep_compress(lenet, (xs.numpy(), ys.numpy()), (xt.numpy(), yt.numpy()), **kw)
    assert got.report.accuracy == ref.report.accuracy
    for k, v in ref.model.state_dict().items():
        assert torch.equal(got.model.state_dict()[k], v), k
