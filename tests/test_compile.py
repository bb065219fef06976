"""trainer.compile: the backbone's training steps through torch.compile, with the same results as eager."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arcface.config_checks import check_config
from arcface.errors import UserError
from conftest import REPO, TINY, compose_config, tiny_trainer, train_here


def test_compiled_steps_train_as_eager_ones(tmp_path):
    weights = {}
    for compile_ in (False, True):
        trainer = tiny_trainer(tmp_path / str(compile_), steps=4, gradient_acc=2, compile=compile_,
                               verify_at_start=False, verify_at_end=False)
        trainer.fit()
        assert (trainer.model is trainer.backbone) is not compile_
        weights[compile_] = trainer.backbone.state_dict()
    for key, eager in weights[False].items():
        torch.testing.assert_close(weights[True][key], eager, rtol=1e-4, atol=1e-5)


def test_the_demo_backbone_trains_compiled_once_its_stem_is_16_wide(tmp_path):
    proc = train_here([*TINY, "trainer.compile=true", "+backbone.widths=[16,32,64,128]", "tracking=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").is_file()
    assert "training r_tiny (fp32, NCHW, compiled (default)) on synthetic" in proc.stdout + proc.stderr


def test_two_ranks_accumulating_compiled_log_the_eager_losses(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    losses = {}
    for compile_ in ("false", "true"):
        cmd = [str(REPO / "launchers" / "torchrun.sh"), "2", *TINY, "trainer.gradient_acc=2",
               "+backbone.widths=[16,32,64,128]", f"trainer.compile={compile_}", "tracking=none",
               "trainer.verify_at_end=false", f"hydra.run.dir={tmp_path / compile_}"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-3000:]
        losses[compile_] = [float(loss) for loss in re.findall(r"step \d+/3 .* loss ([0-9.]+)", log)]
    assert len(losses["false"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)


@pytest.mark.parametrize("switch", ["trainer.compile=true", "backbone.channels_last=true"])
def test_a_layout_that_crashes_torch_on_the_cpu_is_refused(tmp_path, switch):
    proc = train_here([*TINY, switch, "tracking=none"], tmp_path)
    name = switch.split("=true")[0] if "compile" in switch else switch
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {name} trains the backbone in channels_last, and training layer1.0.downsample.0 (a 1x1 strided " \
           f"convolution over 8 channels) that way crashes torch's CPU kernels" in proc.stderr


def test_both_crashing_switches_are_named_together(tmp_path):
    proc = train_here([*TINY, "trainer.compile=true", "backbone.channels_last=true", "tracking=none"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: trainer.compile and backbone.channels_last=true train the backbone in channels_last" in proc.stderr


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_do_not_accumulate_gradients(tmp_path, mode):
    proc = train_here([*TINY, f"trainer.compile={mode}", "+backbone.widths=[16,32,64,128]", "trainer.gradient_acc=2",
                       "tracking=none"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: trainer.compile={mode} replays CUDA graphs" in proc.stderr


def test_compile_and_checkpointing_are_refused_together(tmp_path):
    proc = train_here([*TINY, "trainer.compile=true", "+backbone.widths=[16,32,64,128]", "backbone.checkpointing=true",
                       "tracking=none"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: trainer.compile cannot trace backbone.checkpointing's recomputation" in proc.stderr


def test_unknown_mode_names_the_choices():
    with pytest.raises(UserError, match=r"^trainer.compile=fast is unknown: set trainer.compile to one of false, true, "
                                        r"default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs$"):
        check_config(compose_config(["trainer.compile=fast"]))
