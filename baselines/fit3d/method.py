"""The ``fit3d`` method: stage I per scene (cached), then stage II fine-tuning of the whole backbone.

Stage II (FiT3D ``engine.train_one_epoch``): for a batch of (scene, view) items, render the view's
D-dim features from the scene's frozen Gaussians, decode them with the scene's conv (teacher width),
flip image, target and coverage together with probability ``hflip``, run the student on the images,
downsample target and mask bilinearly to the student's patch grid, and minimise the masked L1
``sum(m |f - t|) / (C sum(m))`` where ``m`` is the ScanNet++ anonymisation mask (official; all ones
without one; ``stage2.loss_mask`` can add or use the rendered coverage instead). BatchNorm layers of
a CNN backbone stay in eval mode (``stage2.batchnorm``). AdamW (lr 1e-5, wd 1e-4, constant lr), batch 2, gradient clipping
0.1, ``epochs`` passes over every view of every training scene in a fresh random order each epoch.
Resumable exactly through :class:`bench.train.TrainLoop` (``<workdir>/stage2``); the runner saves
the returned backbone's weights to ``model.safetensors``.

The teacher of stage I is a frozen copy of the input backbone taken before any update, so a resumed
run (which starts from the same pretrained backbone) finds the same cached scene fits.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from bench.checkpoint import weights_hash
from bench.config import stable_hash, to_container
from bench.data.multiview import open_scenes
from bench.errors import BenchError, choice
from bench.io import write_json
from bench.registry import METHODS
from bench.seed import seed_everything
from bench.distributed import start_run
from bench.train import TrainLoop

from .stage1 import (
    INFO_FILE,
    SceneFit,
    downsample_to_grid,
    fit_scene,
    RESIZES,
    floor_resize,
    is_fitted,
    scene_key,
    scene_seed,
)

log = logging.getLogger("bench")


LOSS_MASKS = ("anon", "anon_and_coverage", "coverage")


def stage2_mask(view, alpha, thr: float, kind: str = "anon"):
    """Stage-II loss weights ``[1,1,H,W]`` of one view. ``anon`` (FiT3D ``engine.train_one_epoch``): the
    ScanNet++ anonymisation mask as a weight in [0, 1] (255 = keep; all ones when the data has none), rendered
    coverage unused;
    ``coverage``: rendered alpha above ``thr``; ``anon_and_coverage``: both."""
    # the mask as a continuous weight, as FiT3D's datasets/scannetpp.py reads it (``/ 255.0``): JPEG-edge values
    # between 0 and 255 weigh their pixels partly
    anon = (
        (view["anon"].to(alpha.dtype) / 255.0).clamp(0, 1).to(alpha.device)
        if "anon" in view
        else torch.ones_like(alpha)
    )
    cov = (alpha > thr).to(alpha.dtype)
    m = {"anon": anon, "coverage": cov, "anon_and_coverage": anon * cov}[kind]
    return m[:, None]


def train_mode(backbone, batchnorm: str = "eval"):
    """Train mode for stage II; ``batchnorm="eval"`` keeps BatchNorm layers on their running statistics
    (a CNN's statistics would otherwise drift toward the few training rooms; DINOv2 has none)."""
    backbone.train()
    if batchnorm == "eval":
        for mod in backbone.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()
    return backbone


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(m |pred - target|) / (C sum(m))`` for ``[B,C,h,w]`` maps and weights ``m [B,h,w]``."""
    m = mask[:, None].to(pred.dtype)
    return ((pred - target).abs() * m).sum() / (m.sum() * pred.shape[1]).clamp_min(1e-6)


class SceneFits:
    """The fitted scenes of a run, loaded on demand with a small LRU (``capacity`` scenes in memory)."""

    def __init__(self, dirs: Dict[str, Path], device, capacity: int = 8):
        self.dirs, self.device, self.capacity = dirs, device, max(int(capacity), 1)
        self._cache: "OrderedDict[str, SceneFit]" = OrderedDict()

    def __getitem__(self, scene: str) -> SceneFit:
        if scene in self._cache:
            self._cache.move_to_end(scene)
        else:
            self._cache[scene] = SceneFit.load(self.dirs[scene], self.device)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return self._cache[scene]


def teacher_identity(teacher, cfg: DictConfig) -> str:
    """The teacher of stage I = its weights (digest) + everything else that shapes its features
    (resize, normalisation...): part of every scene's cache key."""
    arch = {k: v for k, v in to_container(cfg.backbone).items() if k != "weights" and not k.startswith("hub_")}
    floor = str(cfg.method.resize) == "official" and getattr(teacher, "resize_mode", "resize") == "resize"
    return f"{cfg.backbone.name}:{weights_hash(teacher)}:{stable_hash(arch)}" + (":floor14" if floor else "")


def scene_dirs(data, teacher_id: str, cfg: DictConfig) -> Dict[str, Path]:
    """``scene -> fit directory`` (``<scene_cache>/<scene>-<key>``) of every training scene."""
    m = cfg.method
    root = Path(str(m.scene_cache))
    return {
        scene: root / f"{scene}-{scene_key(scene, m.data, teacher_id, m.stage1, int(cfg.seed))}"
        for scene in data.scene_ids
    }


def fit_one(data, scene: str, wd: Path, teacher, cfg: DictConfig, device, progress: bool = True) -> None:
    """Stage I of one scene into ``wd``, unless it is fitted already (an unfinished fit resumes)."""
    if not is_fitted(wd):  # read the views only when needed
        views = data.load_views(scene, range(data.num_views(scene)))
        fit_scene(
            views,
            teacher,
            cfg.method.stage1,
            wd,
            seed=scene_seed(int(cfg.seed), scene),
            device=device,
            progress=progress,
            resize=str(cfg.method.resize),
        )


def fit_scenes(data, teacher, cfg: DictConfig, device, progress: bool = True) -> Dict[str, Path]:
    """Stage I for every training scene (cached and resumable); returns ``scene -> fit directory``.

    Scenes a sweep's stage-I array already fitted (:func:`stage1_shards`) are only loaded."""
    from bench import distributed as dist

    dirs = scene_dirs(data, teacher_identity(teacher, cfg), cfg)
    for i, (scene, wd) in enumerate(dirs.items()):  # several ranks: rank r fits scenes r, r + W, ...
        if i % dist.world_size() == dist.rank():
            fit_one(data, scene, wd, teacher, cfg, device, progress)
    dist.barrier()  # every scene is fitted (by some rank) before stage II reads them
    for i, (scene, wd) in enumerate(dirs.items()):
        info = json.loads((wd / INFO_FILE).read_text())
        log.info(
            "fit3d stage I %d/%d %s: %s",
            i + 1,
            len(data.scene_ids),
            scene,
            {k: info.get(k) for k in ("num_gaussians", "final", "s_per_iteration")},
        )
    return dirs


def stage1_teacher(cfg: DictConfig, device="cpu"):
    """The stage-I teacher exactly as a training run sees it: seeded, built (bench.runner.obtain_backbone),
    frozen (:meth:`FiT3D.fit`); so a separate stage-I job computes the same scene cache keys."""
    from bench.backbones import build_backbone

    seed_everything(int(cfg.seed))
    return build_backbone(cfg.backbone).eval().requires_grad_(False).to(device)


def stage1_shards(cfg: DictConfig, per_task: int = 1) -> Tuple[List[List[str]], List[str]]:
    """Plan stage I as an array: ``(shards, fitted)`` -- the training scenes not fitted yet, in
    consecutive groups of ``per_task`` (one array task each), and the scenes whose fit is cached."""
    data = open_scenes(cfg.method.data, cfg.paths.data_dir)
    dirs = scene_dirs(data, teacher_identity(stage1_teacher(cfg), cfg), cfg)
    todo = [s for s, wd in dirs.items() if not is_fitted(wd)]
    per_task = max(int(per_task), 1)
    return [todo[i : i + per_task] for i in range(0, len(todo), per_task)], [s for s in dirs if s not in todo]


def run_stage1(cfg: DictConfig, scenes: List[str]) -> Dict[str, str]:
    """One stage-I array task: fit ``scenes`` (resuming unfinished fits, skipping finished ones);
    returns ``scene -> fit directory``."""
    from bench.distributed import resolve_device

    device = resolve_device(cfg)
    progress = bool(cfg.method.get("progress", True))
    data = open_scenes(cfg.method.data, cfg.paths.data_dir)
    teacher = stage1_teacher(cfg, device)
    dirs = scene_dirs(data, teacher_identity(teacher, cfg), cfg)
    unknown = [s for s in scenes if s not in dirs]
    if unknown:
        from bench.errors import BenchError

        raise BenchError(
            f"stage-I scenes {unknown} are not training scenes of method.data",
            "re-plan the sweep (the data or its scene list changed)",
        )
    for scene in scenes:
        fit_one(data, scene, dirs[scene], teacher, cfg, device, progress)
        log.info("fit3d stage I %s: %s", scene, dirs[scene])
    return {s: str(dirs[s]) for s in scenes}


def steps_per_epoch(num_items: int, batch: int, drop_last: bool) -> int:
    """Batches of one pass: FiT3D's stage-II loader drops the last incomplete one (``finetune.py``:
    ``BatchSampler(..., drop_last=True)``); ``drop_last=False`` keeps it."""
    return num_items // batch if drop_last else math.ceil(num_items / batch)


def epoch_batches(step: int, num_items: int, batch: int, seed: int, drop_last: bool = False) -> List[int]:
    """Item indices of optimiser step ``step``: a new permutation every epoch, consecutive batches of
    it (with ``drop_last`` the incomplete last one of an epoch is skipped, else it is a smaller batch).
    Stateless, so resuming needs no sampler state."""
    per_epoch = steps_per_epoch(num_items, batch, drop_last)
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 104_729 + epoch))
    return perm[b * batch : (b + 1) * batch].tolist()


