"""Label tables: remapping ids through a lookup table, renumbering, and size filters on label volumes.

Shared by the decoders (consecutive ids after a filter), trace (block-local to
global ids) and anything else that rewrites ids. fastremap does the remapping
in place, so a block needs no second block-sized array.
"""

from __future__ import annotations

import cc3d
import fastremap
import numpy as np

# Components of a label volume use face (6-) connectivity everywhere in emmito.
CONNECTIVITY = 6


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


def keep_lut(keep: np.ndarray) -> np.ndarray:
    """uint32 lookup table mapping the ids where ``keep`` (bool, one entry per id, id 0 first) to 1, 2, ... in order, the rest to 0."""
    keep = np.asarray(keep, dtype=bool).copy()
    keep[0] = False
    lut = np.zeros(len(keep), dtype=np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lut


def relabel_components(labels: np.ndarray, min_size: int) -> np.ndarray:
    """6-connected components of a multi-label volume (uint32 (z, y, x)), those below ``min_size`` removed.

    Voxels of different labels never join, and one label in two separate
    places becomes two objects. Returns uint32 ids consecutive from 1 in scan order.
    """
    components, count = cc3d.connected_components(labels, connectivity=CONNECTIVITY, return_N=True, out_dtype=np.uint32)
    sizes = np.bincount(components.reshape(-1), minlength=count + 1)
    # In place: a second block-sized array is what bounds memory here.
    return apply_lut(components, keep_lut(sizes >= max(1, min_size)))


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
    return apply_lut(labels, keep_lut(keep))
