"""``python -m bench sweep``: run a grid of cells as cluster jobs.

::

    python -m bench sweep method=dinov2,splat_distill task=synth_depth,synth_seg seed=0,1 --dry-run
    python -m bench sweep method=dinov2,splat_distill task=synth_depth,synth_seg cluster=slurm
    python -m bench sweep --status                 # latest sweep; or --status outputs/sweeps/<dir>

Planning (:func:`make_plan`): hydra-style comma lists (and ``range(...)``) expand to the cartesian
grid; every cell is composed and checked before anything is submitted (:func:`bench.preflight.preflight`:
values, writable directories, weights, datasets). A cell is skipped only when a record with the same
cell fingerprint (:mod:`bench.identity`: configuration + seed) exists, unless ``--force``; legacy
records (no fingerprint) never count.
Cells of training methods are grouped by their trained-backbone cache key
(:func:`bench.identity.backbone_key`): ONE training job per distinct backbone (none if it is
already cached), then the cells' evaluation jobs depend on it (``afterok``), one array per
training job. A method with a preparation stage (FiT3D stage I: one scene fit per task,
``cluster.stage1_per_task``) gets an array of it before its training job, which depends on every
task (``afterok``); scenes already fitted (cache key) get no task; cells of frozen methods form one array with no dependency. A final ``leaderboard``
job (``afterany`` on all others) rebuilds ``results/leaderboard.md``. ``force=true`` as an override
also retrains cached backbones (the evaluation jobs then reuse the fresh weights).

Missing prerequisites (data not prepared, weights / checkpoint files, Hub files) of every cell are
collected: ``--dry-run`` prints the plan and lists them as warnings; a real submission is refused with
all of them at once (:class:`bench.errors.MissingPrerequisites`).

Two sweeps of one grid: planning and submission hold ``<cache_dir>/sweeps/.plan.lock``, and every
submitted sweep leaves a claim there (its folder) until it is over; a sweep planned meanwhile skips the
cells that a live sweep runs (same results directory and fingerprint) and names it. A sweep without
``cluster.folder`` gets a new timestamped folder (``-1``, ``-2`` ... within one second).

The sweep directory (``cluster.folder``) holds ``sweep.json`` (the plan and every job's state,
scheduler id and log paths; rewritten atomically on every change) and submitit's logs under
``logs/<job id>/``. The driver waits for the jobs and prints each state change; on SLURM,
``--no-wait`` submits and returns (``--status`` then refreshes the states from ``sacct``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import inspect
import itertools
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from tabulate import tabulate

from .cluster import TERMINAL, EvalJob, JobRecord, PrepareJob, TableJob, TrainJob, make_backend, require_slurm
from .config import compose, stable_hash, to_container
from .errors import BenchError, DataMissingError, raise_all
from .io import write_json

STATE_FILE = "sweep.json"
SCHEMA = 1
IDENTITY_KEYS = {"method", "backbone", "task", "seed", "method.name", "backbone.name", "task.name"}


# --------------------------------------------------------------------------------------- planning
def expand_grid(overrides: Sequence[str]) -> List[List[str]]:
    """Hydra-style overrides with comma lists / ``range()`` -> one override list per grid point."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        axes = []
        for ov in parsed:
            if ov.is_sweep_override():
                key = ov.get_key_element()
                axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
            else:
                axes.append([ov.input_line])
    except HydraException as e:
        raise BenchError(
            f"cannot expand sweep overrides: {str(e).strip().splitlines()[0]}",
            "use comma lists (method=a,b) or range(start,stop) (seed=range(0,3))",
        ) from None
    grid, seen = [], set()
    for combo in itertools.product(*axes):
        if combo not in seen:
            seen.add(combo)
            grid.append(list(combo))
    return grid


@dataclass
class Cell:
    id: str
    method: str
    backbone: str
    task: str
    seed: int
    overrides: List[str]
    trains: bool
    cache_key: Optional[str]
    cached: bool  # its trained backbone is already in the cache
    results_dir: str
    skip: bool  # a record with this cell's fingerprint exists (and no --force)
    fingerprint: str = ""  # identity.cell of its records
    running_in: str = ""  # the folder of another live sweep that runs this cell (then skip is true)


