"""Data-parallel training on CPU (gloo, torchrun): 2 ranks x batch 1 == 1 process x batch 2, exact resume of a
2-rank run, rank 0 alone writes; plus the pieces (gradient all-reduce, pooled-mean weighting, step loader)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.config import compose
from bench.loader import StepLoader
from methods.splat_distill.official import CPU_DEVIATIONS
from methods.splat_distill.views import ViewSampler

ROOT = Path(__file__).resolve().parents[1]
SIZE, SCENES, VIEWS = (56, 70), 3, 10
#: float tolerance of "same weights": per-example gradients summed in another order (ranks vs one batch)
ATOL = 1e-5


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from bench.data.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("dist") / "synth", SCENES, VIEWS, SIZE, 0)


def _overrides(root, steps=4):
    return [
        "method=splat_distill",
        "backbone=tiny_vit",
        "device=cpu",
        "method.data.dataset=synthetic",
        f"method.data.root={root}",
        f"method.data.scenes={SCENES}",
        f"method.data.views={VIEWS}",
        f"method.data.size=[{SIZE[0]},{SIZE[1]}]",
        "method.data.seed=0",
        "method.views.gap=4",
        "method.head.prototypes=64",
        "method.head.hidden_dim=64",
        "method.head.bottleneck_dim=16",
        "method.optim.batch_size=2",
        "method.optim.lr=2e-3",
        "method.teacher.every=1",
        "method.teacher.momentum=0.9",
        "method.progress=false",
        f"method.optim.steps={steps}",
        "method.ckpt_every=2",
        "method.log_every=2",
        "method.lift.slic_segments=16",
        "method.adapter.dropout=0.0",  # stochastic layers draw per-rank streams: equality needs none
        "loader.workers=0",
        *CPU_DEVIATIONS,
    ]


def _torchrun(workdir, out, stop_after, overrides, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "tests" / "dist_snd.py"),
        str(workdir),
        str(out),
        str(stop_after),
        *overrides,
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    writes = [json.loads(line[len("WRITES ") :]) for line in p.stdout.splitlines() if line.startswith("WRITES ")]
    assert len(writes) == nproc - 1, p.stdout[-2000:]
    return writes


def _single(workdir, overrides, stop_after=None):
    from bench.backbones import build_backbone
    from bench.seed import seed_everything
    from methods.splat_distill import SplatDistill

    cfg = compose(overrides)
    seed_everything(0)
    return SplatDistill().fit(build_backbone(cfg.backbone), cfg, workdir, stop_after=stop_after).model.state_dict()


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_exactly(scenes, tmp_path):
    ov = _overrides(scenes)
    one = _single(tmp_path / "one", [*ov, "loader.workers=1"])  # 1 process, global batch 2, a loader worker

    writes = _torchrun(tmp_path / "two", tmp_path / "two.pt", 0, ov)
    two = torch.load(tmp_path / "two.pt")
    assert writes == [[]]  # rank 1 created, wrote, renamed or deleted nothing
    assert one.keys() == two.keys()
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - v).abs().max()) for k, v in _initial(ov).items())
    assert diff < ATOL and moved > 10 * diff, (diff, moved)  # training moved the weights far more than that

    # interrupted after the step-2 checkpoint, resumed: equal to the uninterrupted 2-rank run
    assert _torchrun(tmp_path / "cut", tmp_path / "cut_a.pt", 2, ov) == [[]]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["ckpt_00000002.pt"]
    assert _torchrun(tmp_path / "cut", tmp_path / "cut.pt", 0, ov) == [[]]
    cut = torch.load(tmp_path / "cut.pt")
    assert all(torch.equal(cut[k], two[k]) for k in two)
    ha = [json.loads(x) for x in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hb] == [1, 2, 3, 4] and [h["loss"] for h in ha] == [h["loss"] for h in hb]
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in ha], rel=1e-4)  # the global batch's loss
    metrics = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4] and all(m["ranks"] == 2 and m["images_per_s"] > 0 for m in metrics)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "ckpt_00000004.pt", weights_only=True)
    assert "history" not in ckpt and len(ckpt["rng_ranks"]) == 2 and ckpt["fingerprint"]["world_size"] == 2


@pytest.mark.slow
def test_mef_two_ranks_equal_one_process(tmp_path):
    """MEF data-parallel: 2 ranks x 1 object pair == 1 process x 2 pairs (the pooled-positives mean re-weighted
    per rank), rank 1 writes nothing."""
    from bench.backbones import build_backbone
    from bench.seed import seed_everything
    from methods.mef import MEF

    ov = [
        "method=mef",
        "backbone=tiny_vit",
        "device=cpu",
        f"paths.data_dir={tmp_path}/data",
        "method.data.dataset=synthetic",
        "method.data.root=null",
        "method.data.objects=3",
        "method.data.views=8",
        "method.data.size=[48,48]",
        "method.points=300",
        "method.progress=false",
        "method.optim.lr=1e-3",
        "method.optim.steps=3",
        "method.optim.batch_size=2",
        "method.ckpt_every=3",
    ]
    cfg = compose(ov)
    seed_everything(0)
    init = {k: v.clone() for k, v in build_backbone(cfg.backbone).model.state_dict().items()}
    seed_everything(0)
    one = MEF().fit(build_backbone(cfg.backbone), cfg, tmp_path / "one").state_dict()  # also writes the objects
    assert _torchrun(tmp_path / "two", tmp_path / "two.pt", 0, ov) == [[]]
    two = torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[f"inner.model.{k}"] - v).abs().max()) for k, v in init.items())
    assert diff < ATOL and moved > 10 * diff, (diff, moved)
    assert (tmp_path / "two" / "history.json").exists()  # rank 0 wrote the curve (rank 1 nothing: above)


def _initial(ov):
    from bench.backbones import build_backbone
    from bench.seed import seed_everything

    seed_everything(0)
    return build_backbone(compose(ov).backbone).model.state_dict()


# ------------------------------------------------------------------------------------------- the pieces
def test_example_draws_depend_only_on_seed_and_index():
    a, b = ViewSampler([20, 30], gap=8, seed=3), ViewSampler([20, 30], gap=8, seed=3)
    b.sample(), b.sample()  # a running stream does not shift the indexed draws
    assert [a.example(i) for i in range(10)] == [b.example(i) for i in reversed(range(10))][::-1]
    assert len({a.example(i) for i in range(50)}) > 10
    assert ViewSampler([20, 30], gap=8, seed=4).example(0) != a.example(0) or a.example(1) != ViewSampler(
        [20, 30], gap=8, seed=4
    ).example(1)


def test_step_loader_in_order_with_workers_and_restart():
    fn = lambda s: torch.full((2,), float(s * s))  # noqa: E731
    ld = StepLoader(fn, 8, workers=1, prefetch=2)
    assert [float(ld.get(s)[0]) for s in range(3)] == [0.0, 1.0, 4.0]
    assert float(ld.get(6)[0]) == 36.0 and float(ld.get(7)[0]) == 49.0  # a jump (resume) restarts at that step
    ld.close()
    state = torch.get_rng_state()
    ld0 = StepLoader(fn, 8, workers=1)
    ld0.get(0)
    assert torch.equal(torch.get_rng_state(), state)  # workers leave the global RNG (dropout...) untouched
    ld0.close()


def _worker_allreduce(rank, world, port, out):
    import torch.distributed as dist

    from bench import distributed as bd

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    bd.init("cpu")
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # q.grad missing on every rank -> zeros
    bd.allreduce_gradients([p, q])
    w = bd.global_mean_weight(torch.tensor(1.0 + 3 * rank))  # counts 1 and 4 -> 2*1/5, 2*4/5
    torch.save(
        {"p": p.grad, "q": q.grad, "w": w, "bs": bd.per_rank_batch(4), "slice": list(bd.rank_slice(4))}, f"{out}.{rank}"
    )
    dist.destroy_process_group()


def test_gradient_average_and_pooled_mean_weight(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker_allreduce, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "r.0"), torch.load(tmp_path / "r.1")
    for r in (r0, r1):
        assert torch.equal(r["p"], torch.tensor([1.5, 3.0, 4.5])) and torch.equal(r["q"], torch.zeros(2))
        assert r["bs"] == 2
    assert r0["w"] == pytest.approx(2 / 5) and r1["w"] == pytest.approx(8 / 5)
    assert r0["slice"] == [0, 1] and r1["slice"] == [2, 3]
