"""Where a volume's images and labels come from: PNG/TIFF slices, TIFF stacks, HDF5, zarr, N5.

A spec (``volumes.<name>.images`` or ``labels`` in the config, ``--images`` /
``--labels`` on the command line) is one of

- a folder or glob of PNG or TIFF (``.tif``/``.tiff``) slices, ordered by the
  number in their names (``io.list_slices``);
- a multi-page TIFF stack: one ``.tif``/``.tiff`` file (its first series);
- an HDF5 dataset: ``file.h5:/path/to/dataset`` (the path may be left out when
  the file holds one dataset);
- a zarr (v2 or v3) array: ``store.zarr:/path/to/array``, ``store.zarr/path``,
  or the array's own folder;
- an N5 dataset: ``container.n5:/path/to/dataset`` (read with tensorstore; N5
  lists its dimensions x first, so ``[x, y, z]`` in attributes.json is (z, y, x) here).

Arrays are 3D (z, y, x). ``describe(spec)`` is cheap (one directory listing and
one header, or the container's metadata; never pixels): the workflow calls it for
every volume when it parses the Snakefile. ``open_source(spec, kind)`` returns a
``Source`` that reads slabs of slices, so memory stays bounded by a slab.

Kinds: ``image`` (grey values as stored: uint8, uint16, other integers or float;
``IntensityMapping`` makes uint8 of them), ``binary`` (uint8 0/1 masks),
``instance`` (uint32 ids from any integer source), ``vast`` (uint32 ids
R*65536 + G*256 + B from 8-bit RGB PNG or TIFF). Every mistake is a one-line
EmmitoError naming the file (and slice) and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filters, so Blosc-compressed inputs read)
import numpy as np
from tqdm import tqdm

from emmito.io import EmmitoError, atomic_path, list_slices, png_header, read_png_slice, slice_number, slice_paths

KINDS = ("image", "binary", "instance", "vast")
# describe opens a source under a kind that checks nothing at open (images refuse palette TIFFs).
_ANY_KIND = "binary"
_PNG_KIND = {"image": "image_raw", "binary": "label_binary", "instance": "label_instance", "vast": "label_vast"}
_HDF5 = re.compile(r"^(?P<file>.+\.(?:h5|hdf5|hdf|he5))(?::(?P<path>.*))?$", re.IGNORECASE)
_CHUNKED = re.compile(r"^(?P<file>.+?\.(?P<ext>zarr|n5))(?:[:/](?P<path>.*))?$", re.IGNORECASE)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# A slab read at once is at most this many bytes of raw values (convert's memory bound).
SLAB_BYTES = 2**30
MAX_SLAB_SLICES = 64


@dataclass(frozen=True)
class Description:
    """What ``describe`` finds from names and metadata alone."""

    spec: str
    format: str  # png slices, tiff slices, tiff stack, hdf5, zarr, n5
    depth: int
    height: int
    width: int
    dtype: str  # of the stored values (the first slice's, for slices)
    chunk_slices: int  # slices per storage chunk in z (1 for slice files and TIFF pages)
    files: tuple[str, ...]  # what the workflow's convert rule takes as input

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.depth, self.height, self.width)


def slab_slices(chunk_slices: int, height: int, width: int, itemsize: int, multiple: int = 1) -> int:
    """Slices convert reads at once: whole storage chunks and whole multiples of ``multiple``, within SLAB_BYTES."""
    want = max(multiple, math.ceil(max(1, chunk_slices) / multiple) * multiple)
    fits = max(1, SLAB_BYTES // max(1, height * width * itemsize))
    slices = min(want, max(multiple, fits // multiple * multiple), max(multiple, MAX_SLAB_SLICES))
    return max(1, slices)


# ---- which format a spec names ------------------------------------------------------


def _is_hdf5_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def _chunked_format(folder: Path) -> str | None:
    """zarr or n5 where ``folder`` (or a parent up to the store) holds that format's metadata."""
    if (folder / "zarr.json").exists() or (folder / ".zarray").exists() or (folder / ".zgroup").exists():
        return "zarr"
    attributes = folder / "attributes.json"
    if attributes.exists():
        return "n5"
    return None


