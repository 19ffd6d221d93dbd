"""FiT3D stage I as a job array (issue 15 item 4): the sweep plans one stage-I task per scene (or per
shard), skips scenes already fitted, makes the training job depend on every task; the array's fits are
the ones the sequential path computes (same cache keys), so stage II trains the same backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import sweep
from bench.cluster import JobRecord, PrepareJob, SlurmBackend
from bench.config import compose
from bench.runner import MODEL_FILE, backbone_dir
from helpers import fit3d_tiny

from baselines.fit3d.method import open_scenes, run_stage1, scene_dirs, stage1_shards, stage1_teacher, teacher_identity
from baselines.fit3d.stage1 import is_fitted

STAGE1 = [
    "method.stage1.iterations=6",
    "method.stage1.init_points=120",
    "method.stage1.feature_dim=4",
    "method.stage1.densify.from=2",
    "method.stage1.densify.until=5",
    "method.stage1.densify.every=2",
    "method.stage1.opacity_reset_every=0",
    "method.stage1.ckpt_every=2",
    "method.stage1.eval=false",
]


def overrides(tmp: Path, cache: str = "cache", *extra: str) -> list:
    return [
        *fit3d_tiny(tmp, cache=f"{tmp}/{cache}"),
        "method.data.scenes=3",
        "method.data.views=3",
        "method.data.size=[28,28]",
        "method.data.seed=3",
        *STAGE1,
        "method.stage2.steps=2",
        "method.ckpt_every=1",
        "method.diagnostics.data.views=2",
        "method.diagnostics.pairs=1",
        "task.dataset.scenes=2",
        "task.dataset.views=2",
        "task.dataset.size=28",
        "task.dataset.held_out=1",
        "task.protocols.linear.schedule.epochs=1",
        "task.progress=false",
        f"cluster.folder={tmp}/sweep",
        "loader.workers=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("fit3d_array")
    cfg = compose(overrides(tmp))
    return tmp, list(open_scenes(cfg.method.data, cfg.paths.data_dir).scene_ids)


def test_plan_has_one_stage1_task_per_scene_and_training_depends_on_all(scenes):
    tmp, ids = scenes
    plan = sweep.make_plan(overrides(tmp))
    key = backbone_dir(compose(overrides(tmp))).name
    stage1 = [j for j in plan.jobs.values() if j.kind == "stage1"]
    assert [j.items for j in stage1] == [[s] for s in ids] and len(ids) == 3
    assert all(j.array == f"stage1@{key}" and j.after_ok == [] for j in stage1)
    train = plan.jobs[f"train:{key}"]
    assert train.after_ok == [j.name for j in stage1]  # afterok on every array task
    assert list(plan.jobs).index(train.name) > max(list(plan.jobs).index(j.name) for j in stage1)
    assert plan.jobs["leaderboard"].after_any == [n for n in plan.jobs if n != "leaderboard"]
    text = sweep.plan_table(plan)
    assert f"stage1:{key}/{ids[0]}" in text and f"stage1 of {ids[1]}" in text
    assert all(f"afterok {j.name}" in text for j in stage1)
    cells = [c for c in plan.cells if c.trains]
    two = sweep._prepare_jobs(compose(overrides(tmp, "cache", "cluster.stage1_per_task=2")), key, cells)
    assert [j.items for j in two] == [ids[:2], ids[2:]] and [j.name for j in two] == [
        f"stage1:{key}/0",
        f"stage1:{key}/1",
    ]
    # cluster.stage1_per_task=0: no array, the training job fits the scenes itself (sequential)
    assert sweep._prepare_jobs(compose(overrides(tmp, "cache", "cluster.stage1_per_task=0")), key, cells) == []


def test_slurm_dependency_names_the_whole_array_once():
    jobs = {
        "s/a": JobRecord("s/a", "stage1", [], "stage1@k", job_id="41_0"),
        "s/b": JobRecord("s/b", "stage1", [], "stage1@k", job_id="41_1"),
        "other": JobRecord("other", "train", [], "train", job_id="40"),
    }
    train = JobRecord("t", "train", [], "train", after_ok=["s/a", "s/b"])
    part = JobRecord("t2", "train", [], "train", after_ok=["s/a", "other"])
    dep = SlurmBackend._dependency
    assert dep(None, train, jobs) == "afterok:41"
    assert dep(None, part, jobs) == "afterok:41_0:40"


def test_array_tasks_fit_the_sequential_cache_and_skip_fitted_scenes(scenes):
    tmp, ids = scenes
    cfg = compose(overrides(tmp, "cache_array"))
    shards, fitted = stage1_shards(cfg)
    assert shards == [[s] for s in ids] and fitted == []
    job = PrepareJob(overrides=overrides(tmp, "cache_array"), cwd=str(Path.cwd()), items=[ids[1]])
    out = job()  # the callable a SLURM/local array task runs
    assert list(out) == [ids[1]] and is_fitted(Path(out[ids[1]]))
    shards, fitted = stage1_shards(cfg)
    assert shards == [[ids[0]], [ids[2]]] and fitted == [ids[1]]  # the fitted scene gets no task
    mtime = (Path(out[ids[1]]) / "scene.safetensors").stat().st_mtime_ns
    run_stage1(cfg, [ids[1]])  # a requeued task: the finished scene is reused
    assert (Path(out[ids[1]]) / "scene.safetensors").stat().st_mtime_ns == mtime
    # the sequential path (stage I inside the training job, fit_scenes) keys the scenes identically
    seq = compose(overrides(tmp, "cache_seq"))
    data = open_scenes(seq.method.data, seq.paths.data_dir)
    a = scene_dirs(data, teacher_identity(stage1_teacher(cfg), cfg), cfg)
    b = scene_dirs(data, teacher_identity(stage1_teacher(seq), seq), seq)
    assert a[ids[1]] == Path(out[ids[1]]) and [p.name for p in a.values()] == [p.name for p in b.values()]


@pytest.fixture
def same_threads_in_jobs(monkeypatch):
    """The jobs this test starts run torch on this process's thread count (OMP_NUM_THREADS): bit-equal weights
    need the same count on both paths, whatever the machine's cores or the caller's OMP_NUM_THREADS."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.mark.slow
