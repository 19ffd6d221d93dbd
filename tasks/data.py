"""The reader seam between dataset readers (``bench/data/<dataset>.py``) and the tasks.

A **reader** is a ``torch.utils.data.Dataset`` class registered in ``DATASETS``::

    @DATASETS.register("nyuv2", "NYUv2 labeled (Probe3D/GeoNet layout): depth, normals, 40 classes")
    class NYUv2(torch.utils.data.Dataset):
        def __init__(self, root, split, **kwargs): ...
        def __len__(self): ...
        def __getitem__(self, i) -> dict: ...
        @classmethod
        def check(cls, root) -> list[str]: ...   # [] when the layout is complete

Sample dict (a reader returns the keys its dataset has; tasks ask for what they need):

- ``image``    float32 [3,H,W] in [0,1]
- ``depth``    float32 [H,W] metres, 0 = invalid
- ``normals``  float32 [3,H,W] unit vectors in the camera frame (OpenCV axes: x right, y down,
  z forward); an all-zero vector = invalid
- ``semantic`` int64 [H,W] class ids *as stored in the dataset's label files*; 255 = ignore.
  Whether 0 means "unlabelled" (``reduce_zero_label``: 0 -> 255, k -> k-1) is decided by the task
  config (``task.dataset.reduce_zero_label``), not by the reader.
- optional: ``K`` [3,3] pixels, ``id`` (str, stable per sample)

``check(root)`` lists what is missing as human-readable lines, each naming the file/folder looked for
(``"<root>/nyu_depth_v2_labeled.mat (download from ...)"``). The task config node ``cfg.task.dataset``
has ``name`` (registry name), ``root``, ``splits`` (``{train: ..., test: ...}``: the split names passed
to the reader), optional ``kwargs`` (passed to the reader unchanged) and optional ``limit`` (use only
the first N samples of each split; for smoke runs).
A reader may also provide ``add_arguments(parser)`` / ``cli(args)`` for ``python -m bench data <name>``.
The real-dataset readers build on :class:`bench.data.layout.FileDataset` (which derives ``check``, the
missing-data errors and that command) and register with :func:`bench.data.layout.register_reader`, which
also sets their ``name``; a command-only entry (a generator, a checker) is
:func:`bench.data.layout.register_command`.
``check`` may take keyword arguments (e.g. ``layout``); those named in ``kwargs`` are passed to it.

Two multi-view scene sets are read through :class:`bench.data.scenes.ViewDataset` instead (single
views of ScanNet++-layout scenes): ``synthetic`` (generated on first use by
``bench.data.synthetic.ensure_synthetic`` with the node's ``scenes``, ``views``, ``size``, ``seed``
and optional ``workers`` (generator processes);
the last ``held_out`` scenes are the test split) and ``scannetpp`` (``splits`` name scene-list files
relative to the root, e.g. ``splits/nvs_sem_train.txt``; optional ``view_stride`` keeps every N-th view).
The published ScanNet / ScanNet++ rows use FiT3D's processed evaluation folders instead, read by the
ordinary readers ``scannet_fit3d`` / ``scannetpp_fit3d`` (bench/data/fit3d_eval.py; docs/DATASETS.md).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, List, Mapping

import torch
from torch.utils.data import Dataset, Subset

from bench.config import to_container
from bench.errors import DataMissingError, what_is_at
from bench.registry import DATASETS


def check_dataset(ds_cfg: Any) -> None:
    """Raise :class:`DataMissingError` naming every missing file when the dataset is not prepared."""
    node = to_container(ds_cfg)
    name, root = node["name"], Path(str(node["root"]))
    if name == "synthetic":
        return  # generated on demand
    if not root.is_dir():
        missing = [f"{root} (dataset root {what_is_at(root, 'directory')})"]
    elif name == "scannetpp":
        missing = [str(root / f) for f in _scene_split_files(node) if not (root / f).is_file()]
    else:
        reader = DATASETS.get(name)
        params = inspect.signature(reader.check).parameters
        kw = {k: v for k, v in (node.get("kwargs") or {}).items() if k in params}
        missing = list(reader.check(root, **kw))
    if missing:
        layout = (node.get("kwargs") or {}).get("layout")
        layout = f" --layout {layout}" if layout and name != "scannetpp" else ""
        shown = "; ".join(missing[:8]) + (f"; ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
        raise DataMissingError(
            f"dataset '{name}' is not prepared at {root}: looked for {shown}",
            f"run `python -m bench data {name} --root {root}{layout}` for download and layout "
            f"instructions, then point task.dataset.root (or BENCH_DATA) at the prepared data",
        )


def open_split(ds_cfg: Any, split: str) -> Dataset:
    """The reader of ``ds_cfg`` for the task split ``split`` ("train" or "test"), checked first."""
    node = to_container(ds_cfg)
    check_dataset(node)
    if node["name"] in ("synthetic", "scannetpp"):
        ds = _scene_views(node, split)
    else:
        reader = DATASETS.get(node["name"])
        ds = reader(node["root"], node.get("splits", {}).get(split, split), **(node.get("kwargs") or {}))
    limit = node.get("limit")
    if limit is not None and int(limit) < len(ds):
        ds = Subset(ds, range(int(limit)))
    return ds


def reduce_zero_label(semantic: torch.Tensor) -> torch.Tensor:
    """mmseg's ``reduce_zero_label``: 0 (unlabelled) -> 255, k -> k-1, 255 stays 255."""
    out = semantic.clone() - 1
    out[(semantic == 0) | (semantic == 255)] = 255
    return out


def dataset_identity(ds_cfg: Any, split: str) -> Mapping[str, Any]:
    """What identifies the samples of one split (for the feature cache key)."""
    node = to_container(ds_cfg)
    node["root"] = str(Path(str(node["root"])).resolve())
    return {"dataset": node, "split": split}


def _scene_split_files(node: Mapping[str, Any]) -> List[str]:
    return [str(v) for v in (node.get("splits") or {}).values()]


def _scene_views(node: Mapping[str, Any], split: str) -> Dataset:
    """Single views of the synthetic or ScanNet++ scenes of one split."""
    from bench.data.scenes import ViewDataset

    root = Path(str(node["root"]))
    if node["name"] == "synthetic":
        from bench.data.synthetic import ensure_synthetic, split_scenes

        size = node.get("size", [128, 128])
        size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(v) for v in size]
        root = ensure_synthetic(
            root,
            scenes=int(node.get("scenes", 8)),
            views=int(node.get("views", 24)),
            size=size,
            seed=int(node.get("seed", 0)),
            progress=True,
            workers=node.get("workers"),
        )
        ids = json.loads((root / "meta.json").read_text())["scene_ids"]
        train, test = split_scenes(ids, node.get("held_out", 0.25))
        scene_ids = train if split == "train" else test
    else:
        path = root / str(node["splits"][split])
        scene_ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    ds = ViewDataset(root, scene_ids)
    stride = int(node.get("view_stride", 1) or 1)
    return Subset(ds, range(0, len(ds), stride)) if stride > 1 else ds
