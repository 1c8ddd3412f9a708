"""HDF5 volumes, atomic writes, clear errors, and the PNG/TIFF slice listing and PNG decoding.

Every volume emmito writes is an HDF5 file with one dataset (``contract.DATASET``),
chunked and compressed with Blosc-LZ4 (through ``hdf5plugin``; readers need
``import hdf5plugin``), carrying the attributes ``contract.BASE_KEYS`` (voxel
size, offset, version); ``emmito.contract`` lists every name and key.

Every file is written under a temporary name in its own folder and moved into
place with ``os.replace``, so a killed job never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
from PIL import Image

from emmito import __version__, contract
from emmito.contract import DATASET


class EmmitoError(Exception):
    """An expected user mistake. The CLI prints it as one line, without a traceback.

    The message names the file or config key at fault and says how to fix it.
    """


def compression() -> dict[str, Any]:
    """h5py dataset keywords for emmito's compression (Blosc-LZ4, byte shuffle).

    Measured here it writes at ~1 GVx/s against ~40 MVx/s for gzip, and the
    filter is deterministic, so the same data gives the same bytes.
    """
    return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))


def plain_compression() -> dict[str, Any]:
    """h5py dataset keywords for files that any HDF5 reader opens without a filter plugin (gzip).

    For the final products (seg.h5) that labs open in Fiji, MATLAB or ilastik.
    The upsample stage picks the level (benchmarks/seg_compression.py measures it).
    """
    return {"compression": "gzip", "compression_opts": 1, "shuffle": True}


def default_chunks(shape: tuple[int, ...], z: int = 8, yx: int = 256) -> tuple[int, ...]:
    """HDF5 chunk shape: a few slices deep so that z-ranges read cheaply, 256² in yx."""
    if len(shape) == 3:
        return (max(1, min(z, shape[0])), max(1, min(yx, shape[1])), max(1, min(yx, shape[2])))
    if len(shape) == 4:  # (channel, z, y, x)
        return (1, max(1, min(z, shape[1])), max(1, min(yx, shape[2])), max(1, min(yx, shape[3])))
    return tuple(max(1, min(yx, s)) for s in shape)


def _tmp_name(final: Path) -> Path:
    # Same folder, so os.replace is an atomic rename on the same file system.
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _remove_stale_temporaries(final: Path, own: Path) -> None:
    """Delete the temporary files that killed writers of ``final`` left (SIGKILL, a dead node).

    Only one job writes an output at a time (Snakemake locks the results), so any
    other temporary file of the same output belongs to a writer that is gone.
    """
    with contextlib.suppress(OSError):
        for stale in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
            if stale != own and not stale.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()


def _fsync(path: Path) -> None:
    # A node that dies right after the rename must not leave an empty file under the final name.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failure(final: Path, exc: OSError) -> EmmitoError | None:
    """A one-line EmmitoError for the write errors a user can fix (disk full, quota, permissions), else None.

    HDF5 reports a failed write as an OSError without ``errno``, naming it only in
    its message (``errno = 28, error message = 'No space left on device'``).
    """
    text = str(exc)
    if exc.errno == errno.ENOSPC or "No space left on device" in text or "errno = 28," in text:
        return EmmitoError(f"{final}: no space left on the device while writing it: free space or point results to a larger disk")
    if exc.errno == errno.EDQUOT or "Disk quota exceeded" in text or f"errno = {errno.EDQUOT}," in text:
        return EmmitoError(f"{final}: disk quota exceeded while writing it: free space, ask for more quota, or point results elsewhere")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text or "Read-only file system" in text:
        return EmmitoError(f"{final}: cannot write it ({exc.strerror or 'permission denied'}): check the folder's permissions, or point results elsewhere")
    return None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it into place only on success.

    On any exception (or SIGTERM, which ``emmito.cli`` turns into one) the
    temporary file is removed and nothing appears under the final name; a
    SIGKILLed writer's leftover is removed by the next write of the same file.
    A full disk, an exceeded quota or a folder that cannot be written raise a
    one-line EmmitoError naming ``final``.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        failure = _write_failure(final, exc)
        if failure is not None:
            raise failure from None
        raise EmmitoError(
            f"{final.parent}: cannot create this output folder ({exc.strerror}): a file is in the way or the path is wrong; fix the output path"
        ) from None
    tmp = _tmp_name(final)
    _remove_stale_temporaries(final, tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            tmp.unlink()
        failure = _write_failure(final, exc) if isinstance(exc, OSError) else None
        if failure is not None:
            raise failure from None
        raise


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; swap it into place only on success.

    Folders left by killed writers of the same output (Snakemake's lock means
    no other writer is alive) are removed first, each being as large as the output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        # os.replace cannot replace a non-empty folder: move the old one aside first.
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def create_volume(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    dtype: Any,
    *,
    voxel_size: tuple[float, float, float] | list[float],
    offset: int = 0,
    attrs: dict[str, Any] | None = None,
    chunks: tuple[int, ...] | None = None,
) -> Iterator[h5py.Dataset]:
    """Create ``path`` atomically and yield its empty ``main`` dataset for blockwise writes.

    The file appears under its final name only when the ``with`` block ends
    without an exception. Memory use is whatever the caller writes at a time.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            ds = f.create_dataset(
                DATASET,
                shape=shape,
                dtype=dtype,
                chunks=chunks or default_chunks(shape),
                track_times=False,
                fillvalue=0,
                **compression(),
            )
            ds.attrs[contract.VOXEL_SIZE] = np.asarray(voxel_size, dtype=np.float64)
            ds.attrs[contract.OFFSET] = int(offset)
            ds.attrs[contract.VERSION] = __version__
            for key, value in (attrs or {}).items():
                ds.attrs[key] = value
            yield ds


