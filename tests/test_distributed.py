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
from carprune.logging_utils import RunCallbacks

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


def test_single_process_sharded_scorer_is_a_layer_scorer(lenet, mnist_test):
    scorer = cp.LayerScorer(lenet, "conv2", mnist_test, num_images=100, progress=False)
    sharded = distributed.ShardedScorer(lenet, "conv2", mnist_test, num_images=100, progress=False)
    a, b = sharded.score([3, 1, 4]), scorer.score([3, 1, 4])
    assert torch.equal(a.counts, b.counts) and a.filters.tolist() == [3, 1, 4]
    sharded.remove([1])
    scorer.remove([1])
    assert sharded.removed == [1] and sharded.alive == scorer.alive and sharded.num_filters == 50
    assert torch.equal(sharded.score().counts, scorer.score().counts)
    with pytest.raises(ValueError, match="already removed"):
        sharded.score([1])


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
        # the run layer's callbacks ask the same question: both ranks stop, or neither
        callbacks = RunCallbacks("none", ctx=ctx, preemptible=True)
        out["callbacks_quiet"] = callbacks.should_stop()
        if rank == 0:
            distributed._pending_name[:] = ["SIGTERM"]
            distributed._pending.set()
        out["callbacks_stop"] = callbacks.should_stop()
        distributed.clear_stop()
        # ranks scoring different images must fail loudly, not merge inconsistent counts
        data = specs.load_data(MNIST, mean=[0], std=[1])
        model = cp.models.pretrained_lenet5(MNIST)
        scorer = distributed.ShardedScorer(model, "conv1", data, ctx=ctx, num_images=50 + 50 * rank,
                                           progress=False)
        try:
            scorer.score()
            out["mismatch"] = None
        except RuntimeError as exc:
            out["mismatch"] = str(exc)
        # the same for the exact search: the ranks' scoring images are compared before any step
        units = cp.prunable_units(model, cp.data.batches.load_batch(data, [0])[0])
        try:
            distributed.ShardedCAR(data, ctx=ctx, num_images=50 + 50 * rank).search(
                model, units, ["conv1", "conv2"], lambda u, c, v: v)
            out["search_mismatch"] = None
        except RuntimeError as exc:
            out["search_mismatch"] = str(exc)
        # equal data: the gathered scores equal one process's, on every rank
        full = cp.LayerScorer(model, "conv1", data, num_images=60, progress=False).score()
        got = distributed.ShardedScorer(model, "conv1", data, ctx=ctx, num_images=60,
                                        progress=False).score()
        out["sharded_equal"] = (torch.equal(got.counts, full.counts)
                                and got.filters.tolist() == full.filters.tolist())
        Path(results, f"{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_stop_agreement_and_base_count_check_across_ranks(tmp_path, lenet):
    init = f"file://{tempfile.mkdtemp(dir=tmp_path)}/rendezvous"
    mp.start_processes(_worker, args=(init, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["active"] and r["quiet"] is False and r["stop"] is True
        assert r["callbacks_quiet"] is False and r["callbacks_stop"] is True
        assert "different images or models" in r["mismatch"]
        assert "scoring image indices differ" in r["search_mismatch"]
        assert r["sharded_equal"] is True
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


# -- whole-network compression: unit scoring sharded across ranks --------------------------------
@pytest.mark.parametrize("weights, world, owner", [
    ([5, 3, 3, 2, 1], 2, [0, 1, 1, 0, 1]),   # heaviest first to the least loaded: 7 + 7
    ([1, 1, 1], 5, [0, 1, 2]),               # more ranks than units: some score nothing
    ([4, 4], 1, [0, 0]),
])
def test_assign_units_balances_the_work(weights, world, owner):
    assert distributed.assign_units(weights, world) == owner


# two residual-stream units (masked tails), a plain filter unit (fused) and one at the head
RESNET_UNITS = ["layer2.0.conv2", "layer2.2.conv1", "layer3.0.conv2", "layer3.2.conv1"]


def _car_worker(rank: int, init: str, results: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ctx = distributed.init_from_env("cpu")
        mnist = cp.data.mnist5k(MNIST, "test")
        lenet = cp.models.pretrained_lenet5(MNIST)
        resnet = cp.models.load_checkpoint(cp.models.resnet_cifar(20), RESNET20)
        cifar = cp.data.cifar10(CIFAR, "test")
        out: dict[str, object] = {}
        own: list[int] = []   # the (image, channel) pairs this rank's search steps scored
        step = cp.importance.CAR._search_block

        def spy(self, sc, block, chans):
            own.append(len(block) * sum(len(c) for c in chans.values()))
            return step(self, sc, block, chans)

        cp.importance.CAR._search_block = spy
        for key, model, data, units, n in (
                ("lenet", lenet, mnist, ["conv1", "conv2", "fc1"], 100),
                ("resnet", resnet, cifar, RESNET_UNITS, 16)):
            x, _ = cp.data.batches.load_batch(data, [0])
            an = cp.prunable_units(model, x)
            imp = distributed.ShardedCAR(data, ctx=ctx, num_images=n)
            values = imp(model, an, units)
            out[key] = {
                "order": list(imp.last), "values": {u: v.tolist() for u, v in values.items()},
                "scores": {u: {"layer": s.layer, "filters": s.filters.tolist(),
                               "counts": s.counts.tolist(), "base": s.base_counts.tolist(),
                               "totals": s.class_totals.tolist(), "classes": s.classes,
                               "metric": s.metric} for u, s in imp.last.items()},
                "pairs": {c.unit: [c.pairs, c.pairs_run, c.tail_macs, c.run_macs]
                          for c in imp.last_cost.units},
                "base_value": imp.base_value()}
            # the exact search, split step by step across the ranks
            own.clear()
            values = imp.search(model, an, units, lambda u, c, v: v, picks=2, blocks=4)
            out[key]["search"] = {
                "own_pairs": sum(own),
                "values": {u: [None if x != x else x for x in v.tolist()]
                           for u, v in values.items()},
                "stats": imp.last_search,
                "pairs": {c.unit: [c.channels, c.pairs, c.pairs_run] for c in imp.last_cost.units}}
        # a whole greedy run with the sharded criterion
        res = cp.compress_global(lenet, "all", mnist, flops_target=0.9, score_images=100,
                                 criterion=distributed.ShardedCAR(mnist, ctx=ctx, num_images=100))
        out["global"] = {"removed": res.removed, "trajectory": res.to_dict()["trajectory"]}
        Path(results, f"car{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_sharded_car_equals_one_process(tmp_path, lenet, mnist_test, resnet20, cifar_test):
    """Two gloo ranks, each scoring its share of the units: every rank gets every unit's sums,
    exactly those one process computes (LeNet: all units; ResNet-20: `RESNET_UNITS`); the exact
    search, each rank scoring a share of every step, gives one process's values and work; and a
    global run with the sharded criterion makes the same choices with the same figures."""
    init = f"file://{tempfile.mkdtemp(dir=tmp_path)}/rendezvous"
    mp.start_processes(_car_worker, args=(init, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    got = [json.loads((tmp_path / f"car{r}.json").read_text()) for r in range(2)]
    for key, model, data, units, n in (
            ("lenet", lenet, mnist_test, ["conv1", "conv2", "fc1"], 100),
            ("resnet", resnet20, cifar_test, RESNET_UNITS, 16)):
        ref = cp.score_units(model, data, units, num_images=n)
        for g in got:
            one = g[key]
            assert one["order"] == units
            for u in units:
                s, r = one["scores"][u], ref[u]
                assert s["layer"] == r.layer and s["filters"] == r.filters.tolist()
                assert s["counts"] == r.counts.tolist() and s["base"] == r.base_counts.tolist()
                assert s["totals"] == r.class_totals.tolist() and s["classes"] == r.classes
                assert s["metric"] == r.metric
                assert one["values"][u] == r.importance.to(torch.float64).tolist()
            assert one["pairs"] == {c.unit: [c.pairs, c.pairs_run, c.tail_macs, c.run_macs]
                                    for c in ref.cost.units}
            assert one["base_value"] == ref[units[0]].base_value
            # the search: one process's exact values (NaN for the channels it proved out of
            # the running), its savings and its work, pair for pair
            imp = cp.importance.CAR(data, num_images=n)
            values = imp.search(model, cp.prunable_units(model, cp.data.batches.load_batch(
                data, [0])[0]), units, lambda u, c, v: v, picks=2, blocks=4)
            assert one["search"]["values"] == {u: [None if x != x else x for x in v.tolist()]
                                               for u, v in values.items()}
            assert one["search"]["stats"] == imp.last_search
            assert one["search"]["pairs"] == {c.unit: [c.channels, c.pairs, c.pairs_run]
                                              for c in imp.last_cost.units}
            # not vacuous: the search dropped channels, and scored some to the end
            assert 0 < imp.last_search["exact"] < imp.last_search["channels"]
        # the search's work was split: each rank scored a share, the shares make the whole
        shares = [g[key]["search"]["own_pairs"] for g in got]
        assert min(shares) > 0 and sum(shares) == got[0][key]["search"]["stats"]["pairs"]
        # the comparison is not vacuous: some removal changes some prediction
        assert any((ref[u].counts.sum(1) != ref[u].base_counts.sum()).any() for u in units)
    # both ranks scored units (the work was split), as `assign_units` decides
    x, _ = cp.data.batches.load_batch(cifar_test, [0])
    an = cp.prunable_units(resnet20, x)
    owners = distributed.assign_units(distributed.unit_weights(an, RESNET_UNITS), 2)
    assert sorted(set(owners)) == [0, 1]
    # the ranks search as one process does: every figure, the work done included, is the same
    ref = cp.compress_global(lenet, "all", mnist_test, flops_target=0.9, score_images=100)
    strip = lambda t: [{k: v for k, v in r.items() if k not in ("seconds", "score_seconds",
                                                                "tail_seconds")} for r in t]
    for g in got:
        assert g["global"]["removed"] == ref.removed
        assert strip(g["global"]["trajectory"]) == strip(json.loads(json.dumps(
            ref.to_dict()["trajectory"])))


def test_torchrun_whole_network_compress_equals_one_process(tmp_path, lenet_files):
    args = lambda out: ["compress", "--model", "lenet5", "--weights", str(lenet_files), "--data",
                        str(MNIST), "--mean", "0", "--std", "1", "--layer", "all",
                        "--flops-target", "0.9", "--num-images", "100", "--out", str(out),
                        "--progress", "log"]
    one = tmp_path / "one"
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main(args(one)) == 0
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        preempt.clear()
    two = tmp_path / "two"
    p = torchrun(*args(two))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "scoring across 2 ranks" in p.stderr
    assert p.stdout.count("global car: ") == 1             # rank 0 alone prints the summary
    got, ref = (json.loads((d / "result.json").read_text()) for d in (two, one))
    # the same choices, values and work (the search is split, not changed); only times differ
    work = ("seconds", "score_seconds", "tail_seconds")
    strip = lambda t: [{k: v for k, v in r.items() if k not in work} for r in t]
    assert got["removed"] == ref["removed"] and strip(got["trajectory"]) == strip(ref["trajectory"])
    a, b = torch.load(two / "model" / "weights.pt"), torch.load(one / "model" / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
