"""bench.train: schedule, EMA, RNG states, atomic checkpoints, exact resume, NaN stop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from bench.errors import CheckpointError, NonFiniteLossError
from bench.train import EMA, Checkpointer, TrainLoop, one_cycle_cosine, one_cycle_factor, rng_state, set_rng_state


@pytest.mark.parametrize("total", [1000, 150, 37])
def test_one_cycle_matches_torch_onecycle(total):
    p = nn.Parameter(torch.zeros(1))
    ours = torch.optim.SGD([p], lr=2e-5)
    sched = one_cycle_cosine(ours, total, pct_start=0.01)
    if total * 0.01 - 1 > 0:  # torch's OneCycleLR divides by zero for shorter runs; ours starts at the peak
        ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-5)
        ref = torch.optim.lr_scheduler.OneCycleLR(
            ref_opt, 2e-5, total_steps=total, pct_start=0.01, cycle_momentum=False, anneal_strategy="cos"
        )
    else:
        ref = None
    for step in range(total):
        lr = ours.param_groups[0]["lr"]
        if ref is not None:
            assert lr == pytest.approx(ref.get_last_lr()[0], rel=1e-9, abs=1e-15)
            ref.optimizer.step()
            ref.step()
        ours.step()
        sched.step()
    # hand values: starts at peak/25 (or the peak without warm-up), ends at peak/(25*1e4)
    assert one_cycle_factor(0, 1000) == pytest.approx(1 / 25)
    assert one_cycle_factor(9, 1000) == pytest.approx(1.0)
    assert one_cycle_factor(999, 1000) == pytest.approx(1 / 25e4)
    assert one_cycle_factor(0, 50) == pytest.approx(1.0)


def test_ema_update_math_and_interval():
    target, source = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.fill_(1.0)
        target.bias.fill_(0.0)
        source.weight.fill_(3.0)
        source.bias.fill_(2.0)
    ema = EMA(target, momentum=0.75, every=10)
    assert not ema.update(5, source.state_dict())
    assert torch.equal(target.weight, torch.ones(1, 2))
    assert ema.update(10, source.state_dict())
    assert torch.allclose(target.weight, torch.full((1, 2), 0.75 * 1 + 0.25 * 3))
    assert torch.allclose(target.bias, torch.full((1,), 0.25 * 2))
    assert not target.weight.requires_grad
    frozen = EMA(nn.Linear(2, 1), momentum=1.0)
    before = {k: v.clone() for k, v in frozen.target.state_dict().items()}
    frozen.update(1, source.state_dict())
    assert all(torch.equal(before[k], v) for k, v in frozen.target.state_dict().items())


def test_rng_roundtrip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpointer_atomic_keep_last(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep_last=2)
    assert ck.latest() is None
    for s in (1, 2, 3):
        ck.save(s, {"step": s, "w": torch.full((2,), float(s))})
    assert ck.steps() == [2, 3] and ck.latest().name == "ckpt_00000003.pt"
    assert not list((tmp_path / "ck").glob("*.tmp"))
    assert torch.equal(ck.load(ck.latest())["w"], torch.full((2,), 3.0))


class _Sampler:
    """A data sampler with state: draws indices from its own generator."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def next(self):
        return int(torch.randint(0, 64, (1,), generator=self.g))

    def state_dict(self):
        return {"g": self.g.get_state()}

    def load_state_dict(self, s):
        self.g.set_state(s["g"])


def _toy_run(workdir, stop_after=None, total=12, nan_at=None):
    torch.manual_seed(0)
    data_x = torch.randn(64, 4)
    data_y = data_x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    teacher.load_state_dict(model.state_dict())
    ema = EMA(teacher, momentum=0.9, every=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = one_cycle_cosine(opt, total, pct_start=0.2)
    sampler = _Sampler(1)

    def step_fn(step):
        i = torch.tensor([sampler.next() for _ in range(8)])
        loss = ((model(data_x[i]).squeeze(-1) - data_y[i]) ** 2).mean()
        if nan_at is not None and step == nan_at:
            loss = loss * float("nan")
        return loss, {"n": float(len(i))}

    loop = TrainLoop(
        workdir,
        total,
        opt,
        {"model": model, "ema": ema, "sampler": sampler},
        scheduler=sched,
        ckpt_every=5,
        keep_last=2,
        grad_clip=1.0,
        progress=False,
    )
    hist = loop.run(step_fn, after_step=lambda s: ema.update(s, model.state_dict()), stop_after=stop_after)
    return model, teacher, hist, loop


def test_exact_resume_is_bit_identical(tmp_path):
    full_model, full_teacher, full_hist, _ = _toy_run(tmp_path / "full")
    _toy_run(tmp_path / "cut", stop_after=7)  # "interrupted" after step 7 (checkpoint at 7)
    m2, t2, h2, loop = _toy_run(tmp_path / "cut")
    assert [h["loss"] for h in h2] == [h["loss"] for h in full_hist]
    for a, b in zip(full_model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full_teacher.state_dict().values(), t2.state_dict().values()):
        assert torch.equal(a, b)
    assert full_hist[-1]["loss"] < full_hist[0]["loss"]
    assert loop.checkpointer.steps() == [10, 12]


def test_resume_from_older_checkpoint(tmp_path):
    full_model, *_ = _toy_run(tmp_path / "full")
    _toy_run(tmp_path / "cut", stop_after=7)
    Checkpointer(tmp_path / "cut").path(7).unlink()  # crash between checkpoints: resume from step 5
    m2, *_ = _toy_run(tmp_path / "cut")
    for a, b in zip(full_model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_refuses_a_different_run(tmp_path):
    _toy_run(tmp_path / "a", stop_after=5)
    with pytest.raises(CheckpointError, match="different run"):
        _toy_run(tmp_path / "a", total=20)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        _toy_run(tmp_path / "nan", nan_at=7)
    assert "step 8" in str(e.value) and "ckpt_00000005.pt" in str(e.value)
    ck = Checkpointer(tmp_path / "nan")
    assert ck.steps() == [5]
    state = ck.load(ck.latest())
    assert all(torch.isfinite(v).all() for v in state["state"]["model"].values())
