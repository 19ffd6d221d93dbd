"""MEF's LoRA through peft: rank-4 updates of the query and value projections of the last 4 blocks.

Official (qq456cvb/3DCorrEnhance ``finetune.py`` + ``utils/model.py`` ``_LoRA_qkv``): the DINOv2 is
frozen; for each of ``blocks[-4:]`` the fused ``attn.qkv`` Linear gets two rank-``r`` (r=4) updates,
``q += B_q A_q x`` (output rows ``0:C``) and ``v += B_v A_v x`` (rows ``2C:3C``); no scaling, no
dropout, ``A`` Kaiming-uniform (a=sqrt 5), ``B`` zero.

peft can only adapt whole modules, so each ``attn.qkv`` gets one peft LoRA of rank ``2r`` (``alpha =
2r``: scale 1) whose ``B [3C, 2r]`` is block-structured by a fixed gradient mask::

    B = [[B_q, 0], [0, 0], [0, B_v]]   A = [A_q; A_v]   ->   B A = [B_q A_q; 0; B_v A_v]

``B`` starts at zero and the masked entries never receive a gradient, so they stay exactly zero under
AdamW (zero gradient and zero weight: zero update, zero decay): the update is exactly the official
``q``/``v`` pair and peft's ``merge_and_unload`` folds it into the timm ``qkv`` weight. peft's default
``A`` init is the official one (Kaiming-uniform, a=sqrt 5, fan-in C for either shape).

On CNN backbones (EfficientNet-Lite0, tiny_cnn), which have no attention, the same budget goes to the
1x1 convolutions ``conv_pw``/``conv_pwl`` of the last 4 blocks of the feature path (the modules
splat_distill adapts, :mod:`methods.splat_distill.adapt`), rank ``r``, scale 1.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from bench.errors import BenchError


def last_blocks(model: nn.Module, n: int) -> List[str]:
    """Module names of the last ``n`` blocks: ``blocks.<i>`` (ViT) or ``blocks.<stage>.<i>`` (EfficientNet)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise BenchError(f"{type(model).__name__} has no .blocks", "MEF adapts timm ViTs and EfficientNets")
    names: List[str] = []
    for i, blk in enumerate(blocks):
        if isinstance(blk, nn.Sequential) and len(blk) and not hasattr(blk, "attn"):
            names += [f"blocks.{i}.{j}" for j in range(len(blk))]
        else:
            names.append(f"blocks.{i}")
    return names[-int(n) :]


def lora_targets(model: nn.Module, n_blocks: int) -> Dict[str, str]:
    """``module name -> kind`` (``qkv`` or ``conv``) of the modules MEF adapts."""
    modules = dict(model.named_modules())
    out: Dict[str, str] = {}
    for blk in last_blocks(model, n_blocks):
        if f"{blk}.attn.qkv" in modules:
            out[f"{blk}.attn.qkv"] = "qkv"
        else:
            out.update({f"{blk}.{c}": "conv" for c in ("conv_pw", "conv_pwl") if f"{blk}.{c}" in modules})
    if not out:
        raise BenchError(
            f"no MEF LoRA targets in the last {n_blocks} blocks of {type(model).__name__}",
            "MEF adapts attn.qkv (ViTs) or conv_pw/conv_pwl (EfficientNets)",
        )
    return out


class QVLoRA:
    """Inject MEF's LoRA into ``model`` (a plain timm model) in place; see the module docstring."""

    def __init__(self, model: nn.Module, r: int = 4, blocks: int = 4, qv_only: bool = True):
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        self.model, self.r = model, int(r)
        self.targets = lora_targets(model, blocks)
        model.requires_grad_(False)
        qkv = [n for n, k in self.targets.items() if k == "qkv"]
        conv = [n for n, k in self.targets.items() if k == "conv"]
        self._hooks = []
        if qkv and conv:
            raise BenchError("MEF LoRA targets mix attention and convolution modules", "use a ViT or a CNN backbone")
        rank = 2 * self.r if (qkv and qv_only) else self.r  # alpha = rank: scale 1, as the official
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=qkv or conv, bias="none")
        self._lora = LoraModel(model, config, "default")
        self.masks: Dict[str, torch.Tensor] = {}
        if qv_only:
            for name in qkv:
                layer = self.model.get_submodule(name)
                B = layer.lora_B["default"].weight  # [3C, 2r]
                C = B.shape[0] // 3
                mask = torch.zeros_like(B)
                mask[:C, : self.r] = 1.0
                mask[2 * C :, self.r :] = 1.0
                self.masks[name] = mask
                self._hooks.append(B.register_hook(lambda g, m=mask: g * m.to(g)))
        for name in self.targets:
            layer = self.model.get_submodule(name)
            assert abs(layer.scaling["default"] - 1.0) < 1e-12, layer.scaling

    def layers(self) -> Dict[str, nn.Module]:
        return {n: self.model.get_submodule(n) for n in self.targets}

    def parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def train(self) -> None:
        """Train mode, with every BatchNorm kept in eval mode (frozen statistics, batch 1)."""
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def merge(self) -> nn.Module:
        """Fold the updates into the base weights and remove the wrappers: a plain timm model again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._lora is not None:
            self._lora.merge_and_unload()
            self._lora = None
        self.model.requires_grad_(False)
        return self.model


def merge_official_lora(
    model: nn.Module, w_as: Sequence[torch.Tensor], w_bs: Sequence[torch.Tensor], blocks: int = 4
) -> None:
    """Fold the official checkpoint's ``w_a_XXX``/``w_b_XXX`` pairs into ``model``'s ``attn.qkv``:
    pair ``2k`` is the query and ``2k+1`` the value update of block ``len(blocks) - blocks + k``."""
    names = [n for n in last_blocks(model, blocks)]
    if len(w_as) != 2 * len(names) or len(w_bs) != 2 * len(names):
        raise ValueError(f"expected {2 * len(names)} LoRA pairs, got {len(w_as)} A / {len(w_bs)} B")
    with torch.no_grad():
        for k, blk in enumerate(names):
            qkv = model.get_submodule(f"{blk}.attn.qkv")
            C = qkv.in_features
            for j, rows in ((2 * k, slice(0, C)), (2 * k + 1, slice(2 * C, 3 * C))):
                A, B = w_as[j].to(qkv.weight), w_bs[j].to(qkv.weight)
                if A.shape[1] != C or B.shape[0] != C or A.shape[0] != B.shape[1]:
                    raise ValueError(
                        f"LoRA pair {j:03d} has shapes A {tuple(A.shape)}, B {tuple(B.shape)}; "
                        f"expected A [r, {C}] and B [{C}, r]"
                    )
                qkv.weight[rows] += B @ A
