"""Monocular depth: binned-depth probe, SigLoss + gradient loss, linear-protocol and Probe3D metrics.

Protocol keys used here: ``depth`` (bins, min_depth, max_depth, norm: the head's bin layout),
``loss`` (sig_weight, grad_weight, grad_scales, grad_reduction: image | batch, max_depth: training
labels beyond it are invalid (null: only gt > 0, mmseg SigLoss), sig_variance: unbiased | biased,
warm_up / warm_iter: mmseg SigLoss warm-up), ``test.flip`` (average with the flipped image),
``eval`` (min_depth, max_depth, strict_max: gt < max_depth (mmseg depth toolbox ``eval_mask``) instead
of <=, crop: eigen | garg | kitti_eigen | null, metrics: a list of
``standard`` (a1-a3, abs_rel, sq_rel, rmse, rmse_log, log10, silog) and ``scale_invariant``
(Probe3D's per-image scale-and-shift aligned ``si_a1``-``si_a3`` and ``si_rmse``; Probe3D's
scale-aware d1-d3 / rmse are ``a1``-``a3`` / ``rmse``)).
"""

from __future__ import annotations

from typing import Any, List


from bench.registry import TASKS

from .dense import DenseTask
from .losses import SigLoss, depth_loss
from .metrics import MeanMeter, depth_metrics, depth_valid, probe3d_depth_metrics

METRIC_SETS = ("standard", "scale_invariant")


class DepthTask(DenseTask):
    kind, label = "depth", "depth"

    def probe_kwargs(self, task, proto):
        return {"depth_cfg": proto.get("depth", {})}

    def start(self, task, proto):
        lc = proto.get("loss", {}) or {}
        self._sig = SigLoss(
            bool(lc.get("warm_up", False)), int(lc.get("warm_iter", 100)), str(lc.get("sig_variance", "biased"))
        )

    def iteration(self):
        sig = getattr(self, "_sig", None)
        return sig.iteration() if sig is not None else super().iteration()

    def loss(self, out, target, proto, batch=None):
        lc = proto.get("loss", {}) or {}
        valid = depth_valid(target, max_depth=lc.get("max_depth"))
        sig = getattr(self, "_sig", None) or SigLoss(False, 0, str(lc.get("sig_variance", "biased")))
        return depth_loss(
            out["depth"],
            target,
            valid,
            float(lc.get("sig_weight", 1.0)),
            float(lc.get("grad_weight", 0.5)),
            tuple(lc.get("grad_scales", (1,))),
            str(lc.get("grad_reduction", "image")),
            sig=sig,
        )

    def flip_average(self, out, flipped):
        return {"depth": 0.5 * (out["depth"] + flipped["depth"].flip(-1))}

    def new_meters(self, task, proto) -> List[Any]:
        sets = list((proto.get("eval", {}) or {}).get("metrics", ["standard"]))
        bad = [s for s in sets if s not in METRIC_SETS]
        if bad:
            from bench.errors import UnknownNameError

            raise UnknownNameError("depth metric set", bad[0], METRIC_SETS)
        return [MeanMeter(""), MeanMeter("si_")] if "scale_invariant" in sets else [MeanMeter("")]

    def update_meters(self, meters, out, target, proto, batch=None) -> None:
        ec = proto.get("eval", {}) or {}
        valid = depth_valid(
            target,
            max_depth=ec.get("max_depth"),
            min_depth=float(ec.get("min_depth", 0.0) or 0.0),
            crop=ec.get("crop"),
            strict_max=bool(ec.get("strict_max", False)),
        )
        pred = out["depth"]
        meters[0].update(depth_metrics(pred, target, valid))
        if len(meters) > 1:
            si = probe3d_depth_metrics(pred, target, valid, scale_invariant=True)
            meters[1].update({"a1": si["d1"], "a2": si["d2"], "a3": si["d3"], "rmse": si["rmse"]})


for _name, _desc in [
    ("synth_depth", "depth probe on the built-in synthetic scenes (exact depth); rmse, a1, abs_rel"),
    ("nyu_depth", "NYUv2 depth (linear: FiT3D/SnD mmseg protocol; probe3d: Probe3D); rmse, a1, abs_rel"),
    ("scannetpp_depth", "ScanNet++ depth, max 20 m (FiT3D processed layout or raw DSLR renders); rmse, a1, abs_rel"),
    ("scannet_depth", "ScanNet depth in FiT3D's eval_data/scannet layout, Eigen crop, max 10 m; rmse, a1, abs_rel"),
    ("kitti_depth", "KITTI Eigen split depth, Garg crop, max 80 m; rmse, a1, abs_rel"),
]:
    TASKS.add(_name, type(f"DepthTask_{_name}", (DepthTask,), {}), _desc)
