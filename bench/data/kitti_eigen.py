"""KITTI depth on the Eigen split, in the BTS / Monocular-Depth-Estimation-Toolbox layout (FiT3D, SnD).

``kitti_eigen_train.txt`` / ``kitti_eigen_test.txt`` list ``<rgb> <depth|None> <focal>`` per line;
``<rgb>`` is relative to ``input/`` (the raw-data tree, e.g.
``2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png``), ``<depth>`` relative to
``gt_depth/`` (the annotated depth, ``2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/
0000000069.png``, uint16 = metres x 256); lines with ``None`` have no ground truth and are skipped.

``kb_crop`` (default on, as the toolbox's test pipeline) cuts the bottom-centred 352 x 1216 window
that every KITTI frame contains. ``crop`` adds ``eval_mask`` [H,W] bool: ``"garg"`` (Garg et al.
2016, the protocol's choice for KITTI) or ``"eigen"`` (Eigen et al. 2014), as fractions of the
(cropped) frame, exactly as the toolbox; ``None`` omits it.
Samples: ``image`` [3,H,W] in [0,1], ``depth`` [H,W] metres (0 invalid), ``K`` [3,3] (the left colour
camera of the drive's date, adjusted for the crop; omitted for an unknown date), optional ``eval_mask``, ``id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import DataMissingError
from .layout import FileDataset, read_depth_png, read_lines, read_rgb, register_reader

#: P_rect_02 focal lengths / principal points per recording date (KITTI raw calibration)
KITTI_K = {
    "2011_09_26": (721.5377, 609.5593, 172.8540),
    "2011_09_28": (707.0493, 604.0814, 180.5066),
    "2011_09_29": (718.3351, 600.3891, 181.5122),
    "2011_09_30": (707.0912, 601.8873, 183.1104),
    "2011_10_03": (718.8560, 607.1928, 185.2157),
}
KB_H, KB_W = 352, 1216


def crop_mask(H: int, W: int, kind: str) -> torch.Tensor:
    """The Garg or Eigen evaluation crop as a bool mask (fractions of the frame, as the toolbox)."""
    m = torch.zeros(H, W, dtype=torch.bool)
    if kind == "garg":
        m[int(0.40810811 * H) : int(0.99189189 * H), int(0.03594771 * W) : int(0.96405229 * W)] = True
    elif kind == "eigen":
        m[int(0.3324324 * H) : int(0.91351351 * H), int(0.0359477 * W) : int(0.96405229 * W)] = True
    else:
        raise DataMissingError(f"unknown KITTI evaluation crop '{kind}'", "use crop=garg, crop=eigen or crop=null")
    return m


@register_reader("kitti_eigen", "KITTI depth, Eigen split (BTS/toolbox layout), KB crop + Garg/Eigen masks")
class KITTIEigen(FileDataset):
    title = "KITTI (Eigen split)"
    dirname = "kitti"
    layouts = ("toolbox",)
    splits = {"toolbox": ("train", "test")}
    sources = """\
raw data (the synced+rectified drives of the Eigen split) into input/:
  http://www.cvlibs.net/datasets/kitti/raw_data.php   (script: raw_data_downloader.sh)
annotated depth into gt_depth/ (merge train/ and val/ drive folders):
  https://s3.eu-central-1.amazonaws.com/avg-kitti/data_depth_annotated.zip
split files kitti_eigen_train.txt / kitti_eigen_test.txt: the toolbox's splits
  (https://github.com/zhyever/Monocular-Depth-Estimation-Toolbox, splits/) or BTS's
  train_test_inputs/eigen_{train,test}_files_with_gt.txt renamed (https://github.com/cleinc/bts)"""
    licence = """\
KITTI: Creative Commons Attribution-NonCommercial-ShareAlike 3.0 (non-commercial use only);
see http://www.cvlibs.net/datasets/kitti/."""
    trees = {
        "toolbox": """\
kitti_eigen_train.txt  kitti_eigen_test.txt
input/<date>/<date>_drive_XXXX_sync/image_02/data/<frame>.png
gt_depth/<date>_drive_XXXX_sync/proj_depth/groundtruth/image_02/<frame>.png   (uint16, metres x 256)"""
    }

    def __init__(
        self,
        root,
        split: str,
        layout=None,
        kb_crop: bool = True,
        crop: Optional[str] = "garg",
        max_depth: Optional[float] = None,
    ):
        super().__init__(root, split, layout)
        self.kb_crop, self.crop, self.max_depth = bool(kb_crop), crop, max_depth
        if crop is not None:
            crop_mask(4, 4, crop)  # validate early

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        return [root / "kitti_eigen_train.txt", root / "kitti_eigen_test.txt", root / "input", root / "gt_depth"]

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        items = []
        for line in read_lines(root / f"kitti_eigen_{split}.txt"):
            parts = line.split()
            if len(parts) < 2 or parts[1] == "None":
                continue
            items.append((root / "input" / parts[0].lstrip("/"), root / "gt_depth" / parts[1].lstrip("/")))
        return sorted(items)

    @classmethod
    def item_files(cls, item: Any) -> List[Path]:
        return list(item)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        img_path, dep_path = self.items[i]
        image, depth = read_rgb(img_path), read_depth_png(dep_path, 256.0)
        if image.shape[-2:] != depth.shape:
            raise DataMissingError(
                f"{img_path} and {dep_path} differ in size",
                "the split file pairs the wrong files: use the toolbox/BTS split files",
            )
        date = img_path.relative_to(self.root / "input").parts[0]
        K = None
        if date in KITTI_K:  # no guess for an unknown date: K is then omitted
            f, cx, cy = KITTI_K[date]
            K = torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
        if self.kb_crop:
            H, W = depth.shape
            top, left = H - KB_H, (W - KB_W) // 2
            if top < 0 or left < 0:
                raise DataMissingError(f"{img_path} is smaller than the 352x1216 KB crop", "use the raw KITTI frames")
            image, depth = image[:, top : top + KB_H, left : left + KB_W], depth[top : top + KB_H, left : left + KB_W]
            if K is not None:
                K[0, 2] -= left
                K[1, 2] -= top
        if self.max_depth is not None:
            depth = torch.where(depth > self.max_depth, torch.zeros_like(depth), depth)
        out = {
            "image": image.contiguous(),
            "depth": depth.contiguous(),
            "id": str(img_path.relative_to(self.root / "input")),
        }
        if K is not None:
            out["K"] = K
        if self.crop is not None:
            out["eval_mask"] = crop_mask(*depth.shape, self.crop)
        return out
