"""Run one cell: obtain a backbone (pretrained, trained, or cached), evaluate a task, record it.

::

    cfg = bench.config.compose(["method=dinov2", "task=synth_depth"])
    record = bench.runner.run_cell(cfg)

Trained backbones are cached under ``<cache_dir>/backbones/<key>/`` where ``key`` hashes
everything that determines the weights (:func:`bench.config.backbone_cache_key`). The
method trains (and resumes) inside that directory; when it returns, the runner saves
``model.safetensors`` (timm layout) there atomically, so a second task for the same
method reuses it instead of training again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from . import records
from .config import backbone_cache_key, to_container
from .errors import BenchError
from .io import write_json, write_text
from .registry import METHODS, TASKS
from .seed import seed_everything

log = logging.getLogger("bench")

MODEL_FILE = "model.safetensors"


def resolve_device(cfg: DictConfig) -> str:
    want = str(cfg.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device={want} requested but CUDA is not available on this machine",
                         "run with device=cpu (or device=auto)")
    return want


def backbone_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.cache_dir) / "backbones" / backbone_cache_key(cfg)


def _method(cfg: DictConfig):
    return METHODS.get(cfg.method.name)()


def _task(cfg: DictConfig):
    return TASKS.get(cfg.task.name)()


def obtain_backbone(cfg: DictConfig, run_dir: Path | None = None) -> Tuple[Any, Dict[str, Any]]:
    """Build the configured backbone and apply the method (train, reuse the cache, or load weights).

    Returns ``(backbone, checkpoint_ref)`` where ``checkpoint_ref`` says where the weights came from.
    """
    from .backbones import build_backbone, load_backbone_weights, save_backbone

    seed_everything(int(cfg.seed))
    method = _method(cfg)
    backbone = build_backbone(cfg.backbone)
    if not getattr(method, "trains", False):
        workdir = Path(run_dir) if run_dir is not None else Path(cfg.run_dir)
        backbone = method.fit(backbone, cfg, workdir)
        ref = {"kind": "pretrained", "backbone_weights": to_container(cfg.backbone).get("weights")}
        ref.update(getattr(method, "checkpoint_ref", None) or {})
        return backbone, ref

    workdir = backbone_dir(cfg)
    model_path = workdir / MODEL_FILE
    if model_path.exists() and not cfg.get("force", False):
        log.info("reusing trained backbone %s", model_path)
        load_backbone_weights(backbone, model_path)
        if hasattr(method, "restore"):  # e.g. MEF: re-attach the feature head saved beside the weights
            backbone = method.restore(backbone, cfg, workdir)
        return backbone, {"kind": "trained", "cache_key": workdir.name, "path": str(model_path), "reused": True}

    workdir.mkdir(parents=True, exist_ok=True)
    write_text(workdir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.time()
    backbone = method.fit(backbone, cfg, workdir)
    save_backbone(backbone, model_path)
    write_json(workdir / "train_info.json", {"wall_time_s": time.time() - t0, "cache_key": workdir.name})
    return backbone, {"kind": "trained", "cache_key": workdir.name, "path": str(model_path), "reused": False}


def train(cfg: DictConfig) -> Path:
    """Train (or resume, or reuse) the backbone of ``cfg``'s method; return its cache directory."""
    if not getattr(_method(cfg), "trains", False):
        raise BenchError(f"method '{cfg.method.name}' does not train", "use `bench run` to evaluate it")
    obtain_backbone(cfg)
    return backbone_dir(cfg)


def _unique_dir(path: Path) -> Path:
    out, i = path, 1
    while out.exists():
        out = path.with_name(f"{path.name}-{i}")
        i += 1
    out.mkdir(parents=True)
    return out


def run_cell(cfg: DictConfig) -> Dict[str, Any]:
    """Run one (method, backbone, task) cell and write its record. Returns the record."""
    t_start = time.time()
    method, task = _method(cfg), _task(cfg)  # unknown names fail before any work
    if hasattr(task, "check"):
        task.check(cfg)  # e.g. the dataset exists: fail before training, not after
    device = resolve_device(cfg)
    run_dir = _unique_dir(Path(cfg.run_dir))
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    t0 = time.time()
    backbone, ckpt = obtain_backbone(cfg, run_dir)
    t_fit = time.time() - t0
    protocol = to_container(cfg.task.get("protocol", {})) or {}
    if protocol.get("concat_original"):
        from .backbones import ConcatBackbone, build_backbone

        seed_everything(int(cfg.seed))  # same state as obtain_backbone's build: same init for random-init nets
        backbone = ConcatBackbone(build_backbone(cfg.backbone), backbone)
    backbone = backbone.to(device).eval()

    t0 = time.time()
    seed_everything(int(cfg.seed))
    metrics = records.validate_metrics(task.evaluate(backbone, cfg, run_dir / "task"))
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
        "protocol": {"name": protocol.get("name", "default"), **protocol},
        "seed": seed,
        "metrics": metrics,
        "report": list(cfg.task.get("report", sorted(metrics))),
        "config": to_container(cfg),
        "checkpoint": ckpt,
        "code_version": records.code_version(),
        "wall_time_s": {"fit": round(t_fit, 3), "evaluate": round(t_eval, 3),
                        "total": round(time.time() - t_start, 3)},
        "device": records.device_info(device),
        "packages": records.package_versions(),
        "run_dir": str(run_dir),
    }
    path = records.write_record(cfg.paths.results_dir, record)
    write_json(run_dir / "record.json", record)
    log.info("record written: %s", path)
    record["_path"] = str(path)
    return record
