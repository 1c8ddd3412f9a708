"""Training: random patches of proofread volumes -> a U-Net checkpoint and a metrics log.

Target ``binary``: foreground = label > 0, except where two different instances
touch, which is set to background so that touching mitochondria stay separate
for the watershed. Loss: class-balanced BCE-with-logits plus soft Dice.
Validation runs the same sliding-window inference as ``emmito infer``
(``infer.predict_slices``) on whole validation volumes and keeps the weights
with the best voxel IoU.

On CPU the same config and seed give a byte-identical checkpoint: one seeded
numpy Generator draws every patch and augmentation, torch is seeded and runs
deterministic algorithms, and the checkpoint holds nothing time-dependent.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from emmito import __version__
from emmito.infer import DEFAULT_INPUT_NORM, autocast, job_threads, pick_device, predict_slices
from emmito.io import EmmitoError, atomic_path, read_volume
from emmito.model import build_model, check_patch, target_channels

GRADIENT_CLIP_NORM = 1.0


def touching_border(label: np.ndarray) -> np.ndarray:
    """bool mask of labelled voxels that have a face neighbour (6-connectivity) with a different non-zero id.

    Both sides are marked, so the border between two touching instances is two voxels thick.
    """
    border = np.zeros(label.shape, dtype=bool)
    for axis in range(label.ndim):
        low = [slice(None)] * label.ndim
        high = [slice(None)] * label.ndim
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        a, b = label[tuple(low)], label[tuple(high)]
        differ = (a != b) & (a != 0) & (b != 0)
        border[tuple(low)] |= differ
        border[tuple(high)] |= differ
    return border


def binary_target(label: np.ndarray) -> np.ndarray:
    """uint8 target (same shape as ``label``): 1 inside instances, 0 on background and on touching borders."""
    return ((label != 0) & ~touching_border(label)).astype(np.uint8)


class PatchSampler:
    """Random training patches (image uint8, target uint8), each (z, y, x) = ``patch``, from whole volumes.

    Training volumes are proofread crops, small enough to hold in memory whole;
    a volume smaller than the patch is reflect-padded up to it.
    """

    def __init__(self, volumes: list[tuple[np.ndarray, np.ndarray]], patch: list[int], foreground_fraction: float):
        self.patch = tuple(int(p) for p in patch)
        self.foreground_fraction = foreground_fraction
        self.volumes: list[tuple[np.ndarray, np.ndarray]] = []
        for image, label in volumes:
            pad = [(0, max(0, p - s)) for p, s in zip(self.patch, image.shape)]
            if any(after for _, after in pad):
                image, label = np.pad(image, pad, mode="reflect"), np.pad(label, pad, mode="reflect")
            self.volumes.append((image, label))
        # Flat indices of labelled voxels, for foreground-centred patches (a few bytes per voxel of a small crop).
        self.foreground = [np.flatnonzero(label) for _, label in self.volumes]
        sizes = np.array([label.size for _, label in self.volumes], dtype=np.float64)
        self.volume_probability = sizes / sizes.sum()

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (image uint8, target uint8) patch pair."""
        index = int(rng.choice(len(self.volumes), p=self.volume_probability))
        image, label = self.volumes[index]
        shape = np.array(image.shape)
        patch = np.array(self.patch)
        foreground = self.foreground[index]
        if rng.random() < self.foreground_fraction and foreground.size:
            centre = np.array(np.unravel_index(foreground[rng.integers(foreground.size)], image.shape))
            start = np.clip(centre - patch // 2, 0, shape - patch)
        else:
            start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
        stop = start + patch
        # One voxel of context, where it exists, so that borders on the patch's faces are seen.
        lo, hi = np.maximum(start - 1, 0), np.minimum(stop + 1, shape)
        context = label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inner = tuple(slice(a, a + p) for a, p in zip(start - lo, patch))
        target = binary_target(context)[inner]
        return image[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]], target


