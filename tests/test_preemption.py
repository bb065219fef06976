"""A real run stopped by a real signal saves, exits cleanly, and resumes to the uninterrupted run's exact result."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from mlflow.tracking import MlflowClient

from arcface.engine.training_state import read_classifier
from conftest import TINY, compose_config, error_line, run_train, train_here

EXIT_STOPPED = 75
STEPS = 8
# Two epochs of 32 tiny images (4 batches each): resuming crosses an epoch boundary. The signal comes after step 2,
# so the run has six steps' time to receive it before it would end on its own.
RUN = [*TINY, "dataset.images_per_class=2", f"trainer.max_steps={STEPS}", "trainer.save_every=0",
       "trainer.verify_at_end=false"]
# A run that goes on until signalled: 1000 steps, on one rank or two.
LONG = [*RUN, "trainer.max_steps=1000", "trainer.num_epoch=1000"]


def _start(args: list[str], workdir: Path, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "arcface.train", f"hydra.run.dir={run_dir}", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_after(proc: subprocess.Popen, line_part: str, signals: list[int]) -> list[str]:
    """Read the run's output until a line contains `line_part`, send `signals`, return every line to the end."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line_part in line:
            for sig in signals:
                proc.send_signal(sig)
            break
    lines += proc.stdout.read().splitlines()
    proc.wait(timeout=300)
    return lines


def _training_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {f"backbone.{k}": v for k, v in state["backbone"].items()}
    fc = read_classifier(path)  # the classifier's rows are in the directory the checkpoint names
    tensors["fc.weight"] = fc["weight"]
    tensors.update({f"fc.{k}": v for k, v in fc["optimizer_rows"].items()})
    for pid, s in state["optimizer"]["state"].items():
        tensors.update({f"opt.{pid}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return tensors


def _final_loss(log: str) -> str:
    return re.findall(rf"step {STEPS}/{STEPS} .* loss (\S+)", log)[-1]


def _stop_line(lines: list[str], sig: int, run_dir: Path) -> str:
    """The run's last line, which says how it stopped and how to resume it (asserted)."""
    log = "\n".join(lines)
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    name = signal.Signals(sig).name
    assert re.match(rf"stopped by {name} at step \d+/{STEPS} with its state saved in {run_dir}/checkpoint.pt; "
                    rf"resume with: ", lines[-1]), log[-3000:]
    return lines[-1]


def test_signal_saves_and_resume_is_exact(tmp_path, mlflow_db):
    sig = signal.SIGTERM
    uri = f"sqlite:///{mlflow_db}"
    tracking = [f"tracking.uri={uri}", "tracking.experiment_name=preempt"]
    (tmp_path / "whole").mkdir()
    whole = run_train([*RUN, "tracking=none"], tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    run_dir = tmp_path / "cut" / "run"
    run_dir.parent.mkdir()
    proc = _start([*RUN, *tracking], run_dir.parent, run_dir)
    last = _stop_line(_signal_after(proc, f"step 2/{STEPS}", [sig]), sig, run_dir)
    assert proc.returncode == EXIT_STOPPED
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "arcface.train"] and "trainer.resume=auto" in command

    client = MlflowClient(tracking_uri=uri)
    (stopped,) = client.search_runs([client.get_experiment_by_name("preempt").experiment_id])
    assert stopped.info.status == "KILLED"

    resumed = subprocess.run([sys.executable, *command[1:]], cwd=run_dir.parent, capture_output=True, text=True,
                             timeout=300)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert f"resumed from {run_dir}/checkpoint.pt" in log and "random streams restored" in log

    expected = _training_state(tmp_path / "whole" / "run" / "checkpoint.pt")
    got = _training_state(run_dir / "checkpoint.pt")
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert _final_loss(log) == _final_loss(whole.stdout + whole.stderr)

    (run,) = client.search_runs([client.get_experiment_by_name("preempt").experiment_id])
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))


def test_ctrl_c_stops_and_saves_as_a_scheduler_signal_does(tmp_path):
    """SIGINT takes SIGTERM's path (what follows the save is the same, and tested above)."""
    run_dir = tmp_path / "run"
    proc = _start([*RUN, "tracking=none"], tmp_path, run_dir)
    _stop_line(_signal_after(proc, f"step 2/{STEPS}", [signal.SIGINT]), signal.SIGINT, run_dir)
    assert proc.returncode == EXIT_STOPPED and read_step(run_dir / "checkpoint.pt") >= 2


