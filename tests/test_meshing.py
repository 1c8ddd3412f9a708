"""Known answers for emmito.meshing: sphere area and volume, tube length, meshes in nm in the volume frame.

Shapes are built in nm (a voxel belongs to a shape when its centre does), so
an anisotropic voxel size (40 x 8 x 8 nm) gives the same sphere or tube as an
isotropic one. Each test prints the figure it checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from emmito import meshing

SETTINGS = {"skeleton_scale": 1.5, "skeleton_const": 300, "skeleton_smoothing": 9}


def voxel_centres(shape: tuple[int, int, int], voxel_size: tuple[float, float, float]) -> list[np.ndarray]:
    """(z, y, x) nm of every voxel centre, the crop's centre at 0 (broadcastable open grids)."""
    return [((np.arange(n) + 0.5) * s - n * s / 2).reshape([-1 if a == axis else 1 for a in range(3)])
            for axis, (n, s) in enumerate(zip(shape, voxel_size))]


def sphere(radius_nm: float, voxel_size: tuple[float, float, float], pad: int = 3) -> np.ndarray:
    shape = tuple(2 * math.ceil(radius_nm / s) + 2 * pad for s in voxel_size)
    z, y, x = voxel_centres(shape, voxel_size)
    return z**2 + y**2 + x**2 <= radius_nm**2


def capsule(length_nm: float, radius_nm: float, voxel_size: tuple[float, float, float], axis: int, pad: int = 2) -> np.ndarray:
    """A straight tube with round ends along ``axis`` (0 z, 1 y, 2 x): ``length_nm`` tip to tip."""
    shape = tuple(
        math.ceil((length_nm / 2 if a == axis else radius_nm) / s) * 2 + 2 * pad for a, s in enumerate(voxel_size)
    )
    centres = voxel_centres(shape, voxel_size)
    along = np.maximum(np.abs(centres[axis]) - (length_nm / 2 - radius_nm), 0)
    across = sum(c**2 for a, c in enumerate(centres) if a != axis)
    return across + along**2 <= radius_nm**2


def cylinder(length_vox: int, radius_vox: float, axis: int) -> np.ndarray:
    """A flat-ended tube of ``length_vox`` voxels along ``axis``, isotropic voxels."""
    side = 2 * math.ceil(radius_vox) + 4
    shape = tuple(length_vox + 4 if a == axis else side for a in range(3))
    centres = voxel_centres(shape, (1.0, 1.0, 1.0))
    across = sum(c**2 for a, c in enumerate(centres) if a != axis)
    mask = np.broadcast_to(across <= radius_vox**2, shape).copy()
    cut = [slice(None)] * 3
    cut[axis] = np.r_[0:2, length_vox + 2 : length_vox + 4]
    mask[tuple(cut)] = False
    return mask


@pytest.mark.parametrize("voxel_size, radius_nm", [((1.0, 1.0, 1.0), 20.0), ((40.0, 8.0, 8.0), 800.0)])
def test_sphere_area_within_5_and_volume_within_2_percent(voxel_size, radius_nm):
    """Radius 20 voxels (isotropic), and 20 slices = 100 pixels at 40 x 8 x 8 nm."""
    mask = sphere(radius_nm, voxel_size)
    area = meshing.surface_area(mask, list(voxel_size))
    volume = int(mask.sum()) * float(np.prod(voxel_size))
    area_ratio = area / (4 * math.pi * radius_nm**2)
    volume_ratio = volume / (4 / 3 * math.pi * radius_nm**3)
    print(f"sphere r={radius_nm:g} nm at {voxel_size}: area / 4 pi r^2 = {area_ratio:.4f}, volume / (4/3 pi r^3) = {volume_ratio:.4f}")
    assert abs(area_ratio - 1) < 0.05
    assert abs(volume_ratio - 1) < 0.02
    # The unsmoothed marching cubes (zmesh) of the same mask is the bias the smoothing removes.
    raw = meshing._zmesh_mesh(mask, list(voxel_size), 0, 0.0)
    raw_ratio = meshing.triangle_areas(raw.vertices, raw.faces).sum() / (4 * math.pi * radius_nm**2)
    print(f"  unsmoothed marching cubes: {raw_ratio:.4f}")
    assert raw_ratio > 1.08


@pytest.mark.parametrize(
    "voxel_size, length_nm, radius_nm, axis",
    [
        ((1.0, 1.0, 1.0), 200.0, 6.0, 2),  # 200 voxels along x
        ((1.0, 1.0, 1.0), 200.0, 10.0, 0),  # 200 voxels along z
        ((40.0, 8.0, 8.0), 8000.0, 200.0, 0),  # 200 slices along z
        ((40.0, 8.0, 8.0), 1600.0, 100.0, 1),  # 200 pixels along y
    ],
)
def test_tube_skeleton_length_within_5_percent(voxel_size, length_nm, radius_nm, axis):
    mask = capsule(length_nm, radius_nm, voxel_size, axis)
    length = meshing.skeleton_length(mask, list(voxel_size), 1.5, 300 if voxel_size[0] > 1 else 10, 9)
    print(f"tube {length_nm:g} nm along axis {axis} at {voxel_size}: skeleton / length = {length / length_nm:.4f}")
    assert abs(length / length_nm - 1) < 0.05


