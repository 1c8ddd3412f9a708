"""The on-disk contract, spelled once: where results live, what every file holds, the checkpoint format.

Every other module (the stages, the workflow's ``rules/common.smk``, the CLI,
summary and the tests) takes names from here; none spells a path pattern, a
dataset name or an attribute key itself. A test (``tests/test_architecture.py``)
fails if one does.

Volumes
    Every volume emmito writes is an HDF5 file with one dataset ``DATASET``
    (``main``) of shape (z, y, x), or (channel, z, y, x) for heat files, and
    the attributes below. ``IMAGE``/``LABEL`` files are written by convert,
    ``HEAT`` files by infer and merge, ``SEG`` files by segment, trace and
    upsample. A pyramid (upsample) adds datasets ``s1``, ``s2``, ... beside
    ``main``, each halving y and x (``level_name``); seg files written from
    a heatmap also hold their objects' score table (``SLICE_SCORES`` in
    segment's blocks, ``OBJECT_SCORES`` in trace's and upsample's files).

Results layout
    ``Results(root)`` gives every output path as a pattern with Snakemake
    wildcards (``Results().image()`` -> ``results/{vol}/image.h5``) or filled in
    (``Results().image("demo")`` -> ``results/demo/image.h5``).

Checkpoints
    ``save_checkpoint`` / ``read_checkpoint`` / ``inspect_checkpoint``: a
    torch-saved dict with the ``CHECKPOINT_*`` keys.

Decoder settings
    ``save_decoder_settings`` / ``load_decoder_settings``: decoder.json beside
    a checkpoint (``Results.decoder_settings``, ``decoder_settings_beside``),
    the segment settings ``emmito tune`` chose for it.

Adding a file kind is a few lines: a method on ``Results``, its attribute
keys here, and (if tests need it) a case in ``fixture``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ---- volumes -------------------------------------------------------------------------

DATASET = "main"

# Attribute keys, on the dataset.
VOXEL_SIZE = "voxel_size"  # (z, y, x) nm of this file's voxels
OFFSET = "offset"  # index of the file's first slice in its volume's frame
VERSION = "emmito_version"  # the emmito that wrote it
VOLUME_DEPTH = "volume_depth"  # slices in the whole volume (heat, seg blocks, traced)
DOWNSAMPLE_XY = "downsample_xy"  # factor between this file's y/x and the image's (also config infer.downsample_xy)
CHANNELS = "channels"  # heat files: one name per channel (foreground, contour, emb0, ...)
EMBEDDING_RANGE = "embedding_range"  # heat files of embedding models: the emb channels' scale
# Heat files of infer.uncertainty tta_std / entropy: one more channel, after the model's, named
# UNCERTAINTY_CHANNEL (uint8, HEAT_MAX = most uncertain: std 0.5 across the TTA variants, or
# 1 bit of entropy), and the attribute UNCERTAINTY_KIND naming which (the config value).
UNCERTAINTY_CHANNEL = "uncertainty"
UNCERTAINTY_KIND = "uncertainty_kind"
# label.h5 of a partly labelled volume (volumes.<name>.labels_offset and/or .valid: a proofread
# crop): a second dataset VALID_MASK (uint8, the shape of DATASET, 1 where the labels are known,
# 0 where nobody labelled; unlabelled voxels are not background), and on DATASET the attribute
# VALID_BOX, [z0, y0, x0, z1, y1, x1] (end-exclusive), the bounding box of the 1s. A label.h5
# without VALID_MASK is labelled everywhere.
VALID_MASK = "valid"
VALID_BOX = "valid_box"
# image.h5: how the source's grey values became uint8, as a JSON object
# {"rule": "identity" | "percentile" | "shift", "source_dtype": "uint16", "low": 312.0, "high": 3850.0,
#  "percentiles": [0.1, 99.9], "sample_slices": 16}: one mapping for the whole volume.
INTENSITY_MAPPING = "intensity_mapping"

# Object scores: each object's mean foreground heat, kept beside the labels as an int64 table (a
# second dataset in the same file, its column names in its attribute SCORE_COLUMNS_ATTR), so that
# evaluate can rank objects for average precision. Sums of the uint8 heat are integers, so they add
# up exactly when trace joins objects across blocks; an object's score (mean foreground
# probability) is heat_sum / (HEAT_MAX * voxels), at the heat's (inference) resolution.
# - SLICE_SCORES (seg/block_b.h5, segment): one row per (object, slice) it has voxels in, z the
#   block file's own slice index: trace keeps the rows of the slices a block owns.
# - OBJECT_SCORES (seg_infer.h5, trace; seg.h5, upsample copies it): one row per global id.
# A file without the table (a segmentation from elsewhere, a heatmap without a foreground
# channel) has no scores: evaluate then ranks by size.
SLICE_SCORES = "slice_scores"
SLICE_SCORE_COLUMNS = ("id", "z", "voxels", "heat_sum")
OBJECT_SCORES = "object_scores"
OBJECT_SCORE_COLUMNS = ("id", "voxels", "heat_sum")
SCORE_COLUMNS_ATTR = "columns"
HEAT_MAX = 255  # heat files hold probability * HEAT_MAX as uint8

# Written by io.create_volume on every file.
BASE_KEYS = (VOXEL_SIZE, OFFSET, VERSION)
# The volume frame that a file at inference resolution carries on (heat -> seg block -> traced).
FRAME_KEYS = (VOLUME_DEPTH, DOWNSAMPLE_XY)
# What merge checks is the same across the chunks of a block, and carries on.
HEAT_KEYS = (VOLUME_DEPTH, DOWNSAMPLE_XY, CHANNELS, EMBEDDING_RANGE, UNCERTAINTY_KIND)

DEFAULT_VOXEL_SIZE = (1.0, 1.0, 1.0)


def frame_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The volume-frame attributes of ``attrs`` (those present), to copy onto a file derived from it."""
    return {key: attrs[key] for key in FRAME_KEYS if key in attrs}


