"""Partial FC on 1, 2 and 3 spawned gloo processes against a single-process full softmax over the same centres."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arcface.distributed import sum_allreduce_hook
from arcface.engine.optim import build_optimizer
from arcface.heads import AdaFace, CombinedMargin, CurricularFace, PartialFC
from arcface.testing import spawn_gloo

C, D, B = 1001, 16, 8  # C is divisible by neither 2 nor 3: uneven shards
MARGINS = {"arcface": CombinedMargin, "curricularface": CurricularFace, "adaface": AdaFace}
OPTIMIZERS = {"sgd": partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
              "adamw": partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)}
RATE = 0.1


def _data(world: int):
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, C, (world * B,), generator=g)
    labels[B - 1] = labels[-1]  # the same class on two ranks
    return torch.randn(world * B, D, generator=g), labels, torch.randn(C, D, generator=g) * 0.01


def _head(margin, rate, weight_full) -> PartialFC:
    head = PartialFC(margin, D, C, rate=rate)
    with torch.no_grad():
        head.weight.copy_(weight_full[head.class_start:head.class_start + head.num_local])
    return head


def _backbone() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(D, D)


def _worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    emb_all, labels_all, weight_full = _data(world)
    mine = slice(rank * B, (rank + 1) * B)
    labels = labels_all[mine]
    results = {}
    for name, margin in MARGINS.items():
        head = _head(margin(), 1.0, weight_full)
        emb = emb_all[mine].clone().requires_grad_()
        loss = head(emb, labels)
        loss.backward()
        results[name] = {"loss": loss.detach(), "emb_grad": emb.grad, "weight_grad": head.weight.grad.to_dense(),
                         "buffers": dict(head.margin.named_buffers())}
    for name, factory in OPTIMIZERS.items():
        head = _head(CombinedMargin(), RATE, weight_full)
        optimizer = build_optimizer(factory, nn.Linear(1, 1), head)
        loss = head(emb_all[mine].clone().requires_grad_(), labels)
        loss.backward()
        before = head.weight.detach().clone()
        optimizer.step()
        results[name] = {"loss": loss.detach(), "sampled": head.weight.grad.coalesce().indices()[0] + head.class_start,
                         "start": head.class_start, "num_local": head.num_local, "before": before, "after": head.weight.detach().clone(),
                         "state": {k: v.clone() for k, v in optimizer.state[head.weight].items()}}
    # DDP with gradients summed over ranks gives the backbone the gradient of the global loss.
    ddp = nn.parallel.DistributedDataParallel(_backbone())
    ddp.register_comm_hook(None, sum_allreduce_hook)
    _head(CombinedMargin(), 1.0, weight_full)(ddp(emb_all[mine]), labels).backward()
    results["backbone_grad"] = ddp.module.weight.grad
    torch.save(results, f"{out_dir}/{rank}.pt")


# Two ranks show everything a group does (uneven shards, a class on two ranks); one and three ranks are the same
# code at other sizes, run with the slow tests (each spawn costs seconds on 2 cores).
@pytest.fixture(scope="module", params=[pytest.param(1, marks=pytest.mark.slow), 2,
                                        pytest.param(3, marks=pytest.mark.slow)], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    spawn_gloo(_worker, world, str(out))
    return world, [torch.load(out / f"{r}.pt") for r in range(world)]


def _full_softmax(emb, labels, weight, margin):
    logits = F.linear(F.normalize(emb), F.normalize(weight))
    return F.cross_entropy(margin(logits, labels, norms=emb.detach().norm(dim=1)), labels)


@pytest.mark.parametrize("name", sorted(MARGINS))
def test_rate_one_equals_single_process_softmax(run, name):
    world, results = run
    emb_all, labels_all, weight_full = _data(world)
    emb = emb_all.clone().requires_grad_()
    weight = weight_full.clone().requires_grad_()
    margin = MARGINS[name]()
    loss = _full_softmax(emb, labels_all, weight, margin)
    loss.backward()
    for rank, res in enumerate(results):
        r = res[name]
        torch.testing.assert_close(r["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["emb_grad"], emb.grad[rank * B:(rank + 1) * B], atol=1e-5, rtol=1e-5)
        for key, value in margin.named_buffers():  # running statistics agree on every rank
            torch.testing.assert_close(r["buffers"][key], value, atol=1e-6, rtol=1e-6)
    weight_grad = torch.cat([res[name]["weight_grad"] for res in results])
    torch.testing.assert_close(weight_grad, weight.grad, atol=1e-4, rtol=1e-4)  # scale 1/|w|, |w| ~ 0.04


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_sampling_across_ranks(run, opt):
    world, results = run
    emb_all, labels_all, weight_full = _data(world)
    per_rank = [res[opt] for res in results]
    sampled = torch.cat([r["sampled"] for r in per_rank])
    for r in per_rank:
        assert len(r["sampled"]) == int(RATE * r["num_local"])  # exact count (positives fit in every shard)
    assert torch.isin(labels_all.unique(), sampled).all()
    remapped = torch.searchsorted(sampled, labels_all)
    expected = _full_softmax(emb_all, remapped, weight_full[sampled], CombinedMargin())
    for r in per_rank:
        torch.testing.assert_close(r["loss"], expected, atol=1e-5, rtol=1e-5)
    for r in per_rank:
        untouched = torch.ones(r["num_local"], dtype=torch.bool)
        untouched[r["sampled"] - r["start"]] = False
        assert torch.equal(r["after"][untouched], r["before"][untouched])
        assert not torch.equal(r["after"][~untouched], r["before"][~untouched])
        for value in r["state"].values():
            assert not value[untouched].any()


def test_ddp_with_summed_gradients_matches_single_process(run):
    world, results = run
    emb_all, labels_all, weight_full = _data(world)
    backbone = _backbone()
    _full_softmax(backbone(emb_all), labels_all, weight_full, CombinedMargin()).backward()
    for res in results:
        torch.testing.assert_close(res["backbone_grad"], backbone.weight.grad, atol=1e-5, rtol=1e-5)
