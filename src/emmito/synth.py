"""``emmito synth``: a synthetic EM-like volume with known mitochondria instances.

It is the demo's data and the tests' fixture, so it aims to look like serial-section
EM of neuropil (40 x 8 x 8 nm voxels) and to be learnable but not trivial:

- mitochondria are elongated capsules with a random in-plane orientation and a
  slight drift across slices, tapering at their z ends (ellipsoid-like); each has
  a dark double-membrane rim, a mid-grey matrix and cristae stripes across its
  long axis;
- a few pairs touch (separate instances sharing a face), a few are cut by the
  volume's first or last slice;
- the background is a smooth textured field with cell-membrane lines and small
  vesicles (dark rings and dots) that are not mitochondria, so that a threshold
  is not enough; Gaussian noise on top.

Sizes are given for 192-pixel slices and a 72-slice volume; smaller volumes shrink
the objects (to at most half) so that a 64^2 x 12 test volume still holds some.

Two knobs make a second imaging domain for transfer tests (the fine-tuning
test trains on one and fine-tunes on the other): ``object_scale`` scales the
mitochondria's in-plane size, ``contrast`` the image's deviation from the
background grey before noise. Both default to 1, which leaves every byte as
it was.

``decoys`` adds look-alikes that are not mitochondria and are not labelled:
pale tubular processes with a dark rim but no cristae (shaped like
mitochondria, longer and thinner), with their centres in ``decoy_region``
(default: anywhere), clear of the mitochondria. They are drawn from a random
stream of their own, so a volume with decoys has the same labels and, outside
the decoys, the same pixels as without; 0 (the default) leaves every byte as
it was. benchmarks/active_learning.py uses them as the part of a volume that a
model trained without them has not seen.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edt
import fastremap
import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from emmito.io import EmmitoError, atomic_path

# Foreground fraction at density 1: real neuropil EM (e.g. CDeep3M) has about 8 %.
BASE_FOREGROUND_FRACTION = 0.08
TOUCHING_PAIRS_PER_VOLUME = 3
CUT_BY_Z_ENDS = 2  # objects forced to cross the first and the last slice each

# Grey levels (0-255) of the rendered EM, before texture and noise.
BACKGROUND_GREY = 168.0
MATRIX_GREY = 118.0
RIM_GREY = 62.0
CRISTA_DARKENING = 34.0
MEMBRANE_GREY = 80.0
VESICLE_GREY = 88.0
NOISE_SIGMA = 11.0
DARK_PATCH_LEVEL = 1.9  # texture z-score above which cytoplasm turns dark (~3 % of it)
# Decoys (look-alike processes): paler than a mitochondrion's matrix, a lighter rim, no cristae.
DECOY_MATRIX_GREY = 126.0
DECOY_RIM_GREY = 72.0
DECOY_LENGTH, DECOY_WIDTH = 1.5, 0.7  # times a mitochondrion's drawn length and radius
DECOY_STREAM = 0x0DEC0  # their random stream: default_rng([seed, DECOY_STREAM])


@dataclass(frozen=True)
class Mitochondrion:
    """One capsule: centre (z, y, x) in voxels, in-plane angle (radians), drift per slice (y, x)."""

    centre: tuple[float, float, float]
    angle: float
    half_length: float  # centre to cap centre, px
    radius: float  # px
    half_depth: float  # slices from the centre to the z tip
    drift: tuple[float, float]


def _capsule_fields(
    body: Mitochondrion, shape: tuple[int, int, int]
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray] | None:
    """Normalised distance (<1 inside) and along-axis coordinate (px) in the body's bounding box.

    Returns (bounding box, distance / radius, along-axis coordinate), or None
    when the body misses the volume.
    """
    depth, height, width = shape
    zc, yc, xc = body.centre
    reach = body.half_length + body.radius + abs(body.drift[0]) * body.half_depth + abs(body.drift[1]) * body.half_depth
    z0, z1 = max(0, math.floor(zc - body.half_depth)), min(depth, math.ceil(zc + body.half_depth) + 1)
    y0, y1 = max(0, math.floor(yc - reach) - 1), min(height, math.ceil(yc + reach) + 2)
    x0, x1 = max(0, math.floor(xc - reach) - 1), min(width, math.ceil(xc + reach) + 2)
    if z0 >= z1 or y0 >= y1 or x0 >= x1:
        return None
    z = np.arange(z0, z1, dtype=np.float32)[:, None, None]
    y = np.arange(y0, y1, dtype=np.float32)[None, :, None]
    x = np.arange(x0, x1, dtype=np.float32)[None, None, :]
    # Ellipsoid-like taper: the cross-section shrinks towards the z tips.
    t = (z - zc) / body.half_depth
    taper = np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0)).astype(np.float32)
    dy = y - (yc + body.drift[0] * (z - zc))
    dx = x - (xc + body.drift[1] * (z - zc))
    along = dy * math.sin(body.angle) + dx * math.cos(body.angle)
    across = -dy * math.cos(body.angle) + dx * math.sin(body.angle)
    segment = body.half_length * taper
    beyond = np.maximum(np.abs(along) - segment, 0.0)
    radius = np.maximum(body.radius * taper, 1e-3)
    distance = np.sqrt(beyond * beyond + across * across) / radius
    return (
        (slice(z0, z1), slice(y0, y1), slice(x0, x1)),
        distance.astype(np.float32),
        np.broadcast_to(along, distance.shape),
    )


def _random_body(
    rng: np.random.Generator, shape: tuple[int, int, int], xy_scale: float, z_scale: float
) -> Mitochondrion:
    depth, height, width = shape
    radius = rng.uniform(6.0, 12.0) * xy_scale  # widths 12-24 px at full scale
    length = max(rng.uniform(30.0, 80.0) * xy_scale, 2.2 * radius)
    half_depth = rng.uniform(3.0, 10.0) * z_scale + 0.5  # z extents ~6-20 slices
    return Mitochondrion(
        centre=(
            # Mostly inside the volume; the planned end-cut bodies are placed separately.
            rng.uniform(min(0.8 * half_depth, (depth - 1) / 2), max(depth - 1 - 0.8 * half_depth, (depth - 1) / 2)),
            rng.uniform(0, height - 1),
            rng.uniform(0, width - 1),
        ),
        angle=rng.uniform(0, math.pi),
        half_length=length / 2 - radius,
        radius=radius,
        half_depth=half_depth,
        drift=(rng.normal(0, 0.4) * xy_scale, rng.normal(0, 0.4) * xy_scale),
    )


def _touching_partner(rng: np.random.Generator, body: Mitochondrion) -> Mitochondrion:
    """A roughly parallel body whose side presses against ``body`` (they overlap by ~2 px)."""
    radius = body.radius * rng.uniform(0.8, 1.1)
    gap = body.radius + radius - 2.0
    side = rng.choice([-1.0, 1.0])
    angle = body.angle + rng.normal(0, 0.15)
    zc, yc, xc = body.centre
    # Perpendicular to the axis, shifted a little along it so the pair is not a mirror image.
    shift = rng.uniform(-0.5, 0.5) * body.half_length
    centre = (
        zc + rng.uniform(-1.0, 1.0),
        yc - side * gap * math.cos(body.angle) + shift * math.sin(body.angle),
        xc + side * gap * math.sin(body.angle) + shift * math.cos(body.angle),
    )
    return Mitochondrion(
        centre=centre,
        angle=angle,
        half_length=body.half_length * rng.uniform(0.7, 1.1),
        radius=radius,
        half_depth=body.half_depth * rng.uniform(0.8, 1.0),
        drift=body.drift,
    )


def _body_scales(shape: tuple[int, int, int], object_scale: float) -> tuple[float, float]:
    """(in-plane, z) size factors of the bodies in a volume of ``shape``: small volumes get smaller ones."""
    depth, height, width = shape
    return float(np.clip(min(height, width) / 192.0, 0.5, 1.0)) * object_scale, float(np.clip(depth / 72.0, 0.35, 1.0))


def _place_mitochondria(
    rng: np.random.Generator, shape: tuple[int, int, int], density: float, object_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (uint32, consecutive from 1) and each voxel's along-axis coordinate (float32, px)."""
    depth, height, width = shape
    xy_scale, z_scale = _body_scales(shape, object_scale)
    labels = np.zeros(shape, dtype=np.uint32)
    nearest = np.full(shape, np.inf, dtype=np.float32)  # normalised distance to the owning body
    along = np.zeros(shape, dtype=np.float32)
    target_voxels = min(0.5, BASE_FOREGROUND_FRACTION * density) * labels.size
    margin = 4.0  # px kept free around isolated bodies, so only the planned pairs touch
    foreground = 0
    next_id = 1

    def stamp(body: Mitochondrion, free_only: bool, allowed: set[int] | None = None) -> bool:
        nonlocal foreground, next_id
        fields = _capsule_fields(body, shape)
        if fields is None:
            return False
        box, distance, coordinate = fields
        inside = distance < 1.0
        if inside.sum() < 20:
            return False
        if free_only:
            halo = distance < 1.0 + margin / body.radius
            taken = labels[box][halo]
            if np.any(taken[~np.isin(taken, list(allowed or set()) + [0])]):
                return False
        # Where two bodies overlap, each voxel goes to the one it is deeper inside.
        win = inside & (distance < nearest[box])
        nearest[box][win] = distance[win]
        labels[box][win] = next_id
        along[box][win] = coordinate[win]
        foreground += int(inside.sum())
        next_id += 1
        return True

    def place(first_z: float | None = None, partner: bool = False) -> None:
        for _ in range(200):
            body = _random_body(rng, shape, xy_scale, z_scale)
            if first_z is not None:
                body = Mitochondrion(
                    (first_z, *body.centre[1:]), body.angle, body.half_length, body.radius, body.half_depth, body.drift
                )
            if not partner:
                if stamp(body, free_only=True):
                    return
                continue
            if not stamp(body, free_only=True):
                continue
            first_id = next_id - 1
            for _ in range(20):
                if stamp(_touching_partner(rng, body), free_only=True, allowed={first_id}):
                    return
            return

    for end in range(CUT_BY_Z_ENDS):
        place(first_z=rng.uniform(-1.0, 2.0) if end % 2 == 0 else depth - 1 - rng.uniform(-1.0, 2.0))
    for _ in range(TOUCHING_PAIRS_PER_VOLUME):
        place(partner=True)
    attempts = 0
    while foreground < target_voxels and attempts < 4000:
        place()
        attempts += 1
    # Bodies can lose voxels to a neighbour; renumber so the ids stay 1..n in raster order.
    labels, _ = fastremap.renumber(labels, in_place=True, preserve_zero=True)
    return labels.astype(np.uint32, copy=False), along


