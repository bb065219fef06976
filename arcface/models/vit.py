"""Vision Transformer for 112x112 faces (`vit_t` .. `vit_h`), with the reference's parameter names so its
checkpoints load. Sizes, drop-path and token masking are parameters of one class."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arcface.models.base import Backbone
from arcface.models.registry import register_backbone


class PatchEmbed(nn.Module):
    """Non-overlapping patches (a strided conv) flattened to a (B, tokens, dim) sequence."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # The qkv output is laid out (3, heads, head_dim), which is what makes reference weights load correctly.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, a residual branch is dropped for `rate` of the samples and the
    rest are scaled by 1 / (1 - rate) (torchvision's StochasticDepth, mode "row", without importing torchvision)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.rate)
        return x * keep.div_(1 - self.rate)


class Block(nn.Module):
    """Pre-norm transformer block; drop-path (per-sample stochastic depth) on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(Backbone):
    """Patch embedding (no class token) + learned positions -> blocks -> LayerNorm -> every token flattened into
    Linear -> BN1d -> Linear -> BN1d.

    In training, `mask_ratio` of the tokens (chosen per sample) skip the blocks and re-enter, as a learned mask
    token, before the head (MAE-style masking as regularisation); at evaluation nothing is masked.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        patch_size: int = 9,
        img_size: int = 112,
        embedding_size: int = 512,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        mask_ratio: float = 0.0,
        precision: str = "fp32",
        checkpointing: bool = False,
        channels_last: bool | str = False,
    ):
        super().__init__(precision, checkpointing, channels_last)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), not {mask_ratio}")
        self.mask_ratio = mask_ratio
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        # Stochastic depth grows linearly from 0 at the first block to `drop_path` at the last.
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.finish_init()

    def unused_parameters(self) -> list[str]:
        return [] if self.mask_ratio > 0 else ["mask_token"]

    def _drop_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random (1 - mask_ratio) share of each sample's tokens; `order` remembers where they came from."""
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        order = torch.rand(b, n, device=x.device).argsort(dim=1)
        return x.gather(1, order[:, :keep, None].expand(-1, -1, d)), order

    def _restore_tokens(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Fill the dropped places with the mask token and put every token back in its original position."""
        b, keep, d = x.shape
        filled = torch.cat([x, self.mask_token.expand(b, order.shape[1] - keep, d).to(x.dtype)], dim=1)
        return filled.gather(1, order.argsort(dim=1)[:, :, None].expand(-1, -1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(x)
        masking = self.training and self.mask_ratio > 0
        with self.trunk_autocast(x):
            x = self.patch_embed(x) + self.pos_embed
            if masking:
                x, order = self._drop_tokens(x)
            x = self.run_blocks(self.blocks, x)
        # Final norm and the embedding head run in fp32, as in the reference.
        x = self.norm(x.float())
        if masking:
            x = self._restore_tokens(x, order)
        return self.feature(self.dropout(x.flatten(1)))


# name: (embed_dim, depth). Drop-path and masking are off unless asked for; the reference's training values for
# them live in conf/backbone/ (family/vit.yaml and the sizes that differ from it).
_SIZES = {
    "vit_t": (256, 12),
    "vit_s": (512, 12),
    "vit_b": (512, 24),
    "vit_l": (768, 24),
    "vit_h": (1024, 48),
}


def _register(name: str, embed_dim: int, depth: int) -> None:
    @register_backbone(name)
    def factory(**kwargs) -> VisionTransformer:
        return VisionTransformer(embed_dim, depth, **kwargs)


for _name, _size in _SIZES.items():
    _register(_name, *_size)
