"""MobileFaceNet's eval-mode embeddings depend on the input from the start, and stay apart through the first steps of
`arcface-train backbone=mbf trainer.batch_size=16` (grouped convolutions are initialised over one group's fan)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from arcface.data import SyntheticIdentities
from arcface.data.transforms import prepare_batch
from arcface.models import create_backbone
from conftest import TINY, compose_config, train_here


def held_out_images(count: int, first_identity: int) -> torch.Tensor:
    data = SyntheticIdentities(count, 1, first_identity=first_identity)
    return prepare_batch(torch.stack([data[i][0] for i in range(count)]), torch.device("cpu"), flip=False)


def test_eval_mode_embeddings_are_as_large_as_in_training_at_init():
    torch.manual_seed(0)
    backbone = instantiate(compose_config(["backbone=mbf", "embedding_size=128"]).backbone)
    x = held_out_images(8, first_identity=0)
    with torch.no_grad():
        train_norm = backbone.train()(x).norm(dim=1).mean()
        eval_norm = backbone.eval()(x).norm(dim=1).mean()
    # With torch's fan for grouped convolutions eval mode gave under 1 % of the training-mode norm.
    assert eval_norm > 0.1 * train_norm, (float(eval_norm), float(train_norm))


def test_three_steps_at_batch_16_leave_embeddings_apart(tmp_path):
    proc = train_here([*TINY, "tracking=none", "backbone=mbf", "trainer.batch_size=16", "dataset.num_classes=64",
                       "trainer.max_steps=3", "trainer.verify_at_end=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backbone = create_backbone("mbf", embedding_size=64, weights=str(tmp_path / "run" / "model.pt")).eval()
    with torch.no_grad():
        embeddings = F.normalize(backbone(held_out_images(8, first_identity=64)))
    cosines = embeddings @ embeddings.T
    # With torch's fan for grouped convolutions every embedding was the same here: all cosines 1.000.
    assert cosines[~torch.eye(8, dtype=torch.bool)].max() < 0.99