def _place_decoys(
    seed: int, labels: np.ndarray, count: int, region: tuple[slice, slice, slice] | None, object_scale: float
) -> np.ndarray:
    """Ids (uint32, 0 = none) of ``count`` decoy bodies centred in ``region``, kept 3 px clear of the mitochondria.

    Drawn from ``default_rng([seed, DECOY_STREAM])`` alone: the main stream, and so the labels and
    every other pixel, are the same as without them. Where two decoys overlap, the voxel goes to
    the one it is deeper inside.
    """
    rng = np.random.default_rng([seed, DECOY_STREAM])
    shape = labels.shape
    xy_scale, z_scale = _body_scales(shape, object_scale)
    bounds = [axis.indices(n)[:2] for axis, n in zip(region or (slice(None),) * 3, shape)]
    clear = ~ndimage.binary_dilation(labels > 0, structure=np.ones((1, 7, 7), bool))
    ids = np.zeros(shape, dtype=np.uint32)
    nearest = np.full(shape, np.inf, dtype=np.float32)
    for number in range(1, count + 1):
        body = _random_body(rng, shape, xy_scale, z_scale)
        centre = tuple(float(rng.uniform(low, max(low, high - 1))) for low, high in bounds)
        body = Mitochondrion(centre, body.angle, body.half_length * DECOY_LENGTH, body.radius * DECOY_WIDTH,
                             body.half_depth, body.drift)
        fields = _capsule_fields(body, shape)
        if fields is None:
            continue
        box, distance, _ = fields
        win = (distance < 1.0) & clear[box] & (distance < nearest[box])
        nearest[box][win] = distance[win]
        ids[box][win] = number
    return ids


