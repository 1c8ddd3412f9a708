"""emmito synth: the synthetic EM volume that the demo and the tests run on."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cc3d
import edt
import numpy as np
import pytest
from PIL import Image

from emmito import contract
from emmito.convert import convert_stack
from emmito.io import EmmitoError, list_slices, read_volume
from emmito.synth import synthesize, vast_rgb, write_slices


@pytest.fixture(scope="module")
def medium() -> tuple[np.ndarray, np.ndarray]:
    return synthesize(36, 128, seed=4)


def touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different ids that share a face (in y or x or z)."""
    pairs: set[tuple[int, int]] = set()
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)[:-1]
        b = np.moveaxis(labels, axis, 0)[1:]
        meet = (a != 0) & (b != 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[meet].tolist(), b[meet].tolist())}
    return pairs


def test_same_seed_same_arrays_other_seed_other_arrays():
    image_a, labels_a = synthesize(12, 64, seed=7)
    image_b, labels_b = synthesize(12, 64, seed=7)
    image_c, labels_c = synthesize(12, 64, seed=8)
    assert np.array_equal(image_a, image_b) and np.array_equal(labels_a, labels_b)
    assert not np.array_equal(image_a, image_c)
    assert not np.array_equal(labels_a, labels_c)


def test_shapes_dtypes_and_consecutive_ids(medium):
    image, labels = medium
    assert image.shape == labels.shape == (36, 128, 128)
    assert image.dtype == np.uint8 and labels.dtype == np.uint32
    count = int(labels.max())
    assert 8 <= count <= 60
    assert np.array_equal(np.unique(labels), np.arange(count + 1))


def test_foreground_fraction_and_density(medium):
    _, labels = medium
    assert 0.05 <= np.count_nonzero(labels) / labels.size <= 0.12
    _, sparse = synthesize(36, 128, seed=4, density=0.4)
    assert np.count_nonzero(sparse) < 0.6 * np.count_nonzero(labels)


def test_every_id_is_one_connected_object_and_some_touch(medium):
    _, labels = medium
    # Each id is a single 3D object (multi-label CC does not merge different ids).
    assert cc3d.connected_components(labels, connectivity=6).max() == labels.max()
    assert len(touching_pairs(labels)) >= 2
    # ... and a few objects are cut by the first or last slice.
    cut = (set(np.unique(labels[0])) | set(np.unique(labels[-1]))) - {0}
    assert 1 <= len(cut) <= labels.max() // 2


def test_objects_are_elongated_and_span_several_slices(medium):
    _, labels = medium
    boxes = cc3d.statistics(labels)["bounding_boxes"][1:]
    z_extent = np.array([b[0].stop - b[0].start for b in boxes])
    yx_extent = np.array([max(b[1].stop - b[1].start, b[2].stop - b[2].start) for b in boxes])
    assert np.median(z_extent) >= 4
    assert 15 <= np.median(yx_extent) <= 90


def test_looks_like_em_rim_darker_than_matrix_and_threshold_is_not_enough(medium):
    image, labels = medium
    foreground = labels > 0
    background_mean = image[~foreground].mean()
    assert image[foreground].mean() < background_mean - 25
    depth_inside = np.stack([edt.edt(s, black_border=False) for s in labels])
    rim = foreground & (depth_inside <= 2)
    matrix = foreground & (depth_inside >= 4)
    assert image[rim].mean() < image[matrix].mean() - 10
    # Distractors (membranes, vesicles, dark patches) keep any global threshold from segmenting.
    best_iou = max(
        np.count_nonzero((image < t) & foreground) / np.count_nonzero((image < t) | foreground)
        for t in range(60, 200, 5)
    )
    assert best_iou < 0.7
    # Textured, noisy background rather than flat grey.
    assert image[~foreground].std() > 10


def test_demo_size_is_fast():
    start = time.perf_counter()
    synthesize(72, 192, seed=3)
    assert time.perf_counter() - start < 8.0  # ~0.7 s alone on a shared 2-core VM


def test_vast_rgb_encoding():
    ids = np.array([[0, 1, 256], [65536, 66051, 2**24 - 1]], dtype=np.uint32)
    rgb = vast_rgb(ids)
    assert rgb.dtype == np.uint8
    assert rgb[1, 1].tolist() == [1, 2, 3]
    assert rgb[0, 2].tolist() == [0, 1, 0]
    with pytest.raises(EmmitoError):
        vast_rgb(np.array([[2**24]], dtype=np.uint32))


