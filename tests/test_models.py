"""Backbone zoo: shapes, reference-compatible state_dicts, weight loading, and the per-family options."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from arcface.errors import UserError
from arcface.models import create_backbone, list_backbones, load_backbone_weights
from arcface.models.mobilefacenet import MobileFaceNet
from arcface.models.profiling import peak_memory
from arcface.models.vit import DropPath, VisionTransformer

ALL = ["r18", "r34", "r50", "r100", "r200", "r2060", "mbf", "mbf_large",
       "vit_t", "vit_s", "vit_b", "vit_l", "vit_h", "r_tiny"]
# Too slow or too big for a CPU forward in the fast suite: checked on the meta device (shapes only).
META_ONLY = {"r100", "r200", "r2060", "vit_b", "vit_l", "vit_h"}
IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
                  "r200": (6, 26, 60, 6), "r2060": (3, 128, 896, 3)}
VIT_SIZES = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24), "vit_h": (1024, 48)}


def images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return create_backbone(name, **kwargs)


def small_vit(**kwargs) -> VisionTransformer:
    # vit_t's mechanics (patch embedding, drop-path, masking, checkpointing) at a fraction of its cost.
    return VisionTransformer(**{"embed_dim": 64, "depth": 3, "drop_path": 0.2, "mask_ratio": 0.2, **kwargs})


def small_mbf(**kwargs) -> MobileFaceNet:
    # Residual stacks in every position (blocks[0] > 1), at half of mbf's width.
    return MobileFaceNet(blocks=(2, 1, 1, 1), scale=1, **kwargs)


# One small network per family, built the way create_backbone builds the registered ones.
SMALL = [partial(create_backbone, "r_tiny"), small_mbf, small_vit]
SMALL_IDS = ["r_tiny", "mbf", "vit"]


def test_every_family_is_registered():
    assert set(ALL) <= set(list_backbones())


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_dtype(name):
    if name in META_ONLY:
        model, x = on_meta(name, embedding_size=128).eval(), images().to("meta")
    else:
        model, x = create_backbone(name, embedding_size=128).eval(), images()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 128) and y.dtype == torch.float32


# --- state_dict layouts, derived from the reference's module layout -------------------------------------------

def iresnet_key_count(layers) -> int:
    # per block: bn1/bn2/bn3 (5 entries each: weight, bias, running_mean, running_var, num_batches_tracked),
    # conv1, conv2, prelu; the first block of each stage adds downsample.{0.weight, 1.*} (6);
    # stem conv1 + bn1 + prelu (7); head bn2 + fc.weight/bias + features (12).
    return 7 + 18 * sum(layers) + 6 * len(layers) + 12


def test_r50_state_dict_is_pinned():
    keys = list(create_backbone("r50").state_dict())
    assert len(keys) == 475 == iresnet_key_count(IRESNET_LAYERS["r50"])
    assert keys[0] == "conv1.weight" and keys[-1] == "features.num_batches_tracked"
    assert "layer3.13.bn3.running_var" in keys and "layer3.14.bn1.weight" not in keys
    assert "layer2.0.downsample.0.weight" in keys and "layer2.1.downsample.0.weight" not in keys
    assert not any(k.startswith("module.") for k in keys)


@pytest.mark.parametrize("name", sorted(IRESNET_LAYERS))
def test_iresnet_layout(name):
    model = on_meta(name)
    sd = model.state_dict()
    assert len(sd) == iresnet_key_count(IRESNET_LAYERS[name])
    last_block = f"layer3.{IRESNET_LAYERS[name][2] - 1}.conv2.weight"
    assert sd[last_block].shape == (256, 256, 3, 3)
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer4.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert sd["fc.weight"].shape == (512, 512 * 7 * 7) and sd["fc.bias"].shape == (512,)
    assert not model.features.weight.requires_grad  # the embedding BN's scale is fixed at 1


def test_mobilefacenet_layout():
    mbf, large = create_backbone("mbf").state_dict(), create_backbone("mbf_large").state_dict()
    # ConvBlock 7 entries, LinearBlock 6, DepthWise 7+7+6=20; stem, first layer, 3 DepthWise, Residual stacks,
    # conv_sep 7, GDC 6 + Linear 1 + BN1d 5.
    assert len(mbf) == 7 + 7 + 3 * 20 + (4 + 6 + 2) * 20 + 7 + 12 == 333
    assert len(large) == 7 + (2 + 8 + 12 + 4) * 20 + 3 * 20 + 7 + 12 == 606
    assert mbf["layers.0.layers.0.weight"].shape == (128, 3, 3, 3)
    assert mbf["layers.1.layers.0.weight"].shape == (128, 2, 3, 3)  # grouped conv, 64 groups
    assert mbf["layers.2.layers.1.layers.0.weight"].shape == (128, 1, 3, 3)  # depthwise
    assert mbf["layers.5.layers.5.layers.2.layers.1.running_mean"].shape == (256,)
    assert mbf["conv_sep.layers.2.weight"].shape == (512,)  # PReLU
    assert mbf["features.layers.0.layers.0.weight"].shape == (512, 1, 7, 7)
    assert mbf["features.layers.2.weight"].shape == (512, 512)
    assert "features.layers.2.bias" not in mbf and mbf["features.layers.3.running_var"].shape == (512,)
    assert large["layers.1.layers.1.layers.0.layers.0.weight"].shape == (128, 256, 1, 1)
    assert large["conv_sep.layers.0.weight"].shape == (512, 512, 1, 1)


@pytest.mark.parametrize("name", sorted(VIT_SIZES))
def test_vit_layout(name):
    dim, depth = VIT_SIZES[name]
    sd = on_meta(name).state_dict()
    # pos_embed, mask_token, patch conv (2); 11 per block; final norm (2); feature head 1 + 5 + 1 + 5.
    assert len(sd) == 2 + 2 + 11 * depth + 2 + 12
    assert sd["pos_embed"].shape == (1, 144, dim) and sd["mask_token"].shape == (1, 1, dim)
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, 9, 9)
    last = f"blocks.{depth - 1}"
    assert sd[f"{last}.attn.qkv.weight"].shape == (3 * dim, dim) and f"{last}.attn.qkv.bias" not in sd
    assert sd[f"{last}.attn.proj.bias"].shape == (dim,)
    assert sd[f"{last}.mlp.fc1.weight"].shape == (4 * dim, dim)
    assert sd["feature.0.weight"].shape == (dim, dim * 144) and sd["feature.2.weight"].shape == (512, dim)
    assert sd["feature.3.running_var"].shape == (512,)


# --- loading weights ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", SMALL, ids=SMALL_IDS)
def test_save_load_strict_gives_identical_outputs(tmp_path, build):
    torch.manual_seed(1)
    src = build(embedding_size=64)
    src.train()(images(4))  # move the BatchNorm running statistics away from their initial values
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(2)
    dst = build(embedding_size=64)
    load_backbone_weights(dst, path, "the backbone")
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(images()), dst(images()))


def test_loader_accepts_ddp_prefixed_and_nested_dicts():
    src, dst = create_backbone("r_tiny"), create_backbone("r_tiny")
    prefixed = {f"module.{k}": v for k, v in src.state_dict().items()}
    load_backbone_weights(dst, {"state_dict_backbone": prefixed}, "r_tiny")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_mismatched_checkpoint_names_backbone_file_and_keys(tmp_path):
    path = tmp_path / "r18_model.pt"
    torch.save(on_meta("r18").to_empty(device="cpu").state_dict(), path)
    model = on_meta("r50").to_empty(device="cpu")
    with pytest.raises(UserError) as err:
        load_backbone_weights(model, path, "r50")
    msg = str(err.value)
    assert "'r50'" in msg and str(path) in msg and "missing keys layer1.2.bn1.weight" in msg
    assert "\n" not in msg


def test_embedding_size_mismatch_is_reported_as_shapes():
    src = create_backbone("r_tiny", embedding_size=64).state_dict()
    with pytest.raises(UserError, match=r"mis-shaped .*fc\.weight \(64, 6272\) vs \(128, 6272\)"):
        load_backbone_weights(create_backbone("r_tiny", embedding_size=128), src, "r_tiny")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        load_backbone_weights(create_backbone("r_tiny"), tmp_path / "nope.pt", "r_tiny")


# --- options ------------------------------------------------------------------------------------------------

def train_step(model, x, seed=0) -> tuple[torch.Tensor, int]:
    """One forward and backward in training mode: the output and the count of `forward_counting_saved`."""
    torch.manual_seed(seed)  # same drop-path / masking draws for both runs
    model.train()
    out, saved = forward_counting_saved(model, x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), saved


def forward_counting_saved(model, x) -> tuple[torch.Tensor, int]:
    """The output, and how many tensors autograd kept for the backward outside checkpointed blocks (a checkpointed
    block keeps only its input, held by the checkpoint itself, and recomputes the rest)."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        return model(x), saved


