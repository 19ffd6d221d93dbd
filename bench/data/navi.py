"""NAVI (Jampani et al., NeurIPS 2023): object image collections with exact object-to-camera poses.

Layout (``navi_v1``): ``<object>/{multiview*,wild_set}/annotations.json`` plus ``images/<id>.jpg`` and
``depth/<id>.png`` (Probe3D's ``resize_navi.py`` adds ``downsampled_<id>.*`` copies, shortest side
1024, which are preferred when present). ``annotations.json`` lists per image ``filename``,
``camera.q`` (wxyz, object-to-camera rotation), ``camera.t`` (millimetres), ``camera.focal_length``
(pixels at the original ``image_size`` = [h, w]); the principal point is the image centre. Depth PNGs
store a disparity code ``v``: depth = 65535 * 10 / v millimetres (0 = no object).

Pairs follow Probe3D's correspondence protocol: ``test`` = the in-the-wild collections of the objects
that also have multi-view scenes; every image gets one partner from its own collection whose relative
rotation is in (0, ``max_angle``] degrees, drawn with a seeded generator over sorted image ids (Probe3D
draws over directory-listing order, so its exact pairs are not reproducible); every 4th image is kept.
``multiview`` does the same on the multi-view scenes.

Each view is cropped as Probe3D does: the central square, then a square box around the object (depth
> 0), resized to ``size`` x ``size`` (bilinear for RGB, nearest for depth); intrinsics follow the crop.
Samples are two-view scene samples: ``images [2,3,S,S]``, ``depth [2,S,S]`` metres, ``K [2,3,3]``,
``w2c [2,4,4]`` (the object frame is the world frame; translation in metres), ``id``, ``object``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import crop_intrinsics, quat_to_rotmat, relative_rotation_deg, scale_intrinsics
from ..errors import DataMissingError
from ..registry import DATASETS
from .layout import FileDataset, read_array, read_rgb


def decode_navi_depth(code: np.ndarray) -> torch.Tensor:
    """NAVI depth PNG (uint16 disparity code) -> metres, 0 where the code is 0."""
    v = torch.from_numpy(code.astype(np.float32))
    return torch.where(v > 0, 655.35 / v.clamp_min(1.0), torch.zeros_like(v))


def encode_navi_depth(depth_m: np.ndarray) -> np.ndarray:
    """Inverse of :func:`decode_navi_depth` (for fixtures and tools)."""
    with np.errstate(divide="ignore"):
        v = np.where(depth_m > 0, np.round(655.35 / np.maximum(depth_m, 1e-6)), 0)
    return np.clip(v, 0, 65535).astype(np.uint16)


def navi_w2c(camera: Dict[str, Any]) -> torch.Tensor:
    """Object-to-camera 4x4 (OpenCV axes, metres) from a NAVI ``camera`` annotation."""
    T = torch.eye(4)
    T[:3, :3] = quat_to_rotmat(torch.tensor(camera["q"], dtype=torch.float32))
    T[:3, 3] = torch.tensor(camera["t"], dtype=torch.float32) / 1000.0
    return T


def _load_annotations(path: Path) -> Dict[str, Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
        return {Path(a["filename"]).stem: a for a in data}
    except FileNotFoundError:
        raise DataMissingError(f"missing file {path}", "re-extract navi_v1.tar.gz") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataMissingError(f"cannot parse {path} ({type(e).__name__}: {e})",
                               "expected NAVI's list of {filename, camera, image_size}: re-extract it") from None


@DATASETS.register("navi", "NAVI objects (in-the-wild + multi-view): RGB-D, poses; Probe3D correspondence pairs")
class NAVI(FileDataset):
    name = "navi"
    title = "NAVI"
    dirname = "navi_v1"
    layouts = ("navi_v1",)
    splits = {"navi_v1": ("test", "multiview")}
    sources = """\
