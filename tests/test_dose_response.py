"""delta vs teacher (95% interval over seeds) in the leaderboard, and the dose-response figure, on
tiny hand-made records with hand-computed values."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.figures import dose_response_table, figure_dose_response, training_steps
from bench.table import delta_vs_teacher, format_delta, task_table

T975_2 = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom


def _frame(rows):
    base = {
        "backbone": "bb",
        "task": "t",
        "protocol": "p",
        "dataset": "d",
        "reported": True,
        "rank": 0,
        "wall_s": 1.0,
        "created": "",
        "id": "",
    }
    # identity columns as records_frame makes them: one configuration per method, evaluated alike
    return pd.DataFrame(
        [
            {
                **base,
                "cell": f"{r['method']}/{r['seed']}",
                "row": r["method"],
                "recipe": "test `00000000`",
                "evaluation": "bb/t",
                **r,
            }
            for r in rows
        ]
    )


def test_delta_vs_teacher_paired_by_seed_with_t_interval():
    rows = [{"method": "dinov2", "seed": s, "metric": "acc", "value": v} for s, v in zip((0, 1, 2), (10, 11, 12))]
    rows += [{"method": "snd", "seed": s, "metric": "acc", "value": v} for s, v in zip((0, 1, 2), (12, 12, 15))]
    df = _frame(rows)
    mean, hw, n = delta_vs_teacher(df, "snd", "bb", "acc")  # diffs 2, 1, 3: mean 2, sd 1
    assert (mean, n) == (pytest.approx(2.0), 3) and hw == pytest.approx(T975_2 / 3**0.5)
    assert delta_vs_teacher(df, "dinov2", "bb", "acc") is None
    assert format_delta((mean, hw, n)) == "+2.0000 [-0.4841, +4.4841]"
    # a seed the teacher lacks is compared with the teacher's mean
    one = _frame(rows[:1] + [{"method": "snd", "seed": 5, "metric": "acc", "value": 13.0}])
    assert delta_vs_teacher(one, "snd", "bb", "acc")[:1] == (pytest.approx(3.0),)
    assert format_delta(delta_vs_teacher(one, "snd", "bb", "acc")) == "+3.0000"
    table = task_table(
        df, pd.DataFrame(columns=["source", "method", "backbone", "task", "metric", "value", "note"]), "t", "p"
    )
    assert "Δ vs teacher (acc, 95% CI)" in table and "+2.0000 [-0.4841, +4.4841]" in table


def _rec(method, task, seed, value, steps=None, i=[0]):
    i[0] += 1
    cfg = {"method": {"name": method}}
    if method == "splat_distill":
        cfg["method"]["optim"] = {"steps": steps}
    if method == "fit3d":
        cfg["method"]["stage2"] = {"steps": steps, "epochs": 1, "batch_size": 2}
    return {
        "method": method,
        "backbone": "bb",
        "task": task,
        "seed": seed,
        "metrics": {"m": value, "other": 0.0},
        "report": ["m", "other"],
        "config": cfg,
        "created": f"2026-01-01T00:00:{i[0]:02d}",
        "id": f"r{i[0]}",
    }


def test_dose_response_table_and_figure(tmp_path):
    recs = [_rec("dinov2", "t1", s, 50.0 + s) for s in (0, 1)]
    for steps, gain in ((60, 0.0), (300, 1.0), (1000, 2.0)):
        recs += [_rec("splat_distill", "t1", s, 50.0 + s + gain + 0.5 * s) for s in (0, 1)]  # diffs g, g + .5
        for r in recs[-2:]:
            r["config"]["method"]["optim"]["steps"] = steps
        recs += [_rec("fit3d", "t1", s, 50.0 + s - gain, steps) for s in (0, 1)]
    recs.append(_rec("fit3d", "t2", 0, 1.0, 60))  # no teacher for t2: left out
    assert training_steps(recs[2]) == 60
    table = dose_response_table(recs)
    assert set(table) == {"t1"} and set(table["t1"]) == {"splat_distill", "fit3d"}
    snd = table["t1"]["splat_distill"]
    assert [p[0] for p in snd] == [60, 300, 1000]
    hw = 12.706204736174698 * 0.5 / 2**0.5 / 2**0.5  # t(0.975, 1) * sd(0.3536) / sqrt(2)
    assert snd[1][1] == pytest.approx(1.25) and snd[1][3] - snd[1][1] == pytest.approx(hw)
    assert [p[1] for p in table["t1"]["fit3d"]] == pytest.approx([0.0, -1.0, -2.0])
    path = figure_dose_response(recs, tmp_path)
    assert path == tmp_path / "dose_response.png" and path.stat().st_size > 1000
    assert figure_dose_response(recs[:4], tmp_path / "none") is None  # one step count only: no figure


def test_figures_only_dose_response_from_records(tmp_path):
    """`bench figures --only dose_response` draws the plot from the records alone (no backbones), and
    says what to run when the records hold a single training length."""
    from bench import records
    from bench.errors import BenchError
    from bench.figures import make_figures

    res = tmp_path / "results"
    recs = [_rec("dinov2", "t1", s, 50.0 + s) for s in (0, 1)]
    for steps in (20, 180):
        recs += [_rec("fit3d", "t1", s, 49.0 + s, steps) for s in (0, 1)]
    for r in recs:
        records.write_record(res, r)
    assert make_figures(res, tmp_path / "figs", backbone="bb", only="dose_response") == [
        tmp_path / "figs" / "dose_response.png"
    ]
    one = tmp_path / "one"
    for r in recs[:4]:
        records.write_record(one, r)
    with pytest.raises(BenchError, match="two or more training lengths"):
        make_figures(one, backbone="bb", only="dose_response")
