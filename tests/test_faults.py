"""The fault catalogue (docs/FAULTS.md), kept true: every row's id is a case below that provokes the fault
and asserts one `error: ...` line containing the row's text, exit 2, no traceback, no record written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from helpers import path_overrides as paths
from helpers import run_bench

ROOT = Path(__file__).resolve().parent.parent
FAULTS_MD = ROOT / "docs" / "FAULTS.md"


def catalogue() -> dict:
    """id -> the text its error line must contain (last backticked cell of each table row)."""
    out = {}
    for line in FAULTS_MD.read_text().splitlines():
        m = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|", line)
        if m:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out[m.group(1)] = re.findall(r"`([^`]+)`", cells[-1])
    return out


def _cli(*argv):
    return lambda: main(list(argv))


def _as_cli(fn):
    """Run ``fn`` and report a BenchError the way the CLI does."""

    def act():
        try:
            fn()
        except BenchError as e:
            print(f"error: {e.line()}", file=sys.stderr)
            return e.exit_code
        return 0

    return act


def _a_file(tmp: Path) -> Path:
    f = tmp / "a_file"
    f.write_text("not a directory")
    return f


def _read_only_dir(tmp: Path) -> Path:
    if os.geteuid() == 0:  # root writes through file modes: use a directory the kernel refuses
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("running as root and /sys/kernel is absent: no read-only directory to test with")
        return Path("/sys/kernel/bench_results")
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


TOY = ["method.name=dinov2", "backbone=tiny_vit", "task.name=toy_probe"]


def _case(cid: str, tmp: Path, monkeypatch, request):
    p = paths(tmp)
    run = lambda *a: _cli("run", *a, *p)  # noqa: E731
    if cid in SECURITY_CASES:
        return _security_case(cid, tmp, run)
    if cid.startswith("mvsplat-finetune-"):
        return _mvsplat_finetune_case(cid, tmp)
    if cid == "seed-not-int":
        return run("seed=abc")
    if cid == "seed-float":
        return run("seed=1.5")
    if cid == "device-unknown":
        return run("device=tpu")
    if cid == "steps-zero":
        return run("method=splat_distill", "method.optim.steps=0")
    if cid == "steps-negative":
        return run("method=splat_distill", "method.optim.steps=-5")
    if cid == "probe-epochs-zero":
        return run("task.protocols.linear.schedule.epochs=0")
    if cid == "probe-batch-zero":
        return run("task.protocols.linear.schedule.batch_size=0")
    if cid == "probe-groups-misfit":
        return run("task.protocols.linear.schedule.samples_per_gpu=3")
    if cid == "protocol-key-missing":
        return run("~task.protocols.linear.schedule.lr")
    if cid == "top-level-key-misspelt":
        return run("+devcie=cpu")
    if cid == "dataset-key-misspelt":
        return run("+task.dataset.limt=3")
    if cid == "hydra-key":
        return run("hydra.run.dir=/tmp/x")
    if cid == "image-below-stride":
        return run("method=dinov2", "backbone=tiny_vit", "task.dataset.size=8")
    if cid == "unknown-key":
        return run("method=splat_distill", "method.optim.stepz=3")
    if cid == "unknown-top-key":
        return run("sed=1")
    if cid == "unknown-method":
        return run("method=nope")
    if cid == "results-not-writable":
        return _cli("run", *TOY, *p, f"paths.results_dir={_read_only_dir(tmp)}")
    if cid == "results-file-in-way":
        return _cli("run", *TOY, *p, f"paths.results_dir={_a_file(tmp)}")
    if cid == "outputs-not-writable":
        return _cli("run", *TOY, *p, f"paths.output_dir={_a_file(tmp)}/x")
    if cid == "cache-not-writable":
        return _cli("run", "method=splat_distill", "backbone=tiny_vit", *p, f"paths.cache_dir={_a_file(tmp)}")
    if cid == "snd-checkpoint-missing":
        return run("method=splat_distill", "backbone=tiny_vit")
    if cid == "weights-missing":
        return run("backbone=tiny_vit", "backbone.weights=/nowhere.pth")
    if cid in ("hub-file-missing", "hub-offline-uncached"):
        hub = request.getfixturevalue("local_hub")
        hub.seed("org/tiny", {"model.safetensors": b"x"})
        if cid == "hub-offline-uncached":
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
            import huggingface_hub.constants as C

            monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
            return run("backbone=dinov2_vits14", "backbone.hub_repo=org/tiny")
        return run("backbone=tiny_vit", f"backbone.weights={hub.hf_ref('org/tiny', 'nope.safetensors')}")
    if cid == "dataset-missing":
        return run("method=dinov2", "backbone=tiny_vit", "task=nyu_depth", "task.dataset.root=/nowhere")
    if cid == "test-images-corrupt":
        from PIL import Image
        import numpy as np

        for sub in ("training", "validation"):
            for k in (1, 2):
                (tmp / "ade" / "images" / sub).mkdir(parents=True, exist_ok=True)
                (tmp / "ade" / "annotations" / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp / "ade" / "images" / sub / f"ADE_{k}.jpg")
                Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp / "ade" / "annotations" / sub / f"ADE_{k}.png")
        for k in (1, 2):
            (tmp / "ade" / "images" / "validation" / f"ADE_{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        return run("method=dinov2", "backbone=tiny_vit", "task=ade20k_seg", f"task.dataset.root={tmp}/ade")
    if cid == "sweep-bad-cell":
        return _cli(
            "sweep",
            "method=dinov2",
            "backbone=tiny_vit",
            "task=synth_depth,nyu_depth",
            *p,
            f"cluster.folder={tmp}/sweep",
        )
    if cid in ("record-empty", "record-list", "record-metric-text", "record-not-json"):
        runs = tmp / "results" / "runs"
        runs.mkdir(parents=True)
        (runs / "bad.json").write_text(
            {
                "record-empty": "{}",
                "record-list": "[1, 2]",
                "record-not-json": "{torn",
                "record-metric-text": '{"id": "x", "method": "m", "backbone": "b", '
                '"task": "t", "metrics": {"rmse": "abc"}}',
            }[cid]
        )
        return _cli("table", "--results", str(tmp / "results"))
    if cid in ("record-non-finite", "record-edited"):
        import json

        from bench import records

        rec = {"id": "x", "method": "m", "backbone": "b", "task": "t", "metrics": {"rmse": 1.0}}
        if cid == "record-edited":
            rec = records.seal(rec)
            rec["metrics"]["rmse"] = 0.5  # a better number typed in by hand
        else:
            rec["metrics"]["rmse"] = float("nan")
        runs = tmp / "results" / "runs"
        runs.mkdir(parents=True)
        (runs / "bad.json").write_text(json.dumps(rec))
        return _cli("table", "--results", str(tmp / "results"))
    if cid == "table-no-dir":
        return _cli("table", "--results", "nowhere")  # relative to tmp (the test's cwd)
    if cid == "cached-model-corrupt":
        from bench.config import compose
        from bench.runner import MODEL_FILE, backbone_dir

        ov = [
            "method.name=toy_train",
            "backbone=tiny_vit",
            "task.name=toy_probe",
            "+method.steps=1",
            "+method.sleep_s=0",
            *p,
        ]
        model = backbone_dir(compose(ov)) / MODEL_FILE
        model.parent.mkdir(parents=True)
        model.write_bytes(b"\x00garbage, not safetensors")
        return _cli("run", *ov)
    if cid == "feature-cache-corrupt":
        from tasks.features import FeatureCache, FeatureSpec

        cache = FeatureCache(tmp / "features", "tiny_vit", "0123456789", FeatureSpec(layers=(0,)), {}, {})
        cache.dir.mkdir(parents=True)
        cache.path(0).write_bytes(b"torn")
        return _as_cli(lambda: cache.load(0))
    if cid == "late-results-failure":
        from bench import records

        def full_disk(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(records, "write_record", full_disk)
        return _cli("run", *TOY, *p)
    if cid == "probe-nan":
        return _cli("run", "method.name=dinov2", "backbone=tiny_vit", "task.name=nan_probe", *p)
    if cid == "train-nan-clip-on":
        from bench.train import TrainLoop

        def diverge():
            m = torch.nn.Linear(1, 1)
            loop = TrainLoop(
                tmp / "wd",
                total_steps=2,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                state={"model": m},
                grad_clip=1.0,
                progress=False,
            )
            loop.run(lambda i: m(torch.ones(1)).sum() * float("nan"))

        return _as_cli(diverge)
    if cid == "failed-run-error-file":

        def failing_run():
            try:
                main(["run", "method.name=dinov2", "backbone=tiny_vit", "task.name=toy_fail", *p])
            except RuntimeError:
                err = next((tmp / "outputs").rglob("error.txt"))
                assert "toy_fail fails on purpose" in (err.parent / "run.log").read_text()
                raise BenchError(err.read_text().splitlines()[0]) from None

        return _as_cli(failing_run)
    extra = _case_issue27(cid, tmp, monkeypatch, p, run)
    if extra is not None:
        return extra
    raise KeyError(cid)


# ------------------------------------------------------------------ issue 27: disk, values, images, sweeps, figures
SYNTH_TINY = [
    "method=dinov2",
    "backbone=tiny_vit",
    "task=synth_depth",
    "task.dataset.scenes=2",
    "task.dataset.views=2",
    "task.dataset.size=28",
    "task.dataset.held_out=1",
    "task.progress=false",
]
TOY_TRAIN = [
    "method.name=toy_train",
    "backbone=tiny_vit",
    "task.name=toy_probe",
    "+method.steps=2",
    "+method.sleep_s=0",
]


def _disk_free(monkeypatch, free: int) -> None:
    """Every file system reports ``free`` bytes free (shutil.disk_usage, as bench.preflight reads it)."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def _ade(tmp: Path, corrupt_train: int = 0) -> Path:
    """A tiny ADE20K in its real layout (2 training, 2 validation images); the first ``corrupt_train``
    training JPEGs truncated to half their bytes."""
    from PIL import Image
    import numpy as np

    root = tmp / "ade"
    rng = np.random.default_rng(0)
    for sub in ("training", "validation"):
        for k in (1, 2):
            (root / "images" / sub).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / sub).mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "images" / sub / f"ADE_{k}.jpg", quality=95)
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "annotations" / sub / f"ADE_{k}.png")
    for k in range(1, corrupt_train + 1):
        f = root / "images" / "training" / f"ADE_{k}.jpg"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return root


