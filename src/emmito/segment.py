"""Instance segmentation of one heatmap block: foreground, seeds, seeded watershed, size filter.

Four decoders, selected by ``segment.decoder``:

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

Whatever the decoder, objects wider in some slice than ``max_area_2d`` pixels
are then dropped (off by default): a long dark process is as dark as a
mitochondrion, but no mitochondrion is that large in cross-section.

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
import cv2
import fastremap
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.segmentation import watershed
from tqdm import tqdm

from emmito import embedding
from emmito.config import support_set_path, with_defaults
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

# Slices per task when the per-slice work is split over threads along z.
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


@functools.cache
def gaussian_weights(blur_sigma: float) -> np.ndarray:
    """scipy's Gaussian kernel for ``blur_sigma`` (radius ``int(4 sigma + 0.5)``, truncate=4), float32, sums to 1."""
    radius = int(4.0 * blur_sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (blur_sigma * blur_sigma) * x**2)
    return (weights / weights.sum()).astype(np.float32)


def blur_slice(heat_slice: np.ndarray, blur_sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(heat_slice, blur_sigma)`` of a 2-D uint8 slice, in float32.

    OpenCV's separable filter with scipy's kernel and border (``reflect`` is
    OpenCV's ``BORDER_REFLECT``): SIMD, and it releases the GIL. It rounds in
    float32 where scipy sums in float64: the two differ by less than 1e-3 heat
    units, so a voxel changes side of a threshold only if it lies that close to it.
    """
    weights = gaussian_weights(blur_sigma)
    return cv2.sepFilter2D(
        np.ascontiguousarray(heat_slice), cv2.CV_32F, weights, weights, borderType=cv2.BORDER_REFLECT
    )


# One slice's foreground, from ``foreground_of(z)``: its mask (bool (y, x)),
# the flat indices of the mask's voxels in the slice (np.flatnonzero(mask)),
# and at those voxels the landscape to flood and whether each is a seed voxel.
SliceForeground = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def heat_foreground(
    heat: np.ndarray, blur_sigma: float, foreground_threshold: float, seed_threshold: float
) -> Callable[[int], SliceForeground]:
    """``foreground_of(z)`` for ``heat_watershed`` on ``heat`` (uint8 (z, y, x), 0-255).

    Slice z is blurred (``blur_slice``); its foreground is the float32 blur
    above ``foreground_threshold`` (unrounded, so the threshold means what the
    config says); the landscape is the inverted blur; seed voxels have heat
    above ``seed_threshold``.
    """

    def foreground_of(z: int) -> SliceForeground:
        smooth = blur_slice(heat[z], blur_sigma) if blur_sigma > 0 else heat[z].astype(np.float32)
        mask = smooth > foreground_threshold
        inside = np.flatnonzero(mask)
        return mask, inside, np.negative(smooth.reshape(-1)[inside]), heat[z].reshape(-1)[inside] > seed_threshold

    return foreground_of


def _touching(previous: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Distinct (previous, label) pairs, packed as previous << 32 | label, where ``previous`` > 0.

    ``previous``, ``labels``: the labels of the slice before and of this slice
    at this slice's foreground voxels; a pair is two 2-D components that touch
    face to face across the two slices.
    """
    touching = previous > 0
    keys = (previous[touching].astype(np.int64) << 32) | labels[touching]
    if len(keys) > 1:  # raster order makes long runs of one pair: drop repeats before sorting
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    return np.unique(keys)


def label_foreground(
    shape: tuple[int, int, int], foreground_of: Callable[[int], SliceForeground], pool: ThreadPoolExecutor | None = None
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """The 6-connected components of a foreground given slice by slice by ``foreground_of``.

    Returns ``(voxels, region, n_components, landscape, seeds)`` over the
    foreground voxels in raster order: their flat indices in ``shape``
    (int64), their component ids (uint32, 1..n_components, in the order of
    each component's first slice and there of OpenCV's 2-D labels), and the
    landscape and seed flags ``foreground_of`` gave.

    Each slice is labelled in 2-D (OpenCV, face connectivity), and components
    that touch across consecutive slices are joined by a graph's connected
    components: the same partition as cc3d's 6-connected labelling of the
    whole block, but slices spread over ``pool``'s threads (OpenCV and numpy
    release the GIL; cc3d does not) and nothing block-sized is allocated.
    """
    depth, plane = shape[0], shape[1] * shape[2]
    slices: list[Any] = [None] * depth
    pairs: list[np.ndarray | None] = [None] * depth

    def label_slab(z_start: int) -> None:
        previous = None
        for z in range(z_start, min(z_start + SLAB_SLICES, depth)):
            mask, inside, landscape, seeds = foreground_of(z)
            count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
            local = labels.reshape(-1)[inside]
            slices[z] = (inside, local, count - 1, landscape, seeds)
            if previous is not None:
                pairs[z] = _touching(previous.reshape(-1)[inside], local)
            previous = labels

    # Slices are split over the pool's threads; OpenCV's own threads inside
    # each call would only add overhead (and use cores beyond segment.threads).
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for _ in _run(pool, label_slab, range(0, depth, SLAB_SLICES)):
            pass
    finally:
        cv2.setNumThreads(opencv_threads)
    # Across slab boundaries, from the stored labels of the slice before.
    before = np.zeros(plane, dtype=np.int32)
    for z in range(SLAB_SLICES, depth, SLAB_SLICES):
        inside, local = slices[z - 1][:2]
        before[inside] = local
        pairs[z] = _touching(before[slices[z][0]], slices[z][1])
        before[inside] = 0

    # Graph nodes: the 2-D components, slice after slice (node of label l of slice z: offsets[z] + l - 1).
    offsets = np.zeros(depth + 1, dtype=np.int64)
    np.cumsum([entry[2] for entry in slices], out=offsets[1:])
    n_nodes = int(offsets[-1])
    edges = [
        (offsets[z - 1] - 1 + (keys >> 32), offsets[z] - 1 + (keys & 0xFFFFFFFF))
        for z, keys in enumerate(pairs)
        if keys is not None and len(keys)
    ]
    tails = np.concatenate([t for t, _ in edges]) if edges else np.zeros(0, np.int64)
    heads = np.concatenate([h for _, h in edges]) if edges else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(tails), dtype=np.int8), (tails, heads)), shape=(n_nodes, n_nodes))
    n_components, node_component = connected_components(graph, directed=False) if n_nodes else (0, np.zeros(0))
    # Components are numbered in the order of their first node.
    component_of_node = node_component.astype(np.uint32) + np.uint32(1)

    ends = np.zeros(depth + 1, dtype=np.int64)
    np.cumsum([len(entry[0]) for entry in slices], out=ends[1:])
    total = int(ends[-1])
    voxels = np.empty(total, dtype=np.int64)
    region = np.empty(total, dtype=np.uint32)
    landscape = np.empty(total, dtype=slices[0][3].dtype if depth else np.float32)
    seeds = np.empty(total, dtype=bool)

    def assemble_slab(z_start: int) -> None:
        for z in range(z_start, min(z_start + SLAB_SLICES, depth)):
            span = slice(ends[z], ends[z + 1])
            inside, local, _, slice_landscape, slice_seeds = slices[z]
            landscape[span] = slice_landscape
            seeds[span] = slice_seeds
            np.add(inside, z * plane, out=voxels[span])
            region[span] = component_of_node[local + (offsets[z] - 1)]
            slices[z] = None

    for _ in _run(pool, assemble_slab, range(0, depth, SLAB_SLICES)):
        pass
    return voxels, region, int(n_components), landscape, seeds


