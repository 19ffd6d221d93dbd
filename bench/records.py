"""Result records: one JSON file per finished cell under ``<results_dir>/runs/``.

Schema (``schema: 1``)::

    id, created (UTC ISO), method, backbone, task, dataset, protocol (dict; its
    ``name`` identifies the protocol), seed, metrics (dict name -> float), report
    (metric names the leaderboard shows), config (resolved), checkpoint (what the
    backbone came from), code_version, wall_time_s (fit / evaluate / total),
    device, packages, identity (the cell fingerprint, :mod:`bench.identity`),
    run_id (one per run: a record stored twice counts once), digest (sha256 of
    the content; a record changed after it was written is refused when read).

Records are written atomically and never edited (:func:`seal` refuses a non-finite
metric before anything is written, and every reader refuses a record whose metric
is not finite or whose content does not match its digest; records written before
digests have none and are read as they are); the leaderboard takes the
latest record per cell fingerprint (``identity.cell``) and aggregates the seeds of
one ``identity.row``. Records written before fingerprints existed (no ``identity``)
are *legacy*: the leaderboard shows them apart, marked legacy, and ``sweep`` never
counts them as done.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Mapping

from .errors import BenchError
from .io import write_json

log = logging.getLogger("bench")

SCHEMA = 1
CELL_KEYS = ("method", "backbone", "task", "protocol_name", "seed")
PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "gsplat",
    "hydra-core",
    "submitit",
    "huggingface-hub",
    "safetensors",
    "numpy",
    "pandas",
    "peft",
    "kornia",
)


def runs_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "runs"


#: what the code version's ``-dirty`` flag looks at: the tracked files that make up the code (not the
#: records, docs or results a run writes into a checkout)
SOURCE_PATHS = ("bench", "methods", "tasks", "baselines", "pyproject.toml")


def default_results_dir() -> str:
    """The results directory when none is given: ``$BENCH_RESULTS``, else ``$BENCH_ROOT/results`` (as
    ``paths.results_dir`` of bench/conf/paths/default.yaml)."""
    env = os.environ.get("BENCH_RESULTS", "").strip()
    if env:
        return env
    return str(Path(os.environ.get("BENCH_ROOT", "").strip() or ".") / "results")


def code_version(here: str | Path | None = None) -> str:
    """git commit of the checkout, with ``-dirty`` when a tracked source file (:data:`SOURCE_PATHS`)
    differs from it (a rewritten leaderboard, new records or untracked files do not count), or the
    package version outside a checkout. ``here``: a directory of the checkout (default: bench's own)."""
    here = Path(here) if here is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode == 0 and top.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS],
                cwd=top.stdout.strip(),
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "bench-" + metadata.version("bench")


def package_versions() -> Dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def device_info(device: str) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {
        "type": device,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def validate_metrics(metrics: Mapping[str, Any]) -> Dict[str, float]:
    if not metrics:
        raise BenchError("the task returned no metrics", "check the task's evaluate(); no record was written")
    out = {}
    for k, v in metrics.items():
        v = float(v)
        if not math.isfinite(v):
            raise BenchError(
                f"metric '{k}' is {v}",
                "the evaluation diverged; no record was written (check the probe schedule / learning rate)",
            )
        out[k] = v
    return out


def new_record_id(method: str, backbone: str, task: str, seed: int) -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%fZ}_{method}_{backbone}_{task}_s{seed}"


