"""Instance segmentation of one heatmap block: foreground, seeds, seeded watershed, size filter.

Two decoders, selected by ``segment.decoder``:

- ``heat_watershed`` (the original pipeline's recipe) on a one-channel
  heatmap: per-slice Gaussian blur, foreground = blurred heat above a
  threshold, seeds = connected components of the heat above a higher one,
  watershed of the inverted blurred heat inside the foreground;
- ``bc_watershed`` (PyTorch Connectomics' decoder for binary + contour
  outputs): foreground = binary above a threshold, seeds = components of
  (binary high) and (contour low), watershed of the inverted binary map;
- ``embedding_cluster`` (an embedding head): foreground = the binary channel
  above a threshold, split into instances by mean-shift of the ``emb*``
  channels per foreground component (``emmito.embedding``);
- ``nearest_neighbour``: foreground = voxels whose k nearest embeddings in a
  support set (saved beside the checkpoint) are mostly mitochondrion, split as
  ``embedding_cluster`` splits it.

The two watershed decoders share ``seeded_watershed``, which floods only where flooding can change
the answer: a foreground component that holds fewer than two seeds is one
object as it stands, so only components with two or more seeds get a
watershed, inside their own bounding box (threads work on different
components at once). Mitochondria fill a few per cent of a volume and most
hold one seed, so most of the block is never flooded. All thresholds are in
heat units 0-255 (probability * 255).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cc3d
import fastremap
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed
from tqdm import tqdm

from emmito import embedding
from emmito.config import with_defaults
from emmito.io import EmmitoError, create_volume, open_volume, volume_attrs

# Foreground components, seeds and the watershed all use face (6-) connectivity.
# They must agree: with the watershed's connectivity=1, a 6-connected component
# with one seed is flooded whole from it, which is what lets the fast path skip
# the flood and still equal a whole-block watershed voxel for voxel.
CONNECTIVITY = 6

HEAT_CHANNEL = "foreground"
CONTOUR_CHANNEL = "contour"
DECODER_CHANNELS = {
    "heat_watershed": (HEAT_CHANNEL,),
    "bc_watershed": (HEAT_CHANNEL, CONTOUR_CHANNEL),
    # The embedding decoders also read every 'emb<i>' channel.
    "embedding_cluster": (HEAT_CHANNEL,),
    "nearest_neighbour": (HEAT_CHANNEL,),
}
EMBEDDING_DECODERS = ("embedding_cluster", "nearest_neighbour")

# Heat is blurred only in tiles of this size (y, x) near heat at the threshold.
# Speed only: the result is the same for any tile size.
BLUR_TILE = 8
# Slices per task when work is split over threads along z.
SLAB_SLICES = 8


def apply_lut(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Replace every label ``l`` in ``labels`` by ``lut[l]``, in place where possible.

    ``labels`` and ``lut`` are unsigned integer arrays of one dtype; returns the
    remapped array (``labels`` itself when it is contiguous).
    """
    lut = lut.astype(labels.dtype, copy=False)
    if not labels.flags.c_contiguous:
        labels = np.ascontiguousarray(labels)
    # fastremap's array remap takes 1-D input; reshape of a contiguous array is a view.
    fastremap.remap_from_array(labels.reshape(-1), lut, in_place=True)
    return labels


def keep_freed_memory() -> None:
    """Make this process keep the memory it frees for its next allocations (glibc only; else nothing).

    On virtual machines that hand freed memory back to the host, touching it
    again costs 0.3-3.5 s per GB; a block allocates several block-sized arrays
    in turn, so reusing freed pages saves about a third of segment's time.
    The process's peak memory is unchanged. Call it in a process that runs
    segmentation (the CLI does), not from library code.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: large arrays from the heap, which ...
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: ... is not trimmed back to the system
    except (OSError, AttributeError):
        pass


def worker_count(threads: int) -> int:
    """Threads to use: ``threads``, or every core this process may run on when 0."""
    if threads > 0:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _run(pool: ThreadPoolExecutor | None, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """``map`` over the pool when there is one (results in order), else in this thread."""
    return pool.map(function, items) if pool is not None else map(function, items)


def blur_radius(blur_sigma: float) -> int:
    """scipy's Gaussian kernel radius (truncate=4) for ``blur_sigma``, in voxels."""
    return int(4.0 * blur_sigma + 0.5)


