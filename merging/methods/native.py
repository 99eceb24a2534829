"""Fused CPU loops for the hottest element-wise work of merges, built on first use.

Eager torch runs every element-wise op as its own pass over memory, with its own temporary: a
TIES merge is ~30 such ops per output element, and on CPU each costs about as much as the whole
fused loop does per op-free element. `native.c` does the same work in one loop per chunk, with
the intermediates in registers (measured ~4x faster per element on a 2-core VM). The loops read
bfloat16 chunks as stored and write bfloat16 results, so a bfloat16 merge never builds float32
copies of its inputs; DARE's loops draw their masks as they go.

The loops mirror the torch code in `methods` and `selection` operation by operation, so results
are bit-identical with or without them (the tests compare both). The sums they take (DARE's L1
sums) are defined by an order of additions that torch reproduces (`methods.row_sums`). The
merge loops work eight float32 lanes at a time with GCC/Clang vector extensions.

They are compiled with the system C compiler (``$CC``, else ``cc``) into
``$MERGELINE_CACHE`` (default ``~/.cache/mergeline``) the first time a merge needs them, for this
CPU. Without a compiler, when building fails, or with ``MERGELINE_NATIVE=0``, everything runs in
torch: the loops are an accelerator, never a requirement.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
# -ffp-contract=off: fuse multiply-adds only where the source says so (`fmaf`), as torch does.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c11", "-shared", "-fPIC")
if platform.machine() in ("x86_64", "AMD64"):
    # gcc's tuning for some AVX2 CPUs (AMD Zen 1) asks for 128-bit vectors; 256-bit loops measured ~20% faster.
    FLAGS += ("-mprefer-vector-width=256",)

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_loaded = False

_P = ctypes.c_void_p
_SIGNATURES = {
    "ml_task_merge": [_P, _P, ctypes.c_int32, _P, _P, _P, ctypes.c_int64, ctypes.c_int64, _P, _P, _P, ctypes.c_int32,
                      ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_float, ctypes.c_float, _P,
                      ctypes.c_int32],
    "ml_bracket_scan": [_P, _P, ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_float, _P, ctypes.c_int64,
                        _P],
    "ml_bernoulli": [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _P, ctypes.c_int32, _P],
    "ml_l1_sums": [_P, _P, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _P,
                   ctypes.c_int32, _P, _P, _P],
    "ml_product_sums": [_P, _P, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, _P, _P, _P],
    "ml_linear_bf16": [_P, _P, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, _P],
    "ml_axpby_bf16": [_P, _P, ctypes.c_float, ctypes.c_float, ctypes.c_int64, _P],
}


def _cache_dir() -> Path:
    configured = os.environ.get("MERGELINE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mergeline"


def _cpu_signature() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def _load() -> Optional[ctypes.CDLL]:
    global _library, _loaded
    if _loaded:  # every chunk asks, from every worker: no lock once settled
        return _library
    with _lock:
        if _loaded:
            return _library
        _loaded = True
        if os.environ.get("MERGELINE_NATIVE", "1") == "0":
            return None
        try:
            library = ctypes.CDLL(str(_build()))
            for name, argtypes in _SIGNATURES.items():
                getattr(library, name).argtypes = argtypes
                getattr(library, name).restype = None
            _library = library
        except (OSError, subprocess.SubprocessError) as error:
            logger.info("fused CPU loops unavailable, merging with torch ops only: %s", error)
        return _library


_switched_off = 0  # merges running now with MergeOptions(native=False)


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Within the block, the loops run only if `on` (and they can). Process-wide: a merge's worker
    threads must see it too; merges run one at a time in the app and the CLI."""
    global _switched_off
    if on:
        yield
        return
    with _lock:
        _switched_off += 1
    try:
        yield
    finally:
        with _lock:
            _switched_off -= 1


def available() -> bool:
    """Whether the fused loops are built, loaded (building them on the first call) and switched on."""
    return not _switched_off and _load() is not None


