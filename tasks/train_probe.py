"""The probe trainer: AdamW, linear warm-up then cosine / quarter-cosine / poly decay, per step.

Schedule config (``task.protocol.schedule``)::

    epochs: 10            # or iters: 38400 (one of the two; iters wins when both are set)
    batch_size: 8
    lr: 5.0e-4
    weight_decay: 0.01
    decay: quarter_cosine # cosine | quarter_cosine | poly | constant
    warmup: 1.5           # warm-up length, in epochs (or warmup_iters: N steps)
    warmup_start: 0.01    # lr factor at step 0, rising linearly to 1
    min_factor: 0.01      # lr factor at the end of the decay
    power: 1.0            # poly exponent
    shape: mmcv           # mmcv | sequential (how warm-up and decay combine; see below)
    momentum: onecycle    # optional: mmcv OneCycle beta1 0.95 -> 0.85 (30 %) -> 0.95 (null: fixed betas)
    grad_clip: 35         # optional: clip the global grad L2 norm (mmcv optimizer_config.grad_clip)

``shape: mmcv`` (FiT3D / SnD ``evaluation1``, the vendored mmcv ``runner/hooks/lr_updater.py``): the
decay factor is computed over the **whole run**, ``p = step / total`` (cosine: ``annealing_cos`` to
``min_factor``; poly: ``(1 - p)^power`` to ``min_factor``), and during warm-up it is multiplied by
mmcv's linear warm-up factor ``1 - (1 - step / warmup) (1 - warmup_start)``.

``shape: sequential`` (Probe3D ``evals/utils/optim.py``): after warm-up, with ``p`` the progress through the remaining steps, the lr factor is
``min + (1 - min) * c(p)`` with ``c = 0.5 (1 + cos(pi p))`` (cosine, mmcv ``CosineAnnealing``),
``cos(pi p / 2)`` (quarter_cosine: Probe3D's ``0.99 cos(0.5 pi p) + 0.01``), ``(1 - p)^power``
(poly) or 1 (constant).

Every key an anchor fixes is required (:data:`REQUIRED`; a missing one is a :class:`bench.errors.BenchError`
naming it): no lr, batch size, warm-up or schedule shape is filled in here. ``shuffle`` decides the
training order: ``true`` reshuffles every epoch from the seed (mmseg's ``IterBasedRunner`` sampler),
``false`` keeps the dataset order every epoch (Probe3D / SnD ``evaluation2`` ``build_loader``:
``shuffle = (split == "train") and not use_ddp``, and they train on ``trainval``). A NaN/inf loss raises
:class:`bench.errors.NonFiniteLossError`. Progress (bench.progress: a bar on a terminal, log lines in SLURM logs) shows
loss, lr, rate and ETA.

Training runs through :class:`bench.train.TrainLoop` (``ckpt_every`` / ``keep_last`` / ``log_every``:
schedule keys that change nothing in the result): checkpoints in the caller's ``workdir`` and an exact
resume from the latest one -- probe, AdamW (OneCycle betas), lr schedule, batch order
(:class:`EpochBatches`), stateful loss counters, RNG states (docs/SCALING.md).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset
from bench.errors import BenchError, NonFiniteLossError

DECAYS = ("cosine", "quarter_cosine", "poly", "constant")
SHAPES = ("sequential", "mmcv")


# schedule keys every dense protocol must set (no code default stands in for an anchor's number)
REQUIRED = ("batch_size", "lr", "weight_decay", "betas", "decay", "shape", "warmup_start", "min_factor", "shuffle")


def need(node: Mapping[str, Any], key: str, where: str) -> Any:
    """``node[key]``, or one BenchError naming ``<where>.<key>`` when the config lacks it."""
    if key not in node or node[key] is None:
        raise BenchError(
            f"config key '{where}.{key}' is missing: the protocol must state it (no default stands in for the anchor's value)",
            f"set {where}.{key} in the task's protocol (bench/conf/task/_protocols/*.yaml; docs/PROTOCOLS.md has the anchor's value)",
        )
    return node[key]


def check_schedule(sched: Mapping[str, Any], where: str = "task.protocol.schedule") -> None:
    """Every required schedule key is present (see :data:`REQUIRED`): one BenchError naming the first missing one."""
    for k in REQUIRED:
        need(sched, k, where)
    if not sched.get("iters") and not sched.get("epochs"):
        need(sched, "epochs", where)
    if sched.get("warmup_iters") is None:
        need(sched, "warmup", where)
    if sched.get("decay") == "poly":
        need(sched, "power", where)


def total_steps(sched: Mapping[str, Any], steps_per_epoch: int) -> int:
    if sched.get("iters"):
        return int(sched["iters"])
    if sched.get("epochs"):
        return int(math.ceil(float(sched["epochs"]) * steps_per_epoch))
    raise BenchError(
        "the probe schedule sets neither epochs nor iters",
        "set task.protocols.<protocol>.schedule.epochs or task.protocols.<protocol>.schedule.iters",
    )


def warmup_steps(sched: Mapping[str, Any], steps_per_epoch: int) -> float:
    """Warm-up length in steps: ``warmup_iters`` (an integer, mmcv), or ``warmup`` epochs times the
    steps per epoch **as a float**, not rounded (Probe3D ``train_depth.py``: ``warmup_epochs *
    len(trainval_loader)``, compared with ``<=`` in ``evals/utils/optim.py::cosine_decay_linear_warmup``)."""
    if sched.get("warmup_iters") is not None:
        return int(sched["warmup_iters"])
    return float(sched["warmup"] or 0.0) * steps_per_epoch


def _decay(decay: str, p: float, min_factor: float, power: float) -> float:
    c = {
        "cosine": lambda: 0.5 * (1 + math.cos(math.pi * p)),
        "quarter_cosine": lambda: math.cos(0.5 * math.pi * p),
        "poly": lambda: (1 - p) ** power,
        "constant": lambda: 1.0,
    }[decay]()
    return min_factor + (1.0 - min_factor) * c


def lr_factor(
    step: int,
    total: int,
    warmup: float,
    decay: str = "cosine",
    warmup_start: float = 0.01,
    min_factor: float = 0.0,
    power: float = 1.0,
    shape: str = "sequential",
) -> float:
    """The lr multiplier at ``step`` (0-based) of ``total`` steps (see the module docstring)."""
    from bench.errors import UnknownNameError

    if decay not in DECAYS:
        raise UnknownNameError("lr decay", decay, DECAYS)
    if shape not in SHAPES:
        raise UnknownNameError("lr schedule shape", shape, SHAPES)
    if shape == "mmcv":
        f = _decay(decay, min(max(step / max(total, 1), 0.0), 1.0), min_factor, power)
        if warmup > 0 and step < warmup:
            f *= 1.0 - (1.0 - step / warmup) * (1.0 - warmup_start)
        return f
    if warmup > 0 and step <= warmup:  # Probe3D: ``current_step <= warmup_step`` (a float)
        return warmup_start + (1.0 - warmup_start) * step / warmup
    p = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return _decay(decay, p, min_factor, power)


def onecycle_momentum(step: int, total: int, base: float = 0.85, peak: float = 0.95, pct_start: float = 0.3) -> float:
    """mmcv ``OneCycleMomentumUpdaterHook`` (two phases, cosine): beta1 at ``step`` of ``total``.

    Phase 1 ends at ``pct_start * total - 1`` (``peak -> base``), phase 2 at ``total - 1`` (``base -> peak``);
    ``annealing_cos(start, end, pct) = end + (start - end) (cos(pi pct) + 1) / 2``.
    """
    cos = lambda a, b, t: b + 0.5 * (a - b) * (math.cos(math.pi * t) + 1)  # noqa: E731
    end1 = float(pct_start * total) - 1
    if step <= end1:
        return cos(peak, base, step / end1 if end1 > 0 else 1.0)
    return cos(base, peak, (step - end1) / max(total - 1 - end1, 1e-12))


def make_loader(
    dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=num_workers,
        drop_last=drop_last and len(dataset) >= batch_size,
        persistent_workers=False,
    )


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return int(i)


class _Plan:
    """A batch sampler whose batches are replaced every epoch (persistent loader workers stay alive)."""

    def __init__(self):
        self.batches: List[List[Any]] = []

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class _SeededItems(Dataset):
    """``dataset.seeded_item(i, generator)`` for ``(i, seed)`` keys: each item's random transforms draw from
    a generator of its own seed, wherever (main thread or which worker) it is loaded."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        i, seed = key
        return self.dataset.seeded_item(int(i), torch.Generator().manual_seed(int(seed)))