@dataclass(frozen=True)
class Stage2Settings:
    """Stage II's settings, resolved from ``cfg`` (and its choices checked) before stage I's work."""

    seed: int
    batch_size: int
    drop_last: bool
    steps: Optional[int]  # stage2.steps: a fixed number of optimiser steps (dose-response runs) ...
    epochs: Optional[int]  # ... else stage2.epochs passes over the views
    lr: float
    weight_decay: float
    grad_clip: Any
    alpha_threshold: float
    hflip: float
    batchnorm: str
    loss_mask: str
    resize: str
    cached_scenes: int
    precision: str
    global_avg: bool  # several ranks: each rank's loss is its share of the pooled masked mean
    progress: bool
    ckpt_every: int
    keep_last: int
    log_every: int
    workers: Any  # cfg.loader.workers (bench.loader.resolve_workers)
    prefetch: int

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Stage2Settings":
        m, s2 = cfg.method, cfg.method.stage2
        return cls(
            seed=int(cfg.seed),
            batch_size=int(s2.batch_size),
            drop_last=bool(s2.drop_last),
            steps=int(s2.steps) if s2.steps else None,
            epochs=None if s2.steps else int(s2.epochs),
            lr=float(s2.lr),
            weight_decay=float(s2.weight_decay),
            grad_clip=s2.grad_clip,
            alpha_threshold=float(s2.alpha_threshold),
            hflip=float(s2.hflip),
            batchnorm=choice("method.stage2.batchnorm", s2.batchnorm, ("eval", "train")),
            loss_mask=choice("method.stage2.loss_mask", s2.loss_mask, LOSS_MASKS),
            resize=choice("method.resize", m.resize, RESIZES),
            cached_scenes=int(s2.cached_scenes),
            precision=str(cfg.precision),
            global_avg=str(cfg.distributed.grad_average) == "global",
            progress=bool(m.progress),
            ckpt_every=int(m.ckpt_every),
            keep_last=int(m.keep_last),
            log_every=int(m.log_every),
            workers=cfg.loader.workers,
            prefetch=int(cfg.loader.prefetch),
        )

    def total_steps(self, num_items: int) -> int:
        """Optimiser steps over ``num_items`` training views; a BenchError when ``drop_last`` leaves none."""
        bs = self.batch_size
        if self.drop_last and num_items < bs:
            raise BenchError(
                f"method.stage2.batch_size={bs} is larger than the {num_items} training views, and "
                "method.stage2.drop_last=true (FiT3D's loader) drops every incomplete batch: no step would run",
                f"lower method.stage2.batch_size to at most {num_items}, or set method.stage2.drop_last=false",
            )
        return self.steps if self.steps else steps_per_epoch(num_items, bs, self.drop_last) * self.epochs


