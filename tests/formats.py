"""Write a (z, y, x) volume in every input format emmito.sources reads; each returns its spec.

Shared by tests/test_sources.py, tests/test_bad_input.py and tests/workflow/test_formats.py.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import tifffile
import zarr
from PIL import Image


def png_slices(folder: Path, volume: np.ndarray, name: str = "slice_{:03d}.png") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for z, plane in enumerate(volume):
        Image.fromarray(plane).save(folder / name.format(z), format="PNG")
    return str(folder)


def tiff_slices(folder: Path, volume: np.ndarray, name: str = "slice_{:03d}.tif", **options) -> str:
    """One TIFF per slice; ``volume`` may be (z, y, x) or (z, y, x, 3) (then photometric RGB)."""
    folder.mkdir(parents=True, exist_ok=True)
    for z, plane in enumerate(volume):
        extra = {"photometric": "rgb"} if plane.ndim == 3 else {"photometric": "minisblack"}
        tifffile.imwrite(folder / name.format(z), plane, **{**extra, **options})
    return str(folder)


def tiff_stack(path: Path, volume: np.ndarray, **options) -> str:
    """A multi-page TIFF (tifffile's shaped series, or ImageJ's with imagej=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"photometric": "rgb"} if volume.ndim == 4 else {"photometric": "minisblack"}
    tifffile.imwrite(path, volume, **{**extra, **options})
    return str(path)


def generic_tiff_stack(path: Path, volume: np.ndarray) -> str:
    """A multi-page TIFF without tifffile's shape metadata (as most other writers make them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for plane in volume:
            tif.write(plane, photometric="minisblack", metadata=None, contiguous=False)
    return str(path)


def hdf5(path: Path, dataset: str, volume: np.ndarray, **options) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "a") as f:
        f.create_dataset(dataset, data=volume, **options)
    return f"{path}:/{dataset.strip('/')}"


def zarr_array(store: Path, path: str, volume: np.ndarray, zarr_format: int = 3, chunks=None) -> str:
    """An array at ``path`` in the store (``""``: the store is the array itself)."""
    chunks = chunks or (min(4, volume.shape[0]), *volume.shape[1:])
    if path:
        group = zarr.open_group(store, mode="a", zarr_format=zarr_format)
        group.create_array(path, data=volume, chunks=chunks)
        return f"{store}:/{path}"
    zarr.create_array(store, data=volume, chunks=chunks, zarr_format=zarr_format)
    return str(store)


def n5(container: Path, path: str, volume: np.ndarray) -> str:
    """An N5 dataset as N5's own tools lay it out: dimensions [x, y, z] in attributes.json."""
    import tensorstore as ts

    spec = {
        "driver": "n5",
        "kvstore": {"driver": "file", "path": str(container / path)},
        "metadata": {
            "compression": {"type": "gzip"},
            "dataType": str(volume.dtype),
            "dimensions": list(volume.shape[::-1]),
            "blockSize": [min(32, s) for s in volume.shape[::-1][:2]] + [min(4, volume.shape[0])],
        },
        "create": True,
    }
    store = ts.open(spec).result()
    store.write(volume.T).result()
    return f"{container}:/{path}"
