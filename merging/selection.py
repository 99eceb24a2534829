"""Exact order statistics and reproducible randomness for tensors seen in row chunks.

TIES keeps the k largest magnitudes of each task vector. Sorting (or `kthvalue`) needs the whole
tensor in memory and is slow on CPU; here the exact k-th value is found by radix selection: a
histogram of the top 16 bits of the float32 keys, then of the low 16 bits inside the one bin that
holds the k-th value. Two streaming passes, linear time, memory of two 65536-bin histograms.

Random masks (DARE, DELLA) draw from fixed blocks of the flattened tensor, each with its own seed,
so the same seed gives the same mask however the tensor is split into chunks.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

Tensor = torch.Tensor
_BINS = 1 << 16
RNG_BLOCK = 1 << 18


def _keys(magnitudes: Tensor) -> Tensor:
    """int32 keys that sort like the (non-negative) float32 values."""
    return magnitudes.float().contiguous().view(torch.int32)


class TopK:
    """The k largest of a stream of non-negative values: the exact threshold, and a chunked mask.

    Feed every chunk to `scan_high`, then every chunk to `scan_low`, then ask `mask` for each
    chunk in order: it keeps values above the threshold plus the first values equal to it (in
    stream order) until exactly k are kept, as `methods.top_k_mask` does on a whole tensor.
    """

    def __init__(self, k: int, numel: int, track_sums: bool = False):
        self.k, self.numel, self.track_sums = k, numel, track_sums
        self.all = k >= numel
        self.none = k <= 0
        self._high = torch.zeros(_BINS, dtype=torch.int64)
        self._high_sums = torch.zeros(_BINS, dtype=torch.float64)
        self._low = torch.zeros(_BINS, dtype=torch.int64)
        self._low_sums = torch.zeros(_BINS, dtype=torch.float64)
        self._bin: Optional[int] = None
        self.threshold_key: Optional[int] = None
        self.equal_to_keep = 0
        self.kept_sum = 0.0  # sum of the kept values (for L1 rescaling)
        self.total_sum = 0.0

    @property
    def trivial(self) -> bool:
        return self.all or self.none

    def scan_high(self, magnitudes: Tensor) -> None:
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
        keys = _keys(magnitudes).reshape(-1).cpu()
        # Values outside the bin land in an extra overflow bin: no compaction of the chunk needed.
        low = torch.where(keys >> 16 == self._bin, keys & 0xFFFF, _BINS)
        self._low += torch.bincount(low, minlength=_BINS + 1)[:_BINS]
        if self.track_sums:
            weights = magnitudes.reshape(-1).double().cpu()
            self._low_sums += torch.bincount(low, weights=weights, minlength=_BINS + 1)[:_BINS]

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
        threshold = torch.tensor([self.threshold_key], dtype=torch.int32).view(torch.float32).item()
        self.kept_sum = self._above_sum + float(self._low_sums[low_bin + 1:].sum()) + self.equal_to_keep * threshold
        self._equal_left = self.equal_to_keep

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


def stream_seed(seed: int, *parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def uniform(seed: int, start: int, end: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws for flat positions [start, end) of the stream `seed`, however split."""
    parts = []
    for block in range(start // RNG_BLOCK, (end - 1) // RNG_BLOCK + 1):
        generator = torch.Generator(device=device)
        generator.manual_seed(stream_seed(seed, block))
        values = torch.rand(RNG_BLOCK, generator=generator, device=device)
        origin = block * RNG_BLOCK
        parts.append(values[max(start, origin) - origin:min(end, origin + RNG_BLOCK) - origin])
    return parts[0] if len(parts) == 1 else torch.cat(parts)
