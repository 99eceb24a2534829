"""Method functions against hand-written reference formulas, including the randomized ones."""

from __future__ import annotations

import pytest
import torch

from merging.methods import REGISTRY, top_k_mask
from merging.selection import TopK, uniform


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


def _streamed_mask(values: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    flat = values.reshape(-1)
    pieces = [flat[i:i + chunk] for i in range(0, flat.numel(), chunk)]
    selector = TopK(k, flat.numel())
    for piece in pieces:
        selector.scan_high(piece)
    selector.finish_high()
    for piece in pieces:
        selector.scan_low(piece)
    selector.finish_low()
    return torch.cat([selector.mask(piece) for piece in pieces]).reshape(values.shape)


@pytest.mark.parametrize("chunk", [7, 100, 10_000])
@pytest.mark.parametrize("k", [1, 13, 500, 999, 1000])
def test_streamed_top_k_equals_the_whole_tensor_mask(chunk, k):
    values = torch.randn(1000).abs()
    values[::3] = values[5]  # plenty of ties at one value, as bf16 deltas have
    assert torch.equal(_streamed_mask(values, k, chunk), top_k_mask(values, k))


def test_streamed_top_k_keeps_the_largest_and_their_sum():
    values = torch.rand(5000)
    selector = TopK(250, 5000, track_sums=True)
    selector.scan_high(values)
    selector.finish_high()
    selector.scan_low(values)
    selector.finish_low()
    mask = selector.mask(values)
    threshold = values.sort(descending=True).values[249]
    assert torch.equal(mask, values >= threshold)
    assert selector.kept_sum == pytest.approx(float(values[mask].double().sum()))
    assert selector.total_sum == pytest.approx(float(values.double().sum()))


def test_block_randomness_does_not_depend_on_chunking():
    whole = uniform(42, 0, 1_000_000, torch.device("cpu"))
    parts = torch.cat([uniform(42, a, min(a + 77_777, 1_000_000), torch.device("cpu"))
                       for a in range(0, 1_000_000, 77_777)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, uniform(43, 0, 1_000_000, torch.device("cpu")))


def _dare_reference(base, models, weights, density, seed, consensus, normalize):
    """DARE by the paper: keep each delta entry with probability `density`, rescale to the L1 norm."""
    from merging.selection import stream_seed

    deltas = []
    for i, (model, w) in enumerate(zip(models, weights)):
        delta = model - base
        keep = uniform(stream_seed(seed, "model", i), 0, delta.numel(), delta.device).reshape(delta.shape) < density
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
    got = REGISTRY[name](base, models, seed=7, **params, **{"lambda": 1.0})
    want = _dare_reference(base, models, [0.6, 0.4], 0.3, 7, consensus, normalize=False)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["dare_ties", "della", "della_linear", "dare_linear"])
def test_randomized_methods_keep_about_density_and_follow_the_seed(name):
    base, models = _inputs(1, shape=(200, 100))
    params = dict(weight=[1.0], density=[0.4], normalize=False, rescale=False, int8_mask=False, **{"lambda": 1.0})
    if name.startswith("della"):
        params["epsilon"] = [0.1]

    def run(seed):
        return REGISTRY[name](base, models, seed=seed, **params)

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
    out = REGISTRY["della"](base, [base + delta], seed=0, **params)
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
