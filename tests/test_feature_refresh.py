"""A forced run (``force=true``) extracts the probe features again instead of reusing the feature cache."""

import json
from pathlib import Path

import pytest
import torch

from bench.config import compose
from bench.io import torch_save
from bench.registry import DATASETS, TASKS
from helpers import toy_sweep
from tasks.features import FeatureCache, FeatureSpec


class _Pool(torch.nn.Module):
    """Features = 4x4 average pooling of the image (exact values to compare with)."""

    num_blocks = 1

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def layers(self, images, idx, norm=True, return_cls=False):
        self.calls += 1
        return [torch.nn.functional.avg_pool2d(images, 4) * self.w for _ in idx]


def test_refresh_extracts_every_sample_again_and_replaces_stale_files(tmp_path):
    images = [{"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    bb = _Pool()
    cache = FeatureCache(tmp_path, "pool", "0123456789", FeatureSpec(layers=(0,)), {}, {})
    cache.fill(bb, images, batch_size=2, progress=False)
    assert bb.calls == 2
    torch_save([[torch.zeros(3, 2, 2)]], cache.path(1))  # a stale sample (e.g. older extraction code)
    cache.fill(bb, images, batch_size=2, progress=False)
    assert bb.calls == 2 and cache.load(1)[0][0].abs().sum() == 0  # complete cache: reused as it is
    cache.fill(bb, images, batch_size=2, progress=False, refresh=True)
    assert bb.calls == 4  # both batches again
    for i in range(3):
        assert torch.equal(cache.load(i)[0][0], torch.nn.functional.avg_pool2d(images[i]["image"], 4))
    assert json.loads((cache.dir / "meta.json").read_text())["count"] == 3


@DATASETS.register("tests_fake_rgbd_refresh", "tests only: a few random RGB-D samples in memory")
class _FakeRGBD(torch.utils.data.Dataset):
    def __init__(self, root, split, n=3):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.items = [
            {"image": torch.rand(3, 32, 32, generator=g), "depth": 1 + 4 * torch.rand(32, 32, generator=g)}
            for _ in range(int(n))
        ]

    @classmethod
    def check(cls, root):
        return []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.slow
def test_dense_task_with_force_true_recomputes_the_cached_teacher_features(tmp_path):
    from bench.backbones import build_backbone

    bb = build_backbone(compose(["backbone=tiny_cnn"]).backbone)
    base = [
        "task=synth_depth",
        "backbone=tiny_cnn",
        f"paths.data_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
        "task.dataset.name=tests_fake_rgbd_refresh",
        f"task.dataset.root={tmp_path}",
        "task.progress=false",
        "task.protocols.linear.schedule.epochs=1",
        "task.protocols.linear.schedule.batch_size=2",
    ]
    task = TASKS.get("synth_depth")()

    def run(*extra) -> Path:
        task.evaluate(bb, compose([*base, *extra]), tmp_path / "work")
        key = json.loads((tmp_path / "work" / "metrics.json").read_text())["feature_cache"]
        assert key, "the augmentation-free linear protocol caches its features"
        return tmp_path / "cache" / "features" / key / "0000000.pt"

    sample = run()
    fresh = torch.load(sample, weights_only=True)
    stale = [[torch.full_like(t, 7.0) for t in layer] for layer in fresh]
    torch_save(stale, sample)
    assert run() == sample and torch.equal(torch.load(sample, weights_only=True)[0][0], stale[0][0])  # reused
    assert run("force=true") == sample  # same key
    again = torch.load(sample, weights_only=True)
    assert torch.equal(again[0][0], fresh[0][0]) and not torch.equal(again[0][0], stale[0][0])


@pytest.mark.slow
def test_sweep_force_flag_makes_frozen_cells_refresh_their_features(toys, tmp_path):
    """``sweep --force`` re-runs cells that have records; a frozen method's (e.g. the teacher's) job then
    runs with force=true (which re-extracts the features and trains nothing); a trained method's job
    does not (force=true would retrain its backbone; ``force=true`` as an override does that)."""
    from bench import sweep

    ov = toy_sweep(tmp_path, "method.name=dinov2,toy_train", "task.name=toy_probe")
    frozen, trained = "eval:dinov2-tiny_vit-toy_probe-s0", "eval:toy_train-tiny_vit-toy_probe-s0"
    plain, forced = sweep.make_plan(ov), sweep.make_plan(ov, force=True)
    assert "force=true" not in plain.job_overrides[frozen] and forced.job_overrides[frozen][-1] == "force=true"
    assert "force=true" not in forced.job_overrides[trained]
