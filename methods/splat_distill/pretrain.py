"""``python -m bench pretrain-reconstructor [model=learned|mvsplat]``: train a reconstructor for Splat-and-Distill.

``model=learned`` (the default, described here) pretrains the learned two-view reconstructor;
``model=mvsplat`` fine-tunes MVSplat's encoder from ``re10k.ckpt`` (:mod:`.finetune_mvsplat`).

Training pairs are two views ``gap`` frames apart of one training scene. The network predicts
per-pixel depth, opacity and scale for both views; the Gaussians of each view, coloured with its
pixels' RGB, are splatted with :func:`bench.splat.rasterize` into the *other* view's camera, and the
loss compares the render with that view: L1 on RGB (black background, every pixel) plus
``depth_weight`` x the relative L1 of the rendered depth against the dataset depth (pixels with
depth and alpha > 0.5). The result is saved (safetensors + architecture in its metadata) and used
frozen by ``method.reconstructor.name=learned``.

After training, held-out scenes are evaluated: depth AbsRel / RMSE of the network's per-pixel depth
against the dataset depth, beside two constant-depth baselines: the training set's median depth
(a constant predictor fit on the training data) and each image's own median (an oracle constant).
Training resumes from ``<out>.train/`` when interrupted.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from bench.errors import BenchError
from bench.io import write_json
from bench.seed import seed_everything
from bench.splat import rasterize
from bench.train import TrainLoop, one_cycle_cosine

from .recon_data import open_training_scenes
from .reconstruct import CostVolumeReconstructor, PixelGaussians
from .views import ViewSampler

log = logging.getLogger("bench")


MODELS = ("learned", "mvsplat")
#: ``model=learned`` defaults of the flags whose default depends on the model (``model=mvsplat``:
#: :data:`.finetune_mvsplat.DEFAULTS`)
LEARNED_DEFAULTS = dict(
    dataset="synthetic",
    scenes=36,
    held_out=4,
    steps=1500,
    batch=2,
    lr=1e-3,
    gap=[2, 6],
    near=0.5,
    far=20.0,
    size=(64, 80),
)
#: flags only ``model=mvsplat`` reads (kept out of the learned trainer's resume fingerprint)
MVSPLAT_ONLY = ("model", "checkpoint", "lpips_vgg", "lpips_weight", "grad_clip", "augment", "last_batch")


def _model(v: str) -> str:
    name = v.split("=", 1)[1] if v.startswith("model=") else v
    if name not in MODELS:
        raise argparse.ArgumentTypeError(f"{v!r}: use model=learned or model=mvsplat")
    return name


def _data_arguments(d) -> None:
    """The training data: dataset, root, scenes, held-out scenes, views, size, seed, frame gap."""
    d.add_argument(
        "--dataset",
        choices=("synthetic", "scannetpp"),
        default=None,
        help="learned: synthetic; mvsplat: scannetpp (root default <data_dir>/scannetpp, the official layout)",
    )
    d.add_argument(
        "--root",
        default=None,
        help="data root (synthetic: generated there; default "
        "<data_dir>/synthetic_recon_s<seed>_<scenes>x<views>_<H>x<W>)",
    )
    d.add_argument(
        "--scenes",
        type=int,
        default=None,
        help="scenes in total (synthetic: generated; learned: 36; mvsplat: all / 36 synthetic)",
    )
    d.add_argument(
        "--held-out",
        type=int,
        default=None,
        help="the last N scenes are held out (learned: 4, for evaluation; mvsplat: 0)",
    )
    d.add_argument("--views", type=int, default=24, help="synthetic: views per scene")
    d.add_argument(
        "--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="learned: 64 80; mvsplat: 576 880"
    )
    d.add_argument("--seed", type=int, default=2, help="synthetic generator seed and training seed")
    d.add_argument(
        "--gap",
        type=int,
        nargs="+",
        default=None,
        help="frame gap between the two views (int or min max; learned: 2 6, mvsplat: 8)",
    )


def _training_arguments(t, n) -> None:
    """The training schedule (``t``) and the network (``n``)."""
    t.add_argument("--steps", type=int, default=None, help="learned: 1500; mvsplat: 300001")
    t.add_argument("--batch", type=int, default=None, help="global batch (learned: 2; mvsplat: 14)")
    t.add_argument("--lr", type=float, default=None, help="learned: 1e-3; mvsplat: 2e-4")
    t.add_argument("--depth-weight", type=float, default=1.0)
    t.add_argument("--device", default="auto")
    t.add_argument("--no-progress", action="store_true")
    n.add_argument("--feat-dim", type=int, default=32)
    n.add_argument("--num-depths", type=int, default=32)
    n.add_argument("--hidden", type=int, default=64)
    n.add_argument("--near", type=float, default=None, help="learned: 0.5; mvsplat: 1")
    n.add_argument("--far", type=float, default=None, help="learned: 20; mvsplat: 100")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import finetune_mvsplat

    p.add_argument(
        "model",
        nargs="?",
        type=_model,
        default="learned",
        help="model=learned (default: bench's cost-volume reconstructor) or model=mvsplat (fine-tune MVSplat's "
        "encoder from re10k.ckpt with MVSplat's training rules)",
    )
    _data_arguments(p.add_argument_group("data"))
    _training_arguments(p.add_argument_group("training"), p.add_argument_group("network"))
    p.add_argument(
        "--out",
        default=None,
        help="checkpoint path (default: <cache_dir>/reconstructors/cost_volume.safetensors for model=learned, "
        "<cache_dir>/reconstructors/mvsplat_scannetpp.ckpt for model=mvsplat; pass it as "
        "method.reconstructor.checkpoint with method.reconstructor.name=learned / mvsplat)",
    )
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing --out checkpoint")
    finetune_mvsplat.add_arguments(p)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset with the chosen model's defaults (in place)."""
    from .finetune_mvsplat import DEFAULTS

    model = getattr(args, "model", "learned")
    table = DEFAULTS if model == "mvsplat" else LEARNED_DEFAULTS
    for k, v in table.items():
        if getattr(args, k, None) is None:
            setattr(args, k, list(v) if isinstance(v, list) else v)
    if model == "mvsplat" and getattr(args, "scenes", None) is None and args.dataset == "synthetic":
        args.scenes = LEARNED_DEFAULTS["scenes"]  # a synthetic set needs a count
    for flag in ("augment", "last_batch"):
        if model == "learned" and getattr(args, flag, None) is not None:
            name = "--" + flag.replace("_", "-")
            raise BenchError(f"{name} is a model=mvsplat option", f"drop {name} for model=learned")
    if model == "mvsplat" and args.eval_only:
        raise BenchError("--eval-only is a model=learned option", "drop --eval-only for model=mvsplat")
    return args


