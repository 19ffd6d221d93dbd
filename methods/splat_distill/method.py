"""The ``splat_distill`` method: the trainer behind the Method seam."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from bench.data.multiview import open_scenes
from bench.errors import BenchError, choice
from bench.io import write_json
from bench.registry import METHODS
from bench.distributed import start_run
from bench.train import TrainLoop, one_cycle_cosine

from .distill import Distiller
from .head import COLLAPSE_KEYS
from .views import LAST_BATCHES, ViewSampler, frame_numbers, rank_share, step_examples

log = logging.getLogger("bench")


def _new_sampler(m: DictConfig, data, seed: int) -> ViewSampler:
    """The sampler of the training examples (``method.views``) over the scenes of ``data``."""
    return ViewSampler(
        [data.num_views(s) for s in data.scene_ids],
        m.views.gap,
        str(m.views.target),
        seed=seed,
        order=str(m.views.order),
        numbers=[frame_numbers(data.frame_names(s)) for s in data.scene_ids] if m.views.contiguous else None,
    )


def _new_distiller(backbone, cfg: DictConfig, device: str) -> Distiller:
    """The student/teacher pair with the run's precision and gradient averaging (a BenchError for an
    unknown ``distributed.grad_average``)."""
    from bench import distributed as dist

    distiller = Distiller(backbone, cfg.method, device)
    distiller.precision = str(cfg.precision)
    distiller.grad_average = str(cfg.distributed.grad_average)
    if distiller.grad_average not in dist.GRAD_AVERAGES:
        raise BenchError(
            f"distributed.grad_average='{distiller.grad_average}' is not a choice", f"use one of {dist.GRAD_AVERAGES}"
        )
    return distiller


def _train_loop(distiller: Distiller, sampler: ViewSampler, m: DictConfig, workdir: Path, device: str) -> TrainLoop:
    """Adam with the one-cycle cosine schedule (``method.optim``) in a resumable loop over student, EMA
    teacher and sampler; checkpoints in ``<workdir>/checkpoints``."""
    o = m.optim
    opt = torch.optim.Adam(distiller.parameters(), lr=float(o.lr))
    sched = one_cycle_cosine(opt, int(o.steps), float(o.warmup_pct))
    return TrainLoop(
        Path(workdir) / "checkpoints",
        int(o.steps),
        opt,
        {"student": distiller.student, "ema": distiller.ema, "sampler": sampler},
        scheduler=sched,
        ckpt_every=int(m.ckpt_every),
        keep_last=int(m.keep_last),
        grad_clip=o.grad_clip or None,
        progress=bool(m.progress),
        desc="splat_distill",
        log_every=int(m.log_every),
        log_dir=Path(workdir),
        images_per_step=3 * int(o.batch_size),
        device=device,
    )


def _accumulation(o: DictConfig, positions: range, batch: int) -> int:
    """``method.optim.accumulate`` (default 1), which must divide this rank's share of the batch."""
    from bench import distributed as dist

    accumulate = int(o.get("accumulate", 1) or 1)
    if accumulate < 1 or len(positions) % accumulate:
        raise BenchError(
            f"method.optim.accumulate={accumulate} does not divide this rank's batch of {len(positions)}",
            f"use a divisor of {len(positions)} (global batch {batch} / {dist.world_size()} rank(s))",
        )
    return accumulate


def _examples_of(distiller: Distiller, data, sampler: ViewSampler, batch: int, last_batch: str):
    """``examples(step)``: this rank's prepared examples of step ``step`` (runs in a loader worker)."""

    def examples(step: int):
        out = []
        for i in step_share(step, batch, sampler.epoch_size, last_batch):
            s, idx = sampler.example(i)
            out.append(distiller.prepare(data.load_views(data.scene_ids[s], idx)))  # + SLIC here, off the step
        return out

    return examples


