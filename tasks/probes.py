"""Probe heads on frozen dense features, and their task outputs.

Heads map a list of feature maps ``[B,C_i,h,w]`` (same ``h,w``) to ``[B,K,H',W']``:

- :class:`LinearHead` -- concatenate the maps, optional BatchNorm (mmseg ``BNHead``), a 1x1 conv,
  bilinear upsampling by ``upsample``. A 1x1 conv commutes exactly with bilinear upsampling
  (both linear, bilinear weights sum to one), so "upsample x4, then 1x1 conv" (the linear depth
  protocol) is computed as conv-then-upsample: identical output, 16x cheaper.
- :class:`DPTHead` -- Probe3D's DPT-like head: each of 4 maps projected to ``hidden`` channels
  (1x1), upsampled x2, fused deep-to-shallow with residual conv units, upsampled x4, two 3x3 convs,
  upsampled x2 (x16 overall). The internal upsampling follows Probe3D's code version
  (``upsample_mode`` / ``align_corners``): ``nearest`` in the first commit ``1fff822`` of
  ``evals/models/probes.py`` (the code of the paper's numbers), ``bilinear`` with
  ``align_corners=True`` since ``fbe0cd2`` ("minor interpolation fix").

Outputs (applied by :class:`DenseProbe` after the head):

- depth: :class:`BinnedDepth` -- 256 uniform bins in [min_depth, max_depth], "linear"
  normalisation (``relu(x) + 0.1``, divided by the sum), depth = sum(bin centre x prob), computed at
  the head's resolution then resized to the label size;
- normals: 4 channels resized, ``xyz`` normalised to unit length, ``kappa = elu(k) + 1.01``;
- segmentation: class logits resized.

The final resize to the label size is ``resize: {mode, align_corners}`` (default bilinear,
``align_corners=False``: mmseg's ``resize``). Probe3D ``train_snorm.py`` resizes normals bicubic,
``train_depth.py`` depth bilinear; ``align_corners=True`` since ``fbe0cd2``, False before.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .losses import kappa_from_raw


def _resize(
    x: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear", align_corners: bool = False
) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    ac = align_corners if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=ac)


def _up(x: torch.Tensor, scale: int, mode: str = "bilinear", align_corners: bool = False) -> torch.Tensor:
    ac = align_corners if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, scale_factor=scale, mode=mode, align_corners=ac)


def _same_size(feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    size = feats[0].shape[-2:]
    return [_resize(f, size) for f in feats]


class LinearHead(nn.Module):
    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        upsample: int = 1,
        batchnorm: bool = False,
        align_corners: bool = False,
    ):
        super().__init__()
        c = int(sum(in_dims))
        self.upsample, self.align_corners = int(upsample), bool(align_corners)
        self.bn = nn.BatchNorm2d(c) if batchnorm else nn.Identity()
        self.conv = nn.Conv2d(c, out_dim, kernel_size=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.conv(self.bn(torch.cat(_same_size(feats), dim=1)))
        if self.upsample != 1:
            x = _up(x, self.upsample, "bilinear", self.align_corners)
        return x


class ResidualConvUnit(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.conv2(F.relu(self.conv1(x))))


class FusionBlock(nn.Module):
    """``out = rcu2(rcu1(x) + skip)`` (``rcu2(x)`` for the deepest map, which has no skip)."""

    def __init__(self, dim: int, kernel_size: int = 3, with_skip: bool = True):
        super().__init__()
        self.rcu1 = ResidualConvUnit(dim, kernel_size) if with_skip else None
        self.rcu2 = ResidualConvUnit(dim, kernel_size)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = self.rcu1(x) + skip
        return self.rcu2(x)


class DPTHead(nn.Module):
    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        hidden: int = 512,
        kernel_size: int = 3,
        upsample_mode: str = "bilinear",
        align_corners: bool = False,
    ):
        super().__init__()
        self.upsample_mode, self.align_corners = str(upsample_mode), bool(align_corners)
        if len(in_dims) != 4:
            raise ValueError(f"the DPT head needs 4 feature maps, got {len(in_dims)}")
        self.proj = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in in_dims)
        self.fuse = nn.ModuleList(
            [FusionBlock(hidden, kernel_size) for _ in range(3)] + [FusionBlock(hidden, kernel_size, with_skip=False)]
        )
        self.out = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(True), nn.Conv2d(hidden, out_dim, 3, padding=1)
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        up = lambda x, s: _up(x, s, self.upsample_mode, self.align_corners)  # noqa: E731
        xs = [up(p(f), 2) for p, f in zip(self.proj, _same_size(feats))]
        out = self.fuse[3](xs[3])
        for i in (2, 1, 0):
            out = self.fuse[i](xs[i], out)
        return up(self.out(up(out, 4)), 2)


class BinnedDepth(nn.Module):
    """Bin scores ``[B,K,h,w]`` -> depth ``[B,h,w]`` (uniform bins, "linear" normalisation)."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, bins: int = 256, norm: str = "linear"):
        super().__init__()
        if norm not in ("linear", "softmax"):
            raise ValueError(f"unknown bin normalisation '{norm}' (linear | softmax)")
        self.norm = norm
        self.register_buffer("centres", torch.linspace(float(min_depth), float(max_depth), int(bins)), persistent=False)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.norm == "linear":
            p = F.relu(scores) + 0.1
            p = p / p.sum(dim=1, keepdim=True)
        else:
            p = scores.softmax(dim=1)
        return torch.einsum("bkhw,k->bhw", p, self.centres.to(p.dtype))


