"""FiT3D baseline (Yue et al., ECCV 2024): per-scene feature Gaussians, then 3D-aware fine-tuning.

Modules: ``gaussians`` (3DGS parameters, rendering through :func:`bench.splat.rasterize`, densification,
pruning, opacity reset), ``stage1`` (per-scene optimisation with the RGB + decoded-feature loss,
cached and resumable), ``method`` (the registered ``fit3d`` method: stage I for every training scene,
then stage II fine-tuning of the whole backbone) and ``perf`` (``python -m bench perf lift``: FiT3D's
per-scene optimisation vs Splat-and-Distill's feed-forward lifting).
Facts: docs/methods/fit3d.md; config: bench/conf/method/fit3d.yaml.
"""

from . import method, perf, schema  # noqa: F401  (registrations)
from .method import FiT3D

__all__ = ["FiT3D"]