def _paint_decoys(image: np.ndarray, decoys: np.ndarray, mottle: np.ndarray) -> None:
    """Draw the decoy bodies (ids, 0 = none) into ``image`` in place: a ~2 px rim, a pale mottled inside."""
    inner = np.empty(decoys.shape, dtype=np.float32)
    for z in range(decoys.shape[0]):
        inner[z] = edt.edt(decoys[z], black_border=False, parallel=1)
    where = decoys > 0
    rim = np.clip((3.0 - inner[where]) / 1.5, 0, 1)
    image[where] = rim * DECOY_RIM_GREY + (1 - rim) * (DECOY_MATRIX_GREY + 6.0 * mottle[where])


def _membranes(rng: np.random.Generator, shape: tuple[int, int, int], count: int) -> np.ndarray:
    """Darkness 0..1 of thin, wavy cell-membrane sheets (lines in each slice)."""
    depth, height, width = shape
    z = np.arange(depth, dtype=np.float32)[:, None, None]
    y = np.arange(height, dtype=np.float32)[None, :, None]
    x = np.arange(width, dtype=np.float32)[None, None, :]
    darkness = np.zeros(shape, dtype=np.float32)
    for _ in range(count):
        angle = rng.uniform(0, math.pi)
        normal_y, normal_x = math.sin(angle), math.cos(angle)
        origin = rng.uniform(0, height), rng.uniform(0, width)
        tilt = rng.normal(0, 0.6)  # px per slice: membranes are not parallel to z
        wave_amplitude, wave_period, phase = rng.uniform(2, 8), rng.uniform(40, 120), rng.uniform(0, 2 * math.pi)
        along = -(y - origin[0]) * normal_x + (x - origin[1]) * normal_y
        signed = (y - origin[0]) * normal_y + (x - origin[1]) * normal_x + tilt * z
        signed = signed + wave_amplitude * np.sin(2 * math.pi * along / wave_period + phase)
        thickness = rng.uniform(0.8, 1.4)
        np.maximum(darkness, np.exp(-0.5 * (signed / thickness) ** 2), out=darkness)
    return darkness


