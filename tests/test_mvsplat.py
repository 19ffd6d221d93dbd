"""MVSplat's encoder (methods/splat_distill/mvsplat.py) against the official encoder's outputs on the
random-weight reference fixture, its checkpoint loading, the SH basis, covariance splatting, and
Splat-and-Distill steps with reconstructor.name=mvsplat."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from bench.errors import BenchError, CheckpointError
from bench.splat import rasterize, rasterize_dense, rasterize_tiled
from methods.splat_distill.mvsplat import (
    MVSplatEncoder,
    eval_harmonics,
    rotate_harmonics,
    wigner_d,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("BENCH_MVSPLAT_FIXTURE", ROOT / ".." / "shared" / "fixtures" / "mvsplat"))
WEIGHTS = FIXTURE / "mvsplat_re10k_random_state_dict.safetensors"
needs_fixture = pytest.mark.skipif(
    not FIXTURE.is_dir(), reason=f"MVSplat reference fixture folder {FIXTURE} is absent (set BENCH_MVSPLAT_FIXTURE)"
)

# the fixture README's recommended float32 tolerances (section 7)
TOL = dict(
    depth_rel=5e-3,
    ray_dir=1e-5,
    means_over_depth=5e-3,
    cov_over_max=1e-2,
    scales_rel=5e-3,
    rotations=2e-4,
    harmonics=4e-4,
    opacities=2e-5,
    raw=5e-4,
    inter=2e-4,
)


def _rotation(axis, angle):
    k = torch.tensor(axis, dtype=torch.float64)
    k = k / k.norm()
    K = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    return torch.linalg.matrix_exp(angle * K)


@pytest.fixture
def one_thread():
    """The encoder's small convolutions run far faster on one thread on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------- SH basis
def test_wigner_d_is_a_representation_in_e3nn_basis():
    R1, R2 = _rotation([0.3, -1.0, 0.4], 0.7), _rotation([1.0, 0.2, -0.1], -1.9)
    assert torch.allclose(wigner_d(1, R1), R1, atol=1e-12)  # degree 1: R itself on (x,y,z)
    for l in range(5):
        D1, D2 = wigner_d(l, R1), wigner_d(l, R2)
        assert torch.allclose(wigner_d(l, R1 @ R2), D1 @ D2, atol=1e-10)
        assert torch.allclose(D1 @ D1.T, torch.eye(2 * l + 1, dtype=D1.dtype), atol=1e-10)
    # e3nn's polar axis is y: the m = 0 function (index l) is invariant under rotations about y
    Dy = wigner_d(3, _rotation([0, 1, 0], 1.1))
    assert torch.allclose(Dy[:, 3], torch.eye(7, dtype=Dy.dtype)[3], atol=1e-12)
    with pytest.raises(BenchError, match="det"):
        wigner_d(2, torch.diag(torch.tensor([1.0, 1.0, -1.0])))


def test_eval_harmonics_is_rotation_covariant():
    """Colour of rotated coefficients at a rotated direction = colour of the originals."""
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(4, 3, 25, generator=g, dtype=torch.float64)
    d = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    R = _rotation([0.5, 0.1, -0.7], 2.3)
    a = eval_harmonics(sh, d)
    b = eval_harmonics(rotate_harmonics(sh, R), d @ R.T)
    assert torch.allclose(a, b, atol=1e-9)
    # DC only: 3DGS's constant C0 = 0.28209479
    dc = torch.zeros(1, 3, 25, dtype=torch.float64)
    dc[0, :, 0] = 1
    assert torch.allclose(eval_harmonics(dc, d[:1]), torch.full((1, 3), 0.28209479177387814, dtype=torch.float64))
    # degree 1 at direction d is proportional to d (x, y, z order)
    one = torch.zeros(3, 3, 25, dtype=torch.float64)
    one[0, 0, 1], one[1, 0, 2], one[2, 0, 3] = 1, 1, 1
    assert torch.allclose(
        eval_harmonics(one, d[:1].expand(3, 3))[:, 0], math.sqrt(3 / (4 * math.pi)) * d[0], atol=1e-12
    )
    # the polynomial form equals the rotation-matrix definition at new directions
    from methods.splat_distill.mvsplat import _d_column_at

    for l in (2, 4):
        e = torch.zeros(2 * l + 1, 3, 25, dtype=torch.float64)
        e[torch.arange(2 * l + 1), 0, l * l + torch.arange(2 * l + 1)] = 1
        got = eval_harmonics(e, d[1:2].expand(2 * l + 1, 3))[:, 0]
        assert torch.allclose(got, _d_column_at(l, d[1]) * math.sqrt((2 * l + 1) / (4 * math.pi)), atol=1e-10)


