"""``python -m bench perf probe``: a 10-epoch synth_depth probe, with and without the feature cache.

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


def run(args: argparse.Namespace) -> int:
    import torch
    from tabulate import tabulate

    from bench.backbones import build_backbone
    from bench.config import compose
    from bench.registry import TASKS
    from bench.seed import seed_everything

    torch.set_num_threads(int(args.threads))
    work = Path(tempfile.mkdtemp(prefix="bench_perf_probe_"))
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
    t0 = time.perf_counter()
    from tasks.data import open_split

    cfg = compose(ov)
    n_train, n_test = len(open_split(cfg.task.dataset, "train")), len(open_split(cfg.task.dataset, "test"))
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    backbone = build_backbone(cfg.backbone)
    t_build = time.perf_counter() - t0

    rows, totals = [], {}
    runs = [("cached", [])] + (
        [] if args.skip_uncached else [("on the fly", ["task.protocols.linear.features.cache=false"])]
    )
    for label, extra in runs:
        cfg = compose(ov + extra)
        seed_everything(0)
        t0 = time.perf_counter()
        m = TASKS.get("synth_depth")().evaluate(backbone, cfg, work / label.replace(" ", "_"))
        total = time.perf_counter() - t0
        info = json.loads((work / label.replace(" ", "_") / "metrics.json").read_text())
        s = info["seconds"]
        totals[label] = total
        rows.append(
            [
                label,
                f"{s['prepare']:.1f}",
                f"{s['train']:.1f}",
                info["train"]["steps"],
                f"{s['test']:.1f}",
                f"{total:.1f}",
                f"{m['rmse']:.4f}",
                f"{m['a1']:.3f}",
            ]
        )
    print(
        f"synth_depth linear probe, {args.backbone}, {args.epochs} epochs, {n_train} train / {n_test} test views "
        f"at {args.size}x{args.size}, {torch.get_num_threads()} threads "
        f"(scenes ready in {t_data:.1f} s, backbone built in {t_build:.1f} s)"
    )
    print(tabulate(rows, headers=["features", "data+extract s", "train s", "steps", "test s", "total s", "rmse", "a1"]))
    if len(totals) == 2:
        print(f"on the fly / cached total time: {totals['on the fly'] / totals['cached']:.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    return 0


run.add_arguments = add_arguments
PERF.register("probe", "10-epoch synth_depth probe (EfficientNet-Lite0): feature cache vs features on the fly")(run)
