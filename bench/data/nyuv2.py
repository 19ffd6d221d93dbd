"""NYU Depth v2 in the three layouts the published protocols read.

* ``probe3d`` -- Probe3D (El Banani et al. 2024): training on the GeoNet release (one MATLAB v5 ``.mat``
  per frame with ``img``, ``depth``, ``norm``; read with scipy, no HDF5 needed), testing on the 654
  labelled test frames from ``nyuv2_snorm_all.pkl``, the pickle Probe3D's ``create_nyu_pkl.py`` builds
  from ``nyu_depth_v2_labeled.mat`` (raw depth) and the Ladicky/FAIR surface normals. We read that
  pickle rather than the v7.3 ``.mat`` (HDF5) so that h5py is not needed. It is read with an allow-list
  (numpy arrays and scalars, plain containers; :func:`bench.safe_pickle.load_plain_pickle`): a pickle that
  names anything else is refused, nothing it names is run.
  Splits as Probe3D: sort the GeoNet files, drop two corrupt frames (sorted indices 21181 and 6919, only
  when the full release is present), ``valid`` = every 20th frame, ``train`` = the rest, ``trainval`` =
  all; ``test`` = the pickle's ``test_indices``.
  Normals are returned as released (GeoNet and the test normals share one convention; metrics are
  computed between prediction and ground truth of the same reader, so no axis flip is applied).
  ``depth`` is the raw depth of the frame in metres (0 = missing), returned beside the normals: the
  normals tasks mask pixels by it (Probe3D ``train_snorm.py``: depth > 0). GeoNet's mean-subtracted
  ``img`` is restored as Probe3D's ``nyu.py`` does it: add twice the channel means in the stored dtype,
  then cast to uint8 (truncation toward zero, not rounding; values are clipped to 0..255 first, where the
  cast would be undefined).
* ``mmseg_depth`` -- the BTS / Monocular-Depth-Estimation-Toolbox layout used by FiT3D and
  Splat-and-Distill: ``nyu_train.txt`` / ``nyu_test.txt`` with lines ``<rgb> <depth png|None> <focal>``
  relative to the root; depth PNGs are uint16 millimetres.
* ``mmseg_seg`` -- the mmseg folder layout for NYUv2 semantic segmentation (FiT3D's ``eval_data/nyuv2``):
  ``images/{training,validation}/*.png`` and ``annotations/{training,validation}/*.png`` with
  0 = background/unlabelled and 1..13 the 13 classes of FiT3D's ``mmseg/datasets/nyuv2.py`` (bed, books,
  ceiling, chair, floor, furniture, objects, painting, sofa, table, tv, wall, window); labels are returned
  as stored, the task config sets ``reduce_zero_label`` (FiT3D: True). ``max_label`` (task kwarg) rejects
  annotations with larger ids, e.g. 40-class labels fed to the 13-class task (task=nyu_seg40 reads those).

Samples: ``image`` [3,H,W] in [0,1], ``K`` [3,3] (the NYU Kinect intrinsics), and ``depth`` [H,W] metres
(0 invalid), ``normals`` [3,H,W] (probe3d), ``semantic`` [H,W] int64 (mmseg_seg), ``name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import DataMissingError, missing_file
from ..safe_pickle import PickleRefused, load_plain_pickle
from .layout import FileDataset, read_depth_png, read_label_png, read_lines, read_rgb, register_reader

#: NYUv2 Kinect colour intrinsics at 640x480 (as used by the depth toolbox), pixel centres at +0.5
NYU_K = torch.tensor([[518.8579, 0.0, 325.5824], [0.0, 519.4696, 253.7362], [0.0, 0.0, 1.0]])
#: GeoNet stores mean-subtracted images; Probe3D restores them by adding twice these channel means
GEONET_MEANS = (122.175, 116.169, 103.508)
GEONET_BAD = (21181, 6919)  # deleted in this order, as Probe3D does
SEG_DIRS = {"train": "training", "val": "validation", "test": "validation"}

_PKL_CACHE: Dict[Path, Dict[str, Any]] = {}


def geonet_rgb(img: np.ndarray) -> np.ndarray:
    """GeoNet's mean-subtracted ``img`` [H,W,3] -> uint8 RGB as Probe3D's ``evals/datasets/nyu.py``:
    ``img[..., c] + 2 * mean_c`` in the stored float dtype, then ``astype(uint8)`` (truncation). Values
    outside 0..255 (undefined for the cast) are clipped first."""
    x = np.array(img, dtype=img.dtype if np.issubdtype(img.dtype, np.floating) else np.float64)
    for c in range(3):
        x[..., c] += 2 * GEONET_MEANS[c]  # a Python float, added in x's dtype as Probe3D
    return np.clip(x, 0, 255).astype(np.uint8)


def _load_pkl(path: Path) -> Dict[str, Any]:
    path = path.resolve()
    if path not in _PKL_CACHE:
        if not path.is_file():
            raise DataMissingError(
                missing_file(path),
                "build it with Probe3D's data_processing/create_nyu_pkl.py",
            )
        try:
            data = load_plain_pickle(path, numpy=True)  # numpy arrays and plain containers only: nothing runs
        except PickleRefused as e:
            raise DataMissingError(
                f"cannot read {path}: {e}", "rebuild it with Probe3D's data_processing/create_nyu_pkl.py"
            ) from None
        except OSError as e:
            raise DataMissingError(f"cannot read {path} ({e})", "rebuild it with create_nyu_pkl.py") from None
        keys = {"images", "depths", "snorms", "test_indices"}
        if not isinstance(data, dict) or not keys <= set(data):
            raise DataMissingError(
                f"{path} lacks the keys {sorted(keys)}", "rebuild it with Probe3D's data_processing/create_nyu_pkl.py"
            )
        _PKL_CACHE[path] = data
    return _PKL_CACHE[path]


@register_reader("nyuv2", "NYU Depth v2: Probe3D/GeoNet (depth+normals), mmseg depth, mmseg seg (13 or 40 classes)")
class NYUv2(FileDataset):
    title = "NYU Depth v2"
    dirname = "nyuv2"
    layouts = ("probe3d", "mmseg_depth", "mmseg_seg")
    splits = {
        "probe3d": ("train", "valid", "trainval", "test"),
        "mmseg_depth": ("train", "test"),
        "mmseg_seg": ("train", "val"),
    }
    sources = """\
