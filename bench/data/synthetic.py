"""Procedural indoor scenes, rendered by exact ray casting, written in the ScanNet++ DSLR layout.

Each scene is a closed box room (4 walls, floor, ceiling) furnished with boxes, spheres, cylinders,
wall paintings and a rug of random size and pose, textured with procedural patterns evaluated in
each object's own frame (so textures are multi-view consistent) and lit by an ambient term plus two
point lights with Lambertian shading (no shadows, no specular: a surface looks the same from every
view, shading reveals its orientation). A smooth camera path (an arc of an ellipse around the room
centre, looking at the centre with smooth jitter) views the room; consecutive views overlap strongly.

Rendering is analytic (ray-plane / ray-box / ray-sphere / ray-cylinder), vectorised in torch. Depth,
normals and labels are exact at pixel centres (+0.5 convention); RGB is optionally supersampled
(``supersample`` x ``supersample`` sub-pixel rays, averaged) for anti-aliasing.

Semantic classes (``CLASSES``; index = label value, 255 = ignore, never produced here)::

    0 wall   1 floor   2 ceiling   3 box   4 sphere   5 cylinder   6 painting   7 rug

Instance ids: 1..4 the walls, 5 floor, 6 ceiling, 7.. the objects (0 = none, never produced here).

On-disk layout (ScanNet++ DSLR, as produced by its undistortion + depth rendering; read back by
:class:`bench.data.scenes.MultiViewScenes`)::

    <root>/meta.json                           set parameters (generator, version, scenes, views,
                                               size, seed, supersample, hfov_deg, classes, scene_ids)
    <root>/<scene>/meta.json                   the scene: room, objects, lights, textures, path, seed
    <root>/<scene>/dslr/nerfstudio/transforms_undistorted.json
                                               nerfstudio: camera_model PINHOLE, fl_x, fl_y, cx, cy,
                                               w, h, frames[{file_path, transform_matrix}], where
                                               transform_matrix = camera-to-world in OpenGL axes
    <root>/<scene>/dslr/undistorted_images/frame_XXXX.png     RGB uint8 (lossless PNG, not JPG)
    <root>/<scene>/dslr/render_depth/frame_XXXX.png           z-depth, uint16 millimetres, 0 invalid
    <root>/<scene>/dslr/render_normal_camera/frame_XXXX.npz   np.load(...)["normals"]: float16 [H,W,3]
                                                              unit normals, camera frame (OpenCV
                                                              axes), facing the camera
    <root>/<scene>/dslr/render_semantic/frame_XXXX.png        uint8 class labels (table above)
    <root>/<scene>/dslr/render_instance/frame_XXXX.png        uint16 instance ids

Deterministic: scene ``i`` of seed ``s`` depends only on ``(s, i)``; the same call writes
byte-identical files.
"""
from __future__ import annotations

import argparse
import functools
import io
import fcntl
import json
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..cameras import look_at, opencv_w2c_to_opengl_c2w
from ..errors import BenchError
from ..io import write_json
from ..registry import DATASETS

__all__ = ["CLASSES", "GENERATOR", "VERSION", "make_scene", "camera_path", "intrinsics",
           "render_view", "cast_rays", "Primitives", "generate", "generate_scene", "ensure_synthetic",
           "holds_set", "split_scenes", "default_root"]

CLASSES = ("wall", "floor", "ceiling", "box", "sphere", "cylinder", "painting", "rug")
GENERATOR = "bench.synthetic"
VERSION = 2  # 2: normals stored as .npz (was .npy)
DSLR = Path("dslr")
TRANSFORMS = DSLR / "nerfstudio" / "transforms_undistorted.json"
IMAGES, DEPTH = DSLR / "undistorted_images", DSLR / "render_depth"
NORMALS, SEMANTIC, INSTANCE = DSLR / "render_normal_camera", DSLR / "render_semantic", DSLR / "render_instance"
_INF = float("inf")
_DT = torch.float32


