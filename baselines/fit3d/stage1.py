"""FiT3D stage I: lift a frozen teacher's features of one scene into feature Gaussians.

Per scene (``cfg.method.stage1``; defaults are the paper's, see bench/conf/method/fit3d.yaml):

1. **teacher features** of every view: last-layer normed patch tokens of the frozen input backbone,
   kept at the patch grid and bilinearly upsampled to full resolution when a view is used;
2. **initialisation** from depth: valid pixels of all views unprojected to the world, a random subset of
   ``init_points`` kept, coloured by their pixel (3DGS init: kNN scale, opacity 0.1, features 0);
3. **optimisation** (``iterations``; one random view per iteration, a new permutation every epoch):
   ``(1 - l) L1 + l (1 - SSIM)`` on the rendered RGB (l = ``lambda_dssim``) plus ``feature_weight``
   x L1 between the teacher's upsampled features and the rendered D-dim features decoded by the
   scene's 3x3 conv (no bias, D -> teacher width). Adam (eps 1e-15) with the 3DGS learning rates;
   the mean's lr decays exponentially over the run and scales with the camera extent;
4. **adaptive density control** (:mod:`baselines.fit3d.gaussians`): statistics while ``step <
   densify.until``, clone/split/prune every ``densify.every`` steps after ``densify.from``, opacity reset
   every ``opacity_reset_every`` steps; pruning of screen-large Gaussians once the first reset passed.

Fits are cached in ``<scene_cache>/<scene>-<key>/`` where ``key`` hashes the scene's data identity,
the teacher (backbone config + a digest of its weights), the stage-I config and the seed:
``scene.safetensors`` (Gaussians + decoder) and ``info.json`` (PSNR, feature correlation, timing)
mark a finished fit; an unfinished one resumes exactly from ``ckpt/`` (:class:`bench.train.TrainLoop`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.cameras import camera_centers, unproject_depth
from bench.config import NONESSENTIAL_KEYS, stable_hash, to_container
from bench.errors import DataMissingError
from bench.io import save_safetensors, write_json
from bench.seed import seed_everything
from bench.train import TrainLoop

from .gaussians import SceneGaussians

log = logging.getLogger("bench")

SCENE_FILE, INFO_FILE = "scene.safetensors", "info.json"
NONESSENTIAL = frozenset(NONESSENTIAL_KEYS | {"eval"})


# ------------------------------------------------------------------------------------------------
# feature maps between the patch grid and the image


def upsample_to_image(feats: Tensor, size, backbone) -> Tensor:
    """Patch-grid features ``[B,C,h,w]`` -> ``[B,C,H,W]`` bilinear, aligned with how ``backbone`` fed
    the image (resized to the grid, or zero-padded bottom/right to a patch multiple)."""
    H, W = size
    if getattr(backbone, "resize_mode", "resize") == "pad":
        p = backbone.patch_size
        return F.interpolate(
            feats, size=(feats.shape[-2] * p, feats.shape[-1] * p), mode="bilinear", align_corners=False
        )[..., :H, :W]
    return F.interpolate(feats, size=(H, W), mode="bilinear", align_corners=False)


def downsample_to_grid(x: Tensor, grid, backbone) -> Tensor:
    """Image-resolution map ``[B,C,H,W]`` -> the backbone's patch grid (bilinear; padded first for
    padding backbones so that the cells line up with the features)."""
    h, w = grid
    if getattr(backbone, "resize_mode", "resize") == "pad":
        p = backbone.patch_size
        x = F.pad(x, (0, w * p - x.shape[-1], 0, h * p - x.shape[-2]))
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


RESIZES = ("official", "backbone")  # method.resize


def floor_resize(images: Tensor, backbone, rule: str = "official") -> Tensor:
    """``rule: official`` (FiT3D ``utils/model_utils.py`` ``forward_2d_model(_batch)``, both stages): the image
    is resized to the floor multiple of the patch size, bilinear without antialiasing (576x880 -> 574x868, a
    41x62 grid of 14 px patches), before the backbone; ``backbone``: left to the backbone's own rule (nearest
    multiple: 41x63). Padding backbones are never resized."""
    if rule not in RESIZES:
        from bench.errors import BenchError

        raise BenchError(f"method.resize='{rule}' is not a choice", f"use one of {RESIZES}")
    if rule == "backbone" or getattr(backbone, "resize_mode", "resize") != "resize":
        return images
    p = int(backbone.patch_size)
    H, W = images.shape[-2:]
    size = (max(p, H - H % p), max(p, W - W % p))
    if size == (H, W):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)


@torch.no_grad()
def teacher_features(teacher: nn.Module, images: Tensor, batch: int = 8, resize: str = "backbone") -> Tensor:
    """Last-layer normed patch tokens ``[V,C,h,w]`` of ``images [V,3,H,W]`` (batched; ``resize``: see
    :func:`floor_resize`)."""
    return torch.cat(
        [teacher(floor_resize(images[i : i + batch], teacher, resize)) for i in range(0, len(images), batch)]
    )


# ------------------------------------------------------------------------------------------------
# metrics and losses


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Mean SSIM of ``[B,3,H,W]`` images in [0,1] (11x11 Gaussian window, sigma 1.5, as 3DGS)."""
    import kornia

    return kornia.metrics.ssim(x, y, 11, max_val=1.0).mean()