@dataclass
class Plan:
    cells: List[Cell]
    jobs: Dict[str, JobRecord]
    overrides: List[str]
    cluster: Dict[str, Any]
    folder: str
    plugins: List[Tuple[str, str]] = field(default_factory=list)
    job_overrides: Dict[str, List[str]] = field(default_factory=dict)
    folder_given: bool = False  # cluster.folder was set (else a new folder under <output_dir>/sweeps)
    problems: List[BenchError] = field(default_factory=list)  # missing prerequisites (collect=True)
    cache_dir: str = ""  # where the live sweeps' claims are kept (the first cell's paths.cache_dir)

    @property
    def results_dirs(self) -> List[str]:
        return sorted({c.results_dir for c in self.cells})


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _plugins(cfgs) -> List[Tuple[str, str]]:
    """Modules that registered the grid's methods/tasks/backbones (imported first in every job)."""
    from .registry import BACKBONES, METHODS, TASKS

    out = {}
    for cfg in cfgs:
        for reg, name in ((METHODS, cfg.method.name), (TASKS, cfg.task.name), (BACKBONES, cfg.backbone.name)):
            if name not in reg:
                continue
            obj = reg.get(name)
            mod = obj.__module__
            try:
                path = inspect.getfile(obj)
            except TypeError:
                continue
            if mod == "__main__":  # a script that registered a method: import it under its own name
                mod = f"_bench_plugin_{Path(path).stem}"
            out[mod] = path
    return sorted(out.items())


def _recorded_cells(rdir: str) -> set:
    """Fingerprints of the fingerprinted (not legacy) records in the results directory ``rdir``."""
    from .records import is_legacy, load_records, runs_dir

    if not runs_dir(rdir).is_dir():
        return set()
    return {r["identity"]["cell"] for r in load_records(rdir) if not is_legacy(r)}


def _cell_id(cfg, point: Sequence[str], varying: set, taken: set) -> str:
    """``<method>-<backbone>-<task>-s<seed>``, with a short hash of the point's varying overrides (or of the
    whole point when the id is taken)."""
    cid = f"{cfg.method.name}-{cfg.backbone.name}-{cfg.task.name}-s{int(cfg.seed)}"
    extra = sorted(ov for ov in point if _key(ov) in varying)
    if extra or cid in taken:
        cid += "-" + stable_hash(extra or point, 6)
    return cid


def _plan_cells(grid, cfgs, rerun: bool, busy, problems: List[BenchError]) -> Tuple[List[Cell], Dict[str, Any]]:
    """``(cells, {cell id: config})``: one cell per grid point, each preflighted (its missing prerequisites
    added to ``problems``); a cell already recorded (unless ``rerun``) or running in a live sweep is skipped."""
    from .identity import cell_identity
    from .preflight import preflight
    from .registry import METHODS, TASKS
    from .runner import MODEL_FILE, backbone_dir

    varying = {_key(vals[0]) for vals in zip(*grid) if len(set(vals)) > 1} - IDENTITY_KEYS
    done: Dict[str, set] = {}  # results dir -> fingerprints of its records
    cells, ids = [], set()
    cfg_of: Dict[str, Any] = {}
    for point, cfg in zip(grid, cfgs):
        method = METHODS.get(cfg.method.name)
        trains = bool(getattr(method, "trains", False))
        preflight(cfg, method(), TASKS.get(cfg.task.name)(), problems)  # every cell, before anything is submitted
        rdir = str(cfg.paths.results_dir)
        if rdir not in done:
            done[rdir] = _recorded_cells(rdir)
        fingerprint = cell_identity(cfg)["cell"]
        running_in = (busy or {}).get((rdir, fingerprint), "")
        cid = _cell_id(cfg, point, varying, ids)
        ids.add(cid)
        cfg_of[cid] = cfg
        cells.append(
            Cell(
                id=cid,
                method=cfg.method.name,
                backbone=cfg.backbone.name,
                task=cfg.task.name,
                seed=int(cfg.seed),
                overrides=list(point),
                trains=trains,
                cache_key=backbone_dir(cfg).name if trains else None,
                cached=trains and (backbone_dir(cfg) / MODEL_FILE).exists(),
                results_dir=rdir,
                skip=bool(running_in) or (not rerun and fingerprint in done[rdir]),
                fingerprint=fingerprint,
                running_in=running_in,
            )
        )
    return cells, cfg_of


