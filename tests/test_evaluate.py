"""evaluate: voxel and instance metrics against ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from emmito import cli
from emmito.contract import OBJECT_SCORE_COLUMNS, OBJECT_SCORES, fixture
from emmito.evaluate import evaluate_files
from emmito.io import open_volume, read_json, read_table, read_volume
from emmito.metrics import count_matches, evaluate_arrays, match_pairs


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
    matched_gt, matched_pred = match_pairs(pair_gt, pair_pred, iou, 0.3)  # the pairs themselves
    assert sorted(zip(matched_gt.tolist(), matched_pred.tolist())) == [(1, 2), (2, 1)]


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


# ---- the field's metrics: AP (MitoEM), variation of information, adapted Rand, F1 per size tercile --------


def line_volume(*runs: tuple[int, int, int]) -> np.ndarray:
    """A (1, 1, 100) label volume: each run (id, start, stop) sets x in [start, stop) to id."""
    volume = np.zeros((1, 1, 100), np.uint32)
    for label, start, stop in runs:
        volume[0, 0, start:stop] = label
    return volume


# gt A = 4 voxels, B = 5; prediction 1 = A exactly (IoU 1), 2 = 2 voxels of background (false),
# 3 = 3 voxels inside B (IoU 3/5 = 0.6: a match at 0.50, not at 0.75).
AP_GT = line_volume((1, 0, 4), (2, 10, 15))
AP_SEG = line_volume((1, 0, 4), (2, 6, 8), (3, 10, 13))
AP_SCORES = (np.array([1, 2, 3], np.uint64), np.array([0.9, 0.8, 0.6]))


def test_ap_by_hand_mean_probability_ranking():
    metrics = evaluate_arrays(AP_SEG, AP_GT, scores=AP_SCORES)
    assert metrics["ap_score"] == "mean_probability"
    # IoU 0.50, ranked 1 (true), 2 (false), 3 (true): (recall, precision) after each rank
    # (1/2, 1), (1/2, 1/2), (1, 2/3); made non-increasing: 1, 2/3, 2/3. The 51 recall levels
    # 0.00..0.50 are first reached at rank 1 (precision 1), the 50 levels 0.51..1.00 at rank 3 (2/3):
    # AP50 = (51 * 1 + 50 * 2/3) / 101 = 253/303.
    assert metrics["ap50"] == pytest.approx(253 / 303, abs=1e-12)
    # IoU 0.75: 3 is false too: (1/2, 1), (1/2, 1/2), (1/2, 1/3); levels above 0.50 never reached (0):
    # AP75 = 51/101.
    assert metrics["ap75"] == pytest.approx(51 / 101, abs=1e-12)


def test_ap_falls_back_to_size_without_scores():
    metrics = evaluate_arrays(AP_SEG, AP_GT)
    assert metrics["ap_score"] == "voxel_count"
    # By size: 1 (4 voxels, true), 3 (3, true), 2 (2, false): (1/2, 1), (1, 1), (1, 2/3): precision 1 at
    # every recall level: AP50 = 1. At 0.75 only rank 1 is true: AP75 = 51/101 as before.
    assert metrics["ap50"] == 1.0
    assert metrics["ap75"] == pytest.approx(51 / 101, abs=1e-12)
    # A score table that misses a predicted object ranks by size too.
    partial = (np.array([1, 3], np.uint64), np.array([0.9, 0.6]))
    assert evaluate_arrays(AP_SEG, AP_GT, scores=partial)["ap_score"] == "voxel_count"


def test_ap_empty_cases():
    empty = np.zeros_like(AP_GT)
    assert evaluate_arrays(empty, empty)["ap50"] == 1.0  # nothing to find, nothing found
    assert evaluate_arrays(empty, AP_GT)["ap50"] == 0.0
    assert evaluate_arrays(AP_SEG, empty)["ap75"] == 0.0


def test_greedy_matching_takes_predictions_in_score_order():
    from emmito.metrics import _label_counts, _pair_counts, greedy_matched, pair_ious

    # gt 1 is 4 voxels; predictions 1 and 2 each cover half of it: IoU 0.5 each, both candidates at 0.5.
    gt = line_volume((1, 0, 4))
    seg = line_volume((1, 0, 2), (2, 2, 4))
    assert evaluate_arrays(seg, gt)["matched_objects"] == 1
    pair_gt, pair_pred, iou = pair_ious(*_pair_counts(gt, seg), *_label_counts(gt), *_label_counts(seg))
    pred_ids = np.array([1, 2], np.uint64)
    assert iou.tolist() == [0.5, 0.5]
    assert greedy_matched(pair_gt, pair_pred, iou, 0.5, pred_ids, np.array([1, 0])).tolist() == [False, True]
    assert greedy_matched(pair_gt, pair_pred, iou, 0.5, pred_ids, np.array([0, 1])).tolist() == [True, False]
    # Whichever comes first is the true positive: (1, 1) then (1, 1/2): AP50 = 1.
    assert evaluate_arrays(seg, gt, scores=(pred_ids, np.array([0.2, 0.7])))["ap50"] == 1.0


def test_voi_by_hand():
    # gt 1 1 2 2, seg 1 1 1 1 (a merge): each gt object lies in one predicted object: H(seg|gt) = 0.
    # H(gt|seg) = -(2/4 log2(2/4) + 2/4 log2(2/4)) = 1 bit.
    merged = evaluate_arrays(line_volume((1, 0, 4))[:, :, :4], line_volume((1, 0, 2), (2, 2, 4))[:, :, :4])
    assert merged["voi_split"] == 0.0 and merged["voi_merge"] == pytest.approx(1.0, abs=1e-12)
    # gt 0 1 1 1, seg 0 1 1 2 (a split; background is a label): cells (0,0) 1, (1,1) 2, (1,2) 1 of 4 voxels.
    # H(seg|gt) = -(1/4 log2(1/1) + 2/4 log2(2/3) + 1/4 log2(1/3)) = 1/2 log2(3/2) + 1/4 log2(3) = 0.688722 bits;
    # every predicted label lies in one gt label: H(gt|seg) = 0.
    split = evaluate_arrays(line_volume((1, 1, 3), (2, 3, 4))[:, :, :4], line_volume((1, 1, 4))[:, :, :4])
    assert split["voi_split"] == pytest.approx(0.5 * np.log2(1.5) + 0.25 * np.log2(3), abs=1e-12)
    assert split["voi_split"] == pytest.approx(0.688722, abs=1e-6)
    assert split["voi_merge"] == 0.0


def test_arand_by_hand():
    # gt 1 1 2 2, seg 1 1 1 1: pairs counted as sum n(n-1): joint (2, 2) -> 4 + 4 - 4 = 4; gt sizes (2, 2) -> 4;
    # seg sizes (4) -> 12; F = 4 / (0.5 * 4 + 0.5 * 12) = 0.5: ARAND = 0.5.
    merged = evaluate_arrays(line_volume((1, 0, 4))[:, :, :4], line_volume((1, 0, 2), (2, 2, 4))[:, :, :4])
    assert merged["arand"] == pytest.approx(0.5, abs=1e-12)
    # gt 0 1 1 1, seg 5 1 1 0: the gt background voxel is left out (its 5 too); inside gt 1 the prediction
    # is 1, 1 and background: joint (2, 1) -> 5 - 3 = 2; gt (3) -> 6; seg columns (2, 1) -> 2;
    # F = 2 / (0.5 * 6 + 0.5 * 2) = 0.5: ARAND = 0.5.
    gt = line_volume((1, 1, 4))[:, :, :4]
    seg = line_volume((5, 0, 1), (1, 1, 3))[:, :, :4]
    assert evaluate_arrays(seg, gt)["arand"] == pytest.approx(0.5, abs=1e-12)
    perfect = evaluate_arrays(np.where(gt > 0, 7, 0).astype(np.uint32), gt)
    assert perfect["arand"] == 0.0 and perfect["voi_split"] == perfect["voi_merge"] == 0.0


def random_labels(seed: int, shape=(7, 9, 10), n_gt=5, n_seg=7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, n_gt, size=shape).astype(np.uint32)
    seg = rng.integers(0, n_seg, size=shape).astype(np.uint32)
    seg[rng.random(shape) < 0.3] = 0
    seg[(gt == 0) & (rng.random(shape) < 0.5)] = 0
    return seg, gt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voi_and_arand_equal_skimage_from_slabs(tmp_path, seed):
    from skimage.metrics import adapted_rand_error, variation_of_information

    seg, gt = random_labels(seed)
    fixture(tmp_path / "seg.h5", "seg", seg)
    fixture(tmp_path / "label.h5", "label", gt)
    streamed = evaluate_files(tmp_path / "seg.h5", tmp_path / "label.h5", 0.5, slab_slices=3)
    split, merge = variation_of_information(gt, seg)  # skimage's "false splits, false merges"
    assert abs(streamed["voi_split"] - split) < 1e-9 and abs(streamed["voi_merge"] - merge) < 1e-9
    assert abs(streamed["arand"] - adapted_rand_error(gt, seg)[0]) < 1e-9
    assert streamed["voi_split"] > 0 and streamed["voi_merge"] > 0 and 0 < streamed["arand"] < 1
    # And on the prediction that merges every gt object into one:
    merged = (gt > 0).astype(np.uint32)
    in_memory = evaluate_arrays(merged, gt)
    assert abs(in_memory["voi_merge"] - variation_of_information(gt, merged)[1]) < 1e-9
    assert abs(in_memory["arand"] - adapted_rand_error(gt, merged)[0]) < 1e-9


def test_f1_per_size_tercile_by_hand():
    # gt sizes 2, 3, 5, 8, 13, 21: bounds s[6 // 3] = 5 and s[2 * 6 // 3] = 13:
    # small < 5 (2, 3), medium 5..12 (5, 8), large >= 13 (13, 21).
    gt = line_volume((1, 0, 2), (2, 3, 6), (3, 7, 12), (4, 13, 21), (5, 22, 35), (6, 36, 57))
    seg = line_volume(
        (1, 0, 2),  # gt 1 exactly: small
        (2, 13, 21),  # gt 4 exactly: medium
        (3, 22, 32),  # 10 voxels inside gt 5 (IoU 10/13): matched, so large although 10 is a medium size
        (4, 36, 57),  # gt 6 exactly: large
        (5, 58, 68),  # unmatched, 10 voxels: medium
        (6, 69, 99),  # unmatched, 30 voxels: large
    )
    metrics = evaluate_arrays(seg, gt)
    assert metrics["size_tercile_bounds"] == [5, 13]
    assert metrics["gt_objects_by_size"] == [2, 2, 2]
    assert metrics["predicted_objects_by_size"] == [1, 2, 3]
    assert metrics["matched_objects_by_size"] == [1, 1, 2]
    # F1 = 2 matched / (gt + predicted): small 2/3, medium 2/4, large 4/5.
    assert metrics["f1_small"] == pytest.approx(2 / 3)
    assert metrics["f1_medium"] == 0.5
    assert metrics["f1_large"] == pytest.approx(0.8)
    assert metrics["matched_objects"] == 4 and metrics["instance_f1"] == pytest.approx(8 / 12)
    nothing = evaluate_arrays(seg, np.zeros_like(gt))
    assert nothing["size_tercile_bounds"] is None and nothing["f1_small"] is None


def test_evaluate_reads_the_object_scores_of_seg_h5(tmp_path, capsys):
    # mean probability = heat_sum / (255 * voxels): 918 / 1020 = 0.9, 408 / 510 = 0.8, 459 / 765 = 0.6
    table = np.array([[1, 4, 918], [2, 2, 408], [3, 3, 459]])
    fixture(tmp_path / "seg.h5", "seg", AP_SEG, scores=table)
    fixture(tmp_path / "bare.h5", "seg", AP_SEG)
    fixture(tmp_path / "label.h5", "label", AP_GT)
    scored = evaluate_files(tmp_path / "seg.h5", tmp_path / "label.h5", 0.5, slab_slices=1)
    assert scored["ap_score"] == "mean_probability" and scored["ap50"] == pytest.approx(253 / 303)
    assert capsys.readouterr().err == ""
    bare = evaluate_files(tmp_path / "bare.h5", tmp_path / "label.h5", 0.5, slab_slices=1)
    assert bare["ap_score"] == "voxel_count" and bare["ap50"] == 1.0
    assert "bare.h5 has no object scores: AP ranks the objects by size" in capsys.readouterr().err
    out = tmp_path / "metrics.json"
    assert cli.main(["evaluate", str(tmp_path / "seg.h5"), str(tmp_path / "label.h5"), str(out)]) == 0
    written = read_json(out)
    for key in ("ap50", "ap75", "ap_score", "voi_split", "voi_merge", "arand", "f1_small", "f1_medium", "f1_large",
                "size_tercile_bounds"):
        assert key in written, key
    assert written["ap50"] == round(253 / 303, 6)


def test_scores_go_from_segment_through_trace_and_upsample_to_metrics_json(tmp_path):
    # Two blobs, one across the face of two 6-slice blocks (overlap 2), of different heat.
    depth, heat = 12, np.zeros((12, 16, 24), np.uint8)
    heat[3:10, 3:9, 3:9] = 240
    heat[1:5, 4:12, 13:21] = 180
    gt = (heat > 0).astype(np.uint32) + (heat == 180)
    params = ('{"segment": {"min_size": 4, "min_seed_size": 1, "blur_sigma": 0, "foreground_threshold": 100, '
              '"seed_threshold": 120}, "merge": {"block_slices": 6, "block_overlap": 2}, "infer": {"chunk_slices": 6}}')
    blocks = []
    for b, (start, stop) in enumerate([(0, 8), (6, 12)]):
        heat_path = fixture(tmp_path / f"heat_{b}.h5", "heat", heat[start:stop], offset=start, volume_depth=depth)
        blocks.append(tmp_path / f"block_{b}.h5")
        assert cli.main(["segment", str(heat_path), str(blocks[-1]), "--params", params]) == 0
    traced, seg, out = tmp_path / "seg_infer.h5", tmp_path / "seg.h5", tmp_path / "metrics.json"
    assert cli.main(["trace", str(traced), str(tmp_path / "trace.json"), *map(str, blocks), "--params", params]) == 0
    fixture(tmp_path / "image.h5", "image", np.zeros_like(heat))
    assert cli.main(["upsample", str(traced), str(tmp_path / "image.h5"), str(seg)]) == 0
    labels = read_volume(seg)[0]
    with open_volume(seg) as ds:
        table = read_table(ds, OBJECT_SCORES, OBJECT_SCORE_COLUMNS)
    assert labels.max() == 2
    for label, voxels, heat_sum in table.tolist():  # each object's mean heat over all its voxels
        assert voxels == (labels == label).sum() and heat_sum == heat[labels == label].astype(int).sum()
    fixture(tmp_path / "label.h5", "label", gt)
    assert cli.main(["evaluate", str(seg), str(tmp_path / "label.h5"), str(out)]) == 0
    written = read_json(out)
    assert written["ap_score"] == "mean_probability" and written["ap50"] == 1.0 and written["instance_f1"] == 1.0
