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
import torch

from bench import records, sweep
from bench.config import compose
from helpers import sweep_args, tiny_cell

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
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


def overrides(tmp: Path, *extra: str) -> list:
    """Tiny cells on the test cluster: 1 CPU per job, 3-minute limit (submitit signals 90 s before)."""
    return [
        *tiny_cell(tmp),
        "cluster=slurm",
        f"cluster.folder={tmp}/sweep",
        "cluster.partition=debug",
        "cluster.gpus_per_node=0",
        "cluster.cpus_per_task=1",
        "cluster.mem_gb=1",
        "cluster.timeout_min=3",
        "cluster.eval.timeout_min=3",
        "cluster.table.timeout_min=3",
        "cluster.table.mem_gb=1",
        "cluster.poll_s=1",
        *extra,
    ]


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


TINY_SYNTH = [
    "task.dataset.scenes=3",
    "task.dataset.views=2",
    "task.dataset.size=32",
    "task.dataset.held_out=1",
    "task.protocols.linear.schedule.epochs=1",
    "task.progress=false",
]


@pytest.mark.slow
def test_sweep_2x2_through_sbatch(slurm_cluster, toys, tmp_path, capsys):
    """2 methods (frozen dinov2, trained toy_train) x 2 synthetic tasks (synth_depth, synth_seg), tiny."""
    from bench.data.synthetic import ensure_synthetic

    ov = overrides(
        tmp_path, "method.name=dinov2,toy_train", "task=synth_depth,synth_seg", "+method.steps=3", *TINY_SYNTH
    )
    data = compose([o.split(",")[0] for o in ov]).task.dataset  # prepared once, as `bench data` would
    ensure_synthetic(data.root, scenes=data.scenes, views=data.views, size=[data.size] * 2, seed=data.seed)
    s = sweep.run(sweep.make_plan(ov), poll_s=1)
    assert {n: j.state for n, j in s.jobs.items()} == {n: "done" for n in s.jobs}, sweep.status_table(s)
    assert [j.kind for j in s.jobs.values()] == ["train", "eval", "eval", "eval", "eval", "table"]
    ids = {n: j.job_id for n, j in s.jobs.items()}  # the evaluations of the trained backbone: one array
    arrays = {i.split("_")[0] for n, i in ids.items() if n.startswith("eval:toy_train")}
    assert len(arrays) == 1 and all("_" in ids[n] for n in ids if n.startswith("eval:toy_train"))
    recs = records.load_records(tmp_path / "results")
    assert sorted((r["method"], r["task"]) for r in recs) == [
        ("dinov2", "synth_depth"),
        ("dinov2", "synth_seg"),
        ("toy_train", "synth_depth"),
        ("toy_train", "synth_seg"),
    ]
    assert all(r["checkpoint"].get("reused") for r in recs if r["method"] == "toy_train")  # trained once
    board = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "synth_depth" in board and "synth_seg" in board and "toy_train" in board
    capsys.readouterr()
    assert sweep.main(sweep_args("--status", str(s.folder))) == 0
    assert "6 done" in capsys.readouterr().out


