"""One error type for everything a user can get wrong.

Every failure that a user can fix is raised as a :class:`BenchError` carrying the
problem and the fix. The CLI prints it as one line and exits non-zero; nothing
else in bench prints tracebacks for user mistakes.
"""

from __future__ import annotations

import os
import stat
from typing import Iterable


class BenchError(Exception):
    """A user-fixable failure: ``problem`` says what is wrong, ``fix`` what to do."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem}. Fix: {self.fix}" if self.fix else f"{self.problem}."


class UnknownNameError(BenchError, KeyError):
    """An unknown method/task/backbone/dataset/... name."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        valid = sorted(valid)
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(
            f"unknown {kind} '{name}'",
            f"use one of: {', '.join(valid)} (see `python -m bench list`)",
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.line()


class DataMissingError(BenchError):
    """A dataset root or file is missing or malformed."""


class CheckpointError(BenchError):
    """A checkpoint cannot be read or its keys do not match the model."""


class HubError(BenchError):
    """The Hugging Face Hub (or a Hub-compatible endpoint) cannot serve a file."""


class NonFiniteLossError(BenchError):
    """Training produced a NaN/inf loss."""


class ClusterError(BenchError):
    """SLURM / submitit is unavailable or a job failed."""


class MissingPrerequisites(BenchError):
    """Several missing prerequisites (data, weights, checkpoints) found together: the error line counts
    them, the lines after it give each one with its own fix."""

    def __init__(self, problems: Iterable[BenchError]):
        self.problems = list(problems)
        super().__init__(
            f"{len(self.problems)} prerequisites of this run are missing",
            "each one is listed below with its fix; run again once all are in place",
        )

    def line(self) -> str:
        return super().line() + "".join(f"\n  - {p.line()}" for p in self.problems)


def raise_all(problems: Iterable[BenchError]) -> None:
    """Raise nothing (no problem), the problem itself (one), or :class:`MissingPrerequisites` (several,
    each listed once)."""
    unique = list({p.line(): p for p in problems}.values())
    if len(unique) == 1:
        raise unique[0]
    if unique:
        raise MissingPrerequisites(unique)


def choice(key: str, value, choices) -> str:
    """``str(value)`` when it is one of ``choices``; else the one-line error naming ``key`` and the choices."""
    v = str(value)
    if v not in choices:
        raise BenchError(f"{key}='{v}' is not a choice", f"use one of {tuple(choices)}")
    return v


def what_is_at(path, want: str = "file") -> str:
    """What stands at ``path`` when it is not the ``want`` ('file' or 'directory') a message expected:
    'does not exist', 'is a directory, not a file', 'is a broken symbolic link', ..."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist (a parent of it is a file, not a directory)"
    except PermissionError:
        return "cannot be reached (permission denied on a parent directory)"
    except OSError as e:
        return f"cannot be examined ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file" if want == "file" else "is a directory"
    if stat.S_ISREG(st.st_mode):
        return "is a file, not a directory" if want != "file" else "is a file"
    kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
    return f"is {kind}, not a {want}"


def missing_file(path) -> str:
    """'missing file <path>', or what stands there instead (e.g. '<path> is a directory, not a file')."""
    why = what_is_at(path, "file")
    return f"missing file {path}" if why == "does not exist" else f"{path} {why}"
