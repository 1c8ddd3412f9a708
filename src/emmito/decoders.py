"""Decoders: instance labels from a block's heat channels, the compute that ``emmito segment`` wraps.

``decode`` is the one entry point: it takes the block's channels by name
(arrays, or lazy arrays such as h5py datasets that it reads only when the
decoder needs them) and a complete ``segment`` config section, and runs the
decoder that ``segment.decoder`` names:

- ``heat_watershed`` (the original pipeline's recipe) on a one-channel
  heatmap: per-slice Gaussian blur, foreground = blurred heat above a
  threshold, seeds = connected components of the heat above a higher one,
  watershed of the inverted blurred heat inside the foreground;
- ``bc_watershed`` (PyTorch Connectomics' decoder for binary + contour
  outputs): foreground = binary above a threshold, seeds = components of
  (binary high) and (contour low), watershed of the inverted binary map;
- ``embedding_cluster`` (an embedding head): foreground = the binary channel
  above a threshold, split into instances by mean-shift of the ``emb*``
  channels per foreground component (``cluster_foreground``);
- ``nearest_neighbour``: foreground = voxels whose k nearest embeddings in a
  support set (saved beside the checkpoint) are mostly mitochondrion, split as
  ``embedding_cluster`` splits it;
- ``auto``: the decoder that fits the channels (``resolve_decoder``).

Whatever the decoder, objects wider in some slice than ``max_area_2d`` pixels
are then dropped (off by default): a long dark process is as dark as a
mitochondrion, but no mitochondrion is that large in cross-section.

The two watershed decoders share ``seeded_watershed``, which floods only where
flooding can change the answer: a foreground component that holds fewer than
two seeds is one object as it stands, so only components with two or more
seeds get a watershed, inside their own bounding box (threads work on
different components at once). Mitochondria fill a few per cent of a volume
and most hold one seed, so most of the block is never flooded. All thresholds
are in heat units 0-255 (probability * 255).

Embedding clustering: per foreground component, a flat-kernel mean-shift on a
subsample, every voxel assigned to its nearest mode, then 6-connected
components of the result with a size filter (embeddings are trained to differ
only between objects in one training patch, so two far-apart objects may share
a mode; the connected components split them again). Nearest-neighbour
classification (NNC) labels each voxel by the classes of its ``k`` nearest
embeddings in a support set sampled from a labelled (training) volume.

Adding a decoder: a function ``(channels, params, progress, support,
embedding_range) -> uint32 labels`` in ``DECODERS``, its channels in
``DECODER_CHANNELS``, its name in the schema's ``segment.decoder`` enum.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cc3d
import cv2
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.segmentation import watershed
from tqdm import tqdm

from emmito import embedding
from emmito.io import EmmitoError
from emmito.labels import CONNECTIVITY, drop_wide_objects, keep_lut, relabel_components
from emmito.runtime import run_all, thread_pool

# Foreground components, seeds and the watershed all use face (6-) connectivity
# (CONNECTIVITY, from emmito.labels). They must agree: with the watershed's
# connectivity=1, a 6-connected component with one seed is flooded whole from
# it, which is what lets the fast path skip the flood and still equal a
# whole-block watershed voxel for voxel.

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

# Mean-shift starts per round (evenly spaced over the subsample): time is
# linear in them. A cluster that no start reaches is found by the next round,
# which runs on the points left far from every mode.
MEAN_SHIFT_STARTS = 256
MEAN_SHIFT_ROUNDS = 3
# Voxels whose distances to the support set are computed at a time: memory is
# about 4 * (chunk_voxels * support size) bytes (65536 x 4096 -> 1 GB).
NNC_CHUNK_VOXELS = 16384

# A support set: (features float32 (N, E), classes int64 (N,)).
SupportSet = tuple[np.ndarray, np.ndarray]


# ---- the one decode path -------------------------------------------------------------


def decode(
    channels: Mapping[str, Any],
    params: dict[str, Any],
    progress: bool = False,
    support: SupportSet | None = None,
    embedding_range: float = embedding.DEFAULT_EMBEDDING_RANGE,
) -> np.ndarray:
    """Instance labels (uint32 (z, y, x), ids consecutive from 1) of a block with ``params["decoder"]``.

    ``channels``: {name: uint8 (z, y, x) heat, 0-255}, arrays or lazy arrays
    (h5py datasets, anything with ``shape`` whose ``[...]`` reads it): a
    channel is read only when the decoder needs it, and the embedding
    decoders read one ``emb<i>`` channel at a time. ``params``: a complete
    ``segment`` config section (defaults filled, e.g. ``config.with_defaults``
    at the caller's boundary). The embedding decoders read the ``emb<i>``
    channels (scaled by ``embedding_range``; see ``emmito.embedding``);
    ``nearest_neighbour`` also needs ``support`` (features, classes). Every
    decoder's objects then pass ``drop_wide_objects`` with ``max_area_2d``.
    """
    decoder = params["decoder"]
    if decoder == "auto":
        decoder, heat_name = resolve_decoder(decoder, list(channels))
        channels = {HEAT_CHANNEL if name == heat_name else name: value for name, value in channels.items()}
    labels = DECODERS[decoder](channels, params, progress, support, embedding_range)
    return drop_wide_objects(labels, params["max_area_2d"])


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


def read_channel(channel: Any) -> np.ndarray:
    """A channel as an in-memory array: an array as it is, a lazy one (h5py dataset) read now."""
    return channel if isinstance(channel, np.ndarray) else np.asarray(channel[...])


def _decode_heat(
    channels: Mapping[str, Any], params: dict[str, Any], progress: bool, support: SupportSet | None, embedding_range: float
) -> np.ndarray:
    return segment_block(read_channel(channels[HEAT_CHANNEL]), params, progress)


def _decode_bc(
    channels: Mapping[str, Any], params: dict[str, Any], progress: bool, support: SupportSet | None, embedding_range: float
) -> np.ndarray:
    return bc_watershed(read_channel(channels[HEAT_CHANNEL]), read_channel(channels[CONTOUR_CHANNEL]), params, progress)


def _decode_embeddings(
    channels: Mapping[str, Any], params: dict[str, Any], progress: bool, support: SupportSet | None, embedding_range: float
) -> np.ndarray:
    """The embedding decoders, reading one channel at a time.

    Memory: one channel of the block (uint8), the mask, and the float32
    embeddings of the masked voxels only (a few per cent of the block).
    """
    names = list(channels)
    emb_names = [names[i] for i in embedding.embedding_channels(names)]
    if not emb_names:
        raise ValueError(f"segment.decoder {params['decoder']} needs emb0.. channels, got {names}")
    heat = channels.get(HEAT_CHANNEL)
    if heat is not None and (params["decoder"] == "embedding_cluster" or params["nnc_candidates"] > 0):
        heat = read_channel(heat)
    else:  # embedding_mask does not read it
        heat = None
    mask = embedding_mask(heat, tuple(channels[emb_names[0]].shape), params)
    del heat
    features = np.empty((int(mask.sum()), len(emb_names)), dtype=np.float32)
    for column, name in enumerate(emb_names):
        features[:, column] = embedding.heat_to_embeddings(read_channel(channels[name])[mask], embedding_range)
    return decode_embedding_features(mask, features, params, support, progress)


# Each decoder: (channels, params, progress, support, embedding_range) -> uint32 (z, y, x) labels.
DECODERS: dict[str, Callable[..., np.ndarray]] = {
    "heat_watershed": _decode_heat,
    "bc_watershed": _decode_bc,
    "embedding_cluster": _decode_embeddings,
    "nearest_neighbour": _decode_embeddings,
}


# ---- the watershed decoders ----------------------------------------------------------


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


def bc_foreground(
    binary: np.ndarray, contour: np.ndarray, foreground: float, seed_foreground: float, seed_contour: float
) -> Callable[[int], SliceForeground]:
    """``foreground_of(z)`` for ``bc_watershed``: foreground ``binary > foreground``, landscape ``255 - binary``,
    seed voxels ``binary > seed_foreground`` and ``contour < seed_contour``."""

    def foreground_of(z: int) -> SliceForeground:
        binary_slice = binary[z]
        mask = binary_slice > foreground
        inside = np.flatnonzero(mask)
        at = binary_slice.reshape(-1)[inside]
        seeds = at > seed_foreground
        seeds &= contour[z].reshape(-1)[inside] < seed_contour
        return mask, inside, 255 - at, seeds

    return foreground_of


@dataclass(frozen=True)
class Foreground:
    """The foreground of a block (from ``label_foreground``), over its voxels in raster order.

    ``voxels``: their flat indices in ``shape`` (int64); ``region``: their
    6-connected component ids (uint32, 1..``n_components``; ``seeded_watershed``
    overwrites it); ``landscape``: the image to flood at each (low = basin
    core); ``seeds``: which are seed voxels (bool).
    """

    shape: tuple[int, int, int]
    voxels: np.ndarray
    region: np.ndarray
    n_components: int
    landscape: np.ndarray
    seeds: np.ndarray


@dataclass
class _SliceLabels:
    """One slice's 2-D components: at its foreground voxels ``inside`` (flat indices in the slice), the
    OpenCV label (1..``count``) of each (``local``), and the landscape and seed flags ``foreground_of`` gave."""

    inside: np.ndarray
    local: np.ndarray
    count: int
    landscape: np.ndarray
    seeds: np.ndarray


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
) -> Foreground:
    """The 6-connected components of a foreground given slice by slice by ``foreground_of``.

    Returns the ``Foreground`` over the foreground voxels in raster order: their
    component ids are 1..n_components, in the order of each component's first
    slice and there of OpenCV's 2-D labels.

    Each slice is labelled in 2-D (OpenCV, face connectivity), and components
    that touch across consecutive slices are joined by a graph's connected
    components: the same partition as cc3d's 6-connected labelling of the
    whole block, but slices spread over ``pool``'s threads (OpenCV and numpy
    release the GIL; cc3d does not) and nothing block-sized is allocated.
    """
    slices, pairs = _label_slices(shape, foreground_of, pool)
    offsets, n_components, component_of_node = _join_slices(slices, pairs)
    return _assemble_foreground(shape, slices, offsets, n_components, component_of_node, pool)


def _label_slices(
    shape: tuple[int, int, int], foreground_of: Callable[[int], SliceForeground], pool: ThreadPoolExecutor | None
) -> tuple[list[_SliceLabels], list[np.ndarray | None]]:
    """Every slice's 2-D components, and per slice z > 0 the pairs of components touching slice z - 1 (``_touching``)."""
    depth, plane = shape[0], shape[1] * shape[2]
    slices: list[Any] = [None] * depth
    pairs: list[np.ndarray | None] = [None] * depth

    def label_slab(z_start: int) -> None:
        previous = None
        for z in range(z_start, min(z_start + SLAB_SLICES, depth)):
            mask, inside, landscape, seeds = foreground_of(z)
            count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
            local = labels.reshape(-1)[inside]
            slices[z] = _SliceLabels(inside, local, count - 1, landscape, seeds)
            if previous is not None:
                pairs[z] = _touching(previous.reshape(-1)[inside], local)
            previous = labels

    # Slices are split over the pool's threads; OpenCV's own threads inside
    # each call would only add overhead (and use cores beyond segment.threads).
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for _ in run_all(pool, label_slab, range(0, depth, SLAB_SLICES)):
            pass
    finally:
        cv2.setNumThreads(opencv_threads)
    # Across slab boundaries, from the stored labels of the slice before.
    before = np.zeros(plane, dtype=np.int32)
    for z in range(SLAB_SLICES, depth, SLAB_SLICES):
        inside, local = slices[z - 1].inside, slices[z - 1].local
        before[inside] = local
        pairs[z] = _touching(before[slices[z].inside], slices[z].local)
        before[inside] = 0
    return slices, pairs


