"""Procedural object-centric scenes: one compound object seen by orbit cameras, MEF's render layout.

The offline stand-in for MEF's Objaverse renders (:mod:`bench.data.mef_objaverse`). Each object is 2-5
textured primitives (boxes, spheres, capped cylinders) glued into one shape, normalised like MEF's
BlenderProc script does (largest bounding-box side 1, bounding-box centre at the origin). Views are a
fixed set of object-to-camera poses shared by every object (MEF: ``data/obj_poses.npy``): cameras on a
Fibonacci sphere around the object at distance 2, looking at its centre. The lights are fixed in the
camera frame, as MEF's renderer keeps them (so the object turns under the lights, a turntable).

Geometry, depth and masks come from bench's exact ray caster (:func:`bench.data.synthetic.render_view`
on :class:`bench.data.synthetic.Primitives`; the object sits inside a large invisible room whose hits
are background), so depth is exact at pixel centres: the set's ``meta.json`` says ``pixel_offset``
0.5, which :class:`bench.data.mef_objaverse.ObjectRenders` applies when unprojecting (MEF's own renders
use integer pixel coordinates). Depth is stored as MEF stores it, uint16 millimetres (1 mm = 1e-3
object units, a fifth of MEF's positive threshold).

Layout under ``root`` (read back by ``ObjectRenders``)::

    meta.json            generator, version, objects, views, size, seed, supersample, K, pixel_offset
    obj_poses.npy        [V,4,4] float64 object-to-camera poses (OpenCV axes)
    objects.txt          object names, one per line (obj_0000 ...)
    obj_XXXX/color_XXXXXX.png   RGB, black background
    obj_XXXX/depth_XXXXXX.png   uint16 z-depth, millimetres, 0 = background
    obj_XXXX/mask_XXXXXX.png    0 / 255
    obj_XXXX/object.json        the primitives (kind, centre, rotation, size, texture)

Deterministic: object ``i`` of seed ``s`` depends only on ``(s, i)``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..cameras import look_at
from ..io import write_json
from .synthetic import raycast as _raycast, spec as _spec, writer as _writer
from .layout import default_root as data_root, register_command
from .mef_objaverse import MEF_FOCAL, MEF_SIZE, POSES_FILE

GENERATOR = "bench.objects"
VERSION = 1
ROOM = 16.0  # invisible room (side, object units) that holds the cameras
CENTRE = (ROOM / 2, ROOM / 2, ROOM / 2)
DISTANCE = 2.0  # camera distance to the object centre (MEF: 2)
# lights in the camera frame (OpenCV axes, object 2 units ahead), after MEF's blenderproc.py
CAMERA_LIGHTS = (((1.0, -1.0, 1.0), 0.55), ((-1.0, -1.0, -1.0), 0.35), ((1.0, 0.0, 1.0), 0.15))


def default_root() -> Path:
    return data_root("synthetic_objects")


def object_name(i: int) -> str:
    return f"obj_{i:04d}"


def _extent(kind: str, R: np.ndarray, size: Sequence[float]) -> np.ndarray:
    """Half extents of a primitive's axis-aligned bounding box (conservative for cylinders)."""
    if kind == "sphere":
        return np.full(3, float(size[0]))
    local = np.array([size[0], size[1], size[2]]) if kind == "box" else np.array([size[0], size[0], size[1]])
    return np.abs(R) @ local


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def make_object(seed: int, index: int) -> dict:
    """Sample object ``index`` of ``seed`` as a :class:`bench.data.synthetic.Primitives` scene dict
    (object centred at :data:`CENTRE`, largest bounding-box side 1)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x0B7E]))
    parts = []
    for k in range(int(rng.integers(2, 6))):
        kind = str(rng.choice(["box", "sphere", "cylinder"], p=[0.45, 0.25, 0.3]))
        R = _rotation(rng)
        if kind == "box":
            size = list(rng.uniform(0.15, 0.6, size=3))
        elif kind == "sphere":
            size = [float(rng.uniform(0.15, 0.45))]
        else:
            size = [float(rng.uniform(0.1, 0.35)), float(rng.uniform(0.15, 0.6))]
        # the first part is the body; the others are glued onto it (centre near its surface)
        centre = np.zeros(3) if k == 0 else rng.normal(size=3) / max(np.linalg.norm(rng.normal(size=3)), 1e-6)
        if k:
            centre = centre / np.linalg.norm(centre) * float(np.max(_extent(*parts[0][:3])) * rng.uniform(0.5, 1.0))
        parts.append((kind, R, size, centre))
    lo = np.min([c - _extent(kd, R, s) for kd, R, s, c in parts], axis=0)
    hi = np.max([c + _extent(kd, R, s) for kd, R, s, c in parts], axis=0)
    scale, mid = 1.0 / float(np.max(hi - lo)), (lo + hi) / 2
    objects = []
    patterns = ("checker", "stripes", "noise", "dots", "tiles")
    for kd, R, s, c in parts:
        objects.append(
            {
                "kind": kd,
                "semantic": 3,
                "instance": 7 + len(objects),
                "center": [float(v) for v in (c - mid) * scale + np.array(CENTRE)],
                "R": R.tolist(),
                "size": [float(v) * scale for v in s],
                "texture": _spec._texture(rng, patterns, (0.06, 0.25)),
            }
        )
    dull = {
        "pattern": "noise",
        "scale": 1.0,
        "c1": [0.0, 0.0, 0.0],
        "c2": [0.0, 0.0, 0.0],
        "phase": [0.5] * 3,
        "dir": [1.0, 0.0, 0.0],
        "waves": [[1.0, 0.0, 0.0, 0.0, 1.0]],
    }
    return {
        "object_id": object_name(index),
        "seed": int(seed),
        "index": int(index),
        "room": {"size": [ROOM] * 3, "textures": [dull] * 6},
        "objects": objects,
        "lights": [],
        "ambient": float(rng.uniform(0.25, 0.35)),
        "normalisation": {"scale": scale, "centre": list(mid)},
    }


def orbit_poses(views: int, distance: float = DISTANCE) -> torch.Tensor:
    """``[V,4,4]`` float64 object-to-camera poses: cameras on a Fibonacci sphere (every direction,
    view 0 in front of the object's +y side), looking at the object centre from ``distance``."""
    i = np.arange(views) + 0.5
    z = 1 - 2 * i / views
    phi = math.pi * (3 - math.sqrt(5)) * i + math.pi / 2
    r = np.sqrt(1 - z * z)
    dirs = torch.from_numpy(np.stack([r * np.cos(phi), r * np.sin(phi), z], -1))
    out = torch.zeros(views, 4, 4, dtype=torch.float64)
    for v in range(views):
        up = (0.0, 0.0, 1.0) if abs(float(dirs[v, 2])) < 0.95 else (0.0, 1.0, 0.0)
        w2c = look_at(dirs[v] * distance, torch.zeros(3, dtype=torch.float64), up)
        out[v] = w2c
    return out


def object_intrinsics(H: int, W: int) -> torch.Tensor:
    """MEF's field of view (``fx = 560`` at 512 px) at ``H x W``."""
    f = MEF_FOCAL / MEF_SIZE * W
    return torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=torch.float64)


