"""Tiled pure-torch Gaussian splatting (the CPU engine), numerically following gsplat 1.5.3.

Design (docs/ARCHITECTURE.md, "splatting"):

1. project all Gaussians into all cameras in plain torch (:func:`bench.splat.project.project`);
2. bin them into square tiles of ``tile`` pixels (gsplat's opacity-aware boxes, minus the tiles where
   the exact minimum of the Gaussian's quadratic form keeps alpha below 1/255) and sort each tile's
   list front to back (stable sort on camera z, ties by Gaussian index, like gsplat's radix sort);
3. render tiles in chunks (``budget`` bounds a chunk's [tiles, tile pixels, seg] blocks), each chunk's
   lists padded to its longest and walked front to back ``seg`` Gaussians at a time. Per segment:
   the Mahalanobis terms are one small batched matmul (tile-centred pixel monomials
   ``[u^2, v^2, uv, u, v, 1]`` x per-Gaussian coefficients), transmittance is a cumulative product
   of ``1 - alpha`` carried across segments (gsplat's own float32 arithmetic ``T *= 1 - alpha``; it
   measured faster than the cumulative sum of logs and needs no transcendental), and features come
   out of a batched matmul of the
   blending weights [pixels, seg] with the gathered feature rows [seg, D]; camera z and 1 form two more
   channels (expected depth, alpha). A tile leaves the walk when its list ends or all its pixels are
   done (gsplat's early exit).

Compositing is a custom :class:`torch.autograd.Function` with the analytic backward of the blend (the
formulas of gsplat's backward kernel). It keeps only per-Gaussian inputs, the tile lists and the
transmittance in front of each segment ([tiles, pixels] per segment); backward recomputes one
segment at a time, back to front, accumulating the "light behind" sums exactly. Memory is therefore
bounded by one block plus the [tiles, pixels, D] outputs, whatever the number of Gaussians. Measured
on 4 views x 37x37 Gaussians into 4 cameras at 74x74, D=384, one thread: plain autograd through the
same segments took 1.3x the time and 1.6x the peak RSS; keeping the forward blocks for the backward
instead of recomputing them saves only ~10 % time for O(pairs) memory.

Compositing rules per pixel, front to back: ``alpha = min(0.999, o * exp(-sigma))``; alphas < 1/255 are
skipped (T unchanged); the pixel stops at the first Gaussian whose ``T * (1 - alpha)`` would be
``<= 1e-4`` (that one is not composited). Because T only decreases, "composited" is exactly
"not skipped and T after it > 1e-4". (gsplat also skips ``sigma < 0``, which cannot happen for
a positive definite conic; the expanded quadratic here can round to -1e-7 near the centre, so the
engine does not test it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from .project import ALPHA_MAX, ALPHA_THRESHOLD, T_MIN, project

T_FLOOR = 1e-30  # carried T of finished pixels is floored here (avoids denormals; far below T_MIN)


@dataclass
class Chunk:
    tiles: Tensor  # [nt] global tile ids (camera * TY * TX + ty * TX + tx)
    gids: Tensor  # [nt, G] flat ids camera * N + n, front to back; padding = C * N
    fids: Tensor  # [nt, G] feature row n; padding = N
    counts: Tensor  # [nt] list lengths
    mono: Tensor  # [nt, P, 6] pixel monomials u^2, v^2, uv, u, v, 1 (u, v relative to the tile centre)
    centre: Tensor  # [nt, 2] tile centre in pixels
    inside: Tensor  # [nt, P] pixel lies inside the image


@dataclass
class Plan:
    C: int
    N: int
    tile: int
    TX: int
    TY: int
    seg: int
    chunks: List[Chunk]


def _touches(m: Tensor, co: Tensor, o: Tensor, x0: Tensor, y0: Tensor, tile: int) -> Tensor:
    """Whether a Gaussian (mean m [n,2], conic co [n,3], opacity o [n]) can reach alpha >= 1/255 at a
    pixel centre of the tile with corner (x0, y0): the exact minimum of the quadratic form over the
    rectangle spanned by the tile's pixel centres, with a 1 % margin on alpha."""
    a, b, c = co.unbind(-1)
    lx, hx = x0 + 0.5 - m[:, 0], x0 + tile - 0.5 - m[:, 0]  # offsets pixel - mean
    ly, hy = y0 + 0.5 - m[:, 1], y0 + tile - 0.5 - m[:, 1]
    q = lambda dx, dy: 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    edges = [q(dx, torch.minimum(torch.maximum(-b * dx / c, ly), hy)) for dx in (lx, hx)]
    edges += [q(torch.minimum(torch.maximum(-b * dy / a, lx), hx), dy) for dy in (ly, hy)]
    inside = (lx <= 0) & (hx >= 0) & (ly <= 0) & (hy >= 0)
    low = torch.where(inside, 0.0, torch.stack(edges).amin(0))
    return low <= torch.log(o / ALPHA_THRESHOLD) + 0.01


