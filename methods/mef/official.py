"""MEF's released checkpoints, applied to a backbone: the adapter that ``method=mef_official``
(:mod:`baselines.official`) reaches through :data:`bench.registry.OFFICIAL_ADAPTERS`.

The checkpoint's LoRA pairs are merged into the last blocks' ``attn.qkv``
(:func:`methods.mef.adapt.merge_official_lora`) and its 3x3 conv becomes the frozen feature head
(:class:`methods.mef.head.RefinedBackbone`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from bench.checkpoint import load_state_dict_strict
from bench.errors import CheckpointError
from bench.registry import OFFICIAL_ADAPTERS

from .adapt import merge_official_lora
from .head import RefinedBackbone, refine_conv


@OFFICIAL_ADAPTERS.register("mef", "merge MEF's released q/v LoRA pairs and build its refinement conv head")
def apply_official(backbone, ck: Mapping[str, Any], blocks: int, source: str, stride: Optional[int] = None):
    """``backbone`` with ``ck``'s LoRA pairs merged into its last ``blocks`` blocks, behind the frozen
    refinement head (``ck``: :func:`baselines.official.read_mef_checkpoint`'s dict)."""
    head = refine_conv(backbone.embed_dim)
    try:
        merge_official_lora(backbone.model, ck["A"], ck["B"], blocks)
        load_state_dict_strict(head, ck["refine"], source=f"{source} (refine_conv)")
    except ValueError as e:
        raise CheckpointError(
            f"{source} does not fit backbone '{backbone.name}': {e}",
            "pick the backbone the checkpoint was trained for (ViT-S 384 ch, B 768, L 1024, "
            "g 1536; *_reg for the register models)",
        ) from None
    for p in list(backbone.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    return RefinedBackbone(backbone, head.eval(), stride=stride)
