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

Each view is resampled and cropped as Probe3D does (``evals/datasets/navi.py`` ``get_single``,
``evals/datasets/utils.py`` ``get_navi_transforms`` / ``bbox_crop``): the short side to ``size`` with
**nearest** sampling for RGB and depth alike, the central ``size`` square, the square box around the
object (depth > 0; :func:`probe3d_bbox`), then nearest resampling back to ``size`` x ``size``; the xyz grid
is back-projected on the ``size`` image before the box crop and resampled with it (Probe3D's
``xyz_grid``). Samples are two-view scene samples: ``images [2,3,S,S]``, ``depth [2,S,S]`` metres,
``xyz [2,3,S,S]`` camera-frame points (metres, 0 where depth is 0), ``K [2,3,3]`` (principal point kept
at the crop's centre-derived position; Probe3D's final K drops it, which the 2D error, a difference of two
projections in one camera, does not see), ``w2c [2,4,4]`` (the object frame is the world frame;
translation in metres), ``id``, ``object``. Probe3D's ``depth[depth < min_depth] = 0`` after the nearest
resize is a no-op (nearest sampling creates no new values) and is not repeated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import crop_intrinsics, quat_to_rotmat, relative_rotation_deg, scale_intrinsics, unproject_depth
from ..errors import DataMissingError, missing_file
from .layout import FileDataset, read_array, read_rgb, register_reader


def decode_navi_depth(code: np.ndarray) -> torch.Tensor:
    """NAVI depth PNG (uint16 disparity code) -> metres, 0 where the code is 0."""
    v = torch.from_numpy(code.astype(np.float32))
    return torch.where(v > 0, 655.35 / v.clamp_min(1.0), torch.zeros_like(v))


def encode_navi_depth(depth_m: np.ndarray) -> np.ndarray:
    """Inverse of :func:`decode_navi_depth` (for fixtures and tools)."""
    with np.errstate(divide="ignore"):
        v = np.where(depth_m > 0, np.round(655.35 / np.maximum(depth_m, 1e-6)), 0)
    return np.clip(v, 0, 65535).astype(np.uint16)