def psnr(x: Tensor, y: Tensor) -> float:
    mse = float(F.mse_loss(x.clamp(0, 1), y))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def correlation_moments(x: Tensor, y: Tensor) -> Tensor:
    """Per-channel sums ``[5,C]`` (x, y, xy, xx, yy; float64) of two ``[B,C,H,W]`` maps: add them up
    over chunks, then :func:`correlation_from_moments` with the pixel count."""
    x, y = x.double().transpose(0, 1).flatten(1), y.double().transpose(0, 1).flatten(1)
    return torch.stack([x.sum(1), y.sum(1), (x * y).sum(1), (x * x).sum(1), (y * y).sum(1)])


def correlation_from_moments(m: Tensor, n: int) -> float:
    sx, sy, sxy, sxx, syy = m
    cov, vx, vy = (sxy - sx * sy / n).sum(), (sxx - sx * sx / n).sum(), (syy - sy * sy / n).sum()
    den = float(torch.sqrt(vx.clamp_min(0) * vy.clamp_min(0)))
    return float(cov) / den if den > 1e-12 else 0.0


def feature_correlation(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two feature maps ``[B,C,H,W]`` after removing each channel's mean over
    all pixels: how well ``x`` reproduces the spatial structure of ``y`` (0 for a constant ``x``)."""
    return correlation_from_moments(correlation_moments(x, y), x.shape[0] * x.shape[2] * x.shape[3])


# ------------------------------------------------------------------------------------------------
# a finished fit


@dataclass
class SceneFit:
    """A fitted scene: frozen Gaussians plus the scene's feature decoder."""

    gaussians: SceneGaussians
    decoder: nn.Conv2d
    info: Dict[str, Any]
    path: Optional[Path] = None

    @torch.no_grad()
    def render_targets(self, w2c: Tensor, K: Tensor, width: int, height: int):
        """Decoded teacher-width features ``[C,Ct,H,W]`` and alpha ``[C,H,W]`` in C cameras."""
        out = self.gaussians.render(w2c, K, width, height, rgb=False)
        return self.decoder(out["features"]), out["alpha"]

    def save(self, directory: Path) -> Path:
        sd = {
            f"gaussians.{k}": v
            for k, v in self.gaussians.state_dict().items()
            if k not in ("grad_accum", "grad_count", "max_radii")
        }
        sd["decoder.weight"] = self.decoder.weight.detach()
        path = save_safetensors({k: v.detach().cpu().contiguous() for k, v in sd.items()}, Path(directory) / SCENE_FILE)
        write_json(Path(directory) / INFO_FILE, self.info)
        return path

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> "SceneFit":
        from bench.checkpoint import read_state_dict

        directory = Path(directory)
        sd = read_state_dict(directory / SCENE_FILE)
        info = json.loads((directory / INFO_FILE).read_text())
        g = SceneGaussians(0, sd["gaussians.features"].shape[1])
        gs = {k[len("gaussians.") :]: v for k, v in sd.items() if k.startswith("gaussians.")}
        n = gs["means"].shape[0]
        gs.update({k: torch.zeros(n) for k in ("grad_accum", "grad_count", "max_radii")})
        g.load_state_dict(gs)
        w = sd["decoder.weight"]
        dec = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=False)
        dec.weight.data.copy_(w)
        return cls(g.to(device).requires_grad_(False), dec.to(device).requires_grad_(False), info, directory)


# ------------------------------------------------------------------------------------------------
# cache key


