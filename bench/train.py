"""Training utilities shared by every training loop in bench.

* :func:`one_cycle_cosine` -- the one-cycle cosine learning-rate schedule (PyTorch ``OneCycleLR``
  with ``anneal_strategy="cos"``, written as a resumable ``LambdaLR``).
* :class:`EMA` -- an exponential-moving-average copy of a model (teacher), updated every k steps.
* :func:`rng_state` / :func:`set_rng_state` -- python, numpy and torch (CPU + CUDA) RNG states.
* :class:`Checkpointer` -- atomic ``ckpt_<step>.pt`` files (via :mod:`bench.io`), keep the last N.
* :class:`TrainLoop` -- the loop itself: exact resume from the latest checkpoint, optimiser step,
  gradient clipping, scheduler, after-step hook (EMA), checkpoints every N steps and at the end,
  a tqdm progress bar (loss, steps/s, ETA) and a :class:`~bench.errors.NonFiniteLossError` that
  stops the run *before* the bad step touches the weights, keeping the last good checkpoint.

Exact resume means a run interrupted after any checkpoint and restarted with the same workdir
ends with bit-identical weights to an uninterrupted run (on the same device and thread count):
every object whose state matters is passed to :class:`TrainLoop` in ``state`` (anything with
``state_dict``/``load_state_dict``: modules, optimiser, scheduler, EMA, data sampler) and the
global RNG states are saved with it.
"""
from __future__ import annotations

import logging
import math
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, NonFiniteLossError
from .io import torch_save

log = logging.getLogger("bench")

# --------------------------------------------------------------------------------------------
# learning-rate schedule


def one_cycle_factor(step: int, total_steps: int, pct_start: float = 0.01, div_factor: float = 25.0,
                     final_div_factor: float = 1e4) -> float:
    """Multiplier of the peak lr at ``step`` (0-based) of a one-cycle cosine schedule.

    Same curve as ``torch.optim.lr_scheduler.OneCycleLR(anneal_strategy="cos")``: cosine warm-up
    from ``1/div_factor`` to 1 over the first ``pct_start`` of the steps, then cosine decay to
    ``1/(div_factor*final_div_factor)`` at the last step.
    """
    start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    warm_end = float(pct_start * total_steps) - 1
    last = total_steps - 1
    if warm_end <= 0:  # too few steps for a warm-up: start at the peak
        warm_end = 0.0

    def cos(a: float, b: float, t: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * min(max(t, 0.0), 1.0)) + 1)

    if step <= warm_end and warm_end > 0:
        return cos(start, 1.0, step / warm_end)
    return cos(1.0, end, (step - warm_end) / max(last - warm_end, 1e-12))


def one_cycle_cosine(optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.01,
                     div_factor: float = 25.0, final_div_factor: float = 1e4) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`one_cycle_factor`; the optimiser's lr is the peak lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: one_cycle_factor(s, total_steps, pct_start, div_factor, final_div_factor))


# --------------------------------------------------------------------------------------------
# EMA teacher


class EMA:
    """EMA copy of a model: ``target <- m * target + (1 - m) * source`` every ``every`` steps.

    ``update(step, source)`` takes the source weights as a mapping ``name -> tensor`` in the
    target's state-dict layout (so a source with a different structure, e.g. a LoRA-injected
    student, can supply its *effective* weights); names missing from ``source`` are left alone.
    An update happens when ``step % every == 0`` (``step`` counts finished optimiser steps, from 1).
    ``momentum=1`` freezes the target.
    """

    def __init__(self, target: nn.Module, momentum: float = 0.999, every: int = 1):
        if not 0.0 <= momentum <= 1.0 or every < 1:
            raise ValueError(f"EMA needs 0 <= momentum <= 1 and every >= 1, got {momentum}, {every}")
        self.target, self.momentum, self.every = target, float(momentum), int(every)
        self.num_updates = 0
        for p in target.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, step: int, source: Mapping[str, torch.Tensor]) -> bool:
        if step % self.every != 0:
            return False
        self.num_updates += 1
        if self.momentum == 1.0:
            return True
        own = self.target.state_dict(keep_vars=True)
        for name, src in source.items():
            dst = own.get(name)
            if dst is None or not dst.is_floating_point():
                continue
            dst.data.mul_(self.momentum).add_(src.detach().to(dst.dtype), alpha=1.0 - self.momentum)
        return True

    def state_dict(self) -> Dict[str, Any]:
        return {"target": self.target.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.target.load_state_dict(state["target"], strict=True)
        self.num_updates = int(state["num_updates"])


# --------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch RNG states, as plain types/tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# checkpoints


class Checkpointer:
    """``<directory>/ckpt_<step:08d>.pt`` files written atomically; only the last ``keep_last`` kept."""

    PATTERN = re.compile(r"^ckpt_(\d{8})\.pt$")

    def __init__(self, directory: Union[str, Path], keep_last: int = 2):
        self.directory = Path(directory)
        self.keep_last = max(int(keep_last), 1)

    def path(self, step: int) -> Path:
        return self.directory / f"ckpt_{step:08d}.pt"

    def steps(self) -> List[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := self.PATTERN.match(p.name)))

    def latest(self) -> Optional[Path]:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step: int, payload: Mapping[str, Any]) -> Path:
        path = torch_save(dict(payload), self.path(step))
        for old in self.steps()[:-self.keep_last]:
            self.path(old).unlink(missing_ok=True)
        return path

    def load(self, path: Union[str, Path]) -> Dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read training checkpoint {path}: {type(e).__name__}: {e}",
                                  f"delete {path} to resume from the previous checkpoint, "
                                  "or delete the workdir to start over") from e


