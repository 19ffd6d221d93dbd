"""``python -m bench perf splat``: CPU tiled engine vs dense all-pairs reference (and gsplat on a GPU).

Cases: 1 or 4 source views of 37x37 pixel-aligned Gaussians (unprojected from the exact depth of a
ground plane seen from cameras around it; std = depth / focal, opacity 0.99, random features) splatted
into 1 or 4 nearby target cameras at 37x37 or 74x74 (same field of view), with D in {64, 384}. Each (case, engine) runs in a fresh
subprocess: time = median forward+backward wall time (and process CPU time, steadier on a shared
machine) over ``--reps`` runs after one warm-up (gradients of a random linear function of features,
alpha and depth w.r.t. all Gaussian parameters); memory = peak resident set size of that subprocess
(``ru_maxrss``) minus its RSS just before the warm-up. Workers run with ``OMP_WAIT_POLICY=PASSIVE``:
on oversubscribed cores libgomp's default spin-waiting made the many mid-sized ops of the tiled
engine up to 10x slower (``--omp-default`` to keep it). The dense reference needs ~130 bytes per
Gaussian x pixel pair; it is skipped when that exceeds ``--max-dense-pairs`` or the memory available.
With CUDA, each case at D=384 also times one gsplat call against 128 three-channel gsplat passes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from ..registry import PERF
from .lift import pixel_aligned_gaussians


def _plane_views(n: int, size: int, radius: float = 3.0, elev_deg: float = 60.0, spread_deg: float = 12.0):
    """n cameras looking at the origin of the ground plane z=0, fov ~50 deg, and their exact depth."""
    from ..cameras import look_at

    f = 0.5 * size / math.tan(math.radians(25))
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    az = [math.radians(spread_deg * (i - (n - 1) / 2)) for i in range(n)]
    el = math.radians(elev_deg)
    eye = torch.tensor(
        [[radius * math.cos(el) * math.cos(a), radius * math.cos(el) * math.sin(a), radius * math.sin(el)] for a in az]
    )
    w2c = look_at(eye, torch.zeros_like(eye))
    v, u = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    rays = torch.stack([(u - K[0, 2]) / f, (v - K[1, 2]) / f, torch.ones_like(u)], -1)  # camera frame
    R = w2c[:, :3, :3]
    dirs_w = torch.einsum("cji,hwj->chwi", R, rays)  # R^T d
    t = -eye[:, None, None, 2] / dirs_w[..., 2]  # ray parameter to z=0; depth = t since d_z = 1
    depth = torch.where(t > 0, t, torch.zeros_like(t))
    return K.expand(n, 3, 3).clone(), w2c, depth


def make_case(n_src: int, n_cam: int, size: int, D: int, seed: int = 0):
    """Gaussians from ``n_src`` 37x37 views and ``n_cam`` target cameras of ``size`` pixels."""
    g = torch.Generator().manual_seed(seed)
    Ks, w2cs, depths = _plane_views(n_src, 37, spread_deg=12.0)
    parts = [
        pixel_aligned_gaussians(depths[i], Ks[i], w2cs[i], torch.randn(37, 37, D, generator=g)) for i in range(n_src)
    ]
    scene = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
    Kt, w2ct, _ = _plane_views(n_cam, size, spread_deg=9.0)
    return scene, w2ct, Kt


def _loss_weights(C: int, size: int, D: int, dev: str = "cpu"):
    """Fixed random weights: the loss is a random linear function of features, alpha and depth."""
    g = torch.Generator(device=dev).manual_seed(1)
    return [
        torch.randn(shape, generator=g, device=dev) for shape in ((C, size, size, D), (C, size, size), (C, size, size))
    ]


def _fwd_bwd(engine: str, scene, w2c, K, size: int, weights) -> None:
    from . import rasterize

    p = {k: v.requires_grad_(True) for k, v in scene.items()}
    out = rasterize(
        p["means"], p["quats"], p["scales"], p["opacities"], p["features"], w2c, K, size, size, backend=engine
    )
    sum((o * w).sum() for o, w in zip(out, weights)).backward()


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(spec: dict) -> dict:
    """Runs in a fresh process: time and peak memory of one (case, engine)."""
    torch.set_num_threads(spec["threads"])
    if spec["tune_alloc"]:
        from .alloc import tune_allocator

        tune_allocator()
    scene, w2c, K = make_case(spec["src"], spec["cams"], spec["size"], spec["D"])
    weights = _loss_weights(spec["cams"], spec["size"], spec["D"])
    base = _rss_mb()
    wall, cpu = [], []
    for _ in range(spec["reps"] + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        _fwd_bwd(spec["engine"], {k: v.detach() for k, v in scene.items()}, w2c, K, spec["size"], weights)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"time": statistics.median(wall[1:]), "cpu": statistics.median(cpu[1:]), "mem": peak - base}


DENSE_BYTES_PER_PAIR = 130  # measured peak of the dense reference's forward+backward


def _available_gb() -> float:
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return int(info["MemAvailable"].split()[0]) / 2**20


def _run_sub(spec: dict, omp_passive: bool = True) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if omp_passive else None
    out = subprocess.run(
        [sys.executable, "-m", "bench.splat.perf", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gpu_table(cases, reps: int) -> None:
    from tabulate import tabulate

    from . import rasterize_gsplat

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rows = []
    for src, cams, size in cases:
        scene, w2c, K = make_case(src, cams, size, 384)
        p = {k: v.cuda().requires_grad_(True) for k, v in scene.items()}
        w2c, K = w2c.cuda(), K.cuda()
        args = (p["means"], p["quats"], p["scales"], p["opacities"])

        def one():
            f, a, d = rasterize_gsplat(*args, p["features"], w2c, K, size, size)
            (f.sum() + a.sum() + d.sum()).backward()

        def passes():  # the official approach: 3 channels per call
            out = [rasterize_gsplat(*args, p["features"][:, i : i + 3], w2c, K, size, size) for i in range(0, 384, 3)]
            (sum(o[0].sum() for o in out) + out[0][1].sum() + out[0][2].sum()).backward()

        t1, t128 = timed(one), timed(passes)
        rows.append([f"{src}->{cams}", f"{size}x{size}", f"{t1 * 1e3:.2f}", f"{t128 * 1e3:.2f}", f"{t128 / t1:.1f}x"])
    print(tabulate(rows, headers=["views->cams", "size", "gsplat D=384 ms", "128 x 3ch ms", "speed-up"]))


@PERF.register("splat", "feature splatting: tiled CPU engine vs dense reference (+ gsplat on CUDA)")
def splat_perf(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    cases = list(itertools.product(args.src, args.cams, args.sizes, args.dims))
    rows = []
    fmt = lambda r: (
        [f"{r['time'] * 1e3:.0f}", f"{r['cpu'] * 1e3:.0f}", f"{r['mem']:.0f}"]
        if "time" in r
        else [r["error"], "-", "-"]
    )
    for src, cams, size, D in cases:
        spec = dict(
            src=src, cams=cams, size=size, D=D, reps=args.reps, threads=args.threads, tune_alloc=not args.no_tune_alloc
        )
        eng = _run_sub({**spec, "engine": "torch"}, args.omp_passive)
        pairs = src * 37 * 37 * cams * size * size
        need_gb, avail_gb = pairs * DENSE_BYTES_PER_PAIR / 2**30, _available_gb()
        if args.no_dense or pairs > args.max_dense_pairs:
            ref = {"error": "skipped"}
        elif need_gb > avail_gb - 2:
            ref = {"error": f"skipped: needs ~{need_gb:.0f} GB, {avail_gb:.0f} GB free"}
        else:
            ref = _run_sub({**spec, "engine": "dense", "reps": min(args.reps, args.dense_reps)}, args.omp_passive)
        row = [f"{src}->{cams}", f"{size}x{size}", D] + fmt(eng) + fmt(ref)
        ok = "time" in eng and "time" in ref
        row += [f"{ref['time'] / eng['time']:.1f}x" if ok else "-", f"{ref['cpu'] / eng['cpu']:.1f}x" if ok else "-"]
        if args.compare_malloc:
            row += fmt(_run_sub({**spec, "engine": "torch", "tune_alloc": False}, args.omp_passive))
        rows.append(row)
        print(f"  done {row}", file=sys.stderr, flush=True)
    headers = [
        "views->cams",
        "size",
        "D",
        "engine ms",
        "engine cpu ms",
        "engine MB",
        "dense ms",
        "dense cpu ms",
        "dense MB",
        "dense/engine",
        "(cpu)",
    ]
    if args.compare_malloc:
        headers += ["engine ms, default malloc", "cpu ms", "MB"]
    print(
        f"forward+backward: median wall / process-CPU time of {args.reps} runs (dense: "
        f"{min(args.reps, args.dense_reps)}) after a warm-up, {args.threads} threads; MB = peak RSS increase "
        f"(ru_maxrss) of a fresh process; glibc allocator tuning {'off' if args.no_tune_alloc else 'on'}; "
        f"OMP_WAIT_POLICY={'PASSIVE' if args.omp_passive else 'default'}"
    )
    print(tabulate(rows, headers=headers))
    if torch.cuda.is_available():
        _gpu_table(sorted({(s, c, z) for s, c, z, _ in cases}), args.reps)
    else:
        print("gsplat comparison skipped: no CUDA device")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=int, nargs="+", default=[1, 4], help="source views of 37x37 Gaussians")
    parser.add_argument("--cams", type=int, nargs="+", default=[1, 4], help="target cameras")
    parser.add_argument("--sizes", type=int, nargs="+", default=[37, 74], help="target image sizes")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 384], help="feature channels D")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-reps", type=int, default=1, help="reps for the (slow) dense reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    parser.add_argument(
        "--max-dense-pairs",
        type=float,
        default=1.3e8,
        help="skip the dense reference above this many Gaussian x pixel pairs",
    )
    parser.add_argument("--no-tune-alloc", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument(
        "--omp-default",
        dest="omp_passive",
        action="store_false",
        help="keep OpenMP's default spin-waiting (workers run with OMP_WAIT_POLICY=PASSIVE, "
        "which avoids a 10x slow-down when other processes share the cores)",
    )
    parser.add_argument(
        "--compare-malloc", action="store_true", help="also time the engine with glibc's default malloc settings"
    )


splat_perf.add_arguments = add_arguments

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        p = argparse.ArgumentParser(description=splat_perf.__doc__)
        add_arguments(p)
        sys.exit(splat_perf(p.parse_args()))
