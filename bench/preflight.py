"""Checks that run before any work: a bad input is refused in the first second, not after hours.

:func:`validate` checks the composed config's keys against the typed schemas (:mod:`bench.schema`)
and its values (seed, device, training lengths, probe schedule); :func:`check_writable` the directories a cell writes to; :func:`check_inputs` the
weights paths and Hub refs; :func:`check_image_size` the images against the backbone's stride.
:func:`preflight` runs them all (plus the task's own ``check``): ``bench run`` calls it before a
cell starts and ``bench sweep`` for every cell before it submits anything. Every failure is a
:class:`bench.errors.BenchError` (one line, exit 2). The catalogue is docs/FAULTS.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Tuple

from omegaconf import DictConfig

from .config import to_container
from .errors import BenchError, CheckpointError, what_is_at

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# method keys that set how long/how much a method trains: must be positive integers
LENGTH_KEYS = ("steps", "iterations", "epochs", "batch_size")
SCHEDULE_KEYS = ("epochs", "iters", "batch_size", "lr")
SEED_MAX = 2**32 - 1  # numpy's seed range (seed_everything seeds numpy, python and torch with it)
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
    _check_seed(cfg.get("seed"))
    device = str(cfg.get("device", "auto"))
    if not DEVICE_RE.match(device):
        raise BenchError(f"unknown device '{device}'", "use device=auto, device=cpu, device=cuda or device=cuda:N")
    if trains is None:
        from .registry import METHODS

        trains = bool(getattr(METHODS.get(cfg.method.name), "trains", False))
    if trains:
        _check_trained_method(to_container(cfg.method))
    proto = str(cfg.get("protocol", "linear"))
    sched = to_container(cfg.task.get("protocol", {}) or {}).get("schedule") if "task" in cfg else None
    _check_probe_schedule(proto, sched)
    if "task" in cfg:
        check_dataset_values(to_container(cfg.task.get("dataset") or {}), "task.dataset")
    method_data = to_container(cfg.method.get("data") or {}) if "method" in cfg else {}
    if isinstance(method_data, dict) and method_data.get("dataset") == "synthetic":
        check_synthetic_memory(method_data, "method.data")


def _check_seed(seed: Any) -> None:
    """The seed: an integer in 0..SEED_MAX."""
    if not _is_int(seed):
        raise BenchError(f"seed must be an integer, got {seed!r}", "pass seed=<integer>, e.g. seed=0")
    if not 0 <= seed <= SEED_MAX:
        raise BenchError(f"seed={seed} is outside 0..{SEED_MAX} (2**32-1)", "pass a seed in that range, e.g. seed=0")


def _check_trained_method(method: Mapping[str, Any]) -> None:
    """A trained method's lengths (LENGTH_KEYS anywhere under ``method``) are positive integers, and
    ``optim.accumulate`` splits ``optim.batch_size`` into equal micro-batches."""
    for key, leaf, v in _walk(method, "method"):
        if leaf in LENGTH_KEYS and v is not None and (not _is_int(v) or v < 1):
            raise BenchError(
                f"{key}={v!r}: a trained method needs a positive integer here (0 or less would "
                "record the untrained backbone as trained)",
                f"pass {key}=<integer >= 1>",
            )
    optim = method.get("optim") or {}
    acc, bs = optim.get("accumulate"), optim.get("batch_size")
    if acc is not None and (not _is_int(acc) or acc < 1 or (_is_int(bs) and bs % acc)):
        raise BenchError(
            f"method.optim.accumulate={acc!r} does not split method.optim.batch_size={bs!r} into equal micro-batches",
            "pass method.optim.accumulate=<a divisor of the batch per rank>, e.g. 1",
        )


def _check_probe_schedule(proto: str, sched: Any) -> None:
    """The probe's schedule (protocol ``proto``) trains: epochs or iters set, SCHEDULE_KEYS positive numbers."""
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


