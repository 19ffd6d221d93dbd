"""Reading checkpoints and loading them with strict, reported key checking.

``strict=False`` is never used silently: every load goes through
:func:`load_state_dict_strict`, which names the missing and unexpected keys.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

from .errors import CheckpointError, what_is_at
from .safe_pickle import PickleRefused, describe_skipped, load_torch

StateDict = Dict[str, torch.Tensor]


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a ``.safetensors``, ``.pth``/``.pt``/``.bin`` file into a flat state dict.

    Common wrappers (``{"model": ...}``, ``{"state_dict": ...}``, ``{"teacher": ...}``)
    are unwrapped. ``path`` may also be an ``hf://org/repo/file[@rev]`` reference.
    """
    path_s = str(path)
    if path_s.startswith("hf://"):
        from .hub import resolve_hf_path  # local import: the hub client is optional at import time

        path = resolve_hf_path(path_s)
    path = Path(path)
    if not path.is_file():
        why = what_is_at(path, "file")
        raise CheckpointError(
            f"checkpoint file not found: {path}" if why == "does not exist" else f"checkpoint file {path} {why}",
            "pass an existing file (or hf://org/repo/file) as the checkpoint path",
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = load_torch(path)  # never runs code the file names (bench/safe_pickle.py)
    except PickleRefused as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e}",
            "pass a safetensors file or a torch.save'd state dict (bench reads only tensors and plain containers)",
        ) from None
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {e}", "re-download or re-create the file"
        ) from e
    for key in ("state_dict", "model", "teacher", "student", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and not torch.is_tensor(sd[key]):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        skipped = describe_skipped(sd)
        raise CheckpointError(
            f"{path} does not hold a flat state dict of tensors"
            + (f" (it names {skipped}, which bench does not load)" if skipped else ""),
            "save the model's state_dict() (or a dict with a 'model'/'state_dict' entry)",
        )
    return dict(sd)


def _summarise(keys, n: int = 8) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:n])
    return head + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    key_map: Optional[Callable[[StateDict], StateDict]] = None,
) -> None:
    """Load ``state_dict`` into ``model`` requiring an exact key and shape match.

    Raises :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys.
    """
    sd = dict(state_dict)
    if key_map is not None:
        sd = key_map(sd)
    own = model.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    shape = [k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys [{_summarise(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys [{_summarise(unexpected)}]")
        if shape:
            parts.append(
                "shape mismatch ["
                + ", ".join(
                    f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in sorted(shape)[:5]
                )
                + "]"
            )
        raise CheckpointError(
            f"{source} does not match {type(model).__name__}: " + "; ".join(parts),
            "check that the checkpoint was made for this architecture/backbone config "
            "(e.g. backbone=dinov2_vits14 vs dinov2_vitb14, with/without registers)",
        )
    model.load_state_dict(sd, strict=True)


def weights_hash(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's state dict (16 hex digits).

    The one identity of a set of weights (feature caches, FiT3D's teacher key)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BN counters
    return h.hexdigest()[:16]
