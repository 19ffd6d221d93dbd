"""``python -m bench perf probe``: a 10-epoch synth_depth probe, with and without the feature cache
(``--ranks 1 2``: and the cached probe trained data-parallel on 1 and 2 ranks, side by side).

Both runs use the same composed config (task=synth_depth, linear protocol, the chosen backbone, the
synthetic set of the given size) and a fresh feature-cache directory, in one process, one after the
other: "cached" extracts the training features once and trains on them; "on the fly" recomputes
features of every batch every epoch (what an augmented protocol has to do). The table gives the
wall time of each phase (from the task's metrics.json) and the ratio of the totals.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, List, Tuple

from bench.registry import PERF


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone config name (default efficientnet_lite0)")
    p.add_argument("--scenes", type=int, default=24, help="synthetic rooms (default 24, as task=synth_depth)")
    p.add_argument("--held-out", type=int, default=6, help="rooms held out for testing (default 6)")
    p.add_argument("--views", type=int, default=8, help="views per room (default 8)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--epochs", type=int, default=10, help="probe epochs (default 10)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--data-dir", default=None, help="where the synthetic scenes live (default: $BENCH_DATA or ./data)")
    p.add_argument("--skip-uncached", action="store_true", help="only time the cached run")
    p.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=None,
        help="also train the cached probe data-parallel on each of these numbers of ranks (e.g. 1 2; CPU: gloo, "
        "--threads split between the ranks) at the same global batch, side by side",
    )


def _rank_worker(rank: int, world: int, port: int, overrides, threads: int, work: str, out: str) -> None:
    """One rank of a data-parallel probe (``torch.multiprocessing``): rank 0 writes its timings to ``out``."""
    import os

    import torch

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(threads)
    from bench import distributed as dist
    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.registry import TASKS
    from bench.seed import seed_everything

    dist.init("cpu")
    cfg = compose(overrides)
    seed_everything(0)
    backbone = build_backbone(cfg.backbone).eval()
    seed_everything(0)
    m = TASKS.get("synth_depth")().evaluate(backbone, cfg, Path(work))
    if rank == 0:
        info = json.loads((Path(work) / "metrics.json").read_text())
        Path(out).write_text(json.dumps({"metrics": m, "seconds": info["seconds"], "steps": info["train"]["steps"]}))
    dist.shutdown()


def _ranks_table(ov, ranks, threads: int, work: Path) -> None:
    """Train-phase speed of the cached probe on 1..N ranks at one global batch (loss groups split over them)."""
    import socket

    import torch.multiprocessing as mp
    from tabulate import tabulate

    from bench.config import compose
    from tasks.dense import resolve_protocol

    sched = resolve_protocol(compose(ov))["schedule"]
    rows, one = [], None
    for n in ranks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out, wd = work / f"ranks{n}.json", work / f"ranks{n}"
        t = max(1, threads // n)
        mp.spawn(_rank_worker, args=(n, port, ov, t, str(wd), str(out)), nprocs=n, join=True)
        r = json.loads(out.read_text())
        sps = r["steps"] / r["seconds"]["train"]
        one = one or sps
        rows.append(
            [
                n,
                t,
                f"{r['seconds']['train']:.1f}",
                r["steps"],
                f"{sps:.2f}",
                f"{sps * int(sched['batch_size']):.1f}",
                f"{sps / one:.2f}",
                f"{sps / (n * one):.2f}" if n > 1 else "-",
                f"{r['seconds']['test']:.1f}",
                f"{r['metrics']['rmse']:.6f}",
            ]
        )
    print(
        f"\ndata-parallel probe (cached features), global batch {sched['batch_size']} in loss groups of "
        f"{sched.get('samples_per_gpu')}; same numbers expected in every row (float rounding)"
    )
    print(
        tabulate(
            rows,
            headers=[
                "ranks",
                "threads/rank",
                "train s",
                "steps",
                "steps/s",
                "images/s",
                "speed-up",
                "efficiency",
                "test s",
                "rmse",
            ],
        )
    )


def _overrides(args: argparse.Namespace, work: Path) -> List[str]:
    """The synth_depth cell of the measurement (its caches in ``work``)."""
    ov = [
        "task=synth_depth",
        f"backbone={args.backbone}",
        f"task.dataset.scenes={args.scenes}",
        f"task.dataset.held_out={args.held_out}",
        f"task.dataset.views={args.views}",
        f"task.dataset.size={args.size}",
        f"task.protocols.linear.schedule.epochs={args.epochs}",
        f"paths.cache_dir={work}/cache",
    ]
    if args.data_dir:
        ov.append(f"paths.data_dir={args.data_dir}")
    return ov


def _timed_evaluation(backbone, ov: List[str], label: str, extra: List[str], work: Path) -> Tuple[List[Any], float]:
    """One evaluation of the cell (``extra`` overrides): its table row and its total seconds."""
    from bench.config import compose
    from bench.registry import TASKS
    from bench.seed import seed_everything

    cfg = compose(ov + extra)
    seed_everything(0)
    t0 = time.perf_counter()
    m = TASKS.get("synth_depth")().evaluate(backbone, cfg, work / label.replace(" ", "_"))
    total = time.perf_counter() - t0
    info = json.loads((work / label.replace(" ", "_") / "metrics.json").read_text())
    s = info["seconds"]
    row = [
        label,
        f"{s['prepare']:.1f}",
        f"{s['train']:.1f}",
        info["train"]["steps"],
        f"{s['test']:.1f}",
        f"{total:.1f}",
        f"{m['rmse']:.4f}",
        f"{m['a1']:.3f}",
    ]
    return row, total


def run(args: argparse.Namespace) -> int:
    """Time the synth_depth probe with cached features and (unless ``--skip-uncached``) features on the fly,
    then (``--ranks``) with several ranks."""
    import torch
    from tabulate import tabulate

    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.seed import seed_everything

    torch.set_num_threads(int(args.threads))
    work = Path(tempfile.mkdtemp(prefix="bench_perf_probe_"))
    ov = _overrides(args, work)
    t0 = time.perf_counter()
    from tasks.data import open_split

    cfg = compose(ov)
    n_train, n_test = len(open_split(cfg.task.dataset, "train")), len(open_split(cfg.task.dataset, "test"))
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    seed_everything(0)  # as the rank workers build it: one feature cache serves every run
    backbone = build_backbone(cfg.backbone).eval()
    t_build = time.perf_counter() - t0

    rows, totals = [], {}
    runs = [("cached", [])] + (
        [] if args.skip_uncached else [("on the fly", ["task.protocols.linear.features.cache=false"])]
    )
    for label, extra in runs:
        row, totals[label] = _timed_evaluation(backbone, ov, label, extra, work)
        rows.append(row)
    print(
        f"synth_depth linear probe, {args.backbone}, {args.epochs} epochs, {n_train} train / {n_test} test views "
        f"at {args.size}x{args.size}, {torch.get_num_threads()} threads "
        f"(scenes ready in {t_data:.1f} s, backbone built in {t_build:.1f} s)"
    )
    print(tabulate(rows, headers=["features", "data+extract s", "train s", "steps", "test s", "total s", "rmse", "a1"]))
    if len(totals) == 2:
        print(f"on the fly / cached total time: {totals['on the fly'] / totals['cached']:.2f}x")
    if args.ranks:
        _ranks_table(ov, args.ranks, int(args.threads), work)  # the cache filled above serves every run
    shutil.rmtree(work, ignore_errors=True)
    return 0


run.add_arguments = add_arguments
PERF.register("probe", "10-epoch synth_depth probe (EfficientNet-Lite0): feature cache vs features on the fly")(run)
