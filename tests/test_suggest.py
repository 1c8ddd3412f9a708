"""suggest: what to proofread first, ranked per kind, each row with a neuroglancer view state."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from emmito import cli, config, contract, suggest
from emmito.export import SEGMENTATION_LAYER
from emmito.io import EmmitoError, write_json
from test_export import write_objects_csv

VOXEL_SIZE = [40.0, 8.0, 8.0]
BLOCK_SLICES, BLOCK_OVERLAP = 6, 2
PARAMS = {**config.section_defaults("suggest"), "region": [6, 16, 16], "rows_per_kind": 3}


def tiny_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, foreground heat, uncertainty heat) of a 12 x 32 x 32 volume with six objects.

    Object 2 is the most uncertain (200 where the others have 10), object 4 the
    least sure foreground (heat 140: margin |280 - 255| = 25, the others 205),
    and the background of the box z 6-12, y 16-32, x 0-16 is uncertain (90).
    """
    labels = np.zeros((12, 32, 32), np.uint32)
    labels[1:5, 2:6, 2:6] = 1
    labels[1:4, 2:6, 20:26] = 2
    labels[4:10, 10:14, 10:14] = 3  # across the block face at slice 6
    labels[7:11, 2:6, 26:30] = 4
    labels[2:5, 24:28, 24:28] = 5
    labels[8:11, 20:23, 20:23] = 6
    foreground = np.where(labels > 0, 230, 5).astype(np.uint8)
    foreground[labels == 4] = 140
    uncertainty = np.where(labels > 0, 10, 0).astype(np.uint8)
    uncertainty[labels == 2] = 200
    uncertainty[6:12, 16:32, 0:16] = np.where(labels[6:12, 16:32, 0:16] == 0, 90, uncertainty[6:12, 16:32, 0:16])
    return labels, foreground, uncertainty


def write_heat_blocks(folder: Path, channels: dict[str, np.ndarray], block_slices: int = BLOCK_SLICES,
                      block_overlap: int = BLOCK_OVERLAP, downsample_xy: int = 1, attrs: dict | None = None) -> list[Path]:
    """heat/block_<b>.h5 as merge writes them: each block's slices and its overlap into the next, every channel."""
    stacked = np.stack(list(channels.values()))
    depth = stacked.shape[1]
    paths = []
    for b, start in enumerate(range(0, depth, block_slices)):
        path = folder / "heat" / f"block_{b}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        voxel_size = [VOXEL_SIZE[0], VOXEL_SIZE[1] * downsample_xy, VOXEL_SIZE[2] * downsample_xy]
        contract.fixture(path, "heat", stacked[:, start : start + block_slices + block_overlap], voxel_size=voxel_size,
                         offset=start, volume_depth=depth, downsample_xy=downsample_xy, channels=list(channels), attrs=attrs)
        paths.append(path)
    return paths


def trace_record(labels: np.ndarray, matches: list[dict], threshold: float = 0.5) -> dict:
    """A trace.json record for ``labels`` (ids 1..n) with the given matches."""
    objects = {str(i): {"voxels": int((labels == i).sum()), "bbox": [], "blocks": [0]} for i in range(1, int(labels.max()) + 1)}
    return {"blocks": 2, "objects": objects, "id_map": {}, "matching": {"criterion": "iou", "threshold": threshold}, "matches": matches}


