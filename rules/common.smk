# Everything that is not a rule: config validation, chunk/block arithmetic, input functions.
# Parse-time work stays cheap because every cluster job parses this again: per volume, two
# stat calls while its slice folder is unchanged (one listing and one header the first time)
# or a container's metadata; no image decoding, and no work that grows with the slice count.
# Every path pattern comes from emmito.contract.Results (R), the cutting into chunks and
# blocks from emmito.blocks.Layout (LAYOUT), each rule's params from the schema's x-stages
# (stage_params below).

import json
import os
import re
import shlex
from functools import cache

import numpy as np

from emmito import config as emmito_config
from emmito.blocks import Layout
from emmito.contract import DOWNSAMPLE_XY, OUTPUT_VERSIONS, Results
from emmito.contract import decoder_settings_beside, support_set_beside
from emmito.io import EmmitoError
from emmito.sources import describe_cached
from emmito.sources import slab_slices
from snakemake.exceptions import WorkflowError

R = Results()
try:
    # Fills Snakemake's config in place; VALIDATED also knows which keys the user set.
    # Remembered under R.parse_cache() for an unchanged config: every cluster job parses this.
    VALIDATED = emmito_config.validate_cached(config, R.parse_cache())
except EmmitoError as exc:
    raise WorkflowError(str(exc)) from None


wildcard_constraints:
    vol="|".join(re.escape(v) for v in sorted(config["volumes"])),
    job=r"\d+",
    block=r"\d+",


MODEL = config["model"]["name"]
LAYOUT = Layout.from_config(config)
CHUNKS_PER_JOB = config["infer"]["chunks_per_job"]
CONDA_ENV = "../envs/emmito.yaml"
# The checkpoint infer (and tune) use: model.checkpoint where set (a trained model from elsewhere:
# no train job, train.smk defines none), else the one the train rule writes.
TRAINS = not config["model"]["checkpoint"]
CHECKPOINT = config["model"]["checkpoint"] or R.checkpoint(MODEL)
if not TRAINS and config["train"]["volumes"]:
    raise WorkflowError(
        f"model.checkpoint and train.volumes are both set: model.checkpoint uses {CHECKPOINT} as it is (no training); "
        f"to fine-tune it on train.volumes set train.init_from: {CHECKPOINT} instead and leave model.checkpoint empty"
    )
if not TRAINS and not os.path.exists(CHECKPOINT):
    raise WorkflowError(
        f"model.checkpoint: {CHECKPOINT} does not exist: fix the path (relative to the project folder), "
        "or leave model.checkpoint empty to train a model"
    )
if config["train"]["init_from"] and not os.path.exists(config["train"]["init_from"]):
    raise WorkflowError(
        f"train.init_from: {config['train']['init_from']} does not exist: fix the path (relative to the "
        "project folder), or leave it empty to train from scratch"
    )
EMBEDDING_HEAD = config["model"]["head"] == "embedding"
EMBEDDING_DECODERS = ("embedding_cluster", "nearest_neighbour")
# The support set the nearest_neighbour decoder reads: written beside the checkpoint by train.
SUPPORT_SET = config["segment"]["support_set"] or support_set_beside(CHECKPOINT)
NEEDS_SUPPORT = config["segment"]["decoder"] == "nearest_neighbour"
# The decoder settings tuned for the model (rules/tune.smk): the tune job chooses them on the
# labelled volumes, train.validation where given, else train.volumes (never a volume that is
# only segmented, nor one labelled only in part: fully_labelled). With nothing fully labelled
# to tune on there is no tune job: segment reads the decoder.json beside the checkpoint where
# there is one, else nothing.


def has_labels(vol):
    return "labels" in config["volumes"][vol]


def fully_labelled(vol):
    """Labelled everywhere: labels and neither labels_offset nor valid (a proofread crop is for training only)."""
    return has_labels(vol) and not emmito_config.partly_labelled(config["volumes"][vol])


TUNE_VOLUMES = [
    v
    for v in config["train"]["validation"] or config["train"]["volumes"]
    if fully_labelled(v)
]
TUNE_CHECKPOINT = CHECKPOINT
if TUNE_VOLUMES:
    DECODER_SETTINGS = R.decoder_settings(MODEL)
elif os.path.exists(decoder_settings_beside(TUNE_CHECKPOINT)):
    DECODER_SETTINGS = decoder_settings_beside(TUNE_CHECKPOINT)
else:
    DECODER_SETTINGS = None
