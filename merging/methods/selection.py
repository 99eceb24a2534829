"""Exact order statistics and reproducible randomness for tensors seen in row chunks.

TIES keeps the k largest magnitudes of each task vector. Sorting (or `kthvalue`) needs the whole
tensor in memory and is slow on CPU. `TopK` finds the exact k-th value in streaming passes:

- With a guess from a small sample of the tensor, one pass counts the values above a bracket
  around the guessed threshold and collects the few values inside it; the k-th value is then
  selected exactly among those. Bracket and sample only decide how fast the answer comes, never
  what it is: if the k-th value is outside the bracket, the radix passes below run.
- Radix selection: a histogram of the top 16 bits of the float32 keys, then of the low 16 bits
  inside the one bin that holds the k-th value. Two passes, linear time, 65536-bin histograms.

Random masks (DARE, DELLA) draw from fixed blocks of the flattened tensor, each with its own seed,
so the same seed gives the same mask however the tensor is split into chunks.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import native

Tensor = torch.Tensor
_BINS = 1 << 16
RNG_BLOCK = 1 << 18
GUESS_SAMPLE = 1 << 16  # sample values used to place the bracket
_INSIDE_LIMIT = 1 << 22  # values inside the bracket worth collecting (more for large tensors)
# Bracket half-width in sample ranks: four standard deviations of a sampled quantile plus 1% of
# the sample, for samples of rows that are not independent draws.
_SPREAD_SIGMAS, _SPREAD_SHARE = 4.0, 0.01


def _keys(magnitudes: Tensor) -> Tensor:
    """int32 keys that sort like the (non-negative) float32 values."""
    return magnitudes.float().contiguous().view(torch.int32)


def _float(key: int) -> float:
    return torch.tensor([key], dtype=torch.int32).view(torch.float32).item()


@dataclass
class Part:
    """What one chunk's scan found, for `TopK.fold`."""

    offset: int  # flat position of the chunk's first value
    above: int = 0  # values above the bracket
    at_least: int = 0  # values at or above the bracket's lower end (when it is a single value)
    inside: Optional[Tensor] = None  # values inside the bracket; None when there were too many
    total_sum: float = 0.0
    above_sum: float = 0.0
    counts: Optional[Tensor] = None  # radix histogram
    sums: Optional[Tensor] = None  # radix histogram of the values' sums
    equal: int = 0  # values equal to the threshold


def _count_above(magnitudes: Tensor, bound: float) -> int:
    """How many of the (non-negative) `magnitudes` exceed `bound`."""
    return int(torch.count_nonzero(magnitudes if bound == 0 else F.hardshrink(magnitudes, bound)))


def _below(value: float) -> float:
    """The largest float32 below the non-negative float32 `value` (0 for 0)."""
    key = int(_keys(torch.tensor([value])).item())
    return _float(key - 1) if key > 0 else 0.0


