"""emmito view in a real browser: headless Chromium renders the export, and the screenshot shows the objects.

The xy panel shows the selected objects on the slice; the 3D panel shows their meshes.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from emmito import config, contract
from emmito.export import export_files
from test_export import measured

pytest.importorskip("tensorstore")
pytest.importorskip("neuroglancer")
pytest.importorskip("selenium")
from PIL import Image  # noqa: E402

from emmito import view  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(view.chromium_paths() is None, reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"),
]

VOXEL_SIZE = [40.0, 8.0, 8.0]
COLOURS = {7: (255, 0, 0), 3: (0, 0, 255)}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """Three boxes; 7 and 3 are the largest. Object 5 is on the shown slice too but not selected.

    ``ng`` has the meshes (as emmito measure writes them), ``ng_plain`` the same export without.
    """
    folder = tmp_path_factory.mktemp("view")
    image = np.full((12, 60, 80), 128, dtype=np.uint8)
    seg = np.zeros(image.shape, np.uint32)
    seg[2:11, 10:40, 10:40] = 7  # 8100 voxels, the largest: the view centres on it (slice 6)
    seg[4:9, 30:50, 50:75] = 3  # 2500 voxels
    seg[6, 52:58, 2:8] = 5  # 36 voxels
    contract.fixture(folder / "image.h5", "image", image, voxel_size=VOXEL_SIZE)
    contract.fixture(folder / "seg.h5", "seg", seg, voxel_size=VOXEL_SIZE)
    objects, meshes = measured(folder, seg, VOXEL_SIZE)
    params = config.with_defaults("export", {"chunk_size": [4, 32, 32], "pyramid_levels": 1, "shard_above_voxels": 0})
    export_files(folder / "seg.h5", folder / "image.h5", folder / "ng", params, objects, meshes)
    export_files(folder / "seg.h5", folder / "image.h5", folder / "ng_plain", params, objects)
    return folder / "ng", seg


def coloured_pixels(png: bytes | np.ndarray, colour: tuple[int, int, int]) -> int:
    """Pixels whose hue is ``colour`` blended over grey (the segmentation's 50 % opacity over the image)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int) if isinstance(png, bytes) else png
    strongest = int(np.argmax(colour))
    others = [c for c in range(3) if c != strongest]
    return int(((rgb[..., strongest] - rgb[..., others].max(axis=-1)) > 40).sum())


def not_grey(rgb: np.ndarray) -> int:
    return int((rgb.max(axis=-1) - rgb.min(axis=-1) > 40).sum())


def render(ng_dir, select: int, size: tuple[int, int], **state_changes) -> tuple[bytes, object]:
    """A screenshot of ``emmito view``'s state (``select`` largest objects), after ``state_changes``; and that state."""
    viewer, data, _ = view.start_viewer(ng_dir, select=select)
    driver = None
    try:
        with viewer.txn() as state:
            state.show_axis_lines = False
            state.show_default_annotations = False  # the volume's yellow bounding box
            for segment, colour in COLOURS.items():
                state.layers["segmentation"].segment_colors[segment] = "#%02x%02x%02x" % colour
            for key, value in state_changes.items():
                setattr(state, key, value)
        driver = view.open_headless(viewer.get_viewer_url())
        png = view.screenshot(viewer, size=size, timeout=120)
        return png, viewer.state
    finally:
        if driver is not None:
            driver.quit()
        data.stop()


def test_screenshot_shows_the_selected_objects(export, tmp_path):
    ng_dir, seg = export
    viewer, data, record = view.start_viewer(ng_dir, select=2)
    driver = None
    try:
        assert sorted(int(s) for s in viewer.state.layers["segmentation"].segments) == [3, 7]
        assert viewer.state.position[2] == 6.5  # centre slice of object 7
        with viewer.txn() as state:
            state.layout = "xy"  # the slice alone, so that every pixel of it can be counted
            state.cross_section_scale = 0.5  # 2 x 2 screen pixels per voxel
            state.show_axis_lines = False
            state.show_default_annotations = False  # the volume's yellow bounding box
            for segment, colour in COLOURS.items():
                state.layers["segmentation"].segment_colors[segment] = "#%02x%02x%02x" % colour
        driver = view.open_headless(viewer.get_viewer_url())
        png = view.screenshot(viewer, size=(400, 300), timeout=120)
    finally:
        if driver is not None:
            driver.quit()
        data.stop()
    (tmp_path / "screenshot.png").write_bytes(png)
    print(f"screenshot: {tmp_path / 'screenshot.png'}")
    if os.environ.get("EMMITO_SCREENSHOT"):
        with open(os.environ["EMMITO_SCREENSHOT"], "wb") as f:
            f.write(png)
    shown_slice = seg[6]
    for segment, colour in COLOURS.items():
        expected = 4 * int((shown_slice == segment).sum())
        assert expected > 0
        assert coloured_pixels(png, colour) == pytest.approx(expected, rel=0.03), f"object {segment}"
    # Object 5 is on the slice but not selected, so it must not be drawn: nothing else is coloured.
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    not_grey = int((rgb.max(axis=-1) - rgb.min(axis=-1) > 40).sum())
    assert not_grey == pytest.approx(4 * int(np.isin(shown_slice, [3, 7]).sum()), rel=0.03)


@pytest.mark.parametrize("meshes", [True, False])
def test_the_3d_panel_shows_the_meshes_of_the_selected_object(export, tmp_path, meshes):
    ng_dir, seg = export
    png, state = render(ng_dir if meshes else ng_dir.with_name("ng_plain"), select=1, size=(800, 400))
    (tmp_path / "screenshot.png").write_bytes(png)
    print(f"screenshot: {tmp_path / 'screenshot.png'}")
    assert state.layout.type == view.LAYOUT == "xy-3d" and state.show_slices is False
    assert [int(s) for s in state.layers["segmentation"].segments] == [7]
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    slice_panel, panel_3d = rgb[:, :395], rgb[:, 405:]
    assert coloured_pixels(slice_panel, COLOURS[7]) > 10_000  # object 7 on its centre slice, in both exports
    if meshes:
        # Object 7's mesh, in its colour; nothing else there (the slice planes are hidden, no other object selected).
        red = coloured_pixels(panel_3d, COLOURS[7])
        assert red > 0.05 * panel_3d.shape[0] * panel_3d.shape[1]
        assert not_grey(panel_3d) == pytest.approx(red, rel=0.05)
        assert coloured_pixels(panel_3d, COLOURS[3]) == 0
    else:
        assert not_grey(panel_3d) == 0, "coloured pixels in the 3D panel of an export without meshes"


def test_view_cli_screenshot(export, tmp_path):
    import subprocess
    import sys

    ng_dir, _ = export
    out = tmp_path / "cli.png"
    result = subprocess.run(
        [sys.executable, "-m", "emmito.cli", "view", str(ng_dir), "--screenshot", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert (rgb.max(axis=-1) - rgb.min(axis=-1) > 40).sum() > 1000, "no segmentation colour in the CLI screenshot"


def write_suggestions(export) -> tuple[object, list[dict]]:
    """suggestions.csv beside the export, from heat blocks where object 3 (not the largest) is the most uncertain."""
    from test_suggest import trace_record, write_heat_blocks

    from emmito import suggest
    from emmito.io import write_json

    ng_dir, seg = export
    folder = ng_dir.parent
    foreground = np.where(seg > 0, 230, 5).astype(np.uint8)
    uncertainty = np.where(seg == 3, 220, np.where(seg > 0, 10, 0)).astype(np.uint8)
    heat = write_heat_blocks(folder / "suggest", {"foreground": foreground, contract.UNCERTAINTY_CHANNEL: uncertainty}, 8, 2)
    contract.fixture(folder / "suggest" / "seg_infer.h5", "seg", seg, voxel_size=VOXEL_SIZE)
    write_json(folder / "suggest" / "trace.json", trace_record(seg, []))
    out = contract.suggestions_beside(ng_dir)
    params = config.with_defaults("suggest", {"rows_per_kind": 2})
    suggest.suggest_files(out, folder / "suggest" / "seg_infer.h5", folder / "seg.h5", folder / "objects.csv",
                          folder / "suggest" / "trace.json", heat, params)
    return out, suggest.read_suggestions(out)


def test_a_suggestion_opens_on_its_object(export, tmp_path):
    """The row's view state is applied: position, zoom and only its object selected, whose colour is on screen."""
    import argparse

    ng_dir, seg = export
    _, rows = write_suggestions(export)
    row = next(r for r in rows if r["kind"] == "uncertain_object" and r["kind_rank"] == "1")
    assert row["segment_id"] == "3"
    chosen = view.chosen_suggestion(argparse.Namespace(ng_dir=ng_dir, suggestion=int(row["rank"]), suggestions=None))
    assert chosen == row
    viewer, data, _ = view.start_viewer(ng_dir, select=0)
    driver = None
    try:
        view.apply_suggestion(viewer, chosen)
        state = viewer.state
        assert [int(s) for s in state.layers["segmentation"].segments] == [3]
        assert list(state.position) == [62.5, 40.0, 6.5]  # object 3: x 50-75, y 30-50, z 4-9 (slice 6)
        # four times its extent in 600 pixels, but no closer than the whole slice (80 voxels): 7.5 screen pixels per voxel
        assert state.cross_section_scale == pytest.approx(80 / 600, abs=1e-6)
        zoom = state.cross_section_scale
        with viewer.txn() as state:
            state.layout = "xy"  # the slice alone: 400 x 300 pixels show x 36-89, y 20-60, object 3 whole
            state.show_axis_lines = False
            state.show_default_annotations = False
            state.layers["segmentation"].segment_colors[3] = "#%02x%02x%02x" % COLOURS[3]
        driver = view.open_headless(viewer.get_viewer_url())
        png = view.screenshot(viewer, size=(400, 300), timeout=120)
    finally:
        if driver is not None:
            driver.quit()
        data.stop()
    (tmp_path / "suggestion.png").write_bytes(png)
    print(f"screenshot: {tmp_path / 'suggestion.png'}")
    expected = int((seg[6] == 3).sum()) / zoom**2
    assert coloured_pixels(png, COLOURS[3]) == pytest.approx(expected, rel=0.03)
    # Object 7, the largest, is in view (x 29-40) but not selected: nothing else is coloured.
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert not_grey(rgb) == pytest.approx(expected, rel=0.03)


def test_view_cli_opens_a_suggestion(export, tmp_path):
    import subprocess
    import sys

    ng_dir, seg = export
    _, rows = write_suggestions(export)
    rank = next(r["rank"] for r in rows if r["kind"] == "uncertain_object" and r["kind_rank"] == "1")
    out = tmp_path / "cli.png"
    command = [sys.executable, "-m", "emmito.cli", "view", str(ng_dir), "--suggestion", rank, "--screenshot", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert not_grey(rgb) > 1000, "no segmentation colour in the screenshot of the suggestion"
    command[command.index("--suggestion") + 1] = str(len(rows) + 1)
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"suggestions.csv: no suggestion {len(rows) + 1}: it has {len(rows)} rows" in lines[0]
