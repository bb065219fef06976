"""bfloat16 storage of the class centres: stochastic rounding keeps tiny updates, the head trains like float32,
and bad settings are one sentence."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from arcface.config_checks import check_config
from arcface.engine.optim import adam_rows, build_optimizer, sgd_rows
from arcface.engine.rounding import round_stochastic
from arcface.errors import UserError
from arcface.heads import CombinedMargin, PartialFC, partial_fc
from arcface.train import CONF_DIR

ROWS, D, STEPS, LR = 64, 256, 400, 1e-4

SGD = {"lr": LR, "weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "maximize": False}
RULES = {
    "sgd": (sgd_rows, SGD),
    "sgd_momentum": (sgd_rows, {**SGD, "momentum": 0.9}),
    "adamw": (adam_rows, {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False,
                          "decoupled_weight_decay": True}),
}


def _tiny_updates(rule, group, start: torch.Tensor, round_to_nearest: bool = False) -> torch.Tensor:
    """`STEPS` updates of about LR each (gradient -1 on every other row) from `start`; returns the rows updated."""
    param, state = start.clone(), {}
    index = torch.arange(0, ROWS, 2)
    grad = torch.sparse_coo_tensor(index.unsqueeze(0), -torch.ones(index.numel(), D, dtype=start.dtype),
                                   start.shape, is_coalesced=True)
    for _ in range(STEPS):
        if round_to_nearest:  # what storing the float32 result in bfloat16 gives without stochastic rounding
            wide = param.float()
            rule(wide, grad.float(), state, group)
            param = wide.to(torch.bfloat16)
        else:
            rule(param, grad, state, group)
    assert torch.equal(param[1::2], start[1::2])  # rows without a gradient never move
    return param[::2].float()


@pytest.fixture
def one_thread():
    """Thousands of ops on 8k values: splitting each over threads costs far more than it saves on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(RULES))
def test_stochastic_rounding_tracks_float32_where_nearest_stalls(name):
    rule, group = RULES[name]
    torch.manual_seed(0)
    # Values in [1, 2): bfloat16's spacing there is 2^-7, 78 times an update; nearest rounding drops every one.
    start = (1 + torch.rand(ROWS, D)).bfloat16()
    exact = _tiny_updates(rule, group, start.float())
    drift = float((exact - start[::2].float()).mean())
    assert drift > 0.9 * STEPS * LR  # every step moves each value by LR or more (momentum: up to 10 LR)
    nearest = _tiny_updates(rule, group, start, round_to_nearest=True)
    assert torch.equal(nearest, start[::2].float())  # stalled: not one update survived
    stochastic = _tiny_updates(rule, group, start)
    # Each value is the float32 result plus a zero-mean walk of rounding errors (at most 2^-8 a step): the mean
    # over 8192 values lies within 4e-3 of the exact mean with overwhelming probability; the drift is 4e-2 or more.
    assert abs(float((stochastic - exact).mean())) < 4e-3
    assert float((stochastic - exact).abs().max()) < 0.5


def test_round_stochastic_is_unbiased_and_exact_on_representable_values():
    generator = torch.Generator().manual_seed(1)
    exact = torch.randn(1000).bfloat16().float()
    assert torch.equal(round_stochastic(exact, generator).float(), exact)
    ulp = torch.tensor(2.0 ** -7)  # spacing of bfloat16 in [1, 2)
    values = torch.full((200_000,), 1.0) + 0.3 * ulp
    rounded = round_stochastic(values, generator).float()
    assert set(rounded.unique().tolist()) == {1.0, float(1 + ulp)}
    assert abs(float((rounded - 1).mean() / ulp) - 0.3) < 0.01
    assert float(round_stochastic(-values, generator).float().mean()) == pytest.approx(-float(rounded.mean()),
                                                                                      abs=2e-4)


def _train(storage: str, optimizer, steps: int = 12):
    torch.manual_seed(3)
    head = PartialFC(CombinedMargin(s=16, m2=0.3), 16, 200, rate=0.5, storage_dtype=storage)
    backbone = nn.Linear(16, 16)
    opt = build_optimizer(optimizer, backbone, head)
    data = torch.Generator().manual_seed(4)
    centres = torch.randn(200, 16, generator=data)
    losses = []
    for _ in range(steps):
        labels = torch.randint(0, 200, (32,), generator=data)
        x = centres[labels] + 0.3 * torch.randn(32, 16, generator=data)
        opt.zero_grad(set_to_none=True)
        loss = head(backbone(x), labels)
        loss.backward()
        grad = head.weight.grad
        assert grad.is_sparse and grad.dtype == head.weight.dtype
        opt.step()
        losses.append(float(loss))
    return head, opt, losses


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("optimizer", [partial(torch.optim.SGD, lr=0.2, momentum=0.9, weight_decay=5e-4),
                                       partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.05)],
                         ids=["sgd", "adamw"])
