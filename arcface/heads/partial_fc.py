"""Partial FC: class centres sharded over ranks, a sampled subset per step, margin, sharded softmax cross-entropy.

Each rank holds a contiguous block of class centres (`shard_range`). A step all-gathers the embeddings and labels of
every rank, samples this rank's centres (every positive in the global batch plus random negatives up to
`rate`), computes cosine logits against them, applies the margin and reduces the softmax across ranks. With
`sparse_update` (the default) the centres' gradient is a sparse tensor holding only the sampled rows, which the
optimizer from `arcface.engine.optim.build_optimizer` applies row-wise: unsampled centres and their optimizer state
stay untouched, and no dense (C, D) gradient ever exists. With `storage_dtype="bfloat16"` the centres (and so their
optimizer state) take half the memory; the sampled rows are computed on, and updated, in float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arcface.distributed import all_gather, all_reduce, get_rank, get_world_size
from arcface.errors import UserError
from arcface.heads.sharding import positive_mask, sample_centres, shard_range
from arcface.heads.softmax import sharded_cross_entropy
from arcface.precision import dtype_named

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what `storage_dtype` may name
_INIT_ROWS = 1 << 16
_WIDEN_ROWS = 1 << 14  # bfloat16 rows widened to float32 at a time: 32 MiB at D = 512


class _SampledCosine(torch.autograd.Function):
    """Cosines between unit embeddings and rows `index` of `weight`, with the matmuls in `dtype`.

    The row normalisation is folded into the gradient, d cos_ij / d w_j = e_i / |w_j| - cos_ij * w_j / |w_j|^2,
    so no normalised copy of the rows exists, and the backward turns the one gathered copy of the sampled rows
    into their gradient in place: memory beyond the centres is one (sampled rows, D) buffer.
    The gradient for `weight` is a sparse tensor of just the sampled rows, stored in the weight's dtype. bfloat16
    rows are widened to float32 a block at a time (`_narrow_forward`, `_narrow_backward`), so that buffer stays in
    bfloat16 and no float32 copy of all sampled rows exists.
    """

    @staticmethod
    def forward(ctx, embeddings, weight, index, dtype):
        every_row = index.numel() == weight.shape[0]  # index is sorted and unique
        rows = weight if every_row else weight.index_select(0, index)
        if rows.dtype == torch.float32:
            inv_norm = rows.norm(dim=1).clamp_min_(1e-12).reciprocal_()
            cosine = (embeddings.to(dtype) @ rows.to(dtype).T).float().mul_(inv_norm)
        else:
            inv_norm, cosine = _narrow_forward(embeddings, rows, dtype)
        ctx.save_for_backward(embeddings, weight, index, inv_norm, cosine)
        ctx.rows = None if every_row else rows  # a private copy: the backward may overwrite it
        ctx.dtype, ctx.every_row = dtype, every_row
        return cosine

    @staticmethod
    def backward(ctx, grad):
        embeddings, weight, index, inv_norm, cosine = ctx.saved_tensors
        if not ctx.every_row and ctx.rows is None:
            raise RuntimeError("the Partial FC graph was already backpropagated; run the forward pass again")
        rows = weight if ctx.every_row else ctx.rows
        ctx.rows = None
        scaled = grad * inv_norm
        # Negated here, on a vector, rather than on the (rows, D) product: one pass less over the rows.
        neg_radial = (grad * cosine).sum(0).mul_(inv_norm.square()).neg_().unsqueeze(1)
        if weight.dtype != torch.float32:
            out = torch.empty_like(weight) if ctx.every_row else rows
            grad_embeddings, grad_rows = _narrow_backward(scaled, embeddings, rows, neg_radial, ctx.dtype, out)
        else:
            grad_embeddings = (scaled.to(ctx.dtype) @ rows.to(ctx.dtype)).to(embeddings.dtype)
            # grad_rows = scaled^T e - radial * rows, written over our copy of the rows (their last use was above).
            grad_rows = torch.mul(weight, neg_radial) if ctx.every_row else rows.mul_(neg_radial)
            if ctx.dtype == weight.dtype:
                grad_rows.addmm_(scaled.T, embeddings.to(ctx.dtype))
            else:
                grad_rows += (scaled.T.to(ctx.dtype) @ embeddings.to(ctx.dtype)).to(weight.dtype)
        grad_weight = torch.sparse_coo_tensor(index.unsqueeze(0), grad_rows, weight.shape, is_coalesced=True,
                                              check_invariants=False)
        return grad_embeddings, grad_weight, None, None


def _widened(rows: torch.Tensor):
    """(block, float32 copy of rows[block]) over `rows` in blocks of `_WIDEN_ROWS`."""
    for start in range(0, rows.shape[0], _WIDEN_ROWS):
        block = slice(start, start + _WIDEN_ROWS)
        yield block, rows[block].float()


def _narrow_forward(embeddings, rows, dtype):
    """`_SampledCosine.forward`'s inverse norms and cosines for bfloat16 rows, widened a block at a time."""
    inv_norm = torch.empty(rows.shape[0], device=rows.device)
    cosine = torch.empty(embeddings.shape[0], rows.shape[0], device=rows.device)
    unit = embeddings.to(dtype)
    for block, wide in _widened(rows):
        inv_norm[block] = wide.norm(dim=1)
        cosine[:, block] = unit @ wide.to(dtype).T
    inv_norm.clamp_min_(1e-12).reciprocal_()
    return inv_norm, cosine.mul_(inv_norm)


