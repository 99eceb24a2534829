"""The fused CPU loops give the torch ops' results bit for bit, and merges run without them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import load_state

from merging import MergeOptions, parse_config, run_merge
from merging.methods import REGISTRY, native
from merging.methods.chunks import WholeTensor, row_sums
from merging.methods.linear import linear, linear_narrow
from merging.methods.selection import TopK, bernoulli, bernoulli_draws
from merging.methods.spherical import prepare_slerp

ROOT = Path(__file__).resolve().parent.parent
needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler to build the fused loops")


@pytest.fixture
def torch_only():
    """Call to run the rest of the test without the fused loops, as `MergeOptions(native=False)` merges."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(native.enabled(False))


def _inputs(count: int, shape=(37, 29), seed: int = 0):
    """Fine-tunes with untouched entries, exact ties and sign conflicts: the cases that round differently."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(count):
        delta = (torch.randn(shape, generator=g) * 8).round() / 64  # many equal magnitudes
        delta[torch.rand(shape, generator=g) < 0.2] = 0
        models.append(base + delta)
    return base, models


def _params(name: str, count: int, **overrides):
    params = {p.name: p.default for p in REGISTRY[name].parameters if not p.required}
    params.update(weight=[0.7, -0.3, 0.45][:count], density=[0.4, 1.0, 0.0][:count] if name == "ties" else
                  [0.4, 0.9, 0.6][:count], seed=11)
    params.update(overrides)
    return params


def _bits(tensor):
    return tensor.contiguous().view(torch.int32)


@needs_native
@pytest.mark.parametrize("name, overrides", [
    ("ties", {}), ("ties", {"normalize": False}), ("ties", {"lambda": 0.6}), ("ties", {"rescale": True}),
    ("dare_ties", {}), ("dare_ties", {"normalize": True, "lambda": 1.3}), ("dare_linear", {}),
    ("dare_linear", {"normalize": True}), ("task_arithmetic", {}), ("task_arithmetic", {"normalize": True}),
])
@pytest.mark.parametrize("count", [1, 3])
def test_fused_merges_are_bit_identical_to_torch(name, overrides, count, torch_only):
    base, models = _inputs(count)
    params = _params(name, count, **overrides)
    fused = REGISTRY[name](base, models, **params)
    torch_only()
    assert torch.equal(_bits(fused), _bits(REGISTRY[name](base, models, **params)))


@needs_native
@pytest.mark.parametrize("track_sums", [False, True])
@pytest.mark.parametrize("k", [1, 300, 700, 999])
def test_fused_bracket_scan_selects_what_torch_selects(k, track_sums, torch_only):
    values = ((torch.randn(4, 250, generator=torch.Generator().manual_seed(k)) * 6).round().abs() / 7)

    def select():
        top = TopK(k, values.numel(), track_sums=track_sums)
        top.guess(values)
        while not top.done:
            for offset in range(0, values.numel(), 300):
                top.fold(top.scan(values.reshape(-1)[offset:offset + 300], offset))
            top.end_pass()
        masks = [top.mask(values.reshape(-1)[o:o + 300], o) for o in range(0, values.numel(), 300)]
        return top.threshold, top.passes, torch.cat(masks), top.kept_sum

    threshold, passes, mask, kept = select()
    torch_only()
    plain_threshold, plain_passes, plain_mask, plain_kept = select()
    assert (threshold, passes) == (plain_threshold, plain_passes) and torch.equal(mask, plain_mask)
    assert int(mask.sum()) == k and kept == plain_kept


@needs_native
@pytest.mark.parametrize("start, end", [(0, 1), (5, 300_000), (262_143, 262_145), (1_000_000, 1_800_001)])
def test_fused_bernoulli_draws_the_torch_mask(start, end, torch_only):
    cpu = torch.device("cpu")
    fused = [bernoulli(7, p, start, end, cpu) for p in (0.0, 0.3, 0.5, 0.999)]
    torch_only()
    assert all(torch.equal(f, bernoulli(7, p, start, end, cpu)) for f, p in zip(fused, (0.0, 0.3, 0.5, 0.999)))


@needs_native
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_streamed_merges_match_with_and_without_the_fused_loops(method, llama, tmp_path):
    base, ft1, ft2 = llama.base(), llama.finetune(1), llama.finetune(2)
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - {{model: {base}}}\n"
            f"  - {{model: {ft1}, parameters: {{weight: 0.6, density: 0.3}}}}\n"
            f"  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.5}}}}\n")
    options = MergeOptions(seed=3, workers=2, chunk_elements=100)  # ties at thresholds land across chunks
    run_merge(parse_config(text), tmp_path / "fused", options=options)
    run_merge(parse_config(text), tmp_path / "torch", options=dataclasses.replace(options, native=False))
    fused, plain = load_state(tmp_path / "fused"), load_state(tmp_path / "torch")
    assert all(torch.equal(fused[k], plain[k]) for k in fused)


@needs_native
@pytest.mark.parametrize("weights", [[0.7], [0.5, 0.25], [0.7, -0.3, 0.45, 0.123456789]])
@pytest.mark.parametrize("normalize", [False, True])
def test_fused_linear_from_bfloat16_is_bit_identical_to_torch(weights, normalize):
    g = torch.Generator().manual_seed(len(weights))
    shape = (53, 31)  # mixed magnitudes; halves and quarters of bfloat16 values land on rounding ties
    models = [(torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 3, shape, generator=g)).bfloat16()
              for _ in weights]
    fused = linear_narrow(None, models, torch.bfloat16, weight=weights, normalize=normalize)
    plain = linear(None, [m.float() for m in models], weight=weights, normalize=normalize).bfloat16()
    assert fused is not None and torch.equal(fused.view(torch.int16), plain.view(torch.int16))
    assert linear_narrow(None, models, torch.float32, weight=weights, normalize=normalize) is None


@needs_native
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_fused_slerp_from_bfloat16_is_bit_identical_to_torch(t):
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(41, 67, generator=g) * 10.0 ** torch.randint(-3, 3, (41, 67), generator=g)).bfloat16()
    model = (base.float() + torch.randn(41, 67, generator=g) * 0.1).bfloat16()
    kernel = prepare_slerp(WholeTensor(base.float(), [model.float()]), base.numel(), t=t)
    fused = kernel.narrow(base, [model], 0, torch.bfloat16)
    plain = kernel(base.float(), [model.float()], 0).bfloat16()
    assert fused is not None and torch.equal(fused.view(torch.int16), plain.view(torch.int16))


@needs_native
@pytest.mark.parametrize("name, overrides", [
    ("ties", {}), ("ties", {"normalize": False, "lambda": 0.6}), ("dare_ties", {}), ("dare_linear", {}),
    ("task_arithmetic", {"normalize": True}),
])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fused_task_merges_from_bfloat16_are_bit_identical_to_torch(name, overrides, out_dtype):
    base, models = _inputs(3, shape=(41, 300))  # rows longer than a block of the loops
    base, models = base.bfloat16(), [m.bfloat16() for m in models]
    wide = WholeTensor(base.float(), [m.float() for m in models])
    kernel = REGISTRY[name].prepare(wide, base.numel(), **_params(name, 3, **overrides))
    for offset in (0, 7 * 300):  # a chunk of whole rows, anywhere in the tensor
        rows = slice(offset // 300, None)
        chunk_base, chunk_models = base[rows].contiguous(), [m[rows].contiguous() for m in models]
        fused = kernel.narrow(chunk_base, chunk_models, offset, out_dtype)
        if fused is None:  # only the chunk where TIES cuts through the ties at its threshold declines
            assert name == "ties" and offset == 0
            continue
        plain = kernel(chunk_base.float(), [m.float() for m in chunk_models], offset).to(out_dtype)
        assert fused.dtype == out_dtype and torch.equal(fused, plain)
    assert kernel.narrow(base.half(), [m.half() for m in models], 0, out_dtype) is None


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_l1_sums_add_in_the_order_row_sums_defines(dtype):
    g = torch.Generator().manual_seed(2)
    shape = (6, 1000)  # 1000 columns: several segments and a partial group of lanes
    base = torch.randn(shape, generator=g).to(dtype)
    model = (base.float() + torch.randn(shape, generator=g) * 10.0 ** torch.randint(-9, 2, shape, generator=g))
    base[0], model[0] = 0.0, 2.0 ** -54
    model[0, 0] = 1.0  # summed in one running sum, 1 + 2**-54 + ... stays 1; in lanes the small ones count
    base[1], model[1] = 0.0, 2.0 ** -24
    for segment in range(0, 1000, native.SUM_SEGMENT):  # every lane starts at 1: float32 rounds 1 + 2**-24 to 1
        model[1, segment:segment + native.SUM_LANES] = 1.0
    model = model.to(dtype)
    position = 262_003  # the rows straddle two RNG blocks, between two groups of 8
    draws = bernoulli_draws(5, 0.4, position, position + base.numel())
    totals, kept, _ = native.l1_sums(model, base, draws, position)
    magnitude = (model.float() - base.float()).abs()
    keep = bernoulli(5, 0.4, position, position + base.numel(), torch.device("cpu")).view(shape)
    assert totals == row_sums(magnitude) and kept == row_sums(magnitude * keep)
    assert totals[0] > 1.0 == float(magnitude[0].double().cumsum(0)[-1])  # the order shows
    assert totals[1] == 64.0 < float(magnitude[1].double().sum())  # so do the float32 segments


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_product_sums_add_in_the_order_row_sums_defines(dtype):
    g = torch.Generator().manual_seed(3)
    shape = (5, 1000)  # several segments and a partial group of lanes
    a = (torch.randn(shape, generator=g) * 10.0 ** torch.randint(-6, 3, shape, generator=g)).to(dtype)
    b = (torch.randn(shape, generator=g) * 10.0 ** torch.randint(-6, 3, shape, generator=g)).to(dtype)
    a[0], b[0] = 2.0 ** -27, 2.0 ** -27
    a[0, 0], b[0, 0] = 1.0, 1.0  # in one running sum 1 + 2**-54 + ... stays 1; in lanes the small ones count
    aa, bb, ab = native.product_sums(a, b)
    wide_a, wide_b = a.float(), b.float()
    assert (aa, bb, ab) == (row_sums(wide_a * wide_a), row_sums(wide_b * wide_b), row_sums(wide_a * wide_b))
    assert ab[0] > 1.0 == float((wide_a[0] * wide_b[0]).double().cumsum(0)[-1])  # the order shows


@pytest.mark.parametrize("fused", [True, False])
def test_slerp_norms_do_not_depend_on_the_chunking(fused, torch_only):
    if not fused:
        torch_only()
    g = torch.Generator().manual_seed(6)
    base = torch.randn(40, 300, generator=g)
    base[0, 0] = 300.0  # in one float32 sum, much of what comes after this would round away
    model = base + torch.randn(40, 300, generator=g)

    class Rows:  # the chunks a streamed merge would see: 7 rows at a time
        def map(self, fn, *, as_loaded=False):
            for start in range(0, 40, 7):
                yield fn(base[start:start + 7], [model[start:start + 7]], start * 300)

    whole = prepare_slerp(WholeTensor(base, [model]), base.numel(), t=0.4)(base, [model], 0)
    chunked = prepare_slerp(Rows(), base.numel(), t=0.4)(base, [model], 0)
    assert torch.equal(whole, chunked)


@needs_native
def test_masks_packed_by_the_l1_pass_are_the_masks_drawn_again():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 344, generator=g).bfloat16()  # 1720 values: blocks of the loops and a partial one
    models = [(base.float() + torch.randn(5, 344, generator=g)).bfloat16() for _ in range(2)]
    position = 262_005  # across two RNG blocks, between two groups of 8
    draws = [bernoulli_draws(seed, 0.3, position, position + base.numel()) for seed in (1, 2)]
    packed = []
    for model, d in zip(models, draws):
        *sums, mask = native.l1_sums(model, base, d, position, pack=True)
        assert sums == list(native.l1_sums(model, base, d, position)[:2]) and mask is not None
        packed.append(mask)
    merge = functools.partial(native.task_merge, base, models, bounds=[-math.inf] * 2, factors=[1.5, 2.0],
                              weights=[0.6, 0.4], position=position, consensus=True, normalize=True, divisor=1.0,
                              scale=1.0, out_dtype=torch.bfloat16)
    assert torch.equal(merge(packed), merge(draws))
    assert not torch.equal(merge(packed), merge([draws[1], draws[0]]))


@needs_native
@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties"])
def test_bfloat16_merges_match_with_and_without_the_fused_loops(method, llama, tmp_path):
    ft1, ft2 = llama.finetune(1, dtype=torch.bfloat16), llama.finetune(2, dtype=torch.bfloat16)
    if method == "linear":
        text = (f"merge_method: linear\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.6}}}}\n"
                f"  - {{model: {ft2}, parameters: {{weight: 0.3}}}}\ndtype: bfloat16\n")
    elif method == "slerp":
        text = (f"merge_method: slerp\nbase_model: {ft1}\nmodels:\n  - {{model: {ft1}}}\n  - {{model: {ft2}}}\n"
                f"parameters: {{t: [0, 0.3, 0.7, 1]}}\ndtype: bfloat16\n")
    else:
        base = llama.base(dtype=torch.bfloat16)
        text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - {{model: {base}}}\n"
                f"  - {{model: {ft1}, parameters: {{weight: 0.6, density: 0.3}}}}\n"
                f"  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.5}}}}\ndtype: bfloat16\n")
    options = MergeOptions(workers=2, chunk_elements=100)
    run_merge(parse_config(text), tmp_path / "fused", options=options)
    run_merge(parse_config(text), tmp_path / "torch", options=dataclasses.replace(options, native=False))
    fused, plain = load_state(tmp_path / "fused"), load_state(tmp_path / "torch")
    assert all(fused[k].dtype == torch.bfloat16 and torch.equal(fused[k], plain[k]) for k in fused)


def test_without_a_compiler_merges_run_in_torch(tmp_path, llama):
    base, ft1 = llama.base(), llama.finetune(1)
    config = tmp_path / "ties.yml"
    config.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                      f"  - {{model: {ft1}, parameters: {{weight: 1.0, density: 0.5}}}}\n")
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "MERGELINE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "merging", str(config), str(tmp_path / "out"), "--quiet"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_state(tmp_path / "out") and not list((tmp_path / "cache").glob("*.so"))


def test_the_switch_turns_the_fused_loops_off():
    check = "from merging.methods import native; import torch; print(native.available(), native.fits(torch.zeros(3)))"
    done = subprocess.run([sys.executable, "-c", check], env={**os.environ, "MERGELINE_NATIVE": "0"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr
