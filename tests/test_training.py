"""The one training loop (carprune.training): its samplings draw what the former loops drew
(checked against torch's DataLoader and against independent re-implementations of the former
fine-tuning and model-training loops, bit for bit), hooks and callbacks run where documented,
and the model's flags and modes come back as they were."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import carprune as cp
from carprune.callbacks import Event
from carprune.training import Schedule, sample_batches, train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mnist_train():
    return cp.data.mnist5k(DATA / "mnist_5k.npz", "train").sample(300, seed=1)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        return False


@pytest.mark.parametrize(("n", "bs", "seed"), [(20, 8, 0), (7, 7, 3), (5, 64, 1), (513, 64, 2)])
def test_loader_sampling_draws_what_a_seeded_dataloader_draws(n, bs, seed):
    dl = DataLoader(list(range(n)), batch_size=bs, shuffle=True,
                    generator=torch.Generator().manual_seed(seed))
    want = [b.tolist() for _ in range(4) for b in dl]
    it = sample_batches(n, Schedule(batch_size=bs, sampling="loader", seed=seed))
    assert [next(it).tolist() for _ in want] == want


def test_random_and_epoch_samplings():
    it = sample_batches(10, Schedule(batch_size=4, sampling="random", seed=5))
    rng = np.random.default_rng(5)
    for _ in range(6):
        assert np.array_equal(next(it), rng.integers(0, 10, size=4))
    it = sample_batches(10, Schedule(batch_size=4, sampling="epochs", seed=5))
    rng = np.random.default_rng(5)
    for _ in range(3):
        perm = rng.permutation(10)
        for s in (0, 4, 8):
            assert np.array_equal(next(it), perm[s:s + 4])


def _reference_finetune(model, layer_own, layer_next, data, iters, bs, lrs, seed):
    """The CAR paper's fine-tuning written out: eval mode, numpy draws with replacement, SGD
    with momentum 0.9 and three learning-rate groups (the compressed layer frozen at 0)."""
    groups = {"own": [], "next": [], "other": []}
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        g = "own" if mod in layer_own else "next" if mod in layer_next else "other"
        groups[g].append(p)
    for p in groups["own"]:
        p.requires_grad_(False)
    opt = torch.optim.SGD([{"params": groups[g], "lr": lrs[g]} for g in ("next", "other")],
                          momentum=0.9)
    rng = np.random.default_rng(seed)
    x_all, y_all = data.batch(np.arange(len(data)))
    model.eval()
    for _ in range(iters):
        idx = rng.integers(0, len(data), size=bs)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in groups["own"]:
        p.requires_grad_(True)
    return model


def test_finetune_equals_the_papers_loop_written_out(lenet, mnist_train):
    pruned = cp.prune_filters(lenet, "conv2", [1, 4, 7])
    ref = _reference_finetune(copy.deepcopy(pruned), {"conv2"}, {"fc1"}, mnist_train, 12, 16,
                              {"next": 1e-3, "other": 1e-4}, 7)
    rec = Recorder()
    got = cp.finetune(copy.deepcopy(pruned), "conv2",
                      cp.FineTune(train_data=mnist_train, iters=12, batch_size=16, seed=7), rec)
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert not torch.equal(got.fc1.weight, pruned.fc1.weight)           # it did train
    assert torch.equal(got.conv2.weight, pruned.conv2.weight)          # lr_layer 0: frozen
    assert all(p.requires_grad for p in got.parameters()) and not got.training
    # 300 images in batches of 16: 19 steps an epoch, so 12 steps are one partial epoch
    assert [(e.algorithm, e.step, e.total, e.data["steps"]) for e in rec.events] == \
        [("finetune", 1, 1, 12)]


def _reference_fit(data, epochs, seed):
    """The project's model training written out: seeded init, numpy permutation per epoch,
    SGD (lr 0.05, momentum 0.9, weight decay 5e-4), cosine schedule per epoch, train mode."""
    torch.manual_seed(seed)
    model = cp.models.lenet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    x_all, y_all = data.batch(np.arange(len(data)))
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(data)))
        for s in range(0, len(perm), 64):
            loss = F.cross_entropy(model(x_all[perm[s:s + 64]]), y_all[perm[s:s + 64]])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def test_fit_equals_the_training_loop_written_out(mnist_train):
    cfg = {**cp.models.train.TRAIN_SETTINGS, "epochs": 2}
    rec = Recorder()
    got = cp.models.fit(cp.models.lenet5, mnist_train, F.cross_entropy, cfg, callbacks=rec)
    ref = _reference_fit(mnist_train, 2, 0)
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert [(e.step, e.total, e.data["steps"]) for e in rec.events] == [(1, 2, 5), (2, 2, 10)]
    assert all(math.isfinite(e.data["loss"]) and e.data["loss"] > 0 for e in rec.events)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.conv(x)).mean((2, 3))))


def _toy(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_hooks_callbacks_flags_and_modes():
    torch.manual_seed(0)
    model = Net()
    model.fc.bias.requires_grad_(False)      # a flag set by the caller comes back
    model.drop.train(False)                   # so does a module's own mode
    x, y = _toy()
    calls = []
    rec = Recorder()

    def after_backward():
        calls.append(("backward", model.conv.weight.grad is not None))

    def after_step(step, loss):
        calls.append(("step", step, loss))

    bn_mean = model.bn.running_mean.clone()
    log = train(model, (x, y), Schedule(iters=7, batch_size=16, lr=0.1, sampling="epochs",
                                         mode="frozen_bn"),
                params=[model.conv.weight, model.conv.bias], after_backward=after_backward,
                after_step=after_step, callbacks=rec, name="toy", phase="p")
    assert calls[0::2] == [("backward", True)] * 7
    assert [c[1] for c in calls[1::2]] == list(range(1, 8))
    assert [c[2] for c in calls[1::2]] == log.losses
    # 40 images in batches of 16: 3 steps an epoch -> epochs after steps 3, 6 and the last, 7
    assert [(e.algorithm, e.step, e.total, e.data["steps"]) for e in rec.events] == \
        [("toy", 1, 3, 3), ("toy", 2, 3, 6), ("toy", 3, 3, 7)]
    assert [e.data["loss"] for e in rec.events] == pytest.approx(
        [np.mean(log.losses[0:3]), np.mean(log.losses[3:6]), log.losses[6]])
    assert all(e.data["phase"] == "p" and "toy p: epoch" in e.message for e in rec.events)
    assert log.epoch_losses == [e.data["loss"] for e in rec.events]
    assert torch.equal(model.bn.running_mean, bn_mean)       # frozen_bn: statistics unchanged
    assert model.training and not model.drop.training and model.bn.training
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, True, False]
    assert all(p.grad is None for p in model.parameters())
    # mode "train": BatchNorm statistics move
    train(model, (x, y), Schedule(iters=2, batch_size=16, lr=0.1, mode="train"))
    assert not torch.equal(model.bn.running_mean, bn_mean)


def test_a_dataloader_is_read_through_its_dataset():
    x, y = _toy()
    torch.manual_seed(1)
    model = Net()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    sched = Schedule(iters=5, batch_size=8, lr=0.1, sampling="loader", seed=3)
    train(a, TensorDataset(x, y), sched)
    train(b, DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True), sched)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    assert not torch.equal(a.conv.weight, model.conv.weight)


def test_custom_loss_and_epochs_and_cosine():
    x, y = _toy()
    torch.manual_seed(2)
    model = Net()
    seen = []

    def loss(out, target):
        seen.append(out.shape[0])
        return F.cross_entropy(out, target) * 2

    log = train(model, (x, y), Schedule(epochs=2, batch_size=16, lr=0.1, sampling="epochs",
                                        lr_schedule="cosine"), loss=loss)
    assert log.steps == 6 and seen == [16, 16, 8] * 2
    assert log.final_loss == log.losses[-1]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"optimizer": "rmsprop"}, r"Schedule\.optimizer must be one of sgd, adam; got 'rmsprop'"),
    ({"sampling": "shuffle"}, r"Schedule\.sampling must be one of random, epochs, loader"),
    ({"mode": "test"}, r"Schedule\.mode must be one of eval, frozen_bn, train"),
    ({"iters": -1}, r"Schedule\.iters must be an int >= 0, got -1"),
    ({"batch_size": 0}, r"Schedule\.batch_size must be an int >= 1, got 0"),
    ({"lr": float("nan")}, r"Schedule\.lr must be a finite number >= 0, got nan"),
])
def test_bad_schedules_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def test_empty_data_and_nothing_to_train_are_named():
    model = Net()
    x, y = _toy()
    with pytest.raises(ValueError, match="the training data is empty"):
        train(model, (x[:0], y[:0]), Schedule(iters=1))
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, (x, y), Schedule(iters=1), params=[])
    with pytest.raises(ValueError, match="fine-tuning needs training data"):
        cp.finetune(model, [], cp.FineTune())
    with pytest.raises(ValueError, match=r"FineTune needs iters >= 0 .* got iters=-2"):
        cp.FineTune(iters=-2)
