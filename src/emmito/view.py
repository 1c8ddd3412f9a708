"""``emmito view NG_DIR``: look at an export in neuroglancer, served from this machine.

Two local servers, both from the ``neuroglancer`` Python package (its wheel
bundles the client, so nothing is downloaded):

- a static file server for the precomputed folders (``OUT_DIR/image``,
  ``OUT_DIR/segmentation``), with CORS and HTTP range requests, which the
  client needs for sharded volumes;
- ``neuroglancer.Viewer``, whose page loads them as ``precomputed://http://...``.

Serving the export rather than ``LocalVolume`` over the HDF5 files means the
browser reads the same multiscale, sharded chunks a lab would put on a web or
bucket server, the Python side only serves files (memory does not grow with
the volume), and the view checks the export itself.

The view opens with the image and the segmentation on top, the largest
objects selected (their sizes come from ``objects.json``, which export
writes), x/y/z in nm, and the position on the centre of the largest object so
that the first slice shown contains objects. Beside the xy slice a 3D panel
shows the selected objects' meshes (export copies them into the segmentation),
seen obliquely and without the slice planes, which would hide half of each.

``--suggestion N`` opens row N (its rank, from 1) of the suggestions.csv
beside NG_DIR (``contract.suggestions_beside``: ``results/<vol>/ng`` ->
``results/<vol>/suggestions.csv``; ``--suggestions CSV`` names another): the
row's view state (``contract.SUGGESTION_VIEW_KEYS``: position, zoom, 3D scale,
the selected object) replaces the largest objects' view.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from emmito import contract
from emmito.export import IMAGE_LAYER, OBJECTS_FILE, SEGMENTATION_LAYER
from emmito.io import EmmitoError, atomic_path, read_json
from emmito.suggest import OBJECT_PROJECTION, OBJECT_ZOOM, box_position, box_projection_scale, box_zoom, suggestion_row

# Flags that make Chromium render WebGL in software on a machine without a GPU
# or a display (see the neuroglancer note: SwiftShader through ANGLE).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # required as root, harmless otherwise
    "--disable-dev-shm-usage",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The panels: the xy slice on the left, the 3D view (meshes) on the right.
LAYOUT = "xy-3d"
# The 3D view's camera: tilted 30 degrees about x, then 20 about y (a quaternion x, y, z, w), so boxes show three faces.
_TILT_X, _TILT_Y = math.radians(30), math.radians(20)
PROJECTION_ORIENTATION = (
    math.sin(_TILT_X / 2) * math.cos(_TILT_Y / 2),
    math.cos(_TILT_X / 2) * math.sin(_TILT_Y / 2),
    -math.sin(_TILT_X / 2) * math.sin(_TILT_Y / 2),
    math.cos(_TILT_X / 2) * math.cos(_TILT_Y / 2),
)


def _neuroglancer() -> Any:
    try:
        import neuroglancer
    except ImportError:
        raise EmmitoError("emmito view needs the neuroglancer package: pip install 'emmito[view]' (or pip install neuroglancer)") from None
    return neuroglancer


def load_export(ng_dir: Path) -> dict[str, Any]:
    """The objects.json record of an export folder, after checking both layers are there."""
    ng_dir = Path(ng_dir)
    for layer in (IMAGE_LAYER, SEGMENTATION_LAYER):
        if not (ng_dir / layer / "info").exists():
            raise EmmitoError(
                f"{ng_dir}: no {layer}/info in it: point to the folder emmito export wrote (results/<vol>/ng), "
                "or run the export (snakemake results/<vol>/ng)"
            )
    return read_json(ng_dir / OBJECTS_FILE)


def largest_objects(record: dict[str, Any], count: int) -> list[int]:
    """The ids of the ``count`` largest objects by voxel count (ties: smaller id first)."""
    objects = record["objects"]
    ranked = sorted(objects, key=lambda i: (-objects[i]["voxels"], int(i)))
    return [int(i) for i in ranked[:count]]


def initial_position(record: dict[str, Any], selected: list[int]) -> list[float]:
    """Viewer position (x, y, z in voxels): the centre of the first selected object, else of the volume.

    The z is an integer slice plus 0.5 (a voxel's centre) so that the slice
    shown is exactly that slice.
    """
    return box_position(_first_box(record, selected))


def _first_box(record: dict[str, Any], selected: list[int]) -> list[int]:
    """The first selected object's bounding box (z0, y0, x0, z1, y1, x1, full-resolution voxels), else the volume's."""
    return list(record["objects"][str(selected[0])]["bbox"]) if selected else [0, 0, 0, *record["shape"]]


def initial_zoom(record: dict[str, Any], selected: list[int], view_pixels: int = 600) -> float:
    """Voxels per screen pixel: the whole slice in ``view_pixels``, or closer when the largest object is small.

    Closer means about 4 times the first selected object's extent in view, so
    that on a 4k slice the object is not a speck but its neighbourhood shows.
    """
    return box_zoom(_first_box(record, selected), record["shape"], OBJECT_ZOOM if selected else 1.0, view_pixels)


def initial_projection_scale(record: dict[str, Any], selected: list[int]) -> float:
    """Height of the 3D view in the finest voxel's units: 3 times the first selected object's largest extent, else the volume's."""
    return box_projection_scale(_first_box(record, selected), record[contract.VOXEL_SIZE], OBJECT_PROJECTION if selected else 1.5)


class DataServer:
    """Serves a folder over HTTP (CORS, range requests) on ``bind``:``port`` in a background thread."""

    def __init__(self, folder: Path, bind: str = "127.0.0.1", port: int = 0) -> None:
        import neuroglancer.random_token
        import neuroglancer.server
        import tornado.httpserver
        import tornado.netutil
        import tornado.web
        from neuroglancer.async_util import BackgroundTornadoServer
        from neuroglancer.static_file_server import CorsStaticFileHandler

        # Empty chunks and shards are never written, so the client's 404s for them are normal.
        logging.getLogger("tornado.access").setLevel(logging.ERROR)
        token = neuroglancer.random_token.make_random_token()
        outer = self

        class _Server(BackgroundTornadoServer):
            def _attempt_to_start_server(self) -> None:
                app = tornado.web.Application([(rf"/{token}/(.*)", CorsStaticFileHandler, {"path": str(folder)})])
                self.http_server = tornado.httpserver.HTTPServer(app)
                sockets = tornado.netutil.bind_sockets(port=port, address=bind)
                self.http_server.add_sockets(sockets)
                actual_port = sockets[0].getsockname()[1]
                outer.url = f"{neuroglancer.server._get_regular_server_url(bind, actual_port)}/{token}"

        self.url = ""
        try:
            self._server = _Server(daemon=True)
        except OSError as exc:
            raise EmmitoError(f"cannot serve the data on {bind}:{port} ({exc.strerror}): pick another --port") from None

    def stop(self) -> None:
        self._server.stop()


def start_viewer(
    ng_dir: Path, bind: str = "127.0.0.1", port: int = 0, select: int = 5
) -> tuple[Any, DataServer, dict[str, Any]]:
    """Serve ``ng_dir`` and open a neuroglancer viewer on it.

    Returns (viewer, data server, objects.json record); stop the data server
    when done. ``port`` 0 picks free ports; otherwise the viewer gets ``port``
    and the data ``port + 1`` (two ports to forward over SSH).
    """
    neuroglancer = _neuroglancer()
    ng_dir = Path(ng_dir).resolve()
    record = load_export(ng_dir)
    data = DataServer(ng_dir, bind, port + 1 if port else 0)
    neuroglancer.set_server_bind_address(bind, port)
    viewer = neuroglancer.Viewer()
    selected = largest_objects(record, select) if select > 0 else []
    z_nm, y_nm, x_nm = record[contract.VOXEL_SIZE]
    with viewer.txn() as state:
        # Dimensions are matched to the layers by name; x, y, z order makes 'xy' the slice plane.
        state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[x_nm, y_nm, z_nm])
        state.layers[IMAGE_LAYER] = neuroglancer.ImageLayer(source=f"precomputed://{data.url}/{IMAGE_LAYER}")
        state.layers[SEGMENTATION_LAYER] = neuroglancer.SegmentationLayer(
            source=f"precomputed://{data.url}/{SEGMENTATION_LAYER}", segments=selected
        )
        state.selected_layer.layer = SEGMENTATION_LAYER
        state.position = initial_position(record, selected)
        state.layout = LAYOUT
        state.cross_section_scale = initial_zoom(record, selected)
        state.projection_scale = initial_projection_scale(record, selected)
        state.projection_orientation = PROJECTION_ORIENTATION
        state.show_slices = False
    return viewer, data, record


