"""Backbones register a factory under a name; everything else builds them through `create_backbone`.

A family (such as timm) registers one factory for a whole open set of model names, so `create_backbone` serves
`r50` and `convnext_tiny` by the same path.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

from arcface.errors import UserError
from arcface.models.weights import load_backbone_weights

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


def list_backbones(pattern: str = "*") -> list[str]:
    """The names registered one by one that match the shell-style `pattern` (e.g. "vit_*"); families such as
    timm accept more names than these."""
    return sorted(fnmatch.filter(_REGISTRY, pattern))


def create_backbone(name: str, weights: str | None = None, **kwargs) -> nn.Module:
    """Build the backbone registered as `name`, or the family model of that name; it maps (B,3,112,112) in
    [-1,1] to (B, embedding_size). `weights`: a state_dict file to start from (this project's or the reference
    model zoo's `model.pt` / `backbone.pth`), loaded with strict key and shape checks."""
    if name in _REGISTRY:
        model = _REGISTRY[name](**kwargs)
    else:
        factory = next((f for knows, f in _FAMILIES.values() if knows(name)), None)
        if factory is None:
            families = "".join(f", or any {f} model name" for f in _FAMILIES)
            raise UserError(f"unknown backbone {name!r}: choose one of {', '.join(list_backbones())}{families}")
        model = factory(name, **kwargs)
    if weights is not None:
        load_backbone_weights(model, weights, name)
    return model
