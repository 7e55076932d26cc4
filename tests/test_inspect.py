"""`carprune inspect`: a real .cpz written by Deep Compression of LeNet-5 (checked against a
hand-written parser of the documented frame layout and the compressed model's own weights),
corrupted copies (exit 2, one line naming the file and the section), and the output
directories of compress and deep-compress runs (files, sizes, recorded accuracy, kept filters)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import carprune as cp
import carprune.deepcompress as dc
from carprune import cli, preempt, surgery

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LAYERS = ["conv1", "conv2", "fc1", "fc2"]


@pytest.fixture(autouse=True)
def _restore_signals():
    """In-process runs install SIGTERM/SIGINT handlers; pytest must get its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    preempt.clear()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    preempt.clear()


def frames(data: bytes) -> dict[str, tuple[int, int]]:
    """Independent parser of the documented layout: section name -> (payload start, size)."""
    assert data[:4] == b"CPZ\0"
    out, pos = {}, 6
    while pos < len(data):
        (n,) = struct.unpack_from("<H", data, pos)
        name = data[pos + 2:pos + 2 + n].decode()
        (size,) = struct.unpack_from("<Q", data, pos + 2 + n)
        start = pos + 2 + n + 8
        out[name] = (start, size)
        pos = start + size + 4
    return out


def inspect_json(capsys, path: Path) -> dict:
    capsys.readouterr()
    assert cli.main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def lenet_cpz(lenet, tmp_path_factory):
    out = dc.deep_compress(lenet, kmeans_iters=20, progress=False)
    path = tmp_path_factory.mktemp("cpz") / "lenet.cpz"
    out.save(path)
    return out, path


def test_cpz_layers_sizes_and_checksums(lenet, lenet_cpz, capsys):
    out, path = lenet_cpz
    data = path.read_bytes()
    doc = inspect_json(capsys, path)
    fr = frames(data)
    assert doc["bytes"] == len(data) == os.path.getsize(path)
    assert doc["sha256"] == hashlib.sha256(data).hexdigest()
    assert doc["sections"] == len(fr) == 2 + 5 * len(LAYERS) and doc["checksums_verified"]
    assert doc["arch"] == "LeNet5"
    assert [e["name"] for e in doc["layers"]] == LAYERS
    weights = {n: out.model.get_submodule(n).weight.detach() for n in LAYERS}
    for e in doc["layers"]:
        w = weights[e["name"]]
        assert e["shape"] == list(w.shape) and e["params"] == w.numel()
        assert e["nonzeros"] == int((w != 0).sum())          # counted in the decoded model
        assert e["section_bytes"] == {s: fr[f"{e['name']}/{s}"][1] for s in
                                      ("codebook", "weights.huffman", "weights",
                                       "indices.huffman", "indices")}
        assert e["section_bytes"]["codebook"] == 4 << e["bits"]
        assert e["bytes"] == out.report.layer(e["name"]).bytes_after
    assert doc["rest"]["bytes"] == fr["rest"][1] and doc["header_bytes"] == fr["header"][1]
    assert doc["rest"]["tensors"] == len(lenet.state_dict()) - len(LAYERS)
    payload = sum(size for _, size in fr.values())
    assert doc["framing_bytes"] == len(data) - payload
    # the human-readable form says the same
    capsys.readouterr()
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"all {len(fr)} section checksums verified" in text and f"{len(data):,} bytes" in text
    for e in doc["layers"]:
        row = next(x for x in text.splitlines() if x.startswith(e["name"] + " "))
        assert f"{e['bytes']:,}" in row.split()[-1]


