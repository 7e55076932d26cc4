"""`carprune compress` in whole-network mode (`--layer all --flops-target F`, `global_mode.
compress_global`): the result on disk, the progress lines, stop and resume to the identical
result, and the settings it refuses. LeNet-5 on the shared MNIST sample, 100 scoring images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_cli as base
import torch

import carprune as cp
from carprune import cli, preempt, specs
from carprune.commands import compress
from carprune.config import settings_object
from carprune.logging_utils import RunCallbacks

# the command-line tests' fixtures and helpers: the MNIST .npz with a test split, signal handlers
# restored after each in-process run (the LeNet weights: conftest.py)
mnist_npz = base.mnist_npz
_restore_signals = base._restore_signals
lenet_args = base.lenet_args

GLOBAL = ("--layer", "all", "--flops-target", "0.9", "--num-images", "100")
NOT_TIMES = ("seconds", "score_seconds", "tail_seconds")


def strip(trajectory: list[dict]) -> list[dict]:
    """A trajectory without its timings (which differ from run to run)."""
    return [{k: v for k, v in r.items() if k not in NOT_TIMES} for r in trajectory]


def global_args(weights: Path, npz: Path, out: Path, *extra: str) -> list[str]:
    args = ["compress", *lenet_args(weights, npz, out, *GLOBAL, *extra)]
    args[args.index("--progress") + 1] = "log"
    return args


@pytest.fixture(scope="module")
def run_once(tmp_path_factory, lenet_weights, mnist_npz) -> tuple[Path, str, str]:
    """One uninterrupted whole-network run: (out, stdout, stderr)."""
    import contextlib
    import io
    import signal

    out = tmp_path_factory.mktemp("global") / "all"
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    so, se = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            code = cli.main(global_args(lenet_weights, mnist_npz, out))
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        preempt.clear()
    assert code == 0, se.getvalue()
    return out, so.getvalue(), se.getvalue()


def test_flops_target_run_writes_a_loadable_result_equal_to_the_library_call(
        run_once, lenet, mnist_npz):
    out, stdout, stderr = run_once
    res = cp.GlobalCompressionResult.load(out, cp.models.lenet5())
    # the pruned model on disk has the FLOPs of the last round, at most the target
    assert cp.count_cost(res.model, (1, 28, 28)).total_flops == res.trajectory[-1].flops
    assert res.trajectory[-1].flops <= 0.9 * res.base_flops < res.trajectory[-2].flops
    assert res.units == ["conv1", "conv2", "fc1"] and res.criterion == "car"
    assert sum(map(len, res.removed.values())) >= 2
    # the same run through the library (the reference): same choices, same figures
    data = specs.load_data(mnist_npz, "test", mean=[0], std=[1])
    ref = cp.compress_global(lenet, "all", data, flops_target=0.9, score_images=100)
    assert res.removed == ref.removed
    doc = json.loads((out / "result.json").read_text())
    assert strip(doc["trajectory"]) == strip(json.loads(json.dumps(
        ref.to_dict()))["trajectory"])
    x, _ = cp.data.batches.load_batch(data, [0, 1, 2, 3])
    assert torch.equal(res.model(x), ref.model(x))
    # stdout: the summary and where the result is; stderr: one line per round
    assert stdout == f"{res.summary()}\nresult: {out / 'result.json'}\n"
    rounds = [ln for ln in stderr.splitlines() if " carprune INFO round " in ln]
    assert len(rounds) == len(res.trajectory)
    for r, line in zip(res.trajectory, rounds, strict=True):
        removed = ", ".join(f"{c.unit}[{c.channel}]" for c in r.removed)
        assert (f"round {r.round}: removed {len(r.removed)} channel"
                f"{'s' if len(r.removed) > 1 else ''} ({removed}); FLOPs "
                f"{r.flops / res.base_flops:.3f} of the original (target 0.9); top1 "
                f"{r.accuracy:.4f} ({r.seconds:.2f}s)") in line, line
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "done" and run["settings"]["flops_target"] == 0.9


def test_report_tabulates_a_whole_network_run(run_once, tmp_path, capsys):
    out = run_once[0]
    res = cp.GlobalCompressionResult.load(out)
    capsys.readouterr()
    assert cli.main(["report", str(out), "--out", str(tmp_path / "r"), "--progress", "none"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    last = res.trajectory[-1]
    assert "## Whole-network compression" in md
    assert (f"| {out} | global car | {res.base_flops:,} | {res.flops:,} ({res.flops_ratio:.3f}) | "
            f"{res.base_params:,} | {last.params:,} | {100 * res.base_score_accuracy:.2f} % | "
            f"{100 * last.accuracy:.2f} % | - | 100 scoring | {res.stopped} |") in md
    assert md in capsys.readouterr().out + "\n"
    assert "<h2>Whole-network compression</h2>" in (tmp_path / "r" / "index.html").read_text()


def test_a_stop_after_round_2_exits_75_and_the_rerun_resumes_to_the_identical_result(
        run_once, tmp_path, lenet_weights, mnist_npz, monkeypatch, capsys):
    """The flag a SIGTERM sets (`preempt.request_stop`), raised while round 2 is reported: the
    run stops right after round 2's checkpoint; the same command resumes from it."""

    class StopAfterRound2(RunCallbacks):
        def on_event(self, event):
            super().on_event(event)
            if event.algorithm == "global" and event.step == 2:
                preempt.request_stop("SIGTERM")

    out = tmp_path / "stopped"
    args = global_args(lenet_weights, mnist_npz, out)
    monkeypatch.setattr(compress, "RunCallbacks", StopAfterRound2)
    assert cli.main(args) == cli.EXIT_PREEMPTED
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "preempted" and run["exit_code"] == 75
    assert run["message"] == ("stopped by SIGTERM after global round 2; the checkpoint is "
                              "complete, run the same command again to resume")
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert [r["round"] for r in ckpt["trajectory"]] == [1, 2]
    assert not (out / "result.json").exists()
    monkeypatch.undo()
    preempt.clear()
    capsys.readouterr()
    assert cli.main(args) == 0
    assert f"resuming from {out / 'checkpoint.json'}" in capsys.readouterr().err
    ref_dir = run_once[0]
    got, ref = (json.loads((d / "result.json").read_text()) for d in (out, ref_dir))
    assert got["removed"] == ref["removed"] and len(got["trajectory"]) > 2
    assert strip(got["trajectory"]) == strip(ref["trajectory"])
    # rounds 1 and 2 were read from the checkpoint, not run again
    assert got["trajectory"][:2] == ckpt["trajectory"]
    a, b = (torch.load(d / "model" / "weights.pt") for d in (out, ref_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_list_of_layers_with_max_drop_and_a_magnitude_criterion(tmp_path, lenet, lenet_weights,
                                                                  mnist_npz, capsys, monkeypatch):
    out = tmp_path / "l1"
    args = ["compress", *lenet_args(lenet_weights, mnist_npz, out, "--layer", "conv1, conv2",
                                    "--max-drop", "0.5", "--flops-target", "0.8", "--criterion",
                                    "l1", "--per-round", "2", "--num-images", "100")]
    checks = []   # --threads auto (the default): the free cores re-checked at every event
    monkeypatch.setattr(cp.threads.ThreadGovernor, "update", lambda self: checks.append(1))
    assert cli.main(args) == 0
    assert len(checks) >= 2   # at least the start and each round
    res = cp.GlobalCompressionResult.load(out, cp.models.lenet5())
    data = specs.load_data(mnist_npz, "test", mean=[0], std=[1])
    ref = cp.compress_global(lenet, ["conv1", "conv2"], data, flops_target=0.8, max_drop=0.5,
                             criterion="l1", per_round=2, score_images=100)
    assert res.units == ["conv1", "conv2"] and res.criterion == "l1" and res.max_drop == 0.5
    assert res.removed == ref.removed and res.stopped == ref.stopped
    assert cp.count_cost(res.model, (1, 28, 28)).total_flops == ref.flops
    assert res.summary() in capsys.readouterr().out


@pytest.mark.parametrize("value, needle", [
    ("0", "--flops-target is a fraction of the original FLOPs in (0, 1) (0.5: half the FLOPs), "
          "got 0"),
    ("1", "--flops-target is a fraction of the original FLOPs in (0, 1) (0.5: half the FLOPs), "
          "got 1"),
    ("1.5", "got 1.5"),
    ("-0.25", "got -0.25"),
    ("half", "--flops-target: flops_target: expected a number, got 'half'"),
])
def test_bad_flops_target_values_are_usage_errors_that_name_the_option(value, needle, tmp_path,
                                                                       capsys):
    code = cli.main(["compress", "--model", "lenet5", "--data", "/nonexistent.npz", "--out",
                     str(tmp_path / "o"), "--layer", "all", "--flops-target", value])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "--flops-target" in err[0] and needle in err[0], err


@pytest.mark.parametrize("extra, needle", [
    ([], "--layer all compresses the whole network: give --flops-target"),
    (["--flops-target", "0.5", "--keep", "3", "--lazy"], "--keep, --lazy: one-layer settings"),
    (["--flops-target", "0.5", "--criterion", "kse"], "whole-network compression takes one of car"),
    (["--flops-target", "0.5", "--per-round", "0"], "--per-round must be >= 1, got 0"),
    (["--max-drop", "-0.1"], "--max-drop is a relative accuracy drop in [0, 1), got -0.1"),
    (["--flops-target", "0.5", "--eval-images", "100"], "--eval-images needs hold-out images"),
    (["--flops-target", "0.5", "--seed=-1"], "--seed: seed: expected a number >= 0, got -1"),
    (["--flops-target", "0.5", "--log-interval=-1"], "expected a number >= 0, got -1.0"),
    (["--flops-target", "0.5", "--num-images", "0"], "--num-images: num_images: expected a "
                                                     "number >= 1, got 0"),
    (["--flops-target", "0.5", "--memory-budget", "2XB"], "--memory-budget: cannot read a "
                                                          "memory size from '2XB'"),
])
def test_other_whole_network_settings_errors(extra, needle, tmp_path, capsys):
    code = cli.main(["compress", "--model", "lenet5", "--data", "/nonexistent.npz", "--out",
                     str(tmp_path / "o"), "--layer", "all", *extra])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and needle in err, err


def test_one_layer_settings_stay_one_layer(tmp_path, capsys):
    """Without a whole-network setting --layer NAME is the one-layer greedy run; the criteria only
    the whole-network mode has are refused there, by name."""
    base_args = ["compress", "--model", "lenet5", "--data", "/nonexistent.npz", "--out",
                 str(tmp_path / "o"), "--layer", "conv2"]
    assert cli.main([*base_args, "--criterion", "taylor"]) == cli.EXIT_USAGE
    assert "--criterion taylor ranks whole-network units" in capsys.readouterr().err
    assert cli.main([*base_args, "--no-cost-aware"]) == cli.EXIT_USAGE
    assert "--no-cost-aware applies to whole-network compression" in capsys.readouterr().err
    parse = lambda *a: settings_object(compress.Settings, cli.settings_for(
        "compress", cli.build_parser().parse_args([*base_args, *a])))
    assert not parse("--max-drop", "0.05").is_global and parse("--max-drop", "0.05").layer == "conv2"
    assert parse("--flops-target", "0.5").is_global
    assert parse("--per-round", "2", "--max-drop", "0.05").is_global
    with pytest.raises(cli.ConfigError, match="--per-round 2 compresses the whole network: give "
                                              "--flops-target"):
        parse("--per-round", "2")
    assert parse("--layer", "all", "--max-drop", "0.05").layers == "all"
    assert parse("--layer", "conv1,conv2", "--max-drop", "0.05").layers == ["conv1", "conv2"]
