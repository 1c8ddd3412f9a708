"""Property tests of tracing on random blob volumes (hypothesis).

Blocks are labelled on their own (6-connected components, as a segmenter of
well-separated objects would), then traced. Whatever the volume, block size
and overlap:
- no traced id is shared by two separate objects (tracing never merges);
- an object that crosses one or several block faces keeps a single id
  (checked on convex objects, whose part in any block is one piece).
"""

from __future__ import annotations

import cc3d
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from emmito import blocks
from emmito.trace import trace_arrays

SETTINGS = settings(max_examples=25, deadline=None)


def label_blocks(volume: np.ndarray, block_slices: int, block_overlap: int) -> list[np.ndarray]:
    """Each block's slices (with overlap) of the bool ``volume``, as uint32 6-connected components."""
    depth = volume.shape[0]
    parts = []
    for b in range(blocks.count(depth, block_slices)):
        start, stop = blocks.block_range(b, block_slices, block_overlap, depth)
        parts.append(cc3d.connected_components(volume[start:stop], connectivity=6, out_dtype=np.uint32))
    return parts


def random_blobs(rng: np.random.Generator, shape: tuple[int, int, int], count: int) -> np.ndarray:
    """Bool volume of ``count`` random ellipsoids and boxes, free to touch, overlap and bend together."""
    grid = np.indices(shape, dtype=np.float32)
    volume = np.zeros(shape, bool)
    for _ in range(count):
        centre = rng.uniform(0, shape)
        radius = rng.uniform([1, 1, 1], [shape[0] / 2, 4, 4])
        if rng.random() < 0.5:
            volume |= sum(((grid[k] - centre[k]) / radius[k]) ** 2 for k in range(3)) <= 1
        else:
            volume |= np.all(np.abs(grid - centre[:, None, None, None]) <= radius[:, None, None, None], axis=0)
    return volume


def separated_boxes(rng: np.random.Generator, shape: tuple[int, int, int], count: int) -> list[tuple[slice, ...]]:
    """Up to ``count`` axis-aligned boxes with at least one background voxel between any two."""
    taken = np.zeros(shape, bool)
    boxes = []
    for _ in range(count * 4):
        low = rng.integers(0, shape)
        high = np.minimum(low + rng.integers([1, 1, 1], [shape[0] + 1, 5, 5]), shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        if taken[grown].any():
            continue
        taken[box] = True
        boxes.append(box)
        if len(boxes) == count:
            break
    return boxes


layouts = st.tuples(st.integers(2, 9), st.integers(0, 3)).filter(lambda t: t[1] <= t[0])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), depth=st.integers(4, 30), count=st.integers(1, 8), layout=layouts)
def test_no_id_is_shared_by_two_separate_objects(seed, depth, count, layout):
    block_slices, block_overlap = layout
    volume = random_blobs(np.random.default_rng(seed), (depth, 12, 12), count)
    traced, record = trace_arrays(label_blocks(volume, block_slices, block_overlap), block_slices, block_overlap)
    assert np.array_equal(traced > 0, volume)
    objects = cc3d.connected_components(volume, connectivity=6)
    # Each traced id lies inside one true object.
    pairs = np.unique(np.stack([traced[volume], objects[volume]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]
    assert np.array_equal(np.unique(traced), np.arange(traced.max() + 1))  # consecutive from 1
    assert len(record["objects"]) == traced.max()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), depth=st.integers(4, 40), count=st.integers(1, 10), layout=layouts)
def test_an_object_across_block_faces_keeps_one_id(seed, depth, count, layout):
    block_slices, block_overlap = layout
    rng = np.random.default_rng(seed)
    volume = np.zeros((depth, 14, 14), bool)
    boxes = separated_boxes(rng, volume.shape, count)
    for box in boxes:
        volume[box] = True
    traced, record = trace_arrays(label_blocks(volume, block_slices, block_overlap), block_slices, block_overlap)
    assert traced.max() == len(boxes)
    for box in boxes:
        ids = np.unique(traced[box])
        assert len(ids) == 1 and ids[0] > 0
        gid = str(int(ids[0]))
        first, last = box[0].start // block_slices, (box[0].stop - 1) // block_slices
        assert record["objects"][gid]["blocks"] == list(range(first, last + 1))
        assert record["objects"][gid]["voxels"] == volume[box].size
