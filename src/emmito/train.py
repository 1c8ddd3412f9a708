"""Training: random patches of proofread volumes -> a U-Net checkpoint and a metrics log.

Images are mean-pooled by ``model.downsample_xy`` and labels mode-pooled
(``resampling.pool_pair``, the pooling ``infer`` applies), so the network
trains at the scale it infers at. Targets (``model.target``, see
``emmito.targets``) are computed once per volume at that scale; patches are
drawn at random (a fraction centred on a labelled voxel) and augmented
(``emmito.augment``) by ``train.workers`` DataLoader worker processes, a few
batches ahead of the network (``batch_stream``; 0: by the loop itself). The
loss (``losses.TrainingLoss``) weighs the losses per target by
``train.loss_weights``; optional auxiliary heads add
``train.aux_loss_weight`` times the same loss, an embedding head the
discriminative loss. AdamW, linear warm-up then cosine decay, gradient
clipping; AMP on CUDA only.
Validation runs the same sliding-window inference as ``emmito infer``
(``prediction.predict_volume``) on whole validation volumes, with fixed
settings of its own (``VALIDATION_TILE_OVERLAP``, ``VALIDATION_TTA``,
``VALIDATION_BLEND_SIGMA``; the batch is ``train.batch_size``), never the
``infer`` section, so that no inference key changes what training writes. It
logs voxel IoU and instance F1 (the heat_watershed decoder,
``decoders.segment_block``, at the schema's ``segment`` defaults) and keeps the
weights with the best IoU.

The checkpoint carries what inference needs (``contract.CHECKPOINT_*``): the
model section, target, channels, input normalisation, the pooling factor and
``voxel_size``, the (z, y, x) nm of the voxels the network saw (the training
images' voxel size, y and x times the factor).

Fine-tuning: ``train.init_from: PATH`` starts from that checkpoint's weights
(the best ones). The architecture is the checkpoint's (``model.resolve_model_config``:
a model key the user set that contradicts it is a one-line error; one left to
its default never is), and the training images are pooled by the factor that
brings their voxels nearest the checkpoint's (``model.pooling_for_volume``).
``train.freeze: encoder`` trains only the decoder path (``model.freeze_encoder``:
the stem and every encoder level are frozen; the decoder levels, their
upsampling projections and the heads learn).

On CPU the same config and seed give a byte-identical checkpoint, for any
``train.workers``: every sample's patch and augmentation are drawn from a
Generator of its own, a pure function of (seed, iteration, its index in the
global batch) (``sample_generator``), so no draw depends on who makes the batch
or on what came before; torch is seeded and runs deterministic algorithms, and
the checkpoint holds nothing time-dependent. Training saves a resume state
every ``train.save_every`` iterations (model, optimiser, scheduler, torch's RNG
state, iteration, best weights, metrics: the batches need no state); a rerun
continues from it and ends with the same weights as an uninterrupted run.
``train.max_minutes`` (off by default) stops by wall time instead and stretches
the cosine over that time: quicker to plan on a shared machine, but not
reproducible.

Data-parallel (``train.devices`` > 1, one node): ``train_files`` claims the
devices and starts one rank per device (``emmito.distributed.launch``). Every
rank draws and augments only its own ``batch_size / devices`` samples of the
global batch (``train.batch_size``), the very samples one process draws there
(``sample_generator``), and runs the network on them; the loss is the whole
batch's on every rank (``distributed.gather_batch`` gathers the outputs and the
targets: class-balanced BCE, Dice and OHEM are no means over samples), so
the loss, its gradient and the log equal one process's up to rounding
(measured on CPU: 3e-7 relative over 30 iterations). BatchNorm
becomes SyncBatchNorm (GPUs only). Rank 0 alone validates, logs and writes
the resume state and the checkpoint (the bare network's weights, as one
process writes them); every rank resumes from that state. The same device
count and seed give the same checkpoint; another count the same up to rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastremap
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from emmito import __version__, contract
from emmito.augment import augment_patch
from emmito.config import PARAMS_EXPLICIT, section_defaults, stage_params
from emmito.decoders import segment_block
from emmito.distributed import Rank, broadcast_float, check_split, die_with_parent, gather_batch, launch, resolve_devices
from emmito.embedding import build_support_set, heat_to_embeddings
from emmito.io import EmmitoError, atomic_path, open_volume, read_volume
from emmito.losses import TrainingLoss, TrainingLossParts
from emmito.metrics import instance_f1, voxel_iou
from emmito.model import (
    build_model,
    check_patch,
    embedding_dim,
    freeze_encoder,
    load_weights,
    output_channels,
    pooling_for_volume,
    resolve_model_config,
    trained_model_config,
)
from emmito.prediction import DEFAULT_INPUT_NORM, predict_volume, to_heat
from emmito.resampling import POOLING_TOLERANCE, mode_pool_xy, pool_pair, pooling_mismatch
from emmito.runtime import autocast, claim_devices, keep_freed_memory, thread_count
from emmito.targets import disk, make_target
from emmito.tiling import PATCH_GRID

GRADIENT_CLIP_NORM = 1.0

# Training's own sliding-window settings, for validation and the support set (never infer.*):
VALIDATION_TILE_OVERLAP = 0.5
VALIDATION_TTA = 1
VALIDATION_BLEND_SIGMA = 0.125  # the schema's infer.blend_sigma default (a test checks they agree)


class PatchSampler:
    """Random training patches (image, float32 target (channel, z, y, x)), each (z, y, x) = ``patch``.

    ``volumes``: (image 0-255 uint8 or float32, label uint32) pairs, or
    (image, label, valid) triples with ``valid`` bool/uint8 (z, y, x), 1 where
    the labels are known (a proofread crop; None: everywhere), already at the
    inference scale. Training volumes are proofread crops, small enough to
    hold in memory whole with their targets; a volume smaller than the patch
    is reflect-padded up to it (its mask with 0s). With ``instances``, the
    target gains a channel holding the instance ids (consecutive, as float32:
    exact below 2^24), so that augmentation moves them with the target
    (nearest interpolation) for the discriminative loss. Where any volume has a
    mask (``masked``), every target gains a last channel, the mask (1s for a
    volume without one), moved by augmentation like the rest, for
    ``losses.TrainingLoss(masked=True)``; patches are then centred on a valid
    voxel (a labelled one for the ``foreground_fraction``), and a volume is
    drawn in proportion to its valid voxels. Instance ids are numbered among
    the valid voxels only.
    """

    def __init__(
        self,
        volumes: list[tuple[np.ndarray, ...]],
        patch: list[int],
        foreground_fraction: float,
        target: str = "binary",
        contour_width: int = 1,
        instances: bool = False,
    ):
        self.patch = tuple(int(p) for p in patch)
        self.foreground_fraction = foreground_fraction
        self.volumes: list[tuple[np.ndarray, np.ndarray]] = []
        self.foreground: list[np.ndarray] = []
        masks = [entry[2] if len(entry) > 2 else None for entry in volumes]
        self.masked = any(mask is not None for mask in masks)
        # Per volume: the flat indices of its valid voxels (None: all valid), where patches are centred.
        self.valid: list[np.ndarray | None] = []
        sizes = []
        for (image, label, *_), mask in zip(volumes, masks):
            pad = [(0, max(0, p - s)) for p, s in zip(self.patch, image.shape)]
            if any(after for _, after in pad):
                image, label = np.pad(image, pad, mode="reflect"), np.pad(label, pad, mode="reflect")
                mask = np.pad(mask, pad) if mask is not None else None
            known = mask.astype(bool) if mask is not None else None
            if known is not None:
                # The target reads the labelled voxels alone (the others as background), so that no
                # label outside the mask can reach the loss; where that would draw a contour along the
                # mask's edge (an object the edge cuts), the loss ignores a band of contour_width + 1.
                label = np.where(known, label, 0).astype(label.dtype, copy=False)
                if target == "binary_contour":
                    known = ndimage.binary_erosion(known, disk(contour_width + 1)[None], border_value=1)
            target_array = make_target(label, target, contour_width)
            if instances:
                ids = fastremap.renumber(label, in_place=False)[0]
                if ids.max() >= 2**24:
                    raise EmmitoError(f"a training volume has {int(ids.max())} objects; the embedding head takes at most 2^24 - 1")
                target_array = np.concatenate([target_array, ids[None].astype(np.float32)])
            if self.masked:
                ones = np.ones((1, *label.shape), np.float32)
                target_array = np.concatenate([target_array, known[None].astype(np.float32) if known is not None else ones])
            self.volumes.append((image, target_array))
            # Flat indices of labelled voxels, for foreground-centred patches (a few bytes per voxel of a small crop).
            self.foreground.append(np.flatnonzero(label if known is None else (label != 0) & known))
            self.valid.append(np.flatnonzero(known) if known is not None else None)
            sizes.append(image.size if known is None else self.valid[-1].size)
        sizes = np.array(sizes, dtype=np.float64)
        if not sizes.sum():
            raise EmmitoError("no training volume has a labelled voxel (every valid mask is empty): label a region first")
        self.volume_probability = sizes / sizes.sum()
        # Hard negatives (``mine_hard_negatives``): flat indices, per volume, of background voxels the model
        # called foreground at the last mining; a ``hard_fraction`` of the patches is centred on one of them.
        self.hard: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in self.volumes]
        self.hard_fraction = 0.0

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (image (z, y, x), target float32 (channel, z, y, x)) patch pair."""
        patch = np.array(self.patch)
        hard_count = sum(h.size for h in self.hard)
        # no draw at all while there is nothing mined: the stream is the plain sampler's until then
        if hard_count and rng.random() < self.hard_fraction:
            pick = int(rng.integers(hard_count))
            index = 0
            while pick >= self.hard[index].size:
                pick -= self.hard[index].size
                index += 1
            image, target = self.volumes[index]
            centre = np.array(np.unravel_index(self.hard[index][pick], image.shape))
            start = np.clip(centre - patch // 2, 0, np.array(image.shape) - patch)
            box = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch))
            return image[box], target[(slice(None), *box)]
        index = int(rng.choice(len(self.volumes), p=self.volume_probability))
        image, target = self.volumes[index]
        shape = np.array(image.shape)
        foreground = self.foreground[index]
        valid = self.valid[index]
        if rng.random() < self.foreground_fraction and foreground.size:
            centre = np.array(np.unravel_index(foreground[rng.integers(foreground.size)], image.shape))
            start = np.clip(centre - patch // 2, 0, shape - patch)
        elif valid is not None:
            centre = np.array(np.unravel_index(valid[rng.integers(valid.size)], image.shape))
            start = np.clip(centre - patch // 2, 0, shape - patch)
        else:
            start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
        box = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch))
        return image[box], target[(slice(None), *box)]