def augment(
    image: np.ndarray, target: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float
) -> tuple[np.ndarray, np.ndarray]:
    """Random z/y/x flips, an xy transpose (square patches only) and intensity jitter.

    ``image`` is float32 normalised intensity; ``brightness`` and ``contrast`` are the
    largest shifts (in normalised units) and relative contrast changes. The same number
    of random draws is made every call, so the stream stays aligned.
    """
    flips, transpose, gain, shift = rng.random(3) < 0.5, rng.random() < 0.5, rng.uniform(-1, 1), rng.uniform(-1, 1)
    axes = tuple(int(a) for a in np.flatnonzero(flips))
    if axes:
        image, target = np.flip(image, axes), np.flip(target, axes)
    if transpose and image.shape[1] == image.shape[2]:
        image, target = image.transpose(0, 2, 1), target.transpose(0, 2, 1)
    image = image * np.float32(1.0 + contrast * gain) + np.float32(brightness * shift)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target)


def learning_rate_factor(iteration: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at 0-based ``iteration``: linear warm-up, then cosine decay to 0."""
    if iteration < warmup:
        return (iteration + 1) / warmup
    progress = (iteration - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def balanced_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE-with-logits (each class weighs half) plus soft Dice; ``target`` float 0/1."""
    positive = target.mean().clamp(0.01, 0.99)
    weight = torch.where(target > 0.5, 0.5 / positive, 0.5 / (1.0 - positive))
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    probability = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (probability * target).sum() + 1.0) / (probability.sum() + target.sum() + 1.0)
    return bce + dice


