"""Probe training is resumable (issue 15 item 5): an interrupted probe, resumed, ends bit-identical.

The probe trainer runs through :class:`bench.train.TrainLoop`; a run cut after k steps (``stop_after``,
or a crash after the step-k checkpoint, as a SLURM time-out kills a job) and restarted with the same
workdir must end with exactly the weights, losses and metrics of an uninterrupted run.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.config import compose
from bench.registry import TASKS
from bench.seed import seed_everything
from tasks.losses import SigLoss
from tasks.train_probe import EpochBatches, make_loader, train_probe

SCHED = {
    "iters": 11,
    "batch_size": 3,
    "lr": 5e-2,
    "warmup_iters": 3,
    "decay": "cosine",
    "shape": "mmcv",
    "momentum": "onecycle",
    "grad_clip": 0.5,
    "warmup_start": 0.01,
    "min_factor": 0.0,
    "weight_decay": 0.01,
    "betas": [0.9, 0.999],
    "shuffle": True,
    "ckpt_every": 2,
}


def _data(n=8):
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(4, generator=g), "y": torch.randn(2, generator=g)} for _ in range(n)]


def _toy(workdir, stop_after=None, crash_at=None, sched=SCHED):
    """A linear probe with a BatchNorm, dropout (global RNG) and a stateful SigLoss-style counter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.3), torch.nn.Linear(4, 2))
    counter = SigLoss(warm_up=True, warm_iter=5)
    seen = []

    def step_loss(batch):
        if crash_at is not None and len(seen) == crash_at:
            raise RuntimeError("killed")  # a time-out: the process dies mid-run
        seen.append(batch["x"][:, 0].tolist())
        pred = model(batch["x"])
        warm = 1.0 if counter.warm_up and counter.counter < counter.warm_iter else 2.0
        if warm == 1.0:
            counter.counter += 1
        return warm * ((pred - batch["y"]) ** 2).mean()

    info = train_probe(
        model,
        _data(),
        step_loss,
        sched,
        seed=5,
        progress=False,
        workdir=workdir,
        stop_after=stop_after,
        loss_state={"sig": counter},
    )
    return model, info, counter, seen


def test_epoch_batches_draw_the_same_order_as_the_plain_loader():
    data = list(range(10))
    for shuffle, drop_last in ((True, False), (True, True), (False, False)):
        plain = make_loader(data, 3, seed=7, shuffle=shuffle, drop_last=drop_last)
        want = [b.tolist() for _ in range(3) for b in plain]
        eb = EpochBatches(data, 3, seed=7, shuffle=shuffle, drop_last=drop_last)
        got = [eb.next().tolist() for _ in range(len(want))]
        assert got == want and len(eb) == len(plain)


def test_epoch_batches_resume_mid_epoch_and_at_the_epoch_end():
    data = list(range(8))
    full = EpochBatches(data, 3, seed=1)
    want = [full.next().tolist() for _ in range(9)]  # 3 epochs of 3 batches
    for cut in (2, 3, 5):
        a = EpochBatches(data, 3, seed=1)
        head = [a.next().tolist() for _ in range(cut)]
        b = EpochBatches(data, 3, seed=123)  # another seed: everything comes from the state
        b.load_state_dict(a.state_dict())
        assert head + [b.next().tolist() for _ in range(9 - cut)] == want


def test_interrupted_probe_resumes_bit_identically(tmp_path):
    full, info_full, c_full, seen_full = _toy(tmp_path / "full")
    part, info_part, _, _ = _toy(tmp_path / "cut", stop_after=4)
    assert info_part["steps"] == 4 and info_part["total_steps"] == 11
    assert (tmp_path / "cut" / "ckpt_00000004.pt").exists()  # the checkpoint of the cut, in the workdir
    res, info_res, c_res, seen_res = _toy(tmp_path / "cut")
    assert seen_res == seen_full[4:]  # same batches after the resume, none repeated
    assert info_res["losses"] == info_full["losses"]  # the whole curve, incl. steps before the cut
    assert info_res["final_loss"] == info_full["final_loss"] and info_res["steps"] == 11
    assert c_res.counter == c_full.counter == 5
    for (k, a), b in zip(full.state_dict().items(), res.state_dict().values()):
        assert torch.equal(a, b), k  # weights and BatchNorm statistics, bitwise