def _case_issue27(cid: str, tmp: Path, monkeypatch, p: list, run):
    if cid == "cache-not-writable-frozen":
        return _cli("run", *TOY, *p, f"paths.cache_dir={_read_only_dir(tmp)}")
    if cid == "data-dir-not-writable":
        return _cli("run", *TOY, *p, f"paths.data_dir={_read_only_dir(tmp)}")
    if cid == "reconstructor-checkpoint-missing":
        return run(
            "method=splat_distill",
            "backbone=tiny_vit",
            "method.reconstructor.name=learned",
            "method.reconstructor.checkpoint=/nowhere.safetensors",
        )
    if cid == "disk-space-checkpoints":
        _disk_free(monkeypatch, 1000)
        return _cli("run", *TOY_TRAIN, *p)
    if cid == "disk-space-features":
        _disk_free(monkeypatch, 1000)
        return _cli("run", *SYNTH_TINY, *p)
    if cid == "disk-full-features-late":
        from bench import io as bench_io
        import tasks.features as features_mod

        calls = {"n": 0}

        def fills_up(obj, path):  # the first sample is written, then the disk is full
            calls["n"] += 1
            if calls["n"] > 1:
                raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 768 vs 662")
            return bench_io.torch_save(obj, path)

        monkeypatch.setattr(features_mod, "torch_save", fills_up)
        return _cli("run", *SYNTH_TINY, *p)
    if cid == "disk-full-backbone-late":
        import bench.backbones as backbones

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(backbones, "save_backbone", full)
        return _cli("run", *TOY_TRAIN, *p)
    if cid == "seed-out-of-range":
        return run("seed=-1")
    if cid == "seed-too-large":
        return run(f"seed={2**32}")
    if cid == "probe-lr-not-positive":
        return run("task.protocols.linear.schedule.lr=-0.001")
    if cid == "dataset-limit-zero":
        return run("task.dataset.limit=0")
    if cid == "held-out-zero":
        return run("task.dataset.held_out=0")
    if cid == "held-out-all-scenes":
        return run("task.dataset.held_out=24")
    if cid == "synthetic-size-memory":
        return run("task.dataset.size=60000")
    if cid == "synthetic-size-memory-data":
        return _cli("data", "synthetic", "--size", "60000", "60000", "--out", str(tmp / "data" / "huge"))
    if cid == "train-images-corrupt":
        root = _ade(tmp, corrupt_train=1)
        return run("method=dinov2", "backbone=tiny_vit", "task=ade20k_seg", f"task.dataset.root={root}")
    if cid == "sweep-folder-taken":
        from bench import sweep

        old = sweep.Sweep.create(sweep.make_plan([*TOY, *p, f"cluster.folder={tmp}/taken"]))
        for j in old.jobs.values():  # an earlier sweep that is over (so its cells are not claimed)
            j.state = "failed"
        old.save()
        return _cli("sweep", *TOY, *p, f"cluster.folder={tmp}/taken")
    if cid == "prerequisites-all-at-once":
        return run(
            "method=dinov2",
            "backbone=tiny_vit",
            "backbone.weights=/nowhere.pth",
            "task=nyu_depth",
            "task.dataset.root=/nowhere",
        )
    if cid == "sweep-prerequisites-all-at-once":
        return _cli(
            "sweep",
            "method=dinov2",
            "backbone=tiny_vit",
            "task=synth_depth,nyu_depth,ade20k_seg",
            *p,
            f"cluster.folder={tmp}/sweep",
        )
    if cid == "figures-grid-elsewhere":
        import shutil

        committed = sorted((ROOT / "results" / "runs").glob("*_splat_distill_efficientnet_lite0_synth_depth_s0.json"))
        if not committed:
            pytest.skip("no committed splat_distill record to draw from")
        made = Path(json.loads(committed[-1].read_text())["checkpoint"]["path"])
        if made.is_absolute() and made.is_file():  # this is the machine that made the committed grid
            pytest.skip(f"the committed record's backbone is on this machine ({made}): not a grid made elsewhere")
        (tmp / "committed" / "runs").mkdir(parents=True)
        shutil.copy(committed[-1], tmp / "committed" / "runs")
        return _cli("figures", "--results", str(tmp / "committed"), "--out", str(tmp / "figs"))
    return None


