"""Dense all-pairs reference splatting: every Gaussian x every pixel, gsplat 1.5.3's rules, plain autograd.

Deliberately naive and self-contained (it shares no code with the tiled engine) so that tests can
compare the two. Memory is O(pixels x Gaussians) per camera: use it on small scenes only.

Rules, as in gsplat's projection and ``rasterize_to_pixels_3dgs_fwd`` kernels:
Gaussians with camera ``z`` outside ``[near, far]`` or opacity < 1/255 are dropped; the 2D covariance is
``J W Sigma W^T J^T + eps2d I`` with the Jacobian at the mean, its ``x/z``, ``y/z`` clamped to the
frustum widened by 30 % of the half field of view; at pixel centre ``p`` (integer index + 0.5),
``alpha = min(0.999, opacity * exp(-0.5 (p - mu)^T Cov^-1 (p - mu)))``. Front to back (stable order of
camera z), a Gaussian with ``alpha < 1/255`` is skipped; the pixel stops at the first Gaussian after
which the transmittance would be ``<= 1e-4``, and that Gaussian and everything behind it are not
composited. Outputs: features ``sum w_i f_i``, alpha ``1 - T``, depth ``sum w_i z_i / max(alpha, 1e-10)``
(gsplat's "ED" render mode), with ``w_i = alpha_i T_i``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _rotation(q: Tensor) -> Tensor:
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def rasterize_dense(
    means: Tensor,
    quats: Optional[Tensor],
    scales: Optional[Tensor],
    opacities: Tensor,
    features: Tensor,
    w2c: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
    covars: Optional[Tensor] = None,
):
    """Same contract as :func:`bench.splat.rasterize`; one camera at a time, all pairs at once."""
    if covars is None:
        R = _rotation(quats)
        cov3 = R @ torch.diag_embed(scales**2) @ R.transpose(-1, -2)  # [N,3,3]
    else:
        cov3 = covars
    v, u = torch.meshgrid(
        torch.arange(height, dtype=means.dtype), torch.arange(width, dtype=means.dtype), indexing="ij"
    )
    pix = torch.stack([u, v], -1).reshape(-1, 2).to(means.device) + 0.5  # [P,2] pixel centres
    feats, alphas, depths = [], [], []
    for c in range(w2c.shape[0]):
        pc = means @ w2c[c, :3, :3].T + w2c[c, :3, 3]  # [N,3] camera frame
        keep = (pc[:, 2] >= near) & (pc[:, 2] <= far) & (opacities >= 1 / 255)
        idx = torch.nonzero(keep)[:, 0]
        idx = idx[torch.argsort(pc[idx, 2], stable=True)]  # front to back
        x, y, z = pc[idx].unbind(-1)
        fx, fy, cx, cy = K[c, 0, 0], K[c, 1, 1], K[c, 0, 2], K[c, 1, 2]
        mu = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)  # [G,2]
        tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
        xz = torch.clamp(x / z, -(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x)
        yz = torch.clamp(y / z, -(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y)
        J = torch.zeros(len(idx), 2, 3, dtype=means.dtype, device=means.device)
        J[:, 0, 0], J[:, 0, 2] = fx / z, -fx * xz / z
        J[:, 1, 1], J[:, 1, 2] = fy / z, -fy * yz / z
        W = w2c[c, :3, :3]
        cov2 = J @ W @ cov3[idx] @ W.T @ J.transpose(-1, -2) + eps2d * torch.eye(
            2, dtype=means.dtype, device=means.device
        )
        inv = torch.linalg.inv(cov2)  # [G,2,2]
        dx, dy = pix[:, :1] - mu[:, 0], pix[:, 1:] - mu[:, 1]  # [P,G] offsets from the means
        maha = inv[:, 0, 0] * dx * dx + (inv[:, 0, 1] + inv[:, 1, 0]) * dx * dy + inv[:, 1, 1] * dy * dy
        alpha = torch.clamp(opacities[idx] * torch.exp(-0.5 * maha), max=0.999)
        candidate = (maha >= 0) & (alpha >= 1 / 255)
        a = torch.where(candidate, alpha, torch.zeros_like(alpha))  # skipped: T unchanged
        T_after = torch.cumprod(1 - a, dim=-1)
        T_before = torch.cat([torch.ones_like(a[:, :1]), T_after[:, :-1]], -1)
        stopped = torch.cummax((candidate & (T_after <= 1e-4)).int(), dim=-1).values.bool()
        w = torch.where(candidate & ~stopped, a * T_before, torch.zeros_like(a))  # [P,G]
        alpha_px = w.sum(-1)
        feats.append((w @ features[idx]).reshape(height, width, -1))
        alphas.append(alpha_px.reshape(height, width))
        depths.append(((w @ z) / alpha_px.clamp(min=1e-10)).reshape(height, width))
    return torch.stack(feats), torch.stack(alphas), torch.stack(depths)
