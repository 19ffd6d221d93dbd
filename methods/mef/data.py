"""MEF's training pairs: two views of one object, foreground pixels with their object-frame 3D points.

Facts (qq456cvb/3DCorrEnhance ``data_utils/dataset.py``: ``ObjaverseCorrDataset``,
``AugmentedDataset``; ``finetune.py`` ``train_dataloader``): every item draws a random object and two
different random poses of it; a pair whose relative rotation exceeds 120 degrees is rejected (the next
item is drawn instead); each view keeps 3000 foreground pixels drawn at random (with replacement when
the mask has fewer) and unprojects them to the object frame; batch size 1; an epoch is 100 items and
training runs 100 epochs (10,000 steps). Augmentation per view (albumentations, each transform with
its default probability 0.5): ShiftScaleRotate (shift 0.25, scale 0.25, rotate 45 degrees, black
border; the points move with the image, points leaving it are dropped), then GaussianBlur (kernel 1-3),
ISONoise, GaussNoise (variance 10-50 on the 0-255 scale), CLAHE (clip 4, 8x8 tiles),
RandomBrightnessContrast (+-0.2), then the background (the warped mask) is set to black.

Here the draws come from generators seeded by ``(seed, step)`` (stateless: a resumed run draws the
same pairs) and the augmentations are written with torch / kornia (albumentations is not a
dependency); ISONoise is not reproduced (docs/methods/mef.md).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.cameras import relative_rotation_deg
from bench.data.mef_objaverse import ObjectRenders, unproject


def rotation_angle_deg(pose_a: torch.Tensor, pose_b: torch.Tensor) -> float:
    """Angle of ``R_a R_b^T`` in degrees (official: ``arccos((trace(R1 R2^T) - 1) / 2)``)."""
    R = pose_a[:3, :3].double() @ pose_b[:3, :3].double().T
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(R)) - 1) / 2))))


def sample_points(mask: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``[n,2]`` (x, y) integer pixels of the mask, drawn without replacement unless it has fewer."""
    yx = torch.nonzero(mask)
    if len(yx) == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    idx = rng.choice(len(yx), n, replace=len(yx) < n)
    return yx[torch.from_numpy(idx)][:, [1, 0]]


# -- augmentation ----------------------------------------------------------------------------------
def shift_scale_rotate(
    image: torch.Tensor,
    mask: torch.Tensor,
    pts: torch.Tensor,
    g: torch.Generator,
    shift: float = 0.25,
    scale: float = 0.25,
    rotate: float = 45.0,
):
    """Random similarity about the image centre; image bilinear, mask nearest, black border; the points
    ``pts [N,2]`` (x, y) move with it. Returns ``(image, mask, pts)``."""
    H, W = image.shape[-2:]
    u = torch.rand(4, generator=g, dtype=torch.float64) * 2 - 1
    ang, s = math.radians(float(u[0]) * rotate), 1.0 + float(u[1]) * scale
    tx, ty = float(u[2]) * shift * W, float(u[3]) * shift * H
    c, si = math.cos(ang) * s, math.sin(ang) * s
    cx, cy = W / 2, H / 2
    M = torch.tensor(
        [[c, -si, cx + tx - c * cx + si * cy], [si, c, cy + ty - si * cx - c * cy], [0, 0, 1]], dtype=torch.float64
    )  # source pixel -> destination pixel
    Minv = torch.linalg.inv(M)
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij"
    )
    src = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ Minv.T  # destination -> source (centres)
    grid = torch.stack([2 * src[..., 0] / W - 1, 2 * src[..., 1] / H - 1], -1)[None].float()
    img = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    msk = (
        F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
        > 0.5
    )
    p = torch.cat([pts.double() + 0.5, torch.ones(len(pts), 1, dtype=torch.float64)], 1) @ M.T
    return img, msk, (p[:, :2] - 0.5).float()


