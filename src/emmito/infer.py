"""Inference: the heatmap of one chunk of slices, seamless with its neighbours by construction.

The window grid, blending, test-time augmentation and the threaded pipeline
are ``emmito.prediction`` (shared with training's validation): sliding windows
of ``model.patch`` lie on one global grid over the whole volume, and a chunk
evaluates exactly the windows that touch its slices, each once, so chunked
inference equals whole-volume inference (no seams at chunk faces). This stage
reads the chunk's slices (and their halo) from image.h5, mean-pools them
(``resampling.mean_pool_xy``) and writes the heat file's slices as the pipeline
finishes them, in whole HDF5 chunks.

The checkpoint carries what inference needs: the architecture, the target and
channels, the input normalisation and the voxel size the network saw, so
``emmito infer IMAGE CHECKPOINT OUT --chunk C`` needs no config. Model keys the
user set are checked against it (``model.resolve_model_config``: one line
naming a key that contradicts it; ``model.patch`` may differ where it fits).
The pooling factor is the one that brings the image's y/x voxel size nearest
the checkpoint's (``model.pooling_for_volume``; older checkpoints: the factor
they were trained at), and the heat file records it (``downsample_xy``).

The windows are ``emmito.tiling``'s grid: with ``infer.tile: auto`` a chunk is
one row of windows in z (its slices plus a cropped border), and y/x tiles as
large as ``infer.tile_memory_mb`` allows, so the network sees about 1.2-1.4
voxels per voxel written instead of the 12 of training-patch windows at 0.5
overlap (``benchmarks/infer_throughput.py``). A job may write several
consecutive chunks (``infer.chunks_per_job``): it loads the model once and runs
the windows of all its chunks as one run, so a window that touches two of them
runs once; each chunk is still its own heat file, identical to what a job of
one chunk writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from emmito import blocks, contract
from emmito.embedding import DEFAULT_EMBEDDING_RANGE
from emmito.io import EmmitoError, atomic_directory, create_volume, open_volume, volume_attrs
from emmito.model import embedding_dim, heat_model, network_from_checkpoint, output_channels, pooling_for_volume, resolve_model_config
from emmito.prediction import predict_slices, to_heat
from emmito.tiling import Tiling, batch_windows, plan_tiling
from emmito.resampling import mean_pool_xy, pooled_shape
from emmito.runtime import keep_freed_memory, pick_device, thread_count


# The output channel infer.uncertainty is computed from: the target's first channel, the one that
# plays the foreground's part (foreground for binary and binary_contour, skeleton_distance for that target).
UNCERTAINTY_SOURCE = 0


def volume_tiling(model_cfg: dict[str, Any], infer_cfg: dict[str, Any], shape: Sequence[int], factor: int = 1) -> Tiling:
    """The window grid (``tiling.plan_tiling``) of a full-resolution volume of ``shape`` (z, y, x) pooled by ``factor``."""
    return plan_tiling(model_cfg, infer_cfg, pooled_shape(shape, factor), len(output_channels(model_cfg)))


def infer_chunks(
    model: torch.nn.Module,
    read_slices: Callable[[int, int], np.ndarray],
    shape: Sequence[int],
    chunks: Sequence[int],
    model_cfg: dict[str, Any],
    infer_cfg: dict[str, Any],
    write_heat: Callable[[int, int, np.ndarray], None],
    device: torch.device | str = "cpu",
    input_norm: dict[str, float] | None = None,
    *,
    factor: int = 1,
    progress: bool = True,
    stats: dict[str, int] | None = None,
) -> Tiling:
    """The heat of consecutive inference chunks, as one run of windows; returns the tiling used.

    ``read_slices(a, b)`` returns full-resolution uint8 slices [a, b) of a volume
    of ``shape`` (z, y, x); they are mean-pooled by ``factor`` in y and x before the
    network. ``write_heat(chunk, first, heat)`` receives each run of finished
    uint8 (channel, n, y, x) slices of chunk ``chunk`` in order, ``first`` relative
    to the chunk's first slice, as soon as the windows are done with them, so
    that writing overlaps the network. ``stats``: as ``predict_slices``'s. With
    ``infer.uncertainty`` other than ``none`` the heat has one more channel, last
    (``contract.UNCERTAINTY_CHANNEL``), computed from the model's first channel
    (``UNCERTAINTY_SOURCE``); the model's channels are the same bytes either way.
    """
    chunks = [int(c) for c in chunks]
    if chunks != list(range(chunks[0], chunks[0] + len(chunks))):
        raise EmmitoError(f"an infer job writes consecutive chunks, not {chunks}")
    depth = int(shape[0])
    ranges = {c: blocks.chunk_range(c, infer_cfg["chunk_slices"], depth) for c in chunks}
    z_start, z_stop = ranges[chunks[0]][0], ranges[chunks[-1]][1]
    tiling = volume_tiling(model_cfg, infer_cfg, shape, factor)

    def on_slices(first: int, probabilities: np.ndarray) -> None:
        heat = to_heat(probabilities)
        a, b = z_start + first, z_start + first + heat.shape[1]
        for chunk, (c_start, c_stop) in ranges.items():
            lo, hi = max(a, c_start), min(b, c_stop)
            if lo < hi:
                write_heat(chunk, lo - c_start, heat[:, lo - a : hi - a])

    predict_slices(
        model,
        lambda a, b: mean_pool_xy(read_slices(a, b), factor),
        depth,
        z_start,
        z_stop,
        tiling,
        batch_windows(model_cfg, infer_cfg, tiling, len(output_channels(model_cfg))),
        device,
        input_norm=input_norm,
        blend_sigma=infer_cfg["blend_sigma"],
        progress=progress,
        tta=infer_cfg["tta"],
        prefetch_batches=infer_cfg["prefetch_batches"],
        on_slices=on_slices,
        stats=stats,
        uncertainty=infer_cfg["uncertainty"],
        uncertainty_channel=UNCERTAINTY_SOURCE,
    )
    return tiling


def infer_chunk(
    model: torch.nn.Module,
    read_slices: Callable[[int, int], np.ndarray],
    shape: Sequence[int],
    chunk_index: int,
    model_cfg: dict[str, Any],
    infer_cfg: dict[str, Any],
    device: torch.device | str = "cpu",
    input_norm: dict[str, float] | None = None,
    *,
    factor: int = 1,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """Heat of inference chunk ``chunk_index`` in memory: (uint8 (channel, z, y, x), offset = its first slice)."""
    parts: list[np.ndarray] = []
    infer_chunks(
        model, read_slices, shape, [chunk_index], model_cfg, infer_cfg, lambda chunk, first, heat: parts.append(heat.copy()),
        device, input_norm, factor=factor, progress=progress,
    )
    return np.concatenate(parts, axis=1), blocks.chunk_range(chunk_index, infer_cfg["chunk_slices"], int(shape[0]))[0]


class AlignedWriter:
    """Writes runs of heat slices (channel, n, y, x) into an HDF5 dataset in whole chunks of its z-chunking.

    Runs arrive in order but of any length; buffering them to the dataset's
    chunk depth means every compressed HDF5 chunk is written once, whole.
    """

    def __init__(self, dataset: h5py.Dataset):
        self.dataset = dataset
        self.chunk_depth = dataset.chunks[1] if dataset.chunks else 1
        self.pending: list[np.ndarray] = []
        self.written_until = 0

    def __call__(self, first: int, heat: np.ndarray) -> None:
        if first != self.written_until + sum(part.shape[1] for part in self.pending):
            raise ValueError(f"heat slices must arrive in order: got slice {first}")
        self.pending.append(heat)
        held = self.written_until + sum(part.shape[1] for part in self.pending)
        aligned = held - held % self.chunk_depth
        if aligned > self.written_until:
            self._flush(aligned)

    def close(self) -> None:
        """Write what is still buffered (the chunk's last, partial HDF5 chunk)."""
        if self.pending:
            self._flush(self.written_until + sum(part.shape[1] for part in self.pending))

    def _flush(self, until: int) -> None:
        buffered = np.concatenate(self.pending, axis=1) if len(self.pending) > 1 else self.pending[0]
        count = until - self.written_until
        self.dataset[:, self.written_until : until] = buffered[:, :count]
        self.pending = [buffered[:, count:]] if count < buffered.shape[1] else []
        self.written_until = until


def chunk_heat_attrs(
    checkpoint: dict[str, Any], model_cfg: dict[str, Any], depth: int, factor: int, uncertainty: str = "none"
) -> dict[str, Any]:
    """The attributes of a chunk's heat file: the checkpoint's channel names, the volume frame, the embedding range.

    With ``uncertainty`` (``infer.uncertainty``) other than ``none``: ``contract.UNCERTAINTY_CHANNEL``
    after the model's channels and ``contract.UNCERTAINTY_KIND`` naming it.
    """
    channels = list(checkpoint.get(contract.CHECKPOINT_CHANNELS, output_channels(model_cfg)))
    embedding_range = DEFAULT_EMBEDDING_RANGE if embedding_dim(model_cfg) else None
    if uncertainty == "none":
        return contract.heat_file_attrs(channels, depth, factor, embedding_range)
    attrs = contract.heat_file_attrs([*channels, contract.UNCERTAINTY_CHANNEL], depth, factor, embedding_range)
    return {**attrs, contract.UNCERTAINTY_KIND: uncertainty}


class _ChunkFiles:
    """The heat files of a job's chunks, each created when its first slices arrive and closed (moved into place) when full."""

    def __init__(self, outputs: dict[int, Path], make: Callable[[int, Path], contextlib.AbstractContextManager]):
        self.outputs, self.make = outputs, make
        self.open: dict[int, tuple[contextlib.ExitStack, AlignedWriter, int]] = {}
        self.done: set[int] = set()

    def write(self, chunk: int, first: int, heat: np.ndarray) -> None:
        if chunk not in self.open:
            stack = contextlib.ExitStack()
            dataset = stack.enter_context(self.make(chunk, self.outputs[chunk]))
            self.open[chunk] = (stack, AlignedWriter(dataset), dataset.shape[1])
        stack, writer, depth = self.open[chunk]
        writer(first, heat)
        if first + heat.shape[1] == depth:  # the chunk's last slices: the file is complete
            writer.close()
            del self.open[chunk]
            stack.close()
            self.done.add(chunk)

    def abandon(self) -> None:
        """After a failure: every file still open is removed, none appears."""
        for stack, _, _ in self.open.values():
            stack.__exit__(*sys.exc_info())
        self.open.clear()


def write_heat_chunks(
    model: torch.nn.Module,
    checkpoint: dict[str, Any],
    checkpoint_path: str | os.PathLike,
    image_path: str | os.PathLike,
    outputs: dict[int, Path],
    model_cfg: dict[str, Any],
    infer_cfg: dict[str, Any],
    device: torch.device | str = "cpu",
) -> dict[str, int]:
    """Write the heat file of each chunk in ``outputs`` ({chunk: path}; consecutive chunks) of ``image_path``.

    ``model``: the checkpoint's network wrapped by ``model.heat_model``; ``model_cfg``:
    ``model.resolve_model_config``'s. The image is pooled by the factor that fits its
    voxel size to the checkpoint's (``model.pooling_for_volume``). Each file is uint8
    (channel, z, y, x) at the image's y/x over that factor, with ``chunk_heat_attrs``
    (the factor among them), and appears only once complete. Returns the
    ``predict_slices`` stats (windows, voxels in and out), which it also logs.
    """
    with open_volume(image_path) as image:
        if image.ndim != 3 or image.dtype != np.uint8:
            raise EmmitoError(f"{image_path}: expected uint8 (z, y, x), found {image.dtype} {image.shape}: rerun 'emmito convert'")
        depth, height, width = image.shape
        voxel_size = contract.voxel_size(volume_attrs(image))
        factor = pooling_for_volume(checkpoint, voxel_size, image_path, checkpoint_path)
        attrs = chunk_heat_attrs(checkpoint, model_cfg, depth, factor, infer_cfg["uncertainty"])
        channels = contract.channel_names(attrs)

        def make(chunk: int, path: Path) -> contextlib.AbstractContextManager:
            z_start, z_stop = blocks.chunk_range(chunk, infer_cfg["chunk_slices"], depth)
            shape = (len(channels), z_stop - z_start, -(-height // factor), -(-width // factor))
            pooled_size = [voxel_size[0], voxel_size[1] * factor, voxel_size[2] * factor]
            return create_volume(path, shape, np.uint8, voxel_size=pooled_size, offset=z_start, attrs=attrs)

        files = _ChunkFiles(outputs, make)

        def write_heat(chunk: int, first: int, heat: np.ndarray) -> None:
            if heat.shape[0] != len(channels):
                raise EmmitoError(
                    f"{checkpoint_path}: the model predicts {heat.shape[0]} channels but the checkpoint names "
                    f"{len(channels)} ({channels}): the checkpoint is inconsistent; retrain"
                )
            files.write(chunk, first, heat)

        stats: dict[str, int] = {}
        try:
            tiling = infer_chunks(
                model, lambda a, b: image[a:b], image.shape, sorted(outputs), model_cfg, infer_cfg, write_heat, device,
                checkpoint.get(contract.CHECKPOINT_INPUT_NORM), factor=factor, stats=stats,
            )
        except BaseException:
            files.abandon()
            raise
        assert files.done == set(outputs), (files.done, sorted(outputs))
    print(
        f"infer: chunks {min(outputs)}-{max(outputs)}: {stats['windows']} windows of {tiling.describe()}, "
        f"{stats['voxels_in'] / stats['voxels_out']:.2f} voxels through the network per voxel written",
        file=sys.stderr,
    )
    return stats


def load_for_inference(
    checkpoint_path: str | os.PathLike, params: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(the heat model in eval mode on ``device``, the checkpoint, the model section it runs with).

    The model section is the checkpoint's; keys of ``params["model"]`` that the user
    set (``params.explicit``, a ``config.Validated``; a plain dict counts every key
    as set) are checked against it (``model.resolve_model_config``).
    """
    checkpoint = contract.read_checkpoint(checkpoint_path)
    model_cfg = resolve_model_config(checkpoint, params["model"], getattr(params, "explicit", None), checkpoint_path)
    network = network_from_checkpoint(checkpoint, model_cfg, checkpoint_path, device)
    return heat_model(network, model_cfg).to(device).eval(), checkpoint, model_cfg


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito infer IMAGE CHECKPOINT OUT --chunk C`` (OUT: the heat file) or ``--chunks C...`` (OUT: a folder).

    No ``--params`` needed: the model section comes from the checkpoint, the rest are the defaults.
    With ``--chunks`` the folder appears whole (``contract.heat_chunk_name`` files) or not at all.
    """
    keep_freed_memory()
    infer_cfg = params["infer"]
    torch.set_num_threads(thread_count(infer_cfg["threads"]))
    device = pick_device(log=lambda line: print(f"emmito infer: {line}", file=sys.stderr, flush=True))
    model, checkpoint, model_cfg = load_for_inference(args.checkpoint, params, device)
    if args.chunk is not None:
        write_heat_chunks(model, checkpoint, args.checkpoint, args.image, {args.chunk: args.out}, model_cfg, infer_cfg, device)
        return
    with atomic_directory(args.out) as folder:
        outputs = {c: folder / contract.heat_chunk_name(c) for c in args.chunks}
        write_heat_chunks(model, checkpoint, args.checkpoint, args.image, outputs, model_cfg, infer_cfg, device)
