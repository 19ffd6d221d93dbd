"""A method added from outside the repository by the documented route (docs/ARCHITECTURE.md, "Adding a method"):
its folder (method + schema modules), its yaml, one registry line. It runs a real cell end to end (synthetic
depth, tiny ViT, CPU) and its own keys are checked against its own schema."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from bench import registry
from bench.cli import main

PACKAGE = "toy_nudge_method"

FILES = {
    "__init__.py": '''
        """A toy method: every weight of the backbone scaled by (1 + method.nudge), frozen."""

        from . import method, schema  # noqa: F401  (registration)
        ''',
    "method.py": """
        import torch

        from bench.registry import METHODS


        @METHODS.register("toy_nudge", "toy: every backbone weight scaled by (1 + method.nudge), frozen")
        class ToyNudge:
            trains = False

            def fit(self, backbone, cfg, workdir):
                with torch.no_grad():
                    for p in backbone.parameters():
                        p.mul_(1.0 + float(cfg.method.nudge))
                        p.requires_grad_(False)
                return backbone.eval()
        """,
    "schema.py": """
        from dataclasses import dataclass

        from bench.registry import METHOD_SCHEMAS
        from bench.schema import REQ


        @METHOD_SCHEMAS.register("toy_nudge", "keys of method=toy_nudge")
        @dataclass
        class ToyNudgeMethod:
            name: str = REQ
            nudge: float = REQ
        """,
    "conf/method/toy_nudge.yaml": """
        # toy_nudge: the scale of the nudge
        name: toy_nudge
        nudge: 0.25
        """,
}

SYNTH_TINY = [
    "backbone=tiny_vit",
    "task=synth_depth",
    "task.dataset.scenes=2",
    "task.dataset.views=2",
    "task.dataset.size=28",
    "task.dataset.held_out=1",
    "task.progress=false",
    "device=cpu",
]


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """The toy method's folder in a temporary directory on sys.path, and its one registry line."""
    root = tmp_path / "plugins"
    for rel, text in FILES.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(registry, "PLUGIN_MODULES", [*registry.PLUGIN_MODULES, PACKAGE])  # the registry line
    yield root / PACKAGE
    for reg in (registry.METHODS, registry.METHOD_SCHEMAS):
        reg._entries.pop("toy_nudge", None)  # test-only: keep the shared registries clean for other tests
    registry._loaded.discard(PACKAGE)
    for mod in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[mod]


def _paths(tmp):
    return [
        f"paths.{k}={tmp}/{d}"
        for k, d in (("data_dir", "data"), ("results_dir", "results"), ("output_dir", "out"), ("cache_dir", "cache"))
    ]


def test_toy_method_runs_a_cell_and_checks_its_own_keys(toy_package, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    conf = f"hydra.searchpath=[file://{toy_package / 'conf'}]"
    from bench import schema

    assert "toy_nudge" in registry.METHODS and schema.method_schemas()["toy_nudge"].__name__ == "ToyNudgeMethod"

    # a misspelt key of the toy method's own: one line naming it and its nearest key, nothing written
    assert main(["run", conf, "method=toy_nudge", "+method.nuge=1", *SYNTH_TINY, *_paths(tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "config key 'method.nuge' does not exist" in lines[0] and "did you mean method.nudge?" in lines[0]
    # ... and a value of the wrong type for it
    assert main(["run", conf, "method=toy_nudge", "method.nudge=lots", *SYNTH_TINY, *_paths(tmp_path)]) == 2
    assert "method.nudge='lots' must be a number" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()

    # the cell runs end to end and its record is written, the toy's config in it
    assert main(["run", conf, "method=toy_nudge", *SYNTH_TINY, *_paths(tmp_path)]) == 0
    records = list((tmp_path / "results" / "runs").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["method"] == "toy_nudge" and rec["task"] == "synth_depth"
    assert rec["config"]["method"] == {"name": "toy_nudge", "nudge": 0.25}
    assert rec["metrics"]["rmse"] > 0 and rec["identity"]["cell"]