def _join_slices(slices: list[_SliceLabels], pairs: list[np.ndarray | None]) -> tuple[np.ndarray, int, np.ndarray]:
    """(offsets, n_components, component_of_node): the 3-D components that join the slices' 2-D ones.

    Graph nodes are the 2-D components, slice after slice (the node of label l
    of slice z is ``offsets[z] + l - 1``); ``component_of_node`` (uint32,
    1..n_components) numbers components in the order of their first node.
    """
    depth = len(slices)
    offsets = np.zeros(depth + 1, dtype=np.int64)
    np.cumsum([entry.count for entry in slices], out=offsets[1:])
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
    return offsets, int(n_components), component_of_node


def _assemble_foreground(
    shape: tuple[int, int, int],
    slices: list[Any],
    offsets: np.ndarray,
    n_components: int,
    component_of_node: np.ndarray,
    pool: ThreadPoolExecutor | None,
) -> Foreground:
    """The slices' voxels, components, landscape and seeds in one raster-order ``Foreground``; ``slices`` is emptied."""
    depth, plane = shape[0], shape[1] * shape[2]
    ends = np.zeros(depth + 1, dtype=np.int64)
    np.cumsum([len(entry.inside) for entry in slices], out=ends[1:])
    total = int(ends[-1])
    voxels = np.empty(total, dtype=np.int64)
    region = np.empty(total, dtype=np.uint32)
    landscape = np.empty(total, dtype=slices[0].landscape.dtype if depth else np.float32)
    seeds = np.empty(total, dtype=bool)

    def assemble_slab(z_start: int) -> None:
        for z in range(z_start, min(z_start + SLAB_SLICES, depth)):
            span = slice(ends[z], ends[z + 1])
            entry = slices[z]
            landscape[span] = entry.landscape
            seeds[span] = entry.seeds
            np.add(entry.inside, z * plane, out=voxels[span])
            region[span] = component_of_node[entry.local + (offsets[z] - 1)]
            slices[z] = None

    for _ in run_all(pool, assemble_slab, range(0, depth, SLAB_SLICES)):
        pass
    return Foreground(tuple(shape), voxels, region, n_components, landscape, seeds)


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
    foreground: Foreground,
    min_seed_size: int,
    min_size: int,
    pool: ThreadPoolExecutor | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Objects of a block: seeded watershed inside each foreground component, small ones removed.

    The foreground comes from ``label_foreground``. Seeds are the 6-connected
    components of the seed voxels with at least ``min_seed_size`` voxels. A
    component with two or more seeds is split by a watershed from them; one
    with fewer stays one object (a faint mitochondrion without a confident
    core is still one). Objects below ``min_size`` voxels are removed.
    Returns uint32 ``foreground.shape`` ids consecutive from 1, 0 =
    background; equal to one skimage watershed over the whole block
    (connectivity 1, mask = foreground) whose unseeded components are added
    as objects, up to how ties on flat plateaus of the landscape are broken
    (that depends on the order a watershed visits voxels in).

    Everything works on the foreground voxels (a few per cent of the block);
    only the result is block-sized. A seed lies inside one component, so
    seeds are labelled per component, in its bounding box, and only in
    components with enough seed voxels for two seeds. Components go to
    ``pool``'s threads. ``foreground.region`` is overwritten.
    """
    min_seed_size = max(1, min_seed_size)
    members, starts = _candidate_members(foreground, min_seed_size)
    flood = functools.partial(_flood_component, foreground, members, starts, min_seed_size)
    # Largest first, so that threads finish together; the order changes nothing else.
    by_size = np.argsort(-np.diff(starts), kind="stable").tolist()
    for _ in tqdm(
        run_all(pool, flood, by_size), total=len(by_size), desc="watershed", unit="object",
        file=sys.stderr, disable=not progress,
    ):
        pass
    return _sized_objects(foreground, min_size)


def _candidate_members(foreground: Foreground, min_seed_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(members, starts): the components with seed voxels for two seeds, and their voxels.

    ``members[starts[i] : starts[i + 1]]`` are the indices (into the
    foreground's voxels) of candidate i's voxels, in raster order.
    """
    region, n_components = foreground.region, foreground.n_components
    seed_voxels = np.bincount(region[foreground.seeds], minlength=n_components + 1)
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
    return members, starts


