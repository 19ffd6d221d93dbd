"""Feature maps between the patch grid and the image: mask-aware upsampling, segment masks,
semantic blending, and downscaling to the student's patch grid.

Geometry: a feature map ``[h, w]`` covers the image like ``F.interpolate(align_corners=False)``
does: patch ``j`` has its centre at pixel coordinate ``(j + 0.5) / s`` where ``s`` is the feature
cells per pixel (``h / H`` for backbones that resize the image to the patch multiple, ``1 / patch``
for backbones that pad it). Pixel centres sit at +0.5 (project convention).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

UPSAMPLERS = ("mask_aware", "bilinear")
UPSAMPLE_GRIDS = ("corners", "centres")  # corners: official (align_corners=True); centres: F.interpolate default
MASKS = ("auto", "instance", "slic")  # auto: the dataset's instance maps, else SLIC superpixels


def _axis(n_out: int, n_in: int, scale: float, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps along one axis: lower/upper index, upper weight, and the patch-centre pixel index."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(0, n_in - 1)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=n_in - 1)
    centre = ((torch.arange(n_in, device=device, dtype=torch.float32) + 0.5) / scale).floor().long().clamp(0, n_out - 1)
    return i0, i1, src - i0, centre


def mask_aware_upsample(
    feats: torch.Tensor,
    masks: Optional[torch.Tensor],
    size: Tuple[int, int],
    scale: Optional[Tuple[float, float]] = None,
) -> torch.Tensor:
    """Upsample ``feats [B,C,h,w]`` to ``size=(H,W)`` with mask-aware bilinear weights.

    Each output pixel takes the bilinear weights of its 4 neighbouring patches, but a patch counts only
    if its label (the mask sampled, nearest, at the patch centre) equals the pixel's label in
    ``masks [B,H,W]``; the weights are renormalised; when all four are excluded the pixel falls back
    to plain bilinear. ``masks=None`` gives plain bilinear.

    Plain bilinear is computed for every pixel first (``F.interpolate(align_corners=False)`` for the
    default ``scale = (h/H, w/W)``); only pixels where some neighbour is excluded are recomputed.
    """
    B, C, h, w = feats.shape
    H, W = size
    sy, sx = scale if scale is not None else (h / H, w / W)
    y0, y1, wy, cy = _axis(H, h, sy, feats.device)
    x0, x1, wx, cx = _axis(W, w, sx, feats.device)
    wy, wx = wy.to(feats.dtype)[:, None], wx.to(feats.dtype)[None, :]
    taps = [(y0, x0, (1 - wy) * (1 - wx)), (y0, x1, (1 - wy) * wx), (y1, x0, wy * (1 - wx)), (y1, x1, wy * wx)]
    if scale is None or (abs(sy - h / H) < 1e-12 and abs(sx - w / W) < 1e-12):
        out = F.interpolate(feats, size=(H, W), mode="bilinear", align_corners=False)
    else:  # padded backbones: the grid does not span the image; blend the 4 taps explicitly
        out = sum(feats[:, :, yi][:, :, :, xi] * wt for yi, xi, wt in taps)
    if masks is None:
        return out
    labels_lr = masks[:, cy][:, :, cx]  # [B,h,w]
    keep = torch.stack([labels_lr[:, yi][:, :, xi] == masks for yi, xi, _ in taps])  # [4,B,H,W]
    wts = torch.stack([wt.expand(H, W) for *_, wt in taps])[:, None]  # [4,1,H,W]
    wts = torch.where(wts < 1e-6, torch.zeros_like(wts), wts)  # float noise on exact grid hits is no tap
    masked = wts * keep
    total = masked.sum(0)
    fix = (total > 0) & ((~keep) & (wts > 0)).any(0)  # some weighted neighbour is excluded
    b, yy, xx = fix.nonzero(as_tuple=True)
    if b.numel():
        norm = masked[:, b, yy, xx] / total[b, yy, xx]  # [4,N]
        val = sum(feats[b, :, yi[yy], xi[xx]] * norm[k][:, None] for k, (yi, xi, _) in enumerate(taps))
        out = _scatter_pixels(out, b, yy, xx, val)
    return out


def _scatter_pixels(out: torch.Tensor, b, yy, xx, val: torch.Tensor) -> torch.Tensor:
    """``out[b[i], :, yy[i], xx[i]] = val[i]`` (out of place)."""
    out = out.permute(0, 2, 3, 1).clone()
    out[b, yy, xx] = val.to(out.dtype)
    return out.permute(0, 3, 1, 2)


def corner_mask_aware_upsample(
    feats: torch.Tensor, masks: Optional[torch.Tensor], size: Tuple[int, int], all_excluded: str = "zero"
) -> torch.Tensor:
    """Mask-aware bilinear upsampling on the official grid (Splat-and-Distill
    ``src/model/vit/utils.py: mask_aware_bilinear_upsample_hr_mask``), for ``feats [B,C,h,w]``.

    The output pixel ``(y, x)`` sits at feature coordinate ``(y (h-1)/(H-1), x (w-1)/(W-1))`` (the
    first and last pixels on the first and last patches: ``align_corners=True``); patch ``j``'s label is
    the mask at pixel ``round(j (H-1)/(h-1))``. Each of the 4 bilinear neighbours counts only if its label
    equals the pixel's label; the kept weights are renormalised. Where all four are excluded the
    feature is zero (official; ``all_excluded="bilinear"`` falls back to plain bilinear instead).
    ``masks=None`` is plain corner-aligned bilinear.
    """
    B, C, h, w = feats.shape
    H, W = size
    dev = feats.device

    def axis(n_out: int, n_in: int):
        src = torch.linspace(0, n_in - 1, n_out, device=dev, dtype=torch.float32)
        i0 = src.floor().long().clamp(0, n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        centre = torch.linspace(0, n_out - 1, n_in, device=dev, dtype=torch.float32).round().long().clamp(0, n_out - 1)
        return i0, i1, (src - i0.float()).to(feats.dtype), centre

    y0, y1, wy, cy = axis(H, h)
    x0, x1, wx, cx = axis(W, w)
    wy, wx = wy[:, None], wx[None, :]
    taps = [(y0, x0, (1 - wy) * (1 - wx)), (y0, x1, (1 - wy) * wx), (y1, x0, wy * (1 - wx)), (y1, x1, wy * wx)]

    def tap(k: int) -> torch.Tensor:
        yi, xi, _ = taps[k]
        return feats[:, :, yi][:, :, :, xi]  # [B,C,H,W]

    def blend(weights) -> torch.Tensor:  # sum_k tap_k * w_k, one tap alive at a time (the same sums in order)
        out = tap(0).mul_(weights(0))
        for k in range(1, 4):
            out += tap(k).mul_(weights(k))
        return out

    def plain() -> torch.Tensor:
        return blend(lambda k: taps[k][2])

    if masks is None:
        return plain()
    labels_lr = masks[:, cy][:, :, cx]  # [B,h,w]
    wts = torch.stack(
        [wt.expand(B, H, W) * (labels_lr[:, yi][:, :, xi] == masks).to(feats.dtype) for yi, xi, wt in taps]
    )  # [4,B,H,W]
    total = wts.sum(0)
    wts = wts / torch.where(total == 0, torch.ones_like(total), total)
    out = blend(lambda k: wts[k][:, None])
    if all_excluded == "bilinear":
        out = torch.where((total == 0)[:, None], plain(), out)
    elif all_excluded != "zero":
        raise ValueError(f"unknown all_excluded rule '{all_excluded}' (use zero or bilinear)")
    return out


def upsample(
    feats: torch.Tensor,
    masks: Optional[torch.Tensor],
    size: Tuple[int, int],
    mode: str,
    scale: Optional[Tuple[float, float]] = None,
    grid: str = "centres",
    all_excluded: str = "bilinear",
) -> torch.Tensor:
    """Upsample patch features to the image: ``mode`` mask_aware | bilinear; ``grid`` corners
    (official, :func:`corner_mask_aware_upsample`) | centres (:func:`mask_aware_upsample`, whose
    all-excluded pixels fall back to bilinear)."""
    if mode not in UPSAMPLERS:
        raise ValueError(f"unknown upsampling '{mode}' (use one of {UPSAMPLERS})")
    if grid == "corners":
        return corner_mask_aware_upsample(feats, masks if mode == "mask_aware" else None, size, all_excluded)
    if grid != "centres":
        raise ValueError(f"unknown upsampling grid '{grid}' (use one of {UPSAMPLE_GRIDS})")
    return mask_aware_upsample(feats, masks if mode == "mask_aware" else None, size, scale)


def slic_masks(images: torch.Tensor, n_segments: int = 100, compactness: float = 10.0) -> torch.Tensor:
    """SLIC superpixels (scikit-image) of ``images [B,3,H,W]`` in [0,1] -> labels ``[B,H,W]`` int64."""
    from skimage.segmentation import slic

    out = [
        torch.from_numpy(
            np.ascontiguousarray(
                slic(
                    img.permute(1, 2, 0).detach().cpu().double().numpy(),
                    n_segments=n_segments,
                    compactness=compactness,
                    start_label=0,
                    channel_axis=-1,
                )
            ).astype(np.int64)
        )
        for img in images
    ]
    return torch.stack(out).to(images.device)


def segment_blend(
    feats: torch.Tensor, labels: torch.Tensor, alpha: float, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``alpha * F + (1 - alpha) * mean_segment(F)`` for ``feats [B,C,H,W]``, ``labels [B,H,W]``.

    The segment mean is taken over the segment's ``valid`` pixels (those a Gaussian covers, when
    given); pixels of a segment with no valid pixel keep their own feature.
    """
    B, C, H, W = feats.shape
    _, inv = torch.unique(
        labels.reshape(B, -1) + (torch.arange(B, device=labels.device) * (labels.max() + 1))[:, None],
        return_inverse=True,
    )
    inv = inv.reshape(-1)  # [B*H*W]
    n = int(inv.max()) + 1
    f = feats.permute(0, 2, 3, 1).reshape(-1, C)
    wts = (valid.reshape(-1) if valid is not None else torch.ones_like(inv, dtype=torch.bool)).to(feats.dtype)
    sums = torch.zeros(n, C, dtype=feats.dtype, device=feats.device).index_add_(0, inv, f * wts[:, None])
    counts = torch.zeros(n, dtype=feats.dtype, device=feats.device).index_add_(0, inv, wts)
    has = (counts > 0)[inv][:, None]
    means = (sums / counts.clamp_min(1.0)[:, None])[inv]
    out = torch.where(has, alpha * f + (1.0 - alpha) * means, f)
    return out.reshape(B, H, W, C).permute(0, 3, 1, 2)


