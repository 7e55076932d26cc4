"""carprune.interpret against independent references: receptive fields against the support of
input gradients, top patches against a planted pattern and against an exhaustive search through
forward hooks, class importance and per-class accuracy against networks with a filter zeroed by
hand, colour selectivity against a second formula; and the HTML page rendered in headless
Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import carprune as cp
from carprune import surgery
from carprune.engine import TARGET_CALL_BYTES
from carprune.greedy import CompressionResult, Step
from carprune.interpret import (
    InterpretationReport,
    build_report,
    class_importance,
    colour_selectivity,
    interpret,
    receptive_field,
    search_patches,
)
from carprune.interpret.patches import crop

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------------
def zero_channels(model: nn.Module, module_name: str, channels):
    """A forward hook zeroing `channels` at the output of `module_name` (a filter removed)."""
    module = dict(model.named_modules())[module_name]

    def hook(mod, inp, out):
        out = out.clone()
        out[:, list(channels)] = 0
        return out

    return module.register_forward_hook(hook)


def per_class(model, x, y, k, batch=500):
    correct = torch.zeros(k, dtype=torch.int64)
    with torch.no_grad():
        for s in range(0, len(y), batch):
            ok = model(x[s:s + batch]).argmax(1) == y[s:s + batch]
            correct += torch.bincount(y[s:s + batch][ok], minlength=k)
    return correct.numpy() / np.bincount(y.numpy(), minlength=k)


def hand_made_compression(model, layer, removed, num_filters):
    """A CompressionResult as greedy.compress_layer returns it, one filter per step."""
    traj = [Step(0, [], [], num_filters, 0.0, None, 0, 0, 0, 0)]
    for i, f in enumerate(removed):
        traj.append(Step(i + 1, [int(f)], [0.0], num_filters - i - 1, 0.0, None, 0, 0, 0, 0))
    kept = [f for f in range(num_filters) if f not in set(removed)]
    pruned = surgery.prune_filters(model, layer, removed)
    return CompressionResult(layer=layer, criterion="car", num_filters=num_filters,
                             removed=[int(f) for f in removed], kept=kept, trajectory=traj,
                             config={}, model=pruned)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium binary found: the report page cannot be rendered. "
                "Run scripts/ensure_chromium.sh to install it.")


CHECK_JS = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.dataset.figure || i.alt);
  const tiles = [...document.querySelectorAll('i[role=img]')];
  const badTiles = tiles.filter(t => !getComputedStyle(t).backgroundImage.startsWith('url("data:image/png')
    || t.getBoundingClientRect().width < 8).map(t => t.dataset.figure);
  const px = el => parseFloat(getComputedStyle(el).fontSize);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let smallest = [1e9, ''];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!n.textContent.trim() || el.closest('#render-check')) continue;
    if (px(el) < smallest[0]) smallest = [px(el), n.textContent.trim().slice(0, 40)];
  }
  const captions = sel => [...document.querySelectorAll(sel)].map(
    c => [c.textContent, px(c), c.getBoundingClientRect().height]);
  const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'));
  const out = document.createElement('pre'); out.id = 'render-check';
  out.textContent = JSON.stringify({
    images: imgs.map(i => i.dataset.figure), bad, tiles: tiles.map(t => t.dataset.figure), badTiles,
    thumbs: document.querySelectorAll('i.cs').length, smallest, links,
    patchCaptions: captions('#patches figcaption'), weightCaptions: captions('#first-layer figcaption'),
    sections: [...document.querySelectorAll('section')].map(s => [s.id, s.querySelector('h2') !== null]),
    rows: document.querySelectorAll('#filters tbody tr').length,
    tableRows: [...document.querySelectorAll('table')].map(t => t.querySelectorAll('tbody tr').length)});
  document.body.appendChild(out);
});
</script>"""


def render_in_chromium(page: Path) -> dict:
    """Load the page (plus a checking script, in a copy) in headless Chromium; what it saw."""
    probe = page.with_name("render-check.html")
    probe.write_text(page.read_text().replace("</body>", CHECK_JS + "</body>"))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"chromium did not render the page (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