def _flood_component(
    foreground: Foreground, members: np.ndarray, starts: np.ndarray, min_seed_size: int, index: int
) -> None:
    """Split candidate ``index`` by a watershed from its seeds, writing new ids into ``foreground.region``."""
    picked = members[starts[index] : starts[index + 1]]
    coordinates = np.unravel_index(foreground.voxels[picked], foreground.shape)
    padded, local = _box(coordinates)
    is_seed = foreground.seeds[picked]
    seed_box = np.zeros(padded, dtype=bool)
    seed_box.reshape(-1)[local[is_seed]] = True
    seed_ids = cc3d.connected_components(seed_box, connectivity=CONNECTIVITY).reshape(-1)[local[is_seed]]
    big = np.bincount(seed_ids) >= min_seed_size
    big[0] = False
    if big.sum() < 2:
        return  # one object as it stands
    markers = np.zeros(len(picked), dtype=np.int32)
    markers[is_seed] = (np.cumsum(big) * big).astype(np.int32)[seed_ids]
    flooded = _flood(padded, local, foreground.landscape[picked], markers)
    # Region ids above n_components, unique across components: component
    # index holds at most (its voxels // min_seed_size) seeds, so the ranges
    # [base, base + seeds] of consecutive components never overlap. Threads
    # write disjoint voxels (each its own component's); every voxel of a
    # connected component that holds seeds is reached, so none gets 0.
    base = foreground.n_components + index + int(starts[index]) // min_seed_size
    foreground.region[picked] = flooded.astype(np.uint32) + np.uint32(base)


