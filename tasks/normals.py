"""Surface normals: 4-channel probe (xyz + kappa), uncertainty-aware angular loss (Bae et al.).

Protocol keys used here: ``loss.type`` (``nll``: the uncertainty-aware angular NLL, ``angular``:
plain angular loss on xyz), ``mask`` (``depth: true``: only pixels whose raw depth -- sample key
``depth``, metres, 0 = missing -- is > 0 and <= ``max_depth`` count, in the loss and the metrics, as
Probe3D/SnD ``train_snorm.py``; ``depth: false``: every pixel with a non-zero normal). Metrics per image then averaged: angular ``rmse``, ``mean``, ``median``
(degrees) and ``a11``, ``a22``, ``a30`` (% of pixels within 11.25, 22.5, 30 degrees).
"""

from __future__ import annotations

from typing import Any, List

from bench.registry import TASKS

from .dense import DenseTask
from .losses import angular_loss, angular_nll_loss
from .metrics import MeanMeter, normals_metrics, normals_valid
from .train_probe import need


def _valid(target, proto, batch):
    m = proto.get("mask", {}) or {}
    if not m.get("depth", False):
        return normals_valid(target)
    if not batch or "depth" not in batch:
        from bench.errors import BenchError

        raise BenchError(
            "the normals valid mask needs the raw depth (sample key 'depth') but the batch has none",
            "use a normals reader that returns depth, or set task.protocol.mask.depth=false",
        )
    return normals_valid(target, batch["depth"], m.get("max_depth"))


class NormalsTask(DenseTask):
    kind, label = "normals", "normals"

    @property
    def extra(self):
        return ("depth",) if getattr(self, "_mask_depth", True) else ()

    def evaluate(self, backbone, cfg, workdir):
        from .dense import resolve_protocol

        self._mask_depth = bool((resolve_protocol(cfg).get("mask", {}) or {}).get("depth", False))
        return super().evaluate(backbone, cfg, workdir)

    def loss(self, out, target, proto, batch=None):
        valid = _valid(target, proto, batch)
        kind = str(need(proto.get("loss", {}) or {}, "type", "task.protocol.loss"))
        if kind == "nll":
            return angular_nll_loss(out["normals"], out["kappa"], target, valid)
        if kind == "angular":
            return angular_loss(out["normals"], target, valid)
        from bench.errors import UnknownNameError

        raise UnknownNameError("normals loss", kind, ["nll", "angular"])

    def new_meters(self, task, proto) -> List[Any]:
        return [MeanMeter("")]

    def update_meters(self, meters, out, target, proto, batch=None) -> None:
        meters[0].update(normals_metrics(out["normals"], target, _valid(target, proto, batch)))


for _name, _desc in [
    ("synth_normals", "surface normals probe on the synthetic scenes (exact normals); angular rmse, mean, a11"),
    ("nyu_normals", "NYUv2 surface normals (GeoNet train / 654 test, Probe3D layout); angular rmse, mean, a11"),
]:
    TASKS.add(_name, type(f"NormalsTask_{_name}", (NormalsTask,), {}), _desc)
