"""merge: inference chunks -> one heatmap block with its overlap."""

from __future__ import annotations

import numpy as np
import pytest

from emmito import blocks, cli, contract
from emmito.blocks import Layout
from emmito.io import EmmitoError, read_volume
from emmito.merge import merge_block, plan_copies

DEPTH, CHUNK, BLOCK, OVERLAP = 22, 4, 8, 3
PARAMS = f'{{"infer": {{"chunk_slices": {CHUNK}}}, "merge": {{"block_slices": {BLOCK}, "block_overlap": {OVERLAP}}}}}'


@pytest.fixture
def heat_volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, DEPTH, 6, 5), dtype=np.uint8)


@pytest.fixture
def chunk_paths(tmp_path, heat_volume) -> list:
    """Chunk files as emmito infer writes them: (channel, z, y, x) uint8 with offset and volume_depth."""
    paths = []
    for c in range(blocks.count(DEPTH, CHUNK)):
        start, stop = blocks.chunk_range(c, CHUNK, DEPTH)
        path = tmp_path / "heat" / f"chunk_{c}.h5"
        contract.fixture(
            path, "heat", heat_volume[:, start:stop], voxel_size=[40, 16, 16], offset=start, volume_depth=DEPTH,
            downsample_xy=2, channels=["foreground", "other"], attrs={"model": "m1"},
        )
        paths.append(path)
    return paths


def merge(out, paths, block) -> int:
    return cli.main(["merge", str(out), *map(str, paths), "--block", str(block), "--params", PARAMS])


@pytest.mark.parametrize("block", [0, 1, 2])
def test_block_holds_its_slices_and_overlap(tmp_path, heat_volume, chunk_paths, block):
    chosen = [chunk_paths[c] for c in blocks.chunks_of_block(block, BLOCK, OVERLAP, CHUNK, DEPTH)]
    out = tmp_path / "heat" / f"block_{block}.h5"
    assert merge(out, chosen, block) == 0
    data, attrs = read_volume(out)
    start, stop = blocks.block_range(block, BLOCK, OVERLAP, DEPTH)
    assert data.dtype == np.uint8
    assert np.array_equal(data, heat_volume[:, start:stop])
    assert attrs["offset"] == start
    assert attrs["volume_depth"] == DEPTH and attrs["downsample_xy"] == 2 and attrs["model"] == "m1"
    assert list(attrs["channels"]) == ["foreground", "other"]
    assert attrs["voxel_size"] == [40.0, 16.0, 16.0]


def test_chunk_order_does_not_matter(tmp_path, heat_volume, chunk_paths):
    chosen = [chunk_paths[c] for c in blocks.chunks_of_block(1, BLOCK, OVERLAP, CHUNK, DEPTH)]
    assert merge(tmp_path / "a.h5", chosen, 1) == 0
    assert merge(tmp_path / "b.h5", chosen[::-1], 1) == 0
    assert np.array_equal(read_volume(tmp_path / "a.h5")[0], read_volume(tmp_path / "b.h5")[0])


@pytest.mark.bad_input
def test_missing_chunk_is_named(tmp_path, chunk_paths, capsys):
    chosen = [chunk_paths[c] for c in (2, 3)]  # block 1 also needs chunk 4 (overlap)
    assert merge(tmp_path / "block_1.h5", chosen, 1) == 2
    err = capsys.readouterr().err
    assert "chunk_4.h5" in err and "missing" in err
    assert not (tmp_path / "block_1.h5").exists()


@pytest.mark.bad_input
def test_extra_chunk_is_named(tmp_path, chunk_paths, capsys):
    chosen = [chunk_paths[c] for c in (0, 1, 2, 5)]
    assert merge(tmp_path / "block_0.h5", chosen, 0) == 2
    err = capsys.readouterr().err
    assert "chunk_5.h5" in err and "outside" in err


def test_merge_block_takes_the_depth_from_the_chunks(tmp_path, heat_volume, chunk_paths):
    layout = Layout(depth=0, chunk_slices=CHUNK, block_slices=BLOCK, block_overlap=OVERLAP)
    chosen = [chunk_paths[c] for c in layout.with_depth(DEPTH).chunks_of_block(2)]
    merge_block(tmp_path / "block_2.h5", chosen, 2, layout)
    data, attrs = read_volume(tmp_path / "block_2.h5")
    assert attrs["offset"] == 16 and np.array_equal(data, heat_volume[:, 16:DEPTH])


@pytest.mark.bad_input
def test_chunks_of_different_runs_are_refused(tmp_path, heat_volume, chunk_paths):
    contract.fixture(
        chunk_paths[1], "heat", heat_volume[:, 4:8], voxel_size=[40, 16, 16], offset=4, volume_depth=DEPTH,
        downsample_xy=2, channels=["foreground", "other"], embedding_range=8.0,
    )
    with pytest.raises(EmmitoError, match="attribute embedding_range"):
        merge_block(tmp_path / "block_0.h5", chunk_paths[:3], 0, Layout(DEPTH, CHUNK, BLOCK, OVERLAP))


def test_plan_copies_refuses_duplicates_and_slices_partial_chunks():
    with pytest.raises(EmmitoError, match="pass each chunk once"):
        plan_copies([(0, 4), (4, 8), (4, 8)], 0, 8, 4)
    steps = plan_copies([(8, 12), (4, 8)], 4, 10, 4)
    assert [(s.chunk, s.chunk_start, s.chunk_stop, s.block_start) for s in steps] == [(1, 0, 4, 0), (0, 0, 2, 4)]
