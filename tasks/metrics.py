"""Dense-prediction metrics, exactly as the anchors compute them (docs/PROTOCOLS.md).

Every depth and normals metric is computed **per image, then averaged over images**. Inputs are
batched tensors; functions return per-image values (``[B]`` tensors) so that callers can
accumulate over a dataset and average at the end (:class:`MeanMeter`). Segmentation accumulates
intersections and unions over the whole dataset (mmseg's ``IoUMetric``).

Depth (linear protocol, mmseg / Monocular-Depth-Estimation-Toolbox):
    valid = finite(gt) & gt > 0 [& gt <= max_depth] [& inside the crop];
    a_k = mean(max(gt/pred, pred/gt) < 1.25^k), abs_rel = mean(|gt-pred|/gt),
    sq_rel = mean((gt-pred)^2/gt), rmse = sqrt(mean((gt-pred)^2)),
    rmse_log = sqrt(mean((log gt - log pred)^2)), log10 = mean(|log10 gt - log10 pred|),
    silog = 100 * sqrt(mean(e^2) - mean(e)^2) with e = log pred - log gt.
Depth (Probe3D): d1..d3 and rmse, scale-aware, and scale-invariant after a per-image
least-squares fit ``s * pred + t`` to gt over valid pixels (closed-form 2x2 normal equations).
Normals: angular error in degrees; rmse, mean, median, and % of pixels within 11.25/22.5/30 deg.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

# Eigen et al. NYUv2 evaluation crop (rows 45:471, cols 41:601 of a 480x640 image) and the KITTI
# crops (Garg et al. ECCV 2016; Eigen et al. NeurIPS 2014), as fractions (top, bottom, left, right).
CROPS: Dict[str, Tuple[float, float, float, float]] = {
    "eigen": (45 / 480, 471 / 480, 41 / 640, 601 / 640),
    "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    "kitti_eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
}


def crop_mask(height: int, width: int, crop: Optional[str], device=None) -> torch.Tensor:
    """Boolean [H,W] mask of the evaluation crop (all True for ``crop=None``)."""
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    if crop in (None, "none"):
        return mask.fill_(True)
    if crop not in CROPS:
        from bench.errors import UnknownNameError

        raise UnknownNameError("depth evaluation crop", str(crop), list(CROPS) + ["none"])
    t, b, l, r = CROPS[crop]
    mask[int(t * height) : int(b * height), int(l * width) : int(r * width)] = True
    return mask


def depth_valid(
    gt: torch.Tensor,
    max_depth: Optional[float] = None,
    min_depth: float = 0.0,
    crop: Optional[str] = None,
    strict_max: bool = False,
) -> torch.Tensor:
    """Valid pixels of a [B,H,W] ground-truth depth batch: finite, > min_depth, <= max_depth, in crop.

    ``strict_max``: ``gt < max_depth`` (the depth toolbox ``eval_mask`` of FiT3D/SnD
    ``evaluation/depth/datasets/nyu.py``, ``core/evaluation/metrics.py``).
    """
    valid = torch.isfinite(gt) & (gt > min_depth)
    if max_depth is not None:
        valid &= (gt < max_depth) if strict_max else (gt <= max_depth)
    if crop not in (None, "none"):
        valid &= crop_mask(gt.shape[-2], gt.shape[-1], crop, gt.device)
    return valid


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    n = valid.sum(dim=(-2, -1))
    return torch.where(valid, x, torch.zeros_like(x)).sum(dim=(-2, -1)) / n.clamp(min=1)


def depth_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    min_pred: Optional[float] = None,
    empty_as_zero: bool = False,
) -> Dict[str, torch.Tensor]:
    """Linear-protocol depth metrics per image (``[B]`` each).

    An image with no valid pixel is dropped (the depth toolbox's ``calculate`` returns NaN for it and
    ``np.nanmean`` skips it), or with ``empty_as_zero`` kept with every metric 0 (Probe3D
    ``evaluate_depth``, whose valid count is clamped to 1). ``min_pred``: clamp the prediction from below
    first (None: as it is; the linear protocol's clamp to the head's range happens before, see
    ``test.clamp``).
    """
    pred, gt = pred.double(), gt.double()
    valid = (torch.isfinite(gt) & (gt > 0)) if valid is None else valid & torch.isfinite(gt) & (gt > 0)
    keep = valid.flatten(1).any(dim=1)
    if empty_as_zero:
        keep = torch.ones_like(keep)
    pred, gt, valid = pred[keep], gt[keep].where(valid[keep], torch.ones_like(gt[keep])), valid[keep]
    if min_pred is not None:
        pred = pred.clamp(min=min_pred)
    pred = pred.where(valid, torch.ones_like(pred))  # invalid pixels never enter a log or a ratio
    ratio = torch.maximum(gt / pred, pred / gt)
    diff = gt - pred
    e = pred.log() - gt.log()
    m = lambda x: _masked_mean(x, valid)  # noqa: E731
    out = {f"a{k}": m((ratio < 1.25**k).double()) for k in (1, 2, 3)}
    out.update(
        abs_rel=m(diff.abs() / gt),
        sq_rel=m(diff**2 / gt),
        rmse=m(diff**2).sqrt(),
        rmse_log=m(e**2).sqrt(),
        log10=m((pred.log10() - gt.log10()).abs()),
        silog=100 * (m(e**2) - m(e) ** 2).clamp(min=0).sqrt(),
    )
    return out


def fit_scale_shift(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image least-squares ``(s, t)`` minimising sum_valid (s*pred + t - gt)^2 ([B] each).

    Normal equations [[sum p^2, sum p], [sum p, n]] [s, t]^T = [sum p*g, sum g]^T solved in closed
    form; a singular system (constant prediction, < 2 pixels) keeps s = 1, t = 0.
    """
    p, g, v = pred.double(), gt.double(), valid.double()
    p, g = p * v, torch.where(valid, g, torch.zeros_like(g))
    a00, a01, a11 = (p * p).sum((-2, -1)), p.sum((-2, -1)), v.sum((-2, -1))
    b0, b1 = (p * g).sum((-2, -1)), g.sum((-2, -1))
    det = a00 * a11 - a01 * a01
    ok = det.abs() > 1e-12 * (a00 * a11).clamp(min=1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (a11 * b0 - a01 * b1) / safe, torch.ones_like(det))
    t = torch.where(ok, (a00 * b1 - a01 * b0) / safe, torch.zeros_like(det))
    return s, t