def default_root() -> Path:
    return Path(os.environ.get("BENCH_DATA", "data")) / "synthetic"


# ----------------------------------------------------------------------------------------------
# Scene sampling (numpy Generator -> plain JSON-serialisable dicts)
# ----------------------------------------------------------------------------------------------
def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _colour(rng: np.random.Generator, sat: Tuple[float, float], val: Tuple[float, float]) -> List[float]:
    h, s, v = rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val)
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return list(v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))


def _texture(rng: np.random.Generator, patterns: Sequence[str], scale: Tuple[float, float],
             sat=(0.2, 0.8), val=(0.35, 0.95)) -> dict:
    c1 = _colour(rng, sat, val)
    c2 = _colour(rng, sat, val) if rng.uniform() < 0.6 else list(np.clip(np.array(c1) * rng.uniform(0.35, 0.7), 0, 1))
    d = rng.normal(size=3)
    return {
        "pattern": str(rng.choice(list(patterns))), "scale": float(rng.uniform(*scale)),
        "c1": c1, "c2": c2, "phase": list(rng.uniform(0.2, 0.8, size=3)),
        "dir": list(d / np.linalg.norm(d)),
        # smooth noise: rows (wx, wy, wz, phase, amplitude); also used as a low-contrast "grain"
        "waves": [list(rng.normal(size=3) * rng.uniform(0.6, 2.5)) + [float(rng.uniform(0, 2 * math.pi)),
                                                                      float(rng.uniform(0.5, 1.0))]
                  for _ in range(5)],
    }


def _path_xy(cam: dict, n: int) -> np.ndarray:
    """Camera positions in xy, densely sampled along the path (for object clearance)."""
    theta = cam["theta0"] + cam["direction"] * np.linspace(0, cam["arc"], n)
    rad = 1 + cam["wobble"] * np.sin(2 * theta + cam["phase"][0])
    return np.stack([cam["center"][0] + cam["axes"][0] * rad * np.cos(theta),
                     cam["center"][1] + cam["axes"][1] * rad * np.sin(theta)], -1)