def _plan(proj, opac: Tensor, width: int, height: int, tile: int, seg: int, budget: int) -> Plan:
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
        ix, iy = x0[rep] + local % nx[rep], y0[rep] + local // nx[rep]
        # drop (tile, Gaussian) pairs whose alpha stays below 1/255 on the whole tile (~20% of the box's)
        keep = _touches(
            proj.mean2d.detach()[cam, gid][rep],
            proj.conic.detach()[cam, gid][rep],
            opac.detach().expand(C, N)[cam, gid][rep],
            ix * tile,
            iy * tile,
            tile,
        )
        rep, ix, iy = rep[keep], ix[keep], iy[keep]
        tid = cam[rep] * (TY * TX) + iy * TX + ix
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
        j = torch.arange(tile, device=dev, dtype=proj.mean2d.dtype) - (tile - 1) / 2  # centre offsets
        du, dv = j[None, :].expand(tile, tile).reshape(-1), j[:, None].expand(tile, tile).reshape(-1)
        mono = torch.stack([du * du, dv * dv, du * dv, du, dv, torch.ones_like(du)], -1)  # [P,6]
        chunks, i = [], 0
        nt = max(1, budget // (P * seg))
        while i < len(lens) and lens[i] > 0:
            G = lens[i]
            tiles = by_len[i : i + nt]
            tiles = tiles[counts[tiles] > 0]
            i += nt
            k = torch.arange(G, device=dev)
            pos = (starts[tiles, None] + k).clamp_max(max(len(flat) - 1, 0))
            pad = k >= counts[tiles, None]
            gids = torch.where(pad, C * N, flat[pos])
            fids = torch.where(pad, N, gids % N)
            centre = torch.stack([tiles % TX, (tiles // TX) % TY], -1).to(mono.dtype) * tile + tile / 2
            inside = (centre[:, None, 0] + du < width) & (centre[:, None, 1] + dv < height)
            chunks.append(Chunk(tiles, gids, fids, counts[tiles], mono.expand(len(tiles), P, 6), centre, inside))
    return Plan(C, N, tile, TX, TY, seg, chunks)


def _coefs(m: Tensor, co: Tensor, centre: Tensor) -> Tensor:
    """Coefficients [na,6,S] with sigma = mono @ coef for means m [na,S,2], conics co [na,S,3]."""
    x, y = (m - centre[:, None, :]).unbind(-1)
    a, b, c = co.unbind(-1)
    return torch.stack(
        [0.5 * a, 0.5 * c, b, -(a * x + b * y), -(c * y + b * x), 0.5 * a * x * x + 0.5 * c * y * y + b * x * y], 1
    )


def _segment(ch: Chunk, act, s: int, S: int, T0: Tensor, mean2d: Tensor, conic: Tensor, opac: Tensor):
    """Gaussians s:s+S of the active tiles ``act`` (None = all) of a chunk, given the transmittance
    ``T0 [na,P]`` in front of them: blending weights w [na,P,S], T after each, and the quantities the
    backward needs. T is a running product like gsplat's ``T *= 1 - alpha``."""
    gids = ch.gids[:, s : s + S] if act is None else ch.gids[act, s : s + S]
    mono, centre = (ch.mono, ch.centre) if act is None else (ch.mono[act], ch.centre[act])
    o = opac[gids][:, None, :]
    raw = torch.exp(torch.bmm(mono, _coefs(mean2d[gids], conic[gids], centre)).neg_()).mul_(o)  # o exp(-sigma)
    a = raw.clamp(max=ALPHA_MAX).mul_(raw >= ALPHA_THRESHOLD)  # skipped alphas -> 0
    q = 1 - a
    Ta = torch.cumprod(q, -1).mul_(T0[..., None])  # T after each Gaussian
    incl = Ta > T_MIN
    Tb = Ta / q  # T in front of each Gaussian
    w = (a * Tb).mul_(incl)
    return w, Ta, gids, dict(raw=raw, a=a, q=q, T=Tb, incl=incl, mono=mono, centre=centre)


def _sel(x: Tensor, act):
    return x if act is None else x.index_select(0, act)


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]`` for a 2D index, via index_select (much faster than advanced indexing on CPU)."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])


class _Composite(torch.autograd.Function):
    """(mean2d [CN+1,2], conic [CN+1,3], opac [CN+1], feat [N+1,D], z [CN+1])
    -> features [nTiles,P,D], (depth-sum, alpha) [nTiles,P,2]; the extra rows are padding."""

    @staticmethod
    def forward(ctx, mean2d, conic, opac, feat, z, plan: Plan):
        P, D, S = plan.tile**2, feat.shape[1], plan.seg
        n_all = plan.C * plan.TY * plan.TX
        out_f, out_za = feat.new_zeros(n_all, P, D), feat.new_zeros(n_all, P, 2)
        walks = []
        for ch in plan.chunks:
            T = ch.inside.to(feat.dtype)  # [nt,P] transmittance; pixels outside the image are done
            acc_f, acc_za = feat.new_zeros(len(ch.tiles), P, D), feat.new_zeros(len(ch.tiles), P, 2)
            act, segs = None, []
            for s in range(0, ch.gids.shape[1], S):
                idx = torch.arange(len(ch.tiles), device=feat.device) if act is None else act
                keep = (ch.counts[idx] > s) & (T[idx].amax(-1) > T_MIN)
                if not keep.all():
                    act = idx[keep]
                    if len(act) == 0:
                        break
                T0 = _sel(T, act)
                w, Ta, gids, _ = _segment(ch, act, s, S, T0, mean2d, conic, opac)
                segs.append((s, act, T0))
                f = torch.bmm(w, _rows(feat, _sel(ch.fids, act)[:, s : s + S]))
                zg = z[gids]
                za = torch.bmm(w, torch.stack([zg, torch.ones_like(zg)], -1))
                if act is None:
                    acc_f += f
                    acc_za += za
                    T = Ta[..., -1].clamp_min(T_FLOOR)
                else:
                    acc_f.index_add_(0, act, f)
                    acc_za.index_add_(0, act, za)
                    T[act] = Ta[..., -1].clamp_min(T_FLOOR)
            out_f.index_copy_(0, ch.tiles, acc_f)
            out_za.index_copy_(0, ch.tiles, acc_za)
            walks.append(segs)
        ctx.plan, ctx.walks = plan, walks
        ctx.save_for_backward(mean2d, conic, opac, feat, z)
        return out_f, out_za

    @staticmethod
    def backward(ctx, g_out_f, g_out_za):
        mean2d, conic, opac, feat, z = ctx.saved_tensors
        plan, S = ctx.plan, ctx.plan.seg
        g_m, g_c, g_o = torch.zeros_like(mean2d), torch.zeros_like(conic), torch.zeros_like(opac)
        g_f, g_z = torch.zeros_like(feat), torch.zeros_like(z)
        strict = torch.ones(S, S, dtype=feat.dtype, device=feat.device).triu(1).T  # [k,i] = 1 if k > i
        for ch, segs in zip(plan.chunks, ctx.walks):
            gf_all, gza_all = g_out_f.index_select(0, ch.tiles), g_out_za.index_select(0, ch.tiles)
            behind = feat.new_zeros(len(ch.tiles), plan.tile**2)  # sum over later segments of dL/dw w
            for s, act, T0 in reversed(segs):
                w, _, gids, st = _segment(ch, act, s, S, T0, mean2d, conic, opac)
                fids = _sel(ch.fids, act)[:, s : s + S]
                gf, gza, f, zg = _sel(gf_all, act), _sel(gza_all, act), _rows(feat, fids), z[gids]
                n = gids.shape[1]
                wt = w.transpose(1, 2)
                g_f.index_add_(0, fids.reshape(-1), torch.bmm(wt, gf).reshape(-1, f.shape[-1]))
                g_z.index_add_(0, gids.reshape(-1), torch.bmm(wt, gza[..., :1]).reshape(-1))
                # dL/dw, then through w_i = a_i prod_{j<i} (1 - a_j):
                # dL/da_i = dL/dw_i T_i - sum_{k>i} dL/dw_k w_k / (1 - a_i)
                dw = torch.bmm(gf, f.transpose(1, 2)).add_(gza[..., :1] * zg[:, None, :]).add_(gza[..., 1:])
                v = dw * w
                b = _sel(behind, act)
                later = (v.reshape(-1, n) @ strict[:n, :n]).reshape(v.shape).add_(b[..., None])
                if act is None:
                    behind = later[..., 0] + v[..., 0]
                else:
                    behind[act] = later[..., 0] + v[..., 0]
                a = st["a"]
                da = (dw * st["T"]).sub_(later / st["q"]).mul_(st["incl"] & (a > 0))
                dsig = da.mul_(st["raw"] <= ALPHA_MAX).mul_(st["raw"]).neg_()  # cap passes no gradient
                dcoef = torch.bmm(st["mono"].transpose(1, 2), dsig)  # [na,6,S]
                o = opac[gids]
                g_o.index_add_(0, gids.reshape(-1), torch.where(o > 0, -dcoef[:, 5] / o, 0).reshape(-1))
                with torch.enable_grad():
                    m, co = mean2d[gids].requires_grad_(), conic[gids].requires_grad_()
                    gm, gc = torch.autograd.grad(_coefs(m, co, st["centre"]), (m, co), dcoef)
                g_m.index_add_(0, gids.reshape(-1), gm.reshape(-1, 2))
                g_c.index_add_(0, gids.reshape(-1), gc.reshape(-1, 3))
        return g_m, g_c, g_o, g_f, g_z, None


def rasterize_tiled(
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
    tile: int = 8,
    seg: int = 64,
    budget: int = 1 << 20,
    covars: Optional[Tensor] = None,
):
    """Tiled engine; same contract as :func:`bench.splat.rasterize`."""
    C, N, D = w2c.shape[0], means.shape[0], features.shape[1]
    proj = project(means, quats, scales, opacities, w2c, K, width, height, near, far, eps2d, covars)
    plan = _plan(proj, opacities, width, height, tile, seg, budget)

    def ext(x: Tensor) -> Tensor:  # flatten [C,N,...] and append one zero padding row
        x = x.reshape(C * N, *x.shape[2:])
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])

    f, za = _Composite.apply(
        ext(proj.mean2d),
        ext(proj.conic),
        ext(opacities.expand(C, N)),
        torch.cat([features, features.new_zeros(1, D)]),
        ext(proj.depth),
        plan,
    )
    t = plan.tile

    def image(x: Tensor) -> Tensor:  # [nTiles,P,k] -> [C,H,W,k]
        x = x.reshape(C, plan.TY, plan.TX, t, t, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(C, plan.TY * t, plan.TX * t, -1)[:, :height, :width]

    za = image(za)
    alpha = za[..., 1]
    return image(f), alpha, za[..., 0] / alpha.clamp(min=1e-10)
