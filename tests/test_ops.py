"""The native ops against plain PyTorch references, on random and real inputs, on every device.

Each op test runs on the CPU and on CUDA; without a CUDA device the CUDA cases are collected and
skipped ("no CUDA device"). A CUDA device with an extension built without CUDA kernels fails them.
The references always run on the CPU in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import carprune as cp

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def _on(name: str) -> torch.device:
    """The torch device `name`; a CUDA device without the extension's CUDA kernels is an error."""
    if name == "cuda" and not cp._ops.WITH_CUDA:
        pytest.fail("a CUDA device is present but carprune's extension was built without CUDA "
                    "kernels: build it against a CUDA torch (scripts/env.sh with CARPRUNE_TORCH=cuda)")
    return torch.device(name)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return _on(request.param)


def _to(dev: torch.device, *tensors):
    return tuple(None if t is None else t.to(dev) for t in tensors)


def reference_ablate(a, w, bias, scale, shift, channels, stride, padding, dilation, relu):
    """Per ablation: zero input channel s, run the full conv, then affine and ReLU (float64)."""
    a, w, bias, scale, shift = (None if t is None else t.cpu().double()
                                for t in (a, w, bias, scale, shift))
    outs = []
    for s in channels.tolist():
        a_s = a.clone()
        a_s[:, s] = 0
        z = F.conv2d(a_s, w, bias, stride, padding, dilation)
        v = z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
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
def test_ablate_conv_matches_masked_conv(case, relu, device):
    B, C, Fo, H, W, k, stride, padding, dilation = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    a = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(Fo, C, *k, generator=g, dtype=torch.float64)
    bias = torch.randn(Fo, generator=g, dtype=torch.float64)
    scale = torch.rand(Fo, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(Fo, generator=g, dtype=torch.float64)
    channels = torch.tensor([C - 1, 0, C // 2, 0], dtype=torch.int64)
    z = F.conv2d(a, w, bias, stride, padding, dilation)
    ref = reference_ablate(a, w, bias, scale, shift, channels, stride, padding, dilation, relu)
    a, w, z, scale, shift, channels = _to(device, a, w, z, scale, shift, channels)
    out = cp.ablate_conv(a, w, z, scale, shift, channels, stride, padding, dilation, relu)
    assert out.device.type == device.type and out.shape == ref.shape
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-10)
    # float32 agrees to rounding
    out32 = cp.ablate_conv(a.float(), w.float(), z.float(), scale.float(), shift.float(),
                           channels, stride, padding, dilation, relu)
    torch.testing.assert_close(out32.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_ablate_conv_channels_last_z(case, device):
    """A channels_last z gives (on CPU) a channels_last output with the identical values of the
    contiguous one (the same sums in the same order); CUDA returns its contiguous output."""
    B, C, Fo, H, W, k, stride, padding, dilation = case
    g = torch.Generator().manual_seed(hash(case) % 2**31 + 1)
    a = torch.randn(B, C, H, W, generator=g)
    w = torch.randn(Fo, C, *k, generator=g)
    scale, shift = torch.rand(Fo, generator=g) + 0.5, torch.randn(Fo, generator=g)
    channels = torch.tensor([C - 1, 0, C // 2], dtype=torch.int64)
    z = F.conv2d(a, w, None, stride, padding, dilation)
    a, w, z, scale, shift, channels = _to(device, a, w, z, scale, shift, channels)
    plain = cp.ablate_conv(a, w, z, scale, shift, channels, stride, padding, dilation, True)
    zl = z.contiguous(memory_format=torch.channels_last)
    out = cp.ablate_conv(a, w, zl, scale, shift, channels, stride, padding, dilation, True)
    assert torch.equal(out, plain)
    nhwc = device.type == "cpu" and not zl.is_contiguous()
    rows = out.view(-1, *out.shape[2:])
    assert rows.is_contiguous(memory_format=torch.channels_last) == (nhwc or rows.is_contiguous())
    assert out.is_contiguous() != nhwc
    if nhwc:
        torch.library.opcheck(torch.ops.carprune.ablate_conv.default,
                              (a, w, zl, scale, shift, channels, list(stride), list(padding),
                               list(dilation), True))


def test_ablate_conv_noncontiguous_inputs(device):
    g = torch.Generator().manual_seed(1)
    # made on the device, then sliced: .to() would make a non-dense tensor contiguous
    a = torch.randn(6, 4, 10, 10, generator=g, dtype=torch.float64).to(device)[::2].transpose(2, 3)
    w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64).to(device).transpose(2, 3)
    assert not a.is_contiguous() and not w.is_contiguous()
    z = F.conv2d(a, w, None, 1, 1)
    scale = torch.ones(3, dtype=torch.float64, device=device)[::1]
    shift = torch.zeros(6, dtype=torch.float64, device=device)[::2]
    ch = torch.arange(4, dtype=torch.int64, device=device).flip(0)
    out = cp.ablate_conv(a, w, z, scale, shift, ch, (1, 1), (1, 1), (1, 1), True)
    ref = reference_ablate(a, w, None, scale, shift, ch, 1, 1, 1, True)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-10)


def test_ablate_conv_on_real_resnet_layer(resnet20, cifar_test, device):
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
    ref = reference_ablate(a, w, None, scale, shift, ch, 1, 1, 1, False)
    out = cp.ablate_conv(*_to(device, a, w, z, scale, shift, ch), (1, 1), (1, 1), (1, 1), False)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)


def test_ablate_conv_opcheck(device):
    a = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    z = F.conv2d(a, w, None, 2, 1)
    args = (*_to(device, a, w, z, torch.ones(4), torch.zeros(4), torch.tensor([0, 2])), [2, 2],
            [1, 1], [1, 1], True)
    torch.library.opcheck(torch.ops.carprune.ablate_conv.default, args)


@pytest.mark.parametrize("bad, match", [
    (lambda a, w, z: (a[0], w, z), "must be \\[B, C, H, W\\]"),
    (lambda a, w, z: (a, w[:, :2], z), "input channels"),
    (lambda a, w, z: (a.double(), w, z), "`weight` is Float but the activations are Double"),
    (lambda a, w, z: (a.int(), w, z), "float32 or float64"),
    (lambda a, w, z: (a, w, z[:, :, :2]), "`z` must be"),
])
def test_ablate_conv_errors(bad, match, device):
    a, w = _to(device, torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3))
    z = F.conv2d(a, w, None, 1, 1)
    a2, w2, z2 = bad(a, w, z)
    with pytest.raises(RuntimeError, match=match):
        cp.ablate_conv(a2, w2, z2, *_to(device, torch.ones(4), torch.zeros(4), torch.tensor([0])),
                       (1, 1), (1, 1), (1, 1), False)


def test_ablate_conv_channel_out_of_range(device):
    a, w = _to(device, torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3))
    z = F.conv2d(a, w, None, 1, 1)
    with pytest.raises(RuntimeError, match="channel indices must lie in \\[0, 3\\)"):
        cp.ablate_conv(a, w, z, *_to(device, torch.ones(4), torch.zeros(4), torch.tensor([3])),
                       (1, 1), (1, 1), (1, 1), False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("on_cuda", ["a", "shift"])
def test_ablate_conv_device_mismatch(on_cuda):
    """Every tensor must be on the activations' device; the message names the argument. (Needs two
    real devices: a meta tensor beside a CPU one reaches the fake kernel, which checks nothing.)"""
    cuda, cpu = _on("cuda"), torch.device("cpu")
    dev_a, dev_shift = (cuda, cpu) if on_cuda == "a" else (cpu, cuda)
    a, w = _to(dev_a, torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3))
    z = F.conv2d(a, w, None, 1, 1)
    with pytest.raises(RuntimeError, match=f"`shift` is on {dev_shift.type}.* but the activations "
                                           f"are on {dev_a.type}"):
        cp.ablate_conv(a, w, z, torch.ones(4, device=dev_a), torch.zeros(4, device=dev_shift),
                       torch.tensor([0], device=dev_a), (1, 1), (1, 1), (1, 1), False)