def chromium_paths() -> tuple[str, str] | None:
    """(chromium binary, chromedriver) found on PATH, or None."""
    browser = next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def open_headless(url: str, window_size: tuple[int, int] = (1200, 900)) -> Any:
    """A headless Chromium (selenium WebDriver) showing ``url``; call ``.quit()`` when done."""
    paths = chromium_paths()
    if paths is None:
        raise EmmitoError("no chromium and chromedriver on PATH: apt-get install chromium chromium-driver (Debian)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise EmmitoError("--screenshot needs selenium: pip install selenium") from None
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={window_size[0]},{window_size[1]}")
    # An explicit driver path keeps selenium from looking for one on the network.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
    driver.get(url)
    return driver


def screenshot(viewer: Any, size: tuple[int, int] = (800, 600), timeout: float = 120.0) -> bytes:
    """PNG bytes of the viewer's canvas once the client has rendered its data.

    ``viewer.screenshot`` waits for a connected client without a timeout of
    its own, so it runs in a thread and EmmitoError is raised after ``timeout`` s.
    """
    result: list[Any] = []
    errors: list[BaseException] = []

    def capture() -> None:
        try:
            result.append(viewer.screenshot(size=list(size)))
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=capture, daemon=True)
    worker.start()
    worker.join(timeout)
    if errors:
        raise errors[0]
    if not result:
        raise EmmitoError(f"the browser did not render the view within {timeout:g} s: check that it can reach {viewer.get_viewer_url()}")
    return result[0].screenshot.image