def parse_spec(spec: str | os.PathLike) -> tuple[str, str, str]:
    """(format, location, inner path) of a spec; format is slices, tiff stack, hdf5, zarr or n5.

    Only names and, for paths without a telling suffix, a few bytes are looked at.
    """
    text = str(spec)
    match = _HDF5.match(text)
    if match:
        return "hdf5", match["file"], match["path"] or ""
    match = _CHUNKED.match(text)
    if match:
        return match["ext"].lower(), match["file"], (match["path"] or "").strip("/")
    if ":" in text:
        head, inner = text.rsplit(":", 1)
        if Path(head).is_file() and _is_hdf5_file(Path(head)):
            return "hdf5", head, inner
        if Path(head).is_dir() and _chunked_format(Path(head)):
            return _chunked_format(Path(head)) or "zarr", head, inner.strip("/")
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() in (".tif", ".tiff"):
        return "tiff stack", str(path), ""
    if path.is_file() and _is_hdf5_file(path):
        return "hdf5", str(path), ""
    if path.is_dir() and _chunked_format(path):
        return _chunked_format(path) or "zarr", str(path), ""
    return "slices", text, ""


def _missing(location: str, what: str) -> EmmitoError:
    return EmmitoError(f"{location}: {what} not found: check the path (relative to the project folder)")


def _not_3d(spec: str, shape: Sequence[int]) -> EmmitoError:
    return EmmitoError(
        f"{spec}: a {len(shape)}D array (shape {tuple(int(s) for s in shape)}), not 3D (z, y, x): "
        "store one 3D volume (one channel, one time point) as its own array"
    )


# ---- describe: cheap, for the workflow's parse time ------------------------------------


def describe(spec: str | os.PathLike | Sequence[os.PathLike]) -> Description:
    """Depth, height, width, dtype and the input files of a spec, from names and metadata only (no pixels)."""
    if not isinstance(spec, (str, os.PathLike)):
        return _describe_slices([Path(p) for p in spec], "slices")
    fmt, location, inner = parse_spec(spec)
    if fmt == "slices":
        return _describe_slices(slice_paths(location), str(spec))
    if fmt == "tiff stack":
        with _TiffStack(location, _ANY_KIND) as stack:
            return stack.description(str(spec))
    if fmt == "n5":
        return _n5_description(str(spec), location, inner)
    with open_source(spec, _ANY_KIND) as source:
        return source.description(str(spec))


# A folder of 100,000 slices is listed (and its numbering checked) once, not in every job's
# parse: the listing's result is remembered in a small JSON file keyed on the folder's
# identity and modification time (which changes when a slice is added, removed or renamed)
# and on the first slice's (whose header gives height, width and type).
_LISTING_VERSION = 1


def _slice_folder(location: str) -> str:
    """The folder a slices spec lists: the folder itself, or a glob's folder."""
    return location if os.path.isdir(location) else (os.path.dirname(location) or ".")


def _stat_key(path: str) -> list[int]:
    found = os.stat(path)
    return [found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size]


def describe_cached(spec: str | os.PathLike, cache_folder: str | os.PathLike) -> Description:
    """``describe`` for the workflow's parse, where slice folders cost one listing in all, not one per job.

    Containers and stacks are described as ``describe`` does (their metadata is cheap).
    Slices: the first call lists the folder and remembers the result in ``cache_folder``;
    later calls cost two ``stat`` calls (the folder, the first slice) while the folder
    has not changed. ``files`` is the folder (or a glob's folder), not every slice: the
    workflow's convert rule takes it as its input, so that adding, removing or renaming a
    slice reruns convert; a slice rewritten in place under its old name does not change
    the folder (``touch`` the folder, or ``--forcerun convert``).
    """
    fmt, location, _ = parse_spec(spec)
    if fmt != "slices":
        return describe(spec)
    folder = _slice_folder(location)
    try:
        folder_key = _stat_key(folder)
    except OSError:
        return describe(spec)  # the usual one-line error for a missing folder
    where = os.path.abspath(str(spec))
    cache = Path(cache_folder) / f"slices-{hashlib.sha1(where.encode()).hexdigest()[:20]}.json"
    try:
        saved = json.loads(cache.read_text())
        if saved["version"] == _LISTING_VERSION and saved["spec"] == where and saved["folder"] == folder_key:
            if saved["first_key"] == _stat_key(saved["first"]):
                return Description(**{**saved["description"], "files": tuple(saved["description"]["files"])})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    paths = slice_paths(location)
    described = replace(_describe_slices(paths, str(spec)), files=(folder,))
    record = {
        "version": _LISTING_VERSION, "spec": where, "folder": folder_key,
        "first": paths[0], "first_key": _stat_key(paths[0]), "description": asdict(described),
    }
    try:
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps(record))
    except EmmitoError:
        pass  # a results folder that cannot be written: the next parse lists again
    return described


