"""ScanNet-1500: the 1500 SuperGlue/LoFTR test pairs, in the ``scannet_test_1500`` layout Probe3D reads.

``test.npz`` holds ``name`` = int array ``[N, 4]`` of ``(scene, sub-scan, frame_0, frame_1)``;
``intrinsics.npz`` maps ``sceneXXXX_YY`` to a 3x3 matrix: the intrinsics of the **640x480 depth maps**
(LoFTR ``src/datasets/scannet.py``: "path to depth-camera intrinsic file", "read the intrinsic of
depthmap"; LoFTR and Probe3D resize the colour frame to 640x480 to align it with the depth and use this K
unscaled for both). Per scene: ``color/<frame>.jpg``, ``depth/<frame>.png`` (uint16 millimetres) and
``pose/<frame>.txt`` (4x4 camera-to-world, OpenCV axes).

A sample is a two-view scene sample (the multi-view convention with V = 2): ``images [2,3,H,W]`` in
[0,1] as stored, ``depth [2,Hd,Wd]`` metres as stored, ``K_depth [2,3,3]`` (the npz K, for the 640x480
depth; scaled only if a depth map is not 640x480), ``K [2,3,3]`` (the same camera at the colour frame's
size: the npz K scaled by colour size / 640x480), ``w2c [2,4,4]``, plus ``id`` (``scene:f0-f1``). The
correspondence task scales ``K_depth`` once, by its depth_scale (Probe3D: ``K[:2] *= 0.25``). Whether the
colour JPEGs inside LoFTR's ``scannet_test_1500.tar`` are 640x480 or the raw 1296x968 could not be
verified here (the archive is licensed); either size gives the same K_depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from ..cameras import scale_intrinsics
from ..errors import DataMissingError, missing_file
from .layout import FileDataset, load_npz, read_depth_png, read_rgb, register_reader


#: the size (H, W) that intrinsics.npz describes: the ScanNet depth maps (LoFTR src/datasets/scannet.py)
NPZ_K_SIZE = (480, 640)


def pair_intrinsics(K_npz: torch.Tensor, image_hw, depth_hw) -> tuple:
    """``(K_image, K_depth)`` from the npz K of the 640x480 depth: each is scaled from 640x480 to the
    map's own size exactly once (identity for the 640x480 maps of ScanNet-1500)."""
    H0, W0 = NPZ_K_SIZE
    (H, W), (Hd, Wd) = tuple(image_hw), tuple(depth_hw)
    return scale_intrinsics(K_npz, W / W0, H / H0), scale_intrinsics(K_npz, Wd / W0, Hd / H0)


def read_pose(path: Path) -> torch.Tensor:
    """A 4x4 camera-to-world text matrix."""
    try:
        T = np.loadtxt(path, dtype=np.float64).reshape(4, 4)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataMissingError(missing_file(path), "re-extract scannet_test_1500.tar") from None
    except ValueError as e:
        raise DataMissingError(f"cannot parse pose {path} ({e})", "expected a 4x4 matrix of numbers") from None
    if not np.isfinite(T).all():
        raise DataMissingError(f"pose {path} is not finite", "ScanNet marks lost tracking with -inf; drop this pair")
    return torch.from_numpy(T)


