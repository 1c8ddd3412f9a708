"""Data-parallel training on one node: the rank processes, their process group, the global batch.

``launch(devices, job)`` runs ``job(Rank(...))`` in one process per device
(torch.multiprocessing's spawn context), joined in a process group over
127.0.0.1 and a free port: NCCL on CUDA devices, gloo on the CPU. The caller
claims the devices first (``runtime.claim_devices``) and holds their locks
for the whole run; the ranks claim nothing. A rank that fails ends the run:
the others are stopped and ``launch`` raises one ``EmmitoError`` line (the
rank's own EmmitoError message, or its exception's first line, its traceback
in the log). A rank whose parent dies is killed by the kernel (Linux's
PR_SET_PDEATHSIG), so a SIGKILLed job leaves no rank running on its devices.

Every rank computes the loss of the whole global batch: ``gather_batch``
all-gathers the ranks' network outputs, and its backward hands each rank the
gradient of its own samples times the world size, so that DDP's mean of the
ranks' gradients is the single-process gradient (see ``gather_batch``).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing.connection
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emmito.io import EmmitoError
from emmito.runtime import Device, visible_devices

# How long a rank waits at a collective (and at start-up for the others). Rank 0 validates and
# writes while the others wait at their next collective: a validation must finish within it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)
STOP_GRACE_SECONDS = 10.0  # after SIGTERM, how long a rank has before SIGKILL


@dataclass(frozen=True)
class Rank:
    """One process of a data-parallel run: ``rank`` of ``world``, on torch device ``device`` ("cuda:1", "cpu")."""

    rank: int
    world: int
    device: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, logs and writes."""
        return self.rank == 0

    def part(self, batch: int) -> slice:
        """This rank's samples of a global batch of ``batch``: the ``rank``-th of ``world`` equal parts."""
        size = batch // self.world
        return slice(self.rank * size, (self.rank + 1) * size)


def resolve_devices(requested: int | str) -> int:
    """How many devices ``train.devices`` means: the number, or (auto) every visible GPU, 1 without any."""
    if requested == "auto":
        return max(1, len(visible_devices()))
    return int(requested)


def on_cpu() -> bool:
    """Whether claimed devices would run on the CPU (no GPUs, or the fake ones of ``EMMITO_FAKE_DEVICES``)."""
    return all(device.torch_device == "cpu" for device in visible_devices())


def check_split(batch_size: int, devices: int, norm: str) -> None:
    """One-line EmmitoError where ``devices`` ranks cannot split the global batch, or cannot sync BatchNorm.

    torch's SyncBatchNorm runs on GPUs only (2.13: "expected input tensor to be on
    GPU"), so ``model.norm batch`` with several ranks on the CPU is refused rather
    than normalised per rank (which would differ from the single-process run).
    """
    if devices > 1 and batch_size % devices:
        raise EmmitoError(
            f"train.batch_size {batch_size} does not split over train.devices {devices}: "
            "make the batch size a multiple of the device count"
        )
    if devices > 1 and norm == "batch" and on_cpu():
        raise EmmitoError(
            f"model.norm batch with train.devices {devices} on the CPU: torch's SyncBatchNorm runs on GPUs only; "
            "train on GPUs, with train.devices 1, or with model.norm group"
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---- the rank processes -------------------------------------------------------------------


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the call above
        os._exit(1)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, EmmitoError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _rank_main(
    rank: Rank, port: int, backend: str, job: Callable[[Rank], Any], errors: Any, parent: int
) -> None:
    """A rank process: join the process group, run ``job``, report a failure as one line on ``errors``."""
    die_with_parent(parent)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: atomic files clean up
    import torch
    import torch.distributed as dist

    try:
        if rank.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(rank.device))
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank.rank, world_size=rank.world, timeout=COLLECTIVE_TIMEOUT
        )
        job(rank)
    except BaseException as exc:
        if not isinstance(exc, EmmitoError | SystemExit):
            traceback.print_exc()
        message = _one_line(exc) if not isinstance(exc, SystemExit) else f"stopped (exit status {exc.code})"
        # Sent before this rank's connections close, so that it comes before the others' echo of it.
        errors.put((rank.rank, message, isinstance(exc, EmmitoError)))
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def launch(devices: list[Device], job: Callable[[Rank], Any], backend: str | None = None) -> None:
    """Run ``job(Rank(r, len(devices), devices[r].torch_device))`` in one spawned process per device; wait for all.

    ``job`` must pickle (a module-level function or an instance of a module-level
    class). ``backend``: NCCL on CUDA devices, gloo otherwise, unless given. The
    first rank to fail stops the others and is raised as one EmmitoError line;
    so is a rank killed by a signal. A rank's EmmitoError (a user's mistake) is raised
    as it is. Any exception here (SIGTERM's) stops the ranks too.
    """
    import torch.multiprocessing as mp

    world = len(devices)
    if backend is None:
        backend = "nccl" if devices[0].torch_device.startswith("cuda") else "gloo"
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    port = free_port()
    processes = [
        context.Process(
            target=_rank_main, args=(Rank(r, world, d.torch_device), port, backend, job, errors, os.getpid()),
            name=f"emmito-rank-{r}", daemon=False,
        )
        for r, d in enumerate(devices)
    ]
    try:
        for process in processes:
            process.start()
        _wait(processes, errors)
    finally:
        _stop(processes)


