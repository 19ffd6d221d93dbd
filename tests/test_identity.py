"""A record never stands for a run it did not come from (issue 14): cell fingerprints, leaderboard rows
per configuration, sweep skips by fingerprint, path-independent backbone cache keys, one training for
two concurrent identical cells, resumed segments summed, files following the umask, the demo's own
results directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import records, sweep, table
from bench.config import compose
from bench.identity import backbone_key as backbone_cache_key
from bench.identity import cell_identity, manifest_digest
from helpers import path_overrides as paths

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def write_record(results: Path, cfg, value: float, created: str) -> dict:
    ident = cell_identity(cfg)
    rec = {
        "schema": 1,
        "id": f"{created}_{cfg.method.name}_{ident['cell'][:6]}",
        "created": created,
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "task": cfg.task.name,
        "dataset": "synthetic",
        "protocol": {"name": "linear"},
        "seed": int(cfg.seed),
        "metrics": {"rmse": value},
        "report": ["rmse"],
        "identity": ident,
        "config": {},
        "wall_time_s": {"total": 1.0},
        "device": {"cpu": "x", "threads": 1},
    }
    records.write_record(results, rec)
    return rec


# ------------------------------------------------------------------------------------- fingerprints
@pytest.mark.slow
def test_fingerprint_covers_the_recipe_not_paths_or_progress(tmp_path):
    base = ["experiment=demo", *paths(tmp_path)]
    a = cell_identity(compose(base))
    assert a["label"] == "demo" and a["short"] == a["row"][:8] and len(a["cell"]) == 16
    # what does not change the number: paths, progress, logging/ckpt cadence, the device
    for ov in (
        paths(tmp_path / "elsewhere"),
        ["method.progress=false", "task.progress=false"],
        ["method.ckpt_every=7", "method.log_every=3"],
        ["device=cpu"],
        ["task.num_workers=2"],
    ):
        assert cell_identity(compose(base + ov))["cell"] == a["cell"], ov
    # what does: the training data, the method, the probe schedule, the eval data, the protocol, the seed
    for ov in (
        ["method.data.scenes=5"],
        ["method.optim.lr=2e-4"],
        ["task.protocols.linear.schedule.epochs=4"],
        ["task.dataset.seed=3"],
        ["protocol=probe3d"],
        ["backbone=tiny_vit"],
    ):
        b = cell_identity(compose(base + ov))
        assert b["row"] != a["row"] and b["cell"] != a["cell"], ov
    s1 = cell_identity(compose(base + ["seed=1"]))
    assert s1["row"] == a["row"] and s1["cell"] != a["cell"]  # seeds share a row, not a cell
    assert cell_identity(compose(base + ["recipe=mine"]))["label"] == "mine"


def test_changed_recipe_gets_its_own_leaderboard_row(tmp_path):
    res = tmp_path / "results"
    base = ["method=dinov2", "backbone=efficientnet_lite0", *paths(tmp_path)]
    for seed, v in ((0, 1.0), (1, 3.0)):
        write_record(
            res, compose(base + ["experiment=mini_benchmark", f"seed={seed}"]), v, f"2026-01-01T00:00:0{seed}Z"
        )
    # the demo's recipe: another training set and probe schedule -> a separate row, not a replacement
    demo = compose(base + ["experiment=demo"])
    write_record(res, demo, 9.5, "2026-01-02T00:00:00Z")
    md = table.leaderboard_markdown(res)
    rows = [ln for ln in md.split("## Configuration")[0].splitlines() if ln.startswith("| dinov2")]
    assert len(rows) == 2, rows
    mini = next(r for r in rows if "mini_benchmark" in r)
    assert "2.0000 ± 1.4142" in mini and cell_identity(compose(base + ["experiment=mini_benchmark"]))["short"] in mini
    assert "9.5" in next(r for r in rows if "demo" in r) and cell_identity(demo)["short"] in md
    # a re-run of one cell (same fingerprint) replaces that cell's record only
    write_record(res, compose(base + ["experiment=mini_benchmark", "seed=1"]), 5.0, "2026-01-03T00:00:00Z")
    md = table.leaderboard_markdown(res)
    assert "3.0000 ± 2.8284" in md and "9.5" in md


def test_legacy_records_are_shown_apart_and_never_skip_a_sweep(toys, tmp_path):
    res = tmp_path / "results"
    legacy = {
        "id": "old",
        "created": "2025-01-01T00:00:00Z",
        "method": "dinov2",
        "backbone": "tiny_vit",
        "task": "toy_probe",
        "seed": 1,
        "protocol": {"name": "default"},
        "metrics": {"rmse": 7.25},
    }
    records.write_record(res, legacy)
    cfg = compose(["method.name=dinov2", "task.name=toy_probe", "backbone=tiny_vit", *paths(tmp_path)])
    write_record(res, cfg, 1.5, "2026-01-01T00:00:00Z")
    md = table.leaderboard_markdown(res)
    legacy_row = next(ln for ln in md.splitlines() if "legacy (no fingerprint)" in ln)
    assert "7.25" in legacy_row and "1.5" not in legacy_row and "1.5" in md
    # the legacy record's cell (seed 1) does not count as done; the fingerprinted one (seed 0) does
    assert not records.has_record(
        res, compose(["method.name=dinov2", "task.name=toy_probe", "backbone=tiny_vit", "seed=1", *paths(tmp_path)])
    )
    assert records.has_record(res, cfg)


@pytest.mark.slow
def test_sweep_rerun_after_a_changed_override_runs_the_changed_cells(toys, tmp_path):
    ov = [
        "method.name=dinov2",
        "backbone=tiny_vit",
        "task=synth_corr",
        "task.name=toy_probe",
        *paths(tmp_path),
        f"cluster.folder={tmp_path}/sweep",
        "seed=0,1",
    ]
    for cfg in (compose([o for o in ov if not o.startswith("seed")] + [f"seed={s}"]) for s in (0, 1)):
        write_record(tmp_path / "results", cfg, 1.0, "2026-01-01T00:00:00Z")
    assert sweep.make_plan(ov).jobs == {}  # same configuration: both cells done
    plan = sweep.make_plan(ov + ["task.protocol.num_corr=500"])  # a changed override: both cells run again
    assert [c.skip for c in plan.cells] == [False, False] and len(plan.jobs) == 3
    text = sweep.plan_table(plan)
    assert "2 to run, 0 skipped" in text


def test_reproduce_into_a_new_results_dir_is_not_a_noop(toys, tmp_path, capsys):
    ov = [
        "method.name=dinov2",
        "backbone=tiny_vit",
        "task.name=toy_probe",
        *paths(tmp_path),
        f"cluster.folder={tmp_path}/sweep",
    ]
    write_record(tmp_path / "results", compose(ov), 1.0, "2026-01-01T00:00:00Z")
    assert sweep.run(sweep.make_plan(ov), echo=print) is None
    out = capsys.readouterr().out
    assert "nothing to run" in out and "--force" in out and "paths.results_dir=" in out
    assert len(sweep.make_plan(ov + [f"paths.results_dir={tmp_path}/repro"]).jobs) == 2


def test_demo_writes_its_own_results_dir(monkeypatch):
    monkeypatch.delenv("BENCH_RESULTS", raising=False)
    default, demo = compose([]).paths.results_dir, compose(["experiment=demo"]).paths.results_dir
    assert Path(demo) != Path(default) and Path(demo).parent == Path(default)
    assert "/results/demo/" in (ROOT / ".gitignore").read_text()


# ------------------------------------------------------------------------------------- cache keys
def _scenes(root: Path) -> Path:
    for s in ("scene_a", "scene_b"):
        d = root / "scannetpp" / s / "dslr"
        d.mkdir(parents=True)
        (d / "frame_0000.png").write_bytes(bytes(range(200)) * 3 + s.encode())
    (root / "scannetpp" / "splits.txt").write_text("scene_a\nscene_b\n")
    return root


@pytest.mark.slow
def test_backbone_key_is_the_same_for_every_spelling_of_the_same_inputs(tmp_path, monkeypatch):
    data = _scenes(tmp_path / "data")
    ckpt = tmp_path / "cache" / "reconstructors" / "cost_volume.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights" * 100)
    common = [
        "method=splat_distill",
        "backbone=tiny_vit",
        "method.data.dataset=scannetpp",
        "method.reconstructor.name=learned",
        "method.reconstructor.checkpoint=${paths.cache_dir}/reconstructors/cost_volume.safetensors",
    ]
    key = backbone_cache_key(compose(common + paths(tmp_path)))
    monkeypatch.chdir(tmp_path)  # relative vs absolute spellings
    assert backbone_cache_key(compose(common + paths(tmp_path, cache="cache", data="data"))) == key
    assert backbone_cache_key(compose(common + paths(tmp_path, cache="./cache/../cache", data="data/"))) == key
    monkeypatch.setenv("BENCH_CACHE", "cache")
    monkeypatch.setenv("BENCH_DATA", str(data))
    assert backbone_cache_key(compose(common + [f"paths.root={tmp_path}"])) == key
    # a moved cache and another data dir with identical content
    shutil.copytree(tmp_path / "cache", tmp_path / "moved" / "cache")
    shutil.copytree(data, tmp_path / "copy" / "data")
    assert (
        backbone_cache_key(
            compose(common + paths(tmp_path, cache=str(tmp_path / "moved/cache"), data=str(tmp_path / "copy/data")))
        )
        == key
    )
    # different content is a different key: one changed byte in a frame, or another checkpoint
    frame = tmp_path / "copy/data/scannetpp/scene_b/dslr/frame_0000.png"
    frame.write_bytes(frame.read_bytes()[:-1] + b"X")
    assert backbone_cache_key(compose(common + paths(tmp_path, data=str(tmp_path / "copy/data")))) != key
    (tmp_path / "moved/cache/reconstructors/cost_volume.safetensors").write_bytes(b"other" * 100)
    assert backbone_cache_key(compose(common + paths(tmp_path, cache=str(tmp_path / "moved/cache")))) != key
    # the depth reconstructor does not read the checkpoint: its key ignores it (present or not)
    depth = [c for c in common if "reconstructor" not in c] + ["method.reconstructor.name=depth"]
    k_depth = backbone_cache_key(compose(depth + paths(tmp_path)))
    assert backbone_cache_key(compose(depth + paths(tmp_path, cache=str(tmp_path / "nowhere")))) == k_depth


def test_generated_training_data_has_the_same_key_before_and_after_generation(tmp_path):
    ov = ["experiment=demo", *paths(tmp_path)]
    before = backbone_cache_key(compose(ov))
    (tmp_path / "data" / "synthetic_snd_s1_4x16_96x128").mkdir(parents=True)
    (tmp_path / "data" / "synthetic_snd_s1_4x16_96x128" / "meta.json").write_text("{}")
    assert backbone_cache_key(compose(ov)) == before
    assert backbone_cache_key(compose(ov + ["method.data.seed=2"])) != before


def test_manifest_ignores_hidden_lock_files(tmp_path):
    data = _scenes(tmp_path / "d")
    m = manifest_digest(data / "scannetpp")
    (data / "scannetpp" / ".scene_a.lock").write_text("")
    assert manifest_digest(data / "scannetpp") == m


# ------------------------------------------------------------------------------------- concurrency
_RUN = """
import sys
sys.path.insert(0, {tests!r})
import sweep_toys  # registers the toys
from bench.cli import main
sys.exit(main(["run", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_two_concurrent_identical_cells_train_once(tmp_path):
    ov = [
        "method.name=toy_train",
        "backbone=tiny_vit",
        "task=synth_corr",
        "task.name=toy_probe",
        "+method.steps=6",
        "+method.sleep_s=0.3",
        *paths(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = _RUN.format(tests=str(TESTS))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *ov, f"run_dir={tmp_path}/outputs/run{i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    recs = records.load_records(tmp_path / "results")
    assert len(recs) == 2
    assert sorted(r["checkpoint"]["reused"] for r in recs) == [False, True]  # one trained, the other waited
    assert recs[0]["checkpoint"]["cache_key"] == recs[1]["checkpoint"]["cache_key"]
    workdir = tmp_path / "cache" / "backbones" / recs[0]["checkpoint"]["cache_key"]
    info = json.loads((workdir / "train_info.json").read_text())
    assert info["segments"] == 1
    for r in recs:  # each run directory holds the log of its run
        log = (Path(r["run_dir"]) / "run.log").read_text()
        assert "record written" in log and r["identity"]["cell"] in log


# ------------------------------------------------------------------------------------- segments, files
def test_resumed_segments_add_up(tmp_path):
    from bench.runner import SEGMENTS_FILE, _start_segment, _train_info

    wd = tmp_path / "wd"
    wd.mkdir()
    segs = _start_segment(wd, fresh=False)  # a first segment, then the process dies
    t0 = segs[0]["start"]
    ckpt = wd / "ckpt.pt"
    ckpt.write_bytes(b"x")
    os.utime(ckpt, (t0 + 40.0, t0 + 40.0))  # its last checkpoint, 40 s in
    segs = _start_segment(wd, fresh=False)  # the resume
    assert segs[0]["interrupted"] and segs[0]["end"] == pytest.approx(t0 + 40.0)
    segs[-1]["end"] = segs[-1]["start"] + 2.5
    info = _train_info("k", segs)
    assert info["segments"] == 2 and info["wall_time_s"] == pytest.approx(42.5, abs=0.01)
    assert len(json.loads((wd / SEGMENTS_FILE).read_text())) == 2
    assert len(_start_segment(wd, fresh=True)) == 1  # force=true starts over


def test_files_follow_the_umask(tmp_path):
    from bench.io import write_json

    old = os.umask(0o002)
    try:
        assert os.stat(write_json(tmp_path / "a.json", {})).st_mode & 0o777 == 0o664
        os.umask(0o077)
        assert os.stat(write_json(tmp_path / "b.json", {})).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_hub_warnings_are_printed_once():
    code = (
        "import logging; from bench.cli import _setup_logging; _setup_logging(False); "
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.stderr.count("Retrying in 1s") == 1, out.stderr


def test_progress_logs_lines_when_stderr_is_not_a_terminal(caplog, monkeypatch):
    import logging

    from bench.progress import LogProgress, progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="bench.progress"):
        bar = progress(range(4), desc="synthetic pairs", unit="pair", every_s=0.0)
        assert isinstance(bar, LogProgress) and list(bar) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records if r.name == "bench.progress"]
    assert lines[0].startswith("synthetic pairs: 0/4 pair (0%") and lines[-1].startswith(
        "synthetic pairs: 4/4 pair (100%"
    )
    assert len(lines) == 5  # start + one per item (every_s=0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bench.progress"):
        bar = progress(total=100, desc="gen", every_s=3600)
        for _ in range(100):
            bar.update(1)
        bar.close()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["gen: 0/100 it", "gen: 100/100 it"]


def test_progress_of_a_resumed_loop_logs_rate_and_values(caplog, monkeypatch):
    """A training loop resumed at step 40 of 100 logs lines (not bar carriage returns) in a SLURM log: it starts
    at 40/100, its rate and ETA count only this process's steps, and the loop's values (loss, lr) follow."""
    import logging

    from bench.progress import LogProgress, progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    now = [0.0]
    monkeypatch.setattr("bench.progress.time.monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="bench.progress"):
        bar = progress(total=100, initial=40, desc="train", unit="step", every_s=3600)
        assert isinstance(bar, LogProgress)
        for _ in range(60):
            now[0] += 2.0  # 2 s a step
            bar.update(1)
            bar.set_postfix(loss="0.5", lr="1e-4", refresh=False)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "bench.progress"]
    assert lines[0] == "train: 40/100 step (40%, 0 s)"
    assert lines[-1] == "train: 100/100 step (100%, 120 s, 0.5 step/s, ~0 s left) loss=0.5 lr=1e-4"


# ------------------------------------------------------------------ issue 26.6: every input file by content
FILE_NAME_HINT = ("checkpoint", "ckpt", "weights", "file", "lpips")


def _schema_str_fields(schema, prefix):
    """Every string-valued key of a schema dataclass (nested ones walked), dotted."""
    import dataclasses
    import typing

    from bench import schema as sch

    out = []
    for key, f in sch._fields(schema).items():
        tp, _ = sch._strip_optional(f.type)
        if dataclasses.is_dataclass(tp):
            out += _schema_str_fields(tp, f"{prefix}.{key}")
        elif tp is str or tp is typing.Any:
            out.append((f"{prefix}.{key}", f))
    return out


def test_every_file_valued_schema_key_is_an_identity_input():
    """Walk the config schemas: a string key named like a file (checkpoint, weights, ...) must be marked as a
    file (bench.schema.file_input), i.e. enter the fingerprint by content; file_keys() lists exactly the marked ones."""
    from bench import schema as sch

    keys = sch.file_keys()
    nodes = [(s, "method") for s in sch.method_schemas().values()] + [
        (s, "task.protocol") for s in sch.PROTOCOLS.values()
    ]
    marked = set(sch.OTHER_FILE_KEYS)
    for node, prefix in nodes:
        for dotted, f in _schema_str_fields(node, prefix):
            leaf = dotted.rpartition(".")[2].lower()
            if f.metadata.get("input") == "file":
                marked.add(dotted)
            elif any(h in leaf for h in FILE_NAME_HINT):
                pytest.fail(
                    f"{dotted} looks file-valued but is not marked as a file in its schema (use bench.schema.file_input())"
                )
    assert (
        marked == set(keys) and {"method.reconstructor.checkpoint", "method.checkpoint", "backbone.weights"} <= marked
    )


def _with(cfg, dotted, value):
    from omegaconf import OmegaConf

    cfg = cfg.copy()
    OmegaConf.update(cfg, dotted, value, force_add=True)
    return cfg


def _method_for(dotted):
    """A method whose schema has the file key ``dotted`` (and the overrides that make it count)."""
    from bench import schema as sch

    if not dotted.startswith("method."):
        return "dinov2", []
    for name, node in sch.method_schemas().items():
        if dotted in sch.file_fields(node, "method"):
            extra = ["method.reconstructor.name=mvsplat"] if dotted == "method.reconstructor.checkpoint" else []
            return name, extra
    raise AssertionError(dotted)


@pytest.mark.parametrize("dotted", ["method.reconstructor.checkpoint", "method.checkpoint", "backbone.weights"])
def test_each_file_key_enters_by_content_under_any_spelling(dotted, tmp_path, monkeypatch):
    """For every file-valued key: two files with different bytes behind the same bare name give two cell
    fingerprints and two trained-backbone keys; the same bytes under a relative and an absolute spelling, one."""
    from bench import schema as sch
    from bench.identity import backbone_key

    assert dotted in sch.file_keys()
    method, extra = _method_for(dotted)
    base = compose([f"method={method}", "task=synth_depth", *paths(tmp_path), *extra])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.ckpt").write_bytes(b"weights A")
    a = _with(base, dotted, "w.ckpt")
    ident_a, key_a = cell_identity(a), backbone_key(a)
    assert cell_identity(_with(base, dotted, str(tmp_path / "w.ckpt")))["cell"] == ident_a["cell"]
    (tmp_path / "w.ckpt").write_bytes(b"weights B")
    os.utime(tmp_path / "w.ckpt", ns=(1, 1))  # another mtime: the digest memo sees a new file
    b = _with(base, dotted, "w.ckpt")
    assert cell_identity(b)["cell"] != ident_a["cell"] and cell_identity(b)["row"] != ident_a["row"]
    assert backbone_key(b) != key_a


@pytest.mark.slow
def test_two_mvsplat_files_give_two_fingerprints_and_depth_ignores_the_file(tmp_path):
    from bench.identity import backbone_key

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "re10k.ckpt").write_bytes(b"mvsplat A")
    (tmp_path / "b" / "re10k.ckpt").write_bytes(b"mvsplat B")
    ov = ["method=splat_distill", "task=synth_depth", *paths(tmp_path)]
    mv = [*ov, "method.reconstructor.name=mvsplat"]
    fa = compose([*mv, f"method.reconstructor.checkpoint={tmp_path}/a/re10k.ckpt"])
    fb = compose([*mv, f"method.reconstructor.checkpoint={tmp_path}/b/re10k.ckpt"])
    assert cell_identity(fa)["cell"] != cell_identity(fb)["cell"] and backbone_key(fa) != backbone_key(fb)
    # the depth reconstructor reads no checkpoint: any file, or none, is the same cell (the committed grid's case)
    depth = [
        compose([*ov, "method.reconstructor.name=depth", f"method.reconstructor.checkpoint={tmp_path}/{d}/re10k.ckpt"])
        for d in "ab"
    ]
    depth.append(compose([*ov, "method.reconstructor.name=depth", "method.reconstructor.checkpoint=null"]))
    assert len({cell_identity(c)["cell"] for c in depth}) == 1 and len({backbone_key(c) for c in depth}) == 1
