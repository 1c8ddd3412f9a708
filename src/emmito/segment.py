"""Instance segmentation of one heatmap block: blur, threshold, seeds, watershed.

``segment_block`` is the original pipeline's recipe (per-slice Gaussian blur,
foreground threshold, seeds from a high threshold, seeded watershed on the
inverted heatmap, small objects removed), made fast by flooding only where
flooding can change the answer: a foreground component that holds fewer than
two seeds is one object as it stands, so only components with two or more
seeds get a watershed, inside their own bounding box. Mitochondria fill a few
per cent of a volume and most of them hold one seed, so most of the block is
never flooded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import cc3d
import fastremap
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed
from tqdm import tqdm

from emmito.config import with_defaults
from emmito.io import EmmitoError, create_volume, open_volume, volume_attrs

# Foreground components, seeds and the watershed all use face (6-) connectivity.
# They must agree: with the watershed's connectivity=1, a 6-connected component
# with one seed is flooded whole from it, which is what lets the fast path skip
# the flood and still equal a whole-block watershed voxel for voxel.
CONNECTIVITY = 6

HEAT_CHANNEL = "foreground"

# Heat is blurred only in tiles of this size (y, x) near heat at the threshold.
# Speed only: the result is the same for any tile size.
BLUR_TILE = 16


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


def blur_and_threshold(
    heat: np.ndarray, blur_sigma: float, foreground_threshold: float, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Blur each slice of ``heat`` (uint8 (z, y, x), 0-255) in y and x only, and threshold it.

    Returns the blurred heatmap rounded to uint8 (the watershed's landscape)
    and the foreground mask (bool), taken on the unrounded float32 blur so that
    the threshold means what the config says. The blur is computed only near
    heat that reaches the threshold; elsewhere the landscape is 0 and the mask
    False, which is what a full blur gives there for the mask (the landscape
    is only read inside the foreground). Float32 lives one tile group at a time.
    """
    if blur_sigma <= 0:
        return heat, heat > foreground_threshold
    # scipy's Gaussian kernel radius (truncate=4): a blurred voxel is a weighted
    # mean (weights > 0, sum 1) of heat within this radius, so it can pass the
    # threshold only if some heat within the radius reaches it.
    radius = int(4.0 * blur_sigma + 0.5)
    tile = max(BLUR_TILE, radius)
    depth, height, width = heat.shape
    tile_rows, tile_cols = np.arange(0, height, tile), np.arange(0, width, tile)
    blurred = np.zeros_like(heat)
    foreground = np.zeros(heat.shape, dtype=bool)
    for z in tqdm(range(depth), desc="blur", unit="slice", file=sys.stderr, disable=not progress):
        heat_slice = heat[z]
        tile_max = np.maximum.reduceat(np.maximum.reduceat(heat_slice, tile_rows, axis=0), tile_cols, axis=1)
        # >= rather than >: the float blur of a flat patch at the threshold may round just above it.
        active = tile_max >= foreground_threshold
        if not active.any():
            continue
        active = ndimage.binary_dilation(active, structure=np.ones((3, 3), dtype=bool))
        groups = cc3d.connected_components(active, connectivity=8)
        for box in ndimage.find_objects(groups):
            y0, y1 = box[0].start * tile, min(box[0].stop * tile, height)
            x0, x1 = box[1].start * tile, min(box[1].stop * tile, width)
            # A halo of one radius makes the inner values exactly the full-slice blur's.
            hy0, hy1 = max(y0 - radius, 0), min(y1 + radius, height)
            hx0, hx1 = max(x0 - radius, 0), min(x1 + radius, width)
            smooth = ndimage.gaussian_filter(heat_slice[hy0:hy1, hx0:hx1], blur_sigma, output=np.float32)
            inner = smooth[y0 - hy0 : y1 - hy0, x0 - hx0 : x1 - hx0]
            np.greater(inner, foreground_threshold, out=foreground[z, y0:y1, x0:x1])
            # A blur of 0..255 values stays inside 0..255, so rint never wraps.
            blurred[z, y0:y1, x0:x1] = np.rint(inner)
    return blurred, foreground


def find_seeds(heat: np.ndarray, foreground: np.ndarray, seed_threshold: float, min_seed_size: int) -> np.ndarray:
    """Seeds: 6-connected components of ``heat > seed_threshold`` inside ``foreground``.

    Returns unsigned integer (z, y, x) seed ids, 0 = no seed. Seeds smaller than
    ``min_seed_size`` voxels are set to 0, so the ids have gaps (renumbering
    would cost a pass over the block for nothing).
    """
    # A seed voxel outside the foreground (a lone bright voxel that the blur
    # pulled under the threshold) could never be flooded; the whole-block
    # watershed ignores it too (it multiplies markers by the mask).
    seed_mask = (heat > seed_threshold) & foreground
    seed_labels, n_seeds = cc3d.connected_components(seed_mask, connectivity=CONNECTIVITY, return_N=True)
    if n_seeds < np.iinfo(np.uint16).max and seed_labels.dtype != np.uint16:
        # Seeds rarely number 65535 in a block: 2 bytes a voxel less for the rest of the block's life.
        seed_labels = seed_labels.astype(np.uint16)
    if n_seeds and min_seed_size > 1:
        # Only seed voxels are touched: a few per cent of the block.
        ids = seed_labels[seed_mask]
        too_small = np.bincount(ids, minlength=n_seeds + 1) < min_seed_size
        if too_small[1:].any():
            ids[too_small[ids]] = 0
            seed_labels[seed_mask] = ids
    return seed_labels