# --------------------------------------------------------------------------------------------
# the loop

StepOutput = Union[torch.Tensor, Tuple[torch.Tensor, Mapping[str, float]]]


class TrainLoop:
    """A resumable optimisation loop.

    ``state``: name -> object with ``state_dict()``/``load_state_dict()`` (modules, optimiser,
    scheduler, EMA, sampler...), saved in every checkpoint and restored on resume together with
    the RNG states. ``fingerprint`` (plain values; the total step count is always part of it) must
    match the checkpoint's to resume from it. ``step_fn(step)`` computes the loss of step ``step``
    (0-based) and returns it, optionally with a dict of extra floats to log; the loop checks it is
    finite, back-propagates, clips, steps the optimiser and scheduler, then calls
    ``after_step(step + 1)`` (e.g. the EMA update).
    """

    def __init__(self, workdir: Union[str, Path], total_steps: int, optimizer: torch.optim.Optimizer,
                 state: Mapping[str, Any], *, scheduler: Any = None, ckpt_every: int = 1000,
                 keep_last: int = 2, grad_clip: Optional[float] = None, progress: bool = True,
                 desc: str = "train", log_every: int = 1, fingerprint: Optional[Mapping[str, Any]] = None):
        self.checkpointer = Checkpointer(Path(workdir), keep_last)
        self.total_steps = int(total_steps)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.state = dict(state)
        self.state.setdefault("optimizer", optimizer)
        if scheduler is not None:
            self.state.setdefault("scheduler", scheduler)
        self.ckpt_every = max(int(ckpt_every), 1)
        self.grad_clip = grad_clip
        self.progress, self.desc, self.log_every = progress, desc, max(int(log_every), 1)
        self.fingerprint = {"total_steps": self.total_steps, **dict(fingerprint or {})}
        self.step = 0
        self.history: List[Dict[str, float]] = []  # one entry per finished step: {"step", "loss", ...}

    # -- checkpoints
    def save(self) -> Path:
        payload = {"step": self.step, "rng": rng_state(), "history": self.history, "fingerprint": self.fingerprint,
                   "state": {k: v.state_dict() for k, v in self.state.items()}}
        return self.checkpointer.save(self.step, payload)

    def resume(self) -> bool:
        """Restore the latest checkpoint, if any. Returns whether one was found."""
        path = self.checkpointer.latest()
        if path is None:
            return False
        ckpt = self.checkpointer.load(path)
        if ckpt.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise CheckpointError(f"training checkpoint {path} belongs to a different run "
                                  f"({ckpt.get('fingerprint')} != {self.fingerprint})",
                                  f"use a fresh workdir, or delete {path.parent} to start over")
        missing = set(self.state) - set(ckpt["state"])
        if missing:
            raise CheckpointError(f"training checkpoint {path} has no state for {sorted(missing)}",
                                  "it was written by a different training setup; use a fresh workdir")
        for k, obj in self.state.items():
            obj.load_state_dict(ckpt["state"][k])
        set_rng_state(ckpt["rng"])
        self.step, self.history = int(ckpt["step"]), list(ckpt["history"])
        log.info("resumed from %s (step %d/%d)", path, self.step, self.total_steps)
        return True

    def _params(self) -> Iterable[torch.Tensor]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    # -- run
    def run(self, step_fn: Callable[[int], StepOutput],
            after_step: Optional[Callable[[int], None]] = None,
            stop_after: Optional[int] = None) -> List[Dict[str, float]]:
        """Train from the latest checkpoint (or step 0) to ``total_steps``; returns the loss history.

        ``stop_after``: stop (after checkpointing) once this many steps are done -- simulates an
        interruption in tests and lets callers run a budget of steps per invocation.
        """
        from tqdm.auto import tqdm

        self.resume()
        end = self.total_steps if stop_after is None else min(int(stop_after), self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        try:
            while self.step < end:
                t0 = time.perf_counter()
                out = step_fn(self.step)
                loss, extra = (out if isinstance(out, tuple) else (out, {}))
                if not bool(torch.isfinite(loss.detach()).all()):
                    last = self.checkpointer.latest()
                    kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
                    clip = "" if self.grad_clip else " or enable gradient clipping"
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at step {self.step + 1}; {kept}",
                        f"lower the method's learning rate{clip} (a changed config is a new backbone: it trains "
                        "in a new workdir from step 0; rerunning unchanged resumes the last good checkpoint and "
                        "will likely diverge again)")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(self._params()), float(self.grad_clip))
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.step += 1
                if after_step is not None:
                    after_step(self.step)
                rec = {"step": self.step, "loss": float(loss.detach()), "lr": lr,
                       "time_s": time.perf_counter() - t0, **{k: float(v) for k, v in extra.items()}}
                self.history.append(rec)
                bar.update(1)
                if self.step % self.log_every == 0 or self.step == end:
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{lr:.2e}",
                                    **{k: f"{float(v):.3g}" for k, v in list(extra.items())[:3]}, refresh=False)
                if self.step % self.ckpt_every == 0 or self.step == end:
                    self.save()
        finally:
            bar.close()
        return self.history


def start_run(cfg) -> str:
    """Common start of a method's ``fit``: seed everything from ``cfg.seed``, resolve the device and,
    on CPU, tune the allocator for the splatting engine. Returns the device string."""
    from .runner import resolve_device
    from .seed import seed_everything
    from .splat import tune_allocator

    seed_everything(int(cfg.seed))
    device = resolve_device(cfg)
    if device == "cpu":
        tune_allocator()
    return device
