"""What a kernel sees: chunks of one tensor's inputs, and the sums that must not depend on the chunking.

A method that needs whole-tensor statistics (TIES thresholds, DARE rescale sums, the SLERP angle)
declares `prepare(chunks, numel, **params) -> kernel`: it maps over `Chunks` for its statistics,
then returns the kernel that merges each chunk. `FusedKernel` adds a path from chunks as stored
(bfloat16) straight to the output dtype, for the fused C loops in `native`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, TypeVar

import torch
import torch.nn.functional as F

from . import native

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
