"""Tasks: probes, losses, metrics and the task modules. Importing this package registers every task
in ``bench.registry.TASKS`` (one import line per task module below).

Seam: a task class has ``evaluate(backbone, cfg, workdir) -> dict[str, float]`` and optionally
``check(cfg)`` (fail before training). Readers of real datasets follow :mod:`tasks.data`.
"""

from . import depth, normals, perf, segmentation  # noqa: F401
from . import correspondence  # noqa: F401  (scannet_corr, synth_corr, navi_corr, spair_corr)
