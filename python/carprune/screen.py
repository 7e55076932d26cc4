"""Tail screening in bfloat16 (an option, off by default): every (image, ablation) row runs
through a bfloat16 copy of the tail, and only the rows whose top-k verdict is in doubt run again
in float32.

On CPUs with AMX (and on GPUs' tensor cores) bfloat16 convolutions run several times faster than
float32 ones (measured here on 2 cores: 4.5-7.5x on ResNet-20's convolution shapes), but a
bfloat16 tail's outputs differ from the float32 tail's by up to several percent of their scale.
What a top-k count needs from a row is only the set of its k largest outputs, and that set is the
same in both whenever the gap between the k-th and the (k+1)-th largest bfloat16 output exceeds
the range of the errors (the largest minus the smallest of float32 - bfloat16 over the outputs:
no pair of outputs can then swap). The screen takes `tolerance` x the row's largest |output| as
that range: rows whose gap is not above it are computed again in float32 and take the float32
outputs; the others keep the bfloat16 outputs.

The bound is measured, not proven. On the pretrained CIFAR ResNet-20 (99,232 rows of all its
units on 300 test images) the error range reached 0.089 of the largest |output| (the stem's
stream, whose tail is the longest), 0.028-0.069 elsewhere; the default tolerance 0.25 leaves
2.8x of headroom, and about a fifth of the rows are computed again. So the screen also checks
itself as it runs: one trusted row in `audit_every` is computed in float32 too and its error
range compared with the bound (`ScreenStats.worst`: the largest as a fraction of it). A row
above the bound turns the screen off for the rest of the run, with a warning (rows before it
were trusted on the bound). A shortcut that could change choices: never the default
(`screen=None`). It pays in full scoring of random images (1.5x on every ResNet-20 unit); the
exact search of global compression scores mostly the images nearest to the decision, where
more than half of the rows are in doubt (the README's part (e): 1.06x and 0.76x).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from .callbacks import log

SCREEN_TOLERANCE = 0.25
AUDIT_EVERY = 64
SCREENS = ("bf16",)


def check_screen(screen: str | None, *, dtype: torch.dtype, device: torch.device,
                 topk: int | None, num_outputs: int | None = None) -> str | None:
    """`screen` validated for a scorer of `dtype` on `device` whose metric counts top-`topk`
    (None: not a top-k count); None when screening is off."""
    if screen is None or screen == "none":
        return None
    if screen not in SCREENS:
        raise ValueError(f"screen must be None or one of {SCREENS}, got {screen!r}")
    if dtype != torch.float32:
        raise ValueError(f"screen={screen!r} screens float32 scoring; dtype is {dtype} (float64 "
                         "is the reference precision and is never screened)")
    if topk is None:
        raise ValueError(f"screen={screen!r} certifies top-k verdicts only; the metric here is "
                         "not a top-k count (use screen=None)")
    if num_outputs is not None and num_outputs <= topk:
        raise ValueError(f"screen={screen!r}: a model with {num_outputs} outputs has no top-"
                         f"{topk} verdict to screen")
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError(f"screen={screen!r}: this CPU has no bfloat16 instructions "
                         "(oneDNN reports none), so a bfloat16 tail would be slower than "
                         "float32; use screen=None")
    return screen


@dataclass
class ScreenStats:
    """Rows screened, computed again in float32 (in doubt), audited (trusted, checked anyway),
    and the largest audited error as a fraction of the bound."""

    rows: int = 0
    rechecked: int = 0
    audited: int = 0
    worst: float = 0.0


class Screen:
    """`tail` (a float32 graph returning [rows, ...] outputs) screened in bfloat16 for top-`topk`
    verdicts; `screen(inputs)` returns float32 outputs [rows, K] whose top-k sets are those of
    `tail(*inputs)` (see the module docstring)."""

    def __init__(self, tail: fx.GraphModule, topk: int, tolerance: float = SCREEN_TOLERANCE,
                 audit_every: int = AUDIT_EVERY) -> None:
        if not tolerance > 0:   # (NaN too)
            raise ValueError(f"tolerance must be positive, got {tolerance}")
        self.exact = tail
        self.fast = copy.deepcopy(tail).to(torch.bfloat16)
        self.topk = int(topk)
        self.tolerance = float(tolerance)
        self.audit_every = int(audit_every)
        self.stats = ScreenStats()
        self.on = True
        self._next_audit = 0

    def _exact_rows(self, inputs: Sequence[torch.Tensor], sel: torch.Tensor) -> torch.Tensor:
        out = self.exact(*[t.index_select(0, sel) for t in inputs])
        return out.reshape(out.shape[0], -1)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.on:
            out = self.exact(*inputs)
            return out.reshape(out.shape[0], -1)
        low = self.fast(*[t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs])
        out = low.reshape(low.shape[0], -1).float()
        rows = out.shape[0]
        top = out.topk(self.topk + 1, dim=1).values
        bound = self.tolerance * out.abs().amax(1)
        doubt = (top[:, self.topk - 1] - top[:, self.topk]) <= bound
        # trusted rows to audit: every audit_every-th trusted row, counted across calls
        trusted = (~doubt).nonzero().squeeze(1)
        first = (-self._next_audit) % self.audit_every
        audit = trusted[first::self.audit_every]
        self._next_audit += int(trusted.numel())
        redo = doubt.nonzero().squeeze(1)
        self.stats.rows += rows
        self.stats.rechecked += int(redo.numel())
        self.stats.audited += int(audit.numel())
        if not redo.numel() + audit.numel():
            return out
        # one float32 call for the rows in doubt and the audited ones
        sel, order = torch.cat([redo, audit]).sort()
        exact = self._exact_rows(inputs, sel)
        if audit.numel():
            mine = order >= redo.numel()   # the audited rows among `sel`
            got = exact[mine]
            d = got - out[sel[mine]]
            err = (d.amax(1) - d.amin(1)) / bound[sel[mine]].clamp_min(1e-30)
            worst = float(err.max())
            self.stats.worst = max(self.stats.worst, worst)
            if worst > 1:
                log.warning("bfloat16 screen: a trusted row's error is %.2fx the bound "
                            "(tolerance %g of the largest output); screening is off from here "
                            "on, every later row is computed in float32", worst, self.tolerance)
                self.on = False
                out[sel] = exact
                rest = torch.ones(rows, dtype=torch.bool, device=out.device)
                rest[sel] = False
                rest = rest.nonzero().squeeze(1)
                self.stats.rechecked += int(rest.numel())
                if rest.numel():
                    out[rest] = self._exact_rows(inputs, rest)
                return out
        out[sel] = exact
        return out


__all__ = ["AUDIT_EVERY", "SCREENS", "SCREEN_TOLERANCE", "Screen", "ScreenStats", "check_screen"]
