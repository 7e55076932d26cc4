"""Per-layer cost of a network as the CAR paper counts it, measured by running it once.

For conv layer L with n_L filters of size f x f over n_{L-1} input channels and an output of
k x k positions: FLOPs (multiply-accumulates) = k^2 n_L f^2 n_{L-1} and weight bytes =
4 f^2 n_{L-1} n_L (float32). Spatial sizes come from forward hooks on one zero input, so strides,
padding and pooling never have to be re-derived; a pruned `ScatteredConv2d` counts only the
filters it computes. Linear layers count in_features x out_features MACs per output row; a
Conv1d counts as a conv with a 1 x L output and 1 x k kernels.

Which modules are counted, and how, is a table of rules by module type: Conv2d, Conv1d and Linear
are built in; another layer type registers its own with `register_layer_cost` (the KSE layer,
`kse.KSEConv2d`, does so where it is defined, so this core module never imports an algorithm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class LayerCost:
    """Cost of one conv or linear layer for one input image."""

    name: str
    kind: str                    # "conv", "linear", or a registered rule's kind ("kse": `kse.KSEConv2d`)
    out_size: tuple[int, int]    # output spatial size (k x k for a square map; (1, 1) for linear)
    filters: int                 # n_L: filters computed (kept ones for a ScatteredConv2d); linear: outputs
    kernel: tuple[int, int]      # f x f (linear: (1, 1))
    inputs: int                  # n_{L-1}: input channels per filter (per group); linear: in_features
    flops: int                   # multiply-accumulates: k^2 n_L f^2 n_{L-1}
    params: int                  # weights + bias
    bytes: int                   # 4 f^2 n_{L-1} n_L: float32 weights, bias excluded as in the paper
    calls: int = 1               # times the module ran in one forward pass (costs are summed)

    @property
    def k(self) -> int:
        """Output side length (the paper's k; the height for a non-square map)."""
        return self.out_size[0]

    @property
    def f(self) -> int:
        """Kernel side length (the paper's f; the height for a non-square kernel)."""
        return self.kernel[0]


@dataclass
class CostReport:
    """Per-layer costs of a whole network for one input of `input_shape`."""

    input_shape: tuple[int, ...]
    layers: list[LayerCost] = field(default_factory=list)
    total_params: int = 0        # every parameter of the model (BatchNorm included)

    @property
    def total_flops(self) -> int:
        """Conv + linear multiply-accumulates per image."""
        return sum(lay.flops for lay in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(lay.bytes for lay in self.layers)

    def layer(self, name: str) -> LayerCost:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"no conv or linear layer {name!r} ran in the model; layers: "
                       f"{', '.join(lay.name for lay in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "total_flops": self.total_flops,
                "total_params": self.total_params, "total_bytes": self.total_bytes,
                "layers": [{**asdict(lay), "out_size": list(lay.out_size),
                            "kernel": list(lay.kernel)} for lay in self.layers]}

    def to_markdown(self) -> str:
        """The per-layer table (FLOPs as k^2 n_L f^2 n_{L-1}, bytes as 4 f^2 n_{L-1} n_L)."""
        rows = ["| layer | k | n_L | f | n_{L-1} | FLOPs | params | bytes |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for lay in self.layers:
            k = "x".join(map(str, lay.out_size)) if lay.out_size[0] != lay.out_size[1] else str(lay.k)
            f = "x".join(map(str, lay.kernel)) if lay.kernel[0] != lay.kernel[1] else str(lay.f)
            rows.append(f"| {lay.name} | {k} | {lay.filters} | {f} | {lay.inputs} | {lay.flops:,} | "
                        f"{lay.params:,} | {lay.bytes:,} |")
        rows.append(f"| **total** | | | | | {self.total_flops:,} | {self.total_params:,} | "
                    f"{self.total_bytes:,} |")
        return "\n".join(rows)


# rule(name, module, output of one forward on one image) -> the module's LayerCost for that call
LayerCostRule = Callable[[str, nn.Module, torch.Tensor], LayerCost]


def _conv2d_cost(name: str, mod: nn.Module, out: torch.Tensor) -> LayerCost:
    w = mod.weight   # a ScatteredConv2d holds only the filters it computes
    n_l, n_in, fh, fw = w.shape
    ho, wo = int(out.shape[-2]), int(out.shape[-1])
    return LayerCost(name, "conv", (ho, wo), n_l, (fh, fw), n_in, ho * wo * n_l * fh * fw * n_in,
                     _weight_and_bias(mod), 4 * w.numel())


def _conv1d_cost(name: str, mod: nn.Module, out: torch.Tensor) -> LayerCost:
    n_l, n_in, fk = mod.weight.shape          # a 1 x L output, kernels 1 x k
    lo = int(out.shape[-1])
    return LayerCost(name, "conv", (1, lo), n_l, (1, fk), n_in, lo * n_l * fk * n_in,
                     _weight_and_bias(mod), 4 * mod.weight.numel())


def _linear_cost(name: str, mod: nn.Module, out: torch.Tensor) -> LayerCost:
    rows = out.numel() // max(1, out.shape[0] * mod.out_features)
    return LayerCost(name, "linear", (1, 1), mod.out_features, (1, 1), mod.in_features,
                     rows * mod.in_features * mod.out_features, _weight_and_bias(mod),
                     4 * mod.weight.numel())


def _weight_and_bias(mod: nn.Module) -> int:
    return mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)


_RULES: dict[type[nn.Module], LayerCostRule] = {
    nn.Conv2d: _conv2d_cost, nn.Conv1d: _conv1d_cost, nn.Linear: _linear_cost}


def register_layer_cost(module_type: type[nn.Module], rule: LayerCostRule) -> None:
    """Count modules of `module_type` (and its subclasses, unless one has a rule of its own) in
    `count_cost` with ``rule(name, module, output) -> LayerCost``: `output` is the module's
    output for one image (batch 1); each call of the module in a forward pass is counted and
    their FLOPs summed. Registering a type again replaces its rule."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable as rule(name, module, output), got {rule!r}")
    _RULES[module_type] = rule


def layer_cost_rule(module: nn.Module) -> LayerCostRule | None:
    """The rule `count_cost` counts `module` with (its most specific registered type), or None."""
    return next((_RULES[t] for t in type(module).__mro__ if t in _RULES), None)


def count_cost(model: nn.Module, input_shape: tuple[int, ...] | torch.Size) -> CostReport:
    """Per conv/linear layer FLOPs, parameters and weight bytes of `model` for one input of
    `input_shape` (C, H, W), measured with forward hooks on a single zero image in eval mode.
    Layer types with a rule of their own (`register_layer_cost`, e.g. KSE layers) count as it
    says."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be positive sizes without the batch, e.g. (3, 32, 32), "
                         f"got {tuple(input_shape)}")
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    found: dict[str, LayerCost] = {}

    def hook(name: str, rule: LayerCostRule):
        def record(mod: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> None:
            cost = rule(name, mod, out)
            if name in found:
                found[name].flops += cost.flops
                found[name].calls += 1
            else:
                found[name] = cost
        return record

    rules = {name: layer_cost_rule(m) for name, m in model.named_modules()}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook(name, rule))
               for name, rule in rules.items() if rule is not None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), dtype=dtype, device=device))
    except RuntimeError as exc:
        raise ValueError(f"an input of shape {shape} does not fit the model "
                         f"({str(exc).splitlines()[0]})") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    order = [name for name, _ in model.named_modules() if name in found]
    return CostReport(input_shape=shape, layers=[found[n] for n in order],
                      total_params=sum(p.numel() for p in model.parameters()))


_GEMM: dict[int, float] = {}


def gemm_gflops(n: int = 1024, reps: int = 20, *, fresh: bool = False) -> float:
    """This machine's fp32 GEMM throughput at torch's current thread count, GFLOP/s: the best
    of 3 timings of `reps` n x n products (measured once per thread count unless `fresh`).
    What a scoring pass's tail throughput is compared with (`ScoringCost.describe`)."""
    import time

    threads = torch.get_num_threads()
    if fresh or threads not in _GEMM:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = min(best, time.perf_counter() - t0)
        _GEMM[threads] = 2 * n ** 3 * reps / best / 1e9
    return _GEMM[threads]
