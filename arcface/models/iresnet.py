"""Improved ResNet (iresnet) for 112x112 faces, with the reference's module names so its checkpoints load."""
from __future__ import annotations

import torch
import torch.nn as nn

from arcface.models.base import Backbone
from arcface.models.registry import register_backbone


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut; no activation after the sum."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(Backbone):
    """Stem -> four stride-2 stages (112 -> 7) -> BN -> dropout -> Linear -> BatchNorm1d with its scale fixed at 1.

    Checkpointing keeps one tensor per IBasicBlock for backward and recomputes the rest.
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        embedding_size: int = 512,
        dropout: float = 0.0,
        precision: str = "fp32",
        checkpointing: bool = False,
        channels_last: bool | str = False,
    ):
        super().__init__(precision, checkpointing, channels_last)
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for i, (blocks, planes) in enumerate(zip(layers, widths), start=1):
            stage = [IBasicBlock(inplanes, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(inplanes * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
        self.finish_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(x)
        with self.trunk_autocast(x):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.run_blocks([*self.layer1, *self.layer2, *self.layer3, *self.layer4], x)
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        # The embedding layer runs in fp32, as in the reference.
        return self.features(self.fc(x.float()))


_DEPTHS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
    "r2060": (3, 128, 896, 3),
}


def _register(name: str, layers: tuple[int, ...]) -> None:
    @register_backbone(name)
    def factory(**kwargs) -> IResNet:
        return IResNet(layers, **kwargs)


for _name, _layers in _DEPTHS.items():
    _register(_name, _layers)


@register_backbone("r_tiny")
def r_tiny(widths: tuple[int, ...] = (8, 32, 64, 128), **kwargs) -> IResNet:
    """One block per stage, narrow (thinnest at full resolution): the CPU demo backbone (about 0.07 GMACs)."""
    return IResNet((1, 1, 1, 1), widths=tuple(widths), **kwargs)
