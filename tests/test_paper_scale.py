"""Paper scale (issue 24): official-layout instance masks, SLIC off the training step, loader workers that
change no number, memory-saving forms equal to the batched ones, gradient accumulation, thread set-up."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.backbones import build_backbone
from methods.splat_distill.official import CPU_DEVIATIONS
from bench.config import compose
from bench.seed import seed_everything

SIZE = (56, 70)  # tiny_vit (patch 14) -> a 4x5 grid
SCENES, VIEWS, SEED = 2, 8, 0


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from bench.data.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("paper") / "synth", SCENES, VIEWS, SIZE, SEED, progress=False)


@pytest.fixture(scope="module")
def official(synth, tmp_path_factory):
    """The synthetic scenes in the official Splat-and-Distill ScanNet++ layout (JPEG images)."""
    from bench.data.scenes import export_snd_layout

    return export_snd_layout(synth, tmp_path_factory.mktemp("paper") / "snd")


def _cfg(root, *extra, dataset="synthetic"):
    data = (
        ["method.data.dataset=synthetic", f"method.data.scenes={SCENES}", f"method.data.views={VIEWS}"]
        if dataset == "synthetic"
        else ["method.data.dataset=scannetpp", "method.data.scenes=null"]
    )
    return compose(
        [
            "method=splat_distill",
            "backbone=tiny_vit",
            "device=cpu",
            *data,
            f"method.data.root={root}",
            f"method.data.size=[{SIZE[0]},{SIZE[1]}]",
            f"method.data.seed={SEED}",
            "method.views.gap=3",
            "method.head.prototypes=64",
            "method.head.hidden_dim=64",
            "method.head.bottleneck_dim=16",
            "method.optim.batch_size=2",
            "method.optim.lr=2e-3",
            "method.optim.steps=3",
            "method.teacher.every=1",
            "method.teacher.momentum=0.9",
            "method.progress=false",
            "method.diagnostics.enabled=false",
            "method.ckpt_every=1000",
            *CPU_DEVIATIONS,  # the depth reconstructor (no MVSplat checkpoint here) and the CPU recipes' rules
            *extra,
        ]
    )


def _fit(cfg, workdir):
    from methods.splat_distill import SplatDistill

    seed_everything(0)
    m = SplatDistill()
    return m.fit(build_backbone(cfg.backbone), cfg, workdir), m.train_info


def _same(a, b, tol=0.0):
    a, b = a.model.state_dict(), b.model.state_dict()
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tol, worst


# ------------------------------------------------------------------------------------- masks (item 1)
def test_official_layout_yields_instance_masks_and_slic_is_not_called(synth, official, tmp_path, monkeypatch):
    from bench.data.scenes import MultiViewScenes

    scenes = MultiViewScenes(official)
    assert scenes.scene_root == official / "scenes" and len(scenes.scene_ids) == SCENES
    sid = scenes.scene_ids[0]
    assert scenes.has(sid, "instance") and scenes._scene(sid).maps["instance"].name == "instance_segmentation"
    assert (official / "scenes" / sid / "instance_segmentation" / "DSC00002.JPG.png").is_file()  # <file_path>.png
    got = scenes.load_views(sid, [1])["instance"]
    ref = MultiViewScenes(synth).load_views(sid, [1])["instance"]  # the generator's exact ids
    assert torch.equal(got, ref) and len(torch.unique(got)) > 3

    import methods.splat_distill.distill as distill

    def no_slic(*a, **k):
        raise AssertionError("SLIC must not run when the scenes have instance masks")

    monkeypatch.setattr(distill, "slic_masks", no_slic)
    _, info = _fit(_cfg(official, "loader.workers=0", dataset="scannetpp"), tmp_path / "run")
    assert info["training"]["deviations"] == {} and info["training"]["precision"] == "32"


def test_slic_fallback_is_logged_once_recorded_and_runs_in_the_loader(official, tmp_path, monkeypatch, caplog):
    """Scenes without instance maps: lift.masks=auto uses SLIC, says so once, records the deviation, and the
    superpixels are computed by the loader worker (another process), never inside the training step."""
    import methods.splat_distill.distill as distill
    from methods.splat_distill.method import build_training

    bare = tmp_path / "bare"
    shutil.copytree(official, bare)
    for d in (bare / "scenes").iterdir():
        shutil.rmtree(d / "instance_segmentation")
    pids = tmp_path / "pids"
    pids.mkdir()
    real = distill.slic_masks

    def spy(images, *a):
        (pids / str(os.getpid())).touch()
        return real(images, *a)

    monkeypatch.setattr(distill, "slic_masks", spy)
    cfg = _cfg(bare, "loader.workers=1", dataset="scannetpp")
    seed_everything(0)
    with caplog.at_level(logging.WARNING, logger="bench"):
        distiller, _, _, loop, step_fn = build_training(build_backbone(cfg.backbone), cfg, tmp_path / "w", "cpu")
        loop.run(step_fn, after_step=distiller.update_teacher)
        step_fn.loader.close()
    said = [r for r in caplog.records if "SLIC" in r.getMessage()]
    assert len(said) == 1 and "slic_masks" in said[0].getMessage()
    assert distiller.deviations["slic_masks"]["scenes"] == SCENES
    assert distiller.deviations["slic_masks"]["anchor"] == "instance"
    assert distiller.slic_on_step == 0  # every example came with its segments
    made = {int(p.name) for p in pids.iterdir()}
    assert made and os.getpid() not in made  # computed in the loader worker process


# ------------------------------------------------------------------------------- workers (item 2)
@pytest.mark.slow
def test_snd_run_with_0_and_2_loader_workers_is_bit_identical(synth, tmp_path):
    a, _ = _fit(_cfg(synth, "loader.workers=0", "method.lift.masks=slic"), tmp_path / "w0")
    b, _ = _fit(_cfg(synth, "loader.workers=2", "method.lift.masks=slic"), tmp_path / "w2")
    _same(a, b)


def test_augmented_probe_with_0_and_2_workers_is_bit_identical(tmp_path):
    from tasks.train_probe import train_probe
    from tasks.transforms import Transformed

    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(3, 12, 12, generator=g), "depth": torch.rand(12, 12, generator=g)} for _ in range(10)]
    aug = {"hflip": True, "crop": [8, 8], "crop_mode": "random", "color_aug": {"p": 0.5}}
    sched = {
        "iters": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "ckpt_every": 1000,
        "warmup_iters": 0,
        "decay": "constant",
        "shape": "mmcv",
        "warmup_start": 1.0,
        "min_factor": 1.0,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "shuffle": True,
    }

    def run(workers):
        torch.manual_seed(0)
        data = Transformed(items, aug, True, ("image", "depth"))
        probe = torch.nn.Conv2d(3, 1, 3, padding=1)
        seen = []

        def step_loss(batch):
            seen.append(batch["image"].sum().item())
            return ((probe(batch["image"])[:, 0] - batch["depth"]) ** 2).mean()

        train_probe(
            probe, data, step_loss, sched, seed=3, num_workers=workers, progress=False, workdir=tmp_path / f"p{workers}"
        )
        return probe.state_dict(), seen

    (w0, s0), (w2, s2) = run(0), run(2)
    assert s0 == s2 and all(torch.equal(w0[k], w2[k]) for k in w0)
    flips = {round(v, 4) for v in s0}
    assert len(flips) == len(s0)  # the augmentation draws differ from batch to batch (not a constant)


def test_auto_workers_from_the_machine(monkeypatch):
    from bench.errors import BenchError
    from bench.loader import resolve_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert resolve_workers("auto") == 8 and resolve_workers(3) == 3 and resolve_workers("0") == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_workers("auto") == 3  # 16 cores / 4 ranks - 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_workers("auto") == 0
    with pytest.raises(BenchError):
        resolve_workers("many")


# -------------------------------------------------------------------------------- memory (item 3)
@pytest.mark.parametrize("grid", ["corners", "centres"])
def test_per_image_upsampling_equals_the_batched_form(grid):
    from methods.splat_distill.features import upsample

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 6, 5, 7, generator=g)
    masks = torch.randint(0, 4, (4, 40, 52), generator=g)
    kw = {"grid": grid, "all_excluded": "zero" if grid == "corners" else "bilinear"}
    batched = upsample(feats, masks, (40, 52), "mask_aware", None, **kw)
    per_image = torch.cat(
        [upsample(feats[i : i + 1], masks[i : i + 1], (40, 52), "mask_aware", None, **kw) for i in range(4)]
    )
    assert float((batched - per_image).abs().max()) <= 1e-6


def test_chunked_dino_loss_equals_the_batched_form():
    from methods.splat_distill.head import DINOHead, distill_loss

    torch.manual_seed(0)
    head, teacher = DINOHead(12, 50, 32, 8), DINOHead(12, 50, 32, 8)
    student = torch.randn(2, 12, 3, 5, requires_grad=True)
    target = torch.randn(2, 12, 3, 5)
    valid = torch.rand(2, 3, 5) > 0.3
    out = {}
    for chunk in (0, 7):
        head.zero_grad()
        student.grad = None
        loss, extra = distill_loss("dino", student, target, valid, head, teacher, 0.5, 0.9, token_chunk=chunk)
        loss.backward()
        out[chunk] = (loss.detach(), extra["kl"], student.grad.clone(), [p.grad.clone() for p in head.parameters()])
        out[chunk, "collapse"] = extra["collapse"]  # the collapse diagnostics' sums (issue 30) add over chunks
    assert torch.allclose(out[0, "collapse"], out[7, "collapse"], rtol=1e-6, atol=1e-9)
    (l0, k0, g0, p0), (l7, k7, g7, p7) = out[0], out[7]
    assert abs(float(l0 - l7)) <= 1e-6 and abs(k0 - k7) <= 1e-6
    assert float((g0 - g7).abs().max()) <= 1e-6
    for a, b in zip(p0, p7):  # parameter gradients sum over tokens in another order: relative 1e-6
        assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(a.abs().max()))


@pytest.mark.slow
def test_gradient_accumulation_2x1_equals_1x2(synth, tmp_path):
    """method.optim.accumulate=2 at a batch of 2 trains the weights of the unsplit batch (float rounding);
    LoRA dropout off, as in the rank-count test, since micro-batches draw other dropout masks."""
    base = ["loader.workers=0", "method.adapter.dropout=0"]
    one, _ = _fit(_cfg(synth, *base), tmp_path / "a1")
    two, info = _fit(_cfg(synth, *base, "method.optim.accumulate=2"), tmp_path / "a2")
    _same(one, two, tol=1e-6)
    assert info["training"]["accumulate"] == 2 and info["training"]["micro_batch"] == 1
    masked, _ = _fit(_cfg(synth, *base, "method.lift.uncovered=mask"), tmp_path / "m1")
    masked2, _ = _fit(_cfg(synth, *base, "method.lift.uncovered=mask", "method.optim.accumulate=2"), tmp_path / "m2")
    _same(masked, masked2, tol=1e-6)  # variable loss cells per micro-batch: weighted by their counts


@pytest.mark.slow
def test_accumulation_over_a_smaller_last_step(synth, tmp_path):
    """views.last_batch=smaller: 2 scenes per epoch at a global batch of 4 are steps of 2 examples; accumulate=4
    splits each into micro-batches of 0, 1, 0, 1 examples (the empty ones add nothing) and trains the weights of
    accumulate=1 (float rounding), with the same logged losses."""
    base = ["loader.workers=0", "method.adapter.dropout=0", "method.optim.batch_size=4"]
    base += ["method.views.order=epoch", "method.views.last_batch=smaller"]
    one, _ = _fit(_cfg(synth, *base), tmp_path / "a1")
    four, _ = _fit(_cfg(synth, *base, "method.optim.accumulate=4"), tmp_path / "a4")
    _same(one, four, tol=1e-6)
    h1, h4 = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("a1", "a4"))
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h4], rel=1e-5)


def test_accumulate_is_not_part_of_the_fingerprint_and_must_divide_the_batch(synth, tmp_path):
    from bench.errors import BenchError
    from bench.identity import backbone_key, cell_identity

    a, b = _cfg(synth), _cfg(synth, "method.optim.accumulate=2")
    assert cell_identity(a)["cell"] == cell_identity(b)["cell"] and backbone_key(a) == backbone_key(b)
    with pytest.raises(BenchError, match="accumulate=3"):
        _fit(_cfg(synth, "method.optim.accumulate=3"), tmp_path / "bad")
    from bench.preflight import validate

    with pytest.raises(BenchError, match="accumulate=3"):  # refused before any work
        validate(_cfg(synth, "method.optim.accumulate=3"), trains=True)
    validate(b, trains=True)


def test_export_writes_the_official_json_and_names(official):
    scene = sorted((official / "scenes").iterdir())[0]
    meta = json.loads((scene / "transforms_train.json").read_text())
    names = [f["file_path"] for f in meta["frames"]]
    assert names[0] == "DSC00001.JPG" and len(names) == VIEWS
    assert all(
        (scene / "images" / n).is_file() and (scene / "instance_segmentation" / f"{n}.png").is_file() for n in names
    )
    from PIL import Image

    arr = np.asarray(Image.open(scene / "instance_segmentation" / f"{names[0]}.png"))
    assert arr.dtype == np.uint16


# ------------------------------------------------------------------------------ perf paper (item 6)
def test_perf_paper_runs_on_cpu_at_a_tiny_size(tmp_path, capsys):
    from bench.cli import main

    out = tmp_path / "tables.txt"
    args = ["perf", "paper", "--backbone", "tiny_vit", "--size", "56", "70", "--batch", "2", "--device", "cpu"]
    args += ["--workers", "1", "--scenes", "1", "--views", "6", "--data-dir", str(tmp_path / "d"), "--out", str(out)]
    args += ["method.head.prototypes=64", "method.head.hidden_dim=64", "method.head.bottleneck_dim=16"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for stage in ("loader wait", "teacher forward", "upsampling", "reconstruction", "splat", "student forward"):
        assert stage in text
    for stage in ("loss (DINO heads)", "backward", "optimiser", "EMA", "examples/s per worker", "peak memory"):
        assert stage in text
    assert "SLIC computed in the step: 0" in text  # the official layout's instance masks
    assert out.read_text().strip() == text.strip()


# ---------------------------------------------------------------------------- numerics, threads (4, 5)
def test_tf32_on_cuda_as_the_official_trainer_and_32_true_opts_out():
    from methods.splat_distill.method import matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        assert matmul_precision(compose(["precision=32"]), "cuda") == "tf32"
        assert torch.get_float32_matmul_precision() == "high"
        assert matmul_precision(compose(["precision=bf16-mixed"]), "cuda:0") == "bf16-mixed+tf32"
        assert matmul_precision(compose(["precision=32-true"]), "cuda") == "32-true"
        assert torch.get_float32_matmul_precision() == "highest"
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision(compose(["precision=32"]), "cpu") == "32"  # CPU: nothing changes
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_cpu_ranks_share_the_cores(monkeypatch):
    from bench.distributed import cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default: replaced by cores / local ranks
        assert cpu_threads() == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
        assert cpu_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_entry_point_sets_passive_omp_wait_unless_set(tmp_path):
    import subprocess
    import sys

    probe = "import os, runpy, sys; sys.argv = ['bench', 'list']; import bench.__main__"
    code = f"import os\ntry:\n    {probe}\nexcept SystemExit:\n    pass\nprint('POLICY', os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "POLICY PASSIVE" in out.stdout
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        timeout=120,
    )
    assert "POLICY ACTIVE" in out.stdout


def test_record_carries_the_training_precision_accumulation_and_deviations(tmp_path):
    from bench.io import write_json
    from bench.runner import _train_time

    run = {"precision": "tf32", "accumulate": 2, "micro_batch": 7, "deviations": {"slic_masks": {"scenes": 3}}}
    write_json(tmp_path / "train_info.json", {"wall_time_s": 5.0, "segments": 1, "training": run})
    got = _train_time(tmp_path)
    assert got["train_run"] == run and got["train_wall_time_s"] == 5.0
