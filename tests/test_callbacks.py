"""The callbacks protocol as greedy compression speaks it: an event per step, `should_stop()`
asked right after each step's checkpoint is written, and a run stopped there resuming from its
checkpoint to exactly the result of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

import carprune as cp
from carprune.callbacks import NO_CALLBACKS, Event, Stopped, stop_point
from carprune.io import read_json


class Recorder:
    """Records events; stops when asked after step `stop_after` (None: never). When asked, it
    notes how many steps the checkpoint on disk already holds."""

    def __init__(self, checkpoint=None, stop_after=None):
        self.events: list[Event] = []
        self.asked: list[tuple[int, int | None]] = []
        self.checkpoint, self.stop_after = checkpoint, stop_after

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        step = self.events[-1].step
        on_disk = (len(read_json(self.checkpoint)["trajectory"]) - 1
                   if self.checkpoint is not None else None)
        self.asked.append((step, on_disk))
        return self.stop_after is not None and step >= self.stop_after


@pytest.fixture(scope="module")
def split(mnist_test):
    return mnist_test.sample(400, seed=1).split(0.5, seed=0)


KW = dict(keep=44, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(lenet, split):
    score, hold = split
    rec = Recorder()
    return cp.compress_layer(lenet, "conv2", score, eval_data=hold, callbacks=rec, **KW), rec


def _same_result(a, b):
    assert a.removed == b.removed and a.kept == b.kept
    strip = lambda t: [{k: v for k, v in vars(s).items() if k != "seconds"} for s in t]
    assert strip(a.trajectory) == strip(b.trajectory)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetuning_after_compression_reports_its_epochs_after_the_last_step(lenet, split):
    score, hold = split
    rec = Recorder()
    res = cp.compress_layer(lenet, "conv2", score, keep=48, progress=False, callbacks=rec,
                            finetune=cp.FineTune(train_data=score, iters=4, batch_size=50))
    algorithms = [e.algorithm for e in rec.events]
    last = algorithms.index("finetune") - 1
    assert set(algorithms[:last + 1]) == {"greedy"} and rec.events[last].data["finished"]
    assert [(e.step, e.total, e.data["steps"]) for e in rec.events[last + 1:]] == [(1, 1, 4)]
    assert res.finetuned_holdout_accuracy is None and len(res.kept) == 48


def test_a_checkpoint_resumes_only_the_same_model_on_the_same_images(lenet, split, tmp_path):
    score, hold = split
    ck = tmp_path / "ck.json"
    first = cp.compress_layer(lenet, "conv2", score, eval_data=hold, checkpoint=ck, keep=48,
                              progress=False)
    again = cp.compress_layer(lenet, "conv2", score, eval_data=hold, checkpoint=ck, keep=48,
                              progress=False)
    assert again.removed == first.removed and again.trajectory == first.trajectory
    other = cp.surgery.copy_model(lenet)
    with torch.no_grad():
        other.conv1.weight[0, 0, 0, 0] += 1e-3
    for model, data, what in ((other, score, "model_state"), (lenet, hold, "score_data")):
        with pytest.raises(ValueError, match=rf"different run \({what}: \S+ -> \S+\); use"):
            cp.compress_layer(model, "conv2", data, eval_data=hold, checkpoint=ck, keep=48,
                              progress=False)


def test_events_follow_the_trajectory(uninterrupted):
    res, rec = uninterrupted
    steps = len(res.trajectory) - 1
    assert steps == 6
    start, *per_step, last = rec.events
    assert start.step == 0 and start.algorithm == "greedy"
    assert start.data["done"] == 0 and start.data["total"] == 50 - 44
    assert start.data["label"] == "compress conv2" and start.data["unit"] == "filter"
    assert [e.step for e in per_step] == list(range(1, steps + 1))
    for e, s in zip(per_step, res.trajectory[1:], strict=True):
        assert e.data["removed"] == s.removed and e.data["kept"] == s.kept
        assert e.data["done"] == 50 - s.kept
        assert e.data["score_accuracy"] == s.score_accuracy
        assert e.data["holdout_accuracy"] == s.holdout_accuracy
        assert e.message.startswith(f"conv2: removed filter {s.removed[0]} (CAR ")
        assert e.message.endswith(f"; {s.kept} of 50 left")
    assert last.data["finished"] and last.data["done"] == 6 and "kept 44 of 50" in last.message
    # asked once per step, never at the start or the end
    assert [step for step, _ in rec.asked] == list(range(1, steps + 1))


@pytest.mark.parametrize("k", [1, 4])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path, lenet, split, uninterrupted, k):
    score, hold = split
    full, _ = uninterrupted
    ckpt = tmp_path / "run.ckpt"
    stopper = Recorder(ckpt, stop_after=k)
    with pytest.raises(Stopped, match=rf"stopped after step {k} of conv2; the checkpoint is "
                                      "complete"):
        cp.compress_layer(lenet, "conv2", score, eval_data=hold, checkpoint=ckpt,
                          callbacks=stopper, **KW)
    # asked only once the step's checkpoint was on disk
    assert stopper.asked == [(i, i) for i in range(1, k + 1)]
    assert len(read_json(ckpt)["trajectory"]) - 1 == k
    rec = Recorder(ckpt)
    resumed = cp.compress_layer(lenet, "conv2", score, eval_data=hold, checkpoint=ckpt,
                                callbacks=rec, **KW)
    _same_result(resumed, full)
    assert rec.events[0].step == 0 and rec.events[0].data["done"] == k   # resumed, not redone
    assert [e.step for e in rec.events[1:-1]] == list(range(k + 1, 7))


def test_no_callbacks_never_stop_and_stop_point_names_where():
    stop_point(None, "step 1")
    stop_point(NO_CALLBACKS, "step 1")

    class Always:
        def on_event(self, event):
            pass

        def should_stop(self):
            return True

    with pytest.raises(Stopped, match="stopped after step 3 of conv1; the checkpoint is complete"):
        stop_point(Always(), "step 3 of conv1")
