"""Keys of ``method=dinov2`` (bench/conf/method/dinov2.yaml): the schema bench.schema checks a config against."""

from __future__ import annotations

from dataclasses import dataclass

from bench.registry import METHOD_SCHEMAS
from bench.schema import REQ


@METHOD_SCHEMAS.register("dinov2", "keys of method=dinov2")
@dataclass
class DINOv2Method:
    """The raw teacher: nothing to configure."""

    name: str = REQ