def _vesicles(rng: np.random.Generator, shape: tuple[int, int, int], count: int) -> np.ndarray:
    """Darkness 0..1 of small vesicles: rings (radius 2.5-5 px) and dense dots, 1-3 slices deep."""
    depth, height, width = shape
    darkness = np.zeros(shape, dtype=np.float32)
    for _ in range(count):
        radius = rng.uniform(2.5, 5.0)
        ring = rng.random() < 0.7
        zc, yc, xc = rng.uniform(0, depth), rng.uniform(0, height), rng.uniform(0, width)
        z0, z1 = int(zc), min(depth, int(zc) + int(rng.integers(1, 4)))
        y0, y1 = max(0, int(yc - radius - 2)), min(height, int(yc + radius + 3))
        x0, x1 = max(0, int(xc - radius - 2)), min(width, int(xc + radius + 3))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        r = np.sqrt((yy - yc) ** 2 + (xx - xc) ** 2)
        dark = np.exp(-0.5 * ((r - radius) / 0.8) ** 2) if ring else (r < radius * 0.7).astype(np.float32) * 0.9
        region = darkness[z0:z1, y0:y1, x0:x1]
        np.maximum(region, dark[None], out=region)
    return darkness


def _render(
    rng: np.random.Generator, labels: np.ndarray, along: np.ndarray, contrast: float = 1.0, decoys: np.ndarray | None = None
) -> np.ndarray:
    """The EM image (uint8) for the given instances; ``contrast`` scales its deviation from the background grey;
    ``decoys``: ids of look-alike bodies to draw (``_place_decoys``), or None."""
    shape = labels.shape
    depth, height, width = shape
    area_scale = height * width / 192.0**2
    volume_scale = area_scale * depth / 72.0

    # Cytoplasm texture: a smooth field, correlated across slices a little (z is 5x coarser).
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.7, 5.0, 5.0))
    texture /= texture.std() + 1e-6
    mottle = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.5, 1.5, 1.5))
    mottle /= mottle.std() + 1e-6
    shading = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(2.0, 24.0, 24.0))
    shading /= shading.std() + 1e-6
    image = BACKGROUND_GREY + 10.0 * shading + 10.0 * texture + 5.0 * mottle

    # Distractors: never drawn over mitochondria (membranes do not cross them in real EM).
    inside_or_near = ndimage.binary_dilation(labels > 0, structure=np.ones((1, 5, 5), bool))
    membranes = _membranes(rng, shape, count=max(2, round(6 * math.sqrt(area_scale))))
    vesicles = _vesicles(rng, shape, count=max(4, round(120 * volume_scale)))
    distractor = np.maximum(membranes * (BACKGROUND_GREY - MEMBRANE_GREY), vesicles * (BACKGROUND_GREY - VESICLE_GREY))
    # Dense cytoplasm patches as dark as a mitochondrion's matrix but without its rim and cristae.
    patches = np.clip((texture - DARK_PATCH_LEVEL) / 0.6, 0, 1) * (BACKGROUND_GREY - MATRIX_GREY - 8.0)
    distractor = np.maximum(distractor, patches)
    distractor[inside_or_near] = 0
    image -= distractor

    # Mitochondria: depth inside the object in px, per slice (z is too coarse to count).
    # edt treats every id as its own region, so touching objects each get their own rim.
    inner = np.empty(shape, dtype=np.float32)
    for z in range(depth):
        inner[z] = edt.edt(labels[z], black_border=False, parallel=1)
    objects = labels > 0
    n_objects = int(labels.max())
    # Per-object cristae spacing and phase, looked up by id.
    period = rng.uniform(5.0, 8.0, size=n_objects + 1).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, size=n_objects + 1).astype(np.float32)
    matrix_shift = rng.normal(0, 6.0, size=n_objects + 1).astype(np.float32)
    ids = labels[objects]
    depth_inside = inner[objects]
    stripes = np.cos(2 * math.pi * along[objects] / period[ids] + phase[ids])
    crista = np.clip((stripes - 0.3) / 0.7, 0, 1) * np.clip((depth_inside - 2.5) / 1.5, 0, 1)
    matrix = MATRIX_GREY + matrix_shift[ids] + 4.0 * mottle[objects] - CRISTA_DARKENING * crista
    rim = np.clip((3.0 - depth_inside) / 1.5, 0, 1)  # the outer ~2 px: double membrane
    image[objects] = rim * RIM_GREY + (1 - rim) * matrix
    if decoys is not None:
        _paint_decoys(image, decoys, mottle)

    # Microscope blur, slice brightness jitter, then shot/detector noise.
    image = ndimage.gaussian_filter(image, sigma=(0, 0.8, 0.8))
    image *= rng.normal(1.0, 0.02, size=(depth, 1, 1)).astype(np.float32)
    if contrast != 1.0:
        image = BACKGROUND_GREY + np.float32(contrast) * (image - BACKGROUND_GREY)
    image += NOISE_SIGMA * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def synthesize(
    slices: int,
    size: int,
    seed: int,
    density: float = 1.0,
    contrast: float = 1.0,
    object_scale: float = 1.0,
    decoys: int = 0,
    decoy_region: tuple[slice, slice, slice] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic EM volume and its mitochondria.

    Returns (image uint8 (z, y, x) of shape (slices, size, size), instance ids
    uint32 of the same shape, 0 = background, ids consecutive from 1). ``density``
    scales the number of mitochondria (1.0: about 8 % foreground); ``contrast``
    scales every grey level's distance from the background's (1.0: the default
    look; 0.5: half as contrasted, before the same noise); ``object_scale`` scales
    their in-plane widths and lengths (1.0: 12-24 px wide at 192 px slices).
    ``decoys``: that many unlabelled look-alike processes (see the module), centred
    in ``decoy_region`` (z, y, x slices; None: the whole volume). Same arguments,
    same arrays.
    """
    if slices < 1 or size < 16:
        raise EmmitoError(f"synth: --slices {slices} --size {size} is too small: use at least 1 slice of 16x16")
    if not density > 0:
        raise EmmitoError(f"synth: --density {density} must be > 0 (1.0 gives about 8 % mitochondria)")
    if not contrast > 0 or not object_scale > 0:
        raise EmmitoError(f"synth: contrast {contrast} and object scale {object_scale} must be > 0 (1.0 gives the default look)")
    if decoys < 0:
        raise EmmitoError(f"synth: decoys {decoys} must be >= 0 (0 draws none)")
    rng = np.random.default_rng(seed)
    shape = (slices, size, size)
    labels, along = _place_mitochondria(rng, shape, density, object_scale)
    image = _render(rng, labels, along, contrast, _place_decoys(seed, labels, decoys, decoy_region, object_scale) if decoys else None)
    return image, labels


def vast_rgb(labels: np.ndarray) -> np.ndarray:
    """uint32 ids (y, x) -> uint8 RGB (y, x, 3) with id = R*65536 + G*256 + B (VAST's export)."""
    if labels.size and int(labels.max()) >= 2**24:
        raise EmmitoError(f"an id of {int(labels.max())} does not fit VAST's 24-bit RGB encoding")
    ids = labels.astype(np.uint32)
    return np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], axis=-1).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    # No timestamp or text chunks: the same pixels give the same bytes.
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=6)


