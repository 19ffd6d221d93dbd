"""Progress where a person waits: a tqdm bar on a terminal, periodic log lines elsewhere.

::

    for pair in progress(pairs, total=len(pairs), desc="synthetic pairs", unit="pair"):
        ...

When stderr is not a terminal (a SLURM log, a pipe) a bar would print nothing useful, so
:func:`progress` logs ``desc: i/total unit (p%, elapsed, ~left)`` at the start, every
``every_s`` seconds (default 30, or ``BENCH_PROGRESS_EVERY_S``) and at the end instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, Optional

log = logging.getLogger("bench.progress")


class LogProgress:
    """The tqdm subset bench uses (iteration, ``update``, ``close``), as log lines."""

    def __init__(
        self,
        iterable: Optional[Iterable] = None,
        total: Optional[int] = None,
        desc: str = "",
        unit: str = "it",
        every_s: float = 30.0,
        initial: int = 0,
    ):
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, float(every_s)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.t0 = total, int(initial), time.monotonic()
        self.start, self.postfix = int(initial), ""
        self.last, self.closed = self.t0, False
        self._log()

    def _log(self) -> None:
        el = time.monotonic() - self.t0
        done = self.n - self.start  # this process's share (a resumed run starts at ``initial``)
        rate = f", {done / el:.3g} {self.unit}/s" if done and el > 0 else ""
        if self.total:
            left = f", ~{el / done * (self.total - self.n):.0f} s left" if done else ""
            log.info(
                "%s: %d/%d %s (%.0f%%, %.0f s%s%s)%s",
                self.desc,
                self.n,
                self.total,
                self.unit,
                100.0 * self.n / self.total,
                el,
                rate,
                left,
                self.postfix,
            )
        else:
            log.info("%s: %d %s (%.0f s%s)%s", self.desc, self.n, self.unit, el, rate, self.postfix)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s or (self.total is not None and self.n >= self.total):
            self.last = now
            self._log()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Values shown after the next log line (tqdm's ``set_postfix``: loss, lr, ...)."""
        self.postfix = " " + " ".join(f"{k}={v}" for k, v in values.items()) if values else ""

    def close(self) -> None:
        if not self.closed and (self.total is None or self.n < self.total):
            self._log()
        self.closed = True

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(
    iterable: Optional[Iterable] = None,
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    enable: bool = True,
    every_s: Optional[float] = None,
    initial: int = 0,
) -> Any:
    """A tqdm bar when stderr is a terminal, else :class:`LogProgress`; nothing when ``enable`` is False.
    Every place where a person waits uses it (training loops, feature extraction, probe tests, data checks)."""
    from tqdm.auto import tqdm

    if not enable:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    every = every_s if every_s is not None else float(os.environ.get("BENCH_PROGRESS_EVERY_S", 30))
    return LogProgress(iterable, total, desc, unit, every, initial)
