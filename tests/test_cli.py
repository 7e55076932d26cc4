"""The `carprune` command: settings (flags over a TOML file), outputs, exit codes, batch-log
progress, and preemption (SIGTERM, SIGKILL) with resume to the identical result. (Merging the
settings: test_config.py; model and data specs: test_specs.py; the readers: test_data.py.)

Most commands run in-process through `cli.main` (fast); the quick start, the log output and the
preemption tests run the real `python -m carprune` in a subprocess, as a batch script would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import carprune as cp
from carprune import cli, config, preempt, specs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CIFAR = DATA / "cifar10-jpeg.tar.gz"
MNIST = DATA / "mnist_5k.npz"
RESNET20 = DATA / "models" / "resnet20-12fca82f.th"


@pytest.fixture(autouse=True)
def _restore_signals():
    """In-process runs install SIGTERM/SIGINT handlers; pytest must get its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    preempt.clear()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    preempt.clear()


@pytest.fixture(scope="session")
def mnist_npz(tmp_path_factory) -> Path:
    """The shared MNIST sample as an .npz with train/test keys (the `_<split>` key form)."""
    tr, te = cp.data.mnist5k(MNIST, "train"), cp.data.mnist5k(MNIST, "test")
    path = tmp_path_factory.mktemp("mnist") / "mnist_split.npz"
    np.savez(path, x_train=tr.images[..., 0], y_train=tr.labels, x_test=te.images[..., 0],
             y_test=te.labels, classes=np.array(cp.data.MNIST_CLASSES))
    return path


def lenet_args(weights: Path, npz: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "lenet5", "--weights", str(weights), "--data", str(npz), "--split", "test",
            "--mean", "0", "--std", "1", "--out", str(out), "--progress", "none", *extra]


