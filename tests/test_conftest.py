"""tests/conftest.py without the shared data: the op tests run and the data tests skip naming the
missing file; under CI the same run is an error before any test runs. Each case runs pytest on
tests/test_ops.py in a subprocess with CARPRUNE_SHARED pointing elsewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import CIFAR, RESNET20, ROOT, SHARED, require

# two quick op tests that need no data, and the three that read CIFAR-10 and ResNet-20 ("real")
SELECT = ["tests/test_ops.py", "-k", "noncontiguous or channel_out_of_range or real"]


def run_pytest(shared, ci: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "CARPRUNE_SHARED")}
    env["CARPRUNE_SHARED"] = str(shared)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def counts(out: str) -> dict[str, int]:
    """{'passed': n, 'skipped': n, ...} from pytest's closing line."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|errors?|deselected)", out)}


def test_missing_data_skips_data_tests_and_runs_op_tests(tmp_path):
    absent = tmp_path / "no-shared"
    r = run_pytest(absent, None, *SELECT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    n = counts(out)
    assert n.get("passed", 0) >= 2 and not {"failed", "error", "errors"} & set(n), out  # op tests ran
    # each real-data test (3 on the CPU; CUDA skips first without a device) is skipped naming a
    # missing file it needs: ResNet-20's weights or CIFAR-10, whichever fixture came first
    needed = "|".join(re.escape(str(p)) for p in (absent / "data" / "cifar10-jpeg.tar.gz",
                                                   absent / "data" / "models" / "resnet20-12fca82f.th"))
    reason = re.compile(rf"SKIPPED \[(\d+)\] .*needs the shared data, missing: ({needed})")
    assert sum(int(m.group(1)) for m in reason.finditer(out)) >= 3, out
    assert f"carprune shared data: {absent / 'data'} (missing 4 of 4 files" in out


def test_missing_data_in_ci_is_an_error(tmp_path):
    absent = tmp_path / "no-shared"
    for ci in ("true", "1"):
        r = run_pytest(absent, ci, *SELECT)
        out = r.stdout + r.stderr
        assert r.returncode == 4, out  # pytest's usage error: nothing ran
        assert "CI=" in out and "the shared data is missing" in out
        assert str(absent / "data" / "cifar10-jpeg.tar.gz") in out
        assert str(absent / "data" / "models" / "resnet20-12fca82f.th") in out
        assert "passed" not in out and "skipped" not in out


@pytest.mark.slow
def test_present_data_in_ci_runs_the_data_tests():
    """The positive control: with the data where CARPRUNE_SHARED says, CI=true runs the real-data
    tests (nothing skipped but CUDA cases without a device)."""
    require(CIFAR, RESNET20)
    r = run_pytest(SHARED, "true", *SELECT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "needs the shared data" not in out
    assert counts(out).get("passed", 0) >= 5, out  # 2 op tests + 3 real-data tests on the CPU
    assert f"carprune shared data: {SHARED / 'data'} (all present)" in out
