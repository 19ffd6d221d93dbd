"""Multi-rank test runs (``torch.distributed.run``) that listen on loopback only, with each rank's output
in its own file.

* Loopback: the rendezvous address is 127.0.0.1 (``--master_addr``, ``MASTER_ADDR``) and gloo's sockets
  use the loopback interface (``GLOO_SOCKET_IFNAME=lo``). torch's TCPStore server (the elastic agent's
  rendezvous store) binds every interface whatever the address (``ss -ltn`` shows ``*:<port>``, torch
  2.14), so where unprivileged network namespaces work the run is started in its own one
  (``unshare -rn``), whose only interface is loopback: nothing it opens is reachable from outside.
* Per-rank output: ``--log-dir`` with ``--redirects=3`` gives every rank its own stdout/stderr files, so
  two ranks' lines can never interleave on one line (they could when both wrote to one pipe).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _netns_prefix() -> List[str]:
    """``unshare -rn`` + loopback up, when this machine allows it (else run in the host's namespace)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return []
    prefix = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return prefix if ok else []


def torchrun(
    args: Sequence[str], nproc: int = 2, module: bool = False, timeout: int = 600, env: Optional[dict] = None
) -> Dict[int, str]:
    """Run ``torch.distributed.run`` on loopback; ``{rank: its stdout + stderr}``. Fails with every
    rank's output when the run fails."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        **(env or {}),
    }
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", f"--log-dir={logs}", "--redirects=3"]
        cmd += [*(["-m"] if module else []), *args]
        p = subprocess.run(
            [*_netns_prefix(), *cmd], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT)
        )
        out: Dict[int, str] = {}
        for rank in range(nproc):
            files = sorted(Path(logs).glob(f"*/attempt_*/{rank}/std*.log"))
            out[rank] = "".join(f.read_text(errors="replace") for f in files)
    assert p.returncode == 0, (
        "\n".join(f"--- rank {r} ---\n{t[-3000:]}" for r, t in out.items()) + f"\n--- torchrun ---\n{p.stderr[-2000:]}"
    )
    return out


def tagged(text: str, tag: str) -> List[str]:
    """The payloads of the whole lines ``<tag> <payload>`` of one rank's output."""
    return [line[len(tag) + 1 :] for line in text.splitlines() if line.startswith(tag + " ")]
