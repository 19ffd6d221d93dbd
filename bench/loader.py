"""Training examples off the main thread: a ``DataLoader`` over optimiser steps.

Every trainer in bench defines its training data as a pure function of the step: ``examples(step)``
returns this rank's share of step ``step``'s global batch (the multi-view examples with their
images, masks, depth and cameras, decoded and resized). :class:`StepLoader` runs that function in
``DataLoader`` worker processes with prefetch, in step order, so image decoding overlaps the
training step instead of sitting on its critical path.

Exact resume needs no sampler state: the payload of a step depends only on the step (and the
rank), so a resumed run restarts the loader at the checkpoint's step and gets the same examples,
whatever the number of workers. :meth:`StepLoader.get` checks the step it is asked for and restarts
the iterator when the caller jumps (resume, ``stop_after``). ``wait_s`` accumulates the time the
main thread spent waiting for data (``python -m bench perf train`` reports it as a share of the step).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset


def _identity(x: Any) -> Any:
    return x


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_ranks() -> int:
    """Ranks started on this machine (``LOCAL_WORLD_SIZE`` of torchrun, SLURM's tasks per node), else 1."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1


def resolve_workers(value: Any, cap: int = 8) -> int:
    """Loader worker processes: an int as given, or ``auto`` = ``min(cap, cores of this rank - 1)`` where a
    rank's cores are the usable cores shared by the ranks on this machine (one core stays with training).
    Workers only move host work off the training thread: they never change a number."""
    if value is None or str(value) == "auto":
        return max(min(int(cap), usable_cores() // local_ranks() - 1), 0)
    try:
        n = int(value)
    except (TypeError, ValueError):
        from .errors import BenchError

        raise BenchError(f"loader workers={value!r} is not a count", "use an int >= 0 or auto") from None
    return max(n, 0)


class _Steps(Dataset):
    def __init__(self, fn: Callable[[int], Any], start: int, end: int):
        self.fn, self.start, self.end = fn, int(start), int(end)

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def __getitem__(self, i: int):
        step = self.start + int(i)
        t0 = time.process_time()  # CPU seconds of the producing thread (a worker, or the training thread)
        payload = self.fn(step)
        return step, payload, time.process_time() - t0


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training step's threads


class StepLoader:
    """``get(step)`` -> ``fn(step)``, computed ahead by ``workers`` processes (``prefetch`` steps each).

    ``workers=0`` calls ``fn`` on the main thread (same results). ``pin_memory`` speeds up the copy to
    a GPU (the trainer copies with ``non_blocking``). The workers are forked from the training process,
    persist for the run (a new set only when the caller jumps) and only run ``fn`` (CPU work);
    ``work_s`` sums the CPU seconds ``fn`` took, so ``fetched / work_s`` is one worker's examples rate.
    """

    def __init__(
        self, fn: Callable[[int], Any], total_steps: int, workers: int = 1, prefetch: int = 2, pin_memory: bool = False
    ):
        self.fn, self.total = fn, int(total_steps)
        self.workers, self.prefetch, self.pin_memory = max(int(workers), 0), max(int(prefetch), 1), bool(pin_memory)
        self._it: Optional[Any] = None
        self._next = -1
        self.wait_s = 0.0
        self.work_s = 0.0  # CPU seconds spent producing the fetched steps (in the workers when workers > 0)
        self.fetched = 0

    def _start(self, step: int) -> None:
        self.close()
        ds = _Steps(self.fn, step, self.total)
        if self.workers == 0:
            self._it = (ds[i] for i in range(len(ds)))
        else:
            loader = DataLoader(
                ds,
                batch_size=None,
                shuffle=False,
                num_workers=self.workers,
                prefetch_factor=self.prefetch,
                collate_fn=_identity,
                pin_memory=self.pin_memory,
                worker_init_fn=_worker_init,
                persistent_workers=True,  # one iterator per run (restarted only on a jump)
                generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
                # fork: ``fn`` is usually a closure over the trainer's data (not picklable)
                multiprocessing_context="fork" if "fork" in mp.get_all_start_methods() else None,
            )
            self._it = iter(loader)
        self._next = step

    def get(self, step: int) -> Any:
        if self._it is None or step != self._next:
            self._start(step)
        t0 = time.perf_counter()
        got, payload, work = next(self._it)
        self.wait_s += time.perf_counter() - t0
        self.work_s += work
        self.fetched += 1
        if got != step:  # cannot happen with an in-order loader; guards exactness
            raise RuntimeError(f"data loader returned step {got} for step {step}")
        self._next = step + 1
        return payload

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
