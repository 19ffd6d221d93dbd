"""Checks that run before any work: a bad input is refused in the first second, not after hours.

:func:`validate` checks the composed config's keys against the typed schemas (:mod:`bench.schema`)
and its values (seed, device, training lengths, probe schedule); :func:`check_writable` the directories a cell writes to; :func:`check_inputs` the
weights paths and Hub refs; :func:`check_image_size` the images against the backbone's stride.
:func:`preflight` runs them all (plus the task's own ``check``): ``bench run`` calls it before a
cell starts and ``bench sweep`` for every cell before it submits anything. Every failure is a
:class:`bench.errors.BenchError` (one line, exit 2). The catalogue is docs/FAULTS.md.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Tuple

from omegaconf import DictConfig

from .config import to_container
from .errors import BenchError, CheckpointError

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# method keys that set how long/how much a method trains: must be positive integers
LENGTH_KEYS = ("steps", "iterations", "epochs", "batch_size")
SCHEDULE_KEYS = ("epochs", "iters", "batch_size")
ENV_OF = {
    "results_dir": "BENCH_RESULTS",
    "output_dir": "BENCH_OUTPUTS",
    "cache_dir": "BENCH_CACHE",
    "data_dir": "BENCH_DATA",
}


def _walk(obj: Any, prefix: str) -> Iterator[Tuple[str, str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}.{k}", str(k), v
            yield from _walk(v, f"{prefix}.{k}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(cfg: DictConfig, trains: bool | None = None) -> None:
    """Refuse values that cannot run (or would silently run something else)."""
    from .schema import check as check_schema

    check_schema(cfg)  # unknown / missing keys and wrong types of method.*, task.protocol(s).*, cluster.*
    seed = cfg.get("seed")
    if not _is_int(seed):
        raise BenchError(f"seed must be an integer, got {seed!r}", "pass seed=<integer>, e.g. seed=0")
    device = str(cfg.get("device", "auto"))
    if not DEVICE_RE.match(device):
        raise BenchError(f"unknown device '{device}'", "use device=auto, device=cpu, device=cuda or device=cuda:N")
    if trains is None:
        from .registry import METHODS

        trains = bool(getattr(METHODS.get(cfg.method.name), "trains", False))
    if trains:
        for key, leaf, v in _walk(to_container(cfg.method), "method"):
            if leaf in LENGTH_KEYS and v is not None and (not _is_int(v) or v < 1):
                raise BenchError(
                    f"{key}={v!r}: a trained method needs a positive integer here (0 or less would "
                    "record the untrained backbone as trained)",
                    f"pass {key}=<integer >= 1>",
                )
    proto = str(cfg.get("protocol", "linear"))
    sched = to_container(cfg.task.get("protocol", {}) or {}).get("schedule") if "task" in cfg else None
    if (
        isinstance(sched, dict)
        and not sched.get("epochs")
        and not sched.get("iters")
        and ("epochs" in sched or "iters" in sched)
    ):
        raise BenchError(
            f"task.protocols.{proto}.schedule sets neither epochs nor iters (epochs="
            f"{sched.get('epochs')!r}, iters={sched.get('iters')!r}): the probe would not train",
            f"pass task.protocols.{proto}.schedule.epochs=<number > 0>",
        )
    for k in SCHEDULE_KEYS:
        v = (sched or {}).get(k)
        if v is None:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (k != "batch_size" or _is_int(v))
        if not ok:
            raise BenchError(
                f"task.protocols.{proto}.schedule.{k}={v!r} cannot train a probe",
                f"pass task.protocols.{proto}.schedule.{k}=<number > 0>",
            )


def check_writable(path: str | os.PathLike, what: str) -> None:
    """``path`` is a directory this process can write to, or can be created as one: tested by writing
    a file in it (or in its nearest existing ancestor). Nothing is left behind."""
    env = ENV_OF.get(what)
    fix = (
        f"make {path} writable, or point {'the ' + env + ' environment variable or ' if env else ''}"
        f"paths.{what} at a writable directory"
    )
    p = Path(path).absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe))
        fd, tmp = tempfile.mkstemp(prefix=".bench-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = "" if probe == p else f": {probe} is in the way" if not probe.is_dir() else f" (in {probe})"
        raise BenchError(
            f"{what.replace('_', ' ')} {path} is not writable{where} ({e.strerror or type(e).__name__})", fix
        ) from None


def check_dirs(cfg: DictConfig, trains: bool) -> None:
    from .distributed import is_main

    if not is_main():  # ranks > 0 of a multi-rank run write nothing (and test nothing by writing)
        return
    check_writable(Path(cfg.paths.results_dir) / "runs", "results_dir")
    check_writable(Path(str(cfg.run_dir)).parent, "output_dir")
    if trains:
        check_writable(Path(cfg.paths.cache_dir) / "backbones", "cache_dir")


def check_hub_file(repo: str, filename: str, revision: str | None = None) -> None:
    """A Hub file is in the local cache, or (online) exists on the Hub: one metadata request, no download."""
    import huggingface_hub
    from huggingface_hub import errors as hf

    from .hub import _translate, hub_cache_dir, hub_endpoint, is_offline

    cached = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision)
    if isinstance(cached, str):
        return
    try:
        if is_offline():
            raise hf.LocalEntryNotFoundError(f"{filename} is not in the local cache")
        huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(repo, filename, revision=revision, endpoint=hub_endpoint())
        )
    except Exception as e:
        err = _translate(e, repo, revision, f"'{filename}'", filename)
        if err is None:
            raise
        raise err from None


def _hf_refs(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _hf_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _hf_refs(v)
    elif isinstance(obj, str) and obj.startswith("hf://"):
        yield obj


def check_inputs(cfg: DictConfig) -> None:
    """The backbone's weights (a local file exists; a Hub file is cached or exists on the Hub) and every
    ``hf://`` reference of the method config."""
    from .hub import parse_hf_path

    bb = to_container(cfg.backbone)
    w = bb.get("weights")
    refs = list(_hf_refs(to_container(cfg.method)))
    if w == "hub" and bb.get("hub_repo"):
        check_hub_file(str(bb["hub_repo"]), str(bb.get("hub_file") or "model.safetensors"), bb.get("hub_revision"))
    elif isinstance(w, str) and w.startswith("hf://"):
        refs.append(w)
    elif (
        isinstance(w, str) and w not in ("hub", "none", "package", "random", "") and not Path(w).expanduser().is_file()
    ):
        raise CheckpointError(
            f"backbone weights file not found: {w}",
            "pass an existing file as backbone.weights=/path/to/file (or hub / hf://org/repo/file)",
        )
    for ref in dict.fromkeys(refs):
        check_hub_file(*parse_hf_path(ref))