def _plan_jobs(cells: List[Cell], cfg_of, force: bool, retrain: bool, problems: List[BenchError]):
    """``(jobs, job overrides)``: a training job per backbone to train (after its preparation array, if
    any), an evaluation job per cell to run, and the leaderboard job after all of them."""
    jobs: Dict[str, JobRecord] = {}
    job_overrides: Dict[str, List[str]] = {}
    todo = [c for c in cells if not c.skip]
    for key in dict.fromkeys(c.cache_key for c in todo if c.trains):  # one training job per backbone
        group = [c for c in todo if c.cache_key == key]
        if group[0].cached and not retrain:
            continue
        name = f"train:{key}"
        try:
            prep = _prepare_jobs(cfg_of[group[0].id], key, group)
        except DataMissingError as e:  # only with collect: the method's training data is missing
            problems.append(e)
            prep = []
        for rec in prep:
            jobs[rec.name] = rec
            job_overrides[rec.name] = group[0].overrides
        jobs[name] = JobRecord(
            name=name, kind="train", cells=[c.id for c in group], array="train", after_ok=[r.name for r in prep]
        )
        job_overrides[name] = group[0].overrides
    for c in todo:
        name, train = f"eval:{c.id}", f"train:{c.cache_key}"
        after = [train] if train in jobs else []
        jobs[name] = JobRecord(
            name=name, kind="eval", cells=[c.id], array=f"eval@{train}" if after else "eval", after_ok=after
        )
        job_overrides[name] = c.overrides + (["force=false"] if retrain and c.trains else [])
        if force and not retrain and not c.trains:  # --force on a frozen cell: also re-extract its features
            job_overrides[name].append("force=true")
    if jobs:
        jobs["leaderboard"] = JobRecord(name="leaderboard", kind="table", cells=[], array="table", after_any=list(jobs))
    return jobs, job_overrides


def make_plan(
    overrides: Sequence[str],
    force: bool = False,
    busy: Optional[Mapping[Tuple[str, str], str]] = None,
    collect: bool = False,
) -> Plan:
    """Expand ``overrides`` into cells and the jobs that run them (see the module docstring). ``busy``:
    (results dir, fingerprint) -> folder of a live sweep that runs that cell (:func:`busy_cells`); such
    cells are skipped. ``collect``: missing prerequisites of every cell are gathered in ``plan.problems``
    instead of raised (a dry run shows them as warnings)."""
    grid = expand_grid(overrides)
    cfgs = [compose(point) for point in grid]
    retrain = bool(cfgs[0].get("force", False))
    problems: List[BenchError] = []
    cells, cfg_of = _plan_cells(grid, cfgs, force or retrain, busy, problems)
    if not collect:
        raise_all(problems)  # every missing prerequisite of the grid at once, before anything is submitted
    jobs, job_overrides = _plan_jobs(cells, cfg_of, force, retrain, problems)
    base = cfgs[0]
    return Plan(
        cells=cells,
        jobs=jobs,
        overrides=list(overrides),
        cluster=to_container(base.cluster),
        folder=str(
            base.cluster.get("folder")
            or Path(base.paths.output_dir) / "sweeps" / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        ),
        plugins=_plugins(cfgs),
        job_overrides=job_overrides,
        folder_given=any(_key(ov) == "cluster.folder" for ov in overrides),  # else the config's timestamped one
        problems=list({p.line(): p for p in problems}.values()),
        cache_dir=str(base.paths.cache_dir),
    )


