"""EM augmentation of training patches, each kind switchable, deterministic given the numpy Generator.

Geometric kinds move image and target together; intensity and artefact kinds
change the image only, except ``misalignment``, which shifts one slice of both
(the target follows the tissue, so the network learns to ignore the jump).
The image is float32 (z, y, x) in normalised units (0 = mid grey, 1 = half
the 0-255 range); the target float32 (channel, z, y, x).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

AUGMENT_KINDS = (
    "flip",
    "rot90",
    "elastic",
    "intensity",
    "blur",
    "noise",
    "missing_section",
    "misalignment",
    "cutout",
)


def _flip(image: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    for axis in range(3):
        if rng.random() < 0.5:
            image, target = np.flip(image, axis), np.flip(target, axis + 1)
    if image.shape[1] == image.shape[2] and rng.random() < 0.5:
        image, target = image.transpose(0, 2, 1), target.transpose(0, 1, 3, 2)
    return image, target


def _rot90(image: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Odd quarter turns swap y and x, which only square patches survive.
    turns = int(rng.integers(4)) if image.shape[1] == image.shape[2] else 2 * int(rng.integers(2))
    return np.rot90(image, turns, axes=(1, 2)), np.rot90(target, turns, axes=(2, 3))


def _elastic(
    image: np.ndarray, target: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """One smooth in-plane displacement field (largest about ``alpha`` voxels) for all slices; target by nearest."""
    _, height, width = image.shape
    fields = []
    for _ in range(2):
        field = ndimage.gaussian_filter(rng.uniform(-1, 1, (height, width)), sigma, mode="constant")
        peak = np.abs(field).max()
        fields.append(field * (alpha / peak) if peak > 0 else field)
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    coords = np.array([yy + fields[0], xx + fields[1]])
    warped_image = np.stack([ndimage.map_coordinates(s, coords, order=1, mode="reflect") for s in image])
    warped_target = np.stack(
        [np.stack([ndimage.map_coordinates(s, coords, order=0, mode="reflect") for s in channel]) for channel in target]
    )
    return warped_image.astype(np.float32), warped_target.astype(np.float32)


def _intensity(image: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float, gamma: float) -> np.ndarray:
    image = image * np.float32(1.0 + contrast * rng.uniform(-1, 1)) + np.float32(brightness * rng.uniform(-1, 1))
    if gamma > 0:
        # Gamma on the 0-1 scale, then back: brightens or darkens mid-greys, keeps black and white.
        exponent = float(np.exp(rng.uniform(-gamma, gamma)))
        unit = np.clip((image + 1.0) * 0.5, 0.0, 1.0)
        image = (unit**exponent) * 2.0 - 1.0
    return image.astype(np.float32)


def augment_patch(
    image: np.ndarray, target: np.ndarray, rng: np.random.Generator, cfg: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one patch: ``image`` float32 (z, y, x), ``target`` float32 (channel, z, y, x) -> same shapes.

    ``cfg`` is the ``train`` config section: ``augment_kinds`` lists the kinds
    to use, each applied with probability ``augment_probability`` (flip and
    intensity every time, as their identity is one of their draws).
    """
    kinds = set(cfg["augment_kinds"])
    unknown = kinds - set(AUGMENT_KINDS)
    if unknown:
        raise ValueError(f"unknown augmentation kinds {sorted(unknown)}; known: {list(AUGMENT_KINDS)}")
    chance = cfg["augment_probability"]
    depth = image.shape[0]
    if "flip" in kinds:
        image, target = _flip(image, target, rng)
    if "rot90" in kinds:
        image, target = _rot90(image, target, rng)
    if "elastic" in kinds and rng.random() < chance:
        image, target = _elastic(image, target, rng, cfg["augment_elastic_alpha"], cfg["augment_elastic_sigma"])
    image = np.ascontiguousarray(image, dtype=np.float32)
    target = np.ascontiguousarray(target, dtype=np.float32)
    if "intensity" in kinds:
        image = _intensity(image, rng, cfg["augment_brightness"], cfg["augment_contrast"], cfg["augment_gamma"])
    if "blur" in kinds and rng.random() < chance:
        sigma = rng.uniform(0.0, cfg["augment_blur_sigma"])
        image = ndimage.gaussian_filter(image, (0, sigma, sigma)).astype(np.float32)
    if "noise" in kinds and rng.random() < chance:
        image = image + rng.normal(0.0, rng.uniform(0.0, cfg["augment_noise"]), image.shape).astype(np.float32)
    if "missing_section" in kinds and depth > 2 and rng.random() < chance:
        # A lost slice reads as flat grey; its target stays (the network must interpolate).
        image[int(rng.integers(1, depth - 1))] = 0.0
    if "misalignment" in kinds and depth > 2 and rng.random() < chance:
        z = int(rng.integers(1, depth))
        limit = cfg["augment_misalignment"]
        shift = (int(rng.integers(-limit, limit + 1)), int(rng.integers(-limit, limit + 1)))
        image[z] = ndimage.shift(image[z], shift, order=0, mode="nearest")
        for channel in target:
            channel[z] = ndimage.shift(channel[z], shift, order=0, mode="nearest")
    if "cutout" in kinds and rng.random() < chance:
        _, height, width = image.shape
        box_y, box_x = (max(1, int(s * rng.uniform(0.1, cfg["augment_cutout_fraction"]))) for s in (height, width))
        y0, x0 = int(rng.integers(0, height - box_y + 1)), int(rng.integers(0, width - box_x + 1))
        z0 = int(rng.integers(depth))
        image[z0, y0 : y0 + box_y, x0 : x0 + box_x] = np.float32(rng.uniform(-1, 1))
    return image, target
