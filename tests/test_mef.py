"""MEF (methods/mef, method=mef / mef_official): loss, LoRA, data, training, resume, export, checkpoint layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.backbones import build_backbone
from bench.config import compose
from bench.errors import BenchError, CheckpointError
from helpers import mef_tiny


def cfg_for(tmp: Path, *extra: str, backbone: str = "tiny_vit"):
    return compose(
        [
            *mef_tiny(tmp, backbone),
            f"paths.cache_dir={tmp}/cache",
            f"paths.results_dir={tmp}/results",
            f"paths.output_dir={tmp}/outputs",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def objects_root(tmp_path_factory):
    from bench.data.objects import ensure_objects

    return ensure_objects(tmp_path_factory.mktemp("objs") / "set", objects=3, views=8, size=(48, 48), seed=1)


# -- loss ------------------------------------------------------------------------------------------
def test_ranking_loss_hand_computed():
    from methods.mef.loss import ranking_loss

    c = 0.995
    d1 = torch.tensor([[[1.0, 0.0]]])
    d2 = torch.tensor([[[1.0, 0.0], [c, math.sqrt(1 - c * c)], [0.0, 1.0]]])
    p1 = torch.zeros(1, 1, 3)
    p2 = torch.tensor([[[0.001, 0.0, 0.0], [0.5, 0.0, 0.0], [0.05, 0.0, 0.0]]])  # positive, negative, neither
    loss, info = ranking_loss(d1, d2, p1, p2)
    sig = lambda x: 1 / (1 + math.exp(min(max(-x / 0.01, -50), 50)))  # noqa: E731
    r1 = 1 + sig(0.0)  # q = 1
    ap1 = r1 / (r1 + sig(c - 1))  # only t=1 is a negative (t=2 is 0.05 away: neither)
    r2 = 1 + sig(0.0)
    ap2 = r2 / (r2 + sig(c - 1))
    assert info["positives"] == 1
    assert loss.item() == pytest.approx(1 - (ap1 + ap2) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.20107, abs=1e-4)
    # no positive pair: a zero loss that still back-propagates (the step changes nothing)
    d = torch.randn(1, 4, 2, requires_grad=True)
    loss0, info0 = ranking_loss(d, d, torch.zeros(1, 4, 3), torch.ones(1, 4, 3))
    assert loss0.item() == 0 and info0["positives"] == 0
    loss0.backward()


# -- LoRA ------------------------------------------------------------------------------------------
def test_qv_lora_targets_structure_and_merge():
    from methods.mef.adapt import QVLoRA, lora_targets

    torch.manual_seed(0)
    bb = build_backbone(compose(["backbone=tiny_vit"]).backbone)  # 4 blocks: all are "the last 4"
    for n, p in bb.model.named_parameters():  # random init has layer scale 1e-5:
        if n.endswith("gamma"):  # give the attention branch a real gradient
            p.data.fill_(1.0)
    assert list(lora_targets(bb.model, 2)) == ["blocks.2.attn.qkv", "blocks.3.attn.qkv"]
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    lora = QVLoRA(bb.model, r=4, blocks=2)
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2, weight_decay=1e-4)
    x = torch.rand(2, 3, 28, 28)
    for _ in range(3):
        opt.zero_grad()
        bb(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        wrapped = bb(x)
    model = lora.merge()
    assert set(model.state_dict()) == set(before)  # plain timm layout again
    with torch.no_grad():
        assert torch.allclose(bb(x), wrapped, atol=1e-5)
    C = bb.embed_dim
    for i in range(4):
        delta = model.state_dict()[f"blocks.{i}.attn.qkv.weight"] - before[f"blocks.{i}.attn.qkv.weight"]
        if i < 2:
            assert delta.abs().max() == 0
            continue
        assert delta[:C].abs().max() > 0 and delta[2 * C :].abs().max() > 0  # q and v moved
        assert delta[C : 2 * C].abs().max() == 0  # k exactly untouched
        assert all(int(torch.linalg.matrix_rank(d, rtol=1e-3)) <= 4 for d in (delta[:C], delta[2 * C :]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items() if "qkv.weight" not in k)


def test_lora_on_cnn_backbones():
    from methods.mef.adapt import QVLoRA, lora_targets

    bb = build_backbone(compose(["backbone=tiny_cnn"]).backbone)
    t = lora_targets(bb.model, 4)
    assert (
        t
        and all(k == "conv" for k in t.values())
        and all(n.startswith(("blocks.1", "blocks.2", "blocks.3", "blocks.4")) for n in t)
    )
    lora = QVLoRA(bb.model, r=2, blocks=4)
    assert lora.parameters() and all(p.requires_grad for p in lora.parameters())
    lora.merge()
    assert not any("lora" in k for k in bb.model.state_dict())


# -- data ------------------------------------------------------------------------------------------
def test_object_generator_exact_correspondence(objects_root):
    from bench.data.mef_objaverse import ObjectRenders, unproject

    ds = ObjectRenders(objects_root)
    assert ds.items == ["obj_0000", "obj_0001", "obj_0002"] and ds.num_views == 8 and ds.pixel_offset == 0.5
    a, b = ds.view("obj_0001", 0), ds.view("obj_0001", 1)
    assert torch.equal(a["mask"], a["depth"] > 0) and a["mask"].any()
    assert (a["image"][:, ~a["mask"]] == 0).all()  # black background, as MEF's renders
    pix = torch.nonzero(a["mask"])[:, [1, 0]]
    P = unproject(pix, a["depth"], a["K"], a["pose"], ds.pixel_offset)
    assert P.abs().max() <= 0.5 + 1e-2  # normalised object: largest side 1
    # exact check: cast view 1's ray through every projected point; the first hit is the point itself
    # (visible) or an occluder in front of it, never anything behind it
    from bench.data import objects as ob
    from bench.data.synthetic import Primitives, cast_rays

    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = -torch.tensor(ob.CENTRE, dtype=torch.float64)
    w2c = b["pose"].double() @ shift
    cam = (torch.cat([P.double(), torch.ones(len(P), 1, dtype=torch.float64)], 1) @ b["pose"].T)[:, :3]
    dirs = (cam / cam[:, 2:]) @ w2c[:3, :3]  # world rays with unit camera z
    eye = -w2c[:3, :3].T @ w2c[:3, 3]
    t, _, _ = cast_rays(Primitives(ob.make_object(1, 1)), eye.float(), dirs.float())
    z = cam[:, 2].float()
    visible = (t - z).abs() < 2e-3  # mm quantisation: 5e-4
    assert visible.sum() > 20  # co-visible points exist ...
    assert bool((t[~visible] < z[~visible]).all())  # ... the others are occluded


def test_reader_official_layout(tmp_path):
    """MEF's released layout: obj_poses.npy + 10k.txt + <group>/<uid>/{color,depth,mask}_XXXXXX.png,
    512x512, fixed intrinsics, integer-pixel unprojection (official img_coord_2_obj_coord)."""
    from PIL import Image

    from bench.data.mef_objaverse import ObjectRenders, mef_intrinsics, unproject

    root = tmp_path / "objaverse_renderings"
    obj = root / "000-001" / "abc"
    obj.mkdir(parents=True)
    pose = np.eye(4)
    pose[2, 3] = 2.0
    poses = np.stack([pose, pose])
    np.save(root / "obj_poses.npy", poses)
    (root / "10k.txt").write_text("000-001/abc\n000-002/missing\n")
    depth = np.zeros((512, 512), np.uint16)
    depth[256, 300] = 2000
    for i in range(2):
        Image.fromarray(np.zeros((512, 512, 3), np.uint8)).save(obj / f"color_{i:06d}.png")
        Image.fromarray(depth).save(obj / f"depth_{i:06d}.png")
        Image.fromarray(((depth > 0) * 255).astype(np.uint8)).save(obj / f"mask_{i:06d}.png")
    ds = ObjectRenders(root)
    assert ds.items == ["000-001/abc"] and ds.num_views == 2 and ds.pixel_offset == 0.0
    v = ds.view("000-001/abc", 1)
    assert torch.equal(v["K"], mef_intrinsics()) and v["mask"].sum() == 1
    P = unproject(torch.tensor([[300, 256]]), v["depth"], v["K"], v["pose"])
    assert P[0].tolist() == pytest.approx([2.0 * (300 - 256) / 560.0, 0.0, 0.0], abs=1e-6)
    (root / "obj_poses.npy").unlink()
    with pytest.raises(BenchError, match="python -m bench data mef_objaverse"):
        ObjectRenders(root)


def test_pairs_are_stateless_and_augmentation_moves_points(objects_root):
    from bench.data.mef_objaverse import ObjectRenders
    from methods.mef.data import PairSampler, rotation_angle_deg, shift_scale_rotate

    ds = ObjectRenders(objects_root)
    s = PairSampler(ds, ds.items, points=200, seed=3)
    a, b = s.pair(5), s.pair(5)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["pix"], y["pix"]) for x, y in zip(a, b))
    assert a[0]["view"] != a[1]["view"] and rotation_angle_deg(a[0]["pose"], a[1]["pose"]) <= 120
    # a geometric warp moves the points with the image: a bright pixel stays under its point
    img = torch.zeros(3, 48, 48)
    img[:, 20, 30] = 1.0
    mask = img[0] > 0
    g = torch.Generator().manual_seed(0)
    out, m, p = shift_scale_rotate(img, mask, torch.tensor([[30.0, 20.0]]), g, shift=0.1, scale=0.0, rotate=0.0)
    y, x = divmod(int(out[0].argmax()), 48)
    assert p[0].tolist() == pytest.approx([x, y], abs=0.51)


# -- training --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_training_loss_falls_and_heldout_correspondence_moves(tmp_path):
    from methods.mef.method import MEF

    cfg = cfg_for(
        tmp_path,
        "method.optim.steps=12",
        "method.data.held_out=1",
        "method.eval.pairs=3",
        "method.eval.points=300",
        "method.augment=false",
    )
    bb = build_backbone(cfg.backbone)
    out = MEF().fit(bb, cfg, tmp_path / "w")
    ev = json.loads((tmp_path / "w" / "eval_pairs.json").read_text())
    hist = json.loads((tmp_path / "w" / "history.json").read_text())
    assert len(hist) == 12 and all(math.isfinite(h["loss"]) for h in hist)
    first = np.mean([h["loss"] for h in hist[:4] if h["positives"]])
    last = np.mean([h["loss"] for h in hist[-4:] if h["positives"]])
    assert last < first  # the ranking loss falls
    before, after = ev["before"], ev["after"]
    assert after["loss"] < before["loss"]  # held-out objects: ranking improves ...
    assert (
        after["recall@0.1"] != before["recall@0.1"] or after["median_err"] != before["median_err"]
    )  # ... matches move
    assert (tmp_path / "w" / "refine_head.safetensors").is_file()
    assert type(out).__name__ == "RefinedBackbone"


@pytest.mark.slow
def test_exact_resume(tmp_path):
    from methods.mef.method import MEF

    def run(wd, stop=None):
        torch.manual_seed(0)
        cfg = cfg_for(tmp_path, "method.optim.steps=6")
        bb = build_backbone(cfg.backbone)
        return MEF().fit(bb, cfg, wd, stop_after=stop)

    full = run(tmp_path / "a")
    run(tmp_path / "b", stop=3)
    resumed = run(tmp_path / "b")
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_export_loads_into_plain_timm_and_conv_strictly(tmp_path):
    import timm
    from safetensors.torch import load_file

    from bench.runner import backbone_dir, obtain_backbone
    from methods.mef.head import HEAD_FILE

    cfg = cfg_for(tmp_path, "method.optim.steps=2")
    trained, ref = obtain_backbone(cfg)
    assert ref["kind"] == "trained" and not ref["reused"]
    d = backbone_dir(cfg)
    spec = trained.spec
    plain = timm.create_model(spec.timm_name, pretrained=False, **dict(spec.timm_kwargs))
    plain.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    conv = torch.nn.Conv2d(trained.embed_dim, trained.embed_dim, 3, padding=1)
    conv.load_state_dict(load_file(str(d / HEAD_FILE)), strict=True)
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        want = trained(x)
        bb = build_backbone(cfg.backbone)
        bb.model = plain
        assert torch.allclose(conv(bb(x)), want, atol=1e-6)  # timm model + conv = the exported features
        reused, ref2 = obtain_backbone(cfg)  # the runner's cache re-attaches the head
        assert ref2["reused"] and torch.allclose(reused(x), want, atol=1e-6)
        # tasks read the refined map for the last block, the inner maps elsewhere
        maps = reused.layers(x, [0, 3], norm=False)
        assert torch.allclose(maps[1], want, atol=1e-5)
        assert torch.allclose(maps[0], bb.layers(x, [0], norm=False)[0], atol=1e-6)


# -- official checkpoint -----------------------------------------------------------------------------
def _official_ckpt(path: Path, C: int, r: int = 4, blocks: int = 4, **overrides):
    g = torch.Generator().manual_seed(0)
    ck = {
        "epoch": 99,
        "global_step": 10000,
        "pytorch-lightning_version": "1.9.0",
        "optimizer_states": [],
        "lr_schedulers": [],
        "callbacks": {},
        "state_dict": {
            "refine_conv": {
                "weight": torch.randn(C, C, 3, 3, generator=g) * 0.01,
                "bias": torch.randn(C, generator=g) * 0.01,
            }
        },
    }
    for i in range(2 * blocks):
        ck[f"w_a_{i:03d}"] = torch.randn(r, C, generator=g) * 0.1
        ck[f"w_b_{i:03d}"] = torch.randn(C, r, generator=g) * 0.1
    ck.update(overrides)
    for k in [k for k, v in overrides.items() if v is None]:
        del ck[k]
    torch.save(ck, path)
    return ck


def test_mef_official_layout(tmp_path):
    from bench.runner import obtain_backbone

    cfg = compose(
        [
            "backbone=tiny_vit",
            "method=mef_official",
            f"method.checkpoint={tmp_path / 'dinov2_base.ckpt'}",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    C = 48
    ck = _official_ckpt(tmp_path / "dinov2_base.ckpt", C)
    bb, ref = obtain_backbone(cfg, tmp_path / "run")
    assert ref["kind"] == "official" and ref["lora_blocks"] == 4 and ref["lora_rank"] == 4
    from bench.seed import seed_everything

    seed_everything(int(cfg.seed))  # as obtain_backbone: the same random tiny ViT
    base = build_backbone(cfg.backbone)
    sd = base.model.state_dict()
    for k in range(4):  # hand-merged: q rows and v rows
        W = sd[f"blocks.{k}.attn.qkv.weight"].clone()
        W[:C] += ck[f"w_b_{2 * k:03d}"] @ ck[f"w_a_{2 * k:03d}"]
        W[2 * C :] += ck[f"w_b_{2 * k + 1:03d}"] @ ck[f"w_a_{2 * k + 1:03d}"]
        assert torch.allclose(bb.model.state_dict()[f"blocks.{k}.attn.qkv.weight"], W, atol=1e-6)
    conv = torch.nn.Conv2d(C, C, 3, padding=1)
    conv.load_state_dict(ck["state_dict"]["refine_conv"])
    base.model.load_state_dict(bb.model.state_dict())
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(bb(x), conv(base(x)), atol=1e-6)
    # strictness: a missing pair, a stray tensor, a foreign conv key, a flat state dict
    for bad, match in (
        ({"w_b_007": None}, "complete q/v pairs"),
        ({"extra": torch.zeros(1)}, "unexpected tensor"),
        ({"state_dict": {"refine_conv": {"weight": torch.zeros(C, C, 3, 3)}}}, "refine_conv has keys"),
        ({"state_dict": {"refine_conv.weight": torch.zeros(1)}}, "exactly \\['refine_conv'\\]"),
    ):
        _official_ckpt(tmp_path / "dinov2_base.ckpt", C, **bad)
        with pytest.raises(CheckpointError, match=match):
            obtain_backbone(cfg, tmp_path / "run")
    _official_ckpt(tmp_path / "dinov2_base.ckpt", 64)  # made for another width
    with pytest.raises(CheckpointError, match="does not fit backbone"):
        obtain_backbone(cfg, tmp_path / "run")


def test_mef_official_release_names():
    from baselines.official import MEFOfficial

    m = MEFOfficial()
    cfg = compose(["backbone=dinov2_vitb14", "method=mef_official"])
    ref, info = m.reference(cfg)
    assert ref == "hf://qq456cvb/3DCorrEnhance/dinov2_base.ckpt" and info["variant"] == "base"
    cfg = compose(["backbone=dinov2_vits14_reg", "method=mef_official", "method.revision=abc"])
    assert m.reference(cfg)[0] == "hf://qq456cvb/3DCorrEnhance/dinov2_reg_small.ckpt@abc"


def test_leaderboard_places_published_mef_beside_ours(tmp_path):
    from bench.table import task_table, records_frame, reference_frame
    import pandas as pd

    ours = pd.DataFrame(
        [
            {
                "method": m,
                "backbone": "dinov2_vits14",
                "task": "nyu_depth",
                "dataset": "nyu",
                "protocol": "linear",
                "seed": 0,
                "metric": "rmse",
                "value": v,
                "created": "x",
                "id": m,
                "reported": True,
                "rank": 0,
                "wall_s": 1.0,
                "device": "cpu",
                "threads": 1,
                "cell": f"{m}/0",
                "row": m,
                "recipe": "r `00000000`",
                "evaluation": "b/t",
                "code_version": "fit3d_evaluation+snd_1gpu",  # published rows sit beside records of their code
            }
            for m, v in (("dinov2", 0.5), ("mef", 0.6), ("splat_distill", 0.4))
        ]
    )
    ref = pd.DataFrame(
        [
            {
                "source": "paper",
                "method": m,
                "backbone": "dinov2_vits14",
                "task": "nyu_depth",
                "metric": "rmse",
                "value": v,
                "note": "",
                "code_version": "fit3d_evaluation+snd_1gpu",
            }
            for m, v in (("mef", 0.5656), ("dinov2", 0.521))
        ]
    )
    lines = [ln for ln in task_table(ours, ref, "nyu_depth", "linear").splitlines()[2:]]
    names = [ln.split("|")[1].strip() for ln in lines]
    assert names == ["dinov2", "dinov2 *(published)*", "mef", "mef *(published)*", "splat_distill"]
    del records_frame, reference_frame


def test_bad_dataset_is_a_clear_error(tmp_path):
    from methods.mef.method import open_objects

    with pytest.raises(BenchError, match="not an MEF training dataset"):
        open_objects({"dataset": "scannetpp"}, tmp_path)
    with pytest.raises(BenchError, match="python -m bench data mef_objaverse"):
        open_objects({"dataset": "mef_objaverse", "root": str(tmp_path / "nope")}, tmp_path)


def test_mef_official_through_the_hub(local_hub, tmp_path, monkeypatch):
    """The released file name under the real repo, fetched through hf:// and the real client."""
    from bench.registry import METHODS

    monkeypatch.setitem(METHODS.get("mef_official").variants, "small", "tiny_vit")
    _official_ckpt(tmp_path / "dinov2_small.ckpt", 48)
    sha = local_hub.seed("qq456cvb/3DCorrEnhance", {"dinov2_small.ckpt": tmp_path / "dinov2_small.ckpt"})
    cfg = compose(["backbone=tiny_vit", "method=mef_official"])
    method = METHODS.get("mef_official")()
    out = method.fit(build_backbone(cfg.backbone), cfg, tmp_path / "run")
    assert type(out).__name__ == "RefinedBackbone"
    assert method.checkpoint_ref["checkpoint"] == "hf://qq456cvb/3DCorrEnhance/dinov2_small.ckpt"
    assert method.checkpoint_ref["commit"] == sha and method.checkpoint_ref["variant"] == "small"
    assert any("/resolve/main/dinov2_small.ckpt" in path for _, path in local_hub.requests)
