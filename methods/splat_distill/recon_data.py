"""Training scenes of the reconstructor pretraining commands (``pretrain-reconstructor``: the learned
cost-volume reconstructor, :mod:`methods.splat_distill.pretrain`, and MVSplat fine-tuning,
:mod:`methods.splat_distill.finetune_mvsplat`), and MVSplat's training augmentation (a horizontal flip of the
whole example)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping

import torch

from bench.errors import BenchError


def open_training_scenes(args):
    """The scenes a reconstructor trains on (``--dataset synthetic``: generated on first use; ``scannetpp``:
    ``--root``): ``(data, training scene ids, held-out scene ids)``."""
    from bench.data.scenes import MultiViewScenes

    if args.dataset == "synthetic":
        from bench.config import compose
        from bench.data.synthetic import ensure_synthetic, split_scenes

        H, W = args.size
        root = (
            Path(args.root)
            if args.root
            else Path(compose([]).paths.data_dir) / (f"synthetic_recon_s{args.seed}_{args.scenes}x{args.views}_{H}x{W}")
        )
        ensure_synthetic(root, args.scenes, args.views, args.size, args.seed)
        data = MultiViewScenes(root, None, args.size)
        train, held = split_scenes(data.scene_ids, args.held_out)
    else:
        if not args.root:
            raise BenchError("--dataset scannetpp needs --root", "pass --root <ScanNet++ root>")
        data = MultiViewScenes(args.root, None, args.size)
        ids = data.scene_ids[: args.scenes]
        train, held = ids[: len(ids) - args.held_out], ids[len(ids) - args.held_out :]
    if not train:
        raise BenchError("no training scenes left after holding out", "use more --scenes or a smaller --held-out")
    return data, train, held


#: ``--augment`` choices of ``pretrain-reconstructor model=mvsplat``
AUGMENTS = ("none", "flip")
#: MVSplat's ``apply_augmentation_shim`` leaves an example as it is when ``torch.rand(()) < 0.5``
FLIP_KEEP = 0.5


def flips(seed: int, index: int) -> bool:
    """Whether example ``index`` of a run seeded ``seed`` is mirrored (``--augment flip``). MVSplat
    (``src/dataset/shims/augmentation_shim.py``) draws ``torch.rand(())`` per example and reflects it unless the
    draw is below 0.5; here the draw comes from a generator seeded by ``(seed, index)`` alone, so the choice
    does not depend on ranks, loader workers or resumption."""
    g = torch.Generator().manual_seed((int(seed) + 1) * 7_000_003 + int(index))
    return not float(torch.rand((), generator=g)) < FLIP_KEEP


def reflect_views(views: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One example mirrored as MVSplat's ``reflect_views`` does it: every image flipped along its width and every
    camera reflected, ``c2w -> M c2w M`` with ``M = diag(-1, 1, 1, 1)`` (the world mirrored in x, each camera in
    its own x), so ``w2c -> M w2c M``; the intrinsics are kept. A world point ``X`` then projects, as the
    mirrored point ``M X``, to the mirrored pixel ``u' = 2 cx - u``: the flipped image's ``W - u`` exactly when
    the principal point is the image centre (``cx = W / 2``), shifted by ``2 cx - W`` pixels otherwise (the
    official shim keeps ``K`` as it is). Other entries (depth, masks) are flipped along their width too."""
    M = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=views["w2c"].dtype, device=views["w2c"].device))
    out = {}
    for k, v in views.items():
        if k == "w2c":
            out[k] = M @ v @ M
        elif k == "K":
            out[k] = v
        else:
            out[k] = v.flip(-1)
    return out
