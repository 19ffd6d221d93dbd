"""Per-task method variants: ``method.per_task`` picks a method's variant by the kind of task.

Splat-and-Distill releases two backbones (Splat-and-Distill README / Hub ``david-shavin/SnD``): one
trained with semantic blending for the single-view tasks and one without blending for
correspondence. A method config says so with::

    per_task:
      correspondence: {lift: {blending: false}}     # splat_distill
      correspondence: {blending: false}             # snd_official

:func:`apply_per_task` (called by the runner before it keys, trains or loads a backbone) merges the
overrides of the configured task's kind into ``cfg.method``. A grid with both kinds of tasks thus
trains and caches both backbones (their cache keys differ by the override).

Task kinds: ``cfg.task.kind`` when the task config sets one, else ``correspondence`` for the
correspondence tasks (registered in ``tasks/correspondence.py`` or named ``*_corr``), else ``single_view``.
"""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf

from .errors import BenchError

CORRESPONDENCE = "correspondence"


def task_kind(cfg: DictConfig) -> str:
    task = cfg.get("task") or {}
    name = str(task.get("name", ""))
    if name.endswith("_corr"):
        return CORRESPONDENCE
    try:
        from .registry import TASKS

        cls = TASKS.get(name)
        if getattr(cls, "__module__", "").endswith("correspondence"):
            return CORRESPONDENCE
    except Exception:  # unknown task names fail later, with the runner's own message
        pass
    return str(task.get("kind") or "single_view")


def apply_per_task(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``cfg.method.per_task[<task kind>]`` merged into ``cfg.method`` (a copy; ``cfg``
    itself when there is nothing to apply)."""
    per_task = cfg.get("method", {}).get("per_task") if cfg.get("method") is not None else None
    if not per_task:
        return cfg
    overrides = per_task.get(task_kind(cfg))
    if not overrides:
        return cfg
    if not isinstance(overrides, DictConfig):
        raise BenchError(
            f"method.per_task.{task_kind(cfg)} must be a mapping of method keys",
            "e.g. method.per_task.correspondence.lift.blending=false",
        )
    out = copy.deepcopy(cfg)
    struct = OmegaConf.is_struct(out)
    OmegaConf.set_struct(out, False)
    out.method = OmegaConf.merge(out.method, overrides)
    OmegaConf.set_struct(out, struct)
    return out
