"""bench sweep: grid expansion, planning (training groups, dependencies, arrays), skip-existing,
cached/forced backbones, the local backend (dependencies, failure isolation), the status view,
and one end-to-end local sweep through the real job functions (toy method/tasks: sweep_toys.py)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import records, sweep
from bench.cluster import JobRecord, LocalBackend, make_backend
from bench.config import compose
from bench.errors import BenchError, ClusterError
from helpers import path_overrides, sweep_args, toy_sweep


def write_record(results_dir: Path, method: str, task: str, seed: int, backbone: str = "tiny_vit") -> None:
    """A record of the cell toy_sweep(tmp) + method.name/task.name/seed (its fingerprint included)."""
    from bench.identity import cell_identity

    cfg = compose(toy_sweep(results_dir.parent, f"method.name={method}", f"task.name={task}", f"seed={seed}"))
    rid = records.new_record_id(method, backbone, task, seed)
    records.write_record(
        results_dir,
        {
            "id": rid,
            "created": "2026-01-01T00:00:00Z",
            "method": method,
            "backbone": backbone,
            "task": task,
            "seed": seed,
            "protocol": {"name": "default"},
            "metrics": {"m": 1.0},
            "identity": cell_identity(cfg),
        },
    )


def test_expand_grid():
    grid = sweep.expand_grid(["method=a,b", "seed=range(0,2)", "x=[1,2]", "+y=3"])
    assert len(grid) == 4
    assert ["method=a", "seed=0", "x=[1,2]", "+y=3"] in grid and ["method=b", "seed=1", "x=[1,2]", "+y=3"] in grid
    assert sweep.expand_grid(["seed=0,0"]) == [["seed=0"]]
    with pytest.raises(BenchError, match="cannot expand"):
        sweep.expand_grid(["lr=interval(0,1)"])


@pytest.mark.slow
def test_plan_groups_cells_by_trained_backbone(toys, tmp_path):
    plan = sweep.make_plan(
        toy_sweep(tmp_path, "method.name=dinov2,toy_train", "task.name=toy_probe,toy_fail", "seed=0,1")
    )
    assert len(plan.cells) == 8 and not any(c.skip for c in plan.cells)
    trains = [j for j in plan.jobs.values() if j.kind == "train"]
    assert len(trains) == 2  # one per seed: the two tasks of a seed share one trained backbone
    for t in trains:
        assert sorted(t.cells) == sorted(c.id for c in plan.cells if f"train:{c.cache_key}" == t.name)
        assert len(t.cells) == 2 and t.array == "train"
        for cid in t.cells:  # evaluation depends on its training job, in that training job's array
            ev = plan.jobs[f"eval:{cid}"]
            assert ev.after_ok == [t.name] and ev.array == f"eval@{t.name}"
    frozen = [plan.jobs[f"eval:{c.id}"] for c in plan.cells if c.method == "dinov2"]
    assert len(frozen) == 4 and all(j.after_ok == [] and j.array == "eval" for j in frozen)
    assert plan.jobs["leaderboard"].after_any == [n for n in plan.jobs if n != "leaderboard"]
    assert list(plan.jobs)[:2] == [t.name for t in trains]  # dependency order
    assert ("sweep_toys", str(Path(toys.__file__))) in plan.plugins
    text = sweep.plan_table(plan)
    assert "8 cells, 8 to run, 0 skipped" in text and f"afterok {trains[0].name}" in text


@pytest.mark.slow
def test_plan_skips_cells_with_records_unless_forced(toys, tmp_path):
    write_record(tmp_path / "results", "dinov2", "toy_probe", 0)
    ov = toy_sweep(tmp_path, "method.name=dinov2", "task.name=toy_probe,toy_fail")
    plan = sweep.make_plan(ov)
    assert [c.skip for c in plan.cells] == [True, False]
    assert "eval:dinov2-tiny_vit-toy_probe-s0" not in plan.jobs and "eval:dinov2-tiny_vit-toy_fail-s0" in plan.jobs
    assert "skipped (use --force to re-run): dinov2-tiny_vit-toy_probe-s0" in sweep.plan_table(plan)
    assert not any(c.skip for c in sweep.make_plan(ov, force=True).cells)
    write_record(tmp_path / "results", "dinov2", "toy_fail", 0)
    assert sweep.make_plan(ov).jobs == {}


@pytest.mark.slow
def test_plan_reuses_cached_backbone_and_force_retrains(toys, tmp_path):
    from bench.runner import MODEL_FILE, backbone_dir

    ov = toy_sweep(tmp_path, "method.name=toy_train", "task.name=toy_probe")
    cache = backbone_dir(compose(ov))
    cache.mkdir(parents=True)
    (cache / MODEL_FILE).write_bytes(b"")
    plan = sweep.make_plan(ov)
    assert list(plan.jobs) == ["eval:toy_train-tiny_vit-toy_probe-s0", "leaderboard"]
    assert plan.jobs["eval:toy_train-tiny_vit-toy_probe-s0"].after_ok == []
    write_record(tmp_path / "results", "toy_train", "toy_probe", 0)
    plan = sweep.make_plan(ov + ["force=true"])  # retrain even though cached; the record does not skip it
    train = f"train:{cache.name}"
    assert list(plan.jobs)[0] == train and "force=true" in plan.job_overrides[train]
    assert plan.job_overrides["eval:toy_train-tiny_vit-toy_probe-s0"][-1] == "force=false"


def _records(jobs):
    return {j.name: j for j in jobs}


@pytest.mark.slow
def test_local_backend_dependencies_and_failure_isolation(tmp_path):
    ok, bad = functools.partial(time.sleep, 0.1), functools.partial(int, "x")  # cheap job callables
    jobs = _records(
        [
            JobRecord("t_ok", "train", [], "train"),
            JobRecord("t_bad", "train", [], "train"),
            JobRecord("e_ok", "eval", [], "eval", after_ok=["t_ok"]),
            JobRecord("e_dep", "eval", [], "eval", after_ok=["t_bad"]),
            JobRecord("e_bad", "eval", [], "eval"),
            JobRecord("table", "table", [], "table", after_any=["t_ok", "t_bad", "e_ok", "e_dep", "e_bad"]),
        ]
    )
    order = []

    def make(rec):
        order.append(rec.name)
        return bad if rec.name.endswith("bad") else ok

    backend = LocalBackend({"name": "local", "max_workers": 2, "timeout_min": 1}, tmp_path, make)
    backend.start(jobs)
    deadline = time.time() + 120
    while not all(j.state in ("done", "failed", "cancelled") for j in jobs.values()):
        assert time.time() < deadline, {n: j.state for n, j in jobs.items()}
        time.sleep(0.2)
        backend.step(jobs)
    state = {n: j.state for n, j in jobs.items()}
    assert state == {
        "t_ok": "done",
        "t_bad": "failed",
        "e_ok": "done",
        "e_dep": "cancelled",
        "e_bad": "failed",
        "table": "done",
    }
    assert order.index("e_ok") > order.index("t_ok") and order[-1] == "table" and "e_dep" not in order
    assert jobs["e_dep"].error == "dependency t_bad failed" and jobs["e_dep"].job_id is None
    for name in ("t_bad", "e_bad"):
        assert "invalid literal for int()" in jobs[name].error
        assert "ValueError" in Path(jobs[name].stderr).read_text()


def test_slurm_commands_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match=r"sbatch.*Fix: .*cluster=local"):
        make_backend({"name": "slurm"}, tmp_path, lambda rec: None)


def test_status_view_notices_a_dead_local_driver(toys, tmp_path, capsys):
    plan = sweep.make_plan(toy_sweep(tmp_path, "method.name=dinov2", "task.name=toy_probe"))
    s = sweep.Sweep.create(plan)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s.data["driver"]["pid"] = dead.pid
    s.jobs["eval:dinov2-tiny_vit-toy_probe-s0"].state = "running"
    s.save()
    assert sweep.main(sweep_args("--status", str(tmp_path / "sweep"))) == 0
    out = capsys.readouterr().out
    assert "2 failed" in out and "the sweep driver" in out
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert {j["state"] for j in saved["jobs"]} == {"failed"}
    with pytest.raises(BenchError, match="already holds a sweep"):
        sweep.Sweep.create(plan)


def test_dry_run_prints_the_plan_and_runs_nothing(toys, tmp_path, capsys):
    assert (
        sweep.main(sweep_args(*toy_sweep(tmp_path, "method.name=dinov2,toy_train", "task.name=toy_probe"), "--dry-run"))
        == 0
    )
    out = capsys.readouterr().out
    assert "2 cells, 2 to run" in out and "train:toy_train-tiny_vit-" in out and "afterany (3 jobs)" in out
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_local_sweep_end_to_end(toys, tmp_path, capsys):
    ov = toy_sweep(
        tmp_path,
        "method.name=dinov2,toy_train",
        "task.name=toy_probe",
        "cluster.max_workers=2",
        "cluster.poll_s=0.3",
        f"cluster.folder={tmp_path}/outputs/sweeps/first",
    )
    assert sweep.main(sweep_args(*ov)) == 0
    out = capsys.readouterr().out
    assert "4 done" in out and "leaderboard: " in out
    recs = records.load_records(tmp_path / "results")
    assert sorted(r["method"] for r in recs) == ["dinov2", "toy_train"]
    trained = next(r for r in recs if r["method"] == "toy_train")
    assert trained["checkpoint"]["reused"] is True  # the eval job reused the training job's weights
    assert "toy_probe" in (tmp_path / "results" / "leaderboard.md").read_text()
    assert sweep.main(sweep_args(*ov)) == 0  # everything has a record now: nothing runs, nothing is written
    assert "nothing to run" in capsys.readouterr().out
    assert sweep.main(sweep_args("--status", *ov)) == 0  # the latest sweep under <output_dir>/sweeps
    assert "sweeps/first (cluster=local): 4 done" in capsys.readouterr().out


@pytest.mark.slow
def test_plan_skips_a_cell_whose_record_ran_a_per_task_variant(tmp_path):
    """Splat-and-Distill trains a no-blending backbone for correspondence (method.per_task): the
    runner's record carries the fingerprint of that variant, and the plan must compute the same one."""
    from bench.identity import cell_identity
    from bench.method_variants import apply_per_task

    ov = [
        "method=splat_distill",
        "backbone=tiny_vit",
        "task=synth_corr",
        "seed=0",
        *path_overrides(tmp_path),
        "method.reconstructor.name=depth",
        "method.lift.coverage=alpha",
    ]
    cfg = compose(ov)
    ran = apply_per_task(cfg)  # what the runner runs and records
    assert ran.method.lift.blending is False and cfg.method.lift.blending is True
    assert cell_identity(cfg) == cell_identity(ran)
    no_variant = compose(ov + ["~method.per_task"])
    assert cell_identity(no_variant)["parts"]["method"] != cell_identity(cfg)["parts"]["method"]
    records.write_record(
        tmp_path / "results",
        {
            "id": records.new_record_id("splat_distill", "tiny_vit", "synth_corr", 0),
            "created": "2026-01-01T00:00:00Z",
            "method": "splat_distill",
            "backbone": "tiny_vit",
            "task": "synth_corr",
            "seed": 0,
            "protocol": {"name": "default"},
            "metrics": {"m": 1.0},
            "identity": cell_identity(ran),
        },
    )
    plan = sweep.make_plan(ov)
    assert [c.skip for c in plan.cells] == [True] and plan.jobs == {}
