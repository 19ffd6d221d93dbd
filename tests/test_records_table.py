"""Records are atomic and complete; the leaderboard aggregates the latest record per cell."""

import json
import os

import pytest

from bench import io, records, table
from bench.errors import BenchError


def _rec(results, method, task, seed, value, created, protocol="linear"):
    rec = {
        "schema": 1,
        "id": f"{created}_{method}_{task}_s{seed}",
        "created": created,
        "method": method,
        "backbone": "tiny_vit",
        "task": task,
        "dataset": "synthetic",
        "protocol": {"name": protocol},
        "seed": seed,
        "metrics": {"rmse": value, "a1": 0.5},
        "report": ["rmse", "a1"],
        "wall_time_s": {"total": 10.0},
        "device": {"cpu": "x86_64", "threads": 2},
    }
    records.write_record(results, rec)
    return rec


def test_atomic_write_leaves_no_temp_and_old_file_on_failure(tmp_path):
    p = tmp_path / "a.json"
    io.write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(p) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert json.loads(p.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_latest_record_per_cell_and_seed_aggregation(tmp_path):
    _rec(tmp_path, "dinov2", "synth_depth", 0, 9.0, "2026-01-01T00:00:00Z")  # superseded
    _rec(tmp_path, "dinov2", "synth_depth", 0, 1.0, "2026-01-02T00:00:00Z")
    _rec(tmp_path, "dinov2", "synth_depth", 1, 3.0, "2026-01-02T00:00:01Z")
    _rec(tmp_path, "splat_distill", "synth_depth", 0, 0.5, "2026-01-02T00:00:02Z")
    df = table.records_frame(tmp_path)
    rmse = df[(df.method == "dinov2") & (df.metric == "rmse")].sort_values("seed")["value"].tolist()
    assert rmse == [1.0, 3.0]
    md = table.leaderboard_markdown(tmp_path)
    # mean 2.0, sample std sqrt(2) = 1.4142 over the two latest seeds
    assert "2.0000 ± 1.4142" in md
    assert "0.5000" in md and "9.0000" not in md


def test_published_rows_are_marked(tmp_path):
    _rec(tmp_path, "dinov2", "nyu_depth", 0, 0.6, "2026-01-02T00:00:00Z")
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "p.csv").write_text(
        "source,method,backbone,task,metric,value,note,code_version\n"
        "SnD paper,splat_distill,dinov2_vits14,nyu_depth,rmse,0.4912,x,fit3d_evaluation+snd_1gpu\n"
    )
    md = table.leaderboard_markdown(tmp_path)
    assert "splat_distill *(published)*" in md and "0.4912" in md
    path = table.write_leaderboard(tmp_path)
    assert path == tmp_path / "leaderboard.md" and "0.4912" in path.read_text()


def test_non_finite_metrics_are_refused():
    with pytest.raises(BenchError, match="nan"):
        records.validate_metrics({"rmse": float("nan")})
    assert records.validate_metrics({"rmse": 1}) == {"rmse": 1.0}


def test_corrupt_record_is_named(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "bad.json").write_text("{not json")
    with pytest.raises(BenchError, match="bad.json"):
        records.load_records(tmp_path)


def test_leaderboard_with_only_published_numbers(tmp_path):
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "p.csv").write_text(
        "source,method,backbone,task,metric,value,note,code_version\n"
        "SnD paper,splat_distill,dinov2_vits14,nyu_depth,rmse,0.4912,x,fit3d_evaluation+snd_1gpu\n"
    )
    md = table.leaderboard_markdown(tmp_path)
    assert "No records yet" in md and "0.4912" in md


def test_training_diagnostics_from_records_and_beside_them(tmp_path):
    """The leaderboard's training-diagnostics section: a trained record's own diagnostics, or those of
    its backbone's train_info.json kept in <results>/diagnostics/<cache_key>.json; frozen records none."""
    from bench.runner import train_diagnostics

    res = tmp_path / "results"
    info = {
        "wall_time_s": 3.0,
        "diagnostics": {
            "feature_change": 0.149,
            "adapted_weight_change": 0.0067,
            "kl_first": 1.3e-3,
            "kl_last": 1.5e-4,
            "held_out": {"views": 12},
            "student_grid": [6, 8],
            "before": {"x": 1},
        },
    }
    assert train_diagnostics(info) == {
        "feature_change": 0.149,
        "adapted_weight_change": 0.0067,
        "kl_first": 1.3e-3,
        "kl_last": 1.5e-4,
        "student_grid": [6, 8],
    }
    for seed, ck in (
        (0, {"kind": "trained", "cache_key": "snd-bb-aaaa", "train_diagnostics": {"feature_change": 0.25}}),
        (1, {"kind": "trained", "cache_key": "snd-bb-bbbb"}),
        (2, {"kind": "frozen"}),
    ):
        records.write_record(
            res,
            {
                "id": f"r{seed}",
                "created": f"2026-01-0{seed + 1}T00:00:00Z",
                "method": "snd",
                "backbone": "bb",
                "task": "t",
                "seed": seed,
                "protocol": {"name": "linear"},
                "metrics": {"m": 1.0},
                "checkpoint": ck,
            },
        )
    io.write_json(res / "diagnostics" / "snd-bb-bbbb.json", info)
    md = table.leaderboard_markdown(res)
    section = md.split("## Training diagnostics")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| snd")]
    assert len(rows) == 2  # the frozen record has none
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert cells[0][:6] == ["snd", "bb", "0", "t", "`snd-bb-aaaa`", "0.25"] and set(cells[0][6:]) == {""}
    assert cells[1][4:9] == ["`snd-bb-bbbb`", "0.149", "", "0.0067", ""] and cells[1][10:12] == ["0.0013", "0.00015"]