def _sized_objects(foreground: Foreground, min_size: int) -> np.ndarray:
    """The block's labels: size filter and consecutive renumbering in one table lookup, at the foreground voxels only."""
    sizes = np.bincount(foreground.region, minlength=1)
    lut = keep_lut(sizes >= max(1, min_size))
    labels = np.zeros(foreground.shape, dtype=np.uint32)
    labels.reshape(-1)[foreground.voxels] = lut[foreground.region]
    return labels


def _check_heat(heat: np.ndarray, name: str) -> None:
    if heat.ndim != 3 or heat.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 (z, y, x) heatmap 0-255, got {heat.dtype} {heat.shape}")


def segment_block(heat: np.ndarray, params: dict[str, Any], progress: bool = False) -> np.ndarray:
    """``heat_watershed``: instance labels of one heatmap block.

    ``heat``: uint8 (z, y, x), foreground probability * 255. ``params``: a
    complete ``segment`` config section (defaults filled). Returns uint32
    (z, y, x) object ids, consecutive from 1, 0 = background. Sizes are in
    voxels at the heatmap's resolution. The watershed floods the inverted
    blurred heat (float32), as the original recipe does.
    """
    _check_heat(heat, "heat")
    with thread_pool(params["threads"], "segment") as pool:
        foreground_of = heat_foreground(
            heat, params["blur_sigma"], params["foreground_threshold"], params["seed_threshold"]
        )
        foreground = label_foreground(heat.shape, foreground_of, pool)
        return seeded_watershed(foreground, params["min_seed_size"], params["min_size"], pool, progress)


