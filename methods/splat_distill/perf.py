"""``python -m bench perf train``: Splat-and-Distill training speed at demo scale.

Runs the real training loop (:class:`bench.train.TrainLoop`, checkpointing aside) for each variant
side by side in one process and prints steps/s, the ratio to the first variant, and a per-stage
breakdown of the first variant (teacher forward, masks, upsampling, reconstruction, splatting,
blending + downscale, student forward + loss, and the rest = backward + optimiser + EMA).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import List

import torch

from bench.registry import PERF

#: the demo scale (CPU): synthetic scenes, EfficientNet-Lite0, small head, short schedule
DEMO_OVERRIDES = [
    "method.data.dataset=synthetic", "method.data.root=null", "method.data.scenes=4", "method.data.views=16",
    "method.data.size=[96,128]", "method.views.gap=4", "method.optim.batch_size=1", "method.optim.lr=1e-4",
    "method.head.prototypes=1024", "method.head.hidden_dim=512", "method.teacher.every=1",
    "method.teacher.momentum=0.99",
]
VARIANTS = {  # name -> overrides on top of the demo configuration
    "demo": [],
    "splat_features": ["method.lift.render_basis=features"],     # no patch-basis splatting
    "bilinear": ["method.lift.upsample=bilinear"],               # ablation: plain bilinear upsampling
    "full_ft": ["method.adapter.mode=full"],                     # full fine-tuning instead of LoRA
    "learned_recon": ["method.reconstructor.name=learned"],      # needs pretrain-reconstructor first
    # MVSplat's encoder (pass method.reconstructor.checkpoint=/path/to/re10k.ckpt); room-scale depth range
    "mvsplat": ["method.reconstructor.name=mvsplat", "method.reconstructor.near=0.5", "method.reconstructor.far=20"],
}
DEFAULT_VARIANTS = ["demo", "splat_features", "bilinear", "full_ft"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help="configurations timed side by side (the first is the reference)")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides applied to every variant")


def _measure(overrides: List[str], steps: int, warmup: int):
    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.runner import resolve_device
    from bench.seed import seed_everything

    from .method import build_training

    cfg = compose(["method=splat_distill", "device=cpu", *overrides,
                   f"method.optim.steps={warmup + steps}", f"method.ckpt_every={10 ** 9}", "method.progress=false"])
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg)
    backbone = build_backbone(cfg.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        distiller, *_, loop, step_fn = build_training(backbone, cfg, Path(tmp), device)

        def after(step: int) -> None:
            distiller.update_teacher(step)
            if step == warmup:
                distiller.timings.clear()

        distiller.profile = True
        t0 = time.perf_counter()
        hist = loop.run(step_fn, after_step=after)
        wall = time.perf_counter() - t0
    times = [h["time_s"] for h in hist[warmup:]]
    return {"step_s": statistics.median(times), "mean_s": sum(times) / len(times), "wall": wall,
            "stages": {k: v / steps for k, v in distiller.timings.items()}, "loss": [h["loss"] for h in hist],
            "grid": tuple(backbone.grid_size(*cfg.method.data.size)), "C": backbone.embed_dim,
            "device": device}


@PERF.register("train", "Splat-and-Distill training steps/s at demo scale (synthetic scenes; CPU unless device=cuda)")
def train_perf(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.splat import tune_allocator

    torch.set_num_threads(args.threads)
    tune_allocator()
    base = [f"backbone={args.backbone}", *DEMO_OVERRIDES, *args.overrides]
    results = {}
    for name in args.variants:
        results[name] = _measure(base + VARIANTS[name], args.steps, args.warmup)
    ref = results[args.variants[0]]
    rows = [[name, f"{r['step_s'] * 1e3:.0f}", f"{1.0 / r['step_s']:.2f}", f"{ref['step_s'] / r['step_s']:.2f}x",
             f"{100 * r['stages'].get('reconstruct', 0.0) / r['mean_s']:.0f}%"]
            for name, r in results.items()]
    print(f"backbone {args.backbone} (C={ref['C']}, grid {ref['grid']}), device {ref['device']}, "
          f"{args.threads} threads, "
          f"median of {args.steps} steps after {args.warmup} warm-up; overrides: {' '.join(base)}")
    print(tabulate(rows, headers=["variant", "ms/step", "steps/s", f"speed vs '{args.variants[0]}'",
                                  "reconstructor share"]))
    parts = dict(ref["stages"])
    parts["backward + optimiser + EMA + data"] = max(ref["mean_s"] - sum(parts.values()), 0.0)
    print(f"\nstages of '{args.variants[0]}' (mean per step):")
    print(tabulate([[k, f"{v * 1e3:.0f}", f"{100 * v / ref['mean_s']:.0f}%"] for k, v in parts.items()],
                   headers=["stage", "ms", "share"]))
    return 0


train_perf.add_arguments = add_arguments
