"""Training-side diagnostics of any fine-tuning method: does it change the backbone, and how?

Used by Splat-and-Distill and FiT3D (``method.diagnostics``), written to the training log and to
the trained backbone's ``train_info.json`` (``diagnostics``):

* ``adapted_weight_change``: ``||W_end - W_start|| / ||W_start||`` over the adapted weights only
  (LoRA: the effective ``W + BA`` of the LoRA layers; full fine-tuning: every parameter, never the
  BatchNorm buffers, which would dominate a whole-state-dict norm);
* ``feature_change`` on held-out views: mean over views of ``||f_end - f_start|| / ||f_start||``
  of the patch features, and ``feature_1_minus_cos`` (mean over cells of ``1 - cos``);
* multi-view consistency on held-out view pairs with ground-truth correspondence (from depth and
  cameras, occlusion-tested): the centred cosine (features minus the pair's mean feature) between a
  pixel of view a and its corresponding pixel in view b (``corr_cos``), the same for a random pixel of
  b (``random_cos``), and ``consistency_gap = corr_cos - random_cos``, before and after training.
* from the training history, the curves the method names (``finish(curves=)``; first / last tenth of the
  steps, ``<key>_first`` / ``<key>_last``): the loss; Splat-and-Distill's KL part of the distillation
  cross-entropy and the collapse diagnostics of the DINO head (each the global batch's over ranks):
  ``head_cos`` (mean pairwise cosine of the head's bottleneck
  embeddings), ``student/teacher_usage_entropy`` (entropy of the batch-mean softmax over prototypes),
  ``student/teacher_argmax_entropy`` (entropy of the argmax-prototype histogram: 0 = collapse) and
  ``agreement`` (fraction of covered cells whose student and teacher argmax prototypes agree);
  :func:`methods.splat_distill.head.collapse_stats`.

The held-out views come from a synthetic set of its own (``diagnostics.data``; generator seed and
rooms distinct from training and from the tasks), resized like the training views.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .cameras import dense_correspondence


log = logging.getLogger("bench")


def relative_change(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """``sqrt(sum ||a - b||^2) / sqrt(sum ||b||^2)`` over the keys of ``before``."""
    num = sum(float((after[k].detach().float().cpu() - v.float().cpu()).pow(2).sum()) for k, v in before.items())
    den = sum(float(v.float().pow(2).sum()) for v in before.values())
    return (num / den) ** 0.5 if den > 0 else float("nan")


def trainable_weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of every floating parameter of ``model`` (no buffers)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}


def open_held_out(diag: Mapping[str, Any], size, data_dir) -> Optional[Dict[str, Any]]:
    """The held-out views: ``{"views": [dict per scene], "pairs": [(scene_idx, a, b)]}``, or None."""
    if not diag or not diag["enabled"]:
        return None
    from .data.multiview import open_scenes

    d = dict(diag["data"] or {})
    d.setdefault("dataset", "synthetic")
    d.setdefault("root", None)
    d.setdefault("size", list(size))
    data = open_scenes(d, data_dir)
    views, pairs = [], []
    gap = int(diag["gap"])
    for s, sid in enumerate(data.scene_ids):
        n = data.num_views(sid)
        v = data.load_views(sid, list(range(n)))
        if "depth" not in v:
            log.warning("diagnostics: scene %s has no depth; skipping the consistency measure", sid)
        views.append(v)
        pairs += [(s, i, i + gap) for i in range(0, n - gap, max(gap, 1))]
    return {"views": views, "pairs": pairs[: int(diag["pairs"])]}


@torch.no_grad()
def features(backbone, held: Mapping[str, Any], device) -> List[torch.Tensor]:
    was = backbone.training
    backbone.eval()
    out = [backbone(v["images"].to(device)).float().cpu() for v in held["views"]]
    backbone.train(was)
    return out


def _sample(feat: torch.Tensor, uv: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Bilinear sample of a ``[C,h,w]`` map (covering the ``H x W`` image) at pixels ``uv [N,2]``."""
    g = torch.stack([uv[:, 0] / W * 2 - 1, uv[:, 1] / H * 2 - 1], -1)[None, None]
    return F.grid_sample(feat[None], g.to(feat.dtype), mode="bilinear", align_corners=False)[0, :, 0].t()