def bc_watershed(binary: np.ndarray, contour: np.ndarray, params: dict[str, Any], progress: bool = False) -> np.ndarray:
    """``bc_watershed``: instance labels from binary (foreground) and contour heatmaps.

    ``binary``, ``contour``: uint8 (z, y, x), probability * 255; ``params``: a
    complete ``segment`` section. Foreground is ``binary > bc_foreground``;
    seeds are the 6-connected components of ``(binary > bc_seed_foreground) &
    (contour < bc_seed_contour)`` with at least ``bc_min_seed_size`` voxels;
    the watershed floods the inverted binary map inside the foreground;
    objects below ``bc_min_size`` are removed. Returns uint32 (z, y, x) ids
    consecutive from 1.
    """
    _check_heat(binary, "binary")
    _check_heat(contour, "contour")
    if binary.shape != contour.shape:
        raise ValueError(f"binary {binary.shape} and contour {contour.shape} differ in shape")
    with thread_pool(params["threads"], "segment") as pool:
        foreground_of = bc_foreground(
            binary, contour, params["bc_foreground"], params["bc_seed_foreground"], params["bc_seed_contour"]
        )
        foreground = label_foreground(binary.shape, foreground_of, pool)
        return seeded_watershed(foreground, params["bc_min_seed_size"], params["bc_min_size"], pool, progress)


