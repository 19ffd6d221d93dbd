"""``python -m bench perf train``: Splat-and-Distill training speed at demo scale.

Runs the real training loop (:class:`bench.train.TrainLoop`, checkpointing aside) for each variant
side by side in one process and prints steps/s, the ratio to the first variant, and a per-stage
breakdown of the first variant (teacher forward, masks, upsampling, reconstruction, splatting,
blending + downscale, student forward + loss, the wait for the data loader, and the rest = backward +
optimiser + EMA).

``--ranks 1 2 --precision 32 bf16-mixed`` adds a table of the 'demo' variant for every (precision,
ranks) pair: ms/step, steps/s, images/s (3 views per example x global batch), the scaling efficiency
``images/s(N) / (N images/s(1))`` at a fixed per-rank batch, the share of the step spent waiting for
data, and peak memory. Several ranks are ``torch.multiprocessing`` processes joined by
:mod:`bench.distributed` (gloo on CPU); ``--variants`` with no names prints only that table.
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

from .official import CPU_DEVIATIONS

#: the demo scale (CPU): synthetic scenes, EfficientNet-Lite0, small head, short schedule
DEMO_OVERRIDES = [
    *CPU_DEVIATIONS,
    "method.data.dataset=synthetic",
    "method.data.root=null",
    "method.data.scenes=4",
    "method.data.views=16",
    "method.data.size=[96,128]",
    "method.views.gap=4",
    "method.optim.batch_size=1",
    "method.optim.lr=1e-4",
    "method.head.prototypes=1024",
    "method.head.hidden_dim=512",
    "method.teacher.every=1",
    "method.teacher.momentum=0.99",
]
VARIANTS = {  # name -> overrides on top of the demo configuration
    "demo": [],
    "splat_features": ["method.lift.render_basis=features"],  # no patch-basis splatting
    "bilinear": ["method.lift.upsample=bilinear"],  # ablation: plain bilinear upsampling
    "full_ft": ["method.adapter.mode=full"],  # full fine-tuning instead of LoRA
    "learned_recon": [  # needs pretrain-reconstructor first (it writes this file)
        "method.reconstructor.name=learned",
        "method.reconstructor.checkpoint=${paths.cache_dir}/reconstructors/cost_volume.safetensors",
    ],
    # MVSplat's encoder (pass method.reconstructor.checkpoint=/path/to/re10k.ckpt); room-scale depth range
    "mvsplat": ["method.reconstructor.name=mvsplat", "method.reconstructor.near=0.5", "method.reconstructor.far=20"],
}
DEFAULT_VARIANTS = ["demo", "splat_features", "bilinear", "full_ft"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--variants",
        nargs="*",
        default=DEFAULT_VARIANTS,
        choices=list(VARIANTS),
        help="configurations timed side by side (the first is the reference)",
    )
    p.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=[1],
        help="data-parallel ranks to compare (e.g. 1 2): the 'demo' variant at a fixed per-rank batch, "
        "started as torch.distributed processes (gloo on CPU, NCCL on GPUs)",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        default=["32"],
        choices=["32", "tf32", "bf16-mixed"],
        help="precisions to compare on the 'demo' variant (32 = full float32 matmuls; tf32 = float32 with TF32 "
        "matmuls on CUDA, the official trainer's setting; bf16-mixed = autocast of the backbones, TF32 elsewhere)",
    )
    p.add_argument("--workers", default="1", help="loader worker processes (loader.workers: an int or auto)")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides applied to every variant")


def _measure(overrides: List[str], steps: int, warmup: int):
    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.distributed import resolve_device
    from bench.seed import seed_everything

    from bench.train import memory_mb, reset_peak_memory

    from .method import build_training

    prec = next((o.split("=", 1)[1] for o in overrides if o.startswith("precision=")), "32")
    if prec == "tf32":  # precision 32 with TF32 matmuls (the official trainer's setting on CUDA)
        overrides = [o for o in overrides if not o.startswith("precision=")] + ["precision=32"]
    torch.set_float32_matmul_precision("highest" if prec in ("32", "32-true") else "high")
    cfg = compose(
        [
            "method=splat_distill",
            "device=cpu",
            "method.log_every=1000000",
            *overrides,
            f"method.optim.steps={warmup + steps}",
            f"method.ckpt_every={10**9}",
            "method.progress=false",
        ]
    )
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg)
    reset_peak_memory(device)  # this measurement's peak, not an earlier variant's or the parent process's
    backbone = build_backbone(cfg.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        distiller, *_, loop, step_fn = build_training(backbone, cfg, Path(tmp), device)

        def after(step: int) -> None:  # after warm-up: restart the stage and data-wait clocks
            distiller.update_teacher(step)
            if step == warmup:
                distiller.timings.clear()
                step_fn.loader.wait_s = 0.0

        distiller.profile = True
        t0 = time.perf_counter()
        hist = loop.run(step_fn, after_step=after)
        wall = time.perf_counter() - t0
        step_fn.loader.close()
    times = [h["time_s"] for h in hist[warmup:]]
    return {
        "step_s": statistics.median(times),
        "mean_s": sum(times) / len(times),
        "wall": wall,
        "data_wait_s": step_fn.loader.wait_s / steps,
        "images_per_step": 3 * int(cfg.method.optim.batch_size),
        "stages": {k: v / steps for k, v in distiller.timings.items()},
        "loss": [h["loss"] for h in hist],
        "grid": tuple(backbone.grid_size(*cfg.method.data.size)),
        "C": backbone.embed_dim,
        "device": device,
        "memory_mb": memory_mb(device),
    }


def _rank_worker(
    rank: int, world: int, port: int, overrides: List[str], steps: int, warmup: int, threads: int, out: str
) -> None:
    """One rank of a timed multi-rank run (``torch.multiprocessing.spawn``); rank 0 writes the timings."""
    import json
    import os

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(max(threads // world, 1)),
    )
    torch.set_num_threads(max(threads // world, 1))
    from bench import distributed as dist

    r = _measure(overrides, steps, warmup)
    if rank == 0:
        r.pop("stages")
        Path(out).write_text(json.dumps({k: v for k, v in r.items() if k != "grid"}))
    dist.shutdown()


def _measure_ranks(overrides: List[str], ranks: int, steps: int, warmup: int, threads: int):
    """:func:`_measure` as ``ranks`` data-parallel processes at a per-rank batch of ``method.optim.batch_size``."""
    import json
    import socket

    import torch.multiprocessing as mp

    from bench.config import compose

    per_rank = int(compose(["method=splat_distill", *overrides]).method.optim.batch_size)
    overrides = [*overrides, f"method.optim.batch_size={per_rank * ranks}"]
    if ranks == 1:
        return _measure(overrides, steps, warmup)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        mp.spawn(_rank_worker, args=(ranks, port, overrides, steps, warmup, threads, str(out)), nprocs=ranks, join=True)
        return json.loads(out.read_text())


def _scaling_table(args, base: List[str]) -> None:
    """steps/s and images/s of 'demo' for every (ranks, precision), side by side."""
    from tabulate import tabulate

    rows, ref = [], None
    for precision in args.precision:
        for n in args.ranks:
            r = _measure_ranks([*base, f"precision={precision}"], n, args.steps, args.warmup, args.threads)
            ips = r["images_per_step"] / r["step_s"]
            ref = ref or (ips, r["step_s"])
            one = next((x for x in rows if x[0] == precision and x[1] == 1), None)
            eff = f"{ips / (n * one[-1]):.2f}" if one is not None and n > 1 else "-"
            rows.append(
                [
                    precision,
                    n,
                    f"{r['step_s'] * 1e3:.0f}",
                    f"{1.0 / r['step_s']:.2f}",
                    f"{ips:.1f}",
                    f"{ref[1] / r['step_s']:.2f}x",
                    eff,
                    f"{100 * r['data_wait_s'] / r['mean_s']:.1f}%",
                    f"{r.get('memory_mb', 0):.0f}",
                    ips,
                ]
            )
    print(f"\n'demo' at {args.threads} threads, per-rank batch fixed, {args.workers} loader worker(s):")
    print(
        tabulate(
            [x[:-1] for x in rows],
            headers=[
                "precision",
                "ranks",
                "ms/step",
                "steps/s",
                "images/s",
                "steps/s vs first",
                "scaling eff.",
                "data wait",
                "peak MiB",
            ],
        )
    )


@PERF.register("train", "Splat-and-Distill training steps/s at demo scale (synthetic scenes; CPU unless device=cuda)")
def train_perf(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.splat import tune_allocator

    torch.set_num_threads(args.threads)
    tune_allocator()
    base = [f"backbone={args.backbone}", *DEMO_OVERRIDES, f"loader.workers={args.workers}", *args.overrides]
    if args.ranks != [1] or args.precision != ["32"]:
        _scaling_table(args, base)
        if not args.variants:
            return 0
    results = {}
    for name in args.variants:
        results[name] = _measure(base + VARIANTS[name], args.steps, args.warmup)
    ref = results[args.variants[0]]
    rows = [
        [
            name,
            f"{r['step_s'] * 1e3:.0f}",
            f"{1.0 / r['step_s']:.2f}",
            f"{ref['step_s'] / r['step_s']:.2f}x",
            f"{100 * r['stages'].get('reconstruct', 0.0) / r['mean_s']:.0f}%",
        ]
        for name, r in results.items()
    ]
    print(
        f"backbone {args.backbone} (C={ref['C']}, grid {ref['grid']}), device {ref['device']}, "
        f"{args.threads} threads, "
        f"median of {args.steps} steps after {args.warmup} warm-up; overrides: {' '.join(base)}"
    )
    print(
        tabulate(
            rows, headers=["variant", "ms/step", "steps/s", f"speed vs '{args.variants[0]}'", "reconstructor share"]
        )
    )
    parts = dict(ref["stages"])
    parts["waiting for data (loader)"] = ref["data_wait_s"]
    parts["backward + optimiser + EMA"] = max(ref["mean_s"] - sum(parts.values()), 0.0)
    print(f"\nstages of '{args.variants[0]}' (mean per step):")
    print(
        tabulate(
            [[k, f"{v * 1e3:.0f}", f"{100 * v / ref['mean_s']:.0f}%"] for k, v in parts.items()],
            headers=["stage", "ms", "share"],
        )
    )
    return 0


train_perf.add_arguments = add_arguments


# ------------------------------------------------------------------------------ feature render rules
def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--examples", type=int, default=16, help="training examples compared (the run's first draws)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="hydra overrides (default: the demo scenes, depth reconstructor)")


def compare_renders(overrides: List[str], examples: int) -> dict:
    """Splatted targets of the same examples with ``lift.feature_covariance=official`` (variances as scales)
    and ``true_covariance``: coverage of both rules and the cosine between the two targets.

    The teacher runs without dropout so that the two renders see the same teacher features."""
    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.data.multiview import open_scenes
    from bench.seed import seed_everything

    from .distill import Distiller
    from .views import ViewSampler

    cfg = compose(["method=splat_distill", "device=cpu", *DEMO_OVERRIDES, *overrides])
    seed_everything(int(cfg.seed))
    m = cfg.method
    data = open_scenes(m.data, cfg.paths.data_dir)
    sampler = ViewSampler([data.num_views(s) for s in data.scene_ids], m.views.gap, str(m.views.target), int(cfg.seed))
    d = Distiller(build_backbone(cfg.backbone), m, "cpu")
    d.teacher_dropout = False
    exs = []
    for i in range(examples):
        s, idx = sampler.example(i)
        exs.append(data.load_views(data.scene_ids[s], idx))
    out: dict = {}
    for mode in ("true_covariance", "official"):
        d.feature_covariance = mode
        for rule in ("alpha", "rgb"):
            d.coverage = rule
            t, v = d.targets(exs)
            out[(mode, rule)] = (t, v)
    res = {"grid": list(out[("official", "rgb")][0].shape[-2:]), "examples": examples}
    for rule in ("alpha", "rgb"):
        (t_true, v_true), (t_off, v_off) = out[("true_covariance", rule)], out[("official", rule)]
        both = v_true & v_off
        cos = torch.nn.functional.cosine_similarity(t_true, t_off, dim=1)[both]
        res[rule] = {
            "coverage_true": float(v_true.float().mean()),
            "coverage_official": float(v_off.float().mean()),
            "cosine_mean": float(cos.mean()) if cos.numel() else float("nan"),
            "cosine_p10": float(cos.quantile(0.1)) if cos.numel() else float("nan"),
            "norm_ratio": float((t_off.norm(dim=1)[both] / t_true.norm(dim=1)[both].clamp_min(1e-12)).median()),
        }
    return res


@PERF.register(
    "snd-render",
    "Splat-and-Distill targets: the official feature render (variances as scales) vs the true covariances",
)
def render_perf(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    torch.set_num_threads(args.threads)
    r = compare_renders([f"backbone={args.backbone}", *args.overrides], args.examples)
    rows = [
        [rule, f"{x['coverage_true']:.3f}", f"{x['coverage_official']:.3f}", f"{x['cosine_mean']:.4f}",
         f"{x['cosine_p10']:.4f}", f"{x['norm_ratio']:.3f}"]
        for rule, x in ((k, r[k]) for k in ("alpha", "rgb"))
    ]  # fmt: skip
    print(f"{r['examples']} examples, student grid {r['grid'][0]}x{r['grid'][1]}:")
    print(
        tabulate(
            rows,
            headers=["coverage rule", "coverage true", "coverage official", "cos mean", "cos p10", "|official|/|true|"],
        )
    )
    return 0


render_perf.add_arguments = _render_args
