"""bench sweep on a real single-node SLURM cluster (tests/slurm/cluster.sh: munge, slurmctld, slurmd,
slurmdbd + MariaDB under a temp dir), through real sbatch/sacct/scancel.

The session fixture installs the Debian packages if needed and starts the cluster; without root/apt
the tests are skipped with the reason, except in CI (CI=true), where they must run.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from bench import records, sweep
from bench.config import compose

pytestmark = pytest.mark.slurm
SCRIPT = Path(__file__).parent / "slurm" / "cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    in_ci = os.environ.get("CI", "").lower() == "true"

    def unavailable(why: str):
        (pytest.fail if in_ci else pytest.skip)(f"local SLURM cluster unavailable: {why}")

    if os.name != "posix" or os.geteuid() != 0:
        unavailable("tests/slurm/cluster.sh must run as root (it starts munged/slurmd as root)")
    r = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
    if r.returncode:
        unavailable(f"installing the Debian packages failed: {r.stderr.strip()[-500:]}")
    folder = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=300)
    if r.returncode:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)
        unavailable(f"starting the cluster failed: {r.stderr.strip()[-1500:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield folder
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture
def toys():
    import sweep_toys

    sweep_toys.register()
    yield sweep_toys
    sweep_toys.unregister()


def overrides(tmp: Path, *extra: str) -> list:
    """Tiny cells on the test cluster: 1 CPU per job, 3-minute limit (submitit signals 90 s before)."""
    return ["backbone=tiny_vit", "task=synth_corr", f"paths.root={tmp}", f"paths.data_dir={tmp}/data",
            f"paths.results_dir={tmp}/results", f"paths.output_dir={tmp}/outputs", f"paths.cache_dir={tmp}/cache",
            "cluster=slurm", f"cluster.folder={tmp}/sweep", "cluster.partition=debug", "cluster.gpus_per_node=0",
            "cluster.cpus_per_task=1", "cluster.mem_gb=1", "cluster.timeout_min=3", "cluster.eval.timeout_min=3",
            "cluster.table.timeout_min=3", "cluster.table.mem_gb=1", "cluster.poll_s=1", *extra]


def squeue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout.strip()


def wait_for(cond, timeout: float, what: str, step: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_sweep_2x2_through_sbatch(slurm_cluster, toys, tmp_path, capsys):
    """2 methods (frozen, trained) x 2 tasks; toy_fail raises: reported with its log, the others finish."""
    plan = sweep.make_plan(overrides(tmp_path, "method.name=dinov2,toy_train", "task.name=toy_probe,toy_fail",
                                     "+method.steps=3"))
    s = sweep.run(plan, poll_s=1)
    state = {n: j.state for n, j in s.jobs.items()}
    train = next(n for n in state if n.startswith("train:"))
    assert state == {train: "done", "eval:dinov2-tiny_vit-toy_probe-s0": "done",
                     "eval:dinov2-tiny_vit-toy_fail-s0": "failed", "eval:toy_train-tiny_vit-toy_probe-s0": "done",
                     "eval:toy_train-tiny_vit-toy_fail-s0": "failed", "leaderboard": "done"}
    for name in ("eval:dinov2-tiny_vit-toy_fail-s0", "eval:toy_train-tiny_vit-toy_fail-s0"):
        j = s.jobs[name]
        assert j.error == "RuntimeError: toy_fail fails on purpose" and j.raw_state.startswith("FAILED")
        assert "toy_fail fails on purpose" in Path(j.stderr).read_text()
    ids = {n: j.job_id for n, j in s.jobs.items()}  # arrays: the evals of one training job share an array id
    assert ids["eval:toy_train-tiny_vit-toy_probe-s0"].split("_")[0] == ids["eval:toy_train-tiny_vit-toy_fail-s0"].split("_")[0]
    assert sorted(r["method"] for r in records.load_records(tmp_path / "results")) == ["dinov2", "toy_train"]
    assert "toy_probe" in (tmp_path / "results" / "leaderboard.md").read_text()
    capsys.readouterr()
    p = __import__("argparse").ArgumentParser()
    sweep.add_arguments(p)
    assert sweep.main(p.parse_args(["--status", str(s.folder)])) == 0
    out = capsys.readouterr().out
    assert "4 done, 2 failed" in out and s.jobs["eval:dinov2-tiny_vit-toy_fail-s0"].stderr in out


def test_requeued_training_resumes_and_cancel_is_reported(slurm_cluster, toys, tmp_path):
    """Seed 0's training gets the timeout signal mid-way: submitit checkpoints, requeues, and the job resumes
    to weights identical to an uninterrupted run. Seed 1's training is scancel'ed: reported as cancelled,
    its evaluation is cancelled by SLURM (invalid dependency), the leaderboard job still runs."""
    ov = overrides(tmp_path, "method.name=toy_train", "task.name=toy_probe", "seed=0,1", "+method.steps=6",
                   "+method.sleep_s=1.5")
    plan = sweep.make_plan(ov)
    s = sweep.run(plan, wait=False)
    t0, t1 = (next(j for j in s.jobs.values() if j.kind == "train" and j.cells[0].endswith(f"s{k}")) for k in (0, 1))
    workdir = Path(tmp_path / "cache" / "backbones" / t0.name.split(":", 1)[1])
    wait_for(lambda: list(workdir.glob("ckpt_*.pt")), 120, "a checkpoint of the seed-0 training")
    subprocess.run(["scancel", t1.job_id], check=True)
    subprocess.run(["scancel", "--signal=USR2", t0.job_id], check=True)  # submitit's timeout/preemption signal
    # SLURM holds a requeued batch job ~2 minutes (BeginTime); release it now to keep the test short
    wait_for(lambda: "BeginTime" in squeue(t0.job_id), 60, "the requeued job to pend")
    subprocess.run(["scontrol", "update", f"JobId={t0.job_id}", "StartTime=now"], check=True)
    wait_for(lambda: sweep.refresh(s).finished(), 150, "the sweep to finish", step=1)
    state = {j.name: j.state for j in s.jobs.values()}
    assert state[t0.name] == "done" and state[f"eval:{t0.cells[0]}"] == "done" and state["leaderboard"] == "done"
    assert state[t1.name] == "cancelled" and state[f"eval:{t1.cells[0]}"] == "cancelled"
    assert s.jobs[f"eval:{t1.cells[0]}"].error == f"dependency {t1.name} cancelled"
    log = Path(t0.stderr).read_text()
    assert "Requeued job" in log and "resumed from" in log  # submitit requeued it; TrainLoop resumed

    from safetensors.torch import load_file

    from bench.runner import train

    ref_ov = [o for o in ov if not o.startswith(("seed=", "paths.cache_dir=", "+method.sleep_s="))]
    ref = train(compose(ref_ov + ["seed=0", f"paths.cache_dir={tmp_path}/ref_cache", "+method.sleep_s=0"]))
    got, want = load_file(workdir / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
