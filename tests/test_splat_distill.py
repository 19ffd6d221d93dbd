"""Splat-and-Distill: sampling, upsampling/blending rules, head/loss, LoRA merge, geometry sanity,
a tiny training run (loss falls, strict timm load), exact resume, and the learned reconstructor."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bench.backbones import build_backbone
from bench.checkpoint import load_state_dict_strict, read_state_dict
from bench.config import compose
from bench.errors import BenchError, CheckpointError
from bench.seed import seed_everything
from helpers import SND_SCENES, SND_SEED, SND_SIZE, SND_VIEWS, snd_tiny
from methods.splat_distill.adapt import Adapter
from methods.splat_distill.features import mask_aware_upsample, segment_blend
from methods.splat_distill.head import (
    COLLAPSE_KEYS,
    DINOHead,
    collapse_counts,
    collapse_stats,
    dino_cross_entropy,
    distill_loss,
)
from methods.splat_distill.reconstruct import (
    CostVolumeReconstructor,
    DepthUnprojection,
    MVSplatAdapter,
    build_reconstructor,
)
from methods.splat_distill.official import CPU_DEVIATIONS
from methods.splat_distill.views import ViewSampler

SIZE, SCENES, VIEWS, SEED = SND_SIZE, SND_SCENES, SND_VIEWS, SND_SEED  # tiny_vit (patch 14) -> a 4x5 grid


def _cfg(root, *extra):
    return compose([*snd_tiny(root), "method.diagnostics.enabled=false", *CPU_DEVIATIONS, *extra])


# ---------------------------------------------------------------------------------- sampling
def test_view_sampler_paper_rule_and_state():
    s = ViewSampler([20, 30], gap=8, placement="uniform", seed=3)
    seen_t = set()
    for _ in range(300):
        scene, (c0, c1, t) = s.sample()
        assert c1 - c0 == 8 and c0 <= t <= c1 and c1 < [20, 30][scene]
        seen_t.add(t - c0)
    assert seen_t == set(range(9))  # uniform over the inclusive range
    state = s.state_dict()
    a = [s.sample() for _ in range(5)]
    s.load_state_dict(state)
    assert [s.sample() for _ in range(5)] == a
    short = ViewSampler([4], gap=8, placement="context", seed=0)  # shorter than the gap: use all of it
    for _ in range(20):
        _, (c0, c1, t) = short.sample()
        assert (c0, c1) == (0, 3) and t in (0, 3)
    assert ViewSampler([9], gap=8, placement="middle").sample()[1] == (0, 8, 4)
    with pytest.raises(BenchError):
        ViewSampler([9], placement="nowhere")


# ---------------------------------------------------------------------- upsampling / blending
def test_mask_aware_upsample_rule():
    feats = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1,1,2,2]
    plain = mask_aware_upsample(feats, None, (4, 4))
    assert torch.allclose(plain, F.interpolate(feats, size=(4, 4), mode="bilinear", align_corners=False))
    # left half label 0, right half label 1: no pixel may mix the two columns of patches
    mask = torch.tensor([[0, 0, 1, 1]] * 4)[None]
    up = mask_aware_upsample(feats, mask, (4, 4))[0, 0]
    # pixel (1, 1): bilinear taps rows 0/1 with weights 0.75/0.25, columns 0/1 -> only column 0 kept
    assert up[1, 1] == pytest.approx(0.75 * 1 + 0.25 * 3)
    assert up[1, 2] == pytest.approx(0.75 * 2 + 0.25 * 4)
    assert torch.allclose(up[:, :2], torch.tensor([[1.0], [1.5], [2.5], [3.0]]).expand(4, 2))
    assert torch.allclose(up[:, 2:], torch.tensor([[2.0], [2.5], [3.5], [4.0]]).expand(4, 2))
    # a pixel whose label no neighbouring patch has falls back to plain bilinear
    odd = mask.clone()
    odd[0, 2, 1] = 7  # (no patch centre sits on this pixel)
    assert mask_aware_upsample(feats, odd, (4, 4))[0, 0, 2, 1] == pytest.approx(float(plain[0, 0, 2, 1]))


def test_segment_blend_hand_values():
    feats = torch.tensor([1.0, 3.0, 10.0, 20.0]).view(1, 1, 1, 4)
    labels = torch.tensor([[[0, 0, 1, 1]]])
    valid = torch.tensor([[[True, True, True, False]]])
    out = segment_blend(feats, labels, 0.5, valid)[0, 0, 0]
    # segment 0 mean 2; segment 1 mean over valid pixels only = 10
    assert out.tolist() == pytest.approx([1.5, 2.5, 10.0, 15.0])


# ----------------------------------------------------------------------------- head and loss
def test_dino_head_and_cross_entropy():
    head = DINOHead(6, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(2, 6, 3, 3)
    logits = head(x)
    assert logits.shape == (2, 10, 3, 3) and logits.abs().max() <= 1.0 + 1e-6  # cosines, temperature 1
    s, t = torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1), torch.tensor([[0.0, 1.0]]).view(1, 2, 1, 1)
    pt = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    expected = -(pt * torch.log_softmax(torch.tensor([1.0, 0.0]), 0)).sum()
    assert dino_cross_entropy(s, t)[0, 0, 0] == pytest.approx(float(expected))
    # the teacher side is detached; invalid pixels do not count
    teacher = DINOHead(6, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    target = torch.randn(2, 6, 3, 3, requires_grad=True)
    valid = torch.zeros(2, 3, 3, dtype=torch.bool)
    valid[0, 0, 0] = True
    loss, extra = distill_loss("dino", x.requires_grad_(), target, valid, head, teacher)
    loss.backward()
    assert target.grad is None and x.grad[1].abs().sum() == 0 and x.grad[0, :, 0, 0].abs().sum() > 0
    assert extra["kl"] >= -1e-6
    assert collapse_stats(extra["collapse"])["agreement"] in (0.0, 1.0)  # one valid cell
    for kind in ("cosine", "direct"):
        assert distill_loss(kind, target, target, valid)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_collapse_diagnostics_uniform_vs_collapsed():
    """Prototype usage entropy, argmax entropy and agreement on hand-made logits (K=4): a student whose 4
    valid cells each pick their own prototype (uniform usage) vs a teacher whose cells all pick prototype 0
    (collapsed); a 5th, invalid cell never counts."""
    K, big = 4, 10.0
    s = torch.zeros(1, K, 1, 5)
    t = torch.zeros(1, K, 1, 5)
    for i in range(4):
        s[0, i, 0, i] = big  # cell i -> prototype i
        t[0, 0, 0, i] = big  # every cell -> prototype 0
    s[0, 0, 0, 4], t[0, 3, 0, 4] = big, big  # the invalid cell would change every number
    valid = torch.tensor([[[True, True, True, True, False]]])
    got = collapse_stats(collapse_counts(s, t, valid, 1.0, 2.0))
    # teacher: batch-mean softmax (temperature 2) = one cell's softmax [a, b, b, b]
    a, b = math.exp(big / 2) / (math.exp(big / 2) + 3), 1 / (math.exp(big / 2) + 3)
    teacher_usage = -(a * math.log(a) + 3 * b * math.log(b))
    assert got["student_usage_entropy"] == pytest.approx(math.log(4), abs=1e-6)  # mean of 4 rotated softmaxes
    assert got["student_argmax_entropy"] == pytest.approx(math.log(4), abs=1e-12)
    assert got["teacher_usage_entropy"] == pytest.approx(teacher_usage, rel=1e-5)  # float32 softmax sums
    assert got["teacher_argmax_entropy"] == 0.0
    assert got["agreement"] == pytest.approx(0.25)  # only cell 0: both pick prototype 0
    assert set(got) == set(COLLAPSE_KEYS)
    # the sums add over ranks: two halves summed == the whole batch
    halves = [torch.zeros_like(valid), torch.zeros_like(valid)]
    halves[0][..., :2], halves[1][..., 2:4] = True, True
    summed = sum(collapse_counts(s, t, h, 1.0, 2.0) for h in halves)
    assert collapse_stats(summed) == pytest.approx(got, rel=1e-6)
    # uniform outputs: usage entropy log K for both, even though every argmax is a tie (-> prototype 0)
    flat = collapse_stats(collapse_counts(torch.zeros(1, K, 2, 2), torch.zeros(1, K, 2, 2), torch.ones(1, 2, 2)))
    assert flat["student_usage_entropy"] == pytest.approx(math.log(K)) and flat["agreement"] == 1.0


# ------------------------------------------------------------------------------ LoRA merging
@pytest.mark.parametrize("name,choice", [("tiny_vit", "official"), ("tiny_vit", "attention"), ("tiny_cnn", "official")])
def test_lora_merge_gives_plain_timm(name, choice, tmp_path):
    seed_everything(0)
    bb = build_backbone(compose([f"backbone={name}"]).backbone)
    ad = Adapter(bb.model, "lora", r=4, alpha=4, dropout=0.1, target_modules=choice)
    assert ad.lora_layers() and all(("lora_" in n) for n, p in bb.model.named_parameters() if p.requires_grad)
    targets = {n.rsplit(".", 1)[-1] for n in ad.lora_layers()}
    assert targets == ({"qkv", "proj"} if name == "tiny_vit" else {"conv_pw", "conv_pwl"})
    n_blocks = sum(1 for n in ad.lora_layers() if n.endswith("attn.qkv"))
    if name == "tiny_vit" and choice == "official":
        # PEFT's suffix match of the official [qkv, proj]: patch_embed.proj is adapted too
        assert "patch_embed.proj" in ad.lora_layers() and len(ad.lora_layers()) == 2 * n_blocks + 1
    else:
        assert not any(n.startswith("patch_embed") for n in ad.lora_layers())
    sd0 = bb.model.state_dict()
    base_patch = sd0.get("patch_embed.proj.base_layer.weight", sd0.get("patch_embed.proj.weight"))
    base_patch = base_patch.clone() if base_patch is not None else None
    with torch.no_grad():
        for layer in ad.lora_layers().values():
            layer.lora_B["default"].weight.normal_(0, 0.5)
    bb.eval()
    x = torch.rand(1, 3, 56, 70)
    with torch.no_grad():
        y = bb(x)
        eff = ad.effective_state()
    ad.merge()
    from bench.backbones import save_backbone

    save_backbone(bb, tmp_path / "model.safetensors")
    plain = bb.spec.create_model()
    load_state_dict_strict(plain, read_state_dict(tmp_path / "model.safetensors"), source="merged")
    assert all(torch.allclose(plain.state_dict()[k], v, atol=1e-6) for k, v in eff.items())
    if choice == "official" and name == "tiny_vit":  # the merged patch embedding carries the LoRA update
        assert (plain.state_dict()["patch_embed.proj.weight"] - base_patch).abs().max() > 1e-3
    bb2 = build_backbone(compose([f"backbone={name}"]).backbone)
    bb2.model.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(bb2.eval()(x), y, atol=1e-4)


# ------------------------------------------------------------------------------ reconstructors
def test_reconstructor_seam_errors(tmp_path):
    with pytest.raises(BenchError, match="MVSplat"):
        MVSplatAdapter()
    with pytest.raises(CheckpointError, match="pretrain-reconstructor"):
        build_reconstructor({"name": "learned", "checkpoint": str(tmp_path / "none.safetensors")})
    with pytest.raises(BenchError, match="depth maps"):
        DepthUnprojection()(
            {"images": torch.rand(2, 3, 4, 4), "K": torch.eye(3).expand(2, 3, 3), "w2c": torch.eye(4).expand(2, 4, 4)}
        )


def test_geometry_sanity_splat_vs_perturbed_pose(snd_scenes):
    """Splatting the teacher's context features into the target camera reproduces the teacher's own
    target features better with the true pose than with a perturbed one (catches convention errors)."""
    from bench.data.scenes import MultiViewScenes
    from methods.splat_distill.distill import Distiller

    seed_everything(0)
    cfg = _cfg(snd_scenes, "method.lift.blending=false", "method.lift.upsample=bilinear")
    bb = build_backbone(cfg.backbone)
    d = Distiller(bb, cfg.method, "cpu")
    data = MultiViewScenes(snd_scenes, None, SIZE)
    ex = [data.load_views(s, [1, 5, 3]) for s in data.scene_ids]
    perturbed = []
    for e in ex:
        e = dict(e)
        w2c = e["w2c"].clone()
        c = torch.linalg.inv(w2c[2])[:3, 3]
        yaw = torch.tensor([[math.cos(0.25), 0, math.sin(0.25)], [0, 1, 0], [-math.sin(0.25), 0, math.cos(0.25)]])
        w2c[2, :3, :3] = yaw @ w2c[2, :3, :3]  # rotate the target camera ~14 deg about its y axis
        w2c[2, :3, 3] = -w2c[2, :3, :3] @ c
        e["w2c"] = w2c
        perturbed.append(e)
    with torch.no_grad():
        own = d.teacher(torch.stack([e["images"][2] for e in ex]))
        t_true, v_true = d.targets(ex)
        t_pert, v_pert = d.targets(perturbed)
    cos_true = F.cosine_similarity(t_true, own, dim=1)[v_true].mean()
    cos_pert = F.cosine_similarity(t_pert, own, dim=1)[v_pert].mean()
    assert v_true.float().mean() > 0.5
    print(f"geometry: cos true pose {cos_true:.3f}, perturbed {cos_pert:.3f}")
    assert cos_true > cos_pert + 0.05, (cos_true, cos_pert)


@pytest.mark.parametrize(
    "switch",
    [
        "method.loss=cosine",
        "method.loss=direct",
        "method.teacher.frozen=true",
        "method.lift.blending=false",
        "method.lift.upsample=bilinear",
        "method.lift.masks=slic",
        "method.adapter.mode=full",
    ],
)
@pytest.mark.slow
def test_ablation_switches(snd_scenes, switch):
    from bench.data.scenes import MultiViewScenes
    from methods.splat_distill.distill import Distiller

    data = MultiViewScenes(snd_scenes, None, SIZE)
    ex = [data.load_views(data.scene_ids[0], [2, 6, 4])]
    seed_everything(0)
    base = Distiller(build_backbone(_cfg(snd_scenes).backbone), _cfg(snd_scenes).method)
    seed_everything(0)
    d = Distiller(build_backbone(_cfg(snd_scenes).backbone), _cfg(snd_scenes, switch).method)
    loss, _ = d.loss(ex)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    if "lift" in switch:  # the targets change
        assert not torch.allclose(d.targets(ex)[0], base.targets(ex)[0])
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.01)
    before = {k: v.clone() for k, v in d.teacher.model.state_dict().items()}
    d.update_teacher(d.ema.every)
    moved = any(not torch.equal(before[k], v) for k, v in d.teacher.model.state_dict().items())
    assert moved == ("frozen" not in switch)


# ------------------------------------------------------------------- official trainer rules
def test_prototype_gain_trains_in_student_and_follows_ema_in_teacher(snd_scenes):
    from bench.data.scenes import MultiViewScenes
    from methods.splat_distill.distill import Distiller

    data = MultiViewScenes(snd_scenes, None, SIZE)
    ex = [data.load_views(data.scene_ids[0], [2, 6, 4])]
    seed_everything(0)
    d = Distiller(build_backbone(_cfg(snd_scenes).backbone), _cfg(snd_scenes).method)
    assert d.head.gain.requires_grad and torch.equal(d.head.gain, torch.ones_like(d.head.gain))
    assert any(p is d.head.gain for p in d.parameters())
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    loss, _ = d.loss(ex)
    loss.backward()
    assert d.head.gain.grad is not None and d.head.gain.grad.abs().sum() > 0
    opt.step()
    g = d.head.gain.detach().clone()
    assert (g - 1).abs().max() > 1e-3  # the gain moved in the student
    d.update_teacher(d.ema.every)
    m = d.ema.momentum
    assert torch.allclose(d.teacher_head.gain, m * torch.ones_like(g) + (1 - m) * g, atol=1e-7)
    # the gain scales the logits: prototype k's logit is g_k * cosine
    x = torch.randn(1, d.backbone.embed_dim, 2, 2)
    with torch.no_grad():
        cos = d.head(x) / d.head.gain.view(1, -1, 1, 1)
    assert cos.abs().max() <= 1 + 1e-5
    fixed = Distiller(
        build_backbone(_cfg(snd_scenes).backbone), _cfg(snd_scenes, "method.head.train_gain=false").method
    )
    assert not fixed.head.gain.requires_grad and not any(p is fixed.head.gain for p in fixed.parameters())


def test_official_defaults_no_clipping_and_lora_factor_ema(snd_scenes, tmp_path):
    from methods.splat_distill.method import build_training

    cfg = compose(["method=splat_distill"])
    m = cfg.method
    assert m.optim.grad_clip is None and m.adapter.target_modules == "official" and m.head.train_gain
    assert (m.lift.upsample_grid, m.lift.all_excluded, m.lift.uncovered, m.lift.blend_segments, m.lift.resize) == (
        "corners",
        "zero",
        "zero_fill",
        "all",
        "official",
    )
    assert (m.teacher.ema, m.teacher.dropout) == ("lora_factors", True)
    assert (m.reconstructor.name, m.reconstructor.checkpoint, m.lift.coverage) == ("mvsplat", None, "rgb")
    d, _, _, loop, _ = build_training(build_backbone(_cfg(snd_scenes).backbone), _cfg(snd_scenes), tmp_path, "cpu")
    assert loop.grad_clip is None
    # the teacher is a LoRA copy: its A and B factors are averaged separately
    t_layers = [n for n, _ in d.teacher.model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert t_layers and "patch_embed.proj.lora_A.default.weight" in dict(d.teacher.model.named_parameters())
    with torch.no_grad():
        for p in d.adapter.parameters():
            p.add_(0.5)
    d.update_teacher(d.ema.every)
    s_sd, t_sd, mom = d.backbone.model.state_dict(), d.teacher.model.state_dict(), d.ema.momentum
    k = "blocks.0.attn.qkv.lora_B.default.weight"
    assert torch.allclose(t_sd[k], mom * 0 + (1 - mom) * s_sd[k], atol=1e-7)  # B started at 0


def test_corner_grid_mask_aware_upsample_official_rule():
    from methods.splat_distill.features import corner_mask_aware_upsample

    feats = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1,1,2,2]
    plain = corner_mask_aware_upsample(feats, None, (3, 3))[0, 0]
    assert torch.allclose(plain, torch.tensor([[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]]))
    # patch labels are read at pixels round(linspace(0, 2, 2)) = 0 and 2; the centre pixel (1, 1) has a
    # label none of its four neighbours has -> zero (official); the pixel (0, 1) keeps only patch (0, 0)
    mask = torch.tensor([[[0, 0, 1], [0, 5, 1], [2, 2, 3]]])
    up = corner_mask_aware_upsample(feats, mask, (3, 3))[0, 0]
    assert up[1, 1] == 0.0 and up[0, 1] == pytest.approx(1.0) and up[0, 2] == pytest.approx(2.0)
    assert up[2, 1] == pytest.approx(3.0)
    assert corner_mask_aware_upsample(feats, mask, (3, 3), "bilinear")[0, 0, 1, 1] == pytest.approx(2.5)


def test_official_resize_floor_multiple_without_antialias(snd_scenes):
    from methods.splat_distill.distill import Distiller

    d = Distiller(build_backbone(_cfg(snd_scenes).backbone), _cfg(snd_scenes).method)
    x = torch.rand(1, 3, 55, 83)  # floor multiples of 14: 42 x 70 (the backbone rounds: 56 x 84)
    y = d.backbone_input(x)
    assert y.shape[-2:] == (42, 70) and d.student_grid(55, 83) == (3, 5)
    assert torch.allclose(y, F.interpolate(x, size=(42, 70), mode="bilinear", align_corners=False, antialias=False))
    assert d.backbone(y).shape[-2:] == (3, 5)


@pytest.mark.slow
def test_correspondence_tasks_of_a_grid_use_the_no_blending_backbone():
    from baselines.official import SnDOfficial
    from bench.identity import backbone_key as backbone_cache_key
    from bench.method_variants import apply_per_task, task_kind

    keys = {}
    for task in ("synth_depth", "synth_seg", "synth_corr", "scannet_corr"):
        cfg = apply_per_task(compose(["method=splat_distill", "backbone=tiny_vit", f"task={task}"]))
        corr = task.endswith("_corr")
        assert (task_kind(cfg) == "correspondence") is corr
        assert cfg.method.lift.blending is (not corr)
        keys[task] = backbone_cache_key(cfg)
    assert keys["synth_depth"] == keys["synth_seg"] != keys["synth_corr"] == keys["scannet_corr"]
    # the sweep plans one training job per variant: backbone_dir keys the task's variant
    from bench.sweep import make_plan

    plan = make_plan(
        [
            "method=splat_distill",
            "backbone=tiny_vit",
            "task=synth_depth,synth_seg,synth_corr",
            "seed=0",
            "paths.cache_dir=/nonexistent/cache",
            "paths.results_dir=/nonexistent/results",
            *CPU_DEVIATIONS,
        ]
    )
    trains = {j.name: sorted(j.cells) for j in plan.jobs.values() if j.kind == "train"}
    assert len(trains) == 2 and sorted(len(c) for c in trains.values()) == [1, 2]
    off = SnDOfficial()
    for task, want in (("nyu_depth", "dinov2_small_snd.pth"), ("scannet_corr", "dinov2_small_snd_no_blending.pth")):
        cfg = apply_per_task(compose(["method=snd_official", "backbone=dinov2_vits14", f"task={task}"]))
        assert off.filename(off.variant(cfg), cfg) == want


def test_runner_applies_the_task_variant(monkeypatch, tmp_path):
    """run_cell keys, trains and records the correspondence cell with the no-blending variant."""
    import bench.runner as runner

    seen = []

    def stop(cfg, run_dir=None):  # record the variant the runner hands to the method, then stop
        seen.append((cfg.task.name, cfg.method.lift.blending))
        raise RuntimeError("stop")

    monkeypatch.setattr(runner, "obtain_backbone", stop)
    monkeypatch.setattr(runner, "_task", lambda c: object())
    for task in ("synth_corr", "synth_depth"):
        cfg = compose(
            [
                "method=splat_distill",
                "backbone=tiny_vit",
                f"task={task}",
                f"paths.results_dir={tmp_path}",
                f"run_dir={tmp_path / task}",
                *CPU_DEVIATIONS,
            ]
        )
        with pytest.raises(RuntimeError, match="stop"):
            runner.run_cell(cfg)
    assert seen == [("synth_corr", False), ("synth_depth", True)]


# ---------------------------------------------------------------------------- training runs
def _fit(cfg, workdir, stop_after=None):
    from methods.splat_distill import SplatDistill

    seed_everything(0)
    return SplatDistill().fit(build_backbone(cfg.backbone), cfg, workdir, stop_after=stop_after)


@pytest.mark.slow
def test_tiny_run_loss_falls_and_saves_plain_timm(snd_scenes, tmp_path):
    from bench.backbones import save_backbone

    cfg = _cfg(
        snd_scenes,
        "method.optim.steps=20",
        "method.ckpt_every=10",
        "method.diagnostics.enabled=true",
        f"method.diagnostics.data.root={snd_scenes}",
        f"method.diagnostics.data.scenes={SCENES}",
        f"method.diagnostics.data.views={VIEWS}",
        f"method.diagnostics.data.seed={SEED}",
    )
    bb = _fit(cfg, tmp_path / "run")
    diag = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    assert diag["adapted_weight_change"] > 0 and diag["feature_change"] > 0 and diag["student_grid"] == [4, 5]
    for when in ("before", "after"):  # ground-truth correspondences are more alike than random pixels
        assert diag[when]["corr_cos"] > diag[when]["random_cos"]
    assert {"kl_first", "kl_last", "head_cos_first", "head_cos_last"} <= diag.keys()
    assert {f"{k}_{w}" for k in COLLAPSE_KEYS for w in ("first", "last")} <= diag.keys()
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    K = int(cfg.method.head.prototypes)
    for h in hist:  # the collapse diagnostics of every step, in range
        assert all(0.0 <= h[k] <= math.log(K) + 1e-9 for k in COLLAPSE_KEYS if k != "agreement")
        assert 0.0 <= h["agreement"] <= 1.0
    assert len(hist) == 20 and all(h["coverage"] > 0.5 for h in hist)
    first, last = hist[:6], hist[-6:]
    mean = lambda hs, k: sum(h[k] for h in hs) / len(hs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss")
    assert mean(last, "kl") < 0.7 * mean(first, "kl")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "ckpt_00000010.pt",
        "ckpt_00000020.pt",
    ]
    save_backbone(bb, tmp_path / "model.safetensors")
    plain = bb.spec.create_model()
    load_state_dict_strict(plain, read_state_dict(tmp_path / "model.safetensors"), source="trained")
    assert not any("lora" in k for k in plain.state_dict())
    ref = build_backbone(cfg.backbone)  # weights moved away from the (seeded) initial backbone
    assert any(not torch.equal(a, b) for a, b in zip(ref.model.state_dict().values(), plain.state_dict().values()))


@pytest.mark.slow
def test_resume_is_bit_identical(snd_scenes, tmp_path):
    cfg = _cfg(snd_scenes, "method.optim.steps=6", "method.ckpt_every=3")
    full = _fit(cfg, tmp_path / "full")
    _fit(cfg, tmp_path / "cut", stop_after=3)  # "interrupted" after the step-3 checkpoint
    resumed = _fit(cfg, tmp_path / "cut")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "full" / "history.json").read_text())
    hb = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


@pytest.mark.slow
def test_learned_reconstructor_beats_constant_depth(snd_scenes, tmp_path, capsys):
    import argparse

    from methods.splat_distill.pretrain import add_arguments, main

    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "cv.safetensors"
    args = p.parse_args(
        [
            "--root",
            str(snd_scenes),
            "--scenes",
            str(SCENES),
            "--held-out",
            "1",
            "--views",
            str(VIEWS),
            "--size",
            str(SIZE[0]),
            str(SIZE[1]),
            "--seed",
            str(SEED),
            "--steps",
            "25",
            "--batch",
            "1",
            "--gap",
            "2",
            "4",
            "--lr",
            "2e-3",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert main(args) == 0
    report = json.loads((tmp_path / "cv.eval.json").read_text())["metrics"]
    assert report["learned"]["abs_rel"] < report["constant_train_median"]["abs_rel"]
    assert "learned" in capsys.readouterr().out
    model = build_reconstructor({"name": "learned", "checkpoint": str(out)})
    assert isinstance(model, CostVolumeReconstructor) and not any(p.requires_grad for p in model.parameters())


def test_diagnostic_measures_hand_values():
    from bench.diagnostics import feature_change, relative_change

    before = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 4.0])}
    after = {"a": torch.tensor([3.0, 3.0]), "b": torch.tensor([0.0, 0.0]), "bn.running_mean": torch.ones(2)}
    assert relative_change(before, after) == pytest.approx(5.0 / 5.0)  # sqrt(9 + 16) / sqrt(9 + 16)
    f0 = torch.zeros(2, 1, 1)
    f0[0] = 1.0  # [C=2,h=1,w=1]: (1, 0)
    f1 = torch.tensor([1.0, 1.0]).view(2, 1, 1)
    out = feature_change([f0[None]], [f1[None]])
    assert out["feature_change"] == pytest.approx(1.0) and out["feature_1_minus_cos"] == pytest.approx(1 - 2**-0.5)
