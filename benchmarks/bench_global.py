"""Whole-network compression to a FLOPs target (issue #12, "Evidence"): CAR-global against group
magnitude (L1), Taylor and random, with and without identical fine-tuning; whether accuracy
before fine-tuning predicts accuracy after it; the round rule; the cost model of a CAR run.

    python -m benchmarks.bench_global --part a --net resnet20     # head-to-head at 0.5 FLOPs
    python -m benchmarks.bench_global --part a --net resnet32
    python -m benchmarks.bench_global --part b --net resnet20     # ~20 subnetworks, rank correlation
    python -m benchmarks.bench_global --part c                    # round rule (ResNet-20, 0.9 FLOPs)
    python -m benchmarks.bench_global --part d                    # cost model of the CAR run of (a)
    python -m benchmarks.bench_global --part e                    # exact search vs full scoring
    python -m benchmarks.bench_global --part e --e-round 100      # the same at (d)'s round 101
    python -m benchmarks.bench_global --part f                    # (a)'s CAR run on 2 processes
    python -m benchmarks.bench_global --part g                    # (a) with other fine-tuning seeds
    python -m benchmarks.bench_global --part all --net resnet20   # every part, in that order
    python -m benchmarks.bench_global --part all --quick          # tiny smoke run (1 thread)

Each part writes out/bench/global/<net>-<part>.json and .md (``--quick``: out/bench/global-quick/)
and prints the table. Slow results are cached under out/bench/global/<net>/: every pruned network
(`GlobalCompressionResult.save`, keyed by its settings; a CAR run also keeps a per-round
checkpoint, so a killed run resumes with the same choices) and every accuracy record (keyed by
network, hold-out and fine-tuning settings). A rerun, or a later part, reuses them: part (d) reads
the CAR run of part (a) when --score-images is the same (1,000 by default), part (b) reuses (a)'s
CAR run and the accuracies before fine-tuning. Delete the directory to measure afresh.

Data (../shared/data: the CIFAR-10 JPEG copy and the pretrained ResNet-20/32). One seeded
permutation (--seed) of the 50,000 TRAIN images: its first 5,000 are the scoring pool (CAR, Taylor
and Torch-Pruning's Taylor use its first --score-images), the rest the fine-tuning pool (its first
--ft-images; part (b) its first --rank-ft-images). The HOLD-OUT is the TEST split (all 10,000
images by default, --holdout-images for a seeded subset): no score ever saw it. FLOPs (conv +
linear multiply-accumulates per image, `cp.count_cost`) and parameters (every tensor, BatchNorm
included) are measured on the physically pruned models.

Fine-tuning (parts a and b), the same for every network of a part, through the project's one
training loop (`carprune.training.train`): SGD momentum 0.9, lr 0.01 annealed to 0 by a cosine per
epoch, weight decay 5e-4, batch 128, a seeded permutation per epoch (sampling "epochs", seed
--seed), every parameter trained, mode "train" (BatchNorm statistics adapt to the pruned network:
ordinary fine-tuning). Part (a): --ft-epochs (5) over --ft-images (10,000); part (b): --rank-ft-
epochs (2) over --rank-ft-images (5,000). The unpruned network gets the same fine-tuning (on this
JPEG copy fine-tuning alone raises accuracy: it is the reference, not the pretrained number).

Facts measured before this benchmark was written (not re-measured here):
- Torch-Pruning 1.6.1 cannot prune the option-A CIFAR ResNets as they are: its dependency graph
  treats the channel-padding shortcut (F.pad on the channel dim) as element-wise, and the
  MetaPruner-pruned ResNet-20 fails at the classifier ("mat1 and mat2 shapes cannot be multiplied
  (1x57 and 36x10)"). Hence the head-to-head runs every criterion over carprune's unit set
  (`cp.prunable_units`: 12 units on ResNet-20, 18 on ResNet-32: each block's first conv, and the
  residual streams, a stage's stream channels joined with the stream channels the padding
  shortcut copies them into), with Torch-Pruning's importance DEFINITIONS re-implemented in
  `carprune.importance` (group L1 magnitude, GroupMagnitudeImportance with mean reduction and
  mean normaliser; Taylor, GroupTaylorImportance), all ranked by carprune's rule (importance per
  FLOP saved, `cost_aware=True`; static criteria one-shot), plus the same criteria ranked by
  importance alone (`cost_aware=False`, Torch-Pruning's global ranking), rows "/by-importance".
- This benchmark also runs Torch-Pruning ITSELF (rows "tp-l1", "tp-taylor"; skipped when
  torch_pruning is not importable): the padding shortcut is replaced by `MapShortcut` (the same
  function: subsample, place input channel k at a fixed output position, zeros elsewhere) with a
  custom pruner registered through MetaPruner's `customized_pruners`; its input and output
  channels are pruned independently (like a conv), so Torch-Pruning's groups are FINER than
  carprune's units (a stage's stream is not coupled with the next stage's); removing an input
  channel turns the output position it filled into a zero channel. Checked while writing this:
  pruning one group through it (a padded and a copied layer-2 stream channel, a layer-1 and a
  layer-3 stream channel) equals the masked float64 network (max |diff| <= 4.4e-15). It prunes
  with `global_pruning=True`, 1 % of the channels per step (pruning_ratio 0.8 over 80 steps,
  importance recomputed every step; Taylor on the scoring images before each step) until the
  FLOPs reach the target.

Cost (measured while writing, 1 thread, other helpers' jobs running, load 2-4 on 2 cores: smoke
figures, not results): fine-tuning ResNet-20 costs 3.9 ms per training image unpruned and 2.6 ms
at half the FLOPs (39 s and 26 s per epoch of 10,000 images); evaluation 1.8 ms (unpruned) and
1.2 ms (half) per image; one CAR round of ResNet-20 (all 400 unit channels, 100 scoring images)
12.4 s, of ResNet-32 (624 channels) 28.2 s; the whole ResNet-20 CAR run to 0.5 FLOPs on 100
scoring images took 45 rounds (3 channels each, 133 channels) and 562 s. A round's cost grows
linearly with the scoring images. Estimates for 2 idle cores (about 0.55 x the 1-thread times):
- part (a), ResNet-20: the CAR run on 1,000 images 45-55 min (shared with part (d)), the other
  networks 2-4 min, fine-tuning 10 networks x 5 epochs x 10,000 images about 14 min, evaluation
  (20 x 10,000 images) about 3 min: about 65-75 min from nothing, 20 min with the CAR run cached.
  ResNet-32 (400 scoring images): CAR run 40-50 min, fine-tuning about 23 min, 5 min more.
  To fit 45 min: --score-images 500 (ResNet-20) or 250 (ResNet-32), or --ft-epochs 3.
- part (b), ResNet-20: one-shot CAR scoring about 1 min, CAR runs on 200 images with the
  default rule (about 10 min) and with 6 channels per round (about 5 min), 20 fine-tunings of
  2 x 5,000 images about 6 min, evaluations about 5 min: about 27 min (with (a) cached).
- part (c): strict greedy about 20 rounds of 300 images (about 7 min), 3 channels a round
  about 7 rounds (about 3 min).
- part (d): seconds with (a)'s CAR run cached; else the CAR run itself.
The quick run (--quick, 1 thread) takes about 2 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import carprune as cp
from carprune import fold
from carprune import importance as imps
from carprune.callbacks import Event
from carprune.global_mode import rank_key
from carprune.io import atomic_write, fingerprint, read_json, write_json
from carprune.training import Schedule, train

from .common import OUT, cifar_test, cifar_train, resnet20, resnet32

GEMM_GFLOPS = 98.0       # fp32 GEMM on 2 threads, measured on these machines (issue #12)
NETS: dict[str, Callable[[], nn.Module]] = {"resnet20": resnet20, "resnet32": resnet32}
SCORE_POOL = 5000        # the first 5,000 of the permuted training images: the scoring pool
# default scoring images of parts (a), (b), (d): 1,000 for ResNet-20 (the issue's run, shared by
# (a) and (d)); 400 for ResNet-32, whose CAR rounds cost 2.3x ResNet-20's (see the estimates)
SCORE_IMAGES = {"resnet20": 1000, "resnet32": 400}
INPUT = (3, 32, 32)


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    net: str = "resnet20"
    flops_target: float = 0.5
    score_images: int = 0             # 0: the network's default (SCORE_IMAGES)
    ft_epochs: int = 5
    ft_images: int = 10000
    rank_ft_epochs: int = 2
    rank_ft_images: int = 5000
    holdout_images: int = 10000
    c_flops_target: float = 0.9
    c_score_images: int = 300
    c_holdout_images: int = 2000      # the per-round hold-out curve of part (c)
    subnetworks: int = 20             # part (b): the first N of the list
    seed: int = 0
    tp: bool = True
    quick: bool = False
    threads: int | None = None
    out: str = ""
    profile: bool = False             # part (e): where the search's time goes (torch.profiler)
    e_round: int = 0                  # part (e): the network after this many rounds of part (d)
    ft_seeds: int = 3                 # part (g): fine-tuning seeds, part (a)'s first
    g_rows: tuple[str, ...] = ()      # part (g): only these networks of part (a) (default all)

    @property
    def outdir(self) -> Path:
        return Path(self.out) if self.out else OUT / ("global-quick" if self.quick else "global")


QUICK = dict(flops_target=0.9, score_images=50, ft_epochs=1, ft_images=500, rank_ft_epochs=1,
             rank_ft_images=500, holdout_images=1000, c_flops_target=0.95, c_score_images=50,
             c_holdout_images=500, subnetworks=4, threads=1)


@dataclass(frozen=True)
class FineTune:
    epochs: int
    images: int
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    mode: str = "train"
    sampling: str = "epochs"
    seed: int = 0

    def schedule(self) -> Schedule:
        return Schedule(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                        momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed,
                        sampling=self.sampling, lr_schedule=self.lr_schedule, mode=self.mode)


class Data:
    """The seeded splits (see the module docstring)."""

    def __init__(self, s: Settings) -> None:
        self.train = cifar_train()
        self.test = cifar_test()
        perm = np.random.default_rng(s.seed).permutation(len(self.train))
        self.score_pool, self.ft_pool = perm[:SCORE_POOL], perm[SCORE_POOL:]
        self.seed = s.seed
        n = s.holdout_images
        self.holdout = self.test if n >= len(self.test) else self.test.sample(n, seed=s.seed)

    def score(self, n: int) -> cp.data.ImageArrayDataset:
        if not 0 < n <= SCORE_POOL:
            raise ValueError(f"--score-images must lie in [1, {SCORE_POOL}], got {n}")
        return self.train.subset(np.sort(self.score_pool[:n]))

    def ft(self, n: int) -> cp.data.ImageArrayDataset:
        if not 0 < n <= len(self.ft_pool):
            raise ValueError(f"fine-tuning images must lie in [1, {len(self.ft_pool)}], got {n}")
        return self.train.subset(np.sort(self.ft_pool[:n]))

    def curve_holdout(self, n: int) -> cp.data.ImageArrayDataset:
        return self.test.sample(min(n, len(self.test)), seed=self.seed + 1)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _env(s: Settings) -> dict[str, Any]:
    return {"threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average": _load(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "block_cache": os.environ.get("CARPRUNE_BLOCK_CACHE", "1") != "0"}


class _Print:
    """Callbacks that print every event of a long run (a benchmark may print)."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.t0 = prefix, time.perf_counter()

    def on_event(self, event: Event) -> None:
        print(f"  [{self.prefix} {time.perf_counter() - self.t0:7.1f} s] {event.message}",
              flush=True)

    def should_stop(self) -> bool:
        return False


