"""Merge methods: each a small pure function over tensors plus a declaration of its parameters.

The engine hands every function tensors already on the compute device in the compute dtype
(float32, or float64 when asked) and gets back one tensor of the same shape. Functions never
load, cast for output or write: that is the engine's job.

Calling convention::

    fn(base, models, *, <shared parameters>, <per-model parameters as lists>, seed)

``base`` is the base model's tensor (``None`` when the method ignores or lacks a base) and
``models`` the other inputs in config order; a per-model parameter arrives as a list aligned
with ``models``. Methods that ignore the base (linear, karcher, passthrough) get every input in
``models``. ``seed`` (an int) is passed to randomized methods only.

Methods that need whole-tensor statistics but can then work chunk by chunk (TIES thresholds,
DARE rescale sums, the SLERP angle) declare ``prepare(chunks, numel, **params) -> kernel``
instead of ``fn``; the engine streams row chunks through it, and calling the method on whole
tensors runs the same code on a single chunk.

Semantics and defaults follow mergekit 0.1.5; the docs list where we deliberately differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, TypeVar

import torch
import torch.nn.functional as F

from . import native
from .errors import MergeError
from .selection import TopK, bernoulli, bernoulli_draws, stream_seed, uniform

Tensor = torch.Tensor
Kernel = Callable[[Optional[Tensor], list[Tensor], int], Tensor]
R = TypeVar("R")


@dataclass(frozen=True)
class FusedKernel:
    """A kernel with a fused path for chunks as loaded (not widened): `narrow(base, models, offset,
    out_dtype)` merges them straight to the output dtype in one loop, with `merge`'s bits, or
    returns None where it does not apply (the engine then widens them and calls `merge`)."""

    merge: Kernel
    narrow: Callable[[Optional[Tensor], list[Tensor], int, torch.dtype], Optional[Tensor]]

    def __call__(self, base: Optional[Tensor], models: list[Tensor], offset: int) -> Tensor:
        return self.merge(base, models, offset)


class Chunks(Protocol):
    """One tensor's inputs as `prepare` sees them, in the compute dtype on the compute device."""

    def map(self, fn: Callable[[Optional[Tensor], list[Tensor], int], R], *, as_loaded: bool = False) -> Iterator[R]:
        """fn(base chunk or None, model chunks, flat offset of the chunk) for every chunk; the
        results come in stream order. The engine may call `fn` on several chunks at once, from
        several threads: it must only read shared state. Callable as often as needed.
        With `as_loaded`, bfloat16 chunks of a float32 computation come as stored, for fused
        loops that read them directly; `fn` widens them (`native.widened`) where none runs."""

    def sample(self) -> tuple[Optional[Tensor], list[Tensor]]:
        """A few evenly spread rows of (base, models): cheap, for guesses that passes then verify."""

    @property
    def device(self) -> torch.device:
        """Where the chunks are."""


@dataclass(frozen=True)
class WholeTensor:
    """`Chunks` over tensors already in memory: a single chunk, and the whole tensor as the sample."""

    base: Optional[Tensor]
    models: list[Tensor]

    def map(self, fn: Callable[[Optional[Tensor], list[Tensor], int], R], *, as_loaded: bool = False) -> Iterator[R]:
        yield fn(self.base, self.models, 0)

    def sample(self) -> tuple[Optional[Tensor], list[Tensor]]:
        return self.base, self.models

    @property
    def device(self) -> torch.device:
        return self.models[0].device

REQUIRED: Any = object()


class BasePolicy(str, Enum):
    REQUIRED = "required"  # needs base_model; the base is not among `models`
    OPTIONAL = "optional"  # uses base_model when one is given
    IGNORED = "ignored"  # every input, the base included, is one of `models`