# ------------------------------------------------------------------------------ the fixture
@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """Both cases through an encoder loaded from the fixture weights wrapped like a user's re10k.ckpt
    (a Lightning checkpoint: ``state_dict`` with ``encoder.*`` beside other keys)."""
    from safetensors.torch import load_file

    sd = load_file(str(WEIGHTS))
    assert len(sd) == 471 and sum(v.numel() for v in sd.values()) == 11_955_734
    ckpt = tmp_path_factory.mktemp("mvsplat") / "re10k_like.ckpt"
    torch.save({"state_dict": {**sd, "decoder.other": torch.zeros(1)}, "epoch": 0, "global_step": 0}, ckpt)
    enc = MVSplatEncoder.from_checkpoint(ckpt)  # strict
    assert all(torch.equal(enc.state_dict()[k[len("encoder.") :]], v) for k, v in sd.items())
    del sd
    fx = load_file(str(FIXTURE / "mvsplat_re10k_random.safetensors"))
    extra = FIXTURE / "mvsplat_re10k_random_intermediates.safetensors"
    fx.update(load_file(str(extra)) if extra.is_file() else {})
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    for case in ("a", "b"):
        pre = f"case_{case}."
        context = {k[len(pre + "context.") :]: v for k, v in fx.items() if k.startswith(pre + "context.")}
        expected = {k[len(pre) :]: v for k, v in fx.items() if k.startswith(pre) and ".context." not in "." + k}
        inter: dict = {}
        with torch.no_grad():
            out = enc(context, intermediates=inter)
        runs[case] = (context, expected, out, inter)
    torch.set_num_threads(threads)
    return runs