def make_scene(seed: int, index: int, views: int = 24) -> dict:
    """Sample scene ``index`` of ``seed``: room, camera path, objects, lights (a JSON-able dict)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0xB3]))
    L = [float(rng.uniform(4.5, 7.5)), float(rng.uniform(4.5, 7.5)), float(rng.uniform(2.5, 3.2))]
    centre = [L[0] / 2, L[1] / 2]
    rho = rng.uniform(0.5, 0.65)
    step = math.radians(rng.uniform(7.0, 11.0))
    cam = {
        "center": centre, "axes": [rho * L[0] / 2, rho * L[1] / 2], "theta0": float(rng.uniform(0, 2 * math.pi)),
        "direction": float(rng.choice([-1.0, 1.0])), "arc": float(min(2 * math.pi, step * max(views - 1, 1))),
        "wobble": 0.08, "height": float(rng.uniform(1.3, 1.7)), "height_amp": 0.15,
        "target_z": float(rng.uniform(0.6, 1.0)), "jitter": 0.35, "phase": list(rng.uniform(0, 2 * math.pi, 5)),
    }
    path = _path_xy(cam, 512)

    room_tex = [_texture(rng, ("stripes", "noise", "tiles", "dots"), (0.25, 0.8), sat=(0.05, 0.4), val=(0.55, 0.95))
                for _ in range(4)]
    room_tex.append(_texture(rng, ("checker", "tiles", "noise"), (0.3, 0.9), sat=(0.1, 0.6), val=(0.3, 0.8)))
    room_tex.append(_texture(rng, ("noise", "tiles", "dots"), (0.4, 1.0), sat=(0.0, 0.2), val=(0.75, 0.95)))
    room = {"size": L, "textures": room_tex}

    objects: List[dict] = []
    footprints: List[Tuple[float, float, float]] = []

    def place(radius: float, clearance: float = 0.7):
        for _ in range(200):
            x = rng.uniform(radius + 0.05, L[0] - radius - 0.05)
            y = rng.uniform(radius + 0.05, L[1] - radius - 0.05)
            if np.min(np.hypot(path[:, 0] - x, path[:, 1] - y)) < radius + clearance:
                continue
            if any(math.hypot(x - fx, y - fy) < radius + fr + 0.05 for fx, fy, fr in footprints):
                continue
            footprints.append((x, y, radius))
            return x, y
        return None

    def add(kind: str, semantic: int, centre_, R, size, tex):
        objects.append({"kind": kind, "semantic": semantic, "instance": 7 + len(objects),
                        "center": [float(c) for c in centre_], "R": np.asarray(R, float).tolist(),
                        "size": [float(s) for s in size], "texture": tex})

    obj_pat = ("checker", "stripes", "noise", "dots", "tiles")
    kinds = rng.choice(["box", "sphere", "cylinder"], size=int(rng.integers(8, 15)), p=[0.4, 0.3, 0.3])
    kinds = sorted(kinds, key=lambda k: {"box": 0, "cylinder": 1, "sphere": 2}[k])  # big things first
    for kind in kinds:
        tex = _texture(rng, obj_pat, (0.08, 0.35))
        if kind == "box":
            h = np.array([rng.uniform(0.12, 0.45), rng.uniform(0.12, 0.45), rng.uniform(0.12, 0.55)])
            xy = place(float(np.hypot(h[0], h[1])))
            if xy:
                add("box", 3, (*xy, h[2]), _rot_z(rng.uniform(0, math.pi)), h, tex)
        elif kind == "sphere":
            r = rng.uniform(0.12, 0.4)
            xy = place(r)
            if xy:
                z = r if rng.uniform() < 0.7 else rng.uniform(max(r, 0.8), L[2] - r - 0.4)
                add("sphere", 4, (*xy, z), np.eye(3), [r], tex)
        else:
            r, hh = rng.uniform(0.1, 0.3), rng.uniform(0.15, 0.6)
            if rng.uniform() < 0.7:                                 # upright
                xy = place(r)
                if xy:
                    add("cylinder", 5, (*xy, hh), _rot_z(rng.uniform(0, math.pi)), [r, hh], tex)
            else:                                                   # lying on its side
                xy = place(float(math.hypot(r, hh)))
                if xy:
                    lie = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # local z -> world x
                    add("cylinder", 5, (*xy, r), _rot_z(rng.uniform(0, math.pi)) @ lie, [r, hh], tex)

    for _ in range(int(rng.integers(1, 4))):                        # paintings: thin boxes on walls
        wall = int(rng.integers(0, 4))
        axis, side = wall // 2, wall % 2                            # wall on plane x=0/Lx (axis 0), y=0/Ly
        w, hgt, th = rng.uniform(0.4, 1.2), rng.uniform(0.3, 0.9), 0.02
        along = 1 - axis
        c = [0.0, 0.0, float(rng.uniform(1.1, min(1.9, L[2] - hgt / 2 - 0.1)))]
        c[along] = float(rng.uniform(w / 2 + 0.1, L[along] - w / 2 - 0.1))
        c[axis] = (L[axis] - th / 2 - 0.002) if side else (th / 2 + 0.002)
        half = [0.0, 0.0, hgt / 2]
        half[axis], half[along] = th / 2, w / 2
        add("box", 6, c, np.eye(3), half, _texture(rng, ("stripes", "noise", "dots", "checker"), (0.05, 0.2),
                                                     sat=(0.4, 1.0), val=(0.3, 1.0)))
    if rng.uniform() < 0.8:                                         # a rug under the furniture
        hx, hy = rng.uniform(0.5, 1.2), rng.uniform(0.4, 1.0)
        c = (rng.uniform(hx + 0.2, L[0] - hx - 0.2), rng.uniform(hy + 0.2, L[1] - hy - 0.2), 0.006)
        add("box", 7, c, _rot_z(rng.uniform(0, math.pi)), [hx, hy, 0.005],
            _texture(rng, ("stripes", "checker", "dots"), (0.1, 0.3), sat=(0.3, 0.9), val=(0.3, 0.8)))

    lights = [{"pos": [float(rng.uniform(0.2, 0.8) * L[0]), float(rng.uniform(0.2, 0.8) * L[1]),
                       float(L[2] - rng.uniform(0.2, 0.5))], "intensity": float(rng.uniform(0.5, 0.8))}
              for _ in range(2)]
    return {"scene_id": f"synth_{index:04d}", "seed": int(seed), "index": int(index), "room": room,
            "objects": objects, "lights": lights, "ambient": float(rng.uniform(0.22, 0.32)),
            "camera_path": cam}


def camera_path(scene: dict, views: int) -> Tensor:
    """World-to-camera matrices ``[V, 4, 4]`` (float64) along the scene's smooth path."""
    cam = scene["camera_path"]
    u = np.linspace(0, 1, views) if views > 1 else np.zeros(1)
    theta = cam["theta0"] + cam["direction"] * cam["arc"] * u
    ph = cam["phase"]
    rad = 1 + cam["wobble"] * np.sin(2 * theta + ph[0])
    eye = np.stack([cam["center"][0] + cam["axes"][0] * rad * np.cos(theta),
                    cam["center"][1] + cam["axes"][1] * rad * np.sin(theta),
                    cam["height"] + cam["height_amp"] * np.sin(1.5 * theta + ph[1])], -1)
    j = cam["jitter"]
    target = np.stack([cam["center"][0] + j * np.sin(theta + ph[2]),
                       cam["center"][1] + j * np.sin(1.3 * theta + ph[3]),
                       cam["target_z"] + 0.4 * j * np.sin(0.7 * theta + ph[4])], -1)
    return look_at(torch.from_numpy(eye), torch.from_numpy(target))


