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
from .train_probe import need

METRIC_SETS = ("standard", "scale_invariant")
EMPTY_IMAGES = ("drop", "zero")
LOSS = "task.protocol.loss"


class DepthTask(DenseTask):
    kind, label = "depth", "depth"

    def probe_kwargs(self, task, proto):
        return {"depth_cfg": proto.get("depth", {})}

    def start(self, task, proto):
        lc = proto.get("loss", {}) or {}
        warm = bool(need(lc, "warm_up", LOSS))
        self._sig = SigLoss(warm, int(need(lc, "warm_iter", LOSS)) if warm else 0, str(need(lc, "sig_variance", LOSS)))

    def iteration(self):
        sig = getattr(self, "_sig", None)
        return sig.iteration() if sig is not None else super().iteration()

    def loss(self, out, target, proto, batch=None):
        lc = proto.get("loss", {}) or {}
        if "max_depth" not in lc:
            need(lc, "max_depth", LOSS)
        valid = depth_valid(target, max_depth=lc["max_depth"])
        sig = getattr(self, "_sig", None) or SigLoss(False, 0, str(need(lc, "sig_variance", LOSS)))
        grad = float(need(lc, "grad_weight", LOSS))
        return depth_loss(
            out["depth"],
            target,
            valid,
            float(need(lc, "sig_weight", LOSS)),
            grad,
            tuple(need(lc, "grad_scales", LOSS)) if grad else (),
            str(need(lc, "grad_reduction", LOSS)) if grad else "image",
            sig=sig,
            grad_slices=str(lc.get("grad_slices") or "image"),
        )

    def flip_average(self, out, flipped):
        return {"depth": 0.5 * (out["depth"] + flipped["depth"].flip(-1))}

    def new_meters(self, task, proto) -> List[Any]:
        ec = proto.get("eval", {}) or {}
        sets = list(need(ec, "metrics", "task.protocol.eval"))
        if str(need(ec, "empty_images", "task.protocol.eval")) not in EMPTY_IMAGES:
            from bench.errors import UnknownNameError

            raise UnknownNameError("task.protocol.eval.empty_images", str(ec["empty_images"]), EMPTY_IMAGES)
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
            min_depth=float(ec.get("min_depth") or 0.0),
            crop=ec.get("crop"),
            strict_max=bool(ec.get("strict_max")),
        )
        pred = out["depth"]
        if need(proto.get("test", {}) or {}, "clamp", "task.protocol.test"):  # FiT3D encode_decode: head range
            d = proto["depth"]
            pred = pred.clamp(min=float(d["min_depth"]), max=float(d["max_depth"]))
        zero = ec["empty_images"] == "zero"  # Probe3D evaluate_depth: an empty image counts, as zeros
        meters[0].update(depth_metrics(pred, target, valid, empty_as_zero=zero))
        if len(meters) > 1:
            si = probe3d_depth_metrics(pred, target, valid, scale_invariant=True, empty_as_zero=zero)
            meters[1].update({"a1": si["d1"], "a2": si["d2"], "a3": si["d3"], "rmse": si["rmse"]})


for _name, _desc in [
    ("synth_depth", "depth probe on the built-in synthetic scenes (exact depth); rmse, a1, abs_rel"),
    ("nyu_depth", "NYUv2 depth (linear: FiT3D/SnD mmseg protocol; probe3d: Probe3D); rmse, a1, abs_rel"),
    ("scannetpp_depth", "ScanNet++ depth, max 20 m (FiT3D processed layout or raw DSLR renders); rmse, a1, abs_rel"),
    ("scannet_depth", "ScanNet depth in FiT3D's eval_data/scannet layout, Eigen crop, max 10 m; rmse, a1, abs_rel"),
    ("kitti_depth", "KITTI Eigen split depth, Garg crop, max 80 m; rmse, a1, abs_rel"),
]:
    TASKS.add(_name, type(f"DepthTask_{_name}", (DepthTask,), {}), _desc)