def heat_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The heat-file attributes of ``attrs`` (those present), to copy from chunks onto their block."""
    return {key: attrs[key] for key in HEAT_KEYS if key in attrs}


def volume_frame(volume_depth: int, downsample_xy: int) -> dict[str, Any]:
    """Attributes of a file at inference resolution: the whole volume's depth and the y/x factor."""
    return {VOLUME_DEPTH: int(volume_depth), DOWNSAMPLE_XY: int(downsample_xy)}


def heat_file_attrs(
    channels: list[str], volume_depth: int, downsample_xy: int, embedding_range: float | None = None
) -> dict[str, Any]:
    """Attributes of a heat file (infer's chunks, merge's blocks)."""
    attrs = {CHANNELS: [str(c) for c in channels], **volume_frame(volume_depth, downsample_xy)}
    if embedding_range is not None:
        attrs[EMBEDDING_RANGE] = float(embedding_range)
    return attrs


def read_attrs(ds: Any) -> dict[str, Any]:
    """The attributes of an open dataset as plain Python values, with defaults for files made elsewhere."""
    attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ds.attrs.items()}
    attrs.setdefault(VOXEL_SIZE, list(DEFAULT_VOXEL_SIZE))
    attrs.setdefault(OFFSET, 0)
    attrs[OFFSET] = int(attrs[OFFSET])
    attrs[VOXEL_SIZE] = [float(v) for v in attrs[VOXEL_SIZE]]
    if CHANNELS in attrs:
        attrs[CHANNELS] = [str(c) for c in attrs[CHANNELS]]
    return attrs


def channel_names(attrs: dict[str, Any]) -> list[str] | None:
    """A heat file's channel names, or None when it does not say (a heatmap from elsewhere)."""
    names = attrs.get(CHANNELS)
    return None if names is None else [str(c) for c in names]


