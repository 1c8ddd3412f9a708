"""Same config and seed, same bytes (issue #7): checkpoints on CPU, heatmaps, segmentations.

``emmito train`` twice with one config and seed (and any ``train.workers``) gives byte-identical
checkpoint files (torch.save through memory, so the temporary file name does
not end up in the zip; deterministic algorithms on CPU), whatever the output
folder. Inference and segmentation give byte-identical HDF5 files, and the
segmentation is the same for any thread count. The whole workflow's
byte-identity after crashes is tests/workflow/test_crash_rerun.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyproject import blob_volume

from emmito import io
from emmito.cli import main
from emmito.contract import fixture

MODEL = {"filters": [4, 8], "patch": [4, 16, 16], "conv3d_from_level": 1, "pool_z_from_level": 1}
TRAIN = {"iterations": 3, "batch_size": 2, "val_every": 2, "warmup_iterations": 1, "threads": 1}


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> dict[str, Path]:
    """A 12-slice image with two labelled blobs, as image.h5 / label.h5, plus a validation pair."""
    return blob_volume(tmp_path_factory.mktemp("det"))


def train_cli(volume: dict[str, Path], out: Path, seed: int = 0, threads: int = 1, workers: int = 1) -> Path:
    params = json.dumps({"seed": seed, "model": MODEL, "train": {**TRAIN, "threads": threads, "workers": workers}})
    status = main(["train", "--train", str(volume["image"]), str(volume["label"]), "--val", str(volume["image"]),
                   str(volume["label"]), "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "metrics.jsonl"),
                   "--params", params])
    assert status == 0
    return out / "checkpoint.pt"


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_same_config_and_seed_give_a_byte_identical_checkpoint(tmp_path, volume):
    first = train_cli(volume, tmp_path / "a")
    second = train_cli(volume, tmp_path / "elsewhere" / "b")
    assert first.read_bytes() == second.read_bytes()
    a, b = state(first), state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_is_byte_identical_for_any_worker_count(tmp_path, volume):
    """train.workers moves the batches' making off the loop; every sample is its (seed, iteration, index)'s alone."""
    files = [train_cli(volume, tmp_path / f"workers{workers}", workers=workers).read_bytes() for workers in (0, 1, 2)]
    assert files[0] == files[1] == files[2]


def test_another_seed_gives_other_weights(tmp_path, volume):
    """The check above can fail: the seed does reach the weights."""
    a, b = state(train_cli(volume, tmp_path / "a", seed=0)), state(train_cli(volume, tmp_path / "b", seed=1))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_training_with_other_thread_counts_stays_close(tmp_path, volume):
    """CPU threads split float sums differently: the same weights up to rounding, not bit for bit.

    Bit-identical checkpoints need the same train.threads (0 = the job's cores,
    so the same SLURM request), as the workflow gives each rerun.
    """
    a, b = state(train_cli(volume, tmp_path / "a", threads=1)), state(train_cli(volume, tmp_path / "b", threads=2))
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, volume) -> Path:
    return train_cli(volume, tmp_path_factory.mktemp("ckpt"))


def test_inference_gives_byte_identical_heat_files(tmp_path, volume, checkpoint):
    params = json.dumps({"model": MODEL, "infer": {"chunk_slices": 4, "threads": 1}})
    outs = [tmp_path / "a" / "chunk_1.h5", tmp_path / "b" / "chunk_1.h5"]
    for out in outs:
        assert main(["infer", str(volume["image"]), str(checkpoint), str(out), "--chunk", "1", "--params", params]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    heat, attrs = io.read_volume(outs[0])
    assert heat.shape == (1, 4, 32, 32) and attrs["offset"] == 4


def heat_of_blobs() -> np.ndarray:
    """(1, 12, 48, 48) uint8: three blobs, two of them touching, so the watershed has work to do."""
    z, y, x = np.indices((12, 48, 48))
    heat = np.zeros((12, 48, 48))
    for cz, cy, cx in ((6, 14, 14), (6, 14, 27), (5, 34, 32)):
        heat = np.maximum(heat, np.exp(-(((z - cz) / 4) ** 2 + ((y - cy) / 6) ** 2 + ((x - cx) / 6) ** 2)))
    return np.round(heat * 255).astype(np.uint8)[None]


def test_segmentation_is_byte_identical_for_any_thread_count(tmp_path):
    heat = tmp_path / "heat.h5"
    fixture(heat, "heat", heat_of_blobs(), voxel_size=[40, 8, 8], channels=["foreground"], volume_depth=12, downsample_xy=1)
    outs = []
    for threads in (1, 2, 1):
        outs.append(tmp_path / f"t{threads}-{len(outs)}" / "seg.h5")
        params = json.dumps({"segment": {"threads": threads, "min_size": 20, "min_seed_size": 5}})
        assert main(["segment", str(heat), str(outs[-1]), "--params", params]) == 0
    assert outs[0].read_bytes() == outs[2].read_bytes(), "the same run twice must give the same file"
    labels = [io.read_volume(out)[0] for out in outs]
    assert labels[0].max() >= 2, "the blobs should give several objects"
    assert np.array_equal(labels[0], labels[1]), "1 and 2 threads must give the same labels"
