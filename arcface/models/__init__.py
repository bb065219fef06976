"""Backbones: a registry filled by importing each family's module."""
from arcface.models.registry import create_backbone, list_backbones, register_backbone, register_family
from arcface.models import iresnet, mobilefacenet, timm_adapter, vit  # noqa: F401  (they register themselves)
from arcface.models.weights import load_backbone_weights

__all__ = ["create_backbone", "list_backbones", "load_backbone_weights", "register_backbone", "register_family"]
