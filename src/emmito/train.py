"""Training: random patches of proofread volumes -> a U-Net checkpoint and a metrics log.

Images are mean-pooled by ``infer.downsample_xy`` (with infer's own
``mean_pool_xy``) and labels mode-pooled, so the network trains at the scale
it infers at. Targets (``model.target``, see ``emmito.targets``) are computed
once per volume at that scale; patches are drawn at random (a fraction centred
on a labelled voxel) and augmented (``emmito.augment``). Losses per target are
weighted by ``train.loss_weights`` (``emmito.losses``); optional auxiliary
heads add ``train.aux_loss_weight`` times the same loss. AdamW, linear warm-up
then cosine decay, gradient clipping; AMP on CUDA only.
Validation runs the same sliding-window inference as ``emmito infer``
(``infer.predict_slices``) on whole validation volumes, logs voxel IoU and
instance F1 (after ``segment``), and keeps the weights with the best IoU.

On CPU the same config and seed give a byte-identical checkpoint: one seeded
numpy Generator draws every patch and augmentation, torch is seeded and runs
deterministic algorithms, and the checkpoint holds nothing time-dependent.
Training saves a resume state every ``train.save_every`` iterations (model,
optimiser, scheduler, both RNG states, iteration, best weights, metrics); a
rerun continues from it and ends with the same weights as an uninterrupted run.
``train.max_minutes`` (off by default) stops by wall time instead and stretches
the cosine over that time: quicker to plan on a shared machine, but not
reproducible.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import fastremap
import numpy as np
import torch
from tqdm import tqdm

from emmito import __version__
from emmito.augment import augment_patch
from emmito.infer import DEFAULT_INPUT_NORM, autocast, job_threads, mean_pool_xy, pick_device, predict_slices, to_heat
from emmito.io import EmmitoError, atomic_path, read_volume
from emmito.embedding import build_support_set, discriminative_loss, heat_to_embeddings, save_support_set
from emmito.losses import target_loss, weighted_bce, dice_loss
from emmito.model import build_model, check_patch, embedding_dim, heat_model, output_channels
from emmito.targets import binary_target, make_target, touching_border  # noqa: F401  (re-exported)
from emmito.upsample import downsample_mode

GRADIENT_CLIP_NORM = 1.0


def pool_volume(image: np.ndarray, label: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, label uint32) (z, y, x) -> the inference scale: image mean-pooled by ``factor`` in y, x
    (float32 0-255, exactly as ``infer`` pools), label mode-pooled (uint32, ceil(y/factor), ceil(x/factor)).
    """
    if factor == 1:
        return image, label
    pooled_image = mean_pool_xy(image, factor)
    pooled_label = label
    for _ in range(int(round(math.log2(factor)))):
        pooled_label = downsample_mode(pooled_label)
    return pooled_image, pooled_label


