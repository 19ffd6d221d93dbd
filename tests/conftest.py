"""Shared pytest fixtures. Each fixture is self-contained; append new ones below."""

from __future__ import annotations

import os

# libgomp's default spin-waiting burns cores that other processes of a test (torchrun ranks, loader workers,
# subprocess CLIs) need; set before torch loads, inherited by every subprocess (the user's setting wins)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


# --- hardware gating: one place -----------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.cuda`` are skipped, with the reason, where no CUDA GPU is visible."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gsplat runs only on CUDA tensors); none is visible here")
    for item in marked:
        item.add_marker(skip)


# --- local Hugging Face Hub ------------------------------------------------------------------
@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A local Hub-compatible server (tests/hub_server.py) that the real huggingface_hub client uses.

    Yields a :class:`hub_server.LocalHub` (``.endpoint`` / ``.url``, ``.seed(repo_id, files)``,
    ``.head()``, ``.files()``, ``.hf_ref()``, ``.requests``, ``.stop()``). For the duration of the
    test: HF_ENDPOINT and the client's import-time constants point at it; HF_HOME / HF_HUB_CACHE
    live under ``tmp_path``; a dummy token is used (no real credentials are read); Xet is off (the
    server only takes regular uploads); offline mode is off; the client's retry back-off does not
    sleep (so an unreachable Hub fails in milliseconds); NO_PROXY covers 127.0.0.1. The environment
    variables are inherited by subprocesses a test starts. Only loopback traffic happens.
    """
    try:
        from hub_server import LocalHub
    except ImportError:  # tests/ imported as a package
        from tests.hub_server import LocalHub
    import huggingface_hub.constants as C
    from huggingface_hub.utils import _http

    hub = LocalHub(timeout=300)
    home = tmp_path / "hf_home"
    for var, val in {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN": "hf_local_test_token",
        "HF_HUB_DISABLE_XET": "1",
    }.items():
        monkeypatch.setenv(var, val)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var in ("NO_PROXY", "no_proxy"):  # never send loopback traffic through a proxy
        monkeypatch.setenv(var, ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"])))
    for name, val in {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
    }.items():
        monkeypatch.setattr(C, name, val)

    class _NoSleep:  # the client's backoff calls time.sleep between retries
        @staticmethod
        def sleep(_seconds):
            pass

    monkeypatch.setattr(_http, "time", _NoSleep)
    _http.close_session()  # the shared HTTP client picks up the environment above when next created
    try:
        yield hub
    finally:
        hub.stop()
        _http.close_session()


@pytest.fixture
def toys():
    """The sweep test toys (a tiny training method and tasks), registered for one test."""
    import sweep_toys

    sweep_toys.register()
    yield sweep_toys
    sweep_toys.unregister()


@pytest.fixture(scope="session")
def snd_scenes(tmp_path_factory):
    """The synthetic rooms of ``helpers.snd_tiny`` (generated once a session; tests only read them)."""
    from bench.data.synthetic import ensure_synthetic
    from helpers import SND_SCENES, SND_SEED, SND_SIZE, SND_VIEWS

    return ensure_synthetic(tmp_path_factory.mktemp("snd") / "synth", SND_SCENES, SND_VIEWS, SND_SIZE, SND_SEED)
