"""DINOv2 ViTs (S/B/L/g, with and without registers) and a tiny ViT, all timm ``VisionTransformer``.

Feature extraction follows DINOv2's ``get_intermediate_layers``: patch embedding, position
embedding resampled to the input grid, the blocks up to the deepest requested one, the final
norm applied to each requested output, register tokens dropped.

Position embeddings are resampled exactly like the official torch.hub models (config keys
``interpolate_offset`` / ``interpolate_antialias``): the models without registers use bicubic
with ``scale_factor=(n + 0.1) / 37`` and no antialiasing, the ``_reg`` models bicubic to the
target size with antialiasing (which is also what timm's ``dynamic_img_size`` does). At the
native 37x37 grid (518 px) nothing is resampled.

Weights: timm layout (``timm/vit_*_dinov2.lvd142m`` on the Hub) or the official layout
(``dinov2_vits14[_reg4]_pretrain.pth``), mapped by :func:`dinov2_official_to_timm`.
"""

from __future__ import annotations

import re
from typing import Any, List, Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..checkpoint import StateDict
from ..registry import BACKBONES
from .base import Backbone, BackboneSpec, common_kwargs

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # official FSDP chunks: blocks.<chunk>.<i>.


def is_dinov2_official(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for the official DINOv2 layout (``mask_token``, ``register_tokens``, SwiGLU ``w12``/``w3``)."""
    return "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k or _CHUNKED_BLOCK.match(k) for k in sd)


def dinov2_official_to_timm(sd: StateDict) -> StateDict:
    """Official DINOv2 keys -> timm ``vit_*_patch14[_reg4]_dinov2`` keys.

    The mapping is timm's own: ``_convert_dinov2``, the DINOv2 branch of
    ``timm.models.vision_transformer.checkpoint_filter_fn`` (drops ``mask_token``; with registers
    ``register_tokens`` -> ``reg_token``, the CLS position folded into ``cls_token`` and ``pos_embed``
    keeping the 37*37 patch positions; SwiGLU ``mlp.w12``/``mlp.w3`` -> ``mlp.fc1``/``mlp.fc2``).
    The only step timm lacks is the FSDP chunk layout ``blocks.<chunk>.<i>.`` -> ``blocks.<i>.``.

    Not the whole ``checkpoint_filter_fn``: its position-embedding resampling would silently resize
    (or crash on) a checkpoint of the wrong variant, where bench's strict loader names the keys.
    """
    from timm.models.vision_transformer import _convert_dinov2  # here, not at import: timm costs ~2 s of start-up

    return _convert_dinov2({_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in sd.items()}, None)


def resample_patch_pos(pos: torch.Tensor, old: tuple, new: tuple, offset: float, antialias: bool) -> torch.Tensor:
    """Resample patch position embeddings ``[1, gh*gw, C]`` from grid ``old`` to ``new`` (DINOv2 rule)."""
    if tuple(old) == tuple(new):
        return pos
    C = pos.shape[-1]
    grid = pos.float().reshape(1, old[0], old[1], C).permute(0, 3, 1, 2)
    if offset:  # official models without registers: scale factor with the historical +0.1
        kw = dict(scale_factor=((new[0] + offset) / old[0], (new[1] + offset) / old[1]))
    else:
        kw = dict(size=tuple(new))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    assert tuple(grid.shape[-2:]) == tuple(new), (grid.shape, new)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, C).to(pos.dtype)


class ViTBackbone(Backbone):
    """A timm VisionTransformer with a CLS token (and optional registers) as a dense backbone."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        interpolate_offset: float = 0.0,
        interpolate_antialias: bool = True,
        **kw: Any,
    ):
        if model.cls_token is None:
            raise ValueError(f"{name}: ViTBackbone needs a model with a CLS token")
        if model.reg_token is not None and not model.no_embed_class:
            raise ValueError(f"{name}: register tokens need no_embed_class=True (timm DINOv2 reg layout)")
        super().__init__(
            name,
            model,
            patch_size=model.patch_embed.patch_size[0],
            embed_dim=model.embed_dim,
            num_blocks=len(model.blocks),
            has_cls=True,
            **kw,
        )
        self.interpolate_offset, self.interpolate_antialias = float(interpolate_offset), bool(interpolate_antialias)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: BackboneSpec, meta: bool = False) -> "ViTBackbone":
        return cls(
            str(cfg["name"]),
            spec.create_model(meta),
            spec=spec,
            interpolate_offset=float(cfg.get("interpolate_offset", 0.0)),
            interpolate_antialias=bool(cfg.get("interpolate_antialias", True)),
            **common_kwargs(cfg),
        )

    @staticmethod
    def checkpoint_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
        return dinov2_official_to_timm(state_dict) if is_dinov2_official(state_dict) else state_dict

    def _tokens(self, x: torch.Tensor) -> tuple:
        """Images -> token sequence [B, prefix + h*w, C] with position embeddings, and (h, w)."""
        m = self.model
        x = m.patch_embed(x)  # NHWC (dynamic_img_size) or [B, N, C]
        if x.ndim == 4:
            B, h, w, C = x.shape
            x = x.reshape(B, h * w, C)
        else:
            raise RuntimeError(f"{self.name}: build the timm ViT with dynamic_img_size=True")
        n_pos_prefix = 0 if m.no_embed_class else 1
        pos = m.pos_embed
        patch_pos = resample_patch_pos(
            pos[:, n_pos_prefix:], m.patch_embed.grid_size, (h, w), self.interpolate_offset, self.interpolate_antialias
        )
        cls = m.cls_token.expand(B, -1, -1)
        if m.no_embed_class:  # timm DINOv2 reg layout: CLS position already folded into cls_token
            prefix = [cls] + ([m.reg_token.expand(B, -1, -1)] if m.reg_token is not None else [])
            x = torch.cat(prefix + [x + patch_pos], dim=1)
        else:
            x = torch.cat([cls + pos[:, :1], x + patch_pos], dim=1)
        return m.norm_pre(m.patch_drop(m.pos_drop(x))), (h, w)

    def _extract(self, x: torch.Tensor, idx: List[int], norm: bool, return_cls: bool) -> List[Any]:
        m = self.model
        x, (h, w) = self._tokens(x)
        wanted, taken = set(idx), {}
        ckpt = getattr(m, "grad_checkpointing", False) and torch.is_grad_enabled()
        for i, blk in enumerate(m.blocks[: max(idx) + 1]):
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
            if i in wanted:
                taken[i] = x
        out = []
        for i in idx:
            t = m.norm(taken[i]) if norm else taken[i]
            fmap = t[:, m.num_prefix_tokens :].unflatten(1, (h, w)).permute(0, 3, 1, 2)
            out.append((fmap, t[:, 0]) if return_cls else fmap)
        return out


