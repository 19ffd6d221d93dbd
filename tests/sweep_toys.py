"""Toy method and tasks for the sweep/SLURM tests (real code paths, seconds of CPU).

* method ``toy_train`` (``trains=True``): fits the tiny backbone's features to a fixed random target
  with SGD through :class:`bench.train.TrainLoop`, one checkpoint per step (exact resume), an
  optional ``sleep_s`` per step so that tests can interrupt it mid-way.
* task ``toy_probe``: mean/std of the backbone's features on fixed random images.
* task ``toy_fail``: raises, to check that one failing cell does not stop the others.

Select them over packaged configs: ``method.name=toy_train +method.steps=4 +method.lr=0.5
+method.sleep_s=0`` and ``task.name=toy_probe``. Sweep jobs import this module by file (it is named
in the plan's plugins), where it registers at import; the test process calls :func:`register` /
:func:`unregister` so other tests never see the toys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import schema
from bench.registry import METHOD_SCHEMAS, METHODS, TASKS


@dataclass
class ToyTrainSchema:
    """``method.*`` of toy_train (registered in bench.registry.METHOD_SCHEMAS): optional keys on top of any packaged
    method config."""

    name: str = schema.REQ
    steps: int = 4
    lr: float = 0.5
    sleep_s: float = 0.0


class ToyTrain:
    trains = True

    def fit(self, backbone, cfg, workdir: Path):
        from bench.train import TrainLoop

        torch.set_num_threads(1)  # bit-identical weights in any process
        m = cfg.method
        g = torch.Generator().manual_seed(int(cfg.seed))
        images = torch.rand(2, 3, 28, 28, generator=g)
        with torch.no_grad():
            target = torch.randn(backbone(images).shape, generator=g)
        opt = torch.optim.SGD(backbone.parameters(), lr=float(m.get("lr", 0.5)), momentum=0.9)
        loop = TrainLoop(
            workdir,
            total_steps=int(m.get("steps", 4)),
            optimizer=opt,
            state={"model": backbone},
            ckpt_every=1,
            keep_last=2,
            progress=False,
        )

        def step(i: int):
            time.sleep(float(m.get("sleep_s", 0)))
            return ((backbone(images) - target) ** 2).mean()

        loop.run(step)
        return backbone


class ToyProbe:
    def evaluate(self, backbone, cfg, workdir: Path):
        g = torch.Generator().manual_seed(int(cfg.seed))
        with torch.no_grad():
            f = backbone(torch.rand(2, 3, 28, 28, generator=g))
        return {"feat_mean": float(f.mean()), "feat_std": float(f.std())}


class ToyFail:
    def evaluate(self, backbone, cfg, workdir: Path):
        raise RuntimeError("toy_fail fails on purpose")


_ENTRIES = [
    (METHODS, "toy_train", ToyTrain, "toy: tiny deterministic resumable training (tests)"),
    (TASKS, "toy_probe", ToyProbe, "toy: feature statistics (tests)"),
    (TASKS, "toy_fail", ToyFail, "toy: always raises (tests)"),
    (METHOD_SCHEMAS, "toy_train", ToyTrainSchema, "toy: keys of toy_train (tests)"),
]


def register() -> None:
    for reg, name, obj, desc in _ENTRIES:
        reg.register(name, desc)(obj)


def unregister() -> None:
    for reg, name, _, _ in _ENTRIES:
        reg._entries.pop(name, None)  # test-only: keep the shared registries clean for other tests


register()
