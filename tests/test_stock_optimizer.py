"""A torch optimizer built by hand over Partial FC's parameters: it works where torch can apply the sparse gradient
and otherwise stops before the step with one sentence naming build_optimizer, not torch's add(sparse, dense)."""
from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn

from arcface.engine.optim import build_optimizer
from arcface.errors import UserError
from arcface.heads import CombinedMargin, PartialFC

C, D, B = 200, 16, 8


def _model(**head_options) -> tuple[nn.Module, PartialFC]:
    torch.manual_seed(0)
    return nn.Linear(D, D), PartialFC(CombinedMargin(), D, C, rate=0.2, **head_options)


def _backward(backbone: nn.Module, head: PartialFC) -> None:
    g = torch.Generator().manual_seed(1)
    head(backbone(torch.randn(B, D, generator=g)), torch.randint(0, C, (B,), generator=g)).backward()


@pytest.mark.parametrize("factory", [partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
                                     partial(torch.optim.AdamW, lr=1e-3),
                                     partial(torch.optim.RMSprop, lr=1e-3)], ids=["sgd", "adamw", "rmsprop"])
def test_stock_optimizer_that_cannot_apply_the_sparse_gradient_stops_before_stepping(factory):
    backbone, head = _model()
    optimizer = factory(list(backbone.parameters()) + list(head.parameters()))
    _backward(backbone, head)
    before = [p.detach().clone() for p in (*backbone.parameters(), head.weight)]
    with pytest.raises(UserError, match=rf"^{factory.func.__name__} cannot apply the sparse gradient of a parameter "
                                        rf"of shape \({C}, {D}\) .*arcface\.engine\.optim\.build_optimizer") as err:
        optimizer.step()
    assert "\n" not in str(err.value)
    assert all(torch.equal(b, p) for b, p in zip(before, (*backbone.parameters(), head.weight)))  # nothing moved


def test_stock_optimizers_that_apply_sparse_gradients_work():
    for factory, options in ((partial(torch.optim.SGD, lr=0.1, momentum=0.9), {}),
                             (partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), {"sparse_update": False})):
        backbone, head = _model(**options)
        optimizer = factory(list(backbone.parameters()) + list(head.parameters()))
        before = head.weight.detach().clone()
        _backward(backbone, head)
        optimizer.step()
        assert not torch.equal(before, head.weight)


def test_build_optimizer_is_not_refused():
    backbone, head = _model()
    optimizer = build_optimizer(partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4), backbone, head)
    before = head.weight.detach().clone()
    _backward(backbone, head)
    optimizer.step()
    assert not torch.equal(before, head.weight)


def test_the_guard_is_active_after_importing_partial_fc_alone():
    script = ("import torch\n"
              "from arcface.heads.partial_fc import PartialFC\n"
              "from arcface.heads.margins import CombinedMargin\n"
              "head = PartialFC(CombinedMargin(), 4, 10, rate=0.5)\n"
              "head(torch.randn(2, 4), torch.tensor([0, 1])).backward()\n"
              "torch.optim.SGD(head.parameters(), lr=0.1, weight_decay=1e-4).step()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "UserError: SGD cannot apply the sparse gradient" in result.stderr
    assert "add(sparse, dense)" not in result.stderr
