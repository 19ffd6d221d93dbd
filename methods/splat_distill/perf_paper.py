"""``python -m bench perf paper``: one Splat-and-Distill training step at the paper's scale, stage by stage.

The paper trains at 576x880 with 14 examples per GPU (DINOv2 ViT-S/14 or ViT-B/14, LoRA, 65,536 DINO
prototypes). This benchmark builds exactly that step (:func:`methods.splat_distill.method.build_training`,
the trainer's own code) on generated scenes written in the official Splat-and-Distill ScanNet++ layout
(``scenes/<id>/{transforms_train.json, images/*.JPG, instance_segmentation/<file_path>.png}``, plus
``render_depth/`` for the depth reconstructor: :func:`bench.data.scenes.export_snd_layout`), and prints:

* the time per stage of the step: loader wait, teacher forward, masks, upsampling, reconstruction,
  splatting, blending + downscale, student forward, loss (DINO heads), backward, optimiser, EMA;
* the share of host image work (decoding, resizing, masks) left on the training thread: the time it
  waits for the loader plus any SLIC computed inside the step;
* the loader's examples/s per worker (CPU seconds the workers spent per example) and, from the GPU
  compute estimate (analytic FLOPs of the step at ``--gpu-tflops`` effective throughput), the workers
  one GPU step would need to never wait;
* peak memory of the step (CUDA allocator peak, or the process's peak resident set on CPU, reset
  before the step) above the memory held before it, per example.

The backbone weights are random (``backbone.weights=none``: no download; the cost does not depend on
them). On CPU use a small batch (slow is fine); on CUDA the splat runs on gsplat.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from bench.registry import PERF

#: the paper's training step (Splat-and-Distill: 576x880, 14 per GPU, 65,536 prototypes)
PAPER_SIZE = (576, 880)
PAPER_BATCH = 14


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="dinov2_vits14", help="dinov2_vits14 | dinov2_vitb14 (random weights)")
    p.add_argument("--size", type=int, nargs=2, default=list(PAPER_SIZE), metavar=("H", "W"))
    p.add_argument(
        "--batch", type=int, default=None, help=f"examples per step (default {PAPER_BATCH} on CUDA, 1 on CPU)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--reconstructor", default="depth", help="depth | mvsplat (pass method.reconstructor.checkpoint)")
    p.add_argument("--workers", default="auto", help="loader workers (loader.workers: an int or auto)")
    p.add_argument("--steps", type=int, default=1, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (CUDA kernels, allocator)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    p.add_argument("--scenes", type=int, default=2)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--precision", default="32", help="32 (TF32 matmuls on CUDA, as the trainer) | 32-true | bf16-mixed")
    p.add_argument("--gpu-tflops", type=float, default=200.0, help="effective GPU throughput for the estimate")
    p.add_argument("--data-dir", default=None, help="where the generated scenes are kept (default: a temp dir)")
    p.add_argument("--out", default=None, help="append the tables to this file")
    p.add_argument(
        "--tune-allocator",
        action="store_true",
        help="CPU: keep freed memory in the process (the trainers' faster setting; the resident set then "
        "no longer follows the live tensors, so the memory columns overstate)",
    )
    p.add_argument("overrides", nargs="*", help="extra hydra overrides")


def scenes(data_dir: Path, size, n_scenes: int, n_views: int) -> Path:
    """Generated scenes in the official layout under ``data_dir`` (made once, then reused)."""
    from bench.data.scenes import export_snd_layout
    from bench.data.synthetic import ensure_synthetic

    H, W = size
    root = data_dir / f"snd_layout_{n_scenes}x{n_views}_{H}x{W}"
    if not (root / "scenes").is_dir():
        src = ensure_synthetic(
            data_dir / f"synth_{n_scenes}x{n_views}_{H}x{W}", n_scenes, n_views, size, 0, progress=False
        )
        tmp = Path(tempfile.mkdtemp(dir=data_dir))
        export_snd_layout(src, tmp)
        tmp.rename(root)
    return root


def step_flops(embed_dim: int, depth: int, grid, head) -> Dict[str, float]:
    """Analytic FLOPs of one example (2 teacher forwards, student forward + backward = 3x, DINO heads):
    a ViT block costs ``2 T (12 D^2)`` for its matmuls and ``4 T^2 D`` for attention (T tokens, D width);
    the head ``2 T (D h + h^2 + h b + b K)``, teacher forward + student forward and backward."""
    h, w = grid
    T = h * w + 1
    D = embed_dim
    vit = depth * (2 * T * 12 * D * D + 4 * T * T * D)
    hd, bd, K = int(head.hidden_dim), int(head.bottleneck_dim), int(head.prototypes)
    hfl = 2 * (T - 1) * (D * hd + hd * hd + hd * bd + bd * K)
    return {"backbones": 2 * vit + 3 * vit, "heads": hfl + 3 * hfl}


def _overrides(args: argparse.Namespace, root: Path, device: str, batch: int) -> List[str]:
    """The measured Splat-and-Distill run: random weights, the generated scenes at ``root``, no diagnostics."""
    return [
        "method=splat_distill",
        f"backbone={args.backbone}",
        "backbone.weights=none",
        f"device={device}",
        f"precision={args.precision}",
        "method.data.dataset=scannetpp",
        f"method.data.root={root}",
        "method.data.scenes=null",
        f"method.data.size=[{args.size[0]},{args.size[1]}]",
        f"method.optim.batch_size={batch}",
        f"method.optim.steps={args.warmup + args.steps}",
        f"method.reconstructor.name={args.reconstructor}",
        "method.diagnostics.enabled=false",
        "method.progress=false",
        "method.ckpt_every=1000000000",
        f"loader.workers={args.workers}",
        *args.overrides,
    ]


def _one_step(distiller, loader, loop, step: int, sync) -> Tuple[Dict[str, float], List[float]]:
    """One training step as the trainer runs it: ``({"loader wait": s}, [t0, after loss, after backward,
    after the optimiser, after EMA])`` (``perf_counter`` times, synchronised)."""
    t = {}
    t0 = time.perf_counter()
    examples = loader.get(step)
    t["loader wait"] = time.perf_counter() - t0
    loop.optimizer.zero_grad(set_to_none=True)
    loss, _ = distiller.loss(examples, distiller.accumulate)
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    loop.optimizer.step()
    loop.scheduler.step()
    sync()
    t3 = time.perf_counter()
    distiller.update_teacher(step + 1)
    sync()
    return t, [t0, t1, t2, t3, time.perf_counter()]


def _time_steps(distiller, loop, loader, args: argparse.Namespace, device: str):
    """``(per-stage seconds of each timed step, peak MB, MB held before the last timed step)`` over
    ``args.warmup`` untimed then ``args.steps`` timed steps."""
    from bench.train import memory_mb, reset_peak_memory

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows: List[Dict[str, float]] = []
    peak = held = 0.0
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        if timed:
            sync()
            held = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else _rss_mb()
            reset_peak_memory(device)
            distiller.timings.clear()
            distiller.profile = True
            loader.wait_s, slic_before = 0.0, distiller.slic_on_step
        t, (t0, t1, t2, t3, t4) = _one_step(distiller, loader, loop, step, sync)
        if timed:
            t.update(distiller.timings)
            t.update({"backward": t2 - t1, "optimiser": t3 - t2, "EMA": t4 - t3, "total": t4 - t0})
            t["slic on step"] = float(distiller.slic_on_step - slic_before)
            rows.append(t)
            peak = max(peak, memory_mb(device))
        distiller.profile = False
    return rows, peak, held


def measure(args: argparse.Namespace) -> Dict[str, object]:
    """One Splat-and-Distill training step at ``args``' scale, stage by stage (module docstring)."""
    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.loader import resolve_workers
    from bench.distributed import resolve_device
    from bench.seed import seed_everything
    from bench.splat import tune_allocator

    from .method import build_training, matmul_precision

    device = resolve_device(compose([f"device={args.device}"]))
    batch = args.batch or (PAPER_BATCH if device.startswith("cuda") else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.startswith("cuda") or args.tune_allocator:
        tune_allocator()  # CPU: off by default, so that freed tensors leave the resident set (honest peaks)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        cfg = compose(_overrides(args, scenes(data_dir, tuple(args.size), args.scenes, args.views), device, batch))
        precision = matmul_precision(cfg, device)
        seed_everything(int(cfg.seed))
        backbone = build_backbone(cfg.backbone)
        distiller, _, _, loop, step_fn = build_training(backbone, cfg, Path(tmp) / "run", device)
        loader = step_fn.loader
        workers = resolve_workers(cfg.loader.workers)
        rows, peak, held = _time_steps(distiller, loop, loader, args, device)
        loader.close()
    mean = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in rows[0]}
    per_worker = loader.fetched * batch / loader.work_s if loader.work_s > 0 else float("nan")
    flops = step_flops(
        backbone.embed_dim, len(backbone.model.blocks), distiller.student_grid(*args.size), cfg.method.head
    )
    gpu_s = batch * sum(flops.values()) / (args.gpu_tflops * 1e12)
    return {
        "device": device,
        "precision": precision,
        "backbone": args.backbone,
        "size": list(args.size),
        "batch": batch,
        "workers": workers,
        "stages": mean,
        "per_worker_examples_s": per_worker,
        "flops_per_example": sum(flops.values()),
        "gpu_step_estimate_s": gpu_s,
        "peak_mb": peak,
        "held_mb": held,
        "step_mb_per_example": max(peak - held, 0.0) / batch,
    }