def input_files(spec: str | os.PathLike) -> list[str]:
    """The files (or zarr/N5 folders) a spec reads: the workflow's convert rule takes them as input."""
    return list(describe(spec).files)


def _describe_slices(paths: Sequence[str | Path], spec: str) -> Description:
    first = Path(paths[0])
    height, width, dtype, _ = _slice_header(first)
    fmt = "png slices" if first.suffix.lower() == ".png" else "tiff slices"
    return Description(spec, fmt, len(paths), height, width, dtype, 1, tuple(map(str, paths)))


def _slice_header(path: Path) -> tuple[int, int, str, int]:
    """(height, width, dtype of the grey values, samples per pixel) of one slice, from its header."""
    if path.suffix.lower() == ".png":
        height, width, bits, colour = png_header(path)
        samples = {"grey": 1, "palette": 1, "grey+alpha": 2, "RGB": 3, "RGBA": 4}[colour]
        return height, width, "uint16" if bits == 16 and colour == "grey" else "uint8", samples
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            shape, dtype, samples = page.shape, page.dtype, int(page.samplesperpixel)
    except FileNotFoundError:
        raise _missing(str(path), "file") from None
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ...
        raise EmmitoError(f"{path}: not a readable TIFF ({str(exc) or type(exc).__name__}): re-export it") from None
    if dtype is None:
        raise EmmitoError(f"{path}: TIFF pixel type not supported: export 8/16-bit grey or float")
    return int(shape[0]), int(shape[1]), "uint8" if dtype == np.bool_ else str(dtype), samples


def _n5_description(spec: str, container: str, inner: str) -> Description:
    folder = Path(container) / inner
    if not Path(container).exists():
        raise _missing(container, "N5 container")
    try:
        attributes = json.loads((folder / "attributes.json").read_text())
    except FileNotFoundError:
        raise EmmitoError(f"{spec}: no N5 dataset at /{inner} (no attributes.json): write it as {container}:/path/to/dataset") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise EmmitoError(f"{folder / 'attributes.json'}: not readable N5 metadata ({exc}): re-export the dataset") from None
    dims = attributes.get("dimensions")
    if not isinstance(dims, list):
        raise EmmitoError(f"{spec}: /{inner} is an N5 group, not a dataset (no dimensions): name a dataset, {container}:/path/to/dataset")
    if len(dims) != 3:
        raise _not_3d(spec, dims[::-1])
    block = attributes.get("blockSize") or [1, 1, 1]
    depth, height, width = (int(d) for d in dims[::-1])
    return Description(spec, "n5", depth, height, width, str(attributes.get("dataType")), int(block[-1]), (container,))


# ---- sources: slabs of slices -------------------------------------------------------------