def probe3d_depth_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    scale_invariant: bool = False,
    empty_as_zero: bool = True,
) -> Dict[str, torch.Tensor]:
    """Probe3D depth metrics per image: d1, d2, d3 (threshold recalls) and rmse.

    With ``scale_invariant`` the prediction is first aligned per image by :func:`fit_scale_shift`. An image
    with no valid pixel counts with every metric 0 (``evals/utils/metrics.py::evaluate_depth`` clamps the
    valid count to 1 and averages every image); ``empty_as_zero=False`` drops it instead.
    """
    pred, gt = pred.double(), gt.double()
    valid = (torch.isfinite(gt) & (gt > 0)) if valid is None else valid & torch.isfinite(gt) & (gt > 0)
    keep = valid.flatten(1).any(dim=1)
    if empty_as_zero:
        keep = torch.ones_like(keep)
    pred, gt, valid = pred[keep], gt[keep].where(valid[keep], torch.ones_like(gt[keep])), valid[keep]
    if scale_invariant:
        s, t = fit_scale_shift(pred, gt, valid)
        pred = pred * s[:, None, None] + t[:, None, None]
    p = pred.clamp(min=1e-9)
    ratio = torch.maximum(gt / p, p / gt)
    out = {f"d{k}": _masked_mean((ratio < 1.25**k).double(), valid) for k in (1, 2, 3)}
    out["rmse"] = _masked_mean((gt - pred) ** 2, valid).sqrt()
    return out


