"""Crash snakemake itself, again and again; the rerun ends with the same bytes (issue #7).

The tiny demo workflow runs once uninterrupted (the reference). A second copy
is started 10 times and each time SIGKILLed, with all its jobs (its whole
process group, as when a login node or a tmux session dies), at a seeded random
moment inside a job of a chosen rule: the 10 kills walk down the pipeline
(convert ... evaluate) so that every stage is hit, each at a random point of
its job's reference run time. Between kills, every final-named HDF5 file that
exists must open and read in full. Then ``snakemake --unlock`` and ``snakemake --rerun-incomplete``
run it to the end: ``seg.h5``'s ``main`` and ``metrics.json`` must be
byte-identical to the reference.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
from tinyproject import BIN, SNAKEMAKE, make_project, snakemake

from emmito import io

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

SEED = 2026
KILLS = 10
# Two chunks and two blocks: every stage runs, in as few jobs as keeps tracing across blocks.
OVERRIDES = {"infer": {"chunk_slices": 10}, "merge": {"block_slices": 10, "block_overlap": 2}}
TARGETS = ("results/deploy/seg.h5", "results/deploy/metrics.json")
# The rule whose job each kill lands in, in pipeline order.
KILL_IN = ("convert", "convert_labels", "train", "train", "infer", "merge", "segment", "trace", "upsample", "evaluate")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float]:
    project = make_project(tmp_path_factory.mktemp("crash") / "reference", OVERRIDES)
    start = time.perf_counter()
    snakemake(project, "--cores", "2", *TARGETS)
    return project, time.perf_counter() - start


def start_snakemake(project: Path, log: Path) -> subprocess.Popen:
    """snakemake --rerun-incomplete in a process group of its own (its jobs inherit it)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [SNAKEMAKE, "--cores", "2", "--rerun-incomplete", *TARGETS],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def job_seconds(project: Path, rule: str) -> float:
    """The longest run time of ``rule``'s jobs in ``project``, from their Snakemake benchmark files."""
    files = list((project / "results").glob(f"benchmarks/{rule}/**/*.tsv")) or list((project / "results").glob(f"model/*/{rule}.benchmark.tsv"))
    assert files, f"no benchmark of rule {rule}"
    return max(float(path.read_text().splitlines()[1].split("\t")[0]) for path in files)


def wait_for_job(log: Path, offset: int, rule: str, process: subprocess.Popen, timeout: float) -> bool:
    """Wait until this run of snakemake (its log from ``offset``) starts a job of ``rule``; False if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with open(log, "rb") as f:
            f.seek(offset)
            if f"localrule {rule}:".encode() in f.read():
                return True
        time.sleep(0.05)
    return False


def group_alive(group: int) -> bool:
    """Whether any process is left in process group ``group`` (a zombie counts as gone)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL snakemake and every job it started (the group we created for it); wait until all are gone."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while group_alive(process.pid):
        assert time.monotonic() < deadline, "jobs of the killed snakemake are still running"
        time.sleep(0.05)


def finished_files_are_complete(project: Path) -> int:
    """Read every final-named HDF5 under results/ in full; returns how many there were."""
    count = 0
    for path in (project / "results").rglob("*.h5"):
        if path.name.startswith("."):
            continue  # a temporary file: never taken for an output
        with h5py.File(path, "r") as f:
            for name in f:
                f[name][()]  # raises on a truncated or half-written file
        io.read_volume(path)
        count += 1
    return count


def main_chunks(path: Path) -> tuple[tuple, str, list[bytes]]:
    """(shape, dtype, the compressed bytes of every chunk) of ``path``'s ``main``."""
    with h5py.File(path, "r") as f:
        ds = f["main"]
        chunks = [ds.id.read_direct_chunk(c.chunk_offset)[1] for c in (ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks()))]
        return ds.shape, str(ds.dtype), chunks


def test_killed_ten_times_then_rerun_gives_the_same_bytes(tmp_path, reference):
    ref_project, ref_seconds = reference
    project = make_project(tmp_path / "crashed", OVERRIDES, data_from=ref_project)
    log = tmp_path / "snakemake.log"
    rng = random.Random(SEED)
    assert len(KILL_IN) == KILLS
    killed = []
    for rule in KILL_IN:
        if any((project / ".snakemake" / "locks").glob("*")):
            snakemake(project, "--unlock")  # the killed run's lock: what a user does after a crash
        offset = log.stat().st_size if log.exists() else 0
        process = start_snakemake(project, log)
        if wait_for_job(log, offset, rule, process, timeout=ref_seconds):
            time.sleep(rng.uniform(0.0, job_seconds(ref_project, rule)))
        if process.poll() is None:
            kill_group(process)
            killed.append(rule)
        else:
            process.wait()
        finished_files_are_complete(project)
    assert len(killed) >= KILLS - 2, f"only {killed} of {KILL_IN} were killed before their job finished"

    if any((project / ".snakemake" / "locks").glob("*")):
        snakemake(project, "--unlock")
    snakemake(project, "--cores", "2", "--rerun-incomplete", *TARGETS)
    dry = snakemake(project, "-n", *TARGETS)
    assert "Nothing to be done" in dry.stdout + dry.stderr

    seg, ref_seg = project / TARGETS[0], ref_project / TARGETS[0]
    assert main_chunks(seg) == main_chunks(ref_seg), "seg.h5 main differs from the uninterrupted run"
    values = io.read_volume(seg)[0]
    assert np.array_equal(values, io.read_volume(ref_seg)[0]) and values.max() > 0
    metrics = (project / TARGETS[1]).read_bytes()
    assert metrics == (ref_project / TARGETS[1]).read_bytes(), "metrics.json differs from the uninterrupted run"
    assert not list((project / "results").rglob(".*.tmp-*")), "temporary files left after the rerun"
