"""The import graph of the project: no circles, no upward arrows (docs/ARCHITECTURE.md, "Layers").

Layers, bottom to top: the library (``bench.*`` but the application modules), ``tasks``, the methods
(``methods.*`` and ``baselines.*``, each package on its own), the application (runner, preflight, tables,
figures, cli, sweep, cluster). Every import counts, also one inside a function: a lazy import is still
an arrow. Read from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "tasks", "methods", "baselines")
APPLICATION = {
    "bench.__main__",
    "bench.cli",
    "bench.cluster",
    "bench.figures",
    "bench.leaderboard_html",
    "bench.preflight",
    "bench.runner",
    "bench.sweep",
    "bench.table",
    "bench.table_formats",
    "bench.table_output",
}
# the one declared exception: a side-by-side benchmark of FiT3D's and Splat-and-Distill's pipelines
ALLOWED = {("baselines.fit3d.perf", "methods.splat_distill")}


def modules(root: Path = ROOT) -> dict:
    out = {}
    for pkg in PACKAGES:
        for p in (root / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _targets(name: str, path: Path, node, mods) -> list:
    if isinstance(node, ast.Import):
        cands = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        cands = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for c in cands:
        while c and c not in mods:
            c = c.rpartition(".")[0]
        if c and c != name:
            out.append(c)
    return out


def graph(root: Path = ROOT) -> dict:
    mods = modules(root)
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[m].update(_targets(m, p, node, mods))
    return edges


def cycles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(mod: str) -> int:
    if mod in APPLICATION:
        return 3
    return {"bench": 0, "tasks": 1, "methods": 2, "baselines": 2}[mod.split(".")[0]]


def upward(edges: dict) -> list:
    bad = []
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            lm, lt = layer(m), layer(t)
            other_method = lm == lt == 2 and m.split(".")[:2] != t.split(".")[:2]
            if (lt > lm or other_method) and not any(m == a and t.startswith(b) for a, b in ALLOWED):
                bad.append(f"{m} -> {t}")
    return bad


def test_no_import_circles():
    assert cycles(graph()) == []


def test_imports_point_downwards():
    assert upward(graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_arrow(tmp_path):
    """The checks can fail: a made-up tree with a circle and a library module importing the runner."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "bench" / "a.py").write_text("from .b import x\n")
    (tmp_path / "bench" / "b.py").write_text("def f():\n    from bench.a import y\n")
    (tmp_path / "bench" / "runner.py").write_text("")
    (tmp_path / "tasks" / "t.py").write_text("from bench.runner import run\n")
    (tmp_path / "methods" / "m").mkdir()
    (tmp_path / "methods" / "m" / "__init__.py").write_text("from baselines import z\n")
    edges = graph(tmp_path)
    assert cycles(edges) == [["bench.a", "bench.b"]]
    assert upward(edges) == ["methods.m -> baselines", "tasks.t -> bench.runner"]
