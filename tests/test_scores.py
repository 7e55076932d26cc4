"""LayerScores (carprune.scores): the save/load round trip of engine scores and the named error
for a bad file; importance under any metric (an error metric, top-1 as CAR), and files of both
format versions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import carprune as cp
from carprune.metrics import FIXED_POINT_SCALE


def test_scores_save_load_roundtrip(tmp_path, resnet20, cifar_test):
    s = cp.score_layer(resnet20, "layer3.2.conv1", cifar_test.sample(50), filters=[5, 2, 9],
                       progress=False)
    p = s.save(tmp_path / "s.npz")
    t = cp.LayerScores.load(p)
    assert torch.equal(t.counts, s.counts) and torch.equal(t.filters, s.filters)
    assert t.classes == s.classes and t.layer == s.layer and t.topk == 1
    assert torch.equal(t.car, s.car)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary left behind
    (tmp_path / "bad.npz").write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable LayerScores file"):
        cp.LayerScores.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        cp.LayerScores.load(tmp_path / "missing.npz")


# -- LayerScores under any metric ------------------------------------------------------------------
def _error_scores():
    # 2 units, 2 bins of 2 and 3 images; sums in fixed point
    s = FIXED_POINT_SCALE
    return cp.LayerScores(
        layer="fc1", filters=torch.tensor([4, 1]), counts=torch.tensor([[3 * s, 9 * s], [2 * s, 6 * s]]),
        base_counts=torch.tensor([2 * s, 6 * s]), class_totals=torch.tensor([2, 3]),
        classes=["[-1, 0)", "[0, 1]"], metric="mse", higher_is_better=False, scale=s,
        grouping="bin", bin_edges=[-1.0, 0.0, 1.0])


def test_importance_of_an_error_metric():
    sc = _error_scores()
    assert sc.base_value == pytest.approx(8 / 5)
    assert sc.value.tolist() == pytest.approx([12 / 5, 8 / 5])
    # error-like: ablated - base
    assert sc.importance.tolist() == pytest.approx([4 / 5, 0.0])
    assert torch.allclose(sc.importance_c, torch.tensor([[0.5, 1.0], [0.0, 0.0]], dtype=torch.float64))
    assert sc.order().tolist() == [1, 0] and sc.least_important() == [1]
    with pytest.raises(ValueError, match="CAR is defined for top-k accuracy.*'mse'"):
        _ = sc.car
    with pytest.raises(ValueError, match="base_accuracy is defined for top-k"):
        _ = sc.base_accuracy


def test_top1_importance_is_car():
    sc = cp.LayerScores(layer="c", filters=torch.tensor([0, 1]), counts=torch.tensor([[3, 4], [5, 1]]),
                        base_counts=torch.tensor([5, 4]), class_totals=torch.tensor([6, 5]),
                        classes=["a", "b"])
    assert sc.metric == "top1" and sc.is_accuracy
    assert torch.equal(sc.car, sc.importance) and torch.equal(sc.car_c, sc.importance_c)
    assert sc.car.tolist() == pytest.approx([2 / 11, 3 / 11])
    assert sc.base_accuracy == pytest.approx(9 / 11)
    assert cp.LayerScores(layer="c", filters=torch.tensor([0]), counts=torch.tensor([[1]]),
                          base_counts=torch.tensor([1]), class_totals=torch.tensor([1]),
                          classes=["a"], topk=5).metric == "top5"
    with pytest.raises(ValueError, match="target bins need 3 bin_edges"):
        cp.LayerScores(layer="c", filters=torch.tensor([0]), counts=torch.tensor([[1, 1]]),
                       base_counts=torch.tensor([1, 1]), class_totals=torch.tensor([1, 1]),
                       classes=["a", "b"], metric="mae", higher_is_better=False, grouping="bin")


def test_scores_files_old_and_new(tmp_path):
    sc = _error_scores()
    back = cp.LayerScores.load(sc.save(tmp_path / "mse.npz"))
    for k in ("metric", "higher_is_better", "scale", "grouping", "bin_edges", "classes", "layer"):
        assert getattr(back, k) == getattr(sc, k), k
    assert torch.equal(back.counts, sc.counts) and torch.equal(back.importance, sc.importance)
    # a file written by carprune before metrics existed (format version 1) still loads as top-1
    meta = {"format": "carprune.LayerScores", "version": 1, "layer": "conv1", "classes": ["a", "b"],
            "topk": 1, "removed": [3]}
    np.savez(tmp_path / "old.npz", filters=np.array([0, 1]), counts=np.array([[1, 2], [0, 2]]),
             base_counts=np.array([1, 2]), class_totals=np.array([2, 2]),
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    old = cp.LayerScores.load(tmp_path / "old.npz")
    assert old.metric == "top1" and old.removed == [3] and old.car.tolist() == [0.0, 0.25]
    # top-k scores are still written as version 1, readable by earlier carprune
    old.save(tmp_path / "again.npz")
    with np.load(tmp_path / "again.npz") as z:
        assert json.loads(z["meta"].tobytes())["version"] == 1
