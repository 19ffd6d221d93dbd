"""The fault catalogue (docs/FAULTS.md), kept true: every row's id is a case below that provokes the fault
and asserts one `error: ...` line containing the row's text, exit 2, no traceback, no record written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.errors import BenchError

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


def paths(tmp: Path) -> list:
    return [
        f"paths.root={tmp}",
        f"paths.data_dir={tmp}/data",
        f"paths.results_dir={tmp}/results",
        f"paths.output_dir={tmp}/outputs",
        f"paths.cache_dir={tmp}/cache",
    ]


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
    raise KeyError(cid)


class NaNProbe:
    """A task whose probe (the real tasks.train_probe loop) diverges at once."""

    def evaluate(self, backbone, cfg, workdir):
        from tasks.train_probe import train_probe

        probe = torch.nn.Linear(1, 1)
        train_probe(
            probe,
            [torch.ones(1), torch.ones(1)],
            lambda b: probe(b).sum() * float("nan"),
            {"epochs": 1, "batch_size": 1, "lr": 1e-3},
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


def test_training_nan_without_clipping_suggests_it(tmp_path):
    from bench.errors import NonFiniteLossError
    from bench.train import TrainLoop

    m = torch.nn.Linear(1, 1)
    loop = TrainLoop(
        tmp_path, total_steps=2, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), state={"model": m}, progress=False
    )
    with pytest.raises(NonFiniteLossError, match="enable gradient clipping"):
        loop.run(lambda i: m(torch.ones(1)).sum() * float("nan"))


def test_the_real_cli_prints_one_line_and_no_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench", "run", "seed=abc", *paths(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if ln.strip()] == [
        "error: seed must be an integer, got 'abc'. Fix: pass seed=<integer>, e.g. seed=0"
    ]
