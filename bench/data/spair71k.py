"""SPair-71k (Min et al. 2019): semantic keypoint pairs of 18 categories.

Layout: ``JPEGImages/<category>/<image>.jpg`` and ``PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json``
with ``src_kps`` / ``trg_kps`` (``[N, 2]`` pixel x, y of the keypoints both images show, in the same
order), ``src_bndbox`` / ``trg_bndbox`` (``[left, top, right, bottom]``), ``viewpoint_variation``
(0, 1, 2) and ``category``.

Sampling (``sampling``): ``per_bucket`` (Probe3D, ``evaluate_spair_correspondence.py`` +
``evals/datasets/spair.py``): for every category and every viewpoint bucket (variation 0, 1, 2 and "all")
a separate sample of ``pairs_per_category`` (200) pairs, each drawn by ``random.seed(20); shuffle;
[:200]`` of that bucket's pairs -- the same pair may be in several buckets; items are ``(file, bucket)``
and samples carry ``bucket`` (0, 1, 2 or "all"). ``per_category``: one 200-pair sample per category whose
viewpoint split is read off that sample (bench's earlier mode). We shuffle the *sorted* file list with
``random.Random(seed)``; Probe3D shuffles ``glob`` order, which is not reproducible across file systems,
so its exact pairs cannot be reproduced. ``pairs_per_category=None`` keeps every pair.

A sample: ``image_src``, ``image_trg`` [3,H,W] in [0,1] (original sizes), ``kps_src``, ``kps_trg``
[N,2] float pixels, ``bbox_src``, ``bbox_trg`` [4] float, ``category`` (str), ``viewpoint_variation``
(int), ``id``, and with ``per_bucket`` sampling ``bucket``. The keypoints are the pair file's ``src_kps`` /
``trg_kps`` (those visible in both images); Probe3D reads the same points from ``ImageAnnotation`` and keeps
those valid in both, which we take to be the same set (not checked on the full release).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import DataMissingError, missing_file
from .layout import FileDataset, read_rgb, register_reader

CATEGORIES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "train",
    "tvmonitor",
)
SPLIT_DIRS = {"train": "trn", "val": "val", "test": "test"}


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataMissingError(missing_file(path), "re-extract SPair-71k.tar.gz") from None
    except json.JSONDecodeError as e:
        raise DataMissingError(
            f"cannot parse {path} ({e})", "the file is corrupt: re-extract SPair-71k.tar.gz"
        ) from None


@register_reader("spair71k", "SPair-71k semantic keypoint pairs (18 categories), for keypoint transfer / PCK")
class SPair71k(FileDataset):
    title = "SPair-71k"
    dirname = "SPair-71k"
    layouts = ("spair",)
    splits = {"spair": ("train", "val", "test")}
    sources = """\