# ---- the embedding decoders ----------------------------------------------------------


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
    support: SupportSet | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Instances from the embeddings ``features`` (float32 (N, E)) of ``mask``'s voxels (bool (z, y, x), C order).

    ``params``: a complete ``segment`` section. ``embedding_cluster``:
    ``mask`` is the foreground. ``nearest_neighbour``: ``mask`` holds the
    candidates, and those whose ``nnc_k`` nearest ``support`` embeddings
    (features (M, E), classes (M,), 0 = background) vote mitochondrion (any
    class > 0) with a share above ``nnc_threshold`` are the foreground. The
    foreground is then split by ``cluster_foreground``. Returns uint32
    (z, y, x) ids from 1.
    """
    if params["decoder"] == "nearest_neighbour":
        if support is None:
            raise ValueError("the nearest_neighbour decoder needs a support set")
        support_features, support_classes = support
        if support_features.shape[1] != features.shape[1]:
            raise EmmitoError(
                f"segment.support_set has {support_features.shape[1]}-dimensional embeddings but the heatmap has "
                f"{features.shape[1]}: use the support.npz written with this model's checkpoint"
            )
        votes = nearest_neighbour_features(features, support_features, support_classes, params["nnc_k"])
        keep = votes[:, 1:].sum(1) > params["nnc_threshold"]
        foreground = np.zeros(mask.shape, dtype=bool)
        foreground[mask] = keep
        features = features[keep]
        mask = foreground
    return cluster_foreground(
        features,
        mask,
        params["embedding_bandwidth"],
        params["embedding_sample"],
        params["embedding_min_size"],
        progress=progress,
    )


# ---- clustering ------------------------------------------------------------------------


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) by one matrix product (cdist's exact path is several times slower)."""
    b_norms = b.pow(2).sum(1) if b_norms is None else b_norms
    return torch.addmm(a.pow(2).sum(1, keepdim=True) + b_norms[None], a, b.t(), alpha=-2.0).clamp_min_(0.0)


def mean_shift_modes(
    features: np.ndarray, bandwidth: float, starts: int | None = None, max_iterations: int = 50
) -> np.ndarray:
    """Modes of ``features`` (float32 (N, E)) by flat-kernel mean-shift from up to ``starts`` (default MEAN_SHIFT_STARTS) evenly spaced points.

    Each start moves to the mean of the points within ``bandwidth`` until the
    starts stop moving; a converged start within ``bandwidth`` of a mode with
    more points nearby joins it (modes taken by decreasing density, ties by
    index: deterministic). Returns float32 (modes, E), densest first.
    Time and memory grow as N x starts: pass a subsample (a few thousand points).
    """
    points = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    starts = MEAN_SHIFT_STARTS if starts is None else starts
    chosen = np.unique(np.linspace(0, len(points) - 1, min(starts, len(points))).round().astype(np.int64))
    moving = points[chosen].clone()
    radius = bandwidth * bandwidth
    point_norms = points.pow(2).sum(1)
    for _ in range(max_iterations):
        near = (_squared_distances(moving, points, point_norms) <= radius).to(torch.float32)
        moved = (near @ points) / near.sum(1, keepdim=True).clamp_min(1.0)
        shift = float((moved - moving).abs().max())
        moving = moved
        if shift < 1e-3 * bandwidth:
            break
    density = (_squared_distances(moving, points, point_norms) <= radius).sum(1).numpy()
    close = (_squared_distances(moving, moving) <= radius).numpy()
    order = np.lexsort((np.arange(len(moving)), -density))
    taken = np.zeros(len(moving), dtype=bool)
    modes = []
    for i in order.tolist():
        if not taken[i]:
            modes.append(i)
            taken |= close[i]
    return moving[modes].numpy()


