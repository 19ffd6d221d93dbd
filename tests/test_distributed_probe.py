"""Data-parallel probes on CPU (gloo, torchrun): a 2-rank probe equals the 1-process probe of the same global
batch (loss groups of ``samples_per_gpu`` images, BatchNorm over the global batch = SyncBN, an epoch's ragged
last batch leaving one rank without items), a 2-rank probe cut and resumed equals the uninterrupted one, only
rank 0 writes, and ``torchrun -m bench run`` writes one record that says how its probe was trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.backbones import build_backbone
from bench.config import compose
from bench.registry import TASKS
from bench.seed import seed_everything
from loopback import tagged, torchrun

ROOT = Path(__file__).resolve().parents[1]
#: float tolerance of "same probe": the same sums taken in another order (two ranks vs one batch)
ATOL = 1e-5

# 3 training rooms x 3 views = 9 items, batch 4 in groups of 2: batches 4, 4, 1 per epoch; the last one is
# a single group, so rank 1 holds no item of it (its zero loss still joins SyncBN and the gradient average)
COMMON = [
    "backbone=tiny_cnn",
    "device=cpu",
    "task.dataset.scenes=4",
    "task.dataset.views=3",
    "task.dataset.size=40",
    "task.dataset.held_out=1",
    "task.progress=false",
    "task.protocols.linear.schedule.epochs=2",
    "task.protocols.linear.schedule.batch_size=4",
    "task.protocols.linear.schedule.samples_per_gpu=2",
    "+task.protocols.linear.schedule.ckpt_every=2",
]
TASK_OV = {
    "synth_seg": [],  # linear head with BatchNorm (mmseg BNHead: SyncBN in the anchor)
    "synth_depth": ["task.protocols.linear.loss.warm_up=true", "task.protocols.linear.loss.warm_iter=3"],
}


def _ov(tmp_path, task, cache="cache"):
    return [f"paths.data_dir={tmp_path}/data", f"paths.cache_dir={tmp_path}/{cache}", *COMMON, *TASK_OV[task]]


def _single(tmp_path, task, work):
    cfg = compose([f"task={task}", *_ov(tmp_path, task, f"cache_{work}")])
    seed_everything(0)
    bb = build_backbone(cfg.backbone).eval()
    seed_everything(0)
    metrics = TASKS.get(task)().evaluate(bb, cfg, tmp_path / work)
    return metrics, load_file(str(tmp_path / work / "probe.safetensors"))


def _torchrun(args, nproc=2, module=False):
    """{rank: its output}: loopback only, one file per rank (tests/loopback.py)."""
    return torchrun(args, nproc=nproc, module=module)


def _dist(tmp_path, jobs):
    """Rank 0's metrics of ``jobs`` [(task, root, stop_after, cache)], run in one 2-rank launch
    (tests/dist_probe.py); rank 1 must write nothing under any job's root."""
    spec = [
        {"root": str(root), "task": task, "stop_after": stop, "overrides": _ov(tmp_path / task, task, cache)}
        for task, root, stop, cache in jobs
    ]
    path = tmp_path / f"jobs_{len(list(tmp_path.glob('jobs_*.json')))}.json"
    path.write_text(json.dumps(spec))
    out = _torchrun([str(ROOT / "tests" / "dist_probe.py"), str(path)])
    writes = [json.loads(x) for x in tagged(out[1], "WRITES")]
    metrics = [json.loads(x) for x in tagged(out[0], "METRICS")]
    assert writes == [[]], writes  # rank 1 created, wrote, renamed or deleted nothing under the roots
    assert not tagged(out[0], "WRITES") and not tagged(out[1], "METRICS")  # each rank says only its own
    assert len(metrics) == 1 and len(metrics[0]) == len(jobs), out[0][-2000:]
    return metrics[0]


