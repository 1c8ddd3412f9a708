"""Outputs that lab tools open directly: OME-Zarr (napari, Fiji, webKnossos, neuroglancer) and TIFF stacks (Fiji).

``write_ome_zarr``: seg.h5 + image.h5 -> one OME-NGFF 0.4 image (zarr format 2,
the version napari's ome-zarr plugin, Fiji's readers and neuroglancer all read):
the EM image as a multiscale image (``0`` = image.h5, then each level the mean
of 2 x 2 voxels of the one before) with the segmentation under
``labels/segmentation`` as a multiscale label image (``0`` = seg.h5's main, then
its pyramid levels s1, s2, ...). The image has as many levels as the labels.
Voxel sizes are in each level's ``coordinateTransformations`` (a scale in nm,
and the translation that puts a coarse voxel's centre at the centre of the
voxels it pools), the axes z, y, x declare the unit.

``write_tiff``: the labels as a TIFF stack, uint16 when every id fits (an
ImageJ hyperstack, which Fiji opens with its calibration in µm) and uint32
otherwise (an OME-TIFF, BigTIFF when large, which Fiji opens with Bio-Formats,
voxel size in nm).

Both read the inputs a slab of slices at a time (memory bounded by a slab,
never the volume), write into a temporary name beside the output and move it
into place when complete, and give the same bytes for the same inputs.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from emmito import __version__, contract
from emmito.io import EmmitoError, atomic_directory, atomic_path, default_chunks, open_volume, volume_attrs
from emmito.resampling import mean_downsample

NGFF_VERSION = "0.4"
LABEL_NAME = "segmentation"  # labels/<LABEL_NAME> in the OME-Zarr
SPACE_UNIT = "nanometer"  # the axes' unit (UDUNITS-2 name, as NGFF asks)
# Blosc-zstd with byte shuffle: every zarr reader has Blosc; zstd 3 is several times smaller than lz4 on EM.
ZARR_COMPRESSOR = {"cname": "zstd", "clevel": 3}
UINT16_MAX = 2**16 - 1
# TIFF without BigTIFF holds 4 GiB; keep 32 MiB for the IFDs and metadata, as tifffile does.
CLASSIC_TIFF_BYTES = 2**32 - 2**25


def check_labels(seg_path: Path, seg: h5py.Dataset) -> None:
    """seg.h5's labels must be integers (the upsample stage's uint32)."""
    if seg.dtype.kind not in "ui":
        raise EmmitoError(f"{seg_path}: labels are {seg.dtype}, not integers: export seg.h5 from emmito upsample")


def check_pair(seg_path: Path, seg: h5py.Dataset, image_path: Path, image: h5py.Dataset) -> None:
    """One-line errors unless ``seg`` holds integer labels of exactly ``image``'s (uint8) shape."""
    if image.dtype != np.uint8:
        raise EmmitoError(f"{image_path}: image is {image.dtype}, not uint8: rerun emmito convert on it")
    if tuple(seg.shape) != tuple(image.shape):
        raise EmmitoError(
            f"{seg_path} is {tuple(seg.shape)} but {image_path} is {tuple(image.shape)}: export the final, "
            "full-resolution seg.h5 (from emmito upsample) of the same volume"
        )
    check_labels(seg_path, seg)


