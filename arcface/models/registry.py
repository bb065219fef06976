"""Backbones register a factory under a name; everything else builds them through `create_backbone`."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator: `@register_backbone("r50")` over a factory `fn(**kwargs) -> nn.Module`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as `name`; it maps (B,3,112,112) in [-1,1] to (B, embedding_size)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}") from None
    return factory(**kwargs)
