"""Stage 3: stream the plan — read each output tensor's inputs, merge, write — into a fresh checkpoint.

Memory is bounded by a few tensors: the inputs of the tensor being merged, their compute copies,
and the inputs of the next tensor being read ahead on a background thread. Elementwise methods
work through large tensors in row chunks. The checkpoint is built in a temporary directory beside
the output and renamed into place only when everything, side files included, has been written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import card as card_stage
from .chat_templates import resolve_chat_template
from .errors import MergeError
from .plan import MergePlan, PlannedTensor
from .safetensors_io import ShardedWriter
from .sources import TOKENIZER_FILES

log = logging.getLogger("mergeline")

ProgressFn = Callable[[int, int, str], None]  # (tensors done, total, current tensor name)
CHUNK_ELEMENTS = 1 << 18  # row chunks of 1 MB float32 per input: a working set that stays in cache
# Methods with whole-tensor passes keep a tensor's inputs (as stored) between passes when they
# take at most this much, so each byte is read once; larger tensors are read again instead.
KEEP_INPUT_BYTES = 1 << 29


@dataclass(frozen=True)
class MergeOptions:
    device: str = "cpu"
    seed: int = 0
    out_shard_bytes: int = 5 * 10**9
    read_ahead: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise MergeError(f"--device: unknown device {name!r}; use cpu, cuda or auto")
    return torch.device(name)


def tensor_seed(seed: int, key: str) -> int:
    """A per-tensor seed: results do not depend on tensor order, chunking or threads."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _align_rows(tensors: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """Truncate or extend vocabulary tensors to `rows`; extra rows take the mean of the inputs that have them."""
    result = [t[:rows] for t in tensors]
    longest = max(t.shape[0] for t in result)
    if longest < rows:
        raise MergeError(f"no input has the {rows} vocabulary rows the tokenizer source needs")
    for i, t in enumerate(result):
        if t.shape[0] < rows:
            missing_from = t.shape[0]
            fills = []
            for start in range(missing_from, rows):
                donors = [o[start] for o in result if o.shape[0] > start]
                fills.append(torch.stack(donors).float().mean(dim=0).to(t.dtype))
            result[i] = torch.cat([t, torch.stack(fills)])
    return result


class _Merger:
    """Reads, converts and merges one planned tensor at a time, in row chunks where the method allows."""

    def __init__(self, plan: MergePlan, options: MergeOptions):
        self.plan = plan
        self.options = options
        self.device = resolve_device(options.device)
        self.readers = {}
        self.kept: dict[tuple[str, Optional[tuple[int, int]]], list[torch.Tensor]] = {}

    def reader(self, model: int):
        if model not in self.readers:
            self.readers[model] = self.plan.models[model].reader()
        return self.readers[model]

    def read_inputs(self, tensor: PlannedTensor, rows: Optional[tuple[int, int]] = None) -> list[torch.Tensor]:
        kept = self.kept.pop((tensor.name, rows), None)
        if kept is not None:
            return kept
        return [self.reader(model).read(name, rows) for model, name in tensor.inputs]

    def row_ranges(self, tensor: PlannedTensor) -> list[Optional[tuple[int, int]]]:
        shape = tensor.out.shape
        if (not self.plan.method.chunkable or tensor.rows is not None or not shape
                or tensor.out.numel <= CHUNK_ELEMENTS or not tensor.out.dtype.is_floating_point):
            return [None]
        step = max(1, CHUNK_ELEMENTS // tensor.out.row_elements)
        return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]

    def to_compute(self, tensor: PlannedTensor, inputs: list[torch.Tensor]):
        """(base, others) on the compute device in float32 (float64 when asked), as the method sees them."""
        if tensor.rows is not None:
            inputs = _align_rows(inputs, tensor.rows)
        config_dtype = self.plan.config.dtype
        wide = config_dtype == torch.float64 or tensor.out.dtype == torch.float64 or any(
            t.dtype == torch.float64 for t in inputs)
        compute = torch.float64 if wide else torch.float32
        # Cast to the config's dtype first (as mergekit loads them), then widen for the arithmetic.
        work = [(t.to(config_dtype) if config_dtype else t).to(self.device, compute, non_blocking=True)
                for t in inputs]
        base = work[tensor.base] if tensor.base is not None else None
        return base, [t for k, t in enumerate(work) if k != tensor.base]

    def kernel(self, tensor: PlannedTensor, ranges: list[Optional[tuple[int, int]]]):
        """The function that merges each chunk of `tensor`, after any whole-tensor passes."""
        method = self.plan.method
        params = dict(tensor.params)
        if method.randomized:
            params["seed"] = tensor_seed(self.options.seed, tensor.seed_key)
        if method.prepare is None:
            return lambda base, others, offset: method.fn(base, others, **params)
        return method.prepare(_TensorChunks(self, tensor, ranges), tensor.out.numel, **params)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


class _TensorChunks:
    """`methods.Chunks` for one planned tensor: re-read from the checkpoints on every pass."""

    SAMPLE_ROWS = 64  # at least this many rows, else one in 64

    def __init__(self, merger: _Merger, tensor: PlannedTensor, ranges: list[Optional[tuple[int, int]]]):
        self.merger, self.tensor, self.ranges = merger, tensor, ranges

    def __call__(self):
        # The first chunk is already in the merge loop's hands; later ones wait in `kept`.
        keep = self.merger.plan.input_bytes(self.tensor) <= KEEP_INPUT_BYTES
        for index, rows in enumerate(self.ranges):
            inputs = self.merger.read_inputs(self.tensor, rows)
            if keep and index:
                self.merger.kept[(self.tensor.name, rows)] = inputs
            base, others = self.merger.to_compute(self.tensor, inputs)
            yield base, others, _flat_offset(self.tensor, rows)

    def sample(self):
        if self.ranges == [None]:  # one chunk: the whole tensor is the sample
            base, others, _ = next(iter(self()))
            return base, others
        total = self.tensor.out.shape[0]
        count = min(total, max(self.SAMPLE_ROWS, total // 64))
        rows = sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})
        parts = [self.merger.to_compute(self.tensor, self.merger.read_inputs(self.tensor, (r, r + 1))) for r in rows]
        base = torch.cat([b for b, _ in parts]) if parts[0][0] is not None else None
        others = [torch.cat([o[i] for _, o in parts]) for i in range(len(parts[0][1]))]
        return base, others


def _flat_offset(tensor: PlannedTensor, rows: Optional[tuple[int, int]]) -> int:
    """Position of a row chunk's first element in the flattened tensor."""
    return rows[0] * tensor.out.row_elements if rows else 0


