"""Method functions against hand-written reference formulas, including the randomized ones."""

from __future__ import annotations

import pytest
import torch

from merging.methods import REGISTRY
from merging.methods.pruning import top_k_mask
from merging.methods.selection import TopK, bernoulli, uniform


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


def _selected(values: torch.Tensor, k: int, chunk: int, sample=None, track_sums=False) -> tuple[TopK, torch.Tensor]:
    """Select over chunks scanned and pruned back to front (as worker threads may); returns the pruned values."""
    flat = values.reshape(-1)
    offsets = list(range(0, flat.numel(), chunk))
    selector = TopK(k, flat.numel(), track_sums=track_sums)
    if sample is not None:
        selector.guess(sample)
    while not selector.done:
        parts = {offset: selector.scan(flat[offset:offset + chunk].abs(), offset) for offset in reversed(offsets)}
        for offset in offsets:
            selector.fold(parts[offset])
        selector.end_pass()
    pruned = flat.clone()
    for offset in reversed(offsets):
        pruned[offset:offset + chunk] = selector.prune(flat[offset:offset + chunk].clone(), offset)
    return selector, pruned.reshape(values.shape)


def _streamed_mask(values: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    selector, _ = _selected(values, k, chunk)
    flat = values.reshape(-1)
    return torch.cat([selector.mask(flat[i:i + chunk], i) for i in range(0, flat.numel(), chunk)]).reshape(values.shape)


@pytest.mark.parametrize("chunk", [7, 100, 10_000])
@pytest.mark.parametrize("k", [1, 13, 500, 999, 1000])
def test_streamed_top_k_equals_the_whole_tensor_mask(chunk, k):
    values = torch.randn(1000).abs()
    values[::3] = values[5]  # plenty of ties at one value, as bf16 deltas have
    assert torch.equal(_streamed_mask(values, k, chunk), top_k_mask(values, k))
    _, pruned = _selected(values, k, chunk)
    assert torch.equal(pruned, values * top_k_mask(values, k))


def _spread_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1)[::37]


@pytest.mark.parametrize("chunk", [100, 4096])
@pytest.mark.parametrize("k", [1, 500, 9_000, 19_999, 20_000])
@pytest.mark.parametrize("kind", ["continuous", "ties", "mostly_zero"])
def test_guessed_top_k_settles_in_one_pass_and_equals_the_whole_tensor_mask(kind, k, chunk):
    values = torch.randn(20_000)
    if kind == "ties":  # bf16 deltas take few distinct values
        values = values.bfloat16().float()
    elif kind == "mostly_zero":  # sparse fine-tunes: most deltas are exactly zero
        values = values * (torch.rand(20_000) < 0.1)
    selector, pruned = _selected(values, k, chunk, sample=_spread_sample(values.abs()))
    assert torch.equal(pruned, values * top_k_mask(values.abs(), k))
    assert selector.passes <= 1


def test_a_poor_guess_costs_passes_never_correctness():
    values = torch.randn(20_000)
    misleading = values.abs().sort().values[:2000]  # only the smallest values
    selector, pruned = _selected(values, 500, 1000, sample=misleading)
    assert torch.equal(pruned, values * top_k_mask(values.abs(), 500))
    assert selector.passes == 3  # the bracket missed; the radix passes settled it


@pytest.mark.parametrize("guess", [False, True])
def test_streamed_top_k_keeps_the_largest_and_their_sum(guess):
    values = torch.rand(5000)
    selector, pruned = _selected(values, 250, 5000, sample=values if guess else None, track_sums=True)
    threshold = values.sort(descending=True).values[249]
    assert torch.equal(pruned != 0, values >= threshold)
    assert selector.kept_sum == pytest.approx(float(pruned.double().sum()))
    assert selector.total_sum == pytest.approx(float(values.double().sum()))


def test_bernoulli_draws_are_the_uniform_draws_below_the_probability():
    cpu = torch.device("cpu")
    for probability in (0.0, 1e-3, 0.3, 0.53, 0.9, 1 - 1e-9, 1.0):  # 0.53 rounds up in float32
        assert torch.equal(bernoulli(9, probability, 1000, 600_000, cpu), uniform(9, 1000, 600_000, cpu) < probability)


def test_block_randomness_does_not_depend_on_chunking():
    whole = uniform(42, 0, 1_000_000, torch.device("cpu"))
    parts = torch.cat([uniform(42, a, min(a + 77_777, 1_000_000), torch.device("cpu"))
                       for a in range(0, 1_000_000, 77_777)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, uniform(43, 0, 1_000_000, torch.device("cpu")))


def _dare_reference(base, models, weights, density, seed, consensus, normalize):
    """DARE by the paper: keep each delta entry with probability `density`, rescale to the L1 norm."""
    from merging.methods.selection import stream_seed

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
