"""evaluate: voxel and instance metrics against ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from emmito import cli
from emmito.contract import fixture
from emmito.evaluate import evaluate_files
from emmito.io import read_json
from emmito.metrics import count_matches, evaluate_arrays


def two_cubes() -> np.ndarray:
    gt = np.zeros((6, 12, 12), np.uint32)
    gt[1:5, 1:5, 1:5] = 1
    gt[1:5, 7:11, 7:11] = 2
    return gt


def test_perfect_prediction_scores_one_everywhere():
    gt = two_cubes()
    seg = np.where(gt == 1, 40, np.where(gt == 2, 3, 0)).astype(np.uint32)  # other ids, same objects
    metrics = evaluate_arrays(seg, gt)
    for key in ("voxel_precision", "voxel_recall", "voxel_iou", "voxel_dice",
                "instance_precision", "instance_recall", "instance_f1", "f1_2d"):
        assert metrics[key] == 1.0, key
    assert metrics["f1_at_iou"] == [1.0] * 10
    assert metrics["f1_iou_thresholds"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert (metrics["gt_objects"], metrics["predicted_objects"], metrics["matched_objects"]) == (2, 2, 2)
    assert metrics["gt_objects_2d"] == 8


def test_one_missed_object_halves_recall():
    gt = two_cubes()
    seg = np.where(gt == 1, 1, 0).astype(np.uint32)
    metrics = evaluate_arrays(seg, gt)
    assert metrics["instance_recall"] == 0.5
    assert metrics["instance_precision"] == 1.0
    assert metrics["instance_f1"] == pytest.approx(2 / 3)
    assert metrics["voxel_recall"] == 0.5 and metrics["voxel_precision"] == 1.0
    assert metrics["voxel_iou"] == 0.5 and metrics["voxel_dice"] == pytest.approx(2 / 3)


def test_merged_prediction_lowers_f1():
    gt = two_cubes()
    seg = (gt > 0).astype(np.uint32)
    seg[1:5, 5:7, 3:9] = 1  # a bridge joins the two cubes into one object
    metrics = evaluate_arrays(seg, gt)
    assert metrics["predicted_objects"] == 1
    assert metrics["matched_objects"] == 0
    assert metrics["instance_f1"] == 0.0
    assert metrics["voxel_recall"] == 1.0 and metrics["voxel_precision"] < 1.0


def test_partial_overlap_passes_some_iou_thresholds():
    gt = np.zeros((4, 10, 10), np.uint32)
    gt[:, 0:10, 0:5] = 1
    seg = np.zeros_like(gt)
    seg[:, 0:7, 0:5] = 1  # IoU 0.7
    f1 = evaluate_arrays(seg, gt)["f1_at_iou"]
    assert f1 == [1.0] * 5 + [0.0] * 5
    assert evaluate_arrays(seg, gt, iou_threshold=0.75)["instance_f1"] == 0.0


def test_empty_cases_do_not_divide_by_zero():
    gt = two_cubes()
    empty = np.zeros_like(gt)
    # Both empty: nothing to find, nothing found -> perfect.
    both = evaluate_arrays(empty, empty)
    assert both["instance_f1"] == both["voxel_iou"] == both["instance_precision"] == both["f1_2d"] == 1.0
    # Empty prediction: precision of nothing is 0 (not 1) when there was something to find.
    missed = evaluate_arrays(empty, gt)
    assert missed["instance_precision"] == missed["instance_recall"] == missed["instance_f1"] == 0.0
    assert missed["voxel_precision"] == missed["voxel_iou"] == 0.0
    # Empty ground truth: every prediction is false.
    spurious = evaluate_arrays(gt, empty)
    assert spurious["instance_precision"] == spurious["instance_recall"] == spurious["voxel_dice"] == 0.0


def test_low_threshold_uses_a_one_to_one_assignment():
    # gt 1 overlaps pred 1 and 2; gt 2 overlaps only pred 1: the best one-to-one is 2 matches.
    pair_gt = np.array([1, 1, 2], np.uint64)
    pair_pred = np.array([1, 2, 1], np.uint64)
    iou = np.array([0.45, 0.32, 0.31])
    assert count_matches(pair_gt, pair_pred, iou, 0.3) == 2
    assert count_matches(pair_gt, pair_pred, iou, 0.4) == 1


def test_two_pieces_in_one_slice_count_as_two_2d_objects():
    gt = np.zeros((1, 8, 8), np.uint32)
    gt[0, 0:3, 0:3] = 1
    gt[0, 5:8, 5:8] = 1  # same 3D id, two pieces in this slice
    seg = gt.copy()
    seg[0, 5:8, 5:8] = 0
    metrics = evaluate_arrays(seg, gt)
    assert metrics["gt_objects_2d"] == 2 and metrics["matched_objects_2d"] == 1
    assert metrics["f1_2d"] == pytest.approx(2 / 3)


def test_streaming_equals_in_memory(tmp_path):
    rng = np.random.default_rng(5)
    gt = np.zeros((11, 20, 20), np.uint32)
    seg = np.zeros_like(gt)
    for i in range(1, 9):
        z, y, x = rng.integers(0, [8, 15, 15])
        dz, dy, dx = rng.integers(2, [5, 6, 6])
        gt[z : z + dz, y : y + dy, x : x + dx] = i
        shift = rng.integers(-1, 2, size=3)
        z, y, x = np.clip([z, y, x] + shift, 0, None)
        seg[z : z + dz, y : y + dy, x : x + dx] = 20 + i
    fixture(tmp_path / "seg.h5", "seg", seg, voxel_size=[40, 8, 8])
    fixture(tmp_path / "label.h5", "label", gt, voxel_size=[40, 8, 8])
    in_memory = evaluate_arrays(seg, gt, 0.6)
    assert evaluate_files(tmp_path / "seg.h5", tmp_path / "label.h5", 0.6, slab_slices=3) == in_memory
    assert 0 < in_memory["instance_f1"] < 1  # a case that can tell them apart

    params = '{"evaluate": {"iou_threshold": 0.6, "slab_slices": 4}}'
    out = tmp_path / "metrics.json"
    assert cli.main(["evaluate", str(tmp_path / "seg.h5"), str(tmp_path / "label.h5"), str(out), "--params", params]) == 0
    written = read_json(out)
    assert written["matched_objects"] == in_memory["matched_objects"]
    assert written["voxel_iou"] == round(in_memory["voxel_iou"], 6)
    assert list(written) == sorted(written)


@pytest.mark.bad_input
def test_shape_mismatch_is_one_line(tmp_path, capsys):
    fixture(tmp_path / "seg.h5", "seg", np.zeros((3, 8, 8), np.uint32), voxel_size=[40, 8, 8])
    fixture(tmp_path / "label.h5", "label", np.zeros((3, 8, 9), np.uint32), voxel_size=[40, 8, 8])
    assert cli.main(["evaluate", str(tmp_path / "seg.h5"), str(tmp_path / "label.h5"), str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "seg.h5" in err and "label.h5" in err and err.count("\n") == 1


def test_instance_f1_matches_evaluate_arrays():
    from emmito.metrics import evaluate_arrays, instance_f1

    gt = np.zeros((4, 10, 10), np.uint32)
    seg = np.zeros_like(gt)
    gt[:, 0:4, 0:4] = 1
    gt[:, 6:10, 6:10] = 2
    seg[:, 0:4, 0:4] = 7  # exact
    seg[:, 6:10, 6:8] = 8  # IoU 0.5 with gt 2
    seg[:, 0:2, 8:10] = 9  # false positive
    assert instance_f1(seg, gt, 0.5) == evaluate_arrays(seg, gt, 0.5)["instance_f1"] == 2 * 2 / 5
    assert instance_f1(seg, gt, 0.6) == 2 * 1 / 5
    assert instance_f1(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert instance_f1(np.zeros_like(gt), gt) == 0.0
