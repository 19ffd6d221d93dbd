"""Data-parallel training on ``torch.distributed``: one process per rank (GPU, or CPU process with gloo).

Ranks are started by ``torchrun --nproc_per_node=N -m bench run ...`` (one machine), or by SLURM
through submitit (``cluster.tasks_per_node`` / ``cluster.gpus_per_node`` / ``cluster.nodes``; the job
calls :func:`export_slurm_env`, which uses ``submitit.helpers.TorchDistributedEnvironment``). Both
set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` then
joins the process group (NCCL on CUDA, gloo on CPU) and pins each rank to GPU ``LOCAL_RANK``.

Without those variables (a plain ``python -m bench ...``) every helper here is a no-op for a world
of one process, so single-process runs are unchanged.

The rules every trainer follows (see docs/SCALING.md):

* ``optim.batch_size`` (or a trainer's own batch key) is the **global** batch of one optimiser step;
  each rank takes ``global / world_size`` consecutive examples of it (:func:`per_rank_batch`).
* gradients are averaged over ranks after ``backward`` (:func:`allreduce_gradients`, flat buckets,
  the reduction DDP performs), and losses that are means over a variable number of valid cells are
  first re-weighted by :func:`global_mean_weight` so that the averaged gradient equals the gradient of
  the pooled mean over the global batch -- the same number a single process with the global batch
  computes.
* rank 0 alone writes files (checkpoints, the cached model, records, logs); all ranks read the
  checkpoint rank 0 chose (:func:`broadcast_object`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from .errors import BenchError

log = logging.getLogger("bench")

GRAD_AVERAGES = ("global", "local")


def _dist():
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    return torch.distributed.is_available() and _dist().is_initialized()


def world_size() -> int:
    if initialized():
        return _dist().get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    if initialized():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def init(device: str = "cpu", backend: str = "auto", timeout_min: float = 180.0) -> bool:
    """Join the process group described by the environment (idempotent). Returns whether distributed.

    ``backend``: ``auto`` (NCCL when ``device`` is CUDA, else gloo), ``nccl`` or ``gloo``. On CUDA each
    rank is pinned to ``cuda:LOCAL_RANK`` so that ``device=cuda`` means this rank's own GPU.
    """
    if world_size() <= 1:
        return False
    if initialized():
        return True
    dist = _dist()
    cuda = str(device).startswith("cuda")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise BenchError(f"distributed.backend='{backend}' is not a backend", "use auto, nccl or gloo")
    if cuda:
        n = torch.cuda.device_count()
        if n == 1:  # the launcher already gave each rank its own GPU (CUDA_VISIBLE_DEVICES)
            torch.cuda.set_device(0)
        elif local_rank() >= n:
            raise BenchError(
                f"rank {rank()} has LOCAL_RANK {local_rank()} but this node shows {n} GPU(s)",
                "start at most one rank per visible GPU (torchrun --nproc_per_node, "
                "cluster.tasks_per_node = cluster.gpus_per_node)",
            )
        else:
            torch.cuda.set_device(local_rank())
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise BenchError(
                f"WORLD_SIZE={world_size()} is set but {var} is not",
                "start distributed runs with torchrun (or a SLURM sweep), which sets the rendezvous",
            )
    if not cuda:
        cpu_threads()
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    if not is_main():  # one log, one progress bar: rank 0's
        logging.getLogger("bench").setLevel(logging.WARNING)
    log.info("distributed: %d ranks, backend %s, rank 0 on %s", world_size(), backend, os.uname().nodename)
    return True


def cpu_threads() -> int:
    """Intra-op threads of a CPU rank: the usable cores shared by the ranks of this machine
    (``cores // local ranks``, at least 1), so that ranks do not oversubscribe the cores. An
    ``OMP_NUM_THREADS`` other than torchrun's default of 1 is the user's choice and is kept."""
    from .loader import local_ranks, usable_cores

    user = os.environ.get("OMP_NUM_THREADS", "")
    n = int(user) if user.isdigit() and int(user) > 1 else max(usable_cores() // local_ranks(), 1)
    torch.set_num_threads(n)
    return n


def shutdown() -> None:
    if initialized():
        _dist().destroy_process_group()


def barrier() -> None:
    if initialized():
        _dist().barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable values)."""
    if not initialized():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not initialized():
        return [obj]
    out: List[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def _comm_device(t: torch.Tensor) -> torch.device:
    return t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself when not distributed)."""
    if not initialized():
        return t
    out = t.detach().clone()
    _dist().all_reduce(out)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not initialized():
        return t
    return all_reduce_sum(t) / world_size()


def global_mean_weight(local_count: torch.Tensor | float) -> float:
    """Factor turning a rank's masked mean into its share of the pooled mean of all ranks.

    A loss ``S_r / n_r`` (sum over ``n_r`` valid cells of rank ``r``) times ``W n_r / sum_q n_q``
    is ``W S_r / N``; averaging those over the ``W`` ranks (the gradient all-reduce) gives
    ``sum_r S_r / N``, the mean over the pooled global batch. 1.0 in a single process.
    """
    if not initialized():
        return 1.0
    n = torch.as_tensor(float(local_count), dtype=torch.float64)
    if _dist().get_backend() == "nccl":
        n = n.cuda()
    total = float(all_reduce_sum(n))
    return world_size() * float(n) / total if total > 0 else 1.0


def per_rank_batch(global_batch: int, what: str = "method.optim.batch_size") -> int:
    """``global_batch / world_size``; a clear error when it does not divide."""
    w = world_size()
    if global_batch % w:
        raise BenchError(
            f"{what}={global_batch} (the global batch) does not split over {w} ranks",
            f"use a multiple of {w}, or start {w} ranks only when the batch divides",
        )
    return global_batch // w


def rank_slice(global_batch: int) -> range:
    """Positions (0-based within a step's global batch) of this rank's examples."""
    b = per_rank_batch(global_batch)
    return range(rank() * b, (rank() + 1) * b)


_BUCKET = 25 * 2**20  # bytes per all-reduce, as DDP's default bucket_cap_mb


def allreduce_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks, in flat buckets, as DistributedDataParallel does
    (pytorch torch/csrc/distributed/c10d/reducer.cpp): a parameter that got a gradient on some rank but
    not on this one counts as 0 here; a parameter that got none on any rank (globally unused) keeps
    ``grad=None`` on every rank, so that the optimiser skips it (no weight decay, no moment update) exactly
    as in one process. One extra all-reduce of a has-grad flag per parameter decides which is which."""
    if not initialized():
        return
    dist, w = _dist(), world_size()
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(flags)  # how many ranks have each grad
    params = [p for p, n in zip(params, flags.tolist()) if n > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict = {}
    for p in params:
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():
        chunk, size = [], 0
        for g in grads + [None]:
            if g is not None:
                chunk.append(g)
                size += g.numel() * g.element_size()
            if chunk and (g is None or size >= _BUCKET):
                flat = torch.cat([x.reshape(-1) for x in chunk])
                dist.all_reduce(flat)
                flat /= w
                off = 0
                for x in chunk:
                    x.copy_(flat[off : off + x.numel()].view_as(x))
                    off += x.numel()
                chunk, size = [], 0


def broadcast_state(modules: Iterable[torch.nn.Module], src: int = 0, tensors: Iterable[torch.Tensor] = ()) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's modules, and ``tensors`` (e.g. an
    optimiser's parameters that no module lists) -- DDP's start-up sync (``_sync_module_states``)."""
    if not initialized():
        return
    dist = _dist()
    every = [t for m in modules for t in list(m.parameters()) + list(m.buffers())] + list(tensors)
    seen: set = set()
    for t in every:
        if id(t) not in seen:
            seen.add(id(t))
            dist.broadcast(t.data, src=src)


def weighted_means(values: Mapping[str, Tuple[float, float]]) -> Dict[str, float]:
    """``{name: (value, weight)}`` of this rank -> ``{name: sum_r w_r v_r / sum_r w_r}`` over the ranks, on
    every rank (one all-reduce): a rank's mean over ``w_r`` items -> the mean over the global batch, the
    number one process with the global batch computes. A name whose total weight is 0 keeps this rank's
    value. Without a process group: the values themselves."""
    if not initialized() or not values:
        return {k: float(v) for k, (v, _) in values.items()}
    names = list(values)
    flat = []
    for k in names:
        v, wt = float(values[k][0]), float(values[k][1])
        flat += [v * wt if wt else 0.0, wt]
    t = torch.tensor(flat, dtype=torch.float64)
    if _dist().get_backend() == "nccl":
        t = t.cuda()
    t = all_reduce_sum(t).cpu().tolist()
    return {k: (t[2 * i] / t[2 * i + 1] if t[2 * i + 1] else float(values[k][0])) for i, k in enumerate(names)}


def pooled_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """The rows of the global batch's ``x`` (every rank's ``x`` concatenated in rank order, as one process
    holds them) at ``linspace(0, N - 1, max_rows)`` when there are more than ``max_rows`` of them, else all;
    on every rank. Only the chosen rows travel. Without a process group: the same choice on ``x``."""
    if not initialized():
        return x[torch.linspace(0, x.shape[0] - 1, max_rows).long()] if x.shape[0] > max_rows else x
    counts = all_gather_object(int(x.shape[0]))
    total, start = sum(counts), sum(counts[: rank()])
    if total > max_rows:
        idx = torch.linspace(0, total - 1, max_rows).long()
        local = idx[(idx >= start) & (idx < start + x.shape[0])] - start
        mine = x[local.to(x.device)]
    else:
        mine = x
    parts = all_gather_object(mine.detach().cpu())
    return torch.cat(parts).to(x.device)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating a dataset, fitting caches), then the others."""
    if not initialized():
        yield
        return
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def seed_offset(seed: int) -> None:
    """Give every rank its own torch RNG stream (dropout etc.) after the identical model set-up.

    Rank ``r`` of a multi-rank run continues from ``seed + 1_000_003 * r``; a single process is untouched.
    """
    if world_size() > 1:
        torch.manual_seed(int(seed) + 1_000_003 * rank())


def export_slurm_env() -> bool:
    """Inside a submitit job with several tasks (SLURM ``ntasks``, or the local executor's
    ``tasks_per_node``), export torch's rendezvous variables from
    ``submitit.helpers.TorchDistributedEnvironment``. Returns whether this is a multi-rank job.

    Every task keeps seeing all of its node's GPUs; :func:`init` pins task ``LOCAL_RANK`` to its own.
    """
    if os.environ.get("WORLD_SIZE"):
        return world_size() > 1
    import submitit

    try:
        if submitit.JobEnvironment().num_tasks <= 1:
            return False
    except RuntimeError:  # not inside a submitit job
        return False
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    log.info(
        "submitit task %d/%d -> torch rank %d (local %d), master %s:%s",
        env.rank,
        env.world_size,
        env.rank,
        env.local_rank,
        env.master_addr,
        env.master_port,
    )
    return env.world_size > 1


def describe(global_batch: Optional[int] = None, grad_average: str = "global") -> dict:
    """What a record says about the data-parallel layout of its training."""
    w = world_size()
    out = {"world_size": w, "backend": (_dist().get_backend() if initialized() else None), "grad_average": grad_average}
    if global_batch is not None:
        out.update(global_batch=int(global_batch), per_rank_batch=int(global_batch) // w)
    return out


def global_batch_of(cfg) -> Optional[int]:
    """The global batch key of the configured trainer (SnD ``method.optim.batch_size``, FiT3D stage II)."""
    m = cfg.get("method") or {}
    for section in ("optim", "stage2"):
        sec = m.get(section) or {}
        if sec.get("batch_size") is not None:
            return int(sec["batch_size"])
    return None


def describe_cfg(cfg) -> dict:
    """The record's ``distributed`` entry for a run of ``cfg`` in this process group."""
    out = describe(global_batch_of(cfg), str((cfg.get("distributed") or {}).get("grad_average", "global")))
    out["precision"] = str(cfg.get("precision", "32"))
    return out


# --------------------------------------------------------------------------------- synchronised BN
class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch over all ranks (SyncBN),
    for any backend (``torch.nn.SyncBatchNorm`` runs on GPUs only; this one also on CPU with gloo).

    Two differentiable all-reduces (``torch.distributed.nn.functional.all_reduce``): the per-channel
    sum and count, then the sum of squared deviations from the global mean (two passes, as a single
    process's BatchNorm computes the variance, not ``E[x^2] - E[x]^2``). A rank may hold no items
    (an epoch's ragged last batch): it contributes zero sums and still joins both collectives. The
    running statistics get the global mean and the unbiased global variance, identically on every
    rank. Outside training, or without a process group, it is ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and initialized() and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = (0, 2, 3)
        count = torch.full((1,), float(x.numel() // max(c, 1)), dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dim=dims), count]))
        n = total[c]
        mean = total[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum(dim=dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        y = centred / torch.sqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every ``BatchNorm2d`` computing global-batch statistics over the ranks (the
    anchors' SyncBN): ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm2d` otherwise. The
    state-dict keys are unchanged. Without a multi-rank process group, ``module`` itself."""
    if not (initialized() and world_size() > 1):
        return module
    params = list(module.parameters()) + list(module.buffers())
    if params and params[0].device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def convert(m: torch.nn.Module) -> torch.nn.Module:
        if isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, GlobalBatchNorm2d):
            g = GlobalBatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            g.load_state_dict(m.state_dict())
            g.to(next(iter(m.buffers()), torch.zeros(())).device)
            g.train(m.training)
            return g
        for name, child in m.named_children():
            setattr(m, name, convert(child))
        return m

    return convert(module)


# --- device, precision and the start of a run (one place, as DINOv2's dinov2/distributed) ----------------
def resolve_device(cfg) -> str:
    want = str(cfg.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(
            f"device={want} requested but CUDA is not available on this machine", "run with device=cpu (or device=auto)"
        )
    return want


PRECISIONS = ("32", "bf16-mixed")


def check_precision(precision: Any) -> str:
    """``precision`` config value -> ``"32"`` or ``"bf16-mixed"`` (a clear error otherwise)."""
    p = str(precision if precision is not None else "32")
    if p in ("32", "fp32", "32-true"):
        return "32"
    if p in ("bf16-mixed", "bf16"):
        return "bf16-mixed"
    raise BenchError(f"precision={precision} is not a precision", f"use one of {PRECISIONS}")


def autocast(precision: Any, device: Any):
    """Context for backbone forward passes: bf16 autocast for ``bf16-mixed``, nothing for ``32``.

    Autocast covers matmuls/convolutions only; callers keep the rasterizer and the losses in float32
    (they cast their inputs with ``.float()``). Backward runs outside the context, as torch recommends.
    """
    import contextlib

    if check_precision(precision) == "32":
        return contextlib.nullcontext()
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


def start_run(cfg) -> str:
    """Common start of a method's ``fit``: seed everything from ``cfg.seed``, resolve the device, join
    the process group of a multi-rank run (``torchrun`` / SLURM tasks; NCCL on CUDA, gloo on CPU) and,
    on CPU, tune the allocator for the splatting engine. Returns the device string."""
    from .seed import seed_everything
    from .splat import tune_allocator

    seed_everything(int(cfg.seed))
    device = resolve_device(cfg)
    check_precision(cfg.get("precision", "32"))
    init(device, str((cfg.get("distributed") or {}).get("backend", "auto")))
    if device == "cpu":
        tune_allocator()
    return device
