"""View sampling: two context views and one target view of one scene per training example.

Paper defaults (SnD, following MVSplat's bounded sampler on ScanNet++): the context views are
``gap = 8`` frames apart in the sorted sequence and the target is drawn uniformly between them,
inclusive. ``gap`` may be a ``[min, max]`` range (drawn uniformly per example); a scene shorter than
the gap uses its full length. Target placements:

* ``uniform`` -- uniform in ``[c0, c1]`` inclusive (paper);
* ``middle``  -- ``(c0 + c1) // 2``;
* ``context`` -- one of the two context views (the paper's "context views as targets" ablation).

The trainer draws example ``i`` of the run (the indices of a step: :func:`step_examples`; official, an epoch's
last step is smaller; deviation ``carry``, ``i = step * global_batch + position``) with
:meth:`ViewSampler.example`, from a generator seeded by ``(seed, i)``: the examples of a step do not
depend on the number of ranks or data-loader workers, nor on what was drawn before, so a resumed or
re-sharded run sees the same examples. :meth:`ViewSampler.sample` (sequential draws from its own
generator, whose state is checkpointed) remains for callers that keep a running stream.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple, Union

import torch

from bench.errors import BenchError

PLACEMENTS = ("uniform", "middle", "context")
ORDERS = ("epoch", "uniform")  # method.views.order
LAST_BATCHES = ("smaller", "carry")  # method.views.last_batch
MAX_REDRAWS = 10_000


def step_examples(step: int, batch: int, epoch_size: int, last_batch: str = "smaller") -> range:
    """Run-wide example indices (the ``index`` of :meth:`ViewSampler.example`) of optimiser step ``step``.

    ``smaller`` (official: a map-style dataset of ``epoch_size`` scenes, ``DataLoader(batch_size, shuffle=True)``
    with the default ``drop_last=False``): an epoch is ``ceil(epoch_size / batch)`` steps of ``batch`` examples
    and a last one of the ``epoch_size mod batch`` left (when it is not 0), so every example of an epoch is seen
    exactly once and no step straddles two epochs. ``carry`` (deviation): every step has ``batch`` examples,
    ``step * batch .. step * batch + batch - 1``, an epoch's remainder running on into the next one."""
    batch, step = int(batch), int(step)
    if last_batch == "carry":
        return range(step * batch, (step + 1) * batch)
    if last_batch != "smaller":
        raise BenchError(f"method.views.last_batch='{last_batch}' is not a choice", f"use one of {LAST_BATCHES}")
    per_epoch = -(-int(epoch_size) // batch)
    epoch, k = divmod(step, per_epoch)
    start = epoch * int(epoch_size) + k * batch
    return range(start, min(start + batch, (epoch + 1) * int(epoch_size)))


def rank_share(n: int, rank: int, world: int) -> range:
    """Positions (0-based within a step's ``n`` examples) that rank ``rank`` of ``world`` takes: consecutive,
    balanced chunks from ``ceil(rank * n / world)`` up to the next rank's start. A full step whose batch divides
    over the ranks gives every rank ``n / world`` (:func:`bench.distributed.rank_slice`); an epoch's smaller last
    step gives shares that differ by at most one, the larger ones to the first ranks, and with ``n < world`` the
    last ranks get none."""
    return range(-(-rank * n // world), -(-(rank + 1) * n // world))


def frame_numbers(names: Sequence[str]) -> List[int]:
    """The official loader's frame number of each file name: its first run of digits (-1 without one)."""
    out = []
    for n in names:
        m = re.search(r"\d+", str(n))
        out.append(int(m.group()) if m else -1)
    return out


class ViewSampler:
    """``order``: ``uniform`` -- every example draws its scene uniformly (with replacement); ``epoch`` (official:
    a map-style dataset of scenes, DataLoader ``shuffle=True``) -- examples ``e*S .. (e+1)*S - 1`` visit the
    ``S`` scenes once each, in a permutation drawn per epoch ``e``. ``numbers``: per scene, each view's frame
    number (:func:`frame_numbers`); when given, an example whose context views' numbers differ by other than
    their index gap (frames missing in between) is drawn again in the same scene (official
    ``dataset_scannetpp.py __getitem__``)."""

    def __init__(
        self,
        num_views: Sequence[int],
        gap: Union[int, Sequence[int]] = 8,
        placement: str = "uniform",
        seed: int = 0,
        order: str = "uniform",
        numbers: Optional[Sequence[Sequence[int]]] = None,
    ):
        if placement not in PLACEMENTS:
            raise BenchError(f"method.views.target='{placement}' is not a target placement", f"use one of {PLACEMENTS}")
        if order not in ORDERS:
            raise BenchError(f"method.views.order='{order}' is not a choice", f"use one of {ORDERS}")
        self.order = order
        self.numbers = None if numbers is None else [list(map(int, n)) for n in numbers]
        self.num_views = [int(n) for n in num_views]
        self.scenes = [i for i, n in enumerate(self.num_views) if n >= 2]
        if not self.scenes:
            raise BenchError(
                "no scene has the 2 views a training example needs",
                "use scenes with at least 2 views (method.data.views >= 2)",
            )
        gap = [int(gap), int(gap)] if isinstance(gap, (int, float)) else [int(g) for g in gap]
        if len(gap) != 2 or not 1 <= gap[0] <= gap[1]:
            raise BenchError(f"method.views.gap={gap} is not a frame gap", "use an int >= 1 or [min, max]")
        self.gap, self.placement = gap, placement
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(int(seed))
        if self.numbers is not None:  # the official loop would never end on a scene without a valid window
            for i in self.scenes:
                if not self._windows(i):
                    raise BenchError(
                        f"scene {i} has no context pair {gap} frames apart without missing frame numbers",
                        "drop the scene, or sample without the rule: method.views.contiguous=false",
                    )

    def _windows(self, scene: int) -> bool:
        n, fn = self.num_views[scene], self.numbers[scene]
        for g in range(self.gap[0], self.gap[1] + 1):
            g = min(g, n - 1)
            if any(fn[c + g] - fn[c] == g for c in range(n - g)):
                return True
        return False

    @property
    def epoch_size(self) -> int:
        """Examples per epoch: one per scene with at least 2 views (the official dataset's length)."""
        return len(self.scenes)

    def _epoch_scene(self, index: int) -> int:
        """``order: epoch``: the scene of example ``index``: its epoch's permutation of the scenes."""
        S = len(self.scenes)
        epoch, k = divmod(int(index), S)
        g = torch.Generator().manual_seed((self.seed + 1) * 2_000_029 + epoch)
        return self.scenes[int(torch.randperm(S, generator=g)[k])]

    def _randint(self, lo: int, hi: int) -> int:
        """Uniform integer in ``[lo, hi]`` inclusive."""
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator))

    def sample(self) -> Tuple[int, Tuple[int, int, int]]:
        """``(scene index, (context0, context1, target))``, the next draw of the running stream."""
        return self._draw()

    def example(self, index: int) -> Tuple[int, Tuple[int, int, int]]:
        """Example ``index`` of the run: a draw from a generator seeded by ``(seed, index)`` only."""
        saved = self.generator
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        try:
            return self._draw(self._epoch_scene(index) if self.order == "epoch" else None)
        finally:
            self.generator = saved

    def _draw(self, scene: Optional[int] = None) -> Tuple[int, Tuple[int, int, int]]:
        if scene is None:
            scene = self.scenes[self._randint(0, len(self.scenes) - 1)]
        n = self.num_views[scene]
        for _ in range(MAX_REDRAWS):
            gap = min(self._randint(*self.gap), n - 1)
            c0 = self._randint(0, n - 1 - gap)
            c1 = c0 + gap
            if self.numbers is None or self.numbers[scene][c1] - self.numbers[scene][c0] == gap:
                break
        else:
            raise BenchError(
                f"no context pair without missing frames in scene {scene} after {MAX_REDRAWS} draws",
                "sample without the rule: method.views.contiguous=false",
            )
        if self.placement == "uniform":
            t = self._randint(c0, c1)
        elif self.placement == "middle":
            t = (c0 + c1) // 2
        else:
            t = (c0, c1)[self._randint(0, 1)]
        return scene, (c0, c1, t)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.generator.set_state(state["generator"])