@pytest.mark.parametrize("section", ["header", "conv2/weights", "fc1/indices.huffman", "rest"])
def test_corrupt_cpz_exits_2_naming_file_and_section(lenet_cpz, tmp_path, capsys, section):
    _, path = lenet_cpz
    data = bytearray(path.read_bytes())
    start, size = frames(bytes(data))[section]
    data[start + size // 2] ^= 0x21
    bad = tmp_path / "bad.cpz"
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["inspect", str(bad)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == ""
    assert str(bad) in lines[0] and f"section {section!r}" in lines[0]
    bad.write_bytes(path.read_bytes()[:start + 3])                    # truncated inside it
    assert cli.main(["inspect", str(bad), "--json"]) == 2
    assert f"section {section!r}" in capsys.readouterr().err


def test_bad_paths_exit_2(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert cli.main(["inspect"]) == 2
    assert "PATH" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert "expected a .cpz file or an output directory" in capsys.readouterr().err


# -- output directories --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(lenet, tmp_path_factory):
    """A compress output (hold-out half of the test split) and a deep-compress output of its
    pruned model, written by the command line."""
    d = tmp_path_factory.mktemp("runs")
    tr = cp.data.mnist5k(DATA / "mnist_5k.npz", "train")
    te = cp.data.mnist5k(DATA / "mnist_5k.npz", "test")
    npz = d / "mnist.npz"
    np.savez(npz, x_train=tr.images[..., 0], y_train=tr.labels, x_test=te.images[..., 0],
             y_test=te.labels)
    weights = d / "lenet5.pt"
    torch.save(lenet.state_dict(), weights)
    common = ["--model", "lenet5", "--weights", str(weights), "--data", str(npz), "--split", "test",
              "--mean", "0", "--std", "1", "--progress", "none", "--threads", "1"]
    assert cli.main(["compress", *common, "--out", str(d / "c"), "--layer", "conv2",
                     "--num-images", "300", "--eval-split", "test", "--eval-images", "200",
                     "--keep", "45"]) == 0
    assert cli.main(["deep-compress", *common, "--out", str(d / "dc"), "--result", str(d / "c"),
                     "--num-images", "200", "--kmeans-iters", "10"]) == 0
    return d


def expand(ranges: str) -> list[int]:
    out = []
    for part in ranges.split(", "):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def test_compress_directory(runs, capsys):
    d = runs / "c"
    doc = inspect_json(capsys, d)
    assert doc["contents"] == "compress"
    run = json.loads((d / "run.json").read_text())
    assert doc["run"]["state"] == "done" and doc["run"]["exit_code"] == 0
    assert doc["run"]["argv"] == run["argv"] and doc["settings"]["layer"] == "conv2"
    on_disk = {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}
    assert {f["path"]: f["bytes"] for f in doc["files"]} == on_disk
    checks = {f["path"]: f["check"] for f in doc["files"]}
    assert checks["model/weights.pt"] == "zip CRCs ok" and checks["result.json"] == "JSON parses"
    result = json.loads((d / "result.json").read_text())
    traj = result["trajectory"]
    acc = doc["accuracy"][0]
    assert (acc["before"], acc["after"]) == (traj[0]["holdout_accuracy"],
                                             traj[-1]["holdout_accuracy"])
    assert acc["images"] == "200 hold-out images"
    # kept filters: those of the saved pruned model, rebuilt from the original architecture
    model = cp.CompressionResult.load(d, cp.models.lenet5()).model
    kept = surgery.kept_channels(model)["conv2"]
    assert doc["kept"]["conv2"] == {"kept": kept, "filters": 50} and len(kept) == 45
    capsys.readouterr()
    assert cli.main(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    m = re.search(r"conv2: 45 of 50 filters kept: (.*)", text)
    assert m and expand(m.group(1)) == kept
    assert f"{100 * traj[0]['holdout_accuracy']:.2f} % -> {100 * traj[-1]['holdout_accuracy']:.2f} %" \
        in text


def test_deep_compress_directory_names_the_pruned_source(runs, capsys):
    d = runs / "dc"
    doc = inspect_json(capsys, d)
    assert doc["contents"] == "deep-compress" and doc["pruned_from"] == str(runs / "c")
    result = json.loads((runs / "c" / "result.json").read_text())
    assert doc["kept"]["conv2"]["kept"] == result["kept"]
    rep = json.loads((d / "report.json").read_text())
    assert doc["accuracy"][0]["stages"] == {k: v for k, v in rep["accuracy"].items()
                                            if v is not None}
    assert doc["accuracy"][0]["images"] == "200 images"
    assert doc["cpz"]["bytes"] == rep["file_bytes"] == (d / "model.cpz").stat().st_size
    assert doc["cpz"]["checksums_verified"] and doc["cpz"]["layers"] == len(rep["layers"])
    # the .cpz alone points at the compress output that says how to rebuild the architecture
    cpz = inspect_json(capsys, d / "model.cpz")
    assert cpz["pruned_from"]["result"] == str(runs / "c")
    assert cpz["pruned_from"]["kept"]["conv2"]["kept"] == result["kept"]
    assert cpz["recorded"]["accuracy"] == rep["accuracy"]
    arch = cp.CompressionResult.load(runs / "c", cp.models.lenet5()).model
    loaded = dc.load_compressed(d / "model.cpz", arch)
    assert loaded.conv2.out_channels == len(cpz["pruned_from"]["kept"]["conv2"]["kept"])


def test_corrupt_result_file_exits_2_naming_it(runs, tmp_path, capsys):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(runs / "c", d)
    w = d / "model" / "weights.pt"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(w) in err[0]