def errors(context, expected, out, inter) -> dict:
    """The README's metrics (section 7) for one case."""
    depth = expected["visualization_dump.depth"][..., 0, 0]  # [B,V,H,W]
    B = depth.shape[0]
    d = depth.reshape(B, -1)
    origin = context["extrinsics"][:, :, :3, 3].repeat_interleave(depth[0].numel() // depth.shape[1], 1)
    m, m_ref = out["means"], expected["gaussians.means"]
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    cov, cov_ref = out["covariances"], expected["gaussians.covariances"]
    e = {
        "depth_rel": ((out["depths"] - depth).abs() / depth).max(),
        "ray_dir": (unit(m - origin) - unit(m_ref - origin)).norm(dim=-1).max(),
        "means_over_depth": ((m - m_ref).norm(dim=-1) / d).max(),
        "cov_over_max": ((cov - cov_ref).abs().amax((-1, -2)) / cov_ref.abs().amax((-1, -2))).max(),
        "scales_rel": (
            (out["scales"] - expected["visualization_dump.scales"]).abs() / expected["visualization_dump.scales"]
        ).max(),
        "rotations": (out["rotations"] - expected["visualization_dump.rotations"]).abs().max(),
        "harmonics": (out["harmonics"] - expected["gaussians.harmonics"]).abs().max(),
        "opacities": max(
            (out["opacities"] - expected["gaussians.opacities"]).abs().max(),
            (out["densities"].reshape(B, -1) - expected["depth_predictor.densities"].reshape(B, -1)).abs().max(),
        ),
        "raw": (out["raw_gaussians"] - expected["depth_predictor.raw_gaussians"]).abs().max(),
        "depth_predictor_depths": (
            (out["depths"].reshape(B, -1) - expected["depth_predictor.depths"].reshape(B, -1)).abs()
            / expected["depth_predictor.depths"].reshape(B, -1)
        ).max(),
    }
    e = {k: float(v) for k, v in e.items()}
    for k, ref in expected.items():
        if k.startswith("inter."):
            e[k] = float((inter[k] - ref).abs().max() / ref.abs().max())
    return e


@needs_fixture
@pytest.mark.slow
@pytest.mark.parametrize("case", ["a", "b"])
def test_matches_official_encoder_on_fixture(fixture_run, case):
    context, expected, out, inter = fixture_run[case]
    B, V, _, H, W = context["image"].shape
    N = V * H * W
    assert out["means"].shape == (B, N, 3) and out["covariances"].shape == (B, N, 3, 3)
    assert out["harmonics"].shape == (B, N, 3, 25) and out["opacities"].shape == (B, N)
    assert out["depths"].shape == (B, V, H, W)
    inter_keys = {k for k in expected if k.startswith("inter.")}
    assert len(inter_keys) >= 17 and inter_keys <= set(inter)  # every stored intermediate
    e = errors(context, expected, out, inter)
    tol = dict(TOL, depth_predictor_depths=TOL["depth_rel"])
    bad = {k: v for k, v in e.items() if v > tol.get(k, TOL["inter"])}
    assert not bad, f"case {case}: over tolerance: {bad}"


# -------------------------------------------------------------------------- checkpoint errors
def test_checkpoint_errors_name_the_keys(tmp_path):
    from safetensors.torch import save_file

    sd = {f"encoder.{k}": v.clone() for k, v in MVSplatEncoder().state_dict().items()}
    good = tmp_path / "enc.safetensors"
    save_file(sd, str(good))
    MVSplatEncoder.from_checkpoint(good)  # bare encoder.* dict
    import argparse

    lightning = tmp_path / "lightning.ckpt"  # non-tensor objects beside the state dict (hyper-parameters)
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4), "epoch": 1}, lightning)
    enc = MVSplatEncoder.from_checkpoint(lightning)
    assert torch.equal(
        enc.state_dict()["depth_predictor.to_gaussians.2.bias"], sd["encoder.depth_predictor.to_gaussians.2.bias"]
    )
    cases = {
        "missing": (
            {k: v for k, v in sd.items() if "to_disparity.2.bias" not in k},
            "encoder.depth_predictor.to_disparity.2.bias",
        ),
        "unexpected": ({**sd, "encoder.extra.weight": torch.zeros(2)}, "encoder.extra.weight"),
        "shape": ({**sd, "encoder.depth_predictor.to_gaussians.2.bias": torch.zeros(3)}, "to_gaussians.2.bias"),
    }
    for name, (bad, key) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"state_dict": bad}, path)
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            MVSplatEncoder.from_checkpoint(path)
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no encoder"):
        MVSplatEncoder.from_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        MVSplatEncoder.from_checkpoint(tmp_path / "absent.ckpt")


def test_context_errors():
    enc = MVSplatEncoder()
    ctx = {
        "image": torch.rand(1, 2, 3, 40, 48),
        "intrinsics": torch.eye(3).expand(1, 2, 3, 3),
        "extrinsics": torch.eye(4).expand(1, 2, 4, 4),
        "near": torch.ones(1, 2),
        "far": torch.full((1, 2), 100.0),
    }
    with pytest.raises(BenchError, match="multiples of 16"):
        enc(ctx)
    with pytest.raises(BenchError, match="near < far"):
        enc({**ctx, "image": torch.rand(1, 2, 3, 32, 48), "far": torch.full((1, 2), 0.5)})
    with pytest.raises(BenchError, match="2 context views"):
        enc({**ctx, "image": torch.rand(1, 3, 3, 32, 48)})