def render_object(obj: dict, pose: torch.Tensor, K: torch.Tensor, H: int, W: int, supersample: int = 2) -> dict:
    """One view: ``rgb [H,W,3]`` (black background), ``depth [H,W]`` (0 background), ``mask [H,W]``."""
    prims = _raycast.Primitives(obj)
    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = -torch.tensor(CENTRE, dtype=torch.float64)
    w2c = pose.double() @ shift  # world (room) -> camera
    c2w = torch.linalg.inv(w2c)
    prims.lights = [
        ((c2w[:3, :3] @ torch.tensor(p, dtype=torch.float64) + c2w[:3, 3]).float(), inten) for p, inten in CAMERA_LIGHTS
    ]
    r = _raycast.render_view(prims, K, w2c, H, W, supersample)
    mask = r["instance"] >= 7
    return {
        "rgb": r["rgb"] * mask[..., None],
        "depth": torch.where(mask, r["depth"], torch.zeros_like(r["depth"])),
        "mask": mask,
    }


def _set_meta(objects: int, views: int, size: Sequence[int], seed: int, supersample: int) -> dict:
    H, W = int(size[0]), int(size[1])
    return {
        "generator": GENERATOR,
        "version": VERSION,
        "objects": int(objects),
        "views": int(views),
        "size": [H, W],
        "seed": int(seed),
        "supersample": int(supersample),
        "distance": DISTANCE,
        "K": object_intrinsics(H, W).tolist(),
        "pixel_offset": 0.5,
        "object_ids": [object_name(i) for i in range(objects)],
    }