@dataclass(frozen=True)
class Range:
    """An interval of numbers; an open end excludes its bound."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def bound(x: float) -> str:
            return f"{x:g}" if math.isfinite(x) else ("-inf" if x < 0 else "inf")

        return f"{'(' if self.low_open else '['}{bound(self.low)}, {bound(self.high)}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type  # float, int or bool
    default: Any = REQUIRED
    per_model: bool = False
    optional: bool = False  # None is an accepted value (passthrough's scale)
    valid: Optional[Range] = None  # values outside have no meaning: refused when the config is read
    usual: Optional[Range] = None  # values outside are legitimate but unusual: merged with a warning

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MergeMethod:
    name: str
    title: str
    fn: Optional[Callable[..., Tensor]]  # None when `prepare` builds the kernel
    base: BasePolicy
    parameters: tuple[Parameter, ...] = ()
    min_models: int = 1  # inputs in `models` (the base excluded unless the base is ignored)
    max_models: Optional[int] = None
    randomized: bool = False  # gets a `seed` keyword; the same seed gives the same result
    # The method can work on row chunks of a tensor (after `prepare`, if any, saw the whole of it).
    chunkable: bool = False
    # Whole-tensor statistics gathered over chunks before merging (TIES thresholds, SLERP angle):
    # prepare(chunks, numel, **params) returns the kernel(base, models, offset) for each chunk.
    prepare: Optional[Callable[..., "Kernel"]] = None
    # For methods without `prepare`, `FusedKernel.narrow` for `fn`: narrow(base, models, out_dtype, **params).
    narrow: Optional[Callable[..., Optional[Tensor]]] = None
    # Checks that span parameters, on the values resolved for one tensor: a problem in one line, or None.
    check: Optional[Callable[[dict[str, Any]], Optional[str]]] = None
    reference: str = ""
    param_index: dict[str, Parameter] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_index", {p.name: p for p in self.parameters})

    def __call__(self, base: Optional[Tensor], models: Sequence[Tensor], **params: Any) -> Tensor:
        """Merge whole tensors (the engine streams large ones through `prepare` and the kernel instead)."""
        models = list(models)
        if self.prepare is None:
            return self.fn(base, models, **params)
        numel = (base if base is not None else models[0]).numel()
        kernel = self.prepare(WholeTensor(base, models), numel, **params)
        return kernel(base, models, 0)


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    return REGISTRY[name]


# --------------------------------------------------------------------------------------------
# Building blocks


def _l1_rescaled(delta: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """Mask `delta`; with `rescale`, scale the survivors to keep the L1 norm (mergekit's rescale)."""
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def top_k_mask(values: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly the `k` largest entries of `values` (ties go to lower indices).

    Uses a selection (``kthvalue``), not a sort, so it is linear in the tensor size.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        at_threshold = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[at_threshold] = True
    return mask.reshape(values.shape)


def random_keep(seed: int, density: float, like: Tensor, offset: int = 0) -> Tensor:
    """Keep each entry with probability `density` (DARE); reproducible per flat position."""
    return bernoulli(seed, density, offset, offset + like.numel(), like.device).view(like.shape)


def row_sums(values: Tensor) -> list[float]:
    """Sums of the first dimension's rows: a chunk's partial sums that do not depend on the chunking.

    On the CPU each row adds in a fixed order, which the fused loops (`native.l1_sums`) follow
    without building `values`: in segments of `native.SUM_SEGMENT` columns, `native.SUM_LANES`
    running sums in the values' dtype (lane k taking the segment's columns k, k + SUM_LANES, ...
    in turn); each segment's lanes are added in float64 to the row's lanes, and those in turn.
    Float64 only between segments: converting every value to float64 cost the loops half their
    time. Torch's float64 `cumsum` adds in order; `sum` does not promise one. Python floats, not a
    tensor: small tensors kept across a pass would pin the heap pages that the chunks' large
    temporaries are freed into.
    """
    rows = values.reshape(native.row_shape(values))
    if not rows.shape[1]:
        return [0.0] * rows.shape[0]
    if rows.device.type != "cpu":  # GPU reductions add in their own order: close, not bit-identical
        return rows.double().sum(dim=1).tolist()
    segment, lanes = native.SUM_SEGMENT, native.SUM_LANES
    rows = F.pad(rows, (0, -rows.shape[1] % segment))  # zeros change no sum
    groups = rows.view(rows.shape[0], -1, segment // lanes, lanes)  # (row, segment, group, lane)
    segment_lanes = groups[:, :, 0].clone()
    for group in range(1, segment // lanes):
        segment_lanes += groups[:, :, group]
    row_lanes = segment_lanes.double().cumsum(dim=1)[:, -1]
    return row_lanes.cumsum(dim=1)[:, -1].tolist()


def exact_total(parts: Iterator[list[float]]) -> float:
    """The correctly rounded sum of partial sums, whatever their order or grouping."""
    return math.fsum(value for part in parts for value in part)


def outlier_prune(delta: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Drop the `gamma` share of largest magnitudes, then the smallest, keeping `density` (breadcrumbs)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_count = int(density * n)
    top_count = int(gamma * n)
    bottom_count = max(0, n - keep_count - top_count)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[bottom_count : bottom_count + keep_count]] = True
    return _l1_rescaled(delta, mask.reshape(delta.shape), rescale)


def rank_prune(delta: Tensor, density: float, epsilon: float, rescale: bool, seed: int) -> Tensor:
    """Keep entries with a probability that grows with their magnitude rank per row (DELLA).

    Planning refuses a density +/- epsilon outside (0, 1) (`della_window_problem`)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    spread = ((ranks - low) / (high - low)).clamp(0, 1)
    probability = (density - epsilon) + spread * 2 * epsilon
    keep = uniform(seed, 0, rows.numel(), rows.device).reshape(rows.shape) < probability
    return _l1_rescaled(rows, keep, rescale).reshape(delta.shape)


def sign_consensus(deltas: Tensor) -> Tensor:
    """Mask of entries whose sign agrees with the sign of the summed deltas (TIES 'sum' election)."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == majority


# --------------------------------------------------------------------------------------------
# Methods


def linear(base: None, models: list[Tensor], *, weight: list[float], normalize: bool) -> Tensor:
    result = models[0] * weight[0]
    for tensor, w in zip(models[1:], weight[1:]):
        result.add_(tensor, alpha=w)
    if normalize:
        result.div_(sum(weight))
    return result


def linear_narrow(base: None, models: list[Tensor], out_dtype: torch.dtype, *, weight: list[float],
                  normalize: bool) -> Optional[Tensor]:
    """`linear` from bfloat16 chunks to a bfloat16 result, where the fused loops run."""
    if out_dtype != torch.bfloat16 or not native.fits(*models, dtype=torch.bfloat16):
        return None
    return native.linear_bf16(models, weight, normalize=normalize, divisor=sum(weight))


def _slerp_coefficients(t: float, sq0: float, sq1: float, dot: float, dot_threshold: float = 0.9995,
                        eps: float = 1e-8) -> tuple[float, float]:
    """(a, b) with slerp(v0, v1) = a*v0 + b*v1, from |v0|^2, |v1|^2 and v0.v1 (linear when collinear)."""
    norm0, norm1 = math.sqrt(sq0), math.sqrt(sq1)
    norm0, norm1 = (norm0 if norm0 > eps else 1.0), (norm1 if norm1 > eps else 1.0)
    cos = max(-1.0, min(1.0, dot / (norm0 * norm1)))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def prepare_slerp(chunks: Chunks, numel: int, *, t: float) -> Kernel:
    def dots(base: Tensor, models: list[Tensor], offset: int) -> tuple[list[float], list[float], list[float]]:
        """Row sums of base * base, model * model and base * model: the chunk's share of the norms
        and the dot product, the same whatever the chunking."""
        if native.takes(base, models[0]):
            return native.product_sums(base, models[0])
        v0, v1 = native.widened(base), native.widened(models[0])
        return row_sums(v0 * v0), row_sums(v1 * v1), row_sums(v0 * v1)

    parts = list(chunks.map(dots, as_loaded=True))
    sq0, sq1, dot = (exact_total(part[k] for part in parts) for k in range(3))
    a, b = _slerp_coefficients(t, sq0, sq1, dot)

    def narrow(base: Tensor, models: list[Tensor], offset: int, out_dtype: torch.dtype) -> Optional[Tensor]:
        if out_dtype != torch.bfloat16 or not native.fits(base, models[0], dtype=torch.bfloat16):
            return None
        return native.axpby_bf16(base, models[0], a, b)

    return FusedKernel(lambda base, models, offset: torch.mul(base, a).add_(models[0], alpha=b), narrow)


def slerp_pair(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Spherical interpolation between two whole tensors."""
    return prepare_slerp(WholeTensor(v0, [v1]), v0.numel(), t=t)(v0, [v1], 0)


def _nuslerp_pair(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: Tensor) -> Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(collinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(
    base: Optional[Tensor],
    models: list[Tensor],
    *,
    weight: list[float],
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
) -> Tensor:
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return _nuslerp_pair(t, models[0], models[1], nuslerp_row_wise, nuslerp_flatten)
    return base + _nuslerp_pair(t, models[0] - base, models[1] - base, nuslerp_row_wise, nuslerp_flatten)


def multislerp(
    base: Optional[Tensor], models: list[Tensor], *, weight: list[float], normalize_weights: bool, eps: float
) -> Tensor:
    if len(models) == 1:
        return models[0]
    stacked = torch.stack(models)
    if base is not None:
        stacked -= base
    flat = stacked.reshape(len(models), -1)
    weights = torch.tensor(weight, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(models) != 2:
            raise MergeError("multislerp: the weighted inputs cancel out (opposite tensors); change the weights")
        result = (flat[0] * weights[0] + flat[1] * weights[1]).view(stacked.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


def karcher(base: None, models: list[Tensor], *, max_iter: int, tol: float) -> Tensor:
    """Weighted Karcher (Riemannian) mean of the inputs on the unit sphere, rescaled by their mean norm."""
    if len(models) == 1:
        return models[0]
    alphas = [1.0 / len(models)] * len(models)
    norms = [torch.linalg.vector_norm(m) for m in models]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(models[0])
    valid_alphas = [alphas[i] for i in valid]
    total = sum(valid_alphas)
    valid_alphas = [a / total for a in valid_alphas]
    units = [models[i] / norms[i] for i in valid]

    mean = sum(a * u for a, u in zip(valid_alphas, units))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(valid_alphas, units):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


class Sparsify(str, Enum):
    MAGNITUDE = "magnitude"
    RANDOM = "random"
    OUTLIERS = "magnitude_outliers"
    RANK = "della_magprune"


def combine_deltas(base: Tensor, deltas: list[Tensor], weight: list[float], consensus: bool, normalize: bool,
                   scale: float) -> Tensor:
    """Weight the (pruned) task vectors, elect signs (TIES), sum, normalize by the weights, scale.

    Overwrites `deltas`. The TIES election keeps, per entry, the weighted deltas whose sign
    matches the sign of their sum (ties go to +; zeros match neither). With that sign s = +-1,
    the kept deltas sum to (sum + s * sum of magnitudes) / 2 and their weights to
    (sum of w * |sign| + s * sum of w * sign) / 2: arithmetic only, because boolean masks and
    `where` cost several times more than arithmetic on CPU and this runs on every element.
    """
    if not deltas:
        return base
    if not consensus:
        mixed = _weighted_sum(deltas, weight)
        if normalize:
            mixed /= weight_divisor(weight)
    else:
        total, magnitude = torch.zeros_like(base), torch.zeros_like(base)
        signed, support = (torch.zeros_like(base), torch.zeros_like(base)) if normalize else (None, None)
        for x, w in zip(deltas, weight):
            x.mul_(w)
            sign = torch.sign(x)
            total += x
            magnitude.addcmul_(x, sign)  # |x|
            if normalize:
                signed.add_(sign, alpha=w)
                support.addcmul_(sign, sign, value=w)  # w * |sign x|
        elected = torch.sign(total).add_(0.5).sign_()  # sign 0 elects +
        mixed = total.addcmul_(elected, magnitude).mul_(0.5)
        if normalize:
            divisor = support.addcmul_(elected, signed).mul_(0.5)
            divisor += 1 - divisor.sign().abs()  # no agreeing weight: divide by 1, as mergekit does
            mixed /= divisor
    if scale != 1:
        mixed *= scale
    return mixed.add_(base)


def weight_divisor(weight: list[float]) -> float:
    """What normalizing divides a plain weighted sum by: the weights' sum, 1 when they cancel out (as mergekit)."""
    total = sum(weight)
    return total if abs(total) >= 1e-8 else 1.0


def _weighted_sum(tensors: list[Tensor], weights: Optional[list[float]] = None) -> Tensor:
    """sum(w * t) into a fresh tensor, without a zero-filled start."""
    weights = weights or [1.0] * len(tensors)
    result = torch.mul(tensors[0], weights[0]) if weights[0] != 1 else tensors[0].clone()
    for tensor, w in zip(tensors[1:], weights[1:]):
        result.add_(tensor, alpha=w)
    return result


def _rescale_factor(total: float, kept: float) -> float:
    return total / kept if total >= 1e-7 and kept >= 1e-7 else 1.0


def task_arithmetic_family(sparsify: Optional[Sparsify], consensus: bool) -> Callable[..., Kernel]:
    """Task-vector merges: prune each delta, weight it, elect signs, sum, normalize, scale.

    Magnitude pruning (TIES) and random pruning (DARE) stream: thresholds and L1 rescale factors
    come from passes over the chunks, then each chunk merges on its own. Outlier (breadcrumbs)
    and rank (DELLA) pruning need the whole tensor and get it as one chunk.
    """

    def prepare(chunks: Chunks, numel: int, *, weight: list[float], density: list[float], normalize: bool,
                rescale: bool, int8_mask: bool, seed: int = 0, gamma: Optional[list[float]] = None,
                epsilon: Optional[list[float]] = None, **keyword_named: float) -> Kernel:
        del int8_mask  # a memory knob in mergekit; masks here are boolean already
        scale = keyword_named["lambda"]  # `lambda` cannot be a Python parameter name
        count = len(weight)
        seeds = [stream_seed(seed, "model", i) for i in range(count)]
        factors = [1.0] * count
        pruned = [i for i, d in enumerate(density) if 0 < d < 1]
        selectors: list[Optional[TopK]] = [None] * count
        packed_masks: dict[tuple[int, int], Tensor] = {}  # (model, chunk offset): DARE's masks from the L1 pass

        if sparsify is Sparsify.MAGNITUDE and pruned:
            for i in pruned:
                selectors[i] = TopK(max(1, int(density[i] * numel)), numel, track_sums=rescale)
            base, models = chunks.sample()
            for i in pruned:
                selectors[i].guess((models[i] - base).abs())
            while True:
                active = [i for i in pruned if not selectors[i].done]
                if not active:
                    break
                for parts in chunks.map(lambda base, models, offset: [
                        selectors[i].scan_difference(models[i], base, offset) for i in active], as_loaded=True):
                    for i, part in zip(active, parts):
                        selectors[i].fold(part)
                for i in active:
                    selectors[i].end_pass()
            if rescale:
                factors = [_rescale_factor(s.total_sum, s.kept_sum) if s else 1.0 for s in selectors]
        elif sparsify is Sparsify.RANDOM and rescale and pruned:
            # The fused loops keep each chunk's masks, packed 8 to a byte (a 7B model's largest
            # tensor: 7 MB per model), for the merge pass: unpacking costs a third of drawing again.
            def l1_sums(base: Tensor, models: list[Tensor], offset: int) -> list[tuple[list[float], list[float]]]:
                sums = []
                for i in pruned:
                    draws = bernoulli_draws(seeds[i], density[i], offset, offset + base.numel())
                    if draws is not None and native.takes(models[i], base):
                        total, kept, packed = native.l1_sums(models[i], base, draws, offset, pack=True)
                        sums.append((total, kept))
                        if packed is not None:
                            packed_masks[(i, offset)] = packed
                        continue
                    magnitude = (native.widened(models[i]) - native.widened(base)).abs_()
                    sums.append((row_sums(magnitude), row_sums(magnitude * random_keep(seeds[i], density[i], base,
                                                                                      offset))))
                return sums

            totals = list(zip(*chunks.map(l1_sums, as_loaded=True)))  # per pruned model: row sums by chunk
            for i, model_sums in zip(pruned, totals):
                factors[i] = _rescale_factor(exact_total(t for t, _ in model_sums), exact_total(k for _, k in model_sums))

        def pruning(i: int, offset: int) -> tuple[Optional[float], Optional[float]]:
            """Model i's pruning of the chunk at `offset` (magnitude or random): the density of a
            random keep-mask or None, and a bound that keeps |delta| > bound (-inf all, inf none;
            None: only `TopK.prune` can, in the chunk that cuts through the ties at the threshold)."""
            if sparsify in (Sparsify.MAGNITUDE, Sparsify.RANDOM) and density[i] <= 0:
                return None, math.inf  # nothing kept, as mergekit's empty mask keeps nothing
            if sparsify is Sparsify.MAGNITUDE and selectors[i] is not None:
                return None, selectors[i].bound(offset)
            if sparsify is Sparsify.RANDOM and 0 < density[i] < 1:
                return density[i], -math.inf
            return None, -math.inf

        def mask(i: int, keep: Optional[float], offset: int, numel: int) -> native.Mask:
            """Model i's keep-mask of the chunk at `offset` for the fused loops: as the L1 pass packed
            it (once: each chunk merges once), else to draw."""
            packed = packed_masks.pop((i, offset), None)
            if packed is not None and packed.numel() == (numel + 7) // 8:
                return packed
            return bernoulli_draws(seeds[i], keep, offset, offset + numel) if keep is not None else None

        def fused(base: Tensor, models: list[Tensor], offset: int, out_dtype: torch.dtype) -> Optional[Tensor]:
            """The kernel as one native loop, in `out_dtype`, when the inputs and every model's pruning allow."""
            if not models or sparsify not in (None, Sparsify.MAGNITUDE, Sparsify.RANDOM) \
                    or out_dtype not in (torch.float32, torch.bfloat16) or not native.takes(base, *models):
                return None
            keep, bounds = zip(*(pruning(i, offset) for i in range(count)))
            if None in bounds:
                return None
            masks = [mask(i, k, offset, base.numel()) for i, k in enumerate(keep)]
            return native.task_merge(base, models, masks, bounds, factors, weight, position=offset,
                                     consensus=consensus, normalize=normalize, divisor=weight_divisor(weight),
                                     scale=scale, out_dtype=out_dtype)

        def kernel(base: Tensor, models: list[Tensor], offset: int) -> Tensor:
            merged = fused(base, models, offset, base.dtype)
            if merged is not None:
                return merged
            deltas = []
            for i, model in enumerate(models):
                delta = model - base
                if sparsify is Sparsify.OUTLIERS:
                    delta = outlier_prune(delta, density[i], gamma[i], rescale)
                elif sparsify is Sparsify.RANK:
                    delta = rank_prune(delta, density[i], epsilon[i], rescale, seeds[i]) if density[i] > 0 \
                        else delta.zero_()
                else:
                    keep, bound = pruning(i, offset)
                    if keep is not None:
                        delta *= random_keep(seeds[i], keep, delta, offset)
                    if bound == math.inf:
                        delta.zero_()
                    elif bound != -math.inf:
                        delta = selectors[i].prune(delta, offset)
                if factors[i] != 1.0:
                    delta *= factors[i]
                deltas.append(delta)
            return combine_deltas(base, deltas, weight, consensus, normalize, scale)

        return FusedKernel(kernel, fused)

    return prepare


def model_stock(base: Tensor, models: list[Tensor], *, filter_wise: bool) -> Tensor:
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        w0 = base.reshape(-1)
        ws = [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos_theta / torch.where(singular, 1.0, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def sce(base: Tensor, models: list[Tensor], *, select_topk: float, int8_mask: bool) -> Tensor:
    if not models:
        return base
    deltas = torch.stack([m - base for m in models])
    if select_topk < 1:
        deltas = deltas * _variance_top_k(deltas, select_topk)
    erase = sign_consensus(deltas)
    energy = deltas.square().reshape(len(models), -1).mean(dim=1)
    total = energy.sum().item()
    weights = torch.full_like(energy, 1 / len(models)) if abs(total) < 1e-6 else energy / total
    weights = weights.view(-1, *([1] * base.dim())) * erase
    return base + (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _variance_top_k(deltas: Tensor, density: float) -> Tensor:
    if density <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * density)
    return top_k_mask(variance.abs(), k)


def nearswap(base: Tensor, models: list[Tensor], *, t: float) -> Tensor:
    other = models[0]
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * other + (1 - weight) * base


def arcee_fusion(base: Tensor, models: list[Tensor], *, seed: int) -> Tensor:
    other = models[0]
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    generator = torch.Generator(device=importance.device)
    generator.manual_seed(seed)
    q1, median, q3 = _approximate_quantiles(importance, (0.25, 0.5, 0.75), generator)
    mask = importance >= median + 1.5 * (q3 - q1)
    return base + (other - base) * mask


_QUANTILE_SAMPLE = 1_000_000


def _approximate_quantiles(values: Tensor, qs: Sequence[float], generator: torch.Generator) -> list[Tensor]:
    flat = values.reshape(-1)
    if flat.numel() > _QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    return [ordered[int(q * (ordered.numel() - 1))] for q in qs]


def _ram_masks(base: Tensor, models: list[Tensor], epsilon: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    deltas = torch.stack([m - base for m in models]).reshape(len(models), -1)
    nonzero = deltas.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return deltas * nonzero, nonzero, counts, counts > 1, counts == 1


def ram(base: Tensor, models: list[Tensor], *, epsilon: float) -> Tensor:
    if not models:
        return base
    deltas, _, counts, overlap, unique = _ram_masks(base, models, epsilon)
    merged = (deltas * unique + deltas * overlap / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def ramplus_tl(base: Tensor, models: list[Tensor], *, r: float, alpha: float, epsilon: float) -> Tensor:
    if not models:
        return base
    deltas, nonzero, counts, overlap, unique = _ram_masks(base, models, epsilon)
    rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
    boost = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (deltas * unique * boost + deltas * overlap / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def passthrough(base: None, models: list[Tensor], *, scale: list[Optional[float]]) -> Tensor:
    return models[0] if scale[0] is None else models[0] * scale[0]


# --------------------------------------------------------------------------------------------
# Registry

_WEIGHT = Parameter("weight", float, per_model=True, usual=Range(0))
_UNIT = Range(0, 1)


def della_window_problem(params: dict[str, Any]) -> Optional[str]:
    """DELLA keeps entries with probabilities from density - epsilon to density + epsilon: both must
    lie inside (0, 1) wherever it prunes (0 < density < 1)."""
    for k, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"])):
        if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            return (f"epsilon: della keeps entries with probabilities density +/- epsilon, which must lie inside "
                    f"(0, 1); model {k + 1} has density {density:g} and epsilon {epsilon:g}: lower epsilon")
    return None

register(MergeMethod("linear", "Linear (model soup)", linear, BasePolicy.IGNORED,
                     (_WEIGHT, Parameter("normalize", bool, True)), chunkable=True, narrow=linear_narrow,
                     reference="https://arxiv.org/abs/2203.05482"))
register(MergeMethod("slerp", "SLERP", None, BasePolicy.REQUIRED, (Parameter("t", float, valid=_UNIT),),
                     min_models=1, max_models=1, chunkable=True, prepare=prepare_slerp,
                     reference="https://en.wikipedia.org/wiki/Slerp"))
register(MergeMethod("nuslerp", "NuSLERP", nuslerp, BasePolicy.OPTIONAL,
                     (_WEIGHT, Parameter("nuslerp_row_wise", bool, False), Parameter("nuslerp_flatten", bool, True)),
                     min_models=2, max_models=2))
register(MergeMethod("multislerp", "Multi-SLERP", multislerp, BasePolicy.OPTIONAL,
                     (_WEIGHT, Parameter("normalize_weights", bool, True), Parameter("eps", float, 1e-8)),
                     reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"))
register(MergeMethod("karcher", "Karcher mean", karcher, BasePolicy.IGNORED,
                     (Parameter("max_iter", int, 10), Parameter("tol", float, 1e-5)),
                     reference="https://en.wikipedia.org/wiki/Karcher_mean"))


def _task_arithmetic(name: str, title: str, sparsify: Optional[Sparsify], consensus: bool,
                     normalize: bool, rescale: bool, reference: str) -> MergeMethod:
    params = [
        Parameter("int8_mask", bool, False),
        Parameter("normalize", bool, normalize),
        Parameter("rescale", bool, rescale),
        Parameter("lambda", float, 1.0, usual=Range(0, 10)),
        _WEIGHT,
        Parameter("density", float, 1.0, per_model=True, valid=_UNIT),
    ]
    if sparsify is Sparsify.OUTLIERS:
        params.append(Parameter("gamma", float, 0.01, per_model=True, valid=_UNIT))
    if sparsify is Sparsify.RANK:
        params.append(Parameter("epsilon", float, 0.15, per_model=True, valid=Range(0, 0.5, high_open=True)))
    randomized = sparsify in (Sparsify.RANDOM, Sparsify.RANK)
    chunkable = sparsify in (None, Sparsify.MAGNITUDE, Sparsify.RANDOM)
    return register(MergeMethod(name, title, None, BasePolicy.REQUIRED, tuple(params), randomized=randomized,
                                chunkable=chunkable, prepare=task_arithmetic_family(sparsify, consensus),
                                check=della_window_problem if sparsify is Sparsify.RANK else None,
                                reference=reference))


_task_arithmetic("task_arithmetic", "Task arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089")
_task_arithmetic("ties", "TIES", Sparsify.MAGNITUDE, True, True, False, "https://arxiv.org/abs/2306.01708")
_task_arithmetic("dare_ties", "DARE-TIES", Sparsify.RANDOM, True, False, True, "https://arxiv.org/abs/2311.03099")
_task_arithmetic("dare_linear", "DARE (linear)", Sparsify.RANDOM, False, False, True, "https://arxiv.org/abs/2311.03099")
_task_arithmetic("breadcrumbs", "Model Breadcrumbs", Sparsify.OUTLIERS, False, False, False,
                 "https://arxiv.org/abs/2312.06795")
_task_arithmetic("breadcrumbs_ties", "Model Breadcrumbs + TIES", Sparsify.OUTLIERS, True, False, False,
                 "https://arxiv.org/abs/2312.06795")
_task_arithmetic("della", "DELLA", Sparsify.RANK, True, True, True, "https://arxiv.org/abs/2406.11617")
_task_arithmetic("della_linear", "DELLA (linear)", Sparsify.RANK, False, False, True, "https://arxiv.org/abs/2406.11617")

register(MergeMethod("model_stock", "Model Stock", model_stock, BasePolicy.REQUIRED,
                     (Parameter("filter_wise", bool, False),), min_models=2,
                     reference="https://arxiv.org/abs/2403.19522"))
register(MergeMethod("sce", "SCE", sce, BasePolicy.REQUIRED,
                     (Parameter("int8_mask", bool, False), Parameter("select_topk", float, 1.0, valid=_UNIT)),
                     reference="https://arxiv.org/abs/2408.07990"))
register(MergeMethod("nearswap", "NearSwap", nearswap, BasePolicy.REQUIRED, (Parameter("t", float),),
                     min_models=1, max_models=1, chunkable=True,
                     reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"))
register(MergeMethod("arcee_fusion", "Arcee Fusion", arcee_fusion, BasePolicy.REQUIRED, (),
                     min_models=1, max_models=1, randomized=True, reference="https://arcee.ai"))
register(MergeMethod("ram", "Reinforced Agent Merging", ram, BasePolicy.REQUIRED,
                     (Parameter("epsilon", float, 1e-5),), reference="https://arxiv.org/abs/2601.13572"))
register(MergeMethod("ramplus_tl", "RAM+ (tensor-local)", ramplus_tl, BasePolicy.REQUIRED,
                     (Parameter("r", float, 0.1), Parameter("alpha", float, 0.2), Parameter("epsilon", float, 1e-5)),
                     reference="https://arxiv.org/abs/2601.13572"))
register(MergeMethod("passthrough", "Passthrough", passthrough, BasePolicy.IGNORED,
                     (Parameter("scale", float, None, per_model=True, optional=True),),
                     max_models=1, chunkable=True))

