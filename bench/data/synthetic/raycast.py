"""Ray caster: analytic ray-primitive intersection, procedural textures and Lambertian shading,
vectorised in torch; :func:`render_view` renders one view with exact depth, normals and labels."""

from __future__ import annotations

import functools
import math
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


_INF = float("inf")
_DT = torch.float32


# ----------------------------------------------------------------------------------------------
# Ray casting
# ----------------------------------------------------------------------------------------------
class Primitives:
    """Scene primitives as tensors. Index 0..5: room faces (x=0, x=Lx, y=0, y=Ly, floor, ceiling)."""

    def __init__(self, scene: dict):
        self.L = torch.tensor(scene["room"]["size"], dtype=_DT)
        self.objects = scene["objects"]
        self.C = [torch.tensor(o["center"], dtype=_DT) for o in self.objects]
        self.R = [torch.tensor(o["R"], dtype=_DT) for o in self.objects]
        self.size = [torch.tensor(o["size"], dtype=_DT) for o in self.objects]
        self.textures = scene["room"]["textures"] + [o["texture"] for o in self.objects]
        self.semantic = torch.tensor([0, 0, 0, 0, 1, 2] + [o["semantic"] for o in self.objects], dtype=torch.long)
        self.instance = torch.tensor([1, 2, 3, 4, 5, 6] + [o["instance"] for o in self.objects], dtype=torch.long)
        self.lights = [(torch.tensor(li["pos"], dtype=_DT), li["intensity"]) for li in scene["lights"]]
        self.ambient = scene["ambient"]


def _safe(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.full_like(d, 1e-30), d)


