"""blocks: how a volume is cut into inference chunks and segmentation blocks (with the tracing overlap)."""

from __future__ import annotations

import dataclasses

import pytest

from emmito import blocks, config
from emmito.blocks import Layout
from emmito.io import EmmitoError

# 22 slices, chunks of 4, blocks of 8 reading 3 slices into the next block.
DEPTH, CHUNK, BLOCK, OVERLAP = 22, 4, 8, 3


@pytest.mark.parametrize(
    ("depth", "size", "expected"),
    [(22, 4, 6), (24, 4, 6), (25, 4, 7), (3, 8, 1), (8, 8, 1), (0, 8, 1)],
)
def test_count_covers_the_depth_with_a_short_last_piece(depth, size, expected):
    assert blocks.count(depth, size) == expected


def test_chunk_range_clips_the_last_chunk():
    assert blocks.chunk_range(0, CHUNK, DEPTH) == (0, 4)
    assert blocks.chunk_range(4, CHUNK, DEPTH) == (16, 20)
    assert blocks.chunk_range(5, CHUNK, DEPTH) == (20, 22)


def test_block_range_adds_the_overlap_and_clips_it():
    assert blocks.block_range(0, BLOCK, OVERLAP, DEPTH) == (0, 11)
    assert blocks.block_range(1, BLOCK, OVERLAP, DEPTH) == (8, 19)
    assert blocks.block_range(2, BLOCK, OVERLAP, DEPTH) == (16, 22)
    assert blocks.block_range(1, BLOCK, 0, DEPTH) == (8, 16)
    assert blocks.block_own_range(2, BLOCK, DEPTH) == (16, 22)
    assert blocks.block_own_range(0, BLOCK, DEPTH) == (0, 8)


@pytest.mark.bad_input
@pytest.mark.parametrize("index", [-1, 6, 100])
def test_a_chunk_outside_the_volume_is_named_with_the_valid_range(index):
    with pytest.raises(EmmitoError, match=rf"chunk {index} is outside a volume of 22 slices \(6 chunks of 4\): pick 0\.\.5"):
        blocks.chunk_range(index, CHUNK, DEPTH)


@pytest.mark.bad_input
@pytest.mark.parametrize("index", [-1, 3])
def test_a_block_outside_the_volume_is_named_with_the_valid_range(index):
    with pytest.raises(EmmitoError, match=rf"block {index} is outside a volume of 22 slices \(3 blocks of 8\): pick 0\.\.2"):
        blocks.block_range(index, BLOCK, OVERLAP, DEPTH)
    with pytest.raises(EmmitoError, match=rf"block {index} is outside"):
        blocks.block_own_range(index, BLOCK, DEPTH)


def test_chunks_of_block_include_those_of_the_overlap():
    assert blocks.chunks_of_block(0, BLOCK, OVERLAP, CHUNK, DEPTH) == [0, 1, 2]
    assert blocks.chunks_of_block(1, BLOCK, OVERLAP, CHUNK, DEPTH) == [2, 3, 4]
    assert blocks.chunks_of_block(2, BLOCK, OVERLAP, CHUNK, DEPTH) == [4, 5]
    assert blocks.chunks_of_block(0, BLOCK, 0, CHUNK, DEPTH) == [0, 1]


def test_every_slice_is_owned_by_exactly_one_block_and_read_from_its_chunks():
    for depth in (1, 7, 8, 9, 22, 40):
        layout = Layout(depth, CHUNK, BLOCK, OVERLAP)
        owned = [z for b in range(layout.n_blocks) for z in range(*layout.block_own_range(b))]
        assert owned == list(range(depth))
        for b in range(layout.n_blocks):
            start, stop = layout.block_range(b)
            chunk_slices = {z for c in layout.chunks_of_block(b) for z in range(*layout.chunk_range(c))}
            assert set(range(start, stop)) <= chunk_slices


def test_layout_methods_match_the_functions():
    layout = Layout(DEPTH, CHUNK, BLOCK, OVERLAP)
    assert (layout.n_chunks, layout.n_blocks) == (6, 3)
    assert layout.chunk_range(5) == blocks.chunk_range(5, CHUNK, DEPTH) == (20, 22)
    assert layout.block_range(1) == (8, 19)
    assert layout.block_own_range(1) == (8, 16)
    assert layout.chunks_of_block(2) == [4, 5]
    with pytest.raises(EmmitoError, match="block 3 is outside"):
        layout.block_range(3)


def test_layout_is_a_frozen_value():
    layout = Layout(DEPTH, CHUNK, BLOCK, OVERLAP)
    assert layout == Layout(DEPTH, CHUNK, BLOCK, OVERLAP) and hash(layout) == hash(Layout(DEPTH, CHUNK, BLOCK, OVERLAP))
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.depth = 5  # type: ignore[misc]


def test_with_depth_keeps_the_cutting():
    layout = Layout(0, CHUNK, BLOCK, OVERLAP)
    deeper = layout.with_depth(40)
    assert deeper == Layout(40, CHUNK, BLOCK, OVERLAP)
    assert (deeper.n_chunks, deeper.n_blocks) == (10, 5)
    assert layout.depth == 0  # unchanged


def test_from_config_reads_the_three_sizes():
    cfg = {
        "infer": {**config.section_defaults("infer"), "chunk_slices": 20},
        "merge": {**config.section_defaults("merge"), "block_slices": 200, "block_overlap": 6},
    }
    assert Layout.from_config(cfg) == Layout(0, 20, 200, 6)
    layout = Layout.from_config(cfg, depth=10_000)
    assert (layout.depth, layout.n_chunks, layout.n_blocks) == (10_000, 500, 50)
    assert layout.chunks_of_block(49) == list(range(490, 500))


def test_from_config_of_the_defaults_is_a_valid_cutting():
    cfg = {section: config.section_defaults(section) for section in ("infer", "merge")}
    layout = Layout.from_config(cfg)
    assert layout.block_slices % layout.chunk_slices == 0
    assert 0 <= layout.block_overlap <= layout.block_slices


def test_of_blocks_cuts_chunks_as_blocks():
    layout = Layout.of_blocks(10, 2, depth=25)
    assert layout == Layout(25, 10, 10, 2)
    assert layout.n_blocks == 3 and layout.block_range(1) == (10, 22) and layout.chunks_of_block(1) == [1, 2]
    assert Layout.of_blocks(10, 2).depth == 0