class NaNProbe:
    """A task whose probe (the real tasks.train_probe loop) diverges at once."""

    def evaluate(self, backbone, cfg, workdir):
        from tasks.train_probe import train_probe

        probe = torch.nn.Linear(1, 1)
        train_probe(
            probe,
            [torch.ones(1), torch.ones(1)],
            lambda b: probe(b).sum() * float("nan"),
            {
                "epochs": 1,
                "batch_size": 1,
                "lr": 1e-3,
                "weight_decay": 0.01,
                "betas": [0.9, 0.999],
                "decay": "constant",
                "shape": "sequential",
                "warmup": 0,
                "warmup_start": 1.0,
                "min_factor": 1.0,
                "shuffle": True,
            },
            progress=False,
        )
        return {"m": 1.0}


@pytest.fixture
def nan_task():
    from bench.registry import TASKS

    TASKS.register("nan_probe", "test: a probe loss that is NaN")(NaNProbe)
    yield
    TASKS._entries.pop("nan_probe", None)


CASES = sorted(catalogue())


def test_catalogue_and_cases_agree():
    assert len(CASES) >= 25 and all(catalogue()[c] for c in CASES), catalogue()
    src = Path(__file__).read_text()
    for cid in CASES:
        assert f'"{cid}"' in src, f"docs/FAULTS.md lists {cid} but tests/test_faults.py has no case for it"