wget http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz
tar -xzf SPair-71k.tar.gz      (creates SPair-71k/; point --root at it)
(https://cvlab.postech.ac.kr/research/SPair-71k/)"""
    licence = """\
SPair-71k: research use (images from PASCAL VOC 2012 and PASCAL 3D+, Flickr terms apply);
cite Min et al., "SPair-71k: A Large-scale Benchmark for Semantic Correspondence", 2019."""
    trees = {
        "spair": """\
JPEGImages/<category>/<image>.jpg
PairAnnotation/trn/*.json  PairAnnotation/val/*.json  PairAnnotation/test/*.json
  (<id>-<src>-<trg>:<category>.json with src_kps, trg_kps, src_bndbox, trg_bndbox, viewpoint_variation)
ImageAnnotation/, Segmentation/, Layout/   (shipped; not read)"""
    }

    def __init__(
        self,
        root,
        split: str = "test",
        layout=None,
        categories: Optional[Sequence[str]] = None,
        pairs_per_category: Optional[int] = 200,
        seed: int = 20,
        sampling: str = "per_category",
    ):
        super().__init__(root, split, layout)
        if categories is not None:
            bad = [c for c in categories if c not in CATEGORIES]
            if bad:
                raise DataMissingError(f"unknown SPair-71k categories {bad}", f"use some of: {', '.join(CATEGORIES)}")
        if sampling == "per_bucket":
            self.items = self.select_buckets(self.items, categories, pairs_per_category, seed)
        elif sampling == "per_category":
            self.items = self.select(self.items, categories, pairs_per_category, seed)
        else:
            raise DataMissingError(
                f"unknown SPair-71k sampling '{sampling}'", "use sampling=per_bucket (Probe3D) or sampling=per_category"
            )

    @classmethod
    def required(cls, root: Path, layout: str) -> List[Path]:
        return [root / "JPEGImages" / c for c in CATEGORIES] + [
            root / "PairAnnotation" / d for d in SPLIT_DIRS.values()
        ]

    @classmethod
    def index(cls, root: Path, layout: str, split: str) -> List[Any]:
        return sorted((root / "PairAnnotation" / SPLIT_DIRS[split]).glob("*.json"))

    @staticmethod
    def category(path: Path) -> str:
        return path.stem.rsplit(":", 1)[-1]

    @classmethod
    def select(
        cls, files: List[Path], categories: Optional[Sequence[str]], per_category: Optional[int], seed: int
    ) -> List[Path]:
        by_cat: Dict[str, List[Path]] = {}
        for f in files:
            by_cat.setdefault(cls.category(f), []).append(f)
        out = []
        for cat in sorted(by_cat):
            if categories is not None and cat not in categories:
                continue
            fs = sorted(by_cat[cat])
            if per_category is not None:
                random.Random(seed).shuffle(fs)
                fs = fs[:per_category]
            out += fs
        return out

    @classmethod
    def select_buckets(
        cls, files: List[Path], categories: Optional[Sequence[str]], per_bucket: Optional[int], seed: int
    ) -> List[Tuple[Path, Any]]:
        """Probe3D's samples: per category and bucket (0, 1, 2, "all") its own seeded draw."""
        out: List[Tuple[Path, Any]] = []
        for cat in sorted({cls.category(f) for f in files}):
            if categories is not None and cat not in categories:
                continue
            fs = sorted(f for f in files if cls.category(f) == cat)
            vps = {f: int(_read_json(f).get("viewpoint_variation", -1)) for f in fs}
            for bucket in (0, 1, 2, "all"):
                b = [f for f in fs if bucket == "all" or vps[f] == bucket]
                if per_bucket is not None:
                    random.Random(seed).shuffle(b)
                    b = b[:per_bucket]
                out += [(f, bucket) for f in b]
        return out

    def __getitem__(self, i: int) -> Dict[str, Any]:
        path, bucket = self.items[i] if isinstance(self.items[i], tuple) else (self.items[i], None)
        a = _read_json(path)
        try:
            cat = a.get("category") or self.category(path)
            src = a.get("src_imname") or path.stem.split(":")[0].split("-")[1] + ".jpg"
            trg = a.get("trg_imname") or path.stem.split(":")[0].split("-")[2] + ".jpg"
            kps_src = torch.tensor(a["src_kps"], dtype=torch.float32).reshape(-1, 2)
            kps_trg = torch.tensor(a["trg_kps"], dtype=torch.float32).reshape(-1, 2)
            bbox_src = torch.tensor(a["src_bndbox"], dtype=torch.float32)
            bbox_trg = torch.tensor(a["trg_bndbox"], dtype=torch.float32)
            vp = int(a.get("viewpoint_variation", -1))
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise DataMissingError(
                f"malformed pair annotation {path} ({type(e).__name__}: {e})", "re-extract SPair-71k.tar.gz"
            ) from None
        if kps_src.shape != kps_trg.shape:
            raise DataMissingError(f"{path}: src_kps and trg_kps differ in length", "re-extract SPair-71k.tar.gz")
        img_dir = self.root / "JPEGImages" / cat
        out = {
            "image_src": read_rgb(img_dir / src),
            "image_trg": read_rgb(img_dir / trg),
            "kps_src": kps_src,
            "kps_trg": kps_trg,
            "bbox_src": bbox_src,
            "bbox_trg": bbox_trg,
            "category": cat,
            "viewpoint_variation": vp,
            "id": path.stem,
        }
        if bucket is not None:
            out["bucket"] = bucket
        return out
