"""Every config file composes and resolves; unknown names fail with the valid list; cache keys."""

import pytest
from omegaconf import OmegaConf

from bench.config import GROUPS, compose, group_options
from bench.identity import backbone_key as backbone_cache_key
from bench.errors import UnknownNameError
from bench.registry import BACKBONES, METHODS, TASKS


@pytest.mark.slow
@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_every_option_of_every_group_composes(group):
    opts = group_options(group)
    assert opts, f"config group {group} is empty"
    for opt in opts:
        cfg = compose([f"{group}={opt}"])
        OmegaConf.to_container(cfg, resolve=True)  # all interpolations resolve


@pytest.mark.parametrize("recipe", group_options("experiment"))
def test_every_experiment_recipe_composes(recipe):
    cfg = compose([f"experiment={recipe}"])
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.slow
def test_config_names_match_registries():
    assert set(group_options("method")) <= set(METHODS.names())
    assert set(group_options("task")) <= set(TASKS.names())
    assert set(group_options("backbone")) <= set(BACKBONES.names())
    for group in ("method", "task", "backbone"):
        for opt in group_options(group):
            assert compose([f"{group}={opt}"])[group].name == opt


def test_unknown_name_lists_valid_options():
    with pytest.raises(UnknownNameError) as e:
        compose(["method=nope"])
    assert "unknown method 'nope'" in str(e.value) and "dinov2" in str(e.value)
    with pytest.raises(UnknownNameError, match="backbone 'vit_huge'"):
        compose(["backbone=vit_huge"])


def test_cache_key_tracks_what_determines_the_weights():
    base = compose(["method=dinov2"])
    k = backbone_cache_key(base)
    assert k == backbone_cache_key(compose(["method=dinov2"]))
    assert k != backbone_cache_key(compose(["method=dinov2", "seed=1"]))
    assert k != backbone_cache_key(compose(["method=dinov2", "backbone=tiny_vit"]))
    # evaluation-side choices do not change the trained backbone
    assert k == backbone_cache_key(compose(["method=dinov2", "task=synth_seg"]))
