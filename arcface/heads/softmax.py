"""Softmax cross-entropy over logits whose columns (classes) are split across ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from arcface.distributed import all_reduce


class _ShardedCrossEntropy(torch.autograd.Function):
    """Forward: global row max (MAX all-reduce), exp-sum (SUM), target logit (SUM; it lives on one rank);
    loss = mean(log-sum-exp - target). Written as log-sum-exp it never saturates (no 1e-30 floor: a hopeless batch
    reads as its true, large loss). Backward: (softmax - onehot) / rows, on this rank's columns only."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[1]:
            row_max = logits.amax(dim=1)
            # Gathered for every row and kept where the target is here: no shape depends on the labels' values.
            picked = logits.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
            target = torch.where(labels >= 0, picked, 0.0)
        else:  # rate 0 and no positive in this shard: contributes nothing
            row_max = logits.new_full((logits.shape[0],), float("-inf"))
            target = torch.zeros_like(row_max)
        all_reduce(row_max, dist.ReduceOp.MAX)
        probs = (logits - row_max.unsqueeze(1)).exp_()
        sum_exp = all_reduce(probs.sum(dim=1))
        all_reduce(target)
        probs /= sum_exp.unsqueeze(1)
        ctx.save_for_backward(probs, labels)
        return (sum_exp.log() + row_max - target).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, labels = ctx.saved_tensors
        # Reuse the saved probabilities (B x K can be large); a second backward through this graph then fails loudly.
        grad = probs
        if grad.shape[1]:
            # -1 at each present target; rows whose target is elsewhere add -0.0 to column 0, which changes nothing.
            minus_one = (labels >= 0).to(grad.dtype).neg_().unsqueeze(1)
            grad.scatter_add_(1, labels.clamp_min(0).unsqueeze(1), minus_one)
        return grad.mul_(grad_loss / probs.shape[0]), None


def sharded_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of full rows whose columns are spread over ranks (same value on every rank).

    `logits` (B, K_local) float32; `labels` (B,) local column of the target or -1 where another rank holds it.
    In one process this is `F.cross_entropy`.
    """
    return _ShardedCrossEntropy.apply(logits, labels)
