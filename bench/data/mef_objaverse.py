"""MEF's multi-view object renders (Objaverse, BlenderProc), in the layout the authors' scripts write.

Facts (qq456cvb/3DCorrEnhance ``data_utils/render_objects.py``, ``data_utils/blenderproc.py``,
``data_utils/dataset.py``): 10k Objaverse objects (``data/10k.txt``: ``<group>/<uid>`` per line) are
each normalised to a unit largest bounding-box side, centred, and rendered at 512x512 under every
object-to-camera pose of ``data/obj_poses.npy`` (42 poses [42,4,4], OpenCV camera axes, the object 2
units in front of the camera) with the fixed intrinsics ``fx = fy = 35 * 512 / 32 = 560``, ``cx = cy =
256``. Per object folder: ``color_XXXXXX.png`` (RGB, black background), ``depth_XXXXXX.png`` (uint16
z-depth in millimetres, 0 = background) and ``mask_XXXXXX.png`` (0 / 255). A pixel ``(u, v)`` (integer
column/row) unprojects as ``X_cam = depth * K^-1 [u, v, 1]`` and ``X_obj = pose^-1 X_cam`` (official
``img_coord_2_obj_coord``: integer pixel coordinates, i.e. ``pixel_offset = 0``).

A root prepared for bench is the renders folder with the two files from the official repository's
``data/`` copied in (see :data:`TREE`). bench's object generator (:mod:`bench.data.objects`) writes the
same layout plus a ``meta.json`` that records its own intrinsics, image size and pixel-centre
convention (``pixel_offset`` 0.5, exact for its ray-cast depth); the reader prefers it when present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import DataMissingError
from .layout import FileDataset, read_array, read_rgb, register_reader

POSES_FILE = "obj_poses.npy"
LIST_FILES = ("10k.txt", "objects.txt")
META_FILE = "meta.json"
MEF_SIZE = 512
MEF_FOCAL = 35 * 512 / 32.0


def mef_intrinsics() -> torch.Tensor:
    """The official renders' K (float64)."""
    return torch.tensor([[MEF_FOCAL, 0.0, 256.0], [0.0, MEF_FOCAL, 256.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def unproject(
    pix: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, pose: torch.Tensor, pixel_offset: float = 0.0
) -> torch.Tensor:
    """Object-frame points ``[N,3]`` of integer pixels ``pix [N,2]`` (x=column, y=row) of a view with
    z-depth ``depth [H,W]`` (metres / object units), intrinsics ``K`` and object-to-camera ``pose``."""
    pix = pix.long()
    z = depth[pix[:, 1], pix[:, 0]].double()
    uv1 = torch.cat([pix.double() + pixel_offset, torch.ones_like(z)[:, None]], 1)
    cam = (uv1 @ torch.linalg.inv(K.double()).T) * z[:, None]
    cam_h = torch.cat([cam, torch.ones_like(z)[:, None]], 1)
    return (cam_h @ torch.linalg.inv(pose.double()).T)[:, :3].float()


def list_objects(root: Path) -> List[str]:
    """Object names: the first list file present (``10k.txt``, ``objects.txt``) restricted to objects
    that were rendered, else every folder (one or two levels deep) holding ``color_000000.png``."""
    for name in LIST_FILES:
        p = root / name
        if p.is_file():
            names = [ln.strip().split(".")[0] for ln in p.read_text().splitlines() if ln.strip()]
            return [n for n in names if (root / n / "color_000000.png").is_file()]
    found = sorted(
        {
            str(p.parent.relative_to(root))
            for pat in ("*/color_000000.png", "*/*/color_000000.png")
            for p in root.glob(pat)
        }
    )
    return found


@register_reader(
    "mef_objaverse",
    "MEF's Objaverse multi-view object renders (color/depth/mask per pose, obj_poses.npy), training data of method=mef",
)
class ObjectRenders(FileDataset):
    """Multi-view renders of objects; ``self.items`` are object names. ``view(obj, i)`` reads one view."""

    title = "MEF Objaverse multi-view renders (3DCorrEnhance)"
    dirname = "objaverse_renderings"
    layouts = ("mef",)
    splits = {"mef": ("train",)}
    sources = """\
git clone https://github.com/qq456cvb/3DCorrEnhance     (data/10k.txt, data/obj_poses.npy, render scripts)
Download the 10k Objaverse GLBs listed in data/10k.txt from
  https://huggingface.co/datasets/allenai/objaverse/tree/main/glbs  (e.g. the `objaverse` PyPI package)
into data/objaverse/hf-objaverse-v1/glbs/, install blenderproc, then render:
  python data_utils/render_objects.py      (writes data/objaverse_renderings/<group>/<uid>/)
Copy data/obj_poses.npy and data/10k.txt into the renderings folder and point --root at it.
Offline stand-in: method.data.dataset=synthetic_objects (bench.data.objects, generated on first use)."""
    licence = """\
Objaverse 1.0: ODC-By 1.0 as a collection; every object keeps its own Creative Commons licence
(see the per-object metadata on the Hub). 3DCorrEnhance code and pose file: MIT licence."""
    trees = {
        "mef": """\
obj_poses.npy                          [42,4,4] object-to-camera poses (official data/obj_poses.npy)
10k.txt                                <group>/<uid> per line (optional; default: every rendered folder)
<group>/<uid>/color_000000.png ...     RGB 512x512, black background, one per pose
<group>/<uid>/depth_000000.png ...     uint16 z-depth, millimetres, 0 = background
<group>/<uid>/mask_000000.png ...      0 / 255 object mask"""
    }

    def __init__(
        self, root, split: str = "train", layout: Optional[str] = None, objects: Optional[Sequence[str]] = None
    ):
        super().__init__(root, split, layout)
        if objects is not None:
            self.items = [str(o) for o in objects]
        if not self.items:
            raise DataMissingError(
                f"no rendered objects under {self.root}",
                f"render them as `python -m bench data {self.name} --root {self.root}` explains",
            )
        self.poses = torch.from_numpy(np.load(self.root / POSES_FILE).astype(np.float64))
        meta = {}
        if (self.root / META_FILE).is_file():
            meta = json.loads((self.root / META_FILE).read_text())
        self.meta = meta
        self.K = torch.tensor(meta["K"], dtype=torch.float64) if "K" in meta else mef_intrinsics()
        self.pixel_offset = float(meta.get("pixel_offset", 0.0))
        if self.poses.ndim != 3 or self.poses.shape[1:] != (4, 4):
            raise DataMissingError(
                f"{self.root / POSES_FILE} holds an array of shape {tuple(self.poses.shape)}, "
                "not [V,4,4] object-to-camera poses",
                "copy data/obj_poses.npy of the official repository",
            )

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        return [root / POSES_FILE]

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        return list_objects(root)

    @property
    def num_views(self) -> int:
        return int(self.poses.shape[0])

    def view(self, obj: str, i: int) -> Dict[str, Any]:
        """``image [3,H,W]`` in [0,1], ``depth [H,W]`` (object units: metres of the normalised object),
        ``mask [H,W]`` bool, ``pose [4,4]`` object-to-camera, ``K [3,3]``. The last ``cache_views``
        decoded views are kept in memory (small sets are read from disk once)."""
        key = (obj, int(i))
        cache = self.__dict__.setdefault("_cache", {})
        if key in cache:
            return dict(cache[key])
        out = self._read_view(obj, int(i))
        if len(cache) >= self.cache_views:
            cache.pop(next(iter(cache)))
        cache[key] = out
        return dict(out)

    cache_views = 512

    def _read_view(self, obj: str, i: int) -> Dict[str, Any]:
        d = self.root / obj
        image = read_rgb(d / f"color_{i:06d}.png")
        depth = torch.from_numpy(read_array(d / f"depth_{i:06d}.png").astype(np.float32) / 1000.0)
        mask = torch.from_numpy(read_array(d / f"mask_{i:06d}.png") > 0)
        if depth.shape != image.shape[-2:] or mask.shape != image.shape[-2:]:
            raise DataMissingError(
                f"{d} view {i}: color {tuple(image.shape[-2:])}, depth {tuple(depth.shape)} and "
                f"mask {tuple(mask.shape)} differ in size",
                "re-render the object",
            )
        return {"image": image, "depth": depth, "mask": mask, "pose": self.poses[i], "K": self.K}

    def __getitem__(self, i: int) -> Dict[str, Any]:
        obj = self.items[i]
        return {"object": obj, **self.view(obj, 0)}
