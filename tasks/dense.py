"""Dense probing tasks (depth, normals, segmentation): one flow, configured by ``cfg.task``.

``evaluate(backbone, cfg, workdir)``:

1. open the train/test splits (:func:`tasks.data.open_split`) with the protocol's transforms;
2. features of the frozen backbone (:class:`tasks.features.FeatureSpec`): extracted once into the
   on-disk cache when training is augmentation-free, otherwise on the fly per batch;
3. train the probe (:func:`tasks.train_probe.train_probe`) with the task's loss, resumably: its
   checkpoints live in the cell's probe directory (:func:`probe_dir`, under ``paths.cache_dir/probes``,
   keyed by the cell fingerprint, the seed and the backbone's weights), so an evaluation job that is
   requeued after a time-out continues from the last checkpoint, bit-identically;
4. predict the test split (optionally by sliding windows) and compute the protocol's metrics;
5. write ``probe.safetensors``, ``metrics.json`` and the training curves into ``workdir``; the probe
   directory is removed once they are written.

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

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError
from torch.utils.data import DataLoader
from bench.progress import progress as show_progress

from bench.backbones import module_device
from bench.errors import BenchError, UnknownNameError
from bench.io import save_safetensors, workdir_lock, write_json

from bench.schema import apply_code_version
from .data import check_dataset, dataset_identity, open_split
from .features import CachedFeatures, FeatureCache, FeatureSpec, assemble, features, weights_hash
from .probes import DenseProbe
from .sliding import slide_inference
from .train_probe import check_groups, check_schedule, need, train_probe
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
    apply_code_version(proto, f"task.protocols.{cfg.get('protocol', 'linear')}")
    variant = proto.get("schedule_variant")
    if variant:  # a named schedule variant is merged over the protocol's schedule
        named = dict(proto.get("schedules") or {})
        if variant not in named:
            raise UnknownNameError("schedule variant", str(variant), list(named))
        proto["schedule"] = {**dict(proto.get("schedule") or {}), **dict(named[variant])}
    return proto


def probe_dir(cfg: DictConfig, weights: str) -> Path:
    """The cell's probe directory (training checkpoints and curves of its probe): the same for every
    run of the same cell (configuration, seed) on the same backbone weights, so a requeued evaluation
    job finds the checkpoints of the one that timed out."""
    from bench.config import stable_hash
    from bench.identity import cell_identity

    key = stable_hash({"cell": cell_identity(cfg)["cell"], "seed": int(cfg.get("seed", 0)), "weights": weights})
    return Path(cfg.paths.cache_dir) / "probes" / f"{cfg.task.name}-{key}"


CURVE_FILES = ("history.jsonl", "metrics.jsonl", "train.log")


def _spg(proto: Mapping[str, Any]) -> Optional[int]:
    """The protocol's loss-group size (``schedule.samples_per_gpu``; None: one group, the whole batch)."""
    v = (proto.get("schedule") or {}).get("samples_per_gpu")
    return None if v is None else int(v)


