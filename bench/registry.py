"""Name -> implementation registries for methods (and their config schemas), tasks, backbones, datasets and
benchmarks.

Implementations register themselves with a decorator next to their code::

    @METHODS.register("dinov2", "raw DINOv2 teacher, frozen (no training)")
    class FrozenTeacher: ...

:func:`load_plugins` imports every module listed in :data:`PLUGIN_MODULES`; adding a
method or task means adding its module there (one line) plus its config file; a method's schema registers
in :data:`METHOD_SCHEMAS` beside it (``methods/<name>/schema.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Tuple

from .errors import UnknownNameError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    description: str


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, description: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = Entry(name, obj, description)
            return obj

        return deco

    def add(self, name: str, obj: Any, description: str) -> None:
        self.register(name, description)(obj)

    def get(self, name: str) -> Any:
        load_plugins()
        try:
            return self._entries[name].obj
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def entries(self) -> Iterator[Entry]:
        load_plugins()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> Tuple[str, ...]:
        return tuple(e.name for e in self.entries())

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries


METHODS = Registry("method")
TASKS = Registry("task")
BACKBONES = Registry("backbone")
DATASETS = Registry("dataset")
PERF = Registry("benchmark")
# the declared hook through which a baseline that loads a released checkpoint reaches a method's code
# (e.g. MEF's LoRA merge): methods register here, baselines look up, neither imports the other
OFFICIAL_ADAPTERS = Registry("official checkpoint adapter")
# each method's config schema (a dataclass, bench.schema), registered beside the method (its schema.py)
METHOD_SCHEMAS = Registry("method schema")

# Every module that registers something. One line per plugin module (a method: its package, which imports its
# method and schema modules; docs/ARCHITECTURE.md, "Adding a method"). A line added at run time is imported at
# the next lookup.
PLUGIN_MODULES = [
    "bench.backbones",
    "bench.data",
    "baselines.dinov2",
    "baselines.official",
    "baselines.fit3d",
    "tasks",
    "bench.splat.perf",
    "methods.splat_distill",
    "methods.mef",
]

_loaded: set = set()


def load_plugins() -> None:
    """Import every module of :data:`PLUGIN_MODULES` not imported yet."""
    pending = [mod for mod in PLUGIN_MODULES if mod not in _loaded]
    _loaded.update(pending)  # before importing: a lookup during an import does not start another round
    for mod in pending:
        importlib.import_module(mod)