@pytest.mark.slow
def test_two_rank_probe_equals_one_process_and_resumes_exactly(tmp_path):
    """For each task: 2 ranks train the probe 1 process trains; a 2-rank run cut after its step-2 checkpoint and
    continued in a new launch equals the uninterrupted one. The two tasks' uninterrupted and cut runs share one
    launch, their resumes a second one."""
    tasks = list(TASK_OV)
    single = {task: _single(tmp_path / task, task, "one") for task in tasks}  # also generates the data
    first = _dist(
        tmp_path,
        [
            job
            for t in tasks
            for job in ((t, tmp_path / t / "two", 0, "cache_two"), (t, tmp_path / t / "cut", 2, "cache_cut"))
        ],
    )
    for i, task in enumerate(tasks):
        base = tmp_path / task
        one_metrics, one = single[task]
        two_metrics, root = first[2 * i], base / "two"
        two = load_file(str(root / "work" / "probe.safetensors"))
        assert one.keys() == two.keys()
        diff = max(float((one[k].double() - two[k].double()).abs().max()) for k in one)
        assert diff < ATOL, (task, diff)
        if task == "synth_seg":  # BatchNorm running statistics of the global batches, as one process computes them
            assert any(k.endswith("running_var") for k in one)
        for k, v in one_metrics.items():
            assert two_metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-4), (task, k)
        # cut after the step-2 checkpoint: no probe, one checkpoint
        assert first[2 * i + 1] is None
        assert not (base / "cut" / "work" / "probe.safetensors").exists()
        assert len(list((base / "cache_cut" / "probes").glob("*/ckpt_00000002.pt"))) == 1

    # the cut runs continue in a new launch, equal to the uninterrupted 2 ranks
    resumed_metrics = _dist(tmp_path, [(t, tmp_path / t / "cut", 0, "cache_cut") for t in tasks])
    for task, metrics in zip(tasks, resumed_metrics):
        base, cut = tmp_path / task, tmp_path / task / "cut"
        assert metrics == first[2 * tasks.index(task)], task
        two = load_file(str(base / "two" / "work" / "probe.safetensors"))
        resumed = load_file(str(cut / "work" / "probe.safetensors"))
        assert all(torch.equal(resumed[k], two[k]) for k in two), task
        curve = [json.loads(x)["loss"] for x in (cut / "work" / "probe_history.jsonl").read_text().splitlines()]
        ref = [json.loads(x)["loss"] for x in (base / "two" / "work" / "probe_history.jsonl").read_text().splitlines()]
        assert curve == ref and len(curve) == 6, task  # 2 epochs x 3 batches, the global batch's loss


@pytest.mark.slow
def test_sigloss_per_group_is_not_the_pooled_sigloss(tmp_path):
    """The loss groups matter for depth: SigLoss over 2-image groups, averaged, trains another probe than
    SigLoss over the pooled batch of 4 (so the equality above is not the trivial one)."""

    def probe(work, *extra):
        cfg = compose(
            [
                "task=synth_depth",
                f"paths.data_dir={tmp_path}/data",
                f"paths.cache_dir={tmp_path}/cache_{work}",
                *COMMON,
                "task.protocols.linear.loss.warm_up=false",
                *extra,
            ]
        )
        seed_everything(0)
        bb = build_backbone(cfg.backbone).eval()
        seed_everything(0)
        TASKS.get("synth_depth")().evaluate(bb, cfg, tmp_path / work)
        return load_file(str(tmp_path / work / "probe.safetensors"))

    grouped, pooled = probe("grouped"), probe("pooled", "task.protocols.linear.schedule.samples_per_gpu=null")
    assert max(float((grouped[k] - pooled[k]).abs().max()) for k in grouped) > 100 * ATOL