def intrinsics(H: int, W: int, hfov_deg: float = 70.0) -> Tensor:
    """Pinhole K (float64): square pixels, horizontal field of view ``hfov_deg``, centred."""
    f = W / (2 * math.tan(math.radians(hfov_deg) / 2))
    return torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=torch.float64)


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
    if abs(float(o[2])) > hh:                                    # only the cap facing the camera
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
    uv = (corners @ K.to(_DT).T)
    uv = uv[:, :2] / uv[:, 2:]
    x0, y0 = (uv.amin(0).floor() - 1).tolist()
    x1, y1 = (uv.amax(0).ceil() + 1).tolist()
    x0, x1 = int(min(max(x0, 0), W)), int(min(max(x1, 0), W))
    y0, y1 = int(min(max(y0, 0), H)), int(min(max(y1, 0), H))
    return (y0, y1, x0, x1) if (x1 > x0 and y1 > y0) else None


def cast_rays(prims: Primitives, eye: Tensor, dirs: Tensor, K: Tensor | None = None,
              w2c: Tensor | None = None) -> Tuple[Tensor, Tensor, Tensor]:
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
    # room from inside: exit through the nearest face
    tax = torch.where(grid > 0, (prims.L - eye) / _safe(grid), -eye / _safe(grid))
    tax = torch.where(grid == 0, torch.full_like(tax, _INF), tax)
    t, axis = tax.min(-1)
    idx = 2 * axis + (grid.gather(-1, axis[..., None])[..., 0] > 0).long()
    normals = torch.nn.functional.one_hot(axis, 3).to(_DT) * torch.where(idx % 2 == 1, -1.0, 1.0).to(_DT)[..., None]
    hits = []
    for k, ob in enumerate(prims.objects):
        c, R, s = prims.C[k], prims.R[k], prims.size[k]
        box = (0, G[0], 0, G[1]) if cull is None else _screen_box(c, _bound_radius(ob), *cull)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        d = grid[y0:y1, x0:x1].reshape(-1, 3)
        if ob["kind"] == "sphere":
            oc = eye - c
            a, b = (d * d).sum(-1), d @ oc
            disc = b * b - a * (oc @ oc - s[0] ** 2)
            tk = (-b - disc.clamp_min(0).sqrt()) / a
            tk = torch.where((disc >= 0) & (tk > 0), tk, torch.full_like(tk, _INF))
            local = aux = None
        else:
            local = (R.T @ (eye - c), d @ R)                           # local frame (R: local -> world)
            tk, aux = (_box_t if ob["kind"] == "box" else
                       lambda o, dl, sz: _cylinder_t(o, dl, float(sz[0]), float(sz[1])))(*local, s)
        shape = (y1 - y0, x1 - x0, G[2])
        tk = tk.reshape(shape)
        closer = tk < t[y0:y1, x0:x1]
        t[y0:y1, x0:x1] = torch.where(closer, tk, t[y0:y1, x0:x1])
        idx[y0:y1, x0:x1][closer] = 6 + k
        hits.append((k, ob, box, local, aux))

    for k, ob, (y0, y1, x0, x1), local, aux in hits:                  # normals where k is the closest
        m = idx[y0:y1, x0:x1] == 6 + k
        if not bool(m.any()):
            continue
        mf = m.reshape(-1)
        d, tm = grid[y0:y1, x0:x1][m], t[y0:y1, x0:x1][m]
        if ob["kind"] == "sphere":
            nw = eye + tm[:, None] * d - prims.C[k]
        else:
            ol, dl = local[0], local[1][mf]
            if ob["kind"] == "box":
                fa = aux[mf].argmax(-1)                                # slab that was entered last
                nl = torch.nn.functional.one_hot(fa, 3).to(_DT) * -torch.sign(dl.gather(1, fa[:, None]))
            else:
                p = ol + tm[:, None] * dl
                zero = torch.zeros_like(p[:, 0])
                nl = torch.where(aux[mf][:, None], torch.stack([zero, zero, torch.sign(p[:, 2])], -1),
                                 torch.stack([p[:, 0], p[:, 1], zero], -1))
            nw = nl @ prims.R[k].T
        sub = normals[y0:y1, x0:x1]
        sub[m] = nw
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
    order = torch.argsort(idx, stable=True)                        # group rays by primitive
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
        if k >= 6:                                                   # object frame
            c, R = prims.C[k - 6], prims.R[k - 6]
            pl, nl = (p - c) @ R, n @ R
        else:
            pl, nl = p, n
        flat = nl.abs() > 0.5                                       # planar faces: the normal axis
        if kind == "sphere":
            flat = torch.zeros_like(flat)
        elif kind == "cylinder":                                    # only the caps are planar
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


