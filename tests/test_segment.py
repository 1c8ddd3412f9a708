"""segment: heatmap block -> block-local instance ids."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import watershed

from emmito import cli
from emmito.config import with_defaults
from emmito.io import read_volume, write_volume
from emmito.segment import blur_and_threshold, find_seeds, segment_block

SMALL = {"min_size": 20, "min_seed_size": 4}


def ellipsoid_heat(shape: tuple[int, int, int], centres, radii, peak: float = 255.0) -> np.ndarray:
    """uint8 heatmap: each ellipsoid peaks at ``peak`` in its centre and falls to 0 at its surface."""
    grid = np.indices(shape, dtype=np.float32)
    heat = np.zeros(shape, dtype=np.float32)
    for centre, radius in zip(centres, radii):
        distance = sum(((grid[i] - centre[i]) / radius[i]) ** 2 for i in range(3))
        heat = np.maximum(heat, peak * np.clip(1.3 * (1 - distance), 0, 1))
    return np.rint(heat).astype(np.uint8)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` split the voxels into the same objects, whatever their ids."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a != 0], b[b != 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a != 0])) == len(np.unique(b[b != 0]))


def whole_block_watershed(heat: np.ndarray, params: dict) -> np.ndarray:
    """The recipe without the fast path: one skimage watershed over the whole block."""
    p = with_defaults("segment", params)
    blurred, foreground = blur_and_threshold(heat, p["blur_sigma"], p["foreground_threshold"])
    seeds = find_seeds(heat, foreground, p["seed_threshold"], p["min_seed_size"])
    labels = watershed(255 - blurred, seeds, mask=foreground, connectivity=1).astype(np.int64)
    unseeded = cc3d.connected_components(foreground & (labels == 0), connectivity=6).astype(np.int64)
    labels[unseeded > 0] = unseeded[unseeded > 0] + labels.max()
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < p["min_size"]] = 0
    return labels


def test_two_touching_blobs_get_two_ids():
    heat = ellipsoid_heat((12, 40, 60), [(6, 20, 20), (6, 20, 38)], [(5, 9, 11), (5, 9, 11)])
    labels = segment_block(heat, SMALL)
    assert labels.dtype == np.uint32
    # One foreground component (the blobs touch) ...
    assert cc3d.connected_components(labels > 0, connectivity=6).max() == 1
    # ... split in two at the valley between them.
    assert labels.max() == 2
    assert labels[6, 20, 20] != labels[6, 20, 38]
    assert set(np.unique(labels)) == {0, 1, 2}


def test_isolated_blob_is_one_object():
    heat = ellipsoid_heat((10, 30, 30), [(5, 15, 15)], [(4, 8, 8)])
    labels = segment_block(heat, SMALL)
    assert labels.max() == 1
    assert labels[5, 15, 15] == 1
    assert (labels > 0).sum() > 100


def test_small_objects_are_removed():
    heat = ellipsoid_heat((10, 40, 40), [(5, 12, 12), (5, 30, 30)], [(4, 8, 8), (1.5, 3, 3)])
    big_only = segment_block(heat, {"min_size": 100, "min_seed_size": 4})
    assert big_only.max() == 1
    assert big_only[5, 12, 12] == 1 and big_only[5, 30, 30] == 0
    both = segment_block(heat, {"min_size": 5, "min_seed_size": 1})
    assert both.max() == 2


def test_faint_blob_without_seed_is_kept_when_large_enough():
    heat = ellipsoid_heat((10, 30, 30), [(5, 15, 15)], [(4, 8, 8)], peak=100)  # below seed_threshold 150
    assert segment_block(heat, SMALL).max() == 1
    assert segment_block(heat, {"min_size": 10_000}).max() == 0


def test_empty_heat_gives_zeros():
    labels = segment_block(np.zeros((4, 16, 16), np.uint8))
    assert labels.dtype == np.uint32 and labels.shape == (4, 16, 16)
    assert not labels.any()


def test_ids_are_consecutive_and_deterministic():
    rng = np.random.default_rng(3)
    centres = rng.uniform([2, 5, 5], [14, 59, 59], size=(15, 3))
    radii = rng.uniform([2, 4, 4], [4, 9, 9], size=(15, 3))
    heat = ellipsoid_heat((16, 64, 64), centres, radii)
    labels = segment_block(heat, SMALL)
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))
    assert np.array_equal(labels, segment_block(heat.copy(), SMALL))


def test_fast_path_equals_whole_block_watershed():
    rng = np.random.default_rng(7)
    n = 40
    centres = rng.uniform([0, 0, 0], [20, 96, 96], size=(n, 3))
    radii = rng.uniform([2, 4, 4], [5, 12, 12], size=(n, 3))
    heat = ellipsoid_heat((20, 96, 96), centres, radii, peak=240).astype(np.int16)
    heat = np.clip(heat + rng.integers(-12, 13, size=heat.shape), 0, 255).astype(np.uint8)
    params = {"min_size": 30, "min_seed_size": 5, "seed_threshold": 170}
    fast = segment_block(heat, params)
    reference = whole_block_watershed(heat, params)
    assert same_partition(fast, reference)
    # The case must exercise the flood: more objects than foreground components.
    components = cc3d.connected_components(fast > 0, connectivity=6).max()
    assert fast.max() > components + 3


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_tiled_blur_equals_full_slice_blur_where_it_matters(sigma):
    rng = np.random.default_rng(11)
    heat = np.zeros((3, 100, 90), np.uint8)
    heat[0, 40:44, 30:34] = 200  # a small hot spot far from tile edges
    heat[1, 0:5, 85:90] = 90  # at the slice's corner
    heat[1, 60:70, 0:80] = rng.integers(0, 256, size=(10, 80), dtype=np.uint8)
    heat[2] = rng.integers(0, 12, size=(100, 90), dtype=np.uint8)  # faint noise, never foreground
    blurred, foreground = blur_and_threshold(heat, sigma, 16)
    full = np.stack([ndimage.gaussian_filter(s, sigma, output=np.float32) for s in heat])
    assert np.array_equal(foreground, full > 16)
    assert foreground[0].any() and foreground[1].any() and not foreground[2].any()
    assert np.array_equal(blurred[foreground], np.rint(full[foreground]).astype(np.uint8))


def test_cli_writes_block_with_heat_attrs(tmp_path):
    heat = ellipsoid_heat((8, 24, 24), [(4, 12, 12)], [(3, 7, 7)])
    heat_path = tmp_path / "heat" / "block_1.h5"
    attrs = {"channels": ["foreground"], "volume_depth": 30, "downsample_xy": 2}
    write_volume(heat_path, heat[None], voxel_size=[40, 16, 16], offset=20, attrs=attrs)
    out = tmp_path / "seg" / "block_1.h5"
    code = cli.main(["segment", str(heat_path), str(out), "--params", '{"segment": {"min_size": 20, "min_seed_size": 4}}'])
    assert code == 0
    labels, out_attrs = read_volume(out)
    assert np.array_equal(labels, segment_block(heat, SMALL))
    assert out_attrs["offset"] == 20 and out_attrs["volume_depth"] == 30 and out_attrs["downsample_xy"] == 2
    assert out_attrs["voxel_size"] == [40.0, 16.0, 16.0]


@pytest.mark.bad_input
def test_cli_refuses_a_3d_heatmap(tmp_path, capsys):
    heat_path = tmp_path / "block_0.h5"
    write_volume(heat_path, np.zeros((4, 8, 8), np.uint8), voxel_size=[1, 1, 1])
    assert cli.main(["segment", str(heat_path), str(tmp_path / "out.h5")]) == 2
    message = capsys.readouterr().err
    assert "block_0.h5" in message and "(channel, z, y, x)" in message
    assert not (tmp_path / "out.h5").exists()
