"""Multi-view training data of the methods: ``cfg.method.data`` -> scenes with posed views.

Used by every method that trains on posed multi-view scenes (``splat_distill``, the ``fit3d``
baseline), so that no method package imports another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import BenchError

TRAINING_DATASETS = ("synthetic", "scannetpp")


def synthetic_root(data: Mapping[str, Any], data_dir: str | Path) -> Path:
    """Default folder of a synthetic training set: one per parameter set, so that sets never clobber
    each other (``ensure_synthetic`` regenerates a folder whose parameters differ)."""
    H, W = (int(s) for s in data["size"])
    return Path(data_dir) / f"synthetic_snd_s{int(data['seed'])}_{int(data['scenes'])}x{int(data['views'])}_{H}x{W}"


def open_scenes(data: Mapping[str, Any], data_dir: str | Path = "data", keep_bad: bool = False):
    """``cfg.method.data`` -> a :class:`bench.data.scenes.MultiViewScenes` over the training scenes.

    ``dataset: synthetic`` generates the set on first use (``ensure_synthetic``, with ``workers``
    processes if set); ``scannetpp`` reads a prepared ScanNet++ DSLR root (``keep_bad``: frames flagged
    ``is_bad`` too). ``scenes``: null (all), a count (the first N sorted), or a list of ids.
    """
    from .scenes import MultiViewScenes

    kind = str(data.get("dataset", "synthetic"))
    size = [int(s) for s in data["size"]] if data.get("size") is not None else None
    if kind == "synthetic":
        from .synthetic import ensure_synthetic

        if not isinstance(data.get("scenes"), int) or data.get("views") is None or size is None:
            raise BenchError(
                "method.data.dataset=synthetic needs counts method.data.scenes and method.data.views "
                "and method.data.size",
                "e.g. method.data.scenes=4 method.data.views=16 method.data.size=[96,128]",
            )
        root = Path(data["root"]) if data.get("root") else synthetic_root(data, data_dir)
        ensure_synthetic(
            root, int(data["scenes"]), int(data["views"]), size, int(data["seed"]), workers=data.get("workers")
        )
        return MultiViewScenes(root, None, size)
    if kind != "scannetpp":
        raise BenchError(f"method.data.dataset='{kind}' is not a training dataset", f"use one of {TRAINING_DATASETS}")
    scenes = data.get("scenes")
    ids = None if scenes is None or isinstance(scenes, int) else [str(x) for x in scenes]
    reader = MultiViewScenes(Path(data["root"]), ids, size, keep_bad=keep_bad)
    if isinstance(scenes, int):
        reader.scene_ids = reader.scene_ids[:scenes]
    return reader
