"""Minimum detectable effect of the leaderboard (issue 30.2): hand-computed values with scipy.stats.t."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from leaderboard_fixture import make_results
from scipy import stats

from bench import table


def _mde(sd_diff: float, n: int) -> float:
    """By hand: (t_{0.975, n-1} + t_{0.8, n-1}) * sd_diff / sqrt(n)."""
    return (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd_diff / math.sqrt(n)


def test_min_detectable_effect_formula():
    # n = 3: t(0.975, 2) = 4.302653, t(0.8, 2) = 1.060660 -> 5.363313 * 2 / sqrt(3) = 6.19302
    assert table.min_detectable_effect(2.0, 3) == pytest.approx(5.363313 * 2 / math.sqrt(3), rel=1e-6)
    assert table.min_detectable_effect(1.0, 10) == pytest.approx(_mde(1.0, 10))
    assert math.isnan(table.min_detectable_effect(1.0, 1))  # one seed: no variance, nothing testable
    assert table.min_detectable_effect(1.0, 20) < table.min_detectable_effect(1.0, 5)  # more seeds, smaller MDE


def test_task_mde_from_the_teachers_seed_sd_and_markdown_line(tmp_path):
    res = make_results(tmp_path)
    ours = table.records_frame(res)
    (e,) = table.task_mde(ours, "synth_depth", "linear")
    # teacher rmse 1.0 / 3.0: sd sqrt(2), sd_diff = sqrt(2) * sqrt(2) = 2; a1 0.9 / 0.7: sd_diff 0.2
    assert e["n"] == 2 and e["backbone"] == "tiny_vit"
    assert e["metrics"]["rmse"]["sd_diff"] == pytest.approx(2.0)
    assert e["metrics"]["rmse"]["mde"] == pytest.approx(_mde(2.0, 2)) == pytest.approx(19.9157, rel=1e-4)
    assert e["metrics"]["a1"]["mde"] == pytest.approx(_mde(0.2, 2))
    assert {d["source"] for d in e["metrics"].values()} == {"teacher"}
    (seg,) = table.task_mde(ours, "synth_seg", "linear")  # one teacher seed: not estimable
    assert seg["n"] == 1 and math.isnan(seg["metrics"]["mIoU"]["mde"])
    md = table.leaderboard_markdown(res)
    assert "Minimum detectable effect vs the teacher (tiny_vit, n = 2 seeds" in md
    assert "rmse 19.92, a1 1.9916." in md and "mIoU -." in md
    from bench.leaderboard_html import leaderboard_html

    assert "rmse 19.92, a1 1.9916." in leaderboard_html(res)  # the HTML page shows the same line


def _frame(rows):
    keys = ["method", "seed", "value"]
    df = pd.DataFrame([dict(zip(keys, r)) for r in rows])
    df["backbone"], df["task"], df["protocol"], df["metric"] = "bb", "synth_corr", "default", "recall"
    df["reported"], df["rank"], df["evaluation"] = True, 0, "bb/corr"
    df["row"] = df["method"]
    return df


def test_task_mde_falls_back_to_paired_differences_when_the_teacher_has_no_seed_noise():
    """A training-free task: the teacher's 3 seeds are identical (sd 0), so the pooled sd of the methods'
    paired differences is used: a: diffs 0.1, 0.2, 0.3 (var 0.01, 2 dof); b: 0.0, 0.2 (var 0.02, 1 dof);
    pooled var (2 * 0.01 + 0.02) / 3."""
    ours = _frame(
        [("dinov2", s, 0.5) for s in range(3)]
        + [("a", 0, 0.6), ("a", 1, 0.7), ("a", 2, 0.8), ("b", 0, 0.5), ("b", 1, 0.7), ("c", 0, 0.9)]
    )
    (e,) = table.task_mde(ours, "synth_corr", "default")
    d = e["metrics"]["recall"]
    sd = math.sqrt((2 * 0.01 + 0.02) / 3)
    assert d["source"] == "paired" and d["sd_diff"] == pytest.approx(sd)
    assert d["mde"] == pytest.approx(_mde(sd, 3)) == pytest.approx(0.35755, rel=1e-4)
    assert "recall 0.3576†" in table.format_mde([e])
    alone = table.task_mde(ours[ours.method == "dinov2"], "synth_corr", "default")[0]["metrics"]["recall"]
    assert alone["source"] == "none" and math.isnan(alone["mde"])
