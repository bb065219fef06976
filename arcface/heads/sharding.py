"""Which class centres a rank owns, and which of them a step samples."""
from __future__ import annotations

import torch


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of rank's rows: contiguous blocks, the first C % W ranks one row larger."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


def positive_mask(local_labels: torch.Tensor, num_local: int) -> torch.Tensor:
    """(num_local,) bool: which local rows are the class of some label; labels outside [0, num_local) are ignored.

    Built by scattering into one spare slot past the end for the foreign labels, so no step depends on how many
    labels are local (which would make the host wait for the device to count them)."""
    mine = (local_labels >= 0) & (local_labels < num_local)
    flags = torch.zeros(num_local + 1, dtype=torch.bool, device=local_labels.device)
    # A scatter of a scalar, not `flags[...] = True`: indexing copies the Python scalar to a GPU, and waits for it.
    flags.scatter_(0, torch.where(mine, local_labels, num_local), True)
    return flags[:num_local]


def sample_centres(positive: torch.Tensor, num_sample: int, max_positives: int,
                   generator: torch.Generator | None = None, fixed_size: bool | None = None) -> torch.Tensor:
    """Sorted local row indices to use this step: every positive row, topped up with random rows to `num_sample`.

    `positive` is the (num_local,) mask of classes present in the global batch, at most `max_positives` of them (the
    global batch size). When the positives alone may reach `num_sample` (always with rate 0) the sample is the
    positives alone if they do, and its size is known only once the device has listed them: that path waits for the
    device once (inherent: the logits' width is then the number of classes in the batch).
    Otherwise the sample has `num_sample` rows whatever the labels, and with `fixed_size` (the default on a GPU)
    nothing here waits for the device; without it (the default on the CPU, where there is nothing to wait for) the
    sorted sample is read from a mask, which is cheaper there.
    """
    num_local = positive.numel()
    if num_sample >= num_local:
        return torch.arange(num_local, device=positive.device)
    if max_positives >= num_sample:
        positives = positive.nonzero().squeeze(1)  # a host read: the sample's size depends on the labels
        if positives.numel() >= num_sample:
            return positives
    # Random scores with positives forced above every negative: top-k keeps them and a uniform set of negatives.
    scores = torch.rand(num_local, device=positive.device, generator=generator).masked_fill_(positive, 2.0)
    chosen = scores.topk(num_sample, sorted=False).indices
    if positive.is_cuda if fixed_size is None else fixed_size:
        return chosen.sort().values
    return _sorted_by_mask(chosen, num_local)


def _sorted_by_mask(rows: torch.Tensor, num_local: int) -> torch.Tensor:
    """`rows` (distinct) sorted, via a mask read back with nonzero(): O(num_local), far cheaper than sorting on
    the CPU, but its output size is read back from the device."""
    keep = torch.zeros(num_local, dtype=torch.bool, device=rows.device)
    keep[rows] = True
    return keep.nonzero().squeeze(1)