def reference_counts(logits, labels, topk):
    """Top-k membership by sorting with torch's stable order: ties keep the lower index first,
    which is how torch.argmax breaks them."""
    logits, labels = logits.cpu(), labels.cpu()
    m, B, K = logits.shape
    counts = torch.zeros(m, K, dtype=torch.int64)
    for j in range(m):
        order = torch.sort(logits[j].double(), dim=1, descending=True, stable=True).indices
        hit = (order[:, :topk] == labels[:, None]).any(1)
        for b in range(B):
            counts[j, labels[b]] += int(hit[b])
    return counts


@pytest.mark.parametrize("topk", [1, 2, 5])
def test_class_correct_counts_random_with_ties(topk, device):
    g = torch.Generator().manual_seed(topk)
    logits = torch.randint(0, 4, (5, 37, 10), generator=g).float()  # many ties
    labels = torch.randint(0, 10, (37,), generator=g)
    out = cp.class_correct_counts(*_to(device, logits, labels), topk)
    assert out.device.type == device.type and out.dtype == torch.int64
    torch.testing.assert_close(out.cpu(), reference_counts(logits, labels, topk))
    if topk == 1:
        hits = logits.argmax(2) == labels
        for j in range(5):
            assert out[j].sum().item() == hits[j].sum().item()