@pytest.mark.slow
def test_requeue_resume_failure_and_cancel(slurm_cluster, toys, tmp_path, capsys):
    """toy_train seeds 0,1 x tasks toy_probe, toy_fail.

    * seed 0's training gets the timeout signal mid-way: submitit checkpoints and requeues it, the job
      resumes from the last checkpoint and ends with weights identical to an uninterrupted run;
    * toy_fail raises: reported as failed with its log path, toy_probe of the same backbone finishes;
    * seed 1's training is scancel'ed: reported as cancelled, its evaluations are cancelled by SLURM
      (invalid dependency) and reported so; the leaderboard job still runs; nothing hangs.
    """
    ov = overrides(
        tmp_path,
        "method.name=toy_train",
        "task.name=toy_probe,toy_fail",
        "seed=0,1",
        "+method.steps=6",
        "+method.sleep_s=1.5",
    )
    s = sweep.run(sweep.make_plan(ov), wait=False)
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
    probe0, fail0 = (f"eval:toy_train-tiny_vit-{t}-s0" for t in ("toy_probe", "toy_fail"))
    assert state[t0.name] == "done" and state[probe0] == "done" and state["leaderboard"] == "done"
    assert state[fail0] == "failed" and s.jobs[fail0].error == "RuntimeError: toy_fail fails on purpose"
    assert "toy_fail fails on purpose" in Path(s.jobs[fail0].stderr).read_text()
    assert state[t1.name] == "cancelled"
    for cell in t1.cells:
        assert (
            state[f"eval:{cell}"] == "cancelled" and s.jobs[f"eval:{cell}"].error == f"dependency {t1.name} cancelled"
        )
    log = Path(t0.stderr).read_text()
    assert "Requeued job" in log and "resumed from" in log  # submitit requeued it; TrainLoop resumed
    capsys.readouterr()
    assert sweep.main(sweep_args("--status", str(s.folder))) == 0
    out = capsys.readouterr().out
    assert "3 done, 1 failed, 3 cancelled" in out and s.jobs[fail0].stderr in out

    from safetensors.torch import load_file

    from bench.runner import train

    ref_ov = [o for o in ov if not o.startswith(("seed=", "task.name=", "paths.cache_dir=", "+method.sleep_s="))]
    ref = train(compose(ref_ov + ["seed=0", f"paths.cache_dir={tmp_path}/ref_cache", "+method.sleep_s=0"]))
    got, want = load_file(workdir / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_two_task_training_job_runs_as_two_ranks(slurm_cluster, toys, tmp_path):
    """A training job of 2 SLURM tasks becomes 2 torch ranks (gloo) through submitit's
    TorchDistributedEnvironment, finishes, and (same full batch on both ranks) equals a 1-process run; an
    evaluation job of 2 tasks runs the cell on both and writes one record (rank 1 returns nothing)."""
    from safetensors.torch import load_file

    from bench.runner import train

    ov = overrides(
        tmp_path,
        "method.name=toy_train",
        "task.name=toy_probe",
        "+method.steps=3",
        "+cluster.train.tasks_per_node=2",
        "+cluster.train.timeout_min=10",
        "+cluster.eval.tasks_per_node=2",
    )
    s = sweep.run(sweep.make_plan(ov), poll_s=1)
    assert {n: j.state for n, j in s.jobs.items()} == {n: "done" for n in s.jobs}, sweep.status_table(s)
    e = next(j for j in s.jobs.values() if j.kind == "eval")
    task_logs = sorted(Path(e.stderr).parent.glob(f"{e.job_id}_*_log.err"))
    assert len(task_logs) == 2  # the eval job ran 2 tasks, neither failed
    assert not [f.name for f in task_logs if "Traceback" in f.read_text()], [f.read_text()[-2000:] for f in task_logs]
    assert len(records.load_records(tmp_path / "results")) == 1  # ... and wrote one record
    t = next(j for j in s.jobs.values() if j.kind == "train")
    logs = Path(t.stderr).parent
    assert len(list(logs.glob(f"{t.job_id}_*_log.err"))) == 2  # two tasks ran
    assert "distributed: 2 ranks" in Path(t.stderr).read_text()  # ... joined as one process group
    workdir = tmp_path / "cache" / "backbones" / t.name.split(":", 1)[1]
    ckpt = torch.load(sorted(workdir.glob("ckpt_*.pt"))[-1], weights_only=True)
    assert ckpt["fingerprint"]["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    ref_ov = [o for o in ov if not o.startswith(("paths.cache_dir=", "task.name=", "cluster."))]
    ref = train(compose(ref_ov + [f"paths.cache_dir={tmp_path}/ref_cache"]))
    got, want = load_file(workdir / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_fit3d_stage1_array_through_sbatch(slurm_cluster, tmp_path):
    """FiT3D stage I as a SLURM job array (2 tasks: shards of 2 and 1 scenes); stage II waits on the whole array
    (``afterok:<array id>``), then the probe; every scene is fitted and the backbone is trained."""
    from test_fit3d_array import overrides as fit3d_overrides

    from baselines.fit3d.stage1 import is_fitted
    from bench.cluster import SlurmBackend
    from bench.runner import MODEL_FILE, backbone_dir

    slurm = [o for o in overrides(tmp_path) if o.startswith("cluster")]
    ov = fit3d_overrides(
        tmp_path,
        "cache",
        *slurm,
        "+cluster.train.timeout_min=5",
        "+cluster.stage1.timeout_min=5",
        "cluster.stage1_per_task=2",
    )
    plan = sweep.make_plan(ov)
    stage1 = [j for j in plan.jobs.values() if j.kind == "stage1"]
    assert [len(j.items) for j in stage1] == [2, 1]
    s = sweep.run(plan, poll_s=1)
    assert {n: j.state for n, j in s.jobs.items()} == {n: "done" for n in s.jobs}, sweep.status_table(s)
    ids = [s.jobs[j.name].job_id for j in stage1]
    assert len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids)  # one array, 2 tasks
    train = next(j for j in s.jobs.values() if j.kind == "train")
    assert SlurmBackend._dependency(None, train, s.jobs) == f"afterok:{ids[0].split('_')[0]}"  # one word
    acct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", ",".join([*ids, train.job_id]), "-o", "JobID,Start,End"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    times = {row.split("|")[0]: row.split("|")[1:] for row in acct}
    assert max(times[i][1] for i in ids) <= times[train.job_id][0]  # stage II started after every fit ended
    cfg = compose(ov)
    assert (backbone_dir(cfg) / MODEL_FILE).is_file()
    fits = sorted((tmp_path / "cache").rglob("scene.safetensors"))
    assert len(fits) == 3 and all(is_fitted(f.parent) for f in fits)
    assert len(records.load_records(tmp_path / "results")) == 1
