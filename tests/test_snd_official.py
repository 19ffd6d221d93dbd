"""Splat-and-Distill as the paper ran it (issue 25): official defaults, named deviations of the CPU recipes,
the reconstructor checkpoint as a required input."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.config import compose
from bench.errors import CheckpointError
from helpers import path_overrides, run_bench
from methods.splat_distill.official import check_inputs, deviations

ROOT = Path(__file__).resolve().parents[1]


def _ids(cfg):
    from bench.config import to_container

    return [d["id"] for d in deviations(to_container(cfg.method))]


@pytest.mark.slow
def test_defaults_are_the_official_rules_and_recipes_name_their_deviations():
    cfg = compose(["method=splat_distill", "task=nyu_depth"])
    m = cfg.method
    assert (m.reconstructor.name, m.reconstructor.checkpoint, m.lift.coverage) == ("mvsplat", None, "rgb")
    assert _ids(cfg) == []
    assert _ids(compose(["experiment=demo", "method=splat_distill"])) == [
        "views.order=uniform",
        "views.contiguous=false",
        "views.keep_bad=false",
        "views.last_batch=carry",
        "reconstructor.name=depth",
        "lift.coverage=alpha",
        "lift.feature_covariance=true_covariance",
        "head.prototype_init=trunc_normal",
    ]
    # the re-run mini-benchmark (issue 30) keeps only the deviations the CPU needs: no MVSplat weights, no SH colours
    for recipe in ("mini_benchmark", "dose_response"):
        cfg = compose([f"experiment={recipe}", "method=splat_distill"])
        assert _ids(cfg) == ["views.last_batch=carry", "reconstructor.name=depth", "lift.coverage=alpha"], recipe
        assert (cfg.method.teacher.momentum, cfg.method.teacher.every) == (0.999, 10), recipe
    # the recipes' other methods do not carry Splat-and-Distill's deviations
    for method in ("dinov2", "fit3d", "mef"):
        assert "reconstructor" not in compose(["experiment=mini_benchmark", f"method={method}"]).method
    # a deviation by hand is named too
    cfg = compose(["method=splat_distill", "method.loss=cosine", "method.lift.upsample=bilinear"])
    assert _ids(cfg) == ["lift.upsample=bilinear", "loss=cosine"]


def test_mvsplat_checkpoint_is_a_required_input(tmp_path):
    with pytest.raises(CheckpointError, match="needs a checkpoint") as e:
        check_inputs(compose(["method=splat_distill"]))
    assert "re10k.ckpt" in e.value.fix and "ScanNet++" in e.value.fix
    with pytest.raises(CheckpointError, match="does not exist"):
        check_inputs(compose(["method=splat_distill", f"method.reconstructor.checkpoint={tmp_path / 'x.ckpt'}"]))
    (tmp_path / "x.ckpt").write_bytes(b"x")
    check_inputs(compose(["method=splat_distill", f"method.reconstructor.checkpoint={tmp_path / 'x.ckpt'}"]))
    check_inputs(compose(["method=splat_distill", "method.reconstructor.checkpoint=hf://org/repo/re10k.ckpt"]))
    check_inputs(compose(["experiment=demo"]))  # the depth reconstructor reads no checkpoint


@pytest.mark.slow
def test_run_without_checkpoint_fails_up_front_with_one_line(tmp_path):
    """`bench run method=splat_distill` without the MVSplat checkpoint: exit 2, one error line, nothing
    written (synthetic data, so the task check passes and the reconstructor check is what fails)."""
    out = run_bench(
        "run", "method=splat_distill", "backbone=tiny_vit", "task=synth_depth", *path_overrides(tmp_path, outputs="out")
    )
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "needs a checkpoint" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))


@pytest.mark.slow
def test_print_config_shows_the_official_reconstructor_and_coverage():
    out = run_bench("run", "--print-config", "method=splat_distill", "task=nyu_depth")
    assert out.returncode == 0, out.stderr
    assert "name: mvsplat" in out.stdout and "coverage: rgb" in out.stdout


# ------------------------------------------------------------------------------ the official feature render
def _one_gaussian(cov):
    """One Gaussian 5 m in front of an identity camera (f = 100 px), its mean on pixel (16, 16)'s centre."""
    import torch

    from methods.splat_distill.reconstruct import PixelGaussians

    g = PixelGaussians(
        means=torch.tensor([0.0, 0.0, 5.0]).reshape(1, 1, 1, 3),
        scales=torch.ones(1, 1, 1),
        opacities=torch.full((1, 1, 1), 0.9),
        depth=torch.full((1, 1, 1), 5.0),
        covariances=None if cov is None else cov.reshape(1, 1, 1, 3, 3),
    )
    K = torch.tensor([[[100.0, 0.0, 16.5], [0.0, 100.0, 16.5], [0.0, 0.0, 1.0]]])
    return g, torch.eye(4)[None], K


