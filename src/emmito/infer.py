"""Inference: the heatmap of one chunk of slices, seamless with its neighbours by construction.

Sliding windows of ``model.patch`` lie on one global grid over the whole volume
(per axis: a constant stride, the grid centred so that its slack is split
between the two ends, where the volume is reflect-padded). A chunk evaluates
exactly the windows that touch its slices, each once, reading the image slices
those windows need (its halo) and nothing else, and blends them with separable
Gaussian weights. Every voxel therefore sees the same windows with the same
inputs whatever the chunking, so chunked inference equals whole-volume
inference (to float rounding of batched convolutions): no seams at chunk faces.

The price of independent chunk jobs: a z-window that straddles two chunks is
run by both. With chunk_slices 20 and a z-patch of 16 at stride 8 a chunk runs
4.5 z-windows on average where its own slices need 2.5, i.e. 1.8x the network
work of one whole-volume pass (about 1 + z-patch / chunk_slices). Larger chunks
bring it towards 1x.

Three threads overlap the work around the network with the network itself:
a reader reads the slices of the next row of windows (lazily, each slice once,
dropped after its last use) and prepares the next batches of tiles; the caller's
thread runs the model (with test-time augmentation, as a running mean); a
writer blends finished tiles into the chunk and hands finished slices on (to
the heat file in ``run_cli``). The queues between them hold ``prefetch_batches``
batches each, so memory is the chunk's float32 accumulator, the slices of
about two rows of windows and a few batches: never the volume's depth.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from emmito import blocks
from emmito.io import EmmitoError, create_volume, open_volume, volume_attrs
from emmito.embedding import DEFAULT_EMBEDDING_RANGE
from emmito.model import ARCHITECTURE_KEYS, build_model, check_patch, embedding_dim, heat_model, output_channels

# Added to each 1D Gaussian so that a window's corners still count where nothing else covers a voxel.
BLEND_EPSILON = 1e-3

# How the uint8 input is normalised when a checkpoint does not say: (value - mean) / std.
DEFAULT_INPUT_NORM = {"mean": 127.5, "std": 127.5}

# Test-time augmentation sizes: y/x flips (4), + the yx transpose (8), + the z flip (16).
TTA_COUNTS = (1, 4, 8, 16)

# How often (s) a thread blocked on a queue checks whether it should give up.
_POLL_SECONDS = 0.05


def job_threads(requested: int) -> int:
    """Threads to give torch: ``requested``, or (0) all the cores this job may use (SLURM/taskset aware)."""
    return requested if requested > 0 else len(os.sched_getaffinity(0))


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> Any:
    """Mixed precision on CUDA only: bf16 autocast on this kind of CPU is ~100x slower than fp32."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def window_stride(patch: int, overlap: float) -> int:
    """Stride (voxels) between neighbouring windows of ``patch`` voxels overlapping by the fraction ``overlap``."""
    return max(1, math.floor(patch * (1.0 - overlap) + 1e-9))


def window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Starts (int64, may be negative) of the windows covering ``size`` voxels along one axis.

    The fewest windows at this stride that cover the axis; the slack is split
    between both ends, so starts depend only on (size, patch, stride).
    """
    count = 1 if size <= patch else math.ceil((size - patch) / stride) + 1
    span = (count - 1) * stride + patch
    return np.arange(count, dtype=np.int64) * stride - (span - size) // 2


def chunk_z_starts(depth: int, z_start: int, z_stop: int, patch_z: int, overlap: float) -> np.ndarray:
    """Starts (int64) of the global grid's z-windows that touch slices [z_start, z_stop): the rows a chunk runs."""
    grid = window_starts(depth, patch_z, window_stride(patch_z, overlap))
    return grid[(grid < z_stop) & (grid + patch_z > z_start)]


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map virtual indices (any integer) into [0, size) by mirror reflection without repeating the edge (numpy 'reflect')."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)


def _is_identity(index: np.ndarray, size: int) -> bool:
    return len(index) == size and bool(np.all(index == np.arange(size)))