def _rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def report(r: Dict[str, object], gpu_tflops: float) -> str:
    from tabulate import tabulate

    st = dict(r["stages"])
    total, slic = st.pop("total"), st.pop("slic on step")
    names = {
        "loader wait": "loader wait",
        "teacher": "teacher forward",
        "masks": "masks (on the step)",
        "upsample": "upsampling",
        "reconstruct": "reconstruction",
        "splat": "splat",
        "blend": "blend + downscale",
        "student": "student forward",
        "loss": "loss (DINO heads)",
        "backward": "backward",
        "optimiser": "optimiser",
        "EMA": "EMA",
    }
    rows = [[names.get(k, k), f"{v * 1e3:.0f}", f"{100 * v / total:.1f}%"] for k, v in st.items()]
    rows.append(["total", f"{total * 1e3:.0f}", "100%"])
    host = st.get("loader wait", 0.0) + st.get("masks", 0.0)
    per_worker = float(r["per_worker_examples_s"])
    need = float(r["batch"]) / float(r["gpu_step_estimate_s"])
    lines = [
        f"perf paper: {r['backbone']} (random weights) {r['size'][0]}x{r['size'][1]}, batch {r['batch']}, "
        f"device {r['device']} ({r['precision']}), {r['workers']} loader worker(s), "
        f"torch threads {torch.get_num_threads()}",
        tabulate(rows, headers=["stage", "ms", "share"]),
        f"host image work on the training thread (loader wait + masks in the step): {100 * host / total:.2f}% "
        f"of the step; SLIC computed in the step: {slic:.0f} example(s)",
        f"loader: {per_worker:.2f} examples/s per worker (3 views each: decode, resize, masks, depth)",
        f"GPU estimate: {float(r['flops_per_example']) / 1e12:.2f} TFLOP per example -> "
        f"{float(r['gpu_step_estimate_s']):.3f} s per step of {r['batch']} at {gpu_tflops:.0f} TFLOP/s effective; "
        f"the loader must deliver {need:.1f} examples/s = {math.ceil(need / per_worker) if per_worker > 0 else '?'} "
        f"worker(s) at the rate above",
        f"peak memory: {float(r['peak_mb']):.0f} MiB ({float(r['held_mb']):.0f} MiB held before the step; "
        f"{float(r['step_mb_per_example']):.0f} MiB per example above it)",
    ]
    return "\n".join(lines)


@PERF.register("paper", "one Splat-and-Distill step at paper scale (576x880, ViT-S/B, official ScanNet++ layout)")
def paper_perf(args: argparse.Namespace) -> int:
    r = measure(args)
    text = report(r, args.gpu_tflops)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    return 0


paper_perf.add_arguments = add_arguments
