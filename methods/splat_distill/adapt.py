"""Student adaptation: LoRA through peft (merged at the end) or full fine-tuning.

``Adapter`` wraps ``backbone.model`` (a plain timm model) in place:

* ``mode: lora`` injects peft LoRA layers into the target modules (``peft.tuners.lora.LoraModel``);
  only the LoRA matrices train. :meth:`Adapter.merge` folds them into the base weights and removes
  the wrappers, so ``backbone.model.state_dict()`` is plain timm again (strict load).
* ``mode: full`` trains every backbone parameter.

LoRA targets (``target_modules``):

* ``official`` (default; also ``auto``): for ViTs the official config's ``[qkv, proj]``
  (Splat-and-Distill ``config/model/vit/dinov2{s,b}.yaml``) as PEFT matches it, i.e. every module whose
  name is or ends with ``.qkv`` / ``.proj``: on timm DINOv2 every ``blocks.i.attn.qkv``,
  ``blocks.i.attn.proj`` **and ``patch_embed.proj``** (the 14x14 patch-embedding conv, LoRA'd as a
  conv and merged into the released weights);
* ``attention``: ``attn.qkv`` and ``attn.proj`` only (``patch_embed.proj`` stays frozen);
* a list of module-name suffixes (PEFT's rule).

For EfficientNet-style CNNs (no official setting exists) both named choices give the 1x1 pointwise
convolutions ``conv_pw`` (expansion) and ``conv_pwl`` (projection) of every block -- they hold most of the weights, LoRA on a 1x1 conv is a plain low-rank
update of its matrix, and depthwise 3x3/5x5 convs (tiny, grouped) stay frozen. BatchNorm statistics
stay frozen in both modes (the student runs its norm layers in eval mode; batches are small).

:meth:`Adapter.effective_state` gives the student's *effective* weights in the plain timm layout
(``W + scale * B A`` for LoRA layers, the parameter itself otherwise) for the EMA teacher, which is
a plain (merged) copy of the backbone: the teacher is the EMA of the student's function weights.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn

from bench.errors import BenchError

MODES = ("lora", "full")
VIT_TARGETS = ("attn.qkv", "attn.proj")
OFFICIAL_VIT_TARGETS = ("qkv", "proj")
CNN_TARGETS = ("conv_pw", "conv_pwl")
TARGET_CHOICES = ("official", "auto", "attention")


def default_targets(model: nn.Module, choice: str = "official") -> List[str]:
    if choice not in TARGET_CHOICES:
        raise BenchError(
            f"method.adapter.target_modules='{choice}' is not a target choice",
            f"use one of {TARGET_CHOICES} or a list of module-name suffixes",
        )
    names = {n for n, _ in model.named_modules()}
    if any(n.endswith("attn.qkv") for n in names):
        return list(VIT_TARGETS if choice == "attention" else OFFICIAL_VIT_TARGETS)
    if any(n.endswith("conv_pw") or n.endswith("conv_pwl") for n in names):
        return list(CNN_TARGETS)
    raise BenchError(
        f"no default LoRA targets for {type(model).__name__}",
        "set method.adapter.target_modules to a list of module-name suffixes, or method.adapter.mode=full",
    )


class Adapter:
    def __init__(
        self,
        model: nn.Module,
        mode: str = "lora",
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.1,
        target_modules: Sequence[str] | str = "auto",
    ):
        if mode not in MODES:
            raise BenchError(f"method.adapter.mode='{mode}' is not an adaptation mode", f"use one of {MODES}")
        self.model, self.mode = model, mode
        self._lora = None
        self._orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        if mode == "full":
            model.requires_grad_(True)
            return
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        if target_modules is None or isinstance(target_modules, str):
            targets = default_targets(model, str(target_modules or "official"))
        else:
            targets = list(target_modules)
        config = LoraConfig(
            r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets, bias="none"
        )
        try:
            self._lora = LoraModel(model, config, "default")  # injects in place, freezes the base
        except ValueError as e:
            raise BenchError(
                f"cannot apply LoRA to {type(model).__name__}: {e}",
                "set method.adapter.target_modules to module-name suffixes that exist "
                "(e.g. attn.qkv), or method.adapter.mode=full",
            ) from None

    def lora_layers(self) -> Dict[str, nn.Module]:
        return lora_layers(self.model)

    def adapted_weights(self) -> Dict[str, torch.Tensor]:
        """The weights this adapter changes, in the plain layout (``<module>.weight`` for LoRA layers,
        every trainable parameter in full mode): the base of the relative-weight-change diagnostic."""
        return {k: v.detach().clone() for k, v in self.effective_state().items()}

    def parameters(self) -> List[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self) -> None:
        """Train mode (LoRA dropout on) with every norm layer kept in eval mode."""
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    @torch.no_grad()
    def effective_state(self) -> Dict[str, torch.Tensor]:
        """Trainable weights as the plain model sees them (timm keys), for the EMA teacher."""
        if self._lora is None:
            return {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return effective_lora_weights(self.model)

    def merge(self) -> nn.Module:
        """Fold LoRA into the base weights, drop the wrappers, restore ``requires_grad``; returns the model."""
        if self._lora is not None:
            self._lora.merge_and_unload()
            self._lora = None
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._orig_requires_grad.get(n, False))
        return self.model

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd, strict=True)


def lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def effective_lora_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``W + scale * B A`` of every LoRA layer of ``model`` under its plain (merged) key ``<module>.weight``."""
    out = {}
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        out[f"{name}.weight"] = base.weight + layer.get_delta_weight("default").to(base.weight.dtype)
    return out


def plain_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of a (possibly LoRA-injected) model in the plain timm layout, LoRA folded in.
    Works on a copy of the keys; ``model`` is not modified."""
    layers = lora_layers(model)
    if not layers:
        return dict(model.state_dict())
    eff = effective_lora_weights(model)
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k or "lora_embedding" in k or "lora_magnitude" in k:
            continue
        k2 = k.replace(".base_layer.", ".")
        out[k2] = eff.get(k2, v)
    return out
