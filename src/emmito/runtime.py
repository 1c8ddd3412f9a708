"""What a job runs on: how many threads, which device, mixed precision, thread pools, memory reuse.

One thread-count rule for every stage (``threads``: 0 means every core this
job may run on, which honours SLURM's and taskset's CPU masks).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
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


def pick_device(log: Callable[[str], None] | None = None) -> Any:
    """This process's own GPU when there are GPUs (``claim_devices(1)``: a free one, held until it exits), else the CPU.

    A ``torch.device``. ``log`` gets the line naming the device (and one if the job waits).
    """
    import torch

    return torch.device(claim_devices(1, log=log)[0].torch_device)


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
    in turn, so reusing freed pages saves about a third of segment's time, 7-10 %
    of a CPU training step and about a quarter of an eval forward's time
    (``benchmarks/profile_train_step.py``: 30-60 thousand page faults per step
    without it). Peak memory rises a little (2-7 % in training). Call it in a
    process that runs a stage (the CLIs do), not from library code.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large arrays from the heap, which ...
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ... is not trimmed back to the system
    except (OSError, AttributeError):
        pass


# ---- which GPU a job runs on -----------------------------------------------------------------
# Several jobs on one machine (snakemake --resources gpu=4) must each get their own GPU.
# A job claims a GPU by holding fcntl.flock on that GPU's lock file for as long as the
# process lives: the kernel drops the lock when the process ends, however it ends
# (SIGKILL, out of memory), so a killed job's GPU is free again at once. The file's
# existence means nothing. Lock files are named by the GPU's UUID, which is the same in
# every job whatever CUDA_VISIBLE_DEVICES renumbers (SLURM's cgroups show each job its GPUs
# as 0..n-1): jobs that were given different GPUs never wait for each other.

FAKE_DEVICES_VARIABLE = "EMMITO_FAKE_DEVICES"
"""Comma-separated device names that stand in for GPUs (tests, and machines without one): jobs claim
them like GPUs and then run on the CPU."""

DEVICE_LOCKS_VARIABLE = "EMMITO_DEVICE_LOCKS"
"""The folder of the per-GPU lock files (default: ``<tmp>/emmito-devices``, shared by every user)."""


@dataclass(frozen=True)
class Device:
    """One claimable device: ``name`` (a GPU's UUID, or a fake device's name) and the torch device it runs on."""

    name: str
    torch_device: str


_HELD_LOCKS: list[Any] = []  # open lock files of this process's claimed devices: kept open until it exits
_CLAIMED: list[Device] = []  # the devices they lock


def visible_devices() -> list[Device]:
    """The GPUs this process may use (after CUDA_VISIBLE_DEVICES), or the fake ones of ``EMMITO_FAKE_DEVICES``."""
    fake = os.environ.get(FAKE_DEVICES_VARIABLE)
    if fake is not None:
        return [Device(name, "cpu") for name in (part.strip() for part in fake.split(",")) if name]
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        devices.append(Device(str(uuid) if uuid is not None else f"cuda{index}", f"cuda:{index}"))
    return devices


def _lock_folder() -> Path:
    folder = Path(os.environ.get(DEVICE_LOCKS_VARIABLE) or Path(tempfile.gettempdir()) / "emmito-devices")
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # every user's jobs share the folder, as they share the GPUs
            folder.chmod(0o1777)
    return folder


def _try_lock(folder: Path, device: Device) -> Any | None:
    """The open lock file of ``device`` if this process got its lock, else None (another process holds it)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device.name)
    path = folder / f"{safe}.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the process
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    handle.flush()
    return handle


def claim_devices(count: int = 1, *, poll_seconds: float = 1.0, log: Callable[[str], None] | None = None) -> list[Device]:
    """Claim ``count`` devices for the rest of this process's life; wait while fewer are free.

    Without GPUs (and without fake ones) this is ``count`` times the CPU, with nothing locked.
    More GPUs asked for than are visible is an ``EmmitoError``. ``log`` gets one line when
    the job has to wait and one naming the devices it got.
    """
    from emmito.io import EmmitoError

    if len(_CLAIMED) >= count:  # this process holds them already (a second call must not wait on its own locks)
        return _CLAIMED[:count]
    if _CLAIMED:
        raise RuntimeError(f"claim_devices({count}) after claiming {len(_CLAIMED)}: claim every device a process needs at once")
    visible = visible_devices()
    if not visible:
        return [Device("cpu", "cpu")] * count
    if count > len(visible):
        raise EmmitoError(
            f"{count} GPUs asked for but this job sees {len(visible)} ({', '.join(d.name for d in visible)}): "
            "ask the scheduler for more GPUs (the rule's gpu resource) or lower train.devices"
        )
    folder = _lock_folder()
    waited = False
    while True:
        held = []
        for device in visible:
            handle = _try_lock(folder, device)
            if handle is not None:
                held.append((device, handle))
                if len(held) == count:
                    break
        if len(held) == count:
            _HELD_LOCKS.extend(handle for _, handle in held)
            chosen = [device for device, _ in held]
            _CLAIMED[:] = chosen
            if log is not None:
                names = ", ".join(f"{d.name} ({d.torch_device})" for d in chosen)
                log(f"device {names} claimed at {time.strftime('%Y-%m-%dT%H:%M:%S')} (lock files in {folder})")
            return chosen
        for _, handle in held:
            handle.close()
        if not waited and log is not None:
            log(f"waiting for {count} free GPU(s): other emmito jobs hold the locks in {folder}")
        waited = True
        time.sleep(poll_seconds)
