"""Where sweep jobs run: SLURM through submitit (``cluster=slurm``) or this machine (``cluster=local``).

A sweep job is a picklable callable (:class:`TrainJob`, :class:`EvalJob`, :class:`TableJob`) that
composes its cell's config from override strings and calls the runner. The same callables run on
both backends, under submitit, so preemption works the same everywhere: the jobs are submitit
``Checkpointable``; on the timeout/preemption signal submitit pickles the job again and requeues
it, and the requeued job simply calls :func:`bench.runner.train` again, which resumes from the
method's last checkpoint in the backbone cache directory.

Backends share one protocol (:class:`Backend`): ``start(jobs)`` then ``step(jobs)`` until every job
is terminal. :class:`SlurmBackend` submits everything at once with sbatch dependencies
(``afterok`` on the training job -- and of a FiT3D training job on its stage-I array --, ``afterany`` for
the leaderboard job, ``--kill-on-invalid-dep``
so dependents of a failed job are cancelled rather than pending forever) and polls ``sacct``.
:class:`LocalBackend` starts jobs with submitit's ``LocalExecutor`` when their dependencies are
met, at most ``cluster.max_workers`` at a time; a failed job cancels only its dependents.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import submitit

from .errors import ClusterError
from .safe_pickle import load_plain_pickle

log = logging.getLogger("bench.cluster")

TERMINAL = ("done", "failed", "cancelled")
SLURM_COMMANDS = ("sbatch", "sacct", "scancel", "srun")

# sacct state (first word) -> job state. Anything unknown counts as pending.
_SLURM_STATES = {
    "COMPLETED": "done",
    "CANCELLED": "cancelled",
    **{
        s: "running"
        for s in ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED")
    },
    **{s: "failed" for s in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "REVOKED")},
}


def slurm_state(raw: str) -> str:
    """Map a sacct/submitit state string (``'CANCELLED by 0'``, ``'REQUEUED'``...) to a job state."""
    return _SLURM_STATES.get((raw or "UNKNOWN").split()[0].upper(), "pending")


# --------------------------------------------------------------------------------------- job callables
def _import_plugins(plugins: Sequence[Tuple[str, str]]) -> None:
    """Import the modules that registered the sweep's methods/tasks (by name, else from their file)."""
    for name, path in plugins:
        if name in sys.modules:
            continue
        try:
            importable = importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package is not importable here
            importable = False
        if importable:
            importlib.import_module(name)
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ClusterError(
                f"plugin module {name} cannot be imported from {path}",
                "make it importable on the compute nodes (install it or put it on PYTHONPATH)",
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


@dataclass
class _BenchJob(submitit.helpers.Checkpointable):
    """A job of one cell: compose ``overrides`` in ``cwd`` and call the runner.

    ``checkpoint()`` (inherited) resubmits the same callable: every job is idempotent or resumes
    from its working directory, so a requeued job just runs again.
    """

    overrides: List[str]
    cwd: str
    plugins: List[Tuple[str, str]] = field(default_factory=list)

    def _config(self):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        os.chdir(self.cwd)
        _import_plugins(self.plugins)
        from .config import compose
        from .distributed import export_slurm_env

        export_slurm_env()  # a job of several tasks (cluster.tasks_per_node/nodes): one torch rank per task

        return compose(self.overrides)


class TrainJob(_BenchJob):
    """Train (or resume, or reuse) one backbone; returns its cache directory."""

    def __call__(self) -> str:
        from . import runner

        return str(runner.train(self._config()))


class EvalJob(_BenchJob):
    """Run one cell (the backbone is cached by its training job) and write its record."""

    def __call__(self) -> Dict[str, Any]:
        from . import runner

        record = runner.run_cell(self._config())
        if record is None:  # a rank > 0 of a multi-task job: it trained with rank 0, which wrote the record
            return None
        return {"id": record["id"], "path": record.get("_path"), "metrics": record["metrics"]}


@dataclass
class PrepareJob(_BenchJob):
    """One task of a method's preparation array (FiT3D stage I: ``items`` = scenes to fit). Requeued after
    a time-out it runs again: finished items are skipped, an unfinished one resumes from its checkpoint."""

    items: List[str] = field(default_factory=list)

    def __call__(self) -> Any:
        from .method_variants import apply_per_task
        from .registry import METHODS

        cfg = apply_per_task(self._config())
        if int(os.environ.get("RANK", "0") or 0) != 0:  # a job of several tasks: one process does the work
            return None
        return METHODS.get(cfg.method.name).prepare(cfg, list(self.items))


@dataclass
class TableJob(submitit.helpers.Checkpointable):
    """Rebuild the leaderboard of each results directory once the other jobs are over."""

    results_dirs: List[str]
    cwd: str

    def __call__(self) -> List[str]:
        from .table import write_leaderboard

        os.chdir(self.cwd)
        # a grid whose jobs wrote no record yet (e.g. only FiT3D stage-I fits) has no results directory: nothing
        # to tabulate there (``bench table`` on such a directory is an error for a user who names it)
        return [str(write_leaderboard(d)) for d in self.results_dirs if Path(d).is_dir()]


# --------------------------------------------------------------------------------------- job records
@dataclass
class JobRecord:
    """One job of a sweep as the state file stores it (``sweep.json``)."""

    name: str
    kind: str  # train | eval | table | <method prepare_name> (fit3d: stage1)
    cells: List[str]
    array: str  # jobs of one array are submitted together
    after_ok: List[str] = field(default_factory=list)
    after_any: List[str] = field(default_factory=list)
    items: List[str] = field(default_factory=list)  # a preparation job's work items (fit3d: its scenes)
    job_id: Optional[str] = None
    state: str = "pending"  # pending | running | done | failed | cancelled
    raw_state: str = ""  # scheduler's word (sacct state, local process state)
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    error: Optional[str] = None
    result: Any = None

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JobRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _error_line(trace: str) -> str:
    lines = [ln.strip() for ln in str(trace).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "failed"


def _read_outcome(job: submitit.Job) -> Tuple[Optional[str], Any]:
    """(outcome, payload) from submitit's result pickle, or (None, None) if there is none."""
    path = job.paths.result_pickle
    if not path.exists():
        return None, None
    try:  # plain containers only (what bench's jobs return): a result naming any class is refused, not run
        return load_plain_pickle(path)
    except Exception as e:  # a torn/unreadable pickle is a failure of that job, not of the sweep
        return "error", f"unreadable result {path}: {e}"


def _finish(rec: JobRecord, job: submitit.Job, state: str, raw: str) -> None:
    """Fill ``rec`` from a job that reached a terminal ``state``."""
    rec.raw_state = raw
    outcome, payload = _read_outcome(job)
    if outcome == "success":
        rec.state, rec.result, rec.error = "done", payload, None
    elif outcome == "error":
        rec.state, rec.error = "failed", _error_line(payload)
    elif state == "done":  # the scheduler says completed, yet no result: count it as a failure
        rec.state, rec.error = "failed", "job ended without writing its result"
    else:  # cancelled, timed out, out of memory, node failure...
        rec.state, rec.error = state, rec.error or f"{raw.lower() or state} (no result written)"


def _dependency_problem(rec: JobRecord, jobs: Mapping[str, JobRecord]) -> Optional[str]:
    for dep in rec.after_ok:
        if jobs[dep].state in ("failed", "cancelled"):
            return f"dependency {dep} {jobs[dep].state}"
    return None


# --------------------------------------------------------------------------------------- backends
def _resources(cluster: Mapping[str, Any], kind: str) -> Dict[str, Any]:
    """Base resources of ``cluster`` with its per-kind section (``train``/``eval``/``table``) on top."""
    keys = (
        "timeout_min",
        "gpus_per_node",
        "cpus_per_task",
        "mem_gb",
        "nodes",
        "tasks_per_node",
        "partition",
        "account",
        "qos",
        "constraint",
    )
    out = {k: cluster.get(k) for k in keys if k in cluster}
    out.update(dict(cluster.get(kind) or {}))
    return out


class Backend:
    """Runs :class:`JobRecord` s: ``start(jobs)`` once, then ``step(jobs)`` until all are terminal."""

    name = "backend"
    waits = True  # whether the driver must stay alive for the jobs to proceed

    def __init__(self, cluster: Mapping[str, Any], folder: Path, make_callable):
        self.cluster, self.folder, self.make_callable = cluster, Path(folder), make_callable

    def start(self, jobs: Dict[str, JobRecord]) -> None:
        raise NotImplementedError

    def step(self, jobs: Dict[str, JobRecord]) -> None:
        raise NotImplementedError

    def cancel(self, jobs: Dict[str, JobRecord]) -> None:
        raise NotImplementedError


def require_slurm() -> None:
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise ClusterError(
            f"SLURM commands not found on PATH: {', '.join(missing)} (cluster=slurm needs "
            "sbatch, sacct, scancel and srun)",
            "run the sweep on a SLURM login node, or use cluster=local to run the jobs on this machine",
        )


class SlurmBackend(Backend):
    """Submit all jobs at once with sbatch dependencies; poll their states with sacct."""

    name = "slurm"
    waits = False

    def __init__(self, cluster, folder, make_callable):
        require_slurm()
        super().__init__(cluster, folder, make_callable)

    def _executor(self, kind: str, dependency: Optional[str]) -> submitit.SlurmExecutor:
        res = _resources(self.cluster, kind)
        ex = submitit.SlurmExecutor(
            folder=self.folder / "logs" / "%j", max_num_timeout=int(self.cluster.get("max_num_timeout", 3))
        )
        extra = {str(k).replace("_", "-"): v for k, v in dict(self.cluster.get("additional") or {}).items()}
        if dependency:
            extra["kill-on-invalid-dep"] = "yes"
        params = {
            "job_name": f"bench-{kind}",
            "time": int(res.get("timeout_min", 60)),
            "nodes": int(res.get("nodes", 1)),
            # one task = one torch rank; unset: one per GPU (bench.distributed.export_slurm_env)
            "ntasks_per_node": int(res.get("tasks_per_node") or max(int(res.get("gpus_per_node") or 0), 1)),
            "cpus_per_task": res.get("cpus_per_task"),
            "gpus_per_node": res.get("gpus_per_node") or None,
            "mem": f"{res['mem_gb']}GB" if res.get("mem_gb") else None,
            "partition": res.get("partition"),
            "account": res.get("account"),
            "qos": res.get("qos"),
            "constraint": res.get("constraint"),
            "dependency": dependency,
            "signal_delay_s": int(self.cluster.get("signal_delay_s", 90)),
            "array_parallelism": int(self.cluster.get("array_parallelism", 256)),
            "setup": list(self.cluster.get("setup") or []) or None,
            "additional_parameters": extra or None,
        }
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def _dependency(self, rec: JobRecord, jobs: Mapping[str, JobRecord]) -> Optional[str]:
        parts = []
        ok: List[str] = []
        for d in rec.after_ok:  # every task of an array: the array's id (one word instead of one per task)
            base = jobs[d].job_id.split("_")[0]
            tasks = {j.name for j in jobs.values() if j.job_id and j.job_id.split("_")[0] == base}
            word = base if "_" in jobs[d].job_id and tasks <= set(rec.after_ok) else jobs[d].job_id
            if word not in ok:
                ok.append(word)
        anyy = sorted({jobs[d].job_id.split("_")[0] for d in rec.after_any})  # a whole array at once
        if ok:
            parts.append("afterok:" + ":".join(ok))
        if anyy:
            parts.append("afterany:" + ":".join(anyy))
        return ",".join(parts) or None

    def start(self, jobs: Dict[str, JobRecord]) -> None:
        arrays: Dict[str, List[JobRecord]] = {}
        for rec in jobs.values():  # jobs come in dependency order, so do the arrays
            arrays.setdefault(rec.array, []).append(rec)
        for group in arrays.values():
            dependency = self._dependency(group[0], jobs)
            ex = self._executor(group[0].kind, dependency)
            try:
                with ex.batch():
                    handles = [ex.submit(self.make_callable(rec)) for rec in group]
            except Exception as e:  # sbatch refused (bad partition/account, no SLURM_CONF...): undo, say why
                why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                self.cancel(jobs)
                for rec in jobs.values():
                    if rec.state not in TERMINAL:
                        rec.state = "cancelled" if rec.job_id else "failed"
                        rec.error = f"not submitted: sbatch failed ({why})"
                raise ClusterError(
                    f"sbatch refused the {group[0].kind} job(s) {', '.join(r.name for r in group)}: {why}",
                    "check the cluster=slurm settings (partition, account, qos, ...) and "
                    "that sbatch works here (SLURM_CONF); or use cluster=local",
                ) from None
            for rec, h in zip(group, handles):
                rec.job_id = h.job_id
                rec.stdout, rec.stderr = str(h.paths.stdout), str(h.paths.stderr)
                log.debug("submitted %s as SLURM job %s", rec.name, rec.job_id)

    def _handles(self, jobs: Mapping[str, JobRecord]) -> Dict[str, submitit.Job]:
        return {
            n: submitit.SlurmJob(folder=self.folder / "logs" / "%j", job_id=r.job_id)
            for n, r in jobs.items()
            if r.job_id and r.state not in TERMINAL
        }

    def step(self, jobs: Dict[str, JobRecord]) -> None:
        handles = self._handles(jobs)
        if not handles:
            return
        submitit.SlurmJob.watcher.update()  # one sacct call for all registered jobs
        for name, h in handles.items():
            rec = jobs[name]
            raw = submitit.SlurmJob.watcher.get_state(h.job_id, mode="cache")
            state = slurm_state(raw)
            if state in TERMINAL:
                _finish(rec, h, state, raw)
                if rec.state == "cancelled" and rec.error and "no result" in rec.error:
                    rec.error = _dependency_problem(rec, jobs) or rec.error
            else:
                rec.state, rec.raw_state = state, raw

    def cancel(self, jobs: Dict[str, JobRecord]) -> None:
        ids = [r.job_id for r in jobs.values() if r.job_id and r.state not in TERMINAL]
        if ids:
            subprocess.run(["scancel", *ids], check=False)


class LocalBackend(Backend):
    """Run the jobs on this machine under submitit's LocalExecutor, respecting dependencies."""

    name = "local"

    def __init__(self, cluster, folder, make_callable):
        super().__init__(cluster, folder, make_callable)
        self.max_workers = max(1, int(cluster.get("max_workers", 1)))
        self.handles: Dict[str, submitit.Job] = {}
        # GPUs handed out to running jobs: each concurrent job sees only its own (submitit visible_gpus)
        gpus = cluster.get("visible_gpus")
        if gpus is None:
            import torch

            gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        self.free_gpus: List[int] = [int(g) for g in gpus]
        self.held_gpus: Dict[str, List[int]] = {}

    def start(self, jobs: Dict[str, JobRecord]) -> None:
        self.step(jobs)

    def _ready(self, rec: JobRecord, jobs: Mapping[str, JobRecord]) -> bool:
        return all(jobs[d].state == "done" for d in rec.after_ok) and all(
            jobs[d].state in TERMINAL for d in rec.after_any
        )

    def _launch(self, rec: JobRecord) -> None:
        res = _resources(self.cluster, rec.kind)
        ex = submitit.LocalExecutor(
            folder=self.folder / "logs" / "%j", max_num_timeout=int(self.cluster.get("max_num_timeout", 3))
        )
        gpus = self._gpus_wanted(rec)
        mine, self.free_gpus = self.free_gpus[:gpus], self.free_gpus[gpus:]
        ex.update_parameters(
            timeout_min=float(res.get("timeout_min", 60)),
            gpus_per_node=gpus,
            tasks_per_node=int(res.get("tasks_per_node") or 1),
            signal_delay_s=int(self.cluster.get("signal_delay_s", 30)),
            **({"visible_gpus": tuple(mine)} if gpus else {}),
        )
        h = ex.submit(self.make_callable(rec))
        self.handles[rec.name] = h
        self.held_gpus[rec.name] = mine
        rec.job_id, rec.state, rec.raw_state = h.job_id, "running", "RUNNING"
        rec.stdout, rec.stderr = str(h.paths.stdout), str(h.paths.stderr)
        log.debug("started %s (pid %s)", rec.name, rec.job_id)

    def step(self, jobs: Dict[str, JobRecord]) -> None:
        for name, h in list(self.handles.items()):
            raw = h.state
            if raw != "RUNNING":
                state = "cancelled" if raw == "INTERRUPTED" else "done"
                _finish(jobs[name], h, state, raw)
                del self.handles[name]
                self.free_gpus = sorted(self.free_gpus + self.held_gpus.pop(name, []))
        for rec in jobs.values():
            if rec.state != "pending":
                continue
            problem = _dependency_problem(rec, jobs)
            if problem:
                rec.state, rec.raw_state, rec.error = "cancelled", "DEPENDENCY", problem
            elif (
                self._ready(rec, jobs)
                and len(self.handles) < self.max_workers
                and self._gpus_wanted(rec) <= len(self.free_gpus)
            ):
                self._launch(rec)

    def _gpus_wanted(self, rec: JobRecord) -> int:
        want = int(_resources(self.cluster, rec.kind).get("gpus_per_node") or 0)
        total = len(self.free_gpus) + sum(len(g) for g in self.held_gpus.values())
        if want > total:
            raise ClusterError(
                f"cluster.gpus_per_node={want} but this machine has {total} GPU(s) for local jobs",
                f"use cluster.gpus_per_node<={total} (or 0 on a machine without GPUs)",
            )
        return want

    def cancel(self, jobs: Dict[str, JobRecord]) -> None:
        for name, h in self.handles.items():
            h.cancel()
            jobs[name].state, jobs[name].error = "cancelled", "cancelled by the user"
        for rec in jobs.values():
            if rec.state == "pending":
                rec.state, rec.error = "cancelled", "cancelled by the user"


BACKENDS = {"slurm": SlurmBackend, "local": LocalBackend}


def make_backend(cluster: Mapping[str, Any], folder: Path, make_callable) -> Backend:
    name = str(cluster.get("name", "local"))
    if name not in BACKENDS:
        raise ClusterError(f"unknown cluster backend '{name}'", "use cluster=slurm or cluster=local")
    return BACKENDS[name](cluster, folder, make_callable)
