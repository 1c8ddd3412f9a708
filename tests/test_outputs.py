"""emmito.outputs: seg.ome.zarr and seg.tif, read back with independent readers (ome-zarr, ome-zarr-models, tifffile).

The inputs are a real seg.h5 (the upsample stage's, with its pyramid) and image.h5.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the traced fixture is Blosc-compressed)
import numpy as np
import pytest

from emmito import cli, contract
from emmito.io import EmmitoError
from emmito.outputs import LABEL_NAME, write_ome_zarr, write_tiff
from emmito.resampling import mean_downsample
from emmito.upsample import upsample_files

VOXEL_SIZE = [40.0, 8.0, 8.0]


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """seg.h5 (main + s1 + s2, from upsample) and image.h5 of an 11 x 37 x 45 volume, odd y/x."""
    folder = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(0)
    traced = np.zeros((11, 19, 23), np.uint32)
    traced[2:9, 3:10, 2:15] = 3
    traced[0:4, 12:19, 15:23] = 9
    traced[5:11, 1:4, 1:4] = 40_000
    image = rng.integers(0, 256, (11, 37, 45), dtype=np.uint8)
    contract.fixture(folder / "seg_infer.h5", "seg", traced, voxel_size=[40, 16, 16], downsample_xy=2)
    contract.fixture(folder / "image.h5", "image", image, voxel_size=VOXEL_SIZE)
    upsample_files(folder / "seg_infer.h5", folder / "image.h5", folder / "seg.h5", pyramid_levels=2, slab_slices=4)
    with h5py.File(folder / "seg.h5", "r") as f:
        levels = [f[name][:] for name in contract.pyramid_levels(f)]
    return folder, image, levels


def tree_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_ngff(path: Path) -> tuple[dict, dict]:
    """(image node, label node) as ome-zarr's reader sees them: {"data": [numpy per level], "transforms", "axes"}."""
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(path), fmt=FormatV04()))())
    image = nodes[0]
    label = next(node for node in nodes if node.first(Label) is not None)

    def plain(node):
        return {
            "data": [np.asarray(level) for level in node.data],
            "transforms": node.metadata["coordinateTransformations"],
            "axes": node.metadata["axes"],
            "name": node.metadata["name"],
        }

    return plain(image), plain(label)


def test_ome_zarr_reader_returns_the_labels_of_seg_h5_at_every_level(volume, tmp_path):
    pytest.importorskip("ome_zarr")
    folder, image, levels = volume
    summary = write_ome_zarr(folder / "seg.h5", folder / "image.h5", tmp_path / "seg.ome.zarr")
    assert summary == {"shape": [11, 37, 45], "levels": 3, contract.VOXEL_SIZE: VOXEL_SIZE}
    image_node, label_node = read_ngff(tmp_path / "seg.ome.zarr")
    assert label_node["name"] == LABEL_NAME
    assert [a.shape for a in label_node["data"]] == [(11, 37, 45), (11, 19, 23), (11, 10, 12)]
    for level, expected in enumerate(levels):
        assert label_node["data"][level].dtype == np.uint32
        assert np.array_equal(label_node["data"][level], expected), f"labels level {level}"
    expected_image = image
    for level, data in enumerate(image_node["data"]):
        assert np.array_equal(data, expected_image), f"image level {level}"
        expected_image = mean_downsample(expected_image)
    for node in (image_node, label_node):
        assert [a["name"] for a in node["axes"]] == ["z", "y", "x"]
        assert {a["unit"] for a in node["axes"]} == {"nanometer"}
        scales = [next(t["scale"] for t in level if t["type"] == "scale") for level in node["transforms"]]
        assert scales == [[40.0, 8.0, 8.0], [40.0, 16.0, 16.0], [40.0, 32.0, 32.0]]
        # a pooled voxel's centre is at the centre of the voxels it pools
        assert node["transforms"][2][1] == {"type": "translation", "translation": [0.0, 12.0, 12.0]}


