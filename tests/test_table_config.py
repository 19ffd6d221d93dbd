"""bench.table's Configuration section: config hashes per (method, backbone, task), training and task data."""

from __future__ import annotations

import json

from bench.config import stable_hash
from bench.table import leaderboard_markdown


def _write(runs, i, method, seed, trained, steps=60):
    cfg = {
        "method": {
            "name": method,
            "data": {"dataset": "synthetic", "seed": 1, "scenes": 2, "views": 12, "size": [64, 80]},
            "optim": {"steps": steps},
        },
        "task": {
            "name": "synth_depth",
            "dataset": {"name": "synthetic", "seed": 0, "scenes": 8, "views": 12, "size": 128, "held_out": 2},
        },
    }
    rec = {
        "id": f"r{i}",
        "created": f"2026-01-01T00:00:0{i}",
        "method": method,
        "backbone": "bb",
        "task": "synth_depth",
        "seed": seed,
        "metrics": {"rmse": 1.0 + seed},
        "report": ["rmse"],
        "config": cfg,
        "checkpoint": {"kind": "trained" if trained else "pretrained"},
        "wall_time_s": {"total": 60.0},
        "device": {"cpu": "x86_64", "threads": 2},
    }
    (runs / f"r{i}.json").write_text(json.dumps(rec))
    return cfg


def test_configuration_section(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    cfg = _write(runs, 0, "splat_distill", 0, True)
    _write(runs, 1, "splat_distill", 1, True, steps=61)  # a different method config for seed 1
    _write(runs, 2, "dinov2", 0, False)
    md = leaderboard_markdown(tmp_path)
    sec = md.split("## Configuration")[1]
    assert "3.0 min summed over the 3 records" in sec
    row = next(line for line in sec.splitlines() if line.startswith("| splat_distill"))
    assert "0,1" in row and stable_hash(cfg["method"], 8) in row  # both hashes listed: visible
    assert len([c for c in row.split("|")[6].split() if c]) == 2  # column 6: after the recipe column
    assert "synthetic, gen. seed 1, 2 scenes x 12 views, [64, 80] px" in row
    assert "synthetic, gen. seed 0, 8 scenes x 12 views, 128 px, held out 2" in row
    dino = next(line for line in sec.splitlines() if line.startswith("| dinov2"))
    assert "- (not trained)" in dino