def render_view(scene: dict | Primitives, K: Tensor, w2c: Tensor, H: int, W: int,
                supersample: int = 2) -> Dict[str, Tensor]:
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
    out = {"depth": t.reshape(H, W), "normals": (nw @ R.T.to(_DT)).reshape(H, W, 3),
           "semantic": prims.semantic[idx].reshape(H, W), "instance": prims.instance[idx].reshape(H, W)}
    if supersample <= 1:
        rgb = _shade(prims, eye + t[:, None] * d0.reshape(-1, 3), nw, idx)
    else:
        ds = rays([(i + 0.5) / supersample for i in range(supersample)])
        ts, ids, ns = cast_rays(prims, eye, ds, K, w2c)
        ds, ts, ids, ns = ds.reshape(-1, 3), ts.reshape(-1), ids.reshape(-1), ns.reshape(-1, 3)
        rgb = _shade(prims, eye + ts[:, None] * ds, ns, ids).reshape(H * W, -1, 3).mean(1)
    out["rgb"] = rgb.reshape(H, W, 3)
    return out


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="PNG", compress_level=3)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Compressed ``.npz`` (readable by ``np.load``) with fixed zip timestamps, so byte-identical."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=3) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED, compresslevel=3)


def _set_meta(scenes: int, views: int, size: Sequence[int], seed: int, supersample: int, hfov_deg: float) -> dict:
    return {"generator": GENERATOR, "version": VERSION, "scenes": int(scenes), "views": int(views),
            "size": [int(size[0]), int(size[1])], "seed": int(seed), "supersample": int(supersample),
            "hfov_deg": float(hfov_deg), "classes": list(CLASSES),
            "scene_ids": [f"synth_{i:04d}" for i in range(scenes)]}


