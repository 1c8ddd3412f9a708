"""Data-parallel training (train.devices > 1): the ranks' run equals one process's, its checkpoint infers, a kill resumes.

On the CPU, ``train.devices: 2`` runs two gloo ranks (``emmito.distributed``),
each on half of the global batch. The per-iteration losses must equal those of
one process with the whole batch (the loss is the global batch's, not a mean of
the ranks' losses: ``test_the_loss_is_not_a_mean_of_the_ranks_losses`` shows
that the two differ by far more than the tolerance); the checkpoint loads in a
single-process ``emmito infer``; a SIGKILLed run takes its ranks with it and
its rerun resumes to the uninterrupted run's weights; a failing rank fails the
command with one line, without waiting for the others.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tinyproject import EMMITO, blob_volume, make_project, snakemake

from emmito import contract, io
from emmito.cli import main
from emmito.config import section_defaults
from emmito.distributed import Rank, check_split, launch, resolve_devices
from emmito.io import EmmitoError
from emmito.runtime import FAKE_DEVICES_VARIABLE, Device

pytestmark = pytest.mark.ddp

MODEL = {"filters": [4, 8], "patch": [4, 16, 16], "conv3d_from_level": 1, "pool_z_from_level": 1}
# 30 iterations: the kill test needs a run long enough to be killed in the middle of.
TRAIN = {"iterations": 30, "batch_size": 4, "val_every": 10, "warmup_iterations": 2, "threads": 1, "save_every": 2}
TOLERANCE = 1e-5  # relative, per iteration's loss
CPU_RANKS = [Device("cpu", "cpu")] * 2


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> dict[str, Path]:
    """A 12-slice image with two labelled blobs, as image.h5 / label.h5."""
    return blob_volume(tmp_path_factory.mktemp("ddp"))


def train_argv(volume: dict[str, Path], out: Path, devices: int) -> list[str]:
    params = json.dumps({"seed": 0, "model": MODEL, "train": {**TRAIN, "devices": devices}})
    return ["train", "--train", str(volume["image"]), str(volume["label"]), "--val", str(volume["image"]),
            str(volume["label"]), "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "metrics.jsonl"),
            "--params", params]


@pytest.fixture(scope="module")
def runs(volume, tmp_path_factory) -> dict[int, Path]:
    """{devices: output folder} of ``emmito train`` with 1 device and with 2 CPU ranks, one config."""
    outs = {}
    for devices in (1, 2):
        out = tmp_path_factory.mktemp(f"devices{devices}")
        assert main(train_argv(volume, out, devices)) == 0
        outs[devices] = out
    return outs


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, TRAIN["iterations"] + 1))  # rank 0 alone logs
    return [r["loss"] for r in records]


def state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)[contract.CHECKPOINT_STATE]


def test_two_ranks_log_the_losses_of_one_process_with_the_whole_batch(runs):
    single, ddp = losses(runs[1]), losses(runs[2])
    relative = [abs(a - b) / abs(a) for a, b in zip(single, ddp)]
    print(f"max relative loss difference over {len(relative)} iterations: {max(relative):.3g}", file=sys.stderr)
    assert max(relative) <= TOLERANCE, relative
    assert len(set(single)) > 1  # the losses move: the weights were updated in step
    a, b = state(runs[1]), state(runs[2])
    assert set(a) == set(b) and not any(key.startswith("module.") for key in b)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    checkpoint = torch.load(runs[2] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint[contract.CHECKPOINT_TRAIN_CONFIG]["devices"] == 2
    assert not (runs[2] / "checkpoint.pt.resume").exists()


def test_the_loss_is_not_a_mean_of_the_ranks_losses():
    """Why the ranks gather their outputs: class-balanced BCE + Dice of the batch is no mean of its halves'."""
    from emmito.losses import TrainingLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 4, 16, 16, generator=generator)
    target = (torch.rand(4, 1, 4, 16, 16, generator=generator) < torch.tensor([0.05, 0.1, 0.4, 0.6])[:, None, None, None, None]).float()
    loss = TrainingLoss("binary", section_defaults("train"))
    whole = float(loss(logits, [], target).loss)
    halves = (float(loss(logits[:2], [], target[:2]).loss) + float(loss(logits[2:], [], target[2:]).loss)) / 2
    assert abs(whole - halves) / whole > 100 * TOLERANCE


def test_a_data_parallel_checkpoint_infers_in_one_process(runs, volume, tmp_path):
    heat = {}
    for devices, out in runs.items():
        heat[devices] = tmp_path / f"heat{devices}.h5"
        argv = ["infer", str(volume["image"]), str(out / "checkpoint.pt"), str(heat[devices]), "--chunk", "0",
                "--params", json.dumps({"infer": {"chunk_slices": 6, "threads": 1}})]
        assert main(argv) == 0
    ddp, single = io.read_volume(heat[2])[0], io.read_volume(heat[1])[0]
    assert ddp.shape == single.shape and ddp.shape[1:] == (6, 32, 32)
    assert np.abs(ddp.astype(int) - single.astype(int)).max() <= 1  # the same weights up to rounding
    assert ddp.max() > ddp.min()


