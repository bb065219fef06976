"""Impossible config values stop before anything is built, with one sentence naming the key."""
from __future__ import annotations

import pytest

from arcface.config_checks import check_config
from arcface.errors import UserError
from conftest import TINY, run_train
from test_config import compose_train


@pytest.mark.parametrize("override,key", [
    ("trainer.grad_clip=-5", "trainer.grad_clip"),
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("pfc.rate=abc", "pfc.rate"),
    ("pfc.rate=1.5", "pfc.rate"),
    ("margin.s=0", "margin.s"),
    ("margin.m2=3.0", "margin.m2"),
    ("margin=cosface margin.m3=1.2", "margin.m3"),
    ("margin=curricularface margin.m=-0.1", "margin.m"),
    ("trainer.batch_size=true", "trainer.batch_size"),
    ("trainer.batch_size=2.5", "trainer.batch_size"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints"),
    ("trainer.dist_timeout_s=0", "trainer.dist_timeout_s"),
    ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite"),
    ("trainer.precision=fp8", "trainer.precision"),
])
def test_bad_values_name_the_key(override, key):
    cfg = compose_train(override.split())
    with pytest.raises(UserError, match=f"^{key}="):
        check_config(cfg)


@pytest.mark.parametrize("overrides", [[], ["trainer.grad_clip=null"], ["margin=sphereface"], ["margin=adaface"],
                                       ["optimizer=adamw"], ["experiment=ms1mv3_r50"], ["pfc.rate=0"]])
def test_shipped_settings_pass(overrides):
    check_config(compose_train(overrides))


def test_the_cli_prints_one_line(tmp_path):
    proc = run_train([*TINY, "tracking=none", "pfc.rate=abc"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        "error: pfc.rate='abc' is invalid: pfc.rate must be a number >= 0 and <= 1"]
