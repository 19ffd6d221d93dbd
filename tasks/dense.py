"""Dense probing tasks (depth, normals, segmentation): one flow, configured by ``cfg.task``.

``evaluate(backbone, cfg, workdir)``:

1. open the train/test splits (:func:`tasks.data.open_split`) with the protocol's transforms;
2. features of the frozen backbone (:class:`tasks.features.FeatureSpec`): extracted once into the
   on-disk cache when training is augmentation-free, otherwise on the fly per batch;
3. train the probe (:func:`tasks.train_probe.train_probe`) with the task's loss;
4. predict the test split (optionally by sliding windows) and compute the protocol's metrics;
5. write ``probe.safetensors`` and ``metrics.json`` into ``workdir``.

Task config (``cfg.task``; see bench/conf/task/*.yaml)::

    name, kind, dataset: {...}, report: [...],
    protocols: {linear: {...}, probe3d: {...}}   # both variants, spelled out
    protocol: ${.protocols.${protocol}}          # the one selected by the top-level `protocol` key

Protocol node keys: ``name``, ``features`` (layers, norm, cls, cache, cache_dtype), ``head``
(type linear|dpt, upsample, batchnorm, hidden), ``train`` / ``test`` (transforms, see
:mod:`tasks.transforms`; ``test.batch_size``, ``test.sliding: {window, stride}``), ``schedule``
(:mod:`tasks.train_probe`), ``loss`` and ``eval`` (task-specific), ``concat_original`` (FiT3D's
evaluation, applied by the runner via ``bench.backbones.ConcatBackbone``).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bench.backbones import module_device
from bench.errors import BenchError, UnknownNameError
from bench.io import save_safetensors, write_json

from .data import check_dataset, dataset_identity, open_split
from .features import CachedFeatures, FeatureCache, FeatureSpec, assemble, features, weights_hash
from .probes import DenseProbe
from .sliding import slide_inference
from .train_probe import train_probe
from . import transforms as T
from .transforms import Transformed, is_augmented

log = logging.getLogger("bench.tasks")


def resolve_protocol(cfg: DictConfig) -> Dict[str, Any]:
    """``cfg.task.protocol`` as a plain dict; an unknown top-level ``protocol`` is a BenchError."""
    task = cfg.task
    try:
        proto = OmegaConf.to_container(task.protocol, resolve=True)
    except (InterpolationKeyError, InterpolationResolutionError, KeyError):
        valid = list(task.get("protocols", {}).keys())
        raise UnknownNameError("protocol", str(cfg.get("protocol")), valid) from None
    if not isinstance(proto, dict):
        raise BenchError(f"task '{task.name}' has no protocol node", "set task.protocol (see bench/conf/task/)")
    variant = proto.get("schedule_variant")
    if variant:  # a named schedule variant is merged over the protocol's schedule
        named = dict(proto.get("schedules") or {})
        if variant not in named:
            raise UnknownNameError("schedule variant", str(variant), list(named))
        proto["schedule"] = {**dict(proto.get("schedule") or {}), **dict(named[variant])}
    return proto


class DenseTask:
    """Base of the depth / normals / segmentation tasks. Subclasses set ``kind`` and ``label`` and
    implement :meth:`loss` and :meth:`metrics` (+ :meth:`probe_kwargs`)."""

    kind = ""    # "depth" | "normals" | "seg"
    label = ""   # sample key of the target
    extra = ()   # further sample keys the loss / metrics read (normals: the raw depth for the valid mask)

    # -- hooks ----------------------------------------------------------------------------------------
    def probe_kwargs(self, task: Mapping[str, Any], proto: Mapping[str, Any]) -> Dict[str, Any]:
        return {}

    def prepare_target(self, target: torch.Tensor, task: Mapping[str, Any]) -> torch.Tensor:
        return target

    def start(self, task: Mapping[str, Any], proto: Mapping[str, Any]) -> None:
        """Called once before probe training (stateful losses, e.g. SigLoss's warm-up counter)."""

    def loss(self, out: Dict[str, torch.Tensor], target: torch.Tensor, proto: Mapping[str, Any],
             batch: Mapping[str, Any] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def new_meters(self, task: Mapping[str, Any], proto: Mapping[str, Any]) -> List[Any]:
        raise NotImplementedError

    def update_meters(self, meters: List[Any], out: Dict[str, torch.Tensor], target: torch.Tensor,
                      proto: Mapping[str, Any], batch: Mapping[str, Any] | None = None) -> None:
        raise NotImplementedError

    # -- runner seam ------------------------------------------------------------------------------------
    def check(self, cfg: DictConfig) -> None:
        """Fail early (before any training): unknown protocol, dataset not prepared."""
        resolve_protocol(cfg)
        check_dataset(cfg.task.dataset)

    def evaluate(self, backbone, cfg: DictConfig, workdir: Path) -> Dict[str, float]:
        t0 = time.time()
        task = OmegaConf.to_container(cfg.task, resolve=True)
        task.pop("protocols", None)
        proto = resolve_protocol(cfg)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        seed, progress = int(cfg.get("seed", 0)), bool(task.get("progress", True))
        workers = int(task.get("num_workers", 0))
        device = module_device(backbone)
        backbone.eval()

        spec = FeatureSpec.from_config(proto.get("features", {}), backbone)
        keys = ("image", self.label, *self.extra)
        train_cfg, test_cfg = dict(proto.get("train", {}) or {}), proto.get("test", {}) or {}
        if train_cfg.get("cat_max_ratio") and (task.get("dataset") or {}).get("reduce_zero_label"):
            train_cfg["cat_ignore_zero"] = True  # mmseg reduces the zero label before RandomCrop
        train = Transformed(open_split(cfg.task.dataset, "train"), train_cfg, True, keys)
        test = Transformed(open_split(cfg.task.dataset, "test"), test_cfg, False, keys)

        first = features(backbone, train[0]["image"][None].to(device), spec)
        probe = DenseProbe(self.kind, proto.get("head", {}), [f.shape[1] for f in first],
                           **self.probe_kwargs(task, proto)).to(device)

        fcfg = proto.get("features", {})
        cached = bool(fcfg.get("cache", True)) and not is_augmented(train_cfg)
        if cached:
            cache = FeatureCache(Path(cfg.paths.cache_dir) / "features", str(cfg.backbone.name), weights_hash(backbone),
                                 spec, {"train": T.canonical(train_cfg), "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
                                        **({"precision": str(cfg.precision)} if str(cfg.get("precision", "32")) != "32" else {})},
                                 dataset_identity(cfg.task.dataset, "train"),
                                 str(fcfg.get("cache_dtype", "float32")))
            cache.fill(backbone, train, batch_size=int(fcfg.get("batch_size", 8)), device=str(device), progress=progress,
                       refresh=bool(cfg.get("force", False)))
            data = CachedFeatures(cache, train, (self.label, *self.extra))
            get_feats = lambda b: [f.to(device) for f in assemble(b["features"])]  # noqa: E731
        else:
            data = train
            get_feats = lambda b: features(backbone, b["image"].to(device), spec)  # noqa: E731

        def step_loss(batch):
            target = self.prepare_target(batch[self.label], task).to(device)
            extra = {k: batch[k].to(device) for k in self.extra}
            return self.loss(probe(get_feats(batch), tuple(target.shape[-2:])), target, proto, extra)

        self.start(task, proto)

        t1 = time.time()
        info = train_probe(probe, data, step_loss, proto.get("schedule", {}), seed=seed, num_workers=workers,
                           desc=f"{task['name']} probe", progress=progress)
        t2 = time.time()
        metrics = self.test(backbone, probe, test, spec, task, proto, device, progress, workers)
        t3 = time.time()

        save_safetensors(probe.state_dict(), workdir / "probe.safetensors",
                         metadata={"task": task["name"], "protocol": str(proto.get("name"))})
        losses = info.pop("losses")
        write_json(workdir / "metrics.json", {
            "metrics": metrics, "protocol": proto, "feature_cache": cache.key if cached else None, "train": info,
            "loss_curve": losses[:: max(1, len(losses) // 200)],  # at most ~200 points
            "seconds": {"prepare": round(t1 - t0, 3), "train": round(t2 - t1, 3), "test": round(t3 - t2, 3)}})
        log.info("%s: %s", task["name"], json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        return metrics

    def flip_average(self, out: Dict[str, torch.Tensor], flipped: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Test-time horizontal flip (mmseg ``MultiScaleFlipAug(flip=True)``): the prediction of the
        flipped image is flipped back and averaged with the plain one (depth ``aug_test``)."""
        raise BenchError(f"test-time flip averaging is implemented for depth, not {self.kind}",
                         "remove task.protocol.test.flip")

    @torch.no_grad()
    def test(self, backbone, probe, test, spec: FeatureSpec, task, proto, device, progress: bool = True,
             workers: int = 0) -> Dict[str, float]:
        probe.eval()
        tcfg = proto.get("test", {}) or {}
        loader = DataLoader(test, batch_size=int(tcfg.get("batch_size", 1)), shuffle=False, num_workers=workers)
        sliding = tcfg.get("sliding")
        meters = self.new_meters(task, proto)
        for batch in tqdm(loader, desc=f"{task['name']} test", disable=not progress, leave=False, dynamic_ncols=True):
            img = batch["image"].to(device)
            target = self.prepare_target(batch[self.label], task).to(device)
            size = tuple(target.shape[-2:])
            if sliding:
                if self.kind != "seg":
                    raise BenchError(f"sliding-window inference is implemented for segmentation, not {self.kind}",
                                     "remove task.protocol.test.sliding")
                logits = slide_inference(lambda x: probe(features(backbone, x, spec), tuple(x.shape[-2:]))["logits"],
                                         img, sliding["window"], sliding["stride"])
                out = {"logits": torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
            else:
                out = probe(features(backbone, img, spec), size)
                if tcfg.get("flip"):
                    out = self.flip_average(out, probe(features(backbone, img.flip(-1), spec), size))
            self.update_meters(meters, out, target, proto, {k: batch[k].to(device) for k in self.extra})
        result: Dict[str, float] = {}
        for m in meters:
            result.update(m.result())
        return result