def with_channels(attrs: dict[str, Any], channels: list[str]) -> dict[str, Any]:
    """A copy of ``attrs`` whose channel names are ``channels``."""
    return {**attrs, CHANNELS: list(channels)}


def voxel_size(attrs: dict[str, Any]) -> list[float]:
    return [float(v) for v in attrs.get(VOXEL_SIZE, DEFAULT_VOXEL_SIZE)]


def offset(attrs: dict[str, Any]) -> int:
    return int(attrs.get(OFFSET, 0))


def volume_depth(attrs: dict[str, Any]) -> int | None:
    """The whole volume's depth recorded in ``attrs``, or None where the file does not record it."""
    return int(attrs[VOLUME_DEPTH]) if VOLUME_DEPTH in attrs else None


def downsample_xy(attrs: dict[str, Any]) -> int:
    return int(attrs.get(DOWNSAMPLE_XY, 1))


# ---- pyramids ---------------------------------------------------------------------


def level_name(level: int) -> str:
    """Dataset name of pyramid level ``level``: ``main`` (full resolution), then ``s1``, ``s2``, ..."""
    return DATASET if level == 0 else f"s{level}"


def pyramid_levels(h5file: Any) -> list[str]:
    """The pyramid datasets present in an open HDF5 file, finest first (``main``, ``s1``, ...)."""
    names = []
    level = 0
    while level_name(level) in h5file:
        names.append(level_name(level))
        level += 1
    return names


def level_attrs(voxel_size: list[float], volume_depth: int, scale: int) -> dict[str, Any]:
    """Attributes of pyramid level with y/x ``scale`` (1, 2, 4, ...) of a full-resolution volume."""
    return {
        VOXEL_SIZE: np.asarray([voxel_size[0], voxel_size[1] * scale, voxel_size[2] * scale], dtype=np.float64),
        OFFSET: 0,
        **volume_frame(volume_depth, scale),
    }


# ---- output versions ----------------------------------------------------------------
# One small int per stage, in that stage's Snakemake params: bump a stage's number when its
# output format or algorithm changes, and a workflow rerun redoes that stage (and what reads
# its output) and nothing else. The package version is in no params: an upgrade that changes
# no output reruns nothing.

OUTPUT_VERSIONS: dict[str, int] = {
    "convert": 2,
    "train": 2,
    "infer": 2,
    "merge": 1,
    "segment": 2,
    "trace": 3,  # 3: trace.json keeps every cross-block match with its score ("matching", "matches")
    "upsample": 3,
    "evaluate": 2,
    "export": 2,
    "report": 2,
    "tune": 2,
    "measure": 1,
    "suggest": 1,
}

# ---- results layout ---------------------------------------------------------------

RESULTS = "results"


def heat_chunk_name(chunk: int) -> str:
    """The name of chunk ``chunk``'s heat file inside its job's folder (``Results.heat_job``)."""
    return f"chunk_{chunk}.h5"


