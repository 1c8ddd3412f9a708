"""emmito export: neuroglancer precomputed volumes from seg.h5 + image.h5 + objects.csv + meshes, read back with tensorstore."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest

from emmito import config, contract
from emmito.export import export_files, scale_shapes, sharding_spec
from emmito.io import EmmitoError
from emmito.resampling import downsample_mode, mean_downsample

ts = pytest.importorskip("tensorstore")

VOXEL_SIZE = [40.0, 8.0, 8.0]


def small_params(**overrides) -> dict:
    return config.with_defaults("export", {"chunk_size": [4, 16, 16], "pyramid_levels": 3, "shard_chunks": 8, **overrides})


def write_objects_csv(path: Path, seg: np.ndarray, voxel_size: list[float]) -> list[dict]:
    """objects.csv as the measure stage writes it (contract.OBJECT_COLUMNS), computed here with numpy.

    The true voxel counts, boxes and volumes; surface and length are made-up
    figures (id + 0.5 µm², id / 10 µm) that only the csv holds, so a test can
    tell that export took its figures from the csv.
    """
    voxel_um3 = float(np.prod(voxel_size)) / 1e9
    rows = []
    for label in np.unique(seg[seg > 0]):
        where = np.nonzero(seg == label)
        low, high = [int(a.min()) for a in where], [int(a.max()) + 1 for a in where]
        voxels = int(where[0].size)
        row = {"id": int(label), "voxels": voxels, "volume_um3": round(voxels * voxel_um3, 6), "surface_um2": label + 0.5,
               "length_um": label / 10, "max_cross_section_um2": 0.25, "first_slice": low[0], "last_slice": high[0] - 1,
               "first_block": 0, "last_block": 0,
               "touches_edge": int(min(low) == 0 or any(h == n for h, n in zip(high, seg.shape)))}
        for axis, a, lo, hi, size in zip("zyx", where, low, high, voxel_size):
            row[f"centroid_{axis}_nm"] = round((float(a.mean()) + 0.5) * size, 3)
            row[f"bbox_{axis}0_nm"], row[f"bbox_{axis}1_nm"] = lo * size, hi * size
        rows.append(row)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=contract.OBJECT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def write_meshes(folder: Path, seg: np.ndarray, voxel_size: list[float]) -> Path:
    """A meshes folder as the measure stage writes it (contract.MESH_INFO, manifests, zmesh fragments in nm).

    zmesh puts voxel centres at index * size, and one voxel further on with
    close=True (it pads the volume to close objects cut by its faces); the
    contract puts a voxel's low corner at index * size: the vertices move by
    half a voxel, less the padding.
    """
    zmesh = pytest.importorskip("zmesh")
    folder.mkdir(parents=True)
    (folder / "info").write_text(json.dumps(contract.MESH_INFO))
    mesher = zmesh.Mesher(tuple(voxel_size[::-1]))  # x, y, z
    mesher.mesh(np.asfortranarray(seg.T), close=True)
    for label in mesher.ids():
        mesh = mesher.get(label, normals=False)
        mesh.vertices += np.asarray(voxel_size[::-1], dtype=mesh.vertices.dtype) * (0.5 - 1)
        (folder / str(label)).write_bytes(mesh.to_precomputed())
        (folder / contract.mesh_manifest_name(label)).write_text(json.dumps({"fragments": [str(label)]}))
    return folder


def measured(folder: Path, seg: np.ndarray, voxel_size: list[float]) -> tuple[Path, Path]:
    """(objects.csv, meshes folder) of ``seg`` in ``folder``, as emmito measure leaves them."""
    write_objects_csv(folder / "objects.csv", seg, voxel_size)
    return folder / "objects.csv", write_meshes(folder / "meshes", seg, voxel_size)


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
    measured(folder, seg, VOXEL_SIZE)
    return folder, image, seg


def export(folder: Path, out: Path, params: dict, meshes: bool = True) -> dict:
    return export_files(
        folder / "seg.h5", folder / "image.h5", out, params, folder / "objects.csv", folder / "meshes" if meshes else None
    )


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


@pytest.mark.parametrize("sharded", [False, True])
def test_export_writes_every_scale_exactly(volume, tmp_path, sharded):
    folder, image, seg = volume
    params = small_params(shard_above_voxels=0 if sharded else 10**9)
    record = export(folder, tmp_path / "ng", params)
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


def test_segment_properties_and_objects_json_come_from_objects_csv(volume, tmp_path):
    folder, _, seg = volume
    export(folder, tmp_path / "ng", small_params())
    info = json.loads((tmp_path / "ng/segmentation/info").read_text())
    properties = json.loads((tmp_path / "ng/segmentation" / info["segment_properties"] / "info").read_text())
    assert properties["@type"] == "neuroglancer_segment_properties"
    inline = properties["inline"]
    assert inline["ids"] == ["3", "7", "100000"]
    values = {p["id"]: p["values"] for p in inline["properties"]}
    assert values["voxels"] == [int((seg == i).sum()) for i in (3, 7, 100000)] == [8000, 8450, 18]
    assert values["volume_um3"][0] == pytest.approx(8000 * 40 * 8 * 8 / 1e9)
    # Surface and length exist only in the csv (made-up figures): export took them from it.
    assert values["surface_um2"] == [3.5, 7.5, 100000.5]
    assert values["length_um"] == [0.3, 0.7, 10000.0]
    assert values["touches_edge"] == [0, 0, 1]
    assert values["label"][0] == "0.0205 µm³, 0.3 µm long"
    assert values["label"][2] == "4.6e-05 µm³, 1e+04 µm long (cut by the volume's edge)"
    number_types = {p["id"]: p["data_type"] for p in inline["properties"] if p["type"] == "number"}
    assert number_types == {"voxels": "uint32", "volume_um3": "float32", "surface_um2": "float32", "length_um": "float32",
                            "max_cross_section_um2": "float32", "touches_edge": "uint8"}
    objects = json.loads((tmp_path / "ng/objects.json").read_text())["objects"]
    assert objects["7"] == {"voxels": 8450, "bbox": [5, 40, 60, 18, 66, 85], "volume_um3": 0.021632,
                            "surface_um2": 7.5, "length_um": 0.7, "touches_edge": 0}
    assert objects["100000"]["bbox"] == [0, 0, 0, 2, 3, 3]


def read_fragment(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (n, 3) x, y, z nm, triangles (m, 3)) of a neuroglancer legacy mesh fragment."""
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data)
    vertices = np.frombuffer(data, "<f4", count * 3, offset=4).reshape(-1, 3)
    triangles = np.frombuffer(data, "<u4", offset=4 + 12 * count).reshape(-1, 3)
    return vertices, triangles