# --------------------------------------------------------------------- covariance splatting
def _random_gaussians(seed: int, N: int = 80, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(N, 3, generator=g, dtype=dtype) - 0.5) * torch.tensor([3.0, 2.0, 2.0], dtype=dtype)
    quats = torch.randn(N, 4, generator=g, dtype=dtype)
    scales = 0.02 + 0.3 * torch.rand(N, 3, generator=g, dtype=dtype) ** 2
    opac = torch.rand(N, generator=g, dtype=dtype)
    feats = torch.randn(N, 4, generator=g, dtype=dtype)
    w2c = torch.eye(4, dtype=dtype).repeat(2, 1, 1)
    w2c[:, :3, 3] = torch.tensor([[0.0, 0.0, 3.0], [0.3, -0.1, 3.2]], dtype=dtype)
    K = torch.tensor([[20.0, 0, 12.3], [0, 21.0, 8.6], [0, 0, 1]], dtype=dtype).repeat(2, 1, 1)
    from bench.splat.project import quat_to_rotmat

    R = quat_to_rotmat(quats)
    cov = R @ torch.diag_embed(scales**2) @ R.transpose(-1, -2)
    return means, quats, scales, opac, feats, w2c, K, cov


@pytest.mark.parametrize("engine", [rasterize_tiled, rasterize_dense])
def test_covariance_input_equals_quats_scales(engine):
    means, quats, scales, opac, feats, w2c, K, cov = _random_gaussians(0)
    a = engine(means, quats, scales, opac, feats, w2c, K, 24, 18)
    b = engine(means, None, None, opac, feats, w2c, K, 24, 18, covars=cov)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-10)
    assert float(a[1].max()) > 0.5


def test_covariance_tiled_matches_dense_with_gradients():
    means, _, _, opac, feats, w2c, K, cov = _random_gaussians(1)

    def run(fn):
        p = [t.clone().requires_grad_(True) for t in (means, cov, opac, feats)]
        out = fn(p[0], None, None, p[2], p[3], w2c, K, 24, 18, covars=p[1])
        g = torch.Generator().manual_seed(5)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
        return out, torch.autograd.grad(loss, p)

    (o1, g1), (o2, g2) = run(rasterize_tiled), run(rasterize_dense)
    sym = lambda g: (g + g.transpose(-1, -2)) / 2  # only the symmetric part of d/dSigma is defined
    g1, g2 = [*g1[:1], sym(g1[1]), *g1[2:]], [*g2[:1], sym(g2[1]), *g2[2:]]
    for x, y in list(zip(o1, o2)) + list(zip(g1, g2)):
        assert torch.allclose(x, y, atol=1e-8 * max(1.0, float(y.detach().abs().max())))
    assert float(g2[1].abs().sum()) > 0  # covariances get gradients
    with pytest.raises(BenchError, match="covars"):
        rasterize(means, None, None, opac, feats, w2c, K, 24, 18, covars=cov[:, :2])
    with pytest.raises(BenchError, match="quats and scales, or covars"):
        rasterize(means, None, None, opac, feats, w2c, K, 24, 18)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat needs CUDA")
def test_covariance_gsplat_matches_cpu_engine():
    means, _, _, opac, feats, w2c, K, cov = (t.float() for t in _random_gaussians(2))
    ref = rasterize_tiled(means, None, None, opac, feats, w2c, K, 24, 18, covars=cov)
    out = rasterize(
        *(t.cuda() for t in (means,)),
        None,
        None,
        opac.cuda(),
        feats.cuda(),
        w2c.cuda(),
        K.cuda(),
        24,
        18,
        covars=cov.cuda(),
        backend="gsplat",
    )
    for x, y in zip(out, ref):
        assert (x.cpu() - y).abs().max() < 1e-3 * max(1.0, float(y.abs().max()))


