"""Task-vector merges (task arithmetic, TIES, DARE, breadcrumbs, DELLA): prune each delta from the
base, weight it, elect signs, sum, normalize, scale."""

from __future__ import annotations

import math
from enum import Enum
from typing import Optional

import torch

from . import native
from .chunks import Chunks, FusedKernel, exact_total, row_sums
from .pruning import outlier_prune, random_keep, rank_prune
from .selection import TopK, bernoulli_draws, stream_seed

Tensor = torch.Tensor


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


class TaskVectorMerge:
    """`prepare` for one task-vector method: `TaskVectorMerge(sparsification, consensus)` as the
    registry declares it (mergekit's sparsification_method and consensus_method).

    Magnitude pruning (TIES) and random pruning (DARE) stream: thresholds and L1 rescale factors
    come from passes over the chunks, then each chunk merges on its own. Outlier (breadcrumbs)
    and rank (DELLA) pruning need the whole tensor and get it as one chunk.
    """

    def __init__(self, sparsification: Optional[str] = None, consensus: Optional[str] = None):
        self.sparsify = Sparsify(sparsification) if sparsification else None
        self.consensus = consensus == "sum"

    def __call__(self, chunks: Chunks, numel: int, *, weight: list[float], density: list[float], normalize: bool,
                 rescale: bool, int8_mask: bool, seed: int = 0, gamma: Optional[list[float]] = None,
                 epsilon: Optional[list[float]] = None, **keyword_named: float) -> FusedKernel:
        del int8_mask  # a memory knob in mergekit; masks here are boolean already
        prepared = _PreparedTaskVectors(self.sparsify, self.consensus, weight, density, normalize, rescale,
                                        keyword_named["lambda"], seed, gamma, epsilon)  # `lambda`: a keyword
        prepared.gather(chunks, numel)
        return FusedKernel(prepared.merge, prepared.fused)