def fits(*tensors: Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the loops can take these tensors: contiguous `dtype` in CPU memory."""
    return all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors) and available()


_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # native.c's `bf16` flag


def takes(*tensors: Tensor) -> bool:
    """Whether the loops that read float32 or bfloat16 can take these tensors: contiguous, in CPU
    memory, all float32 or all bfloat16."""
    return bool(tensors) and tensors[0].dtype in _KINDS and fits(*tensors, dtype=tensors[0].dtype)


# native.c's LANES and SEGMENT: the order in which `l1_sums` adds (methods.row_sums defines it).
SUM_LANES, SUM_SEGMENT = 16, 256


def row_shape(tensor: Tensor) -> tuple[int, int]:
    """(rows, columns) as `methods.row_sums` sees a tensor: its first dimension, and the rest."""
    rows = tensor.shape[0] if tensor.dim() else 1
    return rows, tensor.numel() // max(1, rows)


def widened(tensor: Tensor) -> Tensor:
    """A chunk handed over for the loops (bfloat16 as stored) in float32, for torch ops where they do not run."""
    return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def _pointers(tensors: Sequence[Optional[Tensor]]) -> ctypes.Array:
    return (_P * len(tensors))(*[t.data_ptr() if t is not None else None for t in tensors])


def _floats(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)


def _int64s(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


@dataclass(frozen=True)
class Draws:
    """A random keep-mask as `selection.bernoulli` draws it: the seeds of the RNG blocks (of
    `block_size` positions) that a chunk spans, from its first, and the hash threshold."""

    block_seeds: Sequence[int]
    threshold: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"RNG blocks of {self.block_size} positions: the loops need a power of two")


Mask = Union[None, Draws, Tensor]  # no mask, one to draw, or one `l1_sums` packed (uint8, 8 positions a byte)


def task_merge(base: Tensor, models: Sequence[Tensor], masks: Sequence[Mask], bounds: Sequence[float],
               factors: Sequence[float], weights: Sequence[float], *, position: int, consensus: bool,
               normalize: bool, divisor: float, scale: float, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """`methods.combine_deltas` over deltas `(model - base) * mask`, hardshrunk at `bounds`, times
    `factors`, for the chunk at flat `position`, in `out_dtype` (float32 or bfloat16).

    A bound of -inf keeps every entry, +inf none. `divisor` normalizes a sum without sign
    election. The inputs must be `taken`.
    """
    out = torch.empty(base.shape, dtype=out_dtype)
    draws = [m if isinstance(m, Draws) else None for m in masks]
    packed = [m if isinstance(m, Tensor) else None for m in masks]
    seeds = [_int64s(d.block_seeds) if d is not None else None for d in draws]
    seed_pointers = (_P * len(seeds))(*[ctypes.addressof(a) if a is not None else None for a in seeds])
    thresholds = (ctypes.c_int32 * len(draws))(*[d.threshold if d is not None else 0 for d in draws])
    block_size = next((d.block_size for d in draws if d is not None), 1 << 62)  # no draws: one RNG block
    _load().ml_task_merge(
        base.data_ptr(), _pointers(models), _KINDS[base.dtype], _pointers(packed), seed_pointers, thresholds, position,
        block_size, _floats(bounds), _floats(factors), _floats(weights), len(models), base.numel(), int(consensus),
        int(normalize), divisor, scale, out.data_ptr(), _KINDS[out_dtype])
    return out


def bracket_scan(values: Tensor, base: Optional[Tensor], low: float, high: float,
                 capacity: int) -> tuple[int, int, Optional[Tensor]]:
    """Over v = values (or |values - base|), `taken` tensors: (count above `high`, count in [low, high],
    those values in stream order, or None past `capacity`)."""
    inside = torch.empty(min(capacity, values.numel()), dtype=torch.float32)
    counts = (ctypes.c_int64 * 2)()
    _load().ml_bracket_scan(values.data_ptr(), base.data_ptr() if base is not None else None, _KINDS[values.dtype],
                            values.numel(), low, high, inside.data_ptr(), inside.numel(), counts)
    above, found = counts[0], counts[1]
    return above, found, (inside[:found].clone() if found <= capacity else None)


def bernoulli(start: int, end: int, draws: Draws) -> Tensor:
    """`selection.bernoulli`'s mask for flat positions [start, end), as `draws` draws it."""
    keep = torch.empty(end - start, dtype=torch.bool)
    _load().ml_bernoulli(start, end - start, draws.block_size, _int64s(draws.block_seeds), draws.threshold,
                         keep.data_ptr())
    return keep


def l1_sums(values: Tensor, base: Tensor, draws: Draws, position: int,
            pack: bool = False) -> tuple[list[float], list[float], Optional[Tensor]]:
    """`methods.row_sums` of |values - base| and of |values - base| * the mask `draws` draws, for
    the `taken` chunk at flat `position`, without building either; with `pack`, also the mask,
    packed 8 positions a byte, for `task_merge` (None where rows are not a multiple of 8 long)."""
    rows, cols = row_shape(values)
    packed = torch.empty((values.numel() + 7) // 8, dtype=torch.uint8) if pack and cols % 8 == 0 else None
    totals, kept = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
    _load().ml_l1_sums(values.data_ptr(), base.data_ptr(), _KINDS[values.dtype], rows, cols, position,
                       draws.block_size, _int64s(draws.block_seeds), draws.threshold, totals.data_ptr(),
                       kept.data_ptr(), packed.data_ptr() if packed is not None else None)
    return totals.tolist(), kept.tolist(), packed


def product_sums(a: Tensor, b: Tensor) -> tuple[list[float], list[float], list[float]]:
    """`methods.row_sums` of a * a, b * b and a * b, for `taken` chunks, without building them."""
    rows, cols = row_shape(a)
    sums = torch.empty(3, rows, dtype=torch.float64)
    _load().ml_product_sums(a.data_ptr(), b.data_ptr(), _KINDS[a.dtype], rows, cols,
                            *(row.data_ptr() for row in sums))
    return sums[0].tolist(), sums[1].tolist(), sums[2].tolist()


def linear_bf16(models: Sequence[Tensor], weights: Sequence[float], *, normalize: bool, divisor: float) -> Tensor:
    """`methods.linear` of bfloat16 tensors (that `fit` as bfloat16), rounded to bfloat16."""
    out = torch.empty_like(models[0])
    _load().ml_linear_bf16(_pointers(models), _floats(weights), len(models), out.numel(), int(normalize), divisor,
                           out.data_ptr())
    return out


def axpby_bf16(x: Tensor, y: Tensor, a: float, b: float) -> Tensor:
    """``torch.mul(x, a).add_(y, alpha=b)`` of bfloat16 tensors (that `fit` as bfloat16), rounded to bfloat16."""
    out = torch.empty_like(x)
    _load().ml_axpby_bf16(x.data_ptr(), y.data_ptr(), a, b, out.numel(), out.data_ptr())
    return out
