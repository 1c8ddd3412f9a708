"""Sliding-window prediction: the window grid, Gaussian blending, test-time augmentation, the threaded pipeline.

Used by ``infer`` (one chunk of a volume on disk) and by training's validation
and support set (whole volumes in memory), so that both see exactly the same
windows, weights and augmentations.

Windows lie on one global grid over the whole volume (``emmito.tiling``: per
axis a tile size, a border crop and a stride, valid regions anchored at the
volume's first voxel; the volume is reflect-padded where windows reach past it).
A run of slices evaluates exactly the windows whose valid region touches it,
each once, reading the image slices those windows need (its halo) and nothing
else, and blends their valid regions with separable Gaussian weights. Every
voxel therefore sees the same windows with the same inputs whatever the
chunking, batched alike (a batch never spans two rows of windows), so chunked
inference gives the bytes of whole-volume inference: no seams at chunk faces.

Three threads overlap the work around the network with the network itself:
a reader reads the slices of the next row of windows (lazily, each slice once,
dropped after its last use) and prepares the next batches of tiles; the caller's
thread runs the model (with test-time augmentation, as a running mean, and
where asked the running variance of the foreground across the variants); a
writer blends finished tiles into the output and hands finished slices on
(``on_slices``), with their foreground's entropy where asked. The queues
between them hold ``prefetch_batches`` batches each, so memory is the output's float32 accumulator, the slices of about two
rows of windows and a few batches: never the volume's depth.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from emmito.model import heat_model
from emmito.runtime import autocast
from emmito.tiling import BLEND_EPSILON, Tiling, batch_windows, plan_tiling

__all__ = ["BLEND_EPSILON", "Tiling", "predict_slices", "predict_volume", "predict_tiles", "to_heat", "tta_variants"]

# How the uint8 input is normalised when a checkpoint does not say: (value - mean) / std.
DEFAULT_INPUT_NORM = {"mean": 127.5, "std": 127.5}

# Test-time augmentation sizes: y/x flips (4), + the yx transpose (8), + the z flip (16).
TTA_COUNTS = (1, 4, 8, 16)
# The uncertainty channel predict_slices can add after the model's (config infer.uncertainty).
UNCERTAINTY_KINDS = ("none", "tta_std", "entropy")

# How often (s) a thread blocked on a queue checks whether it should give up.
_POLL_SECONDS = 0.05


# ---- the window grid and its weights -------------------------------------------------


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map virtual indices (any integer) into [0, size) by mirror reflection without repeating the edge (numpy 'reflect')."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)


def _is_identity(index: np.ndarray, size: int) -> bool:
    return len(index) == size and bool(np.all(index == np.arange(size)))


def _axis_weight_sum(starts: np.ndarray, weights: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Sum over windows of their 1D weights at positions [lo, hi) (float64), windows in ascending order."""
    total = np.zeros(hi - lo, dtype=np.float64)
    patch = len(weights)
    for start in starts:
        a, b = max(start, lo), min(start + patch, hi)
        if a < b:
            total[a - lo : b - lo] += weights[a - start : b - start]
    return total


