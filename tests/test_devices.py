"""Several GPUs on one machine: each concurrent job claims its own, and a killed job's GPU is free again.

Without GPUs, ``EMMITO_FAKE_DEVICES`` names stand-in devices that jobs claim exactly as
they claim GPUs (``emmito.runtime.claim_devices``: fcntl.flock on one lock file per
device, held for the life of the process). Each job here records the device it got
and when it held it; no two intervals on one device may overlap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emmito import runtime
from emmito.io import EmmitoError

JOB = """
import json, sys, time
from emmito import runtime
[device] = runtime.claim_devices(1, poll_seconds=0.05)
start = time.time()
time.sleep(float(sys.argv[2]))
with open(sys.argv[1], "a") as record:
    record.write(json.dumps({"device": device.name, "start": start, "end": time.time()}) + "\\n")
"""


def environment(tmp_path: Path, devices: str) -> dict[str, str]:
    return {**os.environ, runtime.FAKE_DEVICES_VARIABLE: devices, runtime.DEVICE_LOCKS_VARIABLE: str(tmp_path / "locks")}


def test_concurrent_jobs_never_share_a_device(tmp_path):
    record = tmp_path / "record.jsonl"
    env = environment(tmp_path, "gpu-a,gpu-b")
    jobs = [subprocess.Popen([sys.executable, "-c", JOB, str(record), "0.6"], env=env) for _ in range(5)]
    assert [job.wait(timeout=60) for job in jobs] == [0] * 5
    held = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(held) == 5 and {h["device"] for h in held} == {"gpu-a", "gpu-b"}
    for device in ("gpu-a", "gpu-b"):
        spans = sorted((h["start"], h["end"]) for h in held if h["device"] == device)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
    # five 0.6 s jobs on two devices: at least three rounds, so some waited for a device
    assert max(h["end"] for h in held) - min(h["start"] for h in held) >= 3 * 0.6 - 0.05


def test_a_killed_jobs_device_is_free_again(tmp_path):
    record = tmp_path / "record.jsonl"
    env = environment(tmp_path, "only-gpu")
    holder = subprocess.Popen([sys.executable, "-c", JOB, str(record), "600"], env=env)
    lock = tmp_path / "locks" / "only-gpu.lock"
    deadline = time.monotonic() + 30
    while not (lock.exists() and "pid" in lock.read_text()):
        assert time.monotonic() < deadline and holder.poll() is None, "the first job never claimed the device"
        time.sleep(0.05)
    waiting = subprocess.Popen([sys.executable, "-c", JOB, str(record), "0"], env=env)
    time.sleep(1.0)
    assert waiting.poll() is None, "the second job ran while the first held the only device"
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock; the lock file stays
    holder.wait()
    assert waiting.wait(timeout=30) == 0
    assert lock.exists()
    assert [json.loads(line)["device"] for line in record.read_text().splitlines()] == ["only-gpu"]


def test_without_gpus_every_claim_is_the_cpu(monkeypatch):
    monkeypatch.delenv(runtime.FAKE_DEVICES_VARIABLE, raising=False)
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert runtime.claim_devices(2) == [runtime.Device("cpu", "cpu")] * 2


def test_asking_for_more_gpus_than_visible_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.FAKE_DEVICES_VARIABLE, "gpu-a")
    with pytest.raises(EmmitoError, match="2 GPUs asked for but this job sees 1"):
        runtime.claim_devices(2)