class EpochBatches:
    """The probe's training batches, epoch after epoch, with a resumable position.

    Each epoch's index batches are drawn exactly as ``make_loader``'s ``DataLoader`` draws them (the
    same loader, over indices, consumes the seeded generator in the same order: the workers' base
    seed, then the shuffle), and the data of the remaining batches come from a ``DataLoader`` with
    ``batch_sampler`` whose generator starts where the epoch's did (so ``num_workers > 0`` workers get
    the same seeds). ``state_dict()`` is ``{epoch, position, generator state at the epoch's start}``:
    a resumed run redraws the epoch's order and skips the batches already used, without loading them.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
        group: Optional[int] = None,
        world: int = 1,
        rank: int = 0,
    ):
        self.dataset, self.batch_size, self.shuffle = dataset, int(batch_size), bool(shuffle)
        self.num_workers, self.drop_last = int(num_workers), bool(drop_last)
        self.group, self.world, self.rank = (int(group) if group else None), int(world), int(rank)
        self.index_loader = make_loader(_Indices(len(dataset)), self.batch_size, seed, self.shuffle, 0, self.drop_last)
        self.seed = int(seed)
        self.seeded = hasattr(dataset, "seeded_item")  # random transforms drawn from per-item generators
        self._sampler = _Plan()
        self._loader: Optional[DataLoader] = None
        self.epoch, self.position = 0, 0
        self._epoch_start = self.index_loader.generator.get_state()
        self._it = None
        self._plan: List[Tuple[List[int], int]] = []
        self.groups: Tuple[List[int], int] = ([], 0)  # of the last batch: (this rank's group sizes, groups of the step)

    def split(self, batch: List[int]) -> Tuple[List[int], List[int], int]:
        """This rank's share of one global index batch: ``(indices, group sizes, groups in the step)``.

        The batch is cut into consecutive groups of ``group`` items (the last may be smaller; one group
        without ``group``) and rank ``r`` of ``W`` takes groups ``r*c .. r*c+c-1``, ``c = ceil(G / W)``:
        a group never straddles two ranks, and a rank may get none of an epoch's ragged last batch.
        """
        g = self.group or max(len(batch), 1)
        groups = [batch[i : i + g] for i in range(0, len(batch), g)]
        per = -(-len(groups) // self.world)
        mine = groups[self.rank * per : (self.rank + 1) * per]
        return [i for grp in mine for i in grp], [len(grp) for grp in mine], len(groups)

    def __len__(self) -> int:
        return len(self.index_loader)

    def _open(self) -> None:
        gen = self.index_loader.generator
        gen.set_state(self._epoch_start)
        batches = [b.tolist() for b in self.index_loader]  # advances ``gen`` exactly as one epoch of the loader
        if self.seeded:  # item j of the epoch's p-th global batch: its own augmentation seed
            batches = [[(i, self.item_seed(p, j)) for j, i in enumerate(b)] for p, b in enumerate(batches)]
        parts = [self.split(b) for b in batches[self.position :]]
        self._plan = [(sizes, total) for _, sizes, total in parts]
        self._sampler.batches = [idx for idx, _, _ in parts if idx]
        if self._loader is None or self.num_workers == 0:
            data_gen = torch.Generator()
            data_gen.set_state(self._epoch_start)
            self._loader = DataLoader(
                _SeededItems(self.dataset) if self.seeded else self.dataset,
                batch_sampler=self._sampler,
                num_workers=self.num_workers,
                generator=data_gen,
                persistent_workers=self.num_workers > 0,  # the same worker processes for every epoch
                pin_memory=self.num_workers > 0 and torch.cuda.is_available(),
                prefetch_factor=4 if self.num_workers > 0 else None,
            )
        self._it = iter(self._loader)

    def item_seed(self, position: int, j: int) -> int:
        """Seed of the random transforms of item ``j`` of the epoch's ``position``-th global batch: a
        function of ``(seed, epoch, position, j)`` only, so neither the number of loader workers nor the
        number of ranks nor a mid-epoch resume changes an augmentation draw."""
        return (((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(position)) * 1_000_003 + int(j)) % (2**63)

    def next(self) -> Any:
        """This rank's part of the next batch, or None when it holds no item of it (a new epoch starts
        when one is used up); :attr:`groups` then holds its group sizes and the step's group count."""
        if self._it is None:
            self._open()
        if not self._plan:
            self.epoch, self.position = self.epoch + 1, 0
            self._epoch_start = self.index_loader.generator.get_state()
            self._open()
        self.groups = self._plan.pop(0)
        self.position += 1
        return next(self._it) if self.groups[0] else None

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "generator": self._epoch_start.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._epoch_start = state["generator"].clone()
        self._it = None


