"""emmito export: neuroglancer precomputed volumes from seg.h5 + image.h5, read back with tensorstore."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest

from emmito import config, contract
from emmito.export import ObjectStatistics, export_files, scale_shapes, sharding_spec
from emmito.io import EmmitoError
from emmito.resampling import downsample_mode, mean_downsample

ts = pytest.importorskip("tensorstore")

VOXEL_SIZE = [40.0, 8.0, 8.0]


def small_params(**overrides) -> dict:
    return config.with_defaults("export", {"chunk_size": [4, 16, 16], "pyramid_levels": 3, "shard_chunks": 8, **overrides})


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A 20 x 70 x 90 volume with three boxes, odd y/x, seg.h5 holding s1 only (s2.. must be computed)."""
    folder = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 70, 90), dtype=np.uint8)
    seg = np.zeros(image.shape, np.uint32)
    seg[2:10, 5:30, 10:50] = 3
    seg[5:18, 40:66, 60:85] = 7
    seg[0:2, 0:3, 0:3] = 100_000  # a large id in a corner
    contract.fixture(folder / "image.h5", "image", image, voxel_size=VOXEL_SIZE)
    contract.fixture(folder / "seg.h5", "seg", seg, voxel_size=VOXEL_SIZE)
    with h5py.File(folder / "seg.h5", "a") as f:
        f.create_dataset(contract.level_name(1), data=downsample_mode(seg))
    return folder, image, seg


def read_scale(layer: Path, scale_index: int) -> np.ndarray:
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(layer)}, "scale_index": scale_index}).result()
    return store[..., 0].read().result().transpose(2, 1, 0)


def test_mean_downsample_rounds_and_averages_odd_edges():
    image = np.array([[[0, 1, 10], [2, 2, 20], [100, 101, 255]]], dtype=np.uint8)
    out = mean_downsample(image)
    # (0+1+2+2)/4 = 1.25 -> 1; (10+20)/2 = 15; (100+101)/2 = 100.5 -> 101 (half up); 255 alone.
    assert out.tolist() == [[[1, 15], [101, 255]]]
    assert out.dtype == np.uint8


def test_scale_shapes_stop_when_a_slice_fits_one_chunk():
    assert scale_shapes((5, 70, 90), (4, 16, 16), 10) == [(5, 70, 90), (5, 35, 45), (5, 18, 23), (5, 9, 12)]
    assert scale_shapes((5, 70, 90), (4, 16, 16), 1) == [(5, 70, 90), (5, 35, 45)]


def test_sharding_spec_splits_the_morton_bits():
    spec = sharding_spec((8, 8, 4), shard_chunks=16)  # 3 + 3 + 2 = 8 bits
    assert spec["preshift_bits"] == 3 and spec["minishard_bits"] == 1 and spec["shard_bits"] == 4
    tiny = sharding_spec((1, 1, 1), shard_chunks=64)
    assert tiny["preshift_bits"] + tiny["minishard_bits"] + tiny["shard_bits"] == 0


def test_object_statistics_add_up_across_regions():
    stats = ObjectStatistics()
    stats.add(np.array([[[0, 5, 5]], [[0, 0, 5]]], dtype=np.uint32), origin=(10, 0, 0))
    stats.add(np.array([[[5, 9]]], dtype=np.uint32), origin=(12, 3, 4))
    assert stats.record() == {
        "5": {"voxels": 4, "bbox": [10, 0, 1, 13, 4, 5]},
        "9": {"voxels": 1, "bbox": [12, 3, 5, 13, 4, 6]},
    }


@pytest.mark.parametrize("sharded", [False, True])
def test_export_writes_every_scale_exactly(volume, tmp_path, sharded):
    folder, image, seg = volume
    params = small_params(shard_above_voxels=0 if sharded else 10**9)
    record = export_files(folder / "seg.h5", folder / "image.h5", tmp_path / "ng", params)
    assert record["scales"] == [[20, 70, 90], [20, 35, 45], [20, 18, 23], [20, 9, 12]]
    expected_image, expected_seg = image, seg
    for level in range(4):
        assert np.array_equal(read_scale(tmp_path / "ng/image", level), expected_image), f"image s{level}"
        assert np.array_equal(read_scale(tmp_path / "ng/segmentation", level), expected_seg), f"segmentation s{level}"
        expected_image, expected_seg = mean_downsample(expected_image), downsample_mode(expected_seg)
    info = json.loads((tmp_path / "ng/segmentation/info").read_text())
    assert info["type"] == "segmentation" and info["data_type"] == "uint32"
    assert info["scales"][0]["resolution"] == [8.0, 8.0, 40.0]  # x, y, z
    assert info["scales"][2]["resolution"] == [32.0, 32.0, 40.0]
    assert info["scales"][0]["encoding"] == "compressed_segmentation"
    assert ("sharding" in info["scales"][0]) == sharded
    shard_files = list((tmp_path / "ng/segmentation").rglob("*.shard"))
    assert bool(shard_files) == sharded
    image_info = json.loads((tmp_path / "ng/image/info").read_text())
    assert image_info["type"] == "image" and image_info["scales"][0]["encoding"] == "raw"