@dataclass(frozen=True)
class Results:
    """Every output path of a run under ``root``.

    Each method returns a pattern with Snakemake wildcards when called without
    arguments (``image()`` -> ``results/{vol}/image.h5``) and a path when given
    them (``image("demo")`` -> ``results/demo/image.h5``).
    """

    root: str = RESULTS

    def parse_cache(self) -> str:
        """Where the workflow remembers, between parses, slice-folder listings and its validated config (``sources.describe_cached``, ``config.validate_cached``).

        In Snakemake's own folder, not under ``root``: a parse that stops at a bad input leaves no results.
        """
        return ".snakemake/emmito-parse-cache"

    # the model
    def model_dir(self, model: str = "{model}") -> str:
        return f"{self.root}/model/{model}"

    def checkpoint(self, model: str = "{model}") -> str:
        return f"{self.model_dir(model)}/checkpoint.pt"

    def training_log(self, model: str = "{model}") -> str:
        return f"{self.model_dir(model)}/metrics.jsonl"

    def support_set(self, model: str = "{model}") -> str:
        return f"{self.model_dir(model)}/support.npz"

    def decoder_settings(self, model: str = "{model}") -> str:
        """decoder.json beside the checkpoint: the segment settings tuned for the model (written by tune)."""
        return f"{self.model_dir(model)}/{DECODER_SETTINGS_FILE}"

    def model_report(self, model: str = "{model}", name: str = "training.png") -> str:
        return f"{self.model_dir(model)}/report/{name}"

    def train_log(self, model: str = "{model}") -> str:
        return f"{self.model_dir(model)}/train.log"

    def train_benchmark(self, model: str = "{model}") -> str:
        return f"{self.model_dir(model)}/train.benchmark.tsv"

    # one volume
    def volume_dir(self, vol: str = "{vol}") -> str:
        return f"{self.root}/{vol}"

    def image(self, vol: str = "{vol}") -> str:
        return f"{self.volume_dir(vol)}/image.h5"

    def label(self, vol: str = "{vol}") -> str:
        return f"{self.volume_dir(vol)}/label.h5"

    def heat_job(self, vol: str = "{vol}", job: int | str = "{job}") -> str:
        """The folder infer job ``job`` writes: the heat files of its chunks (infer.chunks_per_job of them)."""
        return f"{self.volume_dir(vol)}/heat/job_{job}"

    def heat_chunk(self, vol: str, chunk: int, chunks_per_job: int = 1) -> str:
        """Chunk ``chunk``'s heat file, in the folder of the job that writes it."""
        return f"{self.heat_job(vol, chunk // chunks_per_job)}/{heat_chunk_name(chunk)}"

    def heat_block(self, vol: str = "{vol}", block: int | str = "{block}") -> str:
        return f"{self.volume_dir(vol)}/heat/block_{block}.h5"

    def seg_block(self, vol: str = "{vol}", block: int | str = "{block}") -> str:
        return f"{self.volume_dir(vol)}/seg/block_{block}.h5"

    def traced(self, vol: str = "{vol}") -> str:
        return f"{self.volume_dir(vol)}/seg_infer.h5"

    def id_map(self, vol: str = "{vol}") -> str:
        return f"{self.volume_dir(vol)}/trace.json"

    def seg(self, vol: str = "{vol}") -> str:
        return f"{self.volume_dir(vol)}/seg.h5"

    def metrics(self, vol: str = "{vol}") -> str:
        return f"{self.volume_dir(vol)}/metrics.json"

    def neuroglancer(self, vol: str = "{vol}") -> str:
        return f"{self.volume_dir(vol)}/ng"

    def objects(self, vol: str = "{vol}") -> str:
        """One row per object of seg.h5 (OBJECT_COLUMNS), written by the measure stage."""
        return f"{self.volume_dir(vol)}/objects.csv"

    def suggestions(self, vol: str = "{vol}") -> str:
        """What to proofread first, one row per suggestion (SUGGESTION_COLUMNS), written by the suggest stage."""
        return f"{self.volume_dir(vol)}/{SUGGESTIONS_FILE}"

    def meshes(self, vol: str = "{vol}") -> str:
        """Neuroglancer legacy meshes of every object (MESH_* below), written by the measure stage."""
        return f"{self.volume_dir(vol)}/meshes"

    def ome_zarr(self, vol: str = "{vol}") -> str:
        """OME-NGFF multiscale image with the segmentation under labels/ (export --ome-zarr)."""
        return f"{self.volume_dir(vol)}/seg.ome.zarr"

    def seg_tiff(self, vol: str = "{vol}") -> str:
        """The labels as a TIFF stack for Fiji (export --tiff; config export.tiff)."""
        return f"{self.volume_dir(vol)}/seg.tif"

    def report_dir(self, vol: str = "{vol}") -> str:
        return f"{self.volume_dir(vol)}/report"

    def report(self, vol: str = "{vol}", name: str = "{name}") -> str:
        return f"{self.report_dir(vol)}/{name}"

    # bookkeeping
    def logs(self) -> str:
        return f"{self.root}/logs"

    def log(self, stage: str, name: str) -> str:
        return f"{self.logs()}/{stage}/{name}.log"

    def benchmark(self, stage: str, name: str) -> str:
        return f"{self.root}/benchmarks/{stage}/{name}.tsv"