@pytest.mark.slow
@pytest.mark.parametrize("cid", CASES)
def test_fault(cid, tmp_path, monkeypatch, capsys, toys, nan_task, request):
    monkeypatch.chdir(tmp_path)
    for var in ("BENCH_RESULTS", "BENCH_OUTPUTS", "BENCH_CACHE", "BENCH_DATA", "BENCH_ROOT"):
        monkeypatch.delenv(var, raising=False)
    act = _case(cid, tmp_path, monkeypatch, request)
    rc = act()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert "Traceback" not in err
    for needle in catalogue()[cid]:
        if needle not in ("delete", "table", "run method=<trained> ..."):
            assert needle in lines[0], (needle, lines[0])
    assert "Fix: " in lines[0] or cid == "failed-run-error-file"
    runs = tmp_path / "results" / "runs"
    assert not runs.exists() or all(p.name == "bad.json" for p in runs.glob("*.json")), "a record was written"
    if cid == "sweep-bad-cell":
        assert not (tmp_path / "sweep").exists()
    if cid == "table-no-dir":
        assert not (tmp_path / "nowhere").exists()
    if cid == "late-results-failure":
        saved = list((tmp_path / "outputs").rglob("record.json"))
        assert len(saved) == 1 and str(saved[0]) in lines[0]
    if cid in ("train-nan-clip-on",):
        assert "gradient clipping" not in lines[0]
    _assert_issue27(cid, tmp_path, err, lines[0])


def _assert_issue27(cid: str, tmp: Path, err: str, line: str) -> None:
    """What each issue-27 case must leave behind (nothing partial; what was produced is kept, and where)."""
    cache = tmp / "cache"
    if cid in ("disk-space-checkpoints", "disk-space-features"):
        assert "is free there" in line and "needs about" in line
        assert not list(cache.rglob("*.pt")) and not list(cache.rglob("model.safetensors"))
    if cid == "disk-full-features-late":
        kept = list((cache / "features").rglob("*.pt"))
        assert len(kept) == 1 and str(kept[0].parent) in line and not list(cache.rglob(".*.tmp"))
    if cid == "disk-full-backbone-late":
        ckpts = list((cache / "backbones").rglob("ckpt_*.pt"))
        assert ckpts and str(ckpts[0].parent) in line and not list(cache.rglob("model.safetensors"))
    if cid in ("synthetic-size-memory", "synthetic-size-memory-data"):
        assert not (tmp / "data" / "huge").exists() and not list((tmp / "data").rglob("meta.json"))
    if cid == "train-images-corrupt":
        assert str(tmp / "ade" / "images" / "training" / "ADE_1.jpg") in line
    if cid == "sweep-folder-taken":
        assert "or omit it" not in line
    if cid == "prerequisites-all-at-once":
        listed = [ln for ln in err.splitlines() if ln.startswith("  - ")]
        assert len(listed) == 2 and "dataset 'nyuv2' is not prepared" in listed[0], err
        assert "backbone weights file not found: /nowhere.pth" in listed[1] and all("Fix: " in ln for ln in listed)
    if cid == "sweep-prerequisites-all-at-once":
        listed = [ln for ln in err.splitlines() if ln.startswith("  - ")]
        assert [("nyuv2" in ln, "ade20k" in ln) for ln in listed] == [(True, False), (False, True)], err
        assert not (tmp / "sweep").exists()
    if cid == "figures-grid-elsewhere":
        _assert_grid_command_runs(tmp, line)