# -- registered names ---------------------------------------------------------------------------------
_VIT_KW = dict(num_classes=0, dynamic_img_size=True)
_DINOV2 = {
    "s": ("small", "ViT-S/14, 384 ch, 12 blocks"),
    "b": ("base", "ViT-B/14, 768 ch, 12 blocks"),
    "l": ("large", "ViT-L/14, 1024 ch, 24 blocks"),
    "g": ("giant", "ViT-g/14, 1536 ch, 40 blocks, SwiGLU"),
}
for _k, (_size, _desc) in _DINOV2.items():
    BACKBONES.add(
        f"dinov2_vit{_k}14",
        BackboneSpec(ViTBackbone, f"vit_{_size}_patch14_dinov2", _VIT_KW),
        f"DINOv2 {_desc} (timm vit_{_size}_patch14_dinov2)",
    )
    BACKBONES.add(
        f"dinov2_vit{_k}14_reg",
        BackboneSpec(ViTBackbone, f"vit_{_size}_patch14_reg4_dinov2", _VIT_KW),
        f"DINOv2 {_desc}, 4 registers (timm vit_{_size}_patch14_reg4_dinov2)",
    )

# Same timm family as DINOv2 (patch 14, CLS, layer scale), shrunk: 4x4 native grid, 4 blocks, 48 ch.
TINY_VIT_KW = dict(_VIT_KW, img_size=56, embed_dim=48, depth=4, num_heads=2)
BACKBONES.add(
    "tiny_vit",
    BackboneSpec(ViTBackbone, "vit_small_patch14_dinov2", TINY_VIT_KW),
    "tests only: random-init DINOv2-style ViT (patch 14, 48 ch, 4 blocks)",
)
