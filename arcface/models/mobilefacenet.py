"""MobileFaceNet (`mbf`, `mbf_large`), with the reference's module names so its checkpoints load."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from arcface.models.base import Backbone
from arcface.models.registry import register_backbone


class ConvBN(nn.Module):
    """conv (no bias) -> BN, then PReLU unless `linear`: the reference's ConvBlock and LinearBlock in one.
    Padding keeps the size ("same") unless given."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 linear: bool = False, padding: int | None = None):
        super().__init__()
        padding = kernel // 2 if padding is None else padding
        layers = [nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False),
                  nn.BatchNorm2d(c_out)]
        if not linear:
            layers.append(nn.PReLU(c_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 expand to `hidden` -> depthwise 3x3 (carrying the stride) -> linear 1x1 projection, plus the input
    when `residual`."""

    def __init__(self, c_in: int, c_out: int, hidden: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBN(c_in, hidden),
            ConvBN(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            ConvBN(hidden, c_out, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    """`num_block` residual DepthWise blocks at constant width."""

    def __init__(self, channels: int, num_block: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, hidden, residual=True) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise 7x7 -> flatten -> (dropout) -> Linear (no bias) -> BatchNorm1d."""

    def __init__(self, embedding_size: int, dropout: float):
        super().__init__()
        # Kept as one Sequential so the keys read features.layers.{0,2,3}.* like the reference; dropout sits outside.
        self.layers = nn.Sequential(
            ConvBN(512, 512, kernel=7, groups=512, linear=True, padding=0),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.layers[1](self.layers[0](x)))
        return self.layers[3](self.layers[2](x))


class MobileFaceNet(Backbone):
    """Stem (stride 2) and three stride-2 DepthWise stages (112 -> 7), each followed by a Residual stack; then a
    1x1 conv to 512 and the GDC embedding head. `scale` widens the stages; the expansion widths stay fixed."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_size: int = 512,
        dropout: float = 0.0,
        precision: str = "fp32",
        checkpointing: bool = False,
        channels_last: bool | str = False,
    ):
        super().__init__(precision, checkpointing, channels_last)
        c1, c2 = 64 * scale, 128 * scale
        # With a single first block the reference uses a grouped 3x3 conv (64 groups), not a residual stack.
        first = (ConvBN(c1, c1, kernel=3, groups=64) if blocks[0] == 1
                 else Residual(c1, blocks[0], hidden=128))
        self.layers = nn.ModuleList([
            ConvBN(3, c1, kernel=3, stride=2),
            first,
            DepthWise(c1, c1, hidden=128, stride=2),
            Residual(c1, blocks[1], hidden=128),
            DepthWise(c1, c2, hidden=256, stride=2),
            Residual(c2, blocks[2], hidden=256),
            DepthWise(c2, c2, hidden=512, stride=2),
            Residual(c2, blocks[3], hidden=256),
        ])
        self.conv_sep = ConvBN(c2, 512)
        self.features = GDC(embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init over the fan-out of one group. torch's fan counts every output channel, so a depthwise
                # conv (one channel per group) would start sqrt(groups) times too small. Batch statistics hide that
                # in training, but BatchNorm's running variance starts at 1: in eval mode each such layer would
                # shrink the signal ~20x, and until the running statistics caught up (tens of steps) every
                # embedding would be the same constant, the running means carried through the network.
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.finish_init()

    def _blocks(self) -> list[nn.Module]:
        # Checkpoint units: each DepthWise of a Residual stack on its own, so only block inputs are kept.
        return [b for layer in self.layers for b in (layer.layers if isinstance(layer, Residual) else [layer])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(x)
        with self.trunk_autocast(x):
            x = self.run_blocks(self._blocks(), x)
        # The 1x1 conv and the embedding head run in fp32, as in the reference.
        return self.features(self.conv_sep(x.float()))


@register_backbone("mbf")
def mbf(**kwargs) -> MobileFaceNet:
    return MobileFaceNet(blocks=(1, 4, 6, 2), scale=2, **kwargs)


@register_backbone("mbf_large")
def mbf_large(**kwargs) -> MobileFaceNet:
    return MobileFaceNet(blocks=(2, 8, 12, 4), scale=4, **kwargs)