def resize_short_nearest(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[C,H,W]`` with the short side resized to ``size`` by nearest sampling, the long side to
    ``int(size * long / short)`` (torchvision ``Resize(size, NEAREST)``, as Probe3D's NAVI transforms)."""
    H, W = x.shape[-2:]
    if W <= H:
        new = (int(size * H / W), size)
    else:
        new = (size, int(size * W / H))
    if new == (H, W):
        return x
    return F.interpolate(x[None].float(), size=new, mode="nearest")[0]


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop(size)``: top/left = ``int(round((H - size) / 2))`` (Python rounding)."""
    H, W = x.shape[-2:]
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def probe3d_bbox(mask: torch.Tensor) -> Tuple[int, int, int]:
    """Probe3D's square object crop (``evals/datasets/utils.py`` ``bbox_crop``) of a ``[H,W]`` mask:
    ``(row0, col0, side)``. ``side = max(br - tl)`` (exclusive of the last row/column); the shorter axis
    is padded by ``pad // 2`` on the top/left; if that square leaves the image, the start is
    ``tl - pad`` clipped at 0 on both axes instead (the object flush with the far edge)."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    tl = torch.stack([rows.min(), cols.min()])
    box = torch.stack([rows.max(), cols.max()]) - tl
    side = max(int(box.max()), 1)
    pad = side - box
    start = tl - pad // 2
    size = torch.tensor(mask.shape)
    if not (bool((start >= 0).all()) and bool((start + side <= size).all())):
        start = (tl - pad).clamp(min=0)
    return int(start[0]), int(start[1]), side


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
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataMissingError(missing_file(path), "re-extract navi_v1.0.tar.gz") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataMissingError(
            f"cannot parse {path} ({type(e).__name__}: {e})",
            "expected NAVI's list of {filename, camera, image_size}: re-extract it",
        ) from None


@register_reader("navi", "NAVI objects (in-the-wild + multi-view): RGB-D, poses; Probe3D correspondence pairs")
class NAVI(FileDataset):
    title = "NAVI"
    dirname = "navi_v1"
    layouts = ("navi_v1",)
    splits = {"navi_v1": ("test", "multiview")}
    sources = """\
wget https://storage.googleapis.com/gresearch/navi-dataset/navi_v1.0.tar.gz   (v1.0, 16 GB: the release
  Probe3D and the NeurIPS 2023 paper use; google/navi README "Dataset versions". Not v1.5, which adds video
  scenes and is 30 GB. Probe3D's README still names the old file navi_v1.tar.gz)
tar -xzf navi_v1.0.tar.gz      (point --root at the extracted folder, Probe3D's data/navi_v1)
optional: Probe3D's data_processing/resize_navi.py writes downsampled_* copies (faster loading)
(https://github.com/google/navi, https://github.com/mbanani/probe3d/blob/main/data_processing/README.md)"""
    licence = """\
NAVI: see https://github.com/google/navi and https://navidataset.github.io/ for the terms of use
(research dataset released by Google; cite Jampani et al., NeurIPS 2023)."""
    trees = {
        "navi_v1": """\
<object_id>/wild_set/annotations.json
<object_id>/wild_set/images/<id>.jpg         (or downsampled_<id>.jpg)
<object_id>/wild_set/depth/<id>.png          (uint16 disparity code)
<object_id>/multiview*/...                   (same structure)"""
    }

    def __init__(
        self,
        root,
        split: str = "test",
        layout=None,
        size: int = 512,
        max_angle: float = 120.0,
        every: int = 4,
        seed: int = 8,
    ):
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
    def pairs(
        cls, root: Path, split: str, max_angle: float = 120.0, every: int = 4, seed: int = 8
    ) -> List[Tuple[Path, str, str]]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for coll in cls.collections(root, split):
            ids = cls.images(coll)
            if len(ids) < 2:
                continue
            ann = _load_annotations(coll / "annotations.json")
            missing = [i for i in ids if i not in ann]
            if missing:
                raise DataMissingError(
                    f"{coll / 'annotations.json'} has no entry for images {missing[:3]}", "re-extract the collection"
                )
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
        return [cls._file(coll, "images", i, ".jpg") for i in (a, b)] + [
            cls._file(coll, "depth", i, ".png") for i in (a, b)
        ]

    @staticmethod
    def _file(coll: Path, sub: str, img_id: str, ext: str) -> Path:
        small = coll / sub / f"downsampled_{img_id}{ext}"
        return small if small.exists() else coll / sub / f"{img_id}{ext}"

    def view(self, coll: Path, img_id: str, ann: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """One view, resampled and cropped by Probe3D's rule (``evals/datasets/navi.py`` + ``utils.py``):
        short side to ``size`` (nearest) and central ``size`` crop, xyz grid from the intrinsics
        ``f = focal * size / min(image_size)`` with the principal point at the centre, the object square
        (:func:`probe3d_bbox`), then nearest resampling to ``size`` x ``size`` of image, depth and xyz."""
        image = read_rgb(self._file(coll, "images", img_id, ".jpg"), exif_transpose=True)
        dpath = self._file(coll, "depth", img_id, ".png")
        depth = decode_navi_depth(read_array(dpath))
        S = self.size
        image = center_crop(resize_short_nearest(image, S), S)
        depth = center_crop(resize_short_nearest(depth[None], S), S)[0]
        oh, ow = ann["image_size"]
        f = float(ann["camera"]["focal_length"]) * S / min(oh, ow)
        K = torch.tensor([[f, 0.0, S / 2.0], [0.0, f, S / 2.0], [0.0, 0.0, 1.0]])
        xyz = unproject_depth(depth, K).permute(2, 0, 1)  # [3,S,S], as Probe3D's xyz_grid
        if not bool((depth > 0).any()):
            raise DataMissingError(
                f"{dpath} has no valid depth", "re-extract the collection (depth maps are never empty)"
            )
        r0, c0, side = probe3d_bbox(depth > 0)
        image, depth, xyz = (t[..., r0 : r0 + side, c0 : c0 + side] for t in (image, depth, xyz))
        K = scale_intrinsics(crop_intrinsics(K, c0, r0), S / side, S / side)
        image, depth, xyz = (
            F.interpolate(t.reshape(1, -1, side, side), size=(S, S), mode="nearest")[0] for t in (image, depth, xyz)
        )
        return {"image": image, "depth": depth[0], "xyz": xyz, "K": K, "w2c": navi_w2c(ann["camera"])}

    def __getitem__(self, i: int) -> Dict[str, Any]:
        coll, a, b = self.items[i]
        if coll not in self._ann:
            self._ann[coll] = _load_annotations(coll / "annotations.json")
        ann = self._ann[coll]
        va, vb = self.view(coll, a, ann[a]), self.view(coll, b, ann[b])
        return {
            "images": torch.stack([va["image"], vb["image"]]),
            "depth": torch.stack([va["depth"], vb["depth"]]),
            "xyz": torch.stack([va["xyz"], vb["xyz"]]),
            "K": torch.stack([va["K"], vb["K"]]),
            "w2c": torch.stack([va["w2c"], vb["w2c"]]),
            "id": f"{coll.parent.name}/{coll.name}:{a}-{b}",
            "object": coll.parent.name,
        }
