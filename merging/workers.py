"""Threads that merge whole chunks side by side, and a heap that keeps its pages between them."""

from __future__ import annotations

import ctypes
import os
import platform
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class Workers:
    """A pool of threads that run whole chunk jobs, each with a single torch thread.

    On CPU, chunks side by side beat splitting every small op of one chunk across threads: no
    synchronisation per op, and each chunk stays in its core's cache. With no threads (0), jobs
    run in the calling thread, which keeps torch's own threads.
    """

    def __init__(self, count: int):
        self.count = count
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="mergeline", initializer=torch.set_num_threads,
                                       initargs=(1,)) if count else None

    def submit(self, fn: Callable[[], R]) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn)
        future: Future = Future()
        future.set_result(fn())
        return future

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn over items, results in order; at most two jobs per thread in flight."""
        if self.pool is None:
            yield from map(fn, items)
            return
        items = iter(items)
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(self.pool.submit(fn, item))
                if len(pending) >= 2 * self.count:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class HeapReuse:
    """Keep freed buffers in glibc's heap while merging, and hand them back when a merge ends.

    Every chunk allocates and frees megabytes of temporaries on several threads. By default
    glibc serves blocks that size with fresh mmaps, or trims them off the heap top once freed,
    so every temporary page-faults anew: measured at a third of a linear merge's time. A fixed
    32 MiB mmap threshold (the largest glibc takes) and a 1 GiB trim threshold keep them for
    reuse. glibc cannot report its previous settings, so these stay for the process (the app's
    server included); `malloc_trim` returns the free memory after every merge. Elsewhere (not
    Linux with glibc) this does nothing.
    """

    _M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

    def __init__(self) -> None:
        self.libc = None
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass

    def __enter__(self) -> "HeapReuse":
        if self.libc is not None:
            self.libc.mallopt(self._M_MMAP_THRESHOLD, 32 << 20)
            self.libc.mallopt(self._M_TRIM_THRESHOLD, 1 << 30)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)