@functools.cache
def gaussian_weights(blur_sigma: float) -> np.ndarray:
    """scipy's Gaussian kernel (float64, truncate=4), reversed for ``correlate1d`` as ``gaussian_filter1d`` does."""
    radius = blur_radius(blur_sigma)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (blur_sigma * blur_sigma) * x**2)
    return (weights / weights.sum())[::-1].copy()


def blur_yx(heat: np.ndarray, blur_sigma: float) -> np.ndarray:
    """``gaussian_filter(heat, sigma)`` over the last two axes (y, x) into float32, bit for bit.

    Calls scipy's ``correlate1d`` with a cached kernel: blocks make thousands
    of small calls, where ``gaussian_filter``'s own set-up costs as much as the filtering.
    """
    weights = gaussian_weights(blur_sigma)
    smooth = ndimage.correlate1d(heat, weights, axis=-2, output=np.float32, mode="reflect")
    return ndimage.correlate1d(smooth, weights, axis=-1, output=smooth, mode="reflect")


def blur_box(heat: np.ndarray, box: tuple[slice, slice, slice], blur_sigma: float) -> np.ndarray:
    """Per-slice (y, x) Gaussian blur of ``heat[box]``, float32, equal to blurring whole slices and cropping.

    Reads a halo of one kernel radius around the box (clipped at the slice
    edges, where scipy's reflection then happens at the same place).
    """
    radius = blur_radius(blur_sigma)
    (zs, ys, xs), (_, height, width) = box, heat.shape
    y0, x0 = max(ys.start - radius, 0), max(xs.start - radius, 0)
    y1, x1 = min(ys.stop + radius, height), min(xs.stop + radius, width)
    smooth = blur_yx(heat[zs, y0:y1, x0:x1], blur_sigma)
    return smooth[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]


def _blur_threshold_slice(
    heat_slice: np.ndarray, out: np.ndarray, blur_sigma: float, threshold: float, landscape: np.ndarray | None = None
) -> None:
    """Write ``blur(heat_slice) > threshold`` into ``out`` (bool (y, x), zeros on entry).

    With ``landscape`` (uint8 (y, x)), also write ``255 - rint(blur)`` into it
    wherever ``out`` may be True (elsewhere it is left as it was).
    """
    # A blurred voxel is a weighted mean (weights > 0, sum 1) of heat within one
    # kernel radius, so it can pass the threshold only if some heat there reaches it.
    radius = blur_radius(blur_sigma)
    tile = max(BLUR_TILE, radius)
    height, width = heat_slice.shape
    tile_max = np.maximum.reduceat(
        np.maximum.reduceat(heat_slice, np.arange(0, height, tile), axis=0), np.arange(0, width, tile), axis=1
    )
    # >= rather than >: the float blur of a flat patch at the threshold may round just above it.
    active = tile_max >= threshold
    if not active.any():
        return
    active = ndimage.binary_dilation(active, structure=np.ones((3, 3), dtype=bool))
    groups = cc3d.connected_components(active, connectivity=8)
    for box in ndimage.find_objects(groups):
        y0, y1 = box[0].start * tile, min(box[0].stop * tile, height)
        x0, x1 = box[1].start * tile, min(box[1].stop * tile, width)
        hy0, hy1 = max(y0 - radius, 0), min(y1 + radius, height)
        hx0, hx1 = max(x0 - radius, 0), min(x1 + radius, width)
        smooth = blur_yx(heat_slice[hy0:hy1, hx0:hx1], blur_sigma)
        tile_smooth = smooth[y0 - hy0 : y1 - hy0, x0 - hx0 : x1 - hx0]
        np.greater(tile_smooth, threshold, out=out[y0:y1, x0:x1])
        if landscape is not None:
            np.subtract(255, np.rint(tile_smooth, out=tile_smooth), out=landscape[y0:y1, x0:x1], casting="unsafe")


