"""Official released checkpoints as methods: ``method=snd_official`` and ``method=fit3d_official``.

No training: :meth:`OfficialCheckpoint.fit` fetches the released file through :mod:`bench.hub`
(cache, ``HF_HUB_OFFLINE``, ``hf://`` references, clear errors), maps its keys into the
backbone's timm model and loads it with strict key checking. Facts about the releases
(read from the authors' code; see docs/METHOD.md):

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from bench.checkpoint import StateDict, load_state_dict_strict, read_state_dict
from bench.errors import BenchError, CheckpointError, what_is_at
from bench.registry import METHOD_SCHEMAS, METHODS, OFFICIAL_ADAPTERS
from bench.safe_pickle import PickleRefused, load_torch
from bench.schema import REQ, file_input


# ------------------------------------------------------------------ config schemas (bench.schema)
@METHOD_SCHEMAS.register("fit3d_official", "keys of method=fit3d_official")
@dataclass
class OfficialMethod:
    """A released checkpoint loaded into the backbone (no training)."""

    name: str = REQ
    variant: str = REQ
    repo: str = REQ
    revision: Optional[str] = REQ
    checkpoint: Optional[str] = file_input()


@METHOD_SCHEMAS.register("snd_official", "keys of method=snd_official")
@dataclass
class SnDOfficialMethod(OfficialMethod):
    blending: bool = REQ
    per_task: Dict[str, Any] = REQ


@METHOD_SCHEMAS.register("mef_official", "keys of method=mef_official")
@dataclass
class MEFOfficialMethod(OfficialMethod):
    export_stride: Optional[int] = REQ


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
    return {
        "width": width,
        "depth": (max(blocks) + 1) if blocks else None,
        "registers": int(regs.shape[1]) if regs is not None else 0,
    }


def check_architecture(sd: Mapping[str, torch.Tensor], backbone, source: str) -> None:
    """Fail clearly when ``sd`` was made for another ViT than ``backbone`` (e.g. ViT-B vs ViT-S)."""
    got = describe(sd)
    model = backbone.model
    want = {
        "width": int(backbone.embed_dim),
        "depth": int(backbone.num_blocks),
        "registers": int(getattr(model, "num_reg_tokens", 0) or 0),
    }
    diff = [f"{k} {got[k]} (backbone: {want[k]})" for k in want if got[k] is not None and got[k] != want[k]]
    if diff:
        raise CheckpointError(
            f"{source} was made for another architecture than backbone '{backbone.name}': " + ", ".join(diff),
            "pick the backbone the checkpoint was trained with (ViT-S/14: backbone=dinov2_vits14, 384 ch; "
            "ViT-B/14: backbone=dinov2_vitb14, 768 ch; 4 registers: *_reg), or the matching method.variant",
        )


def load_official(backbone, sd: StateDict, source: str) -> None:
    """Strip wrappers, check the architecture, map to timm layout, load strictly into ``backbone.model``."""
    sd = strip_wrappers(sd)
    check_architecture(sd, backbone, source)
    load_state_dict_strict(
        backbone.model, sd, source=source, key_map=lambda s: backbone.checkpoint_filter(s, backbone.model)
    )


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
        name, want = str(cfg.method.name), str(cfg.method.variant or "auto")
        backbone = str(cfg.backbone.name)
        if want == "auto":
            for v, b in self.variants.items():
                if b == backbone:
                    return v
            raise BenchError(
                f"method={name} has released checkpoints for backbones {', '.join(self.variants.values())}, "
                f"not '{backbone}'",
                "choose one of those backbones, or give a matching file with method.checkpoint=<path or hf://>",
            )
        if want not in self.variants:
            raise BenchError(
                f"method.variant='{want}' is not a {name} release", f"use one of: auto, {', '.join(self.variants)}"
            )
        if self.variants[want] != backbone:
            raise BenchError(
                f"method={name} variant '{want}' is a checkpoint for backbone={self.variants[want]}, "
                f"but backbone={backbone} is configured",
                f"add backbone={self.variants[want]}, or set method.variant=auto",
            )
        return want

    def reference(self, cfg) -> Tuple[str, Dict[str, Any]]:
        """The checkpoint to load (local path or hf:// reference) and its provenance for the record."""
        m = cfg.method
        if m.checkpoint:
            return str(m.checkpoint), {"checkpoint": str(m.checkpoint)}
        variant = self.variant(cfg)
        repo, fname, rev = str(m.repo or self.repo), self.filename(variant, cfg), m.revision
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


@METHODS.register(
    "snd_official",
    "official Splat-and-Distill checkpoints (david-shavin/SnD), ViT-S/B, with/without blending; no training",
)
class SnDOfficial(OfficialCheckpoint):
    repo = "david-shavin/SnD"
    variants = {"small": "dinov2_vits14", "base": "dinov2_vitb14"}

    def filename(self, variant: str, cfg) -> str:
        return f"dinov2_{variant}_snd{'' if cfg.method.blending else '_no_blending'}.pth"


@METHODS.register(
    "fit3d_official",
    "official FiT3D fine-tuned DINOv2 checkpoints (yuanwenyue/FiT3D), ViT-S/B, ViT-S+registers; no training",
)
class FiT3DOfficial(OfficialCheckpoint):
    repo = "yuanwenyue/FiT3D"
    variants = {"small": "dinov2_vits14", "base": "dinov2_vitb14", "reg_small": "dinov2_vits14_reg"}

    def filename(self, variant: str, cfg) -> str:
        return f"dinov2_{variant}_finetuned.pth"


# -- MEF (3DCorrEnhance) ------------------------------------------------------------------------------
MEF_LIGHTNING_KEYS = (
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "loops",
    "callbacks",
    "optimizer_states",
    "lr_schedulers",
    "hparams_name",
    "hyper_parameters",
    "hparams_type",
    "datamodule_hparams_name",
    "datamodule_hyper_parameters",
    "MixedPrecisionPlugin",
    "NativeMixedPrecisionPlugin",
)
_MEF_LORA_KEY = re.compile(r"^w_([ab])_(\d{3})$")


def read_mef_checkpoint(path: Path, source: str) -> Dict[str, Any]:
    """MEF's Lightning checkpoint -> ``{"refine": {weight, bias}, "A": [...], "B": [...]}``, strictly.

    Layout (``finetune.py`` ``on_save_checkpoint``): ``state_dict = {"refine_conv": Conv2d state}``
    (nested, not flat) and top-level ``w_a_000 .. w_a_{2n-1}`` ``[r, C]`` / ``w_b_000 ..`` ``[C, r]``
    (pair ``2k`` = query, ``2k+1`` = value of block ``k`` of the last ``n``), beside Lightning's own
    bookkeeping (epoch, optimizer_states, ...), which is ignored. Any other tensor, a missing or
    unpaired index, or extra/missing conv keys is an error."""
    try:
        ck = load_torch(path)  # Lightning bookkeeping objects are skipped, never run (bench/safe_pickle.py)
    except PickleRefused as e:
        raise CheckpointError(
            f"cannot read {source}: {e}",
            "pass MEF's released .ckpt (e.g. hf://qq456cvb/3DCorrEnhance/dinov2_base.ckpt)",
        ) from None
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict):
        raise CheckpointError(
            f"{source} is not an MEF checkpoint (no 'state_dict' dict)",
            "pass MEF's released .ckpt (a PyTorch Lightning checkpoint)",
        )
    sd = ck["state_dict"]
    if set(sd) != {"refine_conv"} or not isinstance(sd["refine_conv"], dict):
        raise CheckpointError(
            f"{source}: state_dict holds {sorted(sd)} instead of exactly ['refine_conv']",
            "this is not an MEF (3DCorrEnhance) checkpoint; use method.checkpoint=<MEF .ckpt>",
        )
    refine = dict(sd["refine_conv"])
    if set(refine) != {"weight", "bias"}:
        raise CheckpointError(
            f"{source}: refine_conv has keys {sorted(refine)}, expected ['bias', 'weight']",
            "re-download the checkpoint",
        )
    pairs: Dict[str, Dict[int, torch.Tensor]] = {"a": {}, "b": {}}
    for k, v in ck.items():
        m = _MEF_LORA_KEY.match(str(k))
        if m:
            pairs[m.group(1)][int(m.group(2))] = v
        elif torch.is_tensor(v):
            raise CheckpointError(
                f"{source}: unexpected tensor '{k}' at the top level", "this is not an MEF (3DCorrEnhance) checkpoint"
            )
        elif k not in MEF_LIGHTNING_KEYS and k != "state_dict":
            raise CheckpointError(f"{source}: unexpected entry '{k}'", "this is not an MEF (3DCorrEnhance) checkpoint")
    n = len(pairs["a"])
    if n == 0 or set(pairs["a"]) != set(range(n)) or set(pairs["b"]) != set(range(n)) or n % 2:
        raise CheckpointError(
            f"{source}: LoRA entries w_a {sorted(pairs['a'])} / w_b {sorted(pairs['b'])} are "
            "not complete q/v pairs 000..2n-1",
            "re-download the checkpoint",
        )
    return {"refine": refine, "A": [pairs["a"][i] for i in range(n)], "B": [pairs["b"][i] for i in range(n)]}