# -- receptive fields --------------------------------------------------------------------------
def gradient_box(model, layer, shape, row, col, n=8, seed=0):
    """Bounding box of the input pixels with nonzero gradient of the layer's output at (row, col)
    (summed over channels), over n random images: the field found by backpropagation."""
    conv = dict(model.named_modules())[layer]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, requires_grad=True)
    store = {}
    h = conv.register_forward_hook(lambda m, i, o: store.setdefault("out", o))
    try:
        model.eval()(x)
    finally:
        h.remove()
    store["out"][:, :, row, col].sum().backward()
    support = x.grad.abs().sum((0, 1)) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


@pytest.mark.parametrize("layer, positions", [
    ("conv1", [(0, 0), (31, 31)]),
    ("layer1.2.conv2", [(0, 0), (16, 20)]),
    ("layer2.0.conv1", [(8, 8), (15, 15)]),           # stride 2
    ("layer2.1.conv1", [(1, 2), (8, 8)]),             # after the subsampling option-A shortcut
    ("layer3.0.conv2", [(4, 4)]),                     # field larger than the image
])
def test_receptive_field_equals_gradient_support(resnet20, layer, positions):
    rf = receptive_field(resnet20, layer, (3, 32, 32))
    for r, c in positions:
        assert rf.box(r, c, 32, 32) == gradient_box(resnet20, layer, (3, 32, 32), r, c), (layer, r, c)


def test_receptive_field_through_pooling(lenet):
    rf = receptive_field(lenet, "conv2", (1, 28, 28))
    assert (rf.size, rf.stride, rf.offset) == ((14, 14), (2, 2), (0, 0))
    for r, c in [(0, 0), (3, 5), (7, 7)]:
        assert rf.box(r, c, 28, 28) == gradient_box(lenet, "conv2", (1, 28, 28), r, c)


# -- top patches -------------------------------------------------------------------------------
class Planted(nn.Module):
    """conv1 passes the image through (positive and negative parts), conv2 (stride 2) filter 0 is
    a matched filter for a 3x3 RGB pattern; filter 1 is its negative, turned back by BatchNorm."""

    def __init__(self, pattern: np.ndarray) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 3, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv1.weight.zero_()
            for c in range(3):
                self.conv1.weight[c, c, 1, 1] = 1
                self.conv1.weight[c + 3, c, 1, 1] = -1
            p = torch.from_numpy(pattern).float()          # [3, 3, 3] in {-1, +1}
            w = torch.cat([(p > 0).float(), (p < 0).float()])
            self.conv2.weight.zero_()
            self.conv2.weight[0] = w
            self.conv2.weight[1] = -w
            self.conv2.weight[2] = torch.rand(6, 3, 3, generator=torch.Generator().manual_seed(1))
            self.bn2.weight.copy_(torch.tensor([1.0, -1.0, 1.0]))

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc(self.flatten(self.pool(x)))