def _batch(data, ids: Sequence[str], sampler: ViewSampler, n: int) -> Dict[str, torch.Tensor]:
    views = []
    for _ in range(n):
        s, (c0, c1, _) = sampler.sample()
        views.append(data.load_views(ids[s], [c0, c1]))
    return {k: torch.stack([v[k] for v in views]) for k in ("images", "K", "w2c", "depth")}


def render_loss(model: CostVolumeReconstructor, batch: Dict[str, torch.Tensor], depth_weight: float = 1.0):
    """Cross-view rendering loss of one batch of pairs; returns ``(loss, extra)``."""
    images, K, w2c, depth = batch["images"], batch["K"], batch["w2c"], batch["depth"]
    B, _, _, H, W = images.shape
    pred = model.predict(images, K, w2c)
    rgb_l, depth_l = [], []
    for b in range(B):
        for i, j in ((0, 1), (1, 0)):
            g = PixelGaussians.from_depth(
                pred["depth"][b, i : i + 1],
                K[b, i : i + 1],
                w2c[b, i : i + 1],
                pred["opacity"][b, i : i + 1],
                pred["scale_mult"][b, i : i + 1],
            )
            rgb, alpha, z = rasterize(*g.splat_args(images[b, i : i + 1]), w2c[b, j : j + 1], K[b, j : j + 1], W, H)
            rgb_l.append((rgb[0].permute(2, 0, 1) - images[b, j]).abs().mean())
            gt = depth[b, j]
            ok = (gt > 0) & (alpha[0] > 0.5)
            depth_l.append(((z[0] - gt).abs() / gt.clamp_min(1e-3))[ok].sum() / ok.sum().clamp_min(1))
    rgb_loss, d_loss = torch.stack(rgb_l).mean(), torch.stack(depth_l).mean()
    return rgb_loss + depth_weight * d_loss, {"rgb_l1": float(rgb_loss.detach()), "depth_rel": float(d_loss.detach())}


