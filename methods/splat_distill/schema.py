"""Keys of ``method=splat_distill`` (bench/conf/method/splat_distill.yaml), their types and which are required:
the schema :func:`bench.schema.check` validates a composed config against (the yaml holds the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from bench.registry import METHOD_SCHEMAS
from bench.schema import REQ, Cadence, Diagnostics, SceneData, file_input


@dataclass
class SnDViews:
    gap: Any = REQ  # int | [min, max]
    target: str = REQ
    order: str = REQ
    contiguous: bool = REQ
    keep_bad: bool = REQ
    last_batch: str = REQ


@dataclass
class SnDAdapter:
    mode: str = REQ
    r: int = REQ
    alpha: float = REQ
    dropout: float = REQ
    target_modules: Any = REQ  # official | attention | [suffixes]


@dataclass
class SnDHead:
    prototypes: int = REQ
    hidden_dim: int = REQ
    bottleneck_dim: int = REQ
    student_temp: float = REQ
    teacher_temp: float = REQ
    train_gain: bool = REQ
    prototype_init: str = REQ


@dataclass
class SnDTeacher:
    momentum: float = REQ
    every: int = REQ
    frozen: bool = REQ
    ema: str = REQ
    dropout: bool = REQ


@dataclass
class SnDReconstructor:
    name: str = REQ
    scale_mult: float = REQ
    checkpoint: Optional[str] = file_input()
    near: float = REQ
    far: float = REQ


@dataclass
class SnDLift:
    resize: str = REQ
    upsample: str = REQ
    upsample_grid: str = REQ
    all_excluded: str = REQ
    masks: str = REQ
    slic_segments: int = REQ
    slic_compactness: float = REQ
    alpha_threshold: float = REQ
    coverage: str = REQ
    uncovered: str = REQ
    normalize_alpha: bool = REQ
    feature_covariance: str = REQ
    blending: bool = REQ
    blend_alpha: float = REQ
    blend_segments: str = REQ
    render_basis: str = REQ


@dataclass
class SnDOptim:
    lr: float = REQ
    warmup_pct: float = REQ
    steps: int = REQ
    batch_size: int = REQ
    grad_clip: Optional[float] = REQ
    accumulate: int = 1


@METHOD_SCHEMAS.register("splat_distill", "keys of method=splat_distill")
@dataclass
class SplatDistillMethod(Cadence):
    name: str = REQ
    data: SceneData = REQ
    views: SnDViews = REQ
    adapter: SnDAdapter = REQ
    head: SnDHead = REQ
    teacher: SnDTeacher = REQ
    reconstructor: SnDReconstructor = REQ
    lift: SnDLift = REQ
    loss: str = REQ
    optim: SnDOptim = REQ
    per_task: Dict[str, Any] = REQ  # task kind -> method keys (checked against this schema)
    diagnostics: Diagnostics = REQ
    export: str = REQ