@METHODS.register(
    "mef_official",
    "official MEF checkpoints (qq456cvb/3DCorrEnhance), DINOv2 S/B/L/g with and "
    "without registers: q/v LoRA merged + refinement conv head; no training",
)
class MEFOfficial(OfficialCheckpoint):
    """MEF's released ``dinov2_<size>.ckpt`` / ``dinov2_reg_<size>.ckpt`` (Hub ``qq456cvb/3DCorrEnhance``).

    The checkpoint holds only the LoRA pairs and the refinement conv; the base is the configured
    backbone's pretrained DINOv2 (MEF loads ``torch.hub`` ``dinov2_vit*14[_reg]``; bench's
    ``dinov2_vit*14[_reg]`` backbones are those weights in timm layout). The pairs are merged into the
    last blocks' ``attn.qkv`` (:func:`methods.mef.adapt.merge_official_lora`) and the conv becomes the
    feature head (:class:`methods.mef.head.RefinedBackbone`): :mod:`methods.mef.official`, reached through the
    declared hook :data:`bench.registry.OFFICIAL_ADAPTERS`."""

    repo = "qq456cvb/3DCorrEnhance"
    variants = {
        "small": "dinov2_vits14",
        "base": "dinov2_vitb14",
        "large": "dinov2_vitl14",
        "giant": "dinov2_vitg14",
        "reg_small": "dinov2_vits14_reg",
        "reg_base": "dinov2_vitb14_reg",
        "reg_large": "dinov2_vitl14_reg",
        "reg_giant": "dinov2_vitg14_reg",
    }

    def filename(self, variant: str, cfg) -> str:
        return f"dinov2_{variant}.ckpt"

    def fit(self, backbone, cfg, workdir: Path):
        ref, info = self.reference(cfg)
        path = Path(ref)
        if ref.startswith("hf://"):
            from bench.hub import parse_hf_path, resolve_hf_path

            path = resolve_hf_path(ref)
            if "snapshots" in path.parts:
                info["commit"] = path.parts[path.parts.index("snapshots") + 1]
            info.setdefault("repo", parse_hf_path(ref)[0])
        source = f"method={cfg.method.name} checkpoint {ref}"
        if not path.is_file():
            raise CheckpointError(
                f"{source}: {path} {what_is_at(path, 'file')}", "pass an existing file or hf://org/repo/file"
            )
        ck = read_mef_checkpoint(path, source)
        blocks = len(ck["A"]) // 2
        if blocks > backbone.num_blocks:
            raise CheckpointError(
                f"{source} adapts {blocks} blocks; backbone '{backbone.name}' has {backbone.num_blocks}",
                "pick the backbone the checkpoint was trained for (method.variant)",
            )
        self.checkpoint_ref = {"kind": "official", **info, "lora_blocks": blocks, "lora_rank": int(ck["A"][0].shape[0])}
        stride = cfg.method.export_stride
        adapt = OFFICIAL_ADAPTERS.get("mef")  # methods/mef/official.py (the declared hook: no method import here)
        return adapt(backbone.eval(), ck, blocks, source, stride=int(stride) if stride else None)
