"""Chunk and block arithmetic, shared by the workflow (rules/common.smk) and the stages.

A volume of ``depth`` slices is cut into inference chunks of ``chunk_slices``
slices and segmentation blocks of ``block_slices`` slices (a whole number of
chunks). Block ``b`` owns slices [b*B, (b+1)*B) and reads ``block_overlap``
slices past its end, into block b+1, where tracing matches objects.
All ranges are half-open slice indices in the volume's frame.
"""

from __future__ import annotations

import math

from emmito.io import EmmitoError


def count(depth: int, size: int) -> int:
    """How many pieces of ``size`` slices cover ``depth`` slices (the last may be short)."""
    return max(1, math.ceil(depth / size))


def chunk_range(chunk_index: int, chunk_slices: int, depth: int) -> tuple[int, int]:
    """Slices [start, stop) that inference chunk ``chunk_index`` writes."""
    start = chunk_index * chunk_slices
    if chunk_index < 0 or start >= depth:
        raise EmmitoError(
            f"chunk {chunk_index} is outside a volume of {depth} slices ({count(depth, chunk_slices)} chunks of {chunk_slices}): pick 0..{count(depth, chunk_slices) - 1}"
        )
    return start, min(start + chunk_slices, depth)


def block_range(block_index: int, block_slices: int, block_overlap: int, depth: int) -> tuple[int, int]:
    """Slices [start, stop) that block ``block_index`` holds: its own plus the overlap into the next."""
    start = block_index * block_slices
    if block_index < 0 or start >= depth:
        raise EmmitoError(
            f"block {block_index} is outside a volume of {depth} slices ({count(depth, block_slices)} blocks of {block_slices}): pick 0..{count(depth, block_slices) - 1}"
        )
    return start, min(start + block_slices + block_overlap, depth)


def block_own_range(block_index: int, block_slices: int, depth: int) -> tuple[int, int]:
    """Slices [start, stop) that block ``block_index`` owns in the traced volume (no overlap)."""
    start, stop = block_range(block_index, block_slices, 0, depth)
    return start, stop


def chunks_of_block(
    block_index: int, block_slices: int, block_overlap: int, chunk_slices: int, depth: int
) -> list[int]:
    """Indices of the inference chunks that block ``block_index`` (with its overlap) reads."""
    start, stop = block_range(block_index, block_slices, block_overlap, depth)
    return list(range(start // chunk_slices, math.ceil(stop / chunk_slices)))
