"""A model that travels: a second project segments a new volume with the first project's checkpoint.

The tiny project trains its model once (and tunes its decoder, decoder.json
beside the checkpoint). A second project then sets ``model.checkpoint`` to that
file, ``train.volumes: []`` and no ``model`` architecture keys, and segments a
volume the first never saw, at half the pixel size (4 nm where the model was
trained on 8 nm: inference pools it by 2), to ``metrics.json``, with no train
job. Setting ``model.checkpoint`` together with ``train.volumes`` is a one-line
error, and so is a project with neither.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
import yaml
from tinyproject import EMMITO, TINY_CONFIG, make_project, snakemake

from emmito.contract import DOWNSAMPLE_XY, VOXEL_SIZE, Results, decoder_settings_beside

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

R = Results()
NEW = {"images": "data/new/images", "labels": "data/new/labels", "label_format": "vast", "voxel_size": [40, 4, 4]}
JOB = re.compile(r"^(?:local)?rule (\w+):$")


def jobs_listed(output: str) -> Counter:
    """{rule: count} of the jobs a ``snakemake -n`` output lists (rule all left out)."""
    return Counter(m.group(1) for line in output.splitlines() if (m := JOB.match(line)) and m.group(1) != "all")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The tiny project with its model trained (and its decoder tuned): nothing segmented."""
    project = make_project(tmp_path_factory.mktemp("first") / "project")
    snakemake(project, "--cores", "2", R.checkpoint("tiny"), R.decoder_settings("tiny"))
    return project


def second_project(folder: Path, trained: Path, **sections) -> Path:
    """A project beside ``trained`` that uses its checkpoint: only the keys a user would write."""
    project = make_project(folder, data_from=trained)
    subprocess.run([EMMITO, "synth", str(project / "data/new"), "--slices", "12", "--size", "128", "--seed", "21"],
                   check=True, capture_output=True, text=True)
    config = {
        "volumes": {"new": NEW},
        "model": {"name": "borrowed", "checkpoint": str(trained / R.checkpoint("tiny"))},
        "train": {"volumes": []},
        "infer": {"volumes": ["new"], "chunk_slices": 4},
        "merge": TINY_CONFIG["merge"],
        "segment": TINY_CONFIG["segment"],
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    (project / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return project


def test_a_checkpoint_from_another_project_segments_a_new_volume_without_training(tmp_path, trained):
    checkpoint = trained / R.checkpoint("tiny")
    assert Path(decoder_settings_beside(checkpoint)).exists()
    project = second_project(tmp_path / "second", trained)
    planned = jobs_listed(snakemake(project, "-n").stdout)
    assert "train" not in planned and "tune" not in planned and "report_training" not in planned, planned
    assert planned == Counter(
        convert=1, convert_labels=1, infer=3, merge=2, segment=2, trace=1, upsample=1, measure=1, suggest=1, export=1,
        ome_zarr=1, evaluate=1, report_volume=1, report_objects=1, report_scores=1, report_decoder=1,
    ), planned
    before = checkpoint.stat().st_mtime_ns
    snakemake(project, "--cores", "2")
    metrics = json.loads((project / R.metrics("new")).read_text())
    assert 0.0 <= metrics["voxel_iou"] <= 1.0 and 0.0 <= metrics["instance_f1"] <= 1.0
    assert not (project / R.model_dir("borrowed")).joinpath("checkpoint.pt").exists()
    assert checkpoint.stat().st_mtime_ns == before  # the borrowed checkpoint is read, never rewritten
    # 4 nm pixels, a model trained on 8 nm ones: the heat is at half the resolution, the segmentation at full.
    with h5py.File(project / R.heat_chunk("new", 0)) as heat:
        assert heat["main"].attrs[DOWNSAMPLE_XY] == 2 and heat["main"].shape[2:] == (64, 64)
        assert list(heat["main"].attrs[VOXEL_SIZE]) == [40, 8, 8]
    with h5py.File(project / R.seg("new")) as seg:
        assert seg["main"].shape == (12, 128, 128)
        assert np.unique(seg["main"][...]).size > 1, "the borrowed model found no object at all"
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(project, "-n"))


@pytest.mark.bad_input
def test_model_checkpoint_with_train_volumes_is_one_line(tmp_path, trained):
    project = second_project(tmp_path / "both", trained, volumes={"train": TINY_CONFIG["volumes"]["train"]},
                             train={"volumes": ["train"]})
    result = snakemake(project, "-n", check=False)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "model.checkpoint and train.volumes" in line]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "are both set" in lines[0] and f"set train.init_from: {trained / R.checkpoint('tiny')} instead" in lines[0]


@pytest.mark.bad_input
def test_no_training_volumes_and_no_checkpoint_says_what_works(tmp_path, trained):
    project = second_project(tmp_path / "neither", trained, model={"checkpoint": ""})
    result = snakemake(project, "-n", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "train.volumes is empty: name the labelled volumes to train on, or set model.checkpoint to a trained checkpoint" in output