def test_meshes_are_copied_into_the_segmentation(volume, tmp_path):
    folder, _, _ = volume
    record = export(folder, tmp_path / "ng", small_params())
    layer = tmp_path / "ng/segmentation"
    assert json.loads((layer / "info").read_text())["mesh"] == "mesh" and record["meshes"]
    assert json.loads((layer / "mesh/info").read_text()) == {"@type": "neuroglancer_legacy_mesh"}
    assert json.loads((layer / "mesh/7:0").read_text()) == {"fragments": ["7"]}
    vertices, triangles = read_fragment(layer / "mesh/7")
    assert len(triangles) > 0 and triangles.max() < len(vertices)
    # Object 7 fills z 5..18, y 40..66, x 60..85: its surface spans that box in nm (x, y, z order).
    assert vertices.min(axis=0).tolist() == [60 * 8, 40 * 8, 5 * 40]
    assert vertices.max(axis=0).tolist() == [85 * 8, 66 * 8, 18 * 40]
    assert sorted(p.name for p in (layer / "mesh").iterdir()) == sorted(p.name for p in (folder / "meshes").iterdir())
    assert sorted(p.name for p in (folder / "meshes").iterdir()) == ["100000", "100000:0", "3", "3:0", "7", "7:0", "info"]


def test_without_meshes_the_segmentation_has_none(volume, tmp_path):
    folder, _, _ = volume
    record = export(folder, tmp_path / "ng", small_params(), meshes=False)
    assert "mesh" not in json.loads((tmp_path / "ng/segmentation/info").read_text()) and not record["meshes"]
    assert not (tmp_path / "ng/segmentation/mesh").exists()