def _prepare_jobs(cfg, key: str, group: Sequence[Cell]) -> List[JobRecord]:
    """The preparation array of a training job, for methods that have one (``prepare_shards``; FiT3D:
    stage I, ``cluster.stage1_per_task`` scenes per task, scenes already fitted left out; 0 = none, the
    training job fits the scenes itself, one after the other)."""
    from .method_variants import apply_per_task
    from .registry import METHODS

    method = METHODS.get(cfg.method.name)
    per_task = int(cfg.cluster.get("stage1_per_task", 1) or 0)
    if not hasattr(method, "prepare_shards") or per_task <= 0:
        return []
    kind = str(getattr(method, "prepare_name", "prepare"))
    shards, _ = method.prepare_shards(apply_per_task(cfg), per_task)
    return [
        JobRecord(
            name=f"{kind}:{key}/{items[0] if per_task == 1 else i}",
            kind=kind,
            cells=[c.id for c in group],
            array=f"{kind}@{key}",
            items=list(items),
        )
        for i, items in enumerate(shards)
    ]


def plan_table(plan: Plan) -> str:
    """The plan as text: one row per job (kind, array, dependencies, cells), then the skipped cells."""
    rows = []
    for j in plan.jobs.values():
        after = (
            ", ".join(
                [f"afterok {d}" for d in j.after_ok]
                + ([f"afterany ({len(j.after_any)} job{'s' * (len(j.after_any) > 1)})"] if j.after_any else [])
            )
            or "-"
        )
        what = ", ".join(j.cells) or "(rebuilds leaderboard)"
        if j.items:
            what = f"{j.kind} of {', '.join(j.items)} (for {what})"
        rows.append([j.name, j.kind, j.array, after, what])
    n_skip = sum(c.skip for c in plan.cells)
    out = [
        f"sweep: {len(plan.cells)} cells, {len(plan.cells) - n_skip} to run, {n_skip} skipped (record exists"
        + (" or running in another sweep" if any(c.running_in for c in plan.cells) else "")
        + "); "
        f"{len(plan.jobs)} jobs on cluster={plan.cluster.get('name')}; folder {plan.folder}"
    ]
    if rows:
        out.append(tabulate(rows, headers=["job", "kind", "array", "depends on", "cells"], tablefmt="github"))
    running = [c for c in plan.cells if c.running_in]
    for folder in dict.fromkeys(c.running_in for c in running):
        out.append(
            f"skipped, running in the live sweep {folder}: "
            + ", ".join(c.id for c in running if c.running_in == folder)
            + f" (follow it: python -m bench sweep --status {folder})"
        )
    if n_skip > len(running):
        out.append(
            "skipped (use --force to re-run): " + ", ".join(c.id for c in plan.cells if c.skip and not c.running_in)
        )
        out.append(
            "(a skipped cell has a record of the same configuration and seed; paths.results_dir=<new dir> "
            "reproduces the grid into a separate results directory)"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------------------- state file
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Sweep:
    """A sweep on disk: the plan plus live job states, saved atomically to ``<folder>/sweep.json``."""

    def __init__(self, folder: Path, data: Dict[str, Any]):
        self.folder, self.data = Path(folder), data
        self.jobs = {d["name"]: JobRecord.from_dict(d) for d in data["jobs"]}

    @classmethod
    def create(cls, plan: Plan) -> "Sweep":
        folder = Path(plan.folder)
        if plan.folder_given:
            if (folder / STATE_FILE).exists():
                raise BenchError(
                    f"cluster.folder={folder} already holds a sweep",
                    "pass a new cluster.folder, or leave cluster.folder unset: each sweep then gets a new folder "
                    "under <output_dir>/sweeps",
                )
            folder.mkdir(parents=True, exist_ok=True)
        else:  # the default, named by the second it was planned: two sweeps of one second get -1, -2, ...
            folder.parent.mkdir(parents=True, exist_ok=True)
            base, i = folder, 0
            while True:
                try:
                    folder.mkdir()
                    break
                except FileExistsError:
                    i += 1
                    folder = base.with_name(f"{base.name}-{i}")
            plan.folder = str(folder)
        data = {
            "schema": SCHEMA,
            "created": _now(),
            "cwd": os.getcwd(),
            "overrides": plan.overrides,
            "cluster": plan.cluster,
            "driver": {"host": socket.gethostname(), "pid": os.getpid()},
            "plugins": plan.plugins,
            "results_dirs": plan.results_dirs,
            "cells": [c.__dict__ for c in plan.cells],
            "job_overrides": plan.job_overrides,
            "jobs": [j.to_dict() for j in plan.jobs.values()],
        }
        sweep = cls(folder, data)
        sweep.save()
        if plan.cache_dir:  # other sweeps planned from now on skip the cells this one runs
            claim = claims_dir(plan.cache_dir) / f"{stable_hash(str(folder.absolute()), 12)}.json"
            write_json(claim, {"folder": str(folder.absolute())})
            sweep.data["claim"] = str(claim)
            sweep.save()
        return sweep

    def release(self) -> None:
        """Drop this sweep's claim on its cells (it has finished)."""
        if self.data.get("claim"):
            Path(self.data["claim"]).unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: str | Path) -> "Sweep":
        import json

        path = Path(folder) / STATE_FILE
        if not path.exists():
            raise BenchError(f"no sweep state file at {path}", "pass the sweep directory printed by `bench sweep`")
        return cls(Path(folder), json.loads(path.read_text()))

    def save(self) -> None:
        self.data["jobs"] = [j.to_dict() for j in self.jobs.values()]
        self.data["updated"] = _now()
        write_json(self.folder / STATE_FILE, self.data)

    def make_callable(self, rec: JobRecord):
        cwd, plugins = self.data["cwd"], [tuple(p) for p in self.data["plugins"]]
        if rec.kind == "table":
            return TableJob(results_dirs=list(self.data["results_dirs"]), cwd=cwd)
        if rec.kind not in ("train", "eval"):  # a method's preparation array (fit3d: stage I)
            return PrepareJob(
                overrides=list(self.data["job_overrides"][rec.name]), cwd=cwd, plugins=plugins, items=list(rec.items)
            )
        cls = TrainJob if rec.kind == "train" else EvalJob
        return cls(overrides=list(self.data["job_overrides"][rec.name]), cwd=cwd, plugins=plugins)

    def backend(self):
        return make_backend(self.data["cluster"], self.folder, self.make_callable)

    def finished(self) -> bool:
        return all(j.state in TERMINAL for j in self.jobs.values())