# A model from elsewhere (model.checkpoint) carries its own head: segment checks its channels.
if TRAINS and config["segment"]["decoder"] in EMBEDDING_DECODERS and not EMBEDDING_HEAD:
    raise WorkflowError(
        f"segment.decoder {config['segment']['decoder']} reads embeddings, but model.head is "
        f"{config['model']['head']}: set model.head embedding (and retrain), or pick segment.decoder auto"
    )


@cache
def volume_source(vol, kind="images"):
    """What volumes.<vol>.<kind> holds (emmito.sources.describe_cached): depth, height, width, input files.

    Slices: one directory listing and one header the first time, then two stat calls while
    the folder is unchanged (the listing is remembered under R.parse_cache()); TIFF stacks,
    HDF5, zarr, N5: their metadata.
    """
    where = str(config["volumes"][vol][kind])
    try:
        return describe_cached(where, R.parse_cache())
    except EmmitoError as exc:
        if where.startswith("data/demo/") and not os.path.exists("data/demo/.done"):
            raise WorkflowError(
                f"volumes.{vol}.{kind}: {where} does not exist yet: make the demo data with `make data`, "
                "or point volumes at your own slices (--configfile)"
            ) from None
        raise WorkflowError(f"volumes.{vol}.{kind}: {exc}") from None


def source_files(vol, kind="images"):
    """What convert takes as input: a slice folder (not each slice: the DAG stays small), or one stack / container."""
    return list(volume_source(vol, kind).files)


@cache
def depth(vol):
    return volume_source(vol).depth


