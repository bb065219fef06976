"""trainer.compile: the backbone's training steps through torch.compile, with the same results as eager."""
from __future__ import annotations

import pytest
import torch

from arcface.config_checks import check_config
from arcface.errors import UserError
from conftest import TINY, compose_config, tiny_trainer, train_here


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


@pytest.mark.parametrize("switch", ["trainer.compile=true", "backbone.channels_last=true"])
def test_a_layout_that_crashes_torch_on_the_cpu_is_refused(tmp_path, switch):
    proc = train_here([*TINY, switch, "tracking=none"], tmp_path)
    name = switch.split("=true")[0] if "compile" in switch else switch
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {name} trains the backbone in channels_last, and training layer1.0.downsample.0 (a 1x1 stride-2 " \
           f"convolution over 8 channels) that way crashes torch's CPU kernels" in proc.stderr


def test_compile_and_checkpointing_are_refused_together(tmp_path):
    proc = train_here([*TINY, "trainer.compile=true", "+backbone.widths=[16,32,64,128]", "backbone.checkpointing=true",
                       "tracking=none"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: trainer.compile cannot trace backbone.checkpointing's recomputation" in proc.stderr


def test_unknown_mode_names_the_choices():
    with pytest.raises(UserError, match=r"^trainer.compile=fast is unknown: set trainer.compile to one of false, true, "
                                        r"default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs$"):
        check_config(compose_config(["trainer.compile=fast"]))
