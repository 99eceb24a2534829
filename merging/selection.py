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

import hashlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
_BINS = 1 << 16
RNG_BLOCK = 1 << 18
GUESS_SAMPLE = 1 << 16  # sample values used to place the bracket
# Bracket half-width in sample ranks: four standard deviations of a sampled quantile plus 1% of
# the sample, for samples of rows that are not independent draws.
_SPREAD_SIGMAS, _SPREAD_SHARE = 4.0, 0.01


def _keys(magnitudes: Tensor) -> Tensor:
    """int32 keys that sort like the (non-negative) float32 values."""
    return magnitudes.float().contiguous().view(torch.int32)


def _float(key: int) -> float:
    return torch.tensor([key], dtype=torch.int32).view(torch.float32).item()


class TopK:
    """The k largest of a stream of non-negative values: the exact threshold, and a chunked mask.

    Optionally `guess` from a sample; then, until `done`, `scan` every chunk in stream order and
    call `end_pass`. Afterwards `mask` or `prune` each chunk in order: they keep the values above
    the threshold plus the first values equal to it (in stream order) until exactly k are kept,
    as `methods.top_k_mask` does on a whole tensor.
    """

    def __init__(self, k: int, numel: int, track_sums: bool = False):
        self.k, self.numel, self.track_sums = k, numel, track_sums
        self.all = k >= numel
        self.none = k <= 0
        self.stage = "done" if self.trivial else "high"
        self.passes = 0
        self._high = self._high_sums = self._low = self._low_sums = None
        self._bin: Optional[int] = None
        self.threshold_key: Optional[int] = None
        self.equal_to_keep = 0
        self._equal_left = 0
        self.kept_sum = 0.0  # sum of the kept values (for L1 rescaling)
        self.total_sum = 0.0

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
        self._above = 0
        self._at_least = 0
        self._above_sum = 0.0
        self._inside: Optional[list[Tensor]] = []
        self._inside_count = 0
        self._inside_limit = max(1 << 22, self.numel // 8)  # past this, the radix passes are cheaper
        self.stage = "bracket"

    def scan(self, magnitudes: Tensor) -> None:
        magnitudes = magnitudes.float().reshape(-1)
        if self.stage == "bracket":
            self._scan_bracket(magnitudes)
        elif self.stage == "high":
            self.scan_high(magnitudes)
        elif self.stage == "low":
            self.scan_low(magnitudes)

    def end_pass(self) -> None:
        self.passes += 1
        if self.stage == "bracket":
            self.stage = "done" if self._settle_bracket() else "high"
        elif self.stage == "high":
            self.finish_high()
            self.stage = "low"
        elif self.stage == "low":
            self.finish_low()
            self.stage = "done"

    # -- one pass with a bracket --------------------------------------------------------------

    def _scan_bracket(self, magnitudes: Tensor) -> None:
        above = magnitudes > self._hi
        self._above += int(torch.count_nonzero(above))
        if self.track_sums:
            self.total_sum += float(magnitudes.sum(dtype=torch.float64))
            self._above_sum += float(F.threshold(magnitudes, self._hi, 0.0).sum(dtype=torch.float64))
        if self._lo == self._hi:  # everything inside equals the bound: counting is enough
            self._at_least += int(torch.count_nonzero(magnitudes >= self._lo))
            return
        if self._inside is None:
            return
        inside = magnitudes[(magnitudes >= self._lo).logical_and_(~above)]
        self._inside_count += inside.numel()
        if self._inside_count > self._inside_limit:
            self._inside = None  # the guess was poor: give up collecting, the radix passes follow
        else:
            self._inside.append(inside.cpu())

    def _settle_bracket(self) -> bool:
        needed = self.k - self._above
        if self._lo == self._hi:
            if not 0 < needed <= self._at_least - self._above:
                return False
            self.threshold_key = int(_keys(torch.tensor([self._lo])).item())
            self.equal_to_keep = needed
            self.kept_sum = self._above_sum + needed * self._lo
        else:
            if self._inside is None or not 0 < needed <= self._inside_count:
                self._inside = None
                return False
            inside = torch.cat(self._inside)
            self._inside = None
            if needed == inside.numel():  # all of them: the threshold is the smallest
                smallest = inside.min()
                self.threshold_key = int(_keys(smallest.reshape(1)).item())
                self.equal_to_keep = int(torch.count_nonzero(inside == smallest))
                self.kept_sum = self._above_sum + float(inside.sum(dtype=torch.float64))
            else:
                among = TopK(needed, inside.numel(), track_sums=self.track_sums)
                while not among.done:  # radix passes over the few values inside the bracket
                    among.scan(inside)
                    among.end_pass()
                self.threshold_key, self.equal_to_keep = among.threshold_key, among.equal_to_keep
                self.kept_sum = self._above_sum + among.kept_sum
        self._ready()
        return True

    def _ready(self) -> None:
        self._equal_left = self.equal_to_keep
        self._just_below = _float(self.threshold_key - 1) if self.threshold_key > 0 else 0.0

    # -- radix selection ----------------------------------------------------------------------

    def scan_high(self, magnitudes: Tensor) -> None:
        if self._high is None:
            self._high = torch.zeros(_BINS, dtype=torch.int64)
            self._high_sums = torch.zeros(_BINS, dtype=torch.float64)
        high = (_keys(magnitudes).reshape(-1) >> 16).cpu()
        self._high += torch.bincount(high, minlength=_BINS)
        if self.track_sums:
            self._high_sums += torch.bincount(high, weights=magnitudes.reshape(-1).double().cpu(), minlength=_BINS)

    def finish_high(self) -> None:
        self.total_sum = float(self._high_sums.sum())
        if self.trivial:
            self.kept_sum = self.total_sum if self.all else 0.0
            return
        from_top = torch.flip(self._high, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, self.k))  # first bin (from the top) reaching k
        self._bin = _BINS - 1 - index
        self._above = int(from_top[index - 1]) if index else 0
        self._above_sum = float(self._high_sums[self._bin + 1:].sum())

    def scan_low(self, magnitudes: Tensor) -> None:
        if self.trivial:
            return
        if self._low is None:
            self._low = torch.zeros(_BINS, dtype=torch.int64)
            self._low_sums = torch.zeros(_BINS, dtype=torch.float64)
        keys = _keys(magnitudes).reshape(-1).cpu()
        # Values outside the bin land in two overflow bins (below, above): arithmetic, no
        # compaction and no `where`, which is slow on CPU.
        low = (keys - (self._bin << 16)).clamp_(-1, _BINS).add_(1)
        self._low += torch.bincount(low, minlength=_BINS + 2)[1:_BINS + 1]
        if self.track_sums:
            weights = magnitudes.reshape(-1).double().cpu()
            self._low_sums += torch.bincount(low, weights=weights, minlength=_BINS + 2)[1:_BINS + 1]

    def finish_low(self) -> None:
        if self.trivial:
            return
        needed = self.k - self._above
        from_top = torch.flip(self._low, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, needed))
        low_bin = _BINS - 1 - index
        above_in_bin = int(from_top[index - 1]) if index else 0
        self.threshold_key = (self._bin << 16) | low_bin
        self.equal_to_keep = needed - above_in_bin
        self.kept_sum = (self._above_sum + float(self._low_sums[low_bin + 1:].sum())
                         + self.equal_to_keep * self.threshold)
        self._ready()

    # -- applying the threshold ---------------------------------------------------------------

    def mask(self, magnitudes: Tensor) -> Tensor:
        """The keep-mask of the next chunk (chunks must come in stream order)."""
        if self.all:
            return torch.ones_like(magnitudes, dtype=torch.bool)
        if self.none:
            return torch.zeros_like(magnitudes, dtype=torch.bool)
        keys = _keys(magnitudes)
        if self._equal_left <= 0:
            return keys > self.threshold_key
        keep = keys >= self.threshold_key
        equal = keys == self.threshold_key
        count = int(equal.sum())
        if count <= self._equal_left:  # every tie in this chunk still fits
            self._equal_left -= count
            return keep
        # keep only the first ties, in stream order, as the whole-tensor mask does
        order = equal.reshape(-1).cumsum(0).reshape(equal.shape)
        keep &= ~equal | (order <= self._equal_left)
        self._equal_left = 0
        return keep

    def prune(self, values: Tensor) -> Tensor:
        """The next chunk of `values` with every entry outside the top k (by magnitude) zeroed.

        Same choice as `mask`, without boolean masks on the common path: boolean tensors and
        `where` cost several times more than arithmetic on CPU, and this runs on every element.
        """
        if self.all:
            return values
        if self.none:
            return values.zero_()
        if values.dtype != torch.float32:  # the keys are float32: compare as `mask` does
            return values * self.mask(values.abs())
        threshold = self.threshold
        above = F.hardshrink(values, threshold)  # |v| > threshold
        # Ties at a zero threshold are zeros: keeping or dropping them changes nothing.
        if self._equal_left <= 0 or threshold == 0:
            return above
        at_least = F.hardshrink(values, self._just_below)  # |v| >= threshold
        count = int(torch.count_nonzero(at_least)) - int(torch.count_nonzero(above))
        if count <= self._equal_left:
            self._equal_left -= count
            return at_least
        return values * self.mask(values.abs())


