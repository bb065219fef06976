"""fp16 loss scaling on several ranks: an overflow seen by one rank (even in the classifier's row-sparse
gradient, which only that rank holds) makes every rank skip the step and lower its scale."""
from __future__ import annotations

import pytest
import torch

from arcface.engine.amp import agree_on_overflow
from arcface.engine.optim import RowSparseOptimizer
from arcface.testing import spawn_gloo


def _steps_with_inf_on_rank_1(rank: int, world_size: int, out_dir) -> None:
    for agree in (True, False):  # one group for both cases: each spawn costs seconds
        _step_with_inf_on_rank_1(rank, out_dir / f"agree{agree}", agree)


def _step_with_inf_on_rank_1(rank: int, out_dir, agree: bool) -> None:
    backbone = torch.nn.Parameter(torch.ones(4))
    centres = torch.nn.Parameter(torch.ones(6, 2))  # this rank's shard of class centres
    optimizer = RowSparseOptimizer(torch.optim.SGD([backbone], lr=0.1), [centres])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(backbone.sum()).backward()  # a gradient of 1024 everywhere, the same on every rank
    rows = torch.tensor([[1, 4]])
    values = torch.full((2, 2), 1024.0)
    if rank == 1:
        values[1, 0] = float("inf")
    centres.grad = torch.sparse_coo_tensor(rows, values, centres.shape, is_coalesced=True,
                                          check_invariants=True)
    scaler.unscale_(optimizer)
    if agree:
        agree_on_overflow(scaler, optimizer)
    scaler.step(optimizer)
    scaler.update()
    torch.save({"backbone": backbone.detach(), "centres": centres.detach(), "scale": scaler.get_scale()},
               out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("amp")
    for agree in (True, False):
        (out / f"agree{agree}").mkdir()
    spawn_gloo(_steps_with_inf_on_rank_1, 2, out)
    return out


@pytest.mark.parametrize("agree", [True, False])
def test_overflow_on_one_rank_skips_the_step_everywhere(results, agree):
    ranks = [torch.load(results / f"agree{agree}" / f"rank{r}.pt") for r in range(2)]
    if agree:
        for state in ranks:
            assert state["scale"] == 512.0
            assert torch.equal(state["backbone"], torch.ones(4)) and torch.equal(state["centres"], torch.ones(6, 2))
    else:  # what agreeing prevents: rank 0 steps and keeps its scale, rank 1 skips
        assert ranks[0]["scale"] == 1024.0 and ranks[1]["scale"] == 512.0
        assert not torch.equal(ranks[0]["backbone"], ranks[1]["backbone"])
