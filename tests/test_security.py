"""A checkpoint or data pickle never runs code (bench/safe_pickle.py, docs/FAULTS.md "Pickled inputs").

Each malicious file's ``__reduce__`` would create a marker file when unpickled by plain ``pickle`` /
``torch.load(weights_only=False)``; given as every checkpoint input bench reads, the marker must never
appear and the run must end with one ``error:`` line, exit 2, no traceback."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.errors import BenchError, CheckpointError
from bench.safe_pickle import PickleRefused, Skipped, load_plain_pickle, load_torch
from helpers import run_bench

ROOT = Path(__file__).resolve().parent.parent


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # builtins.exec: not on torch's block list, so only an allow-list stops it
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Popen:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


class HParams(dict):
    """A dict subclass, as Lightning's AttributeDict: SETITEMS on a target that is not a dict."""


PAYLOADS = {"exec": _Exec, "system": _System, "popen": _Popen}


def _write(kind: str, payload: str, path: Path, marker: Path) -> Path:
    """A malicious file: ``zip`` = torch.save of the payload object, ``raw2``/``raw4`` = a plain pickle."""
    obj = PAYLOADS[payload](marker)
    if kind == "zip":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(kind[-1]))
    return path


FORMATS = [(k, p) for k in ("zip", "raw2", "raw4") for p in PAYLOADS]


def test_the_payloads_do_run_under_plain_pickle(tmp_path):
    """Guard: the fixtures are real exploits (plain pickle.load runs them), so the tests below can fail."""
    for kind, payload in FORMATS:
        if kind == "zip":
            continue
        marker = tmp_path / f"m_{kind}_{payload}"
        with open(_write(kind, payload, tmp_path / f"{kind}_{payload}.pkl", marker), "rb") as f:
            pickle.load(f)
        assert marker.exists(), (kind, payload)


@pytest.mark.parametrize("kind,payload", FORMATS)
def test_load_torch_refuses_and_runs_nothing(kind, payload, tmp_path):
    marker = tmp_path / "marker"
    path = _write(kind, payload, tmp_path / "evil.pt", marker)
    with pytest.raises(PickleRefused) as e:
        load_torch(path)
    msg = str(e.value)
    assert not marker.exists()
    assert "\n" not in msg and "weights_only" not in msg and "add_safe_globals" not in msg, msg
    assert {"exec": "exec", "system": "system", "popen": "call"}[payload] in msg, msg


@pytest.mark.parametrize("kind,payload", FORMATS)
def test_plain_pickle_reader_refuses_and_runs_nothing(kind, payload, tmp_path):
    marker = tmp_path / "marker"
    path = _write(kind, payload, tmp_path / "evil.pkl", marker)
    with pytest.raises(PickleRefused):
        load_plain_pickle(path, numpy=True)
    assert not marker.exists()


def test_lightning_checkpoint_keeps_its_tensors_and_skips_the_rest(tmp_path):
    """A Lightning-style .ckpt: state_dict beside hyper-parameters, callbacks and scheduler state holding
    classes outside the allow-list (one of them an exploit): tensors load bit-exactly, the rest is inert."""
    import argparse
    import collections

    marker = tmp_path / "marker"
    sd = collections.OrderedDict(
        w=torch.randn(3, 4)[:, 1:],  # a strided view: storage offset and strides survive
        h=torch.arange(5, dtype=torch.int64),
        b=torch.randn(2).to(torch.bfloat16),
        p=torch.nn.Parameter(torch.ones(2)),
    )
    shared = torch.arange(8.0)
    ckpt = {
        "epoch": 3,
        "state_dict": sd,
        "views": [shared[:4], shared[4:]],
        "hyper_parameters": {"args": argparse.Namespace(lr=1e-4), "extra": HParams(a=1), "evil": _Exec(marker)},
        "callbacks": {"ModelCheckpoint": {"dirpath": Path("/x"), "best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]}],
        "misc": ({1, 2}, frozenset({3}), b"bytes", 1.5 + 2j, torch.float16, torch.device("cpu"), torch.Size([2])),
    }
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # torch's own allow-list refuses this file ...
        torch.load(path, weights_only=True)
    out = load_torch(path)  # ... bench reads its tensors, skipping the rest
    assert not marker.exists()
    for k, v in sd.items():
        assert torch.equal(out["state_dict"][k], v) and out["state_dict"][k].dtype == v.dtype, k
    assert isinstance(out["state_dict"]["p"], torch.nn.Parameter) and out["epoch"] == 3
    assert torch.equal(out["views"][1], torch.arange(4.0, 8.0))
    assert out["views"][0].untyped_storage().data_ptr() == out["views"][1].untyped_storage().data_ptr()
    assert all(isinstance(out["hyper_parameters"][k], Skipped) for k in ("args", "extra", "evil"))
    assert out["hyper_parameters"]["evil"].origin == "builtins.exec"
    assert float(out["callbacks"]["ModelCheckpoint"]["best_model_score"]) == 0.5
    assert out["misc"] == ckpt["misc"]
    assert torch.equal(out["optimizer_states"][0]["state"][0]["exp_avg"], torch.zeros(3))


def test_mvsplat_lightning_checkpoint_with_foreign_hyper_parameters(tmp_path):
    """MVSplat's re10k.ckpt layout with non-allow-listed objects around the state dict still loads."""
    from methods.splat_distill.mvsplat import MVSplatEncoder

    marker = tmp_path / "marker"
    sd = {f"encoder.{k}": v.clone() for k, v in MVSplatEncoder().state_dict().items()}
    path = tmp_path / "re10k.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": {"cfg": _Popen(marker)}, "lr_schedulers": [_Exec(marker)]}, path)
    enc = MVSplatEncoder.from_checkpoint(path)
    assert not marker.exists()
    got = enc.state_dict()
    assert all(torch.equal(got[k[len("encoder.") :]], v) for k, v in sd.items() if k[len("encoder.") :] in got)


