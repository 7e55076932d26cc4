"""Loads the native extension and gives every ``torch.ops.carprune`` op a fake (meta) kernel.

The fake kernels let ``torch.compile``/``opcheck`` reason about output shapes without data.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.carprune.*)
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "carprune's native extension failed to load. Build it against the installed torch with "
        "`pip install --no-build-isolation .` (torch must be installed first)."
    ) from exc

WITH_CUDA: bool = bool(_C.with_cuda)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("carprune::ablate_conv")
def _ablate_conv_fake(a, weight, z, scale, shift, channels, stride, padding, dilation, relu):
    torch._check(a.dim() == 4 and weight.dim() == 4, lambda: "a and weight must be 4-D")
    ho = _conv_out(a.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = _conv_out(a.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    m, b, f = channels.shape[0], a.shape[0], weight.shape[0]
    if _nhwc_output(z):   # the CPU kernel's channels_last output: [m, B, Ho, Wo, F] in memory
        return a.new_empty((m, b, ho, wo, f)).permute(0, 1, 4, 2, 3)
    return a.new_empty((m, b, f, ho, wo))


def _nhwc_output(z: torch.Tensor) -> bool:
    """Whether ablate_conv writes its output in channels_last: on CPU, when z is channels_last
    (and not also plain contiguous, as a 1x1 plane is)."""
    return (z.device.type == "cpu" and z.dim() == 4 and not z.is_contiguous()
            and z.is_contiguous(memory_format=torch.channels_last))


@torch.library.register_fake("carprune::ablate_conv_head")
def _ablate_conv_head_fake(a, weight, z, scale, shift, channels, stride, padding, dilation, relu,
                           residual, relu_after, fc_weight, fc_bias):
    torch._check(a.dim() == 4 and weight.dim() == 4, lambda: "a and weight must be 4-D")
    torch._check(fc_weight.dim() == 2 and fc_weight.shape[1] == weight.shape[0],
                 lambda: "fc_weight must be [K, F]")
    return a.new_empty((channels.shape[0], a.shape[0], fc_weight.shape[0]))


@torch.library.register_fake("carprune::class_correct_counts")
def _class_correct_counts_fake(logits, labels, topk=1):
    torch._check(logits.dim() == 3, lambda: "logits must be [m, B, K]")
    return labels.new_empty((logits.shape[0], logits.shape[2]))


def ablate_conv(
    a: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    channels: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    relu: bool = False,
) -> torch.Tensor:
    """``[m, B, F, Ho, Wo]``: act(scale * (z - conv(a[:, s], weight[:, s])) + shift) per channel s.

    ``z = conv(a, weight) (+ bias)`` is the consumer's full pre-activation, computed once; each
    ablation then costs one single-channel conv instead of a full one. On CPU, a channels_last
    ``z`` gives a channels_last output (``[m, B, Ho, Wo, F]`` in memory, so that
    ``out.view(m * B, F, Ho, Wo)`` is channels_last, as oneDNN convolutions read it), with the
    same values; otherwise the output is contiguous.
    """
    return torch.ops.carprune.ablate_conv(
        a, weight, z, scale, shift, channels, list(stride), list(padding), list(dilation), relu
    )


def ablate_conv_head(
    a: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    channels: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    relu: bool = False,
    residual: torch.Tensor | None = None,
    relu_after: bool = False,
    fc_weight: torch.Tensor | None = None,
    fc_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[m, B, K]`` logits of the standard residual-network ending after the fused consumer.

    Per channel s = ``channels[j]`` (-1: nothing removed) and image b:
    ``v = act_after(act(scale * (z - conv(a[:, s], weight[:, s])) + shift) + residual)``
    (act: ReLU if ``relu``; act_after: ReLU if ``relu_after``; no residual term if None), then
    the global average pool over positions and ``fc_weight @ pooled + fc_bias``. Up to float
    rounding this is ablate_conv followed by add, ReLU, ``mean((2, 3))`` and ``F.linear``, without
    the ``[m, B, F, Ho, Wo]`` feature map.
    """
    if fc_weight is None:
        raise ValueError("ablate_conv_head needs fc_weight, the [K, F] weight of the final linear layer")
    return torch.ops.carprune.ablate_conv_head(
        a, weight, z, scale, shift, channels, list(stride), list(padding), list(dilation), relu,
        residual, relu_after, fc_weight, fc_bias
    )


def class_correct_counts(logits: torch.Tensor, labels: torch.Tensor, topk: int = 1) -> torch.Tensor:
    """``[m, K]`` int64: images of each class whose label is in the top-k of ``logits[j]``."""
    return torch.ops.carprune.class_correct_counts(logits, labels, topk)