def _assert_grid_command_runs(tmp: Path, line: str) -> None:
    """The sweep the figures error prints plans the record's cell to RUN (the same sweep into the committed
    results directory skips it), and draws from the directory it fills."""
    from bench import sweep

    cmd = line.split("running the same grid: ", 1)[1]
    sweep_cmd, figures_cmd = cmd.split(", then ")
    ov = sweep_cmd.split()[4:]
    new = next(o.split("=", 1)[1] for o in ov if o.startswith("paths.results_dir="))
    assert new == f"{tmp}/committed_local" and figures_cmd.endswith(f"--results {new}")
    ov = [o for o in ov if not o.startswith("cluster=")] + [f"paths.cache_dir={tmp}/cache", f"paths.data_dir={tmp}/d"]
    here = sweep.make_plan(ov)
    there = sweep.make_plan(
        [o for o in ov if not o.startswith("paths.results_dir=")] + [f"paths.results_dir={tmp}/committed"]
    )
    assert [c.skip for c in there.cells] == [True] and [c.skip for c in here.cells] == [False]


def test_training_nan_without_clipping_suggests_it(tmp_path):
    from bench.errors import NonFiniteLossError
    from bench.train import TrainLoop

    m = torch.nn.Linear(1, 1)
    loop = TrainLoop(
        tmp_path, total_steps=2, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), state={"model": m}, progress=False
    )
    with pytest.raises(NonFiniteLossError, match="enable gradient clipping"):
        loop.run(lambda i: m(torch.ones(1)).sum() * float("nan"))


@pytest.mark.slow
def test_the_real_cli_prints_one_line_and_no_traceback(tmp_path):
    out = run_bench("run", "seed=abc", *paths(tmp_path), cwd=None, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if ln.strip()] == [
        "error: seed must be an integer, got 'abc'. Fix: pass seed=<integer>, e.g. seed=0"
    ]


# ---------------------------------------------------------------- issue 27.7: results directory, code version
def test_table_honours_bench_results(tmp_path, monkeypatch, capsys):
    """`bench table` without --results writes the leaderboard of $BENCH_RESULTS, not ./results."""
    from bench import records

    res = tmp_path / "elsewhere"
    rec = {"id": "r0", "method": "dinov2", "backbone": "b", "task": "t", "metrics": {"rmse": 0.25}}
    records.write_record(res, rec)
    (tmp_path / "results").mkdir()  # the checkout's committed results: must stay untouched
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_RESULTS", str(res))
    assert main(["table"]) == 0
    assert "## t " in (res / "leaderboard.md").read_text()  # the record of $BENCH_RESULTS is on it
    assert not (tmp_path / "results" / "leaderboard.md").exists()
    monkeypatch.delenv("BENCH_RESULTS")
    monkeypatch.setenv("BENCH_ROOT", str(tmp_path / "root"))
    assert records.default_results_dir() == str(tmp_path / "root" / "results")  # as paths.results_dir


def test_dirty_flag_counts_tracked_source_files_only(tmp_path):
    """A rewritten leaderboard, a new record or an untracked file is not a code change; an edited source is."""
    import shutil

    from bench import records

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "bench" / "x.py").write_text("A = 1\n")
    (repo / "results" / "leaderboard.md").write_text("# old\n")

    def git(*a):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo, check=True, capture_output=True
        )

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    clean = records.code_version(repo / "bench")
    assert re.fullmatch(r"[0-9a-f]{12}", clean), clean
    (repo / "results" / "leaderboard.md").write_text("# rewritten by bench table\n")
    (repo / "results" / "new_record.json").write_text("{}")
    (repo / "bench" / "scratch.py").write_text("untracked\n")
    assert records.code_version(repo / "bench") == clean
    (repo / "bench" / "x.py").write_text("A = 2\n")
    assert records.code_version(repo / "bench") == clean + "-dirty"


