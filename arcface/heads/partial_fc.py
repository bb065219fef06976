"""The classifier: class centres, cosine logits, margin, softmax cross-entropy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arcface.errors import UserError


class PartialFC(nn.Module):
    """Class centres and the margin softmax loss; `loss = head(embeddings, labels)`."""

    def __init__(self, margin, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 fp16_logits: bool = False):
        super().__init__()
        self.margin = margin
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.fp16_logits = fp16_logits
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype != torch.long or int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise UserError(f"labels must be int64 in [0, {self.num_classes}); got {labels.dtype} up to "
                            f"{int(labels.max())}: set dataset.num_classes to the dataset's class count")
        logits = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight)).clamp(-1, 1)
        return F.cross_entropy(self.margin(logits, labels), labels)