def learning_rate_factor(iteration: int, warmup: int, total: int, progress: float | None = None) -> float:
    """Multiplier of the base learning rate at 0-based ``iteration``: linear warm-up, then cosine decay to 0.

    ``progress`` (0-1), where given, replaces the iteration-based progress of the cosine (time budgets).
    """
    if iteration < warmup:
        return (iteration + 1) / warmup
    if progress is None:
        progress = (iteration - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def window_settings(model_cfg: dict[str, Any], train_cfg: dict[str, Any]) -> dict[str, Any]:
    """What ``prediction.predict_volume`` reads, for training's validation and support set: the fixed
    ``VALIDATION_*`` settings and ``train.batch_size`` windows per network call (never the ``infer`` section)."""
    return {
        "model": model_cfg,
        "infer": {
            **PATCH_GRID, "tile_overlap": VALIDATION_TILE_OVERLAP, "blend_sigma": VALIDATION_BLEND_SIGMA,
            "batch_size": train_cfg["batch_size"], "tile_memory_mb": 2**20,
        },
    }


def mining_settings(model_cfg: dict[str, Any], train_cfg: dict[str, Any]) -> dict[str, Any]:
    """What ``predict_volume`` reads when mining hard negatives: the schema's infer grid (large windows, little
    overlap: about 1.4 voxels through the network per voxel, a few seconds per training volume on a CPU)."""
    return {"model": model_cfg, "infer": {**section_defaults("infer"), "batch_size": train_cfg["batch_size"]}}


def mine_hard_negatives(
    model: torch.nn.Module, sampler: PatchSampler, settings: dict[str, Any], threshold: float, device: torch.device,
    input_norm: dict[str, float],
) -> list[np.ndarray]:
    """Per training volume of ``sampler``: flat indices of its background voxels the model gives a foreground
    probability of at least ``threshold`` (the first output channel): where it is confidently wrong.

    ``settings``: ``mining_settings``'. The model is put back in training mode.
    """
    model.eval()
    hard = []
    with torch.no_grad():
        for (image, _), foreground, valid in zip(sampler.volumes, sampler.foreground, sampler.valid):
            probability = predict_volume(model, image, settings, device, input_norm, tta=1)[0]
            wrong = probability.reshape(-1) >= threshold
            wrong[foreground] = False
            hard.append(np.flatnonzero(wrong) if valid is None else np.intersect1d(np.flatnonzero(wrong), valid, assume_unique=True))
    model.train()
    return hard


@functools.cache
def validation_decoder() -> dict[str, Any]:
    """The decoder settings of validation F1: the schema's ``segment`` defaults (the user's segment keys never reach training)."""
    return section_defaults("segment")


def validate(
    model: torch.nn.Module,
    volumes: list[tuple[np.ndarray, np.ndarray]],
    settings: dict[str, Any],
    device: torch.device,
    input_norm: dict[str, float],
) -> dict[str, float]:
    """{"val_iou", "val_f1"} over the validation volumes (at the inference scale), by sliding-window inference.

    ``settings``: ``window_settings``'s. IoU: the first channel at probability 0.5
    against label > 0, voxels summed over volumes. F1: instance F1 at IoU 0.5 of
    the heat_watershed decoder on the first channel (``validation_decoder``), averaged over volumes.
    """
    intersection = union = 0
    scores = []
    for image, label in volumes:
        probability = predict_volume(model, image, settings, device, input_norm, tta=VALIDATION_TTA)
        i, u = voxel_iou(probability[0], label)
        intersection, union = intersection + i, union + u
        labels = segment_block(to_heat(probability[0]), validation_decoder())
        scores.append(instance_f1(labels, label))
    model.train()
    return {"val_iou": intersection / union if union else 1.0, "val_f1": float(np.mean(scores)) if scores else 0.0}


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ---- the resume state ---------------------------------------------------------------------
# train's own scratch file beside the checkpoint: everything a rerun needs to continue exactly.


def config_digest(params: dict[str, Any], setup: "Setup | None" = None) -> str:
    """Hash of the settings a resume state must share with the run that continues it.

    The keys that change train's output (``config.stage_params``: not the runtime
    keys, so a rerun on a node with other threads still resumes); ``setup`` adds
    what ``training_setup`` resolved: the model section run, the pooling factor
    and the initial checkpoint's bytes (``train.init_from``).
    """
    relevant: dict[str, Any] = stage_params(params, "train")
    relevant.pop(PARAMS_EXPLICIT, None)
    if setup is not None:
        relevant.update(resolved=setup.model_cfg, factor=setup.factor, init=setup.init_digest)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_state(path: Path, digest: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=False)
    except Exception:  # a torn or foreign file: start over rather than fail
        print(f"emmito train: {path} is unreadable; starting from scratch", file=sys.stderr)
        return None
    if state.get("config_digest") != digest:
        print(f"emmito train: {path} is from another config; starting from scratch", file=sys.stderr)
        return None
    return state


# ---- what a run trains: the model section, the weights to start from, the pooling -----------------


@dataclass
class Setup:
    """What one run trains (``training_setup``).

    ``model_cfg``: the model section run (the init checkpoint's with
    ``train.init_from``), its ``downsample_xy`` = ``factor``, the y/x pooling of
    the training images; ``init_state``: the weights to start from (None: random);
    ``init_digest``: the hash of the init checkpoint's bytes (for the resume state);
    ``voxel_size``: (z, y, x) nm of the voxels the network sees, None where unknown.
    """

    model_cfg: dict[str, Any]
    factor: int
    init_state: dict[str, torch.Tensor] | None = None
    init_digest: str = ""
    voxel_size: list[float] | None = None


def training_setup(params: dict[str, Any], voxel_size: list[float] | None = None, image_source: str = "a training image") -> Setup:
    """Resolve what a run trains from ``params`` (``seed``, ``model``, ``train``) and the training images' voxel size.

    From scratch: the model section as given, pooled by ``model.downsample_xy``.
    With ``train.init_from``: that checkpoint's architecture and weights
    (``model.resolve_model_config`` checks the keys the user set, ``params.explicit``),
    pooled by the factor that fits ``voxel_size`` to the checkpoint's
    (``model.pooling_for_volume``; ``image_source`` names the images in its error).
    One-line EmmitoError for a missing checkpoint, a contradicting key, a patch
    that does not fit, or ``train.freeze`` without ``train.init_from``.
    """
    model_cfg, train_cfg = params["model"], params["train"]
    init_from = train_cfg["init_from"]
    if train_cfg["freeze"] != "none" and not init_from:
        raise EmmitoError(
            f"train.freeze {train_cfg['freeze']} needs train.init_from (a frozen random encoder learns nothing): "
            "set train.init_from to a checkpoint, or train.freeze none"
        )
    if not init_from:
        check_patch(model_cfg["patch"], model_cfg)
        setup = Setup(copy.deepcopy(dict(model_cfg)), int(model_cfg[contract.DOWNSAMPLE_XY]))
    else:
        checkpoint = contract.read_checkpoint(init_from)
        resolved = resolve_model_config(checkpoint, model_cfg, getattr(params, "explicit", None), f"train.init_from {init_from}")
        if voxel_size is not None:
            resolved[contract.DOWNSAMPLE_XY] = pooling_for_volume(checkpoint, voxel_size, image_source, init_from)
        digest = hashlib.sha256(Path(init_from).read_bytes()).hexdigest()[:16]
        setup = Setup(resolved, int(resolved[contract.DOWNSAMPLE_XY]), checkpoint[contract.CHECKPOINT_STATE], digest)
    if voxel_size is not None:
        setup.voxel_size = [float(voxel_size[0]), float(voxel_size[1]) * setup.factor, float(voxel_size[2]) * setup.factor]
    return setup


# ---- one run: batches, steps, the log ---------------------------------------------------------


def sample_generator(seed: int, iteration: int, index: int) -> np.random.Generator:
    """The Generator of sample ``index`` (0-based, in the global batch) of 1-based ``iteration``.

    A pure function of the three (``SeedSequence`` spawn keys: independent streams),
    so that a sample is the same whoever draws it and whenever: a loader worker or
    the loop itself, any worker count, a run resumed at any iteration, any rank.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(iteration, index))))


def assemble_batch(
    sampler: PatchSampler, seed: int, iteration: int, samples: range, train_cfg: dict[str, Any], input_norm: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``samples`` of ``iteration``'s global batch, on the CPU.

    (inputs float32 (n, 1, z, y, x), targets float32 (n, channel, z, y, x)). Each patch
    is drawn from ``sampler``, normalised, then augmented where ``train.augment``, every
    draw from its own ``sample_generator(seed, iteration, index)``.
    """
    images, targets = [], []
    for index in samples:
        rng = sample_generator(seed, iteration, index)
        image, target = sampler.sample(rng)
        image = (image.astype(np.float32) - input_norm["mean"]) / input_norm["std"]
        if train_cfg["augment"]:
            image, target = augment_patch(image, np.array(target, dtype=np.float32), rng, train_cfg)
        images.append(np.ascontiguousarray(image, dtype=np.float32))
        targets.append(np.ascontiguousarray(target, dtype=np.float32))
    return torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(targets))


