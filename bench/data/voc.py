"""PASCAL VOC 2012 segmentation (21 classes), the VOCdevkit layout mmseg reads.

``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG: index = class, 255 = object
boundary / ignore) and ``ImageSets/Segmentation/{train,val,trainval}.txt``. The SBD augmentation as
mmseg's ``voc_aug.py`` converts it adds ``SegmentationClassAug/<id>.png`` (grey PNG) and
``ImageSets/Segmentation/aug.txt``; split ``aug`` reads those, ``train_aug`` is ``train`` + ``aug``
(mmseg's voc12aug). ``--root`` may point at ``VOCdevkit/VOC2012`` or at ``VOCdevkit``.
The published linear protocol trains on ``train`` (``ImageSets/Segmentation/train.txt``, 1,464 images) and
tests on ``val`` (1,449): FiT3D ``evaluation/configs/vits_voc2012_sem_linear_config.py`` (data.train split
``ImageSets/Segmentation/train.txt``, ann_dir ``SegmentationClass``). ``train_aug`` is an opt-in deviation.
Samples: ``image`` [3,H,W] in [0,1], ``semantic`` [H,W] int64 (palette indices; 255 ignore), ``id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from .layout import ImageLabelDataset, read_lines, register_reader

SPLIT_FILES = {
    "train": [("train", "SegmentationClass")],
    "val": [("val", "SegmentationClass")],
    "trainval": [("trainval", "SegmentationClass")],
    "aug": [("aug", "SegmentationClassAug")],
    "train_aug": [("train", "SegmentationClass"), ("aug", "SegmentationClassAug")],
}


def voc_root(root: Path) -> Path:
    root = Path(root)
    return root / "VOC2012" if (root / "VOC2012").is_dir() and not (root / "JPEGImages").is_dir() else root


@register_reader("voc", "PASCAL VOC 2012 segmentation (21 classes; SBD aug optional), VOCdevkit layout")
class VOC(ImageLabelDataset):
    title = "PASCAL VOC 2012"
    dirname = "VOCdevkit/VOC2012"
    layouts = ("voc2012", "voc2012_aug")
    splits = {"voc2012": ("train", "val", "trainval"), "voc2012_aug": ("train", "val", "aug", "train_aug")}
    sources = """\
wget http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar
tar -xf VOCtrainval_11-May-2012.tar     (creates VOCdevkit/VOC2012)
optional SBD augmentation (voc2012_aug layout):
  wget http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz
  then mmsegmentation's tools/dataset_converters/voc_aug.py VOCdevkit benchmark_RELEASE
  (writes SegmentationClassAug/ and ImageSets/Segmentation/aug.txt)"""
    licence = """\
PASCAL VOC: images from Flickr, used under Flickr's terms; annotations free for research
(http://host.robots.ox.ac.uk/pascal/VOC/). SBD (Hariharan et al. 2011): research use."""
    trees = {
        "voc2012": """\
JPEGImages/<id>.jpg
SegmentationClass/<id>.png             (palette PNG, 255 = boundary)
ImageSets/Segmentation/train.txt       (1464 ids: voc_seg's training split, as FiT3D)
ImageSets/Segmentation/val.txt         (1449 ids: voc_seg's test split)  trainval.txt""",
        "voc2012_aug": """\
(everything of the voc2012 layout) plus
SegmentationClassAug/<id>.png           (grey PNG)
ImageSets/Segmentation/aug.txt          (10582 ids with train, from mmseg's voc_aug.py)
(not the published protocol: voc_seg reads it only with task.dataset.kwargs.layout=voc2012_aug
 task.dataset.splits.train=train_aug)""",
    }

    def __init__(self, root, split: str, layout: Optional[str] = None):
        if layout is None and split in ("aug", "train_aug"):
            layout = "voc2012_aug"
        super().__init__(voc_root(root), split, layout)

    @classmethod
    def check(cls, root, layout=None, deep=False):
        return super().check(voc_root(Path(root)), layout, deep)

    @classmethod
    def missing(cls, root: Path, layout: str, deep: bool = False) -> List[str]:
        return super().missing(voc_root(root), layout, deep)

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        sets = root / "ImageSets" / "Segmentation"
        req = [
            root / "JPEGImages",
            root / "SegmentationClass",
            sets / "train.txt",
            sets / "val.txt",
            sets / "trainval.txt",
        ]
        if layout == "voc2012_aug":
            req += [root / "SegmentationClassAug", sets / "aug.txt"]
        return req

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        root = voc_root(root)
        items = []
        for list_name, ann in SPLIT_FILES[split]:
            for sid in read_lines(root / "ImageSets" / "Segmentation" / f"{list_name}.txt"):
                items.append((root / "JPEGImages" / f"{sid}.jpg", root / ann / f"{sid}.png"))
        return items
