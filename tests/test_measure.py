"""emmito measure: objects.csv and the meshes folder from a small hand-built seg.h5."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import zmesh

from emmito import config, contract, labels, measure
from emmito.io import EmmitoError

VOXEL = (40.0, 8.0, 8.0)
SHAPE = (30, 64, 80)
BLOCK = 10  # slices per segment block in these tests


def build_seg() -> np.ndarray:
    """Four objects: a box across blocks 0-1, one cut by the volume's edge, a tube across three blocks, a sphere."""
    seg = np.zeros(SHAPE, np.uint32)
    seg[5:15, 10:30, 10:30] = 3  # slices 5..14: blocks 0 and 1
    seg[0:4, 40:50, 60:80] = 7  # touches z = 0 and the last x
    seg[8:25, 50:56, 5:11] = 9  # a tube along z, slices 8..24: blocks 0..2, and across the 8-slice slabs of pass 1
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    ball = ((z + 0.5) * 40 - 800) ** 2 + ((y + 0.5) * 8 - 200) ** 2 + ((x + 0.5) * 8 - 400) ** 2 <= 160.0**2
    seg[ball & (seg == 0)] = 12
    return seg


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("measure")
    seg = build_seg()
    contract.fixture(folder / "seg.h5", "seg", seg, voxel_size=VOXEL)
    params = config.section_defaults("measure")
    rows = measure.measure_files(folder / "seg.h5", folder / "objects.csv", folder / "meshes", params, BLOCK)
    return folder, seg, rows, params


def expected_box(seg: np.ndarray, label: int) -> tuple[list[int], list[int]]:
    where = np.nonzero(seg == label)
    return [int(w.min()) for w in where], [int(w.max()) + 1 for w in where]


def test_the_table_has_exact_counts_boxes_slices_blocks_and_edges(measured):
    folder, seg, rows, _ = measured
    table = labels.read_objects(folder / "objects.csv")
    assert [r["id"] for r in table] == [3, 7, 9, 12]
    assert (folder / "objects.csv").read_text().splitlines()[0] == ",".join(contract.OBJECT_COLUMNS)
    by_id = {r["id"]: r for r in table}
    for label, row in by_id.items():
        mask = seg == label
        low, high = expected_box(seg, label)
        assert row["voxels"] == int(mask.sum())
        assert row["volume_um3"] == pytest.approx(mask.sum() * 40 * 8 * 8 / 1e9, abs=1e-9)
        for axis, name in enumerate("zyx"):
            mean = np.nonzero(mask)[axis].mean()
            assert row[f"centroid_{name}_nm"] == pytest.approx((mean + 0.5) * VOXEL[axis], abs=1e-3)
            assert row[f"bbox_{name}0_nm"] == low[axis] * VOXEL[axis]
            assert row[f"bbox_{name}1_nm"] == high[axis] * VOXEL[axis]
        assert (row["first_slice"], row["last_slice"]) == (low[0], high[0] - 1)
        assert row["max_cross_section_um2"] == pytest.approx(mask.sum(axis=(1, 2)).max() * 64 / 1e6, abs=1e-6)
    assert [(by_id[i]["first_block"], by_id[i]["last_block"]) for i in (3, 7, 9, 12)] == [(0, 1), (0, 0), (0, 2), (1, 2)]
    assert [by_id[i]["touches_edge"] for i in (3, 7, 9, 12)] == [0, 1, 0, 0]
    assert isinstance(by_id[3]["voxels"], int) and isinstance(by_id[3]["surface_um2"], float)
    assert rows == [{k: r[k] for k in contract.OBJECT_COLUMNS} for r in rows]  # every column, nothing else


def test_the_table_has_plausible_areas_and_lengths(measured):
    """Box 3 is 400 x 160 x 160 nm, tube 9 is 680 x 48 x 48 nm, sphere 12 has radius 160 nm."""
    _, _, rows, _ = measured
    by_id = {r["id"]: r for r in rows}
    box_area = 2 * (400 * 160 * 2 + 160 * 160) / 1e6
    # smoothing rounds a box's edges and corners, so its area is a little under that of its faces
    assert 0.85 * box_area < by_id[3]["surface_um2"] < 1.02 * box_area
    sphere_area = 4 * math.pi * 160**2 / 1e6
    print(f"sphere of radius 160 nm (4 slices): area {by_id[12]['surface_um2'] / sphere_area:.3f} of 4 pi r^2")
    assert abs(by_id[12]["surface_um2"] / sphere_area - 1) < 0.15
    # the tube's skeleton runs along its 680 nm, from one end's surface to the other's
    print(f"tube of 680 nm: skeleton {by_id[9]['length_um'] * 1000:.0f} nm")
    assert 0.6 < by_id[9]["length_um"] < 0.72
    assert by_id[7]["length_um"] > 0


