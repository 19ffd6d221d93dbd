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
    """Interrupted after 1 of 2 steps and resumed == 2 steps straight (same weights, bit for bit)."""
    from methods.splat_distill.mvsplat import MVSplatEncoder
    from methods.splat_distill.pretrain import main

    full, cut = tmp_path / "full.safetensors", tmp_path / "cut.ckpt"  # both output formats
    assert main(_args(files, full, 2)) == 0
    a = _args(files, cut, 2)
    a.stop_after = 1
    assert main(a) == 0 and not cut.exists()
    assert main(_args(files, cut, 2)) == 0
    x, y = MVSplatEncoder.read_encoder_state(full), MVSplatEncoder.read_encoder_state(cut)
    assert json.loads(torch.load(cut, weights_only=True)["bench"])["train"]["steps"] == 2
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
