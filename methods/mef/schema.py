"""Keys of ``method=mef`` (bench/conf/method/mef.yaml), their types and which are required: the schema
:func:`bench.schema.check` validates a composed config against (the yaml holds the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from bench.registry import METHOD_SCHEMAS
from bench.schema import REQ, Cadence


@dataclass
class MEFData:
    dataset: str = REQ
    root: Optional[str] = REQ
    objects: Any = REQ  # null | N | [ids]
    held_out: Any = REQ  # count | fraction
    views: int = REQ
    size: Any = REQ
    seed: int = REQ
    supersample: int = REQ
    scenes: Any = None  # the shared recipes' set-size key (used when objects is null)


@dataclass
class MEFLoRA:
    r: int = REQ
    blocks: int = REQ
    qv_only: bool = REQ


@dataclass
class MEFInput:
    target_res: Any = REQ  # auto | null | int
    stride: int = REQ


@dataclass
class MEFLoss:
    pos_thresh: float = REQ
    neg_thresh: float = REQ
    temperature: float = REQ


@dataclass
class MEFOptim:
    lr: float = REQ
    weight_decay: float = REQ
    steps: int = REQ
    batch_size: int = REQ
    grad_clip: Optional[float] = REQ


@dataclass
class MEFEval:
    pairs: int = REQ
    points: int = REQ


@METHOD_SCHEMAS.register("mef", "keys of method=mef")
@dataclass
class MEFMethod(Cadence):
    name: str = REQ
    data: MEFData = REQ
    points: int = REQ
    max_angle: float = REQ
    augment: bool = REQ
    lora: MEFLoRA = REQ
    input: MEFInput = REQ
    loss: MEFLoss = REQ
    optim: MEFOptim = REQ
    export_stride: Optional[int] = REQ
    eval: MEFEval = REQ
