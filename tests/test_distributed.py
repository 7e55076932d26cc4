"""Scoring split across processes gives exactly the single-process result.

The end-to-end tests run the real launcher, `torchrun --nproc_per_node 2 --standalone -m carprune`,
on CPU (gloo); the collective pieces (stop agreement, the base-count check) run in two processes
started here with a file rendezvous.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import carprune as cp
from carprune import cli, distributed, preempt, specs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CIFAR = DATA / "cifar10-jpeg.tar.gz"
MNIST = DATA / "mnist_5k.npz"
RESNET20 = DATA / "models" / "resnet20-12fca82f.th"


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "carprune", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_is_contiguous_balanced_and_complete(n, world):
    items = list(range(100, 100 + n))
    parts = [distributed.shard(items, r, world) for r in range(world)]
    assert sum(parts, []) == items
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_single_process_wrapper_is_transparent(lenet, mnist_test):
    scorer = cp.LayerScorer(lenet, "conv2", mnist_test, num_images=100, progress=False)
    wrapped = distributed.DistributedScorer(scorer)
    a, b = wrapped.score([3, 1, 4]), scorer.score([3, 1, 4])
    assert torch.equal(a.counts, b.counts) and a.filters.tolist() == [3, 1, 4]
    wrapped.remove([1])
    assert scorer.removed == [1] and wrapped.alive == scorer.alive and wrapped.num_filters == 50


def test_torchrun_score_equals_one_process(tmp_path, resnet20, cifar_test):
    # 11 filters over 2 ranks: unequal shares (6 + 5), so the padding of the gather is exercised
    filters = list(range(0, 32, 3))
    out = tmp_path / "two"
    p = torchrun("score", "--model", "resnet20", "--weights", str(RESNET20), "--data", str(CIFAR),
                 "--split", "test", "--layer", "layer2.0.conv1", "--num-images", "64",
                 "--filters", ",".join(map(str, filters)), "--out", str(out), "--progress", "log")
    assert p.returncode == 0, p.stderr[-3000:]
    got = cp.LayerScores.load(out / "scores.npz")
    ref = cp.score_layer(resnet20, "layer2.0.conv1", cifar_test, num_images=64, filters=filters,
                         progress=False)
    assert got.filters.tolist() == filters
    assert torch.equal(got.counts, ref.counts) and torch.equal(got.base_counts, ref.base_counts)
    assert (ref.counts.sum(1) != ref.base_counts.sum()).any()  # the comparison is not vacuous
    assert "across 2 ranks" in p.stderr
    assert p.stdout.count("filters scored on 64 images") == 1      # rank 0 alone prints
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory, lenet):
    d = tmp_path_factory.mktemp("lenet")
    torch.save(lenet.state_dict(), d / "lenet5.pt")
    return d / "lenet5.pt"


def compress_args(weights: Path, out: Path, keep: str) -> list[str]:
    return ["compress", "--model", "lenet5", "--weights", str(weights), "--data", str(MNIST),
            "--mean", "0", "--std", "1", "--layer", "conv1", "--num-images", "400", "--keep", keep,
            "--out", str(out), "--progress", "log"]


def test_torchrun_compress_equals_one_process_and_stops_together(tmp_path, lenet_files):
    one = tmp_path / "one"
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main(compress_args(lenet_files, one, "14")) == 0
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        preempt.clear()
    ref = json.loads((one / "result.json").read_text())
    # two ranks, stopped by SIGTERM to the launcher (which forwards it to both workers), resumed
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", "-m", "carprune", *compress_args(lenet_files, two, "14")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    while True:
        try:
            steps = len(json.loads((two / "checkpoint.json").read_text())["trajectory"]) - 1
        except (FileNotFoundError, json.JSONDecodeError):
            steps = 0
        if steps >= 1:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    stops = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stops) == 2, err[-3000:]
    # both ranks stopped after the same step, so neither waits in a collective for the other
    assert len({line.split("after step ")[1].split()[0] for line in stops}) == 1
    assert json.loads((two / "run.json").read_text())["state"] == "preempted"
    assert not (two / "result.json").exists()
    p = torchrun(*compress_args(lenet_files, two, "14"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads((two / "result.json").read_text())
    assert got["removed"] == ref["removed"] and got["kept"] == ref["kept"]
    strip = lambda t: [{k: v for k, v in s.items() if k != "seconds"} for s in t]
    assert strip(got["trajectory"]) == strip(ref["trajectory"])
    a, b = torch.load(two / "model" / "weights.pt"), torch.load(one / "model" / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


# -- collectives in two local processes ----------------------------------------------------------
def _worker(rank: int, init: str, results: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ctx = distributed.init_from_env("cpu")
        out: dict[str, object] = {"active": ctx.active}
        # no rank asked to stop: nobody stops
        out["quiet"] = distributed.sync_stop(ctx)
        # a signal reached rank 1 only: both ranks stop at this boundary
        if rank == 1:
            distributed._pending_name[:] = ["SIGTERM"]
            distributed._pending.set()
        out["stop"] = distributed.sync_stop(ctx)
        out["reason"] = preempt.reason()
        distributed.clear_stop()
        # ranks scoring different images must fail loudly, not merge inconsistent counts
        data = specs.load_data(MNIST, mean=[0], std=[1])
        model = cp.models.pretrained_lenet5(MNIST)
        scorer = cp.LayerScorer(model, "conv1", data, num_images=50 + 50 * rank, progress=False)
        try:
            distributed.DistributedScorer(scorer, ctx).score()
            out["mismatch"] = None
        except RuntimeError as exc:
            out["mismatch"] = str(exc)
        Path(results, f"{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_stop_agreement_and_base_count_check_across_ranks(tmp_path, lenet):
    init = f"file://{tempfile.mkdtemp(dir=tmp_path)}/rendezvous"
    mp.start_processes(_worker, args=(init, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["active"] and r["quiet"] is False and r["stop"] is True
        assert "different images or models" in r["mismatch"]
    assert res[0]["reason"] == "a signal to another rank" and res[1]["reason"] == "SIGTERM"


def test_torchrun_float_metric_equals_one_process(tmp_path, resnet20, cifar_test):
    """A float metric's fixed-point sums are integers like the counts: 2 ranks, each scoring its
    share of the filters in its own batches, give exactly the single-process sums."""
    filters = list(range(1, 32, 4))
    out = tmp_path / "nll"
    p = torchrun("score", "--model", "resnet20", "--weights", str(RESNET20), "--data", str(CIFAR),
                 "--split", "test", "--layer", "layer2.0.conv1", "--num-images", "48", "--metric",
                 "nll", "--dtype", "float64", "--filters", ",".join(map(str, filters)),
                 "--out", str(out), "--progress", "log")
    assert p.returncode == 0, p.stderr[-3000:]
    got = cp.LayerScores.load(out / "scores.npz")
    ref = cp.score_layer(resnet20, "layer2.0.conv1", cifar_test, num_images=48, filters=filters,
                         metric="nll", dtype=torch.float64, progress=False)
    assert got.metric == "nll" and got.scale == ref.scale > 1 and not got.higher_is_better
    assert torch.equal(got.counts, ref.counts) and torch.equal(got.base_counts, ref.base_counts)
    doc = json.loads((out / "scores.json").read_text())
    assert doc["metric"] == "nll" and "car" not in doc
    assert doc["importance"] == pytest.approx(ref.importance.tolist())