class Batches(torch.utils.data.Dataset):
    """Iterations ``first`` .. ``last``'s batches (``assemble_batch``'s, samples ``samples`` of each), by position 0, 1, ...

    A map-style dataset for ``batch_stream``'s DataLoader: an item depends on its
    iteration alone, never on what was drawn before, so any worker may make it.
    """

    def __init__(
        self, sampler: PatchSampler, seed: int, first: int, last: int, samples: range, train_cfg: dict[str, Any],
        input_norm: dict[str, float],
    ):
        self.sampler, self.seed, self.first, self.last, self.samples = sampler, seed, first, last, samples
        self.train_cfg, self.input_norm = train_cfg, input_norm

    def __len__(self) -> int:
        return max(0, self.last - self.first + 1)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= position < len(self):
            raise IndexError(position)
        return assemble_batch(self.sampler, self.seed, self.first + position, self.samples, self.train_cfg, self.input_norm)


LOADER_PREFETCH = 2  # batches each loader worker keeps ready: the queue holds at most workers x this


def _loader_worker_init(parent: int, worker_id: int) -> None:
    """A loader worker's start: die with the training process (PR_SET_PDEATHSIG), leave SIGTERM to it.

    torch has set the worker's threads to 1 and seeded its own RNGs, which no
    batch reads (``sample_generator``). A SIGTERM sent to the job's whole process
    group is the training process's to handle (it unwinds and stops its workers);
    a SIGKILLed training process takes its workers along.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)


@contextlib.contextmanager
def batch_stream(
    batches: Batches, workers: int, pin_memory: bool = False
) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """``batches`` in order, made by ``workers`` DataLoader worker processes ahead of the loop (0: by the loop itself).

    The workers are forked (on Linux: the training volumes are shared copy-on-write,
    not copied) and each keeps ``LOADER_PREFETCH`` batches ready, so that sampling
    and augmentation overlap the network's step. The batches are the same for any
    worker count. The workers end when the block does, however it ends (the last
    iteration, ``stop_after``, the time budget, an exception).
    """
    if workers == 0 or len(batches) == 0:
        yield (batches[position] for position in range(len(batches)))
        return
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=LOADER_PREFETCH, pin_memory=pin_memory,
        worker_init_fn=functools.partial(_loader_worker_init, os.getpid()),
        multiprocessing_context="fork" if sys.platform.startswith("linux") else None,
        # Its own generator: the workers' base seed is drawn from it, not from torch's global RNG (the resume state's).
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        iterator._shutdown_workers()  # now, not whenever the iterator is collected (a traceback may hold it)


class _Run:
    """One training run's moving parts: the sampler, the model and what steps it, the log so far.

    ``resume_state``/``restore`` hold and give back all of it (with torch's RNG;
    the batches need no state: ``sample_generator``), so that a rerun continues
    exactly where a preempted one stopped.

    With ``rank`` (one process of a data-parallel run, ``emmito.distributed``):
    ``model`` is the bare network (what is validated and saved: no ``module.``
    prefix), ``network`` its DistributedDataParallel wrapper (``_data_parallel``);
    every rank draws only its own part of the global batch (``samples``), and
    ``step`` gathers the whole batch's outputs and targets for the loss.
    """

    def __init__(
        self, train_volumes: list[tuple[np.ndarray, ...]], params: dict[str, Any], setup: Setup, device: torch.device,
        rank: Rank | None = None,
    ):
        model_cfg, train_cfg = setup.model_cfg, params["train"]
        self.train_cfg, self.device, self.rank, self.seed = train_cfg, device, rank, params["seed"]
        embedding_channels = embedding_dim(model_cfg)
        self.sampler = PatchSampler(
            train_volumes,
            model_cfg["patch"],
            train_cfg["foreground_fraction"],
            model_cfg["target"],
            model_cfg["contour_width"],
            instances=embedding_channels > 0,
        )
        self.sampler.hard_fraction = train_cfg["hard_negatives"]["fraction"]
        self.loss = TrainingLoss(model_cfg["target"], train_cfg, embedding_channels, masked=self.sampler.masked)
        self.model = build_model(model_cfg)
        if setup.init_state is not None:
            load_weights(self.model, setup.init_state, f"train.init_from {train_cfg['init_from']}")
        if train_cfg["freeze"] == "encoder":
            freeze_encoder(self.model)
        self.model.to(device).train()
        self.network = _data_parallel(self.model, rank) if rank is not None else None
        self.window_settings = window_settings(model_cfg, train_cfg)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=train_cfg["learning_rate"], weight_decay=train_cfg["weight_decay"])
        self.total = train_cfg["iterations"]
        self.budget_seconds = train_cfg["max_minutes"] * 60.0
        self.schedule_progress: float | None = None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda it: learning_rate_factor(it, train_cfg["warmup_iterations"], self.total, self.schedule_progress),
        )
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
        self.metrics: list[dict[str, Any]] = []
        self.best_iou, self.best_iteration, self.best_state = -1.0, self.total, None
        self.first, self.elapsed_before = 1, 0.0
        self.mined_at = 0  # the iteration after which hard negatives were last mined

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a resume state (``resume_state``'s dict)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.metrics, self.first, self.elapsed_before = state["metrics"], state["iteration"] + 1, state["elapsed"]
        self.best_iou, self.best_iteration, self.best_state = state["best_iou"], state["best_iteration"], state["best_state"]
        self.sampler.hard = [h.numpy() for h in state["hard_negatives"]]
        self.mined_at = state["hard_negatives_mined_at"]

    def resume_state(self, digest: str, iteration: int, elapsed: float) -> dict[str, Any]:
        """Everything a rerun needs to continue after ``iteration`` (``elapsed`` seconds in)."""
        return {
            "config_digest": digest,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "iteration": iteration,
            "elapsed": elapsed,
            "metrics": self.metrics,
            "best_iou": self.best_iou,
            "best_iteration": self.best_iteration,
            "best_state": self.best_state,
            "hard_negatives": [torch.from_numpy(h) for h in self.sampler.hard],
            "hard_negatives_mined_at": self.mined_at,
        }

    @property
    def samples(self) -> range:
        """The samples of each global batch this process draws and runs: all of them, or its rank's part."""
        batch = self.train_cfg["batch_size"]
        part = self.rank.part(batch) if self.rank is not None else slice(0, batch)
        return range(part.start, part.stop)

    def batches(self, input_norm: dict[str, float], first: int, last: int) -> Batches:
        """This run's batches (its ``samples`` of each): iterations ``first`` .. ``last``."""
        return Batches(self.sampler, self.seed, first, last, self.samples, self.train_cfg, input_norm)

    def segments(self) -> Iterator[tuple[int, int]]:
        """(first, last) iterations between hard-negative minings (after every ``train.hard_negatives.every``-th
        iteration, when its fraction is above 0), from ``first`` to ``total``: each its own batch stream, made
        with the candidates mined before it."""
        every = self.train_cfg["hard_negatives"]["every"] if self.sampler.hard_fraction > 0 else self.total
        first = self.first
        while first <= self.total:
            last = min(self.total, (first - 1) // every * every + every)
            yield first, last
            first = last + 1

    def mine(self, iteration: int, input_norm: dict[str, float]) -> None:
        """Mine hard negatives after ``iteration`` where the schedule says so (``segments``) and it is not done yet.

        A resumed run whose state was saved at a mining iteration, before the mining,
        mines first thing: with the same weights, so the same candidates.
        """
        hard_cfg = self.train_cfg["hard_negatives"]
        due = self.sampler.hard_fraction > 0 and iteration > 0 and iteration % hard_cfg["every"] == 0 and iteration < self.total
        if due and self.mined_at != iteration:
            settings = mining_settings(self.window_settings["model"], self.train_cfg)
            self.sampler.hard = mine_hard_negatives(self.model, self.sampler, settings, hard_cfg["threshold"], self.device, input_norm)
            self.mined_at = iteration

    @property
    def is_main(self) -> bool:
        """Whether this process validates, logs and saves (a single process, or rank 0)."""
        return self.rank is None or self.rank.is_main

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, TrainingLossParts]:
        """One optimiser step on this process's ``samples`` of a batch: (the learning rate it ran at, the loss and its parts).

        A rank runs the network on its own part of the global batch and computes the
        loss of the whole batch from every rank's outputs and targets
        (``distributed.gather_batch``): the same loss, logged value and gradient as
        one process, up to rounding.
        """
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            if self.rank is None:
                logits, aux = self.model.forward_with_aux(inputs)
            else:
                logits, aux = self.network(inputs)
        if self.rank is not None:
            logits, *aux = gather_batch([logits, *aux], self.rank)
            (targets,) = gather_batch([targets], self.rank)
        parts = self.loss(logits, aux, targets)
        self.scaler.scale(parts.loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg["gradient_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return learning_rate, parts

    def schedule(self, iteration: int, elapsed: float) -> None:
        """Step the learning rate; with a time budget, the cosine follows the larger of time and iterations spent."""
        if self.budget_seconds > 0:
            warmup, total = self.train_cfg["warmup_iterations"], self.total
            self.schedule_progress = (
                None if iteration < warmup else min(1.0, max(elapsed / self.budget_seconds, (iteration - warmup) / max(1, total - warmup)))
            )
        self.scheduler.step()

    def elapsed(self, started: float) -> float:
        """Seconds since ``started``; with a time budget, rank 0's on every rank (they must stop and schedule alike)."""
        elapsed = time.perf_counter() - started
        if self.rank is not None and self.budget_seconds > 0:
            elapsed = broadcast_float(elapsed, self.device)
        return elapsed

    def keep_if_best(self, iteration: int, val_iou: float) -> None:
        if val_iou > self.best_iou:
            self.best_iou, self.best_iteration, self.best_state = val_iou, iteration, _cpu_state(self.model)


class _WithAux(torch.nn.Module):
    """``forward`` = the network's ``forward_with_aux``: what DistributedDataParallel wraps (it hooks ``forward``).

    ``unused``: a parameter no forward uses, trained by no optimiser and saved
    nowhere (the checkpoint is the bare network's), so that DDP's
    ``find_unused_parameters`` (``_data_parallel``) finds one and does not warn
    every rank's log to turn that flag off.
    """

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.unused = torch.nn.Parameter(torch.zeros((), device=next(network.parameters()).device))

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.network.forward_with_aux(inputs)


def _data_parallel(model: torch.nn.Module, rank: Rank) -> torch.nn.Module:
    """``model`` (on ``rank.device``) wrapped for data-parallel training; BatchNorm layers become SyncBatchNorm.

    SyncBatchNorm normalises over the global batch, as one process would; torch
    runs it on GPUs only (``distributed.check_split`` refuses BatchNorm with several
    CPU ranks). The conversion swaps modules in place and keeps the parameter and
    buffer names, so ``model.state_dict()`` still loads into a plain network.
    ``find_unused_parameters``: DDP then keeps its first gradient buckets instead
    of rebuilding them after the first iteration, so that a resumed run reduces
    gradients in the same order as an uninterrupted one: with more than 2 ranks
    the order changes the rounding (measured: 3 CPU ranks, rebuilt buckets, a
    resumed run's weights off by 7e-9; kept buckets, identical).
    """
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the top module (a UNet3D, not a norm)
    device = torch.device(rank.device)
    return torch.nn.parallel.DistributedDataParallel(
        _WithAux(model), device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )


def _tensorboard_writer(log_dir: Path | None) -> Any:
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise EmmitoError(
            "train.tensorboard is true but the 'tensorboard' package is missing: pip install tensorboard, or set it false"
        ) from None
    return SummaryWriter(str(log_dir))


def _image_grid(inputs: torch.Tensor, targets: torch.Tensor, outputs: list[torch.Tensor]) -> np.ndarray:
    """float32 (1, H, W) grid in [0, 1]: rows = batch items; columns = input, each target channel, each output channel."""
    mid = inputs.shape[2] // 2
    rows = []
    for item in range(inputs.shape[0]):
        image = inputs[item, 0, mid].float()
        columns = [((image - image.min()) / (image.max() - image.min() + 1e-6))]
        columns += [targets[item, c, mid].float().clamp(0, 1) for c in range(targets.shape[1])]
        for output in outputs:
            columns += [output[item, c, mid].float() for c in range(output.shape[1])]
        rows.append(torch.cat(columns, dim=1))
    return torch.cat(rows, dim=0)[None].detach().cpu().numpy()


def _log_tensorboard(writer: Any, record: dict[str, Any], iteration: int) -> None:
    for key in ("loss", "lr", "var", "dist", "reg", "val_iou", "val_f1"):
        if key in record:
            writer.add_scalar(f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}", record[key], iteration)


def _iteration_record(
    run: _Run, iteration: int, learning_rate: float, parts: TrainingLossParts, inputs: torch.Tensor, validating: bool,
    val_volumes: list[tuple[np.ndarray, np.ndarray]], params: dict[str, Any], input_norm: dict[str, float], writer: Any,
) -> dict[str, Any]:
    """The log line of one iteration: loss, learning rate, loss terms and, when ``validating``, the validation scores."""
    record: dict[str, Any] = {"iteration": iteration, "loss": round(float(parts.loss.detach()), 6), "lr": learning_rate}
    record.update({name: round(float(value.detach()), 6) for name, value in parts.terms.items()})
    if validating:
        scores = validate(run.model, val_volumes, run.window_settings, run.device, input_norm)
        record.update({k: round(v, 6) for k, v in scores.items()})
        run.keep_if_best(iteration, scores["val_iou"])
        if writer is not None:
            with torch.no_grad():
                outputs = [torch.sigmoid(parts.logits)] + [torch.sigmoid(a) for a in parts.aux]
            writer.add_image("train/input_target_prediction_aux", _image_grid(inputs, parts.target, outputs), iteration)
    return record


def _train_loop(
    run: _Run,
    val_volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    input_norm: dict[str, float],
    save_state: Callable[[int, float], None],
    writer: Any,
    progress: bool,
    stop_after: int | None,
) -> int:
    """Iterations ``run.first`` .. ``train.iterations`` (or until ``stop_after`` / the time budget); the last one run.

    The batches come from ``train.workers`` loader processes (``batch_stream``),
    made while the network steps. Data-parallel: every rank steps on its own
    samples; only rank 0 validates and logs (``save_state`` is its to skip
    elsewhere), while the others wait at their next collective.
    """
    train_cfg = params["train"]
    started = time.perf_counter() - run.elapsed_before
    last_iteration = run.first - 1
    bar = tqdm(total=run.total, initial=run.first - 1, desc="train", unit="it", file=sys.stderr, disable=not (progress and run.is_main))
    run.mine(run.first - 1, input_norm)  # a resumed run: the mining its state was saved just before
    for first, last in run.segments():
        with batch_stream(run.batches(input_norm, first, last), train_cfg["workers"], pin_memory=run.device.type == "cuda") as stream:
            stopped = _train_segment(run, zip(range(first, last + 1), stream), bar, val_volumes, params, input_norm, save_state,
                                     writer, started, stop_after)
        last_iteration = stopped if stopped is not None else last
        if stopped is not None:
            break
        run.mine(last, input_norm)
    bar.close()
    return last_iteration


def _train_segment(
    run: _Run, stream: Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]], bar: Any, val_volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any], input_norm: dict[str, float], save_state: Callable[[int, float], None], writer: Any, started: float,
    stop_after: int | None,
) -> int | None:
    """Step through one ``_Run.segments`` stream of (iteration, batch); the iteration it stopped at early
    (``stop_after`` or the time budget), None when it ran to its end."""
    train_cfg = params["train"]
    for iteration, (inputs, targets) in stream:
        inputs, targets = inputs.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        learning_rate, parts = run.step(inputs, targets)
        elapsed = run.elapsed(started)
        run.schedule(iteration, elapsed)
        out_of_time = run.budget_seconds > 0 and elapsed >= run.budget_seconds
        validating = bool(val_volumes) and (iteration % train_cfg["val_every"] == 0 or iteration == run.total or out_of_time)
        if run.is_main:
            record = _iteration_record(run, iteration, learning_rate, parts, inputs, validating, val_volumes, params, input_norm, writer)
            record["seconds"] = round(time.perf_counter() - started, 3)
            run.metrics.append(record)
            if writer is not None:
                _log_tensorboard(writer, record, iteration)
            scores = {"val_iou": f"{record['val_iou']:.3f}"} if "val_iou" in record else {}
            bar.set_postfix(loss=f"{record['loss']:.4f}", **scores)
        bar.update()
        if stop_after is not None and iteration >= stop_after:
            save_state(iteration, time.perf_counter() - started)
            return iteration
        if iteration % train_cfg["save_every"] == 0:
            save_state(iteration, time.perf_counter() - started)
        if out_of_time:
            return iteration
    return None


