"""Official SnD / FiT3D checkpoints as methods, served by the local Hub (tests/hub_server.py).

The local Hub serves random weights in the released key layouts (SnD: official DINOv2 layout with
``mask_token``; FiT3D: timm layout) under the real repo and file names; the methods download them
through hf:// and the real client, map them into the timm ViT-S/14 and load them strictly.
"""

from __future__ import annotations

import pytest
import torch

from bench.config import compose
from bench.errors import BenchError, CheckpointError
from bench.registry import METHODS

torch.set_num_threads(2)
SND, FIT3D = "david-shavin/SnD", "yuanwenyue/FiT3D"


def official_dinov2(width=384, depth=12, grid=37, registers=0, seed=0):
    """A random state dict with the key names and shapes of the official DINOv2 ViT (torch.hub layout).

    ``seed=None``: a constant per tensor instead (cheap, for key/shape tests at full size)."""
    g = torch.Generator().manual_seed(seed or 0)
    consts = iter(range(1000))

    def r(*shape, scale=0.02, base=0.0):
        if seed is None:
            return torch.full(shape, next(consts) / 100)
        return base + scale * torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 1 + grid * grid, width),
        "mask_token": r(1, width),
        "patch_embed.proj.weight": r(width, 3, 14, 14),
        "patch_embed.proj.bias": r(width),
    }
    if registers:
        sd["register_tokens"] = r(1, registers, width)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": r(width, base=1.0),
                b + "norm1.bias": r(width),
                b + "attn.qkv.weight": r(3 * width, width),
                b + "attn.qkv.bias": r(3 * width),
                b + "attn.proj.weight": r(width, width),
                b + "attn.proj.bias": r(width),
                b + "ls1.gamma": r(width, scale=0.1),
                b + "norm2.weight": r(width, base=1.0),
                b + "norm2.bias": r(width),
                b + "mlp.fc1.weight": r(4 * width, width),
                b + "mlp.fc1.bias": r(4 * width),
                b + "mlp.fc2.weight": r(width, 4 * width),
                b + "mlp.fc2.bias": r(width),
                b + "ls2.gamma": r(width, scale=0.1),
            }
        )
    sd.update({"norm.weight": r(width, base=1.0), "norm.bias": r(width)})
    return sd


def _cfg(method, *overrides, backbone="dinov2_vits14"):
    return compose(["~task", f"method={method}", f"backbone={backbone}", "backbone.weights=none", *overrides])


@pytest.fixture(scope="module")
def tiny():
    """A DINOv2-style timm ViT (48 ch, 4 blocks, 4x4 grid), random init; each test loads all weights."""
    from bench.backbones import build_backbone

    return build_backbone(_cfg("dinov2", backbone="tiny_vit").backbone)


@pytest.fixture
def tiny_releases(monkeypatch):
    """Let the released file names (small variant) serve the tiny ViT, so the Hub path is tested cheaply."""
    monkeypatch.setitem(METHODS.get("snd_official").variants, "small", "tiny_vit")
    monkeypatch.setitem(METHODS.get("fit3d_official").variants, "small", "tiny_vit")


TINY = dict(width=48, depth=4, grid=4)


def _reference_output(backbone, timm_sd, x):
    """Output of the backbone with ``timm_sd`` loaded by plain torch, then scramble the weights."""
    backbone.model.load_state_dict(timm_sd, strict=True)
    with torch.no_grad():
        y = backbone(x)
        for p in backbone.model.parameters():
            p.fill_(0.5)
    return y


def _assert_loaded(backbone, timm_sd, x=None, y_ref=None):
    own = backbone.model.state_dict()
    assert own.keys() == timm_sd.keys() and all(torch.equal(own[k], timm_sd[k]) for k in own)
    if x is not None:
        with torch.no_grad():
            assert torch.equal(backbone(x), y_ref)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_snd_release_layout_loads_strictly_into_timm_vits14(tmp_path):
    """Real sizes: the SnD ViT-S file (official DINOv2 layout) fits timm vit_small_patch14_dinov2 exactly."""
    from bench.backbones import ViTBackbone
    from bench.registry import BACKBONES

    sd = official_dinov2(seed=None)
    torch.save(sd, tmp_path / "dinov2_small_snd.pth")
    cfg = _cfg("snd_official", f"method.checkpoint={tmp_path / 'dinov2_small_snd.pth'}")
    with torch.device("meta"):  # the real architecture without paying for its random init
        backbone = ViTBackbone.from_config(cfg.backbone, BACKBONES.get("dinov2_vits14"))
    backbone.to_empty(device="cpu")
    METHODS.get("snd_official")().fit(backbone, cfg, tmp_path)
    _assert_loaded(backbone, {k: v for k, v in sd.items() if k != "mask_token"})


def test_snd_official_released_files_through_the_hub(local_hub, tiny, tiny_releases, tmp_path):
    blend, no_blend = official_dinov2(seed=1, **TINY), official_dinov2(seed=2, **TINY)
    torch.save(blend, tmp_path / "a.pth")
    # the no-blending file wrapped as a training script might save it: {"state_dict": {"module.<key>": ...}}
    torch.save({"state_dict": {"module." + k: v for k, v in no_blend.items()}}, tmp_path / "b.pth")
    sha = local_hub.seed(
        SND, {"dinov2_small_snd.pth": tmp_path / "a.pth", "dinov2_small_snd_no_blending.pth": tmp_path / "b.pth"}
    )
    x = torch.rand(2, 3, 56, 70, generator=torch.Generator().manual_seed(0))

    for sd, overrides in ((blend, ()), (no_blend, ("method.blending=false",))):
        timm_sd = {k: v for k, v in sd.items() if k != "mask_token"}  # the official->timm map without registers
        y_ref = _reference_output(tiny, timm_sd, x)
        method = METHODS.get("snd_official")()
        assert method.trains is False
        out = method.fit(tiny, _cfg("snd_official", *overrides, backbone="tiny_vit"), tmp_path / "work")
        assert out is tiny
        _assert_loaded(tiny, timm_sd, x, y_ref)
    assert method.checkpoint_ref == {
        "kind": "official",
        "checkpoint": f"hf://{SND}/dinov2_small_snd_no_blending.pth",
        "repo": SND,
        "file": "dinov2_small_snd_no_blending.pth",
        "revision": None,
        "variant": "small",
        "commit": sha,
    }
    assert any("/resolve/main/dinov2_small_snd.pth" in path for _, path in local_hub.requests)