# ---- objects.csv and meshes ---------------------------------------------------------
# objects.csv: one row per object id of seg.h5 (ids ascending), comma-separated, header row.
# Physical units from seg.h5's voxel size (z, y, x nm). Boxes are half-open voxel boxes
# [z0, z1) ... converted with the voxel's low corner at index * size (so bbox_z1_nm = z1 * vz);
# the centroid is the mean voxel centre, (mean index + 0.5) * size.
OBJECT_COLUMNS = (
    "id",  # the label in seg.h5
    "voxels",  # voxels at full resolution
    "volume_um3",
    "surface_um2",  # area of a marching-cubes surface (scikit-image) of the mask smoothed by 1 voxel (meshing.surface_area)
    "length_um",  # cable length of its skeleton (kimimaro TEASAR, paths smoothed: meshing.skeleton_length)
    "max_cross_section_um2",  # largest area in one z slice
    "centroid_z_nm",
    "centroid_y_nm",
    "centroid_x_nm",
    "bbox_z0_nm",
    "bbox_y0_nm",
    "bbox_x0_nm",
    "bbox_z1_nm",
    "bbox_y1_nm",
    "bbox_x1_nm",
    "first_slice",  # z index of its first and last slice (inclusive)
    "last_slice",
    "first_block",  # the segment blocks (merge.block_slices) it spans, inclusive
    "last_block",
    "touches_edge",  # 1 when it touches a face of the volume: cut, so its size is a lower bound
)
# meshes/: neuroglancer's legacy mesh format, vertices in nm. "info" holds MESH_INFO,
# "<id>:0" the manifest {"fragments": ["<id>"]}, "<id>" the fragment (zmesh to_precomputed).
MESH_INFO = {"@type": "neuroglancer_legacy_mesh"}


def mesh_manifest_name(label: int) -> str:
    return f"{int(label)}:0"


# ---- suggestions.csv ------------------------------------------------------------------
# suggestions.csv (results/<vol>/, beside the export's ng/ folder): what to check first, one row
# per suggestion, comma-separated, header row, "\n" line ends (csv quoting where a cell holds a
# comma or a quote). Rows interleave the kinds (every kind's 1st, then every kind's 2nd, ...;
# kinds in SUGGESTION_KINDS order); "rank" is the row's place in the file, from 1, and what
# ``emmito view NG_DIR --suggestion N`` opens. Coordinates are full-resolution voxels of seg.h5
# (z, y, x); boxes half-open [z0, z1).
SUGGESTIONS_FILE = "suggestions.csv"
SUGGESTION_COLUMNS = (
    "rank",  # 1, 2, ... over the whole file
    "kind",  # one of SUGGESTION_KINDS
    "kind_rank",  # 1, 2, ... within its kind (1 = check first)
    "reason",  # one sentence: what was measured, and where the uncertainty came from
    "segment_id",  # the object's id in seg.h5; empty for a region
    "score",  # what the kind ranks by (see SUGGESTION_KINDS), 6 decimals
    "z",  # the voxel the view is centred on
    "y",
    "x",
    "z0",  # the object's bounding box, or the region
    "y0",
    "x0",
    "z1",
    "y1",
    "x1",
    "view_state",  # compact JSON, a neuroglancer state fragment (SUGGESTION_VIEW_KEYS)
)
# The kinds, each with what its score is and the order within it.
SUGGESTION_KINDS = (
    "uncertain_object",  # mean uncertainty channel over the object's voxels (0-1), highest first; heat with it only
    "low_margin",  # 1 - mean |2p - 1| of the foreground over its voxels (0-1), highest (closest to 0.5) first
    "shape_outlier",  # the larger robust z-score of log volume and of length (objects.csv), highest first
    "weak_match",  # a cross-block match's score (trace.json), lowest first, in [threshold, threshold + margin)
    "uncertain_region",  # summed uncertainty (voxels x 0-1) in a suggest.region box, highest first; no segment
)
# The view state: {"position": [x, y, z] (voxels, each voxel's centre at index + 0.5 in z),
# "crossSectionScale": voxels per screen pixel, "projectionScale": the 3D view's height in
# voxels, "layers": {SUGGESTION_LAYER: {"segments": ["<id>"]}} (no segment for a region: all
# shown)}; JSON keys as neuroglancer spells them, no server address in it.
SUGGESTION_VIEW_KEYS = ("position", "crossSectionScale", "projectionScale", "layers")
SUGGESTION_LAYER = "segmentation"  # the export's segmentation layer (emmito.export.SEGMENTATION_LAYER)