class DenseTask:
    """Base of the depth / normals / segmentation tasks. Subclasses set ``kind`` and ``label`` and
    implement :meth:`loss` and :meth:`metrics` (+ :meth:`probe_kwargs`)."""

    kind = ""  # "depth" | "normals" | "seg"
    data_parallel = True  # under torchrun / SLURM tasks every rank trains the probe (bench.runner.run_cell)
    label = ""  # sample key of the target
    extra = ()  # further sample keys the loss / metrics read (normals: the raw depth for the valid mask)

    # -- hooks ----------------------------------------------------------------------------------------
    def probe_kwargs(self, task: Mapping[str, Any], proto: Mapping[str, Any]) -> Dict[str, Any]:
        return {}

    def prepare_target(self, target: torch.Tensor, task: Mapping[str, Any]) -> torch.Tensor:
        return target

    def start(self, task: Mapping[str, Any], proto: Mapping[str, Any]) -> None:
        """Called once before probe training (stateful losses, e.g. SigLoss's warm-up counter)."""

    def iteration(self):
        """Context of one training step whose loss is computed per loss group (SigLoss: one warm-up
        count per step, not per group)."""
        return contextlib.nullcontext()

    def loss(
        self,
        out: Dict[str, torch.Tensor],
        target: torch.Tensor,
        proto: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def new_meters(self, task: Mapping[str, Any], proto: Mapping[str, Any]) -> List[Any]:
        raise NotImplementedError

    def update_meters(
        self,
        meters: List[Any],
        out: Dict[str, torch.Tensor],
        target: torch.Tensor,
        proto: Mapping[str, Any],
        batch: Mapping[str, Any] | None = None,
    ) -> None:
        raise NotImplementedError

    # -- runner seam ------------------------------------------------------------------------------------
    def check(self, cfg: DictConfig) -> None:
        """Fail early (before any training): unknown protocol, loss groups that misfit the batch, dataset
        not prepared."""
        proto = resolve_protocol(cfg)
        key = f"task.protocols.{cfg.get('protocol', 'linear')}.schedule"
        check_schedule(proto.get("schedule") or {}, key)
        check_groups(int(proto["schedule"]["batch_size"]), _spg(proto), key)
        check_dataset(cfg.task.dataset)

    def probe_layout(self, cfg: DictConfig) -> Dict[str, Any]:
        """What a record says about how its probe was trained: ranks, global batch, loss groups, the
        largest per-rank batch (ranks take whole groups), BatchNorm statistics."""
        proto = resolve_protocol(cfg)
        ranks, bs, spg = (
            self.probe_ranks(proto),
            int(need(proto.get("schedule") or {}, "batch_size", "task.protocol.schedule")),
            _spg(proto),
        )
        return {
            "world_size": ranks,
            "global_batch": bs,
            "samples_per_gpu": spg,
            "per_rank_batch": -(-(bs // spg) // ranks) * spg if ranks > 1 else bs,
            "batchnorm": "global batch (SyncBN)" if ranks > 1 else "global batch",
        }

    def probe_ranks(self, proto: Mapping[str, Any]) -> int:
        """How many ranks train the probe of the resolved protocol ``proto``: all of a multi-rank run when
        it has loss groups (``schedule.samples_per_gpu``), else 1 (rank 0 trains it as one process: a
        loss over the whole batch cannot be split)."""
        from bench import distributed as dist

        if not (dist.initialized() and dist.is_distributed()):
            return 1
        return dist.world_size() if _spg(proto) is not None else 1

    def evaluate(
        self, backbone, cfg: DictConfig, workdir: Path, stop_after: Optional[int] = None
    ) -> Optional[Dict[str, float]]:
        """Train and test the probe; returns the metrics. ``stop_after`` (tests, not a config key) ends
        probe training after that many steps (after a checkpoint) and returns None: nothing is written
        into ``workdir``; the next call resumes."""
        from bench import distributed as dist
        from bench.loader import resolve_workers

        t0 = time.time()
        task = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "protocols"}
        proto = resolve_protocol(cfg)
        main, parallel = dist.is_main(), self.probe_ranks(proto) > 1
        if not self._trains_here(cfg, parallel):
            return None
        if main:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        seed, progress = int(cfg.get("seed", 0)), bool(task.get("progress", True)) and main
        workers = resolve_workers(task.get("num_workers", 0))  # auto: min(8, cores per local rank - 1)
        backbone.eval()
        spec = FeatureSpec.from_config(proto.get("features", {}), backbone)
        train, test = self._splits(cfg, proto)
        probe, in_dims = self._new_probe(backbone, train, spec, task, proto, parallel, seed)
        weights = weights_hash(backbone)
        fcfg = proto.get("features", {})
        data, get_feats, cache = self._training_data(backbone, cfg, train, spec, fcfg, weights, parallel, progress)
        train_workers = 0 if cache is not None and str(task.get("num_workers", 0)) == "auto" else workers
        device = module_device(backbone)
        step_loss = self._step_loss(probe, get_feats, task, proto, device, in_dims)
        stateful = self._start(task, proto)
        pdir = probe_dir(cfg, weights)
        t1 = time.time()
        with workdir_lock(pdir):
            info = train_probe(
                probe,
                data,
                step_loss,
                proto.get("schedule", {}),
                seed=seed,
                num_workers=train_workers,
                desc=f"{task['name']} probe",
                progress=progress,
                workdir=pdir,
                stop_after=stop_after,
                loss_state=stateful,
                distributed=parallel,
                key=f"task.protocols.{cfg.get('protocol', 'linear')}.schedule",
            )
        if info.pop("total_steps") > info["steps"]:  # stop_after: unfinished, resumable from pdir
            return None
        t2 = time.time()
        # every rank tests a strided share of the split; rank 0 adds up the meters (mmseg's distributed test)
        metrics = self.test(
            backbone, probe, test, spec, task, proto, device, progress, workers, shard=dist.rank() if parallel else None
        )
        if not main:  # rank 0 writes
            return None
        seconds = {"prepare": round(t1 - t0, 3), "train": round(t2 - t1, 3), "test": round(time.time() - t2, 3)}
        _write_outputs(Path(workdir), pdir, probe, task["name"], _summary(metrics, proto, cache, info, seconds))
        return metrics

    def _trains_here(self, cfg: DictConfig, parallel: bool) -> bool:
        """Whether this process trains (and tests) the probe: every rank of a data-parallel probe, else
        rank 0 alone (with a warning in a multi-rank run: a loss over the whole batch cannot be split)."""
        from bench import distributed as dist

        if not dist.is_distributed() or parallel:
            return True
        if not dist.is_main():
            return False
        log.warning(
            "%s: the probe's loss is one group over the whole batch (no task.protocols.%s.schedule."
            "samples_per_gpu), so rank 0 trains it alone; set samples_per_gpu for a data-parallel probe",
            cfg.task.name,
            cfg.get("protocol", "linear"),
        )
        return True

    def _splits(self, cfg: DictConfig, proto: Mapping[str, Any]):
        """``(train, test)``: the two splits with the protocol's transforms (``train.cfg``: the train transforms)."""
        keys = ("image", self.label, *self.extra)
        train_cfg, test_cfg = dict(proto.get("train", {}) or {}), proto.get("test", {}) or {}
        if train_cfg.get("cat_max_ratio") and (cfg.task.get("dataset") or {}).get("reduce_zero_label"):
            train_cfg["cat_ignore_zero"] = True  # mmseg reduces the zero label before RandomCrop
        train = Transformed(open_split(cfg.task.dataset, "train"), train_cfg, True, keys)
        test = Transformed(open_split(cfg.task.dataset, "test"), test_cfg, False, keys)
        return train, test

    def _new_probe(self, backbone, train, spec: FeatureSpec, task, proto, parallel: bool, seed: int):
        """``(probe, feature channels)``: a new probe for the features of ``train[0]``; in a data-parallel
        run rank 0's probe on every rank, with BatchNorm over the global batch (SyncBN)."""
        from bench import distributed as dist

        first = features(backbone, train[0]["image"][None].to(module_device(backbone)), spec)
        in_dims = [f.shape[1] for f in first]
        probe = DenseProbe(self.kind, proto.get("head", {}), in_dims, **self.probe_kwargs(task, proto))
        probe = probe.to(module_device(backbone))
        if parallel:
            dist.broadcast_state([probe])
            probe = dist.sync_batchnorm(probe)
            dist.seed_offset(seed)  # each rank draws its own random augmentations from here on
        return probe, in_dims

    def _training_data(self, backbone, cfg: DictConfig, train, spec, fcfg, weights: str, parallel, progress):
        """``(dataset, features of a batch, feature cache or None)``: cached features when the protocol
        caches them and training is augmentation-free (rank 0 extracts them first; they are read from
        memory, so ``num_workers=auto`` loads them in the main process), else the images, whose features
        are computed per batch."""
        device = module_device(backbone)
        if not (bool(fcfg.get("cache", True)) and not is_augmented(train.cfg)):
            return train, lambda b: features(backbone, b["image"].to(device, non_blocking=True), spec), None
        from bench import distributed as dist

        cache = _feature_cache(cfg, spec, fcfg, train.cfg, weights)
        if dist.is_main():
            _check_cache_space(cache, backbone, train, fcfg, cfg.get("protocol", "linear"))
        with dist.main_first() if parallel else contextlib.nullcontext():  # rank 0 extracts first
            cache.fill(
                backbone,
                train,
                batch_size=int(need(fcfg, "batch_size", "task.protocol.features")),
                device=str(device),
                progress=progress,
                refresh=bool(cfg.get("force", False)) and dist.is_main(),
            )
        data = CachedFeatures(cache, train, (self.label, *self.extra))
        return data, lambda b: [f.to(device, non_blocking=True) for f in assemble(b["features"])], cache

    def _step_loss(self, probe, get_feats, task, proto, device, in_dims: List[int]):
        """``step_loss(batch, sizes=None)`` for :func:`train_probe`: the task's loss of the probe on a batch
        (per loss group when ``sizes`` is given, summed), a zero loss that joins SyncBN for ``batch=None``."""

        def step_loss(batch, sizes=None):
            if batch is None:  # this rank holds no item of the step: a zero loss that joins SyncBN
                with self.iteration():  # the step still counts (SigLoss warm-up), as on the other ranks
                    out = probe([torch.zeros(0, c, 1, 1, device=device) for c in in_dims], (1, 1))
                    return sum(v.sum() for v in out.values()) * 0.0
            target = self.prepare_target(batch[self.label], task).to(device, non_blocking=True)
            extra = {k: batch[k].to(device, non_blocking=True) for k in self.extra}
            out = probe(get_feats(batch), tuple(target.shape[-2:]))
            if sizes is None:
                return self.loss(out, target, proto, extra)
            return self._group_losses(out, target, proto, extra, sizes)

        return step_loss

    def _group_losses(self, out, target, proto, extra, sizes: List[int]) -> torch.Tensor:
        """The sum of the task's losses of the consecutive groups of ``sizes`` items (the anchor's GPUs)."""
        total, start = None, 0
        with self.iteration():  # one loss per group (the anchor's GPU), summed; train_probe averages
            for n in sizes:
                part = slice(start, start + n)
                loss = self.loss(
                    {k: v[part] for k, v in out.items()},
                    target[part],
                    proto,
                    {k: v[part] for k, v in extra.items()},
                )
                total, start = (loss if total is None else total + loss), start + n
        return total

    def _start(self, task: Mapping[str, Any], proto: Mapping[str, Any]) -> Dict[str, Any]:
        """:meth:`start`, then this task's objects of plain attributes (SigLoss's warm-up counter), which
        are checkpointed with the probe."""
        self.start(task, proto)
        plain = (bool, int, float, str, type(None))
        return {
            k: v
            for k, v in vars(self).items()
            if not isinstance(v, plain + (torch.nn.Module,))
            and hasattr(v, "__dict__")
            and all(isinstance(a, plain) for a in vars(v).values())
        }

    def flip_average(self, out: Dict[str, torch.Tensor], flipped: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Test-time horizontal flip (mmseg ``MultiScaleFlipAug(flip=True)``): the prediction of the
        flipped image is flipped back and averaged with the plain one (depth ``aug_test``)."""
        raise BenchError(
            f"test-time flip averaging is implemented for depth, not {self.kind}", "remove task.protocol.test.flip"
        )

    @torch.no_grad()
    def test(
        self,
        backbone,
        probe,
        test,
        spec: FeatureSpec,
        task,
        proto,
        device,
        progress: bool = True,
        workers: int = 0,
        shard: Optional[int] = None,
    ) -> Dict[str, float]:
        """The protocol's metrics of ``probe`` on the ``test`` split. ``shard`` (a data-parallel run): this
        rank tests images ``shard, shard + W, ...`` and the meters of all ranks are summed (per-image
        means and dataset-level pixel counts add up, so the metrics are those of the whole split; the
        per-image sums are float64, added in another order). Returns the metrics on rank 0, None elsewhere."""
        from bench import distributed as dist

        probe.eval()
        tcfg = proto.get("test", {}) or {}
        if shard is not None:
            test = torch.utils.data.Subset(test, range(shard, len(test), dist.world_size()))
        loader = DataLoader(
            test, batch_size=int(need(tcfg, "batch_size", "task.protocol.test")), shuffle=False, num_workers=workers
        )
        meters = self.new_meters(task, proto)
        for batch in show_progress(loader, desc=f"{task['name']} test", unit="batch", enable=progress):
            img = batch["image"].to(device)
            target = self.prepare_target(batch[self.label], task).to(device)
            out = self.predict(backbone, probe, spec, tcfg, img, tuple(target.shape[-2:]))
            self.update_meters(meters, out, target, proto, {k: batch[k].to(device) for k in self.extra})
        if shard is not None:
            meters = _gather_meters(meters)
            if meters is None:
                return None
        result: Dict[str, float] = {}
        for m in meters:
            result.update(m.result())
        return result

    def predict(self, backbone, probe, spec: FeatureSpec, tcfg: Mapping[str, Any], img: torch.Tensor, size):
        """The probe's prediction on ``img`` at ``size`` under the protocol's test options ``tcfg``: sliding
        windows (segmentation), or one pass, averaged with the flipped image's with ``flip``."""
        sliding = tcfg.get("sliding")
        if not sliding:
            out = probe(features(backbone, img, spec), size)
            if tcfg.get("flip"):
                out = self.flip_average(out, probe(features(backbone, img.flip(-1), spec), size))
            return out
        if self.kind != "seg":
            raise BenchError(
                f"sliding-window inference is implemented for segmentation, not {self.kind}",
                "remove task.protocol.test.sliding",
            )
        logits = slide_inference(
            lambda x: probe(features(backbone, x, spec), tuple(x.shape[-2:]))["logits"],
            img,
            sliding["window"],
            sliding["stride"],
        )
        return {"logits": torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)}


def _gather_meters(meters: List[Any]) -> Optional[List[Any]]:
    """Rank 0: the meters of all ranks merged (a data-parallel test); None on the other ranks."""
    from bench import distributed as dist

    gathered = dist.all_gather_object(meters)
    if not dist.is_main():
        return None
    meters = gathered[0]
    for other in gathered[1:]:
        meters = [m.merge(o) for m, o in zip(meters, other)]
    return meters


def _feature_cache(
    cfg: DictConfig, spec: FeatureSpec, fcfg: Mapping[str, Any], train_cfg, weights: str
) -> FeatureCache:
    """The feature cache of the cell's training split: keyed by the backbone and its weights, the features,
    the train transforms, a non-default precision and the dataset."""
    return FeatureCache(
        Path(cfg.paths.cache_dir) / "features",
        str(cfg.backbone.name),
        weights,
        spec,
        {
            "train": T.canonical(train_cfg),
            "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
            **({"precision": str(cfg.precision)} if str(cfg.get("precision", "32")) != "32" else {}),
        },
        dataset_identity(cfg.task.dataset, "train"),
        str(fcfg.get("cache_dtype", "float32")),
    )


def _check_cache_space(cache: FeatureCache, backbone, train, fcfg: Mapping[str, Any], protocol: str) -> None:
    """Refuse before the extraction when the samples still to extract cannot fit on the cache's disk."""
    todo = cache.todo(len(train))
    if todo:
        from bench.io import check_space

        per = cache.sample_bytes(backbone, train[0]["image"])
        check_space(
            cache.dir,
            todo * per,
            f"the feature cache of {todo} samples x {per:,} bytes ({fcfg.get('cache_dtype', 'float32')})",
            "free space, point BENCH_CACHE (paths.cache_dir) at a file system with room, or pass "
            f"task.protocols.{protocol}.features.cache=false",
        )


def _summary(metrics, proto, cache: Optional[FeatureCache], info: Dict[str, Any], seconds) -> Dict[str, Any]:
    """The content of a task's ``metrics.json``: metrics, protocol, feature cache, the probe's training
    (``info`` of :func:`train_probe`; its loss curve thinned to at most ~200 points) and timings."""
    losses = info.pop("losses")
    return {
        "metrics": metrics,
        "protocol": proto,
        "feature_cache": cache.key if cache is not None else None,
        "train": info,
        "loss_curve": losses[:: max(1, len(losses) // 200)],  # at most ~200 points
        "seconds": seconds,
    }


def _write_outputs(workdir: Path, pdir: Path, probe, task_name: str, summary: Dict[str, Any]) -> None:
    """``probe.safetensors``, ``metrics.json`` (``summary``) and the probe's curves into ``workdir``; the
    probe directory ``pdir`` (its checkpoints) is removed."""
    save_safetensors(
        probe.state_dict(),
        workdir / "probe.safetensors",
        metadata={"task": task_name, "protocol": str(summary["protocol"].get("name"))},
    )
    write_json(workdir / "metrics.json", summary)
    for name in CURVE_FILES:  # the curves stay with the run; the checkpoints are no longer needed
        if (pdir / name).exists():
            shutil.copyfile(pdir / name, workdir / f"probe_{name}")
    if (pdir / "tensorboard").is_dir():  # TensorBoard events when installed (pip install -e ".[tb]")
        shutil.copytree(pdir / "tensorboard", workdir / "probe_tensorboard", dirs_exist_ok=True)
    shutil.rmtree(pdir, ignore_errors=True)
    log.info("%s: %s", task_name, json.dumps({k: round(v, 4) for k, v in summary["metrics"].items()}))
