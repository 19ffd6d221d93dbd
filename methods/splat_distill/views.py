"""View sampling: two context views and one target view of one scene per training example.

Paper defaults (SnD, following MVSplat's bounded sampler on ScanNet++): the context views are
``gap = 8`` frames apart in the sorted sequence and the target is drawn uniformly between them,
inclusive. ``gap`` may be a ``[min, max]`` range (drawn uniformly per example); a scene shorter than
the gap uses its full length. Target placements:

* ``uniform`` -- uniform in ``[c0, c1]`` inclusive (paper);
* ``middle``  -- ``(c0 + c1) // 2``;
* ``context`` -- one of the two context views (the paper's "context views as targets" ablation).

The sampler draws from its own ``torch.Generator``; its state is part of every training checkpoint.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from bench.errors import BenchError

PLACEMENTS = ("uniform", "middle", "context")


class ViewSampler:
    def __init__(self, num_views: Sequence[int], gap: Union[int, Sequence[int]] = 8,
                 placement: str = "uniform", seed: int = 0):
        if placement not in PLACEMENTS:
            raise BenchError(f"method.views.target='{placement}' is not a target placement",
                             f"use one of {PLACEMENTS}")
        self.num_views = [int(n) for n in num_views]
        self.scenes = [i for i, n in enumerate(self.num_views) if n >= 2]
        if not self.scenes:
            raise BenchError("no scene has the 2 views a training example needs",
                             "use scenes with at least 2 views (method.data.views >= 2)")
        gap = [int(gap), int(gap)] if isinstance(gap, (int, float)) else [int(g) for g in gap]
        if len(gap) != 2 or not 1 <= gap[0] <= gap[1]:
            raise BenchError(f"method.views.gap={gap} is not a frame gap", "use an int >= 1 or [min, max]")
        self.gap, self.placement = gap, placement
        self.generator = torch.Generator().manual_seed(int(seed))

    def _randint(self, lo: int, hi: int) -> int:
        """Uniform integer in ``[lo, hi]`` inclusive."""
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator))

    def sample(self) -> Tuple[int, Tuple[int, int, int]]:
        """``(scene index, (context0, context1, target))``."""
        scene = self.scenes[self._randint(0, len(self.scenes) - 1)]
        n = self.num_views[scene]
        gap = min(self._randint(*self.gap), n - 1)
        c0 = self._randint(0, n - 1 - gap)
        c1 = c0 + gap
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