# ------------------------------------------------------------------ issue 27: behaviours that are not errors
@pytest.mark.slow
def test_dry_run_lists_missing_prerequisites_as_warnings(tmp_path, capsys, monkeypatch):
    """README's SLURM --dry-run in a fresh clone: the plan is printed and every missing prerequisite is a
    warning (exit 0, nothing written); the same sweep for real is refused with all of them."""
    monkeypatch.chdir(tmp_path)
    ov = [
        "method=dinov2",
        "backbone=tiny_vit",
        "backbone.weights=/nowhere.pth",
        "task=nyu_depth,ade20k_seg",
        *paths(tmp_path),
        f"cluster.folder={tmp_path}/sweep",
    ]
    assert main(["sweep", *ov, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "2 cells, 2 to run" in out and "eval:dinov2-tiny_vit-nyu_depth-s0" in out
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert any("dataset 'nyuv2' is not prepared" in w for w in warnings), err
    assert any("dataset 'ade20k' is not prepared" in w for w in warnings), err
    assert any("backbone weights file not found: /nowhere.pth" in w for w in warnings), err
    assert "error:" not in err and not (tmp_path / "sweep").exists()
    assert main(["sweep", *ov]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 prerequisites of this run are missing") and err.count("\n  - ") == 3


@pytest.mark.slow
def test_second_sweep_skips_what_a_live_sweep_runs(toys, tmp_path, capsys, monkeypatch):
    """A sweep that is running (its driver alive, jobs not over) claims its cells: a second sweep of the
    same grid plans them as skipped, names the sweep they run in, and runs nothing; once the first is over
    its claim is dropped. Two sweeps planned in the same second get two folders."""
    from bench import sweep
    from bench.cluster import TERMINAL

    monkeypatch.chdir(tmp_path)
    ov = [
        "method.name=dinov2,toy_train",
        "backbone=tiny_vit",
        "task.name=toy_probe",
        "+method.steps=2",
        *paths(tmp_path),
    ]
    with sweep.planner_lock(tmp_path / "cache"):
        first = sweep.Sweep.create(sweep.make_plan(ov, busy=sweep.busy_cells(tmp_path / "cache")))
    claims = list((tmp_path / "cache" / "sweeps").glob("*.json"))
    assert len(claims) == 1 and first.folder.parent == tmp_path / "outputs" / "sweeps"

    assert main(["sweep", *ov]) == 0  # its driver (this process) is alive and no job is over
    out = capsys.readouterr().out
    assert "2 cells, 0 to run, 2 skipped" in out and f"running in the live sweep {first.folder.absolute()}" in out
    assert "nothing to run here: 2 cell(s) are running" in out
    assert sorted(p.name for p in first.folder.parent.iterdir()) == [first.folder.name]  # no second sweep

    same_second = sweep.make_plan(ov)  # the default folder of this second, planned again
    same_second.folder = str(first.folder)
    second = sweep.Sweep.create(same_second)
    assert second.folder == first.folder.with_name(first.folder.name + "-1")

    for s in (first, second):
        for j in s.jobs.values():
            j.state = "done"
        s.save()
    assert sweep.busy_cells(tmp_path / "cache") == {} and not list((tmp_path / "cache" / "sweeps").glob("*.json"))
    assert all(j.state in TERMINAL for j in first.jobs.values())
    assert "2 to run" in sweep.plan_table(sweep.make_plan(ov, busy=sweep.busy_cells(tmp_path / "cache")))


def test_training_split_is_verified_once(tmp_path, monkeypatch):
    """Every training and test image is decoded before work (in parallel); a clean split is remembered by
    its content manifest under <cache_dir>/verified/, so a second process decodes nothing; a changed file
    is decoded again."""
    from bench import preflight
    from bench.config import compose

    root = _ade(tmp_path)
    cfg = compose(
        ["method=dinov2", "backbone=tiny_vit", "task=ade20k_seg", f"task.dataset.root={root}", *paths(tmp_path)]
    )
    decoded = []
    real = preflight.decode_check
    monkeypatch.setattr(preflight, "decode_check", lambda p: decoded.append(p) or real(p))
    monkeypatch.setattr(preflight, "_VERIFIED", set())
    preflight.check_test_images(cfg)
    assert len(decoded) == 8  # 2 images + 2 label maps per split, both splits
    assert len(list((tmp_path / "cache" / "verified").glob("ade20k-*.json"))) == 2

    monkeypatch.setattr(preflight, "_VERIFIED", set())  # a new process: only the cache remembers
    decoded.clear()
    preflight.check_test_images(cfg)
    assert decoded == []

    monkeypatch.setattr(preflight, "_VERIFIED", set())
    bad = root / "images" / "training" / "ADE_2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # changed content: a new manifest, decoded again, refused
    with pytest.raises(BenchError, match=r"1 training image\(s\) of dataset 'ade20k' cannot be decoded: .*ADE_2.jpg"):
        preflight.check_test_images(cfg)
    assert len(decoded) == 4  # the training split only: the test split's manifest did not change


@pytest.mark.slow
def test_sweep_started_while_another_plans_waits_then_skips(toys, tmp_path, capsys, monkeypatch):
    """Two sweeps of one grid started together: the second waits for the planner lock the first holds
    (flock: also between threads of one process), then finds the first's claim and runs nothing."""
    import threading

    from bench import sweep

    monkeypatch.chdir(tmp_path)
    ov = ["method.name=dinov2", "backbone=tiny_vit", "task.name=toy_probe", *paths(tmp_path)]
    cache, planning = tmp_path / "cache", threading.Event()
    made = {}

    def first():
        with sweep.planner_lock(cache):
            plan = sweep.make_plan(ov, busy=sweep.busy_cells(cache))
            planning.set()
            time.sleep(1.0)  # the second sweep starts meanwhile
            made["sweep"] = sweep.Sweep.create(plan)

    t = threading.Thread(target=first)
    t.start()
    planning.wait(60)
    assert main(["sweep", *ov]) == 0
    t.join()
    out, err = capsys.readouterr()
    assert "another sweep is being planned; waiting for it" in err
    assert "1 cells, 0 to run" in out and f"running in the live sweep {made['sweep'].folder.absolute()}" in out
    assert len(list((tmp_path / "outputs" / "sweeps").iterdir())) == 1


# ------------------------------------------------ pickled inputs and what a path is (issue 27, items 1 and 8)
SECURITY_CASES = (
    "weights-pickle-code",
    "official-pickle-code",
    "mef-pickle-code",
    "reconstructor-pickle-code",
    "nyu-pickle-code",
    "weights-is-directory",
    "table-results-is-file",
    "dataset-root-is-file",
)


def _security_case(cid: str, tmp: Path, run):
    """Malicious pickles (their ``__reduce__`` would create ``tmp/marker``) and paths of the wrong kind."""
    from test_security import _write

    evil = lambda name: _write("zip", "exec", tmp / name, tmp / "marker")  # noqa: E731
    if cid == "weights-pickle-code":
        return run(*TOY, f"backbone.weights={evil('weights.pth')}")
    if cid == "official-pickle-code":
        return run(
            "method=snd_official", "backbone=tiny_vit", "task.name=toy_probe", f"method.checkpoint={evil('s.pth')}"
        )
    if cid == "mef-pickle-code":
        return run(
            "method=mef_official", "backbone=tiny_vit", "task.name=toy_probe", f"method.checkpoint={evil('m.ckpt')}"
        )
    if cid == "reconstructor-pickle-code":
        from methods.splat_distill.mvsplat import MVSplatEncoder

        path = evil("re10k.ckpt")
        return _as_cli(lambda: MVSplatEncoder.from_checkpoint(path))
    if cid == "nyu-pickle-code":
        from test_readers import make_nyu_probe3d

        make_nyu_probe3d(tmp / "data" / "nyuv2")
        _write("raw4", "exec", tmp / "data" / "nyuv2" / "nyuv2_snorm_all.pkl", tmp / "marker")
        return run("method.name=dinov2", "backbone=tiny_vit", "task=nyu_normals")
    if cid == "weights-is-directory":
        (tmp / "weights_dir").mkdir()
        return run(*TOY, f"backbone.weights={tmp / 'weights_dir'}")
    if cid == "table-results-is-file":
        return _cli("table", "--results", str(_a_file(tmp)))
    if cid == "dataset-root-is-file":
        return run("method=dinov2", "backbone=tiny_vit", "task=nyu_depth", f"task.dataset.root={_a_file(tmp)}")
    raise KeyError(cid)


@pytest.mark.slow
def test_no_case_ran_pickled_code(tmp_path, monkeypatch, capsys, toys, nan_task, request):
    """Every pickle case above, once more: the marker its payload would create never appears."""
    for cid in SECURITY_CASES[:5]:
        case_dir = tmp_path / cid
        case_dir.mkdir()
        monkeypatch.chdir(case_dir)
        assert _case(cid, case_dir, monkeypatch, request)() == 2
        assert not (case_dir / "marker").exists(), cid
    capsys.readouterr()


# ------------------------------------------------------------- faults handled without an error (quiet table)
def quiet_catalogue() -> list:
    """The ids of the "Handled without an error" table of docs/FAULTS.md (first cell, plain text)."""
    text = FAULTS_MD.read_text().split("## Handled without an error", 1)[-1].split("\n## ", 1)[0]
    return [c for c in re.findall(r"^\|\s*([a-z][a-z0-9-]*)\s*\|", text, flags=re.M) if c != "id"]


def test_quiet_catalogue_has_tests():
    ids = quiet_catalogue()
    assert len(ids) >= 3, ids
    for cid in ids:
        assert callable(globals().get("test_quiet_" + cid.replace("-", "_"))), f"no test for quiet case {cid}"


@pytest.mark.slow
def test_quiet_stale_temp_files(tmp_path):
    """A writer SIGKILLed mid-write leaves ``.<name>.<host>-<pid>.<rand>.tmp``; the next write into that
    directory removes it once stale (dead pid, unchanged for STALE_AFTER_S), and nothing else."""
    import signal
    import time

    from bench import io

    d = tmp_path / "runs"
    code = (
        "import sys, time; from bench.io import write_with\n"
        "def slow(p):\n    p.write_bytes(b'partial'); print('writing', flush=True); time.sleep(60)\n"
        f"write_with({str(d / 'rec.json')!r}, slow)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.stdout.readline().strip() == b"writing"
    (dead,) = list(d.glob(".rec.json.*.tmp"))
    assert f"-{proc.pid}." in dead.name
    alive_tmp = d / f".other.json.{io._host()}-{os.getpid()}.abcd1234.tmp"  # a live writer (this process)
    alive_tmp.write_bytes(b"x")
    foreign = d / ".notes.tmp"  # not bench's pattern
    foreign.write_bytes(b"x")
    old = time.time() - io.STALE_AFTER_S - 60
    for f in (alive_tmp, foreign):
        os.utime(f, (old, old))
    assert io.remove_stale_temps(d) == []  # the killed writer's file is still its own while it runs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert io.remove_stale_temps(d) == []  # dead, but written a moment ago: not yet stale
    os.utime(dead, (old, old))
    io._SWEPT.discard(os.path.abspath(d))
    io.write_json(d / "next.json", {"a": 1})  # the next write into the directory sweeps it
    assert not dead.exists() and alive_tmp.exists() and foreign.exists()
    assert sorted(p.name for p in d.iterdir()) == sorted([alive_tmp.name, foreign.name, "next.json"])


def test_quiet_recipe_label_markdown(tmp_path):
    """A recipe label with ``|``, HTML and backticks stays one literal cell of the leaderboard table."""
    import json

    from bench.table import leaderboard_markdown, md_text

    assert md_text("a|b <i>&`x`") == "a\\|b &lt;i&gt;&amp;\\`x\\`"
    runs = tmp_path / "runs"
    runs.mkdir()
    label = "my|recipe <b>bold</b> & `code`"
    rec = {
        "id": "r1",
        "method": "dinov2",
        "backbone": "tiny_vit",
        "task": "toy_probe",
        "seed": 0,
        "metrics": {"rmse": 1.0},
        "identity": {"cell": "c" * 16, "row": "d" * 16, "short": "dddddddd", "label": label},
    }
    (runs / "r1.json").write_text(json.dumps(rec))
    md = leaderboard_markdown(tmp_path)
    row = next(line for line in md.splitlines() if "recipe &lt;b&gt;" in line)
    assert "<b>" not in md and "my\\|recipe" in row
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    unescaped = lambda line: len(re.findall(r"(?<!\\)\|", line))  # noqa: E731
    assert unescaped(row) == unescaped(header)  # the label did not add a column


def test_quiet_lightning_foreign_objects(tmp_path):
    """A Lightning .ckpt whose hyper-parameters hold classes outside the allow-list still loads its
    state dict as backbone weights; the foreign objects are inert placeholders, never run."""
    import argparse

    from bench.checkpoint import read_state_dict
    from test_security import _Exec

    sd = {"w": torch.randn(2, 3), "b": torch.zeros(2)}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": {"a": argparse.Namespace(x=1), "e": _Exec(tmp_path / "m")}}, path)
    got = read_state_dict(path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not (tmp_path / "m").exists()


def _mvsplat_finetune_case(cid: str, tmp: Path):
    """``pretrain-reconstructor model=mvsplat`` with a missing input: refused in preflight, nothing written."""
    ckpt = tmp / "re10k.ckpt"
    ckpt.write_bytes(b"only its existence is checked before the VGG file")
    argv = ["pretrain-reconstructor", "model=mvsplat", "--size", "32", "32", "--out", str(tmp / "ft.safetensors")]
    if cid == "mvsplat-finetune-scannetpp-missing":
        return _cli(*argv, "--checkpoint", str(ckpt), "--lpips-vgg", str(ckpt), "--root", "/nowhere/scannetpp")
    argv += ["--dataset", "synthetic"]
    if cid == "mvsplat-finetune-no-checkpoint":
        return _cli(*argv, "--lpips-vgg", str(ckpt))
    if cid == "mvsplat-finetune-checkpoint-missing":
        return _cli(*argv, "--checkpoint", "/nowhere/re10k.ckpt", "--lpips-vgg", str(ckpt))
    if cid == "mvsplat-finetune-vgg-missing":
        return _cli(*argv, "--checkpoint", str(ckpt), "--lpips-vgg", "/nowhere/vgg16.pth")
    raise AssertionError(cid)


def test_mvsplat_finetune_faults_write_nothing(tmp_path, capsys):
    for cid in ("mvsplat-finetune-no-checkpoint", "mvsplat-finetune-vgg-missing"):
        assert _mvsplat_finetune_case(cid, tmp_path)() == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["re10k.ckpt"]
