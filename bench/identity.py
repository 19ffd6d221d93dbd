"""What a number came from: cell fingerprints and the trained-backbone cache key.

A *cell fingerprint* hashes everything that determines a cell's number -- the method config
(including the identity of its training data), the backbone config, the task config (the selected
protocol and the identity of the evaluation data), the protocol name and the seed -- and nothing
that does not: paths, progress bars, logging and checkpoint cadence, worker counts, the device.
Every record carries it (``record["identity"]``)::

    {"version": 1, "cell": <16 hex: the cell, seed included>, "row": <16 hex: the same without the
     seed -- one leaderboard row>, "short": <row[:8]>, "label": <recipe, e.g. "demo">,
     "parts": {"method": <8 hex>, "backbone": ..., "task": ..., "train_data": ..., "eval_data": ...}}

The leaderboard aggregates one ``row`` per table row, ``sweep`` skips a cell only when a record
with the same ``cell`` exists, and the trained-backbone cache key (:func:`backbone_key`) is the
method + backbone + seed part of the same normalisation.

Paths are replaced by what they point at, so that two spellings of one input give one key:

* a **file** (a checkpoint, a weights file) -> ``sha256:<digest of its bytes>``;
* a **directory** (a prepared dataset) -> ``manifest:<digest>`` over the sorted relative names,
  sizes and a content digest of every file (whole file up to 64 KiB -- split lists, poses, meta
  data --, else its first and last 64 KiB);
* a **generated dataset** (``synthetic``: the generator is deterministic) -> its generator
  settings only, the root is dropped (so the key is the same before and after generation);
* a path under ``paths.output_dir`` / ``paths.results_dir`` or a directory under
  ``paths.cache_dir`` (derived outputs, caches) and a path that does not exist -> dropped;
* a key whose value is a file that decides the number (a checkpoint, backbone weights: the keys the
  config schemas mark as files, :func:`bench.schema.file_keys`) -> ``sha256:<digest of its bytes>``
  however it is spelled (a bare relative name included) and wherever it lives; its words that name no
  file (``hub``, ``none``...), ``hf://`` references (repo, file and revision) and null stay as they are;
  a file that does not exist is dropped, as any path;
* ``method.reconstructor.checkpoint`` counts unless ``method.reconstructor.name`` is ``depth``
  (the one reconstructor that reads no checkpoint; :data:`UNUSED_UNLESS`).
* a key added after records were written (:data:`ADDED_KEYS`)
  counts only when its value differs from the behaviour the code had before the key existed: those records
  keep their fingerprints, and a cell that selects the new behaviour gets a new one.

File digests are memoised per process (by real path, size and mtime); a manifest re-lists its
directory every time (stat only, files are re-read only when their size or mtime changed).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from .config import NONESSENTIAL_KEYS, stable_hash, to_container

VERSION = 1
# keys that never change a cell's number (display, logging, cadence, parallelism)
DISPLAY_KEYS = frozenset(NONESSENTIAL_KEYS | {"report", "description", "accumulate"})
# ``accumulate`` (micro-batches per step, ``method.optim.accumulate``) splits a step's batch without changing
# its gradient beyond float rounding, like the number of ranks, which is not part of any key either
# datasets whose content is a deterministic function of their settings (root = where, not what)
GENERATED_DATASETS = {"synthetic"}
# dotted key -> condition on the composed (resolved) config for the key to count
UNUSED_UNLESS: Dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "method.reconstructor.checkpoint": lambda c: (
        ((c.get("method") or {}).get("reconstructor") or {}).get("name") != "depth"
    ),
}
# dotted key -> the value that reproduces what the code did before the key existed (left out of the identity):
# a config that states exactly that value fingerprints as if the key were absent (the same computation, so the
# same cell), any other value enters the fingerprint
ADDED_KEYS: Dict[str, Any] = {
    # issue 26: protocol keys that became required (the committed linear-protocol records keep their fingerprints)
    "task.protocol.code_version": "fit3d_evaluation",
    "task.protocol.schedule.betas": [0.9, 0.999],
    "task.protocol.schedule.shuffle": True,
    "task.protocol.test.clamp": True,
    "task.protocol.eval.empty_images": "drop",
    "method.lift.feature_covariance": "true_covariance",  # Splat-and-Distill's feature splat before the official render
    "method.head.prototype_init": "trunc_normal",  # Splat-and-Distill's prototypes before the official init
    "method.views.order": "uniform",  # Splat-and-Distill's view sampling before the official rules
    "method.views.contiguous": False,
    "method.views.keep_bad": False,
    "method.views.last_batch": "carry",  # Splat-and-Distill's steps before the official smaller last step of an epoch
    "method.resize": "backbone",  # FiT3D's input resize before the official floor rule
    "method.stage2.drop_last": False,  # FiT3D's stage-II batches before the official loader's drop_last
}
_SMALL = 64 * 1024
_memo: Dict[Tuple, str] = {}


# --------------------------------------------------------------------------------------- content ids
def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (memoised by real path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = ("file", str(p), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _memo[key] = h.hexdigest()
    return _memo[key]


def _sample_digest(p: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= 2 * _SMALL:
            h.update(f.read())
        else:
            h.update(f.read(_SMALL))
            f.seek(size - _SMALL)
            h.update(f.read(_SMALL))
    return h.hexdigest()


def manifest_digest(root: str | os.PathLike) -> str:
    """Digest of a directory's content: sorted relative names, sizes and content digests of its files
    (hidden files and bench's own ``.lock`` files excluded)."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            try:
                st = p.stat()
                key = ("sample", str(p), st.st_size, st.st_mtime_ns)
                if key not in _memo:
                    _memo[key] = _sample_digest(p, st.st_size)
            except OSError:
                continue
            h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{_memo[key]}\n".encode())
    return h.hexdigest()


def _under(p: Path, root: Optional[str]) -> bool:
    if not root:
        return False
    try:
        p.relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def _looks_like_path(v: str, paths: Mapping[str, Any]) -> bool:
    if "://" in v or not v:
        return False
    if v.startswith(("/", "./", "../", "~")):
        return True
    for k in ("data_dir", "cache_dir", "output_dir", "results_dir", "root"):
        r = paths.get(k)
        if r and r not in (".", "") and v.startswith(str(r)):
            return True
    return os.sep in v and os.path.exists(v)


def path_identity(v: str, paths: Mapping[str, Any]) -> Optional[str]:
    """What the path ``v`` stands for (see the module docstring); None = it does not count."""
    p = Path(os.path.expanduser(v)).resolve()
    if _under(p, paths.get("output_dir")) or _under(p, paths.get("results_dir")):
        return None
    if p.is_file():
        return "sha256:" + file_digest(p)
    if p.is_dir():
        if _under(p, paths.get("cache_dir")):
            return None  # a cache directory: derived, not an input
        return "manifest:" + manifest_digest(p)
    return None


# --------------------------------------------------------------------------------------- normalising
def _is_generated(node: Mapping[str, Any]) -> bool:
    name = node.get("dataset", node.get("name"))
    if name in GENERATED_DATASETS:
        return True
    try:
        from .registry import DATASETS

        return bool(name in DATASETS and getattr(DATASETS.get(name), "generated", False))
    except Exception:  # registry import problems never change an identity
        return False


def _normalise(obj: Any, paths: Mapping[str, Any], drop: Iterable[str] = DISPLAY_KEYS) -> Any:
    drop = frozenset(drop)
    if isinstance(obj, dict):
        generated = "root" in obj and _is_generated(obj)
        out = {}
        for k, v in obj.items():
            if k in drop or (generated and k == "root"):
                continue
            if isinstance(v, str) and _looks_like_path(v, paths):
                v = path_identity(v, paths)
                if v is None:
                    continue
            out[k] = _normalise(v, paths, drop)
        return out
    if isinstance(obj, list):
        return [_normalise(v, paths, drop) for v in obj]
    return obj


def _drop_unused(c: Dict[str, Any]) -> Dict[str, Any]:
    def at(dotted: str) -> Any:
        node: Any = c
        for k in dotted.split("."):
            if not isinstance(node, dict) or k not in node:
                return KeyError
            node = node[k]
        return node

    added = {d: (lambda _c, d=d, v=v: at(d) != v) for d, v in ADDED_KEYS.items()}
    for dotted, used in {**UNUSED_UNLESS, **added}.items():
        if used(c):
            continue
        *parents, leaf = dotted.split(".")
        node = c
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(leaf, None)
    return c


def _nodes(c: Any, parts: list) -> Iterable[Tuple[Dict[str, Any], str]]:
    """(parent mapping, leaf key) of every place the dotted ``parts`` (``*`` = any name) exist in ``c``."""
    if not isinstance(c, dict):
        return
    head, rest = parts[0], parts[1:]
    keys = list(c) if head == "*" else [head] if head in c else []
    for k in keys:
        if rest:
            yield from _nodes(c[k], rest)
        else:
            yield c, k


def _digest_files(c: Dict[str, Any]) -> Dict[str, Any]:
    """Replace the value of every file-valued key (:func:`bench.schema.file_keys`, also inside
    ``method.per_task.<kind>``) by the digest of the file it names (see the module docstring)."""
    from .schema import file_keys

    for dotted, words in file_keys().items():
        parts = dotted.split(".")
        places = list(_nodes(c, parts))
        if parts[0] == "method":
            places += list(_nodes(c, ["method", "per_task", "*", *parts[1:]]))
        for node, leaf in places:
            v = node[leaf]
            if not isinstance(v, str) or not v or v in words or "://" in v:
                continue
            p = Path(os.path.expanduser(v)).resolve()  # a relative name: from the working directory
            if p.is_file():
                node[leaf] = "sha256:" + file_digest(p)
            elif not p.exists():
                node.pop(leaf)  # nothing to read (as any path that does not exist)
    return c


def components(cfg: Any) -> Dict[str, Any]:
    """The normalised parts of a composed config that determine a cell's number (seed excluded)."""
    c = _digest_files(_drop_unused(to_container(cfg)))
    paths = c.get("paths") or {}
    method = _normalise(c.get("method") or {}, paths)
    backbone = _normalise(c.get("backbone") or {}, paths)
    task = _normalise({k: v for k, v in (c.get("task") or {}).items() if k != "protocols"}, paths)
    out = {"method": method, "backbone": backbone, "task": task, "protocol": c.get("protocol")}
    precision = str(c.get("precision", "32"))
    if precision not in ("32", "fp32", "32-true"):  # bf16 training/extraction gives other numbers
        out["precision"] = precision
    return out


def backbone_key(cfg: Any) -> str:
    """Key of a trained backbone: method (with its training data by content) + backbone + seed."""
    comp = components(cfg)
    payload = {"v": VERSION, "method": comp["method"], "backbone": comp["backbone"], "seed": int(cfg.seed)}
    if "precision" in comp:
        payload["precision"] = comp["precision"]
    return f"{cfg.method.name}-{cfg.backbone.name}-{stable_hash(payload)}"


def recipe_label(cfg: Any) -> str:
    label = cfg.get("recipe") if hasattr(cfg, "get") else None
    return str(label) if label else "default"


def cell_identity(cfg: Any) -> Dict[str, Any]:
    """The fingerprint a record of ``cfg`` carries (see the module docstring). A composed config is
    first given the method variant of its task's kind (``method.per_task``, as the runner runs it), so
    that a sweep's plan and the record of the run agree (applying the variant twice changes nothing)."""
    from omegaconf import DictConfig

    from .method_variants import apply_per_task

    if isinstance(cfg, DictConfig):
        cfg = apply_per_task(cfg)
    comp = components(cfg)
    row = stable_hash({"v": VERSION, **comp})
    cell = stable_hash({"v": VERSION, **comp, "seed": int(cfg.seed)})
    train_data = comp["method"].get("data") if isinstance(comp["method"], dict) else None
    eval_data = comp["task"].get("dataset") if isinstance(comp["task"], dict) else None
    parts = {
        "method": stable_hash(comp["method"], 8),
        "backbone": stable_hash(comp["backbone"], 8),
        "task": stable_hash(comp["task"], 8),
        "train_data": stable_hash(train_data, 8) if train_data else None,
        "eval_data": stable_hash(eval_data, 8) if eval_data else None,
    }
    return {"version": VERSION, "cell": cell, "row": row, "short": row[:8], "label": recipe_label(cfg), "parts": parts}
