"""Partial FC in one process: the softmax it computes, its sampling, label errors and the sparse row updates."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arcface.engine.optim import RowSparseOptimizer, build_optimizer
from arcface.errors import UserError
from arcface.heads import AdaFace, CombinedMargin, CurricularFace, PartialFC

C, D, B = 1000, 16, 8
SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)
ADAMW = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)


def _head(rate=1.0, margin=None, **kw) -> PartialFC:
    torch.manual_seed(0)
    return PartialFC(margin or CombinedMargin(), D, C, rate=rate, **kw)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[1] = labels[0]  # a class twice in the batch
    return torch.randn(B, D, generator=g), labels


def _sampled(head: PartialFC) -> torch.Tensor:
    """The rows a step used: the indices of the head's sparse gradient."""
    return head.weight.grad.coalesce().indices()[0]


def full_softmax_loss(embeddings, labels, weight, margin):
    logits = F.linear(F.normalize(embeddings), F.normalize(weight))
    return F.cross_entropy(margin(logits, labels, norms=embeddings.detach().norm(dim=1)), labels)


@pytest.mark.parametrize("margin", [CombinedMargin, CurricularFace, AdaFace])
def test_rate_one_is_the_full_softmax(margin):
    head = _head(margin=margin())
    emb, labels = _batch()
    emb_ref = emb.clone().requires_grad_()
    weight_ref = head.weight.detach().clone().requires_grad_()
    expected = full_softmax_loss(emb_ref, labels, weight_ref, margin())
    expected.backward()
    emb.requires_grad_()
    loss = head(emb, labels)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.grad, emb_ref.grad, atol=1e-5, rtol=1e-5)
    # Centre gradients scale with 1/|w| (centres start near 0.01): compare relative to that size.
    torch.testing.assert_close(head.weight.grad.to_dense(), weight_ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.0])
def test_sampling_keeps_positives_and_exact_count(rate):
    head = _head(rate)
    emb, labels = _batch()
    loss = head(emb, labels)
    loss.backward()
    index = _sampled(head)
    positives = labels.unique()
    assert torch.isin(positives, index).all()
    assert len(index) == (max(int(rate * C), len(positives)))
    if rate == 0:
        assert torch.equal(index, positives)
    # The loss is the full softmax restricted to the sampled centres.
    remapped = torch.searchsorted(index, labels)
    expected = full_softmax_loss(emb, remapped, head.weight.detach()[index], CombinedMargin())
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_samples_change_between_steps():
    head = _head(0.1)
    emb, labels = _batch()
    head(emb, labels).backward()
    first = _sampled(head)
    head.weight.grad = None
    head(emb, labels).backward()
    assert not torch.equal(first, _sampled(head))


@pytest.mark.parametrize("factory", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_unsampled_rows_and_state_are_untouched(factory):
    head = _head(0.1)
    backbone = nn.Linear(D, D)
    optimizer = build_optimizer(factory, backbone, head)
    for step in range(3):
        emb, labels = _batch(seed=step)
        before_w = head.weight.detach().clone()
        before_state = {k: v.clone() for k, v in optimizer.state[head.weight].items()}
        optimizer.zero_grad(set_to_none=True)
        head(backbone(emb), labels).backward()
        sampled = _sampled(head)
        optimizer.step()
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[sampled] = False
        assert torch.equal(head.weight.detach()[untouched], before_w[untouched])
        assert not torch.equal(head.weight.detach()[sampled], before_w[sampled])
        for name, value in optimizer.state[head.weight].items():
            if name in before_state:
                assert torch.equal(value[untouched], before_state[name][untouched]), name
            else:  # allocated on the first step: zero wherever nothing was sampled
                assert not value[untouched].any(), name
    assert all(p.grad is not None for p in backbone.parameters())


@pytest.mark.parametrize("factory", [SGD, ADAMW, partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True),
                                     partial(torch.optim.Adam, lr=1e-3, weight_decay=1e-2)],
                         ids=["sgd", "adamw", "nesterov", "adam"])
