"""The Backbone seam: a timm model behind one feature-extraction interface.

A :class:`Backbone` owns everything between an image batch in [0, 1] and dense
features ``[B, C, h, w]``: resizing or padding to a multiple of the patch size,
input normalisation, and multi-layer extraction. Subclasses (ViT, CNN) implement
only :meth:`Backbone._extract`. ``backbone.model`` is the plain timm model; its
state dict is in timm layout, so a saved ``model.safetensors`` loads into
``timm.create_model(spec.timm_name, **spec.timm_kwargs)`` with ``strict=True``.

Families register a :class:`BackboneSpec` per name in ``BACKBONES``;
:func:`build_backbone` turns a ``cfg.backbone`` node into a Backbone with its weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import StateDict, load_state_dict_strict, read_state_dict
from ..errors import BenchError, CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("resize", "pad", "center", "center_probe3d")


def pad_amounts(size: int, patch: int, mode: str) -> Tuple[int, int]:
    """(before, after) zero padding of one axis of ``size`` pixels to the patch multiple.

    ``pad``: all after (bottom/right). ``center``: ``ceil(size / patch) * patch - size`` split
    ``floor`` before / rest after (FiT3D/SnD ``evaluation/eval_utils/misc.py::CenterPadding``, the
    DINOv2 hub ``CenterPadding``). ``center_probe3d``: Probe3D ``evals/models/utils.py::center_padding``,
    which pads ``patch - size % patch`` -- a whole extra patch on an axis that is already a multiple
    when the other axis is not (no padding at all when both are multiples).
    """
    if mode == "center_probe3d":
        raise ValueError("center_probe3d pads both axes together: use pad_2d")
    total = math.ceil(size / patch) * patch - size
    return (0, total) if mode == "pad" else (total // 2, total - total // 2)


def pad_2d(height: int, width: int, patch: int, mode: str) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of an image to the patch multiple (see :func:`pad_amounts`)."""
    if mode == "center_probe3d":
        dh, dw = height % patch, width % patch
        if dh == 0 and dw == 0:
            return 0, 0, 0, 0
        ph, pw = patch - dh, patch - dw
        return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2
    return (*pad_amounts(height, patch, mode), *pad_amounts(width, patch, mode))


