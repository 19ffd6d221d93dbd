"""Composing the packaged hydra config tree (``bench/conf``).

The CLI composes configs with hydra's compose API so that every subcommand
(run, sweep, perf, tests) gets the same tree, the same override grammar, and one
clear error for a name that does not exist.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from .errors import BenchError, UnknownNameError

CONFIG_MODULE = "bench.conf"
GROUPS = ("method", "task", "backbone", "cluster", "experiment", "paths")


def group_options(group: str, search_path: Sequence[str] = ()) -> List[str]:
    """Names of the config files of one group (``method`` -> ``['dinov2', ...]``), also from the extra
    config directories ``search_path`` (``hydra.searchpath=[file:///my/conf]``: e.g. your own recipes
    in ``/my/conf/experiment/``)."""
    roots = [resources.files(CONFIG_MODULE).joinpath(group)] + [Path(d) / group for d in search_path]
    return sorted({p.name[:-5] for root in roots if root.is_dir() for p in root.iterdir() if p.name.endswith(".yaml")})


def search_path(overrides: Sequence[str]) -> List[str]:
    """The local directories of a ``hydra.searchpath=[file://DIR,...]`` override."""
    dirs: List[str] = []
    for ov in overrides:
        key, _, value = ov.lstrip("+").partition("=")
        if key == "hydra.searchpath":
            for item in value.strip().strip("[]").split(","):
                item = item.strip().strip("'\"")
                if item.startswith("file://"):
                    dirs.append(item[len("file://") :])
    return dirs


# hydra's own keys that name where output goes -> the bench key that does
HYDRA_OUTPUT_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.runtime.output_dir")


def _refuse_hydra_keys(overrides: Sequence[str]) -> None:
    """``hydra.*`` overrides other than ``hydra.searchpath`` would be accepted by hydra's compose and have no
    effect (bench composes with hydra but does not run as a hydra app): one error naming the key that works."""
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if not key.startswith("hydra.") or key == "hydra.searchpath":
            continue
        if key in HYDRA_OUTPUT_KEYS:
            fix = f"set the run directory with run_dir={value or '<dir>'} (or paths.output_dir=<dir> for every output)"
        else:
            fix = (
                f"remove {key}: bench sets hydra's settings itself (the one hydra key it reads is "
                "hydra.searchpath=[file://DIR], extra config directories)"
            )
        raise BenchError(f"the override {ov} has no effect: bench does not read hydra's {key}", fix)


def _check_group_names(overrides: Sequence[str]) -> None:
    extra = search_path(overrides)
    for ov in overrides:
        key, sep, value = ov.lstrip("+~").partition("=")
        if not sep:
            continue
        group = key.split("@")[0]
        if group in GROUPS:
            opts = group_options(group, extra)
            for v in value.split(","):  # sweep lists are checked element-wise
                v = v.strip().strip("[]()")
                if v and v != "null" and v not in opts:
                    raise UnknownNameError(group, v, opts)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``bench/conf/<config_name>.yaml`` with hydra-style ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    _refuse_hydra_keys(overrides)
    _check_group_names(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        unknown = _unknown_key(msg, overrides, config_name)
        if unknown is not None:
            raise unknown from None
        raise BenchError(
            f"invalid config override: {msg}",
            "write overrides as key=value (e.g. method=dinov2 task=synth_depth seed=1); "
            "see `python -m bench list` for names",
        ) from None
    finally:
        GlobalHydra.instance().clear()
    if "recipe" in cfg and cfg.get("recipe") is None:  # the readable label of the records' fingerprint
        chosen = [ov.partition("=")[2] for ov in overrides if ov.lstrip("+~").partition("=")[0] == "experiment"]
        if chosen and chosen[-1] not in ("", "null"):
            cfg.recipe = chosen[-1]
    return cfg


def flat_keys(obj: Any, prefix: str = "") -> List[str]:
    """Dotted keys of every leaf and node of a (resolved-or-not) config."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=False)
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            out.append(key)
            out += flat_keys(v, key + ".")
    return out


def _unknown_key(msg: str, overrides: Sequence[str], config_name: str) -> BenchError | None:
    """`key=value` for a key that is not in the config: name it and suggest the nearest existing key."""
    import difflib
    import re

    m = re.match(r"Could not override '([^']+)'", msg)
    if not m:
        return None
    key = m.group(1)
    groups = [ov for ov in overrides if ov.lstrip("+~").partition("=")[0].split("@")[0] in GROUPS]
    try:
        base = compose(groups, config_name) if len(groups) < len(overrides) else None
    except BenchError:
        base = None
    keys = flat_keys(base) if base is not None else []
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    value = next((ov.partition("=")[2] for ov in overrides if ov.lstrip("+~").partition("=")[0] == key), "...")
    hint = f"did you mean {near[0]}={value}? " if near else ""
    return BenchError(
        f"config key '{key}' does not exist",
        f"{hint}check the name with `python -m bench run --print-config ...`, or add a new key with +{key}={value}",
    )


def to_container(cfg: Any) -> Any:
    """Config nodes (also nested in plain dicts / lists) -> plain, resolved python containers.

    Mappings come back as new dicts, tuples as lists; other values as they are."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: to_container(v) for k, v in cfg.items()}
    return [to_container(v) for v in cfg] if isinstance(cfg, (list, tuple)) else cfg


# Keys that never change what a training run produces (logging, checkpoint cadence, ...)
NONESSENTIAL_KEYS = frozenset({"log_every", "ckpt_every", "progress", "num_workers", "workers", "keep_last"})


def _strip(obj: Any, drop: Iterable[str]) -> Any:
    drop = frozenset(drop)
    if isinstance(obj, dict):
        return {k: _strip(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_strip(v, drop) for v in obj]
    return obj


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (key order does not matter)."""
    blob = json.dumps(to_container(obj), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
