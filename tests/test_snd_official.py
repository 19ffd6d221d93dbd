"""Splat-and-Distill as the paper ran it (issue 25): official defaults, named deviations of the CPU recipes,
the reconstructor checkpoint as a required input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import compose
from bench.errors import CheckpointError
from methods.splat_distill.official import check_inputs, deviations

ROOT = Path(__file__).resolve().parents[1]


def _ids(cfg):
    from bench.config import to_container

    return [d["id"] for d in deviations(to_container(cfg.method))]


def test_defaults_are_the_official_rules_and_recipes_name_their_deviations():
    cfg = compose(["method=splat_distill", "task=nyu_depth"])
    m = cfg.method
    assert (m.reconstructor.name, m.reconstructor.checkpoint, m.lift.coverage) == ("mvsplat", None, "rgb")
    assert _ids(cfg) == []
    for recipe in ("demo", "mini_benchmark", "dose_response"):
        cfg = compose([f"experiment={recipe}", "method=splat_distill"])
        assert _ids(cfg)[:2] == ["reconstructor.name=depth", "lift.coverage=alpha"], recipe
    # the recipes' other methods do not carry Splat-and-Distill's deviations
    for method in ("dinov2", "fit3d", "mef"):
        assert "reconstructor" not in compose(["experiment=mini_benchmark", f"method={method}"]).method
    # a deviation by hand is named too
    cfg = compose(["method=splat_distill", "method.loss=cosine", "method.lift.upsample=bilinear"])
    assert _ids(cfg) == ["lift.upsample=bilinear", "loss=cosine"]


def test_mvsplat_checkpoint_is_a_required_input(tmp_path):
    with pytest.raises(CheckpointError, match="needs a checkpoint") as e:
        check_inputs(compose(["method=splat_distill"]))
    assert "re10k.ckpt" in e.value.fix and "pretrain-reconstructor model=mvsplat" in e.value.fix
    with pytest.raises(CheckpointError, match="does not exist"):
        check_inputs(compose(["method=splat_distill", f"method.reconstructor.checkpoint={tmp_path / 'x.ckpt'}"]))
    (tmp_path / "x.ckpt").write_bytes(b"x")
    check_inputs(compose(["method=splat_distill", f"method.reconstructor.checkpoint={tmp_path / 'x.ckpt'}"]))
    check_inputs(compose(["method=splat_distill", "method.reconstructor.checkpoint=hf://org/repo/re10k.ckpt"]))
    check_inputs(compose(["experiment=demo"]))  # the depth reconstructor reads no checkpoint


def test_run_without_checkpoint_fails_up_front_with_one_line(tmp_path):
    """`bench run method=splat_distill` without the MVSplat checkpoint: exit 2, one error line, nothing
    written (synthetic data, so the task check passes and the reconstructor check is what fails)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "method=splat_distill",
            "backbone=tiny_vit",
            "task=synth_depth",
            f"paths.root={tmp_path}",
            f"paths.data_dir={tmp_path}/data",
            f"paths.cache_dir={tmp_path}/cache",
            f"paths.output_dir={tmp_path}/out",
            f"paths.results_dir={tmp_path}/results",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "needs a checkpoint" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))


def test_print_config_shows_the_official_reconstructor_and_coverage():
    out = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--print-config", "method=splat_distill", "task=nyu_depth"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "name: mvsplat" in out.stdout and "coverage: rgb" in out.stdout