def test_probe_killed_after_a_checkpoint_resumes_from_it(tmp_path):
    full, info_full, _, _ = _toy(tmp_path / "full")
    with pytest.raises(RuntimeError, match="killed"):
        _toy(tmp_path / "crash", crash_at=7)  # dies in step 8; last checkpoint: step 6
    assert sorted(p.name for p in (tmp_path / "crash").glob("ckpt_*.pt")) == ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    res, info_res, _, seen = _toy(tmp_path / "crash")
    assert len(seen) == 5 and info_res["losses"] == info_full["losses"]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), res.state_dict().values()))


def test_a_checkpoint_of_another_schedule_is_refused(tmp_path):
    from bench.errors import CheckpointError

    _toy(tmp_path / "w", stop_after=2)
    with pytest.raises(CheckpointError, match="different run"):
        _toy(tmp_path / "w", sched={**SCHED, "iters": 12})


SYNTH = [
    "task.dataset.scenes=2",
    "task.dataset.views=4",
    "task.dataset.size=48",
    "task.dataset.held_out=1",
    "task.progress=false",
    "backbone=tiny_cnn",
    "task.protocols.linear.schedule.epochs=4",
    "task.protocols.linear.schedule.batch_size=3",
    "task.protocols.linear.schedule.samples_per_gpu=1",  # 3 loss groups per step (SigLoss per image)
    "task.protocols.linear.loss.warm_up=true",
    "task.protocols.linear.loss.warm_iter=3",
    "+task.protocols.linear.schedule.ckpt_every=2",
]


@pytest.mark.slow
def test_dense_task_probe_resumes_to_the_same_metrics(tmp_path):
    """synth_depth through DenseTask.evaluate: cut after 3 steps, resumed, equals the uninterrupted run."""
    from bench.backbones import build_backbone

    def run(cache, work, stop_after=None):
        cfg = compose(
            ["task=synth_depth", f"paths.data_dir={tmp_path}/data", f"paths.cache_dir={tmp_path}/{cache}", *SYNTH]
        )
        seed_everything(0)
        bb = build_backbone(cfg.backbone).eval()
        seed_everything(0)
        return TASKS.get("synth_depth")().evaluate(bb, cfg, tmp_path / work, stop_after=stop_after)

    full = run("c1", "full")
    assert run("c2", "cut", stop_after=3) is None and not (tmp_path / "cut" / "metrics.json").exists()
    ckpts = list((tmp_path / "c2" / "probes").glob("synth_depth-*/ckpt_00000003.pt"))
    assert len(ckpts) == 1  # the cell's probe directory holds the checkpoint
    resumed = run("c2", "cut")  # a new process would start here (requeue)
    assert resumed == full  # every metric, to the last bit
    a, b = (json.loads((tmp_path / w / "metrics.json").read_text()) for w in ("full", "cut"))
    assert a["loss_curve"] == b["loss_curve"] and a["train"] == b["train"]
    from safetensors.torch import load_file

    pa, pb = (load_file(str(tmp_path / w / "probe.safetensors")) for w in ("full", "cut"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not ckpts[0].parent.exists() and (tmp_path / "cut" / "probe_history.jsonl").exists()


@pytest.mark.slow
def test_checkpoint_cadence_and_array_shards_leave_fingerprints_alone(tmp_path):
    from bench.identity import cell_identity
    from bench.runner import backbone_dir

    base = [
        "task=synth_depth",
        "method=fit3d",
        f"paths.root={tmp_path}",
        f"paths.data_dir={tmp_path}/data",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.output_dir={tmp_path}/out",
    ]
    ref = cell_identity(compose(base))
    for extra in (
        [
            "+task.protocols.linear.schedule.ckpt_every=3",
            "+task.protocols.linear.schedule.keep_last=1",
            "+task.protocols.linear.schedule.log_every=7",
        ],
        ["cluster.stage1_per_task=4"],
    ):
        cfg = compose(base + extra)
        assert cell_identity(cfg)["cell"] == ref["cell"] and cell_identity(cfg)["row"] == ref["row"]
        assert backbone_dir(cfg).name == backbone_dir(compose(base)).name