@pytest.mark.slow
def test_torchrun_bench_run_writes_one_record_of_a_two_rank_probe(tmp_path):
    _single(tmp_path, "synth_seg", "one")  # generates the data; its metrics are the reference
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    results = tmp_path / "results"
    ov = [o for o in _ov(tmp_path, "synth_seg", "cache_cli")]
    _torchrun(
        [
            "bench",
            "run",
            "method=dinov2",
            "task=synth_seg",
            f"paths.results_dir={results}",
            f"paths.output_dir={tmp_path}/out",
            *ov,
        ],
        module=True,
    )
    records = list((results / "runs").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["distributed"]["probe"] == {
        "world_size": 2,
        "global_batch": 4,
        "samples_per_gpu": 2,
        "per_rank_batch": 2,
        "batchnorm": "global batch (SyncBN)",
    }
    for k, v in ref.items():
        assert rec["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-4), k

    # a probe whose loss is one group over the whole batch (no samples_per_gpu): rank 0 trains it alone
    ov = [o for o in ov if "samples_per_gpu" not in o]  # the normals protocol (Probe3D-based) has none
    out = _torchrun(
        [
            "bench",
            "run",
            "method=dinov2",
            "task=synth_normals",
            f"paths.results_dir={results}",
            f"paths.output_dir={tmp_path}/out",
            *ov,
        ],
        module=True,
    )
    assert "so rank 0 trains it alone; set samples_per_gpu for a data-parallel probe" in out[0]
    (normals,) = [json.loads(p.read_text()) for p in (results / "runs").glob("*synth_normals*.json")]
    assert normals["distributed"]["probe"]["world_size"] == 1 and normals["distributed"]["world_size"] == 2
    cfg = compose(["task=synth_normals", *ov])
    seed_everything(0)
    bb = build_backbone(cfg.backbone).eval()
    seed_everything(0)
    alone = TASKS.get("synth_normals")().evaluate(bb, cfg, tmp_path / "alone")
    for k, v in alone.items():
        assert normals["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-4), k


def test_loss_groups_must_fit_the_batch():
    from bench.errors import BenchError
    from tasks.train_probe import check_groups

    check_groups(16, 2)
    check_groups(16, None)
    with pytest.raises(BenchError, match="not a multiple of samples_per_gpu"):
        check_groups(10, 4)


def test_epoch_batches_split_groups_over_ranks_without_straddling():
    from tasks.train_probe import EpochBatches

    eb = [EpochBatches(list(range(9)), 4, seed=0, group=2, world=2, rank=r) for r in (0, 1)]
    full = EpochBatches(list(range(9)), 4, seed=0)
    for _ in range(6):  # two epochs: batches of 4, 4, 1
        whole = full.next().tolist()
        parts = [e.next() for e in eb]
        sizes = [e.groups for e in eb]
        got = [p.tolist() if p is not None else [] for p in parts]
        assert got[0] + got[1] == whole  # the global batch, in order, each item on one rank
        if len(whole) == 4:
            assert sizes == [([2], 2), ([2], 2)]
        else:  # the ragged last batch: one group, on rank 0; rank 1 holds nothing
            assert sizes == [([1], 1), ([], 1)] and parts[1] is None


@pytest.mark.slow
def test_perf_probe_ranks_reports_one_row_per_rank_count_with_the_same_metric(tmp_path):
    cmd = [sys.executable, "-m", "bench", "perf", "probe", "--backbone", "tiny_cnn", "--scenes", "4", "--held-out", "1"]
    cmd += ["--views", "3", "--size", "40", "--epochs", "2", "--skip-uncached", "--ranks", "1", "2"]
    cmd += ["--data-dir", str(tmp_path / "data")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    head = next(i for i, x in enumerate(lines) if x.lstrip().startswith("ranks"))
    rows = [x.split() for x in lines[head + 2 : head + 4]]
    assert [r[0] for r in rows] == ["1", "2"] and all(float(r[4]) > 0 for r in rows)  # steps/s
    assert rows[0][-1] == rows[1][-1]  # rmse to 6 decimals: the same probe on 1 and 2 ranks