def status_table(sweep: Sweep) -> str:
    rows = [[j.name, j.kind, j.state, j.job_id or "-", j.stderr or "-", j.error or ""] for j in sweep.jobs.values()]
    counts = {
        s: sum(j.state == s for j in sweep.jobs.values()) for s in ("pending", "running", "done", "failed", "cancelled")
    }
    skipped = [c["id"] for c in sweep.data["cells"] if c["skip"]]
    head = (
        f"sweep {sweep.folder} (cluster={sweep.data['cluster'].get('name')}): "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + (f"; {len(skipped)} cells skipped (record exists)" if skipped else "")
    )
    return head + "\n" + tabulate(rows, headers=["job", "kind", "state", "id", "log", "error"], tablefmt="github")


def _driver_alive(sweep: Sweep) -> bool:
    drv = sweep.data.get("driver", {})
    if drv.get("host") != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(int(drv["pid"]), 0)
        return True
    except (OSError, KeyError, ValueError):
        return False


def refresh(sweep: Sweep) -> Sweep:
    """Update job states from the scheduler (SLURM) or notice a dead local driver; save."""
    if sweep.finished():
        return sweep
    if sweep.data["cluster"].get("name") == "slurm":
        sweep.backend().step(sweep.jobs)
    elif not _driver_alive(sweep) and sweep.data["driver"]["pid"] != os.getpid():
        for j in sweep.jobs.values():
            if j.state not in TERMINAL:
                j.state, j.error = (
                    "failed",
                    (
                        f"the sweep driver (pid {sweep.data['driver']['pid']}) exited before "
                        "this job finished; re-run the sweep (finished cells are skipped)"
                    ),
                )
    sweep.save()
    return sweep