def suggestions_beside(ng_dir: str | os.PathLike) -> str:
    """The suggestions.csv that belongs to an export folder: results/<vol>/ng -> results/<vol>/suggestions.csv."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(ng_dir))), SUGGESTIONS_FILE)


# ---- checkpoints ------------------------------------------------------------------
# A checkpoint is a torch-saved dict. The keys below are the format; train writes
# them, infer and training_embeddings read them through read_checkpoint.

CHECKPOINT_MODEL_CONFIG = "model_config"  # the model section it was trained with
CHECKPOINT_STATE = "state_dict"  # weights (the best validation iteration's, where there was validation)
CHECKPOINT_LAST_STATE = "last_state_dict"  # the last iteration's weights, where they differ
CHECKPOINT_TARGET = "target"
CHECKPOINT_CHANNELS = CHANNELS  # output channel names, as heat files name them
CHECKPOINT_DOWNSAMPLE_XY = DOWNSAMPLE_XY  # model.downsample_xy it was trained at
CHECKPOINT_INPUT_NORM = "input_norm"
# (z, y, x) nm of the voxels the network saw: the training images' voxel size, y and x times
# the pooling. Inference pools a volume to it (model.pooling_for_volume); older checkpoints lack it.
CHECKPOINT_VOXEL_SIZE = VOXEL_SIZE
CHECKPOINT_VERSION = VERSION
# Training's record of the run (train writes them; nothing needs them to load the model).
CHECKPOINT_ITERATION = "iteration"  # the last iteration run
CHECKPOINT_BEST_ITERATION = "best_iteration"  # the iteration whose weights are CHECKPOINT_STATE
CHECKPOINT_BEST_VAL_IOU = "best_val_iou"  # their validation IoU (None without validation)
CHECKPOINT_SEED = "seed"
CHECKPOINT_TRAIN_CONFIG = "train_config"  # the train section it ran with
CHECKPOINT_REQUIRED = (CHECKPOINT_MODEL_CONFIG, CHECKPOINT_STATE)
_WEIGHT_KEYS = (CHECKPOINT_STATE, CHECKPOINT_LAST_STATE)


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    """The bytes ``save_checkpoint`` writes: the same content gives the same bytes.

    Saved through memory: torch.save to a file names the zip archive after the
    (temporary, pid-bearing) file name, which would change the bytes.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically (see ``checkpoint_bytes``)."""
    from emmito.io import atomic_path

    data = checkpoint_bytes(checkpoint)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load an emmito checkpoint (tensors on the CPU).

    Raises a one-line EmmitoError naming the file when it is missing, unreadable
    (corrupt, truncated, foreign) or lacks the keys every checkpoint has.
    """
    import torch

    from emmito.io import EmmitoError

    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: checkpoint not found: run 'emmito train' (or the train rule) first, or fix the path")
    try:
        checkpoint = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmmitoError(
            f"{path}: not a readable checkpoint ({first_line[:120]}): it is corrupt or not from emmito; delete it and retrain"
        ) from None
    missing = [k for k in CHECKPOINT_REQUIRED if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise EmmitoError(f"{path}: not an emmito checkpoint (no {', '.join(missing)}): retrain with 'emmito train'")
    return checkpoint


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's metadata (everything but the weights), for summaries and checks."""
    return {k: v for k, v in read_checkpoint(path).items() if k not in _WEIGHT_KEYS}


# ---- support sets -----------------------------------------------------------------
# The nearest_neighbour decoder's support set: embeddings of training voxels with their
# classes, written by train beside the checkpoint and read by segment.

SUPPORT_FORMAT = 1


def save_support_set(path: str | os.PathLike, features: np.ndarray, classes: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
    """Write a support set to ``path`` (.npz: features float32 (N, E), classes int64 (N,), plus scalar attrs), atomically."""
    from emmito.io import atomic_path

    extra = {key: np.asarray(value) for key, value in (attrs or {}).items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                features=np.asarray(features, dtype=np.float32),
                classes=np.asarray(classes, dtype=np.int64),
                format=np.asarray(SUPPORT_FORMAT),
                **extra,
            )


def load_support_set(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, E), classes int64 (N,)) from ``save_support_set``'s file; EmmitoError naming the fix."""
    from emmito.io import EmmitoError

    path = Path(path)
    if not path.exists():
        raise EmmitoError(
            f"{path}: support set not found: segment.decoder nearest_neighbour needs the support.npz that "
            "training an embedding model writes beside its checkpoint (retrain with model.head embedding) or set segment.support_set"
        )
    try:
        with np.load(path) as data:
            features, classes = data["features"].astype(np.float32), data["classes"].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise EmmitoError(f"{path}: not a readable support set ({exc}): delete it and retrain the model that writes it") from None
    if features.ndim != 2 or classes.shape != (features.shape[0],) or len(classes) == 0:
        raise EmmitoError(f"{path}: support set has features {features.shape} and classes {classes.shape}: delete it and retrain")
    return features, classes


def support_set_beside(checkpoint: str | os.PathLike) -> str:
    """The support set that belongs to ``checkpoint`` (an embedding model's): the file train writes, in its folder."""
    return os.path.join(os.path.dirname(os.fspath(checkpoint)), os.path.basename(Results().support_set()))


# ---- decoder settings -------------------------------------------------------------
# decoder.json beside a checkpoint: the segment settings ``emmito tune`` chose for that model
# (``tuning.Tuned.record()``: "decoder", "settings", the scores, the volumes, the trials) plus
# "format". It travels with the checkpoint; segment reads it (config keys the user set win).

DECODER_SETTINGS_FILE = "decoder.json"
DECODER_SETTINGS_FORMAT = 1


def decoder_settings_beside(checkpoint: str | os.PathLike) -> str:
    """The decoder.json that belongs to ``checkpoint``: the file of that name in its folder."""
    return os.path.join(os.path.dirname(os.fspath(checkpoint)), DECODER_SETTINGS_FILE)


def save_decoder_settings(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write decoder settings (``record`` with "decoder" and "settings") to ``path`` as JSON with the format version, atomically."""
    import json

    from emmito.io import atomic_path

    text = json.dumps({**record, "format": DECODER_SETTINGS_FORMAT}, sort_keys=True, indent=1) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_decoder_settings(path: str | os.PathLike) -> dict[str, Any]:
    """decoder.json's record (``save_decoder_settings``); a one-line EmmitoError naming the file and the fix."""
    import json

    from emmito.io import EmmitoError

    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: decoder settings not found: run the tune rule (or 'emmito tune') that writes it, or fix the path")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EmmitoError(f"{path}: not readable decoder settings ({str(exc)[:120]}): delete it and rerun the tune rule") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict) or not isinstance(record.get("decoder"), str):
        raise EmmitoError(f"{path}: not emmito decoder settings (no 'decoder' and 'settings'): delete it and rerun the tune rule")
    version = record.get("format", DECODER_SETTINGS_FORMAT)
    if not isinstance(version, int) or version > DECODER_SETTINGS_FORMAT:
        raise EmmitoError(
            f"{path}: decoder settings format {version} is newer than this emmito's ({DECODER_SETTINGS_FORMAT}): "
            "upgrade emmito, or delete the file and rerun the tune rule"
        )
    return record


# ---- test fixtures ----------------------------------------------------------------
# One factory for the files tests build by hand, so that a change to the contract
# changes them all.

FIXTURE_KINDS = ("image", "label", "heat", "seg")


def fixture(
    path: str | os.PathLike,
    kind: str,
    data: np.ndarray,
    *,
    voxel_size: tuple[float, float, float] | list[float] = (40.0, 8.0, 8.0),
    offset: int = 0,
    volume_depth: int | None = None,
    downsample_xy: int = 1,
    channels: list[str] | None = None,
    embedding_range: float | None = None,
    attrs: dict[str, Any] | None = None,
    scores: np.ndarray | None = None,
) -> Path:
    """Write a volume of ``kind`` the way its stage would, and return its path.

    - ``image``: uint8 (z, y, x); ``label``: uint32 (z, y, x) ids;
    - ``heat``: uint8 (channel, z, y, x) or (z, y, x) for one channel, with
      ``channels`` (default ``foreground`` for one channel), the volume frame
      (``volume_depth`` defaults to ``offset`` + the file's depth) and
      ``embedding_range`` where given;
    - ``seg``: uint32 (z, y, x) ids with the volume frame, and ``scores``
      where given: a table of ``SLICE_SCORE_COLUMNS`` (4 columns: a segment
      block's) or ``OBJECT_SCORE_COLUMNS`` (3: a traced or final seg file's).
    ``attrs`` are set on top (a test that wants an odd file).
    """
    from emmito.io import create_volume, write_table

    if kind not in FIXTURE_KINDS:
        raise ValueError(f"fixture kind {kind!r}: use one of {FIXTURE_KINDS}")
    data = np.asarray(data)
    extra: dict[str, Any] = {}
    if kind == "image":
        data = data.astype(np.uint8, copy=False)
    elif kind == "label":
        data = data.astype(np.uint32, copy=False)
    elif kind == "heat":
        data = data.astype(np.uint8, copy=False)
        if data.ndim == 3:
            data = data[None]
        names = channels if channels is not None else ["foreground"] if data.shape[0] == 1 else None
        if names is None:
            raise ValueError("a heat fixture of several channels needs their names (channels=...)")
        depth = volume_depth if volume_depth is not None else offset + data.shape[1]
        extra = heat_file_attrs(names, depth, downsample_xy, embedding_range)
    else:  # seg
        data = data.astype(np.uint32, copy=False)
        depth = volume_depth if volume_depth is not None else offset + data.shape[0]
        extra = volume_frame(depth, downsample_xy)
    if scores is not None and kind != "seg":
        raise ValueError("only a seg fixture carries object scores")
    with create_volume(path, data.shape, data.dtype, voxel_size=voxel_size, offset=offset, attrs={**extra, **(attrs or {})}) as ds:
        ds[...] = data
        if scores is not None:
            scores = np.asarray(scores, dtype=np.int64)
            name, columns = (SLICE_SCORES, SLICE_SCORE_COLUMNS) if scores.shape[-1] == 4 else (OBJECT_SCORES, OBJECT_SCORE_COLUMNS)
            write_table(ds, name, scores, columns)
    return Path(path)
