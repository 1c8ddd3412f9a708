"""segment: heatmap block -> block-local instance ids."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import cc3d
import h5py
import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import watershed

from emmito import cli, contract
from emmito.config import section_defaults, with_defaults
from emmito.decoders import (
    SLAB_SLICES,
    bc_watershed,
    blur_slice,
    decode,
    flood_voxels,
    heat_foreground,
    label_foreground,
    resolve_decoder,
    segment_block,
)
from emmito.io import open_volume, read_volume
from emmito.labels import slice_heat_sums
from emmito.metrics import instance_f1
from emmito.tuning import PROBABILITY_FOREGROUND_THRESHOLD



def full(params: dict | None = None) -> dict:
    """A complete segment section: the schema defaults with ``params`` on top (compute takes no partial sections)."""
    return {**section_defaults("segment"), **(params or {})}


SMALL = full({"min_size": 20, "min_seed_size": 4})


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
    """The recipe without the fast path: full-slice blur, one skimage watershed over the whole block."""
    p = with_defaults("segment", params)
    blurred = np.stack([blur_slice(s, p["blur_sigma"]) for s in heat])
    foreground = blurred > p["foreground_threshold"]
    seeds = cc3d.connected_components((heat > p["seed_threshold"]) & foreground, connectivity=6).astype(np.int64)
    seeds[np.bincount(seeds.ravel())[seeds] < p["min_seed_size"]] = 0
    labels = watershed(-blurred, seeds, mask=foreground, connectivity=1).astype(np.int64)
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
    big_only = segment_block(heat, full({"min_size": 100, "min_seed_size": 4}))
    assert big_only.max() == 1
    assert big_only[5, 12, 12] == 1 and big_only[5, 30, 30] == 0
    both = segment_block(heat, full({"min_size": 5, "min_seed_size": 1}))
    assert both.max() == 2


def test_faint_blob_without_seed_is_kept_when_large_enough():
    heat = ellipsoid_heat((10, 30, 30), [(5, 15, 15)], [(4, 8, 8)], peak=100)  # below seed_threshold 150
    assert segment_block(heat, SMALL).max() == 1
    assert segment_block(heat, full({"min_size": 10_000})).max() == 0


def test_empty_heat_gives_zeros():
    labels = segment_block(np.zeros((4, 16, 16), np.uint8), full())
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
    params = full({"min_size": 30, "min_seed_size": 5, "seed_threshold": 170})
    fast = segment_block(heat, params)
    reference = whole_block_watershed(heat, params)
    assert same_partition(fast, reference)
    # The case must exercise the flood: more objects than foreground components.
    components = cc3d.connected_components(fast > 0, connectivity=6).max()
    assert fast.max() > components + 3


def test_flood_voxels_equals_skimage_watershed_voxel_for_voxel():
    rng = np.random.default_rng(5)
    # Coarse levels make wide plateaus, where only the visiting order breaks ties.
    landscape = (rng.integers(0, 4, size=(9, 23, 31)) * 60).astype(np.uint8)
    inside = rng.random(landscape.shape) < 0.8
    inside[:, 0, :] = True  # reaches the box faces, where the margin must hold
    coordinates = np.nonzero(inside & (rng.random(landscape.shape) < 0.01))
    ids = np.arange(1, len(coordinates[0]) + 1, dtype=np.int32)
    markers = np.zeros(landscape.shape, np.int32)
    markers[coordinates] = ids
    reference = watershed(landscape, markers, mask=inside, connectivity=1)
    assert len(ids) > 10 and len(np.unique(reference)) > 10
    # The voxels anywhere in space: only their positions relative to each other count.
    z, y, x = np.nonzero(inside)
    regions = flood_voxels((z + 40, y + 7, x), landscape[inside], markers[inside])
    assert regions.dtype == np.int32
    assert np.array_equal(regions, reference[inside])
    assert len(flood_voxels((z[:0], y[:0], x[:0]), landscape[inside][:0], markers[inside][:0])) == 0


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_blur_is_scipy_gaussian_filter(sigma):
    rng = np.random.default_rng(11)
    heat = np.zeros((4, 100, 90), np.uint8)
    heat[0, 40:44, 30:34] = 200  # a small hot spot
    heat[1, 0:5, 85:90] = 90  # at the slice's corner, where the border mode matters
    heat[1, 60:70, 0:80] = rng.integers(0, 256, size=(10, 80), dtype=np.uint8)
    heat[2] = rng.integers(0, 12, size=(100, 90), dtype=np.uint8)  # faint noise, never foreground
    heat[3] = rng.integers(0, 256, size=(100, 90), dtype=np.uint8)
    full = np.stack([ndimage.gaussian_filter(s.astype(np.float64), sigma) for s in heat])
    blurred = np.stack([blur_slice(s, sigma) for s in heat])
    assert blurred.dtype == np.float32
    np.testing.assert_allclose(blurred, full, atol=1e-3)
    # Slices smaller than the kernel reflect as scipy does.
    tiny = heat[3, :3, :5]
    np.testing.assert_allclose(blur_slice(tiny, sigma), ndimage.gaussian_filter(tiny.astype(np.float64), sigma), atol=1e-3)

    # heat_foreground thresholds that blur, unrounded.
    foreground = np.zeros(heat.shape, bool)
    for z in range(len(heat)):
        mask, inside, landscape, seeds = heat_foreground(heat, sigma, 16, 150)(z)
        assert np.array_equal(inside, np.flatnonzero(mask))
        assert np.array_equal(landscape, -blurred[z].reshape(-1)[inside])
        assert np.array_equal(seeds, heat[z].reshape(-1)[inside] > 150)
        foreground[z] = mask
    clear = np.abs(full - 16) > 1e-3  # the float32 blur may round across the threshold only closer than that
    assert np.array_equal(foreground[clear], (full > 16)[clear])
    assert foreground[0].any() and foreground[1].any() and not foreground[2].any()


@pytest.mark.parametrize("depth", [1, SLAB_SLICES, 3 * SLAB_SLICES + 5])
def test_label_foreground_equals_cc3d_face_connectivity(depth):
    rng = np.random.default_rng(depth)
    # Random voxels above the percolation threshold: components that wind through slices and cross slab boundaries.
    mask = rng.random((depth, 40, 50)) < 0.45
    heat = np.where(mask, 200, 0).astype(np.uint8)
    reference, n_reference = cc3d.connected_components(mask, connectivity=6, return_N=True)

    def foreground_of(z):
        inside = np.flatnonzero(mask[z])
        return mask[z], inside, heat[z].reshape(-1)[inside].astype(np.float32), heat[z].reshape(-1)[inside] > 100

    results = []
    for threads in (None, 3):
        pool = ThreadPoolExecutor(threads) if threads else None
        results.append(label_foreground(mask.shape, foreground_of, pool))
        if pool:
            pool.shutdown()
    foreground = results[0]
    voxels, region = foreground.voxels, foreground.region
    assert foreground.shape == mask.shape
    assert np.array_equal(voxels, np.flatnonzero(mask))
    assert region.dtype == np.uint32 and foreground.n_components == n_reference > 1
    assert same_partition(region, reference.reshape(-1)[voxels])
    assert np.array_equal(foreground.landscape, np.full(len(voxels), 200, np.float32)) and foreground.seeds.all()
    for field in ("voxels", "region", "n_components", "landscape", "seeds"):
        assert np.array_equal(getattr(results[0], field), getattr(results[1], field))
    empty = label_foreground((3, 4, 5), lambda z: (np.zeros((4, 5), bool), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool)))
    assert empty.n_components == 0 and len(empty.voxels) == len(empty.region) == 0


def test_cli_writes_block_with_heat_attrs(tmp_path):
    heat = ellipsoid_heat((8, 24, 24), [(4, 12, 12)], [(3, 7, 7)])
    heat_path = contract.fixture(
        tmp_path / "heat" / "block_1.h5", "heat", heat[None], voxel_size=[40, 16, 16], offset=20, volume_depth=30, downsample_xy=2
    )
    out = tmp_path / "seg" / "block_1.h5"
    code = cli.main(["segment", str(heat_path), str(out), "--params", '{"segment": {"min_size": 20, "min_seed_size": 4}}'])
    assert code == 0
    labels, out_attrs = read_volume(out)
    # Nothing tuned and no threshold set: a probability heatmap is cut at 0.5, not the skeleton-distance 16.
    assert np.array_equal(labels, segment_block(heat, {**SMALL, "foreground_threshold": PROBABILITY_FOREGROUND_THRESHOLD}))
    assert out_attrs["offset"] == 20 and out_attrs["volume_depth"] == 30 and out_attrs["downsample_xy"] == 2
    assert out_attrs["voxel_size"] == [40.0, 16.0, 16.0]


def test_cli_writes_each_objects_heat_per_slice(tmp_path):
    heat = ellipsoid_heat((10, 24, 40), [(4, 12, 10), (5, 12, 28)], [(4, 7, 7), (4, 8, 8)], peak=230)
    heat_path = contract.fixture(tmp_path / "block_0.h5", "heat", heat[None])
    out = tmp_path / "seg.h5"
    assert cli.main(["segment", str(heat_path), str(out), "--params", '{"segment": {"min_size": 20, "min_seed_size": 4}}']) == 0
    labels = read_volume(out)[0]
    with h5py.File(out, "r") as f:
        table = f[contract.SLICE_SCORES][...]
        assert list(f[contract.SLICE_SCORES].attrs[contract.SCORE_COLUMNS_ATTR]) == list(contract.SLICE_SCORE_COLUMNS)
    assert labels.max() == 2
    # One row per (object, slice) it has voxels in, with their count and the sum of their heat.
    expected = [
        [label, z, int((labels[z] == label).sum()), int(heat[z][labels[z] == label].sum())]
        for z in range(labels.shape[0]) for label in range(1, 3) if (labels[z] == label).any()
    ]
    assert table.tolist() == expected
    for label in (1, 2):  # the object's mean probability, from its rows
        rows = table[table[:, 0] == label]
        assert rows[:, 3].sum() / (255 * rows[:, 2].sum()) == pytest.approx(heat[labels == label].mean() / 255)


def test_slice_heat_sums_reads_the_heat_a_slab_at_a_time():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(9, 6, 7)).astype(np.uint32)
    heat = rng.integers(0, 256, size=labels.shape).astype(np.uint8)
    table = slice_heat_sums(labels, heat, slab_slices=4)
    assert np.array_equal(table, slice_heat_sums(labels, heat, slab_slices=1))
    assert table[:, 2].sum() == np.count_nonzero(labels)
    for label in (1, 2, 3):
        rows = table[table[:, 0] == label]
        assert rows[:, 2].sum() == (labels == label).sum() and rows[:, 3].sum() == heat[labels == label].sum()


def test_a_heatmap_without_foreground_gives_no_scores(tmp_path):
    from emmito.segment import block_scores

    path = contract.fixture(tmp_path / "heat.h5", "heat", np.zeros((2, 3, 4, 4), np.uint8), channels=["emb0", "emb1"])
    with open_volume(path) as ds:
        labels = np.ones((3, 4, 4), np.uint32)
        assert block_scores(ds, contract.read_attrs(ds), "embedding_cluster", labels) is None


def test_cli_uses_decoder_json_and_a_key_set_in_the_config_wins_over_it(tmp_path, capsys):
    heat = ellipsoid_heat((12, 40, 60), [(6, 20, 20), (6, 20, 38)], [(5, 9, 11), (5, 9, 11)])
    heat_path = contract.fixture(tmp_path / "heat" / "block_0.h5", "heat", heat[None])
    settings = tmp_path / "model" / "decoder.json"
    tuned = {"foreground_threshold": 60, "seed_threshold": 240, "min_size": 30}
    contract.save_decoder_settings(settings, {"decoder": "heat_watershed", "settings": tuned})

    def segment(params: dict, name: str) -> np.ndarray:
        out = tmp_path / "seg" / f"{name}.h5"
        argv = ["segment", str(heat_path), str(out), "--decoder-settings", str(settings), "--params", json.dumps(params)]
        assert cli.main(argv) == 0
        return read_volume(out)[0]

    used = segment({"segment": {"min_seed_size": 4}}, "tuned")
    assert np.array_equal(used, segment_block(heat, full({"min_seed_size": 4, **tuned})))
    assert f"foreground_threshold 60 ({settings}), seed_threshold 240 ({settings}), min_size 30 ({settings})" in capsys.readouterr().err
    # A key the user set wins over its tuned value; the other tuned values stay.
    mine = segment({"segment": {"min_seed_size": 4, "foreground_threshold": 150}}, "mine")
    assert np.array_equal(mine, segment_block(heat, full({"min_seed_size": 4, **tuned, "foreground_threshold": 150})))
    assert not np.array_equal(mine, used)
    assert "foreground_threshold 150 (config)" in capsys.readouterr().err
    # The workflow passes whole sections with the list of keys the user set: the defaults in them do not override.
    workflow = {"segment": full({"min_seed_size": 4, "foreground_threshold": 150}), "explicit": ["segment.foreground_threshold", "segment.min_seed_size"]}
    assert np.array_equal(segment(workflow, "workflow"), mine)
    assert f"min_size 30 ({settings})" in capsys.readouterr().err


@pytest.mark.bad_input
def test_cli_refuses_a_corrupt_decoder_json(tmp_path, capsys):
    heat_path = contract.fixture(tmp_path / "block_0.h5", "heat", np.zeros((4, 8, 8), np.uint8))
    (tmp_path / "decoder.json").write_text("{")
    assert cli.main(["segment", str(heat_path), str(tmp_path / "out.h5"), "--decoder-settings", str(tmp_path / "decoder.json")]) == 2
    message = capsys.readouterr().err.strip()
    assert "decoder.json: not readable decoder settings" in message and "rerun the tune rule" in message
    assert len(message.splitlines()) == 1 and not (tmp_path / "out.h5").exists()


@pytest.mark.bad_input
def test_cli_refuses_a_3d_heatmap(tmp_path, capsys):
    # A bare 3-D file (no heat attributes), as another tool might write it.
    heat_path = contract.fixture(tmp_path / "block_0.h5", "image", np.zeros((4, 8, 8), np.uint8), voxel_size=[1, 1, 1])
    assert cli.main(["segment", str(heat_path), str(tmp_path / "out.h5")]) == 2
    message = capsys.readouterr().err
    assert "block_0.h5" in message and "(channel, z, y, x)" in message
    assert not (tmp_path / "out.h5").exists()


# ---- bc_watershed: binary + contour channels ------------------------------------------


def bc_channels(shape, centres, radii):
    """(binary, contour) uint8: ellipsoids of binary 255 inside, and a contour band at their surfaces and where they touch."""
    parts = [ellipsoid_heat(shape, [c], [r]) for c, r in zip(centres, radii)]
    binary = np.maximum.reduce(parts)
    binary = np.where(binary > 0, 250, 0).astype(np.uint8)
    inside = [p > 0 for p in parts]
    surface = np.zeros(shape, bool)
    for mask in inside:
        surface |= mask & ~ndimage.binary_erosion(mask)
    touching = ndimage.binary_dilation(inside[0]) & ndimage.binary_dilation(np.logical_or.reduce(inside[1:]))
    contour = np.where(surface | touching, 240, 10).astype(np.uint8)
    return binary, contour


BC_SMALL = full({"decoder": "bc_watershed", "bc_min_size": 20, "bc_min_seed_size": 4})


def test_bc_schema_defaults_are_pytc_thresholds_in_heat_units():
    p = with_defaults("segment", {})
    # PyTC compares uint8 maps with int(255 * threshold): 0.85, 0.9, 0.8.
    assert (p["bc_foreground"], p["bc_seed_foreground"], p["bc_seed_contour"]) == (216, 229, 204)
    assert (p["bc_min_size"], p["bc_min_seed_size"]) == (128, 32)


def test_bc_watershed_splits_touching_objects_at_the_contour():
    binary, contour = bc_channels((12, 40, 60), [(6, 20, 20), (6, 20, 38)], [(5, 9, 11), (5, 9, 11)])
    labels = bc_watershed(binary, contour, BC_SMALL)
    assert labels.dtype == np.uint32
    assert cc3d.connected_components(labels > 0, connectivity=6).max() == 1  # one foreground component ...
    assert labels.max() == 2 and labels[6, 20, 20] != labels[6, 20, 38]  # ... two objects
    assert np.array_equal(labels > 0, binary > 216)  # every foreground voxel is flooded
    # Without the contour the two blobs are one seed, hence one object.
    assert bc_watershed(binary, np.zeros_like(contour), BC_SMALL).max() == 1


def test_bc_watershed_thresholds_and_sizes():
    binary, contour = bc_channels((10, 40, 40), [(5, 12, 12), (5, 30, 30)], [(4, 8, 8), (2, 3, 3)])
    assert bc_watershed(binary, contour, BC_SMALL).max() == 2
    assert bc_watershed(binary, contour, {**BC_SMALL, "bc_min_size": 100}).max() == 1  # the small one goes
    # Binary below the foreground threshold: nothing.
    assert bc_watershed(np.minimum(binary, 200), contour, BC_SMALL).max() == 0


def test_decode_picks_the_decoder_and_bc_equals_whole_block_watershed():
    rng = np.random.default_rng(5)
    centres = rng.uniform([0, 0, 0], [16, 64, 64], size=(20, 3))
    radii = rng.uniform([2, 4, 4], [5, 10, 10], size=(20, 3))
    _, contour = bc_channels((16, 64, 64), centres, radii)
    # A graded binary map: on flat plateaus a watershed's result depends on its visiting order.
    binary = ellipsoid_heat((16, 64, 64), centres, radii)
    params = {**BC_SMALL, "bc_min_seed_size": 3, "bc_foreground": 40, "bc_seed_foreground": 200}
    fast = decode({"foreground": binary, "contour": contour}, params)
    p = with_defaults("segment", params)
    foreground = binary > p["bc_foreground"]
    seeds = cc3d.connected_components(
        (binary > p["bc_seed_foreground"]) & (contour < p["bc_seed_contour"]), connectivity=6
    ).astype(np.int64)
    seeds[np.bincount(seeds.ravel())[seeds] < p["bc_min_seed_size"]] = 0
    reference = watershed(255 - binary, seeds, mask=foreground, connectivity=1).astype(np.int64)
    unseeded = cc3d.connected_components(foreground & (reference == 0), connectivity=6).astype(np.int64)
    reference[unseeded > 0] = unseeded[unseeded > 0] + reference.max()
    reference[np.bincount(reference.ravel())[reference] < p["bc_min_size"]] = 0
    # uint8 maps have plateaus, where the visiting order breaks ties: the same objects, a few voxels apart.
    assert instance_f1(fast, reference, 0.8) == 1.0
    assert np.mean((fast > 0) == (reference > 0)) > 0.999
    assert fast.max() > cc3d.connected_components(fast > 0, connectivity=6).max()  # the flood ran
    # The heat_watershed decoder ignores the contour.
    heat_only = decode({"foreground": binary, "contour": contour}, {**params, "decoder": "heat_watershed"})
    assert np.array_equal(heat_only, segment_block(binary, params))


def test_threads_do_not_change_the_result():
    rng = np.random.default_rng(8)
    centres = rng.uniform([0, 0, 0], [20, 80, 80], size=(30, 3))
    radii = rng.uniform([2, 4, 4], [5, 12, 12], size=(30, 3))
    heat = ellipsoid_heat((20, 80, 80), centres, radii, peak=240)
    params = full({"min_size": 30, "min_seed_size": 5, "seed_threshold": 170})
    one = segment_block(heat, {**params, "threads": 1})
    assert np.array_equal(one, segment_block(heat, {**params, "threads": 3}))


def test_cli_bc_decoder_reads_channels_by_name(tmp_path):
    binary, contour = bc_channels((12, 40, 60), [(6, 20, 20), (6, 20, 38)], [(5, 9, 11), (5, 9, 11)])
    # Channels in a different order than the decoder lists them: found by name.
    heat_path = contract.fixture(
        tmp_path / "heat" / "block_0.h5", "heat", np.stack([contour, binary]), voxel_size=[40, 8, 8], channels=["contour", "foreground"]
    )
    out = tmp_path / "seg" / "block_0.h5"
    params = '{"segment": {"decoder": "bc_watershed", "bc_min_size": 20, "bc_min_seed_size": 4}}'
    assert cli.main(["segment", str(heat_path), str(out), "--params", params]) == 0
    labels, _ = read_volume(out)
    assert np.array_equal(labels, bc_watershed(binary, contour, BC_SMALL))
    assert labels.max() == 2


@pytest.mark.bad_input
def test_cli_bc_decoder_on_a_one_channel_heatmap_names_the_missing_channel(tmp_path, capsys):
    heat_path = contract.fixture(tmp_path / "block_0.h5", "heat", np.zeros((1, 4, 8, 8), np.uint8), voxel_size=[1, 1, 1])
    params = '{"segment": {"decoder": "bc_watershed"}}'
    assert cli.main(["segment", str(heat_path), str(tmp_path / "out.h5"), "--params", params]) == 2
    message = capsys.readouterr().err
    assert "block_0.h5" in message and "'contour'" in message and "heat_watershed" in message
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize(
    "channels, expected",
    [
        (["foreground"], ("heat_watershed", "foreground")),
        (["foreground", "contour"], ("bc_watershed", "foreground")),
        (["skeleton_distance"], ("heat_watershed", "skeleton_distance")),
        (None, ("heat_watershed", "foreground")),
    ],
)
def test_auto_decoder_follows_the_model_target(channels, expected):
    assert resolve_decoder("auto", channels) == expected
    assert resolve_decoder("bc_watershed", ["foreground"]) == ("bc_watershed", "foreground")


def test_auto_decode_runs_bc_watershed_on_two_channels():
    z, y, x = np.indices((8, 40, 60))
    left = ((y - 20) ** 2 + (x - 18) ** 2 < 120) & (z > 1) & (z < 7)
    right = ((y - 20) ** 2 + (x - 39) ** 2 < 120) & (z > 1) & (z < 7)
    binary = np.where(left | right, 250, 0).astype(np.uint8)
    contour = np.zeros_like(binary)
    contour[:, :, 28:30] = 255  # the two discs touch across this band
    auto = decode({"foreground": binary, "contour": contour}, full({"decoder": "auto", "bc_min_size": 10}))
    bc = decode({"foreground": binary, "contour": contour}, full({"decoder": "bc_watershed", "bc_min_size": 10}))
    assert np.array_equal(auto, bc)
    assert auto.max() == 2


def test_max_area_2d_drops_objects_wider_than_any_mitochondrion():
    """A long dark process (a wide cross-section in some slice) goes; mitochondria stay, ids consecutive."""
    z, y, x = np.indices((6, 60, 90))
    mito_a = ((y - 12) ** 2 + (x - 12) ** 2 < 40) & (z < 5)  # ~120 px per slice
    mito_b = ((y - 48) ** 2 + (x - 15) ** 2 < 40) & (z > 0)
    process = (np.abs(y - 30) < 4) & (x > 30) & (z > 1) & (z < 4)  # 7 x 59 = 413 px in slices 2-3
    heat = np.where(mito_a | mito_b | process, 250, 0).astype(np.uint8)
    params = full({"decoder": "heat_watershed", "min_size": 10, "min_seed_size": 4, "blur_sigma": 0.5})
    everything = decode({"foreground": heat}, params)
    assert everything.max() == 3
    filtered = decode({"foreground": heat}, {**params, "max_area_2d": 300})
    assert filtered.max() == 2 and set(np.unique(filtered)) == {0, 1, 2}
    assert filtered[2, 30, 60] == 0 and filtered[2, 12, 12] > 0 and filtered[2, 48, 15] > 0
    # The kept objects are exactly the ones that were there, voxel for voxel.
    assert same_partition(filtered, np.where(everything == everything[2, 30, 60], 0, everything))
    assert np.array_equal(decode({"foreground": heat}, {**params, "max_area_2d": 0}), everything)
    # A bound above the widest cross-section keeps everything.
    assert decode({"foreground": heat}, {**params, "max_area_2d": 10_000}).max() == 3


# ---- lazy channels: decode reads h5py datasets as it reads arrays ------------------------


def lazy_case(decoder: str) -> tuple[dict, dict]:
    """(channels {name: uint8 (z, y, x)}, a complete segment section) for ``decoder``."""
    from emmito.embedding import embedding_channel_names, embeddings_to_heat

    centres, radii = [(6, 20, 20), (6, 20, 38)], [(5, 9, 11), (5, 9, 11)]
    if decoder == "heat_watershed":
        return {"foreground": ellipsoid_heat((12, 40, 60), centres, radii)}, SMALL
    if decoder == "bc_watershed":
        binary, contour = bc_channels((12, 40, 60), centres, radii)
        return {"foreground": binary, "contour": contour}, BC_SMALL
    # embedding_cluster: two touching boxes whose embeddings differ, with noise.
    rng = np.random.default_rng(0)
    truth = np.zeros((6, 12, 20), np.uint32)
    truth[1:5, 2:10, 2:10], truth[1:5, 2:10, 10:18] = 1, 2
    emb = rng.normal(0, 0.15, size=(3, *truth.shape)).astype(np.float32)
    emb[:, truth == 1] += np.array([1.5, 0.0, 0.0], np.float32)[:, None]
    emb[:, truth == 2] += np.array([-1.0, 1.0, 0.0], np.float32)[:, None]
    channels = {"foreground": np.where(truth > 0, 240, 5).astype(np.uint8)}
    channels |= {name: embeddings_to_heat(emb[i]) for i, name in enumerate(embedding_channel_names(3))}
    return channels, full({"decoder": "embedding_cluster", "embedding_min_size": 10, "embedding_sample": 500})


@pytest.mark.parametrize("decoder", ["heat_watershed", "bc_watershed", "embedding_cluster"])
def test_decode_on_h5py_datasets_equals_decode_on_arrays(tmp_path, decoder):
    import h5py

    from emmito.segment import heat_channels

    channels, params = lazy_case(decoder)
    expected = decode(channels, params)
    assert expected.max() == 2
    # One dataset per channel: decode reads each when its decoder needs it.
    with h5py.File(tmp_path / "channels.h5", "w") as f:
        for name, array in channels.items():
            f[name] = array
    with h5py.File(tmp_path / "channels.h5", "r") as f:
        lazy = {name: f[name] for name in channels}
        assert all(isinstance(value, h5py.Dataset) for value in lazy.values())
        assert np.array_equal(decode(lazy, params), expected)
    # A heat file's (channel, z, y, x) dataset, one lazy channel per name, as emmito segment reads it.
    path = contract.fixture(tmp_path / "heat.h5", "heat", np.stack(list(channels.values())), channels=list(channels))
    with h5py.File(path, "r") as f:
        ds = f[contract.DATASET]
        assert np.array_equal(decode(heat_channels(ds, contract.read_attrs(ds)), params), expected)
