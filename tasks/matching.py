"""Training-free dense matching and correspondence metrics (Probe3D's protocols).

Matching: features are L2-normalised; for every query its two nearest neighbours among the
references by cosine distance ``d = 1 - cos`` are found with a chunked matrix product (no faiss;
at most ``chunk_elems`` similarities live at once, so memory is bounded for any number of points);
each query gets Lowe's ratio ``r = d1 / d2`` and the weight ``1 - r`` (higher = more distinctive);
optionally queries with ``r > max_ratio`` are rejected (classic Lowe test; Probe3D does not); the
``num`` queries of highest weight are kept, best first.

Metrics: recall = percentage of matches whose error is below a threshold, pooled over all matches of
all pairs; per-pair recall averaged within bins of the pairs' relative rotation; PCK for keypoint
transfer.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: default bound on the number of similarities held at once (64 MiB of float32)
CHUNK_ELEMS = 1 << 24


# ----------------------------------------------------------------------------------- matching
def nn2(query: Tensor, ref: Tensor, chunk_elems: int = CHUNK_ELEMS) -> Tuple[Tensor, Tensor]:
    """Two nearest references of every query by cosine distance.

    Args: ``query [N,C]``, ``ref [M,C]`` (any scale; normalised here).
    Returns: ``dist [N,2]`` (``1 - cos``, ascending) and ``idx [N,2]``. With a single reference the
    second neighbour is a virtual one at the maximal distance 2 (the ratio test then passes).
    """
    if ref.shape[0] == 0:
        raise ValueError("nn2: no reference features to match against")
    q = F.normalize(query.float(), dim=-1)
    r = F.normalize(ref.float(), dim=-1)
    N, M = q.shape[0], r.shape[0]
    k = min(2, M)
    rows = max(1, int(chunk_elems) // M)
    sims, idxs = [], []
    for s in range(0, N, rows):
        v, i = (q[s : s + rows] @ r.T).topk(k, dim=1)
        sims.append(v)
        idxs.append(i)
    sim = torch.cat(sims) if sims else q.new_zeros(0, k)
    idx = torch.cat(idxs) if idxs else torch.zeros(0, k, dtype=torch.long, device=q.device)
    dist = (1.0 - sim).clamp_min(0.0)
    if k == 1:
        dist = torch.cat([dist, torch.full_like(dist, 2.0)], 1)
        idx = torch.cat([idx, idx], 1)
    return dist, idx


def ratio_weights(dist: Tensor, eps: float = 1e-9) -> Tensor:
    """``1 - d1 / d2`` from ``dist [N,2]`` (Probe3D's ``calculate_ratio_test``)."""
    d = dist.clamp_min(eps)
    return 1.0 - d[:, 0] / d[:, 1]


def match_ratio_topk(
    feat_a: Tensor,
    feat_b: Tensor,
    num: Optional[int] = 1000,
    max_ratio: Optional[float] = None,
    chunk_elems: int = CHUNK_ELEMS,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Match ``feat_a [N,C]`` to ``feat_b [M,C]``: 2-NN + ratio weight, keep the top ``num``.

    Returns ``(idx_a, idx_b, weight)``, each ``[k]``, sorted by decreasing weight (``k <= num``).
    """
    dist, idx = nn2(feat_a, feat_b, chunk_elems)
    w = ratio_weights(dist)
    keep = torch.arange(w.shape[0], device=w.device)
    if max_ratio is not None:
        keep = keep[(1.0 - w) <= max_ratio]
    k = keep.numel() if num is None else min(int(num), keep.numel())
    top, order = w[keep].topk(k)
    ia = keep[order]
    return ia, idx[ia, 0], top


# ----------------------------------------------------------------------------------- features
def feature_extent(backbone, H: int, W: int, pad: Optional[str] = None) -> Tuple[float, float]:
    """The input-image extent (pixels) over which features are sampled: the image itself when the
    backbone resizes to the patch multiple, and with ``pad="center"`` (Probe3D: the map of the centre-padded
    canvas is spread over the image, ``sample_pointcloud_features`` / ``interpolate`` to the xyz grid); the
    padded canvas when the backbone itself pads (bottom/right)."""
    if pad == "center":
        return float(H), float(W)
    if getattr(backbone, "resize_mode", "resize") == "pad" and hasattr(backbone, "grid_size"):
        h, w = backbone.grid_size(H, W)
        return float(h * backbone.patch_size), float(w * backbone.patch_size)
    return float(H), float(W)


def sample_features(feats: Tensor, uv: Tensor, extent: Tuple[float, float], mode: str = "bilinear") -> Tensor:
    """Sample ``feats [C,h,w]`` at continuous image coordinates ``uv [N,2]`` (pixels, +0.5 centres)
    where the map covers ``extent = (H, W)`` pixels. Returns ``[N,C]``."""
    Hx, Wx = extent
    grid = torch.stack([2 * uv[:, 0] / Wx - 1, 2 * uv[:, 1] / Hx - 1], -1).to(feats.dtype)
    out = F.grid_sample(feats[None], grid[None, None], mode=mode, padding_mode="border", align_corners=False)
    return out[0, :, 0].T


def center_pad_offsets(H: int, W: int, patch: int) -> Tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` zero-padding to the patch multiple, as Probe3D's ``center_padding``
    (``evals/models/utils.py``, :func:`bench.backbones.base.pad_2d` mode ``center_probe3d``): no padding
    when both sides are multiples, else ``patch - size % patch`` on **each** axis, so an axis that is
    already a multiple gets a whole extra patch (448x640 -> 462x644, 476x480 -> 490x490); top = pad // 2."""
    from bench.backbones.base import pad_2d

    top, bottom, left, right = pad_2d(H, W, patch, "center_probe3d")
    return left, right, top, bottom


def center_pad(backbone, images: Tensor) -> Tensor:
    """Pad [0,1] images centrally to the backbone's patch multiple with its mean colour, which its input
    normalisation maps to exactly 0: Probe3D's zero padding after normalisation."""
    p = int(getattr(backbone, "patch_size", 1))
    left, right, top, bottom = center_pad_offsets(*images.shape[-2:], p)
    if left == right == top == bottom == 0:
        return images
    mean = getattr(backbone, "mean", None)
    mean = images.new_zeros(1, 3, 1, 1) if mean is None else mean.to(images).reshape(1, 3, 1, 1)
    out = mean.expand(images.shape[0], 3, images.shape[-2] + top + bottom, images.shape[-1] + left + right).clone()
    out[..., top : top + images.shape[-2], left : left + images.shape[-1]] = images
    return out


def extract_features(
    backbone,
    images: Tensor,
    layers: Optional[Sequence[int]] = None,
    input_norm: Optional[Sequence[float]] = None,
    final_norm: bool = True,
    pad: Optional[str] = None,
) -> Tensor:
    """Dense features ``[B,C,h,w]`` of images in [0,1].

    ``layers``: None = the backbone's last layer, else the listed blocks concatenated along channels.
    ``final_norm``: apply the final LayerNorm (DINOv2 ``x_norm_patchtokens``); Probe3D's DINO wrapper
    (``evals/models/dino.py``) returns the last block's tokens *without* it. ``pad="center"``: pad the
    image centrally to the patch multiple (Probe3D ``center_padding``) instead of letting the backbone
    resize. ``input_norm = (mean, std)``: make the network see ``(x - mean) / std`` instead of its own
    normalisation (Probe3D's ScanNet protocol uses 0.5 / 0.5); since the backbone normalises internally,
    the image is remapped to ``m_b + s_b (x - mean) / std`` first.
    """
    if input_norm is not None:
        mean, std = float(input_norm[0]), float(input_norm[1])
        mb = getattr(backbone, "mean", None)
        sb = getattr(backbone, "std", None)
        if mb is None or sb is None:
            raise ValueError("protocol.input_norm needs a backbone exposing its mean/std buffers")
        images = mb.to(images) + sb.to(images) * (images - mean) / std
    if pad == "center":
        images = center_pad(backbone, images)
    elif pad is not None:
        raise ValueError(f"protocol.pad={pad!r}: use center or null")
    if layers is None and final_norm:
        return backbone(images)
    idx = [-1] if layers is None else list(layers)
    return torch.cat(list(backbone.layers(images, idx, norm=bool(final_norm))), dim=1)


# ----------------------------------------------------------------------------------- metrics
def recalls(err: Tensor, thresholds: Sequence[float]) -> List[float]:
    """Percentage of ``err`` below each threshold (non-finite errors count as misses)."""
    if err.numel() == 0:
        return [float("nan")] * len(thresholds)
    return [100.0 * (err < t).float().mean().item() for t in thresholds]


def binned_means(values: Tensor, keys: Tensor, edges: Sequence[float]) -> List[Tuple[float, float, float, int]]:
    """Mean of ``values`` within ``[edges[i], edges[i+1])`` of ``keys``: ``(lo, hi, mean, count)``;
    the mean is NaN for an empty bin."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (keys >= lo) & (keys < hi)
        n = int(m.sum())
        out.append((float(lo), float(hi), values[m].float().mean().item() if n else float("nan"), n))
    return out


def _num(x: float) -> str:
    return f"{x:g}"


def rotation_binned(per_pair: Tensor, angles_deg: Tensor, edges: Sequence[float], name: str) -> Dict[str, float]:
    """``{<name>_rot<lo>_<hi>: mean}`` over the pairs of each rotation bin (percent in, percent out)
    and ``pairs_rot<lo>_<hi>`` counts; empty bins are left out of the means."""
    out: Dict[str, float] = {}
    for lo, hi, mean, n in binned_means(per_pair, angles_deg, edges):
        tag = f"rot{_num(lo)}_{_num(hi)}"
        out[f"pairs_{tag}"] = float(n)
        if n:
            out[f"{name}_{tag}"] = mean
    return out


def pck_hits(pred: Tensor, gt: Tensor, bbox: Tensor, alpha: float = 0.1) -> Tensor:
    """Keypoints transferred within ``alpha`` x the longer side of ``bbox = (l, t, r, b)``: ``[N]`` bool."""
    side = torch.maximum(bbox[2] - bbox[0], bbox[3] - bbox[1])
    return (pred - gt).norm(dim=-1) < alpha * side