def check_dataset_values(node: Any, key: str) -> None:
    """``limit`` (a positive count), and for a generated synthetic set ``scenes``/``views``/``held_out``
    (at least one scene in each split: a held_out of 0 leaves no test split, one of ``scenes`` or more
    would be clamped silently) and the memory its rendering needs."""
    if not isinstance(node, dict):
        return
    limit = node.get("limit")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise BenchError(
            f"{key}.limit={limit!r}: a split limited to fewer than 1 sample has nothing to train or test on",
            f"pass {key}.limit=<integer >= 1>, or {key}.limit=null for the whole split",
        )
    if node.get("name") != "synthetic":
        return
    if node.get("eval_scenes") == "all":  # a training-free task evaluating every scene: no split
        return check_synthetic_memory(node, key)
    scenes, views = node.get("scenes", 8), node.get("views", 24)
    for k, v, low in (("scenes", scenes, 2), ("views", views, 1)):
        if not _is_int(v) or v < low:
            raise BenchError(
                f"{key}.{k}={v!r}: a synthetic set needs at least {low} {k}"
                + (" (one to train the probe on, one held out to test it)" if k == "scenes" else ""),
                f"pass {key}.{k}=<integer >= {low}>",
            )
    held = node.get("held_out", 0.25)
    if isinstance(held, bool) or not isinstance(held, (int, float)):
        k = None
    else:
        # a fraction holds out at least one scene (bench.data.synthetic.split_scenes)
        k = held if _is_int(held) else max(round(held * scenes), 1) if 0 < held < 1 else None
    if k is None or not 1 <= k < scenes:
        where = "to test on" if k is None or k < 1 else "to train on"
        raise BenchError(
            f"{key}.held_out={held!r} with {key}.scenes={scenes} leaves no scene {where}",
            f"pass {key}.held_out=<integer 1..{scenes - 1}> (the test scenes) or a fraction in (0, 1)",
        )
    check_synthetic_memory(node, key)


def check_synthetic_memory(node: Mapping[str, Any], key: str) -> None:
    """Refuse a synthetic image size whose rendering cannot fit in the available memory (the estimate of
    :func:`bench.data.synthetic.writer.render_memory`), before any file of the set is written."""
    from .data.synthetic.writer import check_memory, default_workers

    size = node.get("size", [128, 128])
    hw = [size, size] if _is_int(size) else list(size) if isinstance(size, (list, tuple)) else None
    if not hw or len(hw) != 2 or not all(_is_int(v) and v > 0 for v in hw):
        return
    scenes, views = max(int(node.get("scenes", 8) or 1), 1), int(node.get("views", 24) or 1)
    workers = max(1, min(int(node.get("workers") or default_workers(scenes, views, hw)), scenes))
    check_memory(hw, int(node.get("supersample", 2) or 1), workers, f"{key}.size")


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
    """Every directory a cell writes: results, its run directory, and the cache (every cell: the probes'
    checkpoints and lock files and the feature cache live there, and trained backbones)."""
    from .distributed import is_main

    if not is_main():  # ranks > 0 of a multi-rank run write nothing (and test nothing by writing)
        return
    check_writable(Path(cfg.paths.results_dir) / "runs", "results_dir")
    check_writable(Path(str(cfg.run_dir)).parent, "output_dir")
    check_writable(Path(cfg.paths.cache_dir) / ("backbones" if trains else "probes"), "cache_dir")
    node = to_container(cfg.task.get("dataset") or {}) if "task" in cfg else {}
    if isinstance(node, dict) and node.get("name") == "synthetic" and node.get("root"):
        if not (Path(str(node["root"])) / "meta.json").is_file():  # generated on first use: written here
            check_writable(Path(str(node["root"])), "data_dir")


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
        why = what_is_at(Path(w).expanduser(), "file")
        raise CheckpointError(
            f"backbone weights file not found: {w}" if why == "does not exist" else f"backbone weights {w} {why}",
            "pass an existing file as backbone.weights=/path/to/file (or hub / hf://org/repo/file)",
        )
    for ref in dict.fromkeys(refs):
        check_hub_file(*parse_hf_path(ref))


def check_method_checkpoints(cfg: DictConfig) -> None:
    """The local checkpoint file of the official methods (``method.checkpoint``, their replacement of the
    released file). A method's own inputs (Splat-and-Distill's reconstructor checkpoint) are its
    ``check_inputs`` (:func:`preflight`)."""
    m = to_container(cfg.method) if "method" in cfg else {}
    wanted = [("method.checkpoint", m.get("checkpoint"), "pass an existing file or hf://org/repo/file, or null")]
    for key, path, fix in wanted:
        if isinstance(path, str) and path and not path.startswith("hf://") and not Path(path).expanduser().is_file():
            raise CheckpointError(f"{key} file not found: {path} (no such file)", fix)


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
SPLIT_WORDS = {"train": "training", "test": "test"}


def decode_check(path: Path) -> str | None:
    """None if the image at ``path`` decodes to its end, else why not. JPEGs are decoded in draft mode
    (DCT-scaled to 1/8: every byte of the entropy stream is still read, so a truncated or corrupt file
    fails) -- several times faster than a full decode; other formats are decoded fully."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(img.width // 8, 1), max(img.height // 8, 1)))
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _split_images(node: Mapping[str, Any], split: str) -> list:
    """The image files (``IMAGE_SUFFIXES``) of one split of a file-reader dataset, [] for other readers."""
    from torch.utils.data import Subset

    from tasks.data import open_split

    ds = open_split(node, split)
    idx = None
    while isinstance(ds, Subset):
        idx, ds = list(ds.indices), ds.dataset
    items = getattr(ds, "items", None)
    if items is None or not hasattr(type(ds), "item_files"):
        return []
    files = (p for i in (idx if idx is not None else range(len(items))) for p in type(ds).item_files(items[i]))
    return list(dict.fromkeys(Path(p) for p in files if Path(p).suffix.lower() in IMAGE_SUFFIXES))


def _manifest(files: list, root: Path) -> str:
    """Content manifest of a split: hash of each file's path (relative to the root), size and mtime."""
    from .config import stable_hash

    rows = []
    for f in files:
        try:
            st = f.stat()
            rows.append([os.path.relpath(f, root), st.st_size, st.st_mtime_ns])
        except OSError:
            rows.append([os.path.relpath(f, root), -1, -1])
    return stable_hash(rows, 16)


