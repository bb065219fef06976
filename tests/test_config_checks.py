"""Impossible config values stop before anything is built, with one sentence naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from arcface.config_checks import check_added_keys, check_config, check_group_choices
from arcface.errors import UserError
from conftest import CONF, TINY, compose_config, error_line, train_here


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
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("dataset=rec dataset.loader=nvjpeg", "dataset.loader"),
    ("backbone.channels_last=yes", "backbone.channels_last"),
    ("backbone.channels_last=1", "backbone.channels_last"),
    ("trainer.cudnn_benchmark=fast", "trainer.cudnn_benchmark"),
    ("backbone.checkpointing=no", "backbone.checkpointing"),
    ("pfc.sparse_update=no", "pfc.sparse_update"),
    ("margin.straight_through=off", "margin.straight_through"),
    ("backbone.dropout=1.5", "backbone.dropout"),
    ("backbone=vit_t backbone.mask_ratio=1.5", "backbone.mask_ratio"),
    ("backbone=vit_t backbone.drop_path=-0.1", "backbone.drop_path"),
    ("scheduler.power=-1", "scheduler.power"),
    ("optimizer=adamw +optimizer.eps=0", "optimizer.eps"),
    ("optimizer=adamw +optimizer.betas=[1.5,0.9]", "optimizer.betas"),
    ("optimizer=adamw +optimizer.betas=0.9", "optimizer.betas"),
])
def test_bad_values_name_the_key(override, key):
    cfg = compose_config(override.split())
    with pytest.raises(UserError, match=f"^{key}="):
        check_config(cfg)


@pytest.mark.parametrize("overrides", [[], ["trainer.grad_clip=null"], ["margin=sphereface"], ["margin=adaface"],
                                       ["optimizer=adamw"], ["optimizer=adamw", "+optimizer.betas=[0.9,0.99]"],
                                       ["scheduler.power=0"],
                                       ["experiment=ms1mv3_r50"], ["pfc.rate=0"],
                                       ["dataset=folder"], ["dataset=rec", "dataset.loader=device_decode"]])
def test_shipped_settings_pass(overrides):
    check_config(compose_config(overrides))


def test_choices_are_spelled_as_in_yaml():
    with pytest.raises(UserError, match=r"^backbone.channels_last=yes is unknown: set backbone.channels_last to one "
                                        r"of auto, true, false$"):
        check_config(compose_config(["backbone.channels_last=yes"]))


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    """The one test of the contract as a shell sees it: the `arcface-train` script finds conf/ from any folder,
    composes the overrides, and bad input ends it with one `error: ` line and status 2 (the other tests of messages
    call the checks, or the entrypoint in the test's own process)."""
    script = Path(sys.executable).parent / "arcface-train"
    proc = subprocess.run([str(script), f"hydra.run.dir={tmp_path / 'run'}", *TINY, "tracking=none", "pfc.rate=abc"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        "error: pfc.rate='abc' is invalid: pfc.rate must be a number >= 0 and <= 1"]


GROUPS = {"backbone", "dataset", "dataset/val", "experiment", "optimizer"}


@pytest.mark.parametrize("override,message", [
    ("+trainer.batchsize=32", r"^\+trainer.batchsize adds a key that nothing reads \(trainer has no batchsize\): "
                              r"did you mean trainer.batch_size\? Set it without the \+$"),
    ("+dataset.root=faces", r"^\+dataset.root adds a key that nothing reads \(dataset has no root\): remove it$"),
    ("+seed=1", r"^\+seed adds a key that nothing reads \(the config has no seed\): remove it$"),
])
def test_an_added_key_that_nothing_reads_is_refused(override, message):
    """Hydra's advice for a misspelled key is to add it with +, which it then accepts and nothing reads."""
    with pytest.raises(UserError, match=message):
        check_added_keys(compose_config([override]), [override], GROUPS)


@pytest.mark.parametrize("overrides", [["+backbone.widths=[16,32,64,128]"], ["+cluster.sbatch.mail-type=END"],
                                       ["optimizer=adamw", "+optimizer.betas=[0.9,0.99]"], ["scheduler.power=0"],
                                       ["++trainer.batch_size=64"], ["~experiment", "+experiment=demo_small"]])
def test_keys_that_a_constructor_or_a_free_form_node_reads_may_be_added(overrides):
    check_added_keys(compose_config(overrides), overrides, GROUPS)


def test_the_entrypoint_refuses_an_added_key_that_nothing_reads(tmp_path):
    proc = train_here([*TINY, "tracking=none", "+trainer.batchsize=32"], tmp_path)
    assert error_line(proc).startswith("error: +trainer.batchsize adds a key that nothing reads")


@pytest.mark.parametrize("arguments,message", [
    (["backbone=r51"], r"^backbone=r51 names no file in conf/backbone/: choose one of mbf, mbf_large, r100, .*vit_t"),
    (["-m", "backbone=r50,vit_bb"], r"^backbone=vit_bb names no file in conf/backbone/: .* \(did you mean "
                                    r"backbone=vit_b\?\)$"),
    (["-m", "+dataset/val=insightfce"], r"^dataset/val=insightfce names no file in conf/dataset/val/: choose one of "
                                  r"insightface, none, synthetic_holdout \(did you mean dataset/val=insightface\?\)$"),
    (["experiment=ms1mv3_r5O"], r"^experiment=ms1mv3_r5O names no file in conf/experiment/: choose one of the \d+ "
                                r"listed by ls .*conf/experiment \(did you mean experiment=ms1mv3_r50\?\)$"),
])
def test_a_group_option_that_names_no_file_is_one_sentence(arguments, message):
    with pytest.raises(UserError, match=message):
        check_group_choices(arguments, CONF)


def test_group_options_hydra_resolves_itself_pass(tmp_path):
    check_group_choices(["-m", "backbone=r50,vit_b", "~experiment", "+experiment=demo_small", "margin.m2=0.4",
                         "hydra/launcher=submitit_local", "backbone=glob(vit_*)", "dataset/val=null",
                         "hydra.run.dir=outputs/x"], CONF)
    lab = tmp_path / "lab_conf"  # the lab's own config folder, which holds backbone/lab_net.yaml
    check_group_choices([f"hydra.searchpath=[file://{lab}]", "backbone=lab_net"], CONF)
    check_group_choices(["--config-path", str(lab), "backbone=lab_net"], CONF)
    check_group_choices(["-m", "backbone=r50, r18", 'margin="cosface"', "+dataset/val=insightface"], CONF)


def test_the_entrypoint_refuses_a_group_option_that_names_no_file(tmp_path):
    assert error_line(train_here(["backbone=r51"], tmp_path)).startswith("error: backbone=r51 names no file")