def test_bfloat16_centres_train_like_float32(optimizer):
    head32, _, losses32 = _train("float32", optimizer)
    head16, opt16, losses16 = _train("bfloat16", optimizer)
    assert head16.weight.dtype == torch.bfloat16
    state = opt16.state[head16.weight]
    for name, value in state.items():
        expected = torch.float32 if name == "step" else torch.bfloat16  # Adam's per-row step count stays exact
        assert value.dtype == expected, name
    assert losses16[-1] < 0.8 * losses16[0]
    torch.testing.assert_close(torch.tensor(losses16), torch.tensor(losses32), rtol=0.03, atol=0.0)
    weight_scale = head32.weight.detach().abs().mean()
    assert float((head16.weight.float() - head32.weight.detach()).abs().mean()) < 0.02 * float(weight_scale)


def test_centres_are_drawn_in_blocks_as_one_draw():
    """The centres are initialised block by block (bfloat16 ones never exist in float32); the values are one draw's."""
    torch.manual_seed(5)
    head = PartialFC(CombinedMargin(), 4, 70_000)  # more rows than one block
    expected = torch.normal(0.0, 0.01, (70_000, 4), generator=torch.Generator().manual_seed(head._seed))
    assert torch.equal(head.weight.detach(), expected)
    torch.manual_seed(5)
    assert torch.equal(PartialFC(CombinedMargin(), 4, 70_000, storage_dtype="bfloat16").weight.detach(),
                       expected.bfloat16())


def test_bad_storage_settings_are_one_sentence():
    with pytest.raises(UserError, match=r"^pfc.storage_dtype='float16' is unknown: set pfc.storage_dtype to one of "
                                        r"float32, bfloat16$"):
        PartialFC(CombinedMargin(), 8, 10, storage_dtype="float16")
    with pytest.raises(UserError, match="set pfc.sparse_update=true or pfc.storage_dtype=float32"):
        PartialFC(CombinedMargin(), 8, 10, storage_dtype="bfloat16", sparse_update=False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        check_config(compose("train", overrides=["pfc.storage_dtype=bfloat16"]))
        with pytest.raises(UserError, match=r"^pfc.storage_dtype=half is unknown: set pfc.storage_dtype to one of "
                                            r"float32, bfloat16$"):
            check_config(compose("train", overrides=["pfc.storage_dtype=half"]))


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_bfloat16_rows_widened_in_blocks_give_float32_gradients(rate, monkeypatch):
    """The bfloat16 path (rows widened a few at a time) computes what float32 storage computes from the same values."""
    monkeypatch.setattr(partial_fc, "_WIDEN_ROWS", 16)  # several blocks, and a ragged last one
    torch.manual_seed(6)
    head16 = PartialFC(CombinedMargin(s=16, m2=0.3), 24, 150, rate=rate, storage_dtype="bfloat16")
    torch.manual_seed(6)
    head32 = PartialFC(CombinedMargin(s=16, m2=0.3), 24, 150, rate=rate)
    with torch.no_grad():
        head32.weight.copy_(head16.weight)  # the same (bfloat16-representable) centres
    x, labels = torch.randn(20, 24), torch.randint(0, 150, (20,))
    grads = []
    for head in (head16, head32):
        emb = x.clone().requires_grad_()
        loss = head(emb, labels)
        loss.backward()
        grads.append((loss.detach(), emb.grad, head.weight.grad.coalesce()))
    (loss16, emb16, w16), (loss32, emb32, w32) = grads
    torch.testing.assert_close(loss16, loss32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb16, emb32, rtol=1e-4, atol=1e-6)
    assert torch.equal(w16.indices(), w32.indices()) and w16.dtype == torch.bfloat16
    torch.testing.assert_close(w16.values().float(), w32.values(), rtol=2 ** -8, atol=1e-7)  # bfloat16 rounding