def angular_error_deg(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between [B,3,H,W] normal maps (neither needs to be unit length): [B,H,W]."""
    cos = torch.nn.functional.cosine_similarity(pred.double(), gt.double(), dim=1, eps=1e-12)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def normals_valid(
    gt: torch.Tensor, depth: Optional[torch.Tensor] = None, max_depth: Optional[float] = None
) -> torch.Tensor:
    """Valid normals ([B,3,H,W] -> [B,H,W]).

    Without ``depth``: finite and non-zero ground truth. With ``depth`` ([B,H,W] raw metres, 0 = missing):
    ``depth > 0`` and ``depth <= max_depth`` (and a finite normal) **only** -- Probe3D ``train_snorm.py`` and
    SnD ``evaluation2/train_snorm.py`` use ``mask = depth > 0`` after the dataset zeroed depth > 10 m
    (``evals/datasets/nyu.py``: ``depth[depth > self.max_depth] = 0``), so a pixel with valid depth and a zero
    ground-truth normal counts: its cosine similarity with any prediction is 0, an error of 90 degrees in the
    metrics and ``acos(0)`` in the loss."""
    finite = torch.isfinite(gt).all(dim=1)
    if depth is None:
        return finite & (gt.abs().sum(dim=1) > 0)
    d = depth[:, 0] if depth.ndim == 4 else depth
    valid = finite & torch.isfinite(d) & (d > 0)
    if max_depth is not None:
        valid &= d <= max_depth
    return valid


def normals_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    thresholds: Sequence[float] = (11.25, 22.5, 30.0),
) -> Dict[str, torch.Tensor]:
    """Per image: angular ``rmse``, ``mean``, ``median`` (degrees) and ``a11``/``a22``/``a30`` (% within).

    The median of an even count is the mean of the two middle values (numpy's, as in Bae et al.). ``valid``
    (e.g. :func:`normals_valid` with the depth mask) is used as given: a zero ground-truth normal inside it
    counts as 90 degrees (Probe3D ``evals/utils/metrics.py::evaluate_surface_norm``); without ``valid``, the
    finite non-zero normals.
    """
    valid = normals_valid(gt) if valid is None else valid & torch.isfinite(gt).all(dim=1)
    keep = valid.flatten(1).any(dim=1)
    err, valid = angular_error_deg(pred[keep], gt[keep].nan_to_num()), valid[keep]
    out = {
        "rmse": _masked_mean(err**2, valid).sqrt(),
        "mean": _masked_mean(err, valid),
        "median": torch.stack([e[v].quantile(0.5) for e, v in zip(err, valid)]) if len(err) else err.new_zeros(0),
    }
    for th in thresholds:
        out[f"a{int(th)}"] = 100 * _masked_mean((err < th).double(), valid)
    return out


class MeanMeter:
    """Accumulates per-image metric tensors; ``result()`` averages each over all images."""

    def __init__(self, prefix: str = ""):
        self.prefix, self.sums, self.count = prefix, {}, {}

    def update(self, metrics: Mapping[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().double().flatten()
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())
            self.count[k] = self.count.get(k, 0) + v.numel()

    def result(self) -> Dict[str, float]:
        return {self.prefix + k: self.sums[k] / self.count[k] for k in self.sums if self.count[k] > 0}

    def merge(self, other: "MeanMeter") -> "MeanMeter":
        """Add the images of ``other`` (e.g. another rank's share of the test split)."""
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.count[k] = self.count.get(k, 0) + other.count[k]
        return self


class SegMeter:
    """Dataset-level confusion counts -> aAcc, mAcc, mIoU (mmseg ``IoUMetric``).

    Per class, intersection and union are summed over all images; IoU = I/U and the mean is over
    the classes *present* (union > 0, i.e. in the ground truth or the prediction; mmseg's nanmean).
    Pixels labelled ``ignore_index`` are excluded; a ground-truth id >= ``num_classes`` (not the ignore
    index) adds its pixel's prediction to that class's union, as mmseg. With ``reduce_zero_label`` the
    ground truth is remapped first (0 -> ignore, k -> k-1).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False):
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.inter = torch.zeros(num_classes, dtype=torch.float64)
        self.union = torch.zeros(num_classes, dtype=torch.float64)
        self.label = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """``pred``, ``gt``: int [B,H,W] (or [H,W]) class ids."""
        gt = gt.long()
        if self.reduce_zero_label:
            from .data import reduce_zero_label

            gt = reduce_zero_label(gt)
        # mmseg ``intersect_and_union`` (FiT3D ``mmsegmentation/mmseg/core/evaluation/metrics.py``): only
        # ``ignore_index`` pixels are dropped; ``torch.histc(min=0, max=n-1)`` then skips a ground-truth id
        # outside 0..n-1 in the label and intersection counts, but the pixel's prediction still counts,
        # i.e. it joins the predicted class's union
        keep = gt != self.ignore_index
        p, g = pred.long()[keep], gt[keep]
        n = self.num_classes
        inside = (g >= 0) & (g < n)
        hit = inside & (p == g)
        area_inter = torch.bincount(g[hit], minlength=n)[:n].double()
        p_in = p[(p >= 0) & (p < n)]
        area_pred = torch.bincount(p_in, minlength=n)[:n].double()
        area_gt = torch.bincount(g[inside], minlength=n)[:n].double()
        self.inter += area_inter
        self.union += area_pred + area_gt - area_inter
        self.label += area_gt

    def merge(self, other: "SegMeter") -> "SegMeter":
        """Add the pixel counts of ``other`` (e.g. another rank's share of the test split): exact."""
        self.inter += other.inter
        self.union += other.union
        self.label += other.label
        return self

    def per_class_iou(self) -> torch.Tensor:
        return torch.where(self.union > 0, self.inter / self.union.clamp(min=1), torch.full_like(self.union, math.nan))

    def result(self) -> Dict[str, float]:
        iou = self.per_class_iou()
        acc = torch.where(self.label > 0, self.inter / self.label.clamp(min=1), torch.full_like(self.label, math.nan))
        present = ~torch.isnan(iou)
        return {
            "mIoU": 100 * float(iou[present].mean()) if present.any() else 0.0,
            "mAcc": 100 * float(acc[~torch.isnan(acc)].mean()) if (~torch.isnan(acc)).any() else 0.0,
            "aAcc": 100 * float(self.inter.sum() / self.label.sum().clamp(min=1)),
        }


def miou(
    pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False
) -> float:
    """mIoU (%) of one batch of predictions (see :class:`SegMeter`)."""
    m = SegMeter(num_classes, ignore_index, reduce_zero_label)
    m.update(pred, gt)
    return m.result()["mIoU"]