def content_digest(record: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of a record's content as it reads back from its JSON file: every field but
    ``digest`` itself (and the loader's ``_path``), keys sorted, compact separators."""
    body = {k: v for k, v in record.items() if k not in ("digest", "_path")}
    body = json.loads(json.dumps(body, default=str))  # what the file holds (write_json's default=str)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def seal(record: Mapping[str, Any]) -> Dict[str, Any]:
    """A record ready to write: finite metrics (:func:`validate_metrics`, refused otherwise), a ``run_id``
    (one run = one id, however many files carry it; kept when the record already has one) and the
    ``digest`` of its content (:func:`content_digest`), checked whenever the record is read."""
    rec = {k: v for k, v in record.items() if k not in ("digest", "_path")}
    rec["metrics"] = validate_metrics(rec.get("metrics") or {})
    rec.setdefault("run_id", uuid.uuid4().hex)
    rec["digest"] = content_digest(rec)
    return rec


def write_record(results_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write one record atomically to ``<results_dir>/runs/<id>.json``, sealed (:func:`seal`: a non-finite
    metric is refused before anything is written)."""
    rec = seal(record)
    path = runs_dir(results_dir) / f"{rec['id']}.json"
    return write_json(path, rec)


REQUIRED = {"id": str, "method": str, "backbone": str, "task": str, "metrics": dict}


def check_record(rec: Any, path: Path) -> Dict[str, Any]:
    """A loaded record's structure: a JSON object with the required fields and numeric metrics."""
    fix = (
        f"move {path} out of {path.parent} (or restore it from the run directory's record.json); "
        "records are written atomically by bench"
    )
    if not isinstance(rec, dict):
        raise BenchError(f"result record {path} is a JSON {type(rec).__name__}, not an object", fix)
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise BenchError(f"result record {path} lacks the field(s) {', '.join(missing)}", fix)
    wrong = [k for k, t in REQUIRED.items() if not isinstance(rec[k], t)]
    if wrong:
        raise BenchError(f"result record {path}: field(s) {', '.join(wrong)} have the wrong type", fix)
    for k, v in rec["metrics"].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BenchError(f"result record {path}: metric '{k}' is {v!r}, not a number", fix)
        if not math.isfinite(v):
            raise BenchError(
                f"result record {path}: metric '{k}' is {v}, not a finite number",
                f"move {path} out of {path.parent}: bench never writes such a record (it was made or edited "
                "by hand); re-run its cell for a real number",
            )
    if "digest" in rec and rec["digest"] != content_digest(rec):
        raise BenchError(
            f"result record {path} was changed after bench wrote it (its content digest does not match)",
            f"restore it from its run directory's record.json ({rec.get('run_dir', 'outputs/...')}) or move it "
            f"out of {path.parent} and re-run the cell",
        )
    ident = rec.get("identity")
    if ident is not None and not (
        isinstance(ident, dict) and isinstance(ident.get("cell"), str) and isinstance(ident.get("row"), str)
    ):
        raise BenchError(f"result record {path}: malformed identity {ident!r}", fix)
    return rec


def load_records(results_dir: str | Path) -> List[Dict[str, Any]]:
    """All records (sorted by creation time). Unreadable or malformed files are reported by name,
    not skipped silently."""
    out = []
    for p in sorted(runs_dir(results_dir).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise BenchError(
                f"result record {p} is not valid JSON ({e})",
                "delete or restore that file; records are written atomically by bench",
            ) from None
        except OSError as e:
            raise BenchError(
                f"cannot read result record {p}: {e.strerror or e}",
                "make the file readable (or move it out of the runs directory)",
            ) from None
        rec = check_record(rec, p)
        rec["_path"] = str(p)
        out.append(rec)
    out = once_per_run(out)
    out.sort(key=lambda r: r.get("created", ""))
    return out


def run_key(record: Mapping[str, Any]) -> str:
    """What identifies the run a record came from: its ``run_id`` (records before run ids: its ``id``,
    which also names the run)."""
    return str(record.get("run_id") or f"id:{record['id']}")


def once_per_run(recs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One record per run (:func:`run_key`): a record stored twice (a copy under another name) counts
    once, the first by file name; each left-out copy is one warning line."""
    seen: Dict[str, Dict[str, Any]] = {}
    for rec in recs:
        first = seen.setdefault(run_key(rec), rec)
        if first is not rec:
            log.warning(
                "result record %s repeats the run of %s (%s): counted once; delete the copy",
                rec["_path"],
                first["_path"],
                run_key(rec),
            )
    return list(seen.values())


def cell_of(record: Mapping[str, Any]) -> tuple:
    return (
        record["method"],
        record["backbone"],
        record["task"],
        (record.get("protocol") or {}).get("name", "default"),
        int(record.get("seed", 0)),
    )


def train_diagnostics(info: Mapping[str, Any]) -> Dict[str, Any]:
    """The scalar training diagnostics of a trained backbone's ``train_info.json`` (adapted-layer and
    held-out feature change, first/last loss, KL, head collapse... see bench/diagnostics.py)
    that a record carries; the per-view detail stays in the cache's train_info.json."""
    d = info.get("diagnostics") or {}
    return {
        k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) or k == "student_grid"
    }


def is_legacy(record: Mapping[str, Any]) -> bool:
    """A record written before cell fingerprints (it cannot say which configuration it came from)."""
    return not isinstance(record.get("identity"), dict)


def has_record(results_dir: str | Path, cfg, identity: Mapping[str, Any] | None = None) -> bool:
    """Whether the cell described by the composed ``cfg`` (same fingerprint) already has a record.
    Legacy records never count."""
    from .identity import cell_identity

    if not runs_dir(results_dir).is_dir():
        return False
    want = (identity or cell_identity(cfg))["cell"]
    return any(not is_legacy(r) and r["identity"]["cell"] == want for r in load_records(results_dir))