def _checkpoint(run: _Run, params: dict[str, Any], setup: Setup, input_norm: dict[str, float], last_iteration: int) -> dict[str, Any]:
    """The checkpoint of a finished run (``contract.CHECKPOINT_*`` keys): the best validated weights, else the last."""
    model_cfg = setup.model_cfg
    best_state = run.best_state
    last_state = _cpu_state(run.model)
    checkpoint: dict[str, Any] = {
        contract.CHECKPOINT_MODEL_CONFIG: copy.deepcopy(model_cfg),
        contract.CHECKPOINT_TARGET: model_cfg["target"],
        contract.CHECKPOINT_CHANNELS: output_channels(model_cfg),
        contract.CHECKPOINT_DOWNSAMPLE_XY: setup.factor,
        contract.CHECKPOINT_STATE: best_state if best_state is not None else last_state,
        contract.CHECKPOINT_ITERATION: last_iteration,
        contract.CHECKPOINT_BEST_ITERATION: run.best_iteration if best_state is not None else last_iteration,
        contract.CHECKPOINT_BEST_VAL_IOU: run.best_iou if best_state is not None else None,
        contract.CHECKPOINT_VERSION: __version__,
        contract.CHECKPOINT_INPUT_NORM: input_norm,
        contract.CHECKPOINT_SEED: params["seed"],
        # train.devices as run ("auto" resolved): the count the weights depend on. Not train.workers,
        # which changes nothing: the same bytes for any worker count.
        contract.CHECKPOINT_TRAIN_CONFIG: {
            **{k: copy.deepcopy(v) for k, v in params["train"].items() if k != "workers"},
            "devices": run.rank.world if run.rank else 1,
        },
    }
    if setup.voxel_size is not None:
        checkpoint[contract.CHECKPOINT_VOXEL_SIZE] = list(setup.voxel_size)
    if best_state is not None:
        checkpoint[contract.CHECKPOINT_LAST_STATE] = last_state
    return checkpoint


