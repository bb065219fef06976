"""Which class centres a rank owns, and which of them a step samples."""
from __future__ import annotations

import torch


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of rank's rows: contiguous blocks, the first C % W ranks one row larger."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


def sample_centres(positive: torch.Tensor, num_local: int, num_sample: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted local row indices to use this step: every positive, topped up with random rows to `num_sample`.

    `positive` holds the distinct local classes present in the global batch. When they alone reach `num_sample`
    (always with rate 0) they are the whole sample.
    """
    if num_sample >= num_local:
        return torch.arange(num_local, device=positive.device)
    if positive.numel() >= num_sample:
        return positive
    # Random scores with positives forced above every negative: top-k keeps them and a uniform set of negatives.
    scores = torch.rand(num_local, device=positive.device, generator=generator)
    scores[positive] = 2.0
    # A mask read back with nonzero() comes out sorted in O(num_local), far cheaper than sorting the indices.
    keep = torch.zeros(num_local, dtype=torch.bool, device=positive.device)
    keep[scores.topk(num_sample, sorted=False).indices] = True
    return keep.nonzero().squeeze(1)
