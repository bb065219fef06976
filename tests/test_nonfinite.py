"""A non-finite loss ends the run with the last good checkpoint named (stop), or drops that step (skip); no
checkpoint ever holds non-finite values."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from arcface.engine.training_state import read_classifier, read_training_state
from arcface.engine.trainer import Diverged, Trainer
from arcface.heads import CombinedMargin, PartialFC
from conftest import TINY, error_line, tiny_trainer, train_here


class _PoisonedPartialFC(PartialFC):
    """A real Partial FC head whose loss is multiplied by NaN on the chosen calls (1-based)."""

    def __init__(self, bad_calls: set[int], **kwargs):
        super().__init__(CombinedMargin(), **kwargs)
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, embeddings, labels):
        self.calls += 1
        loss = super().forward(embeddings, labels)
        return loss * float("nan") if self.calls in self.bad_calls else loss


def _trainer(tmp_path, policy: str, bad_calls: set[int]) -> Trainer:
    head = partial(_PoisonedPartialFC, bad_calls, embedding_size=16, num_classes=8)
    return tiny_trainer(tmp_path, head=head, steps=6, save_every=2, verify_at_start=False, on_nonfinite=policy)


def _all_finite(path) -> bool:
    fc = read_classifier(path)
    tensors = [*read_training_state(path)["backbone"].values(), fc["weight"], *fc["optimizer_rows"].values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_stop_names_the_step_and_the_last_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, "stop", bad_calls={3})
    with pytest.raises(Diverged, match=rf"non-finite at step 3; the last good checkpoint is {tmp_path}/checkpoint.pt "
                                       r"\(step 2\)"):
        trainer.fit()
    assert read_training_state(tmp_path / "checkpoint.pt")["step"] == 2 and _all_finite(tmp_path / "checkpoint.pt")


def test_skip_drops_the_step_and_goes_on(tmp_path):
    trainer = _trainer(tmp_path, "skip", bad_calls={3, 5})
    trainer.fit()
    assert trainer.step == 6 and trainer.skipped_steps == 2
    for path in tmp_path.glob("checkpoint*.pt"):
        assert _all_finite(path), path
    assert read_training_state(tmp_path / "checkpoint.pt")["skipped_steps"] == 2


def test_diverging_run_exits_with_one_sentence(tmp_path):
    proc = train_here([*TINY, "tracking=none", "trainer.max_steps=6", "trainer.save_every=1", "optimizer.lr=1e30",
                       "trainer.grad_clip=null"], tmp_path)
    line = error_line(proc)
    assert "non-finite" in line and "last good checkpoint" in line
    for path in (tmp_path / "run").glob("checkpoint*.pt"):
        assert _all_finite(path), path