def train_model(
    train_volumes: list[tuple[np.ndarray, ...]],
    val_volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    resume_path: Path | None = None,
    stop_after: int | None = None,
    tensorboard_dir: Path | None = None,
    voxel_size: list[float] | None = None,
    image_source: str = "a training image",
    rank: Rank | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train on (image uint8, label uint32) pairs of full-resolution (z, y, x) arrays.

    A training entry may be a triple (image, label, valid): ``valid`` (z, y, x)
    non-zero where the labels are known, None for everywhere; the loss is then
    masked (``PatchSampler``, ``losses.TrainingLoss``): unlabelled voxels are not
    background. Validation volumes are labelled everywhere.

    ``params`` holds the config sections ``seed``, ``model`` and ``train``:
    complete sections, defaults filled (a ``config.Validated`` where
    ``train.init_from`` should tell the user's model keys from defaults). No other
    section is read. ``voxel_size``: the training images' (z, y, x) nm, recorded
    in the checkpoint (times the pooling) and, with ``train.init_from``, what the
    pooling factor is chosen from (``training_setup``). Volumes are pooled by that
    factor first. ``resume_path``: where the resume state is saved every
    ``train.save_every`` iterations and read from at the start. ``stop_after``:
    stop (saving the state) after this iteration, as a preemption would. Returns
    (checkpoint dict, metrics: one dict per iteration with iteration, loss, lr,
    seconds and, where validated, val_iou, val_f1).

    ``rank``: this process is one rank of a data-parallel run (``emmito.distributed``;
    its process group joined, ``device`` ignored for ``rank.device``): the ranks
    split ``train.batch_size``, each gets ``train.threads`` / world threads, and
    only rank 0 validates, logs, writes TensorBoard and saves the resume state
    (every rank reads it at the start). Every rank returns the checkpoint; only
    rank 0's metrics are complete.
    """
    train_cfg = params["train"]
    setup = training_setup(params, voxel_size, image_source)
    if rank is not None:
        device = rank.device
    device = torch.device(device) if device is not None else torch.device(claim_devices(1)[0].torch_device)
    input_norm = dict(DEFAULT_INPUT_NORM)
    train_volumes = [_pool_entry(entry, setup.factor) for entry in train_volumes]
    val_volumes = [pool_pair(image, label, setup.factor) for image, label in val_volumes]
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(max(1, thread_count(train_cfg["threads"]) // (rank.world if rank else 1)))
    torch.manual_seed(params["seed"])
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        # But not its NaN fill of every new tensor (a check for kernels that read memory they never
        # wrote; none here does): the same bytes, a faster step (benchmarks/profile_train_step.py).
        torch.utils.deterministic.fill_uninitialized_memory = False
    writer = _tensorboard_writer(tensorboard_dir) if rank is None or rank.is_main else None
    digest = config_digest(params, setup)
    try:
        run = _Run(train_volumes, params, setup, device, rank)
        state = _load_state(resume_path, digest) if resume_path is not None else None
        if state is not None:
            run.restore(state)

        def save_state(iteration: int, elapsed: float) -> None:
            if resume_path is not None and run.is_main:
                contract.save_checkpoint(resume_path, run.resume_state(digest, iteration, elapsed))

        last_iteration = _train_loop(run, val_volumes, params, input_norm, save_state, writer, progress, stop_after)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
        if writer is not None:
            writer.close()
    return _checkpoint(run, params, setup, input_norm, last_iteration), run.metrics


def _pool_entry(entry: tuple[np.ndarray, ...], factor: int) -> tuple[np.ndarray, ...]:
    """A training entry at the inference scale: ``pool_pair``'s image and label, the mask (if any) mode-pooled."""
    image, label = pool_pair(entry[0], entry[1], factor)
    if len(entry) < 3:
        return image, label
    mask = entry[2]
    if mask is not None and factor > 1:
        mask = mode_pool_xy(np.asarray(mask, np.uint8), factor)
    return image, label, mask


# ---- after training: the support set of an embedding model -------------------------------------


def training_embeddings(
    checkpoint: dict[str, Any],
    volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    device: torch.device | str = "cpu",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(embeddings float32 (E, z, y, x), classes int64 (z, y, x): 1 mitochondrion, 0 background) per training volume.

    ``volumes``: training entries (``train_model``'s): where one has a valid mask,
    its unlabelled voxels get class -1 (``build_support_set`` draws none of them).

    Each full-resolution (image, label) volume is pooled as the checkpoint was
    trained and predicted with training's own window settings (``window_settings``:
    ``VALIDATION_TILE_OVERLAP``, ``VALIDATION_TTA``, ``train.batch_size``; never the
    ``infer`` section, so that an inference key does not change what train writes),
    its embeddings quantised as heat files store them, so that they match what
    ``segment`` reads. ``params``: ``train`` (its batch size) is read.
    """
    model_cfg = trained_model_config(checkpoint)
    dim = embedding_dim(model_cfg)
    if not dim:
        raise EmmitoError("a support set needs an embedding model (model.head embedding)")
    model = build_model(model_cfg)
    model.load_state_dict(checkpoint[contract.CHECKPOINT_STATE])
    model.to(device).eval()
    settings = window_settings(model_cfg, params["train"])
    embedded = []
    for entry in volumes:
        image, label, *mask = _pool_entry(entry, model_cfg[contract.DOWNSAMPLE_XY])
        probability = predict_volume(model, image, settings, device, checkpoint.get(contract.CHECKPOINT_INPUT_NORM), tta=VALIDATION_TTA)
        classes = (label > 0).astype(np.int64)
        if mask and mask[0] is not None:
            classes[~np.asarray(mask[0], bool)] = -1
        embedded.append((heat_to_embeddings(to_heat(probability[-dim:])), classes))
    return embedded


def support_set(
    checkpoint: dict[str, Any],
    volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    device: torch.device | str = "cpu",
    embedded: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The nearest-neighbour support set of an embedding model: (features float32 (N, E), classes int64 (N,)).

    ``train.discriminative.support_voxels`` voxels of the training volumes'
    embeddings (``training_embeddings``, with training's own window settings, or
    ``embedded`` where already computed) in all, half background (class 0) and
    half mitochondrion (class 1), drawn with ``seed``.
    """
    embedded = training_embeddings(checkpoint, volumes, params, device) if embedded is None else embedded
    per_volume = max(2, params["train"]["discriminative"]["support_voxels"] // max(1, len(embedded)))
    features, classes = [], []
    for index, (embeddings, voxel_classes) in enumerate(embedded):
        f, c = build_support_set(embeddings, voxel_classes, per_volume, params["seed"] + index)
        features.append(f)
        classes.append(c)
    return np.concatenate(features), np.concatenate(classes)


# ---- the files ------------------------------------------------------------------------------


def write_metrics(path: Any, metrics: list[dict[str, Any]]) -> None:
    """Write ``metrics`` as JSON lines, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in metrics))


def _load_pair(
    image_path: Any, label_path: Any, context: tuple[int, int, int] = (0, 0, 0), align: int = 1
) -> tuple[np.ndarray, np.ndarray, list[float], np.ndarray | None]:
    """(image, label, the image's voxel size (z, y, x nm), the valid mask or None) of one training pair, checked.

    Training volumes are proofread crops (hundreds of MB at most), so they are loaded whole. A
    partly labelled label.h5 (``contract.VALID_MASK``: a proofread box of a large volume) is
    read only in its ``contract.VALID_BOX`` grown by ``context`` voxels (z, y, x) on each side,
    for the network's view of the tissue around the box (its voxels are unlabelled), the y/x
    start rounded down to a multiple of ``align`` (the pooling factor, so the pooled grid is
    inference's): memory follows the box, not the volume.
    """
    def mismatch(label_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> EmmitoError:
        return EmmitoError(
            f"{label_path} is {'x'.join(map(str, label_shape))} but {image_path} is {'x'.join(map(str, image_shape))}: "
            "labels must cover the image slice for slice; reconvert the pair"
        )

    with open_volume(label_path) as label_ds:
        has_mask = contract.VALID_MASK in label_ds.file
        if has_mask:
            box = [int(v) for v in label_ds.attrs[contract.VALID_BOX]]
            shape = label_ds.shape
            low = [max(0, b - c) for b, c in zip(box[:3], context)]
            low[1], low[2] = low[1] // align * align, low[2] // align * align
            window = tuple(slice(lo, min(n, b + c)) for lo, b, c, n in zip(low, box[3:], context, shape))
            label = label_ds[window]
            mask = label_ds.file[contract.VALID_MASK][window]
    if not has_mask:
        image, attrs = read_volume(image_path)
        label, _ = read_volume(label_path)
        mask = None
    else:
        with open_volume(image_path) as image_ds:
            if image_ds.shape != shape:
                raise mismatch(shape, image_ds.shape)
            image, attrs = image_ds[window], dict(image_ds.attrs)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise EmmitoError(f"{image_path}: expected uint8 (z, y, x), found {image.dtype} {image.shape}: rerun 'emmito convert'")
    if image.shape != label.shape:
        raise mismatch(label.shape, image.shape)
    return image, label, contract.voxel_size(attrs), mask


def common_voxel_size(voxel_sizes: list[list[float]], images: list[Any]) -> list[float]:
    """The training images' one voxel size (the first's): every image's y and x within ``POOLING_TOLERANCE`` of it.

    One network learns one scale, and the checkpoint records one; images that
    differ more are a one-line EmmitoError naming the two files.
    """
    reference = voxel_sizes[0]
    for size, image in zip(voxel_sizes[1:], images[1:]):
        if pooling_mismatch(size[1:], reference[1:], 1) > POOLING_TOLERANCE:
            raise EmmitoError(
                f"{image} has voxels of {'x'.join(f'{v:g}' for v in size)} nm but {images[0]} of "
                f"{'x'.join(f'{v:g}' for v in reference)} nm: a model trains at one voxel size; resample one of them, "
                "or fix the volume's voxel_size in the config"
            )
    return reference


@dataclass(frozen=True)
class _TrainFiles:
    """One training job's files: read the pairs, train, write the outputs; in the job's process or in each rank.

    Picklable (a data-parallel job sends it to every rank). ``device``: the single
    process's claimed device; a rank runs on ``rank.device`` and only rank 0 writes.
    """

    train_pairs: list[tuple[Any, Any]]
    val_pairs: list[tuple[Any, Any]]
    checkpoint_path: Path
    metrics_path: Path
    support_path: Path | None
    params: dict[str, Any]
    # A proofread box (a partly labelled pair) is read with this much tissue around it on each
    # side, full-resolution (z, y, x) voxels, its y/x start a multiple of ``align`` (``_load_pair``).
    context: tuple[int, int, int] = (0, 0, 0)
    align: int = 1

    def __call__(self, rank: Rank | None = None, device: str | None = None) -> None:
        # The job's process or a (spawned) rank's: every step frees and allocates the same large
        # tensors, which page-fault in afresh each step unless freed memory stays in the heap.
        keep_freed_memory()
        params, checkpoint_path = self.params, self.checkpoint_path
        loaded = [_load_pair(image, label, self.context, self.align) for image, label in self.train_pairs]
        for image, label in self.val_pairs:
            loaded.append(_load_pair(image, label))
            if loaded[-1][3] is not None:
                raise EmmitoError(
                    f"{label} is labelled only in part (its '{contract.VALID_MASK}' mask): validation needs a fully "
                    "labelled volume; move it to train.volumes"
                )
        images = [image for image, _ in [*self.train_pairs, *self.val_pairs]]
        voxel_size = common_voxel_size([size for _, _, size, _ in loaded], images)
        train_volumes = [
            (image, label) if mask is None else (image, label, mask) for image, label, _, mask in loaded[: len(self.train_pairs)]
        ]
        val_volumes = [(image, label) for image, label, _, _ in loaded[len(self.train_pairs) :]]
        # Beside the checkpoint and not a declared output, so a preempted job's rerun finds it.
        resume_path = checkpoint_path.with_name(checkpoint_path.name + ".resume")
        tensorboard_dir = checkpoint_path.parent / "tensorboard" if params["train"]["tensorboard"] else None
        checkpoint, metrics = train_model(
            train_volumes, val_volumes, params, device=device, resume_path=resume_path, tensorboard_dir=tensorboard_dir,
            voxel_size=voxel_size, image_source=str(images[0]), rank=rank,
        )
        if rank is not None and not rank.is_main:
            return
        if self.support_path is not None:
            features, classes = support_set(checkpoint, train_volumes, params, rank.device if rank else device)
            contract.save_support_set(self.support_path, features, classes, {"embedding_dim": features.shape[1]})
        contract.save_checkpoint(checkpoint_path, checkpoint)
        write_metrics(self.metrics_path, metrics)
        resume_path.unlink(missing_ok=True)


def _box_context(model_cfg: dict[str, Any]) -> tuple[tuple[int, int, int], int]:
    """(context, align) of ``_load_pair`` for a model: one patch at full resolution, the pooling factor."""
    factor = int(model_cfg[contract.DOWNSAMPLE_XY])
    return (int(model_cfg["patch"][0]), *(int(p) * factor for p in model_cfg["patch"][1:])), factor


def train_files(
    train_pairs: list[tuple[Any, Any]],
    val_pairs: list[tuple[Any, Any]],
    checkpoint_path: str | os.PathLike,
    metrics_path: str | os.PathLike,
    support_path: str | os.PathLike | None,
    params: dict[str, Any],
) -> None:
    """Train on (image.h5, label.h5) pairs; write the checkpoint, the metrics log and (embedding models) the support set.

    ``params``: complete config sections (``train_model``). The images' voxel size
    (``common_voxel_size``) goes into the checkpoint. The resume state lives
    beside the checkpoint and is removed once the checkpoint is written.
    ``train.devices`` above 1 (or auto on a machine with several GPUs): this
    process claims that many devices (``runtime.claim_devices``, held until it
    ends) and runs one rank per device (``distributed.launch``); the command
    stays one command, and fails with one line if any rank fails.
    """
    setup = training_setup(params)  # the config's mistakes before the volumes are read
    has_embedding = embedding_dim(setup.model_cfg) > 0
    if has_embedding != (support_path is not None):
        raise EmmitoError(
            "model.head embedding needs --support PATH (the support set to write)" if has_embedding
            else "--support is only written for model.head embedding: drop it or set model.head embedding"
        )
    count = resolve_devices(params["train"]["devices"])
    check_split(params["train"]["batch_size"], count, setup.model_cfg["norm"])
    job = _TrainFiles(
        [tuple(pair) for pair in train_pairs], [tuple(pair) for pair in val_pairs], Path(checkpoint_path), Path(metrics_path),
        Path(support_path) if support_path is not None else None, params, *_box_context(setup.model_cfg),
    )
    devices = claim_devices(count, log=lambda line: print(f"emmito train: {line}", file=sys.stderr, flush=True))
    if count == 1:
        job(device=devices[0].torch_device)
    else:
        launch(devices, job)


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito train --train IMG LBL ... [--val IMG LBL ...] --checkpoint CKPT --metrics JSONL [--support NPZ]``."""
    train_files(args.train, args.val, args.checkpoint, args.metrics, getattr(args, "support", None), params)
