"""Every conf/backbone option builds through Hydra, and a timm model trains through the real entrypoint."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from arcface.errors import UserError
from arcface.models.base import Backbone
from arcface.models.timm_adapter import TimmBackbone
from conftest import CONF, TINY, compose_config, train_here


def build(overrides: list[str]) -> torch.nn.Module:
    cfg = compose_config(overrides)
    with torch.device("meta"):  # structure only: r2060 and vit_h need no memory
        return instantiate(cfg.backbone)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "backbone").glob("*.yaml")))
def test_every_backbone_option_builds(option):
    model = build([f"backbone={option}", "embedding_size=128"])
    assert isinstance(model, Backbone)
    assert model.precision == "fp32" and model.channels_last == torch.cuda.is_available()  # channels_last=auto
    # Every family ends in a BatchNorm1d over the embedding (forwards are tested in test_models.py).
    embedding = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]
    assert embedding.num_features == 128


def test_options_reach_the_model():
    model = build(["backbone=vit_t", "backbone.mask_ratio=0.25", "backbone.drop_path=0.2",
                   "backbone.checkpointing=true", "backbone.channels_last=true", "trainer.precision=bf16"])
    assert model.mask_ratio == 0.25 and model.blocks[-1].drop_path.rate == pytest.approx(0.2)
    assert model.checkpointing and model.channels_last and model.precision == "bf16"


def test_timm_backbone_by_name_with_extra_timm_arguments():
    model = build(["backbone=timm", "backbone.name=test_vit", "+backbone.drop_path_rate=0.1"])
    assert isinstance(model, TimmBackbone) and model.trunk.patch_embed.img_size == (112, 112)


@pytest.mark.parametrize("pool,width", [("flatten", 64 * 3 * 3), ("avg", 64)])
def test_timm_pool_chooses_the_embedding_layers_input(pool, width):
    # test_convnext ends in 64 channels at stride 32: a 3x3 map for a 112x112 face.
    model = build(["backbone=timm", "backbone.name=test_convnext", f"backbone.pool={pool}", "embedding_size=32"])
    assert model.fc.in_features == width
    assert model.eval()(torch.zeros(2, 3, 112, 112, device="meta")).shape == (2, 32)


def test_unknown_timm_pool_is_one_sentence():
    with pytest.raises(UserError, match="^backbone.pool=max is not a pooling: use backbone.pool=flatten or "):
        TimmBackbone("test_convnext", pool="max")


def test_timm_model_trains_through_the_entrypoint(tmp_path):
    proc = train_here([*TINY, "backbone=timm", "backbone.name=test_convnext", "backbone.checkpointing=true",
                       "trainer.max_steps=2", "tracking=none", "trainer.verify_at_end=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout + proc.stderr
    state = torch.load(tmp_path / "run" / "model.pt", map_location="cpu")
    assert state["fc.weight"].shape[0] == 64 and any(k.startswith("trunk.") for k in state)


@pytest.mark.parametrize("option,drop_path,mask_ratio", [
    ("vit_t", 0.1, 0.1), ("vit_s", 0.1, 0.1), ("vit_b", 0.1, 0.1), ("vit_l", 0.05, 0.05), ("vit_h", 0.1, 0.0)])
def test_vit_sizes_carry_the_reference_regularisation(option, drop_path, mask_ratio):
    model = build([f"backbone={option}"])
    assert model.mask_ratio == mask_ratio and model.blocks[-1].drop_path.rate == pytest.approx(drop_path)
