"""Shared pytest fixtures. Its folder (tests/) is on sys.path, so tests can import tinyproject."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

# ---- SLURM (tests/test_slurm.py) ---------------------------------------------------------

SLURM_PARTITIONS = ("cpu", "gpu")
SLURM_NOT_RUNNING = "SLURM not running: start it with sudo tests/slurm/start-slurm.sh"


def slurm_partitions() -> set[str] | None:
    """Partitions of the SLURM cluster that answers `sinfo`, or None when none answers."""
    if shutil.which("sinfo") is None:
        return None
    try:
        # Without a controller sinfo retries for ~10 s before it gives up.
        result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    return {line.strip().rstrip("*") for line in result.stdout.splitlines() if line.strip()}


@pytest.fixture(scope="session")
def slurm_cluster() -> set[str]:
    """A running SLURM cluster with partitions cpu and gpu; skips the test otherwise.

    Tests never install or start SLURM themselves: .ci/run starts it before pytest.
    """
    partitions = slurm_partitions()
    if partitions is None:
        pytest.skip(SLURM_NOT_RUNNING)
    missing = [p for p in SLURM_PARTITIONS if p not in partitions]
    if missing:
        pytest.skip(
            f"SLURM answers but lacks partition(s) {', '.join(missing)} (has {', '.join(sorted(partitions))}): "
            "use the cluster of sudo tests/slurm/start-slurm.sh"
        )
    return partitions


# ---- torch ------------------------------------------------------------------------------


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny convolutions on a shared 2-core machine run several times faster so."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