def verify_images(files: list, desc: str) -> list:
    """``[(path, why), ...]`` of the ``files`` that do not decode: a small thread pool (PIL decodes
    outside the GIL) sized from ``os.cpu_count()``, with progress (:mod:`bench.progress`)."""
    from concurrent.futures import ThreadPoolExecutor

    from .progress import progress

    bad = []
    workers = max(1, min(8, (os.cpu_count() or 1)))
    bar = progress(total=len(files), desc=desc, unit="img", enable=len(files) > 200)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for f, why in zip(files, pool.map(decode_check, files, chunksize=16)):
                if why:
                    bad.append((f, why))
                bar.update(1)
    finally:
        bar.close()
    return bad


def check_test_images(cfg: DictConfig) -> None:
    """Decode every image of the task's training and test splits (real datasets read by a file reader): a
    corrupt image fails the cell now, not when the probe reaches it hours later. All bad files are
    counted. A split that decoded cleanly is remembered under ``<cache_dir>/verified/`` by its content
    manifest (relative paths, sizes, mtimes), so each dataset is decoded once, not once per cell."""
    node = to_container(cfg.task.get("dataset") or {}) if "task" in cfg else {}
    name = node.get("name") if isinstance(node, dict) else None
    if not name or name in ("synthetic", "scannetpp") or not cfg.get("verify_test_images", True):
        return
    from .config import stable_hash
    from .errors import DataMissingError, raise_all
    from .io import write_json

    found = []
    for split in [s for s in ("train", "test") if s == "test" or s in (node.get("splits") or {})]:
        key = stable_hash([node, split])
        if key in _VERIFIED:  # a sweep's cells share their task's splits: decode once per process
            continue
        files = _split_images(node, split)
        if not files:
            _VERIFIED.add(key)
            continue
        root = Path(str(node.get("root")))
        stamp = Path(cfg.paths.cache_dir) / "verified" / f"{name}-{split}-{_manifest(files, root)}.json"
        if stamp.is_file():
            _VERIFIED.add(key)
            continue
        bad = verify_images(files, f"verify {name} {split} images")
        if bad:
            shown = ", ".join(str(f) for f, _ in bad[:3]) + (f", ... ({len(bad) - 3} more)" if len(bad) > 3 else "")
            found.append(
                DataMissingError(
                    f"{len(bad)} {SPLIT_WORDS[split]} image(s) of dataset '{name}' cannot be decoded: {shown}",
                    f"replace them (`python -m bench data {name} --root {node.get('root')} --deep "
                    "--verify` lists every bad file), or skip this check with verify_test_images=false",
                )
            )
            continue
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs a re-check
            write_json(stamp, {"dataset": name, "split": split, "root": str(root), "images": len(files)})
        _VERIFIED.add(key)
    raise_all(found)


def preflight(cfg: DictConfig, method: Any, task: Any, problems: list | None = None) -> None:
    """Everything that can be checked before work, in the order a user would fix it. A bad value or an
    unusable directory is raised at once; the missing prerequisites (data not prepared, corrupt test images,
    weights files, Hub files) are all looked for: appended to ``problems`` when given, else raised
    together (:func:`bench.errors.raise_all`)."""
    from .errors import DataMissingError, HubError, raise_all

    trains = bool(getattr(method, "trains", False))
    validate(cfg, trains)
    check_dirs(cfg, trains)
    found: list = []
    checks = [lambda: task.check(cfg)] if hasattr(task, "check") else []  # e.g. the dataset exists
    checks += [lambda: check_test_images(cfg), lambda: check_inputs(cfg), lambda: check_method_checkpoints(cfg)]
    if hasattr(method, "check_inputs"):  # the method's own inputs (e.g. Splat-and-Distill's reconstructor checkpoint)
        checks.append(lambda: method.check_inputs(cfg))
    for check in checks:
        try:
            check()
        except (DataMissingError, CheckpointError, HubError) as e:
            found.append(e)
    if problems is not None:
        problems.extend(found)
    else:
        raise_all(found)
