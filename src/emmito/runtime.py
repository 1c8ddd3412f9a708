"""What a job runs on: how many threads, which device, mixed precision, thread pools, memory reuse.

One thread-count rule for every stage (``threads``: 0 means every core this
job may run on, which honours SLURM's and taskset's CPU masks).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def thread_count(requested: int) -> int:
    """Threads to use: ``requested``, or (0) every core this process may run on (SLURM/taskset aware)."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def thread_pool(threads: int, name: str) -> Iterator[ThreadPoolExecutor | None]:
    """A pool of ``thread_count(threads)`` workers, or None when that is one (work then runs in the caller)."""
    workers = thread_count(threads)
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name) if workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.shutdown()


def run_all(pool: ThreadPoolExecutor | None, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """``map`` over the pool when there is one (results in order), else in this thread."""
    return pool.map(function, items) if pool is not None else map(function, items)


def pick_device() -> Any:
    """CUDA when present, else CPU (a ``torch.device``)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: Any) -> Any:
    """Mixed precision on CUDA only: bf16 autocast on this kind of CPU is ~100x slower than fp32."""
    import torch

    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def keep_freed_memory() -> None:
    """Make this process keep the memory it frees for its next allocations (glibc only; else nothing).

    On virtual machines that hand freed memory back to the host, touching it
    again costs 0.3-3.5 s per GB; a block allocates several block-sized arrays
    in turn, so reusing freed pages saves about a third of segment's time.
    The process's peak memory is unchanged. Call it in a process that runs
    segmentation (the CLI does), not from library code.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large arrays from the heap, which ...
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ... is not trimmed back to the system
    except (OSError, AttributeError):
        pass