def stream_seed(seed: int, *parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# MurmurHash3's 32-bit finalizer constants, as signed int32 (torch has no uint32 arithmetic).
_MIX1, _MIX2 = _int32(0x85EBCA6B), _int32(0xC2B2AE35)


_POSITIONS: dict[torch.device, Tensor] = {}


def _block_uniform(block_seed: int, first: int, last: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws for positions [first, last) of one block: a hash of the position.

    A counter-based hash instead of `torch.rand`: CPU generators are serial and cost several
    times more per draw, and any slice of a block can be drawn without drawing the rest.
    Integer arithmetic wraps identically on every device, so CPU and CUDA draw the same values.
    """
    positions = _POSITIONS.get(device)
    if positions is None:
        positions = _POSITIONS[device] = torch.arange(RNG_BLOCK, dtype=torch.int32, device=device)
    z = positions[first:last] * (_int32(block_seed) | 1)  # a seeded odd multiplier and offset
    z += _int32(block_seed >> 32)
    # MurmurHash3's finalizer with arithmetic shifts (torch has no unsigned int32): each
    # xor-shift clears bit 31, so the draw takes bits 7-30.
    z ^= z >> 16
    z *= _MIX1
    z ^= z >> 13
    z *= _MIX2
    z ^= z >> 16
    return ((z >> 7) & 0xFFFFFF).to(torch.float32).mul_(1.0 / (1 << 24))


def uniform(seed: int, start: int, end: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws for flat positions [start, end) of the stream `seed`, however split."""
    parts = []
    for block in range(start // RNG_BLOCK, (end - 1) // RNG_BLOCK + 1):
        origin = block * RNG_BLOCK
        parts.append(_block_uniform(stream_seed(seed, block), max(start, origin) - origin,
                                    min(end, origin + RNG_BLOCK) - origin, device))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
