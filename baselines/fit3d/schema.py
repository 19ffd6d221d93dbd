"""Keys of ``method=fit3d`` (bench/conf/method/fit3d.yaml), their types and which are required: the schema
:func:`bench.schema.check` validates a composed config against (the yaml holds the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from bench.registry import METHOD_SCHEMAS
from bench.schema import REQ, Cadence, Diagnostics, SceneData, keyed


@dataclass
class Fit3DLR:
    means: float = REQ
    means_final: float = REQ
    scales: float = REQ
    quats: float = REQ
    opacities: float = REQ
    colors: float = REQ
    features: float = REQ
    decoder: float = REQ


@dataclass
class Fit3DDensify:
    from_: int = keyed("from")
    until: int = REQ
    every: int = REQ
    grad_threshold: float = REQ
    percent_dense: float = REQ
    min_opacity: float = REQ
    max_screen_size: float = REQ
    world_size: float = REQ
    max_gaussians: Optional[int] = REQ


@dataclass
class Fit3DStage1:
    iterations: int = REQ
    init_points: int = REQ
    init_opacity: float = REQ
    feature_dim: int = REQ
    lambda_dssim: float = REQ
    feature_weight: float = REQ
    lr: Fit3DLR = REQ
    densify: Fit3DDensify = REQ
    opacity_reset_every: int = REQ
    reset_opacity_to: float = REQ
    eval: bool = REQ
    ckpt_every: int = REQ


@dataclass
class Fit3DStage2:
    lr: float = REQ
    weight_decay: float = REQ
    batch_size: int = REQ
    epochs: int = REQ
    steps: Optional[int] = REQ
    drop_last: bool = REQ
    grad_clip: Optional[float] = REQ
    batchnorm: str = REQ
    loss_mask: str = REQ
    hflip: float = REQ
    alpha_threshold: float = REQ
    cached_scenes: int = REQ


@METHOD_SCHEMAS.register("fit3d", "keys of method=fit3d")
@dataclass
class Fit3DMethod(Cadence):
    name: str = REQ
    data: SceneData = REQ
    resize: str = REQ
    scene_cache: str = REQ
    stage1: Fit3DStage1 = REQ
    stage2: Fit3DStage2 = REQ
    diagnostics: Diagnostics = REQ