def test_ome_zarr_is_valid_ngff_0_4(volume, tmp_path):
    zarr = pytest.importorskip("zarr")
    models = pytest.importorskip("ome_zarr_models.v04")
    folder, _, _ = volume
    write_ome_zarr(folder / "seg.h5", folder / "image.h5", tmp_path / "seg.ome.zarr")
    root = zarr.open_group(str(tmp_path / "seg.ome.zarr"), mode="r")
    image = models.Image.from_zarr(root)
    assert [d.path for d in image.attributes.multiscales[0].datasets] == ["0", "1", "2"]
    label = models.ImageLabel.from_zarr(root[f"labels/{LABEL_NAME}"])
    assert label.attributes.image_label.source.image == "../../"
    assert json.loads((tmp_path / "seg.ome.zarr/labels/.zattrs").read_text()) == {"labels": [LABEL_NAME]}
    zarray = json.loads((tmp_path / "seg.ome.zarr/labels" / LABEL_NAME / "0/.zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["zarr_format"] == 2 and zarray["chunks"] == [8, 37, 45]


def test_ome_zarr_same_inputs_same_bytes_and_rerun_replaces(volume, tmp_path):
    folder, _, _ = volume
    first, second = tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"
    write_ome_zarr(folder / "seg.h5", folder / "image.h5", first)
    write_ome_zarr(folder / "seg.h5", folder / "image.h5", second)
    assert tree_bytes(first) == tree_bytes(second)
    (first / "stale").write_text("from an older export")
    write_ome_zarr(folder / "seg.h5", folder / "image.h5", first)
    assert not (first / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.zarr", "b.ome.zarr"], "temporary folders left behind"


@pytest.mark.bad_input
def test_ome_zarr_of_another_volume_is_one_line_error_and_leaves_nothing(volume, tmp_path):
    folder, _, _ = volume
    contract.fixture(tmp_path / "seg.h5", "seg", np.zeros((11, 30, 45), np.uint32), voxel_size=VOXEL_SIZE)
    with pytest.raises(EmmitoError, match=r"seg.h5 is \(11, 30, 45\) but .*image.h5 is \(11, 37, 45\)"):
        write_ome_zarr(tmp_path / "seg.h5", folder / "image.h5", tmp_path / "out.ome.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.h5"]


def test_tiff_of_small_ids_is_an_imagej_uint16_stack_with_the_voxel_size(volume, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    folder, _, levels = volume
    assert write_tiff(folder / "seg.h5", tmp_path / "seg.tif", slab_slices=4) == {"shape": [11, 37, 45], "dtype": "uint16", "max_id": 40000}
    with tifffile.TiffFile(tmp_path / "seg.tif") as tif:
        data = tif.asarray()
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.04) and tif.imagej_metadata["unit"] == "um"
        x_resolution = tif.pages[0].tags["XResolution"].value
        assert x_resolution[0] / x_resolution[1] == pytest.approx(1 / 0.008)  # pixels per µm
    assert data.dtype == np.uint16 and np.array_equal(data, levels[0])


def test_tiff_of_large_ids_is_a_uint32_ome_tiff_and_deterministic(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    seg = np.zeros((5, 20, 30), np.uint32)
    seg[1:4, 2:10, 3:20] = 70_000
    seg[0, 0, 0] = 1
    contract.fixture(tmp_path / "seg.h5", "seg", seg, voxel_size=[30, 6, 5])
    assert write_tiff(tmp_path / "seg.h5", tmp_path / "a/seg.tif", slab_slices=2)["dtype"] == "uint32"
    write_tiff(tmp_path / "seg.h5", tmp_path / "b/seg.tif", slab_slices=3)
    with tifffile.TiffFile(tmp_path / "a/seg.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "ZYX"
        assert 'PhysicalSizeX="5.0" PhysicalSizeXUnit="nm"' in tif.ome_metadata
        assert 'PhysicalSizeZ="30.0" PhysicalSizeZUnit="nm"' in tif.ome_metadata
        data = tif.asarray()
    assert data.dtype == np.uint32 and np.array_equal(data, seg)
    assert (tmp_path / "a/seg.tif").read_bytes() == (tmp_path / "b/seg.tif").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "seg.h5"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["seg.tif"], "temporary file left behind"


@pytest.mark.bad_input
def test_tiff_of_float_labels_is_one_line_error(tmp_path):
    with h5py.File(tmp_path / "float.h5", "w") as f:
        f.create_dataset(contract.DATASET, data=np.zeros((3, 4, 5), np.float32))
    with pytest.raises(EmmitoError, match=r"float.h5: labels are float32, not integers"):
        write_tiff(tmp_path / "float.h5", tmp_path / "seg.tif")
    assert not (tmp_path / "seg.tif").exists()


def test_cli_writes_ome_zarr_and_tiff(volume, tmp_path, capsys):
    folder, _, levels = volume
    assert cli.main(["export", "--ome-zarr", str(folder / "seg.h5"), str(folder / "image.h5"), str(tmp_path / "seg.ome.zarr")]) == 0
    assert "3 levels" in capsys.readouterr().err
    assert cli.main(["export", "--tiff", str(folder / "seg.h5"), str(tmp_path / "seg.tif")]) == 0
    assert "uint16 labels [11, 37, 45] (largest id 40000)" in capsys.readouterr().err
    _, label_node = read_ngff(tmp_path / "seg.ome.zarr")
    assert np.array_equal(label_node["data"][0], levels[0])


# Reads seg.h5 with plain h5py in a process that never imports hdf5plugin, and reports each dataset's filters.
PLAIN_READER = """
import json, sys
import h5py
with h5py.File(sys.argv[1], "r") as f:
    out = {name: {"compression": f[name].compression, "sum": int(f[name][()].sum(dtype="uint64")),
                  "filters": [f[name].id.get_create_plist().get_filter(i)[0] for i in range(f[name].id.get_create_plist().get_nfilters())]}
           for name in f}
assert "hdf5plugin" not in sys.modules
print(json.dumps(out))
"""


def test_seg_h5_is_readable_without_a_filter_plugin(volume):
    folder, _, levels = volume
    env = {key: value for key, value in os.environ.items() if key != "HDF5_PLUGIN_PATH"}
    result = subprocess.run([sys.executable, "-c", PLAIN_READER, str(folder / "seg.h5")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    datasets = json.loads(result.stdout)
    assert sorted(datasets) == [contract.DATASET, "s1", "s2"]
    for name, level in zip([contract.DATASET, "s1", "s2"], levels):
        assert datasets[name]["compression"] in ("gzip", None)
        # only HDF5's built-in filters: shuffle (2) and deflate (1)
        assert set(datasets[name]["filters"]) <= {h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE}
        assert datasets[name]["sum"] == int(level.sum(dtype=np.uint64))