def test_flat_ended_tube_and_the_smoothing_it_needs():
    """A flat-ended cylinder 200 voxels long: within 5 % smoothed; the raw voxel path zigzags and is far longer."""
    mask = cylinder(200, 10, axis=0)
    smoothed = meshing.skeleton_length(mask, [1.0, 1.0, 1.0], 1.5, 10, 9)
    raw = meshing.skeleton_length(mask, [1.0, 1.0, 1.0], 1.5, 10, 1)
    print(f"flat tube 200 voxels: smoothed {smoothed / 200:.4f}, unsmoothed {raw / 200:.4f}")
    assert abs(smoothed / 200 - 1) < 0.05
    assert raw / 200 > 1.2


def test_anisotropy_is_read_in_z_y_x_order():
    """The same 200-voxel tube along z and along x: 200 x 40 nm and 200 x 8 nm, not the other way round."""
    along_z = meshing.skeleton_length(capsule(8000.0, 200.0, (40.0, 8.0, 8.0), 0), [40.0, 8.0, 8.0], 1.5, 300, 9)
    along_x = meshing.skeleton_length(capsule(1600.0, 160.0, (40.0, 8.0, 8.0), 2), [40.0, 8.0, 8.0], 1.5, 300, 9)
    print(f"tube along z: {along_z:.0f} nm (8000), along x: {along_x:.0f} nm (1600)")
    assert abs(along_z / 8000 - 1) < 0.05 and abs(along_x / 1600 - 1) < 0.06
    # A box 2 x 5 x 10 voxels at 40 x 8 x 8 nm: 80 x 40 x 80 nm.
    box = np.zeros((6, 9, 14), bool)
    box[2:4, 2:7, 2:12] = True
    assert meshing.max_cross_section(box) == 50
    mesh = meshing.viewer_mesh(box, [40.0, 8.0, 8.0], (0, 0, 0), 0, 0.0)
    assert mesh.vertices.min(0).tolist() == [16.0, 16.0, 80.0]  # x, y, z nm: the box's low corner
    assert mesh.vertices.max(0).tolist() == [96.0, 56.0, 160.0]


def test_mesh_vertices_are_in_the_volume_frame_and_closed_at_the_crop_edge():
    """A box that fills its crop, at origin (z, y, x) = (10, 20, 30) voxels of 40 x 8 x 8 nm."""
    box = np.ones((3, 4, 5), bool)
    for reduction, max_error in ((0, 0.0), (10, 8.0)):  # simplified: no vertex moves more than max_error nm
        mesh = meshing.viewer_mesh(box, [40.0, 8.0, 8.0], (10, 20, 30), reduction, max_error)
        # x = 30 * 8, y = 20 * 8, z = 10 * 40 nm: the crop's low corner; the high one 5, 4, 3 voxels on
        assert np.abs(mesh.vertices.min(0) - [240.0, 160.0, 400.0]).max() <= max_error
        assert np.abs(mesh.vertices.max(0) - [280.0, 192.0, 520.0]).max() <= max_error
        # closed and wound outwards: the enclosed signed volume is positive
        corners = mesh.vertices[mesh.faces].astype(np.float64)
        signed = np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum() / 6
        assert signed > 0.7 * 3 * 4 * 5 * 40 * 8 * 8  # marching cubes cuts the corners of a small box
    full = meshing.viewer_mesh(sphere(20.0, (1.0, 1.0, 1.0)), [1.0, 1.0, 1.0], (0, 0, 0), 0, 0.0)
    simple = meshing.viewer_mesh(sphere(20.0, (1.0, 1.0, 1.0)), [1.0, 1.0, 1.0], (0, 0, 0), 10, 1.0)
    print(f"sphere mesh: {len(full.faces)} triangles, simplified {len(simple.faces)}")
    assert len(simple.faces) < len(full.faces) / 3


def test_thin_objects_keep_an_area():
    """One voxel, and a one-slice disc: too thin to smooth, they get the unsmoothed mesh's area."""
    one = meshing.surface_area(np.ones((1, 1, 1), bool), [40.0, 8.0, 8.0])
    assert one > 0
    disc = np.zeros((1, 41, 41), bool)
    yy, xx = np.mgrid[:41, :41]
    disc[0] = (yy - 20) ** 2 + (xx - 20) ** 2 <= 400
    area = meshing.surface_area(disc, [40.0, 8.0, 8.0])
    expected = 2 * math.pi * 160.0**2 + 2 * math.pi * 160.0 * 40.0
    print(f"one-slice disc: area / (2 pi r^2 + 2 pi r h) = {area / expected:.3f}")
    assert 0.8 < area / expected < 1.3


def test_centroid_and_measure_object_are_exact():
    mask = np.zeros((4, 6, 8), bool)
    mask[1:3, 2:4, 4:8] = True  # mean index (1.5, 2.5, 5.5)
    geometry = meshing.measure_object(mask, [40.0, 8.0, 8.0], (100, 0, 10), SETTINGS)
    assert geometry.voxels == 16
    assert geometry.centroid_nm == ((100 + 1.5 + 0.5) * 40.0, (2.5 + 0.5) * 8.0, (10 + 5.5 + 0.5) * 8.0)
    assert geometry.max_cross_section_voxels == 8
    assert geometry.surface_nm2 > 0 and geometry.length_nm > 0
    again = meshing.measure_object(mask.copy(), [40.0, 8.0, 8.0], (100, 0, 10), SETTINGS)
    assert again == geometry
