"""Comparing two layers through their filters' class profiles: the matching against brute force,
the similarity and coverage against their definitions on real scores, a layer against itself and
against its pruned copy, save/load, and the page rendered in headless Chromium."""

from __future__ import annotations

import itertools
import json
import re
import subprocess

import numpy as np
import pytest

import carprune as cp
from carprune.compare import (
    Comparison,
    compare,
    layer_similarity,
    match_filters,
    profile_similarity,
)


def brute_force_matching(sim):
    """The best one-to-one matching of the rows of `sim` (n_a <= n_b) by trying every injection."""
    na, nb = sim.shape
    best, best_pairs = -np.inf, None
    for cols in itertools.permutations(range(nb), na):
        total = sum(sim[i, c] for i, c in enumerate(cols))
        if total > best:
            best, best_pairs = total, [(i, c) for i, c in enumerate(cols)]
    return best, best_pairs


@pytest.mark.parametrize("shape, seed", [((5, 5), 0), ((4, 6), 1), ((6, 4), 2), ((1, 3), 3)])
def test_hungarian_matching_equals_brute_force(shape, seed):
    rng = np.random.default_rng(seed)
    sim = profile_similarity(rng.normal(size=(shape[0], 4)), rng.normal(size=(shape[1], 4)))
    pairs = match_filters(sim)
    if shape[0] <= shape[1]:
        best, ref = brute_force_matching(sim)
    else:   # match the columns to the rows, then turn the pairs round
        best, ref_t = brute_force_matching(sim.T)
        ref = sorted((r, c) for c, r in ref_t)
    assert pairs == sorted(ref)
    assert sum(sim[i, j] for i, j in pairs) == pytest.approx(best)
    assert len(pairs) == min(shape)


def test_profile_similarity_is_cosine_and_zero_rows_are_zero():
    a = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    b = np.array([[2.0, 0.0, 0.0], [0.0, -3.0, 0.0]])
    s = profile_similarity(a, b)
    assert np.allclose(s, [[1.0, 0.0], [2 ** -0.5, -(2 ** -0.5)], [0.0, 0.0]])
    # weights: each matched pair by the norms of both profiles, over all filters' norms
    pairs = [(0, 0), (1, 1)]
    ma, mb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    want = (1.0 * (1 + 2) + (-(2 ** -0.5)) * (2 ** 0.5 + 3)) / (1 + 2 ** 0.5 + 0 + 2 + 3)
    assert layer_similarity(s, pairs, ma, mb) == pytest.approx(want)


@pytest.fixture(scope="module")
def scores20(resnet20, cifar_test):
    return cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, num_images=300, seed=3,
                          progress=False)


def test_a_layer_against_itself(resnet20, cifar_test, scores20):
    cmp = compare(resnet20, "layer3.2.conv1", resnet20, "layer3.2.conv1", scores_a=scores20,
                  scores_b=scores20)
    p = scores20.car_c.numpy()
    nonzero = np.linalg.norm(p, axis=1) > 0
    # every filter with a profile is matched to itself; the layer is fully similar
    assert all(m.filter_a == m.filter_b for m in cmp.matches if nonzero[m.filter_a])
    assert cmp.similarity == pytest.approx(1.0)
    assert np.array_equal(cmp.coverage_a, p.max(0)) and np.array_equal(cmp.coverage_b, p.max(0))
    assert cmp.coverage_filter_a.tolist() == p.argmax(0).tolist()
    assert cmp.weights_a is None   # not a first layer


