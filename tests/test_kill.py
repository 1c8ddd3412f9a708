"""Kill every stage at random moments: no final-named output is ever incomplete (issue #7).

Each stage's CLI runs in a process of its own and gets SIGKILL at a seeded
random moment of its run, many times. After every kill each output named by
the stage either does not exist or equals, dataset by dataset and attribute by
attribute (or byte for byte), the output of an uninterrupted run. A last
uninterrupted run into the same folder must leave no temporary file behind
(a killed writer's leftover is swept by the next write). SIGTERM (a cluster's
time limit) must remove the temporary file at once.

To kill the CLI many times in seconds rather than minutes, the processes are
forked from one server process that has imported emmito and torch once; each
fork runs ``emmito.cli.main`` exactly as the ``emmito`` command does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
from tinyproject import EMMITO

from emmito import contract, io

pytestmark = pytest.mark.slow

SEED = 7
KILLS_PER_STAGE = 6
# Forks a child per request and reaps it only when told to, so the pid we kill is
# always our own child (running or a zombie), never a reused pid.
SERVER = r"""
import json, os, sys
from emmito import cli, config, convert, evaluate, infer, merge, segment, trace, train, upsample  # noqa: F401
import torch._inductor  # noqa: F401  (torch.use_deterministic_algorithms imports it: 2 s per training run)
for line in sys.stdin:
    request = json.loads(line)
    if request == "reap":
        _, status = os.waitpid(child, 0)
        print(status, flush=True)
        continue
    child = os.fork()
    if child == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 1
        try:
            code = cli.main(request["argv"])
        except BaseException:  # os._exit below skips Python's own report: print it, for the test's message
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    print(child, flush=True)
"""


class StageServer:
    """Runs ``emmito.cli.main(argv)`` in forked processes that the test may kill."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, argv: list[str | Path], kill_after: float | None = None, sig: int = signal.SIGKILL) -> tuple[int, float]:
        """Run one stage -> (wait status, seconds); send ``sig`` after ``kill_after`` seconds if still running."""
        start = time.perf_counter()
        self.process.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(self.log)}) + "\n")
        self.process.stdin.flush()
        child = int(self.process.stdout.readline())
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(child, sig)  # our own child: running, or a zombie until reaped below
        self.process.stdin.write('"reap"\n')
        self.process.stdin.flush()
        status = int(self.process.stdout.readline())
        return status, time.perf_counter() - start

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def same_output(path: Path, reference: Path) -> bool:
    """HDF5: the same datasets, values, dtypes and attributes; anything else: the same bytes.

    The training log is compared without its wall-clock ``seconds``, the one thing in it
    that may differ between runs.
    """
    if path.suffix == ".jsonl":
        def without_time(p: Path) -> list[dict]:
            return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in p.read_text().splitlines()]

        return without_time(path) == without_time(reference)
    if path.suffix != ".h5":
        return path.read_bytes() == reference.read_bytes()
    with h5py.File(path, "r") as a, h5py.File(reference, "r") as b:
        if sorted(a) != sorted(b):
            return False
        for name in a:
            if a[name].dtype != b[name].dtype or not np.array_equal(a[name][()], b[name][()]):
                return False
            if {k: str(v) for k, v in a[name].attrs.items()} != {k: str(v) for k, v in b[name].attrs.items()}:
                return False
    return True


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp-*"))


# ---- the stages on a tiny volume ------------------------------------------------------------

MODEL = {"filters": [4, 8], "patch": [4, 32, 32], "conv3d_from_level": 1, "pool_z_from_level": 1}
PARAMS = {
    "seed": 0,
    "model": MODEL,
    "train": {"iterations": 4, "batch_size": 2, "val_every": 2, "warmup_iterations": 1, "threads": 1},
    "infer": {"chunk_slices": 4, "threads": 1},
    "merge": {"block_slices": 8, "block_overlap": 2},
    "segment": {"min_size": 20, "min_seed_size": 5},
}
DEPTH, SIZE = 16, 128


def heat_from_labels(labels: np.ndarray) -> np.ndarray:
    """A heatmap as a good network gives it: 230 inside objects, 0 on background and on shared borders."""
    heat = np.where(labels > 0, 230, 0).astype(np.uint8)
    border = np.zeros(labels.shape, bool)
    border[:, 1:] |= (labels[:, 1:] != labels[:, :-1]) & (labels[:, :-1] > 0) & (labels[:, 1:] > 0)
    heat[border] = 0
    return heat