def _remove_stale_slices(folder: Path, keep: int) -> None:
    """Delete slice_NNNN.png files from an earlier, deeper synth run into the same folder."""
    for old in folder.glob("slice_*.png"):
        number = old.stem.removeprefix("slice_")
        if number.isdigit() and int(number) >= keep:
            old.unlink()


def write_slices(out_dir: Path, image: np.ndarray, labels: np.ndarray) -> None:
    """Write OUT_DIR/images/slice_0000.png (8-bit grey) and OUT_DIR/labels/... (VAST RGB)."""
    digits = max(4, len(str(image.shape[0] - 1)))
    for folder in ("images", "labels"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        _remove_stale_slices(out_dir / folder, image.shape[0])
    for z in tqdm(range(image.shape[0]), desc="synth: writing slices", unit="slice", file=sys.stderr):
        name = f"slice_{z:0{digits}d}.png"
        _write_png(out_dir / "images" / name, image[z])
        _write_png(out_dir / "labels" / name, vast_rgb(labels[z]))


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito synth OUT_DIR --slices N --size S --seed K --density D``."""
    image, labels = synthesize(args.slices, args.size, args.seed, args.density)
    write_slices(Path(args.out_dir), image, labels)
    foreground = float(np.count_nonzero(labels)) / labels.size
    print(
        f"synth: {args.slices} slices of {args.size}x{args.size}, {int(labels.max())} mitochondria, "
        f"{100 * foreground:.1f} % foreground -> {args.out_dir}",
        file=sys.stderr,
    )