def run_cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carprune", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# -- help, exit codes, settings ------------------------------------------------------------------
def test_help_documents_every_exit_code(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for code in (0, 1, 2, 75, 130):
        assert f"\n  {code:3d}  " in text
    assert cli.EXIT_PREEMPTED == preempt.EXIT_PREEMPTED == 75
    for cmd in ("score", "compress", "finetune", "deep-compress", "report", "bench"):
        assert cmd in text


@pytest.mark.parametrize("args, needle", [
    (["score", "--model", "lenet5", "--data", str(MNIST), "--out", "x", "--layer", "conv9"],
     "unknown layer 'conv9'"),
    (["score", "--model", "resnet21", "--data", str(MNIST), "--out", "x", "--layer", "conv1"],
     "unknown model 'resnet21'"),
    (["score", "--model", "lenet5", "--weights", "/nonexistent.pt", "--data", str(MNIST), "--out", "x",
      "--layer", "conv1"], "checkpoint not found"),
    (["score", "--model", "lenet5", "--data", str(MNIST), "--out", "x", "--layer", "conv1",
      "--num-images", "many"], "num_images: expected an integer"),
    (["score", "--model", "lenet5", "--data", str(MNIST), "--layer", "conv1"], "--out"),
    (["compress", "--model", "lenet5", "--data", str(MNIST), "--out", "x", "--layer", "conv1",
      "--criterion", "best"], "'best' is not one of"),
    (["score", "--model", "resnet20", "--weights", str(RESNET20), "--data", str(CIFAR), "--out", "x",
      "--layer", "conv1"], "choose one with --split"),
])
def test_usage_errors_exit_2_with_one_line(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == cli.EXIT_USAGE
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and needle in err[0], err
    assert "Traceback" not in err[0]


def test_argparse_errors_exit_2(capsys):
    assert cli.main(["score", "--no-such-flag"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 2


def test_config_file_flags_override_and_paths_are_relative_to_the_file(
        tmp_path, lenet_weights, mnist_npz, capsys):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    os.symlink(mnist_npz, cfg_dir / "digits.npz")
    (cfg_dir / "run.toml").write_text(
        'model = "lenet5"\n'
        f'weights = "{lenet_weights}"\n'
        'data = "digits.npz"\n'             # relative to the file, not to the working directory
        'split = "test"\nmean = [0.0]\nstd = [1.0]\n'
        'num_images = 300\nkeep = 10\n'     # keep: a compress key, ignored by score
        '[score]\nlayer = "conv2"\nnum_images = 200\n'
        '[compress]\nlayer = "conv1"\n')
    out = tmp_path / "o"
    assert cli.main(["score", "--config", str(cfg_dir / "run.toml"), "--out", str(out),
                     "--num-images", "120", "--progress", "none"]) == 0
    doc = json.loads((out / "scores.json").read_text())
    assert doc["layer"] == "conv2"               # from [score], over nothing
    assert doc["num_images"] == 120              # the flag beats [score] beats the top level
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "done" and run["exit_code"] == 0
    assert run["settings"]["data"] == str(cfg_dir / "digits.npz")
    capsys.readouterr()
    (cfg_dir / "bad.toml").write_text('model = "lenet5"\nnum_imagse = 3\n')
    assert cli.main(["score", "--config", str(cfg_dir / "bad.toml"), "--out", str(out)]) == 2
    assert "did you mean 'num_images'" in capsys.readouterr().err
    (cfg_dir / "broken.toml").write_text('model = "lenet5\n')
    assert cli.main(["score", "--config", str(cfg_dir / "broken.toml"), "--out", str(out)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


# -- score ---------------------------------------------------------------------------------------
QUICK = ["--model", "resnet20", "--weights", str(RESNET20), "--data", str(CIFAR), "--split", "test",
         "--layer", "layer3.2.conv1", "--num-images", "64"]


def test_quickstart_score_writes_scores_prints_summary_and_resumes(tmp_path, resnet20, cifar_test):
    out = tmp_path / "quickstart"
    p = run_cli("score", *QUICK, "--out", str(out))
    assert p.returncode == 0, p.stderr
    ref = cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, num_images=64, seed=0, progress=False)
    got = cp.LayerScores.load(out / "scores.npz")
    assert torch.equal(got.counts, ref.counts) and torch.equal(got.base_counts, ref.base_counts)
    assert ref.summary() in p.stdout
    doc = json.loads((out / "scores.json").read_text())
    assert np.allclose(doc["car"], ref.car.numpy()) and np.allclose(doc["car_c"], ref.car_c.numpy())
    assert doc["least_important_first"] == ref.least_important(64)
    # batch log: plain timestamped lines, no carriage returns from progress bars
    assert "\r" not in p.stderr and "carprune INFO layer3.2.conv1: scored in" in p.stderr
    mtime = (out / "scores.npz").stat().st_mtime_ns
    again = run_cli("score", *QUICK, "--out", str(out))
    assert again.returncode == 0 and "already scored" in again.stderr
    assert ref.summary() in again.stdout and (out / "scores.npz").stat().st_mtime_ns == mtime


def test_score_into_an_output_of_another_layer_scores_that_layer(tmp_path, lenet_weights, mnist_npz,
                                                                lenet):
    out = tmp_path / "s"
    for layer in ("conv1", "conv2"):
        assert cli.main(["score", *lenet_args(lenet_weights, mnist_npz, out, "--layer", layer,
                                              "--num-images", "100")]) == 0
    got = cp.LayerScores.load(out / "scores.npz")
    assert got.layer == "conv2" and json.loads((out / "scores.json").read_text())["layer"] == "conv2"
    ref = cp.score_layer(lenet, "conv2", specs.load_data(mnist_npz, "test", mean=[0], std=[1]),
                         num_images=100, progress=False)
    assert torch.equal(got.counts, ref.counts)


def test_score_several_layers_in_process(tmp_path, lenet_weights, mnist_npz, lenet, capsys,
                                        monkeypatch):
    out = tmp_path / "s"
    args = ["score", *lenet_args(lenet_weights, mnist_npz, out, "--layer", "all", "--num-images", "200",
                                 "--filters", "0,3,5")]
    checks = []   # --threads auto (the default): the free cores re-checked between layers
    monkeypatch.setattr(cp.threads.ThreadGovernor, "update", lambda self: checks.append(1))
    assert cli.main(args) == 0
    assert len(checks) == 2
    index = json.loads((out / "scores.json").read_text())
    assert sorted(index["layers"]) == ["conv1", "conv2"]
    data = specs.load_data(mnist_npz, "test", mean=[0], std=[1])
    for layer in ("conv1", "conv2"):
        got = cp.LayerScores.load(out / layer / "scores.npz")
        ref = cp.score_layer(lenet, layer, data, num_images=200, filters=[0, 3, 5], progress=False)
        assert got.filters.tolist() == [0, 3, 5] and torch.equal(got.counts, ref.counts)


def test_progress_bars_when_asked_and_log_lines_otherwise(tmp_path, lenet_weights, mnist_npz, capsys):
    for cmd, extra, bar in (("score", ["--layer", "conv2"], "CAR conv2"),
                            ("compress", ["--layer", "conv2", "--keep", "48"], "compress conv2")):
        args = [cmd, *lenet_args(lenet_weights, mnist_npz, tmp_path / cmd, "--num-images", "100", *extra)]
        args[args.index("none")] = "bar"    # what a terminal gets by default (--progress auto)
        assert cli.main(args) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        assert bar in err and "\r" in err
        args[args.index("bar")] = "log"
        shutil.rmtree(tmp_path / cmd)
        assert cli.main(args) == 0
        err = capsys.readouterr().err
        assert bar not in err and "\r" not in err and " carprune INFO " in err


# -- compress, finetune, deep-compress, report, bench --------------------------------------------
@pytest.fixture(scope="module")
def compressed(tmp_path_factory, lenet_weights, mnist_npz) -> Path:
    out = tmp_path_factory.mktemp("compress") / "conv2"
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = cli.main(["compress", *lenet_args(lenet_weights, mnist_npz, out, "--layer", "conv2",
                                                 "--num-images", "300", "--keep", "46")])
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert code == 0
    return out


def test_compress_result_and_downstream_commands(compressed, tmp_path, lenet_weights, mnist_npz, lenet,
                                                 capsys, monkeypatch):
    from carprune import surgery
    from carprune.deepcompress import load_compressed
    from carprune.greedy import CompressionResult

    res = CompressionResult.load(compressed, architecture=cp.models.lenet5())
    assert len(res.kept) == 46 and len(res.trajectory) == 5
    assert res.model.conv2.out_channels == 46 and res.model.fc1.in_features == 46 * 16
    run = json.loads((compressed / "run.json").read_text())
    assert run["state"] == "done" and (compressed / "checkpoint.json").is_file()
    # finetune: the compressed layer keeps its weights (lr 0), the others move
    ft = tmp_path / "ft"
    checks = []   # --threads auto (the default): the free cores re-checked at each event or step
    monkeypatch.setattr(cp.threads.ThreadGovernor, "update", lambda self: checks.append(1))
    capsys.readouterr()
    assert cli.main(["finetune", "--model", "lenet5", "--weights", str(lenet_weights),
                     "--result", str(compressed), "--data", str(mnist_npz), "--split", "train",
                     "--mean", "0", "--std", "1", "--eval-data", str(mnist_npz), "--eval-split", "test",
                     "--iters", "5", "--lr-other", "0.01", "--out", str(ft), "--progress", "log"]) == 0
    assert "carprune INFO finetune: epoch 1/1, step 5/5, loss " in capsys.readouterr().err
    assert len(checks) == 2   # the start and one epoch
    tuned = CompressionResult.load(ft, architecture=cp.models.lenet5())
    assert torch.equal(tuned.model.conv2.weight, res.model.conv2.weight)
    assert not torch.equal(tuned.model.fc2.weight, res.model.fc2.weight)
    doc = json.loads((ft / "finetune.json").read_text())
    assert tuned.finetuned_holdout_accuracy == doc["accuracy_after"] is not None
    # deep-compress the pruned model; the .cpz loads back into the pruned architecture
    dc = tmp_path / "dc"
    assert cli.main(["deep-compress", *lenet_args(lenet_weights, mnist_npz, dc, "--result", str(compressed),
                                                  "--num-images", "200", "--prune", "conv=0.5,linear=0.9",
                                                  "--bits", "6", "--kmeans-iters", "10")]) == 0
    assert len(checks) >= 2 + 4   # and deep compression's at least once per phase
    rep = json.loads((dc / "report.json").read_text())
    assert rep["file_bytes"] == (dc / "model.cpz").stat().st_size
    back = load_compressed(dc / "model.cpz", surgery.copy_model(res.model))
    assert back.conv2.weight.shape == res.model.conv2.weight.shape
    assert (back.fc1.weight != 0).float().mean().item() == pytest.approx(0.1, abs=1e-3)
    # report: one table over the compress, fine-tune and deep-compress outputs
    capsys.readouterr()
    assert cli.main(["report", str(compressed), str(ft), str(dc), "--out", str(tmp_path / "r"),
                     "--progress", "none"]) == 0
    table = (tmp_path / "r" / "report.md").read_text()
    assert table.count("| conv2 | car | 50 | 46 |") == 2 and "## Deep Compression" in table
    assert table in capsys.readouterr().out + "\n"
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "r2")]) == 2


def test_bench_quick_matches_the_naive_pass(tmp_path, lenet_weights, mnist_npz, capsys):
    out = tmp_path / "b"
    assert cli.main(["bench", *lenet_args(lenet_weights, mnist_npz, out, "--layer", "conv2",
                                          "--num-images", "64")]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["count_mismatch"] == 0 and doc["base_equal"] and doc["filters"] == 50
    assert "speed-up" in capsys.readouterr().out


# -- preemption ----------------------------------------------------------------------------------
class Watcher(threading.Thread):
    """Reads every visible JSON/.npz file of a directory in a tight loop while runs write it;
    any file that does not parse would be a half-written one."""

    def __init__(self, d: Path) -> None:
        super().__init__(daemon=True)
        self.d, self.stop, self.reads, self.bad = d, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.wait(0.005):  # leave the CPU to the runs being watched
            try:
                paths = [p for p in self.d.rglob("*") if p.is_file()]
            except FileNotFoundError:
                continue  # a temporary directory vanished while listing
            for p in paths:
                if p.name.startswith(".") or any(q.startswith(".") for q in p.relative_to(self.d).parts):
                    continue  # temporary names: never a final file
                try:
                    if p.suffix == ".json":
                        json.loads(p.read_bytes())
                        self.reads += 1
                    elif p.suffix in (".npz", ".pt"):
                        with zipfile.ZipFile(p) as z:
                            z.testzip()
                        self.reads += 1
                except (FileNotFoundError, IsADirectoryError):
                    pass  # replaced between listing and reading
                except Exception as exc:
                    self.bad.append(f"{p}: {type(exc).__name__}: {exc}")


def _steps(ckpt: Path) -> int:
    try:
        return len(json.loads(ckpt.read_text())["trajectory"]) - 1
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _start_and_signal(args: list[str], ckpt: Path, min_steps: int, sig: int) -> tuple[int, str]:
    p = subprocess.Popen([sys.executable, "-m", "carprune", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while _steps(ckpt) < min_steps:
        assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() - t0 < 180, "no progress"
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=180)
    return p.returncode, err


def test_sigterm_and_sigkill_then_resume_gives_the_identical_result(tmp_path, lenet_weights, mnist_npz):
    args = lambda out: ["compress", *lenet_args(lenet_weights, mnist_npz, out, "--layer", "conv2",
                                                "--num-images", "120", "--keep", "38"), "--progress", "log"]
    # 12 steps: room for the kill to land mid-run after the polling loop sees step first + 1
    ref_dir = tmp_path / "ref"
    assert cli.main(args(ref_dir)) == 0
    ref = json.loads((ref_dir / "result.json").read_text())
    out = tmp_path / "run"
    ckpt = out / "checkpoint.json"
    watcher = Watcher(out)
    watcher.start()
    try:
        rc, err = _start_and_signal(args(out), ckpt, 1, signal.SIGTERM)
        assert rc == cli.EXIT_PREEMPTED, err
        assert "stopped by SIGTERM" in err
        run = json.loads((out / "run.json").read_text())
        assert run["state"] == "preempted" and run["exit_code"] == 75
        first = _steps(ckpt)
        assert 1 <= first < 6 and not (out / "result.json").exists()
        rc, err = _start_and_signal(args(out), ckpt, first + 1, signal.SIGKILL)
        assert rc == -signal.SIGKILL
        assert "resuming from" in err
        second = _steps(ckpt)
        assert first + 1 <= second < 12
        p = run_cli(*args(out))
        assert p.returncode == 0, p.stderr
    finally:
        watcher.stop.set()
        watcher.join()
    assert not watcher.bad, watcher.bad
    assert watcher.reads > 0
    got = json.loads((out / "result.json").read_text())
    assert got["removed"] == ref["removed"] and got["kept"] == ref["kept"]
    strip = lambda t: [{k: v for k, v in s.items() if k != "seconds"} for s in t]
    assert strip(got["trajectory"]) == strip(ref["trajectory"])
    a = torch.load(out / "model" / "weights.pt")
    b = torch.load(ref_dir / "model" / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "run.json").read_text())["state"] == "done"


def test_resume_refuses_a_checkpoint_of_other_weights(tmp_path, lenet, lenet_weights, mnist_npz, capsys):
    out = tmp_path / "c"
    args = lambda w: ["compress", *lenet_args(w, mnist_npz, out, "--layer", "conv2", "--num-images",
                                              "100", "--keep", "49")]
    assert cli.main(args(lenet_weights)) == 0
    record = (out / "run.json").read_bytes()
    other = {k: v + 0.01 for k, v in lenet.state_dict().items()}
    torch.save(other, tmp_path / "other.pt")
    capsys.readouterr()
    # same greedy settings, other weights file: refused, naming what differs
    assert cli.main(args(tmp_path / "other.pt")) == 2
    err = capsys.readouterr().err
    assert "belongs to a run with other model/data settings (weights: [" in err
    # the outputs are still the complete run's, and run.json still says so
    assert (out / "run.json").read_bytes() == record
    assert cli.main(args(lenet_weights)) == 0   # the original settings still resume
    # a copy of the weights elsewhere, touched: the same file, so it resumes too
    copy = tmp_path / "scratch" / "w.pt"
    copy.parent.mkdir()
    shutil.copyfile(lenet_weights, copy)
    assert cli.main(args(copy)) == 0   # (other weights were refused above)


def test_a_stop_request_exits_75_at_a_step_and_the_rerun_resumes(compressed, tmp_path, lenet_weights,
                                                                 mnist_npz, capsys):
    """The flag a SIGTERM sets, read through the run layer's callbacks: compress stops after its
    first step, score after its first layer; run.json says so; the same command resumes."""
    out = tmp_path / "c"
    args = ["compress", *lenet_args(lenet_weights, mnist_npz, out, "--layer", "conv2",
                                    "--num-images", "300", "--keep", "46")]
    preempt.request_stop("SIGTERM")
    assert cli.main(args) == cli.EXIT_PREEMPTED
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "preempted" and run["exit_code"] == 75
    assert run["message"] == ("stopped by SIGTERM after step 1 of conv2; the checkpoint is complete, "
                              "run the same command again to resume")
    assert len(json.loads((out / "checkpoint.json").read_text())["trajectory"]) == 2
    assert not (out / "result.json").exists()
    preempt.clear()
    assert cli.main(args) == 0
    got, ref = (json.loads((d / "result.json").read_text()) for d in (out, compressed))
    strip = lambda t: [{k: v for k, v in s.items() if k != "seconds"} for s in t]
    assert got["removed"] == ref["removed"] and strip(got["trajectory"]) == strip(ref["trajectory"])
    capsys.readouterr()
    s_out = tmp_path / "s"
    s_args = ["score", *lenet_args(lenet_weights, mnist_npz, s_out, "--layer", "all",
                                   "--num-images", "100")]
    preempt.request_stop("SIGINT")
    assert cli.main(s_args) == cli.EXIT_PREEMPTED
    assert "stopped by SIGINT after scoring conv1 (1 of 2 layers done)" in capsys.readouterr().err
    assert (s_out / "conv1" / "scores.json").is_file() and not (s_out / "conv2").exists()
    mtime = (s_out / "conv1" / "scores.npz").stat().st_mtime_ns
    preempt.clear()
    assert cli.main(s_args) == 0
    assert (s_out / "conv1" / "scores.npz").stat().st_mtime_ns == mtime   # not scored again
    assert sorted(json.loads((s_out / "scores.json").read_text())["layers"]) == ["conv1", "conv2"]


# -- the command line as a package ---------------------------------------------------------------
def test_every_command_is_a_module_with_typed_frozen_settings():
    import dataclasses
    import importlib

    for name, options in cli.command_options().items():
        module = importlib.import_module(f"carprune.commands.{name.replace('-', '_')}")
        assert (name, module.run, module.HELP) == (module.NAME, cli.COMMANDS[name], cli.HELP[name])
        # its own module in the commands package (of the installed carprune, wherever that is)
        assert Path(module.__file__).parent == Path(cli.__file__).parent / "commands"
        assert Path(module.__file__).stem == name.replace("-", "_")
        fields = [f.name for f in dataclasses.fields(module.Settings)]
        assert module.Settings.__dataclass_params__.frozen, name
        assert sorted(fields) == sorted(o.name for o in options), name
    # scores.json records the settings in the order of the options, as before
    from carprune.commands import score

    assert [f.name for f in dataclasses.fields(score.Settings)] == [o.name for o in score.options()]
    assert sorted(cli.DISTRIBUTED) == sorted(cli.CHECKPOINTED) == ["compress", "score"]


def test_settings_are_checked_on_entry(tmp_path, capsys):
    # a check of the typed settings fails before any model or data is read
    code = cli.main(["compress", "--model", "no-such-model", "--data", "/nonexistent", "--out",
                     str(tmp_path / "o"), "--layer", "conv1", "--finetune-iters", "5"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "--finetune-iters needs training images" in err
    code = cli.main(["kse-compress", "--model", "no-such-model", "--out", str(tmp_path / "k"),
                     "--finetune-iters", "-1"])
    assert code == cli.EXIT_USAGE and "--finetune-iters must be >= 0, got -1" in capsys.readouterr().err


# -- examples ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", sorted((ROOT / "examples" / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid_for_every_command_they_configure(cfg, capsys):
    doc = config.read_config(cfg)
    parser = cli.build_parser()
    commands = [c for c in cli.command_options() if c in doc] + ["layers"]
    for cmd in commands:
        args = {"layers": [], "report": ["--out", "o", "some/dir"]}.get(cmd, ["--out", "o"])
        ns = parser.parse_args([cmd, "--config", str(cfg), *args])
        s = cli.settings_for(cmd, ns)
        for key in ("weights", "data"):
            if s.get(key):
                assert Path(s[key]).is_file(), f"{cfg.name}: {key} {s[key]} does not exist"
    assert cli.main(["layers", "--config", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = specs.load_model(doc["model"])
    assert [ln.split()[0] for ln in lines] == cp.conv_layers(model)


@pytest.mark.parametrize("script", sorted((ROOT / "examples" / "slurm").glob("*.sh")), ids=lambda p: p.name)
def test_slurm_scripts_parse_and_use_the_documented_exit_codes(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "carprune" in text
    if "scontrol requeue" in text:
        assert "75)" in text or "preempted)" in text  # requeue only a checkpointed run


# -- first-hour rough edges (issue 10) ------------------------------------------------------------
def test_a_file_that_is_no_checkpoint_is_named_without_unsafe_advice(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    junk = tmp_path / "weights.th"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    # a pickled object (not a tensor): torch's refusal carries advice to disable weights_only
    torch.save(argparse.Namespace(a=1), tmp_path / "object.th")
    for path, needle in ((junk, "is not a PyTorch checkpoint, or it is corrupt"),
                         (tmp_path / "object.th", "holds a Python object")):
        code = cli.main(["score", "--model", "lenet5", "--weights", str(path), "--data", str(MNIST),
                         "--out", "o", "--layer", "conv1", "--progress", "none"])
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE and needle in err and str(path) in err, err
        assert "weights_only" not in err and "Traceback" not in err


def test_an_out_that_cannot_be_created_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, needle in ((blocker, "exists and is not a directory"),
                        (blocker / "sub", "cannot create the output directory"),
                        (Path("/proc/carprune-out"), "cannot create the output directory"),
                        ("", "--out: out: expected a path, got ''"),   # not the current directory
                        (" ", "--out: out: expected a path, got ' '")):
        code = cli.main(["score", "--model", "lenet5", "--data", str(MNIST), "--out", str(out),
                         "--layer", "conv1", "--progress", "none"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == cli.EXIT_USAGE and len(err) == 1 and needle in err[0], err


def test_a_reader_that_closes_stdout_ends_the_command_quietly():
    # `carprune inspect --json X | head`: no BrokenPipeError traceback
    code = ("import sys\nfrom carprune import cli\n"
            "def many(*args):\n    for _ in range(20000):\n        print('x' * 100)\n    return 0\n"
            "cli.COMMANDS['layers'] = many\n"
            "sys.exit(cli.main(['layers', '--model', 'lenet5']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.read(10) == b"x" * 10
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == cli.EXIT_FAILED and err == "", err


def test_phase_progress_says_where_an_unfinished_phase_stopped(caplog):
    from carprune.logging_utils import PhaseProgress

    with caplog.at_level("INFO", logger="carprune"), PhaseProgress("log", 0, "dc") as p:
        p("retrain", 5, 5)
        p("quantise", 51, 300)
    assert "dc: retrain done: 5/5" in caplog.text and "dc: quantise stopped: 51/300" in caplog.text


def test_a_failed_check_leaves_no_checkpoint_sidecar(tmp_path, lenet_weights, mnist_npz, capsys):
    out = tmp_path / "o"
    code = cli.main(["compress", *lenet_args(lenet_weights, mnist_npz, out, "--layer", "conv1",
                                             "--keep", "500")])
    assert code == cli.EXIT_USAGE
    assert sorted(p.name for p in out.iterdir()) == ["run.json"], list(out.iterdir())


def test_help_lists_the_choices(capsys):
    for cmd, flag, choices in (("compress", "--criterion", cli.CRITERIA),
                               ("score", "--dtype", tuple(cli.DTYPES)),
                               ("score", "--progress", ("auto", "bar", "log", "none"))):
        assert cli.main([cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert f"(one of: {', '.join(choices)})" in text, (cmd, flag)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no bfloat16 instructions (the screen refuses to run)")
def test_score_through_the_bf16_screen(tmp_path, lenet_weights, mnist_npz, lenet):
    out = tmp_path / "s"
    args = ["score", *lenet_args(lenet_weights, mnist_npz, out, "--layer", "conv1",
                                 "--num-images", "300", "--screen", "bf16")]
    assert cli.main(args) == 0
    assert json.loads((out / "scores.json").read_text())["settings"]["screen"] == "bf16"
    data = specs.load_data(mnist_npz, "test", mean=[0], std=[1])
    ref = cp.score_layer(lenet, "conv1", data, num_images=300, progress=False)
    assert torch.equal(cp.LayerScores.load(out / "scores.npz").counts, ref.counts)
