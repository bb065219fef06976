"""Optimizer construction over the backbone and the classifier head.

The head's class centres can number millions while a step touches only the sampled few. Their gradient arrives as a
sparse tensor of those rows (see `PartialFC.row_sparse_parameters`), and `RowSparseOptimizer` applies the configured
algorithm (SGD with momentum, Adam/AdamW) to exactly those rows: gradient, weight decay and optimizer state of the
other rows stay bit-for-bit untouched, and the memory per centre is its weight plus its optimizer state.
Everything else (the backbone) goes through the configured torch optimizer unchanged.
Centres stored in bfloat16 (`PartialFC(storage_dtype="bfloat16")`) keep their optimizer state in bfloat16 too; the
sampled rows are widened to float32, updated there, and rounded back stochastically (`arcface.engine.rounding`), so
updates far below bfloat16's resolution still move the centres on average.

A torch optimizer built by hand over the head's parameters would fail inside its step on that sparse gradient
(`add(sparse, dense) is not supported`, `Adam does not support sparse gradients`); a step pre-hook registered for
every optimizer when this module is imported (which `arcface.heads` does) stops it first with one sentence naming
`build_optimizer`.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from arcface.engine.rounding import round_stochastic
from arcface.errors import UserError


class _RowBlock:
    """A block of rows of a sparse gradient, and reading/writing the same rows of same-shaped tensors.

    When the gradient covers every row (sample rate 1) a block is a slice, read and updated in place without copies.
    """

    def __init__(self, index: torch.Tensor, grad: torch.Tensor, rows: slice | None):
        self.index, self.grad, self.rows = index, grad, rows

    def take(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rows (a view when the block is a slice); gathered into the front of `out` when given."""
        if self.rows is not None:
            return tensor[self.rows]
        if out is None:
            return tensor.index_select(0, self.index)
        return torch.index_select(tensor, 0, self.index, out=out[:self.index.numel()])

    def put(self, tensor: torch.Tensor, values: torch.Tensor) -> None:
        if self.rows is None:
            tensor.index_copy_(0, self.index, values)

    def widen(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rows in float32, for the arithmetic: `take` for float32 tensors, a widened copy of bfloat16 ones
        (into the front of `out` when given)."""
        if tensor.dtype == torch.float32:
            return self.take(tensor, out)
        narrow = self.take(tensor)
        return narrow.float() if out is None else out[:narrow.shape[0]].copy_(narrow)

    def store(self, tensor: torch.Tensor, values: torch.Tensor) -> None:
        """Write `widen`'s float32 rows back after updating them: as they are, or stochastically rounded to the
        tensor's bfloat16."""
        if tensor.dtype == values.dtype:
            self.put(tensor, values)
        elif self.rows is None:
            tensor.index_copy_(0, self.index, round_stochastic(values))
        else:
            tensor[self.rows] = round_stochastic(values)

    def add(self, tensor: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
        """tensor[rows] += alpha * values, in one pass over the rows."""
        if self.rows is None:
            tensor.index_add_(0, self.index, values, alpha=alpha)
        else:
            tensor[self.rows].add_(values, alpha=alpha)


_BLOCK_ROWS = 2048


def row_blocks(grad: torch.Tensor, block_rows: int = _BLOCK_ROWS):
    """The rows of a sparse gradient in blocks, so the optimizer's temporaries stay small whatever the sample.

    Small enough (a few MiB at D=512) that the temporaries stay in cache and come from the allocator's heap: blocks
    of tens of MiB are fresh mmaps each time, and their page faults cost more than the arithmetic.
    """
    index, values = grad._indices()[0], grad._values()
    # Checked on the device (a wait for it) unless torch knows the rows sorted and unique (PartialFC marks its own).
    if not grad.is_coalesced() and not bool((index[1:] > index[:-1]).all()):  # duplicates or unsorted
        grad = grad.coalesce()
        index, values = grad.indices()[0], grad.values()
    every_row = index.numel() == grad.shape[0]
    for start in range(0, index.numel(), block_rows):
        stop = min(start + block_rows, index.numel())
        yield _RowBlock(index[start:stop], values[start:stop], slice(start, stop) if every_row else None)


@torch.no_grad()
def sgd_rows(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.SGD on the given rows (weight decay, momentum, dampening, nesterov, maximize)."""
    lr, wd, momentum, dampening = group["lr"], group["weight_decay"], group["momentum"], group["dampening"]
    if momentum and "momentum_buffer" not in state:
        # A zero buffer makes a row's first update buf = g, as torch's first step does (dampening aside).
        state["momentum_buffer"] = torch.zeros_like(param)
    # Buffers reused by every block: the decayed gradient and the gathered weight and momentum rows.
    block = min(_BLOCK_ROWS, grad.shape[0])
    decayed, weight_rows, buf_rows = (param.new_empty((block, *param.shape[1:]), dtype=torch.float32)
                                      for _ in range(3))
    narrow = param.dtype != torch.float32  # bfloat16 storage: every update goes through float32 rows
    for rows in row_blocks(grad):
        g = rows.grad.float()
        g = -g if group["maximize"] else g
        w = None
        if wd or narrow:
            w = rows.widen(param, out=weight_rows)
        if wd:  # the decayed gradient g + wd * w
            g = torch.add(g, w, alpha=wd, out=decayed[:g.shape[0]])
        if momentum:
            # buf = momentum * buf + (1 - dampening) * g, in one pass when there is no dampening.
            buf = rows.widen(state["momentum_buffer"], out=buf_rows)
            if dampening:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            else:
                torch.add(g, buf, alpha=momentum, out=buf)
            rows.store(state["momentum_buffer"], buf)
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        if w is None:
            rows.add(param, g, alpha=-lr)
        else:  # the rows are at hand already: updating them and copying back is cheaper than an index_add
            rows.store(param, w.add_(g, alpha=-lr))


@torch.no_grad()
def adam_rows(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.Adam / AdamW on the given rows, with a step count per row for the bias corrections."""
    if group.get("amsgrad"):
        raise UserError("amsgrad is not supported for the classifier's sparse rows: set optimizer.amsgrad=false")
    if not state:
        state["step"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
    for rows in row_blocks(grad):
        g = rows.grad.float()
        g = -g if group["maximize"] else g
        w = rows.widen(param)
        if wd and group.get("decoupled_weight_decay"):
            w.mul_(1 - lr * wd)
        elif wd:
            g = g.add(w, alpha=wd)
        step = rows.take(state["step"]).add_(1)
        exp_avg = rows.widen(state["exp_avg"]).lerp_(g, 1 - beta1)
        exp_avg_sq = rows.widen(state["exp_avg_sq"]).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        for name, value in (("step", step), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            rows.store(state[name], value)
        bias1 = (1 - beta1 ** step).unsqueeze(1)
        bias2_sqrt = (1 - beta2 ** step).sqrt().unsqueeze(1)
        denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(group["eps"])
        rows.store(param, w.sub_((exp_avg / denom).div_(bias1).mul_(lr)))


# Row-wise counterpart of each supported torch optimizer (AdamW is a subclass of Adam).
_ROW_RULES: dict[type, Callable[[torch.Tensor, torch.Tensor, dict, dict], None]] = {
    torch.optim.SGD: sgd_rows,
    torch.optim.Adam: adam_rows,
}


def _row_rule(optimizer: torch.optim.Optimizer):
    for cls in type(optimizer).__mro__:
        if cls in _ROW_RULES:
            return _ROW_RULES[cls]
    raise UserError(f"{type(optimizer).__name__} has no sparse-row update for the classifier: use optimizer=sgd or "
                    f"optimizer=adamw")


class RowSparseOptimizer(torch.optim.Optimizer):
    """The configured optimizer for dense parameters plus a row-wise update for parameters with sparse gradients.

    `param_groups` are the dense optimizer's groups (the same dict objects) followed by one group of row-sparse
    parameters carrying the same hyper-parameters, so LR schedules, GradScaler and `zero_grad` see one optimizer.
    `state_dict()` holds the dense state and every group's hyper-parameters; the row-sparse parameters' state is
    sharded over ranks and saved world-size-independently by `arcface.heads.fc_state`, so `load_state_dict`
    leaves it as it is.
    """

    def __init__(self, dense: torch.optim.Optimizer, row_sparse: list[nn.Parameter]):
        self.dense = dense
        _WRAPPED.add(dense)
        self.row_rule = _row_rule(dense)
        groups = list(dense.param_groups)
        if row_sparse:
            groups.append({"params": row_sparse, "row_sparse": True})
        super().__init__(groups, dense.defaults)
        self.state = dense.state

    def _row_sparse_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g.get("row_sparse") for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.dense.step()
        for group in self.param_groups:
            if group.get("row_sparse"):
                for p in group["params"]:
                    if p.grad is not None:
                        self.row_rule(p, p.grad, self.state[p], group)
        return loss

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sparse_ids = {i for g in sd["param_groups"] if g.get("row_sparse") for i in g["params"]}
        sd["state"] = {i: s for i, s in sd["state"].items() if i not in sparse_ids}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        kept = {p: self.state[p] for p in self._row_sparse_params() if p in self.state}
        super().load_state_dict(state_dict)
        self.state.update(kept)
        # The base class rebuilt `state` and the group dicts; point the dense optimizer at the new ones.
        self.dense.state = self.state
        self.dense.param_groups = [g for g in self.param_groups if not g.get("row_sparse")]


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], backbone: nn.Module,
                    head: nn.Module) -> torch.optim.Optimizer:
    """`factory` is a partially applied optimizer class (Hydra `_partial_: true`) taking parameter groups.

    The backbone forms the first group and the head's ordinary parameters the second; the head's row-sparse
    parameters (if it declares any) are updated row-wise with the same algorithm and hyper-parameters.
    """
    sparse = list(head.row_sparse_parameters()) if hasattr(head, "row_sparse_parameters") else []
    sparse_ids = {id(p) for p in sparse}
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    head_dense = [p for p in head.parameters() if p.requires_grad and id(p) not in sparse_ids]
    groups = [{"params": trainable}] + ([{"params": head_dense}] if head_dense else [])
    return RowSparseOptimizer(factory(groups), sparse)


_WRAPPED: weakref.WeakSet = weakref.WeakSet()  # dense optimizers inside a RowSparseOptimizer: never given a sparse grad


def _applies_sparse(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether torch's own step applies a sparse gradient in `group` (weight decay would need a dense one)."""
    if isinstance(optimizer, torch.optim.SparseAdam):
        return True
    return isinstance(optimizer, (torch.optim.SGD, torch.optim.Adagrad)) and not group.get("weight_decay")


def _refuse_sparse_gradients(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Step pre-hook of every optimizer: stop before a step that cannot apply a parameter's sparse gradient."""
    if isinstance(optimizer, RowSparseOptimizer) or optimizer in _WRAPPED:
        return
    for group in optimizer.param_groups:
        if _applies_sparse(optimizer, group):
            continue
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise UserError(
                    f"{type(optimizer).__name__} cannot apply the sparse gradient of a parameter of shape "
                    f"{tuple(p.shape)} (Partial FC gives its class centres one): build the optimizer with "
                    f"arcface.engine.optim.build_optimizer(factory, backbone, head), which applies the same "
                    f"algorithm to the sampled rows, or create the head with sparse_update=False")


register_optimizer_step_pre_hook(_refuse_sparse_gradients)
