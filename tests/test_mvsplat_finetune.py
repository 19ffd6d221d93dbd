"""``pretrain-reconstructor model=mvsplat``: MVSplat fine-tuning at toy scale on synthetic scenes (CPU).

The start checkpoint is a Lightning-style ``re10k.ckpt`` holding a randomly initialised RE10K-configuration
encoder and the LPIPS trunk a torchvision VGG16 ``features`` state dict with random weights: both built
here, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

SIZE = (32, 32)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    """(re10k.ckpt with a random encoder, a random VGG16 state dict, synthetic scenes root)."""
    import torchvision

    from bench.data.synthetic import ensure_synthetic
    from methods.splat_distill.mvsplat import MVSplatEncoder

    d = tmp_path_factory.mktemp("mvft")
    torch.manual_seed(0)
    enc = MVSplatEncoder()
    ckpt = d / "re10k.ckpt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()}, "epoch": 1}, ckpt)
    vgg = torchvision.models.vgg16(weights=None).features  # the classifier is not used by LPIPS
    vgg_file = d / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, vgg_file)
    root = ensure_synthetic(d / "synth", 1, 5, SIZE, 0)
    return ckpt, vgg_file, root


def _args(files, out, steps, **extra):
    from methods.splat_distill.pretrain import add_arguments, resolve_defaults

    ckpt, vgg, root = files
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = [
        "model=mvsplat",
        "--dataset",
        "synthetic",
        "--root",
        str(root),
        "--scenes",
        "1",
        "--held-out",
        "0",
        "--views",
        "5",
    ]
    argv += ["--size", str(SIZE[0]), str(SIZE[1]), "--seed", "0", "--steps", str(steps), "--batch", "1"]
    argv += ["--gap", "2", "--near", "0.5", "--far", "20", "--checkpoint", str(ckpt), "--lpips-vgg", str(vgg)]
    argv += ["--device", "cpu", "--no-progress", "--out", str(out)]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args = p.parse_args(argv)
    assert args.model == "mvsplat"
    return resolve_defaults(args)


def _encoder_state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_defaults_are_the_official_ones():
    from methods.splat_distill.pretrain import add_arguments, resolve_defaults

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = resolve_defaults(p.parse_args(["model=mvsplat"]))
    assert (a.steps, a.batch, a.lr, a.gap, a.near, a.far, tuple(a.size)) == (
        300_001,
        14,
        2e-4,
        [8],
        1.0,
        100.0,
        (576, 880),
    )
    assert (a.grad_clip, a.lpips_weight, a.dataset, a.held_out, a.scenes) == (0.5, 0.05, "scannetpp", 0, None)
    assert a.augment == "none"  # Splat-and-Distill's ScanNet++ loader never applies its config's augment: true
    assert a.last_batch == "smaller"  # the official DataLoader's drop_last=False
    b = resolve_defaults(p.parse_args([]))
    assert (b.model, b.steps, b.batch, b.lr, b.gap, b.dataset, b.scenes) == (
        "learned",
        1500,
        2,
        1e-3,
        [2, 6],
        "synthetic",
        36,
    )
    with pytest.raises(SystemExit):
        p.parse_args(["model=nope"])
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="--augment is a model=mvsplat option"):
        resolve_defaults(p.parse_args(["--augment", "flip"]))
    with pytest.raises(SystemExit):
        p.parse_args(["model=mvsplat", "--augment", "rotate"])
    with pytest.raises(BenchError, match="--last-batch is a model=mvsplat option"):
        resolve_defaults(p.parse_args(["--last-batch", "carry"]))


def _camera():
    """A 64x48 camera (pixel K, principal point at the image centre) looking roughly down +z, in float64."""
    import math

    a, b = 0.2, -0.15
    ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]], dtype=torch.float64)
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3], w2c[:3, 3] = rx @ ry, torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    K = torch.tensor([[50.0, 0, 32.0], [0, 55.0, 21.0], [0, 0, 1]], dtype=torch.float64)
    return K, w2c


def _project(K, w2c, X):
    c = X @ w2c[:3, :3].T + w2c[:3, 3]
    p = c @ K.T
    return p[:, :2] / p[:, 2:]


def test_flip_reflects_cameras_so_points_project_to_mirrored_pixels():
    """--augment flip (MVSplat's reflect_views): images flipped, w2c -> M w2c M with M = diag(-1,1,1,1), K kept.
    A world point X seen by the reflected camera as M X lands on the mirrored pixel W - u (same v) when
    cx = W/2; with the principal point off centre the official rule is off by exactly 2 cx - W pixels."""
    from methods.splat_distill.recon_data import reflect_views

    W, H = 64, 48
    K, w2c = _camera()
    images = torch.rand(3, 3, H, W, dtype=torch.float64)
    views = {"images": images, "K": K.expand(3, 3, 3).clone(), "w2c": w2c.expand(3, 4, 4).clone()}
    r = reflect_views(views)
    assert torch.equal(r["images"][..., 5], images[..., W - 1 - 5]) and torch.equal(r["K"], views["K"])
    X = torch.tensor([[0.3, -0.2, 2.5], [-0.7, 0.4, 3.1], [1.1, 0.9, 4.0]], dtype=torch.float64)
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    uv, uv2 = _project(K, w2c, X), _project(K, r["w2c"][2], X @ mirror)
    assert torch.allclose(uv2[:, 0], W - uv[:, 0], atol=1e-12) and torch.allclose(uv2[:, 1], uv[:, 1], atol=1e-12)
    K2 = K.clone()
    K2[0, 2] = 35.5  # off centre: the official shim keeps K, so the reprojection shifts by 2 cx - W = 7 pixels
    r2 = reflect_views({**views, "K": K2.expand(3, 3, 3).clone()})
    uv, uv2 = _project(K2, w2c, X), _project(K2, r2["w2c"][0], X @ mirror)
    assert torch.allclose(uv2[:, 0] - (W - uv[:, 0]), torch.full((3,), 7.0, dtype=torch.float64), atol=1e-12)
    twice = reflect_views(r)
    assert all(torch.equal(twice[k], views[k]) for k in views)


def test_flipped_gaussians_render_the_flipped_image():
    """Splatting mirrored Gaussians (means M x, covariances M S M) into the reflected camera gives the flipped
    render of the originals (bench.splat's CPU engine): what the encoder sees in a flipped example is a
    consistent mirrored scene."""
    from bench.splat import rasterize
    from methods.splat_distill.recon_data import reflect_views

    W, H = 64, 48
    K, w2c = (t.float() for t in _camera())
    g = torch.Generator().manual_seed(0)
    means = torch.rand(12, 3, generator=g) * torch.tensor([2.0, 1.5, 1.0]) + torch.tensor([-1.0, -0.75, 2.0])
    A = torch.randn(12, 3, 3, generator=g) * 0.08
    cov = A @ A.transpose(1, 2) + 1e-3 * torch.eye(3)
    opacity, rgb = torch.rand(12, generator=g) * 0.5 + 0.4, torch.rand(12, 3, generator=g)
    M = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
    r = reflect_views({"images": torch.zeros(1, 3, H, W), "K": K[None], "w2c": w2c[None]})
    img = rasterize(means, None, None, opacity, rgb, w2c[None], K[None], W, H, covars=cov)[0][0]
    img2 = rasterize(means @ M, None, None, opacity, rgb, r["w2c"], K[None], W, H, covars=M @ cov @ M)[0][0]
    assert float(img.amax()) > 0.3  # the Gaussians are in view
    assert torch.allclose(img2, img.flip(1), atol=1e-5), float((img2 - img.flip(1)).abs().max())


def test_flip_draws_depend_only_on_seed_and_index(files):
    """Half the examples are mirrored (MVSplat: probability 0.5), chosen by (seed, index) alone; the training
    example of a flipped index is the reflected example, the others are left as they are."""
    from bench.data.scenes import MultiViewScenes
    from methods.splat_distill.finetune_mvsplat import training_example
    from methods.splat_distill.recon_data import flips, reflect_views
    from methods.splat_distill.views import ViewSampler

    drawn = [flips(0, i) for i in range(4000)]
    assert 0.47 < sum(drawn) / len(drawn) < 0.53
    assert drawn == [flips(0, i) for i in range(4000)] and drawn != [flips(1, i) for i in range(4000)]
    data = MultiViewScenes(files[2], None, SIZE)
    ids = data.scene_ids
    sampler = ViewSampler([data.num_views(s) for s in ids], 2, "uniform", seed=0)
    on, off = drawn.index(True), drawn.index(False)
    for i in (on, off):
        s, idx = sampler.example(i)
        views = data.load_views(ids[s], list(idx))
        plain = {k: views[k] for k in ("images", "K", "w2c")}
        want = reflect_views(plain) if i == on else plain
        got = training_example(data, ids, sampler, i, 0, "flip")
        assert all(torch.equal(got[k], want[k]) for k in want), i
        assert all(torch.equal(training_example(data, ids, sampler, i, 0, "none")[k], plain[k]) for k in plain)


@pytest.mark.slow
def test_lpips_uses_the_given_vgg_file(files):
    """The LPIPS trunk holds the file's tensors (no download); LPIPS of an image with itself is 0 and grows
    with noise."""
    from methods.splat_distill.finetune_mvsplat import build_lpips

    _, vgg, _ = files
    sd = torch.load(vgg)
    m = build_lpips(vgg)
    assert torch.equal(getattr(m.net.slice1, "0").weight, sd["features.0.weight"])
    assert torch.equal(getattr(m.net.slice5, "28").bias, sd["features.28.bias"])
    assert not any(p.requires_grad for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    near = (x + 0.05 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1)
    far = torch.rand(1, 3, 32, 32, generator=g)
    d0, d1, d2 = (float(m(x, y, normalize=True)) for y in (x, near, far))
    assert d0 == pytest.approx(0.0, abs=1e-7) and 0 < d1 < d2


def test_render_is_the_sh_colour_of_a_covering_gaussian():
    """One large opaque Gaussian in front of the camera: the render is its degree-0 colour (SH DC * 0.2821
    + 0.5) times its opacity."""
    from methods.splat_distill.finetune_mvsplat import render_targets

    H = W = 16
    sh = torch.zeros(1, 1, 3, 25)
    sh[0, 0, :, 0] = torch.tensor([0.5, -0.5, 1.0])
    g = {
        "means": torch.tensor([[[0.0, 0.0, 2.0]]]),
        "covariances": torch.eye(3)[None, None] * 100.0,
        "harmonics": sh,
        "opacities": torch.tensor([[0.5]]),
    }
    K = torch.tensor([[[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]]])
    img = render_targets(g, torch.eye(4)[None], K, H, W, near=1.0)
    want = (torch.tensor([0.5, -0.5, 1.0]) * 0.28209479177387814 + 0.5).clamp_min(0) * 0.5
    assert img.shape == (1, 3, H, W)
    assert torch.allclose(img[0, :, 8, 8], want, atol=2e-3)
    # culled in front of 0.2 x near (3DGS's frustum test after MVSplat's 1/near rescale): nothing rendered
    assert float(render_targets(g, torch.eye(4)[None], K, H, W, near=20.0).abs().max()) == 0.0


@pytest.mark.slow
def test_finetune_rgb_loss_falls_and_loads_into_snd(files, tmp_path):
    """A few steps lower the RGB error of the fixed training examples; the output loads strictly as SnD's
    mvsplat reconstructor with the fine-tuned weights."""
    from bench.data.scenes import MultiViewScenes
    from methods.splat_distill.finetune_mvsplat import build_lpips, example_loss
    from methods.splat_distill.mvsplat import MVSplatEncoder
    from methods.splat_distill.pretrain import main
    from methods.splat_distill.reconstruct import MVSplatAdapter, build_reconstructor

    ckpt, vgg, root = files
    out = tmp_path / "ft.safetensors"
    assert main(_args(files, out, 8)) == 0  # the official lr 2e-4
    meta = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["bench"])
    assert meta["train"]["lpips_vgg"].startswith("sha256:") and meta["train"]["start_checkpoint"].startswith("sha256:")

    data = MultiViewScenes(root, None, SIZE)
    sid = data.scene_ids[0]
    ex = [data.load_views(sid, [0, 2, t]) for t in (0, 1, 2)]
    ex += [data.load_views(sid, [2, 4, t]) for t in (2, 3, 4)]
    ex = [{k: v for k, v in e.items() if k != "depth"} for e in ex]
    lp = build_lpips(vgg)
    before = MVSplatEncoder.from_checkpoint(ckpt)
    after = MVSplatEncoder.from_checkpoint(out)
    with torch.no_grad():
        mse0 = example_loss(before, lp, ex, 0.5, 20.0, 0.05)[1]["mse"]
        mse1 = example_loss(after, lp, ex, 0.5, 20.0, 0.05)[1]["mse"]
    print(f"fixed examples MSE {mse0:.5f} -> {mse1:.5f}")
    assert mse1 < 0.7 * mse0, (mse0, mse1)

    rec = build_reconstructor({"name": "mvsplat", "checkpoint": str(out), "near": 0.5, "far": 20.0})
    assert isinstance(rec, MVSplatAdapter) and not rec.training
    sd = _encoder_state(out)
    own = rec.encoder.state_dict()
    assert all(torch.equal(own[k[len("encoder.") :]], v) for k, v in sd.items())
    start = MVSplatEncoder.read_encoder_state(ckpt)
    assert any(not torch.equal(start[k], own[k]) for k in start)
    with torch.no_grad():
        gs = rec({k: v[:2] for k, v in ex[0].items()})
    assert gs.covariances.shape == (2, *SIZE, 3, 3) and torch.isfinite(gs.means).all()


@pytest.mark.slow
def test_finetune_resume_is_exact(files, tmp_path):
    """Interrupted after 1 of 2 steps and resumed == 2 steps straight (same weights, bit for bit), with
    MVSplat's flip augmentation on."""
    from methods.splat_distill.mvsplat import MVSplatEncoder
    from methods.splat_distill.pretrain import main

    from methods.splat_distill.recon_data import flips

    assert flips(0, 0) and flips(0, 1)  # with --augment flip (seed 0) both examples are mirrored
    full, cut = tmp_path / "full.safetensors", tmp_path / "cut.ckpt"  # both output formats
    assert main(_args(files, full, 2, augment="flip")) == 0
    a = _args(files, cut, 2, augment="flip")
    a.stop_after = 1
    assert main(a) == 0 and not cut.exists()
    assert main(_args(files, cut, 2, augment="flip")) == 0
    x, y = MVSplatEncoder.read_encoder_state(full), MVSplatEncoder.read_encoder_state(cut)
    assert json.loads(torch.load(cut, weights_only=True)["bench"])["train"]["steps"] == 2
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_finetune_smaller_last_step_of_an_epoch(files, tmp_path):
    """--last-batch smaller: an epoch of the one training scene is one example, so at --batch 2 every step holds
    a single example and trains exactly the weights of --batch 1 (the same examples, the same mean)."""
    from methods.splat_distill.mvsplat import MVSplatEncoder
    from methods.splat_distill.pretrain import main

    one, two = tmp_path / "b1.safetensors", tmp_path / "b2.safetensors"
    assert main(_args(files, one, 2)) == 0
    assert main(_args(files, two, 2, last_batch="smaller", batch=2)) == 0  # the later --batch 2 wins
    x, y = MVSplatEncoder.read_encoder_state(one), MVSplatEncoder.read_encoder_state(two)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_finetune_reads_scannetpp_official_layout(files, tmp_path):
    """``--dataset scannetpp`` on the official layout (the synthetic scene exported): frame numbers for the
    skip rule, epoch order, and one training step runs and writes a loadable checkpoint."""
    from bench.data.scenes import export_snd_layout
    from methods.splat_distill.finetune_mvsplat import _open_data
    from methods.splat_distill.mvsplat import MVSplatEncoder
    from methods.splat_distill.pretrain import main

    snd = export_snd_layout(files[2], tmp_path / "snd")
    args = _args(files, tmp_path / "ft.ckpt", 1)
    args.dataset, args.root, args.scenes = "scannetpp", str(snd), None
    data, train, numbers = _open_data(args)
    assert len(train) == 1 and len(numbers) == 1 and len(numbers[0]) == data.num_views(train[0]) == 5
    assert numbers[0] == sorted(numbers[0])
    assert main(args) == 0
    assert len(MVSplatEncoder.read_encoder_state(tmp_path / "ft.ckpt")) == 471


@pytest.mark.cuda
def test_finetune_on_cuda_renders_with_gsplat_like_the_cpu_engine(files, tmp_path):
    """On CUDA the target render goes through gsplat (CUDA tensors only) and matches the CPU engine on the
    encoder's Gaussians; two fine-tuning steps run on the GPU and write a loadable checkpoint."""
    from bench.data.scenes import MultiViewScenes
    from methods.splat_distill.finetune_mvsplat import _context, render_targets
    from methods.splat_distill.mvsplat import MVSplatEncoder
    from methods.splat_distill.pretrain import main

    ckpt, _, root = files
    data = MultiViewScenes(root, None, SIZE)
    ex = {k: v for k, v in data.load_views(data.scene_ids[0], [0, 2, 1]).items() if k != "depth"}
    enc = MVSplatEncoder.from_checkpoint(ckpt)
    with torch.no_grad():
        g = enc(_context([{k: v[:2] for k, v in ex.items()}], 0.5, 20.0))
        cpu = render_targets(g, ex["w2c"][2:], ex["K"][2:], *SIZE, near=0.5)
        gpu = render_targets({k: v.cuda() for k, v in g.items()}, ex["w2c"][2:].cuda(), ex["K"][2:].cuda(), *SIZE, 0.5)
    assert (gpu.cpu() - cpu).abs().max() < 1e-3
    a = _args(files, tmp_path / "gpu.safetensors", 2)
    a.device = "cuda"
    assert main(a) == 0
    assert len(MVSplatEncoder.read_encoder_state(tmp_path / "gpu.safetensors")) == 471
