"""FiT3D baseline: stage I quality, densification/pruning, caching and exact resume of both stages,
stage II through the runner (saved, strict timm reload, evaluated), the concatenation protocol, the
frozen-teacher method, and a smoke run of ``perf lift``. Tiny synthetic scene, tiny_vit, CPU."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bench.backbones import build_backbone
from bench.checkpoint import load_state_dict_strict, read_state_dict
from bench.config import compose
from bench.registry import METHODS, TASKS
from bench.runner import MODEL_FILE, backbone_dir, run_cell
from bench.seed import seed_everything
from helpers import fit3d_tiny

from baselines.fit3d.gaussians import C0, SceneGaussians
from baselines.fit3d.method import FiT3D, epoch_batches, fit_scenes, masked_l1, open_scenes
from baselines.fit3d.stage1 import SceneFit, feature_correlation, fit_scene, scene_key, scene_seed

ITERS = 24
STAGE1 = [
    f"method.stage1.iterations={ITERS}",
    "method.stage1.init_points=300",
    "method.stage1.feature_dim=8",
    "method.stage1.lr.colors=1e-2",
    "method.stage1.lr.features=1e-2",
    "method.stage1.lr.decoder=1e-2",
    "method.stage1.densify.from=8",
    "method.stage1.densify.until=20",
    "method.stage1.densify.every=8",
    "method.stage1.opacity_reset_every=0",
    "method.stage1.ckpt_every=8",
]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    torch.set_num_threads(2)
    p = tmp_path_factory.mktemp("fit3d")
    return compose(
        [
            *fit3d_tiny(p, root=False),
            "method.ckpt_every=1",
            "method.data.scenes=1",
            "method.data.views=4",
            "method.data.size=[28,42]",
            "method.data.seed=3",
            *STAGE1,
            "task.dataset.scenes=2",
            "task.dataset.views=2",
            "task.dataset.size=28",
            "task.dataset.held_out=1",
            "task.protocols.linear.schedule.epochs=1",
            "task.progress=false",
            "method.diagnostics.data.views=4",
            "method.diagnostics.pairs=2",
        ]
    )


def _teacher(cfg):
    seed_everything(int(cfg.seed))  # as the runner: seed, then build (tiny_vit is random-init)
    return build_backbone(cfg.backbone)


@pytest.fixture(scope="module")
def stage1(cfg):
    """Stage I of the scene, fitted once for the module (then cached in scene_cache)."""
    data = open_scenes(cfg.method.data, cfg.paths.data_dir)
    dirs = fit_scenes(data, _teacher(cfg), cfg, "cpu", progress=False)
    return data, dirs


# ---------------------------------------------------------------------------------------------- stage I
def test_stage1_raises_psnr_and_feature_correlation(stage1):
    data, dirs = stage1
    info = json.loads((dirs[data.scene_ids[0]] / "info.json").read_text())
    init, final = info["init"], info["final"]
    assert final["psnr"] > init["psnr"] + 3.0, info
    assert init["feature_corr"] == 0.0  # FiT3D initialises features at zero
    assert final["feature_corr"] > 0.3, info
    counts = [n for _, n in info["num_gaussians_curve"]]
    assert counts[0] == 300 and info["num_gaussians"] != 300  # densification/pruning changed the count
    fit = SceneFit.load(dirs[data.scene_ids[0]])
    views = data.load_views(data.scene_ids[0], [1])
    feats, alpha = fit.render_targets(views["w2c"], views["K"], 42, 28)
    assert feats.shape == (1, 48, 28, 42) and alpha.shape == (1, 28, 42) and float(alpha.mean()) > 0.5


def test_stage1_cache_is_reused(cfg, stage1):
    data, dirs = stage1
    d = dirs[data.scene_ids[0]]
    stamp = (d / "scene.safetensors").stat().st_mtime_ns
    again = fit_scenes(data, _teacher(cfg), cfg, "cpu", progress=False)
    assert again == dirs and (d / "scene.safetensors").stat().st_mtime_ns == stamp
    m = cfg.method
    key = scene_key("a", m.data, "t", m.stage1, 0)
    assert key == scene_key("a", {**m.data, "scenes": 7}, "t", {**m.stage1, "ckpt_every": 3}, 0)  # same fit
    for other in (
        scene_key("b", m.data, "t", m.stage1, 0),
        scene_key("a", m.data, "u", m.stage1, 0),
        scene_key("a", m.data, "t", {**m.stage1, "iterations": 5}, 0),
        scene_key("a", m.data, "t", m.stage1, 1),
    ):
        assert other != key


def test_stage1_resume_is_exact(cfg, stage1, tmp_path):
    data, dirs = stage1
    scene = data.scene_ids[0]
    views = data.load_views(scene, range(data.num_views(scene)))
    teacher, seed = _teacher(cfg), scene_seed(int(cfg.seed), scene)
    part = fit_scene(views, teacher, cfg.method.stage1, tmp_path / "s", seed=seed, progress=False, stop_after=20)
    assert part.info["iterations"] == 20 and not (tmp_path / "s" / "scene.safetensors").exists()
    done = fit_scene(views, teacher, cfg.method.stage1, tmp_path / "s", seed=seed, progress=False)
    ref = SceneFit.load(dirs[scene])
    assert done.gaussians.num == ref.gaussians.num
    for k, v in ref.gaussians.state_dict().items():
        if k not in ("grad_accum", "grad_count", "max_radii"):
            assert torch.equal(done.gaussians.state_dict()[k], v), k
    assert torch.equal(done.decoder.weight, ref.decoder.weight)


# ------------------------------------------------------------------------------- densification, pruning
def _gaussians():
    """5 Gaussians in front of an identity camera (z = 4): A small + hot (clone), B large + hot (split),
    C transparent (prune), D small + cold (keep), E huge + hot (pruned as too large once screen pruning
    is on, else split)."""
    g = SceneGaussians(5, 2)
    with torch.no_grad():
        g.means.copy_(torch.tensor([[0.0, 0, 4], [0.5, 0, 4], [0, 0.5, 4], [-0.5, 0, 4], [0, -0.5, 4]]))
        g.log_scales.copy_(torch.log(torch.tensor([0.005, 0.05, 0.005, 0.005, 0.5]))[:, None].expand(-1, 3))
        g.quats[:, 0] = 1
        g.opacity_logits.copy_(torch.logit(torch.tensor([0.5, 0.5, 0.001, 0.5, 0.5])))
        g.features.copy_(torch.arange(10.0).reshape(5, 2))
    return g


def _adam_with_state(g):
    opt = torch.optim.Adam(g.parameters(), lr=1e-3, eps=1e-15)
    for p in g.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_densify_clone_split_prune_counts_and_optimizer_state():
    g = _gaussians()
    opt = _adam_with_state(g)
    f0, s0 = g.features.detach().clone(), g.scales.detach().clone()
    g.grad_accum.copy_(torch.tensor([3e-4, 3e-4, 9e-4, 1e-4, 3e-4]) * 2)
    g.grad_count.fill_(2)
    torch.manual_seed(0)
    ev = g.densify_and_prune(opt, grad_threshold=2e-4, extent=1.0, percent_dense=0.01, min_opacity=0.005)
    # clone A (+1), split B and E (+2 each, originals removed), prune C (-1): 5 + 1 + 4 - 2 - 1 = 7
    assert ev == {"cloned": 1, "split": 2, "pruned": 1, "num": 7}
    assert g.means.shape == (7, 3) and g.grad_accum.abs().sum() == 0
    # kept originals in order (A, D), then the clone of A, then B's two children, then E's
    assert torch.equal(g.features, f0[[0, 3, 0, 1, 4, 1, 4]])
    assert torch.allclose(g.scales[3:], s0[[1, 4, 1, 4]] / 1.6) and torch.equal(g.scales[:3], s0[[0, 3, 0]])
    for p in g.parameters():  # the optimiser follows the new parameters; moments of new entries are zero
        st = opt.state[p]
        assert any(q is p for grp in opt.param_groups for q in grp["params"])
        assert (
            st["exp_avg"].shape == p.shape and st["exp_avg"][2:].abs().sum() == 0 and st["exp_avg"][:2].abs().sum() > 0
        )
    out = g.render(torch.eye(4)[None], torch.tensor([[[20.0, 0, 16], [0, 20, 16], [0, 0, 1]]]), 32, 32)
    (out["rgb"].sum() + out["features"].sum()).backward()  # a step after the edit works
    opt.step()


def test_prune_too_large_and_growth_cap():
    g = _gaussians()
    g.max_radii.copy_(torch.tensor([1.0, 2, 1, 30, 1]))  # D is large on screen
    g.grad_accum.copy_(torch.tensor([3e-4, 3e-4, 9e-4, 1e-4, 3e-4]))
    g.grad_count.fill_(1)
    ev = g.densify_and_prune(None, grad_threshold=2e-4, extent=1.0, max_screen_size=20, world_size=0.1)
    # C (transparent), D (screen) and E (world: 0.5 > 0.1) pruned; A cloned, B split
    assert ev == {"cloned": 1, "split": 1, "pruned": 3, "num": 4}
    g = _gaussians()
    g.grad_accum.copy_(torch.tensor([3e-4, 5e-4, 0, 0, 4e-4]))
    g.grad_count.fill_(1)
    ev = g.densify_and_prune(None, grad_threshold=2e-4, extent=1.0, max_gaussians=5)  # C pruned: budget 1
    assert ev == {"cloned": 0, "split": 1, "pruned": 1, "num": 5}  # only B (largest gradient) densified


def test_view_space_gradient_statistics_and_opacity_reset():
    g = _gaussians()
    K = torch.tensor([[20.0, 0, 16], [0, 10, 16], [0, 0, 1]])
    view = g.view_stats(torch.eye(4), K, 32, 32)
    assert view["visible"].tolist() == [True, True, False, True, True]  # C: opacity < 1/255 is culled
    assert torch.allclose(view["z"], torch.full((5,), 4.0))
    g.means.grad = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 5], [0, 0, 0], [3, 4, 0]])
    g.add_stats(view)
    # dL/du = dL/dx * z / fx, NDC: x W/2  ->  A: 1 * 4/20 * 16 = 3.2; B: 2 * 4/10 * 16 = 12.8; z-only: 0
    assert torch.allclose(g.grad_accum, torch.tensor([3.2, 12.8, 0, 0, math.hypot(3 * 0.2 * 16, 4 * 0.4 * 16)]))
    assert torch.equal(g.grad_count, torch.tensor([1.0, 1, 0, 1, 1]))
    assert torch.equal(g.max_radii, torch.where(view["visible"], view["radius"], 0))
    opt = _adam_with_state(g)
    g.reset_opacity(0.01, opt)
    assert torch.allclose(g.opacities, torch.tensor([0.01, 0.01, 0.001, 0.01, 0.01]), atol=1e-6)
    assert opt.state[g.opacity_logits]["exp_avg"].abs().sum() == 0
    # colours: rgb = 0.5 + C0 * dc, clamped at 0
    g.colors_dc.data[0] = torch.tensor([1 / C0, -1 / C0, 0])
    assert torch.allclose(g.rgb[0], torch.tensor([1.5, 0, 0.5]))


def test_load_state_dict_resizes():
    g = _gaussians()
    g.densify_and_prune(None, grad_threshold=0.0, extent=1.0)  # everything hot: N changes
    h = SceneGaussians(0, 2)
    h.load_state_dict(g.state_dict())
    assert h.num == g.num and all(torch.equal(a, b) for a, b in zip(h.state_dict().values(), g.state_dict().values()))


def test_feature_correlation_and_masked_l1():
    x = torch.randn(2, 3, 4, 5)
    assert feature_correlation(x, 2 * x + 1) == pytest.approx(1.0)
    assert feature_correlation(x, -x) == pytest.approx(-1.0)
    assert feature_correlation(torch.zeros_like(x), x) == 0.0
    pred, tgt = torch.zeros(1, 2, 1, 2), torch.tensor([[[[1.0, 3]], [[2, 5]]]])
    # cell 0 (weight 1): |1| + |2|; cell 1 (weight 0.5): 0.5 (|3| + |5|); / (2 channels x 1.5)
    assert float(masked_l1(pred, tgt, torch.tensor([[[1.0, 0.5]]]))) == pytest.approx((3 + 4) / 3)


def test_epoch_batches_cover_every_item_once_per_epoch():
    for epoch in range(2):
        got = sum((epoch_batches(epoch * 4 + b, 7, 2, 0) for b in range(4)), [])
        assert sorted(got) == list(range(7))
    assert [epoch_batches(b, 7, 2, 0) for b in range(4)] != [epoch_batches(4 + b, 7, 2, 0) for b in range(4)]


# --------------------------------------------------------------------------------------------- stage II
@pytest.mark.slow
def test_stage2_through_runner_saved_reloads_and_evaluates(cfg, stage1):
    import timm

    rec = run_cell(cfg)
    assert rec["method"] == "fit3d" and rec["checkpoint"]["kind"] == "trained" and not rec["checkpoint"]["reused"]
    assert math.isfinite(rec["metrics"]["rmse"]) and rec["protocol"]["concat_original"] is False
    path = backbone_dir(cfg) / MODEL_FILE
    hist = json.loads((backbone_dir(cfg) / "history.json").read_text())
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) and h["coverage"] > 0.5 for h in hist)  # 4 views / batch 2
    init = _teacher(cfg)
    spec = init.spec
    plain = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)
    load_state_dict_strict(plain, read_state_dict(path), source=str(path))
    sd0 = init.model.state_dict()
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, sd0[k])]
    assert len(changed) > len(sd0) // 2  # the whole ViT was fine-tuned
    # the scene fits were reused from stage I's cache (nothing re-fitted)
    scenes = json.loads((backbone_dir(cfg) / "stage1_scenes.json").read_text())
    assert [v["dir"] for v in scenes.values()] == [str(d) for d in stage1[1].values()]
    assert run_cell(cfg)["checkpoint"]["reused"] is True


def test_stage2_resume_matches_uninterrupted(cfg, stage1, tmp_path):
    ref = read_state_dict(backbone_dir(cfg) / MODEL_FILE) if (backbone_dir(cfg) / MODEL_FILE).exists() else None
    if ref is None:  # this test run alone: train uninterrupted here
        ref = FiT3D().fit(_teacher(cfg), cfg, tmp_path / "full").model.state_dict()
    wd = tmp_path / "resumed"
    part = FiT3D().fit(_teacher(cfg), cfg, wd, stop_after=1)
    assert json.loads((wd / "history.json").read_text())[-1]["step"] == 1
    out = FiT3D().fit(_teacher(cfg), cfg, wd).model.state_dict()
    assert part is not None and all(torch.equal(out[k], v) for k, v in ref.items())


def test_concat_protocol_end_to_end(cfg, stage1, monkeypatch):
    task_cls = TASKS.get("synth_depth")
    seen = {}
    orig = task_cls.evaluate

    def spy(self, backbone, c, workdir):
        seen["type"], seen["dim"] = type(backbone).__name__, backbone.embed_dim
        seen["feat"] = backbone(torch.rand(1, 3, 28, 28)).shape[1]
        return orig(self, backbone, c, workdir)

    monkeypatch.setattr(task_cls, "evaluate", spy)
    from omegaconf import OmegaConf

    c = OmegaConf.merge(cfg, {"task": {"concat_original": True}})
    rec = run_cell(c)
    assert seen == {"type": "ConcatBackbone", "dim": 96, "feat": 96}
    assert rec["protocol"]["concat_original"] is True and rec["config"]["task"]["protocol"]["concat_original"] is True
    assert math.isfinite(rec["metrics"]["rmse"])


# ------------------------------------------------------------------------------------------- dinov2, perf
def test_dinov2_teacher_method_is_frozen_and_unchanged(cfg):
    method = METHODS.get("dinov2")()
    assert method.trains is False
    bb = _teacher(cfg)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    out = method.fit(bb, cfg, None)
    assert out is bb and not out.training and not any(p.requires_grad for p in out.parameters())
    assert all(torch.equal(v, before[k]) for k, v in out.state_dict().items())


def test_lift_perf_smoke(tmp_path, capsys):
    from bench.registry import PERF

    fn = PERF.get("lift")
    parser = argparse.ArgumentParser()
    fn.add_arguments(parser)
    args = parser.parse_args(
        [
            "--size",
            "28",
            "28",
            "--views",
            "2",
            "--iters",
            "1",
            "--init-points",
            "100",
            "--backbone",
            "tiny_vit",
            "--gap",
            "1",
            "--reconstructors",
            "depth",
            "--data-dir",
            str(tmp_path),
        ]
    )
    assert fn(args) == 0
    out = capsys.readouterr().out
    assert "FiT3D stage I" in out and "SnD feed-forward (depth)" in out and "30000 iterations" in out


# ------------------------------------------------------------------------ stage II rules (issue 17)
def test_stage2_loss_mask_rules_and_batchnorm_eval():
    from baselines.fit3d.method import stage2_mask, train_mode
    from bench.backbones import build_backbone

    alpha = torch.tensor([[[0.9, 0.2], [0.7, 0.0]]])  # [1,H,W]
    anon = torch.tensor([[[255, 255], [0, 255]]])  # 0 = anonymised
    view = {"anon": anon}
    assert stage2_mask(view, alpha, 0.5, "anon")[0, 0].tolist() == [[1, 1], [0, 1]]
    assert stage2_mask(view, alpha, 0.5, "coverage")[0, 0].tolist() == [[1, 0], [1, 0]]
    assert stage2_mask(view, alpha, 0.5, "anon_and_coverage")[0, 0].tolist() == [[1, 0], [0, 0]]
    assert stage2_mask({}, alpha, 0.5, "anon")[0, 0].tolist() == [[1, 1], [1, 1]]  # no masks: all ones
    # a JPEG-edge value weighs its pixel partly, as FiT3D reads the mask (datasets/scannetpp.py: / 255.0)
    edge = stage2_mask({"anon": torch.tensor([[[255, 51], [0, 204]]])}, alpha, 0.5, "anon")[0, 0]
    assert torch.allclose(edge, torch.tensor([[1.0, 0.2], [0.0, 0.8]]))
    bb = build_backbone(compose(["backbone=tiny_cnn"]).backbone)
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    train_mode(bb, "eval")
    assert bb.training and not any(m.training for m in bns)
    stats = [m.running_mean.clone() for m in bns]
    bb(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bns))  # running statistics unchanged
    train_mode(bb, "train")
    assert all(m.training for m in bns)
    assert compose(["method=fit3d"]).method.stage2.loss_mask == "anon"


def test_stage2_batches_drop_the_last_incomplete_one_as_the_official_loader():
    """FiT3D finetune.py: BatchSampler(drop_last=True): 7 views in batches of 3 are 2 steps an epoch, each a
    full batch of distinct views; drop_last=false keeps the smaller third batch (the recipes' deviation)."""
    from baselines.fit3d.method import epoch_batches, steps_per_epoch

    assert steps_per_epoch(7, 3, True) == 2 and steps_per_epoch(7, 3, False) == 3
    epoch0 = [epoch_batches(s, 7, 3, seed=0, drop_last=True) for s in range(2)]
    assert [len(b) for b in epoch0] == [3, 3] and len(set(epoch0[0] + epoch0[1])) == 6
    assert epoch_batches(2, 7, 3, seed=0, drop_last=True) != epoch0[0]  # step 2 starts the next epoch
    kept = [epoch_batches(s, 7, 3, seed=0) for s in range(3)]
    assert [len(b) for b in kept] == [3, 3, 1] and sorted(sum(kept, [])) == list(range(7))
    assert compose(["method=fit3d"]).method.stage2.drop_last is True
    assert compose(["experiment=mini_benchmark", "method=fit3d"]).method.stage2.drop_last is True