class Source:
    """A volume to read slab by slab: ``shape`` (z, y, x), ``dtype`` of what ``read`` returns.

    Images read as grey values as stored (``dtype``: uint8, uint16, float32 ...),
    labels as uint8 0/1 (binary) or uint32 ids (instance, vast).
    """

    kind: str
    name: str  # the spec, or the slices' folder
    shape: tuple[int, int, int]
    dtype: np.dtype
    chunk_slices: int = 1
    format: str = ""

    @property
    def what(self) -> str:
        return "image" if self.kind == "image" else "label"

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices [z0, z1) as (z1 - z0, y, x), checked for this kind."""
        raw = self._raw(z0, z1)
        return np.stack([_as_kind(raw[i], self.kind, self.where(z0 + i), self._colour, self._inverted) for i in range(len(raw))])

    def where(self, z: int) -> str:
        """How messages name slice ``z``."""
        return f"{self.name} slice {z}"

    def span(self, z0: int, z1: int) -> str:
        """How messages name slices [z0, z1)."""
        if z1 - z0 <= 1:
            return self.where(z0)
        head, unit, _ = self.where(z0).rsplit(" ", 2)
        return f"{head} {unit}s {z0}-{z1 - 1}"

    def check(self, progress: bool = False) -> None:
        """The checks that need no pixels, on every part (slice files: every header). Arrays: nothing more."""

    def files(self) -> list[str]:
        raise NotImplementedError

    def description(self, spec: str) -> Description:
        depth, height, width = self.shape
        return Description(spec, self.format, depth, height, width, str(self._stored), self.chunk_slices, tuple(self.files()))

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # subclasses: _raw(z0, z1) -> (n, y, x) or (n, y, x, samples) where _colour
    _colour: bool = False
    _inverted: bool = False
    _stored: Any = None

    def _raw(self, z0: int, z1: int) -> np.ndarray:
        raise NotImplementedError

    def _init_kind(self, kind: str, stored: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.kind, self._stored = kind, np.dtype(stored)
        if kind == "image":
            _check_image_dtype(self.name, self._stored)
            self.dtype = np.dtype(np.uint8) if self._stored == np.bool_ else self._stored
        else:
            self.dtype = np.dtype(np.uint8 if kind == "binary" else np.uint32)


def open_source(spec: str | os.PathLike | Sequence[os.PathLike], kind: str) -> Source:
    """A ``Source`` for a spec (see the module docstring) read as ``kind``; cheap: metadata only.

    ``spec`` may also be a list of slice files already ordered (``io.list_slices``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not isinstance(spec, (str, os.PathLike)):
        return _SliceFiles([Path(p) for p in spec], kind)
    fmt, location, inner = parse_spec(spec)
    if fmt == "slices":
        return _SliceFiles(list_slices(location), kind)
    if kind == "vast" and fmt != "tiff stack":
        raise EmmitoError(
            f"{spec}: label_format vast reads RGB PNG or TIFF slices (id = R*65536 + G*256 + B), this is {fmt}: "
            "an array holds ids already, use label_format instance"
        )
    opener = {"tiff stack": _TiffStack, "hdf5": _Hdf5, "zarr": _Zarr, "n5": _N5}[fmt]
    return opener(location, kind) if fmt == "tiff stack" else opener(str(spec), location, inner, kind)


def _check_image_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise EmmitoError(f"{name}: images of type {dtype} are not supported: store grey values as 8/16-bit integers or float")


def _tifffile():
    import logging

    import tifffile

    # tifffile logs what it then raises (or skips) as errors; emmito reports those in one line itself.
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    return tifffile


class _SliceFiles(Source):
    """PNG or TIFF slice files, one slice each, in z order."""

    def __init__(self, paths: list[Path], kind: str) -> None:
        self.paths = paths
        self.name = str(paths[0].parent)
        self.png = paths[0].suffix.lower() == ".png"
        self.format = "png slices" if self.png else "tiff slices"
        height, width, stored, samples = _slice_header(paths[0])
        self.shape = (len(paths), height, width)
        self._colour = samples > 1
        self._init_kind(kind, stored)

    def where(self, z: int) -> str:
        path = self.paths[z]
        number = slice_number(path)
        return f"slice {number} ({path})" if number is not None else str(path)

    def files(self) -> list[str]:
        return [str(p) for p in self.paths]

    def check(self, progress: bool = False) -> None:
        """Every slice's size (and, for images, grey value type) from its header: the first that differs is named."""
        with tqdm(self.paths, desc=f"convert: checking {self.what} headers", unit="slice", file=sys.stderr,
                  leave=False, disable=not progress) as bar:
            headers = [_slice_header(path) for path in bar]
        sizes = [h[:2] for h in headers]
        common = Counter(sizes).most_common(1)[0][0]
        for z, size in enumerate(sizes):
            if size != common:
                raise EmmitoError(
                    f"{self.what} {self.where(z)} is {size[1]}x{size[0]} (width x height), the others are "
                    f"{common[1]}x{common[0]}: crop or pad it"
                )
        self.shape = (len(self.paths), *common)
        if self.kind == "image":
            types = [h[2] for h in headers]
            usual = Counter(types).most_common(1)[0][0]
            for z, stored in enumerate(types):
                if stored != usual:
                    raise EmmitoError(
                        f"image {self.where(z)} holds {stored} values, the others {usual}: "
                        "export every slice with the same bit depth"
                    )
            self._init_kind(self.kind, usual)

    def read(self, z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0, *self.shape[1:]), dtype=self.dtype)
        for z in range(z0, z1):
            pixels = self._decode(z)
            if pixels.shape != self.shape[1:]:  # the header said otherwise: the file changed under us
                raise EmmitoError(
                    f"{self.what} {self.where(z)} decodes to {pixels.shape[1]}x{pixels.shape[0]}, "
                    f"not {self.shape[2]}x{self.shape[1]}: re-export it"
                )
            if pixels.dtype != self.dtype:
                raise EmmitoError(
                    f"{self.what} {self.where(z)} holds {pixels.dtype} values, the others {self.dtype}: "
                    "export every slice with the same bit depth"
                )
            out[z - z0] = pixels
        return out

    def _decode(self, z: int) -> np.ndarray:
        path = self.paths[z]
        if self.png:
            return read_png_slice(path, _PNG_KIND[self.kind])
        raw, colour, inverted = _read_tiff_slice(path)
        return _as_kind(raw, self.kind, self.where(z), colour, inverted)