class _PreparedTaskVectors:
    """One tensor's task-vector merge after its passes: per model, the pruning (a magnitude
    threshold selector, or a random mask's density), the L1 rescale factor and, for DARE, the
    masks its L1 pass packed. Kernels only read it, from any thread, but for `_packed`, whose
    entries each chunk's merge takes once."""

    def __init__(self, sparsify: Optional[Sparsify], consensus: bool, weight: list[float], density: list[float],
                 normalize: bool, rescale: bool, scale: float, seed: int, gamma: Optional[list[float]],
                 epsilon: Optional[list[float]]):
        self.sparsify, self.consensus, self.weight, self.density = sparsify, consensus, weight, density
        self.normalize, self.rescale, self.scale, self.gamma, self.epsilon = normalize, rescale, scale, gamma, epsilon
        count = len(weight)
        self.seeds = [stream_seed(seed, "model", i) for i in range(count)]
        self.factors = [1.0] * count
        self.pruned = [i for i, d in enumerate(density) if 0 < d < 1]
        self.selectors: list[Optional[TopK]] = [None] * count
        self._packed: dict[tuple[int, int], Tensor] = {}  # (model, chunk offset): DARE's masks from the L1 pass

    def gather(self, chunks: Chunks, numel: int) -> None:
        """The passes over the chunks that pruning needs before any chunk merges."""
        if self.sparsify is Sparsify.MAGNITUDE and self.pruned:
            self._select_magnitudes(chunks, numel)
        elif self.sparsify is Sparsify.RANDOM and self.rescale and self.pruned:
            self._random_l1_sums(chunks)

    def _select_magnitudes(self, chunks: Chunks, numel: int) -> None:
        pruned, selectors = self.pruned, self.selectors
        for i in pruned:
            selectors[i] = TopK(max(1, int(self.density[i] * numel)), numel, track_sums=self.rescale)
        base, models = chunks.sample()
        for i in pruned:
            selectors[i].guess((models[i] - base).abs())
        while True:
            active = [i for i in pruned if not selectors[i].done]
            if not active:
                break
            def scan(base: Tensor, models: list[Tensor], offset: int, active: list[int] = active) -> list:
                return [selectors[i].scan_difference(models[i], base, offset) for i in active]

            for parts in chunks.map(scan, as_loaded=True):
                for i, part in zip(active, parts):
                    selectors[i].fold(part)
            for i in active:
                selectors[i].end_pass()
        if self.rescale:
            self.factors = [_rescale_factor(s.total_sum, s.kept_sum) if s else 1.0 for s in selectors]

    def _random_l1_sums(self, chunks: Chunks) -> None:
        """DARE's rescale factors. The fused loops keep each chunk's masks, packed 8 to a byte (a
        7B model's largest tensor: 7 MB per model), for the merge pass: unpacking costs a third
        of drawing again."""

        def l1_sums(base: Tensor, models: list[Tensor], offset: int) -> list[tuple[list[float], list[float]]]:
            sums = []
            for i in self.pruned:
                draws = bernoulli_draws(self.seeds[i], self.density[i], offset, offset + base.numel())
                if draws is not None and native.takes(models[i], base):
                    total, kept, packed = native.l1_sums(models[i], base, draws, offset, pack=True)
                    sums.append((total, kept))
                    if packed is not None:
                        self._packed[(i, offset)] = packed
                    continue
                magnitude = (native.widened(models[i]) - native.widened(base)).abs_()
                keep = random_keep(self.seeds[i], self.density[i], base, offset)
                sums.append((row_sums(magnitude), row_sums(magnitude * keep)))
            return sums

        totals = list(zip(*chunks.map(l1_sums, as_loaded=True)))  # per pruned model: row sums by chunk
        for i, model_sums in zip(self.pruned, totals):
            self.factors[i] = _rescale_factor(exact_total(t for t, _ in model_sums),
                                              exact_total(k for _, k in model_sums))

    def pruning(self, i: int, offset: int) -> tuple[Optional[float], Optional[float]]:
        """Model i's pruning of the chunk at `offset` (magnitude or random): the density of a
        random keep-mask or None, and a bound that keeps |delta| > bound (-inf all, inf none;
        None: only `TopK.prune` can, in the chunk that cuts through the ties at the threshold)."""
        density = self.density[i]
        if self.sparsify in (Sparsify.MAGNITUDE, Sparsify.RANDOM) and density <= 0:
            return None, math.inf  # nothing kept, as mergekit's empty mask keeps nothing
        if self.sparsify is Sparsify.MAGNITUDE and self.selectors[i] is not None:
            return None, self.selectors[i].bound(offset)
        if self.sparsify is Sparsify.RANDOM and 0 < density < 1:
            return density, -math.inf
        return None, -math.inf

    def mask(self, i: int, keep: Optional[float], offset: int, numel: int) -> native.Mask:
        """Model i's keep-mask of the chunk at `offset` for the fused loops: as the L1 pass packed
        it (once: each chunk merges once), else to draw."""
        packed = self._packed.pop((i, offset), None)
        if packed is not None and packed.numel() == (numel + 7) // 8:
            return packed
        return bernoulli_draws(self.seeds[i], keep, offset, offset + numel) if keep is not None else None

    def fused(self, base: Tensor, models: list[Tensor], offset: int, out_dtype: torch.dtype) -> Optional[Tensor]:
        """The kernel as one native loop, in `out_dtype`, when the inputs and every model's pruning allow."""
        if not models or self.sparsify not in (None, Sparsify.MAGNITUDE, Sparsify.RANDOM) \
                or out_dtype not in (torch.float32, torch.bfloat16) or not native.takes(base, *models):
            return None
        keep, bounds = zip(*(self.pruning(i, offset) for i in range(len(models))))
        if None in bounds:
            return None
        masks = [self.mask(i, k, offset, base.numel()) for i, k in enumerate(keep)]
        return native.task_merge(base, models, masks, bounds, self.factors, self.weight, position=offset,
                                 consensus=self.consensus, normalize=self.normalize,
                                 divisor=weight_divisor(self.weight), scale=self.scale, out_dtype=out_dtype)

    def merge(self, base: Tensor, models: list[Tensor], offset: int) -> Tensor:
        merged = self.fused(base, models, offset, base.dtype)
        if merged is not None:
            return merged
        deltas = []
        for i, model in enumerate(models):
            delta = model - base
            if self.sparsify is Sparsify.OUTLIERS:
                delta = outlier_prune(delta, self.density[i], self.gamma[i], self.rescale)
            elif self.sparsify is Sparsify.RANK:
                delta = rank_prune(delta, self.density[i], self.epsilon[i], self.rescale, self.seeds[i]) \
                    if self.density[i] > 0 else delta.zero_()
            else:
                keep, bound = self.pruning(i, offset)
                if keep is not None:
                    delta *= random_keep(self.seeds[i], keep, delta, offset)
                if bound == math.inf:
                    delta.zero_()
                elif bound != -math.inf:
                    delta = self.selectors[i].prune(delta, offset)
            if self.factors[i] != 1.0:
                delta *= self.factors[i]
            deltas.append(delta)
        return combine_deltas(base, deltas, self.weight, self.consensus, self.normalize, self.scale)
