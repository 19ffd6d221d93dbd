"""A small results directory in the real record format, with hand-chosen values, for the table formats tests.

synth_depth (protocol linear): dinov2 seeds 0/1 rmse 1.0/3.0 (mean 2.0) a1 0.9/0.7; splat_distill seeds 0/1 rmse
0.5/1.5 (mean 1.0, best: lower is better) a1 0.6/0.6; mef seed 0 rmse 1.8 a1 0.75. So a1's best is dinov2 (0.8:
higher is better), rmse's is splat_distill. splat_distill's Δ rmse vs teacher, paired by seed: -0.5, -1.5 ->
mean -1.0, sd 0.70711, 95% half width t(0.975, 1) * sd / sqrt(2) = 6.35310.
synth_seg (protocol linear): dinov2 mIoU 40.0, splat_distill mIoU 42.0 (best). nyu_depth: published numbers only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bench import records
from bench.io import write_text

DEVIATION = {
    "id": "schedule_length",
    "key": "schedule.iters",
    "value": None,
    "anchor": 40000,
    "why": "shortened schedule (synthetic tasks)",
}


def _rec(results, method, task, seed, metrics, created, run_dir=None):
    row = hashlib.sha256(f"{method}/{task}".encode()).hexdigest()[:16]
    rec = {
        "schema": 1,
        "id": f"{created.replace(':', '')}_{method}_{task}_s{seed}",
        "created": created,
        "method": method,
        "backbone": "tiny_vit",
        "task": task,
        "dataset": "synthetic",
        "protocol": {"name": "linear", "deviations": ["schedule_length"], "deviation_details": [DEVIATION]},
        "seed": seed,
        "identity": {
            "version": 1,
            "cell": f"{row}-{seed}",
            "row": row,
            "short": row[:8],
            "label": "fixture",
            "parts": {"method": method[:8], "task": task[:8]},
        },
        "metrics": metrics,
        "report": list(metrics),
        "wall_time_s": {"total": 10.0 + seed},
        "device": {"cpu": "x86_64", "threads": 2},
        "checkpoint": {"kind": "pretrained"},
    }
    if run_dir is not None:
        rec["run_dir"] = str(run_dir)
    records.write_record(results, rec)
    return rec


def make_results(root: Path) -> Path:
    """The results directory described in the module docstring, under ``root/results``; the splat_distill seed 0
    synth_depth run has a probe curve (``probe_history.jsonl``, loss 1/step) in its run directory."""
    res = root / "results"
    run = root / "outputs" / "run-splat-depth-s0"
    write_text(run / "probe_history.jsonl", "".join(f'{{"step": {s}, "loss": {1.0 / s}}}\n' for s in range(1, 41)))
    t = "2026-01-02T00:00:0{}Z"
    _rec(res, "dinov2", "synth_depth", 0, {"rmse": 1.0, "a1": 0.9}, t.format(0))
    _rec(res, "dinov2", "synth_depth", 1, {"rmse": 3.0, "a1": 0.7}, t.format(1))
    _rec(res, "splat_distill", "synth_depth", 0, {"rmse": 0.5, "a1": 0.6}, t.format(2), run_dir=run)
    _rec(res, "splat_distill", "synth_depth", 1, {"rmse": 1.5, "a1": 0.6}, t.format(3))
    _rec(res, "mef", "synth_depth", 0, {"rmse": 1.8, "a1": 0.75}, t.format(4))
    _rec(res, "dinov2", "synth_seg", 0, {"mIoU": 40.0}, t.format(5))
    _rec(res, "splat_distill", "synth_seg", 0, {"mIoU": 42.0}, t.format(6))
    write_text(
        res / "reference" / "papers.csv",
        "source,method,backbone,task,metric,value,note,code_version\n"
        "SnD paper,splat_distill,dinov2_vits14,nyu_depth,rmse,0.4912,x,fit3d_evaluation+snd_1gpu\n"
        "FiT3D paper,fit3d,dinov2_vits14,nyu_depth,rmse,0.42,x,fit3d_evaluation\n",
    )
    return res
