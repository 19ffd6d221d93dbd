"""Splat-and-Distill (SnD): 3D-aware fine-tuning by splatting EMA-teacher features into novel views.

Modules: ``views`` (context/target sampling), ``adapt`` (LoRA / full fine-tuning, merge at save),
``head`` (DINO head, losses), ``features`` (mask-aware upsampling, SLIC masks, semantic blending),
``reconstruct`` (the reconstructor seam: depth unprojection, learned cost-volume network, MVSplat
slot), ``distill`` (one training step), ``method`` (the registered ``splat_distill`` method),
``pretrain`` (``python -m bench pretrain-reconstructor``) and ``perf`` (``python -m bench perf train``).
Facts: docs/methods/splat_distill.md; config: bench/conf/method/splat_distill.yaml.
"""

from . import method, perf, perf_paper, schema  # noqa: F401  (registrations)
from .method import SplatDistill
from .pretrain import add_arguments, main

__all__ = ["SplatDistill", "add_arguments", "main"]