try:
    # The flooding kernel of skimage's watershed, called directly (same
    # signature since skimage 0.19): the public function converts, pads and
    # copies the whole box six times around it, which took longer than the flood.
    from skimage.segmentation._watershed_cy import watershed_raveled as _watershed_raveled
except ImportError:  # a skimage that moved it: the public function gives the same answer
    _watershed_raveled = None


def _box(coordinates: tuple[np.ndarray, ...]) -> tuple[tuple[int, int, int], np.ndarray]:
    """The voxels' bounding box with a margin of one voxel: (its shape, their flat indices in it)."""
    low = [int(c.min()) - 1 for c in coordinates]
    padded = tuple(int(c.max()) - lo + 2 for c, lo in zip(coordinates, low))
    local = (coordinates[0] - low[0]) * (padded[1] * padded[2])
    local += (coordinates[1] - low[1]) * padded[2]
    local += coordinates[2] - low[2]
    return padded, local


def _flood(padded: tuple[int, int, int], local: np.ndarray, landscape: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """``flood_voxels`` in the box ``padded`` whose margin holds none of the voxels at ``local``."""
    size = padded[0] * padded[1] * padded[2]
    if _watershed_raveled is None:
        image = np.zeros(size, dtype=np.float64)
        image[local] = landscape
        mask = np.zeros(size, dtype=bool)
        mask[local] = True
        marker_image = np.zeros(size, dtype=np.int32)
        marker_image[local] = markers
        flooded = watershed(
            image.reshape(padded), marker_image.reshape(padded), mask=mask.reshape(padded), connectivity=1
        )
        return flooded.reshape(-1)[local].astype(np.int32)
    # The margin (mask 0) lets the kernel step to neighbours without bounds checks.
    mask = np.zeros(size, dtype=np.int8)
    mask[local] = 1
    # The kernel reads the landscape only where the mask is set.
    image = np.empty(size, dtype=np.float64)
    image[local] = landscape
    output = np.zeros(size, dtype=np.int32)
    is_marker = markers > 0
    locations = local[is_marker]
    output[locations] = markers[is_marker]
    row, plane = padded[2], padded[1] * padded[2]
    # The order skimage uses for connectivity 1; it decides ties between equal-priority voxels.
    neighbours = np.array([-plane, -row, -1, 1, row, plane], dtype=np.intp)
    strides = np.array([plane, row, 1], dtype=np.intp)
    _watershed_raveled(image, locations.astype(np.intp, copy=False), neighbours, mask, strides, 0.0, output, False)
    return output[local]


def flood_voxels(coordinates: tuple[np.ndarray, ...], landscape: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Seeded watershed (face connectivity) over a set of voxels.

    ``coordinates``: (z, y, x) integer arrays of the voxels to flood (the
    mask), in raster order; ``landscape``: the image at each (low = basin
    core); ``markers``: the seed id (> 0) of each voxel that is a seed, 0
    elsewhere. Returns the id (int32) each voxel is flooded from, 0 where no
    seed reaches it. Equals ``skimage.segmentation.watershed(image,
    marker_image, mask=mask, connectivity=1)`` on the voxels' bounding box, at the voxels.
    """
    if len(landscape) == 0:
        return np.zeros(0, dtype=np.int32)
    padded, local = _box(coordinates)
    return _flood(padded, local, landscape, markers)


def seeded_watershed(
    shape: tuple[int, int, int],
    voxels: np.ndarray,
    region: np.ndarray,
    n_components: int,
    landscape: np.ndarray,
    seeds: np.ndarray,
    min_seed_size: int,
    min_size: int,
    pool: ThreadPoolExecutor | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Objects of a block: seeded watershed inside each foreground component, small ones removed.

    The foreground comes from ``label_foreground``: ``voxels`` the flat
    indices of its voxels in ``shape`` in raster order, ``region`` the
    6-connected component (1..``n_components``) of each, ``landscape`` the
    image to flood at each (low = basin core), ``seeds`` which are seed voxels.
    Seeds are the 6-connected components of the seed voxels with at least
    ``min_seed_size`` voxels. A component with two or more seeds is split by a
    watershed from them; one with fewer stays one object (a faint
    mitochondrion without a confident core is still one). Objects below
    ``min_size`` voxels are removed. Returns uint32 ``shape`` ids consecutive
    from 1, 0 = background; equal to one skimage watershed over the whole
    block (connectivity 1, mask = foreground) whose unseeded components are
    added as objects, up to how ties on flat plateaus of the landscape are
    broken (that depends on the order a watershed visits voxels in).

    Everything works on the foreground voxels (a few per cent of the block);
    only the result is block-sized. A seed lies inside one component, so
    seeds are labelled per component, in its bounding box, and only in
    components with enough seed voxels for two seeds. Components go to
    ``pool``'s threads. ``region`` is overwritten.
    """
    min_seed_size = max(1, min_seed_size)
    seed_voxels = np.bincount(region[seeds], minlength=n_components + 1)
    candidates = np.flatnonzero(seed_voxels >= 2 * min_seed_size)
    candidates = candidates[candidates > 0]

    # The voxels of each candidate, grouped by component and in raster order
    # within it: a stable sort by rank (of small integers, a radix sort). The
    # candidates hold most foreground voxels, so all are sorted, the others last.
    rank = np.full(n_components + 1, len(candidates), dtype=np.uint16 if len(candidates) < 2**16 else np.int64)
    rank[candidates] = np.arange(len(candidates))
    voxel_rank = rank[region]
    members = np.argsort(voxel_rank, kind="stable")
    starts = np.zeros(len(candidates) + 1, dtype=np.int64)
    np.cumsum(np.bincount(voxel_rank, minlength=len(candidates) + 1)[:-1], out=starts[1:])
    del voxel_rank

    def flood(index: int) -> None:
        picked = members[starts[index] : starts[index + 1]]
        coordinates = np.unravel_index(voxels[picked], shape)
        padded, local = _box(coordinates)
        is_seed = seeds[picked]
        seed_box = np.zeros(padded, dtype=bool)
        seed_box.reshape(-1)[local[is_seed]] = True
        seed_ids = cc3d.connected_components(seed_box, connectivity=CONNECTIVITY).reshape(-1)[local[is_seed]]
        big = np.bincount(seed_ids) >= min_seed_size
        big[0] = False
        if big.sum() < 2:
            return  # one object as it stands
        markers = np.zeros(len(picked), dtype=np.int32)
        markers[is_seed] = (np.cumsum(big) * big).astype(np.int32)[seed_ids]
        flooded = _flood(padded, local, landscape[picked], markers)
        # Region ids above n_components, unique across components: component
        # index holds at most (its voxels // min_seed_size) seeds, so the ranges
        # [base, base + seeds] of consecutive components never overlap. Threads
        # write disjoint voxels (each its own component's); every voxel of a
        # connected component that holds seeds is reached, so none gets 0.
        base = n_components + index + int(starts[index]) // min_seed_size
        region[picked] = flooded.astype(np.uint32) + np.uint32(base)

    # Largest first, so that threads finish together; the order changes nothing else.
    by_size = np.argsort(-np.diff(starts), kind="stable").tolist()
    for _ in tqdm(
        _run(pool, flood, by_size), total=len(by_size), desc="watershed", unit="object",
        file=sys.stderr, disable=not progress,
    ):
        pass

    # Size filter and consecutive renumbering in one table lookup, at the foreground voxels only.
    sizes = np.bincount(region, minlength=1)
    lut = embedding.keep_lut(sizes >= max(1, min_size))
    labels = np.zeros(shape, dtype=np.uint32)
    labels.reshape(-1)[voxels] = lut[region]
    return labels


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
    Sizes are in voxels at the heatmap's resolution. The watershed floods the
    inverted blurred heat (float32), as the original recipe does.
    """
    _check_heat(heat, "heat")
    params = with_defaults("segment", params)
    pool = _thread_pool(params["threads"])
    try:
        foreground_of = heat_foreground(
            heat, params["blur_sigma"], params["foreground_threshold"], params["seed_threshold"]
        )
        foreground = label_foreground(heat.shape, foreground_of, pool)
        return seeded_watershed(heat.shape, *foreground, params["min_seed_size"], params["min_size"], pool, progress)
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
        def foreground_of(z: int) -> SliceForeground:
            binary_slice = binary[z]
            mask = binary_slice > params["bc_foreground"]
            inside = np.flatnonzero(mask)
            at = binary_slice.reshape(-1)[inside]
            seeds = at > params["bc_seed_foreground"]
            seeds &= contour[z].reshape(-1)[inside] < params["bc_seed_contour"]
            return mask, inside, 255 - at, seeds

        foreground = label_foreground(binary.shape, foreground_of, pool)
        return seeded_watershed(
            binary.shape, *foreground, params["bc_min_seed_size"], params["bc_min_size"], pool, progress
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


def drop_wide_objects(labels: np.ndarray, max_area: int) -> np.ndarray:
    """Remove objects whose area in some slice exceeds ``max_area`` pixels; ids stay consecutive from 1.

    ``labels``: uint32 (z, y, x) ids consecutive from 1 (a decoder's output),
    changed in place and returned. ``max_area`` 0 keeps everything. One pass
    over the slices; memory: a few arrays of (objects + 1) entries.
    """
    count = int(labels.max()) if labels.size else 0
    if max_area <= 0 or count == 0:
        return labels
    widest = np.zeros(count + 1, dtype=np.int64)
    for plane in labels:
        np.maximum(widest, np.bincount(plane.reshape(-1), minlength=count + 1), out=widest)
    keep = widest <= max_area
    if keep[1:].all():
        return labels
    return apply_lut(labels, embedding.keep_lut(keep))


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
    needs ``support`` (features, classes). Every decoder's objects then pass
    ``drop_wide_objects`` with ``max_area_2d``.
    """
    params = with_defaults("segment", params)
    labels = _decode(channels, params, progress, support, embedding_range)
    return drop_wide_objects(labels, params["max_area_2d"])


def _decode(
    channels: dict[str, np.ndarray],
    params: dict[str, Any],
    progress: bool,
    support: tuple[np.ndarray, np.ndarray] | None,
    embedding_range: float,
) -> np.ndarray:
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
            labels = drop_wide_objects(_embedding_run(args, params, ds, attrs), section["max_area_2d"])
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
