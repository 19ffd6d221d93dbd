"""Scene specification: the set's constants and layout, and the sampling of one room (objects, textures,
lights, camera path) from ``(seed, index)`` as plain JSON-serialisable dicts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ...cameras import look_at
from ..layout import default_root as data_root

CLASSES = ("wall", "floor", "ceiling", "box", "sphere", "cylinder", "painting", "rug")
GENERATOR = "bench.synthetic"
VERSION = 2  # 2: normals stored as .npz (was .npy)
DSLR = Path("dslr")
TRANSFORMS = DSLR / "nerfstudio" / "transforms_undistorted.json"
IMAGES, DEPTH = DSLR / "undistorted_images", DSLR / "render_depth"
NORMALS, SEMANTIC, INSTANCE = DSLR / "render_normal_camera", DSLR / "render_semantic", DSLR / "render_instance"


def default_root() -> Path:
    return data_root("synthetic")


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


def _texture(
    rng: np.random.Generator, patterns: Sequence[str], scale: Tuple[float, float], sat=(0.2, 0.8), val=(0.35, 0.95)
) -> dict:
    c1 = _colour(rng, sat, val)
    c2 = _colour(rng, sat, val) if rng.uniform() < 0.6 else list(np.clip(np.array(c1) * rng.uniform(0.35, 0.7), 0, 1))
    d = rng.normal(size=3)
    return {
        "pattern": str(rng.choice(list(patterns))),
        "scale": float(rng.uniform(*scale)),
        "c1": c1,
        "c2": c2,
        "phase": list(rng.uniform(0.2, 0.8, size=3)),
        "dir": list(d / np.linalg.norm(d)),
        # smooth noise: rows (wx, wy, wz, phase, amplitude); also used as a low-contrast "grain"
        "waves": [
            list(rng.normal(size=3) * rng.uniform(0.6, 2.5))
            + [float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.5, 1.0))]
            for _ in range(5)
        ],
    }


def _path_xy(cam: dict, n: int) -> np.ndarray:
    """Camera positions in xy, densely sampled along the path (for object clearance)."""
    theta = cam["theta0"] + cam["direction"] * np.linspace(0, cam["arc"], n)
    rad = 1 + cam["wobble"] * np.sin(2 * theta + cam["phase"][0])
    return np.stack(
        [
            cam["center"][0] + cam["axes"][0] * rad * np.cos(theta),
            cam["center"][1] + cam["axes"][1] * rad * np.sin(theta),
        ],
        -1,
    )


def _sample_camera(rng: np.random.Generator, L: List[float], views: int) -> dict:
    """The scene's camera path (an ellipse around the room's centre with wobble and jitter)."""
    rho = rng.uniform(0.5, 0.65)
    step = math.radians(rng.uniform(7.0, 11.0))
    return {
        "center": [L[0] / 2, L[1] / 2],
        "axes": [rho * L[0] / 2, rho * L[1] / 2],
        "theta0": float(rng.uniform(0, 2 * math.pi)),
        "direction": float(rng.choice([-1.0, 1.0])),
        "arc": float(min(2 * math.pi, step * max(views - 1, 1))),
        "wobble": 0.08,
        "height": float(rng.uniform(1.3, 1.7)),
        "height_amp": 0.15,
        "target_z": float(rng.uniform(0.6, 1.0)),
        "jitter": 0.35,
        "phase": list(rng.uniform(0, 2 * math.pi, 5)),
    }


def _sample_room(rng: np.random.Generator, L: List[float]) -> dict:
    """The room box: four wall textures, then the floor's and the ceiling's."""
    room_tex = [
        _texture(rng, ("stripes", "noise", "tiles", "dots"), (0.25, 0.8), sat=(0.05, 0.4), val=(0.55, 0.95))
        for _ in range(4)
    ]
    room_tex.append(_texture(rng, ("checker", "tiles", "noise"), (0.3, 0.9), sat=(0.1, 0.6), val=(0.3, 0.8)))
    room_tex.append(_texture(rng, ("noise", "tiles", "dots"), (0.4, 1.0), sat=(0.0, 0.2), val=(0.75, 0.95)))
    return {"size": L, "textures": room_tex}


class _Objects:
    """The scene's objects as they are placed: free floor spots away from the camera path and from the
    footprints of the objects already placed."""

    def __init__(self, rng: np.random.Generator, L: List[float], path: np.ndarray):
        self.rng, self.L, self.path = rng, L, path
        self.objects: List[dict] = []
        self.footprints: List[Tuple[float, float, float]] = []

    def place(self, radius: float, clearance: float = 0.7):
        """A free ``(x, y)`` for a footprint of ``radius`` (200 tries; None when there is none)."""
        rng, L, path = self.rng, self.L, self.path
        for _ in range(200):
            x = rng.uniform(radius + 0.05, L[0] - radius - 0.05)
            y = rng.uniform(radius + 0.05, L[1] - radius - 0.05)
            if np.min(np.hypot(path[:, 0] - x, path[:, 1] - y)) < radius + clearance:
                continue
            if any(math.hypot(x - fx, y - fy) < radius + fr + 0.05 for fx, fy, fr in self.footprints):
                continue
            self.footprints.append((x, y, radius))
            return x, y
        return None

    def add(self, kind: str, semantic: int, centre_, R, size, tex) -> None:
        self.objects.append(
            {
                "kind": kind,
                "semantic": semantic,
                "instance": 7 + len(self.objects),
                "center": [float(c) for c in centre_],
                "R": np.asarray(R, float).tolist(),
                "size": [float(s) for s in size],
                "texture": tex,
            }
        )


def _add_furniture(rng: np.random.Generator, objs: _Objects, L: List[float]) -> None:
    """8-14 boxes, spheres and cylinders (upright or lying), the big ones placed first."""
    obj_pat = ("checker", "stripes", "noise", "dots", "tiles")
    kinds = rng.choice(["box", "sphere", "cylinder"], size=int(rng.integers(8, 15)), p=[0.4, 0.3, 0.3])
    kinds = sorted(kinds, key=lambda k: {"box": 0, "cylinder": 1, "sphere": 2}[k])  # big things first
    for kind in kinds:
        tex = _texture(rng, obj_pat, (0.08, 0.35))
        if kind == "box":
            h = np.array([rng.uniform(0.12, 0.45), rng.uniform(0.12, 0.45), rng.uniform(0.12, 0.55)])
            xy = objs.place(float(np.hypot(h[0], h[1])))
            if xy:
                objs.add("box", 3, (*xy, h[2]), _rot_z(rng.uniform(0, math.pi)), h, tex)
        elif kind == "sphere":
            r = rng.uniform(0.12, 0.4)
            xy = objs.place(r)
            if xy:
                z = r if rng.uniform() < 0.7 else rng.uniform(max(r, 0.8), L[2] - r - 0.4)
                objs.add("sphere", 4, (*xy, z), np.eye(3), [r], tex)
        else:
            _add_cylinder(rng, objs, tex)


def _add_cylinder(rng: np.random.Generator, objs: _Objects, tex: dict) -> None:
    """A cylinder, upright (70 %) or lying on its side."""
    r, hh = rng.uniform(0.1, 0.3), rng.uniform(0.15, 0.6)
    if rng.uniform() < 0.7:  # upright
        xy = objs.place(r)
        if xy:
            objs.add("cylinder", 5, (*xy, hh), _rot_z(rng.uniform(0, math.pi)), [r, hh], tex)
    else:  # lying on its side
        xy = objs.place(float(math.hypot(r, hh)))
        if xy:
            lie = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # local z -> world x
            objs.add("cylinder", 5, (*xy, r), _rot_z(rng.uniform(0, math.pi)) @ lie, [r, hh], tex)


def _add_paintings(rng: np.random.Generator, objs: _Objects, L: List[float]) -> None:
    """1-3 paintings: thin boxes on the walls."""
    for _ in range(int(rng.integers(1, 4))):
        wall = int(rng.integers(0, 4))
        axis, side = wall // 2, wall % 2  # wall on plane x=0/Lx (axis 0), y=0/Ly
        w, hgt, th = rng.uniform(0.4, 1.2), rng.uniform(0.3, 0.9), 0.02
        along = 1 - axis
        c = [0.0, 0.0, float(rng.uniform(1.1, min(1.9, L[2] - hgt / 2 - 0.1)))]
        c[along] = float(rng.uniform(w / 2 + 0.1, L[along] - w / 2 - 0.1))
        c[axis] = (L[axis] - th / 2 - 0.002) if side else (th / 2 + 0.002)
        half = [0.0, 0.0, hgt / 2]
        half[axis], half[along] = th / 2, w / 2
        tex = _texture(rng, ("stripes", "noise", "dots", "checker"), (0.05, 0.2), sat=(0.4, 1.0), val=(0.3, 1.0))
        objs.add("box", 6, c, np.eye(3), half, tex)


def _add_rug(rng: np.random.Generator, objs: _Objects, L: List[float]) -> None:
    """A rug under the furniture (80 % of the rooms)."""
    if rng.uniform() < 0.8:
        hx, hy = rng.uniform(0.5, 1.2), rng.uniform(0.4, 1.0)
        c = (rng.uniform(hx + 0.2, L[0] - hx - 0.2), rng.uniform(hy + 0.2, L[1] - hy - 0.2), 0.006)
        R = _rot_z(rng.uniform(0, math.pi))
        tex = _texture(rng, ("stripes", "checker", "dots"), (0.1, 0.3), sat=(0.3, 0.9), val=(0.3, 0.8))
        objs.add("box", 7, c, R, [hx, hy, 0.005], tex)


def _sample_lights(rng: np.random.Generator, L: List[float]) -> List[dict]:
    """Two point lights near the ceiling."""
    return [
        {
            "pos": [
                float(rng.uniform(0.2, 0.8) * L[0]),
                float(rng.uniform(0.2, 0.8) * L[1]),
                float(L[2] - rng.uniform(0.2, 0.5)),
            ],
            "intensity": float(rng.uniform(0.5, 0.8)),
        }
        for _ in range(2)
    ]


def make_scene(seed: int, index: int, views: int = 24) -> dict:
    """Sample scene ``index`` of ``seed``: room, camera path, objects, lights (a JSON-able dict). The parts
    draw from one generator, in this order: room size, camera path, room textures, furniture, paintings,
    rug, lights, ambient light."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0xB3]))
    L = [float(rng.uniform(4.5, 7.5)), float(rng.uniform(4.5, 7.5)), float(rng.uniform(2.5, 3.2))]
    cam = _sample_camera(rng, L, views)
    objs = _Objects(rng, L, _path_xy(cam, 512))
    room = _sample_room(rng, L)
    _add_furniture(rng, objs, L)
    _add_paintings(rng, objs, L)
    _add_rug(rng, objs, L)
    lights = _sample_lights(rng, L)
    return {
        "scene_id": f"synth_{index:04d}",
        "seed": int(seed),
        "index": int(index),
        "room": room,
        "objects": objs.objects,
        "lights": lights,
        "ambient": float(rng.uniform(0.22, 0.32)),
        "camera_path": cam,
    }