def _read_tiff_slice(path: Path) -> tuple[np.ndarray, bool, bool]:
    """One TIFF slice's values (y, x) or (y, x, samples), whether it has samples, whether min-is-white."""
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, page = series.axes, tif.pages.first
            if axes not in ("YX", "YXS"):
                raise EmmitoError(
                    f"{path}: holds a {series.shape} image (axes {axes}), not one slice: a folder of slices needs "
                    "one 2D image per file; give a multi-page file itself as a TIFF stack"
                )
            raw = series.asarray(maxworkers=1)
            palette, inverted = int(page.photometric) == 3, int(page.photometric) == 0
    except EmmitoError:
        raise
    except FileNotFoundError:
        raise _missing(str(path), "file") from None
    except Exception as exc:
        raise EmmitoError(f"{path}: not a readable TIFF ({str(exc) or type(exc).__name__}): re-export it") from None
    if palette:
        raise EmmitoError(f"{path}: palette (indexed colour) TIFF: export it as greyscale")
    return raw, axes == "YXS", inverted


class _TiffStack(Source):
    """A multi-page TIFF: its first series, (z, y, x) or (z, y, x, samples), read a few pages at a time."""

    format = "tiff stack"

    def __init__(self, path: str, kind: str) -> None:
        tifffile = _tifffile()
        self.path, self.name = path, path
        if not Path(path).exists():
            raise _missing(path, "TIFF stack")
        try:
            self.tif = tifffile.TiffFile(path)
            series = self.tif.series[0]
            self._check_series(self.tif, series)
            self.axes, self.series_shape = series.axes, series.shape
            page = series.keyframe
            palette, self._inverted = int(page.photometric) == 3, int(page.photometric) == 0
            stored = series.dtype
        except EmmitoError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise EmmitoError(f"{path}: not a readable TIFF ({str(exc) or type(exc).__name__}): re-export it") from None
        if palette and kind == "image":
            self.close()
            raise EmmitoError(f"{path}: palette (indexed colour) TIFF: export it as greyscale")
        self._colour = self.axes.endswith("S")
        plane = self.series_shape[-3:-1] if self._colour else self.series_shape[-2:]
        self.shape = (1 if len(self.axes) == 2 + self._colour else int(self.series_shape[0]), int(plane[0]), int(plane[1]))
        self._array = None
        self._init_kind(kind, stored)

    def _check_series(self, tif: Any, series: Any) -> None:
        axes = series.axes
        core = axes[:-1] if axes.endswith("S") else axes
        if not core.endswith("YX") or len(core) > 3:
            raise EmmitoError(
                f"{self.path}: a TIFF of shape {series.shape} (axes {axes}), not a stack of 2D slices: "
                "save one channel and one time point as (z, y, x)"
            )
        if len(tif.series) > 1 and series.kind in ("generic", "uniform", ""):
            raise EmmitoError(
                f"{self.path}: its pages are not all alike: the first {len(series)} are {series.shape[-2:]} "
                f"{series.dtype}, then another size or type follows: save every slice with the same size and type"
            )

    def where(self, z: int) -> str:
        return f"{self.path} page {z}"

    def files(self) -> list[str]:
        return [self.path]

    def _raw(self, z0: int, z1: int) -> np.ndarray:
        import zarr

        try:
            if self._array is None:  # tifffile's zarr view reads only the pages asked for
                self._array = zarr.open(self.tif.series[0].aszarr(), mode="r")
            flat = len(self._array.shape) == 2 + self._colour  # a single page
            raw = np.asarray(self._array[...] if flat else self._array[z0:z1])
        except Exception as exc:
            raise EmmitoError(
                f"{self.span(z0, z1)}: cannot be read ({str(exc) or type(exc).__name__}): the file is corrupt or truncated; re-export it"
            ) from None
        return raw.reshape(z1 - z0, *raw.shape[-(2 + self._colour):])

    def close(self) -> None:
        tif = getattr(self, "tif", None)
        if tif is not None:
            tif.close()


