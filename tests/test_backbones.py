"""Backbones: weight layouts (official DINOv2 / timm / lukemelas), strict loading, the feature seam."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import bench.hub
from bench.backbones import (
    ConcatBackbone,
    ViTBackbone,
    build_backbone,
    dinov2_official_to_timm,
    load_backbone_weights,
    save_backbone,
)
from bench.backbones.vit import TINY_VIT_KW
from bench.errors import BenchError, CheckpointError, UnknownNameError
from bench.registry import BACKBONES

CONF = Path(__file__).resolve().parents[1] / "bench" / "conf" / "backbone"
DINOV2_DIMS = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread avoids OpenMP overhead (30x under a loaded CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg_of(name: str, **over):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for k, v in over.items():
        cfg[k] = v
    return cfg


# -- official DINOv2 layout, written from the official model definition ---------------------------------
def official_shapes(dim: int, depth: int, reg: bool, swiglu: bool, grid: int = 37) -> dict:
    """Key -> shape of ``dinov2_vit*14[_reg4]_pretrain.pth`` (facebookresearch/dinov2 DinoVisionTransformer)."""
    s = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if reg:
        s["register_tokens"] = (1, 4, dim)
    hidden = 4 * dim
    for i in range(depth):
        p = f"blocks.{i}."
        s.update(
            {
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "ls1.gamma": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "ls2.gamma": (dim,),
            }
        )
        if swiglu:  # SwiGLUFFNFused: hidden = (int(4*dim * 2/3) + 7) // 8 * 8
            h = (int(hidden * 2 / 3) + 7) // 8 * 8
            s.update(
                {
                    p + "mlp.w12.weight": (2 * h, dim),
                    p + "mlp.w12.bias": (2 * h,),
                    p + "mlp.w3.weight": (dim, h),
                    p + "mlp.w3.bias": (dim,),
                }
            )
        else:
            s.update(
                {
                    p + "mlp.fc1.weight": (hidden, dim),
                    p + "mlp.fc1.bias": (hidden,),
                    p + "mlp.fc2.weight": (dim, hidden),
                    p + "mlp.fc2.bias": (dim,),
                }
            )
    return s


def random_official(dim, depth, reg, swiglu=False, grid=37, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_shapes(dim, depth, reg, swiglu, grid).items():
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            v = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("gamma"):
            v = 0.3 + 0.1 * torch.rand(shape, generator=g)
        else:
            v = 0.05 * torch.randn(shape, generator=g)
        sd[k] = v
    return sd


def official_forward(sd, x, depth, heads, offset, antialias, swiglu=False):
    """Independent reference: DINOv2's forward_features -> x_norm_patchtokens, in plain torch ops."""
    B = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    _, D, h, w = t.shape
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    M = int(math.sqrt(sd["pos_embed"].shape[1] - 1))
    patch = sd["pos_embed"][:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)
    kw = dict(scale_factor=((h + offset) / M, (w + offset) / M)) if offset else dict(size=(h, w))
    patch = F.interpolate(patch, mode="bicubic", antialias=antialias, **kw).flatten(2).transpose(1, 2)
    t = t + torch.cat([sd["pos_embed"][:, :1], patch], 1)
    nreg = 0
    if "register_tokens" in sd:
        nreg = sd["register_tokens"].shape[1]
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], 1)
    N = t.shape[1]
    for i in range(depth):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = (
            F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias"))
            .reshape(B, N, 3, heads, D // heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        t = t + p("ls1.gamma") * F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        if swiglu:
            x1, x2 = F.linear(y, p("mlp.w12.weight"), p("mlp.w12.bias")).chunk(2, dim=-1)
            y = F.linear(F.silu(x1) * x2, p("mlp.w3.weight"), p("mlp.w3.bias"))
        else:
            y = F.linear(
                F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias")
            )
        t = t + p("ls2.gamma") * y
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 1 + nreg :].reshape(B, h, w, D).permute(0, 3, 1, 2)


# -- DINOv2 weight layouts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reg", [False, True], ids=["noreg", "reg4"])
def test_dinov2_vits14_official_and_timm_layouts_agree(tmp_path, reg):
    name = "dinov2_vits14_reg" if reg else "dinov2_vits14"
    official = random_official(384, 12, reg)
    torch.save(official, tmp_path / f"{name}_pretrain.pth")
    a = build_backbone(cfg_of(name, weights=str(tmp_path / f"{name}_pretrain.pth")))
    assert (a.patch_size, a.embed_dim, a.num_blocks, a.has_cls) == (14, 384, 12, True)

    save_backbone(a, tmp_path / "model.safetensors")  # timm layout
    b = build_backbone(cfg_of(name, weights=str(tmp_path / "model.safetensors")))
    x = torch.rand(2, 3, 56, 42)  # 4x3 grid: position embeddings resampled from 37x37
    with torch.no_grad():
        fa, fb = a(x), b(x)
        ref = official_forward(official, a.prepare(x), 12, 6, offset=0.0 if reg else 0.1, antialias=reg)
    assert fa.shape == (2, 384, 4, 3)
    assert torch.equal(fa, fb)
    torch.testing.assert_close(fa, ref, atol=2e-4, rtol=1e-4)

    # the saved file is plain timm layout: strict load into timm, and timm's own DINOv2 converter agrees
    timm_name = "vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2"
    with torch.device("meta"):  # skip the random init; strict key/shape check all the same
        plain = timm.create_model(timm_name, pretrained=False, num_classes=0)
    plain.load_state_dict(a.model.state_dict(), strict=True, assign=True)
    from timm.models.vision_transformer import checkpoint_filter_fn

    theirs = checkpoint_filter_fn(dict(official), plain)
    ours = dinov2_official_to_timm(dict(official))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_swiglu_official_layout_matches_reference(tmp_path):
    """ViT-g's SwiGLU (w12/w3) on a shrunk model of the same timm family."""
    official = random_official(48, 2, reg=True, swiglu=True, grid=4)
    torch.save(official, tmp_path / "tiny_g.pth")
    model = timm.create_model(
        "vit_giant_patch14_reg4_dinov2",
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        img_size=56,
        embed_dim=48,
        depth=2,
        num_heads=2,
    )
    bb = ViTBackbone("tiny_g", model, interpolate_offset=0.0, interpolate_antialias=True)
    bb.load_weights(tmp_path / "tiny_g.pth")
    x = torch.rand(1, 3, 70, 42)
    with torch.no_grad():
        torch.testing.assert_close(
            bb(x), official_forward(official, bb.prepare(x), 2, 2, 0.0, True, swiglu=True), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("name", [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")])
def test_dinov2_official_key_map_fits_every_size(name):
    """Official key names/shapes of every DINOv2 size map exactly onto timm's model (meta tensors)."""
    size = name[len("dinov2_vit")]
    dim, depth, _ = DINOV2_DIMS[size]
    reg = name.endswith("_reg")
    official = {k: torch.empty(s, device="meta") for k, s in official_shapes(dim, depth, reg, size == "g").items()}
    with torch.device("meta"):
        model = BACKBONES.get(name).create_model()
    mapped = dinov2_official_to_timm(official)
    own = model.state_dict()
    assert mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)
    cfg = cfg_of(name)
    assert cfg.name == name and cfg.hub_repo == f"timm/{BACKBONES.get(name).timm_name}.lvd142m"
    assert all(-depth <= i < depth for i in cfg.layers)


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    official = random_official(384, 12, reg=False)
    dropped = dict(official)
    del dropped["blocks.3.ls1.gamma"]
    torch.save(dropped, tmp_path / "dropped.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \[blocks\.3\.ls1\.gamma\]"):
        build_backbone(cfg_of("dinov2_vits14", weights=str(tmp_path / "dropped.pth")))

    torch.save(official, tmp_path / "noreg.pth")  # no-register weights into the register model
    with pytest.raises(CheckpointError, match=r"missing keys \[reg_token\].*pos_embed: checkpoint \(1, 1370, 384\)"):
        build_backbone(cfg_of("dinov2_vits14_reg", weights=str(tmp_path / "noreg.pth")))

    tiny = build_backbone(cfg_of("tiny_vit"))  # a different width (like ViT-B keys into ViT-S)
    save_backbone(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \[blocks\.10\..*shape mismatch \[blocks\.0\.attn\.proj\.bias: checkpoint \(48,\) vs model \(384,\)",
    ):
        build_backbone(cfg_of("dinov2_vits14", weights=str(tmp_path / "tiny.safetensors")))


def test_unknown_name_and_missing_file():
    with pytest.raises(UnknownNameError) as e:
        build_backbone(OmegaConf.create({"name": "dinov3_vits16", "weights": "none"}))
    assert "dinov2_vits14" in str(e.value) and "efficientnet_lite0" in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone(cfg_of("tiny_vit", weights="/nonexistent/weights.pth"))
    with pytest.raises(CheckpointError, match="no hub_repo"):
        build_backbone(cfg_of("tiny_vit", weights="hub"))


def test_hub_weights_go_through_hub_download(tmp_path, monkeypatch):
    src = build_backbone(cfg_of("tiny_vit"))
    save_backbone(src, tmp_path / "model.safetensors")
    calls = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None):
        calls.append((repo_id, filename, revision))
        return tmp_path / filename

    monkeypatch.setattr(bench.hub, "hub_download", fake_download)
    bb = build_backbone(cfg_of("tiny_vit", weights="hub", hub_repo="org/tiny", hub_revision="v1"))
    assert calls == [("org/tiny", "model.safetensors", "v1")]
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(bb(x), src(x))


# -- the feature seam ----------------------------------------------------------------------------------
def test_vit_tokens_match_timm():
    """At the native grid, and with timm's resampling rule elsewhere, features equal timm's forward."""
    bb = build_backbone(cfg_of("tiny_vit"))
    for size, offset, aa in [((56, 56), 0.1, False), ((98, 70), 0.0, True)]:
        bb.interpolate_offset, bb.interpolate_antialias = offset, aa
        x = torch.rand(2, 3, *size)
        h, w = size[0] // 14, size[1] // 14
        with torch.no_grad():
            tokens = bb.model.forward_features(bb.prepare(x))
            assert torch.allclose(bb(x), tokens[:, 1:].unflatten(1, (h, w)).permute(0, 3, 1, 2), atol=1e-6)
            inter = bb.model.forward_intermediates(bb.prepare(x), indices=[0, 2], norm=True, intermediates_only=True)
            mine = bb.layers(x, [0, -2])
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mine, inter))


@pytest.mark.parametrize("mode,expect", [("resize", (4, 5)), ("pad", (5, 6))])
def test_non_multiple_sizes(mode, expect):
    bb = build_backbone(cfg_of("tiny_vit", resize=mode))
    x = torch.rand(2, 3, 60, 75)  # 60/14 = 4.3, 75/14 = 5.4
    assert bb.grid_size(60, 75) == expect
    assert bb(x).shape == (2, 48, *expect)
    assert bb.prepare(torch.rand(1, 3, 28, 42)).shape[-2:] == (28, 42)  # multiples pass untouched
    if mode == "pad":  # padding is zeros after normalisation, i.e. the mean colour
        assert torch.all(bb.prepare(x)[..., 60:, :] == 0)
    cnn = build_backbone(cfg_of("tiny_cnn", resize=mode))
    assert cnn(x).shape == (2, 112, *cnn.grid_size(60, 75))
    assert cnn.grid_size(60, 75) == {"resize": (4, 5), "pad": (4, 5)}[mode]


def test_layers_indices_norm_cls_and_grad():
    bb = build_backbone(cfg_of("tiny_vit"))
    x = torch.rand(2, 3, 42, 56)
    with torch.no_grad():
        last = bb(x)
        l0, lm1 = bb.layers(x, [0, -1])
        assert torch.equal(lm1, last) and not torch.allclose(l0, last)
        assert len(bb.layers(x)) == 4  # cfg.backbone.layers
        raw = bb.layers(x, [-1], norm=False)[0]
        assert not torch.allclose(raw, last)
        ((fmap, cls),) = bb.layers(x, [3], return_cls=True)
        assert fmap.shape == (2, 48, 3, 4) and cls.shape == (2, 48) and torch.equal(fmap, last)
    with pytest.raises(BenchError, match=r"out of range.*\[-4, 3\]"):
        bb.layers(x, [4])
    bb(x).square().mean().backward()  # differentiable for fine-tuning ...
    g = bb.model.patch_embed.proj.weight.grad.clone()
    assert g.abs().sum() > 0
    bb.zero_grad()
    bb.model.set_grad_checkpointing(True)  # ... also with timm's gradient checkpointing switched on
    bb(x).square().mean().backward()
    torch.testing.assert_close(bb.model.patch_embed.proj.weight.grad, g)


def test_concat_backbone():
    orig, ft = build_backbone(cfg_of("tiny_vit")), build_backbone(cfg_of("tiny_vit"))
    cat = ConcatBackbone(orig, ft)
    assert (cat.embed_dim, cat.patch_size, cat.num_blocks, cat.has_cls) == (96, 14, 4, True)
    assert cat.model is ft.model
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        y = cat(x)
        assert torch.equal(y[:, :48], orig(x)) and torch.equal(y[:, 48:], ft(x))
        ((m, c),) = cat.layers(x, [1], return_cls=True)
        assert m.shape == (1, 96, 4, 4) and c.shape == (1, 48)  # FiT3D: the original's CLS only
        assert torch.equal(c, orig.layers(x, [1], return_cls=True)[0][1])
    assert not any(p.requires_grad for p in orig.parameters())
    with pytest.raises(BenchError, match="cannot concatenate"):
        ConcatBackbone(orig, build_backbone(cfg_of("tiny_cnn")))


def test_save_load_roundtrip_into_plain_timm(tmp_path):
    a = build_backbone(cfg_of("tiny_vit"))
    path = save_backbone(a, tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["backbone"] == "tiny_vit"
    plain = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **TINY_VIT_KW)
    from safetensors.torch import load_file

    plain.load_state_dict(load_file(str(path)), strict=True)
    b = build_backbone(cfg_of("tiny_vit"))
    load_backbone_weights(b, path)
    x = torch.rand(1, 3, 56, 70)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# -- EfficientNet-Lite0 (real ImageNet weights, offline) --------------------------------------------------------
@pytest.fixture(scope="module")
def lite0():
    return build_backbone(cfg_of("efficientnet_lite0"))


def _photo(name: str) -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("photo,classes", [("chelsea", {281, 282, 283, 284, 285}), ("coffee", {967, 968, 504})])
def test_efficientnet_lite0_classifies(lite0, photo, classes):
    with torch.no_grad():
        top5 = lite0.model(lite0.prepare(_photo(photo))).topk(5).indices[0].tolist()
    assert classes & set(top5), top5
    assert top5[0] in classes  # the key map is right: the top-1 class is already correct


def test_efficientnet_lite0_dense_features_and_layouts(lite0, tmp_path):
    x = torch.rand(2, 3, 100, 130)
    with torch.no_grad():
        f = lite0(x)
        ((m, gap),) = lite0.layers(x, [-1], return_cls=True)
    assert (lite0.patch_size, lite0.embed_dim, lite0.num_blocks, lite0.has_cls) == (16, 432, 1, False)
    assert f.shape == (2, 432, 6, 8) and torch.equal(m, f)
    torch.testing.assert_close(gap, f.mean(dim=(2, 3)))
    # the lukemelas -> timm map targets timm's efficientnet_lite0 layout: a saved model loads there strictly
    save_backbone(lite0, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    for arch in ("efficientnet_lite0", "tf_efficientnet_lite0"):
        timm.create_model(arch, pretrained=False).load_state_dict(sd, strict=True)
