"""``emmito crop``: a box of seg.h5 as a file of its own, to proofread and register as training labels.

    emmito crop results/<vol>/seg.h5 proofread/box1.h5 --suggestion 3    # row 3's box of suggestions.csv
    emmito crop results/<vol>/seg.h5 proofread/box1.h5 --box Z0 Y0 X0 Z1 Y1 X1

writes the box (end-exclusive, full-resolution voxels) of the segmentation as
an HDF5 volume (dataset ``main``, uint32 ids, the seg's voxel size) and prints
the config lines that register it once corrected: the volume's ``labels``
(``box1.h5:/main``, ``label_format: instance``) and ``labels_offset`` (the
box's first voxel), so that convert places it in the images and marks only the
box as labelled (``contract.VALID_MASK``) and training's loss counts it alone.
Only the box is read (memory follows the box, not the volume); a box that
reaches past the volume is clipped to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from emmito import contract
from emmito.io import EmmitoError, open_volume, write_volume
from emmito.suggest import suggestion_row

BOX_KEYS = ("z0", "y0", "x0", "z1", "y1", "x1")


def crop_file(seg_path: Path, out: Path, box: list[int]) -> tuple[list[int], np.ndarray]:
    """Write ``box`` of ``seg_path``'s volume to ``out`` (atomically); returns (the box clipped to the volume, its ids)."""
    if len(box) != 6:
        raise EmmitoError(f"--box needs 6 numbers, Z0 Y0 X0 Z1 Y1 X1 (end-exclusive voxels), not {len(box)}")
    with open_volume(seg_path) as seg:
        if seg.ndim != 3:
            raise EmmitoError(f"{seg_path}: shape {tuple(seg.shape)} is not a (z, y, x) volume: pass seg.h5")
        low = [max(0, int(v)) for v in box[:3]]
        high = [min(n, int(v)) for v, n in zip(box[3:], seg.shape)]
        if any(hi <= lo for lo, hi in zip(low, high)):
            raise EmmitoError(
                f"the box {box} holds no voxel of {seg_path} ({'x'.join(map(str, seg.shape))}): give Z0 Y0 X0 below Z1 Y1 X1, inside the volume"
            )
        ids = seg[tuple(slice(lo, hi) for lo, hi in zip(low, high))]
        voxel_size = contract.voxel_size(dict(seg.attrs))
    write_volume(out, np.ascontiguousarray(ids, dtype=np.uint32), voxel_size=voxel_size)
    return low + high, ids


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito crop SEG OUT (--box Z0 Y0 X0 Z1 Y1 X1 | --suggestion N [--suggestions CSV])``."""
    if (args.box is None) == (args.suggestion is None):
        raise EmmitoError("crop: give either --box Z0 Y0 X0 Z1 Y1 X1 or --suggestion N")
    if args.suggestion is not None:
        suggestions = args.suggestions or Path(args.seg).parent / contract.SUGGESTIONS_FILE
        row = suggestion_row(suggestions, args.suggestion)
        box = [int(row[key]) for key in BOX_KEYS]
    else:
        box = list(args.box)
    clipped, ids = crop_file(Path(args.seg), Path(args.out), box)
    z0, y0, x0, z1, y1, x1 = clipped
    objects = len(np.unique(ids[ids > 0]))
    print(
        f"crop: {z1 - z0}x{y1 - y0}x{x1 - x0} voxels (z, y, x) of {args.seg} at [{z0}, {y0}, {x0}], {objects} objects -> {args.out}\n"
        f"Correct it (ids: one per mitochondrion, 0 background), then register it on the volume's entry:\n"
        f"    labels: {args.out}:/{contract.DATASET}\n"
        f"    label_format: instance\n"
        f"    labels_offset: [{z0}, {y0}, {x0}]\n"
        f"and name the volume in train.volumes, with train.init_from set to the current checkpoint.",
        file=sys.stderr,
    )