def test_local_sweep_array_equals_the_sequential_backbone(scenes, capsys, same_threads_in_jobs):
    """cluster=local: 2 stage-I tasks (local jobs; shards of 2 and 1 scenes), then stage II, then the probe; the
    trained backbone equals the one of the sequential path (stage I inside one training job,
    cluster.stage1_per_task=0)."""
    from bench import runner

    tmp, ids = scenes
    ov = overrides(
        tmp,
        "cache_local",
        "cluster.max_workers=2",
        "cluster.poll_s=0.3",
        f"cluster.folder={tmp}/outputs/sweeps/array",
        "cluster.stage1_per_task=2",
    )
    plan = sweep.make_plan(ov)
    assert [j.items for j in plan.jobs.values() if j.kind == "stage1"] == [ids[:2], ids[2:]]
    done = sweep.run(plan, echo=lambda *_: None)
    assert all(j.state == "done" for j in done.jobs.values()), [(j.name, j.error) for j in done.jobs.values()]
    seq_cfg = compose(overrides(tmp, "cache_local_seq"))
    seq_dir = runner.train(seq_cfg)  # sequential: stage I in the training job
    arr_dir = backbone_dir(compose(ov))
    assert arr_dir.name == seq_dir.name
    a, b = load_file(str(arr_dir / MODEL_FILE)), load_file(str(seq_dir / MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s1a, s1b = (json.loads((d / "stage1_scenes.json").read_text()) for d in (arr_dir, seq_dir))
    assert [Path(v["dir"]).name for v in s1a.values()] == [Path(v["dir"]).name for v in s1b.values()]