# -- Torch-Pruning on the option-A ResNets --------------------------------------------------------
class MapShortcut(nn.Module):
    """The option-A shortcut for Torch-Pruning: subsample by 2, output position j holds input
    channel mapping[j] (None: a zero channel). Index tensors are buffers (fx- and TP-traceable)."""

    def __init__(self, mapping: list[int | None], in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.mapping: list[int | None] = []
        self.register_buffer("pos", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("src", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.set_mapping(mapping, in_channels)

    def set_mapping(self, mapping: list[int | None], in_channels: int) -> None:
        self.mapping, self.in_channels = list(mapping), in_channels
        self.pos = torch.tensor([j for j, c in enumerate(mapping) if c is not None],
                                dtype=torch.int64)
        self.src = torch.tensor([c for c in mapping if c is not None], dtype=torch.int64)
        self.out_channels = len(mapping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, :, ::2, ::2]
        out = y.new_zeros((y.shape[0], self.out_channels, y.shape[2], y.shape[3]))
        return out.index_copy(1, self.pos, y.index_select(1, self.src))


def _tp_pruner_class():
    import torch_pruning as tp

    class MapShortcutPruner(tp.pruner.function.BasePruningFunc):
        """Output positions and input channels pruned independently (no intra-layer coupling)."""

        def prune_out_channels(self, layer: MapShortcut, idxs):
            drop = {int(i) for i in idxs}
            layer.set_mapping([c for j, c in enumerate(layer.mapping) if j not in drop],
                              layer.in_channels)
            return layer

        def prune_in_channels(self, layer: MapShortcut, idxs):
            drop = {int(i) for i in idxs}
            keep = [c for c in range(layer.in_channels) if c not in drop]
            new = {c: k for k, c in enumerate(keep)}
            layer.set_mapping([None if c is None or c in drop else new[c] for c in layer.mapping],
                              len(keep))
            return layer

        def get_out_channels(self, layer: MapShortcut) -> int:
            return layer.out_channels

        def get_in_channels(self, layer: MapShortcut) -> int:
            return layer.in_channels

    return MapShortcutPruner


def to_tp(model: nn.Module) -> nn.Module:
    """`model` (an unpruned carprune CIFAR ResNet) with every PadShortcut replaced by the same
    function as a MapShortcut, in place."""
    from carprune.models.resnet_cifar import PadShortcut

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PadShortcut):
                if child.out_index is not None:
                    raise ValueError("to_tp needs an unpruned network")
                n_in = 2 * child.pad
                setattr(parent, name, MapShortcut([None] * child.pad + list(range(n_in))
                                                  + [None] * child.pad, n_in))
    return model


def tp_prune(model: nn.Module, criterion: str, flops_target: float, score: Any,
             x: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning's MetaPruner, global ranking, 1 % of the channels per step, until the FLOPs
    are at most flops_target x the original. criterion 'l1' or 'taylor' (gradients of the
    summed cross-entropy over `score` before every step)."""
    import torch_pruning as tp

    net = to_tp(model).eval()
    base = cp.count_cost(net, INPUT).total_flops
    if criterion == "l1":
        imp = tp.importance.GroupMagnitudeImportance(p=1)
    elif criterion == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        raise ValueError(f"criterion must be 'l1' or 'taylor', got {criterion!r}")
    steps = 80
    pruner = tp.pruner.MetaPruner(net, x, importance=imp, global_pruning=True, pruning_ratio=0.8,
                                  iterative_steps=steps, ignored_layers=[net.linear],
                                  customized_pruners={MapShortcut: _tp_pruner_class()()})
    done = 0
    for step in range(1, steps + 1):
        done = step
        if criterion == "taylor":
            net.zero_grad(set_to_none=True)
            n = len(score)
            for s0 in range(0, n, 64):
                xb, yb = score.batch(np.arange(s0, min(n, s0 + 64)))
                nn.functional.cross_entropy(net(xb), yb, reduction="sum").backward()
        pruner.step()
        if cp.count_cost(net, INPUT).total_flops <= flops_target * base:
            break
    net.zero_grad(set_to_none=True)
    widths = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    return net.eval(), {"tp_steps": done, "tp_version": _tp_version(), "widths": widths}


def _tp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "?"


def _tp_available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


# -- importance objects for the mixed subnetworks of part (b) -------------------------------------
class Fixed:
    """Fixed per-channel values (computed once on the unpruned network): a static criterion."""

    rescore = False

    def __init__(self, name: str, values: dict[str, list[float]]) -> None:
        self.name, self.values = name, values

    def __call__(self, model: nn.Module, analysis: cp.UnitAnalysis, units) -> dict[str, torch.Tensor]:
        out = {}
        for u in units:
            v = self.values[u]
            if len(v) != analysis.unit(u).num_channels:
                raise ValueError(f"Fixed values of {u!r}: {len(v)} values for "
                                 f"{analysis.unit(u).num_channels} channels (an unpruned network "
                                 "is expected)")
            out[u] = torch.tensor(v, dtype=torch.float64)
        return out


def shuffled(values: dict[str, list[float]], which: str, seed: int) -> dict[str, list[float]]:
    """Each chosen unit's values permuted among its channels (seeded): how many channels a unit
    loses stays about the criterion's, which channels go is random. which: 'all' or 'half' (a
    seeded half of the units)."""
    rng = np.random.default_rng(seed)
    names = sorted(values)
    chosen = set(names) if which == "all" else set(
        names[i] for i in rng.permutation(len(names))[:len(names) // 2])
    return {u: (rng.permutation(np.asarray(v)).tolist() if u in chosen else list(v))
            for u, v in values.items()}


# -- rank correlation (numpy only) ---------------------------------------------------------------
def ranks(v) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    v = np.asarray(v, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    r = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def kendall_tau_b(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    s = float((da * db).sum())
    den = math.sqrt(float((da != 0).sum()) * float((db != 0).sum()))
    return s / den if den > 0 else math.nan


def permutation_p(a, b, stat: Callable, n: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of `stat` under random pairing (seeded permutations)."""
    rng = np.random.default_rng(seed)
    obs = abs(stat(a, b))
    b = np.asarray(b)
    hits = sum(abs(stat(a, rng.permutation(b))) >= obs - 1e-12 for _ in range(n))
    return (hits + 1) / (n + 1)


# -- building and measuring subnetworks ----------------------------------------------------------
class Bench:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.data = Data(s)
        self.base_dir = s.outdir / s.net
        self.x = self.data.test.batch([0])[0]
        self._oneshot: dict[int, dict[str, list[float]]] = {}

    def model(self) -> nn.Module:
        return NETS[self.s.net]().eval()

    def ident(self, spec: dict[str, Any]) -> str:
        """The identity of a subnetwork: its settings without the display name (equal settings
        under two names share their caches)."""
        return fingerprint({"net": self.s.net, "seed": self.s.seed,
                            "spec": {k: v for k, v in spec.items() if k != "name"}})

    # one-shot CAR: every unit channel scored once on the unpruned network
    def oneshot_values(self, images: int) -> dict[str, list[float]]:
        if images in self._oneshot:
            return self._oneshot[images]
        path = self.base_dir / "nets" / f"car-oneshot-{self.ident({'oneshot': images})}.json"
        if path.exists():
            vals = read_json(path, "one-shot CAR values")["values"]
        else:
            m = self.model()
            an = cp.prunable_units(m, self.x)
            car = imps.CAR(self.data.score(images), num_images=images, seed=self.s.seed)
            t0 = time.perf_counter()
            v = car(m, an, [u.name for u in an.units])
            vals = {u: t.tolist() for u, t in v.items()}
            write_json(path, {"images": images, "seconds": time.perf_counter() - t0,
                              "values": vals, "env": _env(self.s)})
        self._oneshot[images] = vals
        return vals

    def criterion(self, spec: dict[str, Any]) -> Any:
        c = spec["criterion"]
        if c == "l1-producers":
            return imps.Magnitude(1, scope="producers")
        if c.startswith("car-oneshot"):
            vals = self.oneshot_values(spec["images"])
            if spec.get("shuffle"):
                vals = shuffled(vals, spec["shuffle"], spec.get("seed", 0))
            return Fixed(c, vals)
        return c

    def global_run(self, spec: dict[str, Any], eval_data: Any = None
                   ) -> tuple[cp.GlobalCompressionResult, dict[str, Any]]:
        """compress_global for `spec`, cached (result + meta.json, a checkpoint while it runs)."""
        d = self.base_dir / "nets" / f"{spec['criterion']}-{self.ident(spec)}"
        meta_path = d / "meta.json"
        if meta_path.exists():
            meta = read_json(meta_path, "run record")
            return cp.GlobalCompressionResult.load(d / "result", self.model()), meta
        d.mkdir(parents=True, exist_ok=True)
        images = spec.get("images")
        score = self.data.score(images or self.s.score_images)
        ckpt = d / "checkpoint.json"
        resumed = ckpt.exists()
        env0 = _env(self.s)
        print(f"  {spec['name']}: compress_global ({json.dumps(spec)})", flush=True)
        t0 = time.perf_counter()
        res = cp.compress_global(
            self.model(), "all", score, flops_target=spec["flops_target"],
            criterion=self.criterion(spec), eval_data=eval_data, example_input=self.x,
            score_images=images, per_round=spec.get("per_round"),
            cost_aware=spec.get("cost_aware", True), seed=spec.get("seed", self.s.seed),
            checkpoint=ckpt if spec["criterion"] == "car" else None,
            callbacks=_Print(spec["name"]) if spec["criterion"] == "car" else None)
        wall = time.perf_counter() - t0
        res.save(d / "result")
        meta = {"spec": spec, "wall_s": wall, "resumed": resumed, "env_start": env0,
                "load_end": _load()}
        write_json(meta_path, meta)
        return res, meta

    def build(self, spec: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        """A fresh pruned model for `spec` and what its making cost."""
        kind = spec["kind"]
        if kind == "none":
            return self.model(), {"seconds": 0.0}
        if kind == "global":
            res, meta = self.global_run(spec)
            return res.model.eval(), {
                "seconds": meta["wall_s"], "rounds": len(res.trajectory),
                "channels_removed": sum(len(v) for v in res.removed.values()),
                "trajectory_flops": res.flops,
                "removed_per_unit": {u: len(v) for u, v in res.removed.items()}}
        if kind == "tp":
            t0 = time.perf_counter()
            score = self.data.score(spec.get("images") or self.s.score_images)
            net, info = tp_prune(self.model(), spec["criterion"], spec["flops_target"], score,
                                 self.x)
            return net, {"seconds": time.perf_counter() - t0, **info}
        raise ValueError(f"unknown kind {kind!r}")

    def _rec_path(self, spec: dict[str, Any], ft: FineTune | None) -> Path:
        key = fingerprint({"spec": self.ident(spec), "ft": asdict(ft) if ft else None,
                           "holdout": self.s.holdout_images})
        return self.base_dir / "evals" / f"{spec.get('criterion', 'none')}-{key}.json"

    def measure(self, spec: dict[str, Any], ft: FineTune) -> tuple[dict[str, Any], dict[str, Any]]:
        """Hold-out accuracy, FLOPs and params of `spec`'s network as pruned and after `ft`, each
        cached (the network is built once for both)."""
        paths = [self._rec_path(spec, None), self._rec_path(spec, ft)]
        recs: list[dict[str, Any] | None] = [read_json(p, "accuracy record") if p.exists() else None
                                             for p in paths]
        if all(r is not None for r in recs):
            return recs[0], recs[1]   # type: ignore[return-value]
        model, info = self.build(spec)
        common = {"name": spec["name"], "spec": spec, "build": info,
                  "flops": cp.count_cost(model, INPUT).total_flops,
                  "params": sum(p.numel() for p in model.parameters())}
        if "trajectory_flops" in info and info["trajectory_flops"] != common["flops"]:
            raise RuntimeError(f"{spec['name']}: the physical model has {common['flops']:,} FLOPs, "
                               f"the run's analysis says {info['trajectory_flops']:,}")
        for i, f in enumerate((None, ft)):
            if recs[i] is not None:
                continue
            rec: dict[str, Any] = {**common, "ft": asdict(f) if f else None,
                                   "env_start": _env(self.s)}
            if f is not None:
                t0 = time.perf_counter()
                log = train(model, self.data.ft(f.images), f.schedule())
                rec["ft_seconds"] = time.perf_counter() - t0
                rec["ft_final_loss"] = log.final_loss
            t0 = time.perf_counter()
            rec["accuracy"] = cp.evaluate.accuracy(model, self.data.holdout)
            rec["eval_seconds"] = time.perf_counter() - t0
            write_json(paths[i], rec)
            recs[i] = rec
            what = f"after {f.epochs} x {f.images}" if f else "as pruned"
            print(f"  {spec['name']:<28} {what:<18} acc {rec['accuracy']:.4f}  FLOPs "
                  f"{rec['flops'] / 1e6:7.2f} M  params {rec['params']:,}", flush=True)
        return recs[0], recs[1]   # type: ignore[return-value]


# -- output helpers ------------------------------------------------------------------------------
def sec(v: float) -> str:
    """Seconds for a table cell."""
    return f"{v:,.1f}"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def write_part(s: Settings, part: str, doc: dict[str, Any], markdown: str) -> None:
    d = s.outdir
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / f"{s.net}-{part}.json", doc)
    atomic_write(d / f"{s.net}-{part}.md", lambda f: f.write(markdown + "\n"), mode="w")
    print(markdown, flush=True)
    print(f"wrote {d / f'{s.net}-{part}.json'} and .md", flush=True)


def _settings_line(s: Settings) -> str:
    return (f"{s.net}, FLOPs target {s.flops_target}, {s.score_images} scoring images (train "
            f"split, seed {s.seed}), hold-out {min(s.holdout_images, 10000)} test images; "
            f"threads {torch.get_num_threads()}; load average at start {_load()}")


def car_spec(s: Settings, images: int | None = None, **kw: Any) -> dict[str, Any]:
    return {"name": "car", "kind": "global", "criterion": "car", "cost_aware": True,
            "flops_target": s.flops_target, "images": images or s.score_images,
            "per_round": None, "seed": s.seed, **kw}


def _g(name: str, criterion: str, s: Settings, cost_aware: bool = True, seed: int | None = None,
       images: int | None = None, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "global", "criterion": criterion, "cost_aware": cost_aware,
            "flops_target": s.flops_target, "images": images, "per_round": None,
            "seed": s.seed if seed is None else seed, **kw}


# -- part (a): head-to-head ----------------------------------------------------------------------
def specs_a(s: Settings) -> list[dict[str, Any]]:
    specs = [{"name": "unpruned", "kind": "none"},
             car_spec(s),
             _g("l1", "l1", s),
             _g("taylor", "taylor", s, images=s.score_images),
             _g("random", "random", s),
             _g("l1/by-importance", "l1", s, cost_aware=False),
             _g("taylor/by-importance", "taylor", s, cost_aware=False, images=s.score_images),
             _g("random/by-importance", "random", s, cost_aware=False)]
    if s.tp and _tp_available():
        specs += [{"name": "tp-l1", "kind": "tp", "criterion": "l1", "flops_target": s.flops_target},
                  {"name": "tp-taylor", "kind": "tp", "criterion": "taylor",
                   "flops_target": s.flops_target, "images": s.score_images}]
    return specs


UNITS_NOTE = {"global": "carprune units", "tp": "Torch-Pruning groups", "none": "-"}


def part_a(b: Bench) -> None:
    s = b.s
    ft = FineTune(s.ft_epochs, s.ft_images, seed=s.seed)
    t0, env = time.perf_counter(), _env(s)
    print(f"part (a): {_settings_line(s)}; fine-tuning {ft.epochs} epochs x {ft.images} images",
          flush=True)
    rows = []
    for spec in specs_a(s):
        before, after = b.measure(spec, ft)
        rows.append({"name": spec["name"], "spec": spec, "before": before, "after": after})
    ref = next(r for r in rows if r["name"] == "unpruned")
    base_flops, base_params = ref["before"]["flops"], ref["before"]["params"]
    table = []
    for r in rows:
        bf, af = r["before"], r["after"]
        rank = ("-" if r["spec"]["kind"] == "none" else "TP global" if r["spec"]["kind"] == "tp"
                else "per FLOP" if r["spec"].get("cost_aware", True) else "importance")
        table.append([r["name"], UNITS_NOTE[r["spec"]["kind"]], rank, bf["flops"] / 1e6,
                      bf["flops"] / base_flops, bf["params"], bf["params"] / base_params,
                      bf["accuracy"], af["accuracy"], af["accuracy"] - ref["after"]["accuracy"],
                      sec(bf["build"]["seconds"]), sec(af.get("ft_seconds", 0.0))])
    md = "\n".join([
        f"### Part (a): whole-network pruning to {s.flops_target} x FLOPs, {s.net}",
        "", _settings_line(s) + f"; fine-tuning: {ft.epochs} epochs over {ft.images} train "
        "images (not the scoring ones), SGD momentum 0.9, lr 0.01 cosine, wd 5e-4, batch 128, "
        "mode train, identical for every row.", "",
        md_table(["network", "unit set", "ranking", "FLOPs (M)", "FLOPs ratio", "params",
                  "params ratio", "hold-out, pruned", "hold-out, fine-tuned",
                  "vs unpruned fine-tuned", "pruning (s)", "fine-tuning (s)"], table),
        "", f"part wall time {time.perf_counter() - t0:.0f} s (cached rows count 0); load "
        f"average {env['load_average']} -> {_load()}"])
    write_part(s, "a", {"part": "a", "settings": asdict(s), "fine_tune": asdict(ft),
                        "env_start": env, "load_end": _load(),
                        "seconds": time.perf_counter() - t0, "rows": rows}, md)


# -- part (g): is part (a)'s order after fine-tuning more than one fine-tuning's luck? ---------------
def part_g(b: Bench) -> None:
    """Part (a)'s networks fine-tuned again with other fine-tuning seeds (the order of the same
    fine-tuning images; everything else as part (a), whose seed is the first): per network the
    hold-out accuracy per seed, mean and sample sd; CAR against each other row per seed."""
    s = b.s
    seeds = [s.seed + k for k in range(s.ft_seeds)]
    specs = [sp for sp in specs_a(s) if not s.g_rows or sp["name"] in s.g_rows]
    t0, env = time.perf_counter(), _env(s)
    print(f"part (g): {s.net}, part (a)'s networks fine-tuned with seeds {seeds} "
          f"({s.ft_epochs} epochs x {s.ft_images} images)", flush=True)
    acc: dict[str, list[float]] = {}
    for spec in specs:
        for k in seeds:
            _, after = b.measure(spec, FineTune(s.ft_epochs, s.ft_images, seed=k))
            acc.setdefault(spec["name"], []).append(after["accuracy"])
    rows = []
    for name, v in sorted(acc.items(), key=lambda kv: -float(np.mean(kv[1]))):
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        rows.append([name, *[f"{x:.4f}" for x in v], f"{np.mean(v):.4f}", f"{sd:.4f}"])
    diffs = []
    if "car" in acc:
        for name, v in acc.items():
            if name in ("car", "unpruned"):
                continue
            d = [c - x for c, x in zip(acc["car"], v, strict=True)]
            diffs.append([name, *[f"{x:+.4f}" for x in d], f"{np.mean(d):+.4f}",
                          f"{sum(x > 0 for x in d)}/{len(d)}"])
    md = "\n".join([
        f"### Part (g): fine-tuning seeds, {s.net}", "",
        f"Part (a)'s networks (as pruned there, cached) fine-tuned with seeds {seeds}: "
        f"{s.ft_epochs} epochs over the same {s.ft_images} train images, the seed orders them; "
        f"hold-out {s.holdout_images} test images. Threads {torch.get_num_threads()}, load "
        f"average {env['load_average']} -> {_load()}.", "",
        md_table(["network", *[f"seed {k}" for k in seeds], "mean", "sd"], rows), "",
        "CAR minus each network, per seed (positive: CAR ahead):", "",
        md_table(["against", *[f"seed {k}" for k in seeds], "mean", "CAR ahead"], diffs), "",
        f"part wall time {time.perf_counter() - t0:.0f} s (cached records count 0)"])
    write_part(s, "g", {"part": "g", "settings": asdict(s), "env_start": env,
                        "load_end": _load(), "seeds": seeds, "accuracy": acc,
                        "seconds": time.perf_counter() - t0}, md)


# -- part (b): does accuracy before fine-tuning predict accuracy after it? ----------------------------
def specs_b(s: Settings) -> list[dict[str, Any]]:
    img, small = s.score_images, max(10, s.score_images // 5)
    specs = [_g("random-s0", "random", s, seed=0),
             _g("l1", "l1", s),
             {**_g("car-oneshot/shuffled-all", "car-oneshot", s, images=img), "shuffle": "all"},
             car_spec(s)]
    specs += [_g(f"random-s{k}", "random", s, seed=k) for k in range(1, 5)]
    specs += [_g(f"random-s{k}/by-importance", "random", s, cost_aware=False, seed=k)
              for k in range(2)]
    specs += [_g("l1/by-importance", "l1", s, cost_aware=False), _g("l2", "l2", s),
              _g("l1-producers", "l1-producers", s),
              _g("taylor", "taylor", s, images=img),
              _g("taylor/by-importance", "taylor", s, cost_aware=False, images=img),
              car_spec(s, images=small, name=f"car-{small}img"),
              car_spec(s, images=small, per_round=6, name=f"car-{small}img/per-round-6"),
              _g("car-oneshot", "car-oneshot", s, images=img),
              _g("car-oneshot/by-importance", "car-oneshot", s, cost_aware=False, images=img),
              {**_g("car-oneshot/shuffled-half", "car-oneshot", s, images=img), "shuffle": "half"}]
    return specs[:s.subnetworks]


def part_b(b: Bench) -> None:
    s = b.s
    ft = FineTune(s.rank_ft_epochs, s.rank_ft_images, seed=s.seed)
    t0, env = time.perf_counter(), _env(s)
    print(f"part (b): {_settings_line(s)}; fine-tuning {ft.epochs} epochs x {ft.images} images",
          flush=True)
    rows = []
    for spec in specs_b(s):
        before, after = b.measure(spec, ft)
        rows.append({"name": spec["name"], "spec": spec, "before": before, "after": after})
    pre = [r["before"]["accuracy"] for r in rows]
    post = [r["after"]["accuracy"] for r in rows]
    flops = [r["before"]["flops"] for r in rows]
    stats = {"n": len(rows), "spearman": spearman(pre, post), "kendall_tau_b": kendall_tau_b(pre, post),
             "pearson": float(np.corrcoef(pre, post)[0, 1]) if len(rows) > 1 else math.nan}
    if len(rows) >= 3:
        stats["spearman_p"] = permutation_p(pre, post, spearman)
        stats["kendall_p"] = permutation_p(pre, post, kendall_tau_b, n=2000)
    r_pre, r_post = ranks([-v for v in pre]), ranks([-v for v in post])
    table = [[r["name"], r["before"]["flops"] / 1e6, r["before"]["params"], r["before"]["accuracy"],
              int(r_pre[i]) if r_pre[i].is_integer() else float(r_pre[i]), r["after"]["accuracy"],
              int(r_post[i]) if r_post[i].is_integer() else float(r_post[i])]
             for i, r in enumerate(rows)]
    line = (f"Spearman rho {stats['spearman']:.3f}"
            + (f" (permutation p {stats['spearman_p']:.4f})" if "spearman_p" in stats else "")
            + f", Kendall tau-b {stats['kendall_tau_b']:.3f}"
            + (f" (p {stats['kendall_p']:.4f})" if "kendall_p" in stats else "")
            + f", Pearson r {stats['pearson']:.3f}, over {len(rows)} subnetworks at FLOPs "
            f"{min(flops) / 1e6:.2f}-{max(flops) / 1e6:.2f} M")
    md = "\n".join([
        f"### Part (b): accuracy before vs after fine-tuning, {len(rows)} subnetworks at "
        f"{s.flops_target} x FLOPs, {s.net}", "",
        _settings_line(s) + f"; fine-tuning: {ft.epochs} epochs over {ft.images} train images, "
        "the same for every subnetwork (schedule of part (a)).", "",
        md_table(["subnetwork", "FLOPs (M)", "params", "hold-out, pruned", "rank",
                  "hold-out, fine-tuned", "rank"], table), "", line, "",
        f"part wall time {time.perf_counter() - t0:.0f} s (cached rows count 0); load average "
        f"{env['load_average']} -> {_load()}"])
    write_part(s, "b", {"part": "b", "settings": asdict(s), "fine_tune": asdict(ft),
                        "env_start": env, "load_end": _load(), "stats": stats,
                        "seconds": time.perf_counter() - t0, "rows": rows}, md)


# -- part (c): the round rule --------------------------------------------------------------------
def part_c(b: Bench) -> None:
    s = b.s
    t0, env = time.perf_counter(), _env(s)
    curve = b.data.curve_holdout(s.c_holdout_images)
    common = {"flops_target": s.c_flops_target, "images": s.c_score_images,
              "curve_holdout": s.c_holdout_images}
    strict_spec = car_spec(s, name="car-strict", per_round=1, **common)
    # the batched rule: a quarter of the units a round, at most one channel per unit
    quarter = max(1, len(cp.prunable_units(b.model(), b.x).units) // 4)
    batched_spec = car_spec(s, name=f"car-{quarter}-per-round", per_round=quarter, **common)
    print(f"part (c): {s.net}, CAR to {s.c_flops_target} x FLOPs on {s.c_score_images} scoring "
          f"images, per_round=1 (strict greedy, the default) against per_round={quarter}",
          flush=True)
    strict, m1 = b.global_run(strict_spec, eval_data=curve)
    batched, m2 = b.global_run(batched_spec, eval_data=curve)
    seq = [(c.unit, c.channel) for r in strict.trajectory for c in r.removed]
    seq_flops = [r.flops for r in strict.trajectory]
    base = strict.base_flops
    rows, cmp = [], []
    done: list[tuple[str, int]] = []
    for r in batched.trajectory:
        chosen = [(c.unit, c.channel) for c in r.removed]
        done += chosen
        j = next((k for k, f in enumerate(seq_flops) if f <= r.flops), len(seq_flops) - 1)
        prefix = set(seq[:j + 1])
        inter = len(set(done) & prefix)
        union = len(set(done) | prefix)
        same_first = len(set(done) & set(seq[:len(done)]))
        in_strict = ["yes" if c in prefix else "no" for c in chosen]
        cmp.append({"round": r.round, "chosen": chosen, "in_strict_prefix": in_strict,
                    "flops": r.flops, "strict_step": j + 1, "strict_flops": seq_flops[j],
                    "overlap": inter, "batched_removed": len(done), "strict_removed": j + 1,
                    "jaccard": inter / union if union else 1.0,
                    "first_n_overlap": same_first,
                    "holdout_batched": r.holdout_accuracy,
                    "holdout_strict": strict.trajectory[j].holdout_accuracy})
        rows.append([r.round, ", ".join(f"{u}[{c}]" for u, c in chosen),
                     ", ".join(in_strict), r.flops / base, j + 1, seq_flops[j] / base,
                     f"{inter}/{len(done)} vs {j + 1}", inter / union if union else 1.0,
                     f"{same_first}/{len(done)}", r.holdout_accuracy,
                     strict.trajectory[j].holdout_accuracy])
    finals = {}
    for name, res, meta in (("strict", strict, m1), (f"{quarter} per round", batched, m2)):
        finals[name] = {"holdout_final": cp.evaluate.accuracy(res.model, b.data.holdout),
                        "flops": cp.count_cost(res.model, INPUT).total_flops,
                        "rounds": len(res.trajectory),
                        "channels": sum(len(v) for v in res.removed.values()),
                        "wall_s": meta["wall_s"], "resumed": meta["resumed"],
                        "round_seconds": sum(r.seconds for r in res.trajectory),
                        "score_seconds": sum(r.score_seconds for r in res.trajectory)}
    strict_lines = ", ".join(f"{u}[{c}]" for u, c in seq)
    # the batched rule's choices in order (within a round: rank order) against strict greedy's
    n = min(len(done), len(seq))
    diverge = next((k for k in range(1, n + 1) if set(done[:k]) != set(seq[:k])), None)
    common_all = len(set(done) & set(seq))
    summary = (f"The batched rule made {len(done)} choices, strict greedy {len(seq)}; "
               f"{common_all} are common to both runs; the sets of the first k choices first "
               + (f"differ at k = {diverge}." if diverge else f"never differ (k <= {n})."))
    fin = [[k, v["rounds"], v["channels"], v["flops"] / base, v["holdout_final"],
            sec(v["wall_s"]), sec(v["score_seconds"])] for k, v in finals.items()]
    md = "\n".join([
        f"### Part (c): round rule, {s.net} to {s.c_flops_target} x FLOPs, {s.c_score_images} "
        "scoring images", "",
        f"Batched rule: per_round = {batched.config['per_round']} (a quarter of the "
        f"{len(batched.units)} units), at most one channel per unit per round; strict greedy "
        f"(the default): per_round = 1. Per-round hold-out: {s.c_holdout_images} seeded test images; final: "
        f"{min(s.holdout_images, 10000)}. Threads {torch.get_num_threads()}, load average "
        f"{env['load_average']}.", "",
        "Strict sequence: " + strict_lines, "", summary, "",
        md_table(["round", "batched rule removes", "in strict's prefix", "FLOPs ratio",
                  "strict steps", "strict FLOPs ratio", "overlap (common/batched vs strict)",
                  "Jaccard", "same as strict's first n", "hold-out batched", "hold-out strict"],
                 rows), "",
        md_table(["rule", "rounds", "channels", "FLOPs ratio", "hold-out (final)", "wall (s)",
                  "scoring (s)"], fin)])
    write_part(s, "c", {"part": "c", "settings": asdict(s), "env_start": env, "load_end": _load(),
                        "strict_sequence": seq, "strict_flops": seq_flops, "comparison": cmp,
                        "batched_sequence": done, "first_divergence": diverge,
                        "common_choices": common_all,
                        "finals": finals, "seconds": time.perf_counter() - t0}, md)


# -- part (d): cost model of the CAR run ---------------------------------------------------------
def part_d(b: Bench) -> None:
    s = b.s
    env = _env(s)
    gemm_now = cp.cost.gemm_gflops(fresh=True)
    spec = car_spec(s)
    print(f"part (d): cost model of the CAR run of part (a) ({s.net}, {s.score_images} images, "
          f"{s.flops_target} x FLOPs)", flush=True)
    res, meta = b.global_run(spec)
    base = res.base_flops
    rows, tot = [], {"pairs": 0, "run": 0, "tail_flops": 0.0, "tail_s": 0.0, "score_s": 0.0,
                     "round_s": 0.0}
    for r in res.trajectory:
        tot["pairs"] += r.image_ablations
        tot["run"] += r.ablations_run
        tot["tail_flops"] += r.tail_flops
        tot["tail_s"] += r.tail_seconds
        tot["score_s"] += r.score_seconds
        tot["round_s"] += r.seconds
        rows.append([r.round, len(r.removed), r.flops / base, r.image_ablations, r.ablations_run,
                     r.tail_flops / 1e9, sec(r.tail_seconds), sec(r.score_seconds),
                     sec(r.seconds - r.score_seconds), sec(r.seconds), f"{r.gflops:.1f}",
                     f"{100 * r.gflops / GEMM_GFLOPS:.0f} %", f"{100 * r.gflops / gemm_now:.0f} %"])
    g = tot["tail_flops"] / tot["tail_s"] / 1e9 if tot["tail_s"] > 0 else 0.0
    rows.append(["total", sum(len(r.removed) for r in res.trajectory), res.flops_ratio,
                 tot["pairs"], tot["run"], tot["tail_flops"] / 1e9, sec(tot["tail_s"]),
                 sec(tot["score_s"]), sec(tot["round_s"] - tot["score_s"]), sec(tot["round_s"]),
                 f"{g:.1f}", f"{100 * g / GEMM_GFLOPS:.0f} %", f"{100 * g / gemm_now:.0f} %"])
    st = meta["env_start"]
    cache = {True: "on", False: "off (CARPRUNE_BLOCK_CACHE=0)"}.get(st.get("block_cache"),
                                                                  "not recorded")
    md = "\n".join([
        f"### Part (d): cost of the whole CAR run, {s.net} to {s.flops_target} x FLOPs on "
        f"{s.score_images} scoring images", "",
        f"Wall time of the call {meta['wall_s']:.0f} s ({meta['wall_s'] / 60:.1f} min"
        + (", RESUMED from a checkpoint: only the last part" if meta["resumed"] else "")
        + f"), threads {st['threads']} on {st['cores']} cores, block cache {cache}, load average "
        f"{st['load_average']} -> {meta['load_end']} (run at {st['time']}). Image-ablations: "
        "(image, channel) pairs scored; run: those whose channel is not all zero (the rest are "
        "skipped exactly). Tail GFLOP: 2 x the multiply-accumulates each unit's path computes per "
        "pair run (`ScoringCost.tail_flops`: the fused consumer's one-channel share, the fused "
        "ending before its zero pixels are skipped), so the rate can exceed the GEMM reference "
        f"({GEMM_GFLOPS:.0f} GFLOP/s fp32 on 2 threads). Other: surgery, unit analysis and the "
        "per-round accuracy pass on the scoring images. GEMM now: a 1024 x 1024 fp32 product "
        f"measured by this part (threads: {torch.get_num_threads()}): {gemm_now:.0f} GFLOP/s "
        "(measured when the part runs, not during the CAR run unless it ran just now).", "",
        md_table(["round", "channels", "FLOPs ratio", "image-ablations", "run",
                  "tail GFLOP", "tail (s)", "scoring (s)", "other (s)", "round (s)", "GFLOP/s",
                  "of 98 GFLOP/s", "of GEMM now"], rows)])
    write_part(s, "d", {"part": "d", "settings": asdict(s), "env_now": env, "run": meta,
                        "totals": tot, "gflops": g, "gemm_gflops": GEMM_GFLOPS,
                        "gemm_gflops_now": gemm_now,
                        "stopped": res.stopped,
                        "rounds": [asdict(r) for r in res.trajectory]}, md)


# -- part (e): the exact search against full scoring, one round, side by side -------------------
def _e_network(b: Bench) -> tuple[nn.Module, Any, str]:
    """Part (e)'s network, its units and a description: the pretrained network, or with
    --e-round N the network of part (d)'s CAR run after N rounds (its choices read from
    <net>-d.json), pruned physically as the run had it."""
    model = b.model()
    an = cp.prunable_units(model, b.x)
    n = b.s.e_round
    if not n:
        return model, an, "first round"
    path = b.s.outdir / f"{b.s.net}-d.json"
    if not path.exists():
        raise SystemExit(f"--e-round reads part (d)'s record {path}, which does not exist: run "
                         "--part d first")
    rounds = json.loads(path.read_text())["rounds"]
    if not 0 < n < len(rounds):
        raise SystemExit(f"--e-round must lie in [1, {len(rounds) - 1}] (part (d) ran "
                         f"{len(rounds)} rounds), got {n}")
    removed: dict[str, list[int]] = {}
    for r in rounds[:n]:
        for c in r["removed"]:
            removed.setdefault(c["unit"], []).append(c["channel"])
    model = cp.prune_units(model, {u: sorted(c) for u, c in removed.items()}, b.x,
                           analysis=an).eval()
    return model, cp.prunable_units(model, b.x), (
        f"round {n + 1} (part (d)'s network after {n} rounds: "
        f"{sum(map(len, removed.values()))} channels removed, FLOPs "
        f"{rounds[n - 1]['flops'] / an.cost({})[0]:.3f} of the original)")


def part_e(b: Bench) -> None:
    s = b.s
    env = _env(s)
    model, an, where = _e_network(b)
    units = [u.name for u in an.units]
    saved = {u: an.saved_flops(u, {}) for u in units}
    score = b.data.score(s.score_images)
    print(f"part (e): {where} of {s.net} on {s.score_images} scoring images, full scoring "
          "then the exact search, one after the other", flush=True)

    def rank(u: str, c: int, v: float) -> tuple:
        return (rank_key(v, saved[u], True), units.index(u), c)

    rows, doc = [], {}
    full = cp.importance.CAR(score)
    t0 = time.perf_counter()
    vf = full(model, an, units)
    tf = time.perf_counter() - t0
    # picks 1 and 3 as the run does them, then picks 1 without promotion (`CAR.search`), then
    # picks 1 with torch's own NCHW convolutions in the tails (`fold.POINTWISE_FUSION`), then
    # picks 1 through the bfloat16 screen (`carprune.screen`)
    for picks, promote, onednn, scr in ((1, 3, True, None), (3, 3, True, None),
                                        (1, 0, True, None), (1, 3, False, None),
                                        (1, 3, True, "bf16")):
        car = cp.importance.CAR(score, **({"screen": scr} if scr else {}))
        fold.POINTWISE_FUSION = onednn
        t0 = time.perf_counter()
        try:
            vs = car.search(model, an, units, rank, picks=picks, promote=promote)
        finally:
            fold.POINTWISE_FUSION = True
        ts = time.perf_counter() - t0
        same = all(torch.equal(vs[u][~vs[u].isnan()], vf[u][~vs[u].isnan()]) for u in units)
        pick = [min(((rank(u, j, float(v[u][j])), u, j) for j in range(len(v[u]))
                     if v[u][j] == v[u][j]), default=None) for v in (vf, vs) for u in units]
        best_f = sorted(p for p in pick[:len(units)] if p)[:picks]
        best_s = sorted(p for p in pick[len(units):] if p)[:picks]
        st = car.last_search
        key = f"{picks}-{scr}" if scr else picks if promote and onednn else \
            f"{picks}-no-promotion" if onednn else f"{picks}-torch-convs"
        doc[key] = {"search": st, "seconds": ts, "exact_values_equal": same,
                    "same_choice": best_f == best_s, "cost": asdict(car.last_cost)}
        rows.append([picks, promote, f"oneDNN fused, {scr} screen" if scr else
                     "oneDNN fused" if onednn else "torch NCHW",
                     f"{st['pairs']:,} / {st['full_pairs']:,}",
                     f"{st['pairs'] / st['full_pairs']:.3f}", f"{st['exact']} / {st['channels']}",
                     sec(ts), sec(tf), f"{tf / ts:.2f}x", best_f == best_s, same])
    # the same search (picks 1) split across 2 gloo ranks of 1 thread each (`ShardedCAR`)
    shard = _sharded_search(s, {u: v.tolist() for u, v in vf.items()})
    doc["sharded"] = shard
    prof_md: list[str] = []
    if s.profile:
        doc["profile"], prof_md = _profile_search(model, an, units, score, rank)
    md = "\n".join([
        f"### Part (e): exact search against full scoring, {s.net}, {where}, "
        f"{s.score_images} scoring images", "",
        f"threads {torch.get_num_threads()}, load average {env['load_average']} -> {_load()}; "
        f"full scoring took {tf:.1f} s ({full.last_cost.gflops:.0f} GFLOP/s of tails, fp32 GEMM "
        f"{cp.cost.gemm_gflops():.0f} GFLOP/s).", "",
        md_table(["picks", "promote", "convolutions", "image-ablations (search / full)",
                  "fraction",
                  "channels scored to the end", "search (s)", "full (s)", "speed-up",
                  "same choice", "exact values equal"], rows),
        "", f"The search with picks 1 split across {shard['ranks']} processes of 1 thread "
        f"(`distributed.ShardedCAR`, gloo): {shard['seconds']:.1f} s against "
        f"{doc[1]['seconds']:.1f} s for one process of {torch.get_num_threads()} threads; "
        f"exact values equal to full scoring's: {shard['equal']}; image-ablations "
        f"{' + '.join(f'{p:,}' for p in shard['shares'])} (one process: "
        f"{doc[1]['search']['pairs']:,}).", *prof_md])
    part = f"e-round{s.e_round}" if s.e_round else "e"
    write_part(s, part, {"part": part, "settings": asdict(s), "env_start": env, "full_seconds": tf,
                        "full_cost": asdict(full.last_cost), "runs": doc}, md)


def _profile_search(model: nn.Module, an: Any, units: list[str], score: Any,
                    rank: Callable[..., Any]) -> tuple[dict[str, Any], list[str]]:
    """The picks-1 search once more under torch.profiler (no shapes: recording them slows the
    ops themselves): self CPU time per op; and, from forward hooks on every nn.Conv2d (the
    oneDNN `fold.PointwiseConv` among them, its fused ReLU / add inside its time), each
    convolution shape's calls, rows per call (images x ablations), wall time and GFLOP/s (the
    hooks' clock, under the profiler: a slight overestimate of the time)."""
    from torch.profiler import ProfilerActivity, profile

    shapes: dict[tuple[int, int, int, int], dict[str, Any]] = {}
    started: dict[int, float] = {}

    def before(mod: nn.Module, args: tuple) -> None:
        if isinstance(mod, nn.Conv2d):
            started[id(mod)] = time.perf_counter()

    def after(mod: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(mod, nn.Conv2d) and id(mod) in started:
            dt = time.perf_counter() - started.pop(id(mod))
            x = args[0]
            k = (mod.in_channels, mod.out_channels, int(x.shape[2]), mod.stride[0])
            rec = shapes.setdefault(k, {"rows": [], "seconds": 0.0, "flops": 0})
            rec["rows"].append(int(x.shape[0]))
            rec["seconds"] += dt
            rec["flops"] += 2 * out.numel() * (mod.in_channels // mod.groups) * math.prod(
                mod.kernel_size)

    hooks = [nn.modules.module.register_module_forward_pre_hook(before),
             nn.modules.module.register_module_forward_hook(after)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            imps.CAR(score).search(model, an, units, rank, picks=1)
            wall = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    by_op = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
              "share": e.self_cpu_time_total / total} for e in ops[:8]]
    by_shape = sorted(({"in": k[0], "out": k[1], "size": k[2], "stride": k[3],
                        "calls": len(r["rows"]), "rows_median": float(np.median(r["rows"])),
                        "rows_min": min(r["rows"]), "rows_max": max(r["rows"]),
                        "seconds": r["seconds"], "gflops": r["flops"] / r["seconds"] / 1e9}
                       for k, r in shapes.items()), key=lambda r: -r["seconds"])
    conv_s = sum(r["seconds"] for r in by_shape)
    conv_g = sum(r["gflops"] * r["seconds"] for r in by_shape) / max(conv_s, 1e-9)
    md = ["", f"Where the search's time goes (`--profile`: torch.profiler, {wall:.1f} s with it "
          "on): self CPU time by op; then each convolution shape (in -> out channels, input "
          f"size, stride; the 10 slowest in total) by the hooks' clock: {conv_s:.1f} s in all "
          f"at {conv_g:.0f} GFLOP/s.", "",
          md_table(["op", "self (s)", "share", "calls"],
                   [[o["op"], f"{o['self_s']:.2f}", f"{100 * o['share']:.0f} %", o["calls"]]
                    for o in by_op]), "",
          md_table(["conv (in -> out, size^2, stride)", "calls", "rows per call (median, range)",
                    "time (s)", "GFLOP/s"],
                   [[f"{r['in']} -> {r['out']}, {r['size']}^2, /{r['stride']}", r["calls"],
                     f"{r['rows_median']:.0f} ({r['rows_min']}-{r['rows_max']})",
                     f"{r['seconds']:.2f}", f"{r['gflops']:.0f}"] for r in by_shape[:10]])]
    return {"wall_s": wall, "ops": by_op, "conv_shapes": by_shape, "conv_seconds": conv_s,
            "conv_gflops": conv_g}, md


def _search_job(b: Bench, ctx: Any) -> dict[str, Any]:
    """Part (e)'s search (picks 1) on one rank: the same model, images and rank rule as the
    one-process search."""
    from carprune import distributed

    model, an, _ = _e_network(b)
    units = [u.name for u in an.units]
    saved = {u: an.saved_flops(u, {}) for u in units}
    car = distributed.ShardedCAR(b.data.score(b.s.score_images), ctx=ctx)
    own: list[int] = []   # the (image, channel) pairs this rank's steps scored
    step = imps.CAR._search_block

    def spy(self: Any, sc: Any, block: Any, chans: dict[str, list[int]]) -> Any:
        own.append(len(block) * sum(len(c) for c in chans.values()))
        return step(self, sc, block, chans)

    imps.CAR._search_block = spy
    t0 = time.perf_counter()
    v = car.search(model, an, units,
                   lambda u, c, x: (rank_key(x, saved[u], True), units.index(u), c), picks=1)
    return {"seconds": time.perf_counter() - t0, "pairs": sum(own), "search": car.last_search,
            "values": {u: [None if x != x else x for x in t.tolist()] for u, t in v.items()}}


def _run_job(b: Bench, ctx: Any) -> dict[str, Any]:
    """Part (f) on one rank: part (a)'s CAR run with `distributed.ShardedCAR`."""
    from carprune import distributed

    spec = car_spec(b.s)
    score = b.data.score(spec["images"])
    t0 = time.perf_counter()
    res = cp.compress_global(
        b.model(), "all", score, flops_target=spec["flops_target"],
        criterion=distributed.ShardedCAR(score, ctx=ctx, num_images=spec["images"],
                                         seed=spec["seed"]),
        example_input=b.x, score_images=spec["images"], cost_aware=True, seed=spec["seed"],
        callbacks=_Print(f"car/{ctx.world_size} ranks") if ctx.rank == 0 else None)
    return {"seconds": time.perf_counter() - t0, "removed": res.removed,
            "trajectory": res.to_dict()["trajectory"]}


_JOBS = {"search": _search_job, "run": _run_job}


def _rank_main(rank: int, init: str, job: str, s: Settings, world: int, out: str) -> None:
    """One gloo rank of 1 thread: `_JOBS[job]` on a fresh `Bench`, its record in `out`."""
    import torch.distributed as dist

    from carprune import distributed

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ctx = distributed.init_from_env("cpu")
        b = Bench(s)
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(_JOBS[job](b, ctx)))
    finally:
        dist.destroy_process_group()


def _on_ranks(job: str, s: Settings, world: int) -> list[dict[str, Any]]:
    """`_JOBS[job]` on `world` spawned gloo ranks; every rank's record."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(f"file://{tmp}/rendezvous", job, s, world, tmp),
                           nprocs=world, join=True, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def _sharded_search(s: Settings, full: dict[str, list[float]], world: int = 2) -> dict[str, Any]:
    """Part (e)'s search under `world` gloo ranks (the slowest rank's wall time); its exact
    values are checked against full scoring's."""
    got = _on_ranks("search", s, world)
    equal = all(g["values"][u][j] is None or g["values"][u][j] == full[u][j]
                for g in got for u in full for j in range(len(full[u])))
    return {"ranks": world, "seconds": max(g["seconds"] for g in got), "equal": equal,
            "same_on_every_rank": all(g["values"] == got[0]["values"] for g in got),
            "shares": [g["pairs"] for g in got], "search": got[0]["search"]}


def part_f(b: Bench, world: int = 2) -> None:
    """Part (a)'s CAR run split across `world` processes of 1 thread (gloo, `ShardedCAR`: the
    exact search split step by step), against the one-process run of part (a) (cached, or run
    first): the same choices and work, and the wall time."""
    s = b.s
    env = _env(s)
    ref, meta = b.global_run(car_spec(s))
    print(f"part (f): the CAR run of part (a) ({s.net}, {s.score_images} images, "
          f"{s.flops_target} x FLOPs) across {world} processes of 1 thread", flush=True)
    t0 = time.perf_counter()
    got = _on_ranks("run", s, world)
    wall = time.perf_counter() - t0
    times = ("seconds", "score_seconds", "tail_seconds")
    strip = lambda t: [{k: v for k, v in r.items() if k not in times} for r in t]
    want = strip(json.loads(json.dumps(ref.to_dict()["trajectory"])))
    same = [g["removed"] == json.loads(json.dumps(ref.removed)) and strip(g["trajectory"]) == want
            for g in got]
    one_s = meta["wall_s"]
    run_s = max(g["seconds"] for g in got)
    md = "\n".join([
        f"### Part (f): the CAR run of part (a) across {world} processes, {s.net}", "",
        f"{world} gloo processes of 1 thread on {os.cpu_count()} cores (`distributed.ShardedCAR`: "
        f"every search step's channels shared out), load average {env['load_average']} -> "
        f"{_load()}; the one-process run (part (a), {meta['env_start']['threads']} threads, load "
        f"{meta['env_start']['load_average']} at its start).", "",
        md_table(["run", "rounds", "wall (s)", "ratio", "same choices and work as one process"],
                 [["one process", len(ref.trajectory), sec(one_s), "1.00x", "-"],
                  [f"{world} processes", len(got[0]["trajectory"]), sec(run_s),
                   f"{one_s / run_s:.2f}x", all(same)]])])
    write_part(s, "f", {"part": "f", "settings": asdict(s), "env_start": env, "world": world,
                        "one_process_seconds": one_s, "seconds": run_s, "spawn_wall": wall,
                        "same": same, "ranks": got}, md)


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f,
         "g": part_g}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Settings()
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--net", choices=list(NETS), default=d.net)
    ap.add_argument("--flops-target", type=float)
    ap.add_argument("--score-images", type=int,
                    help="parts a, b, d; default " + ", ".join(f"{k} {v}" for k, v in SCORE_IMAGES.items()))
    ap.add_argument("--ft-epochs", type=int, help=f"part (a), default {d.ft_epochs}")
    ap.add_argument("--ft-images", type=int, help=f"part (a), default {d.ft_images}")
    ap.add_argument("--rank-ft-epochs", type=int, help=f"part (b), default {d.rank_ft_epochs}")
    ap.add_argument("--rank-ft-images", type=int, help=f"part (b), default {d.rank_ft_images}")
    ap.add_argument("--holdout-images", type=int, help="default: all 10,000 test images")
    ap.add_argument("--subnetworks", type=int, help=f"part (b), default {d.subnetworks}")
    ap.add_argument("--c-score-images", type=int, help=f"part (c), default {d.c_score_images}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning rows")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (1 thread)")
    ap.add_argument("--ft-seeds", type=int, help=f"part (g), default {d.ft_seeds}")
    ap.add_argument("--g-rows", help="part (g): comma-separated network names of part (a)")
    ap.add_argument("--profile", action="store_true",
                    help="part (e): profile the search (self time by op, convolutions by shape)")
    ap.add_argument("--e-round", type=int,
                    help="part (e): start from part (d)'s network after this many rounds")
    ap.add_argument("--out", default="", help="output directory (default out/bench/global)")
    a = ap.parse_args(argv)
    s = replace(d, **QUICK) if a.quick else d
    over = {"net": a.net, "flops_target": a.flops_target, "score_images": a.score_images,
            "ft_epochs": a.ft_epochs, "ft_images": a.ft_images, "rank_ft_epochs": a.rank_ft_epochs,
            "rank_ft_images": a.rank_ft_images, "holdout_images": a.holdout_images,
            "subnetworks": a.subnetworks, "c_score_images": a.c_score_images, "seed": a.seed,
            "threads": a.threads, "out": a.out, "quick": a.quick, "profile": a.profile,
            "ft_seeds": a.ft_seeds, "e_round": a.e_round,
            "g_rows": tuple(a.g_rows.split(",")) if a.g_rows else None}
    s = replace(s, **{k: v for k, v in over.items() if v is not None}, tp=not a.no_tp)
    if not s.score_images:
        s = replace(s, score_images=SCORE_IMAGES[s.net])
    if s.threads:
        torch.set_num_threads(s.threads)
    bench = Bench(s)
    for p in (list(PARTS) if a.part == "all" else [a.part]):
        PARTS[p](bench)


if __name__ == "__main__":
    main()
