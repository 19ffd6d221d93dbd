"""MVSplat's encoder (the RE10K configuration), written for bench from the architecture description.

This is the feed-forward reconstructor of the official Splat-and-Distill code: a frozen MVSplat
``EncoderCostVolume`` (github donydchen/mvsplat, ``src/model/encoder/encoder_costvolume.py``) with
the weights of MVSplat's public ``re10k.ckpt``. The module layout (names and shapes of all 471
parameters) is MVSplat's, so a user's checkpoint loads strictly; the computation follows the rules
listed in ``docs/methods/mvsplat.md``. The pieces:

1. **Backbone** -- a UniMatch-style CNN (7x7/2 conv, three stages of two residual blocks at 64/96/128
   channels with instance norm, strides 1/2/1, then a 1x1 conv: features at 1/4 resolution) on the
   ImageNet-normalised images, plus a sine position encoding repeated per attention window and a
   6-block transformer (windowed self-attention, then cross-attention to the other view with an FFN;
   2x2 windows, every odd block shifted by half a window with the Swin mask).
2. **Cost volume** -- for each view, the other view's transformer features are warped onto 128
   fronto-parallel planes uniform in inverse depth between near and far (integer pixel grid at feature
   resolution, the reference view's K for both back-projection and projection, bilinear
   ``align_corners=True`` sampling); correlation = channel dot product / sqrt(C).
3. **Depth** -- a U-Net (cross-view attention at 1/16) refines [cost, features]; a softmax over the
   candidates gives a coarse inverse depth and its peak probability; both are upsampled x4 and a
   second U-Net at full resolution (on the image, projected features, disparity and peak) predicts a
   disparity residual and a density.
4. **Gaussians** -- a head predicts 84 channels per pixel (xy offset, 3 scales, an xyzw quaternion and
   3x25 SH coefficients); the adapter turns them into world-space means (camera centre + unit ray x
   depth, depth being the distance along the ray), covariances, rotated harmonics and opacities.

Everything in the depth predictor runs in (view, batch) order, as in MVSplat. Entry point::

    enc = MVSplatEncoder.from_checkpoint("re10k.ckpt")
    out = enc({"image": ..., "intrinsics": ..., "extrinsics": ..., "near": ..., "far": ...})
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError, CheckpointError, what_is_at
from bench.safe_pickle import PickleRefused, load_torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: the RE10K configuration of the public checkpoint (MVSplat config/experiment/re10k.yaml over
#: config/model/encoder/costvolume.yaml)
RE10K = dict(
    d_feature=128,
    num_depth_candidates=128,
    num_views=2,
    attn_splits=2,
    costvolume_unet_feat_dim=128,
    costvolume_unet_channel_mult=(1, 1, 1),
    costvolume_unet_attn_res=(4,),
    depth_unet_feat_dim=32,
    depth_unet_channel_mult=(1, 1, 1, 1, 1),
    depth_unet_attn_res=(16,),
    scale_min=0.5,
    scale_max=15.0,
    sh_degree=4,
    opacity_initial=0.0,
    opacity_final=0.0,
    opacity_warm_up=1,
    downscale=4,
)
SIZE_MULTIPLE = 16  # two stride-2 levels at 1/4 resolution, four at full resolution


# ================================================================================ backbone: CNN
class _ResBlock(nn.Module):
    """relu(IN(conv3x3)) twice, plus the shortcut (IN(conv1x1) when stride or width change), relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.norm1, self.norm2 = nn.InstanceNorm2d(cout), nn.InstanceNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.norm3 = nn.InstanceNorm2d(cout)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), self.norm3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        return self.relu((x if self.downsample is None else self.downsample(x)) + y)