def _children(pid: int, marker: bytes = b"spawn_main") -> list[int]:
    """The processes whose parent is ``pid`` and whose command line holds ``marker`` (the ranks: spawned)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_run_takes_its_ranks_along_and_its_rerun_resumes_exactly(runs, volume, tmp_path):
    out = tmp_path / "killed"
    resume = out / "checkpoint.pt.resume"
    job = subprocess.Popen([EMMITO, *train_argv(volume, out, 2)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not resume.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    ranks = _children(job.pid)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert resume.exists() and not (out / "checkpoint.pt").exists(), job.stderr.read().decode()[-2000:]
    assert len(ranks) == 2
    for _ in range(200):  # PR_SET_PDEATHSIG: the kernel kills the ranks with their parent
        if not any(_alive(pid) for pid in ranks):
            break
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in ranks), "a rank outlived its killed parent"
    saved = torch.load(resume, map_location="cpu", weights_only=False)["iteration"]
    assert 2 <= saved < TRAIN["iterations"]

    assert main(train_argv(volume, out, 2)) == 0
    resumed, uninterrupted = state(out), state(runs[2])
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # 2 ranks: bit for bit
    assert losses(out) == losses(runs[2])


# ---- failures ---------------------------------------------------------------------------------


class FailingJob:
    """Rank 1 fails (``how``); rank 0 waits at a barrier it would wait at for an hour."""

    def __init__(self, how: str):
        self.how = how

    def __call__(self, rank: Rank) -> None:
        import torch.distributed as dist

        if rank.rank == 1:
            if self.how == "raise":
                raise RuntimeError("boom\nsecond line")
            if self.how == "mistake":
                raise EmmitoError("image.h5: not a volume: rerun 'emmito convert'")
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "how, message",
    [
        ("raise", "training rank 1 of 2 failed: RuntimeError: boom"),
        ("mistake", "image.h5: not a volume: rerun 'emmito convert'"),
        ("kill", "training rank 1 of 2 failed: killed by signal 9 (SIGKILL; out of memory?)"),
    ],
)
def test_a_failing_rank_fails_the_run_at_once_in_one_line(how, message):
    started = time.monotonic()
    with pytest.raises(EmmitoError) as error:
        launch(CPU_RANKS, FailingJob(how))
    assert str(error.value) == message
    assert time.monotonic() - started < 60  # not the collective timeout: rank 0 was stopped


@pytest.mark.bad_input
def test_devices_that_cannot_split_the_batch_or_sync_batchnorm_are_one_line_errors(monkeypatch):
    with pytest.raises(EmmitoError, match=r"^train.batch_size 6 does not split over train.devices 4: make"):
        check_split(6, 4, "group")
    check_split(8, 4, "group")
    check_split(6, 1, "batch")
    monkeypatch.delenv(FAKE_DEVICES_VARIABLE, raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(EmmitoError, match="SyncBatchNorm runs on GPUs only"):
            check_split(8, 2, "batch")


def test_auto_is_every_visible_device_and_one_without_any(monkeypatch):
    monkeypatch.setenv(FAKE_DEVICES_VARIABLE, "a,b,c")
    assert resolve_devices("auto") == 3 and resolve_devices(2) == 2
    monkeypatch.delenv(FAKE_DEVICES_VARIABLE)
    assert resolve_devices("auto") == (torch.cuda.device_count() or 1)


def test_the_schema_takes_a_count_or_auto():
    from emmito.config import key_stages, validate_sections

    assert section_defaults("train")["devices"] == 1
    assert validate_sections({"train": {"devices": "auto"}})["train"]["devices"] == "auto"
    assert key_stages("train.devices") == ["train"]  # a param: the count changes the checkpoint's bytes
    for wrong in (0, "all", 1.5):
        with pytest.raises(EmmitoError, match="train.devices"):
            validate_sections({"train": {"devices": wrong}})


@pytest.mark.workflow
@pytest.mark.slow
def test_the_train_rule_reserves_train_devices_gpus_and_refuses_auto(tmp_path):
    project = make_project(tmp_path / "project", {"train": {"volumes": ["train"], "batch_size": 4, "devices": 2}})
    plan = snakemake(project, "-n", "--cores", "2", "train").stdout
    train_job = plan[plan.index("rule train:"):].split("\n\n")[0]
    assert re.search(r"resources: .*\bgpu=2\b", train_job), train_job
    config = yaml.safe_load((project / "config.yaml").read_text())
    for devices, message in (("auto", "train.devices auto: the train job must reserve its GPUs"),
                             (3, "train.batch_size 4 does not split over train.devices 3")):
        config["train"]["devices"] = devices
        (project / "config.yaml").write_text(yaml.safe_dump(config))
        result = snakemake(project, "-n", "--cores", "2", check=False)
        assert result.returncode != 0 and message in result.stderr + result.stdout


# ---- GPUs only ----------------------------------------------------------------------------------


class BatchNormLosses:
    """Train with model.norm batch on ``rank`` (SyncBatchNorm) and write rank 0's losses to ``out``."""

    def __init__(self, params: dict, out: Path):
        self.params, self.out = params, out

    def __call__(self, rank: Rank) -> None:
        from emmito.train import train_model
        from test_train import blob_volume

        _, metrics = train_model([blob_volume(0)], [], self.params, progress=False, rank=rank)
        if rank.is_main:
            self.out.write_text(json.dumps([m["loss"] for m in metrics]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs GPUs (torch runs it on CUDA only); NCCL one per rank")
def test_sync_batchnorm_on_two_gpus_gives_the_losses_of_one(tmp_path):
    from emmito.train import train_model
    from test_train import blob_volume, params

    cfg = params(iterations=5, batch_size=4)
    cfg["model"]["norm"] = "batch"
    _, metrics = train_model([blob_volume(0)], [], cfg, device="cuda:0", progress=False)
    launch([Device("gpu0", "cuda:0"), Device("gpu1", "cuda:1")], BatchNormLosses({**cfg, "train": {**cfg["train"], "devices": 2}}, tmp_path / "l.json"))
    ddp = json.loads((tmp_path / "l.json").read_text())
    assert max(abs(a["loss"] - b) / a["loss"] for a, b in zip(metrics, ddp)) < 1e-3  # bf16 autocast on CUDA
