"""The native ops against plain PyTorch references, on random and real inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import carprune as cp


def reference_ablate(a, w, bias, scale, shift, channels, stride, padding, dilation, relu):
    """Per ablation: zero input channel s, run the full conv, then affine and ReLU (float64)."""
    outs = []
    for s in channels.tolist():
        a_s = a.double().clone()
        a_s[:, s] = 0
        z = F.conv2d(a_s, w.double(), None if bias is None else bias.double(), stride, padding,
                     dilation)
        v = z * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        outs.append(v.clamp_min(0) if relu else v)
    return torch.stack(outs)


CASES = [
    # B, C, F, H, W, k, stride, padding, dilation
    (2, 3, 5, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 4, 6, 11, 10, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 5, 3, 8, 8, (5, 5), (1, 1), (0, 0), (1, 1)),
    (2, 2, 4, 9, 13, (3, 2), (2, 1), (2, 0), (1, 1)),
    (2, 3, 4, 12, 12, (3, 3), (1, 1), (2, 2), (2, 2)),
    (1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_ablate_conv_matches_masked_conv(case, relu):
    B, C, Fo, H, W, k, stride, padding, dilation = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    a = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(Fo, C, *k, generator=g, dtype=torch.float64)
    bias = torch.randn(Fo, generator=g, dtype=torch.float64)
    scale = torch.rand(Fo, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(Fo, generator=g, dtype=torch.float64)
    channels = torch.tensor([C - 1, 0, C // 2, 0], dtype=torch.int64)
    z = F.conv2d(a, w, bias, stride, padding, dilation)
    out = cp.ablate_conv(a, w, z, scale, shift, channels, stride, padding, dilation, relu)
    ref = reference_ablate(a, w, bias, scale, shift, channels, stride, padding, dilation, relu)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # float32 agrees to rounding
    out32 = cp.ablate_conv(a.float(), w.float(), z.float(), scale.float(), shift.float(),
                           channels, stride, padding, dilation, relu)
    torch.testing.assert_close(out32.double(), ref, rtol=1e-4, atol=1e-4)


def test_ablate_conv_noncontiguous_inputs():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 4, 10, 10, generator=g, dtype=torch.float64)[::2].transpose(2, 3)
    w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64).transpose(2, 3)
    assert not a.is_contiguous() and not w.is_contiguous()
    z = F.conv2d(a, w, None, 1, 1)
    scale, shift = torch.ones(3, dtype=torch.float64)[::1], torch.zeros(6, dtype=torch.float64)[::2]
    ch = torch.arange(4, dtype=torch.int64).flip(0)
    out = cp.ablate_conv(a, w, z, scale, shift, ch, (1, 1), (1, 1), (1, 1), True)
    ref = reference_ablate(a, w, None, scale, shift, ch, 1, 1, 1, True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_ablate_conv_on_real_resnet_layer(resnet20, cifar_test):
    """layer3.2: the real activations after relu1, consumer conv2 with bn2 folded."""
    x, _ = cifar_test.batch(list(range(0, 10000, 1000)))
    blk = resnet20.layer3[2]
    acts = {}
    h = blk.relu1.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach()))
    with torch.no_grad():
        resnet20(x)
    h.remove()
    a = acts["a"].double()
    bn = blk.bn2
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    shift = (bn.bias.detach().double() - bn.running_mean.double() * scale)
    w = blk.conv2.weight.detach().double()
    z = F.conv2d(a, w, None, 1, 1)
    ch = torch.tensor([0, 7, 63, 31], dtype=torch.int64)
    out = cp.ablate_conv(a, w, z, scale, shift, ch, (1, 1), (1, 1), (1, 1), False)
    ref = reference_ablate(a, w, None, scale, shift, ch, 1, 1, 1, False)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_ablate_conv_opcheck():
    a = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    z = F.conv2d(a, w, None, 2, 1)
    args = (a, w, z, torch.ones(4), torch.zeros(4), torch.tensor([0, 2]), [2, 2], [1, 1], [1, 1],
            True)
    torch.library.opcheck(torch.ops.carprune.ablate_conv.default, args)


@pytest.mark.parametrize("bad, match", [
    (lambda a, w, z: (a[0], w, z), "must be \\[B, C, H, W\\]"),
    (lambda a, w, z: (a, w[:, :2], z), "input channels"),
    (lambda a, w, z: (a.double(), w, z), "`weight` is Float but the activations are Double"),
    (lambda a, w, z: (a.int(), w, z), "float32 or float64"),
    (lambda a, w, z: (a, w, z[:, :, :2]), "`z` must be"),
])
def test_ablate_conv_errors(bad, match):
    a, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    z = F.conv2d(a, w, None, 1, 1)
    a2, w2, z2 = bad(a, w, z)
    with pytest.raises(RuntimeError, match=match):
        cp.ablate_conv(a2, w2, z2, torch.ones(4), torch.zeros(4), torch.tensor([0]), (1, 1),
                       (1, 1), (1, 1), False)


def test_ablate_conv_channel_out_of_range():
    a, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    z = F.conv2d(a, w, None, 1, 1)
    with pytest.raises(RuntimeError, match="channel indices must lie in \\[0, 3\\)"):
        cp.ablate_conv(a, w, z, torch.ones(4), torch.zeros(4), torch.tensor([3]), (1, 1), (1, 1),
                       (1, 1), False)


def reference_counts(logits, labels, topk):
    """Top-k membership by sorting with torch's stable order: ties keep the lower index first,
    which is how torch.argmax breaks them."""
    m, B, K = logits.shape
    counts = torch.zeros(m, K, dtype=torch.int64)
    for j in range(m):
        order = torch.sort(logits[j].double(), dim=1, descending=True, stable=True).indices
        hit = (order[:, :topk] == labels[:, None]).any(1)
        for b in range(B):
            counts[j, labels[b]] += int(hit[b])
    return counts


@pytest.mark.parametrize("topk", [1, 2, 5])
def test_class_correct_counts_random_with_ties(topk):
    g = torch.Generator().manual_seed(topk)
    logits = torch.randint(0, 4, (5, 37, 10), generator=g).float()  # many ties
    labels = torch.randint(0, 10, (37,), generator=g)
    out = cp.class_correct_counts(logits, labels, topk)
    torch.testing.assert_close(out, reference_counts(logits, labels, topk))
    if topk == 1:
        hits = logits.argmax(2) == labels
        for j in range(5):
            assert out[j].sum() == hits[j].sum()


def test_class_correct_counts_real_logits(resnet20, cifar_test):
    x, y = cifar_test.sample(300, seed=3).batch(slice(None))
    with torch.no_grad():
        logits = resnet20(x).view(3, 100, 10)
    out = cp.class_correct_counts(logits, y.view(3, 100)[0].clone(), 1)
    ref = torch.stack([torch.bincount(y[:100][logits[j].argmax(1) == y[:100]], minlength=10)
                       for j in range(3)])
    torch.testing.assert_close(out, ref)
    out64 = cp.class_correct_counts(logits.double(), y[:100].clone(), 5)
    torch.testing.assert_close(out64, reference_counts(logits, y[:100], 5))


def test_class_correct_counts_opcheck_and_errors():
    logits, labels = torch.randn(3, 8, 4), torch.randint(0, 4, (8,))
    torch.library.opcheck(torch.ops.carprune.class_correct_counts.default, (logits, labels, 1))
    with pytest.raises(RuntimeError, match="labels must lie in \\[0, 4\\)"):
        cp.class_correct_counts(logits, torch.full((8,), 4), 1)
    with pytest.raises(RuntimeError, match="labels must lie in"):
        cp.class_correct_counts(logits, torch.full((8,), -1), 1)
    with pytest.raises(RuntimeError, match="must be \\[m, B, K\\]"):
        cp.class_correct_counts(logits[0], labels, 1)
    with pytest.raises(RuntimeError, match="`labels` must be \\[8\\]"):
        cp.class_correct_counts(logits, labels[:3], 1)
    with pytest.raises(RuntimeError, match="int64"):
        cp.class_correct_counts(logits, labels.int(), 1)