def _sizes(v: Any) -> Iterable[int]:
    if _is_int(v):
        return [v]
    if isinstance(v, (list, tuple)) and all(_is_int(x) for x in v):
        return list(v)
    return []


def check_image_size(cfg: DictConfig, stride: int) -> None:
    """Every configured image size is at least the backbone's output stride."""
    c = {k: to_container(cfg[k]) for k in ("task", "method") if k in cfg}  # only the nodes read below
    for key, node in (
        ("task.dataset.size", (c.get("task") or {}).get("dataset") or {}),
        ("task.protocol.image_size", {"size": ((c.get("task") or {}).get("protocol") or {}).get("image_size")}),
        ("method.data.size", (c.get("method") or {}).get("data") or {}),
    ):
        small = [s for s in _sizes(node.get("size")) if s < stride]
        if small:
            raise BenchError(
                f"{key}={node.get('size')} is smaller than the stride ({stride} px) of backbone "
                f"{cfg.backbone.name}: it has no feature cell",
                f"pass {key} of at least {stride} px",
            )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_VERIFIED: set = set()


def check_test_images(cfg: DictConfig) -> None:
    """Decode every image of the task's test split (real datasets read by a file reader): a corrupt
    image fails the cell now, not after the whole probe training. All bad files are counted."""
    node = to_container(cfg.task.get("dataset") or {}) if "task" in cfg else {}
    name = node.get("name") if isinstance(node, dict) else None
    if not name or name in ("synthetic", "scannetpp") or not cfg.get("verify_test_images", True):
        return
    from torch.utils.data import Subset

    from .config import stable_hash
    from .data.layout import verify_image
    from tasks.data import open_split

    key = stable_hash(node)
    if key in _VERIFIED:  # a sweep's cells share their task's test split: decode it once per process
        return
    ds = open_split(node, "test")
    idx = None
    while isinstance(ds, Subset):
        idx, ds = list(ds.indices), ds.dataset
    items = getattr(ds, "items", None)
    if items is None or not hasattr(type(ds), "item_files"):
        return
    bad = []
    for i in idx if idx is not None else range(len(items)):
        for p in type(ds).item_files(items[i]):
            if Path(p).suffix.lower() in IMAGE_SUFFIXES:
                why = verify_image(Path(p))
                if why:
                    bad.append(str(p))
    if bad:
        from .errors import DataMissingError

        shown = ", ".join(bad[:3]) + (f", ... ({len(bad) - 3} more)" if len(bad) > 3 else "")
        raise DataMissingError(
            f"{len(bad)} test image(s) of dataset '{name}' cannot be decoded: {shown}",
            f"replace them (`python -m bench data {name} --root {node.get('root')} --deep "
            "--verify` lists every bad file), or skip this check with verify_test_images=false",
        )
    _VERIFIED.add(key)


def preflight(cfg: DictConfig, method: Any, task: Any) -> None:
    """Everything that can be checked before work, in the order a user would fix it."""
    trains = bool(getattr(method, "trains", False))
    validate(cfg, trains)
    check_dirs(cfg, trains)
    if hasattr(task, "check"):
        task.check(cfg)  # e.g. the dataset exists: fail before training, not after (local: before the Hub)
    check_test_images(cfg)
    check_inputs(cfg)  # weights files and Hub refs (may ask the Hub once per file)
    if hasattr(method, "check_inputs"):
        method.check_inputs(cfg)  # the method's own inputs (e.g. Splat-and-Distill's reconstructor checkpoint)