def camera_path(scene: dict, views: int) -> Tensor:
    """World-to-camera matrices ``[V, 4, 4]`` (float64) along the scene's smooth path."""
    cam = scene["camera_path"]
    u = np.linspace(0, 1, views) if views > 1 else np.zeros(1)
    theta = cam["theta0"] + cam["direction"] * cam["arc"] * u
    ph = cam["phase"]
    rad = 1 + cam["wobble"] * np.sin(2 * theta + ph[0])
    eye = np.stack(
        [
            cam["center"][0] + cam["axes"][0] * rad * np.cos(theta),
            cam["center"][1] + cam["axes"][1] * rad * np.sin(theta),
            cam["height"] + cam["height_amp"] * np.sin(1.5 * theta + ph[1]),
        ],
        -1,
    )
    j = cam["jitter"]
    target = np.stack(
        [
            cam["center"][0] + j * np.sin(theta + ph[2]),
            cam["center"][1] + j * np.sin(1.3 * theta + ph[3]),
            cam["target_z"] + 0.4 * j * np.sin(0.7 * theta + ph[4]),
        ],
        -1,
    )
    return look_at(torch.from_numpy(eye), torch.from_numpy(target))


def intrinsics(H: int, W: int, hfov_deg: float = 70.0) -> Tensor:
    """Pinhole K (float64): square pixels, horizontal field of view ``hfov_deg``, centred."""
    f = W / (2 * math.tan(math.radians(hfov_deg) / 2))
    return torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=torch.float64)
