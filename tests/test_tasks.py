"""Probe heads, sliding windows, schedules, the trainer, transforms, the feature cache, and the dense
tasks end to end (synthetic scenes with the offline EfficientNet-Lite0; a fake reader for the
real-dataset path)."""

import json
import math
from pathlib import Path

import pytest
import torch

from bench.config import compose
from bench.errors import DataMissingError, NonFiniteLossError, UnknownNameError
from bench.registry import DATASETS, TASKS
from bench.seed import seed_everything
from helpers import PROBE_SCHEDULE_NEUTRAL, TINY_SEG_LINEAR
from tasks import transforms as T
from tasks.features import FeatureCache, FeatureSpec, quartile_layers, weights_hash
from tasks.probes import BinnedDepth, DenseProbe, DPTHead, LinearHead
from tasks.sliding import slide_inference, window_starts
from tasks.train_probe import lr_factor, train_probe

SYNTH = [
    "task.dataset.scenes=2",
    "task.dataset.views=4",
    "task.dataset.size=64",
    "task.dataset.held_out=1",
    "task.progress=false",
]


# ----------------------------------------------------------------------------------------- units
def test_linear_head_conv_then_upsample_equals_upsample_then_conv():
    torch.manual_seed(0)
    head = LinearHead([6, 2], 5, upsample=4)
    feats = [torch.randn(2, 6, 3, 4), torch.randn(2, 2, 3, 4)]
    up = torch.nn.functional.interpolate(torch.cat(feats, 1), scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.allclose(head(feats), head.conv(up), atol=1e-5)
    assert head(feats).shape == (2, 5, 12, 16)


def test_dpt_head_upsamples_x16_and_binned_depth_hand_values():
    head = DPTHead([4, 4, 4, 8], 3, hidden=8)
    assert head([torch.randn(1, c, 2, 3) for c in (4, 4, 4, 8)]).shape == (1, 3, 32, 48)
    bins = BinnedDepth(1.0, 3.0, bins=3)  # centres 1, 2, 3
    scores = torch.zeros(1, 3, 1, 2)
    scores[0, :, 0, 1] = torch.tensor([0.0, 0.0, 0.7])  # relu+0.1 -> (0.1, 0.1, 0.8)
    assert bins(scores)[0, 0].tolist() == pytest.approx([2.0, 0.1 * 1 + 0.1 * 2 + 0.8 * 3])
    probe = DenseProbe("normals", {"type": "linear", "upsample": 4}, [4])
    out = probe([torch.randn(2, 4, 2, 2)], (10, 10))
    assert out["normals"].shape == (2, 3, 10, 10) and torch.allclose(out["normals"].norm(dim=1), torch.ones(2, 10, 10))
    assert (out["kappa"] >= 0.01).all()


def test_sliding_windows_follow_mmseg_grid_and_average():
    assert window_starts(1000, 512, 341) == [0, 341, 488]
    assert window_starts(300, 512, 341) == [0]
    img = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).view(2, 3, 20, 30)
    calls = []

    def predict(x):
        calls.append(tuple(x.shape[-2:]))
        return x * 2

    out = slide_inference(predict, img, window=(12, 16), stride=(8, 10))
    # rows start at 0, 8; columns at 0, 10, 14 (the last window is shifted back to the border)
    assert window_starts(20, 12, 8) == [0, 8] and window_starts(30, 16, 10) == [0, 10, 14]
    assert torch.allclose(out, img * 2) and calls == [(12, 16)] * 6


# the schedule keys every protocol states (tasks.train_probe.REQUIRED), at neutral values
FULL = PROBE_SCHEDULE_NEUTRAL


