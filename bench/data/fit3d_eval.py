"""ScanNet and ScanNet++ in FiT3D's processed evaluation layout (``eval_data/scannet``, ``eval_data/scannetpp``).

The published FiT3D / Splat-and-Distill linear-probe rows on ScanNet and ScanNet++ were computed on these
folders, not on the raw scans: FiT3D's ``evaluation/configs/vits_{scannet,scannetpp}_{depth,sem}_linear_config.py``
read them with ``evaluation/depth/datasets/{scannetdepth,scannetppdepth}.py`` (depth) and
``mmsegmentation/mmseg/datasets/{scannet,scannetpp}.py`` (segmentation). Two layouts per dataset:

* ``fit3d_depth`` -- split files ``<prefix>_train.txt`` / ``<prefix>_val.txt`` at the root, one
  ``<rgb> <depth>`` pair per line, relative to the root (a leading ``/`` is dropped, as the loaders'
  ``remove_leading_slash``); a depth of ``None`` skips the line; items are sorted by the RGB path (the
  loaders sort ``img_infos`` by filename). Depth PNGs are uint16, ``depth_scale`` 1000 (millimetres).
* ``fit3d_seg`` -- mmseg folders ``images/{training,validation}/*<img_suffix>`` and
  ``annotations/{training,validation}/<stem>.png``; 0 = background (not a class), 1..N the classes; the
  task config applies ``reduce_zero_label`` (fixed to True in both mmseg dataset classes).

Samples: ``image`` [3,H,W] in [0,1], ``depth`` [H,W] metres (0 = invalid) or ``semantic`` [H,W] int64 as
stored, ``id``. No intrinsics: FiT3D's depth loaders attach NYU's constant ``cam_intrinsic`` to every frame,
which the linear probe never reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Dict, List

from ..errors import DataMissingError
from .layout import FileDataset, read_depth_png, read_label_png, read_lines, read_rgb, register_reader

SEG_DIRS = {"train": "training", "val": "validation"}
DEPTH_SCALE = 1000.0  # FiT3D configs: depth_scale=1000


class FiT3DEvalSet(FileDataset):
    """Base of the two FiT3D evaluation folders; subclasses set the names, suffix and help texts."""

    layouts = ("fit3d_depth", "fit3d_seg")
    splits = {"fit3d_depth": ("train", "val"), "fit3d_seg": ("train", "val")}
    prefix: ClassVar[str] = ""  # split files <prefix>_{train,val}.txt
    img_suffix: ClassVar[str] = ""  # mmseg img_suffix of the segmentation images
    #: other accepted names of the depth split files, per split (first existing wins)
    alt_split_files: ClassVar[Dict[str, tuple]] = {}

    @classmethod
    def split_file(cls, root: Path, split: str) -> Path:
        names = (f"{cls.prefix}_{split}.txt",) + tuple(cls.alt_split_files.get(split, ()))
        for n in names:
            if (root / n).is_file():
                return root / n
        return root / names[0]

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        if layout == "fit3d_depth":
            return [cls.split_file(root, s) for s in ("train", "val")]
        return [root / d / s for d in ("images", "annotations") for s in SEG_DIRS.values()]

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        if layout == "fit3d_depth":
            items = []
            path = cls.split_file(root, split)
            for line in read_lines(path):
                parts = line.split(" ")
                if len(parts) < 2:
                    raise DataMissingError(
                        f"{path}: line '{line}' is not '<rgb> <depth>'", "use FiT3D's split files unchanged"
                    )
                if parts[1] == "None":
                    continue
                items.append((root / parts[0].lstrip("/\\"), root / parts[1].lstrip("/\\")))
            return sorted(items)
        sub = SEG_DIRS[split]
        imgs = sorted(p for p in (root / "images" / sub).iterdir() if p.name.endswith(cls.img_suffix))
        return [(p, root / "annotations" / sub / (p.name[: -len(cls.img_suffix)] + ".png")) for p in imgs]

    @classmethod
    def item_files(cls, item: Any) -> List[Path]:
        return list(item)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        img, target = self.items[i]
        rid = str(img.relative_to(self.root))
        if self.layout == "fit3d_depth":
            image, depth = read_rgb(img), read_depth_png(target, DEPTH_SCALE)
            if image.shape[-2:] != depth.shape:
                raise DataMissingError(
                    f"{img} and {target} differ in size",
                    "the split file pairs the wrong files: use FiT3D's split files",
                )
            return {"image": image, "depth": depth, "id": rid}
        return {"image": read_rgb(img), "semantic": read_label_png(target), "id": rid}


@register_reader(
    "scannetpp_fit3d",
    "ScanNet++ in FiT3D's processed eval layout (eval_data/scannetpp): depth split files + 100-class mmseg seg",
)
class ScanNetPPFiT3D(FiT3DEvalSet):
    title = "ScanNet++ (FiT3D processed evaluation set)"
    dirname = "fit3d_eval/scannetpp"
    prefix = "scannetpp"
    img_suffix = ".JPG"  # mmseg/datasets/scannetpp.py
    sources = """\