def blur_and_threshold(
    heat: np.ndarray,
    blur_sigma: float,
    foreground_threshold: float,
    pool: ThreadPoolExecutor | None = None,
    landscape: np.ndarray | None = None,
) -> np.ndarray:
    """Foreground mask: each slice of ``heat`` (uint8 (z, y, x), 0-255) blurred in y and x, above the threshold.

    Returns bool (z, y, x). The threshold applies to the unrounded float32
    blur, so it means what the config says. The blur is computed only near heat
    that reaches the threshold (elsewhere it cannot pass it), one slice at a
    time, slices spread over ``pool``'s threads. With ``landscape`` (uint8
    (z, y, x)), the watershed landscape ``255 - rint(blur)`` is written into it
    at least at every foreground voxel, from the same blur.
    """
    if blur_sigma <= 0:
        if landscape is not None:
            np.subtract(255, heat, out=landscape)
        return heat > foreground_threshold
    foreground = np.zeros(heat.shape, dtype=bool)

    def blur_slab(z_start: int) -> None:
        for z in range(z_start, min(z_start + SLAB_SLICES, heat.shape[0])):
            _blur_threshold_slice(
                heat[z], foreground[z], blur_sigma, foreground_threshold, None if landscape is None else landscape[z]
            )

    for _ in _run(pool, blur_slab, range(0, heat.shape[0], SLAB_SLICES)):
        pass
    return foreground


try:
    # The flooding kernel of skimage's watershed, called directly (same
    # signature since skimage 0.19): the public function converts, pads and
    # copies the whole box six times around it, which took longer than the flood.
    from skimage.segmentation._watershed_cy import watershed_raveled as _watershed_raveled
except ImportError:  # a skimage that moved it: the public function gives the same answer
    _watershed_raveled = None