def _box_t(o: Tensor, d: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
    """Entry distance of rays ``o + t d`` (local frame, o outside) into box [-h, h]; and slab t's."""
    inv = 1.0 / _safe(d)
    t1, t2 = (-h - o) * inv, (h - o) * inv
    tmin = torch.minimum(t1, t2)
    tn, tf = tmin.amax(-1), torch.maximum(t1, t2).amin(-1)
    return torch.where((tf >= tn) & (tn > 0), tn, torch.full_like(tn, _INF)), tmin


def _cylinder_t(o: Tensor, d: Tensor, r: float, hh: float) -> Tuple[Tensor, Tensor]:
    """Entry distance into the capped cylinder x^2+y^2<=r^2, |z|<=hh (local); and a 'hit cap' mask."""
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = d[:, 0] * o[0] + d[:, 1] * o[1]
    c = o[0] ** 2 + o[1] ** 2 - r * r
    disc = b * b - a * c
    ts = (-b - disc.clamp_min(0).sqrt()) / _safe(a)
    zs = o[2] + ts * d[:, 2]
    side = (disc >= 0) & (a > 0) & (ts > 0) & (zs.abs() <= hh)
    t = torch.where(side, ts, torch.full_like(ts, _INF))
    cap = torch.zeros_like(side)
    if abs(float(o[2])) > hh:  # only the cap facing the camera
        zc = hh if float(o[2]) > 0 else -hh
        tc = (zc - o[2]) / _safe(d[:, 2])
        x, y = o[0] + tc * d[:, 0], o[1] + tc * d[:, 1]
        cap = (tc > 0) & (x * x + y * y <= r * r) & (tc < t)
        t = torch.where(cap, tc, t)
    return t, cap


def _bound_radius(ob: dict) -> float:
    s = ob["size"]
    return float(np.linalg.norm(s)) if ob["kind"] == "box" else (s[0] if ob["kind"] == "sphere" else math.hypot(*s))


def _screen_box(c: Tensor, rb: float, K: Tensor, w2c: Tensor, H: int, W: int):
    """Conservative pixel rectangle ``(y0, y1, x0, x1)`` covering a bounding sphere; ``None`` when the
    sphere is entirely behind the camera; the whole image when it crosses the camera plane."""
    cc = w2c[:3, :3].to(_DT) @ c + w2c[:3, 3].to(_DT)
    if float(cc[2]) + rb <= 0:
        return None
    if float(cc[2]) - rb <= 1e-3:
        return 0, H, 0, W
    corners = cc + rb * torch.tensor([[a, b, e] for a in (-1, 1) for b in (-1, 1) for e in (-1, 1)], dtype=_DT)
    uv = corners @ K.to(_DT).T
    uv = uv[:, :2] / uv[:, 2:]
    x0, y0 = (uv.amin(0).floor() - 1).tolist()
    x1, y1 = (uv.amax(0).ceil() + 1).tolist()
    x0, x1 = int(min(max(x0, 0), W)), int(min(max(x1, 0), W))
    y0, y1 = int(min(max(y0, 0), H)), int(min(max(y1, 0), H))
    return (y0, y1, x0, x1) if (x1 > x0 and y1 > y0) else None


def _room_hits(prims: Primitives, eye: Tensor, grid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(t, primitive index, normals)`` of the room seen from inside: each ray exits through its nearest face."""
    tax = torch.where(grid > 0, (prims.L - eye) / _safe(grid), -eye / _safe(grid))
    tax = torch.where(grid == 0, torch.full_like(tax, _INF), tax)
    t, axis = tax.min(-1)
    idx = 2 * axis + (grid.gather(-1, axis[..., None])[..., 0] > 0).long()
    normals = torch.nn.functional.one_hot(axis, 3).to(_DT) * torch.where(idx % 2 == 1, -1.0, 1.0).to(_DT)[..., None]
    return t, idx, normals


def _object_t(ob: dict, eye: Tensor, c: Tensor, R: Tensor, s: Tensor, d: Tensor):
    """``(t, local, aux)`` of rays ``eye + t d`` on one object (``t`` inf where missed); ``local``: eye and
    ``d`` in the object's frame (None for a sphere), ``aux``: what its normals need."""
    if ob["kind"] == "sphere":
        oc = eye - c
        a, b = (d * d).sum(-1), d @ oc
        disc = b * b - a * (oc @ oc - s[0] ** 2)
        tk = (-b - disc.clamp_min(0).sqrt()) / a
        return torch.where((disc >= 0) & (tk > 0), tk, torch.full_like(tk, _INF)), None, None
    local = (R.T @ (eye - c), d @ R)  # local frame (R: local -> world)
    tk, aux = (_box_t if ob["kind"] == "box" else lambda o, dl, sz: _cylinder_t(o, dl, float(sz[0]), float(sz[1])))(
        *local, s
    )
    return tk, local, aux


def _object_normal(ob: dict, k: int, prims: Primitives, eye: Tensor, d: Tensor, tm: Tensor, local, aux, mf: Tensor):
    """World normals of object ``k`` at the hits ``eye + tm d`` where it is the closest (``mf``: which of
    its tested rays those are)."""
    if ob["kind"] == "sphere":
        return eye + tm[:, None] * d - prims.C[k]
    ol, dl = local[0], local[1][mf]
    if ob["kind"] == "box":
        fa = aux[mf].argmax(-1)  # slab that was entered last
        nl = torch.nn.functional.one_hot(fa, 3).to(_DT) * -torch.sign(dl.gather(1, fa[:, None]))
    else:
        p = ol + tm[:, None] * dl
        zero = torch.zeros_like(p[:, 0])
        nl = torch.where(
            aux[mf][:, None],
            torch.stack([zero, zero, torch.sign(p[:, 2])], -1),
            torch.stack([p[:, 0], p[:, 1], zero], -1),
        )
    return nl @ prims.R[k].T


def cast_rays(
    prims: Primitives, eye: Tensor, dirs: Tensor, K: Tensor | None = None, w2c: Tensor | None = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Closest hit of rays ``eye + t * dirs`` (eye [3]; dirs world, any length).

    ``dirs`` is ``[N, 3]``, or ``[H, W, S, 3]`` (S rays per pixel of an H x W image seen by camera
    ``K, w2c``), in which case each object is only tested against the rays of the pixels its
    bounding sphere projects to (exact: a conservative screen-space cull).

    Returns ``t`` (in units of ``dirs``; with dirs = R^T K^-1 [u,v,1], t is the z-depth), the
    primitive index (0..5 room faces, 6+k object k) and world normals ``[..., 3]`` (unit, facing the
    ray origin), all shaped like ``dirs[..., 0]``.
    """
    eye, dirs = eye.to(_DT), dirs.to(_DT)
    if dirs.ndim == 2 or K is None:
        grid = dirs.reshape(1, -1, 1, 3)
        cull = None
    else:
        grid, cull = dirs, (K, w2c, dirs.shape[0], dirs.shape[1])
    G = grid.shape[:3]
    t, idx, normals = _room_hits(prims, eye, grid)
    hits = []
    for k, ob in enumerate(prims.objects):
        box = (0, G[0], 0, G[1]) if cull is None else _screen_box(prims.C[k], _bound_radius(ob), *cull)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        tk, local, aux = _object_t(ob, eye, prims.C[k], prims.R[k], prims.size[k], grid[y0:y1, x0:x1].reshape(-1, 3))
        tk = tk.reshape((y1 - y0, x1 - x0, G[2]))
        closer = tk < t[y0:y1, x0:x1]
        t[y0:y1, x0:x1] = torch.where(closer, tk, t[y0:y1, x0:x1])
        idx[y0:y1, x0:x1][closer] = 6 + k
        hits.append((k, ob, box, local, aux))

    for k, ob, (y0, y1, x0, x1), local, aux in hits:  # normals where k is the closest
        m = idx[y0:y1, x0:x1] == 6 + k
        if not bool(m.any()):
            continue
        d, tm = grid[y0:y1, x0:x1][m], t[y0:y1, x0:x1][m]
        sub = normals[y0:y1, x0:x1]
        sub[m] = _object_normal(ob, k, prims, eye, d, tm, local, aux, m.reshape(-1))
    normals = torch.nn.functional.normalize(normals, dim=-1)
    normals = torch.where(((normals * grid).sum(-1) > 0)[..., None], -normals, normals)
    shape = dirs.shape[:-1]
    return t.reshape(shape), idx.reshape(shape), normals.reshape(*shape, 3)


def _waves(p: Tensor, waves: Tensor, scale: float) -> Tensor:
    """Smooth noise in [-1, 1]: normalised sum of sinusoids."""
    s = torch.sin(2 * math.pi * (p @ waves[:, :3].T) / scale + waves[:, 3]) @ waves[:, 4]
    return s / waves[:, 4].sum()


def _albedo(tex: dict, p: Tensor, flat: Tensor) -> Tensor:
    """Procedural albedo [N,3] at local points ``p [N,3]``. ``flat [N,3]`` marks the coordinate that
    is constant on a planar face (its normal axis): it is dropped so the pattern cannot flicker
    between cells on a face that lies exactly on a cell boundary."""
    s = tex["scale"]
    ph = torch.tensor(tex["phase"], dtype=_DT)
    waves = torch.tensor(tex["waves"], dtype=_DT)
    q = torch.where(flat, ph.expand_as(p), p / s + ph)
    pat = tex["pattern"]
    if pat == "checker":
        v = torch.remainder(q.floor().sum(-1), 2.0)
    elif pat == "stripes":
        x = q @ torch.tensor(tex["dir"], dtype=_DT)
        v = 0.5 + 0.5 * torch.clamp(3 * torch.sin(2 * math.pi * x), -1, 1)
    elif pat == "tiles":
        f = q - q.floor()
        dist = torch.where(flat, torch.ones_like(f), torch.minimum(f, 1 - f)).amin(-1)
        v = torch.clamp((dist - 0.04) / 0.03, 0, 1)
    elif pat == "dots":
        f = torch.where(flat, torch.zeros_like(q), q - q.floor() - 0.5)
        v = torch.clamp((f.norm(dim=-1) - 0.3) / 0.05, 0, 1)
    else:  # noise
        v = 0.5 + 0.5 * torch.tanh(2.5 * _waves(p, waves, s * 3))
    c1, c2 = torch.tensor(tex["c1"], dtype=_DT), torch.tensor(tex["c2"], dtype=_DT)
    grain = 0.9 + 0.1 * _waves(p, waves.flip(0), s * 0.7)
    return (c1 + (c2 - c1) * v[:, None]) * grain[:, None]


def _shade(prims: Primitives, points: Tensor, normals: Tensor, idx: Tensor) -> Tensor:
    """Lambertian + ambient colour [N,3] in [0, 1]."""
    order = torch.argsort(idx, stable=True)  # group rays by primitive
    counts = torch.bincount(idx, minlength=len(prims.textures)).tolist()
    ps, ns = points[order], normals[order]
    albedo = torch.empty_like(ps)
    end = 0
    for k, cnt in enumerate(counts):
        if cnt == 0:
            continue
        sl = slice(end, end + cnt)
        end += cnt
        p, n = ps[sl], ns[sl]
        kind = prims.objects[k - 6]["kind"] if k >= 6 else "room"
        if k >= 6:  # object frame
            c, R = prims.C[k - 6], prims.R[k - 6]
            pl, nl = (p - c) @ R, n @ R
        else:
            pl, nl = p, n
        flat = nl.abs() > 0.5  # planar faces: the normal axis
        if kind == "sphere":
            flat = torch.zeros_like(flat)
        elif kind == "cylinder":  # only the caps are planar
            flat = flat & torch.tensor([False, False, True])
        albedo[sl] = _albedo(prims.textures[k], pl, flat)
    rgb = torch.empty_like(albedo)
    rgb[order] = albedo
    light = torch.full_like(points[:, 0], prims.ambient)
    for pos, inten in prims.lights:
        v = pos - points
        dist = v.norm(dim=-1)
        light = light + inten * ((normals * v).sum(-1) / dist).clamp_min(0) / (1 + 0.04 * dist * dist)
    return (rgb * light[:, None]).clamp(0, 1)


@functools.lru_cache(maxsize=8)
def _camera_rays(K: Tuple[float, ...], H: int, W: int, offsets: Tuple[float, ...]) -> Tensor:
    """Camera-frame rays ``K^-1 [u, v, 1]`` ``[H, W, S*S, 3]`` (float64) at pixel ``(col + o, row + o')``
    for every pair of sub-pixel offsets; the same for every view of a scene, so cached."""
    o = torch.tensor(offsets, dtype=torch.float64)
    S = len(o)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    uu = (u[:, :, None, None] + o[None, None, None, :]).expand(H, W, S, S)
    vv = (v[:, :, None, None] + o[None, None, :, None]).expand(H, W, S, S)
    pix = torch.stack([uu, vv, torch.ones_like(uu)], -1).reshape(H, W, S * S, 3)
    return pix @ torch.linalg.inv(torch.tensor(K, dtype=torch.float64).reshape(3, 3)).T


def render_view(
    scene: dict | Primitives, K: Tensor, w2c: Tensor, H: int, W: int, supersample: int = 2
) -> Dict[str, Tensor]:
    """Render one view: ``rgb [H,W,3]`` float in [0,1], ``depth [H,W]`` (z, metres), ``normals [H,W,3]``
    (camera frame), ``semantic``/``instance [H,W]`` int64. Geometry and labels come from the ray
    through each pixel centre; RGB averages ``supersample^2`` sub-pixel rays."""
    prims = scene if isinstance(scene, Primitives) else Primitives(scene)
    K, w2c = K.to(torch.float64), w2c.to(torch.float64)
    R = w2c[:3, :3]
    eye = (-R.T @ w2c[:3, 3]).to(_DT)

    def rays(offsets: Sequence[float]) -> Tensor:
        """[H, W, S*S, 3] world directions (R^T K^-1 [u v 1]^T) through sub-pixel positions."""
        return (_camera_rays(tuple(K.reshape(-1).tolist()), H, W, tuple(offsets)) @ R).to(_DT)

    d0 = rays([0.5])
    t, idx, nw = cast_rays(prims, eye, d0, K, w2c)
    t, idx, nw = t.reshape(-1), idx.reshape(-1), nw.reshape(-1, 3)
    out = {
        "depth": t.reshape(H, W),
        "normals": (nw @ R.T.to(_DT)).reshape(H, W, 3),
        "semantic": prims.semantic[idx].reshape(H, W),
        "instance": prims.instance[idx].reshape(H, W),
    }
    if supersample <= 1:
        rgb = _shade(prims, eye + t[:, None] * d0.reshape(-1, 3), nw, idx)
    else:
        ds = rays([(i + 0.5) / supersample for i in range(supersample)])
        ts, ids, ns = cast_rays(prims, eye, ds, K, w2c)
        ds, ts, ids, ns = ds.reshape(-1, 3), ts.reshape(-1), ids.reshape(-1), ns.reshape(-1, 3)
        rgb = _shade(prims, eye + ts[:, None] * ds, ns, ids).reshape(H * W, -1, 3).mean(1)
    out["rgb"] = rgb.reshape(H, W, 3)
    return out