def generate_object(
    root: Path, seed: int, index: int, poses: torch.Tensor, size: Sequence[int], supersample: int = 2
) -> Path:
    H, W = int(size[0]), int(size[1])
    obj = make_object(seed, index)
    d = Path(root) / obj["object_id"]
    d.mkdir(parents=True, exist_ok=True)
    K = object_intrinsics(H, W)
    for v in range(poses.shape[0]):
        r = render_object(obj, poses[v], K, H, W, supersample)
        _writer._write_png(d / f"color_{v:06d}.png", _writer.rgb_u8(r["rgb"]))
        _writer._write_png(d / f"depth_{v:06d}.png", _writer.depth_mm(r["depth"]))
        _writer._write_png(d / f"mask_{v:06d}.png", r["mask"].numpy().astype(np.uint8) * 255)
    write_json(d / "object.json", obj)
    return d


def generate(
    root: str | os.PathLike,
    objects: int = 8,
    views: int = 42,
    size: Sequence[int] = (128, 128),
    seed: int = 0,
    supersample: int = 2,
    progress: bool = False,
) -> Path:
    """Render ``objects`` x ``views``; ``root/meta.json`` is written last (it marks a complete set)."""
    root = _writer.begin_set(
        root,
        objects >= 1 and views >= 2 and min(size) >= 8,
        f"invalid object set: objects={objects}, views={views}, size={list(size)}",
        "use at least 1 object, 2 views and 8x8 pixels",
    )
    poses = orbit_poses(views)
    np.save(root / POSES_FILE, poses.numpy())
    (root / "objects.txt").write_text("".join(f"{object_name(i)}\n" for i in range(objects)))
    bar = _writer.set_progress(progress, objects, "object", f"synthetic objects ({views} views) -> {root}")
    try:
        with _writer.one_torch_thread():
            for i in range(objects):
                generate_object(root, seed, i, poses, size, supersample)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    write_json(root / "meta.json", _set_meta(objects, views, size, seed, supersample))
    return root


def holds_set(
    root: str | os.PathLike, objects: int, views: int, size: Sequence[int], seed: int, supersample: int = 2
) -> bool:
    root = Path(root)
    return (
        _writer.set_meta(root) == _set_meta(objects, views, size, seed, supersample) and (root / POSES_FILE).is_file()
    )


def ensure_objects(
    root: str | os.PathLike | None = None,
    objects: int = 8,
    views: int = 42,
    size: Sequence[int] = (128, 128),
    seed: int = 0,
    supersample: int = 2,
    progress: bool = False,
) -> Path:
    """``root`` holding exactly this set, generated unless already there (one generator at a time)."""
    return _writer.ensure_set(
        Path(root) if root is not None else default_root(),
        lambda r: holds_set(r, objects, views, size, seed, supersample),
        lambda r: generate(r, objects, views, size, seed, supersample, progress),
    )


def split_objects(names: Sequence[str], held_out: float | int) -> tuple:
    """(train, held_out): the held-out objects are the last ones (a count or a fraction)."""
    return _writer.split_scenes(names, held_out)


# -- python -m bench data synthetic_objects ------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objects", type=int, default=8, help="number of objects (default 8)")
    p.add_argument("--views", type=int, default=42, help="orbit views per object (default 42, as MEF)")
    p.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--supersample", type=int, default=2)
    p.add_argument("--out", default=None, help="output directory (default ${BENCH_DATA:-data}/synthetic_objects)")
    p.add_argument("--force", action="store_true", help="re-generate even if a matching set exists")


def cli(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_root()
    kw = dict(objects=args.objects, views=args.views, size=args.size, seed=args.seed, supersample=args.supersample)
    how = _writer.reuse_or_generate(
        out, args.force, lambda r: holds_set(r, **kw), lambda r: generate(r, **kw, progress=True)
    )
    print(
        f"synthetic objects: {args.objects} x {args.views} views at {args.size[0]}x{args.size[1]}, seed "
        f"{args.seed} -> {out} ({how}); MEF layout, read by mef_objaverse"
    )
    return 0


SyntheticObjects = register_command(
    "synthetic_objects",
    "built-in procedural objects on orbit cameras, exact depth/poses "
    "(MEF's render layout); training data of method=mef offline",
    add_arguments,
    cli,
)