# ------------------------------------------------------------------- Splat-and-Distill steps
@needs_fixture
@pytest.mark.slow
def test_splat_distill_steps_with_mvsplat_reconstructor(one_thread, tmp_path):
    """A few SnD steps on synthetic scenes with the fixture weights wrapped as a Lightning checkpoint:
    the frozen MVSplat Gaussians (full covariances) are what the teacher features are splatted with."""
    from safetensors.torch import load_file

    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.data.synthetic import ensure_synthetic
    from bench.seed import seed_everything
    from methods.splat_distill.method import build_training
    from methods.splat_distill.reconstruct import MVSplatAdapter

    ckpt = tmp_path / "re10k.ckpt"
    torch.save({"state_dict": load_file(str(WEIGHTS)), "epoch": 3}, ckpt)
    size = (32, 48)
    root = ensure_synthetic(tmp_path / "synth", 2, 6, size, 0)
    overrides = [
        "method=splat_distill",
        "backbone=tiny_vit",
        "device=cpu",
        "method.data.dataset=synthetic",
        f"method.data.root={root}",
        "method.data.scenes=2",
        "method.data.views=6",
        f"method.data.size=[{size[0]},{size[1]}]",
        "method.data.seed=0",
        "method.views.gap=2",
        "method.head.prototypes=64",
        "method.head.hidden_dim=64",
        "method.head.bottleneck_dim=16",
        "method.optim.batch_size=1",
        "method.optim.lr=1e-3",
        "method.optim.steps=3",
        "method.teacher.every=1",
        "method.progress=false",
        f"method.ckpt_every={10**6}",
        "method.reconstructor.name=mvsplat",
        f"method.reconstructor.checkpoint={ckpt}",
        "method.reconstructor.near=0.5",
        "method.reconstructor.far=20",
        "method.lift.coverage=rgb",
    ]
    cfg = compose(overrides)
    seed_everything(0)
    distiller, data, _, loop, step_fn = build_training(build_backbone(cfg.backbone), cfg, tmp_path / "run", "cpu")
    rec = distiller.reconstructor
    assert isinstance(rec, MVSplatAdapter) and not rec.training
    assert not any(p.requires_grad for p in rec.parameters())
    # the reconstructor's Gaussians: anisotropic, camera z within MVSplat's depth range
    views = data.load_views(data.scene_ids[0], (0, 2, 1))
    with torch.no_grad():
        gs = rec({k: v[:2] for k, v in views.items()})
    assert gs.covariances.shape == (2, *size, 3, 3) and gs.harmonics.shape == (2, *size, 3, 25)
    ev = torch.linalg.eigvalsh(gs.covariances.double())
    assert bool((ev > 0).all()) and float((ev[..., -1] / ev[..., 0]).median()) > 1.5  # not isotropic
    assert float(gs.depth.min()) > 0.5 * 0.5 and float(gs.depth.max()) <= 20 * (1 + 1e-4)
    # the two coverage rules on the same example: any contribution (rgb) covers at least what alpha > 0.5 does
    ex = [{k: v for k, v in views.items()}]
    _, valid_rgb = distiller.targets(ex)
    distiller.coverage = "alpha"
    _, valid_alpha = distiller.targets(ex)
    distiller.coverage = "rgb"
    assert bool((valid_rgb | ~valid_alpha).all()) and valid_rgb.any()
    before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    hist = loop.run(step_fn, after_step=distiller.update_teacher)
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    assert any(not torch.equal(before[k], v) for k, v in distiller.student.state_dict().items())
    # image sizes MVSplat cannot take fail with a clear error naming the config key, before training
    with pytest.raises(BenchError, match=r"method\.data\.size.*\[32,48\]"):
        rec({"images": torch.rand(2, 3, 30, 48), "K": views["K"][:2], "w2c": views["w2c"][:2]})
    from methods.splat_distill.distill import Distiller

    with pytest.raises(BenchError, match=r"multiples of 16, got 56x70"):
        Distiller(build_backbone(cfg.backbone), compose(overrides + ["method.data.size=[56,70]"]).method)
    with pytest.raises(BenchError, match="coverage"):
        Distiller(build_backbone(cfg.backbone), compose(overrides + ["method.lift.coverage=none"]).method)
