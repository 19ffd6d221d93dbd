"""Training utilities shared by every training loop in bench.

* :func:`one_cycle_cosine` -- the one-cycle cosine learning-rate schedule (PyTorch ``OneCycleLR``
  with ``anneal_strategy="cos"``, written as a resumable ``LambdaLR``).
* :class:`EMA` -- an exponential-moving-average copy of a model (teacher), updated every k steps.
* :func:`rng_state` / :func:`set_rng_state` -- python, numpy and torch (CPU + CUDA) RNG states.
* :class:`Checkpointer` -- atomic ``ckpt_<step>.pt`` files (via :mod:`bench.io`), keep the last N.
* :class:`TrainLoop` -- the loop itself: exact resume from the latest checkpoint, optimiser step,
  gradient clipping, scheduler, after-step hook (EMA), checkpoints every N steps and at the end,
  progress (loss, steps/s, ETA: a tqdm bar on a terminal, log lines elsewhere, bench.progress) and a :class:`~bench.errors.NonFiniteLossError` that
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
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, NonFiniteLossError
from .io import torch_save

log = logging.getLogger("bench")

# --------------------------------------------------------------------------------------------
# learning-rate schedule


def one_cycle_factor(
    step: int, total_steps: int, pct_start: float = 0.01, div_factor: float = 25.0, final_div_factor: float = 1e4
) -> float:
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


def one_cycle_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    pct_start: float = 0.01,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`one_cycle_factor`; the optimiser's lr is the peak lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: one_cycle_factor(s, total_steps, pct_start, div_factor, final_div_factor)
    )


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
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
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
        for old in self.steps()[: -self.keep_last]:
            self.path(old).unlink(missing_ok=True)
        return path

    def load(self, path: Union[str, Path]) -> Dict[str, Any]:
        from .safe_pickle import PickleRefused, load_torch

        try:
            return load_torch(path)  # bench's own file; read without running code all the same
        except PickleRefused as e:
            raise CheckpointError(
                f"cannot read training checkpoint {path}: {e}",
                f"delete {path} to resume from the previous checkpoint, or delete the workdir to start over",
            ) from e


# --------------------------------------------------------------------------------------------
# training curves


def memory_mb(device: Any = None) -> float:
    """Peak memory of this process in MiB since the last :func:`reset_peak_memory`: CUDA peak allocated on
    a GPU, else the peak resident set of this process (``VmHWM``; ``ru_maxrss`` where there is no /proc,
    which a forked process inherits from its parent)."""
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: Any = None) -> None:
    """Start a new peak-memory measurement: ``torch.cuda.reset_peak_memory_stats`` on a GPU; on Linux the
    process's peak resident set is reset too (``/proc/self/clear_refs`` value 5), so a process forked from
    a larger one measures its own peak."""
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class TrainLog:
    """Rank 0's files of a training run, in ``directory``:

    * ``history.jsonl`` -- one JSON line per finished step (``step``, ``loss``, ``lr``, ``time_s`` and the
      step function's extra floats); on resume the lines after the checkpoint's step are dropped, so the
      file always matches the weights (checkpoints no longer carry the history);
    * ``metrics.jsonl`` -- one JSON line per ``log_every`` steps: means over the window of the loss and
      the diagnostics, the lr, ``steps_per_s``, ``images_per_s``, ``memory_mb`` and wall time;
    * ``train.log`` -- the same window as one text line;
    * TensorBoard event files under ``tensorboard/`` when ``tensorboard`` is installed and enabled.
    """

    def __init__(self, directory: Union[str, Path], desc: str = "train", tensorboard: bool = True):
        self.directory, self.desc = Path(directory), desc
        self.history_path = self.directory / "history.jsonl"
        self.metrics_path = self.directory / "metrics.jsonl"
        self.text_path = self.directory / "train.log"
        self._tb_wanted, self._tb = tensorboard, None

    def read_history(self, upto: int) -> List[Dict[str, float]]:
        """Steps ``1..upto`` of the history file, rewriting it (atomically) without any later lines."""
        import json

        from .io import write_text

        if not self.history_path.exists():
            return []
        rows = []
        for line in self.history_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by a crash mid-append
                continue
            if int(row.get("step", 0)) <= upto:
                rows.append(row)
        rows = list({int(r["step"]): r for r in rows}.values())
        write_text(self.history_path, "".join(json.dumps(r) + "\n" for r in rows))
        for path in (self.metrics_path,):  # window lines past the checkpoint are re-logged after resume
            if path.exists():
                keep = []
                for line in path.read_text().splitlines():
                    try:
                        if int(json.loads(line).get("step", 0)) <= upto:
                            keep.append(line + "\n")
                    except ValueError:
                        continue
                write_text(path, "".join(keep))
        return rows

    @staticmethod
    def _append(path: Path, line: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
            f.flush()

    def step(self, row: Mapping[str, float]) -> None:
        import json

        self._append(self.history_path, json.dumps(dict(row)) + "\n")

    def window(self, row: Mapping[str, Any]) -> None:
        import json

        self._append(self.metrics_path, json.dumps(dict(row)) + "\n")
        parts = [
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.items()
            if k not in ("step", "total_steps", "time")
        ]
        text = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.desc} step {row['step']}/{row['total_steps']} " + " ".join(
            parts
        )
        self._append(self.text_path, text + "\n")
        log.debug(text)
        tb = self._tensorboard()
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "total_steps", "time"):
                    tb.add_scalar(f"{self.desc}/{k}", float(v), int(row["step"]))
            tb.flush()

    def _tensorboard(self):
        if not self._tb_wanted:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: JSON lines and text only
                self._tb_wanted = False
                return None
            self._tb = SummaryWriter(str(self.directory / "tensorboard"))
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# --------------------------------------------------------------------------------------------
# the loop

StepOutput = Union[torch.Tensor, Tuple[torch.Tensor, Mapping[str, float]]]


class TrainLoop:
    """A resumable optimisation loop, data-parallel over ``torch.distributed`` ranks when started so.

    ``state``: name -> object with ``state_dict()``/``load_state_dict()`` (modules, optimiser,
    scheduler, EMA, sampler...), saved in every checkpoint and restored on resume together with
    the RNG states (every rank's). ``fingerprint`` (plain values; the total step count, and the world
    size of a multi-rank run, are always part of it) must match the checkpoint's to resume from it.
    ``step_fn(step)`` computes this rank's loss of step ``step`` (0-based) and returns it, optionally
    with a dict of extra floats to log; the loop checks the rank-averaged loss is finite,
    back-propagates, averages the gradients over ranks (:func:`bench.distributed.allreduce_gradients`;
    a parameter no rank gave a gradient keeps none, as under DDP), after starting every rank from rank 0's
    weights and buffers (:func:`bench.distributed.broadcast_state`),
    clips, steps the optimiser and scheduler, then calls ``after_step(step + 1)`` (e.g. the EMA update).

    Rank 0 alone writes: checkpoints (``workdir``) and the training curves (:class:`TrainLog` in
    ``log_dir``, default ``workdir``). ``images_per_step`` (the global batch's images) gives images/s.
    """

    def __init__(
        self,
        workdir: Union[str, Path],
        total_steps: int,
        optimizer: torch.optim.Optimizer,
        state: Mapping[str, Any],
        *,
        scheduler: Any = None,
        ckpt_every: int = 1000,
        keep_last: int = 2,
        grad_clip: Optional[float] = None,
        progress: bool = True,
        desc: str = "train",
        log_every: int = 1,
        fingerprint: Optional[Mapping[str, Any]] = None,
        log_dir: Union[str, Path, None] = None,
        images_per_step: int = 0,
        device: Any = None,
        tensorboard: bool = True,
        distributed: bool = True,
    ):
        from . import distributed as dist

        self.checkpointer = Checkpointer(Path(workdir), keep_last)
        self.total_steps = int(total_steps)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.state = dict(state)
        self.state.setdefault("optimizer", optimizer)
        if scheduler is not None:
            self.state.setdefault("scheduler", scheduler)
        self.ckpt_every = max(int(ckpt_every), 1)
        self.grad_clip = grad_clip
        # distributed=False: a loop private to this rank (e.g. one FiT3D stage-I scene), which writes its own files
        self.distributed = bool(distributed) and dist.world_size() > 1
        self.main = dist.is_main() or not self.distributed
        self.progress, self.desc, self.log_every = progress and self.main, desc, max(int(log_every), 1)
        self.fingerprint = {"total_steps": self.total_steps, **dict(fingerprint or {})}
        if self.distributed:
            self.fingerprint["world_size"] = dist.world_size()
        self.step = 0
        self.history: List[Dict[str, float]] = []  # one entry per finished step: {"step", "loss", ...}
        self.log = TrainLog(Path(log_dir) if log_dir is not None else Path(workdir), desc, tensorboard)
        self.images_per_step, self.device = int(images_per_step), device

    # -- checkpoints
    def save(self) -> Optional[Path]:
        """Write the checkpoint of the current step (rank 0; every rank must call it: RNG gather)."""
        from . import distributed as dist

        ranks = dist.all_gather_object(rng_state()) if self.distributed else None
        if not self.main:
            return None
        payload = {
            "step": self.step,
            "rng": rng_state(),
            "fingerprint": self.fingerprint,
            "state": {k: v.state_dict() for k, v in self.state.items()},
        }
        if ranks is not None:
            payload["rng_ranks"] = ranks
        return self.checkpointer.save(self.step, payload)

    def resume(self) -> bool:
        """Restore the latest checkpoint (the one rank 0 sees), if any. Returns whether one was found."""
        from . import distributed as dist

        path = self.checkpointer.latest() if self.main else None
        if self.distributed:
            path = dist.broadcast_object(path)
        if path is None:
            return False
        ckpt = self.checkpointer.load(path)
        if ckpt.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise CheckpointError(
                f"training checkpoint {path} belongs to a different run "
                f"({ckpt.get('fingerprint')} != {self.fingerprint})",
                f"use a fresh workdir, or delete {path.parent} to start over "
                "(a multi-rank run resumes exactly only with the same number of ranks)",
            )
        missing = set(self.state) - set(ckpt["state"])
        if missing:
            raise CheckpointError(
                f"training checkpoint {path} has no state for {sorted(missing)}",
                "it was written by a different training setup; use a fresh workdir",
            )
        for k, obj in self.state.items():
            obj.load_state_dict(ckpt["state"][k])
        ranks = ckpt.get("rng_ranks")
        set_rng_state(ranks[dist.rank()] if ranks and self.distributed else ckpt["rng"])
        self.step = int(ckpt["step"])
        if self.main:
            self.history = self.log.read_history(self.step)
            if not self.history and ckpt.get("history"):  # checkpoints of older versions carried it
                self.history = [dict(h) for h in ckpt["history"]]
        log.info("resumed from %s (step %d/%d)", path, self.step, self.total_steps)
        return True

    def _params(self) -> Iterable[torch.Tensor]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def _modules(self) -> List[nn.Module]:
        """The modules of ``state`` (an EMA's target included)."""
        out = []
        for v in self.state.values():
            m = v if isinstance(v, nn.Module) else getattr(v, "target", None)
            if isinstance(m, nn.Module):
                out.append(m)
        return out

    # -- run
    def run(
        self,
        step_fn: Callable[[int], StepOutput],
        after_step: Optional[Callable[[int], None]] = None,
        stop_after: Optional[int] = None,
    ) -> List[Dict[str, float]]:
        """Train from the latest checkpoint (or step 0) to ``total_steps``; returns the loss history.

        ``stop_after``: stop (after checkpointing) once this many steps are done -- simulates an
        interruption in tests and lets callers run a budget of steps per invocation.
        """
        from .progress import progress

        self._start()
        end = self.total_steps if stop_after is None else min(int(stop_after), self.total_steps)
        bar = progress(total=self.total_steps, initial=self.step, desc=self.desc, unit="step", enable=self.progress)
        window: List[Dict[str, float]] = []
        t_window = time.perf_counter()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                shown, extra, lr = self._train_step(step_fn)
                if after_step is not None:
                    after_step(self.step)
                rec = {
                    "step": self.step,
                    "loss": float(shown),
                    "lr": lr,
                    "time_s": time.perf_counter() - t0,
                    **{k: float(v) for k, v in extra.items()},
                }
                self.history.append(rec)
                window.append(rec)
                if self.main:
                    self.log.step(rec)
                bar.update(1)
                if self.step % self.log_every == 0 or self.step == end:
                    t_window = self._end_window(window, t_window, bar, rec, lr, extra)
                    window = []
                if self.step % self.ckpt_every == 0 or self.step == end:
                    self.save()
        finally:
            bar.close()
            self.log.close()
        return self.history

    def _start(self) -> None:
        """Resume the latest checkpoint (a fresh run clears stale curves); ranks start from rank 0's state."""
        from . import distributed as dist

        if not self.resume() and self.main:
            self.log.read_history(0)  # a fresh run: no stale curves from an earlier workdir use
        if self.distributed:  # every rank starts from rank 0's weights and buffers (DDP's _sync_module_states)
            dist.broadcast_state(self._modules(), tensors=list(self._params()))

    def _train_step(self, step_fn: Callable[[int], StepOutput]) -> Tuple[torch.Tensor, Mapping[str, Any], float]:
        """One optimizer step: ``(shown loss, step_fn's extras, the learning rate the step used)``.

        The shown loss is the global batch's (all ranks' mean); a non-finite one stops before the backward pass.
        """
        from . import distributed as dist

        # before the step function: one that accumulates micro-batches runs its own backward passes
        self.optimizer.zero_grad(set_to_none=True)
        out = step_fn(self.step)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        shown = loss.detach().float()
        if self.distributed:  # the global batch's loss, on every rank
            shown = dist.all_reduce_mean(shown)
        if not bool(torch.isfinite(shown).all()):
            self._non_finite(shown)
        loss.backward()
        if self.distributed:
            dist.allreduce_gradients(self._params())
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(self._params()), float(self.grad_clip))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        return shown, extra, lr

    def _non_finite(self, shown: torch.Tensor) -> None:
        """Raise the NonFiniteLossError for a non-finite loss at the coming step (names the kept checkpoint)."""
        last = self.checkpointer.latest()
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
        clip = "" if self.grad_clip else " or enable gradient clipping"
        raise NonFiniteLossError(
            f"non-finite loss ({shown.item()}) at step {self.step + 1}; {kept}",
            f"lower the method's learning rate{clip} (a changed config is a new backbone: it trains "
            "in a new workdir from step 0; rerunning unchanged resumes the last good checkpoint and "
            "will likely diverge again)",
        )

    def _end_window(
        self, window: Sequence[Mapping[str, float]], t_window: float, bar, rec: Mapping[str, float], lr: float, extra
    ) -> float:
        """Log the window's averages and rates, update the progress bar; returns the next window's start time."""
        now = time.perf_counter()
        self._log_window(window, now - t_window, lr)
        bar.set_postfix(
            loss=f"{rec['loss']:.4g}",
            lr=f"{lr:.2e}",
            **{k: f"{float(v):.3g}" for k, v in list(extra.items())[:3]},
            refresh=False,
        )
        return now

    def _log_window(self, window: Sequence[Mapping[str, float]], wall: float, lr: float) -> None:
        if not self.main or not window:
            return
        keys = [k for k in window[-1] if k not in ("step", "lr", "time_s")]
        row: Dict[str, Any] = {"step": self.step, "total_steps": self.total_steps}
        for k in keys:
            vals = [float(r[k]) for r in window if k in r]
            row[k] = sum(vals) / len(vals)
        n = len(window)
        from . import distributed as dist

        row.update(
            lr=lr,
            steps_per_s=n / max(wall, 1e-9),
            images_per_s=n * self.images_per_step / max(wall, 1e-9),
            memory_mb=memory_mb(self.device),
            ranks=dist.world_size() if self.distributed else 1,
            time=time.time(),
        )
        self.log.window(row)
