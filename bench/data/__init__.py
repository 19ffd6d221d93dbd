"""Datasets. Importing this package registers every dataset entry in ``bench.registry.DATASETS``.

Modules: ``synthetic`` (built-in procedural rooms), ``scenes`` (the multi-view scene reader for
synthetic scenes and ScanNet++). Real-dataset readers add one import line below.
"""

from . import synthetic  # noqa: F401
from . import ade20k, fit3d_eval, kitti_eigen, navi, nyuv2, scannet_pairs, spair71k, voc  # noqa: F401  real-dataset readers (registered in DATASETS)
from . import scenes  # noqa: F401
from . import mef_objaverse, objects  # noqa: F401  (MEF object renders + their offline generator)