def test_class_correct_counts_real_logits(resnet20, cifar_test, device):
    x, y = cifar_test.sample(300, seed=3).batch(slice(None))
    with torch.no_grad():
        logits = resnet20(x).view(3, 100, 10)
    out = cp.class_correct_counts(*_to(device, logits, y.view(3, 100)[0].clone()), 1)
    ref = torch.stack([torch.bincount(y[:100][logits[j].argmax(1) == y[:100]], minlength=10)
                       for j in range(3)])
    torch.testing.assert_close(out.cpu(), ref)
    out64 = cp.class_correct_counts(*_to(device, logits.double(), y[:100].clone()), 5)
    torch.testing.assert_close(out64.cpu(), reference_counts(logits, y[:100], 5))


def test_class_correct_counts_opcheck_and_errors(device):
    logits, labels = _to(device, torch.randn(3, 8, 4), torch.randint(0, 4, (8,)))
    torch.library.opcheck(torch.ops.carprune.class_correct_counts.default, (logits, labels, 1))
    with pytest.raises(RuntimeError, match="labels must lie in \\[0, 4\\)"):
        cp.class_correct_counts(logits, torch.full((8,), 4, device=device), 1)
    with pytest.raises(RuntimeError, match="labels must lie in"):
        cp.class_correct_counts(logits, torch.full((8,), -1, device=device), 1)
    with pytest.raises(RuntimeError, match="must be \\[m, B, K\\]"):
        cp.class_correct_counts(logits[0], labels, 1)
    with pytest.raises(RuntimeError, match="`labels` must be \\[8\\]"):
        cp.class_correct_counts(logits, labels[:3], 1)
    with pytest.raises(RuntimeError, match="int64"):
        cp.class_correct_counts(logits, labels.int(), 1)


# -- ablate_conv_head ------------------------------------------------------------------------
def reference_head(a, w, z_bias, scale, shift, channels, stride, padding, dilation, relu, residual,
                   relu_after, fc_w, fc_b):
    """Per ablation: zero input channel s (none for -1), the full conv, affine, ReLU, + residual,
    ReLU, mean over positions, linear; everything in float64 on the CPU."""
    a, w, z_bias, scale, shift, residual, fc_w, fc_b = (
        None if t is None else t.cpu().double()
        for t in (a, w, z_bias, scale, shift, residual, fc_w, fc_b))
    outs = []
    for s in channels.tolist():
        a_s = a.clone()
        if s >= 0:
            a_s[:, s] = 0
        v = F.conv2d(a_s, w, z_bias, stride, padding, dilation)
        v = v * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        if relu:
            v = v.clamp_min(0)
        if residual is not None:
            v = v + residual
        if relu_after:
            v = v.clamp_min(0)
        outs.append(F.linear(v.mean((2, 3)), fc_w, fc_b))
    return torch.stack(outs)