class TopK:
    """The k largest of a stream of non-negative values: the exact threshold, and a chunked mask.

    Optionally `guess` from a sample; then, until `done`, `scan` every chunk (in any order, on any
    thread: a scan only reads the selector), `fold` the parts in stream order, and `end_pass`.
    Afterwards `mask` or `prune` chunks in any order: they keep the values above the threshold
    plus the first values equal to it (in stream order) until exactly k are kept, as
    `methods.top_k_mask` does on a whole tensor.
    """

    def __init__(self, k: int, numel: int, track_sums: bool = False):
        self.k, self.numel, self.track_sums = k, numel, track_sums
        self.all = k >= numel
        self.none = k <= 0
        self.stage = "done" if self.trivial else "high"
        self.passes = 0
        self._lo = self._hi = 0.0
        self._bin: Optional[int] = None
        self._above = 0
        self._above_sum = 0.0
        self.threshold_key: Optional[int] = None
        self.equal_to_keep = 0
        # Ties at the threshold: chunks before offset `_tie_cut` keep all of theirs, the chunk at it
        # keeps its first `_ties_at_cut`, later chunks none.
        self._tie_cut: float = math.inf
        self._ties_at_cut = 0
        self.kept_sum = 0.0  # sum of the kept values (for L1 rescaling)
        self.total_sum = 0.0
        self._parts: list[Part] = []
        self._counts: Optional[Tensor] = None  # radix histogram of the current pass
        self._sums: Optional[Tensor] = None

    @property
    def trivial(self) -> bool:
        return self.all or self.none

    @property
    def done(self) -> bool:
        return self.stage == "done"

    @property
    def threshold(self) -> float:
        return _float(self.threshold_key)

    # -- the pass loop ----------------------------------------------------------------------

    def guess(self, sample: Tensor) -> None:
        """Bracket the k-th value from a sample of the stream, so that one pass usually settles it."""
        if self.done or not sample.numel():
            return
        flat = sample.reshape(-1).float()
        if flat.numel() > GUESS_SAMPLE:
            flat = flat[:: math.ceil(flat.numel() / GUESS_SAMPLE)]
        size = flat.numel()
        share = self.k / self.numel
        position = (1 - share) * size  # ascending rank of the threshold in the sample
        spread = _SPREAD_SIGMAS * math.sqrt(size * share * (1 - share)) + _SPREAD_SHARE * size + 1
        low_rank, high_rank = math.floor(position - spread), math.ceil(position + spread)
        # A bracket end beyond the sample is open: the stream may hold values the sample missed.
        self._lo = flat.kthvalue(low_rank).values.item() if low_rank >= 1 else 0.0
        self._hi = flat.kthvalue(high_rank).values.item() if high_rank <= size else math.inf
        self.stage = "bracket"

    def scan_difference(self, values: Tensor, base: Tensor, offset: int = 0) -> Part:
        """`scan` of the magnitudes |values - base|, without building them where the fused loops can."""
        if self.stage == "bracket" and not self.track_sums and native.takes(values, base):
            return self._scan_bracket_fused(values.reshape(-1), base.reshape(-1), offset)
        return self.scan((native.widened(values) - native.widened(base)).abs_(), offset)

    def scan(self, magnitudes: Tensor, offset: int = 0) -> Part:
        """The part of the current pass for one chunk, which starts at flat position `offset`."""
        magnitudes = magnitudes.float().reshape(-1)
        if self.stage == "bracket":
            return self._scan_bracket(magnitudes, offset)
        if self.stage == "high":
            return self._scan_high(magnitudes, offset)
        if self.stage == "low":
            return self._scan_low(magnitudes, offset)
        if self.stage == "ties":
            return Part(offset, equal=int(torch.count_nonzero(_keys(magnitudes) == self.threshold_key)))
        raise RuntimeError("TopK.scan after the threshold was found")

    def fold(self, part: Part) -> None:
        """Take one chunk's part of the current pass; parts must come in stream order."""
        self._parts.append(part) if self.stage in ("bracket", "ties") else self._add_histogram(part)

    def end_pass(self) -> None:
        """Settle what the folded parts tell and move to the next stage."""
        self.passes += 1
        parts, self._parts = self._parts, []
        if self.stage == "bracket":
            self.stage = "done" if self._settle_bracket(parts) else "high"
        elif self.stage == "high":
            self._finish_high()
            self.stage = "low"
        elif self.stage == "low":
            self.stage = "done" if self._finish_low() else "ties"
        elif self.stage == "ties":
            self._cut_ties([(part.offset, part.equal) for part in parts])
            self.stage = "done"

    def _add_histogram(self, part: Part) -> None:
        if self._counts is None:
            self._counts = torch.zeros(_BINS, dtype=torch.int64)
            self._sums = torch.zeros(_BINS, dtype=torch.float64)
        self._counts += part.counts
        if self.track_sums:
            self._sums += part.sums

    # -- one pass with a bracket --------------------------------------------------------------

    def _scan_bracket_fused(self, values: Tensor, base: Optional[Tensor], offset: int) -> Part:
        collect = self._lo != self._hi  # else everything inside equals the bound: counting is enough
        above, found, inside = native.bracket_scan(
            values, base, self._lo, self._hi, self._inside_limit(values.numel()) if collect else 0)
        part = Part(offset, above=above)
        if collect:
            part.inside = inside
        else:
            part.at_least = above + found
        return part

    def _scan_bracket(self, magnitudes: Tensor, offset: int) -> Part:
        if not self.track_sums and native.fits(magnitudes):  # sums stay in torch: same rounding
            return self._scan_bracket_fused(magnitudes, None, offset)
        # Counting non-zeros of a hardshrink beats comparing: boolean tensors are slow on CPU.
        part = Part(offset, above=_count_above(magnitudes, self._hi))
        if self.track_sums:
            part.total_sum = float(magnitudes.sum(dtype=torch.float64))
            part.above_sum = float(F.threshold(magnitudes, self._hi, 0.0).sum(dtype=torch.float64))
        if self._lo == self._hi:  # everything inside equals the bound: counting is enough
            part.at_least = magnitudes.numel() if self._lo == 0 else _count_above(magnitudes, _below(self._lo))
            return part
        inside = magnitudes[(magnitudes >= self._lo).logical_and_(magnitudes <= self._hi)]
        part.inside = inside.cpu() if inside.numel() <= self._inside_limit(magnitudes.numel()) else None
        return part

    def _inside_limit(self, size: int) -> int:
        # Past this share the guess was poor: collecting costs more than the radix passes.
        return max(size // 8, math.ceil(_INSIDE_LIMIT * size / self.numel))

    def _settle_bracket(self, parts: list[Part]) -> bool:
        above = sum(part.above for part in parts)
        needed = self.k - above
        self.total_sum = math.fsum(part.total_sum for part in parts)
        above_sum = math.fsum(part.above_sum for part in parts)
        if self._lo == self._hi:
            equal = [(part.offset, part.at_least - part.above) for part in parts]
            if not 0 < needed <= sum(count for _, count in equal):
                return False
            self.threshold_key = int(_keys(torch.tensor([self._lo])).item())
            self.equal_to_keep = needed
            self.kept_sum = above_sum + needed * self._lo
            self._cut_ties(equal)
            return True
        if any(part.inside is None for part in parts):
            return False
        inside = torch.cat([part.inside for part in parts])
        if not 0 < needed <= inside.numel():
            return False
        if needed == inside.numel():  # all of them: the threshold is the smallest
            smallest = inside.min()
            self.threshold_key = int(_keys(smallest.reshape(1)).item())
            self.equal_to_keep = int(torch.count_nonzero(inside == smallest))
            self.kept_sum = above_sum + float(inside.sum(dtype=torch.float64))
        else:
            among = TopK(needed, inside.numel(), track_sums=self.track_sums)
            while not among.done:  # radix passes over the few values inside the bracket
                among.fold(among.scan(inside))
                among.end_pass()
            self.threshold_key, self.equal_to_keep = among.threshold_key, among.equal_to_keep
            self.kept_sum = above_sum + among.kept_sum
        threshold = self.threshold
        self._cut_ties([(part.offset, int(torch.count_nonzero(part.inside == threshold))) for part in parts])
        return True

    def _cut_ties(self, equal: list[tuple[int, int]]) -> None:
        """Place the cut in the ties at the threshold from each chunk's count of them, in stream order."""
        left = self.equal_to_keep
        for offset, count in equal:
            if count > left:
                self._tie_cut, self._ties_at_cut = offset, left
                break
            left -= count
        self._just_below = _below(self.threshold)

    # -- radix selection ----------------------------------------------------------------------

    def _scan_high(self, magnitudes: Tensor, offset: int) -> Part:
        high = (_keys(magnitudes) >> 16).cpu()
        part = Part(offset, counts=torch.bincount(high, minlength=_BINS))
        if self.track_sums:
            part.sums = torch.bincount(high, weights=magnitudes.double().cpu(), minlength=_BINS)
        return part

    def _finish_high(self) -> None:
        counts, sums, self._counts, self._sums = self._counts, self._sums, None, None
        self.total_sum = float(sums.sum())
        from_top = torch.flip(counts, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, self.k))  # first bin (from the top) reaching k
        self._bin = _BINS - 1 - index
        self._above = int(from_top[index - 1]) if index else 0
        self._above_sum = float(sums[self._bin + 1:].sum())

    def _scan_low(self, magnitudes: Tensor, offset: int) -> Part:
        keys = _keys(magnitudes).cpu()
        # Values outside the bin land in two overflow bins (below, above): arithmetic, no
        # compaction and no `where`, which is slow on CPU.
        low = (keys - (self._bin << 16)).clamp_(-1, _BINS).add_(1)
        part = Part(offset, counts=torch.bincount(low, minlength=_BINS + 2)[1:_BINS + 1])
        if self.track_sums:
            weights = magnitudes.double().cpu()
            part.sums = torch.bincount(low, weights=weights, minlength=_BINS + 2)[1:_BINS + 1]
        return part

    def _finish_low(self) -> bool:
        """Settle the threshold; False when a pass must still find where the kept ties end."""
        counts, sums, self._counts, self._sums = self._counts, self._sums, None, None
        needed = self.k - self._above
        from_top = torch.flip(counts, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, needed))
        low_bin = _BINS - 1 - index
        above_in_bin = int(from_top[index - 1]) if index else 0
        self.threshold_key = (self._bin << 16) | low_bin
        self.equal_to_keep = needed - above_in_bin
        self.kept_sum = self._above_sum + float(sums[low_bin + 1:].sum()) + self.equal_to_keep * self.threshold
        self._cut_ties([])
        return self.equal_to_keep == int(counts[low_bin])  # every tie is kept: no cut to place

    # -- applying the threshold ---------------------------------------------------------------

    def _ties_to_keep(self, offset: int) -> Optional[int]:
        """Ties at the threshold the chunk at `offset` keeps: None for all of them."""
        if offset < self._tie_cut:
            return None
        return self._ties_at_cut if offset == self._tie_cut else 0

    def mask(self, magnitudes: Tensor, offset: int = 0) -> Tensor:
        """The keep-mask of the chunk at flat position `offset`."""
        if self.all:
            return torch.ones_like(magnitudes, dtype=torch.bool)
        if self.none:
            return torch.zeros_like(magnitudes, dtype=torch.bool)
        keys = _keys(magnitudes)
        ties = self._ties_to_keep(offset)
        if ties is None:
            return keys >= self.threshold_key
        if ties == 0:
            return keys > self.threshold_key
        equal = keys == self.threshold_key
        # keep only the first ties, in stream order, as the whole-tensor mask does
        order = equal.reshape(-1).cumsum(0).reshape(equal.shape)
        return (keys > self.threshold_key) | (equal & (order <= ties))

    def bound(self, offset: int = 0) -> Optional[float]:
        """`prune` of the chunk at `offset` as a bound: it keeps the values with |v| > bound (-inf
        keeps all, inf none). None for the one chunk that cuts through the ties at the threshold."""
        if self.all:
            return -math.inf
        if self.none:
            return math.inf
        if self.threshold == 0:  # ties at a zero threshold are zeros: keeping or dropping them changes nothing
            return -math.inf
        ties = self._ties_to_keep(offset)
        if ties is None:
            return self._just_below  # |v| >= threshold
        return self.threshold if ties == 0 else None

    def prune(self, values: Tensor, offset: int = 0) -> Tensor:
        """`values` (the chunk at flat position `offset`) with every entry outside the top k zeroed.

        Same choice as `mask`, without boolean masks on the common path: boolean tensors and
        `where` cost several times more than arithmetic on CPU, and this runs on every element.
        """
        bound = self.bound(offset)
        if bound == -math.inf:
            return values
        if bound == math.inf:
            return values.zero_()
        if bound is None or values.dtype != torch.float32:  # the keys are float32: compare as `mask` does
            return values * self.mask(values.abs(), offset)
        return F.hardshrink(values, bound)


