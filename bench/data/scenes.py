"""Multi-view scene reader for the ScanNet++ DSLR layout: built-in synthetic scenes and real ScanNet++.

Scene folders are found under ``root`` (or ``root/data`` as in the official ScanNet++ download, or
``root/scenes`` as in FiT3D's reorganised copy). Two layouts are read::

    ScanNet++ DSLR (official toolkit: undistortion + depth rendering; also what the generator writes)
    <scene>/dslr/nerfstudio/transforms_undistorted.json   PINHOLE intrinsics + frames (c2w, OpenGL)
    <scene>/dslr/undistorted_images/<file_path>           RGB (JPG for ScanNet++, PNG for synthetic)
    <scene>/dslr/{undistorted_render_depth|render_depth}/<stem>.png          uint16 mm (optional)
    <scene>/dslr/{undistorted_render_semantic|render_semantic}/<stem>.png   labels (optional)
    <scene>/dslr/{undistorted_render_instance|render_instance}/<stem>.png   instance ids (optional)
    <scene>/dslr/render_normal_camera/<stem>.npz          ["normals"]: float16 [H,W,3] camera-frame
                                                           (synthetic only, optional)

    FiT3D (scannetpp_preprocess/reorganize_data.py) and the official Splat-and-Distill ScanNet++ layout
    <scene>/transforms_train.json, <scene>/images/<file_path>, optional render_* folders next to them,
    <scene>/instance_segmentation/<file_path>.png   instance ids (SnD ``dataset_scannetpp.py``: read with
                                                   ``PILToTensor``, resized nearest); an RGB-coded map gets
                                                   one id per colour (``(r << 16) | (g << 8) | b``)

Poses: nerfstudio ``transform_matrix`` is camera-to-world in OpenGL axes and is converted to OpenCV
world-to-camera. Frames flagged ``is_bad`` are skipped (``keep_bad=True``: kept); views are ordered by ``file_path`` (the DSLR
capture order). Semantic value 65535 (ScanNet++'s rendered "unlabelled") becomes 255 (ignore).

Caveat for real ScanNet++: the toolkit's ``common/render.py`` renders ``render_depth`` with the
*distorted* (fisheye) DSLR camera. Pair undistorted images with depth that was rendered with, or
remapped to, the undistorted camera (``undistorted_render_depth``), which is preferred when present.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..cameras import opengl_c2w_to_opencv_w2c, scale_intrinsics
from ..errors import DataMissingError, what_is_at
from .layout import load_npz, open_image, register_command

__all__ = ["MultiViewScenes", "ViewDataset", "MAP_DIRS", "SCANNETPP_HELP", "export_snd_layout"]

#: optional per-view maps: candidate folder names (first existing wins) and file suffix
MAP_DIRS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "depth": (("undistorted_render_depth", "render_depth"), ".png"),
    "normals": (("render_normal_camera",), ".npz"),
    "semantic": (("undistorted_render_semantic", "render_semantic"), ".png"),
    # instance ids; ``instance_segmentation/<file_path>.png`` is the official Splat-and-Distill ScanNet++ layout
    # (davidshavin4/Splat-and-Distill src/dataset/dataset_scannetpp.py: <root>/scenes/<id>/instance_segmentation/)
    "instance": (("undistorted_render_instance", "render_instance", "instance_segmentation"), ".png"),
    # ScanNet++ anonymisation masks (255 = keep, 0 = anonymised; FiT3D datasets/scannetpp.py reads <scene>/masks/)
    "anon": (("undistorted_anon_masks", "masks"), ".png"),
}
_LAYOUTS = (  # (transforms json, image dir, map base dir), relative to the scene folder
    ("dslr/nerfstudio/transforms_undistorted.json", "dslr/undistorted_images", "dslr"),
    ("transforms_train.json", "images", "."),
)
SCANNETPP_HELP = """\
ScanNet++ is licensed: it cannot be downloaded for you.
 1. Apply for access at https://kaldir.vc.in.tum.de/scannetpp/ and use the official download script
    with the DSLR assets (FiT3D's list): dslr_train_test_lists_path, dslr_resized_dir,
    dslr_resized_mask_dir, dslr_colmap_dir, dslr_nerfstudio_transform_path, scan_mesh_path,
    scan_mesh_mask_path, scan_mesh_segs_path, scan_anno_json_path, scan_sem_mesh_path.
 2. With the ScanNet++ toolkit (github.com/scannetpp/scannetpp), as in FiT3D's preprocessing
    (downscale x2, then undistort): `python -m dslr.downscale dslr/configs/downscale.yml`, then
    `python -m dslr.undistort dslr/configs/undistort.yml` -> dslr/undistorted_images/ and
    dslr/nerfstudio/transforms_undistorted.json.
 3. Render depth (and semantics) from the mesh for the undistorted camera (toolkit `common/render.py`,
    uint16 millimetre PNGs) into dslr/undistorted_render_depth/ (or dslr/render_depth/), semantics into
    dslr/undistorted_render_semantic/, instances into dslr/undistorted_render_instance/.
Expected tree under --root (or --root/data):
  <scene_id>/dslr/nerfstudio/transforms_undistorted.json
  <scene_id>/dslr/undistorted_images/DSC*.JPG
  <scene_id>/dslr/undistorted_render_depth/DSC*.png      (optional; needed for depth tasks)
  <scene_id>/dslr/undistorted_render_semantic/DSC*.png   (optional; needed for segmentation)
FiT3D's reorganised copy (<scene_id>/transforms_train.json + <scene_id>/images/) is read as well."""


# ------------------------------------------------------------------------------------ decoding
def _resize(x: Tensor, size: Tuple[int, int], mode: str) -> Tensor:
    """Resize [..., H, W] maps (images: bilinear + antialias; others: nearest-exact, centre-aligned)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    y = x.reshape(1, -1, *x.shape[-2:])
    if mode == "bilinear":
        y = F.interpolate(y.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    else:
        y = F.interpolate(y.float(), size=size, mode="nearest-exact").to(x.dtype)
    return y.reshape(*lead, *size)


@dataclass
class _Scene:
    scene_id: str
    path: Path
    image_dir: Path
    json_path: Path
    names: List[str]  # file_path of each view, sorted
    K: np.ndarray  # [N,3,3] float64, for the size (w, h) in the json
    w2c: np.ndarray  # [N,4,4] float64 OpenCV
    wh: np.ndarray  # [N,2] (w, h) from the json
    maps: Dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- reader
class MultiViewScenes:
    """Posed multi-view scenes in the ScanNet++ DSLR layout (synthetic or real).

    Args:
        root: dataset root (scene folders directly inside, or inside ``root/data`` / ``root/scenes``).
        scene_ids: scenes to use (default: all found; for a synthetic set, those in ``root/meta.json``).
        size: optional ``(H, W)`` every view is resized to (intrinsics scaled consistently).

    ``load_views(scene, idx)`` returns the project's scene sample: ``images [V,3,H,W]`` in [0,1],
    ``K [V,3,3]`` pixels, ``w2c [V,4,4]`` OpenCV, and when the scene has them ``depth [V,H,W]``
    (metres, 0 = invalid), ``normals [V,3,H,W]`` (camera frame), ``semantic``/``instance [V,H,W]``
    int64 (semantic 255 = ignore).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        scene_ids: Optional[Sequence[str]] = None,
        size: Optional[Sequence[int]] = None,
        keep_bad: bool = False,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataMissingError(f"data root {self.root} {what_is_at(self.root, 'directory')}", self._fix())
        self.size = (int(size[0]), int(size[1])) if size is not None else None
        self.keep_bad = bool(keep_bad)  # frames flagged is_bad are read too (Splat-and-Distill's official loader)
        self.scene_root = self._scene_root()
        if scene_ids is None:
            scene_ids = self._discover()
            if not scene_ids:
                raise DataMissingError(
                    f"no scenes under {self.root} (looked for <scene>/{_LAYOUTS[0][0]} and <scene>/{_LAYOUTS[1][0]})",
                    self._fix(),
                )
        self.scene_ids: List[str] = [str(s) for s in scene_ids]
        self._cache: Dict[str, _Scene] = {}

    # ---- discovery / metadata
    def _synthetic_meta(self) -> Optional[dict]:
        try:
            meta = json.loads((self.root / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("generator") == "bench.synthetic" else None

    def _fix(self) -> str:
        meta = self._synthetic_meta() if self.root.is_dir() else None
        if meta is not None or "synth" in self.root.name:
            m = meta or {"scenes": 8, "views": 24, "size": [224, 224], "seed": 0}
            return (
                f"re-generate with `python -m bench data synthetic --scenes {m['scenes']} --views {m['views']} "
                f"--size {m['size'][0]} {m['size'][1]} --seed {m['seed']} --out {self.root} --force`"
            )
        return (
            f"prepare ScanNet++ (licensed; apply at https://kaldir.vc.in.tum.de/scannetpp/) and check the "
            f"layout with `python -m bench data scannetpp --root {self.root}`"
        )

    def _scene_root(self) -> Path:
        for cand in (self.root, self.root / "data", self.root / "scenes"):
            if cand.is_dir() and any(_layout(d) for d in _subdirs(cand)):
                return cand
        return self.root

    def _discover(self) -> List[str]:
        meta = self._synthetic_meta()
        if meta is not None and meta.get("scene_ids"):
            return list(meta["scene_ids"])
        return sorted(d.name for d in _subdirs(self.scene_root) if _layout(d))

    def _scene(self, scene: str) -> _Scene:
        if scene in self._cache:
            return self._cache[scene]
        sdir = self.scene_root / scene
        lay = _layout(sdir)
        if lay is None:
            raw = sdir / "dslr" / "nerfstudio" / "transforms.json"
            if raw.is_file():
                raise DataMissingError(
                    f"scene {scene} has only the distorted {raw}",
                    "undistort it with the ScanNet++ toolkit (`python -m dslr.undistort "
                    "dslr/configs/undistort.yml`) to get transforms_undistorted.json",
                )
            raise DataMissingError(f"scene {scene} not found: missing {sdir / _LAYOUTS[0][0]}", self._fix())
        js, imgs, base = lay
        json_path = sdir / js
        try:
            meta = json.loads(json_path.read_text())
            frames = [f for f in meta["frames"] if self.keep_bad or not f.get("is_bad", False)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataMissingError(f"cannot parse {json_path} ({type(e).__name__}: {e})", self._fix()) from None
        if str(meta.get("camera_model", "PINHOLE")).upper() not in ("PINHOLE", "SIMPLE_PINHOLE") or any(
            abs(float(meta.get(k, 0.0))) > 0 for k in ("k1", "k2", "k3", "k4", "p1", "p2")
        ):
            raise DataMissingError(
                f"{json_path} describes a distorted camera ({meta.get('camera_model')})",
                "use the undistorted images and transforms_undistorted.json",
            )
        seen, uniq = set(), []
        for f in sorted(frames, key=lambda f: f["file_path"]):
            if f["file_path"] not in seen:
                seen.add(f["file_path"])
                uniq.append(f)
        if not uniq:
            raise DataMissingError(f"{json_path} lists no frames", self._fix())
        get = lambda f, k: float(f.get(k, meta.get(k)))  # noqa: E731  per-frame values override
        try:
            K = np.array(
                [[[get(f, "fl_x"), 0, get(f, "cx")], [0, get(f, "fl_y"), get(f, "cy")], [0, 0, 1]] for f in uniq],
                dtype=np.float64,
            )
            wh = np.array([[get(f, "w"), get(f, "h")] for f in uniq], dtype=np.float64)
            c2w = torch.tensor(np.array([f["transform_matrix"] for f in uniq], dtype=np.float64))
        except (TypeError, ValueError, KeyError) as e:
            raise DataMissingError(f"{json_path}: missing or malformed camera field ({e})", self._fix()) from None
        w2c = opengl_c2w_to_opencv_w2c(c2w).numpy()
        maps = {}
        for key, (dirs, _) in MAP_DIRS.items():
            for d in dirs:
                if (sdir / base / d).is_dir():
                    maps[key] = sdir / base / d
                    break
        info = _Scene(scene, sdir, sdir / imgs, json_path, [f["file_path"] for f in uniq], K, w2c, wh, maps)
        self._cache[scene] = info
        return info

    # ---- public API
    def num_views(self, scene: str) -> int:
        return len(self._scene(scene).names)

    def frame_names(self, scene: str) -> List[str]:
        return list(self._scene(scene).names)

    def has(self, scene: str, key: str) -> bool:
        """Whether ``scene`` has the optional map ``key`` (depth, normals, semantic, instance)."""
        return key in self._scene(scene).maps

    def cameras(self, scene: str) -> Tuple[Tensor, Tensor]:
        """All views' ``K [N,3,3]`` (for the output size, when the json's w/h match the images) and
        ``w2c [N,4,4]`` (float32), without reading any image."""
        s = self._scene(scene)
        K = torch.from_numpy(s.K)
        if self.size is not None:
            K = torch.stack(
                [scale_intrinsics(k, self.size[1] / w, self.size[0] / h) for k, (w, h) in zip(K, s.wh.tolist())]
            )
        return K.float(), torch.from_numpy(s.w2c).float()

    def load_views(self, scene: str, view_indices: Sequence[int]) -> Dict[str, Tensor]:
        s = self._scene(scene)
        fix = self._fix()
        out: Dict[str, List[Tensor]] = {"images": [], "K": [], "w2c": []}
        for key in s.maps:
            out[key] = []
        for i in view_indices:
            i = int(i)
            if not 0 <= i < len(s.names):
                raise IndexError(f"view {i} out of range for scene {scene} ({len(s.names)} views)")
            name = s.names[i]
            path = s.image_dir / name
            if not path.is_file() and (s.json_path.parent / name).is_file():
                path = s.json_path.parent / name  # generic nerfstudio: relative to the json
            img = open_image(path, fix).convert("RGB")
            W0, H0 = img.size
            image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
            # the json's K is for its (w, h); images saved at another size scale it (+0.5 convention)
            K = scale_intrinsics(torch.from_numpy(s.K[i]), W0 / s.wh[i, 0], H0 / s.wh[i, 1])
            H, W = self.size if self.size is not None else (H0, W0)
            out["images"].append(_resize(image, (H, W), "bilinear").clamp_(0, 1))
            out["K"].append(scale_intrinsics(K, W / W0, H / H0).float())
            out["w2c"].append(torch.from_numpy(s.w2c[i]).float())
            stem = Path(name).stem
            for key, d in s.maps.items():
                out[key].append(self._load_map(key, d, name, stem, (H0, W0), (H, W), fix))
        return {k: torch.stack(v) for k, v in out.items()}

    @staticmethod
    def _load_map(
        key: str, d: Path, name: str, stem: str, native: Tuple[int, int], size: Tuple[int, int], fix: str
    ) -> Tensor:
        suffix = MAP_DIRS[key][1]
        path = d / f"{stem}{suffix}"
        for alt in (d / f"{Path(name).name}{suffix}", d / f"{name}{suffix}"):  # e.g. DSC01234.JPG.png (SnD)
            if not path.is_file() and alt.is_file():
                path = alt
        if key == "normals":
            arr = load_npz(path, fix, keys=("normals",))["normals"]
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise DataMissingError(f"{path} has shape {arr.shape}, expected [H,W,3]", fix)
            x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)
            x = F.normalize(x, dim=0) * (x.abs().sum(0, keepdim=True) > 0)
        else:
            arr = np.asarray(open_image(path, fix))
            if key == "instance" and arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour-coded instances
                a = arr[..., :3].astype(np.int64)
                arr = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
            if arr.ndim != 2:
                raise DataMissingError(f"{path} is not a single-channel map (shape {arr.shape})", fix)
            if key == "depth":
                x = torch.from_numpy(arr.astype(np.float32) / 1000.0)
            else:
                a = arr.astype(np.int64)
                if key == "semantic":
                    a[a >= 255] = 255  # 65535 / out of range -> ignore
                x = torch.from_numpy(a)
        x = _resize(x, native, "nearest")  # maps rendered at another size
        return _resize(x, size, "nearest")


class ViewDataset(Dataset):
    """Single views of multi-view scenes, as a torch Dataset.

    Item: ``image [3,H,W]``, ``K [3,3]``, ``w2c [4,4]``, ``scene`` (str), ``view`` (int) and, when
    present, ``depth [H,W]``, ``normals [3,H,W]``, ``semantic [H,W]``, ``instance [H,W]``.
    """

    def __init__(
        self, root: str | os.PathLike, scene_ids: Optional[Sequence[str]] = None, size: Optional[Sequence[int]] = None
    ):
        self.scenes = MultiViewScenes(root, scene_ids, size)
        self.items = [(s, i) for s in self.scenes.scene_ids for i in range(self.scenes.num_views(s))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        scene, view = self.items[idx]
        s = self.scenes.load_views(scene, [view])
        item = {("image" if k == "images" else k): v[0] for k, v in s.items()}
        item.update(scene=scene, view=view)
        return item


def _subdirs(p: Path) -> List[Path]:
    try:
        return [d for d in p.iterdir() if d.is_dir()]
    except OSError:
        return []


def _layout(sdir: Path) -> Optional[Tuple[str, str, str]]:
    for lay in _LAYOUTS:
        if (sdir / lay[0]).is_file():
            return lay
    return None


# ------------------------------------------------------------- the official Splat-and-Distill layout
def export_snd_layout(
    src: str | os.PathLike, out: str | os.PathLike, scene_ids: Optional[Sequence[str]] = None, jpeg: bool = True
) -> Path:
    """Write the scenes under ``src`` (any layout this module reads) in the official Splat-and-Distill
    ScanNet++ layout (davidshavin4/Splat-and-Distill ``src/dataset/dataset_scannetpp.py``)::

        <out>/scenes/<id>/transforms_train.json                 nerfstudio frames (file_path = image name)
        <out>/scenes/<id>/images/DSC<NNNNN>.JPG                 RGB (JPEG q95 as the DSLR; PNG with jpeg=False)
        <out>/scenes/<id>/instance_segmentation/<file_path>.png instance ids (uint16)
        <out>/scenes/<id>/render_depth/DSC<NNNNN>.png           uint16 mm (bench's depth reconstructor)

    Scenes without instance maps get no ``instance_segmentation/``. Returns ``out``; for tests and
    ``python -m bench perf paper`` (generated scenes in the paper's on-disk format)."""
    from PIL import Image

    reader = MultiViewScenes(src, scene_ids)
    out = Path(out)
    for sid in reader.scene_ids:
        s = reader._scene(sid)
        sdir = out / "scenes" / sid
        meta = json.loads(s.json_path.read_text())
        by_path = {f["file_path"]: f for f in meta["frames"]}
        frames = []
        for k, name in enumerate(s.names):
            new = f"DSC{k + 1:05d}." + ("JPG" if jpeg else "png")
            img = Image.open(s.image_dir / name).convert("RGB")
            (sdir / "images").mkdir(parents=True, exist_ok=True)
            img.save(sdir / "images" / new, **({"quality": 95} if jpeg else {}))
            for key, folder, fname in (
                ("instance", "instance_segmentation", f"{new}.png"),
                ("depth", "render_depth", f"{Path(new).stem}.png"),
            ):
                if key in s.maps:
                    src_map = s.maps[key] / f"{Path(name).stem}.png"
                    (sdir / folder).mkdir(parents=True, exist_ok=True)
                    (sdir / folder / fname).write_bytes(src_map.read_bytes())
            frames.append({**by_path[name], "file_path": new})
        (sdir / "transforms_train.json").write_text(json.dumps({**meta, "frames": frames}))
    return out


# ------------------------------------------------------------------- python -m bench data scannetpp
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="ScanNet++ root (default ${BENCH_DATA:-data}/scannetpp)")
    p.add_argument("--scenes", nargs="*", default=None, help="only check these scene ids")


def _cli(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else Path(os.environ.get("BENCH_DATA", "data")) / "scannetpp"
    if not root.is_dir():
        print(SCANNETPP_HELP)
        raise DataMissingError(
            f"ScanNet++ root {root} {what_is_at(root, 'directory')}",
            "download and prepare ScanNet++ as printed above, then pass --root",
        )
    try:
        ds = MultiViewScenes(root, args.scenes)
    except DataMissingError:
        print(SCANNETPP_HELP)
        raise
    rows, bad = [], []
    for sid in ds.scene_ids:
        try:
            s = ds._scene(sid)
        except DataMissingError as e:
            bad.append(f"{sid}: {e.problem}")
            continue
        missing = [n for n in s.names if not (s.image_dir / n).is_file()]
        if missing:
            bad.append(f"{sid}: {len(missing)} of {len(s.names)} images missing in {s.image_dir} (first: {missing[0]})")
        rows.append((sid, len(s.names), *("yes" if k in s.maps else "-" for k in MAP_DIRS)))
    print(f"ScanNet++ at {ds.scene_root}: {len(rows)} scene(s)")
    if rows:
        from tabulate import tabulate

        print(tabulate(rows[:20], headers=["scene", "views", *MAP_DIRS]))
        if len(rows) > 20:
            print(f"... and {len(rows) - 20} more")
        for key in MAP_DIRS:
            n = sum(r[2 + list(MAP_DIRS).index(key)] == "yes" for r in rows)
            if n < len(rows) and key != "normals":
                print(
                    f"note: {len(rows) - n} scene(s) have no {key} maps "
                    f"(expected dslr/{MAP_DIRS[key][0][0]}/); tasks that need {key} skip or fail on them"
                )
    if bad:
        print("\n".join(bad[:20]))
        raise DataMissingError(
            f"{len(bad)} ScanNet++ scene(s) are incomplete under {root}",
            "re-download/re-run the undistortion for the scenes listed above",
        )
    return 0


ScanNetPPData = register_command(
    "scannetpp",
    "ScanNet++ DSLR (undistorted, FiT3D preprocessing): posed RGB, rendered "
    "depth/semantics; licensed, checked not downloaded",
    _add_arguments,
    _cli,
)