@cache
def slice_voxels(vol):
    """Voxels per slice at inference resolution (from the first header or the metadata), for memory requests."""
    described = volume_source(vol)
    factor = config["model"][DOWNSAMPLE_XY]
    return max(1, (described.height // factor) * (described.width // factor))


@cache
def volume_layout(vol):
    """The chunks and blocks of one volume."""
    return LAYOUT.with_depth(depth(vol))


# ---- outputs -----------------------------------------------------------------


def all_outputs():
    """Final targets: the traced, full-resolution segmentation and, where labels cover the volume, metrics.

    A partly labelled volume (labels_offset / valid) gets no metrics: they would count its
    unlabelled voxels as background.

    The model and its training report only where the workflow trains it (model.checkpoint empty).
    """
    targets = []
    if TRAINS:
        targets.append(R.checkpoint(MODEL))
    if TRAINS and config["train"]["volumes"]:
        targets.append(R.model_report(MODEL))
    if DECODER_SETTINGS:
        targets.append(R.model_report(MODEL, "decoder.html"))
    for vol in config["infer"]["volumes"]:
        targets.append(R.seg(vol))
        targets += [R.neuroglancer(vol), R.objects(vol), R.suggestions(vol)]
        if config["export"]["ome_zarr"]:
            targets.append(R.ome_zarr(vol))
        if config["export"]["tiff"]:
            targets.append(R.seg_tiff(vol))
        targets += [
            R.report(vol, name) for name in ("overlays.png", "sizes.png", "objects.png")
        ]
        if fully_labelled(vol):
            targets.append(R.metrics(vol))
            targets += [R.report(vol, "scores.png"), R.report(vol, "metrics.html")]
    return targets


# ---- input functions -----------------------------------------------------------


def convert_images(wildcards):
    return source_files(wildcards.vol)


def convert_labels(wildcards):
    if not has_labels(wildcards.vol):
        raise WorkflowError(
            f"{R.label(wildcards.vol)} was requested but volumes.{wildcards.vol} has no 'labels': add them to the config"
        )
    files = source_files(wildcards.vol) + source_files(wildcards.vol, "labels")
    if "valid" in config["volumes"][wildcards.vol]:
        files += source_files(wildcards.vol, "valid")
    return files


def train_inputs(wildcards):
    vols = config["train"]["volumes"] + config["train"]["validation"]
    if not config["train"]["volumes"]:
        raise WorkflowError(
            "train.volumes is empty: name the labelled volumes to train on, or set model.checkpoint to a "
            f"trained checkpoint (e.g. {R.checkpoint(MODEL)}, where an earlier run wrote one) to use it without training"
        )
    inputs = [path for v in vols for path in (R.image(v), R.label(v))]
    # Fine-tuning: the checkpoint it starts from is an input, so that a new one there retrains.
    return inputs + (
        [config["train"]["init_from"]] if config["train"]["init_from"] else []
    )


def train_args(wildcards):
    args = [f"--train {R.image(v)} {R.label(v)}" for v in config["train"]["volumes"]]
    args += [f"--val {R.image(v)} {R.label(v)}" for v in config["train"]["validation"]]
    return " ".join(args)


def job_chunks(wildcards):
    """The chunks infer job {job} writes, as --chunks arguments."""
    chunks = volume_layout(wildcards.vol).chunks_of_job(
        int(wildcards.job), CHUNKS_PER_JOB
    )
    return " ".join(map(str, chunks))


def merge_chunk_files(wildcards):
    """The heat files of the chunks block {block} reads (its own and its overlap's)."""
    chunk_indices = volume_layout(wildcards.vol).chunks_of_block(int(wildcards.block))
    return [R.heat_chunk(wildcards.vol, c, CHUNKS_PER_JOB) for c in chunk_indices]


def merge_jobs(wildcards):
    """The infer jobs' folders that hold those files."""
    return sorted({os.path.dirname(path) for path in merge_chunk_files(wildcards)})


def segment_inputs(wildcards):
    inputs = {"heat": R.heat_block(wildcards.vol, wildcards.block)}
    if NEEDS_SUPPORT:
        inputs["support"] = SUPPORT_SET
    if DECODER_SETTINGS:
        inputs["settings"] = DECODER_SETTINGS
    return inputs


def decoder_settings_arg(wildcards, input):
    return f"--decoder-settings {input.settings}" if DECODER_SETTINGS else ""


def tune_inputs(wildcards):
    inputs = {"checkpoint": TUNE_CHECKPOINT}
    inputs["volumes"] = [p for v in TUNE_VOLUMES for p in (R.image(v), R.label(v))]
    if NEEDS_SUPPORT:
        inputs["support"] = SUPPORT_SET
    return inputs


def tune_args(wildcards):
    return " ".join(f"--volume {v} {R.image(v)} {R.label(v)}" for v in TUNE_VOLUMES)


def tune_support_arg(wildcards, input):
    return f"--support {input.support}" if NEEDS_SUPPORT else ""


def tune_mem_mb(wildcards, attempt):
    """tune holds up to tune.max_slices slices of each volume: heat, labels and the float prediction."""
    most = config["tune"]["max_slices"]
    voxels = sum(
        min(depth(v), most or depth(v)) * slice_voxels(v) for v in TUNE_VOLUMES
    )
    return int((2000 + 40 * voxels / 2**20) * attempt)


def train_outputs():
    outputs = {
        "checkpoint": R.checkpoint(MODEL),
        "metrics": R.training_log(MODEL),
    }
    if EMBEDDING_HEAD:
        outputs["support"] = R.support_set(MODEL)
    return outputs


def support_arg(wildcards, output):
    return f"--support {output.support}" if EMBEDDING_HEAD else ""


def trace_blocks(wildcards):
    return [
        R.seg_block(wildcards.vol, b)
        for b in range(volume_layout(wildcards.vol).n_blocks)
    ]


def evaluate_inputs(wildcards):
    return {"seg": R.seg(wildcards.vol), "label": R.label(wildcards.vol)}


# ---- parameters ------------------------------------------------------------------


def stage_params(stage, **overrides):
    """The keys that change ``stage``'s output, as one shell-quoted JSON argument (``--params``).

    emmito.config.stage_params chooses them from the schema's x-stages: being a param, a
    change in these values reruns the stage, and a change in any other key does not. They
    hold the stage's output version (contract.OUTPUT_VERSIONS), never the package's.
    ``overrides``: {section: {key: value}} set on top (paths the workflow resolves).
    """
    chosen = emmito_config.stage_params(VALIDATED, stage)
    for section, values in overrides.items():
        chosen[section] = {**chosen.get(section, {}), **values}
    return shlex.quote(json.dumps(chosen, sort_keys=True, separators=(",", ":")))


# The keys each stage reads that change no output (threads, batch sizes): not params, so a
# change reruns nothing. They reach the jobs as environment variables EMMITO_RUNTIME_<STAGE>,
# set here at parse time (so in every process that runs a job: snakemake parses this file
# again inside each cluster job), and the shell commands pass them on as
# --runtime "$EMMITO_RUNTIME_<STAGE>": the command template (the rule's "code") never changes.
def runtime_variable(stage):
    return f"EMMITO_RUNTIME_{stage.upper()}"


os.environ.update(
    {
        runtime_variable(stage): json.dumps(
            emmito_config.runtime_params(VALIDATED, stage),
            sort_keys=True,
            separators=(",", ":"),
        )
        for stage in OUTPUT_VERSIONS
    }
)


# ---- resources -------------------------------------------------------------------
# Memory requests grow with the slices a job holds and with the retry attempt, so that a
# job killed for memory on a cluster comes back with more.


def mem_mb(slices, bytes_per_voxel, base_mb=1000):
    def request(wildcards, attempt):
        voxels = (
            slices(wildcards) * slice_voxels(wildcards.vol)
            if hasattr(wildcards, "vol")
            else 0
        )
        return int((base_mb + bytes_per_voxel * voxels / 2**20) * attempt)

    return request


def job_slices_of(wildcards):
    """An infer job holds its chunks' heat and the slices its windows read (a tile's depth of halo)."""
    tile = config["infer"]["tile"]
    tile_z = tile[0] if isinstance(tile, list) else config["model"]["patch"][0]
    return CHUNKS_PER_JOB * LAYOUT.chunk_slices + 2 * tile_z


def chunk_slices_of(wildcards):
    return LAYOUT.chunk_slices + 2 * config["model"]["patch"][0]


def block_slices_of(wildcards):
    return LAYOUT.block_slices + LAYOUT.block_overlap


def runtime_minutes(minutes):
    def request(wildcards, attempt):
        return minutes * attempt

    return request


def one_slice(wildcards):
    return 1


def no_slices(wildcards):
    return 0


def eight_slices(wildcards):
    """Stages that work a slab of 8 slices (one HDF5 chunk depth) at a time: measure, ome_zarr, tiff."""
    return 8


# ---- convert --------------------------------------------------------------------------


def convert_params(wildcards):
    """The convert section (how 16-bit and float images map to uint8) with the output version, as --params.

    stage_params("convert") would also hold every volume (volumes has x-stages [convert]),
    so adding a volume would rerun the others' convert: each rule passes its own volume's
    entry as arguments (images_arg, labels_arg, voxel_size_arg) instead.
    """
    chosen = emmito_config.stage_params(VALIDATED, "convert")
    chosen.pop("volumes", None)
    explicit = emmito_config.PARAMS_EXPLICIT
    chosen[explicit] = [k for k in chosen[explicit] if not k.startswith("volumes.")]
    return shlex.quote(json.dumps(chosen, sort_keys=True, separators=(",", ":")))


def convert_mem_mb(kind, base_mb):
    """A slab of the source (whole storage chunks in z, emmito.sources.slab_slices) and its copies.

    Per voxel of the slab: the stored values twice (read, then checked), the float work
    array of the intensity mapping and the uint8 result; labels: up to 3 samples (RGB)
    twice and the uint32 ids.
    """

    def request(wildcards, attempt):
        described = volume_source(wildcards.vol, kind)
        itemsize = np.dtype(described.dtype).itemsize
        height, width = described.height, described.width
        slab = slab_slices(described.chunk_slices, height, width, itemsize, 8)
        if kind == "images":
            per_voxel = 2 * itemsize + (4 if itemsize <= 2 else 8) + 1
        else:
            per_voxel = 6 * itemsize + 8
        return int((base_mb + per_voxel * slab * height * width / 2**20) * attempt)

    return request


# ---- shell arguments ----------------------------------------------------------------


def images_arg(wildcards):
    return shlex.quote(config["volumes"][wildcards.vol]["images"])


def labels_arg(wildcards):
    volume = config["volumes"][wildcards.vol]
    arg = f"--labels {shlex.quote(volume['labels'])} --label-format {volume['label_format']}"
    # A partly labelled volume (a proofread crop) only: every other volume's command is as it was.
    if "labels_offset" in volume:
        offset = " ".join(str(int(v)) for v in volume["labels_offset"])
        arg += f" --labels-offset {offset}"
    if "valid" in volume:
        arg += f" --valid {shlex.quote(volume['valid'])}"
    return arg


def voxel_size_arg(wildcards):
    return " ".join(str(v) for v in config["volumes"][wildcards.vol]["voxel_size"])


# Describe every volume the run uses at parse time (one directory listing or one container's
# metadata each, cached): a numbering mistake or a wrong dataset path then stops the run with
# one message, where from inside an input function Snakemake would wrap it in an
# InputFunctionException with a traceback.
for _vol in dict.fromkeys(
    config["train"]["volumes"]
    + config["train"]["validation"]
    + config["infer"]["volumes"]
):
    for _kind in ("images", "labels", "valid"):
        if _kind in config["volumes"][_vol]:
            volume_source(_vol, _kind)


def suggest_heat_blocks(wildcards):
    """Every heat block of the volume: suggest reads the slices each owns."""
    return [
        R.heat_block(wildcards.vol, b)
        for b in range(volume_layout(wildcards.vol).n_blocks)
    ]