OUT_CHANNELS = {"normals": 4}


def build_head(cfg: Mapping[str, Any], in_dims: Sequence[int], out_dim: int) -> nn.Module:
    """The probe head of ``cfg`` (``task.protocol.head``): its sizes come from the protocol, none from code;
    absent switches (``batchnorm``, ``align_corners``) are off."""
    from .train_probe import need

    where = "task.protocol.head"
    kind = str(need(cfg, "type", where))
    if kind == "linear":
        return LinearHead(
            in_dims,
            out_dim,
            int(need(cfg, "upsample", where)),
            bool(cfg.get("batchnorm", False)),
            bool(cfg.get("align_corners", False)),
        )
    if kind == "dpt":
        return DPTHead(
            in_dims,
            out_dim,
            int(need(cfg, "hidden", where)),
            int(need(cfg, "kernel_size", where)),
            str(need(cfg, "upsample_mode", where)),
            bool(cfg.get("align_corners", False)),
        )
    from bench.errors import UnknownNameError

    raise UnknownNameError("probe head", kind, ["linear", "dpt"])


class DenseProbe(nn.Module):
    """Head + task output. ``forward(feats, size)`` returns a dict at label size ``size``:

    depth -> ``{"depth": [B,H,W]}``; normals -> ``{"normals": [B,3,H,W] unit, "kappa": [B,H,W]}``;
    seg -> ``{"logits": [B,C,H,W]}``.
    """

    def __init__(
        self,
        task: str,
        head_cfg: Mapping[str, Any],
        in_dims: Sequence[int],
        *,
        depth_cfg: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.task = task
        if task == "depth":
            from .train_probe import need

            d, where = dict(depth_cfg or {}), "task.protocol.depth"
            self.depth = BinnedDepth(
                need(d, "min_depth", where), need(d, "max_depth", where), need(d, "bins", where), need(d, "norm", where)
            )
            out = int(d["bins"])
        elif task == "normals":
            out = 4
        elif task == "seg":
            if not num_classes:
                raise ValueError("a segmentation probe needs num_classes")
            out = int(num_classes)
        else:
            raise ValueError(f"unknown dense task '{task}'")
        self.head = build_head(head_cfg, list(in_dims), out)
        r = dict((head_cfg or {}).get("resize") or {})
        self.resize_mode, self.resize_ac = str(r.get("mode", "bilinear")), bool(r.get("align_corners", False))

    def forward(self, feats: Sequence[torch.Tensor], size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        x = self.head(list(feats))
        if self.task == "depth":
            return {"depth": _resize(self.depth(x)[:, None], size, self.resize_mode, self.resize_ac)[:, 0]}
        x = _resize(x, size, self.resize_mode, self.resize_ac)
        if self.task == "normals":
            return {"normals": F.normalize(x[:, :3], dim=1, eps=1e-6), "kappa": kappa_from_raw(x[:, 3])}
        return {"logits": x}
