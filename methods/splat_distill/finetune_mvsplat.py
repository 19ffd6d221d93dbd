"""``python -m bench pretrain-reconstructor model=mvsplat``: fine-tune MVSplat's encoder (the paper's reconstructor).

Starts from MVSplat's ``re10k.ckpt`` (:class:`~methods.splat_distill.mvsplat.MVSplatEncoder`, strict load) and
trains it with MVSplat's rules (sources in ``docs/methods/mvsplat.md``):

* an example is two context views ``gap`` frames apart and one target view drawn uniformly between them,
  inclusive (:class:`~methods.splat_distill.views.ViewSampler`, ``uniform`` placement; official bounded
  sampler with the ScanNet++ settings, whose effective gap is the minimum distance, 8);
* the encoder's Gaussians (means, full world covariances, opacities, SH colours) are splatted into the
  target camera with :func:`bench.splat.rasterize` (gsplat on CUDA, the tiled torch engine on CPU); the
  colour of a Gaussian is its harmonics evaluated at the direction from the target camera centre, plus
  0.5, clamped at 0 (3DGS's rule, as in the official ``diff-gaussian-rasterization``), black background;
  Gaussians closer than 0.2 x ``near`` are culled (3DGS's frustum test after MVSplat's 1/near rescale);
* loss = MSE (weight 1) + ``lpips_weight`` (0.05) x LPIPS-VGG (``lpips`` package, inputs in [0,1] with
  ``normalize=True``) between render and target;
* ``--augment flip`` (MVSplat's training augmentation, ``src/dataset/shims/augmentation_shim.py``): each
  example mirrored as a whole with probability 0.5 (images flipped, cameras reflected, intrinsics kept), drawn
  per example from ``(seed, index)``; default ``none``, as Splat-and-Distill's ScanNet++ loader, which never
  applies its config's ``augment: true``;
* ``--last-batch smaller`` (default; the official ``DataLoader``'s ``drop_last=False``): an epoch is one example
  per training scene and ends with a smaller step of those left (:func:`~.views.step_examples`), its loss the
  mean over the step's examples pooled over the ranks; ``carry``: every step has ``--batch`` examples;
* Adam, lr 2e-4, ``OneCycleLR`` over ``steps + 10`` with 1% warm-up and cosine annealing (the official
  ``configure_optimizers`` with ``cosine_lr: true``), gradient clipping at 0.5, 14 examples per step.

LPIPS's VGG16 trunk comes from a user-supplied torchvision VGG16 state dict (``--lpips-vgg``, default the torch
hub cache file torchvision would download); nothing is downloaded. Its digest, and the start checkpoint's, are
part of the run's identity (resume fingerprint and the output's metadata). The output is a safetensors file of
``encoder.*`` tensors that ``method.reconstructor.name=mvsplat method.reconstructor.checkpoint=<out>`` loads; the
default ``<cache_dir>/reconstructors/mvsplat_scannetpp.ckpt`` is where ``experiment=snd_paper`` looks.
Training resumes from ``<out>.train/`` and is data-parallel over ``torch.distributed`` ranks (each rank renders
its share of the global batch; example ``i`` of the run depends only on the seed and ``i``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

from bench.errors import BenchError, CheckpointError, what_is_at

from .recon_data import AUGMENTS, flips, reflect_views
from .views import LAST_BATCHES, rank_share, step_examples

log = logging.getLogger("bench")

#: torchvision's VGG16 ImageNet weights, the file ``lpips.LPIPS(net='vgg')`` would download on first use
VGG16_FILE = "vgg16-397923af.pth"
#: torchvision ``vgg16().features`` indices of LPIPS's five slices (lpips/pretrained_networks.py)
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))

#: defaults of ``model=mvsplat`` (official SnD config/experiment/scannetpp.yaml, MVSplat config/main.yaml)
DEFAULTS = dict(
    dataset="scannetpp",
    held_out=0,
    steps=300_001,
    batch=14,
    lr=2e-4,
    gap=[8],
    near=1.0,
    far=100.0,
    size=(576, 880),
    grad_clip=0.5,
    lpips_weight=0.05,
    augment="none",
    last_batch="smaller",
)


#: flags that do not decide the fine-tuned weights (the two files enter by digest instead of path), or that only
#: ``model=learned`` reads
NOT_IDENTITY = ("no_progress", "device", "eval_only", "func", "checkpoint", "lpips_vgg", "out", "stop_after")
NOT_IDENTITY += ("depth_weight", "feat_dim", "num_depths", "hidden")


def default_vgg() -> Path:
    """Where torchvision keeps the VGG16 weights it downloads (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def read_vgg_features(path: str | Path) -> Dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a torchvision VGG16 state dict (a full ``vgg16().state_dict()`` or its
    ``features`` part), prefix kept; a clear error for a missing or foreign file."""
    from bench.safe_pickle import PickleRefused, load_torch

    path = Path(path)
    fix = (
        f"pass --lpips-vgg <torchvision VGG16 state dict> (torchvision's {VGG16_FILE}, e.g. from "
        f"https://download.pytorch.org/models/{VGG16_FILE}, or put it at {default_vgg()})"
    )
    if not path.is_file():
        raise CheckpointError(f"LPIPS VGG16 weights {path} {what_is_at(path, 'file')}", fix)
    try:
        sd = load_torch(path)
    except (PickleRefused, Exception) as e:
        raise CheckpointError(f"cannot read LPIPS VGG16 weights {path}: {type(e).__name__}: {e}", fix) from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    feats = {k: v for k, v in (sd.items() if isinstance(sd, dict) else ()) if str(k).startswith("features.")}
    want = {f"features.{i}.{w}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) for w in ("weight", "bias")}
    if set(feats) != want:
        missing = sorted(want - set(feats))[:3]
        raise CheckpointError(f"{path} is not a torchvision VGG16 state dict (missing {missing or 'nothing'})", fix)
    return feats


def build_lpips(vgg_path: str | Path) -> torch.nn.Module:
    """``lpips.LPIPS(net='vgg')`` with its trunk from ``vgg_path`` (no download; the linear heads ship with the
    package), frozen, in eval mode."""
    import warnings

    import lpips

    feats = read_vgg_features(vgg_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecated ``pretrained=`` argument inside lpips
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    own = {}
    for s, (lo, hi) in enumerate(_SLICES, 1):
        for i in range(lo, hi):
            for w in ("weight", "bias"):
                if f"features.{i}.{w}" in feats:
                    own[f"slice{s}.{i}.{w}"] = feats[f"features.{i}.{w}"].float()
    model.net.load_state_dict(own, strict=True)
    return model.eval().requires_grad_(False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``model=mvsplat`` flags (shared data/training flags are :mod:`.pretrain`'s)."""
    m = p.add_argument_group("model=mvsplat")
    m.add_argument("--checkpoint", default=None, help="MVSplat's re10k.ckpt to start from (required)")
    m.add_argument(
        "--lpips-vgg", default=None, help=f"torchvision VGG16 state dict for LPIPS (default: {default_vgg()})"
    )
    m.add_argument("--lpips-weight", type=float, default=None, help="LPIPS weight (default 0.05)")
    m.add_argument("--grad-clip", type=float, default=None, help="gradient norm clip (default 0.5)")
    m.add_argument(
        "--augment",
        choices=AUGMENTS,
        default=None,
        help="none (default: Splat-and-Distill's ScanNet++ loader, which never applies its config's augment: true) "
        "or flip (MVSplat's training augmentation: each example mirrored with probability 0.5)",
    )
    m.add_argument(
        "--last-batch",
        choices=LAST_BATCHES,
        default=None,
        help="smaller (default: the official DataLoader's drop_last=False, an epoch of one example per scene ends "
        "with a smaller step) or carry (every step has the full --batch)",
    )


def preflight(args: argparse.Namespace) -> Tuple[Path, Path]:
    """Cheap checks before data or weights are touched: the start checkpoint and the VGG file exist, the image
    size suits MVSplat, 0 < near < far. Returns (checkpoint, vgg)."""
    from .mvsplat import SIZE_MULTIPLE

    problems = []
    if not args.checkpoint:
        problems.append(
            CheckpointError(
                "pretrain-reconstructor model=mvsplat needs MVSplat's re10k.ckpt to start from",
                "download re10k.ckpt (github donydchen/mvsplat, README 'pretrained models') and pass --checkpoint",
            )
        )
    elif not Path(args.checkpoint).is_file():
        problems.append(
            CheckpointError(
                f"MVSplat checkpoint {args.checkpoint} {what_is_at(Path(args.checkpoint), 'file')}",
                "download re10k.ckpt (github donydchen/mvsplat, README 'pretrained models') and pass --checkpoint",
            )
        )
    vgg = Path(args.lpips_vgg) if args.lpips_vgg else default_vgg()
    if not vgg.is_file():
        problems.append(
            CheckpointError(
                f"LPIPS VGG16 weights {vgg} {what_is_at(vgg, 'file')}",
                f"pass --lpips-vgg <torchvision {VGG16_FILE}> (https://download.pytorch.org/models/{VGG16_FILE}); "
                "bench never downloads it",
            )
        )
    H, W = args.size
    if H % SIZE_MULTIPLE or W % SIZE_MULTIPLE:
        m = SIZE_MULTIPLE
        problems.append(
            BenchError(
                f"--size {H} {W}: MVSplat needs image sides that are multiples of {m}",
                f"use e.g. --size {max(m, round(H / m) * m)} {max(m, round(W / m) * m)}",
            )
        )
    if args.dataset == "scannetpp":
        root = Path(args.root) if args.root else _default_scannetpp()
        if not root.is_dir():
            problems.append(
                BenchError(
                    f"ScanNet++ root {root} {what_is_at(root, 'directory')}",
                    "pass --root <ScanNet++ DSLR root in the official Splat-and-Distill layout> "
                    "(or --dataset synthetic for a toy run)",
                )
            )
        args.root = str(root)
    if not 0 < args.near < args.far:
        problems.append(BenchError(f"--near {args.near} --far {args.far} is not a depth range", "use 0 < near < far"))
    if problems:
        raise problems[0]
    return Path(args.checkpoint), vgg


def _context(views: Sequence[Mapping[str, torch.Tensor]], near: float, far: float) -> Dict[str, torch.Tensor]:
    """Examples' two context views -> one batched MVSplat context."""
    from .reconstruct import MVSplatAdapter

    ctx = [MVSplatAdapter.context(v, near, far) for v in views]
    return {k: torch.cat([c[k] for c in ctx]) for k in ctx[0]}


def render_targets(
    gaussians: Mapping[str, torch.Tensor], w2c: torch.Tensor, K: torch.Tensor, H: int, W: int, near: float
) -> torch.Tensor:
    """Splat each example's Gaussians (``means [B,N,3]``, ``covariances``, ``harmonics [B,N,3,d]``,
    ``opacities``) into its target camera (``w2c [B,4,4]``, pixel ``K [B,3,3]``) -> RGB ``[B,3,H,W]``."""
    from bench.cameras import invert_rigid
    from bench.splat import rasterize

    from .mvsplat import eval_harmonics

    out = []
    for b in range(w2c.shape[0]):
        means = gaussians["means"][b]
        centre = invert_rigid(w2c[b : b + 1])[0, :3, 3]
        rgb = (eval_harmonics(gaussians["harmonics"][b], F.normalize(means - centre, dim=-1)) + 0.5).clamp_min(0.0)
        img, _, _ = rasterize(
            means,
            None,
            None,
            gaussians["opacities"][b],
            rgb,
            w2c[b : b + 1],
            K[b : b + 1],
            W,
            H,
            near=0.2 * near,
            covars=gaussians["covariances"][b],
        )
        out.append(img[0].permute(2, 0, 1))
    return torch.stack(out)


def example_loss(
    encoder: torch.nn.Module,
    lpips_model: torch.nn.Module,
    views: Sequence[Mapping[str, torch.Tensor]],
    near: float,
    far: float,
    lpips_weight: float,
    global_step: int = 0,
):
    """MSE + ``lpips_weight`` x LPIPS of the target renders of a batch of examples (each ``images [3,3,H,W]``,
    ``K``, ``w2c``: context, context, target); returns ``(loss, extra)``."""
    ctx = _context([{k: v[:2] for k, v in ex.items()} for ex in views], near, far)
    gaussians = encoder(ctx, global_step)
    H, W = views[0]["images"].shape[-2:]
    target = torch.stack([ex["images"][2] for ex in views]).clamp(0, 1)
    w2c = torch.stack([ex["w2c"][2] for ex in views])
    K = torch.stack([ex["K"][2] for ex in views])
    pred = render_targets(gaussians, w2c, K, H, W, near)
    mse = ((pred - target) ** 2).mean()
    lp = lpips_model(pred, target, normalize=True).mean() if lpips_weight else mse.new_zeros(())
    loss = mse + lpips_weight * lp
    psnr = -10 * torch.log10(((pred.detach() - target) ** 2).flatten(1).mean(1).clamp_min(1e-10)).mean()
    return loss, {"mse": float(mse.detach()), "lpips": float(lp.detach()), "psnr": float(psnr)}


def training_example(data, ids: Sequence[str], sampler, index: int, seed: int, augment: str) -> Dict[str, torch.Tensor]:
    """Example ``index`` of the run: its views (context, context, target: ``images``, pixel ``K``, ``w2c``) from
    ``sampler.example(index)``, mirrored as a whole (:func:`~.recon_data.reflect_views`) when ``augment`` is
    ``flip`` and :func:`~.recon_data.flips` draws it for ``(seed, index)``."""
    s, (c0, c1, t) = sampler.example(index)
    views = data.load_views(ids[s], [c0, c1, t])
    ex = {k: views[k] for k in ("images", "K", "w2c")}
    return reflect_views(ex) if augment == "flip" and flips(seed, index) else ex


def save_encoder(encoder: torch.nn.Module, out: Path, meta: Mapping[str, Any]) -> None:
    """Atomically write the encoder's ``encoder.*`` tensors (what ``MVSplatEncoder.from_checkpoint`` reads):
    a ``.safetensors`` file with ``meta`` as JSON under the ``bench`` metadata key, any other suffix a torch
    file ``{"state_dict": ..., "bench": <meta JSON>}`` like MVSplat's Lightning checkpoints."""
    from safetensors.torch import save_file

    from bench.io import write_with

    sd = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    text = json.dumps(dict(meta), sort_keys=True)
    if out.suffix == ".safetensors":
        write_with(out, lambda p: save_file(sd, str(p), metadata={"bench": text}))
    else:
        write_with(out, lambda p: torch.save({"state_dict": sd, "bench": text}, p))


def main(args: argparse.Namespace) -> int:
    from bench import distributed as dist
    from bench.distributed import resolve_device

    ckpt, vgg = preflight(args)
    out = Path(args.out) if args.out else _default_out()
    device = resolve_device({"device": args.device})
    dist.init(device)  # torchrun / SLURM ranks join here; a single process is untouched
    try:
        return _train(args, ckpt, vgg, out, device)
    finally:
        dist.shutdown()


def _train(args: argparse.Namespace, ckpt: Path, vgg: Path, out: Path, device: str) -> int:
    from bench import distributed as dist
    from bench.identity import file_digest
    from bench.seed import seed_everything
    from bench.splat import tune_allocator

    from .mvsplat import MVSplatEncoder

    if device == "cpu":
        tune_allocator()
    dist.per_rank_batch(args.batch, "--batch")  # a full step's batch must divide over the ranks
    seed_everything(args.seed)
    identity = {"start_checkpoint": "sha256:" + file_digest(ckpt), "lpips_vgg": "sha256:" + file_digest(vgg)}
    lpips_model = build_lpips(vgg).to(device)
    encoder = MVSplatEncoder.from_checkpoint(ckpt).to(device).train()
    dist.seed_offset(args.seed)  # each rank its own RNG stream after the identical set-up
    with dist.main_first():  # rank 0 generates a synthetic set first
        data, train_ids, numbers = _open_data(args)
    sampler = _new_sampler(data, train_ids, numbers, args.gap, args.seed)
    settings = _settings(args)
    loop = _train_loop(args, encoder, out, device, {**settings, **identity})
    step = _step_fn(args, encoder, lpips_model, data, train_ids, sampler, device)
    history = loop.run(step, stop_after=getattr(args, "stop_after", None))
    if loop.step < args.steps:  # interrupted on purpose (tests): no final checkpoint yet
        return 0
    if dist.is_main():
        save_encoder(
            encoder,
            out,
            {
                "train": {**settings, **identity, "scenes": len(train_ids)},
                "final": history[-1] if history else {},
            },
        )
        print(
            f"fine-tuned MVSplat encoder: {out} (use method.reconstructor.name=mvsplat "
            f"method.reconstructor.checkpoint={out})"
        )
    return 0


def _new_sampler(data, train_ids: Sequence[str], numbers, gap: Sequence[int], seed: int):
    """The view sampler over the training scenes: ``uniform`` draws, or one pass per epoch with frame numbers."""
    from .views import ViewSampler

    return ViewSampler(
        [data.num_views(s) for s in train_ids],
        gap if len(gap) > 1 else gap[0],
        "uniform",
        seed=seed,
        order="uniform" if numbers is None else "epoch",
        numbers=numbers,
    )


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The arguments that identify the run (its checkpoints' fingerprint and the saved encoder's metadata)."""
    settings = {
        k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items() if k not in NOT_IDENTITY
    }
    if settings.get("augment") == "none":  # runs started before --augment existed keep their identity
        settings.pop("augment")
    if settings.get("last_batch") == "carry":  # ... and before --last-batch existed
        settings.pop("last_batch")
    return settings


def _train_loop(args: argparse.Namespace, encoder, out: Path, device: str, fingerprint: Dict[str, Any]):
    """Adam with a one-cycle cosine schedule, in a TrainLoop that checkpoints to ``<out>.train``."""
    from bench.train import TrainLoop

    opt = torch.optim.Adam(encoder.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, args.lr, args.steps + 10, pct_start=0.01, cycle_momentum=False, anneal_strategy="cos"
    )
    return TrainLoop(
        out.with_name(out.name + ".train"),
        args.steps,
        opt,
        {"encoder": encoder},
        scheduler=sched,
        ckpt_every=max(args.steps // 10, 1),
        grad_clip=args.grad_clip,
        progress=not args.no_progress,
        desc="finetune-mvsplat",
        fingerprint=fingerprint,
        images_per_step=3 * args.batch,
        device=device,
    )


def _step_fn(args: argparse.Namespace, encoder, lpips_model, data, train_ids, sampler, device: str):
    """The training step: this rank's share of the step's examples, their loss weighted to the global mean."""
    from bench import distributed as dist

    def step(i: int):
        idx = step_examples(i, args.batch, sampler.epoch_size, args.last_batch)
        ex = []
        for j in rank_share(len(idx), dist.rank(), dist.world_size()):
            views = training_example(data, train_ids, sampler, idx[j], args.seed, args.augment)
            ex.append({k: v.to(device) for k, v in views.items()})
        if not ex:  # an epoch's smaller last step left this rank nothing: a zero loss, zero gradients
            dist.global_mean_weight(0.0)  # the collective every rank joins
            zero = torch.zeros((), device=device, requires_grad=True)
            return zero, {"mse": 0.0, "lpips": 0.0, "psnr": 0.0}
        loss, extra = example_loss(encoder, lpips_model, ex, args.near, args.far, args.lpips_weight, i)
        return loss * dist.global_mean_weight(len(ex)), extra  # the mean over the step's examples on all ranks

    return step


def _open_data(args: argparse.Namespace):
    """-> (scenes, training scene ids, per-scene frame numbers or None). ScanNet++ is read as the official
    loader reads it (SnD ``dataset_scannetpp.py``, which the paper's fine-tuning used): ``is_bad`` frames kept,
    an example whose context frame numbers skip is drawn again, one pass over the scenes per epoch."""
    from .views import frame_numbers

    if args.dataset != "scannetpp":
        from .recon_data import open_training_scenes

        data, train, _ = open_training_scenes(args)
        return data, train, None
    from bench.data.multiview import open_scenes

    data = open_scenes({"dataset": "scannetpp", "root": args.root, "scenes": args.scenes, "size": args.size}, "", True)
    ids = list(data.scene_ids)
    train = ids[: len(ids) - args.held_out] if args.held_out else ids
    if not train:
        raise BenchError("no training scenes left after holding out", "use more --scenes or a smaller --held-out")
    return data, train, [frame_numbers(data.frame_names(s)) for s in train]


def _default_scannetpp() -> Path:
    from bench.config import compose

    return Path(compose([]).paths.data_dir) / "scannetpp"  # where experiment=snd_paper reads it


def _default_out() -> Path:
    from bench.config import compose

    return Path(compose([]).paths.cache_dir) / "reconstructors" / "mvsplat_scannetpp.ckpt"  # experiment=snd_paper