def generate_scene(root: Path, seed: int, index: int, views: int, size: Sequence[int],
                   supersample: int = 2, hfov_deg: float = 70.0) -> Path:
    """Render and write one scene; returns its directory."""
    H, W = int(size[0]), int(size[1])
    scene = make_scene(seed, index, views)
    sdir = Path(root) / scene["scene_id"]
    for sub in (IMAGES, DEPTH, NORMALS, SEMANTIC, INSTANCE):
        (sdir / sub).mkdir(parents=True, exist_ok=True)
    K = intrinsics(H, W, hfov_deg)
    w2cs = camera_path(scene, views)
    prims = Primitives(scene)
    frames = []
    for v in range(views):
        name = f"frame_{v:04d}"
        r = render_view(prims, K, w2cs[v], H, W, supersample)
        rgb = (r["rgb"].numpy() * 255.0 + 0.5).astype(np.uint8)
        depth_mm = np.clip(np.round(r["depth"].numpy().astype(np.float64) * 1000.0), 0, 65535).astype(np.uint16)
        # plain (non-atomic) writes: the set is only valid once root/meta.json is written at the end
        _write_png(sdir / IMAGES / f"{name}.png", rgb)
        _write_png(sdir / DEPTH / f"{name}.png", depth_mm)
        _write_npz(sdir / NORMALS / f"{name}.npz", normals=r["normals"].numpy().astype(np.float16))
        _write_png(sdir / SEMANTIC / f"{name}.png", r["semantic"].numpy().astype(np.uint8))
        _write_png(sdir / INSTANCE / f"{name}.png", r["instance"].numpy().astype(np.uint16))
        c2w = opencv_w2c_to_opengl_c2w(w2cs[v])
        frames.append({"file_path": f"{name}.png", "transform_matrix": c2w.tolist(), "is_bad": False})
    transforms = {"camera_model": "PINHOLE", "fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]),
                  "cx": float(K[0, 2]), "cy": float(K[1, 2]), "w": W, "h": H, "frames": frames,
                  "test_frames": []}
    write_json(sdir / TRANSFORMS, transforms)
    scene_meta = dict(scene, generator=GENERATOR, version=VERSION, views=views, size=[H, W],
                      supersample=supersample, hfov_deg=hfov_deg, classes=list(CLASSES),
                      instances=[{"id": i + 1, "semantic": s} for i, s in enumerate([0, 0, 0, 0, 1, 2])] +
                      [{"id": o["instance"], "semantic": o["semantic"]} for o in scene["objects"]])
    write_json(sdir / "meta.json", scene_meta)
    return sdir


def _worker_main(spec_json: str) -> int:
    """Worker process body (``python -c``, see :func:`_run_workers`): render the scenes listed in the
    JSON spec with one torch thread, printing each index when its files are written."""
    spec = json.loads(spec_json)
    torch.set_num_threads(1)  # 2 workers fill 2 cores without OpenMP oversubscription
    for i in spec["indices"]:
        generate_scene(Path(spec["root"]), spec["seed"], i, spec["views"], spec["size"], spec["supersample"],
                       spec["hfov_deg"])
        print(i, flush=True)
    return 0