def test_plain_pickle_reads_numpy_and_containers(tmp_path):
    np = pytest.importorskip("numpy")
    data = {"a": np.arange(6.0).reshape(2, 3).T, "s": np.array(["x"]), "i": np.int64(3), "l": [["k"]], "t": (1, None)}
    for proto in (2, 4, 5):
        with open(tmp_path / "d.pkl", "wb") as f:
            pickle.dump(data, f, protocol=proto)
        out = load_plain_pickle(tmp_path / "d.pkl", numpy=True)
        assert np.array_equal(out["a"], data["a"]) and out["s"][0] == "x" and out["i"] == 3
        assert out["l"] == [["k"]] and out["t"] == (1, None)
    with pytest.raises(PickleRefused, match="numpy"):  # without numpy=True, arrays are refused too
        load_plain_pickle(tmp_path / "d.pkl")


# ---------------------------------------------------------------- every checkpoint input, through the CLI
def _paths(tmp: Path) -> list:
    return [
        f"paths.{k}={tmp}/{v}" for k, v in (("data_dir", "data"), ("results_dir", "results"), ("output_dir", "out"))
    ]


def _inputs(evil: Path, tmp: Path) -> dict:
    """input name -> a callable running bench with ``evil`` as that input (returns its exit code)."""
    p = [*_paths(tmp), f"paths.cache_dir={tmp}/cache"]
    toy = ["backbone=tiny_vit", "task.name=toy_probe"]

    def cli(*argv):
        return lambda: main(list(argv))

    def reconstructor():
        from methods.splat_distill.mvsplat import MVSplatEncoder

        try:
            MVSplatEncoder.from_checkpoint(evil)
        except BenchError as e:
            print(f"error: {e.line()}", file=sys.stderr)
            return e.exit_code
        return 0

    return {
        "backbone.weights": cli("run", "method.name=dinov2", *toy, f"backbone.weights={evil}", *p),
        "snd_official": cli("run", "method=snd_official", *toy, f"method.checkpoint={evil}", *p),
        "fit3d_official": cli("run", "method=fit3d_official", *toy, f"method.checkpoint={evil}", *p),
        "mef_official": cli("run", "method=mef_official", *toy, f"method.checkpoint={evil}", *p),
        "method.reconstructor.checkpoint": reconstructor,
    }


INPUTS = ["backbone.weights", "snd_official", "fit3d_official", "mef_official", "method.reconstructor.checkpoint"]


@pytest.mark.parametrize("kind", ["zip", "raw2", "raw4"])
@pytest.mark.parametrize("where", INPUTS)
def test_malicious_checkpoint_input_runs_nothing(where, kind, tmp_path, monkeypatch, capsys, toys):
    monkeypatch.chdir(tmp_path)
    for var in ("BENCH_RESULTS", "BENCH_OUTPUTS", "BENCH_CACHE", "BENCH_DATA", "BENCH_ROOT"):
        monkeypatch.delenv(var, raising=False)
    marker = tmp_path / "marker"
    evil = _write(kind, "exec", tmp_path / "evil.ckpt", marker)
    rc = _inputs(evil, tmp_path)[where]()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert not marker.exists(), f"{where}: the checkpoint ran code"
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert "exec" in lines[0] and "never runs" in lines[0] and "weights_only" not in lines[0], lines[0]
    assert not (tmp_path / "results" / "runs").exists() or not list((tmp_path / "results" / "runs").glob("*.json"))


def test_malicious_nyu_pickle_runs_nothing(tmp_path, monkeypatch, capsys):
    """Probe3D's nyuv2_snorm_all.pkl replaced by an exploit: the cell is refused in preflight, nothing runs."""
    from test_readers import make_nyu_probe3d

    root = tmp_path / "data" / "nyuv2"
    make_nyu_probe3d(root)
    marker = tmp_path / "marker"
    _write("raw4", "exec", root / "nyuv2_snorm_all.pkl", marker)
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "method.name=dinov2", "backbone=tiny_vit", "task=nyu_normals", *_paths(tmp_path)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert not marker.exists()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert "nyuv2_snorm_all.pkl" in lines[0] and "builtins.exec" in lines[0], lines[0]


@pytest.mark.slow
def test_the_real_cli_refuses_a_malicious_weights_file(tmp_path):
    """The installed entry point: one line on stderr, exit 2, no marker, no torch advice."""
    marker = tmp_path / "marker"
    evil = _write("zip", "system", tmp_path / "evil.pth", marker)
    out = run_bench("run", "backbone=tiny_vit", f"backbone.weights={evil}", *_paths(tmp_path), cwd=tmp_path)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert not marker.exists()
    assert out.returncode == 2 and "Traceback" not in out.stderr and "weights_only" not in out.stderr, out.stderr
    assert len([ln for ln in lines if ln.startswith("error: ")]) == 1, out.stderr
    assert "posix.system" in out.stderr and "never runs" in out.stderr


def test_corrupt_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "torn.pt"
    torch.save({"w": torch.ones(3)}, bad)
    bad.write_bytes(bad.read_bytes()[:-40])
    from bench.checkpoint import read_state_dict

    with pytest.raises(CheckpointError) as e:
        read_state_dict(bad)
    assert "\n" not in e.value.line() and "weights_only" not in e.value.line()