class _ArraySource(Source):
    """An array in a container (HDF5, zarr, N5), (z, y, x)."""

    def _setup(self, spec: str, kind: str, shape: Sequence[int], stored: Any, chunks: Sequence[int] | None) -> None:
        self.name = spec
        if len(shape) != 3:
            raise _not_3d(spec, shape)
        self.shape = tuple(int(s) for s in shape)
        self.chunk_slices = int(chunks[0]) if chunks else 1
        if kind == "instance" and np.dtype(stored).kind not in "biu":
            raise EmmitoError(
                f"{spec}: holds {np.dtype(stored)} values: instance ids must be integers; store them as uint32 (0 = background)"
            )
        self._init_kind(kind, stored)

    def _read_error(self, z0: int, z1: int, exc: Exception) -> EmmitoError:
        return EmmitoError(
            f"{self.span(z0, z1)}: cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
            "the data is corrupt or truncated; re-export it"
        )


class _Hdf5(_ArraySource):
    format = "hdf5"

    def __init__(self, spec: str, path: str, inner: str, kind: str) -> None:
        self.path = path
        if not Path(path).exists():
            raise _missing(path, "HDF5 file")
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise EmmitoError(
                f"{path}: not a readable HDF5 file ({str(exc).split('(')[0].strip()}): it is corrupt or truncated; re-export it"
            ) from None
        try:
            self.dataset = self._dataset(inner)
            self._setup(spec, kind, self.dataset.shape, self.dataset.dtype, self.dataset.chunks)
        except BaseException:
            self.close()
            raise

    def _datasets(self) -> list[str]:
        """Every dataset in the file (metadata only), for messages and for a spec without a path."""
        found: list[str] = []
        self.file.visititems(lambda name, node: found.append(f"/{name}") if isinstance(node, h5py.Dataset) else None)
        return found

    def _dataset(self, inner: str) -> h5py.Dataset:
        node = self.file.get(inner) if inner else None
        if isinstance(node, h5py.Dataset):
            return node
        found = self._datasets()
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "no dataset"
        if not inner:
            if len(found) == 1:
                return self.file[found[0]]
            raise EmmitoError(f"{self.path}: name the dataset, {self.path}:/path/to/dataset (it holds {shown})")
        if node is None:
            raise EmmitoError(f"{self.path}: no dataset {inner} in it (it holds {shown}): fix the path after the colon")
        raise EmmitoError(f"{self.path}:{inner} is a group, not a dataset (the file holds {shown}): name a dataset")

    def where(self, z: int) -> str:
        return f"{self.path}:{self.dataset.name} slice {z}"

    def files(self) -> list[str]:
        return [self.path]

    def _raw(self, z0: int, z1: int) -> np.ndarray:
        try:
            return self.dataset[z0:z1]
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._read_error(z0, z1, exc) from None

    def close(self) -> None:
        file = getattr(self, "file", None)
        if file is not None:
            file.close()


class _Zarr(_ArraySource):
    format = "zarr"

    def __init__(self, spec: str, store: str, inner: str, kind: str) -> None:
        import zarr

        self.store, self.inner = store, inner
        if not Path(store).exists():
            raise _missing(store, "zarr store")
        try:
            node = zarr.open(store, mode="r", path=inner) if inner else zarr.open(store, mode="r")
        except (FileNotFoundError, KeyError):
            raise EmmitoError(f"{store}: no array at /{inner} in it{self._listing(store)}: fix the path after the colon") from None
        except Exception as exc:
            raise EmmitoError(f"{store}: not a readable zarr store ({str(exc) or type(exc).__name__}): re-export it") from None
        if not hasattr(node, "shape"):
            raise EmmitoError(f"{spec}: is a zarr group, not an array{self._listing(store)}: name an array, {store}:/path/to/array")
        self.array = node
        self._setup(spec, kind, node.shape, node.dtype, node.chunks)

    @staticmethod
    def _listing(store: str) -> str:
        import zarr

        try:
            root = zarr.open_group(store, mode="r")
            arrays = sorted(f"/{name}" for name, node in root.members(max_depth=None) if hasattr(node, "shape"))
        except Exception:
            return ""
        return f" (it holds {', '.join(arrays[:8])}{', ...' if len(arrays) > 8 else ''})" if arrays else " (it holds no array)"

    def where(self, z: int) -> str:
        return f"{self.store}:/{self.inner} slice {z}" if self.inner else f"{self.store} slice {z}"

    def files(self) -> list[str]:
        return [self.store]

    def _raw(self, z0: int, z1: int) -> np.ndarray:
        try:
            return np.asarray(self.array[z0:z1])
        except Exception as exc:  # codec errors of corrupt chunks come as many types
            raise self._read_error(z0, z1, exc) from None


