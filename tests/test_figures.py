"""bench.figures: PCA colouring, record selection, and a smoke run of all three figures on a tiny
random backbone with hand-made records (tiny synthetic task sets, probes saved untrained)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.config import compose, to_container
from bench.errors import BenchError
from bench.figures import latest_records, make_figures, normals_rgb, pca_rgb


def test_pca_rgb_recovers_dominant_direction():
    # the features vary only along one direction d (a left/right ramp): the first component is the ramp
    h, w = 4, 6
    ramp = torch.arange(w, dtype=torch.float64).repeat(h, 1)  # [h,w]
    d = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    feat = (d[:, None, None] * ramp[None]).float()
    rgb = pca_rgb(feat)
    assert rgb.shape == (h, w, 3) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    first = rgb[..., 0]
    # monotone in x (up to the sign of the component), constant in y
    assert torch.allclose(first, first[:1].expand(h, w))
    diffs = first[0, 1:] - first[0, :-1]
    assert bool((diffs > 0).all()) or bool((diffs < 0).all())


def test_normals_rgb_maps_axes_and_masks():
    n = torch.zeros(3, 1, 2)
    n[2, 0, 0] = -1.0  # facing the camera (OpenCV: -z)
    n[0, 0, 1] = 1.0
    rgb = normals_rgb(n, torch.tensor([[True, False]]))
    assert torch.allclose(rgb[0, 0], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(rgb[0, 1], torch.ones(3))  # invalid -> white


def _cfg(tmp_path: Path, method: str, task: str):
    ov = [f"method={method}", f"task={task}", "backbone=tiny_cnn", "device=cpu", f"paths.root={tmp_path}"]
    if task == "synth_corr":
        ov += [
            "task.dataset.scenes=2",
            "task.dataset.views=3",
            "task.dataset.size=[32,32]",
            "task.dataset.held_out=1",
            "task.protocol.view_gaps=[1]",
            "task.protocol.pairs_per_gap=1",
            "task.protocol.min_overlap=0.0",
            "task.protocol.num_corr=20",
        ]
    else:
        ov += ["task.dataset.scenes=2", "task.dataset.views=2", "task.dataset.size=32", "task.dataset.held_out=1"]
    return compose(ov)


def _record(tmp_path: Path, method: str, task: str, seed: int, created: str, ckpt=None):
    from bench.backbones import build_backbone
    from bench.io import save_safetensors
    from bench.registry import TASKS
    from tasks.dense import resolve_protocol
    from tasks.features import FeatureSpec, features
    from tasks.probes import DenseProbe
    from omegaconf import OmegaConf

    cfg = _cfg(tmp_path, method, task)
    run_dir = tmp_path / "outputs" / f"{method}_{task}_{seed}_{created}"
    if task != "synth_corr":
        from tasks.data import open_split

        open_split(cfg.task.dataset, "test")  # generates the tiny set
        bb = build_backbone(cfg.backbone)
        proto = resolve_protocol(cfg)
        spec = FeatureSpec.from_config(proto.get("features", {}), bb)
        f = features(bb, torch.rand(1, 3, 32, 32), spec)
        t = TASKS.get(task)()
        probe = DenseProbe(
            t.kind,
            proto.get("head", {}),
            [x.shape[1] for x in f],
            **t.probe_kwargs(OmegaConf.to_container(cfg.task, resolve=True), proto),
        )
        save_safetensors(probe.state_dict(), run_dir / "task" / "probe.safetensors")
    rec = {
        "id": f"{method}-{task}-{seed}-{created}",
        "created": created,
        "method": method,
        "backbone": "tiny_cnn",
        "task": task,
        "seed": seed,
        "metrics": {"x": 0.0},
        "config": to_container(cfg),
        "checkpoint": ckpt or {"kind": "pretrained"},
        "run_dir": str(run_dir),
    }
    runs = tmp_path / "results" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{rec['id']}.json").write_text(json.dumps(rec))
    return rec


def test_latest_records_picks_latest_of_seed(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, (seed, created) in enumerate([(0, "2026-01-01"), (0, "2026-01-02"), (1, "2026-01-03")]):
        (runs / f"{i}.json").write_text(
            json.dumps(
                {
                    "id": str(i),
                    "method": "dinov2",
                    "backbone": "b",
                    "task": "synth_depth",
                    "seed": seed,
                    "created": created,
                    "metrics": {"rmse": 1.0},
                }
            )
        )
    recs = latest_records(tmp_path, "b", 0)
    assert list(recs) == [("dinov2", "synth_depth")] and recs[("dinov2", "synth_depth")]["id"] == "1"
    assert latest_records(tmp_path, "other", 0) == {}


def test_trained_backbone_missing_is_a_clear_error(tmp_path):
    _record(
        tmp_path,
        "fit3d",
        "synth_corr",
        0,
        "2026-01-01",
        ckpt={"kind": "trained", "path": str(tmp_path / "nope" / "model.safetensors")},
    )
    with pytest.raises(BenchError, match="not on this machine"):
        make_figures(tmp_path / "results", backbone="tiny_cnn")


@pytest.mark.slow
def test_make_figures_smoke(tmp_path):
    torch.manual_seed(0)
    for task in ("synth_depth", "synth_normals", "synth_corr"):
        _record(tmp_path, "dinov2", task, 0, "2026-01-01")
    paths = make_figures(tmp_path / "results", backbone="tiny_cnn", lines=5)
    names = sorted(p.name for p in paths)
    assert names == ["correspondence.png", "depth_normals.png", "features_pca.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 400_000
