"""Typed config schemas (bench/schema.py): misspelled / missing keys and wrong types fail up front, with
the key named; the committed records' fingerprints are unchanged by the schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench import schema
from bench.config import compose, group_options, stable_hash, to_container
from bench.errors import BenchError
from bench.identity import cell_identity
from bench.method_variants import apply_per_task

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "results" / "runs"


def _records():
    """One committed record per (method, task): the mini-benchmark grid."""
    seen, out = set(), []
    for p in sorted(RUNS.glob("*.json")):
        r = json.loads(p.read_text())
        if (r["method"], r["task"]) not in seen and r.get("identity", {}).get("label") == "mini_benchmark":
            seen.add((r["method"], r["task"]))
            out.append(r)
    return out


RECORDS = _records()


def test_records_cover_every_method():
    methods = {r["method"] for r in RECORDS}
    assert {"dinov2", "splat_distill", "mef"} <= methods, methods


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: f"{r['method']}-{r['task']}-s{r['seed']}")
def test_committed_fingerprints_recompose(rec):
    """The record's cell recomposed from its recipe, method, task and seed (as `bench sweep` composes it,
    then the runner applies method.per_task) passes the schemas and hashes to the committed fingerprint;
    validating leaves the config byte-for-byte the same."""
    cfg = compose(
        [
            f"experiment={rec['identity']['label']}",
            f"method={rec['method']}",
            f"task={rec['task']}",
            f"seed={rec['seed']}",
        ]
    )
    cfg = apply_per_task(cfg)
    before = stable_hash(to_container(cfg), 64)
    schema.check(cfg)
    assert stable_hash(to_container(cfg), 64) == before
    ident = cell_identity(cfg)
    assert ident["cell"] == rec["identity"]["cell"]
    assert ident["row"] == rec["identity"]["row"]
    assert ident["cell"] == cell_identity(OmegaConf.create(rec["config"]))["cell"]  # the stored config agrees with it


@pytest.mark.parametrize("recipe", [None] + group_options("experiment"))
@pytest.mark.parametrize("method", group_options("method"))
def test_every_method_and_recipe_passes(recipe, method):
    cfg = compose([f"method={method}", "task=synth_corr"] + ([f"experiment={recipe}"] if recipe else []))
    schema.check(cfg)
    schema.check(apply_per_task(cfg))  # the correspondence variant (method.per_task)


@pytest.mark.parametrize("task", group_options("task"))
def test_every_task_protocol_passes(task):
    schema.check(compose([f"task={task}"]))  # every entry of task.protocols is checked, selected or not


@pytest.mark.parametrize("cluster", group_options("cluster"))
def test_every_cluster_passes(cluster):
    schema.check(compose([f"cluster={cluster}"]))


def _err(overrides):
    with pytest.raises(BenchError) as e:
        schema.check(compose(overrides))
    return e.value.line()


def test_unknown_method_key_named_with_nearest():
    msg = _err(["method=splat_distill", "+method.optim.stpes=5"])
    assert "config key 'method.optim.stpes' does not exist" in msg
    assert "did you mean method.optim.steps?" in msg


@pytest.mark.slow
def test_nested_and_top_level_unknown_keys():
    assert "'method.lift.blendng'" in _err(["method=splat_distill", "+method.lift.blendng=false"])
    assert "did you mean method.stage1.densify.until" in _err(["method=fit3d", "+method.stage1.densify.untill=4"])
    assert "'method.learning_rate'" in _err(["method=mef", "+method.learning_rate=1"])
    msg = _err(["task=synth_depth", "+task.protocols.linear.schedule.epoch=4"])
    assert (
        "'task.protocols.linear.schedule.epoch'" in msg and "did you mean task.protocols.linear.schedule.epochs" in msg
    )
    assert "'task.protocol.num_cor'" in _err(["task=synth_corr", "+task.protocol.num_cor=3"])
    assert "'cluster.max_worker'" in _err(["cluster=local", "+cluster.max_worker=3"])
    assert "'cluster.train.timeout'" in _err(["cluster=slurm", "+cluster.train.timeout=3"])
    assert "'method.per_task.correspondence.lift.blend'" in _err(
        ["method=splat_distill", "+method.per_task.correspondence.lift.blend=1"]
    )


@pytest.mark.slow
def test_wrong_types_and_missing_keys():
    assert "method.optim.steps='many' must be an integer" in _err(["method=splat_distill", "method.optim.steps=many"])
    assert "method.lift.blending=3 must be true or false" in _err(["method=splat_distill", "method.lift.blending=3"])
    assert "must be a number" in _err(["task=synth_depth", "task.protocols.linear.schedule.lr=fast"])
    assert "config key 'method.optim.lr' is missing" in _err(["method=mef", "~method.optim.lr"])
    # an int where a float is declared is fine (and left an int: nothing is converted)
    cfg = compose(["method=splat_distill", "method.optim.lr=1"])
    schema.check(cfg)
    assert cfg.method.optim.lr == 1 and isinstance(cfg.method.optim.lr, int)


@pytest.mark.slow
def test_other_methods_keys_are_accepted_but_typed():
    # the mini-benchmark recipe merges SnD and FiT3D keys into every method: accepted (with their types) ...
    schema.check(compose(["experiment=mini_benchmark", "method=dinov2"]))
    schema.check(compose(["method=dinov2", "+method.stage2.steps=3", "+method.optim.lr=0.1"]))
    # ... but a key of no method, or another method's key with the wrong type, is refused
    assert "'method.stage2.stepz'" in _err(["method=dinov2", "+method.stage2.stepz=3"])
    assert "method.stage2.steps='x' must be an integer or null" in _err(["method=dinov2", "+method.stage2.steps=x"])


def test_schemas_in_hydra_config_store():
    from hydra.core.config_store import ConfigStore

    schema.method_schemas()  # each method's schema registers beside the method (its plugin is imported here)
    repo = ConfigStore.instance().repo["schema"]
    assert {f"{m}.yaml" for m in group_options("method")} <= set(repo["method"])
    assert {"local.yaml", "slurm.yaml"} <= set(repo["cluster"])
    assert {"dense.yaml", "correspondence.yaml"} <= set(repo["protocol"])


@pytest.mark.slow
def test_every_method_yaml_has_a_schema_with_exactly_its_keys():
    """Each method's own yaml sets every required key of its schema and nothing else (the schemas list what
    the yaml holds; the yaml holds the defaults)."""
    for name in group_options("method"):
        node = to_container(compose([f"method={name}"]).method)
        schema.check_node(node, schema.method_schemas()[name], "method")  # no alternatives: only its own keys


def _cli(args, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BENCH_RESULTS": str(tmp_path / "results"),
        "BENCH_OUTPUTS": str(tmp_path / "outputs"),
        "BENCH_CACHE": str(tmp_path / "cache"),
        "BENCH_DATA": str(tmp_path / "data"),
    }
    return subprocess.run(
        [sys.executable, "-m", "bench", "run", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_recipe_with_misspelled_key(tmp_path):
    """A recipe (own config directory on hydra's search path) with a misspelled key: exit 2, one error line
    naming the key and the nearest valid one, nothing written."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "my_recipe.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: splat_distill\nmethod:\n  optim: {stpes: 5}\n"
    )
    r = _cli([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=my_recipe", "device=cpu"], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "'method.optim.stpes'" in lines[0] and "did you mean method.optim.steps?" in lines[0]
    assert "my_recipe" in lines[0]
    assert "Traceback" not in r.stderr
    assert not any((tmp_path / d).exists() for d in ("results", "outputs", "cache"))


def test_cli_misspelled_key_on_command_line(tmp_path, monkeypatch, capsys):
    """`python -m bench run` (its main(), in this process) with a misspelled key: exit 2, one error line."""
    from bench.cli import main

    for var, d in (
        ("BENCH_RESULTS", "results"),
        ("BENCH_OUTPUTS", "outputs"),
        ("BENCH_CACHE", "cache"),
        ("BENCH_DATA", "data"),
    ):
        monkeypatch.setenv(var, str(tmp_path / d))
    monkeypatch.chdir(tmp_path)
    for args, key, near in (
        (["method=splat_distill", "method.optim.stpes=5"], "method.optim.stpes", "method.optim.steps"),
        (["method=splat_distill", "+method.optim.stpes=5"], "method.optim.stpes", "method.optim.steps"),
        (
            ["task=synth_depth", "+task.protocols.linear.schedule.epoch=4"],
            "task.protocols.linear.schedule.epoch",
            "task.protocols.linear.schedule.epochs",
        ),
    ):
        assert main(["run", *args, "device=cpu"]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert f"'{key}'" in lines[0] and f"did you mean {near}" in lines[0], lines[0]
        assert not any((tmp_path / d).exists() for d in ("results", "outputs", "cache"))


@pytest.mark.parametrize(
    "key,bad",
    [
        ("upsample_grid", "diagonal"),
        ("all_excluded", "nan"),
        ("uncovered", "skip"),
        ("blend_segments", "some"),
        ("render_basis", "pixels"),
        ("upsample", "nearest"),
        ("resize", "crop"),
        ("masks", "sam"),
    ],
)
def test_snd_lift_choices_checked_at_distiller_construction(key, bad):
    """A lift choice that is not one is refused when the Distiller is built (before any training step), not
    in the per-step targets()."""
    from bench.backbones import build_backbone
    from methods.splat_distill.distill import Distiller

    cfg = compose(
        [
            "method=splat_distill",
            "backbone=tiny_cnn",
            "method.head.prototypes=16",
            "method.head.hidden_dim=16",
            "method.head.bottleneck_dim=8",
            f"method.lift.{key}={bad}",
        ]
    )
    with pytest.raises(BenchError, match=rf"method\.lift\.{key}='{bad}' is not a choice"):
        Distiller(build_backbone(cfg.backbone), cfg.method)
