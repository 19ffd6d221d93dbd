"""MEF: Multiview Equivariance Finetuning (You et al., ICLR 2025; github qq456cvb/3DCorrEnhance).

Modules: ``loss`` (the smooth-AP ranking loss), ``adapt`` (q/v LoRA of the last 4 blocks via peft,
merge, the official checkpoint's LoRA pairs), ``head`` (the 3x3 refinement conv behind the Backbone
seam, its export), ``data`` (training pairs and augmentation), ``method`` (the registered ``mef``
method). The released checkpoints are ``method=mef_official`` (:mod:`baselines.official`).
Facts and deviations: docs/methods/mef.md; config: bench/conf/method/mef.yaml.
"""

from . import method, official, schema  # noqa: F401  (registration)
from .method import MEF

__all__ = ["MEF"]