def write_volume(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    voxel_size: tuple[float, float, float] | list[float],
    offset: int = 0,
    attrs: dict[str, Any] | None = None,
    chunks: tuple[int, ...] | None = None,
) -> None:
    """Write a whole array as ``path``'s ``main`` dataset, atomically."""
    with create_volume(
        path, data.shape, data.dtype, voxel_size=voxel_size, offset=offset, attrs=attrs, chunks=chunks
    ) as ds:
        ds[...] = data


@contextlib.contextmanager
def open_volume(path: str | os.PathLike) -> Iterator[h5py.Dataset]:
    """Open ``path`` read-only and yield its ``main`` dataset.

    Raises EmmitoError, naming the file and the fix, when the file is missing,
    is not HDF5 (corrupt or truncated), or has no ``main`` dataset.
    """
    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: file not found: run the stage that makes it first (or check the path)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise EmmitoError(
            f"{path}: not a readable HDF5 file ({str(exc).split('(')[0].strip()}): it is corrupt or truncated; delete it and rerun the stage that makes it"
        ) from None
    with f:
        if DATASET not in f or not isinstance(f[DATASET], h5py.Dataset):
            found = ", ".join(sorted(f.keys())) or "nothing"
            raise EmmitoError(
                f"{path}: no '{DATASET}' dataset (found {found}): emmito volumes keep their data in '{DATASET}'; rewrite the file with that name"
            )
        yield f[DATASET]


