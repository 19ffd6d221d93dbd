"""Differentiable feature splatting: one function, two engines.

``rasterize(...)`` renders N 3D Gaussians carrying D-dimensional features into C pinhole cameras and
returns features [C,H,W,D], alpha [C,H,W] and expected depth [C,H,W] (gsplat's "ED": alpha-weighted
camera z divided by ``max(alpha, 1e-10)``). CUDA tensors go to ``gsplat.rasterization`` (public API,
``render_mode="RGB+ED"``, all D channels in one call); CPU tensors go to the tiled pure-torch engine in
:mod:`bench.splat.tiled`, which follows gsplat 1.5.3's rules (pixel centres at +0.5, EWA projection with
frustum clamping, eps2d on the 2D covariance, alpha capped at 0.999, alphas < 1/255 skipped, a pixel
stops before the Gaussian that would take its transmittance to <= 1e-4). :mod:`bench.splat.reference`
is the dense all-pairs version used by the tests. Call :func:`tune_allocator` once in CPU-heavy
processes (the trainers and the benchmark do). gsplat compiles its CUDA kernels on the first CUDA call.

On CPU the engine is ~17-20x faster than the dense reference at D=384 on 4 views x 37x37 Gaussians into
4 cameras at 74x74 (``python -m bench perf splat``), in ~0.4 GB.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..errors import BenchError
from .alloc import tune_allocator
from .lift import pixel_aligned_gaussians
from .reference import rasterize_dense
from .tiled import rasterize_tiled

__all__ = [
    "rasterize",
    "rasterize_dense",
    "rasterize_tiled",
    "rasterize_gsplat",
    "tune_allocator",
    "pixel_aligned_gaussians",
]

BACKENDS = ("auto", "gsplat", "torch", "dense")


def rasterize_gsplat(
    means: Tensor,
    quats: Optional[Tensor],
    scales: Optional[Tensor],
    opacities: Tensor,
    features: Tensor,
    w2c: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
    covars: Optional[Tensor] = None,
):
    """gsplat 1.5.3 on CUDA tensors (float32); same contract as :func:`rasterize`."""
    if not means.is_cuda:
        raise BenchError("gsplat needs CUDA tensors, got CPU tensors", "use backend='torch' (or 'auto') on CPU")
    from gsplat import rasterization

    dtype = features.dtype
    f32 = lambda t: None if t is None else t.float()
    colors, alphas, _ = rasterization(
        means.float(),
        f32(quats),
        f32(scales),
        opacities.float(),
        features.float(),
        w2c.float(),
        K.float(),
        int(width),
        int(height),
        near_plane=near,
        far_plane=far,
        eps2d=eps2d,
        sh_degree=None,
        render_mode="RGB+ED",
        rasterize_mode="classic",
        covars=f32(covars),
    )
    return colors[..., :-1].to(dtype), alphas[..., 0].to(dtype), colors[..., -1].to(dtype)


def _check_shapes(means, quats, scales, opacities, features, w2c, K, covars) -> None:
    """One BenchError naming the shapes when :func:`rasterize`'s inputs do not fit together."""
    N = means.shape[0]
    if covars is not None:
        if covars.shape != (N, 3, 3):
            raise BenchError(
                f"rasterize got covars of shape {tuple(covars.shape)} for {N} Gaussians",
                "pass covars [N,3,3] (or quats [N,4] and scales [N,3] instead)",
            )
        quats = quats if quats is not None else means.new_zeros(N, 4)  # placeholders for the checks below
        scales = scales if scales is not None else means.new_zeros(N, 3)
    elif quats is None or scales is None:
        raise BenchError(
            "rasterize needs quats and scales, or covars", "pass quats [N,4] and scales [N,3], or covars [N,3,3]"
        )
    if (
        quats.shape != (N, 4)
        or scales.shape != (N, 3)
        or opacities.shape != (N,)
        or features.dim() != 2
        or features.shape[0] != N
        or w2c.dim() != 3
        or w2c.shape[1:] != (4, 4)
        or K.shape != (w2c.shape[0], 3, 3)
    ):
        raise BenchError(
            f"rasterize got inconsistent shapes: means {tuple(means.shape)}, quats {tuple(quats.shape)}, "
            f"scales {tuple(scales.shape)}, opacities {tuple(opacities.shape)}, features "
            f"{tuple(features.shape)}, w2c {tuple(w2c.shape)}, K {tuple(K.shape)}",
            "pass means [N,3], quats [N,4], scales [N,3], opacities [N], features [N,D], w2c [C,4,4], K [C,3,3]",
        )


def rasterize(
    means: Tensor,
    quats: Optional[Tensor],
    scales: Optional[Tensor],
    opacities: Tensor,
    features: Tensor,
    w2c: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
    backend: str = "auto",
    covars: Optional[Tensor] = None,
):
    """Splat Gaussians with features into C cameras.

    Args:
        means [N,3], quats [N,4] (wxyz, any norm), scales [N,3] (standard deviations), opacities [N],
        features [N,D] (any D); w2c [C,4,4] world-to-camera (OpenCV axes), K [C,3,3] in pixels.
        covars [N,3,3]: world-space covariances (symmetric positive definite, e.g. MVSplat's); when
        given, quats and scales are ignored (pass None), as in gsplat's ``covars``.
        backend: "auto" (gsplat on CUDA, tiled engine otherwise), "gsplat", "torch" (tiled engine on
        any device) or "dense" (the all-pairs reference; small inputs only).
    Returns:
        features [C,H,W,D], alpha [C,H,W], depth [C,H,W] (expected camera z; ~0 where alpha is 0).
    Differentiable w.r.t. means, quats, scales, opacities and features (not w2c/K on the gsplat path).
    """
    if backend not in BACKENDS:
        raise BenchError(f"unknown splatting backend '{backend}'", f"use one of {', '.join(BACKENDS)}")
    _check_shapes(means, quats, scales, opacities, features, w2c, K, covars)
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "torch"
    fn = {"gsplat": rasterize_gsplat, "torch": rasterize_tiled, "dense": rasterize_dense}[backend]
    if covars is not None:
        quats = scales = None
    return fn(
        means,
        quats,
        scales,
        opacities,
        features,
        w2c,
        K,
        int(width),
        int(height),
        near=near,
        far=far,
        eps2d=eps2d,
        covars=covars,
    )
