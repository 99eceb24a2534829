"""The safetensors format, read and written in place, one tensor at a time.

Reading: a tensor (or a range of its rows) is a private, copy-on-write mapping of just its bytes,
unmapped when the tensor is freed. So memory use is the tensors we hold, never the whole file
(a mapping of the file would keep every page touched resident), and the merge reads the page
cache in place: copying into a buffer with read(2) cost more CPU time than some merges. Like
every reader that maps (safetensors' own), a file truncated during a merge ends it with SIGBUS.

Writing: the plan knows every output tensor's name, dtype and shape before the first one is
merged, so each shard's header is written up front and every tensor goes straight to its offset
as it is produced. Nothing waits in a shard buffer; a shard is never copied again.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import torch

from .errors import MergeError

DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODE_OF: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_CODES.items()}
_ALIGN = 8  # tensor data starts 8-byte aligned, as the reference writer does


@dataclass(frozen=True)
class TensorHeader:
    """Where one tensor lives and what it is, from a safetensors header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # file name relative to the model directory
    start: int = 0  # absolute byte offset of the data in the file (0 when only metadata is known)
    nbytes: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def dtype_from_code(code: str, where: str) -> torch.dtype:
    try:
        return DTYPE_CODES[code]
    except KeyError:
        raise MergeError(f"{where}: unsupported safetensors dtype {str(code)[:20]!r}; supported: "
                         f"{', '.join(DTYPE_CODES)}") from None


def read_header(path: Path, file_name: Optional[str] = None) -> dict[str, TensorHeader]:
    """Parse one .safetensors file's header (a few KB read; no tensor data)."""
    not_safetensors = f"{path}: not a safetensors file (a broken or interrupted download?); download it again"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise MergeError(not_safetensors)
        (length,) = struct.unpack("<Q", prefix)
        if length > 100_000_000:
            raise MergeError(not_safetensors)
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise MergeError(not_safetensors) from None
    try:
        return headers_from_json(header, file_name or path.name, 8 + length)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise MergeError(not_safetensors) from None


def headers_from_json(header: dict, file_name: str, data_start: int = 0) -> dict[str, TensorHeader]:
    result = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        result[name] = TensorHeader(name, dtype_from_code(info["dtype"], f"{file_name}:{name}"),
                                    tuple(int(d) for d in info["shape"]), file_name, data_start + begin, end - begin)
    return result


class TensorReader:
    """Reads tensors of one model directory by name, keeping its files open."""

    def __init__(self, root: Path, headers: dict[str, TensorHeader]):
        self.root = root
        self.headers = headers
        self._files: dict[str, tuple[BinaryIO, int]] = {}  # open handles and their sizes

    def _file(self, name: str) -> tuple[BinaryIO, int]:
        opened = self._files.get(name)
        if opened is None:
            handle = open(self.root / name, "rb", buffering=0)
            opened = self._files[name] = (handle, os.fstat(handle.fileno()).st_size)
        return opened

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor `name`, or only rows ``[start, end)`` of its first dimension."""
        header = self.headers[name]
        shape = list(header.shape)
        start, nbytes = header.start, header.nbytes
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            start += rows[0] * row_bytes
            nbytes = (rows[1] - rows[0]) * row_bytes
            shape[0] = rows[1] - rows[0]
        if nbytes == 0:
            return torch.empty(shape, dtype=header.dtype)
        handle, size = self._file(header.file)
        page_start = start - start % mmap.ALLOCATIONGRANULARITY
        if start + nbytes > size:
            raise MergeError(f"{self.root / header.file}: the file ends inside tensor {name}; it is cut short "
                             f"(an interrupted download?): delete it and download it again")
        # Copy-on-write: a method that works in place on its inputs changes our pages, not the file.
        mapped = mmap.mmap(handle.fileno(), start + nbytes - page_start, access=mmap.ACCESS_COPY, offset=page_start)
        return torch.frombuffer(mapped, dtype=header.dtype, count=nbytes // header.dtype.itemsize,
                                offset=start - page_start).reshape(shape)

    def stored(self, name: str) -> Optional[tuple[int, int]]:
        """(file descriptor, byte offset) of tensor `name`'s data, for copies that never leave the kernel."""
        header = self.headers[name]
        handle, size = self._file(header.file)
        return (handle.fileno(), header.start) if header.start + header.nbytes <= size else None

    def close(self) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._files.clear()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def row_elements(self) -> int:
        """Elements per index of the first dimension (1 for a scalar)."""
        return self.numel // self.shape[0] if self.shape and self.shape[0] else 1