def test_fit3d_official_timm_layout_and_revision_pinning(local_hub, tiny, tiny_releases, tmp_path):
    old = {k: v for k, v in official_dinov2(seed=3, **TINY).items() if k != "mask_token"}  # FiT3D: timm layout
    new = {k: v + 1.0 for k, v in old.items()}
    torch.save(old, tmp_path / "old.pth")
    torch.save(new, tmp_path / "new.pth")
    v1 = local_hub.seed(FIT3D, {"dinov2_small_finetuned.pth": tmp_path / "old.pth"})
    local_hub.seed(FIT3D, {"dinov2_small_finetuned.pth": tmp_path / "new.pth"}, message="v2")
    x = torch.rand(1, 3, 70, 56, generator=torch.Generator().manual_seed(1))

    y_old = _reference_output(tiny, old, x)
    method = METHODS.get("fit3d_official")()
    method.fit(tiny, _cfg("fit3d_official", f"method.revision={v1}", backbone="tiny_vit"), tmp_path)
    _assert_loaded(tiny, old, x, y_old)
    assert method.checkpoint_ref["commit"] == v1 and method.checkpoint_ref["revision"] == v1

    y_new = _reference_output(tiny, new, x)
    method.fit(tiny, _cfg("fit3d_official", backbone="tiny_vit"), tmp_path)  # main = the latest upload
    _assert_loaded(tiny, new, x, y_new)
    assert not torch.equal(y_old, y_new)


def test_wrong_layout_or_architecture_fails_clearly(local_hub, tiny, tmp_path):
    hf_layout = {
        "embeddings.cls_token": torch.zeros(1, 1, 48),
        "encoder.layer.0.attention.attention.query.weight": torch.zeros(48, 48),
    }
    torch.save(hf_layout, tmp_path / "hf.pth")
    local_hub.seed("someone/converted", {"model.pth": tmp_path / "hf.pth"})
    cfg = _cfg("snd_official", "method.checkpoint=hf://someone/converted/model.pth", backbone="tiny_vit")
    with pytest.raises(CheckpointError) as e:
        METHODS.get("snd_official")().fit(tiny, cfg, tmp_path)
    msg = e.value.problem
    assert "missing keys [blocks.0.attn.proj.bias" in msg
    assert "unexpected keys [embeddings.cls_token, encoder.layer.0.attention.attention.query.weight]" in msg

    torch.save(official_dinov2(width=768, depth=2, grid=2), tmp_path / "b.pth")  # a ViT-B-wide file
    cfg = _cfg("fit3d_official", f"method.checkpoint={tmp_path / 'b.pth'}", backbone="tiny_vit")
    with pytest.raises(CheckpointError) as e:
        METHODS.get("fit3d_official")().fit(tiny, cfg, tmp_path)
    assert (
        "another architecture than backbone 'tiny_vit': width 768 (backbone: 48), depth 2 (backbone: 4)"
        in e.value.problem
    )
    assert "backbone=dinov2_vitb14" in e.value.fix


def test_variant_must_match_the_backbone(local_hub):
    snd = METHODS.get("snd_official")()
    with pytest.raises(BenchError) as e:
        snd.fit(None, _cfg("snd_official", "method.variant=base"), None)
    assert "variant 'base' is a checkpoint for backbone=dinov2_vitb14" in e.value.problem
    assert "backbone=dinov2_vitb14" in e.value.fix
    with pytest.raises(BenchError, match="dinov2_vits14, dinov2_vitb14, not 'dinov2_vitl14'"):
        snd.fit(None, _cfg("snd_official", backbone="dinov2_vitl14"), None)
    with pytest.raises(BenchError, match="not a fit3d_official release"):
        METHODS.get("fit3d_official")().fit(None, _cfg("fit3d_official", "method.variant=large"), None)
    ref, info = snd.reference(_cfg("snd_official", "method.blending=false", backbone="dinov2_vitb14"))
    assert ref == f"hf://{SND}/dinov2_base_snd_no_blending.pth" and info["variant"] == "base"
    ref, _ = METHODS.get("fit3d_official")().reference(
        _cfg("fit3d_official", "method.revision=v1", backbone="dinov2_vits14_reg")
    )
    assert ref == f"hf://{FIT3D}/dinov2_reg_small_finetuned.pth@v1"
    assert not local_hub.requests  # names are checked before anything is downloaded


def test_runner_obtains_the_official_backbone_and_records_provenance(local_hub, tiny_releases, tmp_path):
    from bench.runner import obtain_backbone

    sd = official_dinov2(seed=4, **TINY)
    torch.save(sd, tmp_path / "f.pth")
    sha = local_hub.seed(SND, {"dinov2_small_snd.pth": tmp_path / "f.pth"})
    backbone, ref = obtain_backbone(_cfg("snd_official", backbone="tiny_vit"), tmp_path / "run")
    _assert_loaded(backbone, {k: v for k, v in sd.items() if k != "mask_token"})
    assert ref["kind"] == "official" and ref["commit"] == sha and ref["file"] == "dinov2_small_snd.pth"
