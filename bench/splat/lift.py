"""Lifting a posed view into 3D Gaussians."""

from __future__ import annotations

import torch
from torch import Tensor

from ..cameras import unproject_depth


def pixel_aligned_gaussians(
    depth: Tensor, K: Tensor, w2c: Tensor, features: Tensor, scale: float = 1.0, opacity: float = 0.99
) -> dict:
    """One isotropic Gaussian per valid pixel of a view, centred on the pixel's 3D point (the ray
    through the pixel centre at the pixel's depth).

    ``depth [H,W]`` z-depth (0 = invalid), ``K [3,3]``, ``w2c [4,4]``, ``features [H,W,D]``. The
    Gaussian's standard deviation is ``scale * depth / fx`` (``scale`` times the pixel footprint).
    Returns a dict with means, quats (identity), scales, opacities, features.
    """
    ok = depth > 0
    pts = unproject_depth(depth, K, w2c)[ok]
    s = (scale * depth[ok] / K[0, 0])[:, None].expand(-1, 3)
    quats = torch.zeros(len(pts), 4, dtype=pts.dtype, device=pts.device)
    quats[:, 0] = 1
    opacities = torch.full((len(pts),), opacity, dtype=pts.dtype, device=pts.device)
    return dict(means=pts, quats=quats, scales=s.contiguous(), opacities=opacities, features=features[ok])