def blend_weights(patch: int, sigma_fraction: float) -> np.ndarray:
    """1D Gaussian blending weights (float64, peak 1 + epsilon) for a window of ``patch`` voxels."""
    centre = (patch - 1) / 2
    sigma = max(sigma_fraction * patch, 1e-6)
    positions = np.arange(patch, dtype=np.float64)
    return np.exp(-0.5 * ((positions - centre) / sigma) ** 2) + BLEND_EPSILON


def _axis_weight_sum(starts: np.ndarray, weights: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Sum over windows of their 1D weights at positions [lo, hi) (float64), windows in ascending order."""
    total = np.zeros(hi - lo, dtype=np.float64)
    patch = len(weights)
    for start in starts:
        a, b = max(start, lo), min(start + patch, hi)
        if a < b:
            total[a - lo : b - lo] += weights[a - start : b - start]
    return total


def mean_pool_xy(slices: np.ndarray, factor: int) -> np.ndarray:
    """Mean-pool (z, y, x) slices by ``factor`` in y and x; returns float32 (z, ceil(y/f), ceil(x/f)).

    A remainder row/column is averaged with edge copies of itself (i.e. over the pixels that exist).
    """
    if factor == 1:
        return slices
    depth, height, width = slices.shape
    pad_y, pad_x = -height % factor, -width % factor
    if pad_y or pad_x:
        slices = np.pad(slices, ((0, 0), (0, pad_y), (0, pad_x)), mode="edge")
    shaped = slices.reshape(depth, slices.shape[1] // factor, factor, slices.shape[2] // factor, factor)
    return shaped.mean(axis=(2, 4), dtype=np.float32)


# ---- test-time augmentation ---------------------------------------------------------


def tta_variants(count: int) -> list[tuple[bool, bool, bool, bool]]:
    """The first ``count`` (1, 4, 8 or 16) augmentations as (flip_z, flip_y, flip_x, transpose_yx), identity first.

    4: flips in y and x; 8: those, each also with y and x swapped; 16: all of them also flipped in z.
    """
    if count not in TTA_COUNTS:
        raise ValueError(f"tta must be one of {TTA_COUNTS}, not {count}")
    variants = [
        (flip_z, flip_y, flip_x, transpose)
        for flip_z in (False, True)
        for transpose in (False, True)
        for flip_y in (False, True)
        for flip_x in (False, True)
    ]
    return variants[:count]


def _augment(tiles: torch.Tensor, variant: tuple[bool, bool, bool, bool], inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) one augmentation to (batch, channel, z, y, x): flips first, then the transpose."""
    flip_z, flip_y, flip_x, transpose = variant
    dims = [dim for dim, flip in ((-3, flip_z), (-2, flip_y), (-1, flip_x)) if flip]
    if inverse and transpose:
        tiles = tiles.transpose(-1, -2)
    if dims:
        tiles = torch.flip(tiles, dims)
    if not inverse and transpose:
        tiles = tiles.transpose(-1, -2)
    return tiles


def predict_tiles(model: torch.nn.Module, inputs: torch.Tensor, tta: int = 1) -> torch.Tensor:
    """Sigmoid probabilities, float32 (batch, channel, z, y, x), of normalised input tiles (batch, 1, z, y, x).

    With ``tta`` > 1 each variant of ``tta_variants(tta)`` is run, undone on the
    output and folded into a running mean: one variant's output is held at a time.
    Runs on ``inputs``' device, with AMP there if it is CUDA; call under ``torch.inference_mode``.
    """
    mean: torch.Tensor | None = None
    for count, variant in enumerate(tta_variants(tta), start=1):
        with autocast(inputs.device):
            logits = model(_augment(inputs, variant))
        probabilities = _augment(torch.sigmoid(logits.float()), variant, inverse=True)
        if mean is None:
            mean = probabilities.contiguous()
        else:
            mean += (probabilities - mean) / count
    assert mean is not None
    return mean


# ---- the three-thread pipeline -------------------------------------------------------


class _Stopped(Exception):
    """Another thread of the pipeline failed or the caller gave up: stop quietly."""


class _Worker(threading.Thread):
    """A daemon thread that keeps the exception its target raised, for the caller to re-raise."""

    def __init__(self, target: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self._work = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            self.error = exc


def _put(channel: queue.Queue, item: Any, stop: threading.Event, consumer: threading.Thread | None = None) -> None:
    """Put ``item``, giving up (``_Stopped``) when ``stop`` is set or the ``consumer`` thread has ended."""
    while True:
        if stop.is_set() or (consumer is not None and not consumer.is_alive()):
            raise _Stopped()
        try:
            channel.put(item, timeout=_POLL_SECONDS)
            return
        except queue.Full:
            pass


def _get(channel: queue.Queue, stop: threading.Event, producer: threading.Thread | None = None) -> Any:
    """Get an item, giving up (``_Stopped``) when ``stop`` is set or the ``producer`` thread ended without one."""
    while True:
        try:
            return channel.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if stop.is_set():
                raise _Stopped() from None
            if producer is not None and not producer.is_alive():
                try:  # it may have put its last item just before ending
                    return channel.get_nowait()
                except queue.Empty:
                    raise _Stopped() from None


_END = object()


class _SliceReader:
    """The padded image slices the rows of windows need: read lazily in runs, each once, dropped after its last row.

    ``row_slices[r]`` are the real slice indices (in virtual-z order, reflected at
    the volume's faces) that row ``r`` of windows reads.
    """

    def __init__(self, read_slices: Callable[[int, int], np.ndarray], row_slices: list[np.ndarray]):
        self._read_slices = read_slices
        self._row_slices = row_slices
        self._last_row: dict[int, int] = {}
        for row, reals in enumerate(row_slices):
            for real in reals.tolist():
                self._last_row[real] = row
        self._cache: dict[int, np.ndarray] = {}
        self._loaded_rows = -1
        self.height = self.width = -1
        self._y_index: np.ndarray | None = None
        self._x_index: np.ndarray | None = None

    def set_padding(self, y_index: np.ndarray, x_index: np.ndarray) -> None:
        """Rows/columns (reflected) of every held and later slice; identity indices keep slices as read."""
        self._y_index = None if _is_identity(y_index, self.height) else y_index
        self._x_index = None if _is_identity(x_index, self.width) else x_index
        for real, image_slice in self._cache.items():
            self._cache[real] = self._pad(image_slice)

    def _pad(self, image_slice: np.ndarray) -> np.ndarray:
        if self._y_index is not None:
            image_slice = image_slice[self._y_index]
        if self._x_index is not None:
            image_slice = image_slice[:, self._x_index]
        return image_slice

    def load_row(self, row: int) -> None:
        """Read the slices row ``row`` needs that are not held yet; drop those no later row needs."""
        if row <= self._loaded_rows:
            return
        for done in range(self._loaded_rows + 1, row + 1):
            wanted = sorted(set(self._row_slices[done].tolist()) - set(self._cache))
            for first, stop in _runs(wanted):
                self._store(first, stop)
        self._loaded_rows = row
        for real in [real for real in self._cache if self._last_row[real] < row]:
            del self._cache[real]

    def _store(self, first: int, stop: int) -> None:
        slab = np.asarray(self._read_slices(first, stop))
        if slab.ndim != 3 or slab.shape[0] != stop - first:
            raise ValueError(f"read_slices({first}, {stop}) returned shape {slab.shape}, expected ({stop - first}, y, x)")
        if self.height < 0:
            self.height, self.width = slab.shape[1:]
        elif slab.shape[1:] != (self.height, self.width):
            raise ValueError(f"read_slices({first}, {stop}) returned slices of {slab.shape[1:]}, earlier ones were {(self.height, self.width)}")
        for offset, image_slice in enumerate(slab):
            self._cache[first + offset] = self._pad(image_slice)

    def slice(self, real: int) -> np.ndarray:
        return self._cache[real]


def _runs(sorted_values: list[int]) -> Iterator[tuple[int, int]]:
    """Half-open runs [first, stop) of consecutive integers in a sorted list."""
    start = previous = None
    for value in sorted_values:
        if start is None:
            start = previous = value
        elif value == previous + 1:
            previous = value
        else:
            yield start, previous + 1
            start = previous = value
    if start is not None:
        yield start, previous + 1


def predict_slices(
    model: torch.nn.Module,
    read_slices: Callable[[int, int], np.ndarray],
    depth: int,
    z_start: int,
    z_stop: int,
    patch: tuple[int, int, int] | list[int],
    overlap: float,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    input_norm: dict[str, float] | None = None,
    blend_sigma: float = 0.125,
    progress: bool = True,
    tta: int = 1,
    prefetch_batches: int = 2,
    on_slices: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Blended sigmoid probabilities of slices [z_start, z_stop) of a volume of ``depth`` slices.

    ``read_slices(a, b)`` returns slices [a, b) (0 <= a < b <= depth) as (b - a, y, x)
    intensities on the 0-255 scale (uint8, or float32 after pooling); it is called
    from a reader thread, in increasing runs, each slice of the chunk plus its
    halo once. ``patch`` is the window (z, y, x) in voxels, ``overlap`` the
    fraction neighbouring windows share, ``blend_sigma`` the Gaussian sigma as a
    fraction of the patch, ``tta`` the number of test-time augmentations (1 = off),
    ``prefetch_batches`` the batches queued before and after the model.
    ``on_slices(first, probabilities)``, if given, is called (from the writer
    thread, in order) with each run of finished slices: ``first`` relative to
    ``z_start``, float32 (channel, n, y, x) — a view; copy it to keep it.
    Returns float32 (channel, z_stop - z_start, y, x) in [0, 1].
    """
    if not 0 <= z_start < z_stop <= depth:
        raise ValueError(f"slices [{z_start}, {z_stop}) are not inside a volume of {depth} slices")
    tta_variants(tta)  # refuse a bad count before starting threads
    device = torch.device(device)
    norm = input_norm or DEFAULT_INPUT_NORM
    patch_z, patch_y, patch_x = (int(p) for p in patch)

    z_starts = chunk_z_starts(depth, z_start, z_stop, patch_z, overlap)
    row_slices = [reflect_index(np.arange(z, z + patch_z), depth) for z in z_starts.tolist()]
    reader = _SliceReader(read_slices, row_slices)
    reader.load_row(0)  # the first row is read here: its size fixes the yx grid
    height, width = reader.height, reader.width

    y_starts = window_starts(height, patch_y, window_stride(patch_y, overlap))
    x_starts = window_starts(width, patch_x, window_stride(patch_x, overlap))
    # Slices are stored padded to the virtual (grid) extent in y and x, reflected at the image's edges.
    # Slices are held padded to the grid's extent in y and x, reflected at the image's edges.
    y_origin, x_origin = int(y_starts[0]), int(x_starts[0])
    reader.set_padding(
        reflect_index(np.arange(y_origin, int(y_starts[-1]) + patch_y), height),
        reflect_index(np.arange(x_origin, int(x_starts[-1]) + patch_x), width),
    )

    weight_z = blend_weights(patch_z, blend_sigma)
    weight_y = blend_weights(patch_y, blend_sigma)
    weight_x = blend_weights(patch_x, blend_sigma)
    weight_3d = torch.from_numpy(
        (weight_z[:, None, None] * weight_y[None, :, None] * weight_x[None, None, :]).astype(np.float32)
    ).to(device)
    # The grid is a product of 1D grids, so the summed weight is the product of 1D sums: no 3D weight buffer.
    total_z = _axis_weight_sum(z_starts, weight_z, z_start, z_stop)
    total_yx = _axis_weight_sum(y_starts, weight_y, 0, height)[:, None] * _axis_weight_sum(x_starts, weight_x, 0, width)[None, :]

    # Windows in (z, y, x) order: window w is row w // per_row, so rows finish, and free slices, in z order.
    rows, per_row, columns = len(z_starts), len(y_starts) * len(x_starts), len(x_starts)
    window_count = rows * per_row

    def window(index: int) -> tuple[int, int, int, int]:
        row, rest = divmod(index, per_row)
        return row, int(z_starts[row]), int(y_starts[rest // columns]), int(x_starts[rest % columns])

    stop = threading.Event()
    tiles_ready: queue.Queue = queue.Queue(maxsize=prefetch_batches)
    tiles_done: queue.Queue = queue.Queue(maxsize=prefetch_batches)
    result: dict[str, np.ndarray] = {}

    def prepare_tiles() -> None:
        for first in range(0, window_count, batch_size):
            count = min(batch_size, window_count - first)
            tiles = np.empty((count, 1, patch_z, patch_y, patch_x), dtype=np.float32)
            for i in range(count):
                row, _, y, x = window(first + i)
                reader.load_row(row)
                for k, real in enumerate(row_slices[row].tolist()):
                    tiles[i, 0, k] = reader.slice(real)[y - y_origin : y - y_origin + patch_y, x - x_origin : x - x_origin + patch_x]
            tiles -= norm["mean"]
            tiles /= norm["std"]
            batch = torch.from_numpy(tiles)
            if device.type == "cuda":
                batch = batch.pin_memory()  # lets the copy to the GPU run asynchronously
            _put(tiles_ready, (first, batch), stop)
        _put(tiles_ready, _END, stop)

    def blend_tiles() -> None:
        out: np.ndarray | None = None
        finished_until = z_start
        while (item := _get(tiles_done, stop)) is not _END:
            first, weighted = item
            if out is None:
                out = np.zeros((weighted.shape[1], z_stop - z_start, height, width), dtype=np.float32)
                result["out"] = out
            for i, tile in enumerate(weighted):
                _, z, y, x = window(first + i)
                za, zb = max(z, z_start), min(z + patch_z, z_stop)
                ya, yb = max(y, 0), min(y + patch_y, height)
                xa, xb = max(x, 0), min(x + patch_x, width)
                out[:, za - z_start : zb - z_start, ya:yb, xa:xb] += tile[:, za - z : zb - z, ya - y : yb - y, xa - x : xb - x]
            rows_done = (first + len(weighted)) // per_row
            # Slices below the first unfinished row's start get no more windows: normalise and hand them on.
            limit = z_stop if rows_done == rows else min(max(int(z_starts[rows_done]), z_start), z_stop)
            if limit > finished_until:
                for z in range(finished_until, limit):
                    out[:, z - z_start] /= (total_z[z - z_start] * total_yx).astype(np.float32)
                done_slices = out[:, finished_until - z_start : limit - z_start]
                np.clip(done_slices, 0.0, 1.0, out=done_slices)
                if on_slices is not None:
                    on_slices(finished_until - z_start, done_slices)
                finished_until = limit

    reader_thread = _Worker(prepare_tiles, "emmito-infer-read")
    writer_thread = _Worker(blend_tiles, "emmito-infer-blend")
    model.eval()
    reader_thread.start()
    writer_thread.start()
    finished = False
    try:
        with torch.inference_mode(), tqdm(
            total=-(-window_count // batch_size), desc="infer", unit="batch", file=sys.stderr, disable=not progress, leave=False
        ) as bar:
            while (item := _get(tiles_ready, stop, reader_thread)) is not _END:
                first, batch = item
                probabilities = predict_tiles(model, batch.to(device, non_blocking=True), tta)
                probabilities *= weight_3d
                _put(tiles_done, (first, probabilities.cpu().numpy()), stop, writer_thread)
                bar.update()
            _put(tiles_done, _END, stop, writer_thread)
        finished = True
    except _Stopped:
        pass  # a worker failed; its error is raised below
    finally:
        if not finished:
            stop.set()
        writer_thread.join()
        stop.set()
        reader_thread.join()
    for worker in (reader_thread, writer_thread):
        if worker.error is not None:
            raise worker.error
    return result["out"]


def to_heat(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities float (any shape) in [0, 1] -> uint8 heat 0..255 (probability * 255, rounded)."""
    return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_checkpoint(
    path: str | os.PathLike, model_cfg: dict[str, Any] | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load ``path`` (written by ``emmito train``) -> (model on ``device`` in eval mode, the checkpoint dict).

    With ``model_cfg``, refuse a checkpoint whose architecture differs from it
    (EmmitoError naming the checkpoint and the key). Missing or corrupt files
    raise a one-line EmmitoError.
    """
    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: checkpoint not found: run 'emmito train' (or the train rule) first, or fix the path")
    try:
        checkpoint = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmmitoError(f"{path}: not a readable checkpoint ({first_line[:120]}): it is corrupt or not from emmito; delete it and retrain") from None
    missing = [k for k in ("model_config", "state_dict") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise EmmitoError(f"{path}: not an emmito checkpoint (no {', '.join(missing)}): retrain with 'emmito train'")
    from emmito.config import section_defaults

    defaults = section_defaults("model")
    trained = {**defaults, **checkpoint["model_config"]}
    if model_cfg is not None:
        for key in ARCHITECTURE_KEYS:
            old, new = trained.get(key, defaults[key]), model_cfg.get(key, defaults[key])
            if old != new:
                raise EmmitoError(
                    f"{path} was trained with model.{key}={_show(old)}, the config says {_show(new)}: retrain or fix the config"
                )
    model = build_model(trained)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise EmmitoError(f"{path}: its weights do not fit its model_config ({str(exc).splitlines()[0][:120]}): the file is corrupt; retrain") from None
    # predict_slices applies a sigmoid; the wrapper makes that the right heat for every
    # channel (a tanh output for skeleton_distance, embeddings), exactly as training validates.
    model = heat_model(model, trained)
    return model.to(device).eval(), checkpoint


def _show(value: Any) -> str:
    return str(list(value)).replace(" ", "") if isinstance(value, (list, tuple)) else str(value)


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
    write_heat: Callable[[int, np.ndarray], None] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """Heat of inference chunk ``chunk_index``: (uint8 (channel, z, y, x), offset = its first slice).

    ``read_slices(a, b)`` returns full-resolution uint8 slices [a, b); they are
    mean-pooled by ``infer.downsample_xy`` before the network. ``write_heat(first,
    heat)``, if given, receives each run of finished uint8 slices as soon as the
    windows are done with them (``first`` relative to the chunk's first slice),
    so that writing overlaps the network.
    """
    z_start, z_stop = blocks.chunk_range(chunk_index, infer_cfg["chunk_slices"], depth)
    factor = infer_cfg["downsample_xy"]
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


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito infer IMAGE CHECKPOINT OUT --chunk C``: write the heat file of chunk C, slices as they finish."""
    model_cfg, infer_cfg = params["model"], params["infer"]
    check_patch(model_cfg["patch"], model_cfg)
    torch.set_num_threads(job_threads(infer_cfg["threads"]))
    device = pick_device()
    model, checkpoint = load_checkpoint(args.checkpoint, model_cfg, device)
    channels = list(checkpoint.get("channels", output_channels(model_cfg)))
    extra_attrs = {"embedding_range": DEFAULT_EMBEDDING_RANGE} if embedding_dim(model_cfg) else {}
    factor = infer_cfg["downsample_xy"]

    with open_volume(args.image) as image:
        if image.ndim != 3 or image.dtype != np.uint8:
            raise EmmitoError(f"{args.image}: expected uint8 (z, y, x), found {image.dtype} {image.shape}: rerun 'emmito convert'")
        depth, height, width = image.shape
        voxel_size = volume_attrs(image)["voxel_size"]
        z_start, z_stop = blocks.chunk_range(args.chunk, infer_cfg["chunk_slices"], depth)
        shape = (len(channels), z_stop - z_start, -(-height // factor), -(-width // factor))
        with create_volume(
            args.out,
            shape,
            np.uint8,
            voxel_size=[voxel_size[0], voxel_size[1] * factor, voxel_size[2] * factor],
            offset=z_start,
            attrs={"channels": channels, "volume_depth": depth, "downsample_xy": factor, **extra_attrs},
        ) as heat_dataset:
            writer = AlignedWriter(heat_dataset)

            def write_heat(first: int, heat: np.ndarray) -> None:
                if heat.shape[0] != len(channels):
                    raise EmmitoError(
                        f"{args.checkpoint}: the model predicts {heat.shape[0]} channels but the checkpoint names "
                        f"{len(channels)} ({channels}): the checkpoint is inconsistent; retrain"
                    )
                writer(first, heat)

            infer_chunk(
                model, lambda a, b: image[a:b], depth, args.chunk, model_cfg, infer_cfg, device,
                checkpoint.get("input_norm"), write_heat=write_heat,
            )
            writer.close()