def _run_workers(root: Path, indices: Sequence[int], workers: int, on_done, **kw) -> None:
    """Render scenes in ``workers`` fresh interpreter processes (``sys.executable -c``), not
    multiprocessing: a spawned multiprocessing child re-imports the caller's ``__main__``, which
    breaks scripts without an ``if __name__ == "__main__"`` guard. Calls ``on_done()`` per scene."""
    import queue
    import subprocess
    import sys
    import tempfile
    import threading

    pkg_parent = str(Path(__file__).resolve().parents[2])  # importable even without an install
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    code = "import sys; from bench.data.synthetic import _worker_main; sys.exit(_worker_main(sys.argv[1]))"
    done: "queue.Queue[int]" = queue.Queue()
    procs, readers = [], []
    try:
        for w in range(workers):
            spec = dict(kw, root=str(root), indices=list(indices[w::workers]))
            err = tempfile.TemporaryFile()
            proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE,
                                    stderr=err, env=env, text=True)
            reader = threading.Thread(target=lambda p=proc: [done.put(int(line)) for line in p.stdout
                                                             if line.strip().isdigit()], daemon=True)
            reader.start()
            readers.append(reader)
            procs.append((proc, err))
        for _ in indices:
            while True:
                try:
                    done.get(timeout=0.5)
                    break
                except queue.Empty:
                    failed = [(p, e) for p, e in procs if p.poll() not in (None, 0)]
                    if not failed and not any(r.is_alive() for r in readers) and done.empty():
                        failed = procs[:1]  # all output read, all exited cleanly, yet a scene is missing
                    if failed:
                        p, e = failed[0]
                        e.seek(0)
                        tail = e.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                        raise BenchError(f"synthetic scene generation failed in a worker process "
                                         f"(exit {p.returncode}): {tail[0]}",
                                         "re-run with workers=1 (--workers 1) to see the full traceback")
            on_done()
        for p, _ in procs:
            p.wait()
    finally:
        for p, e in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            e.close()


def generate(root: str | os.PathLike, scenes: int = 8, views: int = 24, size: Sequence[int] = (224, 224),
             seed: int = 0, supersample: int = 2, hfov_deg: float = 70.0, progress: bool = False,
             workers: int | None = None) -> Path:
    """Render ``scenes`` x ``views`` and write them under ``root``; ``root/meta.json`` is written last
    (its presence marks a complete set). ``workers``: processes (at most 2; default 2 for sets large
    enough to pay for starting them, else 1). Output does not depend on ``workers``."""
    if scenes < 1 or views < 1 or min(size) < 8:
        raise BenchError(f"invalid synthetic set: scenes={scenes}, views={views}, size={list(size)}",
                         "use at least 1 scene, 1 view and 8x8 pixels")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").unlink(missing_ok=True)
    if workers is None:
        workers = 2 if scenes >= 2 and scenes * views * size[0] * size[1] >= 2_000_000 else 1
    workers = max(1, min(int(workers), 2, scenes))
    kw = dict(seed=seed, views=views, size=list(size), supersample=supersample, hfov_deg=hfov_deg)
    bar = None
    if progress:  # a bar on a terminal, periodic log lines otherwise
        from ..progress import progress as _progress
        bar = _progress(total=scenes, unit="scene", desc=f"synthetic ({views} views each) -> {root}")
    tick = (lambda: bar.update(1)) if bar is not None else (lambda: None)
    try:
        if workers == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for i in range(scenes):
                    generate_scene(root, seed, i, views, size, supersample, hfov_deg)
                    tick()
            finally:
                torch.set_num_threads(threads)
        else:
            _run_workers(root, range(scenes), workers, tick, **kw)
    finally:
        if bar is not None:
            bar.close()
    write_json(root / "meta.json", _set_meta(scenes, views, size, seed, supersample, hfov_deg))
    return root