def test_row_updates_equal_torch_optimizer_when_every_row_is_sampled(factory):
    sparse_head, dense_head = _head(1.0), _head(1.0, sparse_update=False)
    backbone = nn.Linear(D, D)
    sparse_opt = build_optimizer(factory, backbone, sparse_head)
    dense_opt = factory([dense_head.weight])
    for step in range(3):
        emb, labels = _batch(seed=step)
        for head, opt in ((sparse_head, sparse_opt), (dense_head, dense_opt)):
            opt.zero_grad(set_to_none=True)
            head(emb, labels).backward()
            opt.step()
        torch.testing.assert_close(sparse_head.weight, dense_head.weight, atol=1e-5, rtol=1e-4)
    assert dense_head.weight.grad.layout == torch.strided


def test_dense_design_has_same_loss_but_dense_gradient():
    sparse_head, dense_head = _head(0.1), _head(0.1, sparse_update=False)
    emb, labels = _batch()
    torch.testing.assert_close(sparse_head(emb, labels), dense_head(emb, labels))
    assert dense_head.row_sparse_parameters() == []
    assert sparse_head.row_sparse_parameters() == [sparse_head.weight]


def test_optimizer_keeps_schedule_scaler_and_state_dict_contract():
    head = _head(0.1)
    backbone = nn.Linear(D, D)
    optimizer = build_optimizer(SGD, backbone, head)
    assert isinstance(optimizer, torch.optim.Optimizer) and len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
        group["lr"] = group["initial_lr"] * 0.5
    assert all(g["lr"] == 0.05 for g in optimizer.dense.param_groups)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    emb, labels = _batch()
    scaler.scale(head(backbone(emb), labels)).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
    scaler.step(optimizer)
    scaler.update()
    state = optimizer.state_dict()
    # The head's rows are sharded: they are saved by arcface.heads.fc_state, not in the optimizer's state_dict.
    assert len(state["state"]) == 2 and state["param_groups"][1]["row_sparse"]
    rows = optimizer.state[head.weight]["momentum_buffer"].clone()

    fresh = build_optimizer(SGD, backbone, head)
    fresh.state[head.weight] = {"momentum_buffer": rows}
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == 0.05 and fresh.dense.param_groups[0] is fresh.param_groups[0]
    assert fresh.state[head.weight]["momentum_buffer"] is rows
    assert torch.equal(fresh.state[backbone.weight]["momentum_buffer"],
                       optimizer.state[backbone.weight]["momentum_buffer"])
    fresh.step()  # the dense optimizer still sees the loaded groups and state


def test_gradient_accumulation_sums_sparse_rows():
    head = _head(0.1)
    optimizer = build_optimizer(partial(torch.optim.SGD, lr=1.0), nn.Linear(D, D), head)
    before = head.weight.detach().clone()
    grads = []
    for seed in (1, 2):
        emb, labels = _batch(seed)
        head(emb, labels).backward()
        grads.append(head.weight.grad.to_dense().clone())
    optimizer.step()
    total = sum(g - p for g, p in zip(grads, [torch.zeros_like(before), grads[0]]))
    torch.testing.assert_close(head.weight.detach(), before - total)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_are_close(dtype):
    emb, labels = _batch()
    reference = _head(0.1)(emb, labels)
    half = _head(0.1, logits_dtype=dtype)(emb, labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, atol=0.3, rtol=0.02)


@pytest.mark.parametrize("labels, words", [
    (torch.tensor([1.0, 2.0]), "int64"),
    (torch.tensor([3, C]), "dataset.num_classes"),
    (torch.tensor([-1, 4]), "dataset.num_classes"),
])
def test_bad_labels_raise_user_error(labels, words):
    head = _head()
    with pytest.raises(UserError, match=words):
        head(torch.randn(len(labels), D), labels)


def test_int32_labels_are_accepted():
    head = _head()
    emb, labels = _batch()
    torch.testing.assert_close(head(emb, labels.int()), head(emb, labels))


def test_bad_settings_raise_user_error():
    with pytest.raises(UserError, match="pfc.rate"):
        _head(1.5)
    with pytest.raises(UserError, match="float16"):
        _head(logits_dtype="int8")
    with pytest.raises(UserError, match="optimizer=sgd"):
        build_optimizer(partial(torch.optim.RMSprop, lr=0.1), nn.Linear(D, D), _head())
    assert isinstance(build_optimizer(ADAMW, nn.Linear(D, D), _head()), RowSparseOptimizer)