@torch.no_grad()
def evaluate(
    model: CostVolumeReconstructor, data, ids: Sequence[str], gap: int, train_median: float, device: str = "cpu"
) -> Dict[str, Dict[str, float]]:
    """Depth AbsRel / RMSE over every (i, i+gap) pair of the ``ids`` scenes, for the network and the
    constant baselines."""
    acc = {k: {"abs_rel": 0.0, "sq": 0.0} for k in ("learned", "constant_train_median", "oracle_image_median")}
    n = 0
    for sid in ids:
        for i in range(0, data.num_views(sid) - gap, max(gap, 1)):
            v = data.load_views(sid, [i, i + gap])
            pred = model.predict(v["images"][None].to(device), v["K"][None].to(device), v["w2c"][None].to(device))
            gt = v["depth"]
            for k in range(2):
                ok = gt[k] > 0
                g = gt[k][ok]
                preds = {
                    "learned": pred["depth"][0, k].cpu()[ok],
                    "constant_train_median": torch.full_like(g, train_median),
                    "oracle_image_median": torch.full_like(g, float(g.median())),
                }
                for name, p in preds.items():
                    acc[name]["abs_rel"] += float(((p - g).abs() / g).mean())
                    acc[name]["sq"] += float(((p - g) ** 2).mean().sqrt())
                n += 1
    if n == 0:
        raise BenchError("no held-out view pairs to evaluate", "use more views per scene or a smaller --gap")
    return {k: {"abs_rel": v["abs_rel"] / n, "rmse": v["sq"] / n, "images": n} for k, v in acc.items()}


def _default_out() -> Path:
    from bench.config import compose

    return Path(compose([]).paths.cache_dir) / "reconstructors" / "cost_volume.safetensors"


def _train(args: argparse.Namespace, data, train_ids: Sequence[str], out: Path, device: str):
    """A new cost-volume reconstructor trained on the ``train_ids`` scenes (resumable from ``<out>.train``)."""
    model = CostVolumeReconstructor(args.feat_dim, args.num_depths, args.hidden, args.near, args.far).to(device)
    sampler = ViewSampler(
        [data.num_views(s) for s in train_ids],
        args.gap if len(args.gap) > 1 else args.gap[0],
        "context",
        seed=args.seed,
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loop = TrainLoop(
        out.with_name(out.name + ".train"),
        args.steps,
        opt,
        {"model": model, "sampler": sampler},
        scheduler=one_cycle_cosine(opt, args.steps, 0.05),
        ckpt_every=max(args.steps // 10, 1),
        grad_clip=1.0,
        progress=not args.no_progress,
        desc="pretrain-reconstructor",
        fingerprint={
            k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in vars(args).items()
            if k not in ("no_progress", "device", "eval_only", "func", *MVSPLAT_ONLY)
        },
    )
    model.train()
    loop.run(
        lambda step: render_loss(
            model,
            {k: v.to(device) for k, v in _batch(data, train_ids, sampler, args.batch).items()},
            args.depth_weight,
        )
    )
    return model.eval()


def main(args: argparse.Namespace) -> int:
    """Train (or with ``--eval-only`` load) the reconstructor, evaluate it on the held-out scenes, save the
    checkpoint and ``<out>.eval.json``; ``model=mvsplat`` hands over to :mod:`.finetune_mvsplat`."""
    resolve_defaults(args)
    if getattr(args, "model", "learned") == "mvsplat":
        from .finetune_mvsplat import main as finetune

        return finetune(args)
    from bench.distributed import resolve_device
    from bench.splat import tune_allocator

    device = resolve_device({"device": args.device})
    if device == "cpu":
        tune_allocator()
    seed_everything(args.seed)
    out = Path(args.out) if args.out else _default_out()
    data, train_ids, held_ids = open_training_scenes(args)
    if args.eval_only:
        model = CostVolumeReconstructor.load(out).to(device).eval()
    else:
        model = _train(args, data, train_ids, out, device)
    median = _median_depth(data, train_ids)
    gap = args.gap[0] if len(args.gap) == 1 else (args.gap[0] + args.gap[1]) // 2
    report = {
        "held_out_scenes": list(held_ids),
        "train_scenes": len(train_ids),
        "gap": gap,
        "train_median_depth": median,
        "metrics": evaluate(model, data, held_ids or train_ids, gap, median, device),
    }
    if not args.eval_only:
        train = {"dataset": args.dataset, "scenes": len(train_ids), "steps": args.steps, "size": list(args.size)}
        model.save(out, {"train": {**train, "seed": args.seed}})
    write_json(out.with_name(out.stem + ".eval.json"), report)
    _print_report(report, len(held_ids), gap, out)
    return 0


def _print_report(report: Dict[str, Any], held: int, gap: int, out: Path) -> None:
    """The held-out depth metrics of the network and the constant baselines, as a table."""
    from tabulate import tabulate

    rows = [[k, f"{v['abs_rel']:.4f}", f"{v['rmse']:.4f}", v["images"]] for k, v in report["metrics"].items()]
    print(f"held-out depth ({held} scenes, pairs {gap} frames apart); checkpoint {out}")
    print(tabulate(rows, headers=["predictor", "AbsRel", "RMSE (m)", "images"]))


def _median_depth(data, ids: Sequence[str]) -> float:
    vals: List[torch.Tensor] = []
    for s in ids:
        d = data.load_views(s, list(range(0, data.num_views(s), 4)))["depth"]
        vals.append(d[d > 0])
    return float(torch.cat(vals).median())
