"""``emmito tune``: a checkpoint + labelled volumes -> decoder.json beside it, the file I/O around ``emmito.tuning``.

After training, it predicts the labelled volumes (the workflow passes
``train.validation`` where given, else ``train.volumes``: never a volume that
is only segmented and judged) with the checkpoint, pooled as infer pools them
(``model.pooling_for_volume``), and lets ``tuning.tune`` choose the
decoder's settings on that heat against the labels (mode-pooled alike). The
prediction has fixed settings: the schema's default ``infer`` section (the
window grid infer uses unless told otherwise: ``infer.tile`` auto, its crop,
overlap and blending; GroupNorm makes the heat depend on the windows, so tuning
on another grid would tune for another heat) without test-time augmentation
(``TTA``): the tuned settings are a property of the model, and an ``infer`` key
does not retune.
A volume deeper than ``tune.max_slices`` is tuned on its central slices (read
with their halo only). The result (``contract.save_decoder_settings``) is
written atomically; ``segment`` reads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emmito import config, contract, embedding, tuning
from emmito.io import EmmitoError, open_volume, volume_attrs
from emmito.model import load_checkpoint, output_channels, pooling_for_volume, trained_model_config
from emmito.prediction import predict_slices, to_heat
from emmito.tiling import plan_tiling
from emmito.resampling import mean_pool_xy, mode_pool_xy, pooled_shape
from emmito.runtime import keep_freed_memory, pick_device, thread_count

# Fixed prediction settings of tuning: the schema's infer defaults (the grid a default infer predicts on),
# one pass, whatever the infer section says.
TTA = 1


def tuning_infer_section() -> dict[str, Any]:
    """The ``infer`` settings tuning predicts with: the schema's defaults, whatever the config says."""
    return config.section_defaults("infer")


def predict_volume_heat(
    model: torch.nn.Module,
    checkpoint: dict[str, Any],
    checkpoint_path: str | Path,
    image_path: str | Path,
    label_path: str | Path,
    max_slices: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[int, int]]:
    """(heat channels by name, uint8 (z, y, x) each; labels uint32 at the same scale; slices [z0, z1)) of one volume.

    ``model``, ``checkpoint``: ``model.load_checkpoint``'s. The image is pooled
    as infer pools it (``model.pooling_for_volume``), the labels mode-pooled
    alike. Only the tuned slices and the halo their windows need are read.
    """
    model_cfg = trained_model_config(checkpoint)
    names = [str(c) for c in checkpoint.get(contract.CHECKPOINT_CHANNELS, output_channels(model_cfg))]
    with open_volume(image_path) as image, open_volume(label_path) as label:
        if contract.VALID_MASK in label.file:
            raise EmmitoError(
                f"{label_path} is labelled only in part (its '{contract.VALID_MASK}' mask): tune needs a fully labelled volume"
            )
        if image.ndim != 3 or image.dtype != np.uint8:
            raise EmmitoError(f"{image_path}: expected uint8 (z, y, x), found {image.dtype} {image.shape}: rerun 'emmito convert'")
        if tuple(label.shape) != tuple(image.shape):
            raise EmmitoError(
                f"{label_path} is {'x'.join(map(str, label.shape))} but {image_path} is "
                f"{'x'.join(map(str, image.shape))}: labels must cover the image slice for slice; reconvert the pair"
            )
        factor = pooling_for_volume(checkpoint, contract.voxel_size(volume_attrs(image)), image_path, checkpoint_path)
        z0, z1 = tuning.central_slices(image.shape[0], max_slices)
        infer_cfg = tuning_infer_section()
        probabilities = predict_slices(
            model, lambda a, b: mean_pool_xy(image[a:b], factor), image.shape[0], z0, z1,
            plan_tiling(model_cfg, infer_cfg, pooled_shape(image.shape, factor), len(names)),
            batch_size, device, input_norm=checkpoint.get(contract.CHECKPOINT_INPUT_NORM),
            blend_sigma=infer_cfg["blend_sigma"], progress=True, tta=TTA,
        )
        labels = mode_pool_xy(np.asarray(label[z0:z1], dtype=np.uint32), factor)
    heat = to_heat(probabilities)
    if heat.shape[0] != len(names):
        raise EmmitoError(f"the model predicts {heat.shape[0]} channels but its checkpoint names {len(names)} ({names}): retrain")
    return dict(zip(names, heat)), labels, (z0, z1)


def tune_files(
    checkpoint_path: str | Path,
    volumes: list[tuple[str, str, str]],
    out: str | Path,
    params: dict[str, Any],
    support_path: str | Path | None = None,
) -> tuning.Tuned:
    """Tune the decoder of ``checkpoint_path`` on (name, image.h5, label.h5) volumes; write decoder.json to ``out``.

    ``params``: complete config sections (``segment``: the decoder and the keys
    it does not choose; ``tune``: ``max_slices``, and ``batch_size`` and ``threads`` for the prediction).
    """
    torch.set_num_threads(thread_count(params["tune"]["threads"]))
    device = pick_device(log=lambda line: print(f"emmito tune: {line}", file=sys.stderr, flush=True))
    model, checkpoint = load_checkpoint(checkpoint_path, None, device)
    tune_volumes = []
    for name, image, label in volumes:
        channels, labels, slices = predict_volume_heat(
            model, checkpoint, checkpoint_path, image, label, params["tune"]["max_slices"], params["tune"]["batch_size"], device
        )
        tune_volumes.append(tuning.TuneVolume(name, channels, labels, slices))
    support = contract.load_support_set(support_path) if support_path else None
    infer_cfg = tuning_infer_section()
    tuned = tuning.tune(tune_volumes, params["segment"], support, embedding.DEFAULT_EMBEDDING_RANGE, progress=True)
    record = {
        **tuned.record(),
        "target": checkpoint.get(contract.CHECKPOINT_TARGET),
        "checkpoint_iteration": checkpoint.get(contract.CHECKPOINT_ITERATION),
        "prediction": {**{k: infer_cfg[k] for k in ("tile", "tile_crop", "tile_overlap", "blend_sigma")}, "tta": TTA},
    }
    contract.save_decoder_settings(out, record)
    return tuned


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito tune CHECKPOINT OUT --volume NAME IMAGE LABEL [...] [--support NPZ]``: write decoder.json."""
    keep_freed_memory()
    tuned = tune_files(args.checkpoint, [tuple(v) for v in args.volume], args.out, params, args.support)
    print(
        f"emmito tune: {tuned.decoder} on {', '.join(v['name'] for v in tuned.volumes)}: "
        f"{tuning.describe(tuned.settings, dict.fromkeys(tuned.settings, 'tuned'))}; F1 over IoU 0.5-0.95 "
        f"{tuned.chosen['score']:.3f}, at IoU 0.5 {tuned.chosen['instance_f1']:.3f} (untuned {tuned.untuned['score']:.3f}, "
        f"{tuned.untuned['instance_f1']:.3f}); {len(tuned.trials)} settings tried",
        file=sys.stderr,
    )
