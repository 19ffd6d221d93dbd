"""FiT3D's evaluation protocol: features of the original and the fine-tuned backbone, concatenated.

``ConcatBackbone(original, finetuned)`` implements the Backbone seam with
``embed_dim = original.embed_dim + finetuned.embed_dim``; channels are ordered
[original, finetuned] in every map. The CLS vector is the **original** backbone's only
(FiT3D ``linear_evaluate_fit3d.py``: ``prefix_tokens = vit_outputs[1]``), so a dense-cls probe sees
``[original patch, fine-tuned patch, original CLS]`` = 3C channels; ``cls_from="both"`` keeps the
older [original CLS, fine-tuned CLS] (4C). The original is frozen. ``model``,
``spec`` and ``name`` are those of the fine-tuned backbone, so saving/loading weights
concerns the fine-tuned half only (the original is rebuilt from its own config).
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from ..errors import BenchError


class ConcatBackbone(nn.Module):
    def __init__(self, original: nn.Module, finetuned: nn.Module, cls_from: str = "original"):
        super().__init__()
        if cls_from not in ("original", "both"):
            raise BenchError(f"concat cls_from='{cls_from}' is unknown", "use original (FiT3D) or both")
        self.cls_from = cls_from
        if original.patch_size != finetuned.patch_size or original.num_blocks != finetuned.num_blocks:
            raise BenchError(
                f"cannot concatenate backbones '{original.name}' (patch {original.patch_size}, "
                f"{original.num_blocks} blocks) and '{finetuned.name}' (patch {finetuned.patch_size}, "
                f"{finetuned.num_blocks} blocks)",
                "concatenate a fine-tuned backbone with its own original",
            )
        self.original, self.finetuned = original.requires_grad_(False).eval(), finetuned
        self.patch_size, self.num_blocks = finetuned.patch_size, finetuned.num_blocks
        self.embed_dim = original.embed_dim + finetuned.embed_dim
        self.has_cls = original.has_cls and finetuned.has_cls
        self.name = finetuned.name

    @property
    def model(self) -> nn.Module:
        return self.finetuned.model

    @property
    def spec(self):
        return getattr(self.finetuned, "spec", None)

    def train(self, mode: bool = True) -> "ConcatBackbone":
        super().train(mode)
        self.original.eval()  # the original stays a frozen reference
        return self

    def grid_size(self, height: int, width: int):
        return self.finetuned.grid_size(height, width)

    def layers(
        self, images: torch.Tensor, idx: Optional[Sequence[int]] = None, norm: bool = True, return_cls: bool = False
    ) -> List[Any]:
        with torch.no_grad():
            a = self.original.layers(images, idx, norm, return_cls)
        b = self.finetuned.layers(images, idx, norm, return_cls)
        if not return_cls:
            return [torch.cat([x, y], dim=1) for x, y in zip(a, b)]
        if self.cls_from == "original":
            return [(torch.cat([x[0], y[0]], dim=1), x[1]) for x, y in zip(a, b)]
        return [(torch.cat([x[0], y[0]], dim=1), torch.cat([x[1], y[1]], dim=1)) for x, y in zip(a, b)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            a = self.original(images)
        return torch.cat([a, self.finetuned(images)], dim=1)

    def load_weights(self, path: str | os.PathLike, source: Optional[str] = None) -> None:
        self.finetuned.load_weights(path, source)