@pytest.mark.parametrize("build", [*SMALL, partial(small_vit, mask_ratio=0.0),
                                   partial(create_backbone, "test_convnext"),
                                   partial(create_backbone, "test_convnext", pool="avg")],
                         ids=[*SMALL_IDS, "vit-unmasked", "timm-flatten", "timm-avg"])
def test_the_parameters_without_a_gradient_are_declared(build):
    """DDP stops at its second step over a parameter that got no gradient unless it is told to ignore it: the ViT's
    mask token without masking, timm's pooling head under pool=flatten."""
    model = build(embedding_size=32).train()
    model(images()).sum().backward()
    without = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without == model.unused_parameters()


def test_building_under_no_grad_declares_the_same_parameters():
    with torch.no_grad():
        built = create_backbone("test_convnext")
    assert built.unused_parameters() == create_backbone("test_convnext").unused_parameters() != []


@pytest.mark.parametrize("build", SMALL, ids=SMALL_IDS)
def test_checkpointing_gives_identical_outputs_grads_and_statistics(build):
    torch.manual_seed(3)
    plain = build(embedding_size=32, dropout=0.2)
    ckpt = build(embedding_size=32, dropout=0.2, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = images(2)
    (out_ckpt, saved_ckpt), (out_plain, saved_plain) = train_step(ckpt, x), train_step(plain, x)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    assert saved_ckpt < saved_plain / 2  # the blocks really were checkpointed
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
    # BatchNorm running statistics are updated once per step, not once more by the recomputation.
    for (n, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)


def test_checkpointing_reduces_peak_memory():
    x = images(2)

    def peak(checkpointing: bool) -> int:
        torch.manual_seed(0)
        model = small_mbf(checkpointing=checkpointing).train()
        return peak_memory(lambda: model(x).sum().backward())

    assert peak(True) < 0.5 * peak(False)


def test_checkpointing_is_off_in_eval():
    # Gradients through an evaluated network (e.g. a loss on a frozen backbone's embeddings) recompute nothing.
    torch.manual_seed(0)
    plain = create_backbone("r_tiny", embedding_size=32).eval()
    ckpt = create_backbone("r_tiny", embedding_size=32, checkpointing=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    out_ckpt, saved_ckpt = forward_counting_saved(ckpt, images())
    out_plain, saved_plain = forward_counting_saved(plain, images())
    assert saved_ckpt == saved_plain > 0
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)


@pytest.mark.parametrize("build", [SMALL[0], SMALL[2]], ids=[SMALL_IDS[0], SMALL_IDS[2]])
def test_channels_last_matches_contiguous(build):
    torch.manual_seed(4)
    plain = build().eval()
    cl = build(channels_last=True).eval()
    cl.load_state_dict(plain.state_dict())
    conv = next(m for m in cl.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(cl(images()), plain(images()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cuda", [True, False])
def test_channels_last_auto_follows_cuda(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    model = create_backbone("r_tiny", channels_last="auto")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model.channels_last is cuda
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is cuda


def test_channels_last_takes_only_true_false_auto():
    with pytest.raises(UserError, match=r"^backbone.channels_last='nhwc' is invalid: set it to true, false or auto$"):
        create_backbone("r_tiny", channels_last="nhwc")


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_region_keeps_the_embedding_in_fp32(precision, dtype):
    model = create_backbone("r_tiny", precision=precision).eval()
    seen = {}
    model.layer4[-1].register_forward_hook(lambda m, i, o: seen.update(trunk=o.dtype))
    model.fc.register_forward_hook(lambda m, i, o: seen.update(fc=(i[0].dtype, o.dtype)))
    with torch.no_grad():
        y = model(images())
    assert seen == {"trunk": dtype, "fc": (torch.float32, torch.float32)} and y.dtype == torch.float32


def test_unknown_precision_is_rejected():
    with pytest.raises(UserError, match="backbone.precision='fp8' is unknown"):
        create_backbone("r_tiny", precision="fp8")


@pytest.mark.parametrize("ratio, train, tokens", [(0.3, True, 100), (0.1, True, 129), (0.0, True, 144),
                                                  (0.3, False, 144)])
def test_vit_uses_the_configured_mask_ratio(ratio, train, tokens):
    model = small_vit(mask_ratio=ratio).train(train)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.set_grad_enabled(train):
        assert model(images()).shape == (2, 512)
    assert seen == [tokens]


def test_vit_masked_tokens_become_the_mask_token():
    model = small_vit(mask_ratio=0.5).train()
    # Mark every token by its position; after restoring, kept tokens are back in place, dropped ones are masks.
    x = torch.arange(6.0)[None, :, None].expand(2, 6, 64)
    kept, order = model._drop_tokens(x)
    assert kept.shape == (2, 3, 64)
    restored = model._restore_tokens(kept, order)
    is_mask = (restored == model.mask_token.detach()).all(-1)
    assert is_mask.sum(1).tolist() == [3, 3]
    assert torch.equal(restored[~is_mask][:, 0], x[~is_mask][:, 0])


def test_vit_drop_path_is_an_option():
    model = on_meta("vit_t", drop_path=0.3)
    assert model.blocks[-1].drop_path.rate == pytest.approx(0.3)
    assert isinstance(on_meta("vit_t", drop_path=0.0).blocks[-1].drop_path, torch.nn.Identity)
    with pytest.raises(ValueError, match="mask_ratio"):
        on_meta("vit_t", mask_ratio=1.0)


def test_drop_path_draws_as_torchvisions_stochastic_depth():
    from torchvision.ops import StochasticDepth

    x, ours, theirs = torch.randn(64, 49, 8), DropPath(0.3), StochasticDepth(0.3, mode="row")
    torch.manual_seed(1)
    expected = theirs(x)
    torch.manual_seed(1)
    got = ours(x)
    assert torch.equal(got, expected) and 0 < (got == 0).all(dim=(1, 2)).sum() < 64
    assert torch.equal(ours.eval()(x), x)


def test_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="^unknown backbone 'r51': choose one of .*r50.*any timm model name"):
        create_backbone("r51")


def test_create_backbone_starts_from_weights(tmp_path):
    path = tmp_path / "model.pt"
    src = create_backbone("r_tiny", embedding_size=64)
    torch.save(src.state_dict(), path)
    dst = create_backbone("r_tiny", embedding_size=64, weights=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    with pytest.raises(UserError, match=r"does not fit backbone 'r_tiny'.*mis-shaped .*fc\.weight"):
        create_backbone("r_tiny", embedding_size=128, weights=str(path))


def test_list_backbones_filters():
    assert list_backbones("vit_*") == ["vit_b", "vit_h", "vit_l", "vit_s", "vit_t"]
    assert list_backbones("mbf*") == ["mbf", "mbf_large"]
