"""Synthetic identities: a deterministic stand-in for a face dataset, so training runs anywhere with no download.

Each identity is a smooth random colour pattern; each image of it is that pattern under a random similarity
transform, lighting change and noise, blended with a "nuisance" pattern drawn from a pool shared by all
identities. Pixel similarity is therefore a weak cue, and a network has to learn invariance to score well.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from arcface.data.pair_set import PairSet
from arcface.data.transforms import PIXEL_MEAN, PIXEL_SCALE
from arcface.errors import UserError

_NUISANCE_POOL = 64


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + key + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _smooth_pattern(gen: torch.Generator, grid: int, size: int) -> torch.Tensor:
    """A (3, size, size) pattern in about [-1, 1]: random values on a coarse grid, upsampled bicubically."""
    coarse = torch.randn(1, 3, grid, grid, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(-2, 2) / 2


class SyntheticIdentities(Dataset):
    """`num_classes` identities with `images_per_class` images each; labels 0..num_classes-1.

    `first_identity` shifts which identities are drawn, so a held-out set (identities never trained on) is
    `SyntheticIdentities(first_identity=train.num_classes, ...)` with the same seed.
    """

    def __init__(self, num_classes: int, images_per_class: int, seed: int = 0, image_size: int = 112,
                 first_identity: int = 0, nuisance: float = 1.0, noise: float = 0.15):
        self.num_classes = num_classes
        self.images_per_class = images_per_class
        self.seed = seed
        self.image_size = image_size
        self.first_identity = first_identity
        self.nuisance = nuisance
        self.noise = noise

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label, variant = divmod(index, self.images_per_class)
        return self.render(label, variant), label

    def render(self, label: int, variant: int) -> torch.Tensor:
        """Image `variant` of identity `label` as uint8 (3, H, W)."""
        size = self.image_size
        identity = _smooth_pattern(_generator(self.seed, 0, self.first_identity + label), 6, size)
        gen = _generator(self.seed, 1, self.first_identity + label, variant)
        nuisance_id = int(torch.randint(_NUISANCE_POOL, (1,), generator=gen))
        nuisance = _smooth_pattern(_generator(self.seed, 2, nuisance_id), 4, size)
        angle = math.radians(float(torch.empty(1).uniform_(-12, 12, generator=gen)))
        scale = float(torch.empty(1).uniform_(0.9, 1.1, generator=gen))
        shift = torch.empty(2).uniform_(-0.12, 0.12, generator=gen)
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, float(shift[0])], [sin, cos, float(shift[1])]]).unsqueeze(0)
        grid = F.affine_grid(theta, (1, 3, size, size), align_corners=False)
        face = F.grid_sample(identity.unsqueeze(0), grid, padding_mode="reflection", align_corners=False)[0]
        contrast = float(torch.empty(1).uniform_(0.7, 1.3, generator=gen))
        brightness = float(torch.empty(1).uniform_(-0.25, 0.25, generator=gen))
        image = contrast * face + self.nuisance * nuisance + brightness
        image = image + self.noise * torch.randn(image.shape, generator=gen)
        return ((image.clamp(-1, 1) + PIXEL_MEAN / PIXEL_SCALE) * PIXEL_SCALE).round().to(torch.uint8)


def synthetic_pair_set(num_pairs: int, num_identities: int, first_identity: int, seed: int = 0,
                       image_size: int = 112) -> PairSet:
    """Half genuine, half impostor pairs of identities from `first_identity` on (held out from training)."""
    if num_identities < 2 or num_pairs < 10:
        raise UserError(f"the synthetic pair set needs at least 2 identities and 10 pairs (10-fold protocol), got "
                        f"{num_identities} and {num_pairs}: raise dataset.val.synthetic_holdout.num_identities / "
                        f"num_pairs")
    data = SyntheticIdentities(num_identities, images_per_class=1000, seed=seed, image_size=image_size,
                               first_identity=first_identity)
    gen = _generator(seed, 3, first_identity)
    images, issame = [], []
    for i in range(num_pairs):
        a = int(torch.randint(num_identities, (1,), generator=gen))
        same = i % 2 == 0
        b = a if same else (a + 1 + int(torch.randint(num_identities - 1, (1,), generator=gen))) % num_identities
        v = torch.randperm(1000, generator=gen)[:2].tolist()
        images += [data.render(a, v[0]), data.render(b, v[1])]
        issame.append(same)
    return PairSet(torch.stack(images), torch.tensor(issame))
