"""Partly labelled volumes (a proofread crop): labels_offset and valid -> label.h5 with its 'valid' mask."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import cc3d
import h5py
import numpy as np
import pytest
from formats import hdf5, png_slices

from emmito import config as cfg
from emmito import contract, convert
from emmito.convert import convert_stack
from emmito.io import EmmitoError, read_volume

IMAGE_SHAPE = (10, 24, 32)


def images(tmp_path: Path) -> str:
    values = (np.arange(np.prod(IMAGE_SHAPE)) % 200 + 20).astype(np.uint8).reshape(IMAGE_SHAPE)
    return png_slices(tmp_path / "images", values)


def crop_ids(shape=(4, 10, 12)) -> np.ndarray:
    ids = np.zeros(shape, np.uint16)
    ids[:, 2:5, 2:6] = 3
    ids[1:3, 6:9, 7:11] = 900
    return ids


def valid_box(path: Path) -> list[int]:
    with h5py.File(path, "r") as f:
        return [int(v) for v in f[contract.DATASET].attrs[contract.VALID_BOX]]


def valid_mask(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[contract.VALID_MASK][...]


def test_a_crop_lands_at_its_offset_with_nothing_labelled_outside(tmp_path, monkeypatch):
    monkeypatch.setattr(convert.sources, "MAX_SLAB_SLICES", 1)  # several slabs through the offset writes
    ids = crop_ids()
    summary = convert_stack(
        images(tmp_path), voxel_size=(40, 8, 8), label_paths=png_slices(tmp_path / "crop", ids),
        label_format="instance", label_out=tmp_path / "label.h5", labels_offset=(3, 5, 7),
    )
    labels, _ = read_volume(tmp_path / "label.h5")
    assert labels.shape == IMAGE_SHAPE and labels.dtype == np.uint32
    expected = np.zeros(IMAGE_SHAPE, np.uint32)
    expected[3:7, 5:15, 7:19] = ids
    assert np.array_equal(labels, expected)
    box = np.zeros(IMAGE_SHAPE, np.uint8)
    box[3:7, 5:15, 7:19] = 1
    mask = valid_mask(tmp_path / "label.h5")
    assert mask.dtype == np.uint8 and np.array_equal(mask, box)
    assert valid_box(tmp_path / "label.h5") == [3, 5, 7, 7, 15, 19] == summary["valid_box"]
    assert summary["valid_voxels"] == 4 * 10 * 12
    with h5py.File(tmp_path / "label.h5", "r") as f:  # stored as main is
        assert f[contract.VALID_MASK].chunks == f[contract.DATASET].chunks
        assert f[contract.VALID_MASK].compression_opts == f[contract.DATASET].compression_opts


def test_a_valid_source_restricts_the_mask_and_keeps_the_labels_outside_it(tmp_path):
    ids = crop_ids()
    valid = np.zeros(ids.shape, np.uint8)
    valid[1] = 255  # only slices 1 and 2 of the box were proofread
    valid[2, 3:7, 4:9] = 1
    convert_stack(
        images(tmp_path), voxel_size=(40, 8, 8), label_paths=hdf5(tmp_path / "crop.h5", "main", ids),
        label_format="instance", label_out=tmp_path / "label.h5", labels_offset=[2, 0, 1],
        valid_paths=png_slices(tmp_path / "valid", valid),
    )
    labels, _ = read_volume(tmp_path / "label.h5")
    assert np.array_equal(labels[2:6, 0:10, 1:13], ids)  # context outside the mask kept as given
    expected = np.zeros(IMAGE_SHAPE, np.uint8)
    expected[2:6, 0:10, 1:13] = valid != 0
    assert np.array_equal(valid_mask(tmp_path / "label.h5"), expected)
    assert valid_box(tmp_path / "label.h5") == [3, 0, 1, 5, 10, 13]


def test_a_valid_mask_alone_covers_the_whole_volume(tmp_path):
    ids = np.zeros(IMAGE_SHAPE, np.uint8)
    ids[4:7, 3:9, 3:9] = 255
    valid = np.zeros(IMAGE_SHAPE, np.uint8)
    valid[4:6] = 1
    summary = convert_stack(
        images(tmp_path), voxel_size=(40, 8, 8), label_paths=png_slices(tmp_path / "labels", ids),
        label_format="binary", label_out=tmp_path / "label.h5", valid_paths=png_slices(tmp_path / "valid", valid),
    )
    assert np.array_equal(valid_mask(tmp_path / "label.h5"), valid)
    assert summary["valid_box"] == [4, 0, 0, 6, 24, 32] and summary["objects"] == 1


def test_binary_labels_in_a_crop_become_components(tmp_path):
    rng = np.random.default_rng(4)
    mask = rng.random((6, 12, 14)) > 0.6
    convert_stack(
        images(tmp_path), voxel_size=(40, 8, 8), label_paths=png_slices(tmp_path / "crop", mask.astype(np.uint8) * 255),
        label_format="binary", label_out=tmp_path / "label.h5", labels_offset=(1, 2, 3),
    )
    labels, _ = read_volume(tmp_path / "label.h5")
    expected = np.zeros(IMAGE_SHAPE, np.uint32)
    expected[1:7, 2:14, 3:17] = mask
    assert np.array_equal(labels, cc3d.connected_components(expected, connectivity=convert.LABEL_CONNECTIVITY))
    assert labels.max() > 1


@pytest.mark.bad_input
def test_a_crop_that_does_not_fit_is_refused_before_anything_is_written(tmp_path):
    crop = png_slices(tmp_path / "crop", crop_ids())  # 4x10x12
    with pytest.raises(EmmitoError, match=r"labels \(.*crop\) are 4x10x12 at offset \[8, 0, 0\] but the images "
                       r"\(.*images\) are 10x24x32 .*the crop must fit inside the images; fix volumes.<name>.labels_offset"):
        convert_stack(images(tmp_path), voxel_size=(40, 8, 8), image_out=tmp_path / "image.h5", label_paths=crop,
                      label_format="instance", label_out=tmp_path / "label.h5", labels_offset=(8, 0, 0))
    assert not (tmp_path / "label.h5").exists() and not (tmp_path / "image.h5").exists()
    # Through the CLI: one line.
    emmito = str(Path(sys.executable).parent / "emmito")
    result = subprocess.run(
        [emmito, "convert", "--images", str(tmp_path / "images"), "--labels", crop, "--label-format", "instance",
         "--labels-offset", "0", "20", "0", "--label-out", str(tmp_path / "label.h5")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "at offset [0, 20, 0]" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "label.h5").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("mask, message", [
    (np.ones((4, 10, 11), np.uint8), r"the valid mask \(.*valid\) is 4x10x11 but the labels \(.*crop\) are 4x10x12"),
    (np.zeros((4, 10, 12), np.uint8), r"is 0 everywhere"),
], ids=["another shape", "no labelled voxel"])
def test_a_bad_valid_mask_is_refused_and_nothing_is_written(tmp_path, mask, message):
    with pytest.raises(EmmitoError, match=message):
        convert_stack(images(tmp_path), voxel_size=(40, 8, 8), label_paths=png_slices(tmp_path / "crop", crop_ids()),
                      label_format="instance", label_out=tmp_path / "label.h5", labels_offset=(0, 0, 0),
                      valid_paths=png_slices(tmp_path / "valid", mask))
    assert list(tmp_path.glob("label.h5*")) == []


def test_a_fully_labelled_volume_is_written_as_before(tmp_path):
    mask = np.zeros(IMAGE_SHAPE, np.uint8)
    mask[2:5, 3:9, 4:12] = 255
    arguments = dict(voxel_size=(40, 8, 8), label_paths=png_slices(tmp_path / "labels", mask), label_format="binary")
    summary = convert_stack(images(tmp_path), label_out=tmp_path / "plain.h5", **arguments)
    again = convert_stack(images(tmp_path), label_out=tmp_path / "again.h5", labels_offset=None, valid_paths=None, **arguments)
    assert (tmp_path / "plain.h5").read_bytes() == (tmp_path / "again.h5").read_bytes()
    assert "valid_box" not in summary and summary == again
    with h5py.File(tmp_path / "plain.h5", "r") as f:
        assert list(f) == [contract.DATASET] and contract.VALID_BOX not in f[contract.DATASET].attrs
    # The same labels as a crop covering everything: the same ids, plus the mask.
    convert_stack(images(tmp_path), label_out=tmp_path / "crop.h5", labels_offset=(0, 0, 0), **arguments)
    assert np.array_equal(read_volume(tmp_path / "crop.h5")[0], read_volume(tmp_path / "plain.h5")[0])
    assert valid_mask(tmp_path / "crop.h5").all()


def test_cli_prints_where_the_labels_are_valid(tmp_path):
    emmito = str(Path(sys.executable).parent / "emmito")
    result = subprocess.run(
        [emmito, "convert", "--images", images(tmp_path), "--labels", png_slices(tmp_path / "crop", crop_ids()),
         "--label-format", "instance", "--labels-offset", "3", "5", "7", "--label-out", str(tmp_path / "label.h5")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "valid in 3:7, 5:15, 7:19 (480 voxels)" in result.stderr
    assert valid_box(tmp_path / "label.h5") == [3, 5, 7, 7, 15, 19]


# ---- evaluate refuses a partly labelled label.h5 --------------------------------------------


@pytest.mark.bad_input
def test_evaluate_refuses_a_partly_labelled_volume(tmp_path):
    from emmito.evaluate import evaluate_files

    convert_stack(images(tmp_path), voxel_size=(40, 8, 8), label_paths=png_slices(tmp_path / "crop", crop_ids()),
                  label_format="instance", label_out=tmp_path / "label.h5", labels_offset=(0, 0, 0))
    with pytest.raises(EmmitoError, match=r"label.h5 is labelled only in part \(its 'valid' mask\): evaluate needs a fully labelled volume"):
        evaluate_files(tmp_path / "label.h5", tmp_path / "label.h5", 0.5, 8)


# ---- config ---------------------------------------------------------------------------------


def volumes_config(**crop) -> dict:
    return {
        "volumes": {
            "full": {"images": "data/full/images", "labels": "data/full/labels"},
            "crop": {"images": "data/full/images", "labels": "data/crop/labels", **crop},
        },
        "train": {"volumes": ["full", "crop"]},
    }


def test_partly_labelled_keys_validate_without_defaults():
    config = cfg.validate(volumes_config(labels_offset=[1, 2, 3], valid="data/crop/valid"))
    assert "labels_offset" not in config["volumes"]["full"] and "valid" not in config["volumes"]["full"]
    assert cfg.partly_labelled(config["volumes"]["crop"]) and not cfg.partly_labelled(config["volumes"]["full"])
    # An old config's convert params are what they were: no new key appears.
    old = cfg.validate(volumes_config())
    assert cfg.stage_params(old, "convert")["volumes"]["crop"] == {
        "images": "data/full/images", "labels": "data/crop/labels", "label_format": "binary", "voxel_size": [40, 8, 8]
    }


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change, match",
    [
        ({"volumes": {"crop": {"labels_offset": [1, -2, 3]}}}, r"key 'volumes.crop.labels_offset.1' is -2, out of range: it must be >= 0"),
        ({"volumes": {"crop": {"labels_offset": [1, 2]}}}, r"volumes.crop.labels_offset"),
        ({"volumes": {"crop": {"valid": "v"}}, "train": {"volumes": ["full"], "validation": ["crop"]}},
         r"train.validation names volume 'crop', which is labelled only in part"),
        ({"volumes": {"only": {"images": "i", "valid": "v"}}}, r"volumes.only sets valid but has no 'labels'"),
    ],
    ids=["negative-offset", "short-offset", "partly-labelled-validation", "valid-without-labels"],
)
def test_bad_partly_labelled_config_is_one_line(change, match):
    config = volumes_config(labels_offset=[0, 0, 0])
    for section, values in change.items():
        for key, value in values.items():
            if section == "volumes":
                config["volumes"][key] = {**config["volumes"].get(key, {}), **value}
            else:
                config[section][key] = value
    with pytest.raises(EmmitoError, match=match) as raised:
        cfg.validate(config)
    assert "\n" not in str(raised.value)


# ---- the workflow: commands and targets ---------------------------------------------------


@pytest.mark.workflow
def test_workflow_passes_the_crop_and_leaves_it_out_of_metrics_and_tuning(tmp_path):
    from tinyproject import make_project, snakemake

    crop = {"images": "data/train/images", "labels": "data/crop/labels", "label_format": "instance",
            "labels_offset": [2, 4, 8], "valid": "data/crop/valid"}
    project = make_project(tmp_path / "project", {
        "volumes": {"crop": crop},
        "train": {"volumes": ["train", "crop"]},
        "infer": {"volumes": ["deploy", "crop"]},
    })
    png_slices(project / "data/crop/labels", crop_ids())
    png_slices(project / "data/crop/valid", np.ones((4, 10, 12), np.uint8))
    result = snakemake(project, "-n", "-p", "--forceall")
    plan = result.stdout
    commands = [line for line in plan.splitlines() if "emmito convert" in line and "--label-out" in line]
    old = next(c for c in commands if "results/train/label.h5" in c)
    new = next(c for c in commands if "results/crop/label.h5" in c)
    # An old volume's command is as it always was; the crop's carries its two options.
    assert f"--labels {shlex.quote('data/train/labels')} --label-format vast --voxel-size" in old
    assert "--labels-offset" not in old and "--valid" not in old
    assert "--label-format instance --labels-offset 2 4 8 --valid data/crop/valid --voxel-size" in new
    assert "results/deploy/metrics.json" in plan
    assert "results/crop/metrics.json" not in plan and "results/crop/seg.h5" in plan
    assert "--volume crop " not in plan and "--volume train " in plan  # tune on the fully labelled volume only
    # The valid mask's slices are an input of convert_labels: a change there reconverts.
    assert "input: data/train/images, data/crop/labels, data/crop/valid" in plan