def latest_sweep(overrides: Sequence[str]) -> Path:
    cfg = compose(expand_grid(overrides)[0])
    root = Path(cfg.paths.output_dir) / "sweeps"
    found = sorted(root.glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise BenchError(f"no sweep found under {root}", "pass the sweep directory: --status <dir>")
    return found[-1].parent


# --------------------------------------------------------------------------------------- live sweeps
def claims_dir(cache_dir: str | Path) -> Path:
    """``<cache_dir>/sweeps/``: one claim file per live sweep (its folder) and the planner's lock."""
    return Path(cache_dir) / "sweeps"


@contextlib.contextmanager
def planner_lock(cache_dir: str | Path):
    """One sweep plans (and writes its claim) at a time: a second sweep started meanwhile waits for the
    first to be planned and submitted, then skips the cells the first one runs."""
    d = claims_dir(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".plan.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another sweep is being planned; waiting for it", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def busy_cells(cache_dir: str | Path) -> Dict[Tuple[str, str], str]:
    """(results dir, fingerprint) -> folder, for every cell that a live sweep (claim under
    :func:`claims_dir`, not finished) runs. Claims of finished or vanished sweeps are removed."""
    import json

    out: Dict[Tuple[str, str], str] = {}
    for claim in sorted(claims_dir(cache_dir).glob("*.json")):
        try:
            folder = json.loads(claim.read_text())["folder"]
            live = Sweep.load(folder)
            if not live.finished() and live.data["cluster"].get("name") == "slurm":
                live = refresh(live)  # the scheduler's states (as --status); a local sweep is its driver's
        except (OSError, ValueError, KeyError, TypeError, BenchError):
            claim.unlink(missing_ok=True)  # a torn claim or a deleted sweep folder: nothing runs there
            continue
        if live.finished() or (live.data["cluster"].get("name") != "slurm" and not _driver_alive(live)):
            claim.unlink(missing_ok=True)  # over, or its local driver died (its jobs died with it)
            continue
        for c in live.data["cells"]:
            if not c.get("skip"):
                out[(str(c["results_dir"]), str(c.get("fingerprint", "")))] = str(folder)
    return out


# --------------------------------------------------------------------------------------- running
def run(
    plan: Plan, wait: bool = True, poll_s: Optional[float] = None, echo=print, sweep: Optional[Sweep] = None
) -> Optional[Sweep]:
    """Submit/run the plan's jobs; with ``wait`` block until all are over, reporting state changes.

    Returns the :class:`Sweep` (None when every cell already has a record: nothing is written).
    ``sweep``: already created from ``plan`` (:func:`main` creates it under :func:`planner_lock`)."""
    if sweep is None and not plan.jobs:
        _say_nothing_to_run(plan, echo)
        return None
    if sweep is None:
        if plan.cluster.get("name") == "slurm":
            require_slurm()  # before anything is written
        sweep = Sweep.create(plan)
    backend = sweep.backend()
    try:
        backend.start(sweep.jobs)
    finally:
        sweep.save()
    if not wait and not backend.waits:
        echo(f"submitted {len(sweep.jobs)} jobs; follow them with: python -m bench sweep --status {sweep.folder}")
        return sweep
    _follow(sweep, backend, float(poll_s if poll_s is not None else plan.cluster.get("poll_s", 10)), echo)
    return sweep


def _say_nothing_to_run(plan: Plan, echo) -> None:
    """Why a plan has no job: its cells run in live sweeps, or every cell has a record."""
    elsewhere = sorted({c.running_in for c in plan.cells if c.running_in})
    if elsewhere:
        echo(
            f"nothing to run here: {sum(bool(c.running_in) for c in plan.cells)} cell(s) are running in the "
            f"live sweep(s) {', '.join(elsewhere)} (python -m bench sweep --status <folder> follows them), the "
            "others have a record"
        )
        return
    echo(
        f"nothing to run: every cell has a record of the same configuration in {', '.join(plan.results_dirs)} "
        "(--force re-runs them; paths.results_dir=<new dir> reproduces them into a separate results directory, "
        "e.g. BENCH_RESULTS=results_repro)"
    )


def _follow(sweep: Sweep, backend, poll_s: float, echo) -> None:
    """Report the jobs' state changes every ``poll_s`` seconds until all are over; on Ctrl-C cancel local
    jobs (a cluster's keep running) and re-raise."""
    seen = {n: None for n in sweep.jobs}
    try:
        while True:
            for n, j in sweep.jobs.items():
                if j.state != seen[n]:
                    seen[n] = j.state
                    extra = f" [{j.job_id}]" if j.job_id else ""
                    if j.state in ("failed", "cancelled"):
                        extra += f": {j.error} (log: {j.stderr})"
                    echo(f"{time.strftime('%H:%M:%S')} {n} {j.state}{extra}")
            if sweep.finished():
                sweep.release()
                break
            time.sleep(poll_s)
            backend.step(sweep.jobs)
            sweep.save()
    except KeyboardInterrupt:
        if backend.waits:
            backend.cancel(sweep.jobs)
            sweep.save()
            sweep.release()
            echo("interrupted: local jobs cancelled")
        else:
            echo(f"stopped waiting; the jobs keep running: python -m bench sweep --status {sweep.folder}")
        raise


# --------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", help="hydra-style overrides; comma lists sweep (method=dinov2,splat_distill seed=0,1)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan (jobs, dependencies, cells) only")
    parser.add_argument("--force", action="store_true", help="re-run cells that already have a record")
    parser.add_argument(
        "--status",
        nargs="?",
        const="",
        default=None,
        metavar="SWEEP_DIR",
        help="show job states (default: the latest sweep under <output_dir>/sweeps)",
    )
    parser.add_argument("--no-wait", action="store_true", help="cluster=slurm: submit and return")
    parser.add_argument("--poll", type=float, default=None, help="seconds between state checks (cluster.poll_s)")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m bench sweep``; returns the exit code (1 if any job did not finish)."""
    if args.status is not None:
        if "=" in args.status:  # `--status key=value ...`: an override, not a directory
            args.overrides, args.status = [args.status, *args.overrides], ""
        folder = Path(args.status) if args.status else latest_sweep(args.overrides)
        sweep = refresh(Sweep.load(folder))
        print(status_table(sweep))
        return 0
    cache = compose(expand_grid(args.overrides)[0]).paths.cache_dir
    if args.dry_run:  # the plan, and every missing prerequisite as a warning: nothing is written
        plan = make_plan(args.overrides, force=args.force, busy=busy_cells(cache), collect=True)
        print(plan_table(plan))
        for p in plan.problems:
            print(f"warning: {p.line()}", file=sys.stderr)
        if plan.problems:
            print(
                f"warning: {len(plan.problems)} missing prerequisite(s) above: a real submission is refused "
                "until they are in place",
                file=sys.stderr,
            )
        return 0
    with planner_lock(cache):  # a second sweep of the same grid waits here, then skips what this one runs
        plan = make_plan(args.overrides, force=args.force, busy=busy_cells(cache))
        print(plan_table(plan))
        created = None
        if plan.jobs:
            if plan.cluster.get("name") == "slurm":
                require_slurm()  # before anything is written
            created = Sweep.create(plan)
    sweep = run(plan, wait=not args.no_wait, poll_s=args.poll, sweep=created)
    if sweep is not None and sweep.finished():
        print(status_table(sweep))
        lb = [str(Path(d) / "leaderboard.md") for d in sweep.data["results_dirs"]]
        if sweep.jobs["leaderboard"].state == "done":
            print("leaderboard: " + ", ".join(lb))
        return 0 if all(j.state == "done" for j in sweep.jobs.values()) else 1
    return 0


if __name__ == "__main__":  # pragma: no cover - the CLI wires `python -m bench sweep`
    _p = argparse.ArgumentParser(prog="bench sweep")
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
