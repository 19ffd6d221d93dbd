"""The ``splat_distill`` method: the trainer behind the Method seam."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from bench.data.multiview import open_scenes
from bench.io import write_json
from bench.registry import METHODS
from bench.train import TrainLoop, one_cycle_cosine, start_run

from .distill import Distiller
from .views import ViewSampler

log = logging.getLogger("bench")

def build_training(backbone, cfg: DictConfig, workdir: Path, device: str):
    """Everything a run needs: ``(distiller, data, sampler, loop, step_fn)``."""
    m = cfg.method
    data = open_scenes(m.data, cfg.paths.data_dir)
    sampler = ViewSampler([data.num_views(s) for s in data.scene_ids], m.views.gap, str(m.views.target),
                          seed=int(cfg.seed))
    distiller = Distiller(backbone, m, device)
    o = m.optim
    opt = torch.optim.Adam(distiller.parameters(), lr=float(o.lr))
    sched = one_cycle_cosine(opt, int(o.steps), float(o.warmup_pct))
    loop = TrainLoop(Path(workdir) / "checkpoints", int(o.steps), opt,
                     {"student": distiller.student, "ema": distiller.ema, "sampler": sampler},
                     scheduler=sched, ckpt_every=int(m.ckpt_every), keep_last=int(m.keep_last),
                     grad_clip=o.get("grad_clip"), progress=bool(m.progress), desc="splat_distill",
                     log_every=int(m.log_every))
    batch = int(o.batch_size)

    def step_fn(step: int):
        examples = []
        for _ in range(batch):
            s, idx = sampler.sample()
            examples.append(data.load_views(data.scene_ids[s], idx))
        return distiller.loss(examples)

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
        log.info("splat_distill: %d scenes, %d steps x batch %d, %s, device %s", len(data.scene_ids),
                 loop.total_steps, int(cfg.method.optim.batch_size), cfg.method.reconstructor.name, device)
        history = loop.run(step_fn, after_step=distiller.update_teacher, stop_after=stop_after)
        write_json(workdir / "history.json", history)
        return distiller.finish(str(cfg.method.get("export", "student")))
