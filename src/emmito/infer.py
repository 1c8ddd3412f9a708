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

The price of independent chunk jobs: a z-window that straddles two chunks is
run by both. With chunk_slices 20 and a z-patch of 16 at stride 8 a chunk runs
4.5 z-windows on average where its own slices need 2.5, i.e. 1.8x the network
work of one whole-volume pass (about 1 + z-patch / chunk_slices). Larger chunks
bring it towards 1x.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np
import torch

from emmito import blocks, contract
from emmito.embedding import DEFAULT_EMBEDDING_RANGE
from emmito.io import EmmitoError, create_volume, open_volume, volume_attrs
from emmito.model import embedding_dim, heat_model, network_from_checkpoint, output_channels, pooling_for_volume, resolve_model_config
from emmito.prediction import predict_slices, to_heat
from emmito.resampling import mean_pool_xy
from emmito.runtime import pick_device, thread_count


def infer_chunk(
    model: torch.nn.Module,
    read_slices: Callable[[int, int], np.ndarray],
    depth: int,
    chunk_index: int,
    model_cfg: dict[str, Any],
    infer_cfg: dict[str, Any],
    device: torch.device | str = "cpu",
    input_norm: dict[str, float] | None = None,
    *,
    factor: int = 1,
    write_heat: Callable[[int, np.ndarray], None] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """Heat of inference chunk ``chunk_index``: (uint8 (channel, z, y, x), offset = its first slice).

    ``read_slices(a, b)`` returns full-resolution uint8 slices [a, b); they are
    mean-pooled by ``factor`` in y and x before the network. ``write_heat(first,
    heat)``, if given, receives each run of finished uint8 slices as soon as the
    windows are done with them (``first`` relative to the chunk's first slice),
    so that writing overlaps the network.
    """
    z_start, z_stop = blocks.chunk_range(chunk_index, infer_cfg["chunk_slices"], depth)
    heat_parts: list[np.ndarray] = []

    def on_slices(first: int, probabilities: np.ndarray) -> None:
        heat = to_heat(probabilities)
        heat_parts.append(heat)
        if write_heat is not None:
            write_heat(first, heat)

    predict_slices(
        model,
        lambda a, b: mean_pool_xy(read_slices(a, b), factor),
        depth,
        z_start,
        z_stop,
        model_cfg["patch"],
        infer_cfg["tile_overlap"],
        infer_cfg["batch_size"],
        device,
        input_norm=input_norm,
        blend_sigma=infer_cfg["blend_sigma"],
        progress=progress,
        tta=infer_cfg["tta"],
        prefetch_batches=infer_cfg["prefetch_batches"],
        on_slices=on_slices,
    )
    return np.concatenate(heat_parts, axis=1), z_start


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


def chunk_heat_attrs(checkpoint: dict[str, Any], model_cfg: dict[str, Any], depth: int, factor: int) -> dict[str, Any]:
    """The attributes of a chunk's heat file: the checkpoint's channel names, the volume frame, the embedding range."""
    channels = list(checkpoint.get(contract.CHECKPOINT_CHANNELS, output_channels(model_cfg)))
    embedding_range = DEFAULT_EMBEDDING_RANGE if embedding_dim(model_cfg) else None
    return contract.heat_file_attrs(channels, depth, factor, embedding_range)


def write_heat_chunk(
    model: torch.nn.Module,
    checkpoint: dict[str, Any],
    checkpoint_path: str | os.PathLike,
    image_path: str | os.PathLike,
    out_path: str | os.PathLike,
    chunk_index: int,
    model_cfg: dict[str, Any],
    infer_cfg: dict[str, Any],
    device: torch.device | str = "cpu",
) -> None:
    """Write the heat file of chunk ``chunk_index`` of ``image_path`` to ``out_path``, slices as they finish.

    ``model``: the checkpoint's network wrapped by ``model.heat_model``; ``model_cfg``:
    ``model.resolve_model_config``'s. The image is pooled by the factor that fits its
    voxel size to the checkpoint's (``model.pooling_for_volume``). The file is uint8
    (channel, z, y, x) at the image's y/x over that factor, with ``chunk_heat_attrs``
    (the factor among them); it appears only once complete.
    """
    with open_volume(image_path) as image:
        if image.ndim != 3 or image.dtype != np.uint8:
            raise EmmitoError(f"{image_path}: expected uint8 (z, y, x), found {image.dtype} {image.shape}: rerun 'emmito convert'")
        depth, height, width = image.shape
        voxel_size = contract.voxel_size(volume_attrs(image))
        factor = pooling_for_volume(checkpoint, voxel_size, image_path, checkpoint_path)
        attrs = chunk_heat_attrs(checkpoint, model_cfg, depth, factor)
        channels = contract.channel_names(attrs)
        z_start, z_stop = blocks.chunk_range(chunk_index, infer_cfg["chunk_slices"], depth)
        shape = (len(channels), z_stop - z_start, -(-height // factor), -(-width // factor))
        with create_volume(
            out_path,
            shape,
            np.uint8,
            voxel_size=[voxel_size[0], voxel_size[1] * factor, voxel_size[2] * factor],
            offset=z_start,
            attrs=attrs,
        ) as heat_dataset:
            writer = AlignedWriter(heat_dataset)

            def write_heat(first: int, heat: np.ndarray) -> None:
                if heat.shape[0] != len(channels):
                    raise EmmitoError(
                        f"{checkpoint_path}: the model predicts {heat.shape[0]} channels but the checkpoint names "
                        f"{len(channels)} ({channels}): the checkpoint is inconsistent; retrain"
                    )
                writer(first, heat)

            infer_chunk(
                model, lambda a, b: image[a:b], depth, chunk_index, model_cfg, infer_cfg, device,
                checkpoint.get(contract.CHECKPOINT_INPUT_NORM), factor=factor, write_heat=write_heat,
            )
            writer.close()


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
    """``emmito infer IMAGE CHECKPOINT OUT --chunk C``: write the heat file of chunk C, slices as they finish.

    No ``--params`` needed: the model section comes from the checkpoint, the rest are the defaults.
    """
    infer_cfg = params["infer"]
    torch.set_num_threads(thread_count(infer_cfg["threads"]))
    device = pick_device()
    model, checkpoint, model_cfg = load_for_inference(args.checkpoint, params, device)
    write_heat_chunk(model, checkpoint, args.checkpoint, args.image, args.out, args.chunk, model_cfg, infer_cfg, device)
