"""The CLI: help, list, and one clear error line + non-zero exit + no record for bad input."""

import pytest
import torch

from bench.cli import main
from helpers import path_overrides, run_bench, run_env


@pytest.fixture
def paths(tmp_path):
    return path_overrides(tmp_path, root=False)


def _no_records(tmp_path):
    runs = tmp_path / "results" / "runs"
    return not runs.exists() or not any(runs.glob("*.json"))


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_help_runs_as_a_module():
    out = run_bench("--help", cwd=None, timeout=120)
    assert out.returncode == 0
    for cmd in ("run", "table", "list", "data", "perf"):
        assert cmd in out.stdout


def test_list_names_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("dinov2", "synth_depth", "efficientnet_lite0", "dinov2_vits14", "synthetic", "demo"):
        assert name in out


@pytest.mark.parametrize(
    "override,needle",
    [
        ("method=no_such_method", "unknown method 'no_such_method'"),
        ("task=no_such_task", "unknown task 'no_such_task'"),
        ("backbone=no_such_backbone", "unknown backbone 'no_such_backbone'"),
    ],
)
def test_unknown_names(override, needle, paths, tmp_path, capsys):
    assert main(["run", override, *paths]) == 2
    line = _one_error_line(capsys)
    assert needle in line and "Fix: use one of:" in line
    assert _no_records(tmp_path)


def test_wrong_checkpoint_keys(paths, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3), "head.extra": torch.zeros(1)}, bad)
    rc = main(["run", "backbone=tiny_vit", f"backbone.weights={bad}", "task=synth_depth", *paths])
    assert rc == 2
    line = _one_error_line(capsys)
    assert (
        "missing keys" in line
        and "unexpected keys [head.extra]" in line
        and "shape mismatch" in line
        and "Fix:" in line
    )
    assert _no_records(tmp_path)


def test_missing_dataset_root(paths, tmp_path, capsys):
    rc = main(
        ["run", "method=dinov2", "task=nyu_depth", "backbone=tiny_vit", f"task.dataset.root={tmp_path}/nowhere", *paths]
    )
    assert rc == 2
    line = _one_error_line(capsys)
    assert "nowhere" in line and "python -m bench data" in line
    assert _no_records(tmp_path)


def test_bad_override_syntax(paths, capsys):
    assert main(["run", "seed=[1,", *paths]) == 2
    assert "invalid config override" in _one_error_line(capsys)


def test_a_process_that_imported_bench_exits_without_the_collectors_walk():
    """Importing bench registers gc.freeze at exit (the finalisation's walk over torch's objects is most of a
    run's exit time, docs/SCALING.md): a handler registered before the import runs after it and sees the
    objects frozen; the other exit handlers still run."""
    import subprocess
    import sys

    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('FROZEN', gc.get_freeze_count() > 0, flush=True))\n"
        "import bench\n"
        "atexit.register(lambda: print('BEFORE', gc.get_freeze_count() > 0, flush=True))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=run_env())
    assert out.returncode == 0 and out.stdout.split() == ["BEFORE", "False", "FROZEN", "True"], out