def stage_commands(ref: Path, data: Path, out: Path) -> dict[str, tuple[list, list[str]]]:
    """Per stage: (argv writing into ``out``, reading from ``ref``; output names)."""
    params = json.dumps(PARAMS)
    blocks = [f"{ref}/seg_block_{b}.h5" for b in range(2)]
    return {
        "convert": (["convert", "--images", data / "images", "--labels", data / "labels", "--label-format", "vast",
                     "--voxel-size", "40", "8", "8", "--image-out", out / "image.h5", "--label-out", out / "label.h5"],
                    ["image.h5", "label.h5"]),
        "train": (["train", "--train", ref / "image.h5", ref / "label.h5", "--checkpoint", out / "checkpoint.pt",
                   "--metrics", out / "metrics.jsonl", "--params", params], ["checkpoint.pt", "metrics.jsonl"]),
        "infer": (["infer", ref / "image.h5", ref / "checkpoint.pt", out / "chunk_1.h5", "--chunk", "1", "--params", params],
                  ["chunk_1.h5"]),
        "merge": (["merge", out / "heat_block_0.h5", *[ref / "good" / f"chunk_{c}.h5" for c in range(3)], "--block", "0",
                   "--params", params], ["heat_block_0.h5"]),
        "segment": (["segment", ref / "heat_block_0.h5", out / "seg_block_0.h5", "--params", params], ["seg_block_0.h5"]),
        "trace": (["trace", out / "seg_infer.h5", out / "trace.json", *blocks, "--params", params],
                  ["seg_infer.h5", "trace.json"]),
        "upsample": (["upsample", ref / "seg_infer.h5", ref / "image.h5", out / "seg.h5"], ["seg.h5"]),
        "evaluate": (["evaluate", ref / "seg.h5", ref / "label.h5", out / "metrics.json"], ["metrics.json"]),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = StageServer(tmp_path_factory.mktemp("log") / "stage.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server) -> dict:
    """Every stage run once, uninterrupted: its outputs and how long it took."""
    root = tmp_path_factory.mktemp("kill")
    data, ref = root / "data", root / "ref"
    subprocess.run([EMMITO, "synth", data, "--slices", str(DEPTH), "--size", str(SIZE), "--seed", "5"], check=True, capture_output=True)
    ref.mkdir()
    durations: dict[str, float] = {}
    commands = stage_commands(ref, data, ref)
    for stage in ("convert", "train", "infer"):
        status, durations[stage] = server.run(commands[stage][0])
        assert status == 0, f"{stage} failed"
    # merge, segment and trace get the heat of a good network, so that they work on real objects.
    labels, _ = io.read_volume(ref / "label.h5")
    heat = heat_from_labels(labels)
    for c in range(DEPTH // 4):
        contract.fixture(ref / "good" / f"chunk_{c}.h5", "heat", heat[None, 4 * c : 4 * c + 4], offset=4 * c, volume_depth=DEPTH)
    for b in (0, 1):
        start, stop = 8 * b, min(8 * b + 10, DEPTH)
        contract.fixture(ref / f"heat_block_{b}.h5", "heat", heat[None, start:stop], offset=start, volume_depth=DEPTH)
    for stage in ("merge", "segment"):
        status, durations[stage] = server.run(commands[stage][0])
        assert status == 0, f"{stage} failed"
    status, _ = server.run(["segment", ref / "heat_block_1.h5", ref / "seg_block_1.h5", "--params", json.dumps(PARAMS)])
    assert status == 0
    for stage in ("trace", "upsample", "evaluate"):
        status, durations[stage] = server.run(commands[stage][0])
        assert status == 0, f"{stage} failed"
    seg, _ = io.read_volume(ref / "seg.h5")
    assert seg.max() >= 2, "the reference segmentation should hold objects"
    return {"root": root, "data": data, "ref": ref, "durations": durations}


@pytest.mark.parametrize("stage", ["convert", "train", "infer", "merge", "segment", "trace", "upsample", "evaluate"])
def test_sigkill_never_leaves_an_incomplete_output(stage, reference, server):
    rng = random.Random(f"{SEED}-{stage}")
    out = reference["root"] / "sigkill" / stage
    out.mkdir(parents=True)
    argv, names = stage_commands(reference["ref"], reference["data"], out)[stage]
    # Timed here, warm, over the same folder: the fixture's first runs paid for cold caches.
    status, duration = server.run(argv)
    assert status == 0
    for name in names:
        (out / name).unlink()
    killed = attempts = 0
    while killed < KILLS_PER_STAGE:
        attempts += 1
        assert attempts <= 4 * KILLS_PER_STAGE, f"{stage}: runs keep finishing before the kill ({killed} killed)"
        # Anywhere in the run: start-up, computing, writing, renaming, just after.
        status, _ = server.run(argv, kill_after=rng.uniform(0.0, duration))
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed += 1
        else:
            duration *= 0.8  # this machine ran it faster than timed: aim earlier
        for name in names:
            path = out / name
            if path.exists():
                assert same_output(path, reference["ref"] / name), f"{stage}: {name} exists but differs from an uninterrupted run"
                path.unlink()
    # A full run over the debris of the killed ones: the right outputs and no temporary file left.
    status, _ = server.run(argv)
    assert status == 0
    for name in names:
        assert same_output(out / name, reference["ref"] / name)
    assert temporaries(out) == [], f"{stage}: left {temporaries(out)}"


@pytest.mark.parametrize("stage", ["train", "segment", "upsample"])
def test_sigterm_removes_the_temporary_file_at_once(stage, reference, server):
    """SLURM's time limit and scancel send SIGTERM first: the stage cleans up before it ends."""
    rng = random.Random(f"{SEED}-term-{stage}")
    out = reference["root"] / "sigterm" / stage
    out.mkdir(parents=True)
    argv, names = stage_commands(reference["ref"], reference["data"], out)[stage]
    status, duration = server.run(argv)  # warm timing, as above
    assert status == 0
    terminated = 0
    for _ in range(3):
        status, _ = server.run(argv, kill_after=rng.uniform(0.3, 0.9) * duration, sig=signal.SIGTERM)
        log = server.log.read_text()[-2000:]
        if os.WIFSIGNALED(status):  # before emmito.cli.main set its handler: nothing written yet
            assert os.WTERMSIG(status) == signal.SIGTERM, f"{stage}: wait status {status}:\n{log}"
        else:
            assert os.WEXITSTATUS(status) in (0, 128 + signal.SIGTERM), f"{stage}: wait status {status}:\n{log}"
            if os.WEXITSTATUS(status):
                terminated += 1
                assert log.rstrip().splitlines()[-1].startswith(f"emmito {stage}: terminated (SIGTERM)"), log
        assert temporaries(out) == [], f"{stage}: SIGTERM left {temporaries(out)}"
        for name in names:
            if (out / name).exists():
                assert same_output(out / name, reference["ref"] / name)
                (out / name).unlink()
    assert terminated >= 1, f"{stage}: SIGTERM never arrived during a run"