class _N5(_ArraySource):
    """N5 through tensorstore; the dimensions in attributes.json are x first, so the array is transposed."""

    format = "n5"

    def __init__(self, spec: str, container: str, inner: str, kind: str) -> None:
        import tensorstore as ts

        described = _n5_description(spec, container, inner)
        self.container, self.inner = container, inner
        context = {"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 1}}
        try:
            store = ts.open(
                {"driver": "n5", "kvstore": {"driver": "file", "path": str(Path(container) / inner)}, "context": context},
                read=True,
            ).result()
        except Exception as exc:
            raise EmmitoError(f"{spec}: not a readable N5 dataset ({str(exc).splitlines()[0]}): re-export it") from None
        self.array = store.T
        self._setup(spec, kind, described.shape, store.dtype.numpy_dtype, (described.chunk_slices,))

    def where(self, z: int) -> str:
        return f"{self.container}:/{self.inner} slice {z}"

    def files(self) -> list[str]:
        return [self.container]

    def _raw(self, z0: int, z1: int) -> np.ndarray:
        try:
            return np.asarray(self.array[z0:z1].read().result())
        except Exception as exc:
            raise self._read_error(z0, z1, exc) from None


# ---- values -> kind ----------------------------------------------------------------------


def _present(values: np.ndarray) -> np.ndarray:
    """The distinct values of an array (bincount for 8/16-bit, which is much faster than np.unique)."""
    if values.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(values.ravel()))
    return np.unique(values)


def _refuse_stray(where: str, values: np.ndarray, allowed: tuple[int, ...]) -> None:
    stray = np.setdiff1d(_present(values), np.asarray(allowed))
    if stray.size:
        shown = ", ".join(f"{v:g}" for v in stray[:8].tolist()) + (", ..." if stray.size > 8 else "")
        raise EmmitoError(
            f"{where}: binary mask holds values other than {'/'.join(map(str, allowed))}: {shown}: "
            "export a clean 0/255 (or 0/1) mask, or use label_format instance if the values are instance ids"
        )


def _grey(raw: np.ndarray, where: str, colour: bool) -> np.ndarray:
    """(y, x) grey values of one image slice: equal R, G, B give that channel, colour is refused."""
    if not colour:
        return raw
    if raw.shape[-1] in (1, 2):  # grey (+ alpha)
        return np.ascontiguousarray(raw[..., 0])
    rgb = raw[..., :3]
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        raise EmmitoError(f"{where}: is colour (channels differ): export it as greyscale")
    return np.ascontiguousarray(rgb[..., 0])


def _as_kind(raw: np.ndarray, kind: str, where: str, colour: bool, inverted: bool = False) -> np.ndarray:
    """One slice's stored values (y, x) or (y, x, samples) -> what ``kind`` reads (see ``Source``)."""
    if kind == "image":
        grey = _grey(raw, where, colour)
        if grey.dtype == np.bool_:
            grey = grey.astype(np.uint8) * np.uint8(255)
        if inverted and grey.dtype.kind == "u":  # min-is-white TIFF: 0 is white
            grey = np.iinfo(grey.dtype).max - grey
        return grey
    if kind == "vast":
        if not colour or raw.shape[-1] < 3 or raw.dtype != np.uint8:
            raise EmmitoError(
                f"{where}: label_format vast needs 8-bit RGB slices (id = R*65536 + G*256 + B), this one is "
                f"{'grey' if not colour else f'{raw.dtype} with {raw.shape[-1]} samples'}: use label_format instance for grey ids"
            )
        rgb = raw[..., :3].astype(np.uint32)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    if colour and raw.shape[-1] <= 2:  # grey (+ alpha): the grey plane
        raw, colour = raw[..., 0], False
    if kind == "binary":
        return _binary(raw[..., :3] if colour else raw, where, colour)
    if colour:
        raise EmmitoError(
            f"{where}: label_format instance needs grey values whose values are ids, this slice is RGB: "
            "use label_format vast for VAST RGB exports, or export grey ids"
        )
    return _instance(raw, where)