def test_segment_properties_and_objects_json(volume, tmp_path):
    folder, _, seg = volume
    export_files(folder / "seg.h5", folder / "image.h5", tmp_path / "ng", small_params())
    info = json.loads((tmp_path / "ng/segmentation/info").read_text())
    properties = json.loads((tmp_path / "ng/segmentation" / info["segment_properties"] / "info").read_text())
    assert properties["@type"] == "neuroglancer_segment_properties"
    inline = properties["inline"]
    assert inline["ids"] == ["3", "7", "100000"]
    voxels = next(p for p in inline["properties"] if p["id"] == "voxels")
    assert voxels["values"] == [int((seg == i).sum()) for i in (3, 7, 100000)] == [8000, 8450, 18]
    volume_um3 = next(p for p in inline["properties"] if p["id"] == "volume_um3")
    assert volume_um3["values"][0] == pytest.approx(8000 * 40 * 8 * 8 / 1e9)
    objects = json.loads((tmp_path / "ng/objects.json").read_text())["objects"]
    assert objects["7"] == {"voxels": 8450, "bbox": [5, 40, 60, 18, 66, 85]}


def test_same_inputs_same_bytes_and_rerun_replaces(volume, tmp_path):
    folder, _, _ = volume
    params = small_params(shard_above_voxels=0)
    first, second = tmp_path / "a", tmp_path / "b"
    export_files(folder / "seg.h5", folder / "image.h5", first, params)
    export_files(folder / "seg.h5", folder / "image.h5", second, params)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    (first / "stale.txt").write_text("from an older export")
    export_files(folder / "seg.h5", folder / "image.h5", first, params)
    assert not (first / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"], "temporary folders left behind"


@pytest.mark.bad_input
def test_shape_mismatch_is_one_line_error_and_leaves_nothing(volume, tmp_path):
    folder, image, _ = volume
    contract.fixture(tmp_path / "small.h5", "seg", np.zeros((20, 35, 45), np.uint32), voxel_size=VOXEL_SIZE)
    with pytest.raises(EmmitoError, match=r"small.h5 is \(20, 35, 45\) but .*image.h5 is \(20, 70, 90\)"):
        export_files(tmp_path / "small.h5", folder / "image.h5", tmp_path / "ng", small_params())
    assert not (tmp_path / "ng").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small.h5"]


def test_cli_export(volume, tmp_path):
    folder, _, _ = volume
    params = json.dumps({"export": {"chunk_size": [8, 32, 32], "pyramid_levels": 1}})
    result = subprocess.run(
        [sys.executable, "-m", "emmito.cli", "export", str(folder / "seg.h5"), str(folder / "image.h5"), str(tmp_path / "ng"), "--params", params],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "3 objects, 2 scales" in result.stderr
    assert len(json.loads((tmp_path / "ng/image/info").read_text())["scales"]) == 2


# ---- emmito view's choices (no browser needed) ----------------------------------


def test_view_picks_and_centres_on_the_largest_objects(volume, tmp_path):
    from emmito import view

    folder, _, _ = volume
    record = export_files(folder / "seg.h5", folder / "image.h5", tmp_path / "ng", small_params())
    assert view.load_export(tmp_path / "ng")["objects"] == record["objects"]
    assert view.largest_objects(record, 2) == [7, 3]
    assert view.largest_objects(record, 10) == [7, 3, 100000]
    # Object 7: z 5..18, y 40..66, x 60..85 -> x, y centre, z the middle slice's centre.
    assert view.initial_position(record, [7]) == [72.5, 53.0, 11.5]
    assert view.initial_position(record, []) == [45.0, 35.0, 9.5]
    assert view.initial_zoom(record, [7], view_pixels=600) == pytest.approx(90 / 600)  # the slice is small: fit it
    assert view.initial_zoom(record, [100000], view_pixels=600) == pytest.approx(4 * 3 / 600)


@pytest.mark.bad_input
def test_view_of_a_folder_that_is_not_an_export(tmp_path):
    from emmito import view

    with pytest.raises(EmmitoError, match=r"no image/info in it: point to the folder emmito export wrote"):
        view.load_export(tmp_path)