class Backbone(nn.Module):
    """Dense features from a timm model; see the module docstring.

    Attributes: ``name``, ``model`` (plain timm model), ``patch_size`` (output stride),
    ``embed_dim`` (channels of every returned map), ``num_blocks`` (valid layer indices
    are ``-num_blocks .. num_blocks-1``), ``has_cls`` (a real CLS token exists).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        patch_size: int,
        embed_dim: int,
        num_blocks: int,
        has_cls: bool,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize: str = "resize",
        layers: Sequence[int] = (-1,),
        spec: Optional["BackboneSpec"] = None,
    ):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise BenchError(
                f"backbone.resize='{resize}' is not a resize mode", f"use one of: {', '.join(RESIZE_MODES)}"
            )
        self.name, self.model, self.spec = name, model, spec
        self.patch_size, self.embed_dim, self.num_blocks, self.has_cls = patch_size, embed_dim, num_blocks, has_cls
        self.resize_mode = resize
        self.default_layers = self._check_layers(layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- input side -------------------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Feature-map size ``(h, w)`` for an input of ``height x width`` pixels."""
        p = self.patch_size
        if self.resize_mode != "resize":
            t, b, l, r = pad_2d(height, width, p, self.resize_mode)
            return (height + t + b) // p, (width + l + r) // p
        return max(1, round(height / p)), max(1, round(width / p))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> normalised, resized (or zero-padded: bottom/right or centred) to the patch multiple."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"{self.name}: expected float images [B,3,H,W] in [0,1], got {tuple(images.shape)} {images.dtype}"
            )
        H, W = images.shape[-2:]
        h, w = self.grid_size(H, W)
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        tH, tW = h * self.patch_size, w * self.patch_size
        if (tH, tW) != (H, W):
            if self.resize_mode != "resize":  # zeros after normalisation = the mean colour
                t, b, l, r = pad_2d(H, W, self.patch_size, self.resize_mode)
                x = F.pad(x, (l, r, t, b))
            else:
                x = F.interpolate(x, size=(tH, tW), mode="bilinear", align_corners=False, antialias=tH < H or tW < W)
        return x

    # -- output side ------------------------------------------------------------------------------
    def _check_layers(self, idx: Sequence[int]) -> List[int]:
        n = self.num_blocks
        idx = [int(i) for i in ([idx] if isinstance(idx, int) else idx)]
        bad = [i for i in idx if not -n <= i < n]
        if bad or not idx:
            raise BenchError(
                f"layer indices {bad or '[]'} out of range for backbone '{self.name}' with {n} block(s)",
                f"use indices in [{-n}, {n - 1}] (negative counts from the end)",
            )
        return [i % n for i in idx]

    def layers(
        self, images: torch.Tensor, idx: Optional[Sequence[int]] = None, norm: bool = True, return_cls: bool = False
    ) -> List[Any]:
        """Features of blocks ``idx`` (default: ``cfg.backbone.layers``), each ``[B, C, h, w]``.

        ``norm`` applies the final norm layer to each (DINOv2 ``get_intermediate_layers``).
        With ``return_cls`` each entry is ``(map, cls[B, C])``.
        """
        idx = self.default_layers if idx is None else self._check_layers(idx)
        return self._extract(self.prepare(images), idx, norm, return_cls)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Last-layer normed patch features ``[B, embed_dim, h, w]`` (DINOv2 x_norm_patchtokens)."""
        return self._extract(self.prepare(images), [self.num_blocks - 1], True, False)[0]

    def _extract(self, x: torch.Tensor, idx: List[int], norm: bool, return_cls: bool) -> List[Any]:
        raise NotImplementedError

    # -- weights ----------------------------------------------------------------------------------
    @staticmethod
    def checkpoint_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
        """Map a foreign checkpoint layout onto ``model``'s timm layout (identity here)."""
        return state_dict

    def load_weights(self, path: str | os.PathLike, source: Optional[str] = None) -> None:
        """Strictly load a checkpoint (timm layout or a layout the family's filter maps).

        A model built on the meta device (no random init; see :func:`build_backbone`) is
        materialised from the checkpoint, cast to the dtypes the model was built with.
        """
        sd = strip_prefix(read_state_dict(path))
        mapped: StateDict = {}

        def key_map(s: StateDict) -> StateDict:
            mapped.update(self.checkpoint_filter(s, self.model))
            return mapped

        on_meta = any(t.is_meta for t in self.model.state_dict().values())
        with warnings.catch_warnings():  # copying into meta tensors is a no-op; we assign below
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            load_state_dict_strict(self.model, sd, source=source or f"checkpoint {path}", key_map=key_map)
        if on_meta:
            own = self.model.state_dict()
            self.model.load_state_dict(
                {k: v.to(own[k].dtype).contiguous() for k, v in mapped.items()}, strict=True, assign=True
            )
            left = [n for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers()) if t.is_meta]
            if left:
                raise RuntimeError(f"{self.name}: tensors not in the state dict stay on meta: {left[:5]}")

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
            f"num_blocks={self.num_blocks}, has_cls={self.has_cls}, resize={self.resize_mode}"
        )


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def input_rules(backbone, pad: Optional[str] = None, pos_embed: Optional[str] = None):
    """Temporarily apply a protocol's input rules to ``backbone`` (and both halves of a concat).

    ``pad``: a :data:`RESIZE_MODES` entry replacing ``backbone.resize_mode``. ``pos_embed``
    (ViTs only): ``timm`` = timm ``dynamic_img_size`` (``resample_abs_pos_embed``: bicubic to the
    target size, antialiased; FiT3D ``utils/model_utils.py::build_2d_model``), ``hub`` = the DINOv2
    torch.hub models (``dinov2/hub/backbones.py``: without registers ``interpolate_offset=0.1``,
    no antialias; ``_reg`` models offset 0, antialias), ``None`` = the backbone's own config.
    """
    parts, todo = [], [backbone]
    while todo:  # a ConcatBackbone contributes both halves
        m = todo.pop()
        if hasattr(m, "finetuned") and hasattr(m, "original"):
            todo += [m.original, m.finetuned]
        elif hasattr(m, "resize_mode"):
            parts.append(m)
    if pad is not None and pad not in RESIZE_MODES:
        raise BenchError(f"feature padding '{pad}' is not a resize mode", f"use one of: {', '.join(RESIZE_MODES)}")
    if pos_embed not in (None, "timm", "hub"):
        raise BenchError(f"position-embedding rule '{pos_embed}' is unknown", "use timm, hub or null")
    saved = []
    for m in parts:
        saved.append(
            (m, m.resize_mode, getattr(m, "interpolate_offset", None), getattr(m, "interpolate_antialias", None))
        )
        if pad is not None:
            m.resize_mode = pad
        if pos_embed is not None and hasattr(m, "interpolate_offset"):
            reg = getattr(getattr(m, "model", None), "reg_token", None) is not None
            m.interpolate_offset, m.interpolate_antialias = (0.0, True) if pos_embed == "timm" or reg else (0.1, False)
    try:
        yield backbone
    finally:
        for m, mode, off, aa in saved:
            m.resize_mode = mode
            if off is not None:
                m.interpolate_offset, m.interpolate_antialias = off, aa