class PatchSampler:
    """Random training patches (image, float32 target (channel, z, y, x)), each (z, y, x) = ``patch``.

    ``volumes``: (image 0-255 uint8 or float32, label uint32) pairs, already at
    the inference scale. Training volumes are proofread crops, small enough to
    hold in memory whole with their targets; a volume smaller than the patch
    is reflect-padded up to it. With ``instances``, the target gains a last
    channel holding the instance ids (consecutive, as float32: exact below
    2^24), so that augmentation moves them with the target (nearest
    interpolation) for the discriminative loss.
    """

    def __init__(
        self,
        volumes: list[tuple[np.ndarray, np.ndarray]],
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
        for image, label in volumes:
            pad = [(0, max(0, p - s)) for p, s in zip(self.patch, image.shape)]
            if any(after for _, after in pad):
                image, label = np.pad(image, pad, mode="reflect"), np.pad(label, pad, mode="reflect")
            target_array = make_target(label, target, contour_width)
            if instances:
                ids = fastremap.renumber(label, in_place=False)[0]
                if ids.max() >= 2**24:
                    raise EmmitoError(f"a training volume has {int(ids.max())} objects; the embedding head takes at most 2^24 - 1")
                target_array = np.concatenate([target_array, ids[None].astype(np.float32)])
            self.volumes.append((image, target_array))
            # Flat indices of labelled voxels, for foreground-centred patches (a few bytes per voxel of a small crop).
            self.foreground.append(np.flatnonzero(label))
        sizes = np.array([image.size for image, _ in self.volumes], dtype=np.float64)
        self.volume_probability = sizes / sizes.sum()

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (image (z, y, x), target float32 (channel, z, y, x)) patch pair."""
        index = int(rng.choice(len(self.volumes), p=self.volume_probability))
        image, target = self.volumes[index]
        shape = np.array(image.shape)
        patch = np.array(self.patch)
        foreground = self.foreground[index]
        if rng.random() < self.foreground_fraction and foreground.size:
            centre = np.array(np.unravel_index(foreground[rng.integers(foreground.size)], image.shape))
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


def balanced_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE-with-logits (each class weighs half) plus soft Dice; ``target`` float 0/1."""
    return weighted_bce(logits, target, True) + dice_loss(torch.sigmoid(logits), target)


def voxel_iou(probability: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> tuple[int, int]:
    """(intersection, union) voxel counts of ``probability > threshold`` against ``label > 0``."""
    predicted, truth = probability > threshold, label != 0
    return int(np.count_nonzero(predicted & truth)), int(np.count_nonzero(predicted | truth))


def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    params: dict[str, Any],
    device: torch.device | str,
    input_norm: dict[str, float] | None = None,
    tta: int = 1,
) -> np.ndarray:
    """float32 (channel, z, y, x) heat in [0, 1] of every output channel (``model.output_channels``) of a whole
    in-memory (z, y, x) volume already at the inference scale, by ``infer``'s sliding window (``tta`` variants)."""
    return predict_slices(
        heat_model(model, params["model"]),
        lambda a, b: image[a:b],
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
        tta=tta,
    )


def validate(
    model: torch.nn.Module,
    volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    device: torch.device,
    input_norm: dict[str, float],
) -> dict[str, float]:
    """{"val_iou", "val_f1"} over the validation volumes (at the inference scale), by sliding-window inference.

    IoU: the first channel at probability 0.5 against label > 0, voxels summed
    over volumes. F1: instance F1 at IoU 0.5 of ``segment`` (heat_watershed on
    the first channel, ``params["segment"]``), averaged over volumes.
    """
    from emmito.evaluate import instance_f1
    from emmito.segment import segment_block

    intersection = union = 0
    scores = []
    for image, label in volumes:
        probability = predict_volume(model, image, params, device, input_norm)
        i, u = voxel_iou(probability[0], label)
        intersection, union = intersection + i, union + u
        labels = segment_block(to_heat(probability[0]), params.get("segment"))
        scores.append(instance_f1(labels, label))
    model.train()
    return {"val_iou": intersection / union if union else 1.0, "val_f1": float(np.mean(scores)) if scores else 0.0}


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def config_digest(params: dict[str, Any]) -> str:
    """Hash of the settings a resume state must share with the run that continues it."""
    relevant = {k: params.get(k) for k in ("seed", "model", "train")}
    relevant["downsample_xy"] = params["infer"]["downsample_xy"]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


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


def train_model(
    train_volumes: list[tuple[np.ndarray, np.ndarray]],
    val_volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    resume_path: Path | None = None,
    stop_after: int | None = None,
    tensorboard_dir: Path | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train on (image uint8, label uint32) pairs of full-resolution (z, y, x) arrays.

    ``params`` holds the config sections ``seed``, ``model``, ``train``, ``infer``
    (and optionally ``segment`` for validation F1), defaults filled. Volumes
    are pooled by ``infer.downsample_xy`` first. ``resume_path``: where the
    resume state is saved every ``train.save_every`` iterations and read from
    at the start. ``stop_after``: stop (saving the state) after this iteration,
    as a preemption would. Returns (checkpoint dict, metrics: one dict per
    iteration with iteration, loss, lr, seconds and, where validated, val_iou, val_f1).
    """
    model_cfg, train_cfg = params["model"], params["train"]
    check_patch(model_cfg["patch"], model_cfg)
    device = torch.device(device) if device is not None else pick_device()
    input_norm = dict(DEFAULT_INPUT_NORM)
    factor = params["infer"]["downsample_xy"]
    target_kind = model_cfg["target"]
    train_volumes = [pool_volume(image, label, factor) for image, label in train_volumes]
    val_volumes = [pool_volume(image, label, factor) for image, label in val_volumes]
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(job_threads(train_cfg["threads"]))
    torch.manual_seed(params["seed"])
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    writer = _tensorboard_writer(tensorboard_dir)
    digest = config_digest(params)
    try:
        rng = np.random.default_rng(params["seed"])
        embedding_channels = embedding_dim(model_cfg)
        discriminative = train_cfg["discriminative"]
        sampler = PatchSampler(
            train_volumes,
            model_cfg["patch"],
            train_cfg["foreground_fraction"],
            target_kind,
            model_cfg["contour_width"],
            instances=embedding_channels > 0,
        )
        model = build_model(model_cfg).to(device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["learning_rate"], weight_decay=train_cfg["weight_decay"])
        total = train_cfg["iterations"]
        budget_seconds = train_cfg["max_minutes"] * 60.0
        progress_box: dict[str, float | None] = {"progress": None}
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda it: learning_rate_factor(it, train_cfg["warmup_iterations"], total, progress_box["progress"]),
        )
        # fp16 needs loss scaling; bf16 and fp32 do not.
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())

        metrics: list[dict[str, Any]] = []
        best_iou, best_iteration, best_state = -1.0, total, None
        first, elapsed_before = 1, 0.0
        state = _load_state(resume_path, digest) if resume_path is not None else None
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            rng.bit_generator.state = state["numpy_rng"]
            torch.set_rng_state(state["torch_rng"])
            metrics, first, elapsed_before = state["metrics"], state["iteration"] + 1, state["elapsed"]
            best_iou, best_iteration, best_state = state["best_iou"], state["best_iteration"], state["best_state"]

        def save_state(iteration: int, elapsed: float) -> None:
            if resume_path is None:
                return
            _save_state(
                resume_path,
                {
                    "config_digest": digest,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "numpy_rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "iteration": iteration,
                    "elapsed": elapsed,
                    "metrics": metrics,
                    "best_iou": best_iou,
                    "best_iteration": best_iteration,
                    "best_state": best_state,
                },
            )

        started = time.perf_counter() - elapsed_before
        last_iteration = first - 1
        bar = tqdm(range(first, total + 1), desc="train", unit="it", file=sys.stderr, disable=not progress)
        for iteration in bar:
            images, targets = [], []
            for _ in range(train_cfg["batch_size"]):
                image, target = sampler.sample(rng)
                image = (image.astype(np.float32) - input_norm["mean"]) / input_norm["std"]
                if train_cfg["augment"]:
                    image, target = augment_patch(image, np.array(target, dtype=np.float32), rng, train_cfg)
                images.append(np.ascontiguousarray(image, dtype=np.float32))
                targets.append(np.ascontiguousarray(target, dtype=np.float32))
            inputs = torch.from_numpy(np.stack(images))[:, None].to(device)
            target_tensor = torch.from_numpy(np.stack(targets)).to(device)

            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                logits, aux = model.forward_with_aux(inputs)
            terms: dict[str, torch.Tensor] = {}
            if embedding_channels:
                # The last target channel holds the instance ids, the last output channels the embedding.
                instance_ids = target_tensor[:, -1].round().long()
                target_tensor = target_tensor[:, :-1]
                embedding_loss, terms = discriminative_loss(
                    logits[:, -embedding_channels:].float(),
                    instance_ids,
                    discriminative["delta_var"],
                    discriminative["delta_dist"],
                    discriminative["gamma"],
                    background=discriminative["background_cluster"],
                )
                logits, aux = logits[:, :-embedding_channels], [a[:, :-embedding_channels] for a in aux]
                target_weight = discriminative["target_weight"]
            else:
                target_weight = 1.0
            loss = target_weight * target_loss(logits.float(), target_tensor, target_kind, train_cfg)
            for aux_logits in aux:
                loss = loss + target_weight * train_cfg["aux_loss_weight"] * target_loss(
                    aux_logits.float(), target_tensor, target_kind, train_cfg
                )
            if embedding_channels:
                loss = loss + discriminative["weight"] * embedding_loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["gradient_clip"])
            scaler.step(optimizer)
            scaler.update()
            elapsed = time.perf_counter() - started
            if budget_seconds > 0:
                warmup = train_cfg["warmup_iterations"]
                progress_box["progress"] = None if iteration < warmup else min(1.0, max(elapsed / budget_seconds, (iteration - warmup) / max(1, total - warmup)))
            scheduler.step()

            out_of_time = budget_seconds > 0 and elapsed >= budget_seconds
            record: dict[str, Any] = {"iteration": iteration, "loss": round(float(loss.detach()), 6), "lr": learning_rate}
            record.update({name: round(float(value.detach()), 6) for name, value in terms.items()})
            if val_volumes and (iteration % train_cfg["val_every"] == 0 or iteration == total or out_of_time):
                scores = validate(model, val_volumes, params, device, input_norm)
                record.update({k: round(v, 6) for k, v in scores.items()})
                if scores["val_iou"] > best_iou:
                    best_iou, best_iteration, best_state = scores["val_iou"], iteration, _cpu_state(model)
                if writer is not None:
                    with torch.no_grad():
                        outputs = [torch.sigmoid(logits)] + [torch.sigmoid(a) for a in aux]
                    writer.add_image("train/input_target_prediction_aux", _image_grid(inputs, target_tensor, outputs), iteration)
            record["seconds"] = round(time.perf_counter() - started, 3)
            metrics.append(record)
            if writer is not None:
                for key in ("loss", "lr", "var", "dist", "reg", "val_iou", "val_f1"):
                    if key in record:
                        writer.add_scalar(f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}", record[key], iteration)
            bar.set_postfix(loss=f"{record['loss']:.4f}", **({"val_iou": f"{record['val_iou']:.3f}"} if "val_iou" in record else {}))
            last_iteration = iteration
            if stop_after is not None and iteration >= stop_after:
                save_state(iteration, time.perf_counter() - started)
                break
            if iteration % train_cfg["save_every"] == 0:
                save_state(iteration, time.perf_counter() - started)
            if out_of_time:
                break
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        if writer is not None:
            writer.close()

    last_state = _cpu_state(model)
    checkpoint: dict[str, Any] = {
        "model_config": copy.deepcopy(model_cfg),
        "target": target_kind,
        "channels": output_channels(model_cfg),
        "downsample_xy": factor,
        "state_dict": best_state if best_state is not None else last_state,
        "iteration": last_iteration,
        "best_iteration": best_iteration if best_state is not None else last_iteration,
        "best_val_iou": best_iou if best_state is not None else None,
        "emmito_version": __version__,
        "input_norm": input_norm,
        "seed": params["seed"],
        "train_config": copy.deepcopy(train_cfg),
    }
    if best_state is not None:
        checkpoint["last_state_dict"] = last_state
    return checkpoint, metrics


def training_embeddings(
    checkpoint: dict[str, Any],
    volumes: list[tuple[np.ndarray, np.ndarray]],
    params: dict[str, Any],
    device: torch.device | str = "cpu",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(embeddings float32 (E, z, y, x), classes int64 (z, y, x): 1 mitochondrion, 0 background) per training volume.

    Each full-resolution (image, label) volume is pooled and predicted as
    ``infer`` would (``infer.tta`` included), its embeddings quantised as heat
    files store them, so that they match what ``segment`` reads.
    """
    model_cfg = {**params["model"], **checkpoint["model_config"]}
    dim = embedding_dim(model_cfg)
    if not dim:
        raise EmmitoError("a support set needs an embedding model (model.head embedding)")
    model = build_model(model_cfg)
    model.load_state_dict(checkpoint["state_dict"])
    model.to(device).eval()
    embedded = []
    for image, label in volumes:
        image, label = pool_volume(image, label, checkpoint["downsample_xy"])
        probability = predict_volume(model, image, params, device, checkpoint.get("input_norm"), tta=params["infer"]["tta"])
        embedded.append((heat_to_embeddings(to_heat(probability[-dim:])), (label > 0).astype(np.int64)))
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
    embeddings (``training_embeddings``, or ``embedded`` where already
    computed) in all, half background (class 0) and half mitochondrion
    (class 1), drawn with ``seed``.
    """
    embedded = training_embeddings(checkpoint, volumes, params, device) if embedded is None else embedded
    per_volume = max(2, params["train"]["discriminative"]["support_voxels"] // max(1, len(embedded)))
    features, classes = [], []
    for index, (embeddings, voxel_classes) in enumerate(embedded):
        f, c = build_support_set(embeddings, voxel_classes, per_volume, params["seed"] + index)
        features.append(f)
        classes.append(c)
    return np.concatenate(features), np.concatenate(classes)


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
    checkpoint_path = Path(args.checkpoint)
    # Beside the checkpoint and not a declared output, so a preempted job's rerun finds it.
    resume_path = checkpoint_path.with_name(checkpoint_path.name + ".resume")
    tensorboard_dir = checkpoint_path.parent / "tensorboard" if params["train"]["tensorboard"] else None
    has_embedding = embedding_dim(params["model"]) > 0
    support_path = getattr(args, "support", None)
    if has_embedding != (support_path is not None):
        raise EmmitoError(
            "model.head embedding needs --support PATH (the support set to write)" if has_embedding
            else "--support is only written for model.head embedding: drop it or set model.head embedding"
        )
    checkpoint, metrics = train_model(train_volumes, val_volumes, params, resume_path=resume_path, tensorboard_dir=tensorboard_dir)
    if has_embedding:
        features, classes = support_set(checkpoint, train_volumes, params, pick_device())
        save_support_set(support_path, features, classes, {"embedding_dim": features.shape[1]})
    save_checkpoint(checkpoint_path, checkpoint)
    write_metrics(args.metrics, metrics)
    resume_path.unlink(missing_ok=True)