def write_inputs(folder: Path, labels: np.ndarray, channels: dict[str, np.ndarray], matches: list[dict] | None = None,
                 shapes: dict[int, tuple[float, float]] | None = None, downsample_xy: int = 1, **heat) -> dict:
    """Every input of suggest in ``folder``: seg_infer.h5 (``labels``, the heat's frame), seg.h5 (full resolution),
    objects.csv (``shapes``: id -> (volume um3, length um) over what measure would write), trace.json and the heat blocks.
    """
    folder.mkdir(parents=True, exist_ok=True)
    f = downsample_xy
    full = labels.repeat(f, axis=1).repeat(f, axis=2)
    contract.fixture(folder / "seg_infer.h5", "seg", labels, voxel_size=[VOXEL_SIZE[0], VOXEL_SIZE[1] * f, VOXEL_SIZE[2] * f],
                     downsample_xy=f)
    contract.fixture(folder / "seg.h5", "seg", full, voxel_size=VOXEL_SIZE)
    rows = write_objects_csv(folder / "objects.csv", full, VOXEL_SIZE)
    for row in rows:
        row["length_um"] = 1.0 + 0.01 * row["id"]
        if shapes and row["id"] in shapes:
            row["volume_um3"], row["length_um"] = shapes[row["id"]]
    with open(folder / "objects.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=contract.OBJECT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    write_json(folder / "trace.json", trace_record(labels, matches or []))
    return {
        "traced": folder / "seg_infer.h5", "seg": folder / "seg.h5", "objects_csv": folder / "objects.csv",
        "trace_json": folder / "trace.json", "heat": write_heat_blocks(folder, channels, downsample_xy=f, **heat),
    }


WEAK = {"block": 0, "id_a": 3, "id_b": 1, "object": 3, "score": 0.55}  # just above 0.5: weak
STRONG = {"block": 0, "id_a": 9, "id_b": 2, "object": 5, "score": 0.95}
# object 6 is ten times the others' volume; object 1 three times as long
SHAPES = {1: (0.05, 3.0), 2: (0.052, 1.02), 3: (0.053, 1.03), 4: (0.054, 1.04), 5: (0.055, 1.05), 6: (0.5, 1.06)}


@pytest.fixture
def inputs(tmp_path):
    labels, foreground, uncertainty = tiny_volume()
    channels = {"foreground": foreground, contract.UNCERTAINTY_CHANNEL: uncertainty}
    return labels, write_inputs(tmp_path / "in", labels, channels, [STRONG, WEAK], SHAPES,
                                attrs={contract.UNCERTAINTY_KIND: "tta_std"})


def by_kind(rows: list[dict], kind: str) -> list[dict]:
    return [row for row in rows if row["kind"] == kind]


def test_the_most_uncertain_object_ranks_first(inputs, tmp_path):
    labels, files = inputs
    rows = suggest.suggest_files(tmp_path / "suggestions.csv", **files, params=PARAMS)
    uncertain = by_kind(rows, "uncertain_object")
    assert [r["segment_id"] for r in uncertain] == [2, 1, 3]  # 200 for object 2, then 10 each (ties: smaller id)
    assert uncertain[0]["score"] == f"{200 / 255:.6f}" and uncertain[0]["kind_rank"] == 1
    assert "tta_std" in uncertain[0]["reason"]
    assert rows[0]["rank"] == 1 and rows[0]["kind"] == "uncertain_object" and rows[0]["segment_id"] == 2
    margin = by_kind(rows, "low_margin")
    assert margin[0]["segment_id"] == 4 and margin[0]["score"] == f"{1 - 25 / 255:.6f}"


def test_shape_outliers_weak_matches_and_regions(inputs, tmp_path):
    labels, files = inputs
    rows = suggest.suggest_files(tmp_path / "suggestions.csv", **files, params=PARAMS)
    outliers = by_kind(rows, "shape_outlier")
    assert sorted(r["segment_id"] for r in outliers) == [1, 6]
    assert [float(r["score"]) for r in outliers] == sorted((float(r["score"]) for r in outliers), reverse=True)
    reasons = {r["segment_id"]: r["reason"] for r in outliers}
    assert reasons[6].startswith("volume 0.5000 um3 is") and "above the median" in reasons[6] and "length" not in reasons[6]
    assert reasons[1].startswith("length 3.000 um is") and "volume" not in reasons[1]
    assert "touches the volume's edge" not in reasons[1]
    weak = by_kind(rows, "weak_match")
    assert [(r["segment_id"], r["score"]) for r in weak] == [(3, "0.550000")]  # 0.95 is well above 0.5 + 0.1
    assert "blocks 0 and 1 joined their objects 3 and 1 at iou 0.550" in weak[0]["reason"]
    assert 6 <= weak[0]["z"] < 8  # centred in the slices both blocks see, where object 3 crosses
    regions = by_kind(rows, "uncertain_region")
    first = regions[0]
    assert first["segment_id"] == "" and [first[k] for k in ("z0", "y0", "x0", "z1", "y1", "x1")] == [6, 16, 0, 12, 32, 16]
    _, _, uncertainty = tiny_volume()
    assert float(first["score"]) == pytest.approx(uncertainty[6:12, 16:32, 0:16].sum() / 255, abs=1e-6)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    # interleaved: every kind's first row, in the contract's order, then every kind's second
    assert [r["kind"] for r in rows[:5]] == list(contract.SUGGESTION_KINDS)
    assert all(r["kind_rank"] == 1 for r in rows[:5]) and rows[5]["kind_rank"] == 2


def test_view_states_name_the_segment_and_frame_its_box(inputs, tmp_path):
    labels, files = inputs
    out = tmp_path / "suggestions.csv"
    suggest.suggest_files(out, **files, params=PARAMS)
    rows = suggest.read_suggestions(out)
    row = next(r for r in rows if r["kind"] == "uncertain_object" and r["kind_rank"] == "1")
    state = row["view_state"]
    assert set(state) == set(contract.SUGGESTION_VIEW_KEYS)
    assert state["layers"] == {SEGMENTATION_LAYER: {"segments": ["2"]}}
    assert state["position"] == [23.0, 4.0, 2.5]  # object 2: x 20-26, y 2-6, z 1-4 (slice 2's centre)
    assert state["crossSectionScale"] == round(4 * 6 / 600, 6)  # four times its extent in 600 pixels
    assert state["projectionScale"] == 3 * 3 * 40 / 8  # three times its largest extent (3 slices of 40 nm)
    assert (row["z"], row["y"], row["x"]) == ("2", "4", "23")
    region = next(r for r in rows if r["kind"] == "uncertain_region")
    assert region["view_state"]["layers"][SEGMENTATION_LAYER]["segments"] == []
    assert "server" not in json.dumps(state) and "http" not in out.read_text()
    assert contract.SUGGESTION_LAYER == SEGMENTATION_LAYER
    assert contract.suggestions_beside(tmp_path / "vol" / "ng") == str(tmp_path / "vol" / "suggestions.csv")
    assert contract.Results().suggestions("vol") == "results/vol/suggestions.csv"


def test_the_same_inputs_give_the_same_bytes_whatever_the_slab(inputs, tmp_path, monkeypatch):
    labels, files = inputs
    suggest.suggest_files(tmp_path / "a.csv", **files, params=PARAMS)
    suggest.suggest_files(tmp_path / "b.csv", **files, params=PARAMS)
    monkeypatch.setattr(suggest, "SLAB_SLICES", 1)
    suggest.suggest_files(tmp_path / "c.csv", **files, params=PARAMS)
    data = (tmp_path / "a.csv").read_bytes()
    assert data == (tmp_path / "b.csv").read_bytes() == (tmp_path / "c.csv").read_bytes()
    assert data.startswith(",".join(contract.SUGGESTION_COLUMNS).encode() + b"\n")
    assert not list(tmp_path.glob(".*tmp*"))


def test_without_an_uncertainty_channel_the_foreground_margin_stands_in(tmp_path):
    labels, foreground, _ = tiny_volume()
    files = write_inputs(tmp_path / "in", labels, {"foreground": foreground}, [WEAK])
    rows = suggest.suggest_files(tmp_path / "suggestions.csv", **files, params=PARAMS)
    assert not by_kind(rows, "uncertain_object")  # they would repeat the low_margin rows
    assert by_kind(rows, "low_margin")[0]["segment_id"] == 4
    regions = by_kind(rows, "uncertain_region")
    assert regions and all("no uncertainty channel" in r["reason"] for r in regions)
    # 1 - |2p - 1| per voxel, in uint8: 255 - |2 heat - 255|; background heat 5 gives 10, object 4's 140 gives 230
    stand_in = 255 - np.abs(2 * foreground.astype(int) - 255)
    best = max(((z, y, x) for z in (0, 6) for y in (0, 16) for x in (0, 16)),
               key=lambda c: stand_in[c[0] : c[0] + 6, c[1] : c[1] + 16, c[2] : c[2] + 16].sum())
    first = regions[0]
    assert (first["z0"], first["y0"], first["x0"]) == best
    z, y, x = best
    assert float(first["score"]) == pytest.approx(stand_in[z : z + 6, y : y + 16, x : x + 16].sum() / 255, abs=1e-6)


def test_at_half_resolution_the_rows_are_in_full_resolution_voxels(tmp_path):
    labels, foreground, uncertainty = tiny_volume()
    files = write_inputs(tmp_path / "in", labels, {"foreground": foreground, contract.UNCERTAINTY_CHANNEL: uncertainty},
                         downsample_xy=2)
    params = {**PARAMS, "region": [6, 32, 32]}  # 16 x 16 at the heat's resolution, as above
    rows = suggest.suggest_files(tmp_path / "suggestions.csv", **files, params=params)
    first = by_kind(rows, "uncertain_object")[0]
    assert first["segment_id"] == 2 and [first[k] for k in ("z0", "y0", "x0", "z1", "y1", "x1")] == [1, 4, 40, 4, 12, 52]
    assert json.loads(first["view_state"])["position"] == [46.0, 8.0, 2.5]
    region = by_kind(rows, "uncertain_region")[0]
    assert [region[k] for k in ("z0", "y0", "x0", "z1", "y1", "x1")] == [6, 32, 0, 12, 64, 32]
    assert float(region["score"]) == pytest.approx(uncertainty[6:12, 16:32, 0:16].sum() / 255 * 4, abs=1e-6)


def test_cli_writes_the_file(inputs, tmp_path):
    labels, files = inputs
    out = tmp_path / "out" / "suggestions.csv"
    argv = ["suggest", str(out), "--traced", str(files["traced"]), "--seg", str(files["seg"]), "--objects", str(files["objects_csv"]),
            "--trace", str(files["trace_json"]), "--heat", *map(str, reversed(files["heat"])),
            "--params", json.dumps({"suggest": {"rows_per_kind": 2, "region": [6, 16, 16]}})]
    assert cli.main(argv) == 0
    rows = suggest.read_suggestions(out)
    assert {r["kind"] for r in rows} == set(contract.SUGGESTION_KINDS)
    assert all(int(r["kind_rank"]) <= 2 for r in rows)


@pytest.mark.bad_input
def test_a_missing_heat_block_is_one_line(inputs, tmp_path, capsys):
    labels, files = inputs
    out = tmp_path / "suggestions.csv"
    with pytest.raises(EmmitoError, match="block_1.h5: starts at slice 6, but the blocks before it end at slice 0: pass every"):
        suggest.suggest_files(out, **{**files, "heat": files["heat"][1:]}, params=PARAMS)
    with pytest.raises(EmmitoError, match="block_0.h5: holds slices 0-7, but slices up to 11 are in no later heat block"):
        suggest.suggest_files(out, **{**files, "heat": files["heat"][:1]}, params=PARAMS)
    assert not out.exists()


@pytest.mark.bad_input
def test_an_old_trace_record_and_a_foreign_seg_are_one_line(inputs, tmp_path, capsys):
    labels, files = inputs
    record = json.loads(files["trace_json"].read_text())
    del record["matches"]
    write_json(files["trace_json"], record)
    argv = ["suggest", str(tmp_path / "s.csv"), "--traced", str(files["traced"]), "--seg", str(files["seg"]),
            "--objects", str(files["objects_csv"]), "--trace", str(files["trace_json"]), "--heat", *map(str, files["heat"])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trace.json: no scored 'matches'" in err[0] and "rerun emmito trace" in err[0]
    assert not (tmp_path / "s.csv").exists()
    contract.fixture(files["seg"], "seg", np.zeros((12, 40, 40), np.uint32), voxel_size=VOXEL_SIZE)
    with pytest.raises(EmmitoError, match=r"seg.h5: shape \(12, 40, 40\) is not .*seg_infer.h5's \(12, 32, 32\)"):
        suggest.read_frame(files["traced"], files["seg"])


@pytest.mark.bad_input
def test_a_bad_suggestions_file_is_one_line(tmp_path):
    with pytest.raises(EmmitoError, match="suggestions.csv: file not found: run the suggest rule"):
        suggest.read_suggestions(tmp_path / "suggestions.csv")
    (tmp_path / "suggestions.csv").write_text("id,voxels\n1,2\n")
    with pytest.raises(EmmitoError, match="not an emmito suggestions table"):
        suggest.read_suggestions(tmp_path / "suggestions.csv")


def test_robust_z_scores():
    z, median, sd = suggest.robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert median == 3.0 and sd == pytest.approx(1.4826)
    assert z[-1] == pytest.approx(97 / 1.4826)
    assert suggest.robust_z(np.ones(4))[0].tolist() == [0, 0, 0, 0]  # no spread: nothing stands out
