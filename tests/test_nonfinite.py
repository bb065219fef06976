"""A non-finite loss ends the run with the last good checkpoint named (stop), or drops that step (skip); no
checkpoint ever holds non-finite values."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from arcface.engine.training_state import read_classifier, read_training_state
from arcface.engine.trainer import Diverged, Trainer
from arcface.heads import CombinedMargin, CurricularFace, PartialFC
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


def test_stop_before_any_checkpoint_says_to_start_afresh(tmp_path):
    with pytest.raises(Diverged, match=r"^the loss became non-finite at step 1, before any checkpoint was written: "
                                       r"start afresh with a lower optimizer.lr, or with trainer.on_nonfinite=skip "
                                       r"to drop such steps$"):
        _trainer(tmp_path, "stop", bad_calls={1}).fit()


def test_skip_drops_the_step_and_goes_on(tmp_path):
    trainer = _trainer(tmp_path, "skip", bad_calls={3, 5})
    trainer.fit()
    assert trainer.step == 6 and trainer.skipped_steps == 2
    for path in tmp_path.glob("checkpoint*.pt"):
        assert _all_finite(path), path
    assert read_training_state(tmp_path / "checkpoint.pt")["skipped_steps"] == 2


class _PoisonedInput(torch.nn.Module):
    """Multiplies the images by infinity on the chosen calls (1-based): the forward pass itself goes non-finite."""

    def __init__(self, bad_calls: set[int]):
        super().__init__()
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, x):
        self.calls += 1
        return x * float("inf") if self.calls in self.bad_calls else x


def test_a_skipped_step_leaves_no_trace_in_running_statistics(tmp_path):
    """BatchNorm's running statistics and CurricularFace's running target cosine are updated during the forward
    pass, before the loss shows that the step is dropped: they are put back with it."""
    backbone = partial(torch.nn.Sequential, _PoisonedInput({3}), torch.nn.Flatten(),
                       torch.nn.Linear(3 * 16 * 16, 16), torch.nn.BatchNorm1d(16))
    head = partial(PartialFC, CurricularFace(), embedding_size=16, num_classes=8)
    trainer = tiny_trainer(tmp_path, backbone=backbone, head=head, steps=6, save_every=2, verify_at_start=False,
                           on_nonfinite="skip")
    trainer.fit()
    assert trainer.step == 6 and trainer.skipped_steps == 1
    for path in tmp_path.glob("checkpoint*.pt"):
        assert _all_finite(path) and bool(torch.isfinite(read_classifier(path)["margin"]["t"])), path
    assert torch.isfinite(trainer.backbone[3].running_var).all() and torch.isfinite(trainer.head.margin.t)


def test_diverging_run_exits_with_one_sentence(tmp_path):
    proc = train_here([*TINY, "tracking=none", "trainer.max_steps=6", "trainer.save_every=1", "optimizer.lr=1e30",
                       "trainer.grad_clip=null"], tmp_path)
    line = error_line(proc)
    assert "non-finite" in line and "last good checkpoint" in line
    for path in (tmp_path / "run").glob("checkpoint*.pt"):
        assert _all_finite(path), path