def _analytic_alpha(var_x: float, var_y: float, opacity: float = 0.9, size: int = 33):
    """gsplat's classic rule at the projected centre: 2D covariance (f/z)^2 Sigma_xy + 0.3 I, alpha capped at
    0.999, alphas below 1/255 not drawn."""
    import torch

    d = torch.arange(size, dtype=torch.float64) - 16.0
    vx, vy = 400.0 * var_x + 0.3, 400.0 * var_y + 0.3  # (f/z)^2 = (100/5)^2
    a = opacity * torch.exp(-0.5 * (d[None, :] ** 2 / vx + d[:, None] ** 2 / vy))
    return torch.where(a >= 1 / 255, a.clamp(max=0.999), torch.zeros_like(a))


def test_variance_as_scale_render_vs_true_covariance_exact_footprint():
    """An x-elongated Gaussian (std 0.2, 0.1, 0.05 m along x, y, z): the true render has 2D variances
    400 * (0.04, 0.01) + 0.3 px^2; the official render's eigenvector frame of diag(0.04, 0.01, 0.0025) is a
    permutation with det -1 -> identity rotation, and the variances become the scales: the render's 3D
    covariance is diag(0.0025^2, 0.01^2, 0.04^2) -- elongated along z, nearly a point on screen."""
    import math

    import torch

    from methods.splat_distill.reconstruct import official_render_covariances

    cov = torch.diag(torch.tensor([0.04, 0.01, 0.0025]))
    g, w2c, K = _one_gaussian(cov)
    feats = torch.ones(1, 1, 1, 1)
    true_f, true_a, _ = g.splat(feats, w2c, K, 33, 33, covariance="true_covariance")
    off_f, off_a, _ = g.splat(feats, w2c, K, 33, 33, covariance="official")
    torch.testing.assert_close(true_a[0].double(), _analytic_alpha(0.04, 0.01), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(off_a[0].double(), _analytic_alpha(0.0025**2, 0.01**2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(off_f[0, ..., 0], off_a[0])  # one Gaussian of feature 1: feature = alpha
    assert int((true_a > 0).sum()) == 283 and int((off_a > 0).sum()) == 9  # pixels drawn (alpha >= 1/255)
    # rotated about z by 30 degrees: eigh's frame again has det -1 -> the same axis-aligned official footprint
    a = math.radians(30)
    Rz = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rot = Rz @ torch.diag(torch.tensor([0.0025, 0.01, 0.04])) @ Rz.T
    torch.testing.assert_close(official_render_covariances(rot), torch.diag(torch.tensor([0.0025, 0.01, 0.04]) ** 2))
    # a frame with det +1 keeps its rotation: R diag(lambda^2) R^T
    lam, R = torch.linalg.eigh(rot)
    flip = R.clone()
    flip[:, 0] = -flip[:, 0]  # the same eigenvectors, det +1
    spd = flip @ torch.diag(lam) @ flip.T
    l2, R2 = torch.linalg.eigh(spd)
    want = (R2 @ torch.diag(l2**2) @ R2.T) if float(torch.linalg.det(R2)) > 0 else torch.diag(l2**2)
    torch.testing.assert_close(official_render_covariances(spd), want)
    # isotropic Gaussians (depth reconstructor: scale s): the official footprint is scale s^2
    g_iso, _, _ = _one_gaussian(None)
    g_iso.scales = torch.full((1, 1, 1), 0.1)
    _, iso_a, _ = g_iso.splat(feats, w2c, K, 33, 33, covariance="official")
    torch.testing.assert_close(iso_a[0].double(), _analytic_alpha(1e-4, 1e-4), atol=1e-5, rtol=1e-4)
    _, iso_t, _ = g_iso.splat(feats, w2c, K, 33, 33)
    torch.testing.assert_close(iso_t[0].double(), _analytic_alpha(1e-2, 1e-2), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ view sampling, prototypes
def test_view_sampling_official_rules(tmp_path):
    """One pass over the scenes per epoch without replacement; redraw when the context frame numbers skip;
    is_bad frames kept by the official reader."""
    import json

    from bench.data.scenes import MultiViewScenes
    from bench.data.synthetic import ensure_synthetic
    from methods.splat_distill.views import ViewSampler, frame_numbers

    s = ViewSampler([10] * 5, gap=3, seed=4, order="epoch")
    for epoch in range(3):
        scenes = [s.example(epoch * 5 + k)[0] for k in range(5)]
        assert sorted(scenes) == [0, 1, 2, 3, 4], scenes
    assert [s.example(k)[0] for k in range(5)] != [s.example(5 + k)[0] for k in range(5)]  # a new order per epoch
    # frames 4 and 5 missing: numbers 0 1 2 3 6 7 8 9 10 11 -> no context pair may straddle the hole
    nums = [frame_numbers([f"DSC{n:05d}.JPG" for n in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11)])]
    assert nums[0][4] == 6
    s = ViewSampler([10], gap=2, seed=0, numbers=nums)
    pairs = {s.example(i)[1][:2] for i in range(300)}
    assert pairs == {(0, 2), (1, 3), (4, 6), (5, 7), (6, 8), (7, 9)}
    assert {ViewSampler([10], gap=2, seed=0).example(i)[1][:2] for i in range(300)} >= {(2, 4), (3, 5)}
    with pytest.raises(Exception, match="contiguous=false"):
        ViewSampler([4], gap=2, numbers=[[0, 2, 4, 6]])
    # is_bad frames: skipped by default, kept with keep_bad (the official loader reads every frame)
    root = ensure_synthetic(tmp_path / "synth", 1, 5, (32, 48), 0)
    scene = MultiViewScenes(root).scene_ids[0]
    js = next((root / scene).rglob("transforms_undistorted.json"))
    meta = json.loads(js.read_text())
    meta["frames"][2]["is_bad"] = True
    js.write_text(json.dumps(meta))
    assert MultiViewScenes(root).num_views(scene) == 4
    assert MultiViewScenes(root, keep_bad=True).num_views(scene) == 5


def test_smaller_last_step_of_an_epoch(monkeypatch):
    """views.last_batch=smaller (official DataLoader, drop_last=False): 5 examples per epoch in batches of 2 are
    steps of 2, 2, 1, each example once per epoch; carry runs on into the next epoch. Ranks take balanced
    consecutive shares whose concatenation is the one-process step; a 1-example step leaves rank 1 none."""
    from bench.errors import BenchError
    from methods.splat_distill.method import step_share
    from methods.splat_distill.views import ViewSampler, rank_share, step_examples

    assert [list(step_examples(s, 2, 5)) for s in range(6)] == [[0, 1], [2, 3], [4], [5, 6], [7, 8], [9]]
    assert [list(step_examples(s, 2, 5, "carry")) for s in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [len(step_examples(s, 14, 28)) for s in range(3)] == [14, 14, 14]  # an epoch that divides: no small step
    sampler = ViewSampler([10] * 5, gap=3, seed=2, order="epoch")
    assert sampler.epoch_size == 5
    for epoch in range(3):
        steps = [[sampler.example(i)[0] for i in step_examples(st, 2, 5)] for st in range(3 * epoch, 3 * epoch + 3)]
        assert [len(x) for x in steps] == [2, 2, 1] and sorted(sum(steps, [])) == [0, 1, 2, 3, 4], steps
    carried = [sampler.example(i)[0] for st in range(3) for i in step_examples(st, 2, 5, "carry")]
    assert sorted(carried[:5]) == [0, 1, 2, 3, 4] and carried[5] == sampler.example(5)[0]  # step 2 straddles
    for n in range(7):
        for world in (1, 2, 3):
            shares = [rank_share(n, r, world) for r in range(world)]
            assert [i for sh in shares for i in sh] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [list(rank_share(14, r, 2)) for r in range(2)] == [list(range(7)), list(range(7, 14))]  # = rank_slice
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        seen[r] = [list(step_share(st, 2, 5, "smaller")) for st in range(3)]
    assert seen == {0: [[0], [2], [4]], 1: [[1], [3], []]}  # step 2: rank 1 holds nothing
    with pytest.raises(BenchError, match="last_batch"):
        step_examples(0, 2, 5, "drop")


def test_prototype_init_is_nn_linear_default():
    """Official: the last layer is nn.Linear(bottleneck, K) created after apply(_init_weights): kaiming-uniform
    with a = sqrt(5), i.e. U(-1/sqrt(256), 1/sqrt(256)) for the paper's bottleneck 256 (std 1/sqrt(3*256))."""
    import math

    import torch

    from methods.splat_distill.head import DINOHead

    torch.manual_seed(0)
    p = DINOHead(8, out_dim=4096, hidden_dim=16, bottleneck_dim=256, prototype_init="linear").prototypes.detach()
    bound = 1 / math.sqrt(256)
    assert float(p.abs().max()) <= bound and float(p.abs().max()) > 0.99 * bound
    assert abs(float(p.std()) - bound / math.sqrt(3)) < 0.01 * bound
    t = DINOHead(8, out_dim=4096, hidden_dim=16, bottleneck_dim=256, prototype_init="trunc_normal").prototypes
    assert abs(float(t.detach().std()) - 0.02) < 0.002


def test_fit3d_student_grid_is_the_floor_multiple():
    """FiT3D utils/model_utils.py (both stages): 576x880 -> bilinear to 574x868 -> a 41x62 grid (bench's
    backbone rule, nearest multiple, gives 41x63)."""
    import torch
    import torch.nn.functional as F

    from baselines.fit3d.stage1 import floor_resize, teacher_features
    from bench.backbones import build_backbone

    bb = build_backbone(compose(["backbone=tiny_vit"]).backbone).eval()
    x = torch.rand(1, 3, 576, 880)
    y = floor_resize(x, bb)
    assert tuple(y.shape[-2:]) == (574, 868)
    torch.testing.assert_close(y, F.interpolate(x, size=(574, 868), mode="bilinear", antialias=False))
    assert tuple(teacher_features(bb, x, resize="official").shape[-2:]) == (41, 62)
    assert tuple(teacher_features(bb, x, resize="backbone").shape[-2:]) == (41, 63)
    assert floor_resize(x[..., :574, :868], bb) is not None and floor_resize(y, bb) is y  # already a multiple
    assert compose(["method=fit3d"]).method.resize == "official"
    assert compose(["experiment=mini_benchmark", "method=fit3d"]).method.resize == "official"


# ------------------------------------------------------------------------------ the paper recipes
@pytest.mark.slow
def test_paper_recipes_compose_for_the_whole_grid():
    """experiment=snd_paper (ViT-S / ViT-B) and snd_paper_eval over its recipe_values.paper_tasks: every cell composes and
    passes the schemas; the evaluation grid reuses the backbone snd_paper trains (same cache key)."""
    from bench import schema
    from bench.config import group_options
    from bench.identity import backbone_key as backbone_cache_key
    from bench.method_variants import apply_per_task

    tasks = list(compose(["experiment=snd_paper_eval"]).recipe_values.paper_tasks)
    assert len(tasks) == 13 and set(tasks) <= set(group_options("task"))
    for bb in ("dinov2_vits14", "dinov2_vitb14"):
        train = compose(["experiment=snd_paper", f"backbone={bb}"])
        m = train.method
        assert (m.data.dataset, list(m.data.size), m.optim.batch_size, m.optim.steps) == (
            "scannetpp",
            [576, 880],
            14,
            300000,
        )
        assert m.reconstructor.name == "mvsplat" and str(m.reconstructor.checkpoint).endswith("mvsplat_scannetpp.ckpt")
        assert _ids(train) == []  # the official rules, no deviation
        for task in tasks:
            cfg = compose(["experiment=snd_paper_eval", f"backbone={bb}", f"task={task}"])
            schema.check(cfg)
            schema.check(apply_per_task(cfg))
            if not task.endswith("_corr"):
                assert backbone_cache_key(cfg) == backbone_cache_key(
                    compose(["experiment=snd_paper", f"backbone={bb}", f"task={task}"])
                )