@register_reader("scannet_pairs", "ScanNet-1500 test pairs (SuperGlue/LoFTR list): RGB-D + poses, for correspondence")
class ScanNetPairs(FileDataset):
    title = "ScanNet-1500 test pairs"
    dirname = "scannet_test_1500"
    layouts = ("loftr",)
    splits = {"loftr": ("test",)}
    sources = """\
scannet_test_1500.tar from LoFTR (Google Drive id 1wtl-mNicxGlXZ-UQJxFnKuWPvvssQBwd, e.g.
  `gdown --id 1wtl-mNicxGlXZ-UQJxFnKuWPvvssQBwd`), extracted to the root; then into the root:
  https://raw.githubusercontent.com/zju3dv/LoFTR/master/assets/scannet_test_1500/intrinsics.npz
  https://raw.githubusercontent.com/zju3dv/LoFTR/master/assets/scannet_test_1500/test.npz
(see https://github.com/mbanani/probe3d/blob/main/data_processing/README.md)"""
    licence = """\
ScanNet Terms of Use (non-commercial research; sign the agreement at http://www.scan-net.org/).
bench cannot download ScanNet for you: accept the terms yourself."""
    trees = {
        "loftr": """\
test.npz                        (name: int [1500, 4] = scene, sub-scan, frame_0, frame_1)
intrinsics.npz                  (sceneXXXX_YY -> 3x3)
sceneXXXX_YY/color/<frame>.jpg
sceneXXXX_YY/depth/<frame>.png  (uint16 millimetres)
sceneXXXX_YY/pose/<frame>.txt   (4x4 camera-to-world)"""
    }

    def __init__(self, root, split: str = "test", layout=None):
        super().__init__(root, split, layout)
        self.intrinsics = load_npz(self.root / "intrinsics.npz")

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        return [root / "test.npz", root / "intrinsics.npz"]

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        names = load_npz(root / "test.npz").get("name")
        if names is None or names.ndim != 2 or names.shape[1] != 4:
            raise DataMissingError(
                f"{root / 'test.npz'} has no 'name' array of shape [N, 4]",
                "download test.npz from the LoFTR repository again",
            )
        return [(f"scene{int(a):04d}_{int(b):02d}", int(f0), int(f1)) for a, b, f0, f1 in names.tolist()]

    @staticmethod
    def files(root: Path, scene: str, frame: int) -> Dict[str, Path]:
        d = root / scene
        return {
            "color": d / "color" / f"{frame}.jpg",
            "depth": d / "depth" / f"{frame}.png",
            "pose": d / "pose" / f"{frame}.txt",
        }

    @classmethod
    def missing(cls, root: Path, layout: str, deep: bool = False) -> List[str]:
        miss = super().missing(root, layout, deep=False)
        if miss or not deep:
            return miss
        out = []
        intr = load_npz(root / "intrinsics.npz")
        for scene, f0, f1 in cls.index(root, layout, "test"):
            if scene not in intr:
                out.append(f"{root / 'intrinsics.npz'}[{scene}]")
            for f in (f0, f1):
                out += [str(p) for p in cls.files(root, scene, f).values() if not p.exists()]
        return sorted(set(out), key=out.index)

    @classmethod
    def _verify(cls, root: Path, layout: str) -> List[str]:
        from .layout import verify_image

        bad = []
        for scene, f0, f1 in cls.index(root, layout, "test"):
            for f in (f0, f1):
                fs = cls.files(root, scene, f)
                bad += [w for w in (verify_image(fs["color"]), verify_image(fs["depth"])) if w]
        return bad

    def __getitem__(self, i: int) -> Dict[str, Any]:
        scene, f0, f1 = self.items[i]
        if scene not in self.intrinsics:
            raise DataMissingError(
                f"{self.root / 'intrinsics.npz'} has no entry for {scene}",
                "download intrinsics.npz from the LoFTR repository again",
            )
        K_npz = torch.as_tensor(self.intrinsics[scene], dtype=torch.float32).reshape(3, 3)
        images, depths, w2c = [], [], []
        for f in (f0, f1):
            fs = self.files(self.root, scene, f)
            images.append(read_rgb(fs["color"]))
            depths.append(read_depth_png(fs["depth"], 1000.0))
            w2c.append(torch.linalg.inv(read_pose(fs["pose"])).float())
        if images[0].shape != images[1].shape or depths[0].shape != depths[1].shape:
            raise DataMissingError(
                f"frames {f0} and {f1} of {scene} differ in size",
                "ScanNet-1500 frames are all 640x480: re-extract the archive",
            )
        K_img, K_depth = pair_intrinsics(K_npz, images[0].shape[-2:], depths[0].shape)
        return {
            "images": torch.stack(images),
            "depth": torch.stack(depths),
            "K": torch.stack([K_img, K_img]),
            "K_depth": torch.stack([K_depth, K_depth]),
            "w2c": torch.stack(w2c),
            "id": f"{scene}:{f0}-{f1}",
        }
