"""The official Splat-and-Distill rules, the named deviations from them, and the reconstructor input check.

The defaults of ``bench/conf/method/splat_distill.yaml`` are the official trainer's rules
(github davidshavin4/Splat-and-Distill, commit 4a31521); :data:`OFFICIAL` lists every switch that has an
official value, with the file it comes from. :func:`deviations` names the switches of a config that differ
(a record lists them as ``method_deviations``), e.g. the CPU recipes' depth reconstructor and alpha coverage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping

from bench.errors import BenchError, CheckpointError, what_is_at

# key under ``method.`` -> (official value, where the official code has it)
OFFICIAL: Dict[str, tuple] = {
    "views.order": ("epoch", "src/dataset/dataset_scannetpp.py: a dataset of scenes, DataLoader shuffle=True"),
    "views.contiguous": (True, "src/dataset/dataset_scannetpp.py __getitem__: redraw when frame numbers skip"),
    "views.keep_bad": (True, "src/dataset/dataset_scannetpp.py: frames flagged is_bad are kept"),
    "views.last_batch": (
        "smaller",
        "src/dataset/data_module.py: DataLoader(drop_last=False), an epoch's last step smaller",
    ),
    "reconstructor.name": ("mvsplat", "src/model/encoder/encoder_costvolume.py (MVSplat's encoder, frozen)"),
    "lift.coverage": ("rgb", "src/model/model_wrapper.py: err_masks = (output.color == 0).all(dim=2)"),
    "lift.feature_covariance": ("official", "src/ludvig/ludvig.py: eigenvalues as scales, det < 0 frames -> identity"),
    "lift.resize": ("official", "src/model/vit/dinov2.py extract_features: floor multiple of 14, bilinear"),
    "lift.upsample": ("mask_aware", "src/model/vit/utils.py mask_aware_bilinear_upsample_hr_mask"),
    "lift.upsample_grid": ("corners", "src/model/vit/utils.py: align_corners=True grid"),
    "lift.all_excluded": ("zero", "src/model/vit/utils.py: zero where all four neighbours are excluded"),
    "lift.uncovered": ("zero_fill", "src/model/model_wrapper.py: masked_fill(err_masks, 0) of both sides"),
    "lift.normalize_alpha": (False, "src/ludvig/ludvig.py: the render is used as is"),
    "lift.blend_segments": ("all", "src/model/vit/utils.py blend_with_mask: means over every segment pixel"),
    "loss": ("dino", "src/model/vit/dinov2.py training_step: DINO-head cross-entropy"),
    "teacher.frozen": (False, "src/model/vit/dinov2.py update_teacher: EMA teacher"),
    "teacher.ema": ("lora_factors", "src/model/vit/dinov2.py update_teacher: every LoRA factor"),
    "teacher.dropout": (True, "Lightning runs the wrapper, teacher included, in train mode"),
    "head.prototype_init": ("linear", "src/model/vit/dinov2.py DINOHead: last layer built after apply(_init_weights)"),
    "head.train_gain": (True, "src/model/vit/dinov2.py: weight-norm gain of the last layer trains"),
    "adapter.mode": ("lora", "src/model/vit/dinov2.py: PEFT LoRA"),
    "adapter.target_modules": ("official", "src/model/vit/dinov2.py: target_modules=[qkv, proj]"),
    "optim.grad_clip": (None, "main.py passes no gradient_clip_val"),
}
# the CPU recipes' named deviations (bench/conf/method_recipe/splat_distill_<recipe>.yaml) as overrides: the
# dataset's depth instead of MVSplat, alpha coverage, the true covariances in the feature splat (used by `bench perf train` and the tests)
CPU_DEVIATIONS = [
    "method.reconstructor.name=depth",
    "method.lift.coverage=alpha",
    "method.lift.feature_covariance=true_covariance",
    "method.head.prototype_init=trunc_normal",
    "method.views.order=uniform",
    "method.views.contiguous=false",
    "method.views.keep_bad=false",
    "method.views.last_batch=carry",
]
# checkpoints: where each reconstructor's file comes from (the preflight error says it)
CHECKPOINT_SOURCES = {
    "mvsplat": (
        "MVSplat's re10k.ckpt release (github donydchen/mvsplat, README 'pretrained models'), or a ScanNet++ "
        "fine-tuning of it as the paper ran (its weights were never released; docs/methods/mvsplat.md)"
    ),
    "learned": "the file `python -m bench pretrain-reconstructor` wrote (<cache_dir>/reconstructors/cost_volume.safetensors)",
}


def _get(node: Mapping[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(node, Mapping) or k not in node:
            return KeyError
        node = node[k]
    return node


def deviations(method: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The switches of ``method`` (``cfg.method`` as a dict) whose value differs from the official rule:
    ``[{"id": "reconstructor.name=depth", "key": "method.reconstructor.name", "official": "mvsplat",
    "value": "depth", "anchor": ...}, ...]`` in :data:`OFFICIAL`'s order (absent keys are skipped)."""
    out = []
    for key, (official, anchor) in OFFICIAL.items():
        v = _get(method, key)
        if v is KeyError or v == official:
            continue
        shown = "null" if v is None else str(v).lower() if isinstance(v, bool) else v
        out.append({"id": f"{key}={shown}", "key": f"method.{key}", "official": official, "value": v, "anchor": anchor})
    return out


def resolve_checkpoint(ref: Any) -> Path:
    """A reconstructor checkpoint reference (a path or ``hf://org/repo/file[@rev]``) -> a local file."""
    ref = str(ref)
    if ref.startswith("hf://"):
        from bench.hub import resolve_hf_path

        return resolve_hf_path(ref)
    return Path(ref).expanduser()


def check_reconstructor(rec: Mapping[str, Any]) -> None:
    """``method.reconstructor``: mvsplat and learned need a checkpoint (a file that exists, or an ``hf://``
    ref, whose existence :func:`bench.preflight.check_inputs` checks). One error naming where it comes from."""
    name = str(rec.get("name"))
    if name not in CHECKPOINT_SOURCES:
        return
    ckpt = rec.get("checkpoint")
    how = f"pass method.reconstructor.checkpoint=/path/to/file or =hf://org/repo/file; it is {CHECKPOINT_SOURCES[name]}"
    if name == "mvsplat":
        how += " (or run without MVSplat: method.reconstructor.name=depth, a named deviation)"
    if ckpt in (None, ""):
        raise CheckpointError(f"method.reconstructor.name={name} needs a checkpoint and none is given", how)
    if not str(ckpt).startswith("hf://") and not Path(str(ckpt)).expanduser().is_file():
        where = Path(str(ckpt)).expanduser()
        raise CheckpointError(f"method.reconstructor.checkpoint {ckpt}: {where} {what_is_at(where, 'file')}", how)


def check_inputs(cfg: Any) -> None:
    """Preflight of a Splat-and-Distill cell (before any work): the reconstructor's checkpoint."""
    from bench.config import to_container

    m = to_container(cfg.method)
    if not isinstance(m.get("reconstructor"), Mapping):
        raise BenchError("method.reconstructor is missing", "compose the config with method=splat_distill")
    check_reconstructor(m["reconstructor"])
