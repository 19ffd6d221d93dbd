"""Official released checkpoints as methods: ``method=snd_official`` and ``method=fit3d_official``.

No training: :meth:`OfficialCheckpoint.fit` fetches the released file through :mod:`bench.hub`
(cache, ``HF_HUB_OFFLINE``, ``hf://`` references, clear errors), maps its keys into the
backbone's timm model and loads it with strict key checking. Facts about the releases
(read from the authors' code; see ../shared/docs/METHOD.md):

* **Splat and Distill** (Hub ``david-shavin/SnD``): ``dinov2_{small,base}_snd.pth`` (trained with
  semantic blending; for single-view tasks) and ``dinov2_{small,base}_snd_no_blending.pth``
  (for correspondence). Each is ``state_dict()`` of the torch.hub DINOv2 model (``dinov2_vits14``
  / ``dinov2_vitb14``) after merging LoRA, i.e. the *official DINOv2 layout*: timm names plus
  ``mask_token``. The authors load it into timm ``vit_{small,base}_patch14_dinov2.lvd142m`` with
  ``strict=False``; here the official->timm map drops ``mask_token`` and everything else must match.
* **FiT3D** (Hub ``yuanwenyue/FiT3D``): ``dinov2_small_finetuned.pth``, ``dinov2_base_finetuned.pth``
  and ``dinov2_reg_small_finetuned.pth``, flat state dicts in *timm layout* for
  ``vit_{small,base}_patch14_dinov2.lvd142m`` / ``vit_small_patch14_reg4_dinov2.lvd142m`` built with
  ``num_classes=0`` (their hubconf loads them strictly).

Wrapper prefixes (``module.``, ``model.``, ``backbone.``, ...) are stripped; the official DINOv2
layout is mapped by the backbone family's filter (:func:`bench.backbones.dinov2_official_to_timm`).
The configured backbone must be the architecture the checkpoint was made for (checked by name
for the released files, and by tensor shapes for any file), with an error that says which.
FiT3D's evaluation protocol (original + fine-tuned features concatenated) is a task-protocol
switch (``concat_original``), available for these methods like for any other.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from bench.checkpoint import StateDict, load_state_dict_strict, read_state_dict
from bench.errors import BenchError, CheckpointError
from bench.registry import METHODS

PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "teacher.", "student.")


def strip_wrappers(sd: StateDict) -> StateDict:
    """Remove wrapper prefixes shared by every key (repeatedly: ``module.backbone.`` -> '')."""
    from bench.backbones import strip_prefix

    return strip_prefix(dict(sd), PREFIXES)


def describe(sd: Mapping[str, torch.Tensor]) -> Dict[str, Optional[int]]:
    """Architecture of a DINOv2-style ViT state dict (official or timm layout): width, depth, registers."""
    width = None
    for key in ("cls_token", "patch_embed.proj.bias", "norm.weight"):
        if key in sd:
            width = int(sd[key].shape[-1] if key == "cls_token" else sd[key].shape[0])
            break
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(?:\d+\.)?(\d+)\.", k)] if m}
    regs = sd.get("register_tokens", sd.get("reg_token"))
    return {"width": width, "depth": (max(blocks) + 1) if blocks else None,
            "registers": int(regs.shape[1]) if regs is not None else 0}


def check_architecture(sd: Mapping[str, torch.Tensor], backbone, source: str) -> None:
    """Fail clearly when ``sd`` was made for another ViT than ``backbone`` (e.g. ViT-B vs ViT-S)."""
    got = describe(sd)
    model = backbone.model
    want = {"width": int(backbone.embed_dim), "depth": int(backbone.num_blocks),
            "registers": int(getattr(model, "num_reg_tokens", 0) or 0)}
    diff = [f"{k} {got[k]} (backbone: {want[k]})" for k in want if got[k] is not None and got[k] != want[k]]
    if diff:
        raise CheckpointError(
            f"{source} was made for another architecture than backbone '{backbone.name}': " + ", ".join(diff),
            "pick the backbone the checkpoint was trained with (ViT-S/14: backbone=dinov2_vits14, 384 ch; "
            "ViT-B/14: backbone=dinov2_vitb14, 768 ch; 4 registers: *_reg), or the matching method.variant")


def load_official(backbone, sd: StateDict, source: str) -> None:
    """Strip wrappers, check the architecture, map to timm layout, load strictly into ``backbone.model``."""
    sd = strip_wrappers(sd)
    check_architecture(sd, backbone, source)
    load_state_dict_strict(backbone.model, sd, source=source,
                           key_map=lambda s: backbone.checkpoint_filter(s, backbone.model))


class OfficialCheckpoint:
    """A released checkpoint as a method (no training). Subclasses set :attr:`repo` and name files.

    Config (``cfg.method``): ``variant`` (``auto`` = from the backbone name), ``repo``,
    ``revision`` (pin a branch/tag/commit), ``checkpoint`` (a local file or ``hf://`` reference
    that replaces the released file), plus the subclass's own keys.
    """

    trains = False
    repo: str = ""
    variants: Dict[str, str] = {}  # variant -> backbone config name it belongs to

    def __init__(self) -> None:
        self.checkpoint_ref: Dict[str, Any] = {}

    def filename(self, variant: str, cfg) -> str:
        raise NotImplementedError

    def variant(self, cfg) -> str:
        name, want = str(cfg.method.name), str(cfg.method.get("variant", "auto") or "auto")
        backbone = str(cfg.backbone.name)
        if want == "auto":
            for v, b in self.variants.items():
                if b == backbone:
                    return v
            raise BenchError(
                f"method={name} has released checkpoints for backbones {', '.join(self.variants.values())}, "
                f"not '{backbone}'",
                "choose one of those backbones, or give a matching file with method.checkpoint=<path or hf://>")
        if want not in self.variants:
            raise BenchError(f"method.variant='{want}' is not a {name} release",
                             f"use one of: auto, {', '.join(self.variants)}")
        if self.variants[want] != backbone:
            raise BenchError(f"method={name} variant '{want}' is a checkpoint for backbone={self.variants[want]}, "
                             f"but backbone={backbone} is configured",
                             f"add backbone={self.variants[want]}, or set method.variant=auto")
        return want

    def reference(self, cfg) -> Tuple[str, Dict[str, Any]]:
        """The checkpoint to load (local path or hf:// reference) and its provenance for the record."""
        m = cfg.method
        if m.get("checkpoint"):
            return str(m.checkpoint), {"checkpoint": str(m.checkpoint)}
        variant = self.variant(cfg)
        repo, fname, rev = str(m.get("repo") or self.repo), self.filename(variant, cfg), m.get("revision")
        ref = f"hf://{repo}/{fname}" + (f"@{rev}" if rev else "")
        return ref, {"checkpoint": ref, "repo": repo, "file": fname, "revision": rev, "variant": variant}

    def fit(self, backbone, cfg, workdir: Path):
        ref, info = self.reference(cfg)
        path = Path(ref)
        if ref.startswith("hf://"):
            from bench.hub import parse_hf_path, resolve_hf_path

            path = resolve_hf_path(ref)
            if "snapshots" in path.parts:  # <cache>/models--org--name/snapshots/<commit>/<file>
                info["commit"] = path.parts[path.parts.index("snapshots") + 1]
            info.setdefault("repo", parse_hf_path(ref)[0])
        load_official(backbone, read_state_dict(path), source=f"method={cfg.method.name} checkpoint {ref}")
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.checkpoint_ref = {"kind": "official", **info}
        return backbone.eval()


@METHODS.register("snd_official", "official Splat-and-Distill checkpoints (david-shavin/SnD), ViT-S/B, "
                                  "with/without blending; no training")
class SnDOfficial(OfficialCheckpoint):
    repo = "david-shavin/SnD"
    variants = {"small": "dinov2_vits14", "base": "dinov2_vitb14"}

    def filename(self, variant: str, cfg) -> str:
        return f"dinov2_{variant}_snd{'' if cfg.method.get('blending', True) else '_no_blending'}.pth"


@METHODS.register("fit3d_official", "official FiT3D fine-tuned DINOv2 checkpoints (yuanwenyue/FiT3D), "
                                    "ViT-S/B, ViT-S+registers; no training")
class FiT3DOfficial(OfficialCheckpoint):
    repo = "yuanwenyue/FiT3D"
    variants = {"small": "dinov2_vits14", "base": "dinov2_vitb14", "reg_small": "dinov2_vits14_reg"}

    def filename(self, variant: str, cfg) -> str:
        return f"dinov2_{variant}_finetuned.pth"