def _views_of(items: List[Tuple[str, int]], data, s2: Stage2Settings):
    """``views_of(step)``: this rank's ``(scene, view sample, flip)`` items of step ``step`` (runs in a
    loader worker); ranks take consecutive chunks of a step's (global) batch."""
    from bench import distributed as dist

    bs, seed, p_flip = s2.batch_size, s2.seed, s2.hflip
    per_rank = -(-bs // dist.world_size())

    def views_of(step: int):
        batch = epoch_batches(step, len(items), bs, seed, s2.drop_last)
        out = []
        for j in range(dist.rank() * per_rank, min((dist.rank() + 1) * per_rank, len(batch))):
            scene, v = items[batch[j]]
            # one flip draw per item (image, target and mask together), from (seed, step, position)
            g = torch.Generator().manual_seed(seed * 1_000_003 + step * bs + j)
            out.append((scene, data.load_views(scene, [v]), float(torch.rand((), generator=g)) < p_flip))
        return out

    return views_of


def _stage2_step(backbone, fits: SceneFits, loader, s2: Stage2Settings, device):
    """``step_fn(step)`` of stage II: the masked L1 between the student's patch features of the step's
    (flipped) views and the scenes' rendered, decoded features, on the student's grid."""
    from bench import distributed as dist
    from bench.distributed import autocast

    def step_fn(step: int):
        images, targets, masks = [], [], []
        for scene, view, flip in loader.get(step):
            H, W = view["images"].shape[-2:]
            target, alpha = fits[scene].render_targets(view["w2c"].to(device), view["K"].to(device), W, H)
            img, cov = view["images"].to(device), stage2_mask(view, alpha, s2.alpha_threshold, s2.loss_mask).to(device)
            if flip:
                img, target, cov = img.flip(-1), target.flip(-1), cov.flip(-1)
            images.append(img)
            targets.append(target)
            masks.append(cov)
        if not images:  # a ragged last batch left this rank without items: it adds zero gradients
            if s2.global_avg:
                dist.global_mean_weight(0.0)  # the collective every rank joins
            return torch.zeros((), device=device, requires_grad=True), {"coverage": 0.0}
        with autocast(s2.precision, device):
            out = backbone(floor_resize(torch.cat(images), backbone, s2.resize))
        out = out.float()
        grid = tuple(out.shape[-2:])
        target = downsample_to_grid(torch.cat(targets), grid, backbone)
        mask = downsample_to_grid(torch.cat(masks), grid, backbone)[:, 0]
        loss = masked_l1(out, target, mask)
        if s2.global_avg:  # several ranks: this rank's share of the pooled masked mean
            loss = loss * dist.global_mean_weight(mask.sum())
        return loss, {"coverage": float(mask.mean())}

    return step_fn


def _diagnostics(method: DictConfig, data, data_dir: str, device):
    """The training-side diagnostics (:class:`bench.diagnostics.Diagnostics`) at the method's image size
    (``method.data.size``, else the first view's)."""
    from bench.diagnostics import Diagnostics

    size = (
        [int(x) for x in method.data.size]
        if method.data.size is not None
        else list(data.load_views(data.scene_ids[0], [0])["images"].shape[-2:])
    )
    return Diagnostics(method, size, data_dir, device)


@METHODS.register(
    "fit3d",
    "FiT3D: per-scene feature Gaussians (3DGS + 64-d features, cached), then whole-backbone "
    "fine-tuning on their rendered features (trains)",
)
class FiT3D:
    """FiT3D baseline (stage I + stage II); resumable from ``workdir``.

    ``stop_after`` (not a config key) ends this call after that many stage-II steps (after a checkpoint);
    the next call with the same workdir continues.
    """

    trains = True
    # a sweep plans stage I as a job array before the training job (bench.sweep.make_plan)
    prepare_name = "stage1"

    @staticmethod
    def prepare_shards(cfg: DictConfig, per_task: int = 1) -> Tuple[List[List[str]], List[str]]:
        return stage1_shards(cfg, per_task)

    @staticmethod
    def prepare(cfg: DictConfig, items: List[str]) -> Dict[str, str]:
        return run_stage1(cfg, items)

    def _stage1(self, backbone, cfg: DictConfig, workdir: Path, device, progress: bool):
        """``(scenes, {scene: fit dir})``: stage I of every training scene by a frozen copy of ``backbone``
        (fitted, resumed or reused); rank 0 lists the fits in ``stage1_scenes.json``."""
        from bench import distributed as dist

        with dist.main_first():  # rank 0 generates a synthetic set once
            data = open_scenes(cfg.method.data, cfg.paths.data_dir)
        teacher = copy.deepcopy(backbone).eval().requires_grad_(False).to(device)
        dirs = fit_scenes(data, teacher, cfg, device, progress)
        del teacher
        if dist.is_main():
            write_json(
                workdir / "stage1_scenes.json",
                {s: {"dir": str(d), **json.loads((d / INFO_FILE).read_text())} for s, d in dirs.items()},
            )
        return data, dirs

    def fit(self, backbone, cfg: DictConfig, workdir: Path, stop_after: Optional[int] = None):
        """Stage I, then stage II fine-tuning of ``backbone`` (returned, in eval mode)."""
        from bench import distributed as dist
        from bench.diagnostics import trainable_weights
        from bench.loader import StepLoader, resolve_workers

        device = start_run(cfg)
        s2 = Stage2Settings.from_config(cfg)  # its choices are checked before stage I's work
        workdir = Path(workdir)
        data, dirs = self._stage1(backbone, cfg, workdir, device, s2.progress)
        seed_everything(s2.seed)  # independent of whether stage I ran or was reused
        fits = SceneFits(dirs, device, s2.cached_scenes)
        items: List[Tuple[str, int]] = [(s, v) for s in data.scene_ids for v in range(data.num_views(s))]
        steps = s2.total_steps(len(items))
        diag = _diagnostics(cfg.method, data, cfg.paths.data_dir, device)
        diag.start(backbone.to(device), trainable_weights(backbone.model))
        backbone = train_mode(backbone.to(device).requires_grad_(True), s2.batchnorm)
        opt = torch.optim.AdamW(backbone.model.parameters(), lr=s2.lr, weight_decay=s2.weight_decay)
        dist.seed_offset(s2.seed)
        loop = TrainLoop(
            workdir / "stage2",
            steps,
            opt,
            {"model": backbone.model},
            grad_clip=s2.grad_clip,
            ckpt_every=s2.ckpt_every,
            keep_last=s2.keep_last,
            progress=s2.progress,
            desc="fit3d stage II",
            log_every=s2.log_every,
            log_dir=workdir,
            images_per_step=s2.batch_size,
            device=device,
        )
        workers, pin = resolve_workers(s2.workers), str(device).startswith("cuda")
        loader = StepLoader(_views_of(items, data, s2), steps, workers, s2.prefetch, pin_memory=pin)
        log.info(
            "fit3d stage II: %d scenes, %d views, %d steps x batch %d, device %s",
            len(data.scene_ids),
            len(items),
            steps,
            s2.batch_size,
            device,
        )
        history = loop.run(_stage2_step(backbone, fits, loader, s2, device), stop_after=stop_after)
        loader.close()
        backbone = backbone.eval().requires_grad_(False)
        result = diag.finish(backbone, trainable_weights(backbone.model), history)
        self.train_info = {"diagnostics": result}
        if loop.main:  # rank 0 alone writes
            write_json(workdir / "history.json", history)
            write_json(workdir / "diagnostics.json", result)
        return backbone
