"""Any timm model as a face backbone: its features -> (dropout) -> Linear -> BatchNorm1d embedding.

Registered as the `timm` family, so `create_backbone("convnext_tiny")` (Hydra: `backbone=timm
backbone.name=convnext_tiny`) builds it; extra keyword arguments go to `timm.create_model`.

`pool="flatten"` (the default) embeds the final feature map (or token sequence) flattened, as iresnet's and the
ViT's heads do: every position has weights of its own, so where a feature lies on the aligned face counts.
`pool="avg"` embeds timm's globally pooled features instead, which keeps the head small but throws the layout
away; on the synthetic identities, which differ only by where their colours lie, that head does not learn.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from arcface.errors import UserError
from arcface.models.base import Backbone
from arcface.models.registry import register_family


def _is_timm_model(name: str) -> bool:
    import timm  # imported on demand: it costs seconds, and most runs use the built-in families

    return timm.is_model(name)


def _parameters_reached(output: torch.Tensor) -> set[int]:
    """The ids of the parameters `output` was computed from, read off its autograd graph."""
    reached, seen, pending = set(), set(), [output.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: where a parameter enters the graph
            reached.add(id(node.variable))
        pending.extend(parent for parent, _ in node.next_functions)
    return reached


class TimmBackbone(Backbone):
    def __init__(
        self,
        model_name: str,
        embedding_size: int = 512,
        dropout: float = 0.0,
        precision: str = "fp32",
        checkpointing: bool = False,
        channels_last: bool | str = False,
        pretrained: bool = False,
        img_size: int = 112,
        pool: str = "flatten",
        **timm_kwargs,
    ):
        super().__init__(precision, checkpointing, channels_last)
        import timm

        # Models whose layers depend on the input size (ViTs, Swin, ...) must be built for 112x112 faces;
        # convolutional ones pool globally and take any size.
        if timm.models.get_pretrained_cfg_value(model_name, "fixed_input_size"):
            timm_kwargs.setdefault("img_size", img_size)
        self.trunk = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        if pool not in ("flatten", "avg"):
            raise UserError(f"backbone.pool={pool} is not a pooling: use backbone.pool=flatten or backbone.pool=avg")
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        # Measured before checkpointing is on, whose recomputation would hide the parameters from the graph.
        width, self._unused = self._probe(img_size)
        self.fc = nn.Linear(width, embedding_size, bias=False)
        if checkpointing:
            try:
                self.trunk.set_grad_checkpointing(True)
            except (AssertionError, NotImplementedError, AttributeError):
                raise UserError(f"timm model {model_name!r} has no gradient checkpointing: "
                                "set backbone.checkpointing=false") from None
        self.features = nn.BatchNorm1d(embedding_size, eps=2e-5)
        self.finish_init()

    def _probe(self, img_size: int) -> tuple[int, list[str]]:
        """The embedding layer's input width, and the trunk's parameters that the embedding does not use."""
        if self.pool == "avg":
            # Models with a pre-logits layer (MobileNetV3, MambaOut, ...) return head_hidden_size features, not
            # num_features, once their classifier is removed.
            return getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features, []
        # The map's size depends on the model's strides: one forward of an empty face measures it (on the meta
        # device when the model is built there, at no cost).
        device = next(self.trunk.parameters()).device
        was_training = self.trunk.training
        with torch.enable_grad():  # the graph shows which parameters the features come from
            features = self.trunk.eval().forward_features(torch.zeros(1, 3, img_size, img_size, device=device))
        self.trunk.train(was_training)
        # timm's pooling head (ConvNeXt's head.norm, ...) lies past the features.
        reached = _parameters_reached(features)
        unused = [f"trunk.{name}" for name, parameter in self.trunk.named_parameters() if id(parameter) not in reached]
        return features[0].numel(), unused

    def unused_parameters(self) -> list[str]:
        return self._unused

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x).flatten(1) if self.pool == "flatten" else self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(x)
        with self.trunk_autocast(x):
            x = self._trunk(x)
        return self.features(self.fc(self.dropout(x.float())))


@register_family("timm", knows=_is_timm_model)
def timm_backbone(model_name: str, **kwargs) -> TimmBackbone:
    return TimmBackbone(model_name, **kwargs)
