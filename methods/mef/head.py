"""MEF's refinement head: a 3x3 convolution on the last layer's normed patch features.

Official (qq456cvb/3DCorrEnhance ``finetune.py``): ``refine_conv = Conv2d(C, C, 3, stride 1, padding
1)`` (with bias, PyTorch default init) applied to ``x_norm_patchtokens`` reshaped to the patch grid;
every evaluation in ``evaluate.py`` (pose, tracking, semantic transfer) reads ``refine_conv(features)``.

:class:`RefinedBackbone` puts the conv behind the Backbone seam, so every task probes the refined
features: ``forward`` and ``layers`` return ``refine(norm(last block))`` for the last block (the final
norm is applied to it even when a protocol asks for un-normed layers: the conv was trained on normed
features; a CNN has no final norm) and the inner backbone's maps, unchanged, for every other block;
the CLS vector (or a CNN's global average) stays the inner one.

Optional effective stride (``stride``, MEF's ``downsample_factor`` 8): the image is resized so the
feature grid is ``(H // stride, W // stride)`` -- e.g. a ViT/14 sees the image enlarged 14/8 -- as
MEF's pose evaluation does; ``None`` keeps the backbone's native stride (what every other bench
method is probed at).

Export: the runner saves ``backbone.model`` (the LoRA-merged timm model) to ``model.safetensors``;
the head goes to ``refine_head.safetensors`` beside it (keys ``weight`` [C,C,3,3] and ``bias`` [C],
metadata: format ``mef-refine-head``, channels, stride), which loads strictly into
``torch.nn.Conv2d(C, C, 3, padding=1)``. ``python -m bench`` re-attaches it when it reuses a cached
backbone (:meth:`methods.mef.method.MEF.restore`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import CheckpointError

HEAD_FILE = "refine_head.safetensors"
HEAD_FORMAT = "mef-refine-head"


def refine_conv(channels: int) -> nn.Conv2d:
    """The official refinement conv (PyTorch default init, drawn from the global torch RNG)."""
    return nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)


def mef_grid(height: int, width: int, target_res: Optional[int], stride: int) -> Tuple[int, int]:
    """Feature grid of MEF's input resizing: the longer side scaled to ``target_res`` (None: as is),
    then ``// stride`` (official ``get_feature``: ``tgt_size // downsample_factor``)."""
    if target_res:
        if height > width:
            h, w = int(target_res), int(width * target_res / height)
        else:
            h, w = int(height * target_res / width), int(target_res)
    else:
        h, w = int(height), int(width)
    return max(1, h // int(stride)), max(1, w // int(stride))


def final_norm(inner, fmap: torch.Tensor) -> torch.Tensor:
    """The inner backbone's final norm applied to a ``[B,C,h,w]`` map (identity for CNNs)."""
    norm = getattr(inner.model, "norm", None)
    if norm is None or isinstance(norm, nn.Identity) or not getattr(inner, "has_cls", False):
        return fmap
    return norm(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RefinedBackbone(nn.Module):
    """A Backbone whose last-layer features pass through MEF's refinement conv (module docstring)."""

    def __init__(self, inner: nn.Module, head: nn.Conv2d, stride: Optional[int] = None):
        super().__init__()
        if head.in_channels != inner.embed_dim or head.out_channels != inner.embed_dim:
            raise CheckpointError(
                f"MEF refinement head has {head.in_channels}->{head.out_channels} channels, "
                f"backbone '{inner.name}' has {inner.embed_dim}",
                "use the head saved with this backbone",
            )
        self.inner, self.head = inner, head
        self.stride = int(stride) if stride else None
        self.name, self.num_blocks, self.has_cls = inner.name, inner.num_blocks, inner.has_cls
        self.embed_dim = inner.embed_dim
        self.patch_size = self.stride or inner.patch_size
        self.resize_mode = getattr(inner, "resize_mode", "resize") if self.stride is None else "resize"
        self.default_layers = list(getattr(inner, "default_layers", [inner.num_blocks - 1]))

    # the seam's attributes that live on the inner backbone
    @property
    def model(self) -> nn.Module:
        return self.inner.model

    @property
    def spec(self):
        return getattr(self.inner, "spec", None)

    @property
    def mean(self) -> torch.Tensor:
        return self.inner.mean

    @property
    def std(self) -> torch.Tensor:
        return self.inner.std

    def checkpoint_filter(self, state_dict, model):
        return self.inner.checkpoint_filter(state_dict, model)

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        if self.stride is None:
            return self.inner.grid_size(height, width)
        return mef_grid(height, width, None, self.stride)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if self.stride is None:
            return images
        h, w = self.grid_size(*images.shape[-2:])
        p = self.inner.patch_size
        return F.interpolate(images, size=(h * p, w * p), mode="bilinear", align_corners=False)

    def refine(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(fmap)

    def layers(
        self, images: torch.Tensor, idx: Optional[Sequence[int]] = None, norm: bool = True, return_cls: bool = False
    ) -> List[Any]:
        idx = self.default_layers if idx is None else self.inner._check_layers(idx)
        out = self.inner.layers(self._resize(images), idx, norm, return_cls)
        last = self.num_blocks - 1
        res = []
        for i, o in zip(idx, out):
            if i != last:
                res.append(o)
                continue
            fmap = o[0] if return_cls else o
            fmap = self.refine(fmap if norm else final_norm(self.inner, fmap))
            res.append((fmap, o[1]) if return_cls else fmap)
        return res

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.refine(self.inner(self._resize(images)))

    def load_weights(self, path: str | os.PathLike, source: Optional[str] = None) -> None:
        self.inner.load_weights(path, source)

    def extra_repr(self) -> str:
        return f"name={self.name}, stride={self.stride}"


# -- export -------------------------------------------------------------------------------------------
def save_head(head: nn.Conv2d, path: str | os.PathLike, stride: Optional[int] = None) -> Path:
    from bench.io import save_safetensors

    sd = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    meta = {"format": HEAD_FORMAT, "channels": str(head.in_channels), "kernel_size": "3", "stride": json.dumps(stride)}
    return save_safetensors(sd, path, metadata=meta)


def load_head(path: str | os.PathLike, channels: int) -> Tuple[nn.Conv2d, Optional[int]]:
    """A saved head -> ``(Conv2d, stride)``, strictly (every key, every shape)."""
    from safetensors import safe_open

    from bench.checkpoint import load_state_dict_strict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"MEF refinement head {path} is missing", "re-train with force=true (the cached backbone is incomplete)"
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != HEAD_FORMAT:
        raise CheckpointError(
            f"{path} is not an MEF refinement head (format {meta.get('format')!r})",
            "point at the refine_head.safetensors written beside model.safetensors",
        )
    head = refine_conv(channels)
    load_state_dict_strict(head, sd, source=f"MEF refinement head {path}")
    return head.eval(), json.loads(meta.get("stride", "null"))
