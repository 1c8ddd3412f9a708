"""Augmentation: each kind switchable, geometric kinds move image and target together, same seed same patch."""

from __future__ import annotations

import numpy as np
import pytest

from emmito.augment import AUGMENT_KINDS, augment_patch
from emmito.config import section_defaults


def cfg(kinds, probability=1.0) -> dict:
    return {**section_defaults("train"), "augment_kinds": list(kinds), "augment_probability": probability}


def patch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.5, (4, 16, 16)).astype(np.float32)
    target = (image > 0.3).astype(np.float32)[None]
    return image, target


@pytest.mark.parametrize("kind", AUGMENT_KINDS)
def test_each_kind_is_deterministic_by_seed_and_changes_the_patch(kind):
    image, target = patch()
    runs = [augment_patch(image.copy(), target.copy(), np.random.default_rng(seed), cfg([kind])) for seed in (3, 3, 4, 5)]
    (a_image, a_target), (b_image, b_target) = runs[0], runs[1]
    assert a_image.shape == image.shape and a_target.shape == target.shape
    assert a_image.dtype == a_target.dtype == np.float32
    assert np.array_equal(a_image, b_image) and np.array_equal(a_target, b_target)
    # Some seed changes the image (a flip may draw the identity for one seed, not for three).
    assert any(not np.array_equal(run_image, image) for run_image, _ in runs)


@pytest.mark.parametrize("kind", ["flip", "rot90", "elastic", "misalignment"])
def test_geometric_kinds_move_target_with_the_image(kind):
    # The target is the image's own sign, so after a shared transform it must still be the image's sign.
    image, _ = patch(1)
    image = np.where(image > 0, 1.0, -1.0).astype(np.float32)
    target = (image > 0).astype(np.float32)[None]
    for seed in range(4):
        out_image, out_target = augment_patch(image.copy(), target.copy(), np.random.default_rng(seed), cfg([kind]))
        agree = np.mean(out_target[0] == (out_image > 0))
        # Elastic interpolates the image linearly and the target by nearest: edges may differ by a voxel.
        assert agree == 1.0 if kind != "elastic" else agree > 0.85
        if kind == "elastic":
            assert not np.array_equal(out_target, target)


def test_intensity_only_kinds_leave_the_target_and_nothing_runs_when_disabled():
    image, target = patch()
    for kind in ("intensity", "blur", "noise", "missing_section", "cutout"):
        _, out_target = augment_patch(image.copy(), target.copy(), np.random.default_rng(0), cfg([kind]))
        assert np.array_equal(out_target, target)
    out_image, out_target = augment_patch(image.copy(), target.copy(), np.random.default_rng(0), cfg([]))
    assert np.array_equal(out_image, image) and np.array_equal(out_target, target)
    _, _ = augment_patch(image.copy(), target.copy(), np.random.default_rng(0), cfg(["elastic"], probability=0.0))
    missing, _ = augment_patch(image.copy(), target.copy(), np.random.default_rng(0), cfg(["missing_section"]))
    assert sum(bool(np.all(s == 0)) for s in missing) == 1
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_patch(image, target, np.random.default_rng(0), cfg(["warp"]))