def test_lr_schedules_hand_values():
    # Probe3D: 1.5 warm-up epochs from 0.01, then 0.99 cos(0.5 pi p) + 0.01
    kw = dict(total=100, warmup=10, decay="quarter_cosine", warmup_start=0.01, min_factor=0.01)
    assert lr_factor(0, **kw) == pytest.approx(0.01)
    assert lr_factor(5, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(55, **kw) == pytest.approx(0.99 * math.cos(0.25 * math.pi) + 0.01)
    assert lr_factor(100, **kw) == pytest.approx(0.01)
    assert lr_factor(50, 100, 0, "poly", power=1.0) == pytest.approx(0.5)
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    with pytest.raises(UnknownNameError):
        lr_factor(0, 10, 0, "exp")


def test_trainer_shuffles_reproducibly_and_stops_on_nan():
    data = [{"x": torch.tensor([float(i)])} for i in range(6)]
    w = torch.nn.Linear(1, 1)
    seen = []

    def step(batch):
        seen.append(batch["x"].flatten().tolist())
        return w(batch["x"]).pow(2).mean()

    sched = {"epochs": 2, "batch_size": 3, "lr": 1e-3, "warmup": 0.5, **FULL}
    info = train_probe(w, data, step, sched, seed=0, progress=False)
    assert info["steps"] == 4 and len(info["losses"]) == 4
    first = [x for b in seen[:2] for x in b]
    assert sorted(first) == [0, 1, 2, 3, 4, 5] and first != [0, 1, 2, 3, 4, 5]  # shuffled, all seen
    again = []
    train_probe(
        torch.nn.Linear(1, 1),
        data,
        lambda b: (again.append(b["x"].flatten().tolist()), w(b["x"]).sum())[1],
        sched,
        seed=0,
        progress=False,
    )
    assert again == seen
    with pytest.raises(NonFiniteLossError, match="became nan"):
        train_probe(w, data, lambda b: w(b["x"]).sum() * float("nan"), sched, progress=False)


def test_transforms_flip_normals_pad_crops_and_keep_test_labels():
    s = {
        "image": torch.rand(3, 4, 6),
        "normals": torch.tensor([0.6, 0.0, 0.8]).view(3, 1, 1).expand(3, 4, 6).clone(),
        "semantic": torch.arange(24).view(4, 6),
        "depth": torch.ones(4, 6),
    }
    f = T.hflip(s)
    assert f["normals"][0].unique().tolist() == [pytest.approx(-0.6)] and f["semantic"][0, 0] == 5
    c = T.crop(s, -1, 4, 3, 4)  # one row above, two columns past the right border
    assert c["semantic"][0].tolist() == [255] * 4 and c["semantic"][1].tolist() == [4, 5, 255, 255]
    assert c["depth"][0].tolist() == [0.0] * 4 and c["image"].shape == (3, 3, 4)
    t = T.apply(s, {"crop": [2, 4], "resize": [8, 8]}, train=False)
    assert t["image"].shape == (3, 8, 8) and t["semantic"].shape == (2, 4) and t["semantic"][0, 0] == 7
    r = T.apply(s, {"resize": [8, 12], "crop": [8, 8], "crop_mode": "center"}, train=True)
    assert r["semantic"].shape == (8, 8) and r["semantic"].dtype == torch.int64
    assert not T.is_augmented({"crop": [8, 8], "crop_mode": "center"}) and T.is_augmented({"hflip": True})


class _CountingCNN(torch.nn.Module):
    """A stand-in backbone with the seam's layers(); counts forward calls."""

    num_blocks, has_cls, patch_size, embed_dim = 2, False, 4, 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.calls = 0

    def layers(self, images, idx, norm=True, return_cls=False):
        self.calls += 1
        m = torch.nn.functional.avg_pool2d(images, 4) * self.w.view(1, 3, 1, 1)
        return [(m, m.mean((2, 3))) if return_cls else m for _ in idx]


def test_feature_cache_extracts_once_resumes_and_keys_on_weights(tmp_path):
    images = [{"image": torch.rand(3, 8, 8)} for _ in range(5)]
    bb = _CountingCNN()
    spec = FeatureSpec.from_config({"layers": "quartiles", "cls": True, "norm": False}, bb)
    assert (
        spec.layers == (0, 0, 1, 1) and quartile_layers(12) == [2, 5, 8, 11] and quartile_layers(24) == [5, 11, 17, 23]
    )
    mk = lambda b: FeatureCache(tmp_path, "cnn", weights_hash(b), spec, {"size": 8}, {"ds": "x"})  # noqa: E731
    cache = mk(bb)
    # an interruption after the first batch leaves complete per-sample files and no meta.json
    orig = bb.layers
    bb.layers = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()) if bb.calls >= 1 else orig(*a, **k)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(bb, images, batch_size=2, progress=False)
    assert sorted(p.name for p in cache.dir.iterdir()) == ["0000000.pt", "0000001.pt"]
    bb.layers = orig
    cache.fill(bb, images, batch_size=2, progress=False)
    assert bb.calls == 3 and json.loads((cache.dir / "meta.json").read_text())["count"] == 5
    cache.fill(bb, images, batch_size=2, progress=False)
    assert bb.calls == 3  # complete: nothing recomputed
    entry = cache.load(4)
    assert len(entry) == 4 and entry[0][0].shape == (3, 2, 2) and entry[0][1].shape == (3,)
    assert torch.allclose(entry[0][0], torch.nn.functional.avg_pool2d(images[4]["image"], 4))
    with torch.no_grad():
        bb.w.mul_(2)
    assert mk(bb).key != cache.key  # other weights, other cache


