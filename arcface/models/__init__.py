"""Backbones: a registry filled by importing each family's module."""
from arcface.models.registry import create_backbone, list_backbones, register_backbone
from arcface.models import iresnet  # noqa: F401  (registers r*)

__all__ = ["create_backbone", "list_backbones", "register_backbone"]