def nearest_centre(features: np.ndarray, centres: np.ndarray, chunk_voxels: int = NNC_CHUNK_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """(index int64 (N,), distance float32 (N,)) of the nearest of ``centres`` (M, E) for each of ``features`` (N, E), in chunks."""
    centre_tensor = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float32))
    nearest = np.empty(len(features), dtype=np.int64)
    distance = np.empty(len(features), dtype=np.float32)
    for start in range(0, len(features), chunk_voxels):
        chunk = torch.from_numpy(np.ascontiguousarray(features[start : start + chunk_voxels], dtype=np.float32))
        best = torch.cdist(chunk, centre_tensor).min(1)
        nearest[start : start + len(chunk)] = best.indices.numpy()
        distance[start : start + len(chunk)] = best.values.numpy()
    return nearest, distance


def _subsample(count: int, sample: int, seed: int) -> np.ndarray:
    if count <= sample:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=sample, replace=False))


def cluster_features(
    features: np.ndarray, bandwidth: float, sample: int, seed: int = 0, min_points: int = 1
) -> np.ndarray:
    """Cluster ids (int64 (N,), 0..) of ``features`` (float32 (N, E)) by mean-shift on a subsample.

    Up to ``sample`` points (drawn with ``seed``: deterministic) find the
    modes; every point takes its nearest mode. Points left farther than
    ``bandwidth`` from every mode (a cluster no start reached), if at least
    ``min_points``, get a mean-shift of their own (up to MEAN_SHIFT_ROUNDS
    rounds). Points within ``bandwidth`` of their mean, but for fewer than
    ``min_points`` (too few to be an object of their own), are one cluster
    without a mean-shift: most foreground components are one mitochondrion.
    """
    if len(features) == 0:
        return np.zeros(0, dtype=np.int64)
    centre = features.mean(0, dtype=np.float64).astype(np.float32)
    far = np.count_nonzero(((features - centre) ** 2).sum(1) > bandwidth * bandwidth)
    if far < max(1, min_points):
        return np.zeros(len(features), dtype=np.int64)
    modes = mean_shift_modes(features[_subsample(len(features), sample, seed)], bandwidth)
    nearest, distance = nearest_centre(features, modes)
    for _ in range(MEAN_SHIFT_ROUNDS - 1):
        stray = np.flatnonzero(distance > bandwidth)
        if len(stray) < max(1, min_points):
            break
        extra = mean_shift_modes(features[stray[_subsample(len(stray), sample, seed)]], bandwidth)
        modes = np.concatenate([modes, extra])
        nearest, distance = nearest_centre(features, modes)
    return nearest