def voxel_iou(probability: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> tuple[int, int]:
    """(intersection, union) voxel counts of ``probability > threshold`` against ``label > 0``."""
    predicted, truth = probability > threshold, label != 0
    return int(np.count_nonzero(predicted & truth)), int(np.count_nonzero(predicted | truth))


def validate(
    model: torch.nn.Module,
    volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    device: torch.device,
    input_norm: dict[str, float],
) -> float:
    """Voxel IoU (foreground at probability 0.5) over all validation volumes, by whole-volume sliding-window inference."""
    intersection = union = 0
    for image, label in volumes:
        probability = predict_slices(
            model,
            lambda a, b, image=image: image[a:b],
            image.shape[0],
            0,
            image.shape[0],
            params["model"]["patch"],
            params["infer"]["tile_overlap"],
            params["infer"]["batch_size"],
            device,
            input_norm=input_norm,
            blend_sigma=params["infer"]["blend_sigma"],
            progress=False,
        )
        i, u = voxel_iou(probability[0], label)
        intersection, union = intersection + i, union + u
    model.train()
    return intersection / union if union else 1.0


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_model(
    train_volumes: list[tuple[np.ndarray, np.ndarray]],
    val_volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train on (image uint8, label uint32) pairs of (z, y, x) arrays.

    ``params`` holds the config sections ``seed``, ``model``, ``train``, ``infer``
    (defaults filled). Returns (checkpoint dict, metrics: one dict per iteration
    with iteration, loss, lr, seconds and, where validated, val_iou).
    """
    model_cfg, train_cfg = params["model"], params["train"]
    check_patch(model_cfg["patch"], model_cfg)
    device = torch.device(device) if device is not None else pick_device()
    input_norm = dict(DEFAULT_INPUT_NORM)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(job_threads(train_cfg["threads"]))
    torch.manual_seed(params["seed"])
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        rng = np.random.default_rng(params["seed"])
        sampler = PatchSampler(train_volumes, model_cfg["patch"], train_cfg["foreground_fraction"])
        model = build_model(model_cfg).to(device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["learning_rate"], weight_decay=train_cfg["weight_decay"])
        total = train_cfg["iterations"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: learning_rate_factor(it, train_cfg["warmup_iterations"], total)
        )
        # fp16 needs loss scaling; bf16 and fp32 do not.
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())

        metrics: list[dict[str, Any]] = []
        best_iou, best_iteration, best_state = -1.0, total, None
        started = time.perf_counter()
        bar = tqdm(range(1, total + 1), desc="train", unit="it", file=sys.stderr, disable=not progress)
        for iteration in bar:
            images, targets = [], []
            for _ in range(train_cfg["batch_size"]):
                image, target = sampler.sample(rng)
                image = (image.astype(np.float32) - input_norm["mean"]) / input_norm["std"]
                if train_cfg["augment"]:
                    image, target = augment(image, target, rng, train_cfg["augment_brightness"], train_cfg["augment_contrast"])
                images.append(image)
                targets.append(target)
            inputs = torch.from_numpy(np.stack(images))[:, None].to(device)
            target_tensor = torch.from_numpy(np.stack(targets).astype(np.float32))[:, None].to(device)

            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                logits = model(inputs)
            loss = balanced_loss(logits.float(), target_tensor)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP_NORM)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            record: dict[str, Any] = {"iteration": iteration, "loss": round(float(loss.detach()), 6), "lr": learning_rate}
            if val_volumes and (iteration % train_cfg["val_every"] == 0 or iteration == total):
                iou = validate(model, val_volumes, params, device, input_norm)
                record["val_iou"] = round(iou, 6)
                if iou > best_iou:
                    best_iou, best_iteration, best_state = iou, iteration, _cpu_state(model)
            record["seconds"] = round(time.perf_counter() - started, 3)
            metrics.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", **({"val_iou": f"{record['val_iou']:.3f}"} if "val_iou" in record else {}))
    finally:
        torch.use_deterministic_algorithms(deterministic_before)

    last_state = _cpu_state(model)
    checkpoint: dict[str, Any] = {
        "model_config": copy.deepcopy(model_cfg),
        "target": model_cfg["target"],
        "channels": target_channels(model_cfg["target"]),
        "state_dict": best_state if best_state is not None else last_state,
        "iteration": total,
        "best_iteration": best_iteration,
        "best_val_iou": best_iou if best_state is not None else None,
        "emmito_version": __version__,
        "input_norm": input_norm,
        "seed": params["seed"],
        "train_config": copy.deepcopy(train_cfg),
    }
    if best_state is not None:
        checkpoint["last_state_dict"] = last_state
    return checkpoint, metrics


def save_checkpoint(path: Any, checkpoint: dict[str, Any]) -> None:
    """torch.save ``checkpoint`` to ``path`` atomically, with the same bytes for the same content.

    Saved through memory first: torch.save to a file names the zip archive after
    the (temporary, pid-bearing) file name, which would change the bytes.
    """
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def write_metrics(path: Any, metrics: list[dict[str, Any]]) -> None:
    """Write ``metrics`` as JSON lines, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in metrics))


def _load_pair(image_path: Any, label_path: Any) -> tuple[np.ndarray, np.ndarray]:
    # Training volumes are proofread crops (hundreds of MB at most), so they are loaded whole.
    image, _ = read_volume(image_path)
    label, _ = read_volume(label_path)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise EmmitoError(f"{image_path}: expected uint8 (z, y, x), found {image.dtype} {image.shape}: rerun 'emmito convert'")
    if image.shape != label.shape:
        raise EmmitoError(
            f"{label_path} is {'x'.join(map(str, label.shape))} but {image_path} is {'x'.join(map(str, image.shape))}: "
            "labels must cover the image slice for slice; reconvert the pair"
        )
    return image, label


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito train --train IMG LBL ... [--val IMG LBL ...] --checkpoint CKPT --metrics JSONL``."""
    check_patch(params["model"]["patch"], params["model"])
    train_volumes = [_load_pair(image, label) for image, label in args.train]
    val_volumes = [_load_pair(image, label) for image, label in args.val]
    checkpoint, metrics = train_model(train_volumes, val_volumes, params)
    save_checkpoint(args.checkpoint, checkpoint)
    write_metrics(args.metrics, metrics)