def test_the_meshes_folder_loads(measured):
    folder, seg, rows, params = measured
    meshes = folder / "meshes"
    assert json.loads((meshes / "info").read_text()) == contract.MESH_INFO
    names = sorted(p.name for p in meshes.iterdir())
    assert names == sorted(["info"] + [n for r in rows for n in (str(r["id"]), contract.mesh_manifest_name(r["id"]))])
    for row in rows:
        manifest = json.loads((meshes / contract.mesh_manifest_name(row["id"])).read_text())
        assert manifest == {"fragments": [str(row["id"])]}
        mesh = zmesh.Mesh.from_precomputed((meshes / manifest["fragments"][0]).read_bytes())
        assert len(mesh.faces) > 0 and mesh.faces.max() < len(mesh.vertices)
        # vertices (x, y, z) nm inside the object's box, give or take the simplification's error
        low = np.array([row["bbox_x0_nm"], row["bbox_y0_nm"], row["bbox_z0_nm"]])
        high = np.array([row["bbox_x1_nm"], row["bbox_y1_nm"], row["bbox_z1_nm"]])
        error = params["mesh_max_error"]
        assert (mesh.vertices >= low - error).all() and (mesh.vertices <= high + error).all()
        assert np.abs(mesh.vertices.min(0) - low).max() <= error + 1e-3


def test_two_runs_write_the_same_bytes_and_the_cli_reads_block_slices_from_params(measured, tmp_path):
    folder, _, _, _ = measured
    params = json.dumps({"merge": {"block_slices": BLOCK}})
    result = subprocess.run(
        [sys.executable, "-m", "emmito.cli", "measure", str(folder / "seg.h5"), str(tmp_path / "objects.csv"),
         "--meshes", str(tmp_path / "meshes"), "--params", params],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "emmito measure: 4 objects" in result.stderr
    assert (tmp_path / "objects.csv").read_bytes() == (folder / "objects.csv").read_bytes()
    first = {p.name: p.read_bytes() for p in (folder / "meshes").iterdir()}
    second = {p.name: p.read_bytes() for p in (tmp_path / "meshes").iterdir()}
    assert first == second
    # --block-slices wins over the params; a rerun replaces the folder whole
    measure.measure_files(folder / "seg.h5", tmp_path / "objects.csv", tmp_path / "meshes", config.section_defaults("measure"), 5)
    assert [r["last_block"] for r in labels.read_objects(tmp_path / "objects.csv")] == [2, 0, 4, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meshes", "objects.csv"]


def test_an_empty_volume_gives_a_header_and_an_info(tmp_path):
    contract.fixture(tmp_path / "seg.h5", "seg", np.zeros((3, 4, 5), np.uint32))
    rows = measure.measure_files(tmp_path / "seg.h5", tmp_path / "objects.csv", tmp_path / "meshes", config.section_defaults("measure"), 200)
    assert rows == [] and labels.read_objects(tmp_path / "objects.csv") == []
    assert sorted(p.name for p in (tmp_path / "meshes").iterdir()) == ["info"]


def test_object_statistics_across_slabs_match_numpy():
    seg = build_seg()
    statistics = labels.ObjectStatistics()
    for start in range(0, SHAPE[0], 7):
        statistics.add(seg[start : start + 7], (start, 0, 0))
    for label in (3, 7, 9, 12):
        low, high = expected_box(seg, label)
        assert statistics.voxels[label] == int((seg == label).sum())
        assert (statistics.low[label], statistics.high[label]) == (low, high)
    assert list(statistics.record()) == ["3", "7", "9", "12"]


@pytest.mark.bad_input
def test_a_missing_seg_gets_one_line_and_no_output(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "emmito.cli", "measure", str(tmp_path / "nope.h5"), str(tmp_path / "out/objects.csv"),
         "--meshes", str(tmp_path / "out/meshes"), "--block-slices", "10"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.h5: file not found" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input
def test_a_float_seg_and_a_foreign_table_are_refused(tmp_path):
    contract.fixture(tmp_path / "heat.h5", "heat", np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(EmmitoError, match=r"heat.h5: labels are uint8 of shape \(1, 3, 4, 5\), not integer \(z, y, x\)"):
        measure.measure_files(tmp_path / "heat.h5", tmp_path / "objects.csv", None, config.section_defaults("measure"), 10)
    assert not (tmp_path / "objects.csv").exists()
    (tmp_path / "objects.csv").write_text("label,size\n1,2\n")
    with pytest.raises(EmmitoError, match="objects.csv: not an emmito objects table"):
        labels.read_objects(tmp_path / "objects.csv")
    (tmp_path / "objects.csv").write_text(",".join(contract.OBJECT_COLUMNS) + "\n" + ",".join(["x"] * len(contract.OBJECT_COLUMNS)) + "\n")
    with pytest.raises(EmmitoError, match="line 2 holds a value that is not a number"):
        labels.read_objects(tmp_path / "objects.csv")
    with pytest.raises(EmmitoError, match="missing.csv: file not found: run 'emmito measure'"):
        labels.read_objects(tmp_path / "missing.csv")


def test_the_csv_writer_fixes_the_decimals():
    row = {column: 1 for column in contract.OBJECT_COLUMNS} | {"volume_um3": 1 / 3, "centroid_z_nm": 2 / 3, "length_um": 0.1}
    text = labels.objects_csv_text([row])
    values = dict(zip(contract.OBJECT_COLUMNS, text.splitlines()[1].split(",")))
    assert values["id"] == "1" and values["touches_edge"] == "1"
    assert values["volume_um3"] == "0.333333333" and values["centroid_z_nm"] == "0.667" and values["length_um"] == "0.100000"
