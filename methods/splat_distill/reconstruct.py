"""Feed-forward reconstructors: two posed context views -> one 3D Gaussian per pixel per view.

A reconstructor is called as ``recon(views) -> PixelGaussians`` where ``views`` holds the context
views of one example (``images [V,3,H,W]``, ``K [V,3,3]``, ``w2c [V,4,4]``, optional ``depth``).
Every Gaussian sits on its pixel's ray (``mean = unproject(depth)``) with an isotropic scale of
``scale_mult x depth x pixel footprint`` (footprint = 1/f), so lifting features onto Gaussians is
a per-pixel assignment. Implementations (``method.reconstructor.name``):

* ``depth``   -- :class:`DepthUnprojection`: the dataset's depth, opacity 1 (exact geometry).
* ``learned`` -- :class:`CostVolumeReconstructor`: a small two-view plane-sweep network that predicts
  per-pixel depth, opacity and scale; pretrained by ``python -m bench pretrain-reconstructor`` with a
  rendering loss through :func:`bench.splat.rasterize`, then loaded frozen from its checkpoint.
* ``mvsplat`` -- :class:`MVSplatAdapter`: MVSplat's encoder (:mod:`methods.splat_distill.mvsplat`) with a
  user's checkpoint (MVSplat's public ``re10k.ckpt``), frozen: anisotropic Gaussians with full world
  covariances and SH colours, splatted with ``rasterize(covars=...)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bench.cameras import invert_rigid, pixel_grid, project_points, scale_intrinsics, unproject_depth
from bench.checkpoint import load_state_dict_strict, read_state_dict
from bench.errors import BenchError, CheckpointError, DataMissingError, what_is_at

RECONSTRUCTORS = ("depth", "learned", "mvsplat")
FEATURE_COVARIANCES = ("official", "true_covariance")  # method.lift.feature_covariance


def official_render_covariances(cov: torch.Tensor) -> torch.Tensor:
    """The covariance the official LUDVIG-style feature splat renders for covariances ``cov [...,3,3]``.

    Official ``src/ludvig/ludvig.py`` (``extract_scales_and_rotations``, ``rotation_matrix_to_quaternion``):
    ``eigenvalues, R = torch.linalg.eigh(cov)``; the eigenvalues (variances) are passed to the 3DGS rasterizer
    as its ``scales`` (standard deviations), and ``R`` becomes the rotation only when it is one (orthonormal to
    1e-3 and ``det R > 0``), else the identity. The rasterizer builds ``R S S^T R^T`` from them, so the render
    uses ``R' diag(eigenvalues^2) R'^T`` (``R'`` = ``R`` or the identity): returned here, to be splatted with
    ``rasterize(covars=...)`` (the same footprint as the official scales + rotations)."""
    lam, R = torch.linalg.eigh(cov)
    eye = torch.eye(3, dtype=cov.dtype, device=cov.device).expand_as(R)
    err = (R.transpose(-1, -2) @ R - eye).abs().amax(dim=(-2, -1))
    valid = (err < 1e-3) & (torch.linalg.det(R) > 0)
    R = torch.where(valid[..., None, None], R, eye)
    return R @ torch.diag_embed(lam * lam) @ R.transpose(-1, -2)


@dataclass
class PixelGaussians:
    """One Gaussian per pixel: ``means [V,H,W,3]``, ``scales [V,H,W]`` (isotropic std), ``opacities
    [V,H,W]``, ``depth [V,H,W]`` (camera z, 0 = no Gaussian). Anisotropic reconstructors (MVSplat) also
    give ``covariances [V,H,W,3,3]`` (world frame; they replace ``scales`` when splatting) and
    ``harmonics [V,H,W,3,n]`` (SH colours in e3nn's basis, world frame)."""

    means: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    depth: torch.Tensor
    covariances: Optional[torch.Tensor] = None
    harmonics: Optional[torch.Tensor] = None

    @classmethod
    def from_depth(
        cls,
        depth: torch.Tensor,
        K: torch.Tensor,
        w2c: torch.Tensor,
        opacities: torch.Tensor,
        scale_mult: torch.Tensor | float = 1.0,
    ) -> "PixelGaussians":
        """Pixel-aligned Gaussians from z-depth ``[V,H,W]``: scale = mult * depth / sqrt(fx * fy)."""
        footprint = 1.0 / torch.sqrt(K[:, 0, 0] * K[:, 1, 1])[:, None, None]
        means = unproject_depth(depth, K, w2c)
        return cls(means, scale_mult * depth * footprint, opacities * (depth > 0), depth)

    def splat_args(self, features: torch.Tensor, min_opacity: float = 0.0):
        """Flatten with per-pixel ``features [V,C,H,W]`` -> rasterize() arguments (means, quats,
        scales, opacities, features), dropping pixels without a Gaussian."""
        keep = (self.opacities > min_opacity).reshape(-1) & (self.depth > 0).reshape(-1)
        means = self.means.reshape(-1, 3)[keep]
        s = self.scales.reshape(-1)[keep]
        quats = torch.zeros(means.shape[0], 4, dtype=means.dtype, device=means.device)
        quats[:, 0] = 1.0
        feats = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])[keep]
        return means, quats, s[:, None].expand(-1, 3), self.opacities.reshape(-1)[keep], feats

    def splat(
        self,
        features: torch.Tensor,
        w2c: torch.Tensor,
        K: torch.Tensor,
        width: int,
        height: int,
        min_opacity: float = 0.0,
        covariance: str = "true_covariance",
    ):
        """Render per-pixel ``features [V,C,H,W]`` into cameras ``w2c [T,4,4]``, ``K [T,3,3]`` with
        :func:`bench.splat.rasterize` -> ``(features [T,H,W,C], alpha [T,H,W], depth [T,H,W])``.

        ``covariance``: ``true_covariance`` splats the reconstructor's Gaussians (full covariances when it gives them,
        else isotropic ``scales``); ``official`` the footprint the official feature splat renders
        (:func:`official_render_covariances` of the same covariances; isotropic ones are ``scale^2 I``)."""
        from bench.splat import rasterize

        means, quats, scales, opac, feats = self.splat_args(features, min_opacity)
        if covariance not in FEATURE_COVARIANCES:
            raise BenchError(
                f"method.lift.feature_covariance='{covariance}' is not a choice", f"use one of {FEATURE_COVARIANCES}"
            )
        if self.covariances is None and covariance == "true_covariance":
            return rasterize(means, quats, scales, opac, feats, w2c, K, width, height)
        keep = (self.opacities > min_opacity).reshape(-1) & (self.depth > 0).reshape(-1)
        if self.covariances is not None:
            cov = self.covariances.reshape(-1, 3, 3)[keep]
        else:
            cov = torch.diag_embed(scales * scales)  # isotropic: scale^2 I
        if covariance == "official":
            cov = official_render_covariances(cov)
        return rasterize(means, None, None, opac, feats, w2c, K, width, height, covars=cov)

    def colors(self, images: torch.Tensor, w2c: torch.Tensor) -> torch.Tensor:
        """Per-pixel RGB ``[V,3,H,W]`` seen from the camera ``w2c [4,4]``: the SH colours evaluated at the
        viewing direction (``max(SH + 0.5, 0)``, 3DGS's rule) when the reconstructor gives harmonics,
        else the context pixels' own colours ``images [V,3,H,W]``."""
        if self.harmonics is None:
            return images
        from .mvsplat import eval_harmonics

        centre = invert_rigid(w2c[None])[0, :3, 3]
        d = F.normalize(self.means - centre, dim=-1)
        rgb = (eval_harmonics(self.harmonics, d) + 0.5).clamp_min(0.0)  # [V,H,W,3]
        return rgb.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