def ensure_synthetic(root: str | os.PathLike | None = None, scenes: int = 8, views: int = 24,
                     size: Sequence[int] = (224, 224), seed: int = 0, supersample: int = 2,
                     hfov_deg: float = 70.0, progress: bool = True, workers: int | None = None) -> Path:
    """Return ``root`` holding the requested set, generating it only if ``root/meta.json`` does not
    already describe exactly these parameters (and the scenes' transforms are present). ``progress``:
    a bar (terminal) or log lines while it generates."""
    root = Path(root) if root is not None else default_root()
    if holds_set(root, scenes, views, size, seed, supersample, hfov_deg):
        return root
    # Several jobs of a sweep may ask for the same set at once: one generates, the others wait.
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if holds_set(root, scenes, views, size, seed, supersample, hfov_deg):
            return root
        return generate(root, scenes, views, size, seed, supersample, hfov_deg, progress, workers)


def holds_set(root: str | os.PathLike, scenes: int, views: int, size: Sequence[int], seed: int,
              supersample: int = 2, hfov_deg: float = 70.0) -> bool:
    """Whether ``root`` holds a complete generated set with exactly these parameters."""
    root = Path(root)
    want = _set_meta(scenes, views, size, seed, supersample, hfov_deg)
    try:
        have = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return have == want and all((root / s / TRANSFORMS).is_file() for s in want["scene_ids"])


def split_scenes(scene_ids: Sequence[str], held_out: int | float = 0.25) -> Tuple[List[str], List[str]]:
    """Deterministic split of scene ids into (train, held_out): the held-out scenes are the last ones
    in sorted order. ``held_out`` is a count (int) or a fraction (float in (0, 1)); at least one scene
    stays in train and, if ``held_out > 0`` and there are >= 2 scenes, at least one is held out."""
    ids = sorted(scene_ids)
    n = len(ids)
    k = int(round(held_out * n)) if isinstance(held_out, float) else int(held_out)
    if held_out and n >= 2:
        k = max(k, 1)
    k = min(max(k, 0), max(n - 1, 0))
    return ids[: n - k], ids[n - k:]


# ----------------------------------------------------------------------------------------------
# CLI: python -m bench data synthetic --scenes N --views V --size H W --seed S --out DIR
# ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenes", type=int, default=8, help="number of rooms (default 8)")
    p.add_argument("--views", type=int, default=24, help="views per room (default 24)")
    p.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                   help="image height and width (default 224 224)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--supersample", type=int, default=2, help="RGB anti-aliasing factor per axis (default 2)")
    p.add_argument("--hfov", type=float, default=70.0, help="horizontal field of view, degrees (default 70)")
    p.add_argument("--out", default=None, help="output directory (default ${BENCH_DATA:-data}/synthetic)")
    p.add_argument("--workers", type=int, default=None, help="processes, at most 2 (default: 2 for large sets)")
    p.add_argument("--force", action="store_true", help="re-generate even if a matching set exists")


def cli(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_root()
    t0 = time.perf_counter()
    kw = dict(scenes=args.scenes, views=args.views, size=args.size, seed=args.seed,
              supersample=args.supersample, hfov_deg=args.hfov)
    reused = not args.force and holds_set(out, **kw)
    if not reused:
        generate(out, **kw, progress=True, workers=args.workers)
    dt = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    how = "already present, reused (--force regenerates)" if reused else f"generated in {dt:.1f} s"
    print(f"synthetic scenes: {args.scenes} x {args.views} views at {args.size[0]}x{args.size[1]}, "
          f"seed {args.seed} -> {out} ({nbytes / 2**20:.1f} MiB, {how})")
    print("classes: " + ", ".join(f"{i} {c}" for i, c in enumerate(CLASSES)))
    return 0


@DATASETS.register("synthetic", "built-in procedural rooms: RGB, exact depth/normals/semantic/instance "
                                "(ScanNet++ DSLR layout); generated offline")
class SyntheticData:
    add_arguments = staticmethod(add_arguments)
    cli = staticmethod(cli)