def test_same_inputs_same_bytes_and_rerun_replaces(volume, tmp_path):
    folder, _, _ = volume
    params = small_params(shard_above_voxels=0)
    first, second = tmp_path / "a", tmp_path / "b"
    export(folder, first, params)
    export(folder, second, params)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    (first / "stale.txt").write_text("from an older export")
    export(folder, first, params)
    assert not (first / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"], "temporary folders left behind"


@pytest.mark.bad_input
def test_shape_mismatch_is_one_line_error_and_leaves_nothing(volume, tmp_path):
    folder, image, _ = volume
    contract.fixture(tmp_path / "small.h5", "seg", np.zeros((20, 35, 45), np.uint32), voxel_size=VOXEL_SIZE)
    with pytest.raises(EmmitoError, match=r"small.h5 is \(20, 35, 45\) but .*image.h5 is \(20, 70, 90\)"):
        export_files(tmp_path / "small.h5", folder / "image.h5", tmp_path / "ng", small_params(), folder / "objects.csv")
    assert not (tmp_path / "ng").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small.h5"]


@pytest.mark.bad_input
def test_objects_csv_of_another_volume_is_one_line_error(volume, tmp_path):
    folder, _, _ = volume
    big = np.zeros((20, 70, 200), np.uint32)
    big[3:5, 10:20, 150:190] = 4
    write_objects_csv(tmp_path / "objects.csv", big, VOXEL_SIZE)
    with pytest.raises(EmmitoError, match=r"objects.csv: object 4 has box \[3, 10, 150, 5, 20, 190\] \(voxels\), outside the volume \[20, 70, 90\]: .*rerun emmito measure"):
        export_files(folder / "seg.h5", folder / "image.h5", tmp_path / "ng", small_params(), tmp_path / "objects.csv")
    assert not (tmp_path / "ng").exists()


@pytest.mark.bad_input
def test_meshes_missing_an_object_is_one_line_error_and_leaves_nothing(volume, tmp_path):
    import shutil

    folder, _, _ = volume
    meshes = tmp_path / "meshes"
    shutil.copytree(folder / "meshes", meshes)
    (meshes / contract.mesh_manifest_name(7)).unlink()
    with pytest.raises(EmmitoError, match=r"meshes: no mesh for 1 of the 3 objects of objects.csv \(first: 7\): .*rerun emmito measure"):
        export_files(folder / "seg.h5", folder / "image.h5", tmp_path / "ng", small_params(), folder / "objects.csv", meshes)
    (meshes / "info").unlink()
    with pytest.raises(EmmitoError, match=r"meshes: not a meshes folder"):
        export_files(folder / "seg.h5", folder / "image.h5", tmp_path / "ng", small_params(), folder / "objects.csv", meshes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meshes"]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["SEG", "IMAGE", "OUT"], "emmito export SEG IMAGE OUT_DIR needs --objects objects.csv"),
        (["--tiff", "SEG", "IMAGE", "OUT"], "emmito export --tiff SEG OUT.tif takes 2 paths, got 3"),
        (["--ome-zarr", "SEG", "OUT"], "emmito export --ome-zarr SEG IMAGE OUT.ome.zarr takes 3 paths, got 2"),
        (["--tiff", "SEG", "OUT", "--objects", "x.csv"], "--objects and --meshes belong to the neuroglancer export"),
    ],
)
def test_cli_export_paths_must_fit_the_format(argv, message, tmp_path, capsys):
    from emmito import cli

    assert cli.main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_export(volume, tmp_path):
    folder, _, _ = volume
    params = json.dumps({"export": {"chunk_size": [8, 32, 32], "pyramid_levels": 1}})
    result = subprocess.run(
        [sys.executable, "-m", "emmito.cli", "export", str(folder / "seg.h5"), str(folder / "image.h5"), str(tmp_path / "ng"),
         "--objects", str(folder / "objects.csv"), "--meshes", str(folder / "meshes"), "--params", params],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "3 objects with meshes, 2 scales" in result.stderr
    assert len(json.loads((tmp_path / "ng/image/info").read_text())["scales"]) == 2


# ---- emmito view's choices (no browser needed) ----------------------------------


def test_view_picks_and_centres_on_the_largest_objects(volume, tmp_path):
    from emmito import view

    folder, _, _ = volume
    record = export(folder, tmp_path / "ng", small_params())
    assert view.load_export(tmp_path / "ng")["objects"] == record["objects"]
    assert view.largest_objects(record, 2) == [7, 3]
    assert view.largest_objects(record, 10) == [7, 3, 100000]
    # Object 7: z 5..18, y 40..66, x 60..85 -> x, y centre, z the middle slice's centre.
    assert view.initial_position(record, [7]) == [72.5, 53.0, 11.5]
    assert view.initial_position(record, []) == [45.0, 35.0, 9.5]
    assert view.initial_zoom(record, [7], view_pixels=600) == pytest.approx(90 / 600)  # the slice is small: fit it
    assert view.initial_zoom(record, [100000], view_pixels=600) == pytest.approx(4 * 3 / 600)
    # The 3D view: 3 x object 7's largest extent (z: 13 slices x 40 nm = 520 nm) in 8 nm units; else 1.5 x the volume's (z: 800 nm).
    assert view.initial_projection_scale(record, [7]) == pytest.approx(3 * 520 / 8)
    assert view.initial_projection_scale(record, []) == pytest.approx(1.5 * 20 * 40 / 8)


@pytest.mark.bad_input
def test_view_of_a_folder_that_is_not_an_export(tmp_path):
    from emmito import view

    with pytest.raises(EmmitoError, match=r"no image/info in it: point to the folder emmito export wrote"):
        view.load_export(tmp_path)
