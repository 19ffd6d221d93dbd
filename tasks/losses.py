"""Probe losses: SigLoss, (multi-scale) gradient loss, the uncertainty-aware angular loss, cross-entropy.

Shapes: depth ``[B,H,W]`` metres with a boolean ``valid`` mask ``[B,H,W]``; normals ``[B,3,H,W]``.

- :func:`sig_loss` (AdaBins SigLoss): ``g = log(pred + eps) - log(gt + eps)`` over the valid pixels of
  the batch, ``sqrt(var(g) + 0.15 mean(g)^2)``. ``variance="unbiased"`` (the default of the linear
  protocol) is mmseg/DINOv2's ``torch.var`` (n-1, FiT3D ``evaluation/depth/models/losses/sigloss.py``);
  ``"biased"`` is Probe3D's ``mean g^2 - 0.85 mean(g)^2`` (``evals/utils/losses.py``). With ``warm_up``
  (the linear protocol's ``warm_up=True``, 100 iterations) the first calls return
  ``sqrt(0.15 mean(g)^2)``: see :class:`SigLoss`.
- :func:`mmseg_gradient_loss`: the published mmseg/DINOv2 ``GradientLoss`` exactly as it runs on the
  ``[B,1,H,W]`` tensors it receives: its ``[0:-2, :]`` / ``[:, 0:-2]`` / ``[::s, ::s]`` slices act on the
  batch and channel axes, so at 1 channel and 2 images per GPU it is identically 0 (kept to pin that
  fact; the linear protocol's default is ``grad_weight: 0``).
- :func:`gradient_loss` (MegaDepth): on ``d = (log(pred + eps) - log(gt + eps)) * valid``,
  ``sum |d[i] - d[i+2]|`` over vertical and horizontal neighbour pairs whose two pixels are both
  valid, divided by the number of valid pixels; summed over ``scales`` (the map subsampled by
  ``[::s, ::s]``). ``reduction="batch"`` (Probe3D ``evals/utils/losses.py::gradient_loss``, scales
  1, 2, 4, 6): sums and valid counts pooled over the whole batch; ``reduction="image"``: computed per
  image and averaged over the batch (the spatial gradient switch of the linear protocol).
- :func:`angular_nll_loss` (Bae et al., ICCV 2021, "AngMF" NLL): per pixel
  ``log(1 + exp(-kappa*pi)) - log(1 + kappa^2) + kappa * theta`` with ``theta`` the angle between
  prediction and ground truth, ``kappa = elu(k) + 1.01`` from the raw 4th output channel (Probe3D);
  mean over valid pixels.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

EPS = 1e-3  # inside the logs of SigLoss and the gradient loss (mmseg / DINOv2 / Probe3D)


def sig_loss(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor,
    sigma: float = 0.85,
    eps: float = EPS,
    variance: str = "biased",
    warm: bool = False,
) -> torch.Tensor:
    """Scale-invariant log loss over the valid pixels of the batch (see module docstring).

    ``warm``: the warm-up form ``sqrt((1 - sigma) mean(g)^2)`` (mmseg SigLoss before ``warm_iter``).
    """
    if not valid.any():
        return pred.sum() * 0.0
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    if warm:
        return ((1.0 - sigma) * g.mean().pow(2)).sqrt()
    if variance == "unbiased":
        var = g.var() if g.numel() > 1 else g.sum() * 0.0
        return (var + (1.0 - sigma) * g.mean().pow(2)).clamp(min=0).sqrt()
    if variance != "biased":
        raise ValueError(f"unknown SigLoss variance '{variance}' (biased | unbiased)")
    return (g.pow(2).mean() - sigma * g.mean().pow(2)).clamp(min=0).sqrt()


class SigLoss:
    """mmseg/DINOv2 ``SigLoss(warm_up=True, warm_iter=100)``: a call counter decides the warm-up form.

    The counter advances on every training call (one per iteration, as in mmseg, where the loss
    module is called once per forward); :meth:`__call__` with ``train=False`` does not count.
    """

    def __init__(
        self,
        warm_up: bool = False,
        warm_iter: int = 100,
        variance: str = "unbiased",
        sigma: float = 0.85,
        eps: float = EPS,
    ):
        self.warm_up, self.warm_iter, self.variance, self.sigma, self.eps = (
            warm_up,
            int(warm_iter),
            variance,
            sigma,
            eps,
        )
        self.counter = 0
        self.held = None  # inside iteration(): the warm-up state of every call of this iteration

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """One training iteration whose loss is computed in several calls (one per loss group, i.e. per
        GPU of the anchor, where each GPU's SigLoss counts its own iterations): every call inside sees
        the same warm-up state, and the counter advances once, even if no call is made (a rank that
        holds no group of the step)."""
        warm = bool(self.warm_up and self.counter < self.warm_iter)
        self.held = warm
        try:
            yield
        finally:
            self.held = None
            if warm:
                self.counter += 1

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, train: bool = True) -> torch.Tensor:
        if train and self.held is not None:
            warm = self.held
        else:
            warm = bool(self.warm_up and train and self.counter < self.warm_iter)
            if warm:
                self.counter += 1
        return sig_loss(pred, gt, valid, self.sigma, self.eps, self.variance, warm)


def mmseg_gradient_loss(
    pred: torch.Tensor, gt: torch.Tensor, max_depth: float | None = None, eps: float = EPS
) -> torch.Tensor:
    """The published mmseg/DINOv2 ``GradientLoss.gradientloss`` on ``[B,1,H,W]`` inputs, slice for slice.

    Its slices ``x[0:-2, :]``, ``x[:, 0:-2]`` and ``x[::2i, ::2i]`` index the batch and channel axes
    of the 4-D tensors it is given (not the image axes); scales ``[x] + [x[::2i, ::2i] for i in 1..3]``;
    each term is divided by the number of valid pixels of that (sub-)tensor.
    """
    if pred.ndim != 4:
        raise ValueError(f"mmseg_gradient_loss expects [B,1,H,W] tensors, got {tuple(pred.shape)}")
    preds = [pred] + [pred[:: 2 * i, :: 2 * i] for i in range(1, 4)]
    gts = [gt] + [gt[:: 2 * i, :: 2 * i] for i in range(1, 4)]
    total = pred.sum() * 0.0
    for p, g in zip(preds, gts):
        mask = g > 0
        if max_depth is not None:
            mask = mask & (g <= max_depth)
        n = mask.sum()
        d = (torch.log(p + eps) - torch.log(g + eps)) * mask
        v = (d[0:-2, :] - d[2:, :]).abs() * (mask[0:-2, :] * mask[2:, :])
        h = (d[:, 0:-2] - d[:, 2:]).abs() * (mask[:, 0:-2] * mask[:, 2:])
        total = total + (h.sum() + v.sum()) / n
    return total


def gradient_loss(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor,
    scales: Sequence[int] = (1,),
    eps: float = EPS,
    reduction: str = "image",
) -> torch.Tensor:
    """(Multi-scale) gradient-matching loss on log depth: per image then averaged (``reduction="image"``)
    or pooled over the batch (``"batch"``, Probe3D)."""
    if reduction not in ("image", "batch"):
        raise ValueError(f"unknown gradient-loss reduction '{reduction}' (image | batch)")
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
        if reduction == "batch":
            n = vf.sum()
            pooled = (dv.sum() + dh.sum()) / n.clamp(min=1)
            total = total + torch.where(n > 0, pooled, torch.zeros_like(pooled))
            continue
        n = vf.sum(dim=(1, 2))
        per_image = (dv.sum(dim=(1, 2)) + dh.sum(dim=(1, 2))) / n.clamp(min=1)
        total = total + torch.where(n > 0, per_image, torch.zeros_like(per_image))
    return total[0] if reduction == "batch" else total.mean()


GRAD_SLICES = ("image", "leading")


def depth_loss(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor,
    sig_weight: float,
    grad_weight: float,
    grad_scales: Sequence[int],
    grad_reduction: str,
    sig=None,
    grad_slices: str = "image",
) -> torch.Tensor:
    """``sig_weight * SigLoss + grad_weight * gradient loss`` (weights from the protocol's ``loss``).

    Linear protocol: 1, 0 (the published GradientLoss is 0 at 2 images per GPU), SigLoss with
    warm-up; Probe3D: 10, 0.5, scales (1, 2, 4, 6) pooled over the batch. ``sig`` is a
    :class:`SigLoss` (stateful warm-up) or None for the plain biased :func:`sig_loss`.

    ``grad_slices``: ``image`` -- :func:`gradient_loss` on the image axes (Probe3D since ``ac00369``, SnD
    ``evaluation2/evals/utils/losses.py``); ``leading`` -- Probe3D's first commit ``1fff822``, whose
    ``gradient_loss`` slices ``[::2i, ::2i]``, ``[0:-2, :]`` and ``[:, 0:-2]`` act on the batch and channel
    axes of its ``[B,1,H,W]`` tensors (:func:`mmseg_gradient_loss`, the same slices; ``grad_scales`` and
    ``grad_reduction`` do not apply: its scales are ``x[::2i, ::2i]``, i = 1..3, sums pooled over the
    batch). The invalid pixels (``valid`` false, e.g. gt > max_depth, which ``DepthLoss`` zeroes) enter
    as gt 0, as there.
    """
    loss = sig_weight * (sig(pred, gt, valid) if sig is not None else sig_loss(pred, gt, valid))
    if grad_weight:
        if grad_slices == "leading":
            gt0 = torch.where(valid, gt, torch.zeros_like(gt))
            loss = loss + grad_weight * mmseg_gradient_loss(pred[:, None], gt0[:, None])
        elif grad_slices == "image":
            loss = loss + grad_weight * gradient_loss(pred, gt, valid, grad_scales, reduction=grad_reduction)
        else:
            from bench.errors import UnknownNameError

            raise UnknownNameError("gradient-loss slices (task.protocol.loss.grad_slices)", grad_slices, GRAD_SLICES)
    return loss


def kappa_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Concentration ``kappa = elu(raw) + 1.01`` (>= 0.01)."""
    return F.elu(raw) + 1.01


def angular_nll_loss(
    pred: torch.Tensor, kappa: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
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


def seg_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, avg_non_ignore: bool = False
) -> torch.Tensor:
    """Cross-entropy; ignored pixels contribute 0.

    ``avg_non_ignore=False`` (mmseg ``CrossEntropyLoss`` default, FiT3D/SnD linear seg): the sum is
    divided by **all** pixels of the batch; ``True``: by the non-ignored pixels only.
    """
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    if avg_non_ignore:
        return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)
    per_pixel = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
    return per_pixel.sum() / per_pixel.numel()