def _binary(raw: np.ndarray, where: str, colour: bool = False) -> np.ndarray:
    """uint8 0/1; values must be 0, 1 or the type's maximum (255, 65535); colour: in every channel."""
    if raw.dtype == np.bool_:
        mask = raw
    else:
        top = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}.get(raw.dtype)
        _refuse_stray(where, raw, (0, 1, top) if top else (0, 1))
        mask = raw != 0
    return (np.any(mask, axis=-1) if colour else mask).astype(np.uint8)


def _instance(raw: np.ndarray, where: str) -> np.ndarray:
    if raw.dtype.kind == "f":
        raise EmmitoError(f"{where}: holds {raw.dtype} values: instance ids must be integers; store them as uint32 (0 = background)")
    if raw.size and raw.dtype.kind == "i" and raw.min() < 0:
        raise EmmitoError(f"{where}: holds negative ids ({int(raw.min())}): ids are 0 (background) or positive; renumber them")
    if raw.size and raw.dtype.itemsize > 4 and raw.max() >= 2**32:
        raise EmmitoError(f"{where}: holds ids of 2^32 and more ({int(raw.max())}): renumber them below 4294967296")
    return raw.astype(np.uint32)


# ---- one intensity mapping per volume -----------------------------------------------------
# 8-bit images are kept as they are. 16-bit and float images get one linear map to uint8,
# chosen before anything is written from percentiles of a sample of slices, and recorded
# in image.h5 (contract.INTENSITY_MAPPING), so every slice is mapped alike.

SAMPLE_PIXELS = 2**18  # per sampled slice, at most (a fixed stride in y and x)


@dataclass(frozen=True)
class IntensityMapping:
    """How stored grey values become uint8: identity (8-bit), shift (16-bit >> 8) or percentile (linear)."""

    rule: str
    source_dtype: str
    low: float | None = None
    high: float | None = None
    percentiles: tuple[float, float] | None = None
    sample_slices: int | None = None

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """uint8 of ``raw`` (any shape); the same values give the same bytes in every slice."""
        if self.rule == "identity":
            return raw.astype(np.uint8, copy=False)
        if self.rule == "shift":
            return (raw >> 8).astype(np.uint8)
        work = np.float64 if raw.dtype.itemsize > 2 and raw.dtype != np.float32 else np.float32
        values = raw.astype(work)
        if self.high > self.low:
            values -= work(self.low)
            values *= work(255.0 / (self.high - self.low))
        else:  # a flat sample: everything above it is white
            values = np.where(values > self.low, 255.0, 0.0).astype(work)
        np.clip(values, 0, 255, out=values)
        np.rint(values, out=values)
        np.nan_to_num(values, copy=False, nan=0.0)
        return values.astype(np.uint8)

    def to_json(self) -> str:
        record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IntensityMapping:
        record = json.loads(text)
        if "percentiles" in record:
            record["percentiles"] = tuple(record["percentiles"])
        return cls(**record)


def sample_positions(depth: int, count: int) -> list[int]:
    """``count`` slice indices evenly spaced through ``depth`` slices, first and last included."""
    if depth <= count:
        return list(range(depth))
    return sorted({round(i * (depth - 1) / (count - 1)) for i in range(count)}) if count > 1 else [depth // 2]


def choose_mapping(source: Source, settings: dict[str, Any]) -> IntensityMapping:
    """The one mapping for ``source`` (kind image) from the convert section (intensity, percentiles, sample_slices)."""
    stored = np.dtype(source.dtype)
    if stored == np.uint8:
        return IntensityMapping("identity", "uint8")
    if stored == np.uint16 and settings["intensity"] == "shift":
        return IntensityMapping("shift", "uint16")
    low_pct, high_pct = (float(p) for p in settings["percentiles"])
    if not low_pct < high_pct:
        raise EmmitoError(f"convert.percentiles {settings['percentiles']}: the low percentile must be below the high one, e.g. [0.1, 99.9]")
    positions = sample_positions(source.shape[0], int(settings["sample_slices"]))
    height, width = source.shape[1:]
    stride = max(1, math.ceil(math.sqrt(height * width / SAMPLE_PIXELS)))
    samples = [source.read(z, z + 1)[0, ::stride, ::stride].astype(np.float64).ravel() for z in positions]
    values = np.concatenate(samples)
    values = values[np.isfinite(values)]
    if not values.size:
        raise EmmitoError(f"{source.name}: the sampled slices hold no finite values (all NaN or infinite): check the data")
    low, high = np.percentile(values, [low_pct, high_pct])
    return IntensityMapping("percentile", str(stored), float(low), float(high), (low_pct, high_pct), len(positions))
