"""Atomic file writes: temp file in the same directory, fsync, rename.

A crash mid-write leaves either the old file or the new one, never a torn one. A writer killed
mid-write (SIGKILL) leaves its hidden temp file behind; the next write into that directory removes it
(:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .errors import BenchError

log = logging.getLogger("bench")


def _umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: bench's temp names: ``.<target name>.<host>-<pid>.<random>.tmp`` (the writer's host and process id)
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
#: a temp file is stale when its writer is gone and it has not changed for this long (seconds) ...
STALE_AFTER_S = 10 * 60
#: ... or, written on another host (a shared file system: its process cannot be checked), for this long
STALE_OTHER_HOST_S = 24 * 3600
_SWEPT: set = set()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or an impossible pid: keep the file)
    return True


def remove_stale_temps(directory: str | os.PathLike, now: float | None = None) -> list:
    """Delete bench's own temp files in ``directory`` left by writers that died (SIGKILL, power loss):
    bench's temp-name pattern only, unchanged for :data:`STALE_AFTER_S` and written by a process of this
    host that is no longer alive (another host's: unchanged for :data:`STALE_OTHER_HOST_S`). Returns the
    removed paths; errors (a file removed meanwhile, no permission) are ignored."""
    now = time.time() if now is None else now
    host, removed = _host(), []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_NAME.match(e.name)
        if not m:
            continue
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            age = now - e.stat(follow_symlinks=False).st_mtime
            if m.group("host") == host:
                stale = age > STALE_AFTER_S and int(m.group("pid")) != os.getpid() and not _alive(int(m.group("pid")))
            else:
                stale = age > STALE_OTHER_HOST_S
            if stale:
                os.unlink(e.path)
                removed.append(e.path)
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it onto ``path``. The first write of this
    process into a directory also removes the stale temp files of dead writers there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.abspath(path.parent)
    if key not in _SWEPT:
        _SWEPT.add(key)
        remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; files follow the umask like open() would
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# torch's zip writer reports a full disk as a RuntimeError ("unexpected pos 768 vs 662", "file write failed")
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, when ``e`` is a file system failure (full disk, quota, read-only file system): the
    text to show (e.g. "No space left on device"); None for any other error."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return e.strerror or os.strerror(e.errno)
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES):
        return f"the file could not be written completely, most likely a full disk ({str(e).splitlines()[0]})"
    return None


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically write ``path`` through ``writer(tmp_path)``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return write_with(path, lambda p: torch.save(obj, p))


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_with(path, lambda p: save_file(tensors, str(p), metadata=dict(metadata or {})))


# --- disk space and locks of the directories bench writes --------------------------------------------------
def _existing(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def size_text(n: float) -> str:
    """Bytes as a short human text (GiB / MiB / KiB)."""
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{int(n)} B"


def check_space(path: str | os.PathLike, need: int, what: str, fix: str) -> None:
    """Refuse when the file system of ``path`` has less than ``need`` bytes free (``shutil.disk_usage``)."""
    free = shutil.disk_usage(_existing(Path(path))).free
    if need > free:
        raise BenchError(f"{what} needs about {size_text(need)} in {path}, {size_text(free)} is free there", fix)


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Exclusive lock of a backbone workdir (``.<name>.lock`` beside it), released when the holder
    exits or dies. Only rank 0 of a multi-process job takes it (its other ranks train with it)."""
    if _rank() != 0:
        yield
        return
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(workdir.parent / f".{workdir.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is training %s; waiting for it to finish", workdir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