def _narrow_backward(scaled, embeddings, rows, neg_radial, dtype, out):
    """`_SampledCosine.backward` for bfloat16 rows: each block's row gradient summed in float32, then stored into
    `out` (bfloat16; our private copy of the rows, whose block was read just before)."""
    grad_embeddings = torch.zeros(embeddings.shape, device=embeddings.device)
    unit = embeddings.to(dtype)
    for block, wide in _widened(rows):
        part = scaled[:, block]
        grad_embeddings += (part.to(dtype) @ wide.to(dtype)).float()
        grad_block = wide.mul_(neg_radial[block])
        if dtype == torch.float32:
            grad_block.addmm_(part.T, unit)
        else:
            grad_block += (part.T.to(dtype) @ unit).float()
        out[block] = grad_block
    return grad_embeddings.to(embeddings.dtype), out


class PartialFC(nn.Module):
    """Margin softmax classifier over `num_classes` centres sharded across ranks: `loss = head(embeddings, labels)`.

    rate: fraction of each shard's centres used per step (1.0 = full softmax, 0 = positives only).
    logits_dtype: precision of the cosine matmul ("float32", "float16", "bfloat16"); margin and softmax always
        run in float32.
    sparse_update: False computes the logits as the reference does (plain autograd through the gathered,
        normalised centres), so their gradient is dense over all rows; kept to measure against.
    storage_dtype: "float32" or "bfloat16", the dtype the centres and their optimizer state are kept in. bfloat16
        halves their memory; the sampled rows are computed on in float32 at least and the row-wise optimizer
        rounds their updates back stochastically, so it needs sparse_update.
    """

    def __init__(self, margin: nn.Module, embedding_size: int, num_classes: int, rate: float = 1.0,
                 logits_dtype: str = "float32", sparse_update: bool = True, storage_dtype: str = "float32"):
        super().__init__()
        if not 0.0 <= rate <= 1.0:
            raise UserError(f"pfc.rate={rate} is not a fraction: set pfc.rate between 0 and 1")
        if storage_dtype not in STORAGE_DTYPES:
            raise UserError(f"pfc.storage_dtype={storage_dtype!r} is unknown: set pfc.storage_dtype to one of "
                            f"{', '.join(STORAGE_DTYPES)}")
        storage = STORAGE_DTYPES[storage_dtype]
        if storage != torch.float32 and not sparse_update:
            raise UserError(f"pfc.storage_dtype={storage_dtype} needs the row-wise optimizer, which rounds updates "
                            f"stochastically (a dense torch optimizer would round small updates away): set "
                            f"pfc.sparse_update=true or pfc.storage_dtype=float32")
        self.margin = margin
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.rate = rate
        self.logits_dtype = dtype_named(logits_dtype, "pfc.logits_dtype")
        self.sparse_update = sparse_update
        self.class_start, self.num_local = shard_range(num_classes, get_rank(), get_world_size())
        self.num_sample = int(rate * self.num_local)
        # Seeded per shard, so shards start different even when every rank runs with the same seed.
        self._seed = torch.initial_seed() + self.class_start
        init = torch.Generator().manual_seed(self._seed)
        self.weight = nn.Parameter(torch.empty((self.num_local, embedding_size), dtype=storage))
        # Drawn in blocks (the same values as one draw), so bfloat16 centres never exist as a float32 copy.
        for block in self.weight.data.split(_INIT_ROWS):
            block.copy_(torch.normal(0.0, 0.01, block.shape, generator=init))
        self._sampler: torch.Generator | None = None
        # True: take the paths that never wait for the device (fixed-size sampling, no label range check) also on
        # the CPU, to check them where there is no GPU; None (default): only on a GPU, where each wait costs.
        self.sync_free: bool | None = None
        # The sorted rows of the latest step's sparse gradient (see `_mark_coalesced`). Holding them keeps their
        # memory from being reused, so a gradient whose indices sit at that address holds exactly these rows.
        self._grad_rows: torch.Tensor | None = None
        if sparse_update:
            self.weight.register_post_accumulate_grad_hook(self._mark_coalesced)

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient is a sparse tensor of sampled rows (the optimizer updates them row-wise)."""
        return [self.weight] if self.sparse_update else []

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = self._integer_labels(labels)
        all_embeddings = torch.cat(all_gather(embeddings))
        all_labels = torch.cat(all_gather(labels))
        sync_free = all_labels.is_cuda if self.sync_free is None else self.sync_free
        if not sync_free:
            # Free here; on a GPU it would make the host wait for the device every step, so there the datasets
            # check labels as they read them (see arcface.data).
            self._check_range(all_labels)

        # With sync_free nothing below waits for the device (at a sample rate above zero; see `sample_centres`).
        local = all_labels - self.class_start
        mine = (local >= 0) & (local < self.num_local)
        index = sample_centres(positive_mask(local, self.num_local), self.num_sample, all_labels.numel(),
                               self.sampling_generator(), fixed_size=sync_free)
        local_labels = torch.where(mine, torch.searchsorted(index, local), -1)

        with torch.autocast(all_embeddings.device.type, enabled=False):  # the head sets its own precision
            unit = F.normalize(all_embeddings.float())
            if self.sparse_update:
                self._grad_rows = index
                logits = _SampledCosine.apply(unit, self.weight, index, self.logits_dtype)
            else:  # the reference's design: plain autograd, whose gradient is dense over all C rows
                every_row = index.numel() == self.num_local
                centres = F.normalize(self.weight if every_row else self.weight.index_select(0, index))
                logits = F.linear(unit.to(self.logits_dtype), centres.to(self.logits_dtype)).float()

        # Margins may need every row's target cosine (it lives on one shard) and the embedding norms.
        target_cosine = torch.zeros(logits.shape[0], device=logits.device)
        if logits.shape[1]:  # gathered for every row, kept where the target is here
            picked = logits.detach().gather(1, local_labels.clamp_min(0).unsqueeze(1)).squeeze(1)
            target_cosine = torch.where(local_labels >= 0, picked, target_cosine)
        all_reduce(target_cosine)
        norms = all_embeddings.detach().float().norm(dim=1)

        logits = self.margin(logits, local_labels, target_cosine=target_cosine, norms=norms)
        return sharded_cross_entropy(logits.float(), local_labels)

    def _mark_coalesced(self, weight: nn.Parameter) -> None:
        """After the gradient is stored: mark it coalesced when its rows are this step's sorted, unique sample.

        The backward builds it coalesced, but torch stores a first gradient as a new tensor without that flag; the
        optimizer would then check the order on the device and wait for the answer. A gradient summed over several
        backward passes has new indices (and a flag torch keeps right), so it is left alone.
        """
        grad, rows = weight.grad, self._grad_rows
        if grad is None or not grad.is_sparse or grad.is_coalesced() or rows is None:
            return
        index = grad._indices()
        if index.data_ptr() == rows.data_ptr() and index.numel() == rows.numel() and index.is_contiguous():
            weight.grad = torch.sparse_coo_tensor(index, grad._values(), grad.shape, is_coalesced=True,
                                                  check_invariants=False)

    def sampling_generator(self) -> torch.Generator:
        """The generator that draws each step's negative centres (its state is part of an exact resume)."""
        if self._sampler is None or self._sampler.device != self.weight.device:
            self._sampler = torch.Generator(self.weight.device).manual_seed(self._seed + 1)
        return self._sampler

    def _integer_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise UserError(f"labels have dtype {labels.dtype} but must be integer class ids: make the dataset "
                            f"return int64 labels")
        return labels.long()

    def _check_range(self, labels: torch.Tensor) -> None:
        if labels.numel() == 0:
            return
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            bad = low if low < 0 else high
            raise UserError(f"label {bad} is outside [0, {self.num_classes}): set dataset.num_classes to the "
                            f"dataset's class count (one more than its largest label)")

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, shard=[{self.class_start}, {self.class_start + self.num_local}), "
                f"rate={self.rate}, logits_dtype={self.logits_dtype}, "
                f"sparse_update={self.sparse_update}, storage_dtype={self.weight.dtype}")
