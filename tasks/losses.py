"""Probe losses: SigLoss, (multi-scale) gradient loss, the uncertainty-aware angular loss, cross-entropy.

Shapes: depth ``[B,H,W]`` metres with a boolean ``valid`` mask ``[B,H,W]``; normals ``[B,3,H,W]``.

- :func:`sig_loss` (AdaBins / mmseg SigLoss): ``g = log(pred + eps) - log(gt + eps)`` over the valid
  pixels of the batch, ``sqrt(mean g^2 - 0.85 mean(g)^2)``.
- :func:`gradient_loss` (MegaDepth): on ``d = (log(pred + eps) - log(gt + eps)) * valid``,
  ``sum |d[i] - d[i+2]|`` over vertical and horizontal neighbour pairs whose two pixels are both
  valid, divided by the image's number of valid pixels; summed over ``scales`` (the map subsampled
  by ``[::s, ::s]``); **computed per image** and averaged over the batch. Probe3D's multi-scale
  variant uses scales (1, 2, 4, 6); the original code sliced and differenced the batch dimension of
  a ``[B,1,H,W]`` tensor (mixing images) -- here the spatial axes are always the last two.
- :func:`angular_nll_loss` (Bae et al., ICCV 2021, "AngMF" NLL): per pixel
  ``log(1 + exp(-kappa*pi)) - log(1 + kappa^2) + kappa * theta`` with ``theta`` the angle between
  prediction and ground truth, ``kappa = elu(k) + 1.01`` from the raw 4th output channel (Probe3D);
  mean over valid pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-3  # inside the logs of SigLoss and the gradient loss (mmseg / DINOv2 / Probe3D)


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, sigma: float = 0.85,
             eps: float = EPS) -> torch.Tensor:
    """Scale-invariant log loss over the valid pixels of the batch (see module docstring)."""
    if not valid.any():
        return pred.sum() * 0.0
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    return (g.pow(2).mean() - sigma * g.mean().pow(2)).clamp(min=0).sqrt()


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, scales: Sequence[int] = (1,),
                  eps: float = EPS) -> torch.Tensor:
    """Per-image (multi-scale) gradient-matching loss on log depth, averaged over the batch."""
    if pred.ndim != 3:
        raise ValueError(f"gradient_loss expects [B,H,W] maps, got {tuple(pred.shape)}")
    total = pred.new_zeros(pred.shape[0])
    for s in scales:
        p, g, v = pred[:, ::s, ::s], gt[:, ::s, ::s], valid[:, ::s, ::s]
        vf = v.to(p.dtype)
        d = (torch.log(p + eps) - torch.log(g.clamp(min=0) + eps)) * vf
        d = torch.where(v, d, torch.zeros_like(d))  # no NaN/inf leaks from invalid pixels
        dv = (d[:, :-2, :] - d[:, 2:, :]).abs() * (vf[:, :-2, :] * vf[:, 2:, :])
        dh = (d[:, :, :-2] - d[:, :, 2:]).abs() * (vf[:, :, :-2] * vf[:, :, 2:])
        n = vf.sum(dim=(1, 2))
        per_image = (dv.sum(dim=(1, 2)) + dh.sum(dim=(1, 2))) / n.clamp(min=1)
        total = total + torch.where(n > 0, per_image, torch.zeros_like(per_image))
    return total.mean()


def depth_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, sig_weight: float = 1.0,
               grad_weight: float = 0.5, grad_scales: Sequence[int] = (1,)) -> torch.Tensor:
    """``sig_weight * SigLoss + grad_weight * gradient loss`` (linear: 1, 0.5, (1,); Probe3D: 10, 0.5, (1,2,4,6))."""
    loss = sig_weight * sig_loss(pred, gt, valid)
    if grad_weight:
        loss = loss + grad_weight * gradient_loss(pred, gt, valid, grad_scales)
    return loss


def kappa_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Concentration ``kappa = elu(raw) + 1.01`` (>= 0.01)."""
    return F.elu(raw) + 1.01


def angular_nll_loss(pred: torch.Tensor, kappa: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
                     eps: float = 1e-4) -> torch.Tensor:
    """Bae et al.'s uncertainty-aware angular loss, mean over valid pixels.

    ``pred`` [B,3,H,W] (any length), ``kappa`` [B,H,W] > 0, ``gt`` [B,3,H,W], ``valid`` [B,H,W].
    """
    if not valid.any():
        return pred.sum() * 0.0 + kappa.sum() * 0.0
    cos = F.cosine_similarity(pred, gt, dim=1).clamp(-1 + eps, 1 - eps)
    theta = torch.acos(cos)
    nll = torch.log1p(torch.exp(-kappa * math.pi)) - torch.log1p(kappa.pow(2)) + kappa * theta
    return nll[valid].mean()


def angular_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Plain angular loss (radians), mean over valid pixels (no uncertainty)."""
    cos = F.cosine_similarity(pred, gt, dim=1).clamp(-1 + eps, 1 - eps)
    return torch.acos(cos)[valid].mean() if valid.any() else pred.sum() * 0.0


def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy over pixels whose label is not ``ignore_index`` (mean over those pixels)."""
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)
