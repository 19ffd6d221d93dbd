"""``python -m bench perf lift``: 3D-consistent target features for every view of one scene, by FiT3D's
per-scene optimisation (stage I) versus Splat-and-Distill's feed-forward lifting.

Both pipelines start from the same synthetic scene (``--views`` views at ``--size``), the same teacher
(``--backbone``, random weights: the cost does not depend on the weights) and end with teacher-width
features rendered in every view of the scene:

* **FiT3D**: teacher features of all views, Gaussians initialised from depth (``--init-points``),
  ``--iters`` stage-I iterations (RGB + feature loss, paper learning rates; the paper's densification
  starts at iteration 500, so over a short run the Gaussian count stays at the init count), then every
  view's features rendered and decoded. Reported measured, and extrapolated to the paper's
  ``--paper-iters`` (30k) iterations as ``setup + iterations x (measured s/iteration) + render``. The
  extrapolation is a lower bound: in the paper the count grows by densification and each iteration
  gets more expensive.
* **SnD**: for each view as the target, two context views ``--gap`` frames apart around it: teacher
  features of the context views, mask-aware upsampling (instance masks), reconstruction (``depth``
  unprojection, or the ``learned`` two-view cost-volume network from ``--learned-checkpoint`` when that
  file exists, else with random weights: the network's cost is the same, but the splatting cost
  depends on the predicted geometry, so random weights only roughly stand for trained ones), lifting (feature per pixel Gaussian), splatting into the target camera, semantic
  blending and downscaling to the patch grid -- exactly the target path of a training step
  (``methods/splat_distill``), once per view. The teacher runs per example as in training (no sharing
  across targets), which overstates SnD's cost.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.registry import PERF


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _scene(args):
    from bench.data.scenes import MultiViewScenes
    from bench.data.synthetic import ensure_synthetic

    H, W = args.size
    root = Path(args.data_dir) / f"synthetic_lift_s{args.seed}_1x{args.views}_{H}x{W}"
    ensure_synthetic(root, scenes=1, views=args.views, size=(H, W), seed=args.seed)
    data = MultiViewScenes(root, None, (H, W))
    scene = data.scene_ids[0]
    return scene, data.load_views(scene, range(data.num_views(scene)))


def _teacher(name: str, device):
    from bench.backbones import build_backbone
    from bench.config import compose

    torch.manual_seed(0)
    cfg = compose([f"backbone={name}", "backbone.weights=none"])
    return build_backbone(cfg.backbone).to(device).eval().requires_grad_(False)


def time_fit3d(views, teacher, args, device) -> dict:
    """Stage I for ``args.iters`` iterations, then decoded features of every view."""
    from omegaconf import OmegaConf

    from bench.config import compose

    from .stage1 import fit_scene

    stage1 = compose(["method=fit3d"]).method.stage1
    stage1 = OmegaConf.merge(
        stage1, {"iterations": args.iters, "init_points": args.init_points, "eval": False, "ckpt_every": 10**9}
    )
    V, _, H, W = views["images"].shape
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t0 = time.perf_counter()
        fit = fit_scene(views, teacher, stage1, Path(tmp) / "scene", seed=args.seed, device=device, progress=False)
        _sync(device)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        w2c, K = views["w2c"].to(device), views["K"].to(device)
        for i in range(V):
            fit.render_targets(w2c[i : i + 1], K[i : i + 1], W, H)
        _sync(device)
        t_render = time.perf_counter() - t0
    info = fit.info
    per_iter = info["loop_s"] / max(info["iterations"], 1)
    setup = t_fit - info["loop_s"]
    return {
        "measured": t_fit + t_render,
        "setup": setup,
        "per_iter": per_iter,
        "render": t_render,
        "paper": setup + per_iter * args.paper_iters + t_render,
        "gaussians": info["num_gaussians"],
    }


def time_snd(views, teacher, args, device, reconstructor: str) -> dict:
    """Splat-and-Distill's target path for every view of the scene as the target."""
    from bench.splat import rasterize
    from methods.splat_distill.features import grid_scale, segment_blend, to_patch_grid, upsample
    from methods.splat_distill.reconstruct import CostVolumeReconstructor, DepthUnprojection

    if reconstructor == "depth":
        recon = DepthUnprojection(1.0)
    elif Path(args.learned_checkpoint).is_file():
        recon = CostVolumeReconstructor.load(args.learned_checkpoint)
    else:
        recon = CostVolumeReconstructor()
    recon = recon.to(device).eval()
    views = {k: v.to(device) for k, v in views.items()}
    V, _, H, W = views["images"].shape
    grid, scale = teacher.grid_size(H, W), grid_scale(teacher, (H, W))
    padded = getattr(teacher, "resize_mode", "resize") == "pad"
    masks = views["instance"]

    @torch.no_grad()
    def target(t: int):
        c0 = max(0, min(t - args.gap // 2, V - 1 - args.gap))
        ctx = [c0, min(c0 + args.gap, V - 1)]
        feats = teacher(views["images"][ctx])
        up = upsample(feats, masks[ctx], (H, W), "mask_aware", scale)
        gs = recon({k: v[ctx] for k, v in views.items()})
        render, alpha, _ = rasterize(*gs.splat_args(up), views["w2c"][t : t + 1], views["K"][t : t + 1], W, H)
        render = render.permute(0, 3, 1, 2)
        covered = alpha > 0.5
        render = segment_blend(render, masks[t : t + 1], 0.5, covered)
        return to_patch_grid(render, grid, teacher.patch_size, padded)

    target(0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for t in range(V):
        target(t)
    _sync(device)
    return {
        "measured": time.perf_counter() - t0,
        "note": ""
        if reconstructor == "depth"
        else ("trained" if Path(args.learned_checkpoint).is_file() else "random weights"),
    }


@PERF.register(
    "lift", "3D-consistent target features for a scene: FiT3D per-scene optimisation vs SnD feed-forward lifting"
)
def lift_perf(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.splat import tune_allocator

    torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        tune_allocator()
    scene, views = _scene(args)
    V, _, H, W = views["images"].shape
    teacher = _teacher(args.backbone, device)
    print(
        f"scene {scene}: {V} views at {H}x{W}; teacher {args.backbone} ({teacher.embed_dim} ch, random weights); "
        f"device {device}, {torch.get_num_threads()} threads",
        flush=True,
    )

    fit = time_fit3d(views, teacher, args, device)
    rows = [
        [
            "FiT3D stage I",
            f"measured: {args.iters} iterations ({fit['gaussians']} Gaussians) + render all views",
            fit["measured"],
            fit["measured"] / V,
        ],
        [
            "FiT3D stage I",
            f"extrapolated: {args.paper_iters} iterations (paper) at "
            f"{fit['per_iter']:.3f} s/iteration + render all views",
            fit["paper"],
            fit["paper"] / V,
        ],
    ]
    snd = {}
    for rec in args.reconstructors:
        snd[rec] = time_snd(views, teacher, args, device, rec)
        note = f", {snd[rec]['note']}" if snd[rec]["note"] else ""
        rows.append(
            [
                f"SnD feed-forward ({rec}{note})",
                "per target view: teacher x2, upsample, reconstruct, lift, splat, blend, downscale",
                snd[rec]["measured"],
                snd[rec]["measured"] / V,
            ]
        )
    ref = snd[args.reconstructors[0]]["measured"]
    table = [[a, b, f"{t:.1f}", f"{pv:.2f}", f"{t / ref:.1f}x"] for a, b, t, pv in rows]
    print(f"stage I setup (teacher features + init) {fit['setup']:.2f} s, rendering all views {fit['render']:.2f} s")
    print(
        tabulate(table, headers=["pipeline", "what", "s per scene", "s per view", f"vs SnD ({args.reconstructors[0]})"])
    )
    for rec, r in snd.items():
        ratio = fit["paper"] / r["measured"]
        print(
            f"FiT3D ({args.paper_iters} it.) / SnD ({rec}): {ratio:.0f}x per scene -- target >= 100x: "
            f"{'met' if ratio >= 100 else 'NOT met'}; at the measured {args.iters} iterations: "
            f"{fit['measured'] / r['measured']:.1f}x"
        )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"), help="image size")
    parser.add_argument("--views", type=int, default=12, help="views of the scene (all are targets)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic scene seed")
    parser.add_argument("--backbone", default="dinov2_vits14", help="teacher (random weights)")
    parser.add_argument("--iters", type=int, default=50, help="stage-I iterations actually run")
    parser.add_argument("--paper-iters", type=int, default=30_000, help="stage-I iterations extrapolated to")
    parser.add_argument("--init-points", type=int, default=20_000, help="initial Gaussians of stage I")
    parser.add_argument("--gap", type=int, default=4, help="SnD context-view gap (frames)")
    parser.add_argument("--reconstructors", nargs="+", default=["depth", "learned"], choices=["depth", "learned"])
    parser.add_argument(
        "--learned-checkpoint",
        default=".cache/bench/reconstructors/cost_volume.safetensors",
        help="pretrained cost-volume reconstructor (random weights if the file is missing)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--data-dir", default="data", help="where the synthetic scene is generated")


lift_perf.add_arguments = add_arguments