def build_training(backbone, cfg: DictConfig, workdir: Path, device: str):
    """Everything a run needs: ``(distiller, data, sampler, loop, step_fn)``.

    ``method.optim.batch_size`` is the global batch of a step; each rank (``torchrun`` / SLURM tasks)
    takes its consecutive share of it (:mod:`bench.distributed`), read ahead by a
    :class:`bench.loader.StepLoader` (``loader.workers`` processes, ``loader.prefetch`` steps each).
    """
    from bench import distributed as dist
    from bench.loader import StepLoader, resolve_workers

    m = cfg.method
    last_batch = choice("method.views.last_batch", m.views.last_batch, LAST_BATCHES)  # before any work
    with dist.main_first():  # rank 0 generates a synthetic set once; the others then read it
        data = open_scenes(m.data, cfg.paths.data_dir, keep_bad=bool(m.views.keep_bad))
    sampler = _new_sampler(m, data, int(cfg.seed))
    distiller = _new_distiller(backbone, cfg, device)
    dist.seed_offset(int(cfg.seed))  # identical set-up on every rank, then per-rank dropout streams
    loop = _train_loop(distiller, sampler, m, workdir, device)
    batch = int(m.optim.batch_size)
    positions = dist.rank_slice(batch)
    distiller.deviations = mask_deviations(distiller, data)
    distiller.accumulate = accumulate = _accumulation(m.optim, positions, batch)
    loader = StepLoader(
        _examples_of(distiller, data, sampler, batch, last_batch),
        int(m.optim.steps),
        resolve_workers(cfg.loader.workers),
        int(cfg.loader.prefetch),
        pin_memory=str(device).startswith("cuda"),
    )

    def step_fn(step: int):
        return distiller.loss(loader.get(step), accumulate)

    step_fn.loader = loader
    return distiller, data, sampler, loop, step_fn


def step_share(step: int, batch: int, epoch_size: int, last_batch: str) -> range:
    """This rank's run-wide example indices of step ``step``: its :func:`~.views.rank_share` of the step's
    :func:`~.views.step_examples` (``views.last_batch: smaller``, official: an epoch's last step holds the
    ``epoch_size mod batch`` examples left, split over the ranks as evenly as possible; a rank may get none and
    still joins the step's collectives, :meth:`Distiller.loss`)."""
    from bench import distributed as dist

    idx = step_examples(step, batch, epoch_size, last_batch)
    share = rank_share(len(idx), dist.rank(), dist.world_size())
    return idx[share.start : share.stop]


def mask_deviations(distiller, data) -> dict:
    """Named deviations of the segment masks: ``lift.masks: auto`` on scenes without instance maps uses
    SLIC superpixels (the official trainer reads ``instance_segmentation/``); said once in the log."""
    if distiller.mask_source != "auto":
        return {}
    missing = [s for s in data.scene_ids if not data.has(s, "instance")]
    if not missing:
        return {}
    log.warning(
        "splat_distill: %d of %d training scenes have no instance maps (e.g. %s): their segment masks are SLIC "
        "superpixels (method.lift.masks=auto), not the official instance_segmentation/ masks; computed by the "
        "data loader, recorded as deviation 'slic_masks'",
        len(missing),
        len(data.scene_ids),
        missing[0],
    )
    return {
        "slic_masks": {
            "key": "method.lift.masks",
            "anchor": "instance",
            "value": "slic",
            "scenes": len(missing),
            "why": "scenes without instance maps (instance_segmentation/ or render_instance/): SLIC superpixels",
        }
    }


def matmul_precision(cfg, device: str) -> str:
    """The official trainer's float32 matmul precision (``torch.set_float32_matmul_precision('high')``,
    Splat-and-Distill ``src/main.py``): TF32 on CUDA for ``precision: 32`` and ``bf16-mixed``;
    ``precision: 32-true`` keeps full float32. Returns the record's name of the training precision."""
    p = str(cfg.precision)
    if not str(device).startswith("cuda"):
        return p
    if p == "32-true":
        torch.set_float32_matmul_precision("highest")
        return "32-true"
    torch.set_float32_matmul_precision("high")
    return "tf32" if p in ("32", "fp32") else f"{p}+tf32"


