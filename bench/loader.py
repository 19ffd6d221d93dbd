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
import time
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset


def _identity(x: Any) -> Any:
    return x


class _Steps(Dataset):
    def __init__(self, fn: Callable[[int], Any], start: int, end: int):
        self.fn, self.start, self.end = fn, int(start), int(end)

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def __getitem__(self, i: int):
        step = self.start + int(i)
        return step, self.fn(step)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training step's threads


class StepLoader:
    """``get(step)`` -> ``fn(step)``, computed ahead by ``workers`` processes (``prefetch`` steps each).

    ``workers=0`` calls ``fn`` on the main thread (same results). ``pin_memory`` speeds up the copy to
    a GPU. The workers are forked from the training process and only run ``fn`` (CPU work).
    """

    def __init__(
        self, fn: Callable[[int], Any], total_steps: int, workers: int = 1, prefetch: int = 2, pin_memory: bool = False
    ):
        self.fn, self.total = fn, int(total_steps)
        self.workers, self.prefetch, self.pin_memory = max(int(workers), 0), max(int(prefetch), 1), bool(pin_memory)
        self._it: Optional[Any] = None
        self._next = -1
        self.wait_s = 0.0
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
                persistent_workers=False,
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
        got, payload = next(self._it)
        self.wait_s += time.perf_counter() - t0
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