def chosen_suggestion(args: argparse.Namespace) -> dict[str, Any] | None:
    """Row ``--suggestion N`` (rank N) of ``--suggestions`` (default: the suggestions.csv beside NG_DIR), or None without it."""
    number = getattr(args, "suggestion", None)
    if number is None:
        return None
    return suggestion_row(getattr(args, "suggestions", None) or contract.suggestions_beside(args.ng_dir), number)


def apply_suggestion(viewer: Any, row: dict[str, Any]) -> None:
    """Put the viewer where the row's view state says: position, zoom, 3D scale and the selected segments per layer."""
    fragment = row["view_state"]
    missing = [key for key in contract.SUGGESTION_VIEW_KEYS if key not in fragment]
    if missing:
        raise EmmitoError(f"suggestion {row['rank']}: its view_state lacks {', '.join(missing)}: rerun emmito suggest")
    with viewer.txn() as state:
        state.position = [float(v) for v in fragment["position"]]
        state.cross_section_scale = float(fragment["crossSectionScale"])
        state.projection_scale = float(fragment["projectionScale"])
        for name, layer in fragment["layers"].items():
            if name not in state.layers:
                raise EmmitoError(f"suggestion {row['rank']}: its view_state names layer '{name}', which the export has not: rerun emmito suggest")
            state.layers[name].segments = [int(s) for s in layer.get("segments", [])]


def _save_screenshot(viewer: Any, url: str, path: Path) -> None:
    driver = open_headless(url)
    try:
        png = screenshot(viewer)
    finally:
        driver.quit()
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    print(f"emmito view: screenshot of {url} -> {path}", file=sys.stderr)


def _what_is_shown(record: dict[str, Any], select: int, row: dict[str, Any] | None) -> str:
    if row is not None:
        segment = f" (object {row['segment_id']})" if row["segment_id"] else ""
        return f"emmito view: suggestion {row['rank']}, {row['kind']}{segment}: {row['reason']}"
    shown = largest_objects(record, select) if select > 0 else []
    return f"emmito view: {len(record['objects'])} objects; showing {'the largest: ' + ', '.join(map(str, shown)) if shown else 'all'}"


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito view NG_DIR [--bind ADDR] [--port P] [--select N] [--suggestion N [--suggestions CSV]] [--screenshot PNG]``."""
    row = chosen_suggestion(args)
    viewer, data, record = start_viewer(args.ng_dir, args.bind, args.port, 0 if row is not None else args.select)
    try:
        if row is not None:
            apply_suggestion(viewer, row)
        url = viewer.get_viewer_url()
        if args.screenshot:
            _save_screenshot(viewer, url, args.screenshot)
            return
        print(_what_is_shown(record, args.select, row))
        print(f"open {url}  (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        data.stop()