def scene_key(scene: str, data: Mapping[str, Any], teacher_id: str, stage1: Mapping[str, Any], seed: int) -> str:
    """Cache key of one scene's fit: its data identity, the teacher, the stage-I config and the seed."""
    data = {k: v for k, v in to_container(data).items() if k != "scenes"}
    data["root"] = str(Path(str(data.get("root"))).resolve()) if data.get("root") else None
    stage1 = {k: v for k, v in to_container(stage1).items() if k not in NONESSENTIAL}
    return stable_hash({"scene": scene, "data": data, "teacher": teacher_id, "stage1": stage1, "seed": int(seed)})


def scene_seed(seed: int, scene: str) -> int:
    return (int(seed) * 1_000_003 + int(hashlib.sha256(scene.encode()).hexdigest()[:8], 16)) % (2**31)


# ------------------------------------------------------------------------------------------------
# fitting


def _init_points(views: Mapping[str, Tensor], n: int, gen: torch.Generator):
    depth = views.get("depth")
    if depth is None:
        raise DataMissingError(
            "FiT3D stage I initialises the Gaussians from depth and the scenes have no depth maps",
            "render depth for the scenes (see `python -m bench data scannetpp --help`) or use "
            "method.data.dataset=synthetic",
        )
    pts = unproject_depth(depth, views["K"], views["w2c"])  # [V,H,W,3]
    ok = depth > 0
    pts, cols = pts[ok], views["images"].permute(0, 2, 3, 1)[ok]
    if len(pts) == 0:
        raise DataMissingError("FiT3D stage I: the scene's depth maps are all invalid (0)", "check the depth maps")
    if n and len(pts) > n:
        idx = torch.randperm(len(pts), generator=gen)[:n]
        pts, cols = pts[idx], cols[idx]
    return pts, cols


def camera_extent(w2c: Tensor) -> float:
    """3DGS's spatial scale: 1.1 x the largest distance of a camera centre from their mean."""
    c = camera_centers(w2c)
    return 1.1 * float((c - c.mean(0)).norm(dim=-1).max().clamp_min(1e-6))


def _view_order(step: int, num_views: int, seed: int) -> int:
    """The view of ``step``: a fresh random permutation of the views every epoch (stateless)."""
    epoch, i = divmod(step, num_views)
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return int(torch.randperm(num_views, generator=g)[i])


@torch.no_grad()
def evaluate_fit(
    gaussians: SceneGaussians,
    decoder: nn.Module,
    views: Mapping[str, Tensor],
    tfeat: Tensor,
    teacher: nn.Module,
    chunk: int = 4,
) -> Dict[str, float]:
    """Rendered-RGB PSNR over the views and the correlation of decoded rendered features with the
    teacher's upsampled features (:func:`feature_correlation`)."""
    H, W = views["images"].shape[-2:]
    mse, moments = 0.0, 0.0
    for i in range(0, len(views["images"]), chunk):  # streaming: full-res features never all in memory
        out = gaussians.render(views["w2c"][i : i + chunk], views["K"][i : i + chunk], W, H)
        mse += float(F.mse_loss(out["rgb"].clamp(0, 1), views["images"][i : i + chunk], reduction="sum"))
        moments = moments + correlation_moments(
            decoder(out["features"]), upsample_to_image(tfeat[i : i + chunk], (H, W), teacher)
        )
    mse /= views["images"].numel()
    return {
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "feature_corr": correlation_from_moments(moments, len(views["images"]) * H * W),
    }


def is_fitted(workdir: Path) -> bool:
    """Whether ``workdir`` holds a finished fit."""
    return (Path(workdir) / SCENE_FILE).is_file() and (Path(workdir) / INFO_FILE).is_file()


@dataclass
class _Scene:
    """One scene being fitted: its Gaussians and feature decoder, its views (on the device), the teacher
    and its patch features of the views, and the camera extent (3DGS's spatial scale)."""

    gaussians: SceneGaussians
    decoder: nn.Module
    views: Dict[str, Tensor]
    teacher: nn.Module
    tfeat: Tensor
    extent: float = 0.0

    def evaluate(self) -> Dict[str, float]:
        return evaluate_fit(self.gaussians, self.decoder, self.views, self.tfeat, self.teacher)


def _new_scene(views, teacher: nn.Module, stage1: Mapping[str, Any], seed: int, device, resize: str) -> _Scene:
    """The seeded start of a fit: the views on ``device``, the teacher's features of them, Gaussians
    initialised from depth (a random subset of ``init_points``) and a new 3x3 feature decoder."""
    views = {k: v.to(device) for k, v in views.items()}
    seed_everything(seed)
    tfeat = teacher_features(teacher.to(device).eval(), views["images"], resize=resize)
    D = int(stage1["feature_dim"])
    pts, cols = _init_points(views, int(stage1["init_points"]), torch.Generator().manual_seed(seed))
    g = SceneGaussians.from_points(pts, cols, D, float(stage1["init_opacity"]))
    decoder = nn.Conv2d(D, tfeat.shape[1], 3, padding=1, bias=False).to(device)
    return _Scene(g, decoder, views, teacher, tfeat)