def test_planted_pattern_is_the_top_patch():
    rng = np.random.default_rng(0)
    pattern = rng.choice([-1, 1], size=(3, 3, 3))
    pixels = ((pattern + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)     # 0 / 255, [3, 3, RGB]
    images = rng.integers(108, 149, size=(400, 16, 16, 3), dtype=np.uint8)  # near grey
    planted = {17: (3, 4), 203: (7, 7), 350: (5, 1)}   # image -> conv2 output position (r, c)
    for i, (r, c) in planted.items():
        images[i, 2 * r - 1:2 * r + 2, 2 * c - 1:2 * c + 2] = pixels
    data = cp.data.ImageArrayDataset(images, rng.integers(0, 2, 400), ["a", "b"], [0.5] * 3,
                                     [0.5] * 3)
    model = Planted(pattern).eval()
    for at, detectors in (("bn", (0, 1)), ("conv", (0,))):
        res = search_patches(model, "conv2", data, k=3, activation=at, memory_budget=200_000,
                             progress=False)
        assert res.stats["batch_rows"] < 400          # several batches were merged
        rf = res.receptive_field
        assert (rf.size, rf.stride, rf.offset) == ((5, 5), (2, 2), (-2, -2))
        for f in detectors:
            assert set(res.images[f].tolist()) == set(planted), (at, f)
            # 27 taps of +-1, all matched (then BatchNorm: 1 / sqrt(1 + eps))
            np.testing.assert_allclose(res.values[f], 27.0 / (1 + 1e-5) ** 0.5 if at == "bn" else 27.0,
                                       rtol=1e-6)
            for j, i in enumerate(res.images[f].tolist()):
                r, c = planted[i]
                assert (res.rows[f, j], res.cols[f, j]) == (r, c)
                box = res.box(f, j)
                assert box == (max(0, 2 * r - 2), max(0, 2 * c - 2), min(16, 2 * r + 3),
                               min(16, 2 * c + 3))
                # the planted 3x3 lies inside the cut box, at the field's centre
                assert box[0] <= 2 * r - 1 and 2 * r + 2 <= box[2]
                assert box[1] <= 2 * c - 1 and 2 * c + 2 <= box[3]
                patch = crop(images[i], rf, r, c)
                assert patch.shape == (5, 5, 3)
                np.testing.assert_array_equal(patch[1:4, 1:4], pixels)
        if at == "conv":   # filter 1 before its negative BatchNorm responds least to the pattern
            assert not set(res.images[1].tolist()) & set(planted)
    # the image at (7, 7) sits in the bottom-right corner: its field is clipped there
    res = search_patches(model, "conv2", data, k=3, progress=False)
    j = res.images[0].tolist().index(203)
    assert res.box(0, j) == (12, 12, 16, 16)
    edge = crop(images[203], res.receptive_field, 7, 7)
    np.testing.assert_array_equal(edge[:4, :4], images[203, 12:16, 12:16])
    assert (edge[4, :] == 128).all() and (edge[:, 4] == 128).all()


def exhaustive_top(model, module_name, x, k):
    """Per filter the k images of highest spatial maximum, from all activations at once."""
    store = {}
    h = dict(model.named_modules())[module_name].register_forward_hook(
        lambda m, i, o: store.setdefault("a", o.detach()))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    a = store["a"].flatten(2)
    vmax, arg = a.max(dim=2)                     # [N, F]
    vals, imgs = vmax.t().topk(k + 1, dim=1)     # [F, k + 1]
    return a, vals.numpy(), imgs.numpy(), arg.t().numpy()


def test_streaming_search_equals_exhaustive_search(resnet20, cifar_test):
    data = cifar_test.subset(np.arange(400))
    x, _ = data.batch(slice(None))
    res = search_patches(resnet20, "layer3.2.conv1", data, k=9, memory_budget="200MiB",
                         progress=False)
    assert res.activation == "bn" and res.stats["max_batch"] < 100
    _, vals, imgs, arg = exhaustive_top(resnet20, "layer3.2.bn1", x, 9)
    np.testing.assert_allclose(res.values, vals[:, :9], rtol=1e-4, atol=1e-5)
    checked = 0
    for f in range(64):
        if vals[f, 8] - vals[f, 9] > 1e-3:       # the top 9 are well separated from the 10th
            assert set(res.images[f].tolist()) == set(imgs[f, :9].tolist())
            checked += 1
        for j, i in enumerate(res.images[f].tolist()):
            assert res.rows[f, j] * 8 + res.cols[f, j] == arg[f, i]
            assert res.labels[f, j] == data.labels[i]
    assert checked > 40


def test_memory_budget_bounds_the_batch_for_512_filters():
    rng = np.random.default_rng(0)
    n, f, k = 1500, 512, 9
    data = cp.data.ImageArrayDataset(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                                     rng.integers(0, 10, n), [str(i) for i in range(10)],
                                     [0.5] * 3, [0.25] * 3)
    model = nn.Sequential(nn.Conv2d(3, f, 3, padding=1), nn.BatchNorm2d(f), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(f, 10)).eval()
    seen = []
    h = model[0].register_forward_pre_hook(lambda m, i: seen.append(i[0].shape[0]))
    budget = 4 * 2**20
    res = search_patches(model, "0", data, k=k, memory_budget=budget, progress=False)
    h.remove()
    st = res.stats
    # the activations of one image: conv output + BatchNorm output, 512 x 8 x 8 floats each
    assert st["bytes_per_image"] >= 2 * f * 64 * 4
    assert max(seen[1:]) == st["max_batch"] <= st["batch_rows"]
    assert st["batch_rows"] * st["bytes_per_image"] <= budget
    assert st["state_bytes"] == f * k * (4 + 8 + 8)          # the running top-k, not N x F
    big = search_patches(model, "0", data, k=k, memory_budget="64MiB", progress=False)
    # a budget that is no longer the limit: the engine's call rule (the widest map, 512 x 8 x 8
    # floats per image, near TARGET_CALL_BYTES per batch)
    assert big.stats["largest_bytes"] == f * 64 * 4
    assert big.stats["batch_rows"] == TARGET_CALL_BYTES // (f * 64 * 4) == 32
    # reference: per-image maxima chunk by chunk, then the global top k
    x, _ = data.batch(slice(None))
    with torch.no_grad():
        vmax = torch.cat([model[1](model[0](x[s:s + 500])).flatten(2).amax(2)
                          for s in range(0, n, 500)])
    ref = vmax.t().topk(k, dim=1)
    np.testing.assert_allclose(res.values, ref.values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(big.values, res.values, rtol=1e-5, atol=1e-6)


# -- class importance --------------------------------------------------------------------------
def test_class_importance_matches_hooked_reference(lenet, mnist_test):
    rep = interpret(lenet, "conv2", mnist_test, top_classes=5, patches=4, progress=False)
    x, y = mnist_test.batch(slice(None))
    base = per_class(lenet, x, y, 10)
    assert rep.scored_images == len(y)
    assert rep.base_accuracy == pytest.approx(float((base * np.bincount(y.numpy())).sum() / len(y)))
    most = rep.highlight[0]
    for f in (most, 7, 31):
        h = zero_channels(lenet, "pool2", [f])
        try:
            car_c = base - per_class(lenet, x, y, 10)
        finally:
            h.remove()
        ci = rep.classes_of(f)
        # listed: only classes that lose (top) or gain (bottom) accuracy without the filter
        lose = sorted((c for c in range(10) if car_c[c] > 0), key=lambda c: (-car_c[c], c))
        gain = sorted((c for c in range(10) if car_c[c] < 0), key=lambda c: (car_c[c], c))
        assert [s.index for s in ci.top] == lose[:5]
        assert [s.index for s in ci.bottom] == gain[:5]
        assert (ci.positive, ci.negative) == (len(lose), len(gain))
        assert ci.note("top") == ("" if len(lose) >= 5 else
                                  "no class loses accuracy without it" if not lose else
                                  f"only {len(lose)} class{'es' if len(lose) > 1 else ''} "
                                  f"lose{'s' if len(lose) == 1 else ''} accuracy without it")
        for s in ci.top + ci.bottom:
            assert s.car_c == pytest.approx(car_c[s.index], abs=1e-12)
            assert s.name == mnist_test.classes[s.index]
            assert mnist_test.labels[s.sample] == s.index      # a sample of that class
        info = rep.filter(f)
        assert info.car == pytest.approx(float((car_c * np.bincount(y.numpy())).sum() / len(y)))
    ranks = sorted((i.rank, i.filter) for i in rep.filters)
    assert [r for r, _ in ranks] == list(range(1, 51)) and ranks[0][1] == most
    cars = [rep.filter(f).car for _, f in ranks]
    assert cars == sorted(cars, reverse=True)


# -- colour ------------------------------------------------------------------------------------
def test_colour_selectivity_against_chroma_basis(resnet20):
    std = (0.229, 0.224, 0.225)
    w = resnet20.conv1.weight.detach().double() / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    e1 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / 2 ** 0.5
    e2 = torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64) / 6 ** 0.5
    v = w.permute(0, 2, 3, 1)
    ref = ((v @ e1) ** 2 + (v @ e2) ** 2).sum((1, 2)) / (v ** 2).sum((1, 2, 3))
    np.testing.assert_allclose(colour_selectivity(resnet20.conv1.weight, std), ref.numpy(), rtol=1e-10)
    grey = torch.ones(1, 3, 3, 3)
    red = torch.zeros(1, 3, 3, 3)
    red[:, 0] = torch.randn(3, 3)
    opponent = torch.stack([torch.ones(3, 3), -torch.ones(3, 3), torch.zeros(3, 3)])[None]
    idx = colour_selectivity(torch.cat([grey, red, opponent]))
    np.testing.assert_allclose(idx, [0.0, 2 / 3, 1.0], atol=1e-12)


# -- the whole report on a first layer with a compression result, rendered in Chromium ---------
@pytest.fixture(scope="module")
def conv1_report(resnet20, cifar_test, tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    classes = list(cifar_test.classes)
    totals = torch.full((10,), 30, dtype=torch.int64)
    base = torch.full((10,), 27, dtype=torch.int64)
    counts = base - torch.randint(-1, 6, (16, 10), generator=gen)       # hand-made CAR_c
    scores = cp.LayerScores(layer="conv1", filters=torch.arange(16), counts=counts,
                            base_counts=base, class_totals=totals, classes=classes)
    removed = scores.least_important(8)
    comp = hand_made_compression(resnet20, "conv1", removed, 16)
    data = cifar_test.subset(np.arange(0, 10000, 25))                  # 400 images
    rep = interpret(resnet20, "conv1", data, scores=scores, compression=comp, progress=False)
    out = tmp_path_factory.mktemp("report")
    page = rep.save_html(out / "index.html")
    return rep, scores, comp, data, page


def test_first_layer_report_numbers(conv1_report, resnet20):
    rep, scores, comp, data, _ = conv1_report
    assert rep.first_layer and rep.colour is not None
    assert rep.sections == ["summary", "car", "first-layer", "colour", "patches", "class-panels",
                            "class-accuracy", "filters", "class-samples", "files"]
    # kept / removed and the step of removal
    for i, f in enumerate(comp.removed):
        info = rep.filter(f)
        assert (info.kept, info.removed_step, info.removal_order) == (False, i + 1, i + 1)
    assert all(rep.filter(f).kept and rep.filter(f).removed_step is None for f in comp.kept)
    # colour filters among the 8 removed, counted from the reference index
    idx = colour_selectivity(resnet20.conv1.weight, data.std)
    c = rep.colour
    assert c.k == 8 and c.order[:8] == comp.removed and c.order_source == "greedy removal"
    assert c.colour_in_first_k == int((idx[comp.removed] > 0.5).sum())
    assert c.colour_total == int((idx > 0.5).sum())
    np.testing.assert_allclose([rep.filter(f).colour_index for f in range(16)], idx)
    # per-class accuracy: the original, and the original with the removed channels zeroed
    x, y = data.batch(slice(None))
    a0 = per_class(resnet20, x, y, 10)
    h = zero_channels(resnet20, "relu", comp.removed)
    try:
        a1 = per_class(resnet20, x, y, 10)
    finally:
        h.remove()
    acc = rep.class_accuracy
    np.testing.assert_allclose(acc.original, a0, atol=1e-12)
    np.testing.assert_allclose(acc.compressed, a1, atol=1e-12)
    assert acc.share_within == pytest.approx(float(np.mean(a1 >= a0 - 0.03 - 1e-12)))
    # the class importance comes from the given scores
    assert [ci.top[0].car_c for ci in rep.class_importance] == \
        [s.top[0].car_c for s in class_importance(scores, 5)]


def test_report_page_renders_in_chromium(conv1_report):
    rep, _, _, _, page = conv1_report
    html = page.read_text()
    assert not re.search(r"<script|<link|@import|url\((?!data:)|src=\"(?!data:)", html), \
        "the page must not load anything from outside"
    seen = render_in_chromium(page)
    assert seen["sections"] == [[s, True] for s in rep.sections]
    assert seen["bad"] == [], f"images that did not load: {seen['bad']}"
    assert seen["badTiles"] == [], f"tiles without their image: {seen['badTiles']}"
    assert set(seen["images"]) == {"car.png", "colour.png", "class_accuracy.png"}
    shared = {f"patches/filter_{f:04d}.png" for f in range(16)} | \
        {f"weights/filter_{f:04d}.png" for f in range(16)} | \
        {f"samples/class_{c:04d}.png" for c in range(10)}
    assert shared <= set(seen["tiles"])
    listed = sum(len(ci.top) + len(ci.bottom) for ci in rep.class_importance)
    panels = sum(len(rep.classes_of(f).top) + len(rep.classes_of(f).bottom) for f in rep.highlight)
    assert seen["rows"] == 16 and seen["thumbs"] == listed
    assert seen["tiles"].count("samples/class_0000.png") >= 1
    # two grids and the table (a tile per filter each), the gallery, Figure 9 (patches, classes),
    # the class thumbnails of the table
    assert len(seen["tiles"]) == 16 * 3 + 10 + len(rep.highlight) + panels + listed
    # every caption under a patch grid or filter drawing: readable (>= 11 px), one per filter,
    # naming its filter and CAR; no text on the page is smaller
    for key in ("patchCaptions", "weightCaptions"):
        caps = seen[key]
        assert len(caps) == 16
        assert all(size >= 11 and height >= 11 for _, size, height in caps), caps
        assert {int(re.match(r"#(\d+)", text).group(1)) for text, _, _ in caps} == set(range(16))
    removed = [c for c, _, _ in seen["patchCaptions"] if "removed at step" in c]
    assert len(removed) == 8
    assert seen["smallest"][0] >= 11, f"text smaller than 11 px: {seen['smallest']}"
    # classes whose accuracy does not change (CAR_c 0) are never listed
    assert not re.search(r">[+-]0\.0</span>", html)
    # the PNGs and the JSON beside the page
    out = page.parent
    for name in shared | {"car.png", "filters.png", "colour.png", "patches.png",
                          "class_panels.png", "class_accuracy.png"}:
        assert (out / name).read_bytes() == rep.figures[name]
    back = InterpretationReport.load(out / "report.json")
    assert back.to_dict() == rep.to_dict() and back.figures == rep.figures
    assert json.loads((out / "report.json").read_text())["colour"]["k"] == 8


def test_only_classes_with_an_effect_are_listed(resnet20, cifar_test):
    """On real scores: no listed class has CAR_c 0; a filter with no effect lists none and says
    so; fewer than five is said (summary, class importance, Figure 9)."""
    scores = cp.score_layer(resnet20, "layer3.2.conv1", cifar_test.sample(300, seed=3),
                            progress=False)
    cc = scores.car_c.numpy()
    idle = [int(scores.filters[i]) for i in np.flatnonzero((cc == 0).all(1))]
    assert idle, "the test needs a filter with no effect on any class"
    imp = class_importance(scores, 5)
    short = 0
    for i, ci in enumerate(imp):
        row = cc[i]
        assert all(s.car_c > 0 and s.car_c == row[s.index] for s in ci.top)
        assert all(s.car_c < 0 and s.car_c == row[s.index] for s in ci.bottom)
        assert [s.car_c for s in ci.top] == sorted((s.car_c for s in ci.top), reverse=True)
        assert len(ci.top) == min(5, int((row > 0).sum()))
        assert len(ci.bottom) == min(5, int((row < 0).sum()))
        short += len(ci.top) < 5
        if len(ci.top) < 5:
            assert re.fullmatch(r"(only \d+ class(es)? loses? |no class loses )accuracy without it",
                                ci.note("top"))
        if ci.filter in idle:
            assert ci.top == [] and ci.bottom == []
            assert ci.note("top") == "no class loses accuracy without it"
            assert ci.note("bottom") == "no class gains accuracy without it"
    assert short > 0
    text = scores.summary(top=64, classes=5)
    assert not re.search(r"\([+-]0\.0\)", text)
    for f in idle:
        line = next(x for x in text.splitlines() if re.match(rf"\s+filter\s+{f}\s", x))
        assert line.endswith("needed most by: no class loses accuracy without it")
    # the Figure 9 panel of the idle filter says so instead of listing classes
    from carprune.interpret import figures

    blank = np.full((8, 8, 3), 255, np.uint8)
    ci = imp[int(np.flatnonzero(scores.filters.numpy() == idle[0])[0])]
    png = figures.class_panels([{"filter": ci.filter, "car": ci.car, "patches": blank, "top": [],
                                 "bottom": [], "top_note": ci.note("top"),
                                 "bottom_note": ci.note("bottom")}], "layer3.2.conv1")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# -- build_report from saved files, and bad input ----------------------------------------------
def test_build_report_from_saved_scores_and_compression(lenet, mnist_test, tmp_path):
    scores = cp.score_layer(lenet, "conv1", mnist_test, num_images=300, progress=False)
    scores.save(tmp_path / "scores.npz")
    comp = hand_made_compression(lenet, "conv1", scores.least_important(10), 20)
    comp.save(tmp_path / "comp")
    rep = build_report(lenet, None, mnist_test, tmp_path / "out", scores_path=tmp_path / "scores.npz",
                       compression_dir=tmp_path / "comp", patches=4, progress=False)
    assert rep.layer == "conv1" and rep.scored_images == 300
    assert (tmp_path / "out" / "index.html").is_file() and (tmp_path / "out" / "patches.png").is_file()
    assert [i.filter for i in rep.filters if i.kept is False] == sorted(comp.removed)
    x, y = mnist_test.batch(slice(None))
    np.testing.assert_allclose(rep.class_accuracy.compressed, per_class(comp.model, x, y, 10))
    assert rep.colour is None and any("1-channel" in n for n in rep.notes)


def test_bad_input_is_named(lenet, mnist_test, tmp_path):
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*conv1, conv2"):
        interpret(lenet, "conv9", mnist_test)
    with pytest.raises(ValueError, match="not a Conv2d"):
        interpret(lenet, "fc1", mnist_test)
    scores = cp.LayerScores(layer="conv2", filters=torch.arange(50),
                            counts=torch.zeros(50, 10, dtype=torch.int64),
                            base_counts=torch.zeros(10, dtype=torch.int64),
                            class_totals=torch.ones(10, dtype=torch.int64),
                            classes=list(mnist_test.classes))
    with pytest.raises(ValueError, match="scores are for layer 'conv2', not 'conv1'"):
        interpret(lenet, "conv1", mnist_test, scores=scores)
    comp = CompressionResult(layer="conv2", criterion="car", num_filters=50, removed=[0], kept=[],
                             trajectory=[])
    with pytest.raises(ValueError, match="compression result is for layer 'conv2', not 'conv1'"):
        interpret(lenet, "conv1", mnist_test, compression=comp)
    empty = cp.data.ImageArrayDataset(np.zeros((0, 28, 28), np.uint8), np.zeros(0), mnist_test.classes,
                                      [0.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        interpret(lenet, "conv1", empty)
    with pytest.raises(ValueError, match="empty"):
        search_patches(lenet, "conv1", empty)
    with pytest.raises(ValueError, match="activation must be"):
        search_patches(lenet, "conv1", mnist_test, activation="relu")
    with pytest.raises(ValueError, match="not an interpretation report"):
        (tmp_path / "x.json").write_text('{"format": "other"}')
        InterpretationReport.load(tmp_path / "x.json")


# -- the landing page of `carprune report` -------------------------------------------------------
@pytest.fixture(scope="module")
def cli_outputs(lenet, tmp_path_factory):
    """score (conv1), compress with a hold-out split (conv2) and deep-compress outputs of the
    command line on the shared MNIST sample, then `carprune report` with interpretation pages."""
    from carprune import cli

    d = tmp_path_factory.mktemp("landing")
    tr, te = cp.data.mnist5k(ROOT.parent / "shared/data/mnist_5k.npz", "train"), \
        cp.data.mnist5k(ROOT.parent / "shared/data/mnist_5k.npz", "test")
    npz = d / "mnist.npz"
    np.savez(npz, x_train=tr.images[..., 0], y_train=tr.labels, x_test=te.images[..., 0],
             y_test=te.labels, classes=np.array(cp.data.MNIST_CLASSES))
    weights = d / "lenet5.pt"
    torch.save(lenet.state_dict(), weights)
    common = ["--model", "lenet5", "--weights", str(weights), "--data", str(npz), "--split", "test",
              "--mean", "0", "--std", "1", "--progress", "none", "--threads", "1"]
    assert cli.main(["score", *common, "--out", str(d / "s1"), "--layer", "conv1",
                     "--num-images", "200"]) == 0
    assert cli.main(["compress", *common, "--out", str(d / "c2"), "--layer", "conv2",
                     "--num-images", "300", "--eval-split", "test", "--eval-images", "200",
                     "--keep", "46"]) == 0
    assert cli.main(["deep-compress", *common, "--out", str(d / "dc"), "--result", str(d / "c2"),
                     "--num-images", "200", "--kmeans-iters", "10"]) == 0
    assert cli.main(["report", str(d / "s1"), str(d / "c2"), str(d / "dc"), *common,
                     "--out", str(d / "r"), "--num-images", "200", "--search-images", "300",
                     "--patches", "4"]) == 0
    return d


def test_report_landing_page(cli_outputs):
    d = cli_outputs
    out = d / "r"
    page = out / "index.html"
    seen = render_in_chromium(page)
    # one table of the layers (score + compress) and one of the Deep Compression outputs
    assert seen["tableRows"] == [2, 1]
    assert seen["smallest"][0] >= 11, seen["smallest"]
    # every link resolves to a file written beside the page: the layer pages, Markdown, JSON
    links = seen["links"]
    assert {"conv1/index.html", "conv2/index.html", "report.md", "report.json"} <= set(links)
    for href in links:
        assert (out / href).is_file(), href
    html = page.read_text()
    result = json.loads((d / "c2" / "result.json").read_text())
    traj = result["trajectory"]
    first, last = traj[0], traj[-1]
    assert first["holdout_accuracy"] is not None and len(result["kept"]) == 46
    assert f"{100 * first['holdout_accuracy']:.2f}&nbsp;%" in html
    assert f"{100 * last['holdout_accuracy']:.2f}&nbsp;%" in html
    assert "46 of 50" in html and "200 hold-out" in html and "200 scoring" in html
    saved = 1 - last["flops"] / first["flops"]
    assert f"{100 * saved:.1f} %" in html
    # each layer page links back to the landing page and says which images each accuracy uses
    conv2 = (out / "conv2" / "index.html").read_text()
    assert 'href="../index.html"' in conv2
    assert "on the hold-out: 200 images never used for scoring (scoring used 300 others)" in conv2
    assert "300 images of the interpretation data (those searched for patches)" in conv2
    assert "200 images of the interpretation data (a seeded subset)" in conv2   # CAR scored here
    assert "200 images (the scores given)" in (out / "conv1" / "index.html").read_text()
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert {r["kind"] for r in rows} == {"score", "compress", "deep-compress"}
    assert "| conv2 | car | 50 | 46 |" in (out / "report.md").read_text()