def execute_plan(plan: MergePlan, output_dir: Path, options: MergeOptions = MergeOptions(),
                 progress: Optional[ProgressFn] = None) -> list[str]:
    """Merge into `output_dir`, which must not exist. Returns the files written."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise MergeError(f"OUTPUT_DIR: {output_dir} already exists; choose a new directory or remove it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    merger = _Merger(plan, options)
    try:
        files = _write_weights(plan, merger, staging, options, progress)
        files += write_side_files(plan, staging, title=output_dir.name)
        staging.rename(output_dir)
        return sorted(files)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        merger.close()


def _write_weights(plan: MergePlan, merger: _Merger, staging: Path, options: MergeOptions,
                   progress: Optional[ProgressFn]) -> list[str]:
    writer = ShardedWriter(staging, [t.out for t in plan.tensors], options.out_shard_bytes,
                           {"mergekit_method": plan.method.name, "generated_by": "mergeline"})
    work = [(tensor, rows) for tensor in plan.tensors for rows in merger.row_ranges(tensor)]
    total = len(plan.tensors)
    done = 0
    # One reader thread keeps the next inputs in flight while this thread merges and writes.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeline-read") if options.read_ahead else None

    def load(index: int) -> list[torch.Tensor]:
        tensor, rows = work[index]
        return merger.read_inputs(tensor, rows)

    pending: Optional[Future] = pool.submit(load, 0) if pool and work else None
    kernel = None
    try:
        for index, (tensor, rows) in enumerate(work):
            inputs = pending.result() if pending else load(index)
            first = rows is None or rows[0] == 0
            last = rows is None or rows[1] == tensor.out.shape[0]
            floating = all(t.is_floating_point() for t in inputs)
            if floating and first:  # before the next read: whole-tensor passes may keep its inputs
                kernel = merger.kernel(tensor, merger.row_ranges(tensor))
            pending = pool.submit(load, index + 1) if pool and index + 1 < len(work) else None
            if not floating:
                merged = inputs[0]  # integer buffers are copied from the first input, as mergekit does
            else:
                base, others = merger.to_compute(tensor, inputs)
                result = kernel(base, others, _flat_offset(tensor, rows))
                _check_finite(tensor, result)
                merged = result.to("cpu", tensor.out.dtype)
                del base, others, result
            del inputs
            writer.write(tensor.name, merged, rows[0] if rows else 0)
            del merged
            if last:
                done += 1
                if progress:
                    progress(done, total, tensor.name)
        return writer.close()
    except BaseException:
        if pending is not None:
            pending.cancel()
        writer.abort()
        raise
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def _check_finite(tensor: PlannedTensor, merged: torch.Tensor) -> None:
    # One reduction catches any NaN or inf; the exact check runs only if the sum itself overflowed.
    if bool(torch.isfinite(merged.sum())) or bool(torch.isfinite(merged).all()):
        return
    raise MergeError(f"{tensor.name}: the merge produced NaN or infinite values; check the parameters "
                     f"(weights summing to zero, extreme lambda or t) of this method")


def write_side_files(plan: MergePlan, directory: Path, title: Optional[str] = None) -> list[str]:
    """config.json, generation_config.json, tokenizer files, chat template, card and config copy."""
    written = []
    out_config = dict(plan.out_config)
    dtypes = {t.out.dtype for t in plan.tensors if t.out.dtype.is_floating_point}
    dtype_name = str(max(dtypes, key=lambda d: d.itemsize)).removeprefix("torch.") if dtypes else None
    if dtype_name:
        out_config["dtype" if "torch_dtype" not in out_config else "torch_dtype"] = dtype_name
        if "torch_dtype" in out_config:
            out_config["dtype"] = dtype_name
    (directory / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=False) + "\n")
    written.append("config.json")

    reference_dir = plan.reference.local_dir
    generation = reference_dir / "generation_config.json" if reference_dir else None
    if generation and generation.is_file():
        shutil.copyfile(generation, directory / "generation_config.json")
        written.append("generation_config.json")

    tokenizer_dir = plan.tokenizer_from.local_dir
    for name in TOKENIZER_FILES:
        if tokenizer_dir and (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, directory / name)
            written.append(name)

    if plan.config.chat_template:
        template = resolve_chat_template(plan.config.chat_template, [m.local_dir for m in plan.models])
        if template is not None:
            (directory / "chat_template.jinja").write_text(template)
            if "chat_template.jinja" not in written:
                written.append("chat_template.jinja")
            tokenizer_config = directory / "tokenizer_config.json"
            if tokenizer_config.is_file():  # one place for the template, so transformers never has to choose
                data = json.loads(tokenizer_config.read_text())
                if data.pop("chat_template", None) is not None:
                    tokenizer_config.write_text(json.dumps(data, indent=2) + "\n")

    (directory / "mergekit_config.yml").write_text(plan.config.text.rstrip() + "\n")
    written.append("mergekit_config.yml")
    (directory / "README.md").write_text(card_stage.render_card(plan, title))
    written.append("README.md")
    return written