def _optimiser(scene: _Scene, lr: Mapping[str, Any], iters: int):
    """``(Adam, lr schedule)``: 3DGS's per-group learning rates (eps 1e-15), the means' scaled by the
    camera extent and decayed exponentially to ``lr.means_final`` over the ``iters`` iterations."""
    g = scene.gaussians
    groups = [
        ("means", [g.means], float(lr["means"]) * scene.extent),
        ("log_scales", [g.log_scales], float(lr["scales"])),
        ("quats", [g.quats], float(lr["quats"])),
        ("opacity_logits", [g.opacity_logits], float(lr["opacities"])),
        ("colors_dc", [g.colors_dc], float(lr["colors"])),
        ("features", [g.features], float(lr["features"])),
        ("decoder", list(scene.decoder.parameters()), float(lr["decoder"])),
    ]
    opt = torch.optim.Adam([{"params": p, "lr": r, "name": n} for n, p, r in groups], lr=0.0, eps=1e-15)
    decay = float(lr["means_final"]) / float(lr["means"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda s: decay ** min(s / max(iters, 1), 1.0)] + [lambda s: 1.0] * (len(groups) - 1)
    )
    return opt, sched


class _Stage1Steps:
    """Stage I's :class:`bench.train.TrainLoop` callbacks on one scene: :meth:`step` (one view: RGB L1 +
    D-SSIM + decoded-feature L1) and :meth:`after` (3DGS adaptive density control, opacity resets)."""

    def __init__(self, scene: _Scene, opt: torch.optim.Optimizer, stage1: Mapping[str, Any], seed: int):
        self.scene, self.opt, self.stage1, self.seed = scene, opt, stage1, seed
        self.lam, self.fw = float(stage1["lambda_dssim"]), float(stage1["feature_weight"])
        self.dens = stage1["densify"]
        self.d_from, self.d_until = int(self.dens["from"]), int(self.dens["until"])
        self.d_every = int(self.dens["every"])
        self.reset_every = int(stage1["opacity_reset_every"])
        self.current: Dict[str, Any] = {}
        views = scene.views
        self.anon = (views["anon"].to(views["images"].device) > 0) if "anon" in views else None  # True = keep

    def step(self, step: int):
        """The loss of iteration ``step`` (0-based) and its logged parts."""
        g, views, decoder = self.scene.gaussians, self.scene.views, self.scene.decoder
        V, _, H, W = views["images"].shape
        v = _view_order(step, V, self.seed)
        if step + 1 < self.d_until:  # statistics of this step are gathered in after(step + 1)
            self.current["view"] = g.view_stats(views["w2c"][v], views["K"][v], W, H)
        out = g.render(views["w2c"][v : v + 1], views["K"][v : v + 1], W, H)
        img = views["images"][v : v + 1]
        target = upsample_to_image(self.scene.tfeat[v : v + 1], (H, W), self.scene.teacher)
        decoded = decoder(out["features"])
        if self.anon is not None:  # FiT3D train_feat_gaussian.py: anonymised pixels take the render as target
            keep = self.anon[v : v + 1, None]
            img = torch.where(keep, img, out["rgb"].detach())
            target = torch.where(keep, target, decoded.detach())
        l1 = (out["rgb"] - img).abs().mean()
        dssim = 1.0 - ssim(out["rgb"], img)
        lf = (decoded - target).abs().mean()
        loss = (1 - self.lam) * l1 + self.lam * dssim + self.fw * lf
        return loss, {
            "l1": float(l1.detach()),
            "dssim": float(dssim.detach()),
            "feat_l1": float(lf.detach()),
            "num": g.num,
        }

    def after(self, it: int) -> None:
        """After ``it`` finished iterations (3DGS's 1-based iteration): statistics, densification, resets."""
        if it >= self.d_until:
            return
        g, dens, reset_every = self.scene.gaussians, self.dens, self.reset_every
        g.add_stats(self.current.pop("view"))
        if it > self.d_from and it % self.d_every == 0:
            g.densify_and_prune(
                self.opt,
                grad_threshold=float(dens["grad_threshold"]),
                extent=self.scene.extent,
                percent_dense=float(dens["percent_dense"]),
                min_opacity=float(dens["min_opacity"]),
                max_screen_size=float(dens["max_screen_size"]) if reset_every and it > reset_every else None,
                world_size=float(dens["world_size"]),
                max_gaussians=dens["max_gaussians"],
            )
        if reset_every and it % reset_every == 0:
            g.reset_opacity(float(self.stage1["reset_opacity_to"]), self.opt)