def test_resnet20_against_resnet32_and_a_pruned_copy(resnet20, cifar_test, scores20, tmp_path):
    from conftest import DATA

    r32 = cp.models.load_checkpoint(cp.models.resnet_cifar(32), DATA / "models" / "resnet32-d509ac18.th")
    cmp = compare(resnet20, "layer3.2.conv1", r32, "layer3.4.conv1", cifar_test, num_images=300,
                  seed=3, names=("resnet20", "resnet32"), progress=False)
    ref_b = cp.score_layer(r32, "layer3.4.conv1", cifar_test, num_images=300, seed=3, progress=False)
    sim = profile_similarity(scores20.car_c.numpy(), ref_b.car_c.numpy())
    assert np.allclose(cmp.similarity_matrix, sim)
    total = sum(m.similarity for m in cmp.matches)
    assert total == pytest.approx(sum(sim[i, j] for i, j in match_filters(sim)))
    assert -1 <= cmp.similarity < 1 and len(cmp.matches) == 64
    # a pruned copy (narrowed: layer3.2.conv1 feeds conv2 only): kept filters keep their numbers
    removed = list(range(0, 64, 2))
    pruned = cp.prune_filters(resnet20, "layer3.2.conv1", removed)
    cmp2 = compare(resnet20, "layer3.2.conv1", pruned, "layer3.2.conv1", cifar_test,
                   num_images=300, seed=3, progress=False)
    assert cmp2.filters_b.tolist() == list(range(1, 64, 2))
    assert len(cmp2.matches) == 32 and cmp2.notes
    # the pruned network's profiles are those of the original with the removed filters gone
    masked = cp.score_layer(resnet20, "layer3.2.conv1", cifar_test, num_images=300, seed=3,
                            removed=removed, progress=False)
    assert np.allclose(cmp2.profile_b, masked.car_c.numpy(), atol=1e-12)
    # save / load without pickle
    back = Comparison.load(cmp2.save(tmp_path / "c.npz"))
    assert back.to_dict() == cmp2.to_dict()


def test_first_layers_page_renders_in_chromium(resnet20, cifar_test, tmp_path):
    from test_interpret import chromium

    pruned = cp.prune_filters(resnet20, "conv1", [2, 5, 11])   # scattered: feeds residual adds
    cmp = compare(resnet20, "conv1", pruned, "conv1", cifar_test, num_images=64, seed=1,
                  names=("original", "pruned"), progress=False)
    assert cmp.filters_b.tolist() == [f for f in range(16) if f not in (2, 5, 11)]
    assert cmp.weights_a.shape == (16, 3, 3, 3) and cmp.weights_b.shape == (13, 3, 3, 3)
    kept = pruned.conv1.weight.detach().numpy()
    assert np.array_equal(cmp.weights_b, kept)
    page = cmp.save_html(tmp_path / "cmp" / "index.html")
    text = page.read_text()
    assert not re.search(r"<script|<link|@import|url\((?!data:)|src=\"(?!data:)", text)
    probe = page.with_name("probe.html")
    probe.write_text(text.replace("</body>", CHECK_JS + "</body>"))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, proc.stderr[-2000:]
    seen = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["sections"] == ["summary", "coverage", "filters", "matches", "profiles",
                                "similarity", "files"]
    assert seen["bad"] == [] and seen["figures"] == ["coverage.png", "filters_a.png",
                                                     "filters_b.png", "profiles.png",
                                                     "similarity.png"]
    # 13 matched rows with both filter images and profiles, 3 unmatched filters of A
    assert seen["rows"] == 16 and seen["svgs"] == 13 * 2 + 3 and seen["thumbs"] == 13 * 2 + 3
    assert Comparison.load(page.parent / "comparison.npz").to_dict() == cmp.to_dict()


CHECK_JS = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const out = document.createElement('pre'); out.id = 'render-check';
  out.textContent = JSON.stringify({
    bad: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    figures: imgs.map(i => i.dataset.figure).filter(Boolean).sort(),
    thumbs: imgs.filter(i => !i.dataset.figure).length,
    svgs: document.querySelectorAll('#matches-table svg').length,
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    rows: document.querySelectorAll('#matches-table tbody tr').length});
  document.body.appendChild(out);
});
</script>"""


def test_compare_errors(resnet20, lenet, mnist_test, scores20, tmp_path):
    with pytest.raises(ValueError, match="needs data"):
        compare(resnet20, "layer3.2.conv1", resnet20, "layer3.2.conv1")
    other = cp.score_layer(lenet, "conv2", mnist_test, num_images=50, progress=False)
    with pytest.raises(ValueError, match="different images|different classes"):
        compare(resnet20, "layer3.2.conv1", lenet, "conv2", scores_a=scores20, scores_b=other)
    with pytest.raises(ValueError, match="scores_b are for layer 'conv2', not 'conv1'"):
        compare(resnet20, "layer3.2.conv1", lenet, "conv1", scores_a=scores20, scores_b=other)
    with pytest.raises(ValueError, match="similarity matrix"):
        match_filters(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="not a Comparison file"):
        Comparison.load(scores20.save(tmp_path / "scores.npz"))