def consistency(
    feats: List[torch.Tensor], held: Mapping[str, Any], points: int = 256, seed: int = 0
) -> Dict[str, float]:
    """Centred cosine at ground-truth corresponding pixels vs random pixels, over the held-out pairs."""
    gen = torch.Generator().manual_seed(seed)
    cc, rc = [], []
    for s, a, b in held["pairs"]:
        v = held["views"][s]
        if "depth" not in v:
            continue
        H, W = v["images"].shape[-2:]
        uv, ok = dense_correspondence(v["depth"][a], v["K"][a], v["w2c"][a], v["depth"][b], v["K"][b], v["w2c"][b])
        idx = ok.reshape(-1).nonzero()[:, 0]
        if idx.numel() == 0:
            continue
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:points]]
        ys, xs = idx // W, idx % W
        uv_a = torch.stack([xs.float() + 0.5, ys.float() + 0.5], -1)
        uv_b = uv.reshape(-1, 2)[idx].float()
        uv_r = torch.stack([torch.rand(idx.numel(), generator=gen) * W, torch.rand(idx.numel(), generator=gen) * H], -1)
        fa, fb = feats[s][a], feats[s][b]
        mean = torch.cat([fa.flatten(1), fb.flatten(1)], 1).mean(1)[:, None, None]
        fa, fb = fa - mean, fb - mean
        za = _sample(fa, uv_a, H, W)
        cc.append(F.cosine_similarity(za, _sample(fb, uv_b, H, W), dim=-1))
        rc.append(F.cosine_similarity(za, _sample(fb, uv_r, H, W), dim=-1))
    if not cc:
        return {}
    c, r = float(torch.cat(cc).mean()), float(torch.cat(rc).mean())
    return {"corr_cos": c, "random_cos": r, "consistency_gap": c - r}


def feature_change(before: List[torch.Tensor], after: List[torch.Tensor]) -> Dict[str, float]:
    rel, cos = [], []
    for b, a in zip(before, after):
        rel.append(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-12)))
        cos.append(1 - F.cosine_similarity(a, b, dim=1).flatten())
    return {"feature_change": float(torch.cat(rel).mean()), "feature_1_minus_cos": float(torch.cat(cos).mean())}


class Diagnostics:
    """Snapshot before training (:meth:`start`), measure after (:meth:`finish`)."""

    def __init__(self, cfg_method, size, data_dir, device):
        diag = cfg_method.get("diagnostics") if hasattr(cfg_method, "get") else None  # optional (MEF has none)
        self.held = open_held_out(diag, size, data_dir) if diag is not None else None
        self.device = device
        self.points = int(diag["points"]) if diag is not None else 0
        self.before_feats: Optional[List[torch.Tensor]] = None
        self.before_weights: Optional[Dict[str, torch.Tensor]] = None
        self.result: Dict[str, Any] = {}

    def start(self, backbone, weights: Mapping[str, torch.Tensor]) -> None:
        self.before_weights = {k: v.detach().clone().cpu() for k, v in weights.items()}
        if self.held is not None:
            self.before_feats = features(backbone, self.held, self.device)
            self.result["before"] = consistency(self.before_feats, self.held, self.points)

    def finish(
        self,
        backbone,
        weights: Mapping[str, torch.Tensor],
        history: Optional[List[dict]] = None,
        curves: Sequence[str] = ("loss",),
    ) -> Dict[str, Any]:
        """The measures after training; ``curves``: keys of the training ``history`` whose first and last
        tenth are summarised as ``<key>_first`` / ``<key>_last`` (a method names its own: SnD's kl, head_cos
        and collapse diagnostics)."""
        out = self.result
        if self.before_weights is not None:
            out["adapted_weight_change"] = relative_change(self.before_weights, weights)
            out["adapted_tensors"] = len(self.before_weights)
        if self.held is not None and self.before_feats is not None:
            after = features(backbone, self.held, self.device)
            out.update(feature_change(self.before_feats, after))
            out["after"] = consistency(after, self.held, self.points)
            out["held_out"] = {
                "scenes": len(self.held["views"]),
                "pairs": len(self.held["pairs"]),
                "views": sum(int(v["images"].shape[0]) for v in self.held["views"]),
            }
        if history:
            for key in curves:
                vals = [h[key] for h in history if key in h]
                if vals:
                    k = max(1, len(vals) // 10)
                    out[f"{key}_first"] = sum(vals[:k]) / k
                    out[f"{key}_last"] = sum(vals[-k:]) / k
        log.info("diagnostics: %s", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()})
        return out


__all__ = ["Diagnostics", "relative_change", "consistency", "feature_change", "trainable_weights"]
