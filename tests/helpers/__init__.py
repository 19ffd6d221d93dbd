"""Helpers shared by the test modules (plain functions; the fixtures are in tests/conftest.py).

* :func:`path_overrides`: every ``paths.*`` key of a cell under one temporary directory.
* :func:`tiny_cell` / :func:`toy_sweep`: the tiny synthetic cell and the toy sweep cell (tests/sweep_toys.py)
  that the sweep, SLURM and feature-refresh tests plan.
* :func:`sweep_args`: the parsed arguments of ``bench sweep``.
* :func:`run_bench` / :func:`run_env`: ``python -m bench ...`` in a subprocess that imports this checkout.
* :func:`snd_tiny` / :func:`mef_tiny` / :func:`fit3d_tiny`: Splat-and-Distill, MEF and FiT3D shrunk to seconds on CPU (the ``snd_scenes``
  fixture generates the synthetic rooms of ``snd_tiny`` once a session).
* ``PROBE_SCHEDULE_NEUTRAL`` / ``TINY_SEG_LINEAR``: a probe schedule's remaining keys at neutral values, and the
  linear segmentation protocol shrunk to 32-pixel crops and 2 iterations.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


def path_overrides(tmp, *, root: bool = True, data=None, cache=None, outputs: str = "outputs") -> list:
    """``paths.*`` under ``tmp`` (every one explicit, so BENCH_* variables of the environment do not leak in):
    root (unless ``root=False``), ``data``, ``results``, ``outputs`` and ``cache``; ``data``/``cache`` name
    other directories where given."""
    return [
        *([f"paths.root={tmp}"] if root else []),
        f"paths.data_dir={data or f'{tmp}/data'}",
        f"paths.results_dir={tmp}/results",
        f"paths.output_dir={tmp}/{outputs}",
        f"paths.cache_dir={cache or f'{tmp}/cache'}",
    ]


def tiny_cell(tmp) -> list:
    """tiny_vit on the synthetic correspondence task, every path under ``tmp``."""
    return ["backbone=tiny_vit", "task=synth_corr", *path_overrides(tmp)]


def toy_sweep(tmp, *extra: str) -> list:
    """A tiny sweep cell for the toy methods and tasks (tests/sweep_toys.py: the ``toys`` fixture): 2 toy
    training steps that do not sleep, the sweep's folder under ``tmp``, then ``extra``."""
    return [*tiny_cell(tmp), "+method.steps=2", "+method.sleep_s=0", f"cluster.folder={tmp}/sweep", *extra]


def sweep_args(*argv: str) -> argparse.Namespace:
    """``bench sweep``'s parsed command line."""
    from bench import sweep

    p = argparse.ArgumentParser()
    sweep.add_arguments(p)
    return p.parse_args(list(argv))


def run_env(**extra: str) -> dict:
    """The environment of a subprocess that imports this checkout: the inherited one, PYTHONPATH, ``extra``."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_bench(*argv: str, cwd=ROOT, timeout: Optional[float] = 300, env: Optional[dict] = None):
    """``python -m bench *argv`` in a subprocess importing this checkout (PYTHONPATH); its CompletedProcess
    with text stdout/stderr. ``env`` adds to (or overrides) the inherited environment."""
    return subprocess.run(
        [sys.executable, "-m", "bench", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=run_env(**(env or {})),
    )


# --- Splat-and-Distill and MEF, tiny ----------------------------------------------------------------------------
#: the synthetic rooms of snd_tiny: tiny_vit (patch 14) sees a 4x5 grid
SND_SIZE, SND_SCENES, SND_VIEWS, SND_SEED = (56, 70), 3, 10, 0


def snd_tiny(root, prototypes: int = 128, hidden: int = 128, bottleneck: int = 32) -> list:
    """Splat-and-Distill on tiny_vit (CPU) over the synthetic rooms at ``root`` (the ``snd_scenes`` fixture): a
    small head, batches of 2, a fast teacher; no progress bar. Callers add steps, checkpoints and deviations."""
    return [
        "method=splat_distill",
        "backbone=tiny_vit",
        "device=cpu",
        "method.data.dataset=synthetic",
        f"method.data.root={root}",
        f"method.data.scenes={SND_SCENES}",
        f"method.data.views={SND_VIEWS}",
        f"method.data.size=[{SND_SIZE[0]},{SND_SIZE[1]}]",
        f"method.data.seed={SND_SEED}",
        "method.views.gap=4",
        f"method.head.prototypes={prototypes}",
        f"method.head.hidden_dim={hidden}",
        f"method.head.bottleneck_dim={bottleneck}",
        "method.optim.batch_size=2",
        "method.optim.lr=2e-3",
        "method.teacher.every=1",
        "method.teacher.momentum=0.9",
        "method.progress=false",
    ]


def mef_tiny(tmp, backbone: str = "tiny_vit") -> list:
    """MEF on CPU over 3 synthetic objects x 8 views of 48x48 generated under ``tmp``/data, 300 points a pair."""
    return [
        f"backbone={backbone}",
        "method=mef",
        "device=cpu",
        f"paths.data_dir={tmp}/data",
        "method.data.dataset=synthetic",
        "method.data.root=null",
        "method.data.objects=3",
        "method.data.views=8",
        "method.data.size=[48,48]",
        "method.points=300",
        "method.progress=false",
        "method.optim.lr=1e-3",
        "method.ckpt_every=3",
    ]


def fit3d_tiny(tmp, root: bool = True, cache=None) -> list:
    """FiT3D on tiny_vit (CPU, seed 0, no progress bar) for synth_depth, every path under ``tmp`` and the
    synthetic scenes of stage 1 at ``tmp``/scenes. Callers size the scenes and the stages."""
    return [
        "method=fit3d",
        "backbone=tiny_vit",
        "task=synth_depth",
        "device=cpu",
        "seed=0",
        *path_overrides(tmp, root=root, cache=cache),
        "method.progress=false",
        "method.data.dataset=synthetic",
        f"method.data.root={tmp}/scenes",
    ]


# --- dense probes, tiny -----------------------------------------------------------------------------------------
#: the schedule keys every protocol states (tasks.train_probe.REQUIRED), at neutral values
PROBE_SCHEDULE_NEUTRAL = {
    "weight_decay": 0.01,
    "betas": [0.9, 0.999],
    "decay": "cosine",
    "shape": "sequential",
    "warmup_start": 0.01,
    "min_factor": 0.0,
    "shuffle": True,
}


def resolved_protocol(*overrides: str) -> dict:
    """The probe protocol that the composed config of ``overrides`` resolves to (tasks.dense.resolve_protocol)."""
    from bench.config import compose
    from tasks.dense import resolve_protocol

    return resolve_protocol(compose(list(overrides)))


#: the linear segmentation protocol on 40-pixel images: 4 classes, 32-pixel crops and sliding windows, 2 iterations
TINY_SEG_LINEAR = [
    "task.dataset.num_classes=4",
    "task.protocols.linear.train.resize_short=40",
    "task.protocols.linear.train.crop=[32,32]",
    "task.protocols.linear.test.resize_short=40",
    "task.protocols.linear.test.sliding.window=32",
    "task.protocols.linear.test.sliding.stride=16",
    "task.protocols.linear.schedule.iters=2",
    "task.protocols.linear.schedule.warmup_iters=1",
    "task.protocols.linear.schedule.batch_size=2",
]
