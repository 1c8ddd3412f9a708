"""trace: block-local ids -> global ids, matched in the block overlaps."""

from __future__ import annotations

import hashlib

import cc3d
import numpy as np
import pytest

from emmito import blocks, cli, config, contract
from emmito.blocks import Layout
from emmito.decoders import segment_block
from emmito.io import EmmitoError, open_volume, read_json, read_table, read_volume
from emmito.labels import slice_heat_sums
from emmito.trace import check_blocks, match_overlap, resolve_ids, scored_matches, shared_slab, trace_arrays, trace_files


def cut_into_blocks(volume: np.ndarray, block_slices: int, block_overlap: int, segment=None) -> list[np.ndarray]:
    """Each block's slices (with overlap) of ``volume``, labelled on their own (cc3d by default)."""
    depth = volume.shape[0]
    out = []
    for b in range(blocks.count(depth, block_slices)):
        start, stop = blocks.block_range(b, block_slices, block_overlap, depth)
        part = volume[start:stop]
        out.append(segment(part) if segment else cc3d.connected_components(part > 0, connectivity=6, out_dtype=np.uint32))
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a != 0], b[b != 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a != 0])) == len(np.unique(b[b != 0]))


def separated_blobs(shape=(40, 32, 32), n=10, seed=0) -> np.ndarray:
    """Boolean volume of ellipsoids long in z, with at least one background voxel between any two."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    owner = np.zeros(shape, dtype=np.int32)
    for i in range(1, n + 1):
        centre = rng.uniform([0, 0, 0], shape)
        radius = rng.uniform([3, 2, 2], [14, 6, 6])
        inside = sum(((grid[k] - centre[k]) / radius[k]) ** 2 for k in range(3)) < 1
        owner[inside & (owner == 0)] = i
    # Erase each blob's voxels that touch another blob, so that blobs never touch.
    touching = np.zeros(shape, dtype=bool)
    for axis in range(3):
        for shift in (1, -1):
            neighbour = np.roll(owner, shift, axis=axis)
            touching |= (neighbour != 0) & (owner != 0) & (neighbour != owner)
    return (owner > 0) & ~touching


def test_match_overlap_scores_iou_and_ioa():
    a = np.zeros((2, 4, 10), np.uint32)
    b = np.zeros_like(a)
    a[:, :, 0:6] = 1  # 48 voxels
    b[:, :, 0:3] = 5  # 24 voxels, all inside a's 1: IoU 0.5, IoA 1
    b[:, :, 8:10] = 6  # touches nothing
    assert match_overlap(a, b, "iou", 0.5) == [(1, 5)]
    assert match_overlap(a, b, "iou", 0.51) == []
    assert match_overlap(a, b, "ioa", 0.9) == [(1, 5)]
    assert match_overlap(np.zeros_like(a), b) == []


def test_object_across_a_block_face_keeps_one_id():
    volume = np.zeros((12, 8, 8), bool)
    volume[2:10, 2:5, 2:5] = True  # crosses the face at slice 6
    volume[1:4, 6:8, 6:8] = True  # only in block 0
    volume[8:12, 6:8, 0:2] = True  # only in block 1
    traced, record = trace_arrays(cut_into_blocks(volume, 6, 2), 6, 2)
    assert len(np.unique(traced[2:10, 2:5, 2:5])) == 1
    assert traced.max() == 3
    assert sorted(o["blocks"] for o in record["objects"].values()) == [[0], [0, 1], [1]]
    assert record["blocks"] == 2


def test_different_objects_keep_different_ids():
    volume = np.zeros((12, 8, 8), bool)
    volume[:, 0:3, 0:3] = True
    volume[:, 5:8, 5:8] = True
    traced, _ = trace_arrays(cut_into_blocks(volume, 4, 2), 4, 2)
    assert traced[0, 1, 1] != traced[0, 6, 6]
    assert len(np.unique(traced[:, 0:3, 0:3])) == 1 and len(np.unique(traced[:, 5:8, 5:8])) == 1
    assert traced.max() == 2


def test_chain_across_three_blocks_resolves_to_one_id():
    volume = np.zeros((15, 6, 6), bool)
    volume[:, 2:4, 2:4] = True  # one rod through blocks 0, 1 and 2
    parts = cut_into_blocks(volume, 5, 1)
    # Give each block's copy a different local id, as independent segmentations would.
    parts = [np.where(p > 0, 7 + 3 * b, 0).astype(np.uint32) for b, p in enumerate(parts)]
    traced, record = trace_arrays(parts, 5, 1)
    assert np.array_equal(traced, volume.astype(np.uint32))
    assert record["objects"]["1"]["blocks"] == [0, 1, 2]
    assert record["id_map"] == {"0": {"7": 1}, "1": {"10": 1}, "2": {"13": 1}}


def test_resolve_ids_orders_by_first_appearance_and_skips_unowned():
    block_ids = [np.array([1, 2, 3]), np.array([1, 2])]
    owned_ids = [np.array([2, 3]), np.array([1, 2])]  # block 0's id 1 lies only in the overlap
    id_maps = resolve_ids(block_ids, owned_ids, [[(3, 2)]])
    assert id_maps == [{2: 1, 3: 2}, {1: 3, 2: 2}]


@pytest.mark.parametrize(("block_slices", "block_overlap"), [(7, 3), (10, 2), (16, 4)])
def test_equals_whole_volume_labelling(block_slices, block_overlap):
    volume = separated_blobs()
    whole = cc3d.connected_components(volume, connectivity=6)
    traced, record = trace_arrays(cut_into_blocks(volume, block_slices, block_overlap), block_slices, block_overlap)
    assert same_partition(traced, whole)
    assert np.array_equal(np.unique(traced), np.arange(traced.max() + 1))  # consecutive
    assert sum(o["voxels"] for o in record["objects"].values()) == volume.sum()
    for gid, obj in record["objects"].items():
        z, y, x = np.nonzero(traced == int(gid))
        assert obj["voxels"] == len(z)
        assert obj["bbox"] == [z.min(), y.min(), x.min(), z.max() + 1, y.max() + 1, x.max() + 1]


def test_without_overlap_adjacent_slices_are_matched():
    volume = np.zeros((12, 8, 8), bool)
    volume[:, 1:4, 1:4] = True  # a rod: the same cross-section either side of each face
    volume[2:5, 5:8, 5:8] = True
    traced, _ = trace_arrays(cut_into_blocks(volume, 4, 0), 4, 0)
    assert same_partition(traced, cc3d.connected_components(volume, connectivity=6))


@pytest.mark.parametrize(("block_slices", "block_overlap"), [(6, 2), (9, 3), (13, 4), (20, 0)])
def test_segmenting_in_blocks_then_tracing_equals_segmenting_whole(block_slices, block_overlap):
    volume = separated_blobs(seed=4)
    heat = np.where(volume, 230, 0).astype(np.uint8)
    params = {**config.section_defaults("segment"), "blur_sigma": 0, "min_size": 1, "min_seed_size": 1, "threads": 1}
    whole = segment_block(heat, params)
    parts = cut_into_blocks(heat, block_slices, block_overlap, segment=lambda part: segment_block(part, params))
    traced, _ = trace_arrays(parts, block_slices, block_overlap)
    assert whole.max() >= 5 and len(parts) >= 2
    assert same_partition(traced, whole)


def write_blocks(folder, parts, block_slices, depth, scores=None):
    paths = []
    for b, part in enumerate(parts):
        path = folder / f"block_{b}.h5"
        table = scores[b] if scores is not None else None
        contract.fixture(path, "seg", part, voxel_size=[40, 8, 8], offset=b * block_slices, volume_depth=depth, scores=table)
        paths.append(path)
    return paths


def test_cli_matches_arrays_and_is_deterministic(tmp_path):
    volume = separated_blobs(seed=2)
    parts = cut_into_blocks(volume, 12, 3)
    paths = write_blocks(tmp_path, parts, 12, volume.shape[0])
    expected, expected_record = trace_arrays(parts, 12, 3)
    params = '{"merge": {"block_slices": 12, "block_overlap": 3}, "infer": {"chunk_slices": 4}}'
    digests = []
    for run in range(2):
        out, id_map = tmp_path / f"run{run}" / "seg_infer.h5", tmp_path / f"run{run}" / "trace.json"
        # Blocks passed out of order: trace orders them by offset.
        assert cli.main(["trace", str(out), str(id_map), *map(str, reversed(paths)), "--params", params]) == 0
        traced, attrs = read_volume(out)
        assert np.array_equal(traced, expected)
        assert attrs["offset"] == 0 and attrs["volume_depth"] == volume.shape[0] and attrs["downsample_xy"] == 1
        assert read_json(id_map) == expected_record
        digests.append(hashlib.sha256(out.read_bytes() + id_map.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.bad_input
def test_cli_names_a_missing_block(tmp_path, capsys):
    volume = separated_blobs()
    paths = write_blocks(tmp_path, cut_into_blocks(volume, 10, 2), 10, volume.shape[0])
    params = '{"merge": {"block_slices": 10, "block_overlap": 2}, "infer": {"chunk_slices": 5}}'
    argv = ["trace", str(tmp_path / "s.h5"), str(tmp_path / "t.json"), str(paths[0]), str(paths[1]), str(paths[3])]
    assert cli.main([*argv, "--params", params]) == 2
    assert "block_2.h5" in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists()


def test_shared_slab_is_the_overlap_or_the_adjacent_slices():
    with_overlap = Layout.of_blocks(10, 3, depth=25)
    assert shared_slab(with_overlap, 0) == ((10, 13), (0, 3))
    assert shared_slab(with_overlap, 1) == ((10, 13), (0, 3))
    without = Layout.of_blocks(10, 0, depth=25)
    assert shared_slab(without, 0) == ((9, 10), (0, 1))


def test_trace_files_takes_the_depth_from_the_blocks(tmp_path):
    volume = separated_blobs(seed=5)
    parts = cut_into_blocks(volume, 12, 3)
    paths = write_blocks(tmp_path, parts, 12, volume.shape[0])
    expected, expected_record = trace_arrays(parts, 12, 3)
    out, id_map = tmp_path / "seg_infer.h5", tmp_path / "trace.json"
    record = trace_files(out, id_map, paths, Layout.of_blocks(12, 3), "iou", 0.5)
    assert record == expected_record == read_json(id_map)
    assert np.array_equal(read_volume(out)[0], expected)


@pytest.mark.bad_input
def test_check_blocks_refuses_blocks_cut_otherwise(tmp_path):
    volume = separated_blobs()
    paths = write_blocks(tmp_path, cut_into_blocks(volume, 10, 2), 10, volume.shape[0])
    with pytest.raises(EmmitoError, match="not a multiple of merge.block_slices"):
        check_blocks(paths[1:], Layout.of_blocks(8, 2))
    with pytest.raises(EmmitoError, match="with merge.block_overlap 3"):
        check_blocks(paths, Layout.of_blocks(10, 3))


def scored_blocks(folder, seed=2, block_slices=12, block_overlap=3):
    """Blocks of separated blobs cut with overlap, each with its score rows of a random heat; the heat and paths."""
    volume = separated_blobs(seed=seed)
    heat = np.where(volume, np.random.default_rng(seed).integers(1, 256, size=volume.shape), 0).astype(np.uint8)
    parts = cut_into_blocks(volume, block_slices, block_overlap)
    heat_parts = cut_into_blocks(heat, block_slices, block_overlap, segment=lambda part: part)
    scores = [slice_heat_sums(part, heat_part) for part, heat_part in zip(parts, heat_parts)]
    return heat, write_blocks(folder, parts, block_slices, volume.shape[0], scores), scores


def test_scores_follow_the_objects_across_blocks(tmp_path):
    heat, paths, _ = scored_blocks(tmp_path)
    out, id_map = tmp_path / "seg_infer.h5", tmp_path / "trace.json"
    record = trace_files(out, id_map, paths, Layout.of_blocks(12, 3), "iou", 0.5)
    traced = read_volume(out)[0]
    with open_volume(out) as ds:
        table = read_table(ds, contract.OBJECT_SCORES, contract.OBJECT_SCORE_COLUMNS)
    assert any(len(o["blocks"]) > 1 for o in record["objects"].values())  # some objects were joined
    # Each global object's voxels and heat sum are those of exactly its traced voxels (the overlap
    # slices counted once, by the block that owns them): its mean is the voxel-weighted mean of its parts.
    expected = [[g, int((traced == g).sum()), int(heat[traced == g].sum())] for g in range(1, int(traced.max()) + 1)]
    assert table.tolist() == expected
    assert [row[1] for row in expected] == [o["voxels"] for o in record["objects"].values()]


def test_a_block_without_scores_leaves_the_traced_volume_without(tmp_path, capsys):
    volume = separated_blobs(seed=2)
    _, paths, scores = scored_blocks(tmp_path)
    parts = cut_into_blocks(volume, 12, 3)
    contract.fixture(paths[1], "seg", parts[1], voxel_size=[40, 8, 8], offset=12, volume_depth=volume.shape[0])
    out = tmp_path / "seg_infer.h5"
    trace_files(out, tmp_path / "trace.json", paths, Layout.of_blocks(12, 3), "iou", 0.5)
    with open_volume(out) as ds:
        assert read_table(ds, contract.OBJECT_SCORES, contract.OBJECT_SCORE_COLUMNS) is None
    assert "block 1 has no object scores" in capsys.readouterr().err


@pytest.mark.bad_input
def test_scores_that_do_not_count_the_labels_are_refused(tmp_path, capsys):
    volume = separated_blobs(seed=2)
    _, paths, scores = scored_blocks(tmp_path)
    stale = scores[1].copy()
    stale[0, 2] += 1
    contract.fixture(paths[1], "seg", cut_into_blocks(volume, 12, 3)[1], voxel_size=[40, 8, 8], offset=12,
                     volume_depth=volume.shape[0], scores=stale)
    params = '{"merge": {"block_slices": 12, "block_overlap": 3}, "infer": {"chunk_slices": 4}}'
    out = tmp_path / "seg_infer.h5"
    assert cli.main(["trace", str(out), str(tmp_path / "trace.json"), *map(str, paths), "--params", params]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar: one line
    assert "block_1.h5: its object scores" in last and "rerun emmito segment" in last
    assert not out.exists()


def test_trace_json_keeps_every_match_with_its_overlap_score(tmp_path):
    """Two blocks of 4 slices + 2 of overlap: the overlap slab (slices 4-5) is seen by both, labelled differently."""
    block_0 = np.zeros((6, 4, 20), np.uint32)
    block_1 = np.zeros((4, 4, 20), np.uint32)
    block_0[2:6, :, 0:6] = 1  # 2 x 4 x 6 = 48 voxels in the slab
    block_1[0:4, :, 0:3] = 5  # 24 of them: IoU 24 / 48 = 0.5, just at the threshold
    block_0[3:6, :, 8:12] = 2  # 32 voxels in the slab
    block_1[0:3, :, 8:13] = 6  # 40, holding all 32: IoU 32 / 40 = 0.8
    block_0[4:6, :, 14:16] = 3  # 16 voxels
    block_1[0:2, :, 14:20] = 7  # 48, holding 16: IoU 16 / 48 < 0.5, no match
    paths = write_blocks(tmp_path, [block_0, block_1], 4, 8)
    record = trace_files(tmp_path / "seg_infer.h5", tmp_path / "trace.json", paths, Layout.of_blocks(4, 2), "iou", 0.5)
    stored = read_json(tmp_path / "trace.json")
    assert stored == record
    assert stored["matching"] == {"criterion": "iou", "threshold": 0.5}
    global_of = {int(k): v for k, v in stored["id_map"]["1"].items()}
    assert stored["matches"] == [
        {"block": 0, "id_a": 1, "id_b": 5, "object": global_of[5], "score": 24 / 48},
        {"block": 0, "id_a": 2, "id_b": 6, "object": global_of[6], "score": 32 / 40},
    ]
    assert stored["id_map"]["0"]["1"] == global_of[5] and stored["id_map"]["0"]["2"] == global_of[6]
    assert "3" not in stored["id_map"]["0"]  # only in the overlap and unmatched: block 1's 7 labels those voxels
    # intersection over the smaller: 24 / 24, 32 / 32 and 16 / 16, all joined
    _, ioa = trace_arrays([block_0, block_1], 4, 2, "ioa", 0.9)
    assert [(m["id_a"], m["id_b"], m["score"]) for m in ioa["matches"]] == [(1, 5, 1.0), (2, 6, 1.0), (3, 7, 1.0)]
    assert ioa["matching"] == {"criterion": "ioa", "threshold": 0.9}


def test_scored_matches_are_the_pairs_match_overlap_returns():
    a = np.zeros((2, 4, 10), np.uint32)
    b = np.zeros_like(a)
    a[:, :, 0:6] = 1
    b[:, :, 0:3] = 5
    b[:, :, 3:4] = 6  # 8 of a's 48: IoU 8 / 48
    assert scored_matches(a, b, "iou", 0.1) == [(1, 5, 0.5), (1, 6, 8 / 48)]
    assert match_overlap(a, b, "iou", 0.1) == [(1, 5), (1, 6)]
    assert scored_matches(a, b, "iou", 0.5) == [(1, 5, 0.5)]
