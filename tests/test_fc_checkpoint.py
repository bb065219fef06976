"""Classifier state saved on 2 ranks resumes on 3 and on 1 with identical logits, optimizer state and next step."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arcface.distributed import gather_rows, get_rank
from arcface.engine.optim import build_optimizer
from arcface.errors import UserError
from arcface.heads import CurricularFace, PartialFC, load_fc_state, save_fc_state
from arcface.testing import spawn_gloo

C, D, GLOBAL_BATCH = 1000, 16, 12  # the global batch splits evenly over 1, 2 and 3 ranks
ADAMW = partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)


def _batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(step)
    emb, labels = torch.randn(GLOBAL_BATCH, D, generator=g), torch.randint(0, C, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // world
    return emb[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per]


def _build():
    head = PartialFC(CurricularFace(), D, C, rate=1.0)
    return head, build_optimizer(ADAMW, nn.Linear(1, 1), head)


def _step(head, optimizer, step, rank, world) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = head(*_batch(step, rank, world))
    loss.backward()
    optimizer.step()
    return loss.detach()


def _snapshot(head, optimizer) -> dict:
    """Full logits of fixed probes against every centre, and the full classifier state (rank 0; None elsewhere)."""
    probes = torch.randn(5, D, generator=torch.Generator().manual_seed(99))
    logits = gather_rows(F.normalize(head.weight.detach()) @ F.normalize(probes).T)
    return {"logits": logits, "state": save_fc_state(head, optimizer)}


def _save_worker(rank: int, world: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    # Every process starts from a random torch seed; a fixed one makes each run check the same numbers (shard
    # layouts round differently, and AdamW's second step amplifies that on some initialisations).
    torch.manual_seed(0)
    head, optimizer = _build()
    _step(head, optimizer, 1, rank, world)
    state = save_fc_state(head, optimizer)
    if rank == 0:
        torch.save(state, path)
    result = _snapshot(head, optimizer)
    result["next_loss"] = _step(head, optimizer, 2, rank, world)
    result["after"] = gather_rows(head.weight.detach())
    if rank == 0:
        torch.save(result, out)


def _resume(rank: int, world: int, path: str, out: str | None) -> dict:
    torch.manual_seed(1234 + rank)  # a different initialisation, overwritten by the load
    head, optimizer = _build()
    load_fc_state(head, optimizer, torch.load(path, mmap=True))
    result = _snapshot(head, optimizer)
    result["next_loss"] = _step(head, optimizer, 2, rank, world)
    result["after"] = gather_rows(head.weight.detach())
    if out and rank == 0:
        torch.save(result, out)
    return result


def _load_worker(rank: int, world: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    _resume(rank, world, path, out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fc")
    spawn_gloo(_save_worker, 2, str(tmp / "fc.pt"), str(tmp / "world2.pt"))
    return tmp, torch.load(tmp / "world2.pt")


def _assert_same(resumed: dict, original: dict) -> None:
    torch.testing.assert_close(resumed["logits"], original["logits"], rtol=0, atol=1e-6)
    a, b = resumed["state"], original["state"]
    assert torch.equal(a["weight"], b["weight"])
    assert a["optimizer_rows"].keys() == b["optimizer_rows"].keys() == {"exp_avg", "exp_avg_sq", "step"}
    for name in a["optimizer_rows"]:
        assert torch.equal(a["optimizer_rows"][name], b["optimizer_rows"][name]), name
    for name in a["margin"]:
        assert torch.equal(a["margin"][name], b["margin"][name]), name
    torch.testing.assert_close(resumed["next_loss"], original["next_loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed["after"], original["after"], rtol=1e-5, atol=1e-6)


def test_resume_on_three_ranks(saved):
    tmp, original = saved
    spawn_gloo(_load_worker, 3, str(tmp / "fc.pt"), str(tmp / "world3.pt"))
    _assert_same(torch.load(tmp / "world3.pt"), original)


def test_resume_in_one_process(saved):
    tmp, original = saved
    assert get_rank() == 0
    _assert_same(_resume(0, 1, str(tmp / "fc.pt"), None), original)


def test_saved_state_is_full_size(saved):
    tmp, _ = saved
    state = torch.load(tmp / "fc.pt")
    assert state["weight"].shape == (C, D) and state["optimizer_rows"]["step"].shape == (C,)
    assert bool((state["optimizer_rows"]["step"] == 1).all())  # rate 1.0: every row stepped once


def test_mismatched_checkpoint_is_a_user_error(saved):
    tmp, _ = saved
    head = PartialFC(CurricularFace(), D, C + 1)
    with pytest.raises(UserError, match="dataset.num_classes"):
        load_fc_state(head, None, torch.load(tmp / "fc.pt"))
    with pytest.raises(UserError, match="format"):
        load_fc_state(head, None, {"weight": torch.zeros(C, D)})