class _Grid:
    """The windows that slices [z_start, z_stop) of a volume need, in (z, y, x) order.

    Window ``w`` is in row ``w // per_row`` (its z-start ``z_starts[row]``), so
    rows finish, and free their slices, in z order. ``row_slices[r]`` are the
    real slice indices (in virtual-z order, reflected at the volume's faces)
    that row ``r`` reads. ``y_origin``/``x_origin``: the grid's first y/x
    (<= 0), where the padded slices start.
    """

    def __init__(
        self, z_start: int, z_stop: int, tiling: Tiling, z_starts: np.ndarray, row_slices: list[np.ndarray], height: int, width: int
    ):
        self.z_start, self.z_stop, self.tiling, self.patch = z_start, z_stop, tiling, tiling.tile
        self.z_starts, self.row_slices = z_starts, row_slices
        self.height, self.width = height, width
        self.y_starts = tiling.y.starts(height)
        self.x_starts = tiling.x.starts(width)
        self.y_origin, self.x_origin = int(self.y_starts[0]), int(self.x_starts[0])
        self.rows, self.per_row, self.columns = len(z_starts), len(self.y_starts) * len(self.x_starts), len(self.x_starts)
        self.window_count = self.rows * self.per_row

    def window(self, index: int) -> tuple[int, int, int, int]:
        """(row, z, y, x) of window ``index``: its row and its start in the volume's frame."""
        row, rest = divmod(index, self.per_row)
        return row, int(self.z_starts[row]), int(self.y_starts[rest // self.columns]), int(self.x_starts[rest % self.columns])

    def valid(self, z: int, y: int, x: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The valid region of the window starting at (z, y, x), clipped to the output: ((za, zb), (ya, yb), (xa, xb))."""
        spans = []
        for start, axis, lo, hi in ((z, self.tiling.z, self.z_start, self.z_stop), (y, self.tiling.y, 0, self.height), (x, self.tiling.x, 0, self.width)):
            spans.append((max(start + axis.crop_lo, lo), min(start + axis.tile - axis.crop_hi, hi)))
        return spans[0], spans[1], spans[2]


def _plan_windows(
    read_slices: Callable[[int, int], np.ndarray], depth: int, z_start: int, z_stop: int, tiling: Tiling
) -> tuple[_Grid, _SliceReader]:
    """The grid of slices [z_start, z_stop) and a reader holding its first row, padded to the grid's y/x extent."""
    patch_z, patch_y, patch_x = tiling.tile
    z_starts = tiling.z.starts(depth, z_start, z_stop)
    row_slices = [reflect_index(np.arange(z, z + patch_z), depth) for z in z_starts.tolist()]
    reader = _SliceReader(read_slices, row_slices)
    reader.load_row(0)  # the first row is read here: its size fixes the yx grid
    grid = _Grid(z_start, z_stop, tiling, z_starts, row_slices, reader.height, reader.width)
    # Slices are held padded to the grid's extent in y and x, reflected at the image's edges.
    reader.set_padding(
        reflect_index(np.arange(grid.y_origin, int(grid.y_starts[-1]) + patch_y), grid.height),
        reflect_index(np.arange(grid.x_origin, int(grid.x_starts[-1]) + patch_x), grid.width),
    )
    return grid, reader


@dataclass
class _Weights:
    """A window's 3D blending weights (float32, on the model's device) and the summed weights of the output.

    The grid is a product of 1D grids, so the summed weight is the product of
    1D sums (``total_z`` over the output's slices, ``total_yx`` over a slice,
    float64): no 3D weight buffer. Weights are 0 on each window's crop.
    """

    window: torch.Tensor
    total_z: np.ndarray
    total_yx: np.ndarray

    @classmethod
    def of(cls, grid: _Grid, blend_sigma: float, device: torch.device) -> "_Weights":
        weight_z, weight_y, weight_x = (axis.weights(blend_sigma) for axis in grid.tiling.axes)
        window = torch.from_numpy(
            (weight_z[:, None, None] * weight_y[None, :, None] * weight_x[None, None, :]).astype(np.float32)
        ).to(device)
        total_z = _axis_weight_sum(grid.z_starts, weight_z, grid.z_start, grid.z_stop)
        total_yx = (
            _axis_weight_sum(grid.y_starts, weight_y, 0, grid.height)[:, None]
            * _axis_weight_sum(grid.x_starts, weight_x, 0, grid.width)[None, :]
        )
        return cls(window, total_z, total_yx)


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


def check_uncertainty(uncertainty: str, tta: int) -> None:
    """Refuse an ``uncertainty`` kind that is unknown or that ``tta`` cannot give (ValueError)."""
    if uncertainty not in UNCERTAINTY_KINDS:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, not {uncertainty!r}")
    if uncertainty == "tta_std" and tta < 2:
        raise ValueError("uncertainty tta_std needs tta 4, 8 or 16")


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    """Binary entropy in bits, in [0, 1], of probabilities in [0, 1] (float32; 0 at 0 and 1, 1 at 0.5)."""
    p = np.asarray(probability, dtype=np.float32)
    q = np.float32(1.0) - p
    bits = p * np.log2(np.where(p > 0, p, np.float32(1.0))) + q * np.log2(np.where(q > 0, q, np.float32(1.0)))
    return np.clip(-bits, 0.0, 1.0)


def predict_tiles(model: torch.nn.Module, inputs: torch.Tensor, tta: int = 1, std_of: int | None = None) -> torch.Tensor:
    """Sigmoid probabilities, float32 (batch, channel, z, y, x), of normalised input tiles (batch, 1, z, y, x).

    With ``tta`` > 1 each variant of ``tta_variants(tta)`` is run, undone on the
    output and folded into a running mean: one variant's output is held at a time.
    ``std_of`` (a channel index, with ``tta`` > 1) appends one channel: twice the population
    standard deviation of that channel across the variants (in [0, 1]: 0.5 is a probability's
    largest), a running Welford variance beside the mean, so again one variant is held and no
    forward pass is added; the mean is the same bytes with or without it.
    Runs on ``inputs``' device, with AMP there if it is CUDA; call under ``torch.inference_mode``.
    """
    if std_of is not None:
        check_uncertainty("tta_std", tta)
    mean: torch.Tensor | None = None
    squares: torch.Tensor | None = None  # Welford: the sum of squared deviations from the running mean
    picked = slice(std_of, None if std_of is None else std_of + 1)
    for count, variant in enumerate(tta_variants(tta), start=1):
        with autocast(inputs.device):
            logits = model(_augment(inputs, variant))
        probabilities = _augment(torch.sigmoid(logits.float()), variant, inverse=True)
        if mean is None:
            mean = probabilities.contiguous()
            squares = None if std_of is None else torch.zeros_like(mean[:, picked])
            continue
        delta = None if squares is None else probabilities[:, picked] - mean[:, picked]
        mean += (probabilities - mean) / count
        if squares is not None:
            squares += delta * (probabilities[:, picked] - mean[:, picked])
    assert mean is not None
    if squares is None:
        return mean
    return torch.cat([mean, torch.clamp(2.0 * torch.sqrt(torch.clamp(squares / tta, min=0.0)), max=1.0)], dim=1)


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


@dataclass
class _Queues:
    """What the three threads share: the stop flag and the queues of tiles before and after the model."""

    prefetch_batches: int
    stop: threading.Event = field(default_factory=threading.Event)
    tiles_ready: queue.Queue = field(init=False)
    tiles_done: queue.Queue = field(init=False)

    def __post_init__(self) -> None:
        self.tiles_ready = queue.Queue(maxsize=self.prefetch_batches)
        self.tiles_done = queue.Queue(maxsize=self.prefetch_batches)


def _batch_starts(grid: _Grid, batch_size: int) -> list[int]:
    """The first window of each batch: every row of windows cut into batches of ``batch_size`` from its start."""
    return [row * grid.per_row + k for row in range(grid.rows) for k in range(0, grid.per_row, batch_size)]


def _prepare_tiles(
    grid: _Grid, reader: _SliceReader, norm: dict[str, float], batch_size: int, device: torch.device, queues: _Queues
) -> None:
    """The reader thread: cut batches of normalised float32 tiles (batch, 1, z, y, x) from the slices, in window order.

    Batches never span two rows of windows, so a row is batched the same whichever slices a job runs: a
    convolution's float rounding depends on its batch, and chunks, jobs of chunks and the whole volume then
    give the same bytes.
    """
    patch_z, patch_y, patch_x = grid.patch
    y_origin, x_origin = grid.y_origin, grid.x_origin
    for first in _batch_starts(grid, batch_size):
        count = min(batch_size, (first // grid.per_row + 1) * grid.per_row - first)
        tiles = np.empty((count, 1, patch_z, patch_y, patch_x), dtype=np.float32)
        for i in range(count):
            row, _, y, x = grid.window(first + i)
            reader.load_row(row)
            for k, real in enumerate(grid.row_slices[row].tolist()):
                tiles[i, 0, k] = reader.slice(real)[y - y_origin : y - y_origin + patch_y, x - x_origin : x - x_origin + patch_x]
        tiles -= norm["mean"]
        tiles /= norm["std"]
        batch = torch.from_numpy(tiles)
        if device.type == "cuda":
            batch = batch.pin_memory()  # lets the copy to the GPU run asynchronously
        _put(queues.tiles_ready, (first, batch), queues.stop)
    _put(queues.tiles_ready, _END, queues.stop)


def _blend_tiles(
    grid: _Grid,
    weights: _Weights,
    queues: _Queues,
    on_slices: Callable[[int, np.ndarray], None] | None,
    result: dict[str, np.ndarray],
    entropy_of: int | None = None,
) -> None:
    """The writer thread: add weighted tiles into ``result["out"]``; normalise, clip and hand on slices as rows finish.

    ``entropy_of``: a channel whose ``binary_entropy`` fills one more, last channel of the
    finished (blended) slices.
    """
    z_start, z_stop, height, width = grid.z_start, grid.z_stop, grid.height, grid.width
    out: np.ndarray | None = None
    finished_until = z_start
    while (item := _get(queues.tiles_done, queues.stop)) is not _END:
        first, weighted = item
        blended = weighted.shape[1]
        if out is None:
            out = np.zeros((blended + (entropy_of is not None), z_stop - z_start, height, width), dtype=np.float32)
            result["out"] = out
        for i, tile in enumerate(weighted):
            _, z, y, x = grid.window(first + i)
            (za, zb), (ya, yb), (xa, xb) = grid.valid(z, y, x)
            if za < zb and ya < yb and xa < xb:
                out[:blended, za - z_start : zb - z_start, ya:yb, xa:xb] += tile[:, za - z : zb - z, ya - y : yb - y, xa - x : xb - x]
        rows_done = (first + len(weighted)) // grid.per_row
        # Slices below the first unfinished row's valid region get no more windows: normalise and hand them on.
        next_valid = int(grid.z_starts[rows_done]) + grid.tiling.z.crop_lo if rows_done < grid.rows else z_stop
        limit = min(max(next_valid, z_start), z_stop)
        if limit > finished_until:
            for z in range(finished_until, limit):
                out[:, z - z_start] /= (weights.total_z[z - z_start] * weights.total_yx).astype(np.float32)
            done_slices = out[:, finished_until - z_start : limit - z_start]
            np.clip(done_slices, 0.0, 1.0, out=done_slices)
            if entropy_of is not None:
                done_slices[-1] = binary_entropy(done_slices[entropy_of])
            if on_slices is not None:
                on_slices(finished_until - z_start, done_slices)
            finished_until = limit


def _run_model(
    model: torch.nn.Module,
    device: torch.device,
    tta: tuple[int, int | None],
    weights: _Weights,
    batches: int,
    progress: bool,
    queues: _Queues,
    reader_thread: threading.Thread,
    writer_thread: threading.Thread,
) -> None:
    """The caller's thread: run the model on each batch the reader prepared and hand the weighted output to the writer.

    ``tta``: ``predict_tiles``' (tta, std_of). Returns when both workers have ended
    (done, or stopped after one of them failed).
    """
    finished = False
    try:
        with torch.inference_mode(), tqdm(
            total=batches, desc="infer", unit="batch", file=sys.stderr, disable=not progress, leave=False
        ) as bar:
            while (item := _get(queues.tiles_ready, queues.stop, reader_thread)) is not _END:
                first, batch = item
                probabilities = predict_tiles(model, batch.to(device, non_blocking=True), *tta)
                probabilities *= weights.window
                _put(queues.tiles_done, (first, probabilities.cpu().numpy()), queues.stop, writer_thread)
                bar.update()
            _put(queues.tiles_done, _END, queues.stop, writer_thread)
        finished = True
    except _Stopped:
        pass  # a worker failed; its error is raised by the caller
    finally:
        if not finished:
            queues.stop.set()
        writer_thread.join()
        queues.stop.set()
        reader_thread.join()


def _run_pipeline(
    model: torch.nn.Module,
    grid: _Grid,
    reader: _SliceReader,
    weights: _Weights,
    norm: dict[str, float],
    batch_size: int,
    device: torch.device,
    tta: tuple[int, int | None],
    prefetch_batches: int,
    progress: bool,
    on_slices: Callable[[int, np.ndarray], None] | None,
    entropy_of: int | None = None,
) -> np.ndarray:
    """Run the reader, the model and the writer over ``grid``; the blended output, or the first worker's error.

    ``tta``: ``predict_tiles``' (tta, std_of); ``entropy_of``: ``_blend_tiles``'.
    """
    queues = _Queues(prefetch_batches)
    result: dict[str, np.ndarray] = {}
    reader_thread = _Worker(lambda: _prepare_tiles(grid, reader, norm, batch_size, device, queues), "emmito-infer-read")
    writer_thread = _Worker(lambda: _blend_tiles(grid, weights, queues, on_slices, result, entropy_of), "emmito-infer-blend")
    model.eval()
    reader_thread.start()
    writer_thread.start()
    batches = len(_batch_starts(grid, batch_size))
    _run_model(model, device, tta, weights, batches, progress, queues, reader_thread, writer_thread)
    for worker in (reader_thread, writer_thread):
        if worker.error is not None:
            raise worker.error
    return result["out"]


def predict_slices(
    model: torch.nn.Module,
    read_slices: Callable[[int, int], np.ndarray],
    depth: int,
    z_start: int,
    z_stop: int,
    tiling: Tiling,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    input_norm: dict[str, float] | None = None,
    blend_sigma: float = 0.125,
    progress: bool = True,
    tta: int = 1,
    prefetch_batches: int = 2,
    on_slices: Callable[[int, np.ndarray], None] | None = None,
    stats: dict[str, int] | None = None,
    uncertainty: str = "none",
    uncertainty_channel: int = 0,
) -> np.ndarray:
    """Blended sigmoid probabilities of slices [z_start, z_stop) of a volume of ``depth`` slices.

    ``read_slices(a, b)`` returns slices [a, b) (0 <= a < b <= depth) as (b - a, y, x)
    intensities on the 0-255 scale (uint8, or float32 after pooling); it is called
    from a reader thread, in increasing runs, each slice of the chunk plus its
    halo once. ``tiling`` is the window grid (``emmito.tiling``; ``Tiling.of_patch``
    for windows of the training patch), ``blend_sigma`` the Gaussian sigma as a
    fraction of a window's valid region, ``tta`` the number of test-time
    augmentations (1 = off), ``prefetch_batches`` the batches queued before and
    after the model. ``on_slices(first, probabilities)``, if given, is called
    (from the writer thread, in order) with each run of finished slices: ``first``
    relative to ``z_start``, float32 (channel, n, y, x) — a view; copy it to keep it.
    ``stats``, if given, receives ``windows``, ``voxels_in`` (voxels through the
    network, test-time variants included) and ``voxels_out`` (voxels written).
    ``uncertainty`` (``UNCERTAINTY_KINDS``) other than ``none`` adds a last channel, in [0, 1], from
    output channel ``uncertainty_channel`` (the foreground), at no extra forward pass: ``tta_std`` -
    twice its standard deviation across the ``tta`` variants (``predict_tiles``' ``std_of``), blended
    like the other channels; ``entropy`` - the ``binary_entropy`` (bits) of its blended probability.
    The other channels are the same bytes with or without it.
    Returns float32 (channel, z_stop - z_start, y, x) in [0, 1].
    """
    if not 0 <= z_start < z_stop <= depth:
        raise ValueError(f"slices [{z_start}, {z_stop}) are not inside a volume of {depth} slices")
    tta_variants(tta)  # refuse a bad count or kind before starting threads
    check_uncertainty(uncertainty, tta)
    device = torch.device(device)
    norm = input_norm or DEFAULT_INPUT_NORM
    grid, reader = _plan_windows(read_slices, depth, z_start, z_stop, tiling)
    weights = _Weights.of(grid, blend_sigma, device)
    std_of = uncertainty_channel if uncertainty == "tta_std" else None
    entropy_of = uncertainty_channel if uncertainty == "entropy" else None
    out = _run_pipeline(
        model, grid, reader, weights, norm, batch_size, device, (tta, std_of), prefetch_batches, progress, on_slices, entropy_of
    )
    if stats is not None:
        stats["windows"] = stats.get("windows", 0) + grid.window_count
        stats["voxels_in"] = stats.get("voxels_in", 0) + grid.window_count * int(np.prod(grid.patch)) * tta
        stats["voxels_out"] = stats.get("voxels_out", 0) + (z_stop - z_start) * grid.height * grid.width
    return out


def to_heat(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities float (any shape) in [0, 1] -> uint8 heat 0..255 (probability * 255, rounded)."""
    return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)


def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    params: dict[str, Any],
    device: torch.device | str,
    input_norm: dict[str, float] | None = None,
    tta: int = 1,
) -> np.ndarray:
    """float32 (channel, z, y, x) heat in [0, 1] of every output channel (``model.output_channels``) of a whole
    in-memory (z, y, x) volume already at the inference scale, by ``infer``'s sliding window (``tta`` variants).

    ``params``: the ``model`` and ``infer`` config sections (defaults filled); the windows are
    ``tiling.plan_tiling``'s for them. ``model`` is the bare network.
    """
    tiling = plan_tiling(params["model"], params["infer"], image.shape)
    return predict_slices(
        heat_model(model, params["model"]),
        lambda a, b: image[a:b],
        image.shape[0],
        0,
        image.shape[0],
        tiling,
        batch_windows(params["model"], params["infer"], tiling),
        device,
        input_norm=input_norm,
        blend_sigma=params["infer"]["blend_sigma"],
        progress=False,
        tta=tta,
    )