probe3d:
  GeoNet training frames (data1.zip + data2.zip): https://github.com/xjqi/GeoNet (links in its README);
    unzip both and move their contents into nyu_geonet/
  labelled set: http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat
  test normals + split: https://dl.fbaipublicfiles.com/fair_self_supervision_benchmark/nyuv2_surfacenormal_metadata.zip
  then run data_processing/create_nyu_pkl.py from https://github.com/mbanani/probe3d (needs mat73)
    to produce nyuv2_snorm_all.pkl, and put it at the root
mmseg_depth:
  the BTS-prepared NYU (sync training scenes + 654 official test frames) with nyu_train.txt /
  nyu_test.txt: https://github.com/cleinc/bts (README, "NYU Depth V2") or the
  Monocular-Depth-Estimation-Toolbox docs (https://github.com/zhyever/Monocular-Depth-Estimation-Toolbox,
  docs/dataset_prepare.md)
mmseg_seg:
  FiT3D's eval_data/nyuv2 (https://github.com/ywyue/FiT3D, README "Evaluation"): the NYUv2 13-class
  labels (0 = background, 1..13) in mmseg folders, 795 training / 654 validation frames, PNG images
  (mmseg/datasets/nyuv2.py: img_suffix .png). FiT3D does not ship a converter: the 13-class maps are the
  NYUv2 "class13" labels (Couprie et al. 2013 mapping of the 894 raw classes), 0 = unlabelled.
  task=nyu_seg40 reads the same folders with the 40-class labels (1..40) instead, at its own root."""
    licence = """\
NYU Depth v2: free for research (Silberman et al., ECCV 2012); no redistribution licence is stated.
GeoNet normals (Qi et al.), Ladicky/FAIR normals: research use, cite the papers."""
    trees = {
        "probe3d": """\
nyu_geonet/<frame>.mat          (keys img, depth, norm; ~30k files)
nyuv2_snorm_all.pkl             (images, depths, snorms, scene_types, train_indices, test_indices)""",
        "mmseg_depth": """\
nyu_train.txt                   (<scene>/rgb_XXXXX.jpg <scene>/sync_depth_XXXXX.png 518.8579)
nyu_test.txt
<scene>/rgb_XXXXX.jpg, <scene>/sync_depth_XXXXX.png   (uint16 millimetres)""",
        "mmseg_seg": """\
