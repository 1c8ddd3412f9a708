"""Chunk and block arithmetic, shared by the workflow (rules/common.smk) and the stages.

A volume of ``depth`` slices is cut into inference chunks of ``chunk_slices``
slices and segmentation blocks of ``block_slices`` slices (a whole number of
chunks). Block ``b`` owns slices [b*B, (b+1)*B) and reads ``block_overlap``
slices past its end, into block b+1, where tracing matches objects.
All ranges are half-open slice indices in the volume's frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Layout:
    """How a volume of ``depth`` slices is cut: inference chunks, segmentation blocks, the tracing overlap.

    Built once at the boundary (``Layout.from_config``) and passed to the rules,
    merge, infer and trace instead of loose integers. ``depth`` may be 0 where
    only the cutting matters (it is then taken from the files).
    """

    depth: int
    chunk_slices: int
    block_slices: int
    block_overlap: int

    @classmethod
    def from_config(cls, config: dict[str, Any], depth: int = 0) -> "Layout":
        """The layout of a validated config (``infer.chunk_slices``, ``merge.block_slices`` / ``block_overlap``)."""
        return cls(
            depth=int(depth),
            chunk_slices=int(config["infer"]["chunk_slices"]),
            block_slices=int(config["merge"]["block_slices"]),
            block_overlap=int(config["merge"]["block_overlap"]),
        )

    @classmethod
    def of_blocks(cls, block_slices: int, block_overlap: int, depth: int = 0) -> "Layout":
        """The layout of code that reads blocks only (trace, from ``merge`` alone): its chunks are the blocks."""
        return cls(int(depth), int(block_slices), int(block_slices), int(block_overlap))

    def with_depth(self, depth: int) -> "Layout":
        return Layout(int(depth), self.chunk_slices, self.block_slices, self.block_overlap)

    @property
    def n_chunks(self) -> int:
        return count(self.depth, self.chunk_slices)

    @property
    def n_blocks(self) -> int:
        return count(self.depth, self.block_slices)

    def chunk_range(self, chunk_index: int) -> tuple[int, int]:
        return chunk_range(chunk_index, self.chunk_slices, self.depth)

    def block_range(self, block_index: int) -> tuple[int, int]:
        """Slices block ``block_index`` holds: its own plus the overlap into the next."""
        return block_range(block_index, self.block_slices, self.block_overlap, self.depth)

    def block_own_range(self, block_index: int) -> tuple[int, int]:
        return block_own_range(block_index, self.block_slices, self.depth)

    def chunks_of_block(self, block_index: int) -> list[int]:
        return chunks_of_block(block_index, self.block_slices, self.block_overlap, self.chunk_slices, self.depth)

    def n_jobs(self, chunks_per_job: int) -> int:
        """Infer jobs of ``chunks_per_job`` chunks each (the last may have fewer)."""
        return count(self.n_chunks, chunks_per_job)

    def chunks_of_job(self, job_index: int, chunks_per_job: int) -> list[int]:
        """The consecutive chunks infer job ``job_index`` writes."""
        if job_index < 0 or job_index >= self.n_jobs(chunks_per_job):
            raise EmmitoError(
                f"job {job_index} is outside a volume of {self.n_chunks} chunks in jobs of {chunks_per_job}: pick 0..{self.n_jobs(chunks_per_job) - 1}"
            )
        first = job_index * chunks_per_job
        return list(range(first, min(first + chunks_per_job, self.n_chunks)))