def strip_prefix(sd: StateDict, prefixes: Sequence[str] = ("module.", "backbone.", "encoder.")) -> StateDict:
    """Drop a wrapper prefix (DDP ``module.``, ``backbone.``) shared by every key."""
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            return strip_prefix({k[len(p) :]: v for k, v in sd.items()}, prefixes)
    return sd


# -- specs, building --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """Architecture of one registered backbone name: a Backbone family over a timm model.

    ``package_weights`` returns the path of weights that ship in an installed package
    (``weights: package``), or raises :class:`CheckpointError` saying what to install.
    """

    family: type
    timm_name: str
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    package_weights: Optional[Callable[[], Path]] = None

    def create_model(self, meta: bool = False) -> nn.Module:
        """The plain timm model, random init; on the meta device (no init, no memory) if ``meta``."""
        import timm

        with torch.device("meta") if meta else contextlib.nullcontext():
            return timm.create_model(self.timm_name, pretrained=False, **dict(self.timm_kwargs))


def resolve_weights(cfg: Mapping[str, Any], spec: BackboneSpec) -> Optional[str]:
    """``cfg.weights`` -> a checkpoint path / hf:// reference, or None for random init."""
    w = cfg.get("weights", "none")
    w = "none" if w is None else str(w)
    if w in ("none", "random"):
        return None
    if w == "hub":
        repo = cfg.get("hub_repo")
        if not repo:
            raise CheckpointError(
                f"backbone '{cfg['name']}' has weights=hub but no hub_repo",
                "set backbone.hub_repo=org/repo, or backbone.weights=<local file>",
            )
        from ..hub import hub_download

        return str(hub_download(str(repo), str(cfg.get("hub_file") or "model.safetensors"), cfg.get("hub_revision")))
    if w == "package":
        if spec.package_weights is None:
            raise CheckpointError(
                f"backbone '{cfg['name']}' has no weights shipped in a package",
                "use backbone.weights=hub, none, or a local checkpoint file",
            )
        return str(spec.package_weights())
    return w if w.startswith("hf://") else os.path.expanduser(w)


def build_backbone(cfg: Mapping[str, Any]) -> Backbone:
    """Build ``cfg.backbone``: the registered architecture, then its weights (strictly), in eval mode."""
    from ..registry import BACKBONES

    spec: BackboneSpec = BACKBONES.get(str(cfg["name"]))
    path = resolve_weights(cfg, spec)
    # with weights to load, skip the random init (seconds for ViT-L/g on CPU): build on meta, assign
    backbone = spec.family.from_config(cfg, spec, meta=path is not None)
    if path is not None:
        backbone.load_weights(path, source=f"weights '{cfg.get('weights')}' of backbone '{cfg['name']}'")
    return backbone.eval()


def common_kwargs(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Config keys every family understands (see bench/conf/backbone/*.yaml)."""
    out: Dict[str, Any] = {"resize": str(cfg.get("resize", "resize")), "layers": list(cfg.get("layers", [-1]))}
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            out[key] = tuple(float(v) for v in cfg[key])
    return out


# -- saving / loading trained backbones ---------------------------------------------------------------
def save_backbone(backbone, path: str | os.PathLike) -> Path:
    """Write ``backbone.model.state_dict()`` (timm layout) as safetensors, atomically.

    The metadata names the backbone and its timm architecture so the file is self-describing.
    """
    import json

    from ..io import save_safetensors

    spec = getattr(backbone, "spec", None)
    meta = {"backbone": str(backbone.name), "format": "timm"}
    if spec is not None:
        meta.update(timm_name=spec.timm_name, timm_kwargs=json.dumps(dict(spec.timm_kwargs), sort_keys=True))
    return save_safetensors(backbone.model.state_dict(), path, metadata=meta)


def load_backbone_weights(backbone, path: str | os.PathLike) -> None:
    """Strictly load weights saved by :func:`save_backbone` (or any supported layout) into ``backbone``."""
    backbone.load_weights(path)