def distiller_size(m, data):
    """``(H, W)`` of the training views."""
    if m.data.size is not None:
        return [int(s) for s in m.data.size]
    v = data.load_views(data.scene_ids[0], [0])
    return list(v["images"].shape[-2:])


@METHODS.register(
    "splat_distill",
    "Splat-and-Distill: EMA teacher features lifted onto feed-forward Gaussians, "
    "splatted into a target view, distilled into a LoRA student (trains)",
)
class SplatDistill:
    """Train a backbone with Splat-and-Distill; resumable from ``workdir``.

    Returns the student backbone with LoRA merged (plain timm weights in ``backbone.model``).
    ``stop_after`` (not a config key) ends this invocation after that many steps (after a checkpoint):
    the next call with the same workdir continues.
    """

    trains = True

    @staticmethod
    def check_inputs(cfg: DictConfig) -> None:
        """Preflight: the reconstructor's checkpoint (mvsplat / learned) is given and exists."""
        from .official import check_inputs

        check_inputs(cfg)

    @staticmethod
    def deviations(cfg: DictConfig):
        """The named deviations from the official rules in force (a record's ``method_deviations``)."""
        from bench.config import to_container

        from .official import deviations

        return deviations(to_container(cfg.method))

    def fit(self, backbone, cfg: DictConfig, workdir: Path, stop_after: Optional[int] = None):
        device = start_run(cfg)
        workdir = Path(workdir)
        before = torch.get_float32_matmul_precision()
        precision = matmul_precision(cfg, device)
        try:
            return self._fit(backbone, cfg, workdir, stop_after, device, precision)
        finally:
            torch.set_float32_matmul_precision(before)  # evaluation keeps the process's own setting

    def _fit(self, backbone, cfg: DictConfig, workdir: Path, stop_after, device: str, precision: str):
        from bench.diagnostics import Diagnostics

        distiller, data, _, loop, step_fn = build_training(backbone, cfg, workdir, device)
        from bench import distributed as dist

        H, W = (int(x) for x in distiller_size(cfg.method, data))
        grid = distiller.student_grid(H, W)
        log.info(
            "splat_distill: %d scenes, %d steps x global batch %d (%d rank(s) x %d), %s, device %s, "
            "precision %s, %dx%d views -> student grid %dx%d",
            len(data.scene_ids),
            loop.total_steps,
            int(cfg.method.optim.batch_size),
            dist.world_size(),
            dist.per_rank_batch(int(cfg.method.optim.batch_size)),
            cfg.method.reconstructor.name,
            device,
            distiller.precision,
            H,
            W,
            *grid,
        )
        with dist.main_first():  # rank 0 generates the held-out diagnostics set once
            diag = Diagnostics(cfg.method, (H, W), cfg.paths.data_dir, device)
            diag.start(distiller.backbone, distiller.initial_weights)
        log_every = max(int(cfg.method.log_every), 1)

        def logged_step(step: int):
            loss, extra = step_fn(step)
            if loop.main and ((step + 1) % log_every == 0 or step == 0):
                log.info(
                    "splat_distill step %d/%d: ce %.5f %s",
                    step + 1,
                    loop.total_steps,
                    float(loss.detach()),
                    " ".join(f"{k} {v:.4g}" for k, v in extra.items()),
                )
            return loss, extra

        history = loop.run(logged_step, after_step=distiller.update_teacher, stop_after=stop_after)
        step_fn.loader.close()
        out = distiller.finish(str(cfg.method.export))
        sd = out.model.state_dict()
        curves = ("loss", "kl", "head_cos", *COLLAPSE_KEYS)
        result = diag.finish(out, {k: sd[k] for k in distiller.initial_weights}, history, curves)
        result["student_grid"] = list(grid)
        self.train_info = {
            "diagnostics": result,
            "training": {
                "precision": precision,
                "accumulate": distiller.accumulate,
                "micro_batch": dist.per_rank_batch(int(cfg.method.optim.batch_size)) // distiller.accumulate,
                "deviations": distiller.deviations,
            },
        }
        if loop.main:  # rank 0 alone writes
            write_json(workdir / "history.json", history)
            write_json(workdir / "diagnostics.json", result)
        return out
