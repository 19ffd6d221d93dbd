"""The ``splat_distill`` method: the trainer behind the Method seam."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig

from bench.errors import BenchError
from bench.io import write_json
from bench.registry import METHODS
from bench.train import TrainLoop, one_cycle_cosine, start_run

from .distill import Distiller
from .views import ViewSampler

log = logging.getLogger("bench")

DATASETS = ("synthetic", "scannetpp")


def synthetic_root(data: Mapping[str, Any], data_dir: str | Path) -> Path:
    """Default folder of a synthetic training set: one per parameter set, so that sets never clobber
    each other (``ensure_synthetic`` regenerates a folder whose parameters differ)."""
    H, W = (int(s) for s in data["size"])
    return Path(data_dir) / f"synthetic_snd_s{int(data['seed'])}_{int(data['scenes'])}x{int(data['views'])}_{H}x{W}"


def open_scenes(data: Mapping[str, Any], data_dir: str | Path = "data"):
    """``cfg.method.data`` -> a :class:`bench.data.scenes.MultiViewScenes` over the training scenes.

    ``dataset: synthetic`` generates the set on first use (``ensure_synthetic``); ``scannetpp`` reads
    a prepared ScanNet++ DSLR root. ``scenes``: null (all), a count (the first N sorted), or a list of ids.
    """
    from bench.data.scenes import MultiViewScenes

    kind = str(data.get("dataset", "synthetic"))
    size = [int(s) for s in data["size"]] if data.get("size") is not None else None
    if kind == "synthetic":
        from bench.data.synthetic import ensure_synthetic

        if not isinstance(data.get("scenes"), int) or data.get("views") is None or size is None:
            raise BenchError("method.data.dataset=synthetic needs counts method.data.scenes and method.data.views "
                             "and method.data.size", "e.g. method.data.scenes=4 method.data.views=16 "
                             "method.data.size=[96,128]")
        root = Path(data["root"]) if data.get("root") else synthetic_root(data, data_dir)
        ensure_synthetic(root, int(data["scenes"]), int(data["views"]), size, int(data["seed"]))
        return MultiViewScenes(root, None, size)
    if kind != "scannetpp":
        raise BenchError(f"method.data.dataset='{kind}' is not a training dataset", f"use one of {DATASETS}")
    scenes = data.get("scenes")
    ids = None if scenes is None or isinstance(scenes, int) else [str(x) for x in scenes]
    reader = MultiViewScenes(Path(data["root"]), ids, size)
    if isinstance(scenes, int):
        reader.scene_ids = reader.scene_ids[:scenes]
    return reader


def build_training(backbone, cfg: DictConfig, workdir: Path, device: str):
    """Everything a run needs: ``(distiller, data, sampler, loop, step_fn)``.

    ``method.optim.batch_size`` is the global batch of a step; each rank (``torchrun`` / SLURM tasks)
    takes its consecutive share of it (:mod:`bench.distributed`), read ahead by a
    :class:`bench.loader.StepLoader` (``loader.workers`` processes, ``loader.prefetch`` steps each).
    """
    from bench import distributed as dist
    from bench.loader import StepLoader

    m = cfg.method
    with dist.main_first():  # rank 0 generates a synthetic set once; the others then read it
        data = open_scenes(m.data, cfg.paths.data_dir)
    sampler = ViewSampler([data.num_views(s) for s in data.scene_ids], m.views.gap, str(m.views.target),
                          seed=int(cfg.seed))
    distiller = Distiller(backbone, m, device)
    distiller.precision = str(cfg.get("precision", "32"))
    distiller.grad_average = str((cfg.get("distributed") or {}).get("grad_average", "global"))
    if distiller.grad_average not in dist.GRAD_AVERAGES:
        raise BenchError(f"distributed.grad_average='{distiller.grad_average}' is not a choice",
                         f"use one of {dist.GRAD_AVERAGES}")
    dist.seed_offset(int(cfg.seed))  # identical set-up on every rank, then per-rank dropout streams
    o = m.optim
    opt = torch.optim.Adam(distiller.parameters(), lr=float(o.lr))
    sched = one_cycle_cosine(opt, int(o.steps), float(o.warmup_pct))
    batch = int(o.batch_size)
    positions = dist.rank_slice(batch)
    loop = TrainLoop(Path(workdir) / "checkpoints", int(o.steps), opt,
                     {"student": distiller.student, "ema": distiller.ema, "sampler": sampler},
                     scheduler=sched, ckpt_every=int(m.ckpt_every), keep_last=int(m.keep_last),
                     grad_clip=o.get("grad_clip"), progress=bool(m.progress), desc="splat_distill",
                     log_every=int(m.log_every), log_dir=Path(workdir), images_per_step=3 * batch, device=device)

    def examples(step: int):  # this rank's examples of step ``step`` (runs in a loader worker)
        out = []
        for j in positions:
            s, idx = sampler.example(step * batch + j)
            out.append(data.load_views(data.scene_ids[s], idx))
        return out

    ld = cfg.get("loader") or {}
    loader = StepLoader(examples, int(o.steps), int(ld.get("workers", 0)), int(ld.get("prefetch", 2)),
                        pin_memory=str(device).startswith("cuda"))

    def step_fn(step: int):
        return distiller.loss(loader.get(step))

    step_fn.loader = loader
    return distiller, data, sampler, loop, step_fn


@METHODS.register("splat_distill", "Splat-and-Distill: EMA teacher features lifted onto feed-forward Gaussians, "
                                   "splatted into a target view, distilled into a LoRA student (trains)")
class SplatDistill:
    """Train a backbone with Splat-and-Distill; resumable from ``workdir``.

    Returns the student backbone with LoRA merged (plain timm weights in ``backbone.model``).
    ``stop_after`` (not a config key) ends this invocation after that many steps (after a checkpoint):
    the next call with the same workdir continues.
    """

    trains = True

    def fit(self, backbone, cfg: DictConfig, workdir: Path, stop_after: Optional[int] = None):
        device = start_run(cfg)
        workdir = Path(workdir)
        distiller, data, _, loop, step_fn = build_training(backbone, cfg, workdir, device)
        from bench import distributed as dist

        log.info("splat_distill: %d scenes, %d steps x global batch %d (%d rank(s) x %d), %s, device %s, "
                 "precision %s", len(data.scene_ids), loop.total_steps, int(cfg.method.optim.batch_size),
                 dist.world_size(), dist.per_rank_batch(int(cfg.method.optim.batch_size)),
                 cfg.method.reconstructor.name, device, distiller.precision)
        history = loop.run(step_fn, after_step=distiller.update_teacher, stop_after=stop_after)
        step_fn.loader.close()
        if loop.main:  # rank 0 alone writes
            write_json(workdir / "history.json", history)
        return distiller.finish(str(cfg.method.get("export", "student")))
