"""Training scenes of the reconstructor pretraining commands (``pretrain-reconstructor``: the learned
cost-volume reconstructor, :mod:`methods.splat_distill.pretrain`, and MVSplat fine-tuning,
:mod:`methods.splat_distill.finetune_mvsplat`)."""

from __future__ import annotations

from pathlib import Path

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