def cluster_foreground(
    features: np.ndarray,
    foreground: np.ndarray,
    bandwidth: float,
    sample: int,
    min_size: int,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Instances from the embeddings of the foreground voxels.

    ``features``: float32 (N, E), the embeddings of ``foreground``'s voxels in
    C order (``embeddings[:, foreground].T``); ``foreground``: bool (z, y, x).
    Each 6-connected foreground component is clustered on its own (see
    ``cluster_features``), then ``relabel_components``. Returns uint32
    (z, y, x) ids consecutive from 1. Memory: the block's labels plus the
    foreground's features; only ``features`` of a component are clustered at a time.
    """
    components, count = cc3d.connected_components(foreground, connectivity=CONNECTIVITY, return_N=True, out_dtype=np.uint32)
    component_of_voxel = components[foreground]
    order = np.argsort(component_of_voxel, kind="stable")
    bounds = np.searchsorted(component_of_voxel[order], np.arange(1, count + 2))
    cluster_of_voxel = np.zeros(len(features), dtype=np.uint32)
    next_id = 1
    for component in tqdm(range(count), desc="clusters", unit="component", file=sys.stderr, disable=not progress):
        members = order[bounds[component] : bounds[component + 1]]
        clusters = cluster_features(features[members], bandwidth, sample, seed, min_points=min_size)
        cluster_of_voxel[members] = clusters.astype(np.uint32) + next_id
        next_id += int(clusters.max()) + 1 if len(clusters) else 0
    labels = np.zeros(foreground.shape, dtype=np.uint32)
    labels[foreground] = cluster_of_voxel
    return relabel_components(labels, min_size)


# ---- nearest-neighbour classification ------------------------------------------------


def nearest_neighbour_features(
    query: np.ndarray, features: np.ndarray, classes: np.ndarray, k: int, chunk_voxels: int = NNC_CHUNK_VOXELS
) -> np.ndarray:
    """Class probabilities float32 (N, C) of ``query`` (N, E): the share of each class among its ``k`` nearest ``features``.

    ``features`` (M, E) with ``classes`` int (M,) in 0..C-1. The neighbours
    are found exactly with a k-d tree over the support set, once per
    distinct query vector, ``chunk_voxels`` vectors at a time. Memory: a few
    arrays of N entries (the query's size), none of N x M.
    """
    n_classes = int(classes.max()) + 1 if len(classes) else 1
    k = max(1, min(k, len(features)))
    probabilities = np.zeros((len(query), n_classes), dtype=np.float32)
    if len(features) == 0:
        return probabilities
    # Embeddings read from a heat file are quantised to 8 bits: a block holds
    # far fewer distinct vectors than voxels, and each is classified once.
    query = np.ascontiguousarray(query, dtype=np.float32)
    rows = query.view(np.dtype((np.void, query.dtype.itemsize * query.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    distinct = query[first]
    tree = cKDTree(np.ascontiguousarray(features, dtype=np.float64))
    support_classes = np.asarray(classes, dtype=np.int64)
    distinct_probabilities = np.zeros((len(distinct), n_classes), dtype=np.float32)
    for start in range(0, len(distinct), chunk_voxels):
        chunk = distinct[start : start + chunk_voxels].astype(np.float64)
        nearest = tree.query(chunk, k=k)[1].reshape(len(chunk), k)
        votes = np.zeros((len(chunk), n_classes), dtype=np.float32)
        for column in range(k):  # k small adds: no (chunk, k, C) one-hot array
            votes[np.arange(len(chunk)), support_classes[nearest[:, column]]] += 1.0
        distinct_probabilities[start : start + len(chunk)] = votes / k
    probabilities[:] = distinct_probabilities[inverse.reshape(-1)]
    return probabilities


def nearest_neighbour_classify(
    embeddings: np.ndarray, features: np.ndarray, classes: np.ndarray, k: int, chunk_voxels: int = NNC_CHUNK_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """NNC of a block: (probabilities float32 (C, z, y, x), class map int64 (z, y, x)).

    ``embeddings``: float (E, z, y, x); ``features``/``classes``: the support
    set (``embedding.build_support_set``). A voxel's probability of class c is the share
    of c among its ``k`` nearest support embeddings (Euclidean); its class is
    the most frequent (ties to the lower class).
    """
    spatial = embeddings.shape[1:]
    query = embeddings.reshape(embeddings.shape[0], -1).T
    probabilities = nearest_neighbour_features(query, features, classes, k, chunk_voxels)
    class_map = probabilities.argmax(1).reshape(spatial)
    return np.ascontiguousarray(probabilities.T.reshape((-1, *spatial))), class_map