def to_patch_grid(x: torch.Tensor, grid: Tuple[int, int], patch_size: int, padded: bool) -> torch.Tensor:
    """Downscale an image-resolution map ``[B,C,H,W]`` bilinearly onto the backbone's patch grid.

    For padding backbones the map is zero-padded (bottom/right) to the patch multiple first, so the
    cells line up with the features the backbone computes on its padded input.
    """
    h, w = grid
    if padded:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, w * patch_size - W, 0, h * patch_size - H))
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def to_patch_grid_nearest(x: torch.Tensor, grid: Tuple[int, int], patch_size: int, padded: bool) -> torch.Tensor:
    """Nearest downscale of ``[B,C,H,W]`` onto the patch grid (the official uncovered-cell mask)."""
    h, w = grid
    if padded:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, w * patch_size - W, 0, h * patch_size - H))
    return F.interpolate(x, size=(h, w), mode="nearest")


def grid_scale(backbone, size: Tuple[int, int]) -> Tuple[float, float]:
    """Feature cells per pixel ``(sy, sx)`` of ``backbone`` on images of ``size=(H,W)``."""
    H, W = size
    h, w = backbone.grid_size(H, W)
    if getattr(backbone, "resize_mode", "resize") == "pad":
        return 1.0 / backbone.patch_size, 1.0 / backbone.patch_size
    return h / H, w / W
