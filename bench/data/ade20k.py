"""ADE20K scene parsing (ADEChallengeData2016, 150 classes), the mmseg layout.

``images/{training,validation}/ADE_*.jpg`` and ``annotations/{training,validation}/ADE_*.png`` (grey
PNG, 0 = "other"/unlabelled, 1..150 the classes). Labels are returned as stored; the segmentation
protocol sets ``reduce_zero_label`` (0 -> 255, k -> k-1) in the task config.
Samples: ``image`` [3,H,W] in [0,1], ``semantic`` [H,W] int64, ``id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

from .layout import ImageLabelDataset, register_reader

SPLIT_DIRS = {"train": "training", "val": "validation"}


def paired_files(img_dir: Path, ann_dir: Path, img_exts=(".jpg", ".jpeg", ".png")) -> List[Any]:
    """``(image, label)`` pairs matched by file stem, sorted; labels are ``<stem>.png``."""
    imgs = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in img_exts)
    return [(p, ann_dir / f"{p.stem}.png") for p in imgs]


@register_reader("ade20k", "ADE20K / ADEChallengeData2016 semantic segmentation (150 classes), mmseg layout")
class ADE20k(ImageLabelDataset):
    title = "ADE20K (ADEChallengeData2016)"
    dirname = "ADEChallengeData2016"
    layouts = ("mmseg",)
    splits = {"mmseg": ("train", "val")}
    sources = """\
wget http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip
unzip ADEChallengeData2016.zip      (creates ADEChallengeData2016/; point --root at it)
(http://sceneparsing.csail.mit.edu/, mmsegmentation docs/en/user_guides/2_dataset_prepare.md)"""
    licence = """\
ADE20K / MIT Scene Parsing: free for research and education (see the terms on
http://sceneparsing.csail.mit.edu/ and https://groups.csail.mit.edu/vision/datasets/ADE20K/);
images come from SUN and Places, whose own terms apply."""
    trees = {
        "mmseg": """\
images/training/ADE_train_XXXXXXXX.jpg        (20210)
images/validation/ADE_val_XXXXXXXX.jpg        (2000)
annotations/training/ADE_train_XXXXXXXX.png   (0 = other, 1..150)
annotations/validation/ADE_val_XXXXXXXX.png"""
    }

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        return [root / d / s for d in ("images", "annotations") for s in SPLIT_DIRS.values()]

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        sub = SPLIT_DIRS[split]
        return paired_files(root / "images" / sub, root / "annotations" / sub)
