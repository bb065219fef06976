"""The real entrypoint on two gloo ranks through the torchrun launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from arcface.models import create_backbone
from conftest import REPO, TINY, train_here


def _on_two_ranks(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """The entrypoint through launchers/torchrun.sh on two gloo ranks (torchrun --standalone picks a free port)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    cmd = [str(REPO / "launchers" / "torchrun.sh"), "2", *args, f"hydra.run.dir={workdir / 'run'}"]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_train_then_resume_on_one(tmp_path):
    proc = _on_two_ranks([*TINY, "tracking=none", "trainer.verify_at_end=false"], tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "on 2 cpu process(es)" in log and "step 3/3" in log
    # Rank 1 logs to its own file; the console shows rank 0's lines once, and no deprecation notice per rank.
    assert log.count("training r_tiny") == 1 and "training r_tiny" in (tmp_path / "run" / "rank1.log").read_text()
    assert "deprecated" not in log, log[-3000:]
    state = torch.load(tmp_path / "run" / "model.pt", map_location="cpu")
    create_backbone("r_tiny", embedding_size=64).load_state_dict(state, strict=True)

    # The checkpoint is world-size independent: one process with twice the batch continues what two began.
    again = train_here([*TINY, "tracking=none", "trainer.max_steps=5", "trainer.resume=auto", "trainer.batch_size=16",
                        "trainer.verify_at_end=false"], tmp_path)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "at step 3/5" in log and "step 5/5" in log


def test_two_ranks_train_a_backbone_with_a_parameter_training_never_uses(tmp_path):
    """demo_vit masks no tokens, so the ViT's mask token gets no gradient: DDP ignores it instead of stopping at the
    second step."""
    proc = _on_two_ranks(["experiment=demo_vit", *TINY, "tracking=none", "trainer.verify_at_end=false"], tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "step 3/3" in log, log[-3000:]


def test_ranks_come_from_slurm_under_a_plain_srun(monkeypatch):
    """`srun arcface-train` (no submitit): the tasks take rank, world size and master from SLURM's variables, and a
    MASTER_PORT the job script exported is kept."""
    from arcface.distributed import _env_from_slurm

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", "29400")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                       "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(key, value)
    assert _env_from_slurm()
    assert {key: os.environ[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                             "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "29400"}