def _isas():
    """Every CPU instruction set the kernel dispatches to that this machine runs."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.is_file() else []
    isas = ["default"]
    if "avx2" in flags and "fma" in flags:
        isas.append("avx2")
    if {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= set(flags):
        isas.append("avx512")
    return isas


def _head_inputs(case, seed, dtype=torch.float64, sparse=True):
    B, C, Fo, H, W, k, stride, padding, dilation = case
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    if sparse:  # like activations after a ReLU: most pixels zero, some planes entirely
        a = a.clamp_min(0.5) - 0.5
        a[:, C // 2] = 0
    w = torch.randn(Fo, C, *k, generator=g, dtype=dtype)
    bias = torch.randn(Fo, generator=g, dtype=dtype)
    z = F.conv2d(a, w, bias, stride, padding, dilation)
    scale = torch.rand(Fo, generator=g, dtype=dtype) + 0.5
    shift = torch.randn(Fo, generator=g, dtype=dtype)
    res = torch.randn(z.shape, generator=g, dtype=dtype)
    fc_w = torch.randn(7, Fo, generator=g, dtype=dtype)
    fc_b = torch.randn(7, generator=g, dtype=dtype)
    return a, w, bias, z, scale, shift, res, fc_w, fc_b


HEAD_CASES = CASES[:5] + [
    (2, 3, 37, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1)),    # F not a multiple of any vector width
    (3, 4, 20, 9, 9, (1, 1), (2, 2), (0, 0), (1, 1)),    # 1x1, stride 2 (bottleneck conv3 shape)
]


# every CPU instruction set the kernel dispatches to here, and CUDA (which has no ISA choice)
DEVICE_ISAS = [("cpu", isa) for isa in _isas()] + [
    pytest.param("cuda", None, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                        reason="no CUDA device"))]


@pytest.mark.parametrize("case", HEAD_CASES)
@pytest.mark.parametrize("device_name, isa", DEVICE_ISAS)
def test_ablate_conv_head_matches_masked_reference(case, device_name, isa, monkeypatch):
    device = _on(device_name)
    if isa is not None:
        monkeypatch.setenv("CARPRUNE_CPU_ISA", isa)
    a, w, bias, z, scale, shift, res, fc_w, fc_b = _to(device, *_head_inputs(case, hash(case) % 2**31))
    C = a.shape[1]
    channels = torch.tensor([C - 1, -1, 0, C // 2, 0], dtype=torch.int64, device=device)
    for relu, with_res, relu_after, with_bias in [(False, True, True, True),
                                                  (False, False, False, True),
                                                  (True, False, False, False),
                                                  (True, True, True, True),
                                                  (True, True, False, True),
                                                  (False, True, False, False)]:
        r = res if with_res else None
        b = fc_b if with_bias else None
        args = (a, w, z, scale, shift, channels, case[6], case[7], case[8], relu, r, relu_after,
                fc_w, b)
        out = cp.ablate_conv_head(*args)
        ref = reference_head(a, w, bias, scale, shift, channels, *case[6:], relu, r, relu_after,
                             fc_w, b)
        assert out.device.type == device.type and out.shape == ref.shape == (5, a.shape[0], 7)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-10)
        # channel -1 is the unablated network, and an all-zero plane changes nothing
        assert torch.equal(out[3], out[1])
        out32 = cp.ablate_conv_head(*[t.float() if isinstance(t, torch.Tensor) and
                                      t.is_floating_point() else t for t in args])
        torch.testing.assert_close(out32.double().cpu(), ref, rtol=1e-4, atol=1e-4)


def test_ablate_conv_head_is_ablate_conv_then_the_ending(device):
    """The op equals the existing ablate_conv followed by the ending in torch ops."""
    case = (3, 6, 16, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1))
    a, w, _, z, scale, shift, res, fc_w, fc_b = _to(device, *_head_inputs(case, 3))
    ch = torch.arange(6, device=device)
    v = cp.ablate_conv(a, w, z, scale, shift, ch, (1, 1), (1, 1), (1, 1), False)
    ref = F.linear((v + res).clamp_min(0).mean((3, 4)), fc_w, fc_b)
    out = cp.ablate_conv_head(a, w, z, scale, shift, ch, (1, 1), (1, 1), (1, 1), False, res, True,
                              fc_w, fc_b)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


def test_ablate_conv_head_on_real_resnet_ending(resnet20, cifar_test, device):
    """ResNet-20 layer3.2: real activations after relu1, consumer conv2 + bn2, the block input as
    the residual, relu2, pool and the trained linear layer; against the masked full network."""
    x, y = cifar_test.batch(list(range(0, 10000, 500)))
    blk = resnet20.layer3[2]
    acts = {}
    hooks = [blk.relu1.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach())),
             blk.register_forward_hook(lambda m, i, o: acts.__setitem__("x", i[0].detach()))]
    with torch.no_grad():
        full = resnet20(x).double()
    for h in hooks:
        h.remove()
    a, res = acts["a"].double(), acts["x"].double()
    bn = blk.bn2
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    shift = bn.bias.detach().double() - bn.running_mean.double() * scale
    w = blk.conv2.weight.detach().double()
    fc_w, fc_b = resnet20.linear.weight.detach().double(), resnet20.linear.bias.detach().double()
    z = F.conv2d(a, w, None, 1, 1)
    ch = torch.tensor([-1, 0, 7, 63, 31], dtype=torch.int64)
    ref = reference_head(a, w, None, scale, shift, ch, 1, 1, 1, False, res, True, fc_w, fc_b)
    a, w, z, scale, shift, ch, res, fc_w, fc_b = _to(device, a, w, z, scale, shift, ch, res, fc_w,
                                                     fc_b)
    out = cp.ablate_conv_head(a, w, z, scale, shift, ch, (1, 1), (1, 1), (1, 1), False, res, True,
                              fc_w, fc_b).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[0].float(), full.float(), rtol=1e-4, atol=1e-4)


def test_ablate_conv_head_independent_of_split_and_threads(device):
    """Each (ablation, image) is computed alone: any split of images or channels over calls and
    any CPU thread count give bit-identical logits (CUDA: no atomics, fixed-order reductions)."""
    case = (23, 16, 64, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1))
    a, w, _, z, scale, shift, res, fc_w, fc_b = _to(device, *_head_inputs(case, 5, dtype=torch.float32))
    ch = torch.tensor([-1, *range(16)], dtype=torch.int64, device=device)

    def run(a_, z_, r_, c_):
        return cp.ablate_conv_head(a_, w, z_, scale, shift, c_, (1, 1), (1, 1), (1, 1), False, r_,
                                   True, fc_w, fc_b)

    whole = run(a, z, res, ch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(a, z, res, ch)
        torch.set_num_threads(2)
        two = run(a, z, res, ch)
    finally:
        torch.set_num_threads(threads)
    by_images = torch.cat([run(a[s:s + 5], z[s:s + 5], res[s:s + 5], ch) for s in range(0, 23, 5)],
                          dim=1)
    by_channels = torch.cat([run(a, z, res, ch[s:s + 3]) for s in range(0, 17, 3)])
    for other in (one, two, by_images, by_channels):
        assert torch.equal(whole, other)


def test_ablate_conv_head_propagates_nan(device):
    """A NaN activation makes every output of its image NaN (as in the masked network, where it
    reaches the logits unless its own channel is removed; here z already holds it), and leaves
    the other images alone."""
    case = (2, 3, 16, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1))
    a, w, _, _, scale, shift, res, fc_w, fc_b = _head_inputs(case, 9)
    a[1, 2, 3, 3] = float("nan")
    z = F.conv2d(a, w, None, 1, 1)
    ch = torch.tensor([-1, 0, 2], dtype=torch.int64)
    ref = reference_head(a, w, None, scale, shift, ch, 1, 1, 1, False, res, True, fc_w, fc_b)
    out = cp.ablate_conv_head(*_to(device, a, w, z, scale, shift, ch), (1, 1), (1, 1), (1, 1), False,
                              *_to(device, res), True, *_to(device, fc_w, fc_b)).cpu()
    assert out[:, 1].isnan().all() and ref[:2, 1].isnan().all()
    torch.testing.assert_close(out[:, 0], ref[:, 0], rtol=1e-10, atol=1e-10)


def test_ablate_conv_head_opcheck(device):
    a = torch.randn(2, 3, 6, 6).clamp_min(0)
    w = torch.randn(4, 3, 3, 3)
    z = F.conv2d(a, w, None, 2, 1)
    for res, bias in ((torch.randn(z.shape), torch.randn(5)), (None, None)):
        args = (*_to(device, a, w, z, torch.ones(4), torch.zeros(4), torch.tensor([0, -1, 2])),
                [2, 2], [1, 1], [1, 1], False, *_to(device, res), True,
                *_to(device, torch.randn(5, 4), bias))
        torch.library.opcheck(torch.ops.carprune.ablate_conv_head.default, args)


@pytest.mark.parametrize("change, match", [
    (dict(residual=torch.zeros(2, 4, 5, 6)), "`residual` must have the shape of `z`"),
    (dict(residual=torch.zeros(2, 4, 6, 6, dtype=torch.float64)), "`residual` is Double"),
    (dict(fc_weight=torch.zeros(5, 3)), "`fc_weight` must be \\[K, 4\\]"),
    (dict(fc_weight=torch.zeros(0, 4)), "`fc_weight` must be \\[K, 4\\] with K >= 1"),
    (dict(fc_bias=torch.zeros(4)), "`fc_bias` must be \\[5\\]"),
    (dict(channels=torch.tensor([-2])), "channel indices must lie in \\[-1, 3\\), got \\[-2, -2\\]"),
    (dict(channels=torch.tensor([3])), "channel indices must lie in \\[-1, 3\\)"),
    (dict(a=torch.zeros(2, 3, 6, 6, dtype=torch.float64)), "`weight` is Float but the activations"),
])
def test_ablate_conv_head_errors(change, match, device):
    a, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    kw = dict(a=a, weight=w, z=F.conv2d(a, w, None, 1, 1), scale=torch.ones(4), shift=torch.zeros(4),
              channels=torch.tensor([0]), residual=None, fc_weight=torch.zeros(5, 4), fc_bias=None)
    kw.update(change)
    kw = {k: None if t is None else t.to(device) for k, t in kw.items()}
    with pytest.raises(RuntimeError, match=match):
        cp.ablate_conv_head(kw["a"], kw["weight"], kw["z"], kw["scale"], kw["shift"],
                            kw["channels"], (1, 1), (1, 1), (1, 1), False, kw["residual"], True,
                            kw["fc_weight"], kw["fc_bias"])


def test_ablate_conv_head_isa_override_checked(monkeypatch):
    """CPU only: CARPRUNE_CPU_ISA chooses among the CPU kernels; the CUDA kernel has no such choice."""
    a, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    args = (a, w, F.conv2d(a, w, None, 1, 1), torch.ones(3), torch.zeros(3), torch.tensor([0]),
            (1, 1), (1, 1), (1, 1), False, None, False, torch.zeros(2, 3), None)
    monkeypatch.setenv("CARPRUNE_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="CARPRUNE_CPU_ISA must be default, avx2 or avx512, "
                                           "got 'sse9'"):
        cp.ablate_conv_head(*args)