wget http://storage.googleapis.com/gresearch/navi-dataset/navi_v1.tar.gz   (v1.0, used by Probe3D; 16 GB)
tar -xzf navi_v1.tar.gz
optional: Probe3D's data_processing/resize_navi.py writes downsampled_* copies (faster loading)
(https://github.com/google/navi, https://github.com/mbanani/probe3d/blob/main/data_processing/README.md)"""
    licence = """\
NAVI: see https://github.com/google/navi and https://navidataset.github.io/ for the terms of use
(research dataset released by Google; cite Jampani et al., NeurIPS 2023)."""
    trees = {"navi_v1": """\
<object_id>/wild_set/annotations.json
<object_id>/wild_set/images/<id>.jpg         (or downsampled_<id>.jpg)
<object_id>/wild_set/depth/<id>.png          (uint16 disparity code)
<object_id>/multiview*/...                   (same structure)"""}

    def __init__(self, root, split: str = "test", layout=None, size: int = 512, max_angle: float = 120.0,
                 every: int = 4, seed: int = 8):
        super().__init__(root, split, layout)  # indexes the pairs with the protocol defaults
        self.size = int(size)
        if (float(max_angle), int(every), int(seed)) != (120.0, 4, 8):
            self.items = self.pairs(self.root, split, float(max_angle), int(every), int(seed))
        self._ann: Dict[Path, Dict[str, Dict[str, Any]]] = {}

    @classmethod
    def collections(cls, root: Path, split: str) -> List[Path]:
        out = []
        for obj in sorted(p for p in root.iterdir() if p.is_dir()):
            wild = obj / "wild_set"
            multi = sorted(p for p in obj.glob("multiview*") if p.is_dir())
            if split == "test" and wild.is_dir() and multi:
                out.append(wild)
            elif split == "multiview":
                out += multi
        return out

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        found = sorted(root.glob("*/wild_set/annotations.json"))
        return found[:1] or [root / "<object_id>" / "wild_set" / "annotations.json"]

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        return cls.pairs(root, split)

    @classmethod
    def images(cls, coll: Path) -> List[str]:
        d = coll / "images"
        if not d.is_dir():
            return []
        return sorted(p.stem for p in d.iterdir() if p.suffix.lower() == ".jpg" and "_" not in p.stem)

    @classmethod
    def pairs(cls, root: Path, split: str, max_angle: float = 120.0, every: int = 4,
              seed: int = 8) -> List[Tuple[Path, str, str]]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for coll in cls.collections(root, split):
            ids = cls.images(coll)
            if len(ids) < 2:
                continue
            ann = _load_annotations(coll / "annotations.json")
            missing = [i for i in ids if i not in ann]
            if missing:
                raise DataMissingError(f"{coll / 'annotations.json'} has no entry for images {missing[:3]}",
                                       "re-extract the collection")
            w2c = torch.stack([navi_w2c(ann[i]["camera"]) for i in ids])
            ang = relative_rotation_deg(w2c[:, None], w2c[None, :])
            for a, img in enumerate(ids):
                ok = ((ang[a] > 0) & (ang[a] <= max_angle)).float()
                if ok.sum() == 0:
                    continue
                b = int(torch.multinomial(ok, 1, generator=gen))
                out.append((coll, img, ids[b]))
        return out[::every]

    @classmethod
    def item_files(cls, item: Any) -> List[Path]:
        coll, a, b = item
        return [cls._file(coll, "images", i, ".jpg") for i in (a, b)] + \
               [cls._file(coll, "depth", i, ".png") for i in (a, b)]

    @staticmethod
    def _file(coll: Path, sub: str, img_id: str, ext: str) -> Path:
        small = coll / sub / f"downsampled_{img_id}{ext}"
        return small if small.exists() else coll / sub / f"{img_id}{ext}"

    def view(self, coll: Path, img_id: str, ann: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """One view, cropped and resized as the protocol says."""
        image = read_rgb(self._file(coll, "images", img_id, ".jpg"), exif_transpose=True)
        dpath = self._file(coll, "depth", img_id, ".png")
        depth = decode_navi_depth(read_array(dpath))
        H, W = image.shape[-2:]
        if depth.shape != (H, W):
            depth = F.interpolate(depth[None, None], size=(H, W), mode="nearest")[0, 0]
        oh, ow = ann["image_size"]
        f = float(ann["camera"]["focal_length"]) * min(H, W) / min(oh, ow)
        K = torch.tensor([[f, 0.0, W / 2.0], [0.0, f, H / 2.0], [0.0, 0.0, 1.0]])
        # central square
        S = min(H, W)
        x0, y0 = (W - S) // 2, (H - S) // 2
        image, depth = image[:, y0:y0 + S, x0:x0 + S], depth[y0:y0 + S, x0:x0 + S]
        K = crop_intrinsics(K, x0, y0)
        # square box around the object (Probe3D's bbox crop, clamped into the image)
        rows, cols = torch.nonzero(depth > 0, as_tuple=True)
        if rows.numel() == 0:
            raise DataMissingError(f"{dpath} has no valid depth", "re-extract the collection (depth maps are never empty)")
        tl = torch.stack([rows.min(), cols.min()])
        box = torch.stack([rows.max(), cols.max()]) - tl
        side = int(max(int(box.max()), 1))
        r0, c0 = [int(v) for v in (tl - (side - box) // 2).clamp(min=0, max=S - side)]
        image, depth = image[:, r0:r0 + side, c0:c0 + side], depth[r0:r0 + side, c0:c0 + side]
        K = crop_intrinsics(K, c0, r0)
        # resize
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)[0].clamp(0, 1)
        depth = F.interpolate(depth[None, None], size=(self.size, self.size), mode="nearest")[0, 0]
        K = scale_intrinsics(K, self.size / side, self.size / side)
        return {"image": image, "depth": depth, "K": K, "w2c": navi_w2c(ann["camera"])}

    def __getitem__(self, i: int) -> Dict[str, Any]:
        coll, a, b = self.items[i]
        if coll not in self._ann:
            self._ann[coll] = _load_annotations(coll / "annotations.json")
        ann = self._ann[coll]
        va, vb = self.view(coll, a, ann[a]), self.view(coll, b, ann[b])
        return {"images": torch.stack([va["image"], vb["image"]]), "depth": torch.stack([va["depth"], vb["depth"]]),
                "K": torch.stack([va["K"], vb["K"]]), "w2c": torch.stack([va["w2c"], vb["w2c"]]),
                "id": f"{coll.parent.name}/{coll.name}:{a}-{b}", "object": coll.parent.name}
