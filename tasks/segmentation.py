"""Semantic segmentation: BN + 1x1 conv (linear) or DPT probe, cross-entropy with ignore 255, mIoU.

Dataset keys used here: ``num_classes`` and ``reduce_zero_label`` (0 = unlabelled -> 255, k -> k-1,
applied to the labels before the loss and the metric). Metrics (mmseg ``IoUMetric``, dataset-level
intersections and unions): ``mIoU`` over the classes present, ``mAcc``, ``aAcc`` (percent).
"""

from __future__ import annotations

from typing import Any, List

from bench.registry import TASKS

from .data import reduce_zero_label
from .train_probe import need
from .dense import DenseTask
from .losses import seg_loss
from .metrics import SegMeter


class SegmentationTask(DenseTask):
    kind, label = "seg", "semantic"

    def probe_kwargs(self, task, proto):
        return {"num_classes": int(task["dataset"]["num_classes"])}

    def prepare_target(self, target, task):
        return reduce_zero_label(target) if task["dataset"].get("reduce_zero_label") else target

    def loss(self, out, target, proto, batch=None):
        lc = proto.get("loss", {}) or {}
        return seg_loss(out["logits"], target, avg_non_ignore=bool(need(lc, "avg_non_ignore", "task.protocol.loss")))

    def new_meters(self, task, proto) -> List[Any]:
        return [SegMeter(int(task["dataset"]["num_classes"]))]

    def update_meters(self, meters, out, target, proto, batch=None) -> None:
        meters[0].update(out["logits"].argmax(dim=1), target)


for _name, _desc in [
    ("synth_seg", "semantic segmentation probe on the synthetic scenes (8 classes); mIoU"),
    ("nyu_seg", "NYUv2 13-class segmentation as FiT3D (mmseg layout, reduce_zero_label); mIoU"),
    ("nyu_seg40", "NYUv2 40-class segmentation (mmseg layout, reduce_zero_label; no published rows); mIoU"),
    ("scannet_seg", "ScanNet 40-class segmentation in FiT3D's eval_data/scannet layout (reduce_zero_label); mIoU"),
    (
        "scannetpp_seg",
        "ScanNet++ semantic segmentation, 100 classes (FiT3D processed layout or raw DSLR renders); mIoU",
    ),
    ("ade20k_seg", "ADE20k 150 classes (reduce_zero_label), sliding-window 512/341; mIoU"),
    ("voc_seg", "Pascal VOC 2012, 21 classes, sliding-window 512/341; mIoU"),
]:
    TASKS.add(_name, type(f"SegmentationTask_{_name}", (SegmentationTask,), {}), _desc)