class DepthUnprojection(nn.Module):
    """Gaussians from the dataset's depth maps (pixel-aligned, opacity 1, no learning)."""

    def __init__(self, scale_mult: float = 1.0):
        super().__init__()
        self.scale_mult = float(scale_mult)

    def forward(self, views: Mapping[str, torch.Tensor]) -> PixelGaussians:
        if views.get("depth") is None:
            raise DataMissingError(
                "the depth-unprojection reconstructor needs depth maps and the scenes have none",
                "use method.reconstructor.name=learned (see `python -m bench "
                "pretrain-reconstructor --help`) or a dataset with depth",
            )
        depth = views["depth"]
        return PixelGaussians.from_depth(depth, views["K"], views["w2c"], torch.ones_like(depth), self.scale_mult)


# ------------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))


class CostVolumeReconstructor(nn.Module):
    """Two-view feed-forward Gaussian predictor (a small MVSplat-style network).

    1. A CNN encodes each context image to stride-4 features.
    2. Plane sweep: for each view, the other view's features are warped onto ``num_depths`` fronto-
       parallel planes uniform in inverse depth between ``near`` and ``far``; the correlation
       (channel dot product / sqrt(C)) at each plane forms the cost volume.
    3. A 2-level U-Net on [cost volume, features] predicts depth logits over the planes (depth =
       1 / softmax-expected inverse depth), an opacity and a scale multiplier, at stride 4.
    4. A full-resolution head refines them with the image (residual on inverse depth and logits).

    Output per pixel: depth (z, metres), opacity in (0,1), scale multiplier in (0.25, 2.25).
    """

    def __init__(
        self, feat_dim: int = 32, num_depths: int = 32, hidden: int = 64, near: float = 0.5, far: float = 20.0
    ):
        super().__init__()
        self.config = dict(feat_dim=feat_dim, num_depths=num_depths, hidden=hidden, near=near, far=far)
        self.num_depths = num_depths
        self.encoder = nn.Sequential(_conv(3, 32, 2), _conv(32, 32), _conv(32, feat_dim, 2), _conv(feat_dim, feat_dim))
        cin = num_depths + feat_dim
        self.down1, self.down2 = _conv(cin, hidden), _conv(hidden, hidden, 2)
        self.mid = _conv(hidden, hidden)
        self.up = _conv(2 * hidden, hidden)
        self.out = nn.Conv2d(hidden, num_depths + 2, 3, 1, 1)
        self.refine = nn.Sequential(_conv(3 + 3, 32), nn.Conv2d(32, 3, 3, 1, 1))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)
        self.register_buffer("inv_depths", torch.linspace(1.0 / far, 1.0 / near, num_depths), persistent=False)

    def cost_volume(
        self, feats: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor, image_size: Tuple[int, int]
    ) -> torch.Tensor:
        """``feats [B,2,C,h,w]`` of images of ``image_size`` -> correlation volumes ``[B,2,D,h,w]``."""
        B, V, C, h, w = feats.shape
        D = self.num_depths
        Kl = scale_intrinsics(K, w / image_size[1], h / image_size[0])  # [B,2,3,3] at feature res
        src = [1, 0]  # the other view
        uv = pixel_grid(h, w, feats.device, feats.dtype).reshape(1, h * w, 2)
        rays = torch.cat([uv, torch.ones_like(uv[..., :1])], -1) @ torch.linalg.inv(Kl).transpose(-1, -2).reshape(
            B * V, 3, 3
        )
        depths = (1.0 / self.inv_depths).to(feats.dtype)  # [D]
        pts = rays[:, None] * depths[None, :, None, None]  # [BV,D,hw,3] ref camera
        rel = (w2c[:, src] @ invert_rigid(w2c)).reshape(B * V, 4, 4)  # ref cam -> src cam
        uv_s, z = project_points(pts.reshape(B * V, D * h * w, 3), Kl[:, src].reshape(B * V, 3, 3), rel)  # [BV,Dhw,2]
        grid = torch.stack([uv_s[..., 0] / w * 2 - 1, uv_s[..., 1] / h * 2 - 1], -1)
        grid = torch.where((z > 1e-3)[..., None], grid, torch.full_like(grid, -2.0))  # behind: outside
        f_src = feats[:, src].reshape(B * V, C, h, w)
        warped = F.grid_sample(
            f_src, grid.reshape(B * V, D * h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False
        ).reshape(B * V, C, D, h, w)
        cost = (warped * feats.reshape(B * V, C, 1, h, w)).sum(1) / math.sqrt(C)
        return cost.reshape(B, V, D, h, w)

    def predict(self, images: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``images [B,2,3,H,W]``, ``K [B,2,3,3]``, ``w2c [B,2,4,4]`` ->
        ``depth``, ``opacity``, ``scale_mult`` each ``[B,2,H,W]``."""
        B, V, _, H, W = images.shape
        if V != 2:
            raise ValueError(f"CostVolumeReconstructor takes 2 context views, got {V}")
        x = images.reshape(B * V, 3, H, W) * 2 - 1
        f = self.encoder(x)
        h, w = f.shape[-2:]
        f = F.normalize(f, dim=1) * math.sqrt(f.shape[1])  # unit-scale features: a well-conditioned cost
        cost = self.cost_volume(f.reshape(B, V, -1, h, w), K, w2c, (H, W)).reshape(B * V, -1, h, w)
        d1 = self.down1(torch.cat([cost, f], 1))
        d2 = self.mid(self.down2(d1))
        u = self.up(torch.cat([d1, F.interpolate(d2, size=(h, w), mode="bilinear", align_corners=False)], 1))
        out = self.out(u)
        prob = out[:, : self.num_depths].softmax(1)
        inv = (prob * self.inv_depths.to(prob.dtype)[None, :, None, None]).sum(1, keepdim=True)
        low = torch.cat([inv, out[:, self.num_depths :]], 1)  # [BV,3,h,w]
        up = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
        ref = self.refine(torch.cat([x, up], 1))
        inv_lo, inv_hi = float(self.inv_depths[0]), float(self.inv_depths[-1])
        inv = (up[:, 0] + 0.1 * inv_hi * torch.tanh(ref[:, 0])).clamp(inv_lo, inv_hi)
        return {
            "depth": (1.0 / inv).reshape(B, V, H, W),
            "opacity": torch.sigmoid(up[:, 1] + ref[:, 1] + 2.0).reshape(B, V, H, W),
            "scale_mult": (0.25 + 2.0 * torch.sigmoid(up[:, 2] + ref[:, 2])).reshape(B, V, H, W),
        }

    def forward(self, views: Mapping[str, torch.Tensor]) -> PixelGaussians:
        pred = self.predict(views["images"][None], views["K"][None], views["w2c"][None])
        return PixelGaussians.from_depth(
            pred["depth"][0], views["K"], views["w2c"], pred["opacity"][0], pred["scale_mult"][0]
        )

    # -- checkpoint: weights (safetensors) + architecture (json next to it)
    def save(self, path: str | Path, extra: Optional[Mapping[str, Any]] = None) -> Path:
        from bench.io import save_safetensors

        path = Path(path)
        meta = {
            "class": type(self).__name__,
            "config": json.dumps(self.config),
            **{k: json.dumps(v) for k, v in (extra or {}).items()},
        }
        return save_safetensors(self.state_dict(), path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "CostVolumeReconstructor":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"learned reconstructor checkpoint {path} {what_is_at(path, 'file')}",
                f"pretrain it: `python -m bench pretrain-reconstructor --out {path}` "
                "(or use method.reconstructor.name=depth)",
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("class") != cls.__name__:
            raise CheckpointError(
                f"{path} is not a {cls.__name__} checkpoint",
                "pass a file written by `python -m bench pretrain-reconstructor`",
            )
        model = cls(**json.loads(meta["config"]))
        load_state_dict_strict(model, read_state_dict(path), source=f"reconstructor {path}")
        return model


class MVSplatAdapter(nn.Module):
    """A pretrained MVSplat encoder as bench's reconstructor (the official SnD code's choice).

    Loads ``checkpoint`` (MVSplat's ``re10k.ckpt``: a Lightning checkpoint whose ``state_dict`` holds
    ``encoder.*``, or a bare ``encoder.*`` safetensors/pt file) strictly into
    :class:`~methods.splat_distill.mvsplat.MVSplatEncoder`, converts bench's views (pixel K, w2c) into
    MVSplat's context (normalised K, c2w, ``near``/``far`` from config) and returns its per-pixel
    Gaussians: means, full world covariances, opacities, SH colours; ``depth`` is each mean's camera z
    in its own view. Image sides must be multiples of 16 (MVSplat's U-Nets).
    """

    def __init__(self, checkpoint: Optional[str] = None, near: float = 1.0, far: float = 100.0, **_: Any):
        super().__init__()
        if not checkpoint:
            raise BenchError(
                f"method.reconstructor.name=mvsplat needs an MVSplat checkpoint (checkpoint={checkpoint!r})",
                "download MVSplat's re10k.ckpt (github donydchen/mvsplat, README) and pass "
                "method.reconstructor.checkpoint=/path/to/re10k.ckpt",
            )
        near, far = float(near), float(far)
        if not 0 < near < far:
            raise BenchError(
                f"method.reconstructor.near={near} / far={far} is not a depth range",
                "use 0 < near < far (MVSplat RE10K: near=1 far=100)",
            )
        from .mvsplat import MVSplatEncoder

        self.near, self.far = near, far
        self.encoder = MVSplatEncoder.from_checkpoint(checkpoint)

    @staticmethod
    def check_size(H: int, W: int) -> None:
        """MVSplat's U-Nets need image sides that are multiples of 16 (clear error naming the config key)."""
        from .mvsplat import SIZE_MULTIPLE

        if H % SIZE_MULTIPLE or W % SIZE_MULTIPLE:
            m = SIZE_MULTIPLE
            raise BenchError(
                f"the MVSplat reconstructor needs image sides that are multiples of {m}, got {H}x{W}",
                f"set method.data.size to multiples of {m}, e.g. "
                f"[{max(m, round(H / m) * m)},{max(m, round(W / m) * m)}]",
            )

    @classmethod
    def context(cls, views: Mapping[str, torch.Tensor], near: float, far: float) -> Dict[str, torch.Tensor]:
        """bench views (``images [2,3,H,W]``, pixel ``K``, ``w2c``) -> MVSplat's context dict (batch 1)."""
        images = views["images"]
        V, _, H, W = images.shape
        cls.check_size(H, W)
        Kn = views["K"].clone()
        Kn[:, 0] /= W
        Kn[:, 1] /= H
        c2w = invert_rigid(views["w2c"])
        full = lambda v: torch.full((1, V), v, dtype=images.dtype, device=images.device)
        return {
            "image": images[None].clamp(0, 1),
            "intrinsics": Kn[None],
            "extrinsics": c2w[None],
            "near": full(near),
            "far": full(far),
        }

    def forward(self, views: Mapping[str, torch.Tensor]) -> PixelGaussians:
        V, _, H, W = views["images"].shape
        out = self.encoder(self.context(views, self.near, self.far))
        means = out["means"][0].reshape(V, H, W, 3)
        w2c = views["w2c"]
        z = (means @ w2c[:, None, :3, :3].transpose(-1, -2) + w2c[:, None, None, :3, 3])[..., 2]  # own camera z
        cov = out["covariances"][0].reshape(V, H, W, 3, 3)
        iso = torch.linalg.det(cov).clamp_min(0) ** (1 / 6)  # geometric-mean std
        return PixelGaussians(
            means,
            iso,
            out["opacities"][0].reshape(V, H, W),
            z * (z > 0),
            cov,
            out["harmonics"][0].reshape(V, H, W, 3, -1),
        )


def build_reconstructor(cfg: Mapping[str, Any]) -> nn.Module:
    """``cfg.method.reconstructor`` -> a frozen reconstructor module in eval mode."""
    from .official import check_reconstructor, resolve_checkpoint

    name = str(cfg["name"])
    if name in ("learned", "mvsplat"):
        check_reconstructor(cfg)  # a checkpoint is given: one error that says where it comes from
    if name == "depth":
        model = DepthUnprojection(float(cfg["scale_mult"]))
    elif name == "learned":
        model = CostVolumeReconstructor.load(resolve_checkpoint(cfg["checkpoint"]))
    elif name == "mvsplat":
        model = MVSplatAdapter(str(resolve_checkpoint(cfg["checkpoint"])), cfg["near"], cfg["far"])
    else:
        raise BenchError(
            f"method.reconstructor.name='{name}' is not a reconstructor", f"use one of {', '.join(RECONSTRUCTORS)}"
        )
    return model.eval().requires_grad_(False)
