"""Contracts, parametrised over every registered name: each backbone keeps the feature seam, each task
names a missing dataset root before any work, each experiment recipe composes for every method it is
meant for and runs a cell end to end with tiny overrides."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import bench.backbones  # noqa: F401  (registers the backbones)
import tasks  # noqa: F401  (registers the tasks)
from bench.config import compose, group_options
from bench.errors import DataMissingError
from bench.registry import BACKBONES, METHODS, TASKS
from helpers import path_overrides

EXPERIMENTS = group_options("experiment")


def _paths(tmp_path):
    return path_overrides(tmp_path, root=False)


# -- backbones ----------------------------------------------------------------------------------------
def test_every_backbone_has_a_config_and_every_config_a_backbone():
    assert sorted(e.name for e in BACKBONES.entries()) == group_options("backbone")


@pytest.mark.slow
@pytest.mark.parametrize("name", [e.name for e in BACKBONES.entries()])
def test_backbone_contract(name):
    """Forward shape, output stride and layers() on the meta device (shapes only: ViT-g costs nothing)."""
    cfg = compose([f"backbone={name}"]).backbone
    spec = BACKBONES.get(name)
    bb = spec.family.from_config(cfg, spec, meta=True).to("meta").eval()
    p = bb.patch_size
    assert p in (8, 14, 16, 32) and bb.embed_dim > 0 and bb.num_blocks >= 1
    H, W = 3 * p, 5 * p
    assert bb.grid_size(H, W) == (3, 5)
    x = torch.empty(2, 3, H, W, device="meta")
    with torch.no_grad():
        out = bb(x)
        assert tuple(out.shape) == (2, bb.embed_dim, 3, 5)
        maps = bb.layers(x, [0, -1])
        assert [tuple(m.shape) for m in maps] == [(2, bb.embed_dim, 3, 5)] * 2
        default = bb.layers(x)
        assert len(default) == len(list(cfg.layers))
        with_cls = bb.layers(x, [-1], return_cls=True)
        assert tuple(with_cls[0][1].shape) == (2, bb.embed_dim)
        odd = bb(torch.empty(1, 3, H + p // 2 - 1, W + 1, device="meta"))  # not a patch multiple
        assert tuple(odd.shape[-2:]) == bb.grid_size(H + p // 2 - 1, W + 1)


# -- tasks --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_task_has_a_config_and_every_config_a_task():
    names = {str(compose([f"task={t}"]).task.name) for t in group_options("task")}
    assert names == {e.name for e in TASKS.entries()}


@pytest.mark.parametrize("name", group_options("task"))
def test_task_check_names_a_missing_root(name, tmp_path):
    root = tmp_path / "not_prepared"
    cfg = compose([f"task={name}", f"task.dataset.root={root}"] + _paths(tmp_path))
    task = TASKS.get(cfg.task.name)()
    if cfg.task.dataset.name == "synthetic":  # generated on first use: nothing can be missing
        if hasattr(task, "check"):  # optional here (the runner calls it when present)
            task.check(cfg)
        assert not root.exists()  # and check() itself writes nothing
        return
    with pytest.raises(DataMissingError) as e:
        task.check(cfg)
    assert str(root) in e.value.problem
    assert f"python -m bench data {cfg.task.dataset.name}" in e.value.fix


# -- experiment recipes -------------------------------------------------------------------------------
def _recipe_methods(name: str):
    """The methods a recipe is for: its own method, plus the sweep line of its header comment."""
    from importlib import resources

    text = resources.files("bench.conf").joinpath(f"experiment/{name}.yaml").read_text()
    methods = {str(compose([f"experiment={name}"]).method.name)}
    for line in text.splitlines():
        if line.lstrip("# ").startswith("python -m bench sweep"):
            for word in line.split():
                if word.startswith("method="):
                    methods |= set(word[len("method=") :].split(","))
    return sorted(methods)


RECIPE_CELLS = [(e, m) for e in EXPERIMENTS for m in _recipe_methods(e)]


@pytest.mark.parametrize("experiment,method", RECIPE_CELLS)
def test_recipe_composes_and_resolves(experiment, method, tmp_path):
    cfg = compose([f"experiment={experiment}", f"method={method}"] + _paths(tmp_path))
    assert cfg.method.name in {e.name for e in METHODS.entries()}
    plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert plain["task"]["name"] in {e.name for e in TASKS.entries()}
    assert cfg.backbone.name in {e.name for e in BACKBONES.entries()}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_runs_a_tiny_cell(experiment, tmp_path):
    """Each recipe's backbone, task and protocol end to end: the raw teacher (no training) on a
    tiny synthetic set, a one-epoch probe."""
    from bench.runner import run_cell

    # a recipe whose backbone loads Hub weights (the paper recipes: DINOv2) runs it on random weights here
    # (tests never touch the network); its architecture, task and protocol are the recipe's
    offline = ["backbone.weights=none"] if compose([f"experiment={experiment}"]).backbone.weights == "hub" else []
    cfg = compose(
        [
            f"experiment={experiment}",
            *offline,
            "method=dinov2",
            "task=synth_depth",
            *_paths(tmp_path),
            "task.dataset.scenes=2",
            "task.dataset.views=2",
            "task.dataset.size=64",
            "task.dataset.held_out=1",
            "task.protocols.linear.schedule.epochs=1",
            "task.progress=false",
        ]
    )
    rec = run_cell(cfg)
    assert rec["backbone"] == compose([f"experiment={experiment}"]).backbone.name
    assert rec["task"] == "synth_depth" and 0 < rec["metrics"]["rmse"] < 10