def test_second_signal_exits_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start([*LONG, "tracking=none"], tmp_path, run_dir)
    # Two different signals (two of one kind can merge into one delivery); either may be handled first.
    lines = _signal_after(proc, "step 2/1000", [signal.SIGINT, signal.SIGTERM])
    second = signal.Signals(proc.returncode - 128)
    assert second in (signal.SIGINT, signal.SIGTERM), "\n".join(lines)[-3000:]
    assert lines[-1].startswith(f"second {second.name}: exiting now without saving"), lines[-5:]
    assert not (run_dir / "checkpoint.pt").exists()


def test_starting_afresh_over_an_earlier_runs_checkpoint_is_refused(tmp_path):
    """A second run in the same directory without trainer.resume would rotate the first one's checkpoints out."""
    args = [*TINY, "tracking=none", "trainer.max_steps=1", "trainer.verify_at_end=false"]
    assert train_here(args, tmp_path).returncode == 0
    run = tmp_path / "run"
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert error_line(train_here([*args, "optimizer.lr=0.5"], tmp_path)) == (
        f"error: {run / 'checkpoint.pt'} holds an earlier run's state: continue it with "
        f"trainer.resume=auto, or start afresh in another directory (hydra.run.dir=...)")
    # Refused before Hydra writes the run's record (.hydra/, train.log): nothing in the directory changed.
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_the_resume_command_of_a_multi_node_run_starts_every_node_again(monkeypatch, tmp_path):
    """torchrun on 2 nodes x 8: the printed command must bring back 16 ranks (one node alone is refused, having
    another global batch), through launchers/torchrun_multinode.sh on each node."""
    from hydra.core.hydra_config import HydraConfig

    from arcface.train import _resume_command

    HydraConfig.instance().set_config(compose_config(["backbone=r50", "pfc.rate=0.3"], hydra=True))
    for key, value in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "ip0",
                       "MASTER_PORT": "29501"}.items():
        monkeypatch.setenv(key, value)
    assert _resume_command(tmp_path / "run") == (
        f"NNODES=2 NODE_RANK=<0..1, one per node> MASTER_ADDR=ip0 MASTER_PORT=29501 RUN_DIR={tmp_path / 'run'} "
        f"launchers/torchrun_multinode.sh 8 backbone=r50 pfc.rate=0.3 trainer.resume=auto")


def test_resume_auto_without_a_checkpoint_says_so(tmp_path):
    proc = train_here([*TINY, "tracking=none", "trainer.max_steps=1", "trainer.resume=auto",
                       "trainer.verify_at_end=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"found no checkpoint in {tmp_path / 'run'}: starting afresh" in proc.stdout + proc.stderr


def test_a_signal_to_one_rank_stops_every_rank(tmp_path):
    """SIGTERM reaches rank 1 alone; rank 0 learns of it through the per-step agreement and both save and stop."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "arcface.train", f"hydra.run.dir={run_dir}",
           *LONG, "tracking=none"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if "step 2/1000" in line:
            (rank1,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                        if p.environ().get("RANK") == "1"]
            rank1.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.read().splitlines()
    proc.wait(timeout=300)
    log = "\n".join(lines)
    # torchrun reports any non-zero exit with its own traceback; none may come from the training processes.
    assert "arcface/" not in "".join(line for line in lines if line.lstrip().startswith("File ")), log[-3000:]
    # Both ranks save (the save ends in a barrier) and exit 75; the one that exits second may already have been
    # ended by torchrun, which stops the remaining workers as soon as one exits.
    codes = re.findall(r"exitcode  : (-?\d+)", log)
    assert "75" in codes and set(codes) <= {"75", "-15"}, log[-3000:]
    (stopped,) = [line for line in lines if line.startswith("stopped by")]
    assert stopped.startswith("stopped by a signal on another rank at step "), stopped
    step = int(re.search(r"at step (\d+)/1000", stopped).group(1))
    assert read_step(run_dir / "checkpoint.pt") == step


def read_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["step"]