class _Counters:
    """Stateful loss objects (e.g. SigLoss's warm-up counter) as one checkpointable object."""

    def __init__(self, objects: Mapping[str, Any]):
        self.objects = dict(objects)

    def state_dict(self) -> Dict[str, Any]:
        return {k: dict(vars(v)) for k, v in self.objects.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in self.objects.items():
            vars(v).update(state.get(k, {}))


def check_groups(
    batch_size: int, samples_per_gpu: Optional[int], key: str = "task.protocols.<protocol>.schedule"
) -> None:
    """The loss groups of a probe schedule fit its batch (a clear error if not)."""
    if samples_per_gpu is not None and (samples_per_gpu < 1 or batch_size % samples_per_gpu):
        raise BenchError(
            f"{key}.batch_size={batch_size} is not a multiple of samples_per_gpu={samples_per_gpu}",
            f"set {key}.samples_per_gpu to a divisor of the batch (the anchor's images per GPU)",
        )


@dataclass(frozen=True)
class ProbeSchedule:
    """The resolved settings of one probe training (``task.protocol.schedule``, checked): batch, loss groups,
    AdamW, lr and momentum schedules, and the checkpoint/log cadence of :class:`bench.train.TrainLoop`."""

    batch_size: int
    samples_per_gpu: Optional[int]
    shuffle: bool
    drop_last: bool
    lr: float
    weight_decay: float
    betas: Tuple[float, ...]
    decay: str
    warmup_start: float
    min_factor: float
    power: float
    shape: str
    momentum: Optional[str]
    grad_clip: Optional[float]
    ckpt_every: int
    keep_last: int
    log_every: int
    length: Mapping[str, Any]  # iters / epochs / warmup_iters / warmup, read by total_steps and warmup_steps

    @classmethod
    def from_config(cls, sched: Mapping[str, Any], key: str = "task.protocol.schedule") -> "ProbeSchedule":
        """Check ``sched`` (:func:`check_schedule`, :func:`check_groups`, the momentum schedule) and resolve it."""
        sched = dict(sched)
        check_schedule(sched, key)
        bs = int(sched["batch_size"])
        spg = None if sched.get("samples_per_gpu") is None else int(sched["samples_per_gpu"])
        check_groups(bs, spg, key)
        momentum = sched.get("momentum")
        if momentum not in (None, "onecycle"):
            from bench.errors import UnknownNameError

            raise UnknownNameError("probe momentum schedule", str(momentum), ["onecycle", "null"])
        clip = sched.get("grad_clip")
        return cls(
            batch_size=bs,
            samples_per_gpu=spg,
            shuffle=bool(sched["shuffle"]),
            drop_last=bool(sched.get("drop_last", False)),
            lr=float(sched["lr"]),
            weight_decay=float(sched["weight_decay"]),
            betas=tuple(float(b) for b in sched["betas"]),
            decay=str(sched["decay"]),
            warmup_start=float(sched["warmup_start"]),
            min_factor=float(sched["min_factor"]),
            power=float(sched["power"]) if sched.get("power") is not None else 1.0,  # read only by decay=poly
            shape=str(sched["shape"]),
            momentum=momentum,
            grad_clip=float(clip) if clip else None,
            ckpt_every=int(sched.get("ckpt_every", 500)),
            keep_last=int(sched.get("keep_last", 2)),
            log_every=int(sched.get("log_every", 50)),
            length={k: sched.get(k) for k in ("iters", "epochs", "warmup_iters", "warmup")},
        )

    def batches(self, dataset: Dataset, seed: int, num_workers: int, world: int, rank: int) -> EpochBatches:
        """The training batches of ``dataset`` (this rank's groups of every global batch); a BenchError if
        there are none."""
        batches = EpochBatches(
            dataset,
            self.batch_size,
            seed,
            shuffle=self.shuffle,
            num_workers=num_workers,
            drop_last=self.drop_last,
            group=self.samples_per_gpu,
            world=world,
            rank=rank,
        )
        if len(batches) == 0:
            raise BenchError("the probe's training split is empty", "check task.dataset (splits, limit)")
        return batches

    def loop_options(self) -> Dict[str, Any]:
        """The :class:`bench.train.TrainLoop` options the schedule sets."""
        return {
            "ckpt_every": self.ckpt_every,
            "keep_last": self.keep_last,
            "grad_clip": self.grad_clip,
            "log_every": self.log_every,
            "images_per_step": self.batch_size,
        }

    def identity(self, per_epoch: int, items: int) -> Dict[str, Any]:
        """What a probe checkpoint must match to be resumed (besides the caller's ``fingerprint``)."""
        out = {"kind": "probe", "per_epoch": per_epoch, "batch_size": self.batch_size, "items": items}
        return {**out, **({"samples_per_gpu": self.samples_per_gpu} if self.samples_per_gpu else {})}

    def steps(self, per_epoch: int) -> Tuple[int, float]:
        """``(total steps, warm-up steps)`` at ``per_epoch`` batches per epoch."""
        return total_steps(self.length, per_epoch), warmup_steps(self.length, per_epoch)

    def optimiser(self, module: torch.nn.Module) -> torch.optim.AdamW:
        """AdamW over ``module``'s trainable parameters."""
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    def lr_scheduler(self, opt: torch.optim.Optimizer, total: int, warm: float) -> Any:
        """The per-step lr schedule of ``opt`` (:func:`lr_factor`)."""
        factor = lambda s: lr_factor(  # noqa: E731
            s, total, warm, self.decay, self.warmup_start, self.min_factor, self.power, self.shape
        )
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def probe_ranks(distributed: bool, samples_per_gpu: Optional[int]) -> Tuple[int, int]:
    """``(world, rank)`` of the probe's training: the process group's for a data-parallel probe
    (``distributed`` in a multi-rank group), else ``(1, 0)``.

    Data-parallel: every rank draws the same global batches and loads only its groups (:func:`group_loss`),
    gradients are averaged by :class:`bench.train.TrainLoop`, and rank 0 alone writes. It needs loss groups
    (``samples_per_gpu``: a BenchError without them); any number of ranks works (ranks may hold unequal
    numbers of groups)."""
    from bench import distributed as dist

    world = dist.world_size() if distributed and dist.initialized() else 1
    if world > 1 and samples_per_gpu is None:
        raise BenchError(
            "a data-parallel probe needs loss groups (its loss is one group over the whole batch)",
            "set task.protocols.<protocol>.schedule.samples_per_gpu, or train the probe in one process",
        )
    return world, (dist.rank() if world > 1 else 0)


def whole_batch_loss(batches: EpochBatches, step_loss: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Single process, no loss groups (no ``samples_per_gpu``): the loss of the next batch is ``step_loss(batch)``,
    the loss of the whole batch (one group)."""
    return lambda: step_loss(batches.next())


def group_loss(batches: EpochBatches, step_loss: Callable[..., torch.Tensor], world: int) -> Callable[[], torch.Tensor]:
    """Loss groups (``sched.samples_per_gpu``, the anchor's per-GPU batch), on one rank or many: the next
    step's loss is ``world / G`` times ``step_loss(batch, sizes)``.

    The global batch of ``batch_size`` items is cut into groups of ``samples_per_gpu``, ``step_loss(batch,
    sizes)`` returns the *sum* of the losses of its groups (``sizes``: the group sizes within ``batch``) and
    the step's loss is that sum over the ``G`` groups of the step divided by ``G`` -- the loss DDP optimises
    when every GPU computes its loss on its own ``samples_per_gpu`` images and the gradients are averaged.
    On ``world`` ranks (:func:`probe_ranks`) each rank holds only its groups (:meth:`EpochBatches.split`)
    and its loss is ``W / G x`` the sum of their losses, so the rank-averaged gradient is the gradient of
    the one-process loss; ``step_loss(None, [])`` is called on a rank that holds no group of the step (it
    must return a zero loss that still takes part in the collectives, e.g. SyncBN's)."""

    def loss() -> torch.Tensor:
        batch = batches.next()
        sizes, groups = batches.groups
        return step_loss(batch, sizes) * (world / groups)

    return loss


@contextlib.contextmanager
def _probe_workdir(workdir: Union[str, Path, None]) -> Iterator[Tuple[Path, bool]]:
    """``(directory, kept)``: the caller's ``workdir``, or a temporary directory removed on exit."""
    if workdir is not None:
        yield Path(workdir), True
        return
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        yield Path(tmp), False


class _ProbeSteps:
    """The probe's step for :class:`bench.train.TrainLoop`: the next batch's loss (``next_loss``), the
    OneCycle beta1 of the step, and the step losses not yet handed to ``on_step``."""

    def __init__(self, next_loss: Callable[[], torch.Tensor], opt, momentum: Optional[str], total: int, on_step):
        self.next_loss, self.opt, self.momentum, self.total, self.on_step = next_loss, opt, momentum, total, on_step
        self.values: Dict[int, float] = {}

    def __call__(self, step: int) -> torch.Tensor:
        loss = self.next_loss()
        if self.momentum == "onecycle":  # beta1 of this step, before the optimiser step (mmcv momentum hook)
            for g in self.opt.param_groups:
                g["betas"] = (onecycle_momentum(step, self.total), g["betas"][1])
        self.values[step] = float(loss.detach())
        return loss

    def after(self, done: int) -> None:
        if self.on_step is not None:
            self.on_step(done - 1, self.values[done - 1])
        self.values.clear()

    def run(self, loop: Any, stop_after: Optional[int], desc: str, per_epoch: int) -> List[Dict[str, Any]]:
        """``loop.run`` of these steps; a non-finite loss becomes one error naming the step, its epoch and the fix."""
        try:
            return loop.run(self, self.after, stop_after=stop_after)
        except NonFiniteLossError:
            step = loop.step
            value = self.values.get(step, float("nan"))
            raise NonFiniteLossError(
                f"{desc}: the probe loss became {value} at step {step} (epoch {step // per_epoch})",
                "lower task.protocols.<protocol>.schedule.lr, or check the labels of the training split "
                "(e.g. depth <= 0 inside the valid mask)",
            ) from None


def train_probe(
    module: torch.nn.Module,
    dataset: Dataset,
    step_loss: Callable[[Any], torch.Tensor],
    sched: Mapping[str, Any],
    *,
    seed: int = 0,
    num_workers: int = 0,
    desc: str = "probe",
    progress: bool = True,
    on_step: Optional[Callable[[int, float], None]] = None,
    workdir: Union[str, Path, None] = None,
    stop_after: Optional[int] = None,
    loss_state: Optional[Mapping[str, Any]] = None,
    fingerprint: Optional[Mapping[str, Any]] = None,
    distributed: bool = False,
    key: str = "task.protocol.schedule",
) -> Dict[str, Any]:
    """Train ``module``'s parameters to minimise ``step_loss(batch)`` over ``dataset`` with the schedule ``sched``
    (resolved to a :class:`ProbeSchedule`), through :class:`bench.train.TrainLoop` (module docstring): a
    ``workdir`` keeps the checkpoints and a later call with it resumes bit-identically, with any
    ``num_workers``; without one it trains in a temporary directory. ``loss_state``: objects whose attributes
    change while training (a SigLoss warm-up counter), checkpointed with the probe. ``stop_after`` ends the
    call after that many steps (after a checkpoint); ``steps < total_steps`` then says training is unfinished.

    The step's loss: :func:`whole_batch_loss` (one process, no loss groups) or :func:`group_loss`
    (``samples_per_gpu``), on one rank or on those of a data-parallel probe (``distributed``, :func:`probe_ranks`).
    Returns ``{"steps", "total_steps", "epochs", "final_loss" (mean of the last epoch), "losses" (per step)}``."""
    from bench.train import TrainLoop

    settings = ProbeSchedule.from_config(sched, key)
    world, rank = probe_ranks(distributed, settings.samples_per_gpu)
    batches = settings.batches(dataset, seed, num_workers, world, rank)
    per_epoch = len(batches)
    total, warm = settings.steps(per_epoch)
    opt = settings.optimiser(module)
    if settings.samples_per_gpu is None:
        next_loss = whole_batch_loss(batches, step_loss)
    else:
        next_loss = group_loss(batches, step_loss, world)
    steps = _ProbeSteps(next_loss, opt, settings.momentum, total, on_step)
    state = {"probe": module, "batches": batches, **({"loss_state": _Counters(loss_state)} if loss_state else {})}
    with _probe_workdir(workdir) as (where, kept):
        loop = TrainLoop(
            where,
            total,
            opt,
            state,
            scheduler=settings.lr_scheduler(opt, total, warm),
            **settings.loop_options(),
            progress=progress,
            desc=desc,
            fingerprint={**settings.identity(per_epoch, len(dataset)), **dict(fingerprint or {})},
            tensorboard=kept,  # TensorBoard events (the [tb] extra) beside the curves of a kept workdir
            distributed=world > 1,
        )
        module.train()
        history = steps.run(loop, stop_after, desc, per_epoch)
    module.eval()
    return _summary([float(h["loss"]) for h in history], loop.step, total, per_epoch)


def _summary(losses: List[float], steps: int, total: int, per_epoch: int) -> Dict[str, Any]:
    """:func:`train_probe`'s result: ``final_loss`` is the mean of the last epoch's step losses."""
    last = losses[-min(per_epoch, len(losses)) :] or [float("nan")]
    return {
        "steps": steps,
        "total_steps": total,
        "epochs": steps / per_epoch,
        "final_loss": sum(last) / len(last),
        "losses": losses,
    }