def flood_box(
    landscape: np.ndarray, inside: np.ndarray, marker_coordinates: tuple[np.ndarray, ...], marker_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded watershed (face connectivity) of ``landscape`` (uint8 (z, y, x), low = basin core) inside ``inside``.

    ``inside``: bool, same shape; ``marker_coordinates``: (z, y, x) index arrays
    of the seed voxels (all inside), ``marker_ids``: their ids (> 0). Returns
    (regions, inside): int32 (z, y, x) seed id of each inside voxel (0
    elsewhere) and a bool array equal to ``inside``. Equals
    ``skimage.segmentation.watershed(landscape, markers, mask=inside, connectivity=1)``.
    """
    if _watershed_raveled is None:
        markers = np.zeros(inside.shape, dtype=np.int32)
        markers[marker_coordinates] = marker_ids
        return watershed(landscape, markers, mask=inside, connectivity=1), inside
    # A margin of mask 0 lets the kernel step to neighbours without bounds checks.
    padded = tuple(n + 2 for n in inside.shape)
    core = (slice(1, -1),) * 3
    mask = np.zeros(padded, dtype=np.int8)
    mask[core] = inside
    # The kernel reads the landscape only where the mask is set.
    image = np.empty(padded, dtype=np.float64)
    image[core] = landscape
    output = np.zeros(padded, dtype=np.int32)
    locations = np.ravel_multi_index(tuple(c + 1 for c in marker_coordinates), padded).astype(np.intp)
    output.reshape(-1)[locations] = marker_ids
    row, plane = padded[2], padded[1] * padded[2]
    # The order skimage uses for connectivity 1; it decides ties between equal-priority voxels.
    neighbours = np.array([-plane, -row, -1, 1, row, plane], dtype=np.intp)
    strides = np.array([plane, row, 1], dtype=np.intp)
    _watershed_raveled(
        image.reshape(-1), locations, neighbours, mask.reshape(-1), strides, 0.0, output.reshape(-1), False
    )
    return output[core], mask[core].view(bool)


def _connected(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, count = cc3d.connected_components(mask, connectivity=CONNECTIVITY, return_N=True, out_dtype=np.uint32)
    return labels, int(count)


def _bounding_boxes(
    voxels: np.ndarray, component_of_voxel: np.ndarray, components: np.ndarray, shape: tuple[int, int, int]
) -> dict[int, tuple[slice, slice, slice]]:
    """Bounding boxes of ``components`` from the flat indices ``voxels`` and their component ids."""
    if len(components) == 0:
        return {}
    chosen = np.zeros(int(component_of_voxel.max()) + 1, dtype=bool)
    chosen[components] = True
    wanted = chosen[component_of_voxel]
    ids = component_of_voxel[wanted]
    # A stable sort of integers is a radix sort: it groups the voxels by component cheaply.
    order = np.argsort(ids, kind="stable")
    coordinates = np.unravel_index(voxels[wanted][order], shape)
    starts = np.searchsorted(ids[order], components)
    lows = [np.minimum.reduceat(c, starts) for c in coordinates]
    highs = [np.maximum.reduceat(c, starts) for c in coordinates]
    return {
        int(component): tuple(slice(int(low[i]), int(high[i]) + 1) for low, high in zip(lows, highs))
        for i, component in enumerate(components.tolist())
    }


def seeded_watershed(
    landscape: Callable[[tuple[slice, slice, slice]], np.ndarray],
    foreground: np.ndarray,
    seed_mask: np.ndarray,
    min_seed_size: int,
    min_size: int,
    pool: ThreadPoolExecutor | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Objects of a block: seeded watershed inside each foreground component, small ones removed.

    ``foreground``, ``seed_mask``: bool (z, y, x); seeds are the 6-connected
    components of ``seed_mask & foreground`` of at least ``min_seed_size``
    voxels (``seed_mask`` is and-ed with ``foreground`` in place, to spare a
    block-sized copy). ``landscape(box)`` returns the image to flood (uint8, low = basin
    core) over a (z, y, x) box. A component with two or more seeds is split by
    a watershed from them; one with fewer stays one object (a faint
    mitochondrion without a confident core is still one). Objects below
    ``min_size`` voxels are removed. Returns uint32 (z, y, x) ids consecutive
    from 1, 0 = background; equal to one skimage watershed over the whole
    block (connectivity 1, mask = foreground) whose unseeded components are
    added as objects, up to how ties on flat plateaus of the landscape are
    broken (that depends on the order a watershed visits voxels in).
    """
    seed_mask &= foreground
    # The two labellings are independent: run them at once when there are threads.
    if pool is not None:
        seed_future = pool.submit(_connected, seed_mask)
        labels, n_components = _connected(foreground)
        seed_labels, n_seeds = seed_future.result()
    else:
        labels, n_components = _connected(foreground)
        seed_labels, n_seeds = _connected(seed_mask)

    # Foreground is a few per cent of the block and seeds fewer still: the
    # statistics are taken over their voxels' flat indices, not the block.
    foreground_voxels = np.flatnonzero(foreground)
    component_of_voxel = labels.reshape(-1)[foreground_voxels]
    seed_voxels = np.flatnonzero(seed_mask)
    seed_of_voxel = seed_labels.reshape(-1)[seed_voxels]
    del seed_labels
    seed_sizes = np.bincount(seed_of_voxel, minlength=n_seeds + 1)
    component_of_seed = np.zeros(n_seeds + 1, dtype=np.int64)
    component_of_seed[seed_of_voxel] = labels.reshape(-1)[seed_voxels]
    big_seed = seed_sizes >= max(1, min_seed_size)
    big_seed[0] = False
    seeds_per_component = np.bincount(component_of_seed[big_seed], minlength=n_components + 1)
    multi_seed = np.flatnonzero(seeds_per_component >= 2)
    # The markers of each flood, from the seed voxels, not from a scan of its box.
    flooded = np.zeros(n_components + 1, dtype=bool)
    flooded[multi_seed] = True
    is_marker = big_seed[seed_of_voxel]
    is_marker &= flooded[component_of_seed[seed_of_voxel]]
    marker_voxels, marker_seeds = seed_voxels[is_marker], seed_of_voxel[is_marker]
    order = np.argsort(component_of_seed[marker_seeds], kind="stable")
    marker_voxels, marker_seeds = marker_voxels[order], marker_seeds[order]
    marker_starts = np.searchsorted(component_of_seed[marker_seeds], multi_seed)
    marker_stops = np.append(marker_starts[1:], len(marker_seeds))
    marker_range = dict(zip(multi_seed.tolist(), zip(marker_starts.tolist(), marker_stops.tolist())))
    del seed_voxels, seed_of_voxel, is_marker, order

    # Region ids: components keep theirs; the watershed regions of component c
    # get n_components + seed id, so no two objects share an id.
    sizes = np.zeros(n_components + n_seeds + 1, dtype=np.int64)
    sizes[: n_components + 1] = np.bincount(component_of_voxel, minlength=n_components + 1)
    boxes = _bounding_boxes(foreground_voxels, component_of_voxel, multi_seed, labels.shape)
    del foreground_voxels, component_of_voxel

    def flood(component: int) -> tuple[int, np.ndarray]:
        box = boxes[component]
        box_labels = labels[box]  # a view: writing it writes the output
        start, stop = marker_range[component]
        markers = np.unravel_index(marker_voxels[start:stop], labels.shape)
        markers = tuple(m - s.start for m, s in zip(markers, box))
        regions, inside = flood_box(landscape(box), box_labels == component, markers, marker_seeds[start:stop])
        region_ids = regions[inside].astype(np.int64)
        # Threads write disjoint voxels (each its own component's); new ids are
        # above n_components, so they never read as another component.
        box_labels[inside] = region_ids + n_components
        return component, np.bincount(region_ids, minlength=n_seeds + 1)

    floods = _run(pool, flood, multi_seed.tolist())
    for component, region_sizes in tqdm(
        floods, total=len(multi_seed), desc="watershed", unit="object", file=sys.stderr, disable=not progress
    ):
        sizes[component] = 0
        sizes[n_components + 1 :] += region_sizes[1:]

    # Size filter and consecutive renumbering in one table lookup.
    keep = sizes >= max(1, min_size)
    keep[0] = False
    lut = np.zeros(len(sizes), dtype=np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return apply_lut(labels, lut)


def _check_heat(heat: np.ndarray, name: str) -> None:
    if heat.ndim != 3 or heat.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 (z, y, x) heatmap 0-255, got {heat.dtype} {heat.shape}")


def _thread_pool(threads: int) -> ThreadPoolExecutor | None:
    workers = worker_count(threads)
    return ThreadPoolExecutor(workers, thread_name_prefix="segment") if workers > 1 else None


def segment_block(heat: np.ndarray, params: dict[str, Any] | None = None, progress: bool = False) -> np.ndarray:
    """``heat_watershed``: instance labels of one heatmap block.

    ``heat``: uint8 (z, y, x), foreground probability * 255. ``params``: the
    ``segment`` config section (missing keys take the schema defaults).
    Returns uint32 (z, y, x) object ids, consecutive from 1, 0 = background.
    Sizes are in voxels at the heatmap's resolution.
    """
    _check_heat(heat, "heat")
    params = with_defaults("segment", params)
    sigma = params["blur_sigma"]
    pool = _thread_pool(params["threads"])
    try:
        # Inverted blurred heat, rounded to uint8 as the heat itself is, kept from
        # the thresholding pass so that the watershed boxes need no second blur.
        # Only pages near foreground are ever written (zeros from calloc cost nothing).
        landscape_map = np.zeros(heat.shape, dtype=np.uint8)
        foreground = blur_and_threshold(heat, sigma, params["foreground_threshold"], pool, landscape_map)
        seed_mask = heat > params["seed_threshold"]

        def landscape(box: tuple[slice, slice, slice]) -> np.ndarray:
            return landscape_map[box]

        return seeded_watershed(
            landscape, foreground, seed_mask, params["min_seed_size"], params["min_size"], pool, progress
        )
    finally:
        if pool is not None:
            pool.shutdown()


def bc_watershed(
    binary: np.ndarray, contour: np.ndarray, params: dict[str, Any] | None = None, progress: bool = False
) -> np.ndarray:
    """``bc_watershed``: instance labels from binary (foreground) and contour heatmaps.

    ``binary``, ``contour``: uint8 (z, y, x), probability * 255. Foreground is
    ``binary > bc_foreground``; seeds are the 6-connected components of
    ``(binary > bc_seed_foreground) & (contour < bc_seed_contour)`` with at
    least ``bc_min_seed_size`` voxels; the watershed floods the inverted binary
    map inside the foreground; objects below ``bc_min_size`` are removed.
    Returns uint32 (z, y, x) ids consecutive from 1.
    """
    _check_heat(binary, "binary")
    _check_heat(contour, "contour")
    if binary.shape != contour.shape:
        raise ValueError(f"binary {binary.shape} and contour {contour.shape} differ in shape")
    params = with_defaults("segment", params)
    pool = _thread_pool(params["threads"])
    try:
        foreground = binary > params["bc_foreground"]
        seed_mask = binary > params["bc_seed_foreground"]
        seed_mask &= contour < params["bc_seed_contour"]

        def landscape(box: tuple[slice, slice, slice]) -> np.ndarray:
            return 255 - binary[box]

        return seeded_watershed(
            landscape, foreground, seed_mask, params["bc_min_seed_size"], params["bc_min_size"], pool, progress
        )
    finally:
        if pool is not None:
            pool.shutdown()


def embedding_mask(heat: np.ndarray | None, shape: tuple[int, ...], params: dict[str, Any]) -> np.ndarray:
    """Voxels (bool (z, y, x)) whose embeddings an embedding decoder reads.

    ``embedding_cluster``: the foreground, ``heat > embedding_foreground``.
    ``nearest_neighbour``: the candidates, ``heat >= nnc_candidates`` (every
    voxel when that is 0 or there is no heat).
    """
    if params["decoder"] == "embedding_cluster":
        return heat > params["embedding_foreground"]
    if heat is None or params["nnc_candidates"] <= 0:
        return np.ones(shape, dtype=bool)
    return heat >= params["nnc_candidates"]


def decode_embedding_features(
    mask: np.ndarray,
    features: np.ndarray,
    params: dict[str, Any],
    support: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Instances from the embeddings ``features`` (float32 (N, E)) of ``mask``'s voxels (bool (z, y, x), C order).

    ``embedding_cluster``: ``mask`` is the foreground. ``nearest_neighbour``:
    ``mask`` holds the candidates, and those whose ``nnc_k`` nearest
    ``support`` embeddings (features (M, E), classes (M,), 0 = background)
    vote mitochondrion (any class > 0) with a share above ``nnc_threshold``
    are the foreground. The foreground is then split by
    ``embedding.cluster_foreground``. Returns uint32 (z, y, x) ids from 1.
    """
    params = with_defaults("segment", params)
    if params["decoder"] == "nearest_neighbour":
        if support is None:
            raise ValueError("the nearest_neighbour decoder needs a support set")
        support_features, support_classes = support
        if support_features.shape[1] != features.shape[1]:
            raise EmmitoError(
                f"segment.support_set has {support_features.shape[1]}-dimensional embeddings but the heatmap has "
                f"{features.shape[1]}: use the support.npz written with this model's checkpoint"
            )
        votes = embedding.nearest_neighbour_features(features, support_features, support_classes, params["nnc_k"])
        keep = votes[:, 1:].sum(1) > params["nnc_threshold"]
        foreground = np.zeros(mask.shape, dtype=bool)
        foreground[mask] = keep
        features = features[keep]
        mask = foreground
    return embedding.cluster_foreground(
        features,
        mask,
        params["embedding_bandwidth"],
        params["embedding_sample"],
        params["embedding_min_size"],
        progress=progress,
    )


def decode(
    channels: dict[str, np.ndarray],
    params: dict[str, Any] | None = None,
    progress: bool = False,
    support: tuple[np.ndarray, np.ndarray] | None = None,
    embedding_range: float = embedding.DEFAULT_EMBEDDING_RANGE,
) -> np.ndarray:
    """Instance labels from a block's heat channels ({name: uint8 (z, y, x)}) with ``segment.decoder``.

    The embedding decoders read the ``emb<i>`` channels (uint8, scaled by
    ``embedding_range``; see ``emmito.embedding``); ``nearest_neighbour`` also
    needs ``support`` (features, classes).
    """
    params = with_defaults("segment", params)
    decoder = params["decoder"]
    if decoder == "auto":
        decoder, heat_name = resolve_decoder(decoder, list(channels))
        channels = {HEAT_CHANNEL if name == heat_name else name: value for name, value in channels.items()}
    if decoder == "bc_watershed":
        return bc_watershed(channels[HEAT_CHANNEL], channels[CONTOUR_CHANNEL], params, progress)
    if decoder in EMBEDDING_DECODERS:
        names = list(channels)
        emb_names = [names[i] for i in embedding.embedding_channels(names)]
        if not emb_names:
            raise ValueError(f"segment.decoder {decoder} needs emb0.. channels, got {names}")
        heat = channels.get(HEAT_CHANNEL)
        shape = channels[emb_names[0]].shape
        mask = embedding_mask(heat, shape, params)
        features = np.stack(
            [embedding.heat_to_embeddings(channels[name][mask], embedding_range) for name in emb_names], axis=1
        )
        return decode_embedding_features(mask, features, params, support, progress)
    return segment_block(channels[HEAT_CHANNEL], params, progress)


def support_set_path(params: dict[str, Any]) -> str:
    """The support set the nearest_neighbour decoder reads: segment.support_set, else beside model.name's checkpoint."""
    chosen = params["segment"].get("support_set", "")
    if chosen:
        return chosen
    name = params.get("model", {}).get("name", "model")
    return f"results/model/{name}/support.npz"


def heat_channel(path: Any, attrs: dict[str, Any], shape: tuple[int, ...], name: str = HEAT_CHANNEL, decoder: str = "heat_watershed") -> int:
    """Index of channel ``name`` in a heat file's (channel, z, y, x) dataset."""
    if len(shape) != 4:
        raise EmmitoError(
            f"{path}: heatmap has shape {shape}, not (channel, z, y, x): rerun emmito merge to rewrite it"
        )
    channels = attrs.get("channels")
    if channels is None:  # a one-channel heatmap from elsewhere: take it as the foreground
        channels = [HEAT_CHANNEL] if shape[0] == 1 else []
    channels = [str(c) for c in channels]
    if name not in channels:
        need = " and ".join(f"'{c}'" for c in DECODER_CHANNELS[decoder])
        raise EmmitoError(
            f"{path}: no '{name}' channel (attr channels = {channels}); segment.decoder {decoder} needs {need}: "
            + ("use segment.decoder heat_watershed or infer with a binary + contour model" if decoder == "bc_watershed"
               else "rerun infer with a model that predicts the foreground")
        )
    return channels.index(name)


def _embedding_run(args: argparse.Namespace, params: dict[str, Any], ds: Any, attrs: dict[str, Any]) -> np.ndarray:
    """The embedding decoders on an open heat dataset, reading one channel at a time.

    Memory: one channel of the block (uint8), the mask, and the float32
    embeddings of the masked voxels only (a few per cent of the block).
    """
    section = params["segment"]
    decoder = section["decoder"]
    channel_names = [str(c) for c in attrs.get("channels", [])]
    emb_indices = embedding.embedding_channels(channel_names)
    if not emb_indices:
        raise EmmitoError(
            f"{args.heat}: no emb0.. channels (attr channels = {channel_names}); segment.decoder {decoder} needs an "
            "embedding model: infer with model.head embedding, or pick segment.decoder heat_watershed"
        )
    support = None
    if decoder == "nearest_neighbour":
        support = embedding.load_support_set(support_set_path(params))
    if decoder == "embedding_cluster" or section["nnc_candidates"] > 0:
        heat = ds[heat_channel(args.heat, attrs, ds.shape, HEAT_CHANNEL, decoder)]
    else:
        heat = None
    mask = embedding_mask(heat, tuple(ds.shape[1:]), section)
    del heat
    embedding_range = float(attrs.get("embedding_range", embedding.DEFAULT_EMBEDDING_RANGE))
    features = np.empty((int(mask.sum()), len(emb_indices)), dtype=np.float32)
    for column, index in enumerate(emb_indices):
        features[:, column] = embedding.heat_to_embeddings(ds[index][mask], embedding_range)
    return decode_embedding_features(mask, features, section, support, progress=True)


def resolve_decoder(decoder: str, channels: list[str] | None) -> tuple[str, str]:
    """The decoder to run and the name of the channel that holds the foreground heat.

    ``auto`` picks the decoder that fits what the model predicted (the heat file's
    ``channels``): foreground + contour -> bc_watershed; skeleton_distance ->
    heat_watershed on that channel; foreground -> heat_watershed.
    """
    names = [str(c) for c in (channels if channels is not None else [HEAT_CHANNEL])]
    if decoder != "auto":
        return decoder, HEAT_CHANNEL
    if CONTOUR_CHANNEL in names and HEAT_CHANNEL in names:
        return "bc_watershed", HEAT_CHANNEL
    if HEAT_CHANNEL not in names and "skeleton_distance" in names:
        return "heat_watershed", "skeleton_distance"
    return "heat_watershed", HEAT_CHANNEL


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito segment HEAT OUT``: heat/block_{b}.h5 -> seg/block_{b}.h5 (block-local ids)."""
    keep_freed_memory()
    section = params["segment"]
    with open_volume(args.heat) as ds:
        attrs = volume_attrs(ds)
        if ds.dtype != np.uint8:
            raise EmmitoError(f"{args.heat}: heatmap is {ds.dtype}, not uint8 0-255: rerun emmito merge to rewrite it")
        decoder, heat_name = resolve_decoder(section["decoder"], attrs.get("channels"))
        if heat_name != HEAT_CHANNEL:  # skeleton_distance: its heat plays the foreground's part
            attrs["channels"] = [HEAT_CHANNEL if str(c) == heat_name else str(c) for c in attrs["channels"]]
        if decoder in EMBEDDING_DECODERS:
            if ds.ndim != 4:
                raise EmmitoError(
                    f"{args.heat}: heatmap has shape {ds.shape}, not (channel, z, y, x): rerun emmito merge to rewrite it"
                )
            labels = _embedding_run(args, params, ds, attrs)
        else:
            channels = {
                name: ds[heat_channel(args.heat, attrs, ds.shape, name, decoder)] for name in DECODER_CHANNELS[decoder]
            }
    if decoder not in EMBEDDING_DECODERS:
        labels = decode(channels, {**section, "decoder": decoder}, progress=True)
        del channels
    print(f"emmito segment: {int(labels.max())} objects in {labels.shape[0]} slices ({decoder})", file=sys.stderr)
    kept = {k: attrs[k] for k in ("volume_depth", "downsample_xy") if k in attrs}
    with create_volume(
        args.out, labels.shape, np.uint32, voxel_size=attrs["voxel_size"], offset=attrs["offset"], attrs=kept
    ) as out:
        out[...] = labels
