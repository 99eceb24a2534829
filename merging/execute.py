"""Stage 3: stream the plan — read each output tensor's inputs, merge, write — into a fresh checkpoint.

Elementwise methods work through tensors in row chunks: a pool of worker threads each takes a
whole chunk (read, convert, merge, convert back, write to its place in the output shard), with one
torch thread apiece, so chunks run side by side and each stays in its core's cache. Whole-tensor
passes (TIES thresholds, SLERP angles, DARE rescale sums) map over the chunks on the same pool,
and each tensor's merge jobs queue behind the previous tensor's, so passes and merges overlap.
Memory is bounded by the chunks in flight plus the inputs one tensor keeps
between its passes. Methods that need whole tensors run one tensor at a time with every torch
thread. On a GPU the chunks are larger, inputs cross the bus as stored and are widened there,
and a tensor's inputs held between passes stay in GPU memory. The checkpoint is built in a
temporary directory beside the output and renamed into place only when everything, side files
included, has been written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .cleanup import remove_orphans
from .errors import MergeError, disk_full
from .methods import native
from .methods.chunks import FusedKernel
from .methods.selection import stream_seed
from .plan import MergePlan, PlannedTensor, torch_dtype
from .safetensors_io import ShardedWriter, TensorHeader, TensorReader
from .side_files import write_side_files
from .workers import HeapReuse, Workers, default_workers

log = logging.getLogger("mergeline")

ProgressFn = Callable[[int, int, str], None]  # (tensors done, total, current tensor name)
# Row chunks of 1M elements: the fused loops work through a chunk in blocks that stay in L1, so a
# chunk's size only sets how often Python steps in (measured: 1-layer DARE 7.8 s with 256K-element
# chunks, 6.3 s with 1M); torch ops on float32 copies still find 4 MB per input in cache.
CHUNK_ELEMENTS = 1 << 20
# On a GPU a chunk pays a transfer and a dozen kernel launches; 16 MB float32 per input amortizes them.
CUDA_CHUNK_ELEMENTS = 1 << 22
# Methods with whole-tensor passes keep a tensor's inputs (as stored) between passes when they
# take at most this much, so each byte is read once; larger tensors are read again instead.
# A GPU keeps them in its own memory, so they also cross the bus once.
KEEP_INPUT_BYTES = 1 << 29
CUDA_KEEP_INPUT_BYTES = 1 << 32


# Verbatim copies go file to file in pieces this large: the pieces of one output file queue on its
# inode anyway, so small ones only add calls.
COPY_BYTES = 1 << 26

# Inputs held between passes come in slabs of whole chunks (a chunk is then a view of one slab).
# On CPU a slab maps the file's pages (safetensors_io), so its size only sets how many maps a held
# tensor takes; a GPU receives its inputs in slabs that the workers copy side by side.
SLAB_BYTES = 1 << 24


@dataclass(frozen=True)
class MergeOptions:
    """How a merge runs; none of these change its result."""

    device: str = "cpu"
    seed: int = 0
    out_shard_bytes: int = 5 * 10**9
    workers: Optional[int] = None  # chunk worker threads; None: one per usable CPU (at most 8); 0: none
    chunk_elements: Optional[int] = None  # None: CHUNK_ELEMENTS, or CUDA_CHUNK_ELEMENTS on a GPU
    slab_bytes: int = SLAB_BYTES
    native: bool = True  # the fused C loops where they apply (`methods.native`); False: torch ops only


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise MergeError(f"--device: unknown device {name!r}; use cpu, cuda or auto")
    return torch.device(name)


class _Merger:
    """Reads, converts and merges one planned tensor at a time, in row chunks where the method allows."""

    def __init__(self, plan: MergePlan, options: MergeOptions):
        self.plan = plan
        self.options = options
        self.device = resolve_device(options.device)
        count = default_workers() if options.workers is None else options.workers
        self.workers = Workers(count if plan.method.chunkable else 0)
        self.readers = {}
        self._readers_lock = threading.Lock()

    def reader(self, model: int):
        with self._readers_lock:
            if model not in self.readers:
                self.readers[model] = self.plan.models[model].reader()
            return self.readers[model]

    def read_inputs(self, tensor: PlannedTensor, rows: Optional[tuple[int, int]] = None,
                    held: Optional["_HeldInputs"] = None) -> list[torch.Tensor]:
        if held is not None:
            return held.rows(rows)
        return [self.reader(model).read(name, rows) for model, name in tensor.inputs]

    def hold(self, tensor: PlannedTensor, ranges: list[Optional[tuple[int, int]]]) -> Optional["_HeldInputs"]:
        """`tensor`'s inputs read once, for methods with whole-tensor passes, when they take at most
        KEEP_INPUT_BYTES (None otherwise: larger ones are read again on every pass)."""
        on_gpu = self.device.type == "cuda"
        if self.plan.input_bytes(tensor) > (CUDA_KEEP_INPUT_BYTES if on_gpu else KEEP_INPUT_BYTES):
            return None
        headers = [self.plan.models[model].tensors[name] for model, name in tensor.inputs]
        if on_gpu:
            return _HeldInputs([[t] for t in self._copy_to_device(tensor, headers)], None)
        if ranges[0] is None:
            return _HeldInputs([[t] for t in self.read_inputs(tensor)], None)
        # In slabs of whole chunks (a chunk is then a view of one slab).
        step = _slab_rows(max(h.nbytes // h.shape[0] for h in headers), self.options.slab_bytes,
                          multiple=ranges[0][1] - ranges[0][0])
        return _HeldInputs([[self.reader(model).read(name, rows) for rows in _row_ranges(h.shape[0], step)]
                            for (model, name), h in zip(tensor.inputs, headers)], step)

    def _copy_to_device(self, tensor: PlannedTensor, headers: list[TensorHeader]) -> list[torch.Tensor]:
        """`tensor`'s inputs on the GPU, as stored, copied in slabs by the workers side by side."""
        held = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in headers]

        def copy(piece: tuple[int, tuple[int, int]]) -> None:
            k, rows = piece
            model, name = tensor.inputs[k]
            held[k][rows[0]:rows[1]].copy_(self.reader(model).read(name, rows))

        pieces = []
        for k, h in enumerate(headers):
            if not h.shape or not h.shape[0]:
                held[k].copy_(self.reader(tensor.inputs[k][0]).read(tensor.inputs[k][1]))
            else:
                step = _slab_rows(h.nbytes // h.shape[0], self.options.slab_bytes)
                pieces += [(k, rows) for rows in _row_ranges(h.shape[0], step)]
        for _ in self.workers.map(copy, pieces):
            pass
        return held

    def stored_copy(self, tensor: PlannedTensor) -> Optional[tuple[int, int]]:
        """Where the bytes of `tensor`'s output are stored, when the merge would return its one
        input unchanged (same dtype, no cast on load, an untouched safetensors tensor)."""
        method, config_dtype = self.plan.method, torch_dtype(self.plan.config.dtype)
        if len(tensor.inputs) != 1 or tensor.rows is not None or method.copies is None \
                or not method.copies(tensor.params):
            return None
        model, name = tensor.inputs[0]
        header = self.plan.models[model].tensors[name]
        if header.dtype != tensor.out.dtype or (config_dtype is not None and config_dtype != header.dtype):
            return None
        reader = self.reader(model)
        return reader.stored(name) if isinstance(reader, TensorReader) else None

    def row_ranges(self, tensor: PlannedTensor) -> list[Optional[tuple[int, int]]]:
        default = CUDA_CHUNK_ELEMENTS if self.device.type == "cuda" else CHUNK_ELEMENTS
        return chunk_ranges(self.plan, tensor, self.options.chunk_elements or default)

    def loaded(self, tensor: PlannedTensor, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.dtype]:
        """`tensor`'s inputs as mergekit loads them (cast to the config's dtype) on the compute
        device, and the dtype to compute in: float32, or float64 when anything asks for it."""
        config_dtype = torch_dtype(self.plan.config.dtype)
        inputs = [t.to(config_dtype) if config_dtype else t for t in inputs]
        if tensor.rows is not None and self.plan.vocabulary is not None:
            refs = [self.plan.models[model].ref for model, _ in tensor.inputs]
            aligned = self.plan.vocabulary.align(dict(zip(refs, inputs)))
            inputs = [aligned[ref] for ref in refs]
        elif tensor.rows is not None:  # vocabularies of different sizes, truncated to the common rows
            inputs = [t[:tensor.rows] for t in inputs]
        wide = config_dtype == torch.float64 or tensor.out.dtype == torch.float64 or any(
            t.dtype == torch.float64 for t in inputs)
        return [t.to(self.device) for t in inputs], torch.float64 if wide else torch.float32

    def to_compute(self, tensor: PlannedTensor, inputs: list[torch.Tensor], compute: Optional[torch.dtype] = None,
                   as_loaded: bool = False):
        """(base, others) in the compute dtype on the compute device, as the method sees them; `inputs`
        already `loaded` when `compute` is given. Widened after the move: a GPU receives the stored
        bytes and widens them itself. With `as_loaded`, bfloat16 stays as stored for float32
        computations (see `methods.Chunks.map`)."""
        if compute is None:
            inputs, compute = self.loaded(tensor, inputs)
        stored = as_loaded and compute == torch.float32
        return _split(tensor, [t if stored and t.dtype == torch.bfloat16 else t.to(compute) for t in inputs])

    def kernel(self, tensor: PlannedTensor, ranges: list[Optional[tuple[int, int]]]):
        """(the function that merges each chunk of `tensor`, the inputs its passes held or None)."""
        method = self.plan.method
        params = dict(tensor.params)
        if method.randomized:
            params["seed"] = stream_seed(self.options.seed, tensor.name)
        if method.prepare is None:
            merge = lambda base, others, offset: method.fn(base, others, **params)  # noqa: E731
            if method.narrow is not None:
                merge = FusedKernel(merge, lambda base, others, offset, dtype: method.narrow(base, others, dtype,
                                                                                              **params))
            return merge, None
        chunks = _TensorChunks(self, tensor, ranges, self.hold(tensor, ranges))
        return method.prepare(chunks, tensor.out.numel, **params), chunks.held

    def merge_chunk(self, tensor: PlannedTensor, rows: Optional[tuple[int, int]], kernel,
                    held: Optional["_HeldInputs"]) -> torch.Tensor:
        """One chunk of the output, in the output dtype on the CPU."""
        if tensor.computed:
            if self.plan.computing is not None:
                self.plan.computing.result()  # raises what the computation raised
            value = self.plan.computed[tensor.name]
            return (value if rows is None else value[rows[0]:rows[1]]).to("cpu", tensor.out.dtype)
        inputs = self.read_inputs(tensor, rows, held)
        if not tensor.floating:
            return inputs[0]  # integer buffers are copied from the first input, as mergekit does
        inputs, compute = self.loaded(tensor, inputs)
        if isinstance(kernel, FusedKernel):
            result = kernel.narrow(*_split(tensor, inputs), _flat_offset(tensor, rows), tensor.out.dtype)
            if result is not None:
                _check_finite(tensor, result)
                return result.to("cpu")
        base, others = self.to_compute(tensor, inputs, compute)
        del inputs
        result = kernel(base, others, _flat_offset(tensor, rows))
        _check_finite(tensor, result)
        return result.to(tensor.out.dtype).to("cpu")  # narrowed where it was computed: fewer bytes to move

    def close(self) -> None:
        self.workers.close()
        for reader in self.readers.values():
            reader.close()


class _TensorChunks:
    """`methods.Chunks` for one planned tensor: chunks read (or sliced from held inputs) on the workers."""

    SAMPLE_ROWS = 64  # at least this many rows, else one in 64

    def __init__(self, merger: _Merger, tensor: PlannedTensor, ranges: list[Optional[tuple[int, int]]],
                 held: Optional["_HeldInputs"]):
        self.merger, self.tensor, self.ranges, self.held = merger, tensor, ranges, held
        self.device = merger.device

    def read(self, rows: Optional[tuple[int, int]] = None) -> list[torch.Tensor]:
        return self.merger.read_inputs(self.tensor, rows, self.held)

    def map(self, fn, *, as_loaded: bool = False):
        merger, tensor = self.merger, self.tensor

        def job(rows: Optional[tuple[int, int]]):
            base, others = merger.to_compute(tensor, self.read(rows), as_loaded=as_loaded)
            return fn(base, others, _flat_offset(tensor, rows))

        return merger.workers.map(job, self.ranges)

    def sample(self):
        if self.ranges == [None]:  # one chunk: the whole tensor is the sample
            return self.merger.to_compute(self.tensor, self.read())
        total = self.tensor.out.shape[0]
        count = min(total, max(self.SAMPLE_ROWS, total // 64))
        rows = sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})
        parts = [self.merger.to_compute(self.tensor, self.read((r, r + 1))) for r in rows]
        base = torch.cat([b for b, _ in parts]) if parts[0][0] is not None else None
        others = [torch.cat([o[i] for _, o in parts]) for i in range(len(parts[0][1]))]
        return base, others


class _HeldInputs:
    """A tensor's inputs kept between passes, each in slabs of `slab_rows` rows (None: one slab)."""

    def __init__(self, slabs: list[list[torch.Tensor]], slab_rows: Optional[int]):
        self.slabs, self.slab_rows = slabs, slab_rows

    def rows(self, rows: Optional[tuple[int, int]]) -> list[torch.Tensor]:
        if rows is None or self.slab_rows is None:
            whole = [s[0] if len(s) == 1 else torch.cat(s) for s in self.slabs]
            return whole if rows is None else [t[rows[0]:rows[1]] for t in whole]
        index, (start, end) = rows[0] // self.slab_rows, rows
        origin = index * self.slab_rows
        if end > origin + self.slab_rows:  # across slabs: not a chunk, so rare and small
            return [torch.cat(s)[start:end] for s in self.slabs]
        return [s[index][start - origin:end - origin] for s in self.slabs]


def _slab_rows(row_bytes: int, slab_bytes: int, multiple: int = 1) -> int:
    """Rows per slab: a multiple of `multiple` rows, at most `slab_bytes` of them where one multiple fits."""
    return multiple * max(1, slab_bytes // max(1, multiple * row_bytes))


def _row_ranges(rows: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def chunk_ranges(plan: MergePlan, tensor: PlannedTensor, chunk: int) -> list[Optional[tuple[int, int]]]:
    """The row chunks `tensor` is merged in, of about `chunk` elements ([None]: the whole tensor at once)."""
    shape = tensor.out.shape
    if (not plan.method.chunkable or tensor.whole or tensor.rows is not None or not shape
            or tensor.out.numel <= chunk or not tensor.floating):
        return [None]
    return _row_ranges(shape[0], max(1, chunk // tensor.out.row_elements))


def copy_ranges(tensor: PlannedTensor) -> list[Optional[tuple[int, int]]]:
    """Row ranges a verbatim copy is split into: large, since the kernel copies file to file."""
    if not tensor.out.shape or tensor.out.nbytes <= COPY_BYTES:
        return [None]
    row_bytes = tensor.out.row_elements * tensor.out.dtype.itemsize
    return _row_ranges(tensor.out.shape[0], max(1, COPY_BYTES // row_bytes))


def peak_memory(plan: MergePlan, workers: Optional[int] = None) -> int:
    """Bytes of CPU memory a merge of `plan` on the CPU holds at once, by how `execute_plan` runs it.

    A tensor merged whole holds its inputs, their float32 copies and scratch. A chunked one holds
    the chunks in flight on every worker (inputs as stored, their copies, scratch and result),
    plus the inputs its passes keep while the next tensor's passes keep theirs.
    """
    threads = max(1, default_workers() if workers is None else workers)
    ranges = [chunk_ranges(plan, tensor, CHUNK_ELEMENTS) for tensor in plan.tensors]
    reads = [plan.input_bytes(tensor) for tensor in plan.tensors]
    kept = [read if plan.method.prepare is not None and r != [None] and read <= KEEP_INPUT_BYTES else 0
            for r, read in zip(ranges, reads)] + [0]
    worst = 0
    for k, tensor in enumerate(plan.tensors):
        inputs, read, numel = len(tensor.inputs), reads[k], max(1, tensor.out.numel)
        if ranges[k] == [None]:
            worst = max(worst, 2 * read + numel * 4 * (2 * inputs + 2) + tensor.out.nbytes)
            continue
        elements = (ranges[k][0][1] - ranges[k][0][0]) * tensor.out.row_elements
        in_flight = 2 * threads * (read * elements // numel + elements * 4 * (inputs + 3))
        worst = max(worst, in_flight + kept[k] + kept[k + 1])  # this tensor's passes, and the next's
    worst = max(worst, plan.side_peak_bytes)
    return worst + 450 * 2**20  # the Python process, torch, the write buffers and the heap's slack (measured)


def _split(tensor: PlannedTensor, inputs: list[torch.Tensor]) -> tuple[Optional[torch.Tensor], list[torch.Tensor]]:
    """(the base, the other inputs) of `tensor`'s inputs, in order."""
    base = inputs[tensor.base] if tensor.base is not None else None
    return base, [t for k, t in enumerate(inputs) if k != tensor.base]


def _flat_offset(tensor: PlannedTensor, rows: Optional[tuple[int, int]]) -> int:
    """Position of a row chunk's first element in the flattened tensor."""
    return rows[0] * tensor.out.row_elements if rows else 0


def check_output_dir(output_dir: Path) -> None:
    """Refuse an OUTPUT_DIR that exists, or whose parent is not a directory we can write into."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise MergeError(f"OUTPUT_DIR: {output_dir} already exists; choose a new directory or remove it")
    parent = next((p for p in output_dir.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise MergeError(f"OUTPUT_DIR: {parent} is a file, not a directory; choose another OUTPUT_DIR")
    try:  # permissions and read-only mounts, as they apply to us (root included): try it
        os.rmdir(tempfile.mkdtemp(prefix=".mergeline-probe-", dir=parent))
    except OSError as exc:
        raise _cannot_create(output_dir, exc) from None


def _cannot_create(output_dir: Path, exc: OSError) -> MergeError:
    reason = exc.strerror.lower() if exc.strerror else type(exc).__name__
    return MergeError(f"OUTPUT_DIR: cannot create {output_dir} ({reason}); choose a directory you can write to")


# The checkpoint is built in `.<name>.partial-<pid>-<random>` beside OUTPUT_DIR; the pid tells a
# later run whether the process that left one behind (killed with SIGKILL, say) is gone.
_STAGING = re.compile(r"^\..+\.partial-(\d+)-\w+$")


def _staging_dir(output_dir: Path) -> Path:
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(output_dir.parent, _STAGING)
        return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-{os.getpid()}-", dir=output_dir.parent))
    except OSError as exc:
        raise _cannot_create(output_dir, exc) from None


@contextlib.contextmanager
def staged_output(output_dir: Path, nbytes: int) -> Iterator[Path]:
    """A staging folder beside `output_dir` that becomes it when the block completes, and leaves
    nothing behind when it fails (a full disk is one line that says how much to free)."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    staging = _staging_dir(output_dir)
    try:
        yield staging
        staging.rename(output_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if disk_full(exc):
            raise MergeError(f"disk: the disk holding {output_dir.parent} filled up while writing; nothing was left "
                             f"there: free {nbytes / 1e9:.1f} GB or choose another OUTPUT_DIR") from None
        raise


def execute_plan(plan: MergePlan, output_dir: Path, options: MergeOptions = MergeOptions(),
                 progress: Optional[ProgressFn] = None) -> list[str]:
    """Merge into `output_dir`, which must not exist. Returns the files written."""
    output_dir = Path(output_dir)
    with staged_output(output_dir, plan.output_bytes) as staging:
        merger = _Merger(plan, options)
        try:
            with HeapReuse(), native.enabled(options.native):
                files = _write_weights(plan, merger, staging, progress)
            files += write_side_files(plan, staging, title=output_dir.name)
        finally:
            merger.close()
    return sorted(files)


def _write_weights(plan: MergePlan, merger: _Merger, staging: Path, progress: Optional[ProgressFn]) -> list[str]:
    writer = ShardedWriter(staging, [t.out for t in plan.tensors], merger.options.out_shard_bytes,
                           {"mergekit_method": plan.method.name, "generated_by": "mergeline"})
    submitted: deque[tuple[PlannedTensor, list[Future]]] = deque()
    done = 0

    def report(block: bool) -> None:
        """Collect finished tensors in plan order (raising the first failure) and report progress."""
        nonlocal done
        while submitted and (block or all(f.done() for f in submitted[0][1])):
            tensor, futures = submitted.popleft()
            for future in futures:
                future.result()
            done += 1
            if progress:
                progress(done, len(plan.tensors), tensor.name)

    def job(tensor: PlannedTensor, rows: Optional[tuple[int, int]], kernel, held) -> Callable[[], None]:
        return lambda: writer.write(tensor.name, merger.merge_chunk(tensor, rows, kernel, held), rows[0] if rows else 0)

    def copy_job(tensor: PlannedTensor, rows: Optional[tuple[int, int]], source: tuple[int, int]):
        return lambda: writer.copy(tensor.name, source, rows)

    try:
        for tensor in plan.tensors:
            ranges = merger.row_ranges(tensor)
            source = merger.stored_copy(tensor)
            if source is not None:
                jobs = [copy_job(tensor, rows, source) for rows in copy_ranges(tensor)]
            else:
                merged = tensor.floating and not tensor.computed
                kernel, held = merger.kernel(tensor, ranges) if merged else (None, None)
                jobs = [job(tensor, rows, kernel, held) for rows in ranges]
            submitted.append((tensor, [merger.workers.submit(j) for j in jobs]))
            report(block=False)
        report(block=True)
        return writer.close()
    except BaseException:
        for _, futures in submitted:
            for future in futures:
                future.cancel()
        merger.workers.close()  # no job may write after the abort
        writer.abort()
        raise


def _check_finite(tensor: PlannedTensor, merged: torch.Tensor) -> None:
    # One reduction catches any NaN or inf; the exact check runs only if the sum itself overflowed.
    if bool(torch.isfinite(merged.sum())) or bool(torch.isfinite(merged).all()):
        return
    raise MergeError(f"{tensor.name}: the merge produced NaN or infinite values; check the parameters "
                     f"(weights summing to zero, extreme lambda or t) of this method")
