"""Run one cell: obtain a backbone (pretrained, trained, or cached), evaluate a task, record it.

::

    cfg = bench.config.compose(["method=dinov2", "task=synth_depth"])
    record = bench.runner.run_cell(cfg)

Trained backbones are cached under ``<cache_dir>/backbones/<key>/`` where ``key`` hashes
everything that determines the weights (:func:`bench.identity.backbone_key`). The
method trains (and resumes) inside that directory; when it returns, the runner saves
``model.safetensors`` (timm layout) there atomically, so a second task for the same
method reuses it instead of training again. The workdir is locked while a process trains in it
(``<cache_dir>/backbones/.<key>.lock``): a second identical cell waits, then reuses the result (or,
if the first died, resumes from its last checkpoint). Each training segment (a first run, every
resume) is listed in ``segments.json``; ``train_info.json`` sums them.

A cell is checked before any work (:mod:`bench.preflight`); its run directory holds ``run.log``
(the log of the run), ``record.json`` (written before the record goes to the results directory,
so a late failure there loses nothing) and, if it failed, ``error.txt``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from omegaconf import DictConfig, OmegaConf

from . import records
from .config import to_container
from .distributed import resolve_device
from .errors import BenchError, CheckpointError
from .identity import backbone_key, cell_identity
from .io import check_space, workdir_lock, write_failure, write_json, write_text
from .preflight import check_image_size, preflight
from .method_variants import apply_per_task
from .records import train_diagnostics
from .registry import METHODS, TASKS
from .seed import seed_everything

log = logging.getLogger("bench")

MODEL_FILE = "model.safetensors"
SEGMENTS_FILE = "segments.json"
LOG_FILE = "run.log"
ERROR_FILE = "error.txt"
# float32 copies of the parameters a training run writes: model.safetensors, and the last 2 training
# checkpoints (bench.train.Checkpointer keep_last=2) of the weights and Adam's two moments each
CKPT_COPIES = 1 + 2 * 3


def backbone_dir(cfg: DictConfig) -> Path:
    # keyed by the method variant of the task's kind (method.per_task), so a sweep groups cells by it
    return Path(cfg.paths.cache_dir) / "backbones" / backbone_key(apply_per_task(cfg))


def _method(cfg: DictConfig):
    return METHODS.get(cfg.method.name)()


def _task(cfg: DictConfig):
    return TASKS.get(cfg.task.name)()


def obtain_backbone(cfg: DictConfig, run_dir: Path | None = None) -> Tuple[Any, Dict[str, Any]]:
    """Build the configured backbone and apply the method (train, reuse the cache, or load weights).

    Returns ``(backbone, checkpoint_ref)`` where ``checkpoint_ref`` says where the weights came from.
    """
    from .backbones import build_backbone

    seed_everything(int(cfg.seed))
    method = _method(cfg)
    backbone = build_backbone(cfg.backbone)
    check_image_size(cfg, int(getattr(backbone, "patch_size", 1) or 1))  # before any training
    if not getattr(method, "trains", False):
        return _pretrained(method, backbone, cfg, Path(run_dir) if run_dir is not None else Path(cfg.run_dir))

    from . import distributed as dist

    dist.init(resolve_device(cfg), str((cfg.get("distributed") or {}).get("backend", "auto")))
    workdir = backbone_dir(cfg)
    model_path = workdir / MODEL_FILE
    force = bool(cfg.get("force", False))
    with workdir_lock(workdir):
        if dist.broadcast_object(model_path.exists() and not force):  # rank 0 decides for all
            log.info("reusing trained backbone %s", model_path)
            _load_cached(backbone, model_path)
            if hasattr(method, "restore"):  # e.g. MEF: re-attach the feature head saved beside the weights
                backbone = method.restore(backbone, cfg, workdir)
            return backbone, _trained_ref(workdir, model_path, reused=True)
        backbone = _train_and_save(method, backbone, cfg, workdir, model_path, force)
    return backbone, _trained_ref(workdir, model_path, reused=False)


def _pretrained(method, backbone, cfg: DictConfig, workdir: Path) -> Tuple[Any, Dict[str, Any]]:
    """A method that does not train: load its weights (rank 0 first) and say where they came from."""
    from . import distributed as dist

    with dist.main_first():  # rank 0 downloads a Hub checkpoint before the other ranks read it
        backbone = method.fit(backbone, cfg, workdir)
    ref = {"kind": "pretrained", "backbone_weights": to_container(cfg.backbone).get("weights")}
    ref.update(getattr(method, "checkpoint_ref", None) or {})
    return backbone, ref


def _trained_ref(workdir: Path, model_path: Path, reused: bool) -> Dict[str, Any]:
    """The checkpoint reference of a trained (or reused) backbone in ``workdir``."""
    return {
        "kind": "trained",
        "cache_key": workdir.name,
        "path": str(model_path),
        "reused": reused,
        **_train_time(workdir),
    }


def _train_and_save(method, backbone, cfg: DictConfig, workdir: Path, model_path: Path, force: bool):
    """Train in ``workdir`` (the caller holds its lock); rank 0 saves the backbone and the training info.

    Returns the backbone every rank continues with (the saved weights, :func:`_same_as_saved`).
    """
    from . import distributed as dist

    segments: List[Dict[str, Any]] = []
    if dist.is_main():  # several ranks train together; rank 0 alone writes
        _prepare_workdir(backbone, cfg, workdir)
        segments = _start_segment(workdir, fresh=force)
    backbone = method.fit(backbone, cfg, workdir)
    if dist.is_main():
        _save_trained(backbone, model_path, workdir)
        segments[-1]["end"] = time.time()
        write_json(workdir / SEGMENTS_FILE, segments)
        write_json(
            workdir / "train_info.json",
            {
                **_train_info(workdir.name, segments),
                **(getattr(method, "train_info", None) or {}),
                "distributed": dist.describe_cfg(cfg),
            },
        )
    dist.barrier()  # the cached model exists for every rank once this returns
    return _same_as_saved(backbone, method, cfg, workdir, model_path)


def _prepare_workdir(backbone, cfg: DictConfig, workdir: Path) -> None:
    """Check there is room for the training's files, create ``workdir`` and write its ``config.yaml``."""
    n = sum(p.numel() for p in backbone.parameters())
    check_space(
        workdir,
        n * 4 * CKPT_COPIES,
        f"training {cfg.method.name} ({n:,} parameters: model.safetensors and the last 2 checkpoints "
        "with optimizer state)",
        "free space there, or point BENCH_CACHE (paths.cache_dir) at a file system with room",
    )
    workdir.mkdir(parents=True, exist_ok=True)
    write_text(workdir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _save_trained(backbone, model_path: Path, workdir: Path) -> None:
    """Save the trained backbone; a full or read-only disk is a BenchError that keeps the checkpoints."""
    from .backbones import save_backbone

    try:
        save_backbone(backbone, model_path)
    except (OSError, RuntimeError) as e:
        why = write_failure(e)
        if why is None:
            raise
        raise BenchError(
            f"the trained backbone could not be saved to {model_path} ({why}); the training "
            f"checkpoints are kept in {workdir}",
            f"free space (or make {workdir} writable), then run the same command again: it resumes "
            "from the last checkpoint and saves the backbone",
        ) from None


def _load_cached(backbone, model_path: Path) -> None:
    from .backbones import load_backbone_weights

    try:
        load_backbone_weights(backbone, model_path)
    except CheckpointError as e:
        raise CheckpointError(
            f"the cached trained backbone {model_path} cannot be loaded ({e.problem})",
            f"delete {model_path} (or run with force=true) to train it again",
        ) from None


def _same_as_saved(backbone, method, cfg, workdir: Path, model_path: Path):
    """On every rank of a multi-rank training: the trained backbone, verified equal (weights hash) to the one
    rank 0 saved; a rank whose copy differs loads rank 0's saved file instead (and says so), so that every
    rank evaluates exactly the recorded backbone. One process: ``backbone`` itself."""
    from . import distributed as dist
    from .checkpoint import weights_hash

    if not dist.is_distributed():
        return backbone
    mine = weights_hash(backbone)
    saved = dist.broadcast_object(mine)  # rank 0's: the backbone it saved to model_path
    if mine == saved:
        return backbone
    log.warning(
        "rank %d: trained backbone %s differs from rank 0's saved %s; evaluating %s",
        dist.rank(),
        mine,
        saved,
        model_path,
    )
    _load_cached(backbone, model_path)
    if hasattr(method, "restore"):
        backbone = method.restore(backbone, cfg, workdir)
    if weights_hash(backbone) != saved:
        raise BenchError(
            f"rank {dist.rank()} cannot reproduce rank 0's trained backbone {model_path} (weights hash "
            f"{weights_hash(backbone)} != {saved})",
            "run the cell with one process, or report the ranks' divergence",
        )
    return backbone


def _newest_mtime(workdir: Path) -> float:
    newest = 0.0
    for dirpath, _, files in os.walk(workdir):
        for name in files:
            if name != SEGMENTS_FILE:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _start_segment(workdir: Path, fresh: bool) -> List[Dict[str, Any]]:
    """Close a segment left open by a process that died (its end = the newest file it wrote) and open
    a new one."""
    import json

    path = workdir / SEGMENTS_FILE
    segments: List[Dict[str, Any]] = []
    if path.exists() and not fresh:
        with contextlib.suppress(OSError, ValueError):
            segments = list(json.loads(path.read_text()))
    for seg in segments:
        if "end" not in seg:
            seg["end"], seg["interrupted"] = max(float(seg["start"]), _newest_mtime(workdir)), True
    segments.append({"start": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    write_json(path, segments)
    return segments


def _train_info(key: str, segments: List[Dict[str, Any]]) -> Dict[str, Any]:
    spans = [round(float(s["end"]) - float(s["start"]), 3) for s in segments]
    return {"wall_time_s": round(sum(spans), 3), "segments": len(spans), "segment_wall_time_s": spans, "cache_key": key}


def _train_time(workdir: Path) -> Dict[str, Any]:
    import json

    try:
        info = json.loads((workdir / "train_info.json").read_text())
        out = {"train_wall_time_s": float(info["wall_time_s"]), "train_segments": int(info.get("segments", 1))}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if isinstance(info.get("training"), dict):  # e.g. SnD: training precision (tf32), accumulate, deviations
        out["train_run"] = info["training"]
    diag = train_diagnostics(info)
    return {**out, "train_diagnostics": diag} if diag else out


def train(cfg: DictConfig) -> Path:
    """Train (or resume, or reuse) the backbone of ``cfg``'s method; return its cache directory."""
    cfg = apply_per_task(cfg)  # the method variant for the task's kind (method.per_task)
    if not getattr(_method(cfg), "trains", False):
        raise BenchError(f"method '{cfg.method.name}' does not train", "use `bench run` to evaluate it")
    from .preflight import check_writable, validate

    validate(cfg, trains=True)
    check_writable(Path(cfg.paths.cache_dir) / "backbones", "cache_dir")
    obtain_backbone(cfg)
    return backbone_dir(cfg)


def _unique_dir(path: Path) -> Path:
    out, i = path, 1
    while out.exists():
        out = path.with_name(f"{path.name}-{i}")
        i += 1
    out.mkdir(parents=True)
    return out


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Log of the run in ``run_dir/run.log``; on failure the error (with its traceback) goes to
    ``run_dir/error.txt`` and the log."""
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    except BaseException as e:
        line = e.line() if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
        log.error("run failed: %s", line)
        with contextlib.suppress(OSError):  # a full disk must not hide the error itself
            write_text(run_dir / ERROR_FILE, f"{line}\n\n{traceback.format_exc()}")
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _protocol_summary(cfg: DictConfig) -> Dict[str, Any]:
    """Protocol name, version and active deviations (tasks.protocol_record); {} for protocol-less tasks."""
    if "protocols" not in cfg.task:
        return {}
    from tasks.protocol_record import protocol_summary

    return protocol_summary(cfg)


def run_cell(cfg: DictConfig) -> Dict[str, Any] | None:
    """Run one (method, backbone, task) cell and write its record. Returns the record (None on the
    ranks other than 0 of a multi-rank run: they train with rank 0, which evaluates and records)."""
    t_start = time.time()
    cfg = apply_per_task(cfg)  # the method variant for the task's kind (method.per_task)
    method, task = _method(cfg), _task(cfg)  # unknown names fail before any work
    preflight(cfg, method, task)  # bad values, unwritable directories, missing data: before any work
    identity = cell_identity(cfg)
    device = resolve_device(cfg)
    from . import distributed as dist

    dist.init(device, str((cfg.get("distributed") or {}).get("backend", "auto")))
    if not dist.is_main():  # a multi-rank run: every rank trains, rank 0 alone writes
        if getattr(task, "data_parallel", False):  # the probe trains on all ranks; rank 0 tests
            backbone, _ = obtain_backbone(cfg)
            _evaluate(cfg, task, _eval_backbone(cfg, backbone, device), device, Path(cfg.run_dir) / "task")
        elif getattr(method, "trains", False):
            obtain_backbone(cfg)
        return None
    run_dir = _unique_dir(Path(cfg.run_dir))
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    with run_log(run_dir):
        log.info(
            "cell %s x %s x %s (seed %s), recipe %s, fingerprint %s",
            cfg.method.name,
            cfg.backbone.name,
            cfg.task.name,
            cfg.seed,
            identity["label"],
            identity["cell"],
        )
        try:
            return _run_cell(cfg, method, task, identity, device, run_dir, t_start)
        except (OSError, RuntimeError) as e:
            why = write_failure(e)
            if why is None:
                raise
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise BenchError(
                f"a write failed during the run: {why}{where}; what the run produced is kept: its run directory "
                f"{run_dir}, and the trained backbones, feature cache and probe checkpoints under {cfg.paths.cache_dir}",
                "free space (or make the directory writable), then run the same command again: it resumes from "
                "what is kept",
            ) from None


def _eval_backbone(cfg: DictConfig, backbone, device: str):
    """The network the task probes: the method's backbone, or FiT3D's [original, fine-tuned] concat."""
    protocol = to_container(cfg.task.get("protocol", {})) or {}
    if protocol.get("concat_original"):
        from .backbones import ConcatBackbone, build_backbone

        seed_everything(int(cfg.seed))  # same state as obtain_backbone's build: same init for random-init nets
        backbone = ConcatBackbone(build_backbone(cfg.backbone), backbone)
    return backbone.to(device).eval()


def _evaluate(cfg: DictConfig, task, backbone, device: str, workdir: Path):
    """``task.evaluate`` from the seeded state, under the run's precision (bf16-mixed: feature extraction
    and the probe under autocast); a fix naming ``<protocol>`` names the run's protocol."""
    seed_everything(int(cfg.seed))
    from .distributed import autocast

    try:
        with autocast(cfg.get("precision", "32"), device):
            return task.evaluate(backbone, cfg, workdir)
    except BenchError as e:  # name the key this run can override: task.protocols.<its protocol>.schedule.*
        if "<protocol>" not in (e.fix or "") + e.problem:
            raise
        proto = str(cfg.get("protocol", "linear"))
        raise type(e)(e.problem.replace("<protocol>", proto), (e.fix or "").replace("<protocol>", proto)) from None


def _describe_distributed(cfg: DictConfig) -> Dict[str, Any]:
    from . import distributed as dist

    return dist.describe_cfg(cfg)


def _run_cell(cfg, method, task, identity, device, run_dir: Path, t_start: float) -> Dict[str, Any]:
    t0 = time.time()
    backbone, ckpt = obtain_backbone(cfg, run_dir)
    t_fit = time.time() - t0
    if ckpt.get("kind") == "trained" and not ckpt.get("reused"):
        t_fit = max(t_fit, float(ckpt.get("train_wall_time_s", 0.0)))  # every resumed segment counts
    protocol = to_container(cfg.task.get("protocol", {})) or {}
    backbone = _eval_backbone(cfg, backbone, device)

    t0 = time.time()
    metrics = records.validate_metrics(_evaluate(cfg, task, backbone, device, run_dir / "task"))
    t_eval = time.time() - t0

    seed = int(cfg.seed)
    record = {
        "schema": records.SCHEMA,
        "id": records.new_record_id(cfg.method.name, cfg.backbone.name, cfg.task.name, seed),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1000000:06d}Z",
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "task": cfg.task.name,
        "dataset": str(cfg.task.get("dataset", {}).get("name", cfg.task.name)),
        "protocol": {"name": protocol.get("name", "default"), **protocol, **_protocol_summary(cfg)},
        "seed": seed,
        "identity": identity,
        "metrics": metrics,
        "report": list(cfg.task.get("report", sorted(metrics))),
        "config": to_container(cfg),
        **({"method_deviations": method.deviations(cfg)} if hasattr(method, "deviations") else {}),
        "checkpoint": ckpt,
        "code_version": records.code_version(),
        "wall_time_s": {"fit": round(t_fit, 3), "evaluate": round(t_eval, 3), "total": round(time.time() - t_start, 3)},
        "device": records.device_info(device),
        "distributed": {
            **_describe_distributed(cfg),
            "probe": task.probe_layout(cfg) if hasattr(task, "probe_layout") else None,
        },
        "packages": records.package_versions(),
        "run_dir": str(run_dir),
    }
    record = records.seal(record)  # its run id and content digest, the same in both files
    write_json(run_dir / "record.json", record)  # first: a late failure below loses nothing
    try:
        path = records.write_record(cfg.paths.results_dir, record)
    except OSError as e:
        target = records.runs_dir(cfg.paths.results_dir) / f"{record['id']}.json"
        raise BenchError(
            f"the record could not be written to {records.runs_dir(cfg.paths.results_dir)} "
            f"({e.strerror or type(e).__name__}); it is saved in {run_dir / 'record.json'}",
            f"free space / make the results directory writable, then move it into place under its own name: "
            f"mv {run_dir / 'record.json'} {target} (one file per run: a second copy in the runs directory "
            "is counted once and reported)",
        ) from None
    log.info("record written: %s", path)
    record["_path"] = str(path)
    return record