def test_written_pngs_round_trip_through_convert_and_are_byte_identical(tmp_path):
    image, labels = synthesize(10, 64, seed=2)
    write_slices(tmp_path / "a", image, labels)
    write_slices(tmp_path / "b", image, labels)
    names = [p.name for p in list_slices(tmp_path / "a" / "images")]
    assert names == [f"slice_{z:04d}.png" for z in range(10)]
    for folder in ("images", "labels"):
        for name in names:
            assert (tmp_path / "a" / folder / name).read_bytes() == (tmp_path / "b" / folder / name).read_bytes()
    with Image.open(tmp_path / "a" / "labels" / names[0]) as first_label:
        assert first_label.mode == "RGB"
    convert_stack(
        list_slices(tmp_path / "a" / "images"),
        voxel_size=(40, 8, 8),
        image_out=tmp_path / "image.h5",
        label_paths=list_slices(tmp_path / "a" / "labels"),
        label_format="vast",
        label_out=tmp_path / "label.h5",
    )
    image_back, _ = read_volume(tmp_path / "image.h5")
    labels_back, attrs = read_volume(tmp_path / "label.h5")
    assert np.array_equal(image_back, image)
    assert np.array_equal(labels_back, labels)
    assert attrs[contract.VOXEL_SIZE] == [40.0, 8.0, 8.0] and attrs[contract.OFFSET] == 0


def test_cli_writes_slices_and_drops_stale_ones(tmp_path):
    out = tmp_path / "syn"
    emmito = Path(sys.executable).parent / "emmito"
    for slices in (6, 4):  # a second, shallower run into the same folder
        result = subprocess.run(
            [str(emmito), "synth", str(out), "--slices", str(slices), "--size", "48", "--seed", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    assert len(list_slices(out / "images")) == 4
    assert len(list_slices(out / "labels")) == 4
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind
    image, labels = synthesize(4, 48, seed=1)
    with Image.open(out / "images" / "slice_0003.png") as last:
        assert np.array_equal(np.asarray(last), image[3])


@pytest.mark.bad_input
def test_too_small_or_zero_density_refused():
    with pytest.raises(EmmitoError, match="too small"):
        synthesize(4, 8, seed=0)
    with pytest.raises(EmmitoError, match="density"):
        synthesize(4, 32, seed=0, density=0)


def test_the_domain_knobs_default_to_the_bytes_synth_always_wrote():
    """contrast and object_scale (for transfer tests) at 1.0 leave every byte as before they existed."""
    import hashlib

    image, labels = synthesize(12, 64, seed=7)
    # Recorded with the synth of before the knobs (same numpy/scipy): the demo and the tests' data did not change.
    assert hashlib.sha256(image.tobytes() + labels.tobytes()).hexdigest()[:16] == "4be88e0abe25b25a"
    explicit = synthesize(12, 64, seed=7, contrast=1.0, object_scale=1.0)
    assert np.array_equal(explicit[0], image) and np.array_equal(explicit[1], labels)


def test_contrast_and_object_scale_make_another_domain():
    image, labels = synthesize(12, 96, seed=3)
    low, same_labels = synthesize(12, 96, seed=3, contrast=0.5)
    assert np.array_equal(same_labels, labels)  # contrast changes the look only
    inside, outside = labels > 0, labels == 0
    gap = float(image[outside].mean() - image[inside].mean())
    low_gap = float(low[outside].mean() - low[inside].mean())
    assert 0.4 * gap < low_gap < 0.6 * gap, (gap, low_gap)
    _, large = synthesize(12, 96, seed=3, object_scale=1.6)
    sizes = np.bincount(labels.ravel())[1:]
    large_sizes = np.bincount(large.ravel())[1:]
    assert np.median(large_sizes) > 1.8 * np.median(sizes), (np.median(sizes), np.median(large_sizes))
    with pytest.raises(EmmitoError, match="must be > 0"):
        synthesize(4, 32, seed=0, contrast=0)


def test_decoys_are_unlabelled_look_alikes_in_their_region_and_change_nothing_else():
    from scipy import ndimage

    from emmito.synth import _place_decoys

    region = (slice(None), slice(64, 192), slice(0, 128))
    plain_image, plain_labels = synthesize(12, 256, seed=5)
    image, labels = synthesize(12, 256, seed=5, decoys=10, decoy_region=region)
    assert np.array_equal(labels, plain_labels)  # decoys are not mitochondria: never labelled
    decoys = _place_decoys(5, labels, 10, region, 1.0)
    assert decoys.max() >= 8 and not (decoys > 0)[labels > 0].any()
    changed = image != plain_image
    near = ndimage.binary_dilation(decoys > 0, np.ones((1, 7, 7), bool))  # the microscope blur reaches ~3 px
    assert changed.any() and not changed[~near].any()
    # Their centres are in the region (they may reach a little past it).
    centres = ndimage.center_of_mass(decoys > 0, decoys, range(1, int(decoys.max()) + 1))
    assert all(60 <= y < 196 and x < 132 for _, y, x in centres if np.isfinite(y))
    # Paler than a mitochondrion inside, no cristae: a different look.
    assert image[decoys > 0].mean() > image[labels > 0].mean()
    with pytest.raises(EmmitoError, match="decoys -1 must be >= 0"):
        synthesize(4, 32, seed=0, decoys=-1)