images/training/*.png           annotations/training/*.png     (0 = background, 1..13; nyu_seg40: 1..40)
images/validation/*.png         annotations/validation/*.png""",
    }

    def __init__(
        self,
        root,
        split: str,
        layout: Optional[str] = None,
        max_depth: Optional[float] = None,
        max_label: Optional[int] = None,
    ):
        super().__init__(root, split, layout)
        self.max_depth = max_depth
        self.max_label = None if max_label is None else int(max_label)

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        if layout == "probe3d":
            return [root / "nyu_geonet", root / "nyuv2_snorm_all.pkl"]
        if layout == "mmseg_depth":
            return [root / "nyu_train.txt", root / "nyu_test.txt"]
        return [root / d / s for d in ("images", "annotations") for s in ("training", "validation")]

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        if layout == "probe3d":
            if split == "test":
                return [("pkl", i) for i in range(len(_load_pkl(root / "nyuv2_snorm_all.pkl")["test_indices"]))]
            files = sorted(p.name for p in (root / "nyu_geonet").iterdir() if p.suffix == ".mat")
            if len(files) > max(GEONET_BAD):
                for i in GEONET_BAD:
                    del files[i]
            keep = {"train": lambda i: i % 20 != 0, "valid": lambda i: i % 20 == 0, "trainval": lambda i: True}[split]
            return [("mat", root / "nyu_geonet" / f) for i, f in enumerate(files) if keep(i)]
        if layout == "mmseg_depth":
            items = []
            for line in read_lines(root / f"nyu_{split}.txt"):
                parts = line.split()
                if len(parts) < 2 or parts[1] == "None":
                    continue
                items.append((root / parts[0].lstrip("/\\"), root / parts[1].lstrip("/\\")))
            return sorted(items)
        sub = SEG_DIRS[split]
        imgs = {p.stem: p for p in (root / "images" / sub).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")}
        return [(imgs[s], root / "annotations" / sub / f"{s}.png") for s in sorted(imgs)]

    @classmethod
    def count(cls, root: Path, layout: str, split: str) -> int | str:
        if layout == "probe3d" and split == "test" and (root / "nyuv2_snorm_all.pkl").resolve() not in _PKL_CACHE:
            return "654 expected (in nyuv2_snorm_all.pkl; not unpickled by this check)"
        return super().count(root, layout, split)

    @classmethod
    def item_files(cls, item: Any) -> List[Path]:
        return [] if item[0] == "pkl" else [item[1]] if item[0] == "mat" else list(item)

    def _clip(self, depth: torch.Tensor) -> torch.Tensor:
        depth = torch.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
        if self.max_depth is not None:
            depth = torch.where(depth > self.max_depth, torch.zeros_like(depth), depth)
        return depth

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = self.items[i]
        if self.layout == "probe3d":
            return self._probe3d(item)
        if self.layout == "mmseg_depth":
            img, dep = item
            return {
                "image": read_rgb(img),
                "depth": self._clip(read_depth_png(dep, 1000.0)),
                "K": NYU_K.clone(),
                "name": str(img.relative_to(self.root)),
            }
        img, lab = item
        semantic = read_label_png(lab)
        if self.max_label is not None:
            labelled = semantic[semantic != 255]
            top = int(labelled.max()) if labelled.numel() else 0
            if top > self.max_label:
                raise DataMissingError(
                    f"{lab} has label {top}, above the {self.max_label} classes this task reads",
                    "task=nyu_seg reads FiT3D's 13-class labels (0..13); for 40-class annotations use "
                    "task=nyu_seg40 (root nyuv2_40), or point task.dataset.root at the 13-class folders",
                )
        return {"image": read_rgb(img), "semantic": semantic, "K": NYU_K.clone(), "name": img.stem}

    def _probe3d(self, item) -> Dict[str, Any]:
        kind, ref = item
        if kind == "pkl":
            data = _load_pkl(self.root / "nyuv2_snorm_all.pkl")
            j = int(data["test_indices"][ref])
            image = torch.from_numpy(np.ascontiguousarray(data["images"][j])).float() / 255.0
            depth = torch.from_numpy(np.asarray(data["depths"][j], dtype=np.float32).copy())
            normals = torch.from_numpy(np.asarray(data["snorms"][j], dtype=np.float32).copy())
            name = f"nyu_labeled_{j:04d}"
        else:
            import scipy.io

            try:
                m = scipy.io.loadmat(str(ref))
                img = np.array(m["img"])[:480, :640]
                depth = torch.from_numpy(np.asarray(m["depth"], dtype=np.float32)[:480, :640].copy())
                normals = torch.from_numpy(np.asarray(m["norm"], dtype=np.float32)[:480, :640].copy()).permute(2, 0, 1)
            except FileNotFoundError:
                raise DataMissingError(missing_file(ref), "re-extract the GeoNet archives into nyu_geonet/") from None
            except (ValueError, KeyError, OSError, TypeError) as e:
                raise DataMissingError(
                    f"cannot read GeoNet frame {ref} ({type(e).__name__}: {e})",
                    "the file is corrupt or not a GeoNet .mat (keys img, depth, norm): "
                    "replace it from the original archive",
                ) from None
            image = torch.from_numpy(geonet_rgb(img).astype(np.float32) / 255.0).permute(2, 0, 1)
            name = ref.stem
        return {
            "image": image.contiguous(),
            "depth": self._clip(depth),
            "normals": normals.contiguous(),
            "K": NYU_K.clone(),
            "name": name,
        }
