"""Checkpoint files: the last K kept, a corrupt newest one skipped, stale temporaries cleaned, umask modes,
and no code run from a crafted file."""
from __future__ import annotations

import os
import pickle
import stat
from functools import partial

import pytest
import torch

from arcface.engine.training_state import newest_readable, read_training_state, save_training_state
from arcface.engine.optim import build_optimizer
from arcface.errors import UserError
from arcface.heads import CombinedMargin, PartialFC
from conftest import TINY, copy_run, train_here


def _save(run_dir, step: int, keep: int):
    torch.manual_seed(step)
    backbone = torch.nn.Linear(4, 8)
    head = PartialFC(CombinedMargin(), embedding_size=8, num_classes=10)
    optimizer = build_optimizer(partial(torch.optim.SGD, lr=0.1, momentum=0.9), backbone, head)
    save_training_state(run_dir, keep, backbone=backbone, head=head, optimizer=optimizer,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), step=step, global_batch=8, extra={})


def _steps(run_dir) -> dict[str, int]:
    return {p.name: read_training_state(p)["step"] for p in sorted(run_dir.glob("checkpoint*.pt"))}


def test_keeps_the_last_k_newest_first(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=3)
    assert _steps(tmp_path) == {"checkpoint.pt": 4, "checkpoint.1.pt": 3, "checkpoint.2.pt": 2}
    _save(tmp_path, 5, keep=1)  # keeping fewer removes the older files
    assert _steps(tmp_path) == {"checkpoint.pt": 5}


def test_files_follow_the_umask_and_leave_no_temporaries(tmp_path):
    old = os.umask(0o027)
    try:
        _save(tmp_path, 1, keep=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "checkpoint.pt").stat().st_mode) == 0o640
    shards = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["fc"]["shards"]  # the classifier's rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", shards]
    assert stat.S_IMODE((tmp_path / shards).stat().st_mode) == 0o750


def test_newest_readable_falls_back_past_a_corrupt_newest(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step, keep=2)
    newest = tmp_path / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk or a killed copy
    (tmp_path / ".checkpoint.pt.x1y2.tmp").write_bytes(b"partial")
    found, skipped = newest_readable(tmp_path)
    assert found == tmp_path / "checkpoint.1.pt"
    assert len(skipped) == 1 and str(newest) in skipped[0]
    assert not (tmp_path / ".checkpoint.pt.x1y2.tmp").exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "arcface.train/2", "step": _Exploit(marker)}, path, pickle_module=pickle)
    with pytest.raises(UserError, match=str(path)):
        read_training_state(path)
    assert not marker.exists()


def test_files_that_are_no_checkpoint_name_the_file_and_the_key(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=rf"^checkpoint {missing} does not exist: pass trainer.resume="):
        read_training_state(missing)
    text = tmp_path / "conftest.py"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match=rf"^checkpoint {text} is not a complete torch.save archive \(16 bytes\): it "
                                        r"was damaged in writing or copying \(resume from the one before, "
                                        r"checkpoint.1.pt beside it\), or is not a checkpoint.pt of arcface-train$"):
        read_training_state(text)
    good = tmp_path / "good.pt"
    torch.save({"format": "arcface.train/3"}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"^checkpoint {truncated} is not a complete torch.save archive"):
        read_training_state(truncated)


def test_resume_auto_skips_a_corrupt_newest_checkpoint(finished_run, tmp_path):
    newest = copy_run(finished_run, tmp_path) / "run" / "checkpoint.pt"
    newest.write_bytes(b"")
    again = train_here([*TINY, "tracking=none", "trainer.max_steps=5", "trainer.resume=auto",
                        "trainer.verify_at_end=false"], tmp_path)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert f"skipping a checkpoint that does not load: checkpoint {newest} is empty (0 bytes)" in log
    assert f"resumed from {tmp_path / 'run' / 'checkpoint.1.pt'} at step 2/5" in log
