"""Composing the packaged hydra config tree (``bench/conf``).

The CLI composes configs with hydra's compose API so that every subcommand
(run, sweep, perf, tests) gets the same tree, the same override grammar, and one
clear error for a name that does not exist.
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any, Iterable, List, Sequence

from omegaconf import DictConfig, OmegaConf

from .errors import BenchError, UnknownNameError

CONFIG_MODULE = "bench.conf"
GROUPS = ("method", "task", "backbone", "cluster", "experiment", "paths")


def group_options(group: str) -> List[str]:
    """Names of the config files of one group (``method`` -> ``['dinov2', ...]``)."""
    root = resources.files(CONFIG_MODULE).joinpath(group)
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _check_group_names(overrides: Sequence[str]) -> None:
    for ov in overrides:
        key, sep, value = ov.lstrip("+~").partition("=")
        if not sep:
            continue
        group = key.split("@")[0]
        if group in GROUPS:
            opts = group_options(group)
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
    _check_group_names(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BenchError(f"invalid config override: {msg}",
                         "write overrides as key=value (e.g. method=dinov2 task=synth_depth seed=1); "
                         "see `python -m bench list` for names") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def to_container(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


# Keys that never change what a training run produces (logging, checkpoint cadence, ...)
NONESSENTIAL_KEYS = frozenset({"log_every", "ckpt_every", "progress", "num_workers", "keep_last"})


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


def backbone_cache_key(cfg: DictConfig) -> str:
    """Key of a trained backbone: everything that determines its weights.

    The method config (which holds the method's training data), the backbone
    config and the seed. Logging and checkpoint cadence do not count.
    """
    payload = {
        "method": _strip(to_container(cfg.method), NONESSENTIAL_KEYS),
        "backbone": to_container(cfg.backbone),
        "seed": int(cfg.seed),
    }
    if str(cfg.get("precision", "32")) not in ("32", "fp32", "32-true"):  # bf16 training: other weights
        payload["precision"] = str(cfg.precision)
    return f"{cfg.method.name}-{cfg.backbone.name}-{stable_hash(payload)}"
