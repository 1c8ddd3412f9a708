"""``emmito <verb>``: one entry point, one verb per stage.

Each verb parses its arguments and calls its stage's ``run`` function. Stage
parameters come as config sections, either from ``--config FILE`` (a workflow
config) or ``--params JSON`` and ``--runtime JSON`` (what the Snakemake rules
pass: the keys that change the stage's output, and those that do not), with
the schema's defaults filled in. Expected mistakes (``EmmitoError``) print one line, exit 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import threading
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmito import __version__, contract
from emmito.io import EmmitoError

if TYPE_CHECKING:
    from emmito.config import Validated

SECTIONS = ("seed", "convert", "model", "train", "infer", "merge", "segment", "tune", "trace", "upsample", "evaluate", "export", "measure", "suggest")


def stage_config(args: argparse.Namespace) -> Validated:
    """The validated config sections for a verb: --config file, then --params, then --runtime on top.

    Every section comes complete (the schema's defaults filled in); the result's
    ``explicit`` (``config.Validated``) names the keys the config file or
    ``--params`` / ``--runtime`` set, so that a stage can tell a user's value
    from a default. Where the workflow's JSON carries an ``explicit`` list
    (``config.stage_params``: the keys the user's config set), that list is
    what counts as set, not every key the JSON holds.
    """
    from emmito import config as cfg

    partial: dict[str, Any] = {}
    explicit: frozenset[str] = frozenset()
    if getattr(args, "config", None):
        loaded = cfg.load(args.config)
        partial = {k: v for k, v in loaded.items() if k in SECTIONS}
        explicit = frozenset(p for p in loaded.explicit if p.split(".", 1)[0] in SECTIONS)
    source = "config"
    for flag in ("params", "runtime"):
        if getattr(args, flag, None):
            extra = _parse_params(getattr(args, flag), f"--{flag}")
            listed = cfg.stage_explicit(extra)
            extra.pop(cfg.PARAMS_EXPLICIT, None)
            extra.pop(cfg.PARAMS_VERSION, None)
            partial, explicit = _params_on_top(partial, explicit, extra, listed)
            source = f"--{flag}" if source == "config" else source
    validated = cfg.validate_sections(partial, source, explicit)
    validated.pop("volumes", None)
    return validated


def _parse_params(text: str, flag: str = "--params") -> dict[str, Any]:
    """``--params``' (or ``--runtime``'s) JSON object of config sections."""
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EmmitoError(f"{flag} is not valid JSON ({exc}): pass an object such as '{{\"segment\": {{\"min_size\": 500}}}}'") from None
    if not isinstance(extra, dict):
        raise EmmitoError(f"{flag} must be a JSON object of config sections, such as '{{\"segment\": {{}}}}'")
    return extra


def _params_on_top(
    partial: dict[str, Any], explicit: frozenset[str], extra: dict[str, Any], listed: frozenset[str] | None = None
) -> tuple[dict[str, Any], frozenset[str]]:
    """``extra``'s keys set over ``partial``'s, one level into each section; and the key paths the user set after it.

    A key ``extra`` sets replaces the config file's value whole, so the file's
    keys at and below it no longer count as set; ``extra``'s own count as set,
    or only those in ``listed`` where given (the workflow's ``explicit`` list).
    """
    from emmito.config import explicit_keys

    merged = dict(partial)
    replaced: list[str] = []
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
            replaced += [f"{key}.{inner}." for inner in value]
        else:
            merged[key] = value
            replaced.append(f"{key}.")
    kept = {path for path in explicit if not any(f"{path}.".startswith(prefix) for prefix in replaced)}
    return merged, frozenset(kept) | (explicit_keys(extra) if listed is None else listed)


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="workflow config YAML to take stage parameters from")
    p.add_argument("--params", help="JSON object of config sections, e.g. '{\"segment\": {\"min_size\": 500}}' (overrides --config)")
    p.add_argument(
        "--runtime",
        help="JSON object of the keys that change no output (threads, batch sizes), set over --params; "
        "the workflow passes them here so that a change reruns nothing",
    )


def _data_verbs(verbs: argparse._SubParsersAction) -> None:
    """The verbs synth, convert: the PNG slices a run starts from, into HDF5 volumes."""
    p = verbs.add_parser("synth", help="write a synthetic EM-like volume with instance labels as PNG slices")
    p.add_argument("out_dir", type=Path, help="writes OUT_DIR/images/*.png and OUT_DIR/labels/*.png (VAST RGB ids)")
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="slice height and width in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--density", type=float, default=1.0, help="relative number of mitochondria")

    p = verbs.add_parser("convert", help="images and labels (PNG/TIFF slices, TIFF stack, HDF5, zarr, N5) -> image.h5 (uint8) and label.h5 (uint32)")
    spec = "a folder or glob of PNG/TIFF slices, a TIFF stack, file.h5:/dataset, store.zarr:/array or x.n5:/dataset"
    p.add_argument("--images", required=True, help=f"the images: {spec}")
    p.add_argument("--labels", help=f"the labels, one slice per image slice: {spec}")
    p.add_argument("--label-format", choices=["binary", "instance", "vast"], default="binary")
    p.add_argument(
        "--labels-offset", type=int, nargs=3, metavar=("Z", "Y", "X"),
        help="the labels are a crop of the images (a proofread box) whose first voxel is at (Z, Y, X) in them; "
        "label.h5 keeps the images' shape, unlabelled outside the crop (writes the 'valid' mask; with --labels)",
    )
    p.add_argument(
        "--valid", metavar="SPEC",
        help=f"where the labels are known, the labels' shape, non-zero = labelled (writes the 'valid' mask; with --labels): {spec}",
    )
    p.add_argument("--voxel-size", type=float, nargs=3, default=[40.0, 8.0, 8.0], metavar=("Z", "Y", "X"))
    p.add_argument("--image-out", type=Path, help="image.h5 to write (at least one of --image-out / --label-out)")
    p.add_argument("--label-out", type=Path, help="label.h5 to write (needs --labels; --images is still read to check counts and sizes)")
    _add_params(p)  # the convert section: how 16-bit and float images map to uint8


def _model_verbs(verbs: argparse._SubParsersAction) -> None:
    """The verbs train, infer: the network."""
    p = verbs.add_parser("train", help="train the 3D U-Net; writes a checkpoint and a metrics log")
    p.add_argument("--train", nargs=2, action="append", required=True, metavar=("IMAGE", "LABEL"))
    p.add_argument("--val", nargs=2, action="append", default=[], metavar=("IMAGE", "LABEL"))
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True, help="JSON lines, one per logged iteration")
    p.add_argument(
        "--support", type=Path, default=None,
        help="model.head embedding: support.npz to write (training-volume embeddings for segment.decoder nearest_neighbour)",
    )
    _add_params(p)

    p = verbs.add_parser("infer", help="heatmap of one chunk of slices, or of a job's consecutive chunks")
    p.add_argument("image", type=Path)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="--chunk: the heat file; --chunks: the folder of the chunks' heat files")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--chunk", type=int, help="chunk index: OUT is its heat file")
    which.add_argument(
        "--chunks", type=int, nargs="+",
        help="consecutive chunk indices (an infer job): OUT is a folder of chunk_<c>.h5, made whole or not at all",
    )
    _add_params(p)


def _block_verbs(verbs: argparse._SubParsersAction) -> None:
    """The verbs merge, segment, trace: blocks of heat into one segmentation."""
    p = verbs.add_parser("merge", help="assemble the chunks of one block (plus overlap)")
    p.add_argument("out", type=Path)
    p.add_argument("chunks", type=Path, nargs="+")
    p.add_argument("--block", type=int, required=True, help="block index")
    _add_params(p)

    p = verbs.add_parser("segment", help="instance segmentation of one heatmap block (block-local ids)")
    p.add_argument("heat", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--decoder-settings", type=Path, default=None,
                   help="decoder.json that 'emmito tune' wrote beside the checkpoint (config keys you set win over it)")
    _add_params(p)

    p = verbs.add_parser("trace", help="block-local ids -> one volume of global ids + id map")
    p.add_argument("out", type=Path, help="traced volume (inference resolution)")
    p.add_argument("id_map", type=Path, help="trace.json")
    p.add_argument("blocks", type=Path, nargs="+", help="seg/block_*.h5 in block order")
    _add_params(p)


def _volume_verbs(verbs: argparse._SubParsersAction) -> None:
    """The verbs upsample, evaluate, export: the finished volume."""
    p = verbs.add_parser("upsample", help="traced labels -> full image resolution + a multiscale pyramid")
    p.add_argument("traced", type=Path)
    p.add_argument("image", type=Path, help="image.h5, for the full-resolution shape")
    p.add_argument("out", type=Path)
    _add_params(p)

    p = verbs.add_parser("evaluate", help="voxel and instance metrics against ground truth")
    p.add_argument("seg", type=Path)
    p.add_argument("label", type=Path)
    p.add_argument("out", type=Path, help="metrics.json")
    _add_params(p)

    p = verbs.add_parser("export", help="seg.h5 + image.h5 -> neuroglancer precomputed (default), OME-Zarr or a TIFF stack")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                   help="SEG IMAGE OUT_DIR (neuroglancer: OUT_DIR/image, /segmentation, /objects.json); "
                        "--ome-zarr SEG IMAGE OUT.ome.zarr; --tiff SEG OUT.tif")
    formats = p.add_mutually_exclusive_group()
    formats.add_argument("--ome-zarr", dest="format", action="store_const", const="ome-zarr", default="precomputed",
                         help="write an OME-NGFF 0.4 image with the segmentation under labels/ (napari, Fiji)")
    formats.add_argument("--tiff", dest="format", action="store_const", const="tiff",
                         help="write the labels as a TIFF stack (uint16 ImageJ hyperstack, or uint32 OME-TIFF)")
    p.add_argument("--objects", type=Path, help="neuroglancer export: objects.csv (emmito measure), for the segment properties")
    p.add_argument("--meshes", type=Path, help="neuroglancer export: the meshes folder emmito measure wrote (the 3D panel)")
    _add_params(p)


def _measure_verb(verbs: argparse._SubParsersAction) -> None:
    """The verb measure: the table of every object, and its meshes."""
    p = verbs.add_parser("measure", help="seg.h5 -> objects.csv (volume, surface, length, ... per object) and meshes")
    p.add_argument("seg", type=Path, help="seg.h5 (full resolution)")
    p.add_argument("objects", type=Path, help="objects.csv to write")
    p.add_argument("--meshes", type=Path, help="folder to write the neuroglancer meshes to (info, <id>:0, <id>)")
    p.add_argument("--block-slices", type=int, default=None,
                   help="slices per segment block (merge.block_slices), for first_block/last_block; default: from --params")
    _add_params(p)


def _suggest_verb(verbs: argparse._SubParsersAction) -> None:
    """The verb suggest: what to proofread first, with a neuroglancer view state per row."""
    p = verbs.add_parser("suggest", help="rank what to proofread or label first (uncertain, low-margin, odd, weakly matched objects; "
                                         "uncertain regions) -> suggestions.csv")
    p.add_argument("out", type=Path, help="suggestions.csv to write (beside the export: results/<vol>/suggestions.csv)")
    p.add_argument("--traced", type=Path, required=True, help="seg_infer.h5 (emmito trace: the labels at the heat's resolution)")
    p.add_argument("--seg", type=Path, required=True, help="seg.h5 (emmito upsample: the full-resolution frame the view uses)")
    p.add_argument("--objects", type=Path, required=True, help="objects.csv (emmito measure)")
    p.add_argument("--trace", type=Path, required=True, help="trace.json (emmito trace: the cross-block matches and their scores)")
    p.add_argument("--heat", type=Path, nargs="+", required=True, help="every heat/block_<b>.h5 of the volume (emmito merge)")
    _add_params(p)


def _crop_verb(verbs: argparse._SubParsersAction) -> None:
    """The verb crop: a box of seg.h5 to proofread, and the config lines that register it as training labels."""
    p = verbs.add_parser("crop", help="write a box of seg.h5 (a suggestion's, or --box) to proofread; prints how to register it for fine-tuning")
    p.add_argument("seg", type=Path, help="seg.h5 (results/<vol>/seg.h5)")
    p.add_argument("out", type=Path, help="the crop to write (HDF5, dataset main, uint32 ids)")
    p.add_argument("--box", type=int, nargs=6, metavar=("Z0", "Y0", "X0", "Z1", "Y1", "X1"),
                   help="the box, full-resolution voxels, end-exclusive")
    p.add_argument("--suggestion", type=int, metavar="N", help="the box of row N (its rank) of suggestions.csv")
    p.add_argument("--suggestions", type=Path, metavar="CSV",
                   help="the suggestions.csv to read (default: the one beside SEG, results/<vol>/suggestions.csv)")


def _tune_verb(verbs: argparse._SubParsersAction) -> None:
    """The verb tune: the decoder's settings for a model, chosen on labelled volumes."""
    p = verbs.add_parser("tune", help="choose the decoder's thresholds for a checkpoint on labelled volumes; writes decoder.json")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="decoder.json to write (beside the checkpoint)")
    p.add_argument("--volume", nargs=3, action="append", required=True, metavar=("NAME", "IMAGE", "LABEL"),
                   help="a labelled volume to tune on (image.h5, label.h5); repeat for more")
    p.add_argument("--support", type=Path, default=None, help="segment.decoder nearest_neighbour: the model's support.npz")
    _add_params(p)


def _look_verbs(verbs: argparse._SubParsersAction) -> None:
    """The verbs view, report, summary: looking at the results."""
    p = verbs.add_parser("view", help="serve an export in neuroglancer (python package, bundled client); Ctrl-C stops")
    p.add_argument("ng_dir", type=Path, help="the folder emmito export wrote (results/<vol>/ng)")
    p.add_argument("--bind", default="127.0.0.1", help="address to serve on (0.0.0.0 to reach it from other machines)")
    p.add_argument("--port", type=int, default=0, help="viewer port (0: any free one); the data is served on PORT+1")
    p.add_argument("--select", type=int, default=5, help="show only the N largest objects (0: all)")
    p.add_argument("--screenshot", type=Path, help="render in headless Chromium, save this PNG and exit")
    p.add_argument("--suggestion", type=int, metavar="N",
                   help="open row N (its rank, from 1) of suggestions.csv: its position, zoom and selected object (overrides --select)")
    p.add_argument("--suggestions", type=Path, metavar="CSV",
                   help="the suggestions.csv to read (default: the one beside NG_DIR, results/<vol>/suggestions.csv)")

    p = verbs.add_parser("report", help="PNG plots and a metrics table for the Snakemake report")
    p.add_argument("--training", nargs=2, metavar=("METRICS_JSONL", "PNG"), help="loss and validation curves")
    p.add_argument("--scores", nargs=3, metavar=("METRICS_JSON", "PNG", "HTML"), help="precision/recall, F1 vs IoU; table")
    p.add_argument("--volume", nargs=5, metavar=("SEG", "IMAGE", "TRACE_JSON", "OVERLAYS_PNG", "SIZES_PNG"),
                   help="overlays of image and segmentation; object size histogram")
    p.add_argument("--overlays", type=int, default=4, help="slices shown in the overlays")
    p.add_argument("--decoder", nargs=2, metavar=("DECODER_JSON", "HTML"), help="the tuned decoder settings as a table")
    p.add_argument("--objects", nargs=2, metavar=("OBJECTS_CSV", "PNG"), help="distributions of object volume and length")

    p = verbs.add_parser("summary", help="one screen on a finished run: objects, metrics, where the outputs are")
    p.add_argument("config", type=Path, help="the workflow config the run used")
    p.add_argument("--results", type=Path, default=Path(contract.RESULTS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emmito", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"emmito {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_verbs in (_data_verbs, _model_verbs, _tune_verb, _block_verbs, _volume_verbs, _measure_verb, _suggest_verb, _crop_verb, _look_verbs):
        add_verbs(verbs)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived (a SLURM time limit, scancel, snakemake stopping its jobs).

    Raised from the signal handler so that the stack unwinds and every
    ``emmito.io.atomic_path`` removes its temporary file before the process ends.
    """


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _ignore_unraisable(unraisable: Any) -> None:
    pass


def _run_verb(args: argparse.Namespace) -> int:
    """Run the verb's stage -> exit status, turning expected failures into one line on stderr."""
    terminated = False
    previous_hook = sys.unraisablehook
    try:
        try:
            module = import_module(f"emmito.{args.verb}")
            params = stage_config(args) if hasattr(args, "params") else {}
            module.run_cli(args, params)
        except EmmitoError as exc:
            print(f"emmito {args.verb}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"emmito {args.verb}: interrupted", file=sys.stderr)
            return 130
        except Terminated:
            # The signal may have landed inside a constructor (a tqdm bar half-built has no
            # ``pos``): such objects fail in ``__del__`` when the unwound frames are freed, at
            # the end of this block. Their noise is not an error of the stage: keep the last
            # line ours.
            sys.unraisablehook = _ignore_unraisable
            terminated = True
        if terminated:
            gc.collect()  # still under the quiet hook; the finally below restores it
            print(f"emmito {args.verb}: terminated (SIGTERM): no partial output was kept; rerun the job", file=sys.stderr)
            return 128 + signal.SIGTERM
    finally:
        sys.unraisablehook = previous_hook
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Signal handlers can only be set from the main thread (tests may call main() from others).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    finished = False
    try:
        try:
            # Set inside the try: a SIGTERM that arrives while the handler is being set
            # runs it as soon as signal.signal returns, and must be caught here too.
            if in_main_thread:
                signal.signal(signal.SIGTERM, _raise_terminated)
            status = _run_verb(args)
            finished = True
            return status
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous_sigterm)
    except Terminated:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if finished:  # after the stage had finished, before the handler was restored: nothing to undo
            print(f"emmito {args.verb}: terminated (SIGTERM) after finishing", file=sys.stderr)
        else:  # before the stage began: nothing was written
            print(f"emmito {args.verb}: terminated (SIGTERM): no partial output was kept; rerun the job", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