def _wait(processes: list[Any], errors: Any) -> None:
    """Until every rank has ended; the first failure as an EmmitoError.

    The cause, not its echo: a rank killed by a signal first (the others then
    fail on its closed connections), else the first error line a rank sent,
    else the exit status.
    """
    world = len(processes)
    running = list(processes)
    while running:
        multiprocessing.connection.wait([p.sentinel for p in running])
        running = [p for p in running if p.exitcode is None]
        failed = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
        if not failed:
            continue
        killed = [(rank, code) for rank, code in failed if code < 0]
        if killed:
            rank, code = killed[0]
            name = signal.Signals(-code).name
            raise EmmitoError(f"training rank {rank} of {world} failed: killed by signal {-code} ({name}; out of memory?)")
        if errors.empty():
            rank, code = failed[0]
            raise EmmitoError(f"training rank {rank} of {world} failed: exit status {code}")
        rank, message, mistake = errors.get()
        # A user's mistake (every rank reads the same files and config) reads as in a single process.
        raise EmmitoError(message if mistake else f"training rank {rank} of {world} failed: {message}")


def _stop(processes: list[Any]) -> None:
    """End the ranks still running: SIGTERM, then SIGKILL after ``STOP_GRACE_SECONDS``."""
    alive = [p for p in processes if p.pid is not None and p.exitcode is None]
    for process in alive:
        with contextlib.suppress(OSError):
            process.terminate()
    for process in alive:
        process.join(STOP_GRACE_SECONDS)
        if process.exitcode is None:
            process.kill()
            process.join()


# ---- inside a rank: the global batch --------------------------------------------------------


def _gather_function() -> Any:
    import torch
    import torch.distributed as dist

    class GatherBatch(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, rank: int, world: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            ctx.rank, ctx.world = rank, world
            gathered = []
            for tensor in tensors:
                parts = [torch.empty_like(tensor) for _ in range(world)]
                dist.all_gather(parts, tensor.contiguous())
                gathered.append(torch.cat(parts))
            return tuple(gathered)

        @staticmethod
        def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
            return (None, None, *(grad.chunk(ctx.world)[ctx.rank] * ctx.world for grad in grads))

    return GatherBatch


_GATHER: list[Any] = []


def gather_batch(tensors: list[Any], rank: Rank) -> list[Any]:
    """Every rank's ``tensors`` (batch first), concatenated in rank order: the global batch's, on every rank.

    Differentiable. Every rank then computes the same loss L of the whole global
    batch, so the gradient it holds for rank r's samples is dL/d(outputs_r) on
    every rank alike; backward keeps this rank's own part, times the world size,
    and DDP's mean over the ranks of the parameter gradients gives
    sum_r dL/d(outputs_r) d(outputs_r)/d(weights): the single-process gradient of L,
    whether or not L is a mean over samples (class-balanced BCE, Dice and OHEM
    are not), up to rounding.
    """
    if not _GATHER:
        _GATHER.append(_gather_function())
    return list(_GATHER[0].apply(rank.rank, rank.world, *tensors))


def broadcast_float(value: float, device: Any) -> float:
    """Rank 0's ``value`` on every rank (a time measured on rank 0 that every rank must act on alike)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())