def _fit_info(scene: _Scene, history, steps: int, done: int, seconds, d_every: int) -> Dict[str, Any]:
    """``info.json`` of a fit after ``steps`` iterations, ``done`` of them in this call; ``seconds`` is
    ``(set-up, loop)``."""
    V, _, H, W = scene.views["images"].shape
    return {
        "iterations": steps,
        "num_gaussians": scene.gaussians.num,
        "extent": scene.extent,
        "views": V,
        "size": [H, W],
        "teacher_dim": int(scene.tfeat.shape[1]),
        "setup_s": seconds[0],
        "loop_s": seconds[1],
        "s_per_iteration": seconds[1] / done if done else None,
        "final_loss": history[-1]["loss"] if history else None,
        # Gaussian count over the run (before each densification step's update)
        "num_gaussians_curve": [
            [h["step"], int(h["num"])] for h in history if h["step"] == 1 or h["step"] % max(d_every, 1) == 0
        ],
    }


def _final_evaluation(scene: _Scene, info: Dict[str, Any], init_file: Path, name: str) -> None:
    """``info["init"]`` (the metrics before training, when measured) and ``info["final"]``, logged."""
    if init_file.exists():
        info["init"] = json.loads(init_file.read_text())
    info["final"] = scene.evaluate()
    log.info(
        "fit3d stage I %s: %d Gaussians, PSNR %.2f dB (init %.2f), feature corr %.3f (init %.3f)",
        name,
        scene.gaussians.num,
        info["final"]["psnr"],
        info.get("init", {}).get("psnr", float("nan")),
        info["final"]["feature_corr"],
        info.get("init", {}).get("feature_corr", float("nan")),
    )


def fit_scene(
    views: Mapping[str, Tensor],
    teacher: nn.Module,
    stage1: Mapping[str, Any],
    workdir: Path,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after: Optional[int] = None,
    resize: str = "backbone",
) -> SceneFit:
    """Fit (or resume, or reuse) one scene's feature Gaussians in ``workdir``; see the module docstring.

    ``views``: the scene sample (all views; needs ``depth``). ``stop_after``: end this call after that
    many iterations (a checkpoint is written; the next call resumes) -- then the returned fit is the
    partial one and nothing is cached as finished. ``resize``: the teacher's input rule (:func:`floor_resize`).
    """
    workdir = Path(workdir)
    if is_fitted(workdir):
        return SceneFit.load(workdir, device)
    t_start = time.perf_counter()
    scene = _new_scene(views, teacher, stage1, seed, torch.device(device), resize)
    t_setup = time.perf_counter() - t_start
    scene.extent = camera_extent(scene.views["w2c"].cpu())
    iters = int(stage1["iterations"])
    opt, sched = _optimiser(scene, stage1["lr"], iters)
    loop = TrainLoop(
        workdir / "ckpt",
        iters,
        opt,
        {"gaussians": scene.gaussians, "decoder": scene.decoder},
        scheduler=sched,
        ckpt_every=int(stage1["ckpt_every"]),
        keep_last=2,
        progress=progress,
        desc=f"fit3d stage I {workdir.name[:24]}",
        log_every=10,
        distributed=False,
    )  # one scene per rank: a loop of its own
    init_file = workdir / "init_metrics.json"
    if bool(stage1["eval"]) and not init_file.exists() and not loop.checkpointer.steps():
        write_json(init_file, {**scene.evaluate(), "num_gaussians": scene.gaussians.num})
    steps = _Stage1Steps(scene, opt, stage1, seed)
    t0 = time.perf_counter()
    start = (loop.checkpointer.steps() or [0])[-1]
    history = loop.run(steps.step, steps.after, stop_after=stop_after)
    t_loop = time.perf_counter() - t0
    info = _fit_info(scene, history, loop.step, loop.step - start, (t_setup, t_loop), steps.d_every)
    fit = SceneFit(scene.gaussians.requires_grad_(False), scene.decoder.requires_grad_(False), info)
    if loop.step < iters:  # interrupted on purpose: not a finished fit
        return fit
    if bool(stage1["eval"]):
        _final_evaluation(scene, info, init_file, workdir.name)
    fit.save(workdir)
    fit.path = workdir
    return fit