FiT3D's processed ScanNet++ evaluation set ("Processed scannetpp dataset with annotations", FiT3D README,
  section Evaluation): Google Drive file id 18BGnCzk51nv79M-SiJ6ezX2WOTcQDZyi
  (https://drive.google.com/file/d/18BGnCzk51nv79M-SiJ6ezX2WOTcQDZyi), e.g. `gdown 18BGnCzk51nv79M-SiJ6ezX2WOTcQDZyi`;
  extract so that FiT3D's eval_data/scannetpp/ is the root (point --root at it).
It needs ScanNet++ access (https://kaldir.vc.in.tum.de/scannetpp/): accept the terms before using it.
The raw DSLR scenes (FiT3D's training data) are the separate reader `python -m bench data scannetpp`."""
    licence = """\
ScanNet++ Terms of Use (non-commercial research; apply at https://kaldir.vc.in.tum.de/scannetpp/).
bench cannot download it for you."""
    trees = {
        "fit3d_depth": """\
scannetpp_train.txt  scannetpp_val.txt   (lines '<rgb> <depth>', relative to the root)
<rgb>: DSLR frames (FiT3D: 876x584, the x2-downscaled undistorted images; not verified here)
<depth>: uint16 PNG, millimetres (depth_scale 1000); evaluated at 0.001 < d < 20 m, no crop""",
        "fit3d_seg": """\
images/training/*.JPG       annotations/training/*.png     (0 = background, 1..100 classes)
images/validation/*.JPG     annotations/validation/*.png""",
    }


@register_reader(
    "scannet_fit3d", "ScanNet in FiT3D's eval layout (eval_data/scannet): depth split files + 40-class mmseg seg"
)
class ScanNetFiT3D(FiT3DEvalSet):
    title = "ScanNet (FiT3D evaluation layout)"
    dirname = "fit3d_eval/scannet"
    prefix = "scannet"
    img_suffix = ".jpg"  # mmseg/datasets/scannet.py
    # Splat-and-Distill evaluation1/evaluation/configs/vits_scannet_depth_linear_config.py names the same
    # lists train_index.txt / test_index.txt (root eval_data/scannet_probe)
    alt_split_files = {"train": ("train_index.txt",), "val": ("test_index.txt",)}
    sources = """\
FiT3D evaluates ScanNet from eval_data/scannet (FiT3D README, section Evaluation: "follow their official
  websites"; no processed copy or converter is published). Build it from ScanNet v2
  (http://www.scan-net.org/, after signing the terms of use) in this layout:
  depth: scannet_train.txt / scannet_val.txt with '<rgb> <depth>' lines (colour frame and its uint16
  millimetre depth, the same size; FiT3D evaluates the Eigen crop rows 45:471, cols 41:601, i.e. 640x480
  frames), seg: mmseg folders with the 40 NYU40 classes of ScanNet's label maps (0 = unannotated).
Which frames and scenes FiT3D used could not be verified: the published rows assume FiT3D's own copy."""
    licence = """\
ScanNet Terms of Use (non-commercial research; sign the agreement at http://www.scan-net.org/).
bench cannot download ScanNet for you."""
    trees = {
        "fit3d_depth": """\
scannet_train.txt  scannet_val.txt       (lines '<rgb> <depth>', relative to the root;
                                          SnD's train_index.txt / test_index.txt are read as well)
<rgb>: colour JPG, <depth>: uint16 PNG millimetres (depth_scale 1000), 640x480 (Eigen crop 45:471, 41:601)""",
        "fit3d_seg": """\
images/training/*.jpg       annotations/training/*.png     (0 = unannotated, 1..40 NYU40 classes)
images/validation/*.jpg     annotations/validation/*.png""",
    }