def shard_layout(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Writes a checkpoint whose tensor list is known in advance, tensor by tensor, in any order."""

    def __init__(self, directory: Path, tensors: Sequence[OutputTensor], max_shard_bytes: int,
                 metadata: Optional[dict[str, str]] = None, stem: str = "model"):
        self.directory, self.stem = directory, stem
        self.shards = shard_layout(tensors, max_shard_bytes)
        self.names = shard_file_names(len(self.shards), stem)
        self._where: dict[str, tuple[int, int, OutputTensor]] = {}
        self._handles: list[BinaryIO] = []
        self._written: set[str] = set()
        meta = {"format": "pt", **(metadata or {})}
        for index, (name, shard) in enumerate(zip(self.names, self.shards)):
            header: dict[str, object] = {"__metadata__": meta}
            offset = 0
            for tensor in shard:
                header[tensor.name] = {"dtype": CODE_OF[tensor.dtype], "shape": list(tensor.shape),
                                       "data_offsets": [offset, offset + tensor.nbytes]}
                offset += tensor.nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % _ALIGN)
            data_start = 8 + len(encoded)
            handle = open(directory / name, "wb")
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            handle.truncate(data_start + offset)
            self._handles.append(handle)
            running = data_start
            for tensor in shard:
                self._where[tensor.name] = (index, running, tensor)
                running += tensor.nbytes

    def write(self, name: str, tensor: torch.Tensor, row_offset: int = 0) -> None:
        """Write `tensor` as output `name` (or as its rows starting at `row_offset`)."""
        index, start, spec = self._where[name]
        if tensor.dtype != spec.dtype:
            raise TypeError(f"{name}: planned as {spec.dtype}, got {tensor.dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if row_offset:
            start += row_offset * spec.row_elements * spec.dtype.itemsize
        os.pwrite(self._handles[index].fileno(), memoryview(data), start)
        if not spec.shape or row_offset + tensor.shape[0] == spec.shape[0]:  # the last rows landed
            self._written.add(name)

    def copy(self, name: str, source: tuple[int, int], rows: Optional[tuple[int, int]] = None) -> None:
        """Write output `name` (or its `rows`) as the bytes stored at `source` (a file descriptor and the
        offset of the tensor's data), copied file to file by the kernel where it can."""
        index, start, spec = self._where[name]
        row_bytes = spec.row_elements * spec.dtype.itemsize
        first, last = rows if rows is not None else (0, spec.shape[0] if spec.shape else 1)
        offset, left = first * row_bytes, (last - first) * row_bytes
        src, dst = source[1] + offset, start + offset
        fd_in, fd_out = source[0], self._handles[index].fileno()
        while left > 0:
            try:
                done = os.copy_file_range(fd_in, fd_out, left, src, dst)
            except (AttributeError, OSError):  # no such call here, or not between these file systems
                done = os.pwrite(fd_out, os.pread(fd_in, min(left, 1 << 26), src), dst)
            if done <= 0:
                raise OSError(f"{name}: the input ended while copying it")
            src, dst, left = src + done, dst + done, left - done
        if rows is None or last == spec.shape[0]:
            self._written.add(name)

    def close(self) -> list[str]:
        """Flush shards, write the index when sharded; return the file names written."""
        missing = [t.name for shard in self.shards for t in shard if t.name not in self._written]
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        if missing:
            raise RuntimeError(f"tensors planned but never written: {missing[:5]}")
        files = list(self.names)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for shard in self.shards for t in shard)},
                "weight_map": {t.name: file for file, shard in zip(self.names, self.shards) for t in shard},
            }
            index_name = f"{self.stem}.safetensors.index.json"
            (self.directory / index_name).write_text(json.dumps(index, indent=2) + "\n")
            files.append(index_name)
        return files

    def abort(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()