def colour_augment(image: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """GaussianBlur, GaussNoise, CLAHE, RandomBrightnessContrast, each with probability ``p``."""
    import kornia

    x = image[None]
    if float(torch.rand((), generator=g)) < p:  # kernel 1 (no-op) or 3
        if float(torch.rand((), generator=g)) < 0.5:
            x = kornia.filters.gaussian_blur2d(x, (3, 3), (0.8, 0.8))  # sigma of a 3-tap kernel (OpenCV rule)
    if float(torch.rand((), generator=g)) < p:
        var = 10 + 40 * float(torch.rand((), generator=g))
        x = x + torch.randn(x.shape, generator=g) * math.sqrt(var) / 255.0
    x = x.clamp(0, 1)
    if float(torch.rand((), generator=g)) < p:
        x = kornia.enhance.equalize_clahe(x, clip_limit=4.0, grid_size=(8, 8))
    if float(torch.rand((), generator=g)) < p:
        b, c = (torch.rand(2, generator=g) * 0.4 - 0.2).tolist()
        x = (x * (1 + c) + b).clamp(0, 1)
    return x[0]


def augment_view(view: Dict[str, Any], g: torch.Generator, geom_p: float = 0.5) -> Dict[str, Any]:
    """The official per-view augmentation (module docstring) of ``{"image", "mask", "pix", "pts"}``."""
    image, mask, pix, pts = view["image"], view["mask"], view["pix"].float(), view["pts"]
    if float(torch.rand((), generator=g)) < geom_p:
        image, mask, pix = shift_scale_rotate(image, mask, pix, g)
    H, W = image.shape[-2:]
    valid = (pix[:, 0] >= 0) & (pix[:, 0] < W) & (pix[:, 1] >= 0) & (pix[:, 1] < H)
    if not bool(valid.any()):
        return dict(view, image=image, mask=mask)
    image = colour_augment(image, g) * mask[None]
    return dict(view, image=image, mask=mask, pix=pix[valid], pts=pts[valid])


# -- pairs ----------------------------------------------------------------------------------------
class PairSampler:
    """Training pairs of ``objects`` of ``data``; ``pair(step)`` is a pure function of ``(seed, step)``."""

    def __init__(
        self,
        data: ObjectRenders,
        objects: Sequence[str],
        points: int = 3000,
        max_angle: float = 120.0,
        augment: bool = True,
        seed: int = 0,
    ):
        if not objects:
            raise ValueError("no training objects")
        self.data, self.objects = data, list(objects)
        self.points, self.max_angle, self.augment, self.seed = int(points), float(max_angle), bool(augment), int(seed)

    def views(self, obj: str, i: int, rng: np.random.Generator) -> Dict[str, Any]:
        v = self.data.view(obj, i)
        pix = sample_points(v["mask"], self.points, rng)
        pts = unproject(pix, v["depth"], v["K"], v["pose"], self.data.pixel_offset)
        return {
            "image": v["image"],
            "mask": v["mask"],
            "pix": pix.float(),
            "pts": pts,
            "pose": v["pose"],
            "object": obj,
            "view": i,
        }

    def choose(self, rng: np.random.Generator):
        V = self.data.num_views
        for _ in range(1000):
            obj = self.objects[int(rng.integers(len(self.objects)))]
            i = int(rng.integers(V))
            j = int(rng.integers(V - 1))
            j += j >= i
            if rotation_angle_deg(self.data.poses[i], self.data.poses[j]) <= self.max_angle:
                return obj, i, j
        raise ValueError(f"no pair of poses within {self.max_angle} degrees")

    def pair(self, step: int) -> List[Dict[str, Any]]:
        rng = np.random.default_rng([self.seed, int(step), 0x3EF])
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        for _ in range(100):
            obj, i, j = self.choose(rng)
            a, b = self.views(obj, i, rng), self.views(obj, j, rng)
            if len(a["pix"]) and len(b["pix"]):
                break
        if self.augment:
            a, b = augment_view(a, g), augment_view(b, g)
        return [a, b]


def eval_pairs(
    data: ObjectRenders, objects: Sequence[str], pairs: int, points: int = 1000, seed: int = 0, max_angle: float = 90.0
) -> List[List[Dict[str, Any]]]:
    """Fixed un-augmented pairs of held-out objects for :func:`methods.mef.method.pair_correspondence`."""
    s = PairSampler(data, objects, points=points, max_angle=max_angle, augment=False, seed=seed + 7919)
    return [s.pair(k) for k in range(int(pairs))]


__all__ = [
    "PairSampler",
    "augment_view",
    "colour_augment",
    "eval_pairs",
    "relative_rotation_deg",
    "rotation_angle_deg",
    "sample_points",
    "shift_scale_rotate",
]
