"""Method functions against hand-written reference formulas, including the randomized ones."""

from __future__ import annotations

import pytest
import torch

from merging.methods import REGISTRY, magnitude_prune, top_k_mask


def _inputs(n: int = 3, shape=(64, 48), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * 0.1 for _ in range(n)]


def test_every_mergekit_method_is_registered():
    assert set(REGISTRY) == {
        "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties",
        "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce",
        "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough",
    }


@pytest.mark.parametrize("name, normalize, rescale", [
    ("ties", True, False), ("dare_ties", False, True), ("dare_linear", False, True),
    ("della", True, True), ("task_arithmetic", False, False), ("breadcrumbs", False, False),
])
def test_defaults_match_mergekit(name, normalize, rescale):
    params = REGISTRY[name].param_index
    assert params["normalize"].default is normalize
    assert params["rescale"].default is rescale
    assert params["lambda"].default == 1.0 and params["int8_mask"].default is False


def test_top_k_mask_keeps_exactly_k_with_ties():
    values = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0, 0.5])
    mask = top_k_mask(values, 3)
    assert mask.tolist() == [False, True, True, True, False, False]
    assert top_k_mask(values, 2).tolist() == [False, True, True, False, False, False]
    assert int(top_k_mask(torch.randn(1000), 137).sum()) == 137


def test_magnitude_prune_matches_a_sort():
    delta = torch.randn(40, 30)
    kept = magnitude_prune(delta, 0.25, rescale=False)
    k = int(0.25 * delta.numel())
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    torch.testing.assert_close(kept, delta * (delta.abs() >= threshold))


def _dare_reference(base, models, weights, density, generator_seed, consensus, normalize):
    """DARE by the paper: keep each delta entry with probability `density`, rescale to the L1 norm."""
    g = torch.Generator().manual_seed(generator_seed)
    deltas = []
    for model, w in zip(models, weights):
        delta = model - base
        keep = torch.rand(delta.shape, generator=g) < density
        pruned = delta * keep
        pruned = pruned * (delta.abs().sum() / pruned.abs().sum())
        deltas.append(pruned * w)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, 1, 1)
    if consensus:
        sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        mask = deltas.sign() == sign
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0)
    return base + (mixed / divisor if normalize else mixed)


@pytest.mark.parametrize("name, consensus", [("dare_ties", True), ("dare_linear", False)])
def test_dare_matches_reference_formula(name, consensus):
    base, models = _inputs(2)
    params = dict(weight=[0.6, 0.4], density=[0.3, 0.3], normalize=False, rescale=True, int8_mask=False)
    got = REGISTRY[name](base, models, generator=torch.Generator().manual_seed(7), **params, **{"lambda": 1.0})
    want = _dare_reference(base, models, [0.6, 0.4], 0.3, 7, consensus, normalize=False)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["dare_ties", "della", "della_linear", "dare_linear"])
def test_randomized_methods_keep_about_density_and_follow_the_seed(name):
    base, models = _inputs(1, shape=(200, 100))
    params = dict(weight=[1.0], density=[0.4], normalize=False, rescale=False, int8_mask=False, **{"lambda": 1.0})
    if name.startswith("della"):
        params["epsilon"] = [0.1]

    def run(seed):
        return REGISTRY[name](base, models, generator=torch.Generator().manual_seed(seed), **params)

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    kept = ((first - base) != 0).float().mean().item()
    assert 0.36 < kept < 0.44


def test_della_prefers_large_magnitudes():
    base = torch.zeros(50, 400)
    delta = torch.linspace(0.01, 1.0, 400).repeat(50, 1)
    params = dict(weight=[1.0], density=[0.5], epsilon=[0.4], normalize=False, rescale=False, int8_mask=False,
                  **{"lambda": 1.0})
    out = REGISTRY["della"](base, [base + delta], generator=torch.Generator().manual_seed(0), **params)
    kept = out != 0
    assert kept[:, :100].float().mean() < 0.25 < 0.75 < kept[:, 300:].float().mean()


def test_ties_sign_election_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = torch.tensor([-3.0, 1.0, 1.0, -0.1])
    params = dict(weight=[1.0, 1.0], density=[1.0, 1.0], normalize=True, rescale=False, int8_mask=False,
                  **{"lambda": 1.0})
    out = REGISTRY["ties"](base, [a, b], **params)
    # element 0: sum -2 -> keep b (-3); element 1: sum -1 -> keep a (-2); 2: both (mean 2); 3: sum 0.4 -> a
    torch.testing.assert_close(out, torch.tensor([-3.0, -2.0, 2.0, 0.5]))


def test_slerp_endpoints_and_midpoint():
    base, (other,) = _inputs(1)
    slerp = REGISTRY["slerp"]
    torch.testing.assert_close(slerp(base, [other], t=0.0), base)
    torch.testing.assert_close(slerp(base, [other], t=1.0), other)
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    half = 2 ** -0.5
    torch.testing.assert_close(slerp(a, [b], t=0.5), torch.tensor([half, half]))
