"""Frozen-backbone features for probes, and an on-disk feature cache.

:class:`FeatureSpec` says which features a probe reads: block indices (``last``, ``quartiles``,
``default`` = the backbone config's ``layers``, or an explicit list), whether the final norm is
applied, whether the CLS token (for a backbone without one: the global average of the map,
as ``layers(return_cls=True)`` returns) is concatenated to every position ("dense-cls"), and the
protocol's input rules: ``pad`` (how images reach the patch multiple: ``center`` zero padding
after normalisation, see :func:`bench.backbones.base.pad_2d`; null = the backbone's own
``resize``) and ``pos_embed`` (``timm`` | ``hub`` | null, see :func:`bench.backbones.base.input_rules`).

For a :class:`bench.backbones.ConcatBackbone` (FiT3D's evaluation) the CLS part is the
**original** backbone's CLS only: FiT3D ``linear_evaluate_fit3d.py`` returns
``(cat[original patch, fine-tuned patch], original CLS)``, so the probe sees 3C channels.

:class:`FeatureCache` stores per-sample features of a split under
``<cache_dir>/features/<key>/`` where ``key`` hashes the backbone name and a hash of its weights,
the feature spec, the preprocessing and the dataset identity. Each sample is one file written
atomically; a ``meta.json`` marks the cache complete. An interrupted extraction resumes where it
stopped. Only augmentation-free training uses it (random crops/flips need fresh features). A forced
run (``force=true``) refills it from scratch (:meth:`FeatureCache.fill` ``refresh``): the key holds the
weights and settings, not the code that computed the features.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset
from bench.progress import progress as show_progress

from bench.checkpoint import weights_hash  # noqa: F401  (re-exported: tasks.features.weights_hash)
from bench.config import stable_hash
from bench.io import torch_save, write_json


def quartile_layers(num_blocks: int) -> List[int]:
    """Blocks at depth quartiles: 12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23], 1 -> [0, 0, 0, 0]."""
    return [max(round(num_blocks * q / 4) - 1, 0) for q in (1, 2, 3, 4)]


@dataclass(frozen=True)
class FeatureSpec:
    layers: tuple
    norm: bool = True
    cls: bool = False
    pad: Optional[str] = None
    pos_embed: Optional[str] = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], backbone) -> "FeatureSpec":
        from .train_probe import need

        layers = need(cfg, "layers", "task.protocol.features")
        if layers == "last":
            idx = [backbone.num_blocks - 1]
        elif layers == "quartiles":
            idx = quartile_layers(backbone.num_blocks)
        elif layers == "default":
            idx = list(getattr(backbone, "default_layers", [backbone.num_blocks - 1]))
        else:
            idx = [int(i) % backbone.num_blocks for i in layers]
        pad, pos = cfg.get("pad"), cfg.get("pos_embed")
        return cls(
            tuple(idx),
            bool(need(cfg, "norm", "task.protocol.features")),
            bool(need(cfg, "cls", "task.protocol.features")),
            None if pad is None else str(pad),
            None if pos is None else str(pos),
        )


def raw_features(backbone, images: torch.Tensor, spec: FeatureSpec) -> List[List[torch.Tensor]]:
    """``[[map, cls], ...]`` per layer (``[map]`` without CLS), computed without gradients."""
    from bench.backbones.base import input_rules

    with torch.no_grad(), input_rules(backbone, spec.pad, spec.pos_embed):
        out = backbone.layers(images, list(spec.layers), norm=spec.norm, return_cls=spec.cls)
    return [list(o) if spec.cls else [o] for o in out]


def assemble(raw: Sequence[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
    """Probe input maps from :func:`raw_features` entries: CLS broadcast and concatenated if present."""
    maps = []
    for entry in raw:
        m = entry[0]
        if len(entry) > 1:  # batched: map [B,C,h,w], cls [B,C]
            m = torch.cat([m, entry[1][..., None, None].expand(-1, -1, *m.shape[-2:])], dim=1)
        maps.append(m.float())
    return maps


def features(backbone, images: torch.Tensor, spec: FeatureSpec) -> List[torch.Tensor]:
    return assemble(raw_features(backbone, images, spec))


class FeatureCache:
    """Per-sample features of one dataset split for one frozen backbone (see module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike,
        backbone_name: str,
        weights: str,
        spec: FeatureSpec,
        preprocessing: Any,
        dataset: Any,
        dtype: str = "float32",
    ):
        self.payload = {
            "backbone": backbone_name,
            "weights": weights,
            "spec": asdict(spec),
            "preprocessing": preprocessing,
            "dataset": dataset,
            "dtype": dtype,
        }
        self.key = f"{backbone_name}-{weights[:8]}-{stable_hash(self.payload)}"
        self.dir = Path(root) / self.key
        self.spec, self.dtype = spec, getattr(torch, dtype)

    def path(self, i: int) -> Path:
        return self.dir / f"{i:07d}.pt"

    def complete(self, n: int) -> bool:
        meta = self.dir / "meta.json"
        try:
            return meta.exists() and json.loads(meta.read_text()).get("count") == n
        except (ValueError, AttributeError):
            return False  # a torn meta.json: extract again

    def fill(
        self,
        backbone,
        images: Dataset,
        batch_size: int = 8,
        device: Optional[str] = None,
        progress: bool = True,
        refresh: bool = False,
    ) -> "FeatureCache":
        """Extract and store features for every sample of ``images`` (a dataset of ``{"image": ...}``).
        ``refresh`` (a forced run) discards what an earlier run stored: ``meta.json`` goes first and
        every sample is extracted again, each file replaced atomically (so another job reading the
        same cache meanwhile never meets a missing or torn file)."""
        n = len(images)
        if refresh:
            (self.dir / "meta.json").unlink(missing_ok=True)
        elif self.complete(n):
            return self
        todo = [i for i in range(n) if refresh or not self.path(i).exists()]
        device = device or next(iter(backbone.parameters()), torch.zeros(())).device
        bar = show_progress(total=n, initial=n - len(todo), desc=f"features {self.key}", unit="img", enable=progress)
        try:
            for s in range(0, len(todo), batch_size):
                ids = todo[s : s + batch_size]
                imgs = [images[i]["image"] for i in ids]
                if len({tuple(x.shape) for x in imgs}) > 1:  # different sizes: one at a time
                    raws = [raw_features(backbone, x[None].to(device), self.spec) for x in imgs]
                    per = [[[t[0] for t in layer] for layer in r] for r in raws]
                else:
                    r = raw_features(backbone, torch.stack(imgs).to(device), self.spec)
                    per = [[[t[j] for t in layer] for layer in r] for j in range(len(ids))]
                for i, entry in zip(ids, per):
                    try:
                        torch_save([[t.to("cpu", self.dtype).clone() for t in layer] for layer in entry], self.path(i))
                    except (OSError, RuntimeError) as e:
                        self._write_failed(e, n)
                bar.update(len(ids))
        finally:
            bar.close()
        write_json(self.dir / "meta.json", {**self.payload, "count": n})
        return self

    def sample_bytes(self, backbone, image: torch.Tensor) -> int:
        """Bytes one sample's features take in the cache (``image`` [3,H,W]: one forward pass)."""
        device = next(iter(backbone.parameters()), torch.zeros(())).device
        with torch.no_grad():
            raw = raw_features(backbone, image[None].to(device), self.spec)
        return sum(t[0].numel() for layer in raw for t in layer) * self.dtype.itemsize

    def todo(self, n: int) -> int:
        """Samples of an ``n``-sample split that are not stored yet."""
        return 0 if self.complete(n) else sum(not self.path(i).exists() for i in range(n))

    def _write_failed(self, e: BaseException, n: int) -> None:
        from bench.errors import BenchError
        from bench.io import write_failure

        why = write_failure(e)
        if why is None:
            raise e
        kept = sum(self.path(i).exists() for i in range(n))
        raise BenchError(
            f"the feature cache could not be written ({why}) after {kept} of {n} samples; those {kept} are kept "
            f"in {self.dir}",
            "free space (or point BENCH_CACHE / paths.cache_dir at a file system with room), then run the same "
            "command again: the extraction resumes from the stored samples",
        ) from None

    def load(self, i: int) -> List[List[torch.Tensor]]:
        try:
            return torch.load(self.path(i), map_location="cpu", weights_only=True)
        except Exception as e:  # a torn/corrupt/foreign file: name it and the fix, no traceback
            from bench.errors import BenchError

            raise BenchError(
                f"feature cache file {self.path(i)} cannot be read ({type(e).__name__})",
                f"delete the directory {self.dir} (the features are extracted again on the next run)",
            ) from None


class CachedFeatures(Dataset):
    """``(raw features from the cache, targets from the dataset)`` per sample, for probe training.

    The (deterministic, augmentation-free) targets are read from ``targets`` once and kept in memory,
    so later epochs touch neither images nor label files.
    """

    def __init__(self, cache: FeatureCache, targets: Dataset, keys: Sequence[str]):
        self.cache, self.targets, self.keys = cache, targets, tuple(keys)
        self._memo: Dict[int, Dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if i not in self._memo:
            sample = self.targets[i]
            self._memo[i] = {k: sample[k] for k in self.keys if k in sample}
        return {**self._memo[i], "features": self.cache.load(i)}
