"""Surface normals: 4-channel probe (xyz + kappa), uncertainty-aware angular loss (Bae et al.).

Protocol keys used here: ``loss.type`` (``nll``: the uncertainty-aware angular NLL, ``angular``:
plain angular loss on xyz). Metrics per image then averaged: angular ``rmse``, ``mean``, ``median``
(degrees) and ``a11``, ``a22``, ``a30`` (% of pixels within 11.25, 22.5, 30 degrees).
"""
from __future__ import annotations

from typing import Any, List

from bench.registry import TASKS

from .dense import DenseTask
from .losses import angular_loss, angular_nll_loss
from .metrics import MeanMeter, normals_metrics, normals_valid


class NormalsTask(DenseTask):
    kind, label = "normals", "normals"

    def loss(self, out, target, proto):
        valid = normals_valid(target)
        kind = str((proto.get("loss", {}) or {}).get("type", "nll"))
        if kind == "nll":
            return angular_nll_loss(out["normals"], out["kappa"], target, valid)
        if kind == "angular":
            return angular_loss(out["normals"], target, valid)
        from bench.errors import UnknownNameError

        raise UnknownNameError("normals loss", kind, ["nll", "angular"])

    def new_meters(self, task, proto) -> List[Any]:
        return [MeanMeter("")]

    def update_meters(self, meters, out, target, proto) -> None:
        meters[0].update(normals_metrics(out["normals"], target))


for _name, _desc in [
    ("synth_normals", "surface normals probe on the synthetic scenes (exact normals); angular rmse, mean, a11"),
    ("nyu_normals", "NYUv2 surface normals (GeoNet train / 654 test, Probe3D layout); angular rmse, mean, a11"),
]:
    TASKS.add(_name, type(f"NormalsTask_{_name}", (NormalsTask,), {}), _desc)
