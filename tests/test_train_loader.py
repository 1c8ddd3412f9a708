"""Training batches off the main loop (train.workers): the same batches for any worker count, workers that always end.

Every sample is drawn from a Generator of its own, a pure function of (seed,
iteration, its index in the global batch) (``train.sample_generator``), so a batch
does not depend on who makes it (the loop, 1 or 2 DataLoader workers, a rank
drawing its part) nor on where a run starts (a resume). The loader's worker
processes end with the loop, however it ends.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_ddp import _alive, _children
from test_train import blob_volume, params

from emmito import contract
from emmito.prediction import DEFAULT_INPUT_NORM
from emmito.train import Batches, PatchSampler, _Run, batch_stream, train_model

AUGMENT = ["flip", "rot90", "intensity", "elastic", "blur", "noise", "missing_section", "misalignment", "cutout"]


def batches(first: int = 1, last: int = 6, samples: range = range(4), seed: int = 0) -> Batches:
    cfg = params(batch_size=4, augment_kinds=AUGMENT, augment_probability=0.5)["train"]
    sampler = PatchSampler([blob_volume(0), blob_volume(2)], [4, 16, 16], cfg["foreground_fraction"])
    return Batches(sampler, seed, first, last, samples, cfg, dict(DEFAULT_INPUT_NORM))


def same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_batch_depends_on_its_iteration_and_seed_alone():
    whole = batches()
    inputs, targets = whole[0]
    assert inputs.shape == (4, 1, 4, 16, 16) and targets.shape == (4, 1, 4, 16, 16) and inputs.dtype == torch.float32
    assert same(whole[2], whole[2]) and not same(whole[0], whole[1])
    assert same(batches(first=3)[0], whole[2])  # a resumed run at iteration 3 draws what an uninterrupted one does
    assert not same(batches(seed=1)[0], whole[0])
    # A rank's part of the global batch is that part of one process's batch: every rank draws only its own.
    for part in (range(0, 2), range(2, 4)):
        inputs_part, targets_part = batches(samples=part)[1]
        assert torch.equal(inputs_part, whole[1][0][part.start : part.stop])
        assert torch.equal(targets_part, whole[1][1][part.start : part.stop])
    with pytest.raises(IndexError):
        whole[len(whole)]


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_batches_of_the_loop_in_order(workers):
    expected = [batches()[position] for position in range(6)]
    torch_rng = torch.get_rng_state()
    with batch_stream(batches(), workers) as stream:
        got = list(stream)
    assert len(got) == 6 and all(same(a, b) for a, b in zip(got, expected))
    assert torch.equal(torch.get_rng_state(), torch_rng)  # the loader drew nothing from torch's RNG (the resume state's)


def test_the_workers_end_when_the_loop_breaks_or_fails():
    before = set(multiprocessing.active_children())
    with batch_stream(batches(last=40), 2) as stream:
        next(stream)
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2
    assert not any(worker.is_alive() for worker in workers)
    with pytest.raises(RuntimeError, match="boom"):
        with batch_stream(batches(last=40), 1) as stream:
            next(stream)
            workers = set(multiprocessing.active_children()) - before
            raise RuntimeError("boom")
    assert workers and not any(worker.is_alive() for worker in workers)


def test_the_checkpoint_is_byte_identical_for_any_worker_count():
    cfg = {"iterations": 4, "val_every": 2, "warmup_iterations": 2, "augment_kinds": AUGMENT, "augment_probability": 0.5}
    volumes, validation = [blob_volume(0), blob_volume(2)], [blob_volume(1)]
    runs = [train_model(volumes, validation, params(workers=w, **cfg), progress=False) for w in (0, 1, 2)]
    first = contract.checkpoint_bytes(runs[0][0])
    assert all(contract.checkpoint_bytes(checkpoint) == first for checkpoint, _ in runs[1:])
    assert "workers" not in runs[0][0][contract.CHECKPOINT_TRAIN_CONFIG]
    logs = [[{k: v for k, v in m.items() if k != "seconds"} for m in metrics] for _, metrics in runs]
    assert logs[0] == logs[1] == logs[2] and "val_iou" in logs[0][-1]


def test_a_run_resumed_with_other_workers_ends_with_the_uninterrupted_runs_bytes(tmp_path):
    cfg = {"iterations": 4, "warmup_iterations": 2, "save_every": 1, "augment_kinds": AUGMENT}
    whole, _ = train_model([blob_volume(0)], [], params(workers=0, **cfg), progress=False)
    state = tmp_path / "checkpoint.pt.resume"
    train_model([blob_volume(0)], [], params(workers=2, **cfg), progress=False, resume_path=state, stop_after=2)
    assert "numpy_rng" not in torch.load(state, map_location="cpu", weights_only=False)  # the batches need no state
    resumed, _ = train_model([blob_volume(0)], [], params(workers=1, **cfg), progress=False, resume_path=state)
    assert contract.checkpoint_bytes(resumed) == contract.checkpoint_bytes(whole)


def test_a_time_budget_or_a_failing_step_stops_the_workers(monkeypatch):
    before = set(multiprocessing.active_children())
    checkpoint, metrics = train_model([blob_volume(0)], [], params(iterations=50, max_minutes=1e-9, workers=2), progress=False)
    assert [m["iteration"] for m in metrics] == [1] and checkpoint[contract.CHECKPOINT_ITERATION] == 1
    assert set(multiprocessing.active_children()) <= before

    def failing_step(self, inputs, targets):
        raise RuntimeError("step failed")

    monkeypatch.setattr(_Run, "step", failing_step)
    with pytest.raises(RuntimeError, match="step failed"):
        train_model([blob_volume(0)], [], params(iterations=50, workers=1), progress=False)
    assert set(multiprocessing.active_children()) <= before


KILLED_TRAINER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_train import blob_volume, params
from emmito.train import train_model
train_model([blob_volume(0)], [], params(iterations=100000, workers=1), progress=False)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_training_process_takes_its_workers_along():
    trainer = subprocess.Popen([sys.executable, "-c", KILLED_TRAINER, str(Path(__file__).parent)])
    try:
        deadline = time.monotonic() + 120
        while not _children(trainer.pid, b"") and trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _children(trainer.pid, b"")
        assert workers, "the trainer started no loader worker"
    finally:
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
    for _ in range(40):  # the kernel's SIGKILL, not the worker's 5 s watchdog
        if not any(_alive(pid) for pid in workers):
            break
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "a loader worker outlived its killed trainer"
