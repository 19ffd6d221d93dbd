"""The raw teacher as a method: the backbone as loaded, frozen, no training."""

from __future__ import annotations

from pathlib import Path

from bench.registry import METHODS

from . import schema  # noqa: F401  (registration)


@METHODS.register("dinov2", "raw teacher: the configured backbone as loaded, frozen (no training)")
class FrozenTeacher:
    trains = False

    def fit(self, backbone, cfg, workdir: Path):
        for p in backbone.parameters():
            p.requires_grad_(False)
        return backbone.eval()