# ------------------------------------------------------------------------------- configuration
def test_protocol_selection_by_top_level_key():
    assert compose(["task=synth_depth"]).task.protocol.name == "linear"
    cfg = compose(["task=nyu_depth", "protocol=probe3d"])
    assert cfg.task.protocol.name == "probe3d" and cfg.task.protocol.head.type == "dpt"
    assert cfg.task.dataset.kwargs.layout == "probe3d" and cfg.task.dataset.splits.train == "trainval"
    assert compose(["task=nyu_depth"]).task.dataset.kwargs.layout == "mmseg_depth"
    assert compose(["task=synth_seg", "task.concat_original=true"]).task.protocol.concat_original is True
    with pytest.raises(UnknownNameError, match="unknown protocol 'nope'.*linear, probe3d"):
        TASKS.get("synth_depth")().check(compose(["task=synth_depth", "protocol=nope"]))


def test_missing_dataset_says_what_and_how(tmp_path, capsys):
    from bench.cli import main

    rc = main(
        [
            "run",
            "method=dinov2",
            "task=nyu_depth",
            f"paths.data_dir={tmp_path}",
            f"paths.output_dir={tmp_path}/o",
            f"paths.results_dir={tmp_path}/r",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path}/nyuv2" in err and "python -m bench data nyuv2" in err
    (tmp_path / "nyuv2").mkdir()
    with pytest.raises(DataMissingError, match="nyu_test.txt"):
        TASKS.get("nyu_depth")().check(compose(["task=nyu_depth", f"paths.data_dir={tmp_path}"]))


# --------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def synth_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    from bench.backbones import build_backbone

    torch.set_num_threads(2)
    bb = build_backbone(compose(["backbone=efficientnet_lite0"]).backbone)
    return root, bb


def _run(task, root, backbone, *extra, workdir="work"):
    cfg = compose(
        [
            f"task={task}",
            "backbone=efficientnet_lite0",
            f"paths.data_dir={root}/data",
            f"paths.cache_dir={root}/cache",
            *SYNTH,
            *extra,
        ]
    )
    seed_everything(0)
    return TASKS.get(task)().evaluate(backbone, cfg, root / workdir / task), cfg


@pytest.mark.parametrize(
    "task,key,lo,hi",
    [("synth_depth", "rmse", 0.05, 3.0), ("synth_normals", "mean", 1.0, 80.0), ("synth_seg", "mIoU", 5.0, 100.0)],
)
def test_synth_task_end_to_end(synth_env, task, key, lo, hi):
    root, bb = synth_env
    m, cfg = _run(task, root, bb)
    assert lo < m[key] < hi and all(math.isfinite(v) for v in m.values())
    assert set(cfg.task.report) <= set(m)
    rec = json.loads((root / "work" / task / "metrics.json").read_text())
    assert rec["protocol"]["name"] == "linear" and rec["feature_cache"]  # augmentation-free: cached
    assert (root / "work" / task / "probe.safetensors").exists()


def test_synth_depth_probe3d_protocol(synth_env):
    root, bb = synth_env
    m, _ = _run(
        "synth_depth",
        root,
        bb,
        "protocol=probe3d",
        "task.protocols.probe3d.head.hidden=16",
        "task.protocols.probe3d.schedule.epochs=2",
        workdir="work3d",
    )
    assert {"a1", "rmse", "si_a1", "si_rmse"} <= set(m) and m["si_rmse"] <= m["rmse"] + 1e-6


def test_synth_depth_probe_beats_the_constant_mean_depth_predictor(synth_env):
    """The probe learns depth from the features: a clear margin over predicting the training mean."""
    from tasks.data import open_split
    from tasks.metrics import MeanMeter, depth_metrics

    root, bb = synth_env
    # 20 steps on 4 images: the linear protocol's OneCycle beta1 (0.95 at the start) slows so short a run
    m, cfg = _run(
        "synth_depth",
        root,
        bb,
        "task.protocols.linear.schedule.epochs=20",
        "task.protocols.linear.schedule.momentum=null",
        workdir="const",
    )
    train, test = (open_split(cfg.task.dataset, s) for s in ("train", "test"))
    mean = torch.cat([train[i]["depth"].flatten() for i in range(len(train))])
    mean = float(mean[mean > 0].mean())
    meter = MeanMeter()
    for i in range(len(test)):
        gt = test[i]["depth"][None]
        meter.update(depth_metrics(torch.full_like(gt, mean), gt))
    assert m["rmse"] < 0.8 * meter.result()["rmse"], (m["rmse"], meter.result()["rmse"])


#: Tiny scale at which the ordering below is reliable: 24 rooms (18 train, 6 held out) x 6 views, 96 px.
#: With 8 rooms (2 held out) it is not: there the ranking of pretrained vs random features flips with
#: the seed, because 2 test rooms are too few (see the synth_depth config).
ROOMS = [
    "task.dataset.scenes=24",
    "task.dataset.held_out=6",
    "task.dataset.views=6",
    "task.dataset.size=96",
    "task.progress=false",
]


@pytest.mark.slow
def test_pretrained_features_beat_random_init_on_synth_depth(tmp_path):
    """ImageNet EfficientNet-Lite0 vs the same architecture at random init (two inits), same linear
    probe, same rooms. Measured on 2 cores: 0.531 vs 0.646 / 0.732 RMSE; over generator seeds 1-4 with
    3 inits each the pretrained probe was better in every case (0.575-0.686 vs 0.668-0.860)."""
    from bench.backbones import build_backbone

    def rmse(weights: str, init: int) -> float:
        cfg = compose(
            [
                "task=synth_depth",
                "backbone=efficientnet_lite0",
                f"backbone.weights={weights}",
                f"paths.data_dir={tmp_path}/data",
                f"paths.cache_dir={tmp_path}/cache",
                *ROOMS,
            ]
        )
        torch.manual_seed(init)
        backbone = build_backbone(cfg.backbone)
        seed_everything(0)
        return TASKS.get("synth_depth")().evaluate(backbone, cfg, tmp_path / f"{weights}{init}")["rmse"]

    pretrained = rmse("package", 0)
    random_init = [rmse("none", i) for i in (0, 1)]
    assert all(pretrained < r for r in random_init), (pretrained, random_init)
    assert pretrained < 0.9 * sum(random_init) / len(random_init), (pretrained, random_init)


# ------------------------------------------------------------------ real-dataset path (fake reader)
@DATASETS.register("tests_fake_rgbd", "tests only: random RGB-D-S samples in memory")
class FakeRGBD(torch.utils.data.Dataset):
    def __init__(self, root, split, n=4):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.items = [
            {
                "image": torch.rand(3, 40, 56, generator=g),
                "depth": 1 + 4 * torch.rand(40, 56, generator=g),
                "semantic": torch.randint(0, 4, (40, 56), generator=g),
            }
            for _ in range(int(n))
        ]

    @classmethod
    def check(cls, root):
        return [] if (Path(root) / "ok").exists() else [f"{root}/ok"]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.slow
def test_real_task_path_with_augmentation_crop_and_sliding(tmp_path):
    from bench.backbones import build_backbone

    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "ok").touch()
    bb = build_backbone(compose(["backbone=tiny_cnn"]).backbone)
    common = [
        "backbone=tiny_cnn",
        f"paths.data_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
        "task.dataset.name=tests_fake_rgbd",
        f"task.dataset.root={tmp_path}/fake",
        "task.progress=false",
    ]
    cfg = compose(
        [
            "task=nyu_depth",
            *common,
            "~task.dataset.kwargs",
            "task.protocols.linear.train.crop=[32,48]",
            "task.protocols.linear.schedule.iters=3",
            "task.protocols.linear.schedule.warmup_iters=1",
            "task.protocols.linear.schedule.batch_size=2",
            "task.dataset.limit=3",
        ]
    )
    m = TASKS.get("nyu_depth")().evaluate(bb, cfg, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["feature_cache"] is None  # random crops
    assert math.isfinite(m["rmse"]) and 0 <= m["a1"] <= 1
    cfg = compose(
        [
            "task=ade20k_seg",
            *common,
            *TINY_SEG_LINEAR,
            "task.dataset.reduce_zero_label=false",
        ]
    )
    m = TASKS.get("ade20k_seg")().evaluate(bb, cfg, tmp_path / "s")
    assert 0 <= m["mIoU"] <= 100 and 0 <= m["aAcc"] <= 100
    # a missing root is reported with the files looked for
    cfg = compose(["task=nyu_depth", *common, f"task.dataset.root={tmp_path}/nope"])
    with pytest.raises(DataMissingError, match="dataset root does not exist"):
        TASKS.get("nyu_depth")().check(cfg)


@pytest.mark.slow
def test_runner_records_the_protocol_and_honours_concat_original(synth_env, tmp_path):
    from bench.runner import run_cell

    root, _ = synth_env
    cfg = compose(
        [
            "method=dinov2",
            "task=synth_depth",
            "backbone=tiny_cnn",
            "protocol=probe3d",
            "device=cpu",
            "task.concat_original=true",
            "task.protocols.probe3d.head.hidden=8",
            "task.protocols.probe3d.schedule.epochs=1",
            f"paths.data_dir={root}/data",
            f"paths.cache_dir={tmp_path}/cache",
            f"paths.results_dir={tmp_path}/results",
            f"paths.output_dir={tmp_path}/out",
            *SYNTH,
        ]
    )
    rec = run_cell(cfg)
    assert rec["protocol"]["name"] == "probe3d" and rec["protocol"]["concat_original"] is True
    assert rec["protocol"]["head"]["type"] == "dpt" and "si_rmse" in rec["metrics"]
    assert rec["protocol"]["version"] == 3 and "schedule_length" in rec["protocol"]["deviations"]
    assert rec["protocol"]["code_version"] == "probe3d_1fff822"
    # the probe saw [original, fine-tuned, original CLS stand-in] features (FiT3D: 3C): 3 x tiny_cnn's 112
    from safetensors.torch import load_file

    probe = load_file(str(Path(rec["run_dir"]) / "task" / "probe.safetensors"))
    assert probe["head.proj.0.weight"].shape[1] == 3 * 112