def label_levels(seg_file: h5py.File) -> list[str]:
    """seg.h5's pyramid datasets (main, s1, ...) up to the first whose shape is not the one before halved (ceil)."""
    names = contract.pyramid_levels(seg_file)
    kept = names[:1]
    for name in names[1:]:
        z, y, x = seg_file[kept[-1]].shape
        if tuple(seg_file[name].shape) != (z, -(-y // 2), -(-x // 2)):
            break
        kept.append(name)
    return kept


def multiscale(name: str, levels: int, voxel_size: list[float], method: str) -> dict[str, Any]:
    """NGFF 0.4 ``multiscales`` entry: datasets 0..levels-1, level k pooling 2^k x 2^k voxels in y and x.

    A pooled voxel's centre sits at the centre of the voxels it pools, so level
    k is translated by (2^k - 1) / 2 voxels of level 0 in y and x.
    """
    vz, vy, vx = (float(v) for v in voxel_size)
    datasets = []
    for level in range(levels):
        scale = 2**level
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [vz, vy * scale, vx * scale]}]
        if level:
            transforms.append({"type": "translation", "translation": [0.0, (scale - 1) / 2 * vy, (scale - 1) / 2 * vx]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {
        "version": NGFF_VERSION,
        "name": name,
        "axes": [{"name": axis, "type": "space", "unit": SPACE_UNIT} for axis in "zyx"],
        "datasets": datasets,
        "type": method,
        "metadata": {"description": f"2x y/x downsampling by {method}; z is never downsampled", "software": f"emmito {__version__}"},
    }


def _create_levels(group: Any, shapes: list[tuple[int, ...]], dtype: Any) -> list[Any]:
    """One zarr v2 array per level in ``group`` ('0', '1', ...), '/'-separated chunk keys (NGFF 0.4)."""
    import numcodecs

    compressor = numcodecs.Blosc(shuffle=numcodecs.Blosc.SHUFFLE, **ZARR_COMPRESSOR)
    return [
        group.create_array(
            str(level), shape=shape, chunks=default_chunks(shape), dtype=dtype, compressors=compressor,
            fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"},
        )
        for level, shape in enumerate(shapes)
    ]


def _fill(image: h5py.Dataset, seg_file: h5py.File, levels: list[str], image_arrays: list[Any], label_arrays: list[Any], progress: bool) -> None:
    """Copy image.h5 and seg.h5's levels slab by slab (the chunk depth), computing the image's coarser levels."""
    depth = image.shape[0]
    step = image_arrays[0].chunks[0]
    for z_start in tqdm(range(0, depth, step), desc="ome-zarr", unit="slab", file=sys.stderr, disable=not progress):
        z = slice(z_start, min(z_start + step, depth))
        pixels = image[z]
        for level, array in enumerate(image_arrays):
            if level:
                pixels = mean_downsample(pixels)
            array[z] = pixels
        for name, array in zip(levels, label_arrays):
            array[z] = seg_file[name][z].astype(np.uint32, copy=False)


def write_ome_zarr(seg_path: Path, image_path: Path, out: Path, progress: bool = False) -> dict[str, Any]:
    """Write ``out`` (seg.ome.zarr): image.h5 as a multiscale image, seg.h5 (and its pyramid) under labels/.

    Returns {"shape", "levels", voxel size}. Memory: one slab of the chunk depth (8 slices).
    """
    import zarr

    with open_volume(image_path) as image, open_volume(seg_path) as seg:
        check_pair(seg_path, seg, image_path, image)
        voxel_size = contract.voxel_size(volume_attrs(seg))
        levels = label_levels(seg.file)
        shapes = [tuple(int(s) for s in seg.file[name].shape) for name in levels]
        with atomic_directory(out) as tmp:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
            image_arrays = _create_levels(root, shapes, np.uint8)
            labels = root.create_group("labels")
            label_group = labels.create_group(LABEL_NAME)
            label_arrays = _create_levels(label_group, shapes, np.uint32)
            _fill(image, seg.file, levels, image_arrays, label_arrays, progress)
            root.attrs.put({"multiscales": [multiscale("image", len(levels), voxel_size, "mean")]})
            labels.attrs.put({"labels": [LABEL_NAME]})
            label_group.attrs.put({
                "multiscales": [multiscale(LABEL_NAME, len(levels), voxel_size, "mode")],
                "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}},
            })
    return {"shape": list(shapes[0]), "levels": len(levels), contract.VOXEL_SIZE: voxel_size}


def max_label(seg: h5py.Dataset, slab_slices: int) -> int:
    """The largest id in ``seg``, read a slab at a time."""
    largest = 0
    for z_start in range(0, seg.shape[0], slab_slices):
        largest = max(largest, int(seg[z_start : z_start + slab_slices].max(initial=0)))
    return largest


def _slices(seg: h5py.Dataset, dtype: Any, slab_slices: int, progress: bool) -> Iterator[np.ndarray]:
    for z_start in tqdm(range(0, seg.shape[0], slab_slices), desc="tiff", unit="slab", file=sys.stderr, disable=not progress):
        yield from seg[z_start : z_start + slab_slices].astype(dtype, copy=False)


def tiff_options(shape: tuple[int, ...], dtype: Any, voxel_size: list[float], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TiffWriter keywords, write keywords): an ImageJ hyperstack (µm) for uint16, an OME-TIFF (nm) for uint32."""
    vz, vy, vx = (float(v) for v in voxel_size)
    large = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize > CLASSIC_TIFF_BYTES
    if np.dtype(dtype) == np.uint16:
        # ImageJ hyperstacks are never BigTIFF; above 4 GiB tifffile writes one IFD and the data contiguous.
        return {"imagej": True}, {
            "resolution": (1000.0 / vx, 1000.0 / vy), "truncate": large,
            "metadata": {"axes": "ZYX", "spacing": vz / 1000.0, "unit": "um"},
        }
    # A UUID from the content's description, not a random one, so the same labels give the same bytes.
    tag = uuid.uuid5(uuid.NAMESPACE_URL, f"emmito:{name}:{tuple(shape)}:{voxel_size}")
    metadata = {"axes": "ZYX", "UUID": f"urn:uuid:{tag}", "Creator": f"emmito {__version__}"}
    for axis, size in zip("ZYX", (vz, vy, vx)):
        metadata.update({f"PhysicalSize{axis}": size, f"PhysicalSize{axis}Unit": "nm"})
    return {"bigtiff": large, "ome": True}, {
        "resolution": (1e7 / vx, 1e7 / vy), "resolutionunit": "CENTIMETER", "metadata": metadata,
    }


def write_tiff(seg_path: Path, out: Path, slab_slices: int = 8, progress: bool = False) -> dict[str, Any]:
    """Write ``out``: seg.h5's labels as a TIFF stack, uint16 when every id fits, else uint32.

    Returns {"shape", "dtype", "max_id"}. Two passes over seg.h5 (the largest
    id, then the slices), each a slab at a time.
    """
    import tifffile

    with open_volume(seg_path) as seg:
        check_labels(seg_path, seg)
        voxel_size = contract.voxel_size(volume_attrs(seg))
        shape = tuple(int(s) for s in seg.shape)
        largest = max_label(seg, slab_slices)
        dtype = np.uint16 if largest <= UINT16_MAX else np.uint32
        writer_options, write_options = tiff_options(shape, dtype, voxel_size, Path(out).name)
        with atomic_path(out) as tmp:
            with tifffile.TiffWriter(tmp, **writer_options) as tif:
                tif.write(_slices(seg, dtype, slab_slices, progress), shape=shape, dtype=dtype, **write_options)
    return {"shape": list(shape), "dtype": np.dtype(dtype).name, "max_id": largest}
