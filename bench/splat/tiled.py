"""Tiled pure-torch Gaussian splatting (the CPU engine), numerically following gsplat 1.5.3.

Design (see ENVIRONMENT.md, "CPU fallback design"):

1. project all Gaussians into all cameras in plain torch (:func:`bench.splat.project.project`);
2. bin them into square tiles of ``tile`` pixels (opacity-aware boxes, as gsplat) and sort each tile's
   list front to back (stable sort on camera z, ties by Gaussian index, like gsplat's radix sort);
3. render tiles in chunks of similar list length, each list padded to the chunk's longest: for a chunk
   the alphas are a dense [tiles, tile pixels, G] block, transmittance is the exclusive cumulative sum
   of ``log(1 - alpha)``, and features, depth and alpha come out of one batched matrix multiply of the
   blending weights with the gathered [G, D+2] rows (features, camera z, 1).

The compositing is a custom :class:`torch.autograd.Function` with the analytic backward of the
front-to-back blend (the same formulas as gsplat's backward kernel): it keeps only the per-Gaussian
inputs and the tile lists, and recomputes a chunk's alphas in backward, so memory stays bounded by one
chunk (``budget`` elements per [tiles, pixels, G] block) whatever the scene size.

Compositing rules per pixel, front to back: ``alpha = min(0.999, o * exp(-sigma))``; Gaussians with
``sigma < 0`` or ``alpha < 1/255`` are skipped (T unchanged); the pixel stops at the first Gaussian whose
``T * (1 - alpha)`` would be ``<= 1e-4`` (that Gaussian is not composited). Because T only decreases,
"composited" is exactly ``candidate and cumulative T after it > 1e-4``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor

from .project import ALPHA_MAX, ALPHA_THRESHOLD, T_MIN, project

LOG_T_MIN = math.log(T_MIN)


@dataclass
class Chunk:
    tiles: Tensor  # [nt] global tile ids (camera * TY * TX + ty * TX + tx)
    gids: Tensor  # [nt, G] flat ids camera * N + n, front to back; padding = C * N
    fids: Tensor  # [nt, G] feature row n; padding = N
    px: Tensor  # [nt, P] pixel-centre x of each tile pixel
    py: Tensor  # [nt, P]


@dataclass
class Plan:
    C: int
    N: int
    tile: int
    TX: int
    TY: int
    chunks: List[Chunk]


def _plan(proj, width: int, height: int, tile: int, budget: int) -> Plan:
    """Bin projected Gaussians into tiles, sort front to back, group tiles into chunks."""
    C, N = proj.depth.shape
    TX, TY = math.ceil(width / tile), math.ceil(height / tile)
    dev = proj.depth.device
    with torch.no_grad():
        cam, gid = proj.valid.nonzero(as_tuple=True)
        m = proj.mean2d.detach()[cam, gid] / tile
        r = proj.radius[cam, gid] / tile
        # gsplat IntersectTile: [floor(m - r), ceil(m + r)) clipped to the tile grid
        x0 = torch.floor(m[:, 0] - r[:, 0]).clamp(0, TX).long()
        x1 = torch.ceil(m[:, 0] + r[:, 0]).clamp(0, TX).long()
        y0 = torch.floor(m[:, 1] - r[:, 1]).clamp(0, TY).long()
        y1 = torch.ceil(m[:, 1] + r[:, 1]).clamp(0, TY).long()
        nx = x1 - x0
        cnt = nx * (y1 - y0)
        rep = torch.repeat_interleave(torch.arange(len(cnt), device=dev), cnt)
        local = torch.arange(len(rep), device=dev) - (torch.cumsum(cnt, 0) - cnt)[rep]
        tid = cam[rep] * (TY * TX) + (y0[rep] + local // nx[rep]) * TX + x0[rep] + local % nx[rep]
        depth = torch.where(proj.valid, proj.depth.detach(), torch.inf)
        order = torch.argsort(depth, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=dev).expand(C, N))
        key, perm = torch.sort(tid * N + rank[cam[rep], gid[rep]])
        flat = (cam * N + gid)[rep][perm]
        counts = torch.bincount(key // N, minlength=C * TY * TX)
        starts = torch.cumsum(counts, 0) - counts
        by_len = torch.argsort(counts, descending=True, stable=True)
        lens = counts[by_len].tolist()
        P = tile * tile
        j = torch.arange(tile, device=dev, dtype=proj.mean2d.dtype) + 0.5
        chunks, i = [], 0
        while i < len(lens) and lens[i] > 0:
            G = lens[i]
            nt = max(1, budget // (P * G))
            tiles = by_len[i:i + nt]
            tiles = tiles[counts[tiles] > 0]
            i += nt
            k = torch.arange(G, device=dev)
            pos = (starts[tiles, None] + k).clamp_max(max(len(flat) - 1, 0))
            pad = k >= counts[tiles, None]
            gids = torch.where(pad, C * N, flat[pos])
            fids = torch.where(pad, N, gids % N)
            tx, ty = tiles % TX, (tiles // TX) % TY
            px = (tx[:, None, None] * tile + j[None, None, :]).expand(-1, tile, tile).reshape(-1, P)
            py = (ty[:, None, None] * tile + j[None, :, None]).expand(-1, tile, tile).reshape(-1, P)
            chunks.append(Chunk(tiles, gids, fids, px, py))
    return Plan(C, N, tile, TX, TY, chunks)


def _blend(ch: Chunk, mean2d: Tensor, conic: Tensor, opac: Tensor):
    """Blending weights of one chunk (forward quantities reused by the backward)."""
    m, co, o = mean2d[ch.gids], conic[ch.gids], opac[ch.gids]  # [nt,G,*]
    dx = m[:, None, :, 0] - ch.px[:, :, None]  # [nt,P,G]
    dy = m[:, None, :, 1] - ch.py[:, :, None]
    a_, b_, c_ = (co[:, None, :, i] for i in range(3))
    sigma = 0.5 * (a_ * dx * dx + c_ * dy * dy) + b_ * dx * dy
    e = torch.exp(-sigma)
    raw = o[:, None, :] * e
    alpha = raw.clamp(max=ALPHA_MAX)
    cand = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    a = torch.where(cand, alpha, 0)
    l = torch.log1p(-a)
    L = torch.cumsum(l, -1)  # log T after each Gaussian
    incl = cand & (L > LOG_T_MIN)
    T = torch.exp(L - l)  # T before each Gaussian
    w = torch.where(incl, a * T, 0)
    return w, dict(dx=dx, dy=dy, abc=(a_, b_, c_), e=e, raw=raw, a=a, T=T, incl=incl)


class _Composite(torch.autograd.Function):
    """(mean2d [CN+1,2], conic [CN+1,3], opac [CN+1], feat [N+1,D], z [CN+1]) -> tiles [nTiles,P,D+2]."""

    @staticmethod
    def forward(ctx, mean2d, conic, opac, feat, z, plan: Plan):
        P, D = plan.tile ** 2, feat.shape[1]
        out = feat.new_zeros(plan.C * plan.TY * plan.TX, P, D + 2)
        for ch in plan.chunks:
            w, _ = _blend(ch, mean2d, conic, opac)
            out[ch.tiles, :, :D] = torch.bmm(w, feat[ch.fids])
            zg = z[ch.gids]
            out[ch.tiles, :, D:] = torch.bmm(w, torch.stack([zg, torch.ones_like(zg)], -1))
        ctx.plan = plan
        ctx.save_for_backward(mean2d, conic, opac, feat, z)
        return out

    @staticmethod
    def backward(ctx, gout):
        mean2d, conic, opac, feat, z = ctx.saved_tensors
        plan, D = ctx.plan, feat.shape[1]
        g_m, g_c, g_o = torch.zeros_like(mean2d), torch.zeros_like(conic), torch.zeros_like(opac)
        g_f, g_z = torch.zeros_like(feat), torch.zeros_like(z)
        for ch in plan.chunks:
            w, s = _blend(ch, mean2d, conic, opac)
            go = gout[ch.tiles]  # [nt,P,D+2]
            f, zg = feat[ch.fids], z[ch.gids]
            wt = w.transpose(1, 2)
            g_f.index_add_(0, ch.fids.reshape(-1), torch.bmm(wt, go[..., :D]).reshape(-1, D))
            g_z.index_add_(0, ch.gids.reshape(-1), torch.bmm(wt, go[..., D:D + 1]).reshape(-1))
            # dL/dw, then through w_i = a_i prod_{j<i} (1 - a_j)
            dw = torch.bmm(go[..., :D], f.transpose(1, 2)) + go[..., D:D + 1] * zg[:, None, :] + go[..., D + 1:]
            v = dw * w
            after = v.sum(-1, keepdim=True) - torch.cumsum(v, -1)  # sum over later Gaussians
            da = torch.where(s["incl"], dw * s["T"] - after / (1 - s["a"]), 0)
            draw = torch.where(s["raw"] <= ALPHA_MAX, da, 0)  # the cap passes no gradient
            dsig = -draw * s["raw"]
            dx, dy, (a_, b_, c_) = s["dx"], s["dy"], s["abc"]
            g_o.index_add_(0, ch.gids.reshape(-1), (draw * s["e"]).sum(1).reshape(-1))
            gm = torch.stack([(dsig * (a_ * dx + b_ * dy)).sum(1), (dsig * (c_ * dy + b_ * dx)).sum(1)], -1)
            gc = torch.stack([(0.5 * dsig * dx * dx).sum(1), (dsig * dx * dy).sum(1),
                              (0.5 * dsig * dy * dy).sum(1)], -1)
            g_m.index_add_(0, ch.gids.reshape(-1), gm.reshape(-1, 2))
            g_c.index_add_(0, ch.gids.reshape(-1), gc.reshape(-1, 3))
        return g_m, g_c, g_o, g_f, g_z, None


def rasterize_tiled(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, features: Tensor,
                    w2c: Tensor, K: Tensor, width: int, height: int, near: float = 0.01, far: float = 1e10,
                    eps2d: float = 0.3, tile: int = 8, budget: int = 1 << 21):
    """Tiled engine; same contract as :func:`bench.splat.rasterize`."""
    C, N, D = w2c.shape[0], means.shape[0], features.shape[1]
    proj = project(means, quats, scales, opacities, w2c, K, width, height, near, far, eps2d)
    plan = _plan(proj, width, height, tile, budget)

    def ext(x: Tensor) -> Tensor:  # flatten [C,N,...] and append one zero padding row
        x = x.reshape(C * N, *x.shape[2:])
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])

    opac = opacities.expand(C, N)
    out = _Composite.apply(ext(proj.mean2d), ext(proj.conic), ext(opac),
                           torch.cat([features, features.new_zeros(1, D)]), ext(proj.depth), plan)
    t = plan.tile
    img = out.reshape(C, plan.TY, plan.TX, t, t, D + 2).permute(0, 1, 3, 2, 4, 5)
    img = img.reshape(C, plan.TY * t, plan.TX * t, D + 2)[:, :height, :width]
    alpha = img[..., D + 1]
    return img[..., :D], alpha, img[..., D] / alpha.clamp(min=1e-10)