class _CNN(nn.Module):
    def __init__(self, out_dim: int = 128, widths: tuple[int, int, int] = (64, 96, 128)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.norm1 = nn.InstanceNorm2d(widths[0])
        self.relu1 = nn.ReLU()
        cin, layers = widths[0], []
        for width, stride in zip(widths, (1, 2, 1)):
            layers.append(nn.Sequential(_ResBlock(cin, width, stride), _ResBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Conv2d(cin, out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


def sine_position(h: int, w: int, channels: int, device, dtype=torch.float32) -> Tensor:
    """DETR-style encoding ``[channels, h, w]``: first half y, second half x; indices from 1 divided by
    (size + 1e-6) times 2 pi; channel pairs (sin, cos) share the frequency 10000^(2 floor(i/2) / half)."""
    half = channels // 2
    ys = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + 1e-6) * (2 * math.pi)
    xs = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + 1e-6) * (2 * math.pi)
    i = torch.arange(half, dtype=torch.float32, device=device)
    freq = 10000.0 ** (2 * torch.div(i, 2, rounding_mode="floor") / half)
    even = i % 2 == 0

    def enc(t: Tensor) -> Tensor:  # [n] -> [half, n]
        a = t[None, :] / freq[:, None]
        return torch.where(even[:, None], a.sin(), a.cos())

    py = enc(ys)[:, :, None].expand(half, h, w)
    px = enc(xs)[:, None, :].expand(half, h, w)
    return torch.cat([py, px], 0).to(dtype)


# ========================================================================= backbone: transformer
def _windows(x: Tensor, k: int) -> Tensor:
    """``[B,h,w,C]`` -> ``[B*k*k, h/k * w/k, C]`` (window index row-major inside each batch item)."""
    B, h, w, C = x.shape
    x = x.reshape(B, k, h // k, k, w // k, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * k * k, (h // k) * (w // k), C)


def _unwindows(x: Tensor, k: int, h: int, w: int) -> Tensor:
    B = x.shape[0] // (k * k)
    C = x.shape[-1]
    x = x.reshape(B, k, k, h // k, w // k, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h, w, C)


def _shift_mask(h: int, w: int, k: int, device) -> Tensor:
    """Additive mask ``[k*k, L, L]`` for shifted windows: -100 between tokens of different regions."""
    wh, ww = h // k, w // k
    sh, sw = wh // 2, ww // 2

    def bands(n: int, win: int, shift: int) -> Tensor:
        r = torch.zeros(n, dtype=torch.float32, device=device)
        r[n - win : n - shift] = 1
        r[n - shift :] = 2
        return r

    region = bands(h, wh, sh)[:, None] * 3 + bands(w, ww, sw)[None, :]
    lab = _windows(region[None, :, :, None], k)[..., 0]  # [k*k, L]
    diff = lab[:, None, :] - lab[:, :, None]
    return torch.where(diff != 0, torch.full_like(diff, -100.0), torch.zeros_like(diff))


class _AttnLayer(nn.Module):
    """Single-head windowed attention; ``message = LN(merge(attn))``; with FFN (cross layers)
    ``message = LN2(MLP([x, message]))``; returns ``x + message``."""

    def __init__(self, d: int, ffn: bool, expansion: int = 4):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.merge = nn.Linear(d, d, bias=False)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = ffn
        if ffn:
            self.mlp = nn.Sequential(
                nn.Linear(2 * d, 2 * d * expansion, bias=False), nn.GELU(), nn.Linear(2 * d * expansion, d, bias=False)
            )
            self.norm2 = nn.LayerNorm(d)

    def forward(self, x: Tensor, kv: Tensor, h: int, w: int, k: int, mask: Tensor | None) -> Tensor:
        B, L, C = x.shape
        q, key, val = (p(t).reshape(B, h, w, C) for p, t in ((self.q_proj, x), (self.k_proj, kv), (self.v_proj, kv)))
        if mask is not None:
            s = (-((h // k) // 2), -((w // k) // 2))
            q, key, val = (torch.roll(t, s, (1, 2)) for t in (q, key, val))
        q, key, val = _windows(q, k), _windows(key, k), _windows(val, k)
        scores = q @ key.transpose(1, 2) / math.sqrt(C)
        if mask is not None:
            scores = scores + mask.repeat(B, 1, 1)
        out = _unwindows(scores.softmax(-1) @ val, k, h, w)
        if mask is not None:
            out = torch.roll(out, (-s[0], -s[1]), (1, 2))
        msg = self.norm1(self.merge(out.reshape(B, L, C)))
        if self.ffn:
            msg = self.norm2(self.mlp(torch.cat([x, msg], -1)))
        return x + msg


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn = _AttnLayer(d, ffn=False)
        self.cross_attn_ffn = _AttnLayer(d, ffn=True)


class _Transformer(nn.Module):
    def __init__(self, d: int = 128, layers: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(_Block(d) for _ in range(layers))

    def forward(self, feats: list[Tensor], k: int) -> list[Tensor]:
        """Two views' ``[B,C,h,w]`` features -> transformed features, same shapes."""
        V = len(feats)
        if V != 2:
            raise BenchError(f"the MVSplat encoder takes 2 context views, got {V}", "pass exactly 2 context views")
        B, C, h, w = feats[0].shape
        mask = _shift_mask(h, w, k, feats[0].device)
        x = torch.cat([f.flatten(2).transpose(1, 2) for f in feats])  # [(v b), L, C]
        for i, blk in enumerate(self.layers):
            other = torch.cat([x[B:], x[:B]])  # the other view
            m = mask if i % 2 == 1 else None
            x = blk.self_attn(x, x, h, w, k, m)
            x = blk.cross_attn_ffn(x, other, h, w, k, m)
        return [t.transpose(1, 2).reshape(B, C, h, w) for t in x.chunk(V)]


class _Backbone(nn.Module):
    def __init__(self, d: int = 128):
        super().__init__()
        self.backbone = _CNN(d)
        self.transformer = _Transformer(d)


# ==================================================================================== the U-Nets
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if c % 8 == 0 else 4, c)


class _UResBlock(nn.Module):
    """Postnorm residual block: conv-GN-SiLU twice, plus identity or 1x1-conv skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), _norm(cout), nn.SiLU())
        self.out_layers = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1), _norm(cout), nn.SiLU())
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip_connection(x) + self.out_layers(self.in_layers(x))


class _UAttention(nn.Module):
    """Postnorm self-attention over the tokens of all views together (heads of 32 channels, the qkv
    channels grouped per head, q and k each scaled by ch^-1/4, softmax in float32)."""

    def __init__(self, c: int, num_views: int, head_channels: int = 32):
        super().__init__()
        self.heads, self.views = c // head_channels, num_views
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = nn.Conv1d(c, c, 1)
        self.norm = _norm(c)

    def forward(self, x: Tensor) -> Tensor:
        N, C, h, w = x.shape
        V, B, T = self.views, N // self.views, h * w
        x = x.reshape(N, C, T)
        qkv = self.qkv(x).reshape(V, B, 3 * C, T).permute(1, 2, 0, 3).reshape(B, 3 * C, V * T)  # (v b) -> b, (v t)
        ch = C // self.heads
        q, k, v = qkv.reshape(B * self.heads, 3 * ch, V * T).split(ch, dim=1)
        s = ch**-0.25
        wts = torch.einsum("nct,ncs->nts", q * s, k * s).float().softmax(-1).to(q.dtype)
        a = torch.einsum("nts,ncs->nct", wts, v).reshape(B, C, V, T).permute(2, 0, 1, 3).reshape(N, C, T)
        h_ = self.norm(self.proj_out(a))
        return (x + h_).reshape(N, C, h, w)


class _Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class _Up(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _UNet(nn.Module):
    """Diffusion-style U-Net with 1 residual block per level, attention where the downsampling factor
    is in ``attn_res`` (and its skip blocks), no timestep input; width ``c * mult`` per level."""

    def __init__(self, c: int, mult: tuple[int, ...], attn_res: tuple[int, ...], num_views: int):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 3, 1, 1))])
        skips, ch, ds = [c], c, 1
        for level, m in enumerate(mult):
            layers: list[nn.Module] = [_UResBlock(ch, c * m)]
            ch = c * m
            if ds in attn_res:
                layers.append(_UAttention(ch, num_views))
            self.input_blocks.append(nn.Sequential(*layers))
            skips.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(nn.Sequential(_Down(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = nn.Sequential(_UResBlock(ch, ch), nn.Identity(), _UResBlock(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(2):
                layers = [_UResBlock(ch + skips.pop(), c * m)]
                ch = c * m
                if ds in attn_res:
                    layers.append(_UAttention(ch, num_views))
                if level and i == 1:
                    layers.append(_Up(ch))
                    ds //= 2
                self.output_blocks.append(nn.Sequential(*layers))
        self.out = nn.Sequential(nn.Conv2d(ch, c, 3, 1, 1), _norm(c), nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        hs = []
        h = x
        for blk in self.input_blocks:
            h = blk(h)
            hs.append(h)
        h = self.middle_block(h)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], 1))
        return self.out(h)


# ============================================================================= depth predictor
class _DepthPredictor(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        C, D, V = cfg["d_feature"], cfg["num_depth_candidates"], cfg["num_views"]
        cu, du = cfg["costvolume_unet_feat_dim"], cfg["depth_unet_feat_dim"]
        self.num_depths, self.up = D, cfg["downscale"]
        self.corr_refine_net = nn.Sequential(
            nn.Conv2d(D + C, cu, 3, 1, 1),
            nn.GroupNorm(8, cu),
            nn.GELU(),
            _UNet(cu, tuple(cfg["costvolume_unet_channel_mult"]), tuple(cfg["costvolume_unet_attn_res"]), V),
            nn.Conv2d(cu, D, 3, 1, 1),
        )
        self.regressor_residual = nn.Conv2d(D + C, D, 1)
        self.depth_head_lowres = nn.Sequential(nn.Conv2d(D, 2 * D, 3, 1, 1), nn.GELU(), nn.Conv2d(2 * D, D, 3, 1, 1))
        self.upsampler = nn.Sequential(
            nn.Conv2d(2 * C, C, 3, 1, 1),
            nn.Upsample(scale_factor=self.up, mode="bilinear", align_corners=True),
            nn.GELU(),
        )
        self.proj_feature = nn.Conv2d(C, du, 3, 1, 1)
        self.refine_unet = nn.Sequential(
            nn.Conv2d(3 + du + 2, du, 3, 1, 1),
            nn.GroupNorm(4, du),
            nn.GELU(),
            _UNet(du, tuple(cfg["depth_unet_channel_mult"]), tuple(cfg["depth_unet_attn_res"]), V),
        )
        raw = 2 + 7 + 3 * (cfg["sh_degree"] + 1) ** 2
        self.to_gaussians = nn.Sequential(
            nn.Conv2d(du + 3 + C, 2 * raw, 3, 1, 1), nn.GELU(), nn.Conv2d(2 * raw, raw, 3, 1, 1)
        )
        self.to_disparity = nn.Sequential(nn.Conv2d(du, 2 * du, 3, 1, 1), nn.GELU(), nn.Conv2d(2 * du, 2, 3, 1, 1))


def _vb(x: Tensor) -> Tensor:
    """``[B,V,...]`` -> ``[(V B),...]`` (view-major, MVSplat's depth-predictor order)."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


def _bv(x: Tensor, B: int) -> Tensor:
    """``[(V B),...]`` -> ``[B,V,...]``."""
    return x.reshape(-1, B, *x.shape[1:]).transpose(0, 1)


def plane_sweep(feat: Tensor, other: Tensor, K: Tensor, pose: Tensor, depths: Tensor) -> Tensor:
    """Warp ``other [N,C,h,w]`` onto the reference view for each candidate z-depth.

    ``K [N,3,3]`` (pixels at feature resolution; the *reference* view's, used for both the back-
    projection and the projection), ``pose [N,4,4]`` reference camera -> other camera, ``depths [N,D]``.
    Integer pixel grid, z clamped to >= 1e-3, bilinear ``align_corners=True``, zero padding.
    Returns the warped features ``[N,C,D,h,w]``.
    """
    N, C, h, w = other.shape
    D = depths.shape[1]
    with torch.no_grad():
        ys, xs = torch.meshgrid(
            torch.arange(h, device=feat.device, dtype=feat.dtype),
            torch.arange(w, device=feat.device, dtype=feat.dtype),
            indexing="ij",
        )
        pix = torch.stack([xs, ys, torch.ones_like(xs)]).reshape(1, 3, h * w).expand(N, 3, h * w)
        rays = torch.linalg.inv(K) @ pix  # [N,3,hw]
        pts = (pose[:, :3, :3] @ rays)[:, :, None, :] * depths[:, None, :, None]  # [N,3,D,hw]
        pts = pts + pose[:, :3, 3][:, :, None, None]
        proj = (K @ pts.reshape(N, 3, D * h * w)).reshape(N, 3, D, h * w)
        xy = proj[:, :2] / proj[:, 2:].clamp(min=1e-3)
        grid = torch.stack([2 * xy[:, 0] / (w - 1) - 1, 2 * xy[:, 1] / (h - 1) - 1], -1)  # [N,D,hw,2]
    out = F.grid_sample(other, grid.reshape(N, D * h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(N, C, D, h, w)


# ======================================================================== SH rotation (e3nn basis)
@cache
def _real_generators(l: int) -> Tensor:
    """Rotation generators ``[3,2l+1,2l+1]`` (about x, y, z) of degree ``l`` in e3nn's real SH basis,
    float64: ``D(R) = expm(theta * (n . G))`` for a rotation by ``theta`` about the unit axis ``n``.

    Built from the angular-momentum ladder in the complex |l, m> basis, taken to e3nn's real basis
    (m < 0 -> sine-like, m > 0 -> cosine-like, an overall (-i)^l phase), with e3nn's axis naming: the
    basis' quantisation axis is y, and for l = 1 the representation is R itself on (x, y, z).
    """
    n = 2 * l + 1
    m = [float(x) for x in range(-l, l + 1)]
    jp = torch.zeros(n, n, dtype=torch.complex128)  # J+ |m> = sqrt(l(l+1) - m(m+1)) |m+1>
    for i in range(n - 1):
        jp[i + 1, i] = math.sqrt(l * (l + 1) - m[i] * (m[i] + 1))
    jm = jp.conj().T
    jx, jy, jz = (jp + jm) / 2, (jp - jm) / 2j, torch.diag(torch.tensor(m, dtype=torch.complex128))
    # real basis: row l+m of Q combines |+-|m|>; e3nn's phases, including the overall (-i)^l
    Q = torch.zeros(n, n, dtype=torch.complex128)
    s = 1 / math.sqrt(2)
    for mm in range(-l, l + 1):
        r, a = l + mm, abs(mm)
        if mm < 0:
            Q[r, l + a], Q[r, l - a] = s, -1j * s
        elif mm == 0:
            Q[r, l] = 1
        else:
            Q[r, l + a], Q[r, l - a] = (-1) ** a * s, 1j * (-1) ** a * s
    Q = (-1j) ** l * Q
    real = []
    for J in (jx, jy, jz):  # anti-Hermitian -iJ, seen in the real basis
        g = Q.conj().T @ (-1j * J) @ Q
        assert float(g.imag.abs().max()) < 1e-9
        real.append(g.real)
    return torch.stack(real)


@cache
def _axis_map() -> tuple[tuple[int, float], ...]:
    """For each rotation axis (x, y, z): which generator of :func:`_real_generators` and its sign, found
    by matching degree 1 against the standard so(3) generators."""
    G = _real_generators(1)
    eps = torch.zeros(3, 3, 3, dtype=torch.float64)
    for a, b, c in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        eps[a, b, c], eps[a, c, b] = 1, -1
    L = -eps  # (L_a)_bc = -eps_abc: d/dt of rotation about a
    out = []
    for a in range(3):
        for j in range(3):
            for sign in (1.0, -1.0):
                if torch.allclose(sign * G[j], L[a], atol=1e-9):
                    out.append((j, sign))
    if len(out) != 3:
        raise RuntimeError("internal error: SH generators do not match so(3) at degree 1")
    return tuple(out)


def _rotmat_to_axis_angle(R: Tensor) -> Tensor:
    """Rotation matrices ``[...,3,3]`` -> axis * angle ``[...,3]`` (float64, via a unit quaternion)."""
    R = R.double()
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    cand = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = cand.argmax(-1)
    d = torch.sqrt(cand.gather(-1, best[..., None])[..., 0].clamp_min(1e-300)) * 2  # 4 * |largest component|
    a21, a12, a02, a20, a10, a01 = R[..., 2, 1], R[..., 1, 2], R[..., 0, 2], R[..., 2, 0], R[..., 1, 0], R[..., 0, 1]
    qs = [
        torch.stack([d / 4, (a21 - a12) / d, (a02 - a20) / d, (a10 - a01) / d], -1),
        torch.stack([(a21 - a12) / d, d / 4, (a01 + a10) / d, (a02 + a20) / d], -1),
        torch.stack([(a02 - a20) / d, (a01 + a10) / d, d / 4, (a12 + a21) / d], -1),
        torch.stack([(a10 - a01) / d, (a02 + a20) / d, (a12 + a21) / d, d / 4], -1),
    ]
    q = torch.stack(qs, -2).gather(-2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]  # wxyz
    q = q * torch.where(q[..., :1] < 0, -1.0, 1.0)
    v = q[..., 1:]
    sn = v.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(sn, q[..., :1])
    return torch.where(sn > 1e-12, v / sn.clamp_min(1e-300) * angle, 2 * v)


def wigner_d(l: int, R: Tensor) -> Tensor:
    """Real Wigner D-matrices ``[...,2l+1,2l+1]`` of rotations ``R [...,3,3]`` in e3nn's SH basis
    (the basis MVSplat's harmonics live in); ``wigner_d(1, R) == R``. Computed in float64."""
    det = torch.linalg.det(R.double())
    if not torch.allclose(det, torch.ones_like(det), atol=1e-3):
        raise BenchError(
            "a camera rotation is not a proper rotation (det != 1)",
            "pass camera-to-world extrinsics whose rotation part is orthonormal with det +1",
        )
    w = _rotmat_to_axis_angle(R)
    G = _real_generators(l)
    gen = sum(sign * w[..., a, None, None] * G[j] for a, (j, sign) in enumerate(_axis_map()))
    return torch.linalg.matrix_exp(gen)


def rotate_harmonics(sh: Tensor, R: Tensor) -> Tensor:
    """``sh [..., n]`` (degree-major, n = (deg+1)^2) rotated by ``R [...,3,3]`` (broadcast)."""
    out = []
    for l in range(math.isqrt(sh.shape[-1])):
        Dl = wigner_d(l, R).to(sh.dtype)
        out.append((Dl @ sh[..., l * l : (l + 1) ** 2, None])[..., 0])
    return torch.cat(out, -1)


def _d_column_at(l: int, dirs: Tensor) -> Tensor:
    """``D_l(R_d)[:, l]`` for rotations ``R_d`` taking the y axis to unit ``dirs [...,3]`` (float64)."""
    y = torch.zeros_like(dirs)
    y[..., 1] = 1
    axis = torch.cross(y, dirs, dim=-1)
    sn, cs = axis.norm(dim=-1, keepdim=True), (dirs * y).sum(-1, keepdim=True)
    flip = torch.zeros_like(dirs)
    flip[..., 0] = 1
    axis = torch.where(sn > 1e-9, axis / sn.clamp_min(1e-12), flip)
    Rd = torch.linalg.matrix_exp(_skew(axis * torch.atan2(sn, cs)))
    return wigner_d(l, Rd)[..., :, l]


@cache
def _sh_polynomial(l: int) -> tuple[Tensor, Tensor]:
    """Degree-``l`` real SH of e3nn's basis as homogeneous polynomials: monomial exponents ``[M,3]`` and
    coefficients ``[M,2l+1]``, fitted once (exactly: a homogeneous polynomial is fixed by its values on
    the sphere) to ``D_l(R_d)[:, l]`` at fixed random directions."""
    exps = torch.tensor([(a, b, l - a - b) for a in range(l + 1) for b in range(l + 1 - a)], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    d = F.normalize(torch.randn(8 * len(exps) + 8, 3, generator=g, dtype=torch.float64), dim=-1)
    mono = (d[:, None, :] ** exps[None]).prod(-1)  # [S,M]
    coef = torch.linalg.lstsq(mono, _d_column_at(l, d)).solution  # [M,2l+1]
    return exps, coef


def eval_harmonics(sh: Tensor, dirs: Tensor) -> Tensor:
    """Evaluate e3nn-basis real SH colours ``sh [...,3,n]`` at unit directions ``dirs [...,3]`` with the
    3DGS normalisation (degree l scaled by sqrt((2l+1)/4pi), so the DC factor is 0.2821). The value of
    degree ``l`` at ``d`` is ``D_l(R_d)[:, l]`` with ``R_d`` a rotation taking the y axis (e3nn's polar
    axis) to ``d``; it is evaluated as a fitted polynomial in ``d``."""
    vals = []
    for l in range(math.isqrt(sh.shape[-1])):
        exps, coef = _sh_polynomial(l)
        mono = (dirs.double()[..., None, :] ** exps.to(dirs.device)).prod(-1)
        vals.append(mono @ coef.to(dirs.device) * math.sqrt((2 * l + 1) / (4 * math.pi)))
    basis = torch.cat(vals, -1).to(sh.dtype)  # [...,n]
    return (sh * basis[..., None, :]).sum(-1)


def _skew(v: Tensor) -> Tensor:
    z = torch.zeros_like(v[..., 0])
    x, y, w = v.unbind(-1)
    return torch.stack([z, -w, y, w, z, -x, -y, x, z], -1).reshape(*v.shape, 3)


def quat_xyzw_to_rotmat(q: Tensor, eps: float = 1e-8) -> Tensor:
    """xyzw quaternions (any norm) -> rotation matrices, with the factor 2 / (|q|^2 + eps)."""
    x, y, z, w = q.unbind(-1)
    s = 2 / ((q * q).sum(-1) + eps)
    return torch.stack(
        [
            1 - s * (y * y + z * z),
            s * (x * y - z * w),
            s * (x * z + y * w),
            s * (x * y + z * w),
            1 - s * (x * x + z * z),
            s * (y * z - x * w),
            s * (x * z - y * w),
            s * (y * z + x * w),
            1 - s * (x * x + y * y),
        ],
        -1,
    ).reshape(*q.shape[:-1], 3, 3)


# ==================================================================================== the encoder
CONTEXT_KEYS = ("image", "intrinsics", "extrinsics", "near", "far")


class MVSplatEncoder(nn.Module):
    """MVSplat's ``EncoderCostVolume`` in the RE10K configuration (parameter names = ``re10k.ckpt``'s
    ``encoder.*`` keys without the prefix).

    ``enc(context)`` takes MVSplat's context dict -- ``image [B,V,3,H,W]`` in [0,1], ``intrinsics
    [B,V,3,3]`` normalised (row 0 / W, row 1 / H), ``extrinsics [B,V,4,4]`` camera-to-world (OpenCV),
    ``near``/``far [B,V]`` -- and returns ``means [B,V*H*W,3]``, ``covariances [B,V*H*W,3,3]``,
    ``harmonics [B,V*H*W,3,25]`` (world frame, e3nn basis), ``opacities [B,V*H*W]``, ``depths
    [B,V,H,W]`` (distance along each pixel's ray), ``densities [B,V,H,W]``, ``scales [B,V*H*W,3]`` and
    ``rotations [B,V*H*W,4]`` (camera frame, xyzw), ``raw_gaussians [B,V,H*W,84]``. Gaussian index =
    view * H * W + row * W + col. ``intermediates`` (a dict) is filled with the intermediate tensors
    under the reference fixture's names when given.
    """

    def __init__(self, **overrides: Any):
        super().__init__()
        unknown = set(overrides) - set(RE10K)
        if unknown:
            raise BenchError(f"unknown MVSplat encoder settings {sorted(unknown)}", f"use keys of {sorted(RE10K)}")
        self.cfg = {**RE10K, **overrides}
        self.backbone = _Backbone(self.cfg["d_feature"])
        self.depth_predictor = _DepthPredictor(self.cfg)
        self.register_buffer("sh_mask", self._sh_mask(), persistent=False)

    def _sh_mask(self) -> Tensor:
        """1 for degree 0, 0.1 * 0.25^l for degree l: damps the view-dependent coefficients."""
        mask = torch.ones((self.cfg["sh_degree"] + 1) ** 2)
        for l in range(1, self.cfg["sh_degree"] + 1):
            mask[l * l : (l + 1) ** 2] = 0.1 * 0.25**l
        return mask

    # -- loading ---------------------------------------------------------------------------------
    @staticmethod
    def read_encoder_state(path: str | Path) -> dict[str, Tensor]:
        """The ``encoder.*`` tensors of a Lightning checkpoint (``state_dict``) or of a bare state dict
        (safetensors / torch file), prefix removed; other keys (decoder, losses, ...) are ignored."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"MVSplat checkpoint {path} {what_is_at(path, 'file')}",
                "download MVSplat's re10k.ckpt (github donydchen/mvsplat, README 'pretrained "
                "models') and pass its path as method.reconstructor.checkpoint",
            )
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd: Any = load_file(str(path))
            else:  # a Lightning checkpoint's hyper-parameter objects are skipped, never run
                sd = load_torch(path)
        except PickleRefused as e:
            raise CheckpointError(
                f"cannot read MVSplat checkpoint {path}: {e}",
                "pass MVSplat's re10k.ckpt (a Lightning checkpoint) or a safetensors/pt file of its encoder.* weights",
            ) from None
        except Exception as e:
            raise CheckpointError(
                f"cannot read MVSplat checkpoint {path}: {type(e).__name__}: {e}",
                "pass MVSplat's re10k.ckpt (a Lightning checkpoint) or a safetensors/pt file of its encoder.* weights",
            ) from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} holds no state dict", "pass MVSplat's re10k.ckpt or an encoder.* state dict")
        enc = {k[len("encoder.") :]: v for k, v in sd.items() if isinstance(k, str) and k.startswith("encoder.")}
        if not enc:
            some = ", ".join(sorted(str(k) for k in sd)[:4])
            raise CheckpointError(
                f"{path} has no encoder.* keys (found {len(sd)} keys, e.g. {some})",
                "pass MVSplat's re10k.ckpt, whose state_dict holds the encoder under 'encoder.'",
            )
        return enc

    def load_encoder_state(self, sd: Mapping[str, Tensor], source: str = "checkpoint", assign: bool = False) -> None:
        """Strict load (names and shapes); the error names the missing/unexpected/mis-shaped keys."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        shapes = [
            f"encoder.{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(sd))
            if tuple(own[k].shape) != tuple(sd[k].shape)
        ]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(
                    f"{len(missing)} missing keys ({', '.join('encoder.' + k for k in missing[:6])}"
                    f"{', ...' if len(missing) > 6 else ''})"
                )
            if unexpected:
                parts.append(
                    f"{len(unexpected)} unexpected keys ({', '.join('encoder.' + k for k in unexpected[:6])}"
                    f"{', ...' if len(unexpected) > 6 else ''})"
                )
            if shapes:
                parts.append("shape mismatch (" + ", ".join(shapes[:4]) + ")")
            raise CheckpointError(
                f"{source} is not an MVSplat RE10K-configuration encoder: " + "; ".join(parts),
                "pass MVSplat's re10k.ckpt (128 depth candidates, 2 context views); other "
                "MVSplat configurations are not supported",
            )
        self.load_state_dict(dict(sd), strict=True, assign=assign)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MVSplatEncoder:
        """Strictly load a checkpoint (see :meth:`read_encoder_state`); the module is built without
        initialising its weights (they all come from the checkpoint), in eval mode, on the CPU."""
        sd = cls.read_encoder_state(path)
        with torch.device("meta"):
            enc = cls()
        enc.load_encoder_state(
            {k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
            source=f"MVSplat checkpoint {path}",
            assign=True,
        )
        enc.sh_mask = enc._sh_mask()
        return enc.eval()

    # -- forward ---------------------------------------------------------------------------------
    def check_context(self, context: Mapping[str, Tensor]) -> tuple[int, int, int, int]:
        missing = [k for k in CONTEXT_KEYS if k not in context]
        if missing:
            raise BenchError(f"MVSplat context lacks {missing}", f"pass a dict with {list(CONTEXT_KEYS)}")
        img = context["image"]
        if img.dim() != 5 or img.shape[2] != 3:
            raise BenchError(
                f"MVSplat context image must be [B,V,3,H,W], got {tuple(img.shape)}",
                "stack the context views as [batch, views, 3, H, W]",
            )
        B, V, _, H, W = img.shape
        if V != self.cfg["num_views"]:
            raise BenchError(
                f"the MVSplat encoder takes {self.cfg['num_views']} context views, got {V}",
                "pass exactly 2 context views",
            )
        if H % SIZE_MULTIPLE or W % SIZE_MULTIPLE:
            raise BenchError(
                f"MVSplat needs image sizes that are multiples of {SIZE_MULTIPLE}, got {H}x{W}",
                f"crop or resize the views to multiples of {SIZE_MULTIPLE} (e.g. "
                f"{H // SIZE_MULTIPLE * SIZE_MULTIPLE}x{W // SIZE_MULTIPLE * SIZE_MULTIPLE})",
            )
        for k, shape in (("intrinsics", (B, V, 3, 3)), ("extrinsics", (B, V, 4, 4)), ("near", (B, V)), ("far", (B, V))):
            if tuple(context[k].shape) != shape:
                raise BenchError(
                    f"MVSplat context {k} must be {list(shape)}, got {list(context[k].shape)}",
                    "see MVSplatEncoder's docstring for the context format",
                )
        near, far = context["near"], context["far"]
        if not bool(((near > 0) & (far > near)).all()):
            raise BenchError(
                "MVSplat needs 0 < near < far for every context view",
                "set method.reconstructor.near / far to the scene's depth range",
            )
        return B, V, H, W

    def forward(
        self, context: Mapping[str, Tensor], global_step: int = 0, intermediates: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Gaussians of the two context views: backbone, cost volume and coarse depth, refinement and heads
        at full resolution (``intermediates``, when given, receives the named tensors along the way)."""
        B, V, H, W = self.check_context(context)
        inter = intermediates if intermediates is not None else {}
        images = context["image"]
        cnn, trans = self._backbone_features(images, B, V, H, W, inter)
        feat, cv_in, disp, lo, hi = self._cost_volume(trans, cnn.shape[2:], context, inter)
        dp = self.depth_predictor
        net = dp.corr_refine_net
        u_in = net[2](net[1](net[0](cv_in)))
        u_out = net[3](u_in)
        refined = net[4](u_out)
        resid = dp.regressor_residual(cv_in)
        inter.update(
            {
                "inter.costvolume_unet_in": u_in,
                "inter.costvolume_unet_out": u_out,
                "inter.corr_refine_out": refined,
                "inter.corr_residual_out": resid,
            }
        )
        logits = dp.depth_head_lowres(refined + resid)
        inter["inter.depth_logits_lowres"] = logits
        pdf = logits.softmax(1)
        coarse = (disp[:, :, None, None] * pdf).sum(1, keepdim=True)
        peak = F.interpolate(pdf.max(1, keepdim=True)[0], scale_factor=dp.up)  # nearest
        full = F.interpolate(coarse, scale_factor=dp.up, mode="bilinear", align_corners=True)
        depth, density, raw = self._refine(images, feat, cnn, full, peak, lo, hi, B, inter)
        out = self.adapt(raw, depth, density, context, global_step, inter)
        out.update(depths=depth, densities=density, raw_gaussians=raw)
        return out

    def _backbone_features(self, images: Tensor, B: int, V: int, H: int, W: int, inter: dict):
        """``(cnn, trans)`` ``[B,V,C,h,w]``: the CNN on (b v) normalised images, a sine position encoding
        per attention window, then the multi-view transformer."""
        dtype = images.dtype
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=images.device).reshape(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=dtype, device=images.device).reshape(3, 1, 1)
        x = ((images - mean) / std).reshape(B * V, 3, H, W)
        inter["inter.cnn_input_normalized"] = x
        cnn = self.backbone.backbone(x)
        C, h, w = cnn.shape[1:]
        cnn = cnn.reshape(B, V, C, h, w)
        k = self.cfg["attn_splits"]
        if h % k or w % k:
            raise BenchError(
                f"feature map {h}x{w} does not split into {k}x{k} windows",
                f"use image sizes that are multiples of {SIZE_MULTIPLE}",
            )
        pos = sine_position(h // k, w // k, C, images.device, dtype).repeat(1, k, k)
        views = [cnn[:, i] + pos for i in range(V)]
        for i, t in enumerate(views):
            inter[f"inter.transformer_input.view{i}"] = t
        trans = torch.stack(self.backbone.transformer(views, k), 1)  # [B,V,C,h,w]
        inter["inter.backbone_cnn_features"], inter["inter.backbone_trans_features"] = cnn, trans
        return cnn, trans

    def _cost_volume(self, trans: Tensor, grid, context: Mapping[str, Tensor], inter: dict):
        """``(feat, cost volume + feat, disparity candidates, 1/far, 1/near)``, all in (v b) order: the
        plane-sweep correlation of each view's features with the other view's (``grid``: the CNN's C, h, w)."""
        C, h, w = grid
        dtype, device = context["image"].dtype, context["image"].device
        feat = _vb(trans)
        other = _vb(trans[:, [1, 0]])
        E = context["extrinsics"]
        rel = torch.linalg.inv(E[:, 1]) @ E[:, 0]  # ref cam 0 -> cam 1
        pose = torch.cat([rel, torch.linalg.inv(rel)])
        K = _vb(context["intrinsics"]).clone()
        K[:, 0] *= float(w)
        K[:, 1] *= float(h)
        lo, hi = 1.0 / _vb(context["far"])[:, None], 1.0 / _vb(context["near"])[:, None]
        D = self.cfg["num_depth_candidates"]
        disp = (lo + torch.linspace(0.0, 1.0, D, device=device)[None] * (hi - lo)).to(dtype)  # [(vb),D]
        warped = plane_sweep(feat, other, K, pose, 1.0 / disp)
        corr = (feat[:, :, None] * warped).sum(1) / math.sqrt(C)
        cv_in = torch.cat([corr, feat], 1)
        inter["inter.costvolume_and_feat"] = cv_in
        return feat, cv_in, disp, lo, hi

    def _refine(self, images, feat, cnn, full, peak, lo, hi, B: int, inter: dict):
        """``(depth [B,V,H,W], density [B,V,H,W], raw Gaussians [B,V,HW,84])``: the refinement U-Net and
        heads at full resolution on the images, upsampled features and coarse depth."""
        dp = self.depth_predictor
        imgs = _vb(images)
        up = dp.upsampler(torch.cat([feat, _vb(cnn)], 1))
        proj = dp.proj_feature(up)
        r_in = torch.cat([imgs, proj, full, peak], 1)
        rn = dp.refine_unet
        r_uin = rn[2](rn[1](rn[0](r_in)))
        r_out = rn[3](r_uin)
        inter.update(
            {
                "inter.upsampler_out": up,
                "inter.refine_in": r_in,
                "inter.refine_unet_in": r_uin,
                "inter.refine_out": r_out,
            }
        )
        raw = dp.to_gaussians(torch.cat([r_out, imgs, up], 1))  # [(vb),84,H,W]
        dd = dp.to_disparity(r_out)
        inter["inter.delta_disp_and_raw_density"] = dd
        density = torch.sigmoid(dd[:, 1:2])
        fine = (full + dd[:, :1]).clamp(lo[:, :, None, None], hi[:, :, None, None])
        depth = _bv((1.0 / fine)[:, 0], B)  # [B,V,H,W]
        return depth, _bv(density[:, 0], B), _bv(raw, B).flatten(3).transpose(2, 3)

    def opacity(self, density: Tensor, global_step: int) -> Tensor:
        cfg = self.cfg
        x = cfg["opacity_initial"] + min(global_step / cfg["opacity_warm_up"], 1) * (
            cfg["opacity_final"] - cfg["opacity_initial"]
        )
        e = 2.0**x
        return 0.5 * (1 - (1 - density) ** e + density ** (1 / e))

    def adapt(
        self,
        raw: Tensor,
        depth: Tensor,
        density: Tensor,
        context: Mapping[str, Tensor],
        global_step: int,
        inter: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """Raw head output ``[B,V,HW,84]`` + depths -> world-space Gaussians (MVSplat's GaussianAdapter)."""
        B, V, HW, _ = raw.shape
        H, W = depth.shape[-2:]
        cfg = self.cfg
        dev, dt = raw.device, raw.dtype
        ys, xs = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
        centre = torch.stack([(xs.reshape(-1) + 0.5) / W, (ys.reshape(-1) + 0.5) / H], -1).to(dt)  # [HW,2]
        pix = torch.tensor([1.0 / W, 1.0 / H], dtype=dt, device=dev)
        xy = centre + (raw[..., :2].sigmoid() - 0.5) * pix  # [B,V,HW,2]
        inter["inter.adapter_xy"] = xy[:, :, :, None, None, :]
        Kn, E = context["intrinsics"], context["extrinsics"]
        d = depth.reshape(B, V, HW)
        mult = 0.1 * (torch.linalg.inv(Kn[..., :2, :2]) @ pix).sum(-1)  # [B,V]
        scales = cfg["scale_min"] + (cfg["scale_max"] - cfg["scale_min"]) * raw[..., 2:5].sigmoid()
        scales = scales * d[..., None] * mult[:, :, None, None]
        q = raw[..., 5:9]
        q = q / (q.norm(dim=-1, keepdim=True) + 1e-8)
        d_sh = (cfg["sh_degree"] + 1) ** 2
        sh = raw[..., 9 : 9 + 3 * d_sh].reshape(B, V, HW, 3, d_sh) * self.sh_mask.to(dt)
        Rq = quat_xyzw_to_rotmat(q)
        cov = Rq @ torch.diag_embed(scales * scales) @ Rq.transpose(-1, -2)
        Rc = E[:, :, None, :3, :3]
        cov = Rc @ cov @ Rc.transpose(-1, -2)
        # rays: K^-1 [x, y, 1] (normalised K, normalised coordinates), unit length, to world
        Kinv = torch.linalg.inv(Kn)[:, :, None]
        dirs = (Kinv @ torch.cat([xy, torch.ones_like(xy[..., :1])], -1)[..., None])[..., 0]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        dirs = (Rc @ dirs[..., None])[..., 0]
        means = E[:, :, None, :3, 3] + dirs * d[..., None]
        harm = rotate_harmonics(sh, E[:, :, None, None, :3, :3])
        opac = self.opacity(density.reshape(B, V, HW), global_step)
        N = V * HW
        return {
            "means": means.reshape(B, N, 3),
            "covariances": cov.reshape(B, N, 3, 3),
            "harmonics": harm.reshape(B, N, 3, d_sh),
            "opacities": opac.reshape(B, N),
            "scales": scales.reshape(B, N, 3),
            "rotations": q.reshape(B, N, 4),
        }
