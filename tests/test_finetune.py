"""Fine-tuning pays: a model trained on one synthetic domain, fine-tuned on a few labelled slices of another,
beats a model trained from scratch on those slices for the same number of iterations.

Domain A is ``emmito synth``'s default look. Domain B has half its contrast and
mitochondria 1.6 times as wide and long (``synthesize(contrast=, object_scale=)``).
The A model is fine-tuned (``train.init_from``) for ``ITERATIONS`` iterations on
``B_SLICES`` labelled slices of B; the scratch model gets the same slices, the
same iterations, the same seed and learning rate. Both are scored by voxel IoU
(training's validation: probability 0.5, fixed window settings) on a held-out
B volume. Fixed seeds, one torch thread: the same scores on every run of one
machine (68 s measured on a 2-core VM at load 5).
"""

from __future__ import annotations

import pytest
import torch

from emmito import contract
from emmito.config import validate_sections
from emmito.model import build_model
from emmito.synth import synthesize
from emmito.train import train_model, validate, window_settings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MODEL = {"filters": [8, 16], "patch": [4, 32, 32], "conv3d_from_level": 1, "pool_z_from_level": 1}
SIZE = 96
PRETRAIN_ITERATIONS = 300
ITERATIONS = 40  # fine-tuning and scratch alike
B_SLICES = 8  # the few labelled slices of domain B
DOMAIN_B = {"contrast": 0.5, "object_scale": 1.6}
VOXEL_SIZE = [40.0, 8.0, 8.0]
MARGIN = 0.15  # voxel IoU the fine-tuned models must win by (measured: 0.35, and 0.26 with the encoder frozen)


def params(iterations: int, **train) -> dict:
    """Train's params as the CLI gives them (every section filled, ``explicit`` = the keys set here)."""
    base = {"iterations": iterations, "batch_size": 4, "warmup_iterations": 10, "learning_rate": 0.01, "threads": 1,
            "val_every": 10**6}
    # Fine-tuning sets no model key: the architecture is the checkpoint's.
    model = {} if train.get("init_from") else dict(MODEL)
    return validate_sections({"seed": 0, "model": model, "train": {**base, **train}})


def voxel_iou_on(checkpoint: dict, volume) -> float:
    model = build_model(checkpoint[contract.CHECKPOINT_MODEL_CONFIG])
    model.load_state_dict(checkpoint[contract.CHECKPOINT_STATE])
    settings = window_settings(checkpoint[contract.CHECKPOINT_MODEL_CONFIG], {"batch_size": 8})
    return validate(model, [volume], settings, torch.device("cpu"), checkpoint[contract.CHECKPOINT_INPUT_NORM])["val_iou"]




def test_fine_tuning_on_a_few_slices_beats_training_from_scratch(tmp_path):
    domain_a = synthesize(12, SIZE, seed=1)
    b_train = synthesize(B_SLICES, SIZE, seed=2, **DOMAIN_B)
    b_test = synthesize(12, SIZE, seed=3, **DOMAIN_B)

    pretrained, _ = train_model([domain_a], [], params(PRETRAIN_ITERATIONS), progress=False, voxel_size=VOXEL_SIZE)
    contract.save_checkpoint(tmp_path / "a.pt", pretrained)
    few = dict(warmup_iterations=5, learning_rate=0.001)
    tuned, _ = train_model([b_train], [], params(ITERATIONS, init_from=str(tmp_path / "a.pt"), **few), progress=False,
                           voxel_size=VOXEL_SIZE)
    frozen, _ = train_model([b_train], [], params(ITERATIONS, init_from=str(tmp_path / "a.pt"), freeze="encoder", **few),
                            progress=False, voxel_size=VOXEL_SIZE)
    scratch, _ = train_model([b_train], [], params(ITERATIONS, **few), progress=False, voxel_size=VOXEL_SIZE)

    scores = {name: voxel_iou_on(checkpoint, b_test) for name, checkpoint in
              (("A only", pretrained), ("fine-tuned", tuned), ("fine-tuned, encoder frozen", frozen), ("scratch", scratch))}
    print(f"\nvoxel IoU on held-out domain B ({PRETRAIN_ITERATIONS} iterations on A; {ITERATIONS} iterations on "
          f"{B_SLICES} labelled slices of B): " + ", ".join(f"{name} {score:.3f}" for name, score in scores.items()))
    assert tuned[contract.CHECKPOINT_MODEL_CONFIG]["filters"] == MODEL["filters"]
    assert scores["fine-tuned"] > scores["scratch"] + MARGIN
    assert scores["fine-tuned, encoder frozen"] > scores["scratch"] + MARGIN
    # And the few slices of B did teach the A model something.
    assert scores["fine-tuned"] > scores["A only"] + 0.05
