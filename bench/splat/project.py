"""EWA projection of 3D Gaussians into pinhole cameras, following gsplat 1.5.3 exactly.

Rules (gsplat ``ProjectionEWA3DGSFused.cu`` / ``Utils.cuh``):

* covariance ``R S S^T R^T`` from the normalised wxyz quaternion and the scales;
* camera-space mean ``w2c @ mean``; Gaussians with ``z < near`` or ``z > far`` are culled;
* 2D covariance ``J W Sigma W^T J^T`` with the perspective Jacobian ``J`` evaluated at the mean whose
  ``x/z``, ``y/z`` are clamped to the frustum widened by 30 % of the half field of view
  (``(width - cx) / fx + 0.3 * tan_fovx`` etc.);
* ``eps2d`` is added to the 2D covariance diagonal; ``det <= 0`` culls; the conic is its inverse;
* opacity-aware bounding box: ``extend = min(3.33, sqrt(2 log(opacity / (1/255))))`` sigmas,
  ``radius = ceil(extend * sqrt(cov2d_ii))`` per axis (this culls nothing whose alpha could reach
  1/255); Gaussians with opacity < 1/255 or a box entirely outside the image are culled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..cameras import quat_to_rotmat

ALPHA_THRESHOLD = 1.0 / 255.0  # alphas below this are skipped
ALPHA_MAX = 0.999  # alpha cap
T_MIN = 1e-4  # a pixel stops before the Gaussian that would bring T to <= T_MIN


@dataclass
class Projected:
    """Per camera and Gaussian ([C,N,...]). Entries where ``valid`` is False are finite garbage."""

    mean2d: Tensor  # [C,N,2] pixels
    conic: Tensor  # [C,N,3] inverse 2D covariance (a, b, c): sigma = .5(a dx^2 + c dy^2) + b dx dy
    depth: Tensor  # [C,N] camera z
    radius: Tensor  # [C,N,2] bounding-box half sizes in pixels (float, integral values)
    valid: Tensor  # [C,N] bool


def project(
    means: Tensor,
    quats: Optional[Tensor],
    scales: Optional[Tensor],
    opacities: Tensor,
    w2c: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
    covars: Optional[Tensor] = None,
) -> Projected:
    """Project N Gaussians into C cameras (differentiable w.r.t. the Gaussians; culling is not).
    ``covars [N,3,3]`` (world covariances) replaces ``quats`` / ``scales`` when given."""
    if covars is None:
        R = quat_to_rotmat(quats)
        M = R * scales[:, None, :]
        cov = M @ M.transpose(-1, -2)  # [N,3,3]
    else:
        cov = covars
    Rw, t = w2c[:, None, :3, :3], w2c[:, None, :3, 3]  # [C,1,3,3], [C,1,3]
    mc = (Rw @ means[None, :, :, None])[..., 0] + t  # [C,N,3]
    covc = Rw @ cov[None] @ Rw.transpose(-1, -2)  # [C,N,3,3]
    x, y, z = mc.unbind(-1)
    fx, fy, cx, cy = (K[:, None, 0, 0], K[:, None, 1, 1], K[:, None, 0, 2], K[:, None, 1, 2])
    valid = (z >= near) & (z <= far)
    zs = torch.where(valid, z, torch.ones_like(z))  # keeps culled entries (and their grads) finite
    lim_x = (0.3 * 0.5 * width / fx, (width - cx) / fx, cx / fx)
    lim_y = (0.3 * 0.5 * height / fy, (height - cy) / fy, cy / fy)
    tx = zs * torch.minimum(lim_x[1] + lim_x[0], torch.maximum(-(lim_x[2] + lim_x[0]), x / zs))
    ty = zs * torch.minimum(lim_y[1] + lim_y[0], torch.maximum(-(lim_y[2] + lim_y[0]), y / zs))
    zero = torch.zeros_like(zs)
    J = torch.stack([fx / zs, zero, -fx * tx / zs**2, zero, fy / zs, -fy * ty / zs**2], -1).reshape(*zs.shape, 2, 3)
    cov2 = J @ covc @ J.transpose(-1, -2)  # [C,N,2,2]
    c00, c01, c11 = cov2[..., 0, 0] + eps2d, cov2[..., 0, 1], cov2[..., 1, 1] + eps2d
    det = c00 * c11 - c01 * c01
    det_ok = det > 0
    det = torch.where(det_ok, det, torch.ones_like(det))
    conic = torch.stack([c11 / det, -c01 / det, c00 / det], -1)
    mean2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)
    with torch.no_grad():
        op = opacities.detach().expand_as(z)
        valid = valid & det_ok & (op >= ALPHA_THRESHOLD)
        extend = torch.sqrt(2 * torch.log(op.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(3.33)
        radius = torch.ceil(extend[..., None] * torch.stack([c00, c11], -1).detach().clamp_min(0).sqrt())
        m = mean2d.detach()
        valid = valid & ~(
            (m[..., 0] + radius[..., 0] <= 0)
            | (m[..., 0] - radius[..., 0] >= width)
            | (m[..., 1] + radius[..., 1] <= 0)
            | (m[..., 1] - radius[..., 1] >= height)
        )
    return Projected(mean2d, conic, z, radius, valid)