def test_a_record_stored_twice_counts_once(tmp_path, caplog):
    """A copy of a record under another name is one run: the seeds' mean and count do not change."""
    _rec(tmp_path, "dinov2", "synth_depth", 0, 1.0, "2026-01-02T00:00:00Z")
    _rec(tmp_path, "dinov2", "synth_depth", 1, 3.0, "2026-01-02T00:00:01Z")
    runs = records.runs_dir(tmp_path)
    first = sorted(runs.glob("*.json"))[0]
    (runs / "zz_copy.json").write_text(first.read_text())
    with caplog.at_level("WARNING", logger="bench"):
        recs = records.load_records(tmp_path)
        md = table.leaderboard_markdown(tmp_path)
    assert len(recs) == 2 and all(r["run_id"] and r["digest"].startswith("sha256:") for r in recs)
    df = table.records_frame(tmp_path)
    assert sorted(df[df.metric == "rmse"]["value"]) == [1.0, 3.0]  # not [1.0, 1.0, 3.0]
    assert "2.0000 ± 1.4142" in md  # mean of seeds 1 and 3, sample std sqrt(2)
    copies = [r.getMessage() for r in caplog.records if "repeats the run" in r.getMessage()]
    assert copies and all("zz_copy.json" in m and "counted once" in m for m in copies)


def test_write_record_refuses_non_finite_metrics_before_writing(tmp_path):
    for bad in (float("nan"), float("inf"), -float("inf")):
        rec = {"id": "r", "method": "m", "backbone": "b", "task": "t", "metrics": {"rmse": bad, "a1": 0.5}}
        with pytest.raises(BenchError, match="metric 'rmse'"):
            records.write_record(tmp_path, rec)
    assert not records.runs_dir(tmp_path).exists() or not list(records.runs_dir(tmp_path).iterdir())


def test_a_hand_made_nan_record_is_refused_by_name(tmp_path):
    runs = records.runs_dir(tmp_path)
    runs.mkdir()
    bad = {"id": "r", "method": "m", "backbone": "b", "task": "t", "metrics": {"rmse": float("nan")}}
    (runs / "nan.json").write_text(json.dumps(bad))  # json writes NaN (not JSON, but Python reads it)
    with pytest.raises(BenchError, match=r"nan.json: metric 'rmse' is nan, not a finite number"):
        records.load_records(tmp_path)


def test_an_edited_record_is_refused_and_a_legacy_one_is_read(tmp_path):
    _rec(tmp_path, "dinov2", "synth_depth", 0, 1.0, "2026-01-02T00:00:00Z")
    (path,) = records.runs_dir(tmp_path).glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["digest"] == records.content_digest(rec) and records.load_records(tmp_path)[0]["metrics"]["rmse"] == 1.0
    rec["metrics"]["rmse"] = 0.9
    path.write_text(json.dumps(rec, indent=1))
    with pytest.raises(BenchError, match="was changed after bench wrote it"):
        records.load_records(tmp_path)
    del rec["digest"]  # a record from before digests: read as it is
    path.write_text(json.dumps(rec))
    assert records.load_records(tmp_path)[0]["metrics"]["rmse"] == 0.9


def test_the_digest_ignores_layout_but_not_content():
    rec = records.seal({"id": "r", "method": "m", "backbone": "b", "task": "t", "metrics": {"rmse": 0.1 + 0.2}})
    again = json.loads(json.dumps(rec, indent=4, sort_keys=True))  # another layout, the same content
    assert records.content_digest(again) == rec["digest"]
    again["seed"] = 1
    assert records.content_digest(again) != rec["digest"]
    assert records.seal(rec)["run_id"] == rec["run_id"]  # sealing again keeps the run
