"""Backbones register a factory under a name; everything else builds them through `create_backbone`.

A family (such as timm) registers one factory for a whole open set of model names, so `create_backbone` serves
`r50` and `convnext_tiny` by the same path.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from arcface.errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# family name -> (does it know this model name?, factory(model_name, **kwargs))
_FAMILIES: dict[str, tuple[Callable[[str], bool], Callable[..., nn.Module]]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator: `@register_backbone("r50")` over a factory `fn(**kwargs) -> nn.Module`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def register_family(name: str, knows: Callable[[str], bool]) -> Callable:
    """Decorator over `fn(model_name, **kwargs) -> nn.Module`, used for any name that `knows(name)` accepts
    and that no backbone registered under exactly that name."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _FAMILIES:
            raise ValueError(f"backbone family {name!r} is registered twice")
        _FAMILIES[name] = (knows, factory)
        return factory

    return wrap


def list_backbones() -> list[str]:
    """The names registered one by one (families such as timm accept more names than these)."""
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as `name`, or the family model of that name; it maps (B,3,112,112) in
    [-1,1] to (B, embedding_size)."""
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    for knows, factory in _FAMILIES.values():
        if knows(name):
            return factory(name, **kwargs)
    families = "".join(f", or any {f} model name" for f in _FAMILIES)
    raise UserError(f"unknown backbone {name!r}: choose one of {', '.join(list_backbones())}{families}")