def read_volume(
    path: str | os.PathLike, z_start: int | None = None, z_stop: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read slices [z_start, z_stop) (in the file's own index) of ``path``.

    Returns the array and the dataset's attributes. Only the requested slices
    are read, so memory is bounded by the range asked for.
    """
    with open_volume(path) as ds:
        try:
            data = ds[slice(z_start, z_stop)] if ds.ndim >= 1 else ds[()]
        except OSError as exc:
            raise EmmitoError(
                f"{path}: cannot read its data ({exc}): the file is corrupt or truncated; delete it and rerun the stage that makes it"
            ) from None
        return data, volume_attrs(ds)


def write_table(ds: h5py.Dataset, name: str, table: np.ndarray, columns: tuple[str, ...]) -> None:
    """Store ``table`` (int64 (rows, len(columns))) as dataset ``name`` beside ``ds`` in its file, columns named in an attribute.

    Uncompressed and contiguous (a few bytes per object), so any HDF5 reader
    opens it without a filter plugin; no timestamps, so same table, same bytes.
    """
    table = np.asarray(table, dtype=np.int64).reshape(-1, len(columns))
    table_ds = ds.file.create_dataset(name, data=table, track_times=False)
    table_ds.attrs[contract.SCORE_COLUMNS_ATTR] = list(columns)


def read_table(ds: h5py.Dataset, name: str, columns: tuple[str, ...]) -> np.ndarray | None:
    """The int64 table ``name`` beside ``ds`` (``write_table``), or None where the file has none.

    Raises a one-line EmmitoError naming the file when the table is not one of ``columns``.
    """
    if name not in ds.file:
        return None
    table_ds = ds.file[name]
    stored = table_ds.attrs.get(contract.SCORE_COLUMNS_ATTR)
    stored = None if stored is None else [str(c) for c in stored]
    if not isinstance(table_ds, h5py.Dataset) or table_ds.ndim != 2 or stored != list(columns):
        raise EmmitoError(
            f"{ds.file.filename}: '{name}' is not a table of columns {', '.join(columns)}: "
            "rerun the stage that wrote the file"
        )
    return np.asarray(table_ds[...], dtype=np.int64)


def volume_attrs(ds: h5py.Dataset) -> dict[str, Any]:
    """The emmito attributes of a dataset, with defaults for files made elsewhere (``contract.read_attrs``)."""
    return contract.read_attrs(ds)


def volume_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape of ``path``'s ``main`` dataset, without reading data."""
    with open_volume(path) as ds:
        return tuple(ds.shape)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically (same object, same bytes)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: file not found: run the stage that makes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EmmitoError(f"{path}: not valid JSON ({exc}): delete it and rerun the stage that makes it") from None


# ---- PNG and TIFF slices in ----------------------------------------------------------
# Users hand emmito a folder (or glob) of PNG or TIFF slices. Listing them must stay cheap
# (no decoding): the workflow lists every volume at parse time, on every cluster job.
# emmito.sources reads them (and the other input formats: TIFF stacks, HDF5, zarr, N5).

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KINDS = ("image", "image_raw", "label_binary", "label_instance", "label_vast")
SLICE_SUFFIXES = (".png", ".tif", ".tiff")
_COLOUR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def slice_number(path: str | os.PathLike) -> str | None:
    """The last run of digits in a file's stem as written (``images.081.png`` -> ``"081"``), or None."""
    match = _LAST_NUMBER.search(os.path.splitext(os.path.basename(os.fspath(path)))[0])
    return match.group(1) if match else None


def _is_slice_file(name: str) -> bool:
    return name.lower().endswith(SLICE_SUFFIXES) and not name.startswith(".")


def _slice_candidates(text: str) -> tuple[list[tuple[str, str]], str]:
    """(name, path) of the PNG/TIFF files a folder or glob names (unordered), and how to name the pattern in messages."""
    folder = os.path.expanduser(text)
    if os.path.isdir(folder):
        prefix = os.path.join(os.path.normpath(folder), "")  # "em/./x/" -> "em/x/", as Path(folder) / name spells it
        with os.scandir(folder) as entries:
            found = [(e.name, prefix + e.name) for e in entries if _is_slice_file(e.name)]
        where = f"folder {text}"
        if not found:
            raise EmmitoError(f"{where}: no .png or .tif files in it: point to the folder that holds the PNG or TIFF slices")
    else:
        found = [(os.path.basename(p), p) for p in glob.glob(folder)]
        found = [(name, p) for name, p in found if _is_slice_file(name)]
        where = f"pattern {text}"
        if not found:
            raise EmmitoError(
                f"{where}: no .png or .tif files match: give a folder of PNG or TIFF slices, a glob such as "
                "'em/images.*.png', a TIFF stack, or file.h5:/dataset (check the path)"
            )
    png = sum(name.lower().endswith(".png") for name, _ in found)
    if 0 < png < len(found):
        first_png = min(name for name, _ in found if name.lower().endswith(".png"))
        first_tif = min(name for name, _ in found if not name.lower().endswith(".png"))
        raise EmmitoError(
            f"{where}: holds both PNG ({first_png}) and TIFF ({first_tif}) slices: keep one format in the folder, "
            "or give a glob such as '*.tif' that names one"
        )
    return found, where


def _number_in_name(name: str) -> str | None:
    """``slice_number`` of a bare file name (the last run of digits before its last dot)."""
    dot = name.rfind(".")
    match = _LAST_NUMBER.search(name, 0, dot if dot > 0 else len(name))
    return match.group(1) if match else None


def slice_paths(pattern: str | os.PathLike) -> list[str]:
    """``list_slices`` as path strings (cheaper: no Path objects, for 100,000-slice volumes)."""
    found, where = _slice_candidates(str(pattern))
    numbered: dict[int, tuple[str, str]] = {}
    for name, path in found:
        digits = _number_in_name(name)
        if digits is None:
            raise EmmitoError(
                f"{where}: {name} has no number in its name: slices are ordered by the number in their names, "
                f"rename it (e.g. slice_0000{os.path.splitext(name)[1].lower()}) or move it out"
            )
        number = int(digits)
        if number in numbered:
            first, second = sorted([numbered[number][0], name])
            raise EmmitoError(
                f"{where}: {first} and {second} both have slice number {number}: keep one of them"
            )
        numbered[number] = (name, path)
    numbers = sorted(numbered)
    missing = numbers[-1] - numbers[0] + 1 - len(numbers)
    if missing:
        before, after = next((a, b) for a, b in zip(numbers, numbers[1:]) if b != a + 1)
        more = f" (and {missing - 1} more missing)" if missing > 1 else ""
        raise EmmitoError(
            f"{where}: slice number {before + 1} is missing between {numbered[before][0]} and {numbered[after][0]}{more}: "
            "add the missing slice(s) (a copy of a neighbour keeps the z spacing) or renumber the files"
        )
    return [numbered[n][1] for n in numbers]


def list_slices(pattern: str | os.PathLike) -> list[Path]:
    """The PNG or TIFF slices named by ``pattern``, ordered by the number in their names.

    ``pattern`` is a folder (every ``*.png``, or every ``*.tif``/``*.tiff``, in it;
    hidden files skipped) or a glob such as ``data/em/images.*.png``. The number is
    the last run of digits in the file's stem (``slice_0007.png``, ``images.081.tif``,
    ``mitos_3D.010.png``), so ``s2.png`` comes before ``s10.png``. The numbers must
    run without gaps or repeats, because slice order is z order. Only names are
    read, never pixels (one directory listing).

    Raises EmmitoError when nothing matches, PNG and TIFF slices are mixed, a name
    has no number, two names share a number, or a number is missing in the run.
    """
    return [Path(p) for p in slice_paths(pattern)]


def png_header(path: str | os.PathLike) -> tuple[int, int, int, str]:
    """(height, width, bit depth, colour type) from a PNG's IHDR, reading 33 bytes, no pixels.

    Colour type is one of grey, RGB, palette, grey+alpha, RGBA. Raises
    EmmitoError when the file is missing or not a PNG.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except FileNotFoundError:
        raise EmmitoError(f"{path}: file not found: check the path (was it moved while emmito ran?)") from None
    except OSError as exc:
        raise EmmitoError(f"{path}: cannot be read ({exc.strerror}): check its permissions") from None
    if len(head) < 33 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise EmmitoError(f"{path}: not a readable PNG (no PNG header; another format or a truncated file): re-export it as PNG")
    width, height = struct.unpack(">II", head[16:24])
    bit_depth, colour_code = head[24], head[25]
    if colour_code not in _COLOUR_TYPES:
        raise EmmitoError(f"{path}: not a readable PNG (unknown colour type {colour_code}): re-export it")
    return height, width, bit_depth, _COLOUR_TYPES[colour_code]


def _decode_png(path: Path) -> tuple[np.ndarray, str, list[int] | None, int, str]:
    """(pixels, PIL mode, palette, bit depth, colour type), without any mode conversion.

    Palette PNGs give their indices, not colours.
    """
    _, _, bit_depth, colour = png_header(path)
    # EM slices can pass PIL's decompression-bomb limit (~89 Mpixel, e.g. 16k x 16k);
    # these are the user's own files, so lift the limit while we read.
    bomb_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path, formats=["PNG"]) as im:
            im.load()
            pixels = np.asarray(im)
            palette = im.getpalette() if im.mode in ("P", "PA") else None
            mode = im.mode
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise EmmitoError(f"{path}: not a readable PNG ({str(exc) or type(exc).__name__}): re-export it") from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    if mode == "PA":  # palette + alpha: the index plane is what counts
        pixels, mode = pixels[..., 0], "P"
    return pixels, mode, palette, bit_depth, colour


def _palette_table(path: Path, palette: list[int] | None) -> np.ndarray:
    """The palette as a (256, 3) uint8 lookup table (missing entries black)."""
    if not palette:
        raise EmmitoError(f"{path}: palette PNG without a palette: re-export it")
    table = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    table[: len(colours)] = colours
    return table


def _present_values(values: np.ndarray) -> np.ndarray:
    """The distinct values of a uint8/uint16 array (bincount: much faster than np.unique)."""
    return np.flatnonzero(np.bincount(values.ravel()))


def _check_binary_values(path: Path, values: np.ndarray, allowed: tuple[int, ...], what: str) -> None:
    stray = np.setdiff1d(values, np.asarray(allowed))
    if stray.size:
        shown = ", ".join(str(int(v)) for v in stray[:8]) + (", ..." if stray.size > 8 else "")
        raise EmmitoError(
            f"{path}: binary mask ({what}) holds values other than {'/'.join(map(str, allowed))}: {shown}: "
            "export a clean 0/255 (or 0/1) mask, or use label_format instance if the values are instance ids"
        )


_SUPPORTED_MODES = ("1", "L", "I;16", "I;16B", "I", "P", "LA", "RGB", "RGBA")


def read_png_slice(path: str | os.PathLike, kind: str) -> np.ndarray:
    """Read one PNG slice as a 2D array (y, x). ``kind`` says what the pixels mean.

    image -> uint8 grey:
      - grey 8-bit as is; grey 1/2/4-bit stretched to 0..255;
      - grey 16-bit -> ``value >> 8``: a fixed rule, not a per-slice contrast
        stretch, so that all slices of a volume stay comparable (convert reads
        ``image_raw`` instead and maps the whole volume at once: emmito.sources);
      - palette -> the palette is applied; the colours used must be grey (R == G == B);
      - RGB / RGBA / grey+alpha whose R, G, B are equal -> that channel (alpha is
        ignored); 16-bit colour PNGs give their high byte, as for grey;
      - RGB with differing channels is refused (a colour image, not EM).
    image_raw -> the same, but 16-bit grey keeps its values (uint16), for
      emmito.sources' one intensity mapping per volume.
    label_binary -> uint8 0/1, 1 = mitochondrion: any non-zero pixel is 1.
      Palette PNGs are read by palette index, not colour. Values must be 0, 1 or
      the format's maximum (255; 65535 for 16-bit); anything else is refused
      with the values found (an anti-aliased export, or instance ids: use
      label_format instance).
    label_instance -> uint32 ids: grey 1-16-bit values (or palette indices) are
      the ids, 0 = background. Colour PNGs are refused (use label_format vast).
    label_vast -> uint32 ids from an 8-bit RGB(A) VAST export,
      id = R*65536 + G*256 + B (alpha ignored; a palette's colours are decoded the
      same way). Grey PNGs are refused (use label_format instance).

    Raises EmmitoError, naming the file and the fix, for unreadable, truncated
    or non-PNG files and for pixels that do not fit ``kind``.
    """
    path = Path(path)
    if kind not in PNG_KINDS:
        raise ValueError(f"kind must be one of {PNG_KINDS}, not {kind!r}")
    return _PNG_READERS[kind](path, _png_pixels(path))


@dataclass(frozen=True)
class _PngPixels:
    """A decoded PNG slice as ``read_png_slice`` sees it: grey+alpha already reduced to grey."""

    pixels: np.ndarray  # (y, x) grey or palette indices, (y, x, 3|4) colour
    mode: str  # PIL mode: 1, L, I;16, I;16B, I, P, RGB, RGBA
    palette: list[int] | None
    bit_depth: int
    colour: str  # from the header: grey, RGB, palette, grey+alpha, RGBA
    rgb: np.ndarray | None  # (y, x, 3) for RGB(A) modes, else None


def _png_pixels(path: Path) -> _PngPixels:
    pixels, mode, palette, bit_depth, colour = _decode_png(path)
    if mode not in _SUPPORTED_MODES:
        raise EmmitoError(f"{path}: PNG pixel mode {mode} is not supported: export 8/16-bit grey or 8-bit RGB")
    # PIL gives grey+alpha as LA (8-bit) or RGBA (16-bit, grey replicated); both drop alpha here.
    if mode == "LA":
        pixels, mode = pixels[..., 0], "L"
    rgb = pixels[..., :3] if mode in ("RGB", "RGBA") else None
    return _PngPixels(pixels, mode, palette, bit_depth, colour, rgb)


def _image_pixels(path: Path, png: _PngPixels) -> np.ndarray:
    """kind image: uint8 grey (see ``read_png_slice``); 16-bit grey by ``value >> 8``."""
    grey = _raw_image_pixels(path, png)
    return (grey >> 8).astype(np.uint8) if grey.dtype == np.uint16 else grey


def _raw_image_pixels(path: Path, png: _PngPixels) -> np.ndarray:
    """kind image_raw: grey values as stored, uint8, or uint16 for 16-bit grey (see ``read_png_slice``)."""
    pixels, mode, rgb = png.pixels, png.mode, png.rgb
    if mode == "P":
        table = _palette_table(path, png.palette)
        used = _present_values(pixels)
        if np.any(table[used, 0] != table[used, 1]) or np.any(table[used, 1] != table[used, 2]):
            raise EmmitoError(f"{path}: palette PNG with colour (not grey) entries: export it as greyscale")
        return table[:, 0][pixels]
    if rgb is not None:
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            raise EmmitoError(f"{path}: is colour (channels differ): export it as greyscale")
        return np.ascontiguousarray(rgb[..., 0])
    if mode == "1":
        return pixels.astype(np.uint8) * np.uint8(255)
    if png.bit_depth == 16:
        return pixels.astype(np.uint16)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def _binary_pixels(path: Path, png: _PngPixels) -> np.ndarray:
    """kind label_binary: uint8 0/1, with the values checked (see ``read_png_slice``)."""
    pixels, mode, rgb, bit_depth = png.pixels, png.mode, png.rgb, png.bit_depth
    if mode == "1":
        return pixels.astype(np.uint8)
    if rgb is not None:
        _check_binary_values(path, _present_values(rgb), (0, 1, 255), f"{png.colour} channels")
        return np.any(rgb != 0, axis=-1).astype(np.uint8)
    top = 65535 if bit_depth == 16 else 255
    what = "palette indices" if mode == "P" else f"{bit_depth}-bit grey"
    if mode == "P" or bit_depth >= 8:
        _check_binary_values(path, _present_values(pixels.astype(np.uint16)), (0, 1, top), what)
    return (pixels != 0).astype(np.uint8)


def _instance_pixels(path: Path, png: _PngPixels) -> np.ndarray:
    """kind label_instance: uint32 ids from grey values or palette indices (see ``read_png_slice``)."""
    pixels, bit_depth = png.pixels, png.bit_depth
    if png.rgb is not None:
        raise EmmitoError(
            f"{path}: label_format instance needs grey PNGs whose values are ids, this one is {png.colour}: "
            "use label_format vast for VAST RGB exports, or export grey ids"
        )
    if png.mode == "L" and bit_depth < 8:  # PIL stretched 2/4-bit grey to 0..255: undo it to get the ids
        return pixels.astype(np.uint32) // (255 // (2**bit_depth - 1))
    return pixels.astype(np.uint32)


def _vast_pixels(path: Path, png: _PngPixels) -> np.ndarray:
    """kind label_vast: uint32 ids R*65536 + G*256 + B (see ``read_png_slice``)."""
    rgb = png.rgb
    if png.mode == "P":
        rgb = _palette_table(path, png.palette)[png.pixels]
    elif rgb is None or png.colour not in ("RGB", "RGBA"):
        raise EmmitoError(
            f"{path}: label_format vast needs RGB PNGs (id = R*65536 + G*256 + B), this one is {png.colour}: "
            "use label_format instance for grey id images, or binary for masks"
        )
    elif png.bit_depth != 8:
        raise EmmitoError(f"{path}: VAST labels are 8-bit RGB, this one is {png.bit_depth}-bit: re-export it from VAST")
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


_PNG_READERS = {
    "image": _image_pixels,
    "image_raw": _raw_image_pixels,
    "label_binary": _binary_pixels,
    "label_instance": _instance_pixels,
    "label_vast": _vast_pixels,
}