def stream_seed(seed: int, *parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# MurmurHash3's 32-bit finalizer constants, as signed int32 (torch has no uint32 arithmetic).
_MIX1, _MIX2 = _int32(0x85EBCA6B), _int32(0xC2B2AE35)


def _block_seeds(seed: int, start: int, end: int) -> list[int]:
    """The seeds of the RNG blocks that flat positions [start, end) of the stream `seed` span."""
    return [stream_seed(seed, block) for block in range(start // RNG_BLOCK, (end - 1) // RNG_BLOCK + 1)]


def _block_hash(seed: int, start: int, end: int, device: torch.device) -> Tensor:
    """31 random bits (a non-negative int32) for each flat position in [start, end) of the stream
    `seed`, each RNG block of positions hashed with its own seed.

    A counter-based hash instead of `torch.rand`: CPU generators are serial and cost several
    times more per draw, and any slice of a block can be drawn without drawing the rest.
    Integer arithmetic wraps identically on every device, so CPU and CUDA draw the same values.
    All blocks are hashed in one set of operations, so a GPU draws a chunk in a dozen launches.
    """
    block_seeds = _block_seeds(seed, start, end)
    origin = start // RNG_BLOCK * RNG_BLOCK
    spans = [min(end, origin + (b + 1) * RNG_BLOCK) - max(start, origin + b * RNG_BLOCK)
             for b in range(len(block_seeds))]

    def per_position(values: list[int]) -> Tensor:
        per_block = torch.tensor(values, dtype=torch.int32).to(device)
        return per_block.expand(spans[0]) if len(spans) == 1 else per_block.repeat_interleave(
            torch.tensor(spans).to(device), output_size=end - start)

    within = torch.arange(start - origin, end - origin, dtype=torch.int32, device=device) & (RNG_BLOCK - 1)
    z = within * per_position([_int32(s) | 1 for s in block_seeds])  # a seeded odd multiplier and offset
    z += per_position([_int32(s >> 32) for s in block_seeds])
    # MurmurHash3's finalizer with arithmetic shifts (torch has no unsigned int32): each
    # xor-shift clears bit 31, so the result is never negative.
    z ^= z >> 16
    z *= _MIX1
    z ^= z >> 13
    z *= _MIX2
    z ^= z >> 16
    return z


def uniform(seed: int, start: int, end: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 draws (24 bits) for flat positions [start, end) of the stream `seed`, however split."""
    bits = _block_hash(seed, start, end, device)
    return (bits >> 7).to(torch.float32).mul_(1.0 / (1 << 24))


@functools.lru_cache(maxsize=1024)  # asked for every chunk; a float32 round trip through torch costs microseconds
def keep_threshold(probability: float) -> Optional[int]:
    """`bernoulli` keeps a position whose 31 hash bits are below this (None: every position)."""
    # u = (bits >> 7) / 2**24 < p (compared in float32, as torch does) <=> bits < ceil(p32 * 2**24) * 2**7
    p32 = float(torch.tensor(probability, dtype=torch.float32))
    cut = math.ceil(p32 * (1 << 24))
    return None if cut >= 1 << 24 else max(cut, 0) << 7


def bernoulli_draws(seed: int, probability: float, start: int, end: int) -> Optional[native.Draws]:
    """What the fused loops need to draw `bernoulli`'s mask for [start, end) themselves (None: keep all)."""
    threshold = keep_threshold(probability)
    return None if threshold is None else native.Draws(_block_seeds(seed, start, end), threshold, RNG_BLOCK)


def bernoulli(seed: int, probability: float, start: int, end: int, device: torch.device) -> Tensor:
    """``uniform(seed, start, end) < probability`` without the floats: one integer comparison per draw."""
    draws = bernoulli_draws(seed, probability, start, end)
    if draws is None:
        return torch.ones(end - start, dtype=torch.bool, device=device)
    if device.type == "cpu" and native.available():
        return native.bernoulli(start, end, draws)
    return _block_hash(seed, start, end, device) < draws.threshold
