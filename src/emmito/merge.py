"""Assemble the inference chunks of one segmentation block (plus its overlap).

Each chunk file ``heat/job_{j}/chunk_{c}.h5`` holds slices [offset, offset + depth) of
the volume. ``merge`` checks that the chunks given cover exactly the block's
range from ``blocks.block_range`` and copies them, one chunk at a time, into
``heat/block_{b}.h5``. Memory use is one chunk.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from emmito import blocks, contract
from emmito.io import EmmitoError, create_volume, open_volume, volume_attrs

# Attributes create_volume writes itself; every other chunk attribute is copied.
OWN_ATTRS = contract.BASE_KEYS
# What must be the same across the chunks of a block: the heat-file attributes and the voxel size.
CONSISTENT_ATTRS = (*contract.HEAT_KEYS, contract.VOXEL_SIZE)


@dataclass(frozen=True)
class ChunkInfo:
    """What merge needs to know about one chunk file, read from its header only."""

    path: Path
    start: int  # first slice, volume frame
    stop: int  # one past the last slice
    shape: tuple[int, ...]  # (channel, z, y, x)
    attrs: dict[str, Any]


@dataclass(frozen=True)
class CopyStep:
    """Copy chunk slices [chunk_start, chunk_stop) to block slices [block_start, ...)."""

    chunk: int  # index into the chunk list
    chunk_start: int
    chunk_stop: int
    block_start: int


def plan_copies(
    chunk_ranges: list[tuple[int, int]], block_start: int, block_stop: int, chunk_slices: int, names: list[str] | None = None
) -> list[CopyStep]:
    """Which slices of which chunk fill block slices [block_start, block_stop).

    ``chunk_ranges``: each chunk's [start, stop) in the volume frame, in any order.
    Raises EmmitoError naming the chunk when one is missing, extra (outside the
    block) or duplicated (two chunks holding the same slice).
    """
    names = names or [f"chunk {i}" for i in range(len(chunk_ranges))]
    order = sorted(range(len(chunk_ranges)), key=lambda i: chunk_ranges[i])
    steps: list[CopyStep] = []
    covered_until = block_start
    for i in order:
        start, stop = chunk_ranges[i]
        if stop <= block_start or start >= block_stop:
            raise EmmitoError(
                f"{names[i]}: holds slices [{start}, {stop}), outside this block's [{block_start}, {block_stop}): "
                f"pass only the block's chunks ({_chunk_list(block_start, block_stop, chunk_slices)})"
            )
        take_start = max(start, block_start)
        if take_start > covered_until:
            raise EmmitoError(
                f"slices [{covered_until}, {take_start}) of block [{block_start}, {block_stop}) are missing: "
                f"pass {_chunk_list(covered_until, take_start, chunk_slices)} too (run emmito infer for it first)"
            )
        if take_start < covered_until:
            raise EmmitoError(
                f"{names[i]}: its slices [{start}, {stop}) overlap another chunk's (up to {covered_until}): pass each chunk once"
            )
        take_stop = min(stop, block_stop)
        steps.append(CopyStep(i, take_start - start, take_stop - start, take_start - block_start))
        covered_until = take_stop
    if covered_until < block_stop:
        raise EmmitoError(
            f"slices [{covered_until}, {block_stop}) of block [{block_start}, {block_stop}) are missing: "
            f"pass {_chunk_list(covered_until, block_stop, chunk_slices)} too (run emmito infer for it first)"
        )
    return steps


def _chunk_list(start: int, stop: int, chunk_slices: int) -> str:
    indices = range(start // chunk_slices, -(-stop // chunk_slices))
    return ", ".join(f"chunk_{c}.h5" for c in indices)


def read_chunk_info(path: Path) -> ChunkInfo:
    """Read one chunk file's header, checking it is a uint8 (channel, z, y, x) heatmap."""
    with open_volume(path) as ds:
        attrs = volume_attrs(ds)
        if ds.ndim != 4 or ds.dtype != np.uint8:
            raise EmmitoError(
                f"{path}: {ds.dtype} {tuple(ds.shape)} is not a uint8 (channel, z, y, x) heatmap: rerun emmito infer for it"
            )
        if contract.volume_depth(attrs) is None:
            raise EmmitoError(
                f"{path}: no '{contract.VOLUME_DEPTH}' attribute: it was not written by emmito infer; rerun infer for it"
            )
        start = contract.offset(attrs)
        return ChunkInfo(path, start, start + ds.shape[1], tuple(ds.shape), attrs)


def check_consistent(chunks: list[ChunkInfo]) -> None:
    """All chunks of a block must come from one volume and one inference run."""
    first = chunks[0]
    for chunk in chunks[1:]:
        if chunk.shape[0] != first.shape[0] or chunk.shape[2:] != first.shape[2:]:
            raise EmmitoError(
                f"{chunk.path}: (channel, y, x) is {(chunk.shape[0], *chunk.shape[2:])}, but {first.path} has "
                f"{(first.shape[0], *first.shape[2:])}: the chunks come from different volumes or runs; rerun emmito infer"
            )
        for key in CONSISTENT_ATTRS:
            if _plain(chunk.attrs.get(key)) != _plain(first.attrs.get(key)):
                raise EmmitoError(
                    f"{chunk.path}: attribute {key} = {chunk.attrs.get(key)!r}, but {first.path} has "
                    f"{first.attrs.get(key)!r}: the chunks come from different runs; rerun emmito infer for the stale ones"
                )


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def merge_block(
    out: Path, chunk_paths: list[Path], block_index: int, layout: blocks.Layout, progress: bool = False
) -> None:
    """Write ``out`` (heat/block_{b}.h5): uint8 (channel, z, y, x) of block ``block_index``'s slices.

    ``layout`` gives the chunk and block cutting; the volume's depth is taken
    from the chunks. Reads the chunk files one at a time; attributes are copied
    from the chunks, ``offset`` is the block's first slice.
    """
    chunks = [read_chunk_info(Path(p)) for p in chunk_paths]
    check_consistent(chunks)
    layout = layout.with_depth(contract.volume_depth(chunks[0].attrs))
    block_start, block_stop = layout.block_range(block_index)
    steps = plan_copies(
        [(c.start, c.stop) for c in chunks], block_start, block_stop, layout.chunk_slices, [str(c.path) for c in chunks]
    )
    first = chunks[0]
    shape = (first.shape[0], block_stop - block_start, *first.shape[2:])
    extra = {k: v for k, v in first.attrs.items() if k not in OWN_ATTRS}
    with create_volume(
        out, shape, np.uint8, voxel_size=contract.voxel_size(first.attrs), offset=block_start, attrs=extra
    ) as block:
        for step in tqdm(steps, desc="merge", unit="chunk", file=sys.stderr, disable=not progress):
            chunk = chunks[step.chunk]
            count = step.chunk_stop - step.chunk_start
            with open_volume(chunk.path) as ds:
                block[:, step.block_start : step.block_start + count] = ds[:, step.chunk_start : step.chunk_stop]


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito merge OUT CHUNK... --block B``."""
    merge_block(args.out, list(args.chunks), args.block, blocks.Layout.from_config(params), progress=True)