def segment_block(heat: np.ndarray, params: dict[str, Any] | None = None, progress: bool = False) -> np.ndarray:
    """Instance labels of one heatmap block.

    ``heat``: uint8 (z, y, x), foreground probability * 255. ``params``: the
    ``segment`` config section (missing keys take the schema defaults).
    Returns uint32 (z, y, x) object ids, consecutive from 1, 0 = background.
    Sizes are in voxels at the heatmap's resolution.
    """
    if heat.ndim != 3 or heat.dtype != np.uint8:
        raise ValueError(f"segment_block takes a uint8 (z, y, x) heatmap, got {heat.dtype} {heat.shape}")
    params = with_defaults("segment", params)
    blurred, foreground = blur_and_threshold(heat, params["blur_sigma"], params["foreground_threshold"], progress)
    seed_labels = find_seeds(heat, foreground, params["seed_threshold"], params["min_seed_size"])

    # The foreground labels become the output in place: components with fewer
    # than two seeds keep their component id; the watershed regions of the
    # others get ids n_components + seed id, so no two objects share an id.
    labels, n_components = cc3d.connected_components(
        foreground, connectivity=CONNECTIVITY, return_N=True, out_dtype=np.uint32
    )
    # Counting over foreground voxels only is ~10x cheaper than over the block.
    component_sizes = np.bincount(labels[foreground], minlength=n_components + 1)
    del foreground
    seed_voxels = seed_labels != 0
    seed_ids = seed_labels[seed_voxels]
    n_seed_ids = int(seed_ids.max()) if len(seed_ids) else 0
    component_of_seed = np.zeros(n_seed_ids + 1, dtype=np.int64)
    component_of_seed[seed_ids] = labels[seed_voxels]
    del seed_voxels, seed_ids
    seeds_per_component = np.bincount(component_of_seed[1:], minlength=n_components + 1)
    seeds_per_component[0] = 0  # gaps in the seed ids map to component 0
    multi_seed = np.flatnonzero(seeds_per_component >= 2)

    sizes = np.zeros(n_components + n_seed_ids + 1, dtype=np.int64)
    sizes[: n_components + 1] = component_sizes
    boxes = ndimage.find_objects(labels) if len(multi_seed) else []
    for component in tqdm(multi_seed, desc="watershed", unit="object", file=sys.stderr, disable=not progress):
        box = boxes[component - 1]
        box_labels = labels[box]  # a view: writing it writes the output
        inside = box_labels == component
        markers = np.where(inside, seed_labels[box], 0)
        # Inverted blurred heatmap: basins are the confident cores; uint8 keeps
        # the landscape small (skimage converts only this box to float64).
        landscape = 255 - blurred[box]
        regions = watershed(landscape, markers, mask=inside, connectivity=1)
        region_ids = regions[inside].astype(np.int64)
        box_labels[inside] = region_ids + n_components
        sizes[component] = 0
        sizes[n_components + 1 :] += np.bincount(region_ids, minlength=n_seed_ids + 1)[1:]

    # A foreground component without any seed stays an object (when large
    # enough): a faint mitochondrion with no high-confidence core is still one.
    # Size filter and consecutive renumbering in one table lookup.
    keep = sizes >= max(1, params["min_size"])
    keep[0] = False
    lut = np.zeros(len(sizes), dtype=np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return apply_lut(labels, lut)


def heat_channel(path: Any, attrs: dict[str, Any], shape: tuple[int, ...], name: str = HEAT_CHANNEL) -> int:
    """Index of channel ``name`` in a heat file's (channel, z, y, x) dataset."""
    if len(shape) != 4:
        raise EmmitoError(
            f"{path}: heatmap has shape {shape}, not (channel, z, y, x): rerun emmito merge to rewrite it"
        )
    channels = attrs.get("channels")
    if channels is None:  # a one-channel heatmap from elsewhere: take it as the foreground
        channels = [name] if shape[0] == 1 else []
    channels = [str(c) for c in channels]
    if name not in channels:
        raise EmmitoError(f"{path}: no '{name}' channel (attr channels = {channels}): rerun infer with a binary model")
    return channels.index(name)


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito segment HEAT OUT``: heat/block_{b}.h5 -> seg/block_{b}.h5 (block-local ids)."""
    with open_volume(args.heat) as ds:
        attrs = volume_attrs(ds)
        if ds.dtype != np.uint8:
            raise EmmitoError(f"{args.heat}: heatmap is {ds.dtype}, not uint8 0-255: rerun emmito merge to rewrite it")
        channel = heat_channel(args.heat, attrs, ds.shape)
        heat = ds[channel]
    labels = segment_block(heat, params["segment"], progress=True)
    del heat
    print(f"emmito segment: {int(labels.max())} objects in {labels.shape[0]} slices", file=sys.stderr)
    kept = {k: attrs[k] for k in ("volume_depth", "downsample_xy") if k in attrs}
    with create_volume(
        args.out, labels.shape, np.uint32, voxel_size=attrs["voxel_size"], offset=attrs["offset"], attrs=kept
    ) as out:
        out[...] = labels
