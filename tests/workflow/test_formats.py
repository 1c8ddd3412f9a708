"""The whole workflow on four lab formats: a TIFF stack, 16-bit TIFF slices of a 12-bit range, HDF5 and zarr.

One run: the tiny model trains on the TIFF stack, then all four volumes go through
convert, infer, merge, segment, trace, upsample and evaluate to metrics.json.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from formats import hdf5, tiff_slices, tiff_stack, zarr_array
from PIL import Image
from tinyproject import make_project, snakemake

from emmito import contract, io
from emmito.sources import IntensityMapping

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

VOLUMES = ("stack", "tiff16", "h5", "zarr")
OVERRIDES = {
    "volumes": {
        "stack": {"images": "data/lab/stack.tif", "labels": "data/lab/stack_ids.tif", "label_format": "instance"},
        "tiff16": {"images": "data/lab/tiff16", "labels": "data/lab/tiff16_vast", "label_format": "vast"},
        "h5": {"images": "data/lab/em.h5:/volumes/raw", "labels": "data/lab/em.h5:/volumes/ids", "label_format": "instance"},
        "zarr": {"images": "data/lab/em.zarr:/raw", "labels": "data/lab/em.zarr:/mask", "label_format": "binary"},
    },
    "train": {"volumes": ["stack"]},
    "infer": {"volumes": list(VOLUMES), "chunk_slices": 10},
    "merge": {"block_slices": 20, "block_overlap": 2},
}


def read_deploy(project):
    """The synthetic deploy volume's images (uint8) and VAST ids, from its PNG slices."""
    images = np.stack([np.asarray(Image.open(p)) for p in io.list_slices(project / "data/deploy/images")])
    rgb = np.stack([np.asarray(Image.open(p)) for p in io.list_slices(project / "data/deploy/labels")])
    ids = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    return images, rgb, ids


def twelve_bit(images: np.ndarray) -> np.ndarray:
    """A 12-bit detector's image in 16 bits (200..4039): the 8-bit image scaled, with detail below one 8-bit level."""
    detail = np.random.default_rng(12).integers(0, 15, images.shape, dtype=np.uint16)
    return images.astype(np.uint16) * 15 + 200 + detail


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("formats") / "project", OVERRIDES)
    images, rgb, ids = read_deploy(project)
    lab = project / "data" / "lab"
    tiff_stack(lab / "stack.tif", images)
    tiff_stack(lab / "stack_ids.tif", ids.astype(np.uint16))
    tiff_slices(lab / "tiff16", twelve_bit(images))
    tiff_slices(lab / "tiff16_vast", rgb)
    hdf5(lab / "em.h5", "volumes/raw", images, chunks=(4, 32, 32), **io.compression())
    hdf5(lab / "em.h5", "volumes/ids", ids)
    zarr_array(lab / "em.zarr", "raw", images, zarr_format=2)
    zarr_array(lab / "em.zarr", "mask", (ids > 0).astype(np.uint8) * 255)
    targets = [contract.Results().metrics(v) for v in VOLUMES]
    snakemake(project, "--cores", "1", *targets, env={"OMP_NUM_THREADS": "1"}, timeout=1800)
    return project


def test_every_format_reaches_metrics(project):
    for vol in VOLUMES:
        metrics = json.loads((project / contract.Results().metrics(vol)).read_text())
        for key in ("instance_f1", "voxel_iou"):
            assert 0.0 <= metrics[key] <= 1.0, (vol, metrics)
        with io.open_volume(project / contract.Results().seg(vol)) as seg:
            assert seg.shape == (20, 64, 64)


def test_8_bit_formats_convert_to_the_png_volume_as_it_is(project):
    images, _, ids = read_deploy(project)
    for vol in ("stack", "h5", "zarr"):
        image, attrs = io.read_volume(project / contract.Results().image(vol))
        assert np.array_equal(image, images), vol
        assert json.loads(attrs[contract.INTENSITY_MAPPING])["rule"] == "identity"
    for vol in ("stack", "h5", "tiff16"):
        assert np.array_equal(io.read_volume(project / contract.Results().label(vol))[0], ids), vol


def test_12_bit_tiff_slices_span_200_grey_levels_through_one_mapping(project):
    images, _, _ = read_deploy(project)
    raw = twelve_bit(images)
    image, attrs = io.read_volume(project / contract.Results().image("tiff16"))
    assert len(np.unique(image)) >= 200
    mapping = IntensityMapping.from_json(attrs[contract.INTENSITY_MAPPING])
    assert mapping.rule == "percentile" and mapping.source_dtype == "uint16"
    for z in range(len(raw)):  # the same mapping for every slice
        assert np.array_equal(mapping.apply(raw[z]), image[z])
    log = (project / contract.Results().log("convert", "tiff16")).read_text()
    assert "intensity percentile (uint16" in log


def test_nothing_left_to_do(project):
    targets = [contract.Results().metrics(v) for v in VOLUMES]
    result = snakemake(project, "-n", *targets)
    assert "Nothing to be done" in result.stdout + result.stderr
    assert os.path.isdir(project / "data/lab/em.zarr")
