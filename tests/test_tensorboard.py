"""TensorBoard curves (the ``[tb]`` extra, ``pip install -e ".[tb]"``): a probe trained with a kept workdir
writes its windows (loss, lr, throughput) as TensorBoard scalars, the same numbers as its metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.train_probe import train_probe

pytest.importorskip("tensorboard", reason='TensorBoard is an extra: pip install -e ".[tb]"')


def test_probe_curves_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    g = torch.Generator().manual_seed(3)
    data = [{"x": torch.randn(4, generator=g), "y": torch.randn(2, generator=g)} for _ in range(8)]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    sched = {"iters": 12, "batch_size": 4, "lr": 5e-2, "decay": "poly", "power": 1.0, "log_every": 3}
    train_probe(
        model,
        data,
        lambda b: ((model(b["x"]) - b["y"]) ** 2).mean(),
        sched,
        seed=1,
        progress=False,
        desc="toy probe",
        workdir=tmp_path / "probe",
    )
    windows = [json.loads(line) for line in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    assert [w["step"] for w in windows] == [3, 6, 9, 12]
    events = EventAccumulator(str(tmp_path / "probe" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("toy probe/loss")
    assert [e.step for e in loss] == [3, 6, 9, 12]
    assert [e.value for e in loss] == pytest.approx([w["loss"] for w in windows], rel=1e-6)
    assert loss[-1].value < loss[0].value  # the probe learns
    assert "toy probe/lr" in events.Tags()["scalars"]


def test_no_tensorboard_without_a_kept_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(4, 2)
    data = [{"x": torch.randn(4), "y": torch.randn(2)} for _ in range(4)]
    train_probe(model, data, lambda b: ((model(b["x"]) - b["y"]) ** 2).mean(), {"iters": 2, "batch_size": 2}, seed=0)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
