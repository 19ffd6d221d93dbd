"""The ``mef`` method: Multiview Equivariance Finetuning (You et al., ICLR 2025) as its official code trains.

One step (qq456cvb/3DCorrEnhance ``finetune.py`` ``FinetuneDINO``): a pair of views of one object
(:mod:`methods.mef.data`); each image is resized so the feature grid is ``tgt // 8`` where ``tgt`` has
its longer side at ``target_res`` = 640 (a ViT/14 therefore sees 1120 px for a 512-px render:
effective stride 8 at 640 px, 6.4 px of the render); the last block's normed patch features pass the
3x3 refinement conv; descriptors are bilinearly sampled at the pixels (``(x, y)`` integer pixel
coordinates at the image's own scale, patch centres at ``(k + 1/2)`` patches, border clamp --
``interpolate_features``), L2-normalised, and scored by the ranking loss (:mod:`methods.mef.loss`).
Trainable: the q/v LoRA of the last 4 blocks (:mod:`methods.mef.adapt`) and the conv; AdamW (lr 1e-5,
weight decay 1e-4, constant), batch 1, gradient clipping 1.0 (Lightning ``gradient_clip_val``),
10,000 steps (100 epochs x 100 items). Resumable exactly through :class:`bench.train.TrainLoop`.

Returned: :class:`methods.mef.head.RefinedBackbone` (LoRA merged into the timm model, the conv as its
feature head); ``fit`` writes the head to ``<workdir>/refine_head.safetensors`` and the runner the
timm weights to ``model.safetensors``; :meth:`MEF.restore` re-attaches the head on reuse.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from bench.errors import BenchError
from bench.io import write_json
from bench.registry import METHODS
from bench import distributed as dist
from bench.distributed import start_run
from bench.train import TrainLoop

from .adapt import QVLoRA
from .data import PairSampler, eval_pairs
from .head import HEAD_FILE, RefinedBackbone, load_head, mef_grid, refine_conv, save_head
from .loss import ap_terms, reduce_terms

log = logging.getLogger("bench")

DATASETS = ("mef_objaverse", "synthetic_objects", "synthetic")
MEF_RENDER = 512  # MEF's render size, for which target_res 640 is official


def objects_root(data: Mapping[str, Any], data_dir) -> Path:
    H, W = (int(s) for s in data["size"])
    return Path(data_dir) / f"synthetic_objects_s{int(data['seed'])}_{object_count(data)}x{int(data['views'])}_{H}x{W}"


def object_count(data: Mapping[str, Any]) -> int:
    """``data.objects`` (a count), else ``data.scenes`` (the shared experiments' key for set sizes)."""
    n = data["objects"]
    if n is None:
        n = data.get("scenes")  # optional: only the shared recipes set it
    if not isinstance(n, int) or n < 1:
        raise BenchError(
            f"method.data.dataset=synthetic_objects needs a count method.data.objects (got {n!r})",
            "e.g. method.data.objects=4 method.data.views=16 method.data.size=[96,128]",
        )
    return n


def open_objects(data: Mapping[str, Any], data_dir) -> tuple:
    """``cfg.method.data`` -> ``(reader, train objects, held-out objects)``. ``synthetic`` /
    ``synthetic_objects`` generate bench's object set on first use; ``mef_objaverse`` reads MEF's renders."""
    from bench.data.mef_objaverse import ObjectRenders
    from bench.data.objects import ensure_objects, split_objects

    kind = str(data["dataset"])
    if kind not in DATASETS:
        raise BenchError(f"method.data.dataset='{kind}' is not an MEF training dataset", f"use one of {DATASETS}")
    if kind == "mef_objaverse":
        reader = ObjectRenders(Path(str(data["root"])))
        names = reader.items
        sel = data["objects"]
        if isinstance(sel, int):
            names = names[:sel]
        elif sel is not None:
            names = [str(x) for x in sel]
    else:
        if data["views"] is None or data["size"] is None:
            raise BenchError(
                "method.data.dataset=synthetic_objects needs method.data.views and method.data.size",
                "e.g. method.data.views=16 method.data.size=[96,128]",
            )
        root = Path(str(data["root"])) if data["root"] else objects_root(data, data_dir)
        ensure_objects(
            root,
            object_count(data),
            int(data["views"]),
            [int(s) for s in data["size"]],
            int(data["seed"]),
            int(data["supersample"]),
        )
        reader = ObjectRenders(root)
        names = reader.items
    held = data["held_out"] or 0
    train, held_out = split_objects(names, held) if held else (list(names), [])
    return reader, train, held_out


class Finetuner:
    """The trainable MEF model around a backbone: LoRA (in ``backbone.model``) + the refinement conv."""

    def __init__(self, backbone, m: DictConfig, device: str):
        self.backbone = backbone.to(device)
        lo = m.lora
        self.lora = QVLoRA(backbone.model, int(lo.r), int(lo.blocks), bool(lo.qv_only))
        self.head = refine_conv(backbone.embed_dim).to(device)
        self.refined = RefinedBackbone(backbone, self.head)
        self.device = device
        self.target_res, self.stride = m.input.target_res, int(m.input.stride)
        self.pos, self.neg, self.temp = float(m.loss.pos_thresh), float(m.loss.neg_thresh), float(m.loss.temperature)

    def parameters(self) -> List[torch.nn.Parameter]:
        return self.lora.parameters() + list(self.head.parameters())

    def train(self) -> None:
        self.lora.train()
        self.head.train()

    def grid(self, H: int, W: int):
        tr = self.target_res
        if tr in (None, "none"):
            tr = None
        elif tr == "auto":  # 640 for MEF's 512-px renders; the same 1.25 ratio for other render sizes
            tr = round(max(H, W) * 640 / MEF_RENDER)
        return mef_grid(H, W, int(tr) if tr else None, self.stride)

    def descriptors(self, image: torch.Tensor, pix: torch.Tensor) -> torch.Tensor:
        """Unit descriptors ``[N,C]`` at pixels ``pix [N,2]`` (x, y) of ``image [3,H,W]``."""
        H, W = image.shape[-2:]
        gh, gw = self.grid(H, W)
        p = self.backbone.patch_size
        x = image[None].to(self.device)
        if (gh * p, gw * p) != (H, W):
            x = F.interpolate(
                x, size=(gh * p, gw * p), mode="bilinear", align_corners=False, antialias=gh * p < H or gw * p < W
            )
        fmap = self.head(self.backbone(x))  # [1,C,gh,gw]
        pix = pix.to(self.device).float()
        g = torch.stack([2 * pix[:, 0] / W - 1, 2 * pix[:, 1] / H - 1], -1)[None, None]
        d = F.grid_sample(fmap, g, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T
        return F.normalize(d, dim=-1)

    def loss(self, pairs: Sequence[Sequence[Dict[str, Any]]]):
        terms, anchor = [], None
        for a, b in pairs:
            d1, d2 = self.descriptors(a["image"], a["pix"]), self.descriptors(b["image"], b["pix"])
            anchor = d1 if anchor is None else anchor
            terms.append(
                ap_terms(
                    d1[None],
                    d2[None],
                    a["pts"][None].to(self.device),
                    b["pts"][None].to(self.device),
                    self.pos,
                    self.neg,
                    self.temp,
                )
            )
        return reduce_terms(terms, anchor)

    def finish(self, stride: Optional[int] = None) -> RefinedBackbone:
        self.lora.merge()
        self.head.eval().requires_grad_(False)
        return RefinedBackbone(self.backbone.eval(), self.head, stride=stride)


@torch.no_grad()
def pair_correspondence(
    tuner: Finetuner, pairs, radii: Sequence[float] = (0.05, 0.1), visible: float = 0.03
) -> Dict[str, float]:
    """Nearest-neighbour matching on held-out object pairs: for the sampled view-1 points that appear
    in view 2 (a view-2 point within ``visible`` object units), the 3D error of the view-2 point whose
    descriptor is most similar; ``recall@r`` = share within ``r`` (object units, largest side 1);
    ``ap`` = the mean soft AP of the training objective; ``loss`` = 1 - ap."""
    errs, terms = [], []
    for a, b in pairs:
        d1, d2 = tuner.descriptors(a["image"], a["pix"]), tuner.descriptors(b["image"], b["pix"])
        p1, p2 = a["pts"].to(d1.device), b["pts"].to(d1.device)
        dist = torch.cdist(p1, p2)
        vis = dist.min(1).values < visible
        nn = (d1 @ d2.T).argmax(1)
        errs.append((p1 - p2[nn]).norm(dim=-1)[vis])
        terms.append(ap_terms(d1[None], d2[None], p1[None], p2[None], tuner.pos, tuner.neg, tuner.temp))
    err = torch.cat(errs)
    loss, info = reduce_terms(terms, torch.zeros(()))
    out = {f"recall@{r:g}": float((err < r).float().mean()) * 100 for r in radii}
    out.update(median_err=float(err.median()), points=float(err.numel()), ap=info["ap"], loss=float(loss))
    return out


def build(backbone, cfg: DictConfig, workdir: Path, device: str):
    """``(tuner, sampler, held-out pairs, loop, step_fn)`` of a run."""
    m = cfg.method
    reader, train, held = open_objects(m.data, cfg.paths.data_dir)
    tuner = Finetuner(backbone, m, device)
    sampler = PairSampler(reader, train, int(m.points), float(m.max_angle), bool(m.augment), seed=int(cfg.seed))
    pairs = eval_pairs(reader, held, int(m.eval.pairs), int(m.eval.points), int(cfg.seed)) if held else []
    o = m.optim
    opt = torch.optim.AdamW(tuner.parameters(), lr=float(o.lr), weight_decay=float(o.weight_decay))
    loop = TrainLoop(
        Path(workdir) / "checkpoints",
        int(o.steps),
        opt,
        {"model": backbone.model, "head": tuner.head},
        ckpt_every=int(m.ckpt_every),
        keep_last=int(m.keep_last),
        grad_clip=o.grad_clip,
        progress=bool(m.progress),
        desc="mef",
        log_every=int(m.log_every),
    )
    batch = int(o.batch_size or 1)
    # data-parallel (torchrun / SLURM tasks): method.optim.batch_size is the global batch, rank r takes
    # its consecutive slice of every step's pairs; the loss (a mean over the pooled positives) is
    # re-weighted so that the rank-averaged gradient is that of the pooled mean (docs/SCALING.md)
    mine = list(dist.rank_slice(batch)) if dist.is_distributed() else list(range(batch))
    pooled = str(cfg.distributed.grad_average) == "global"

    def step_fn(step: int):
        tuner.train()
        loss, info = tuner.loss([sampler.pair(step * batch + k) for k in mine])
        if dist.is_distributed() and pooled:
            loss = loss * dist.global_mean_weight(info["positives"])
        return loss, info

    return tuner, sampler, pairs, loop, step_fn


@METHODS.register(
    "mef",
    "MEF (ICLR 2025): q/v LoRA on the last 4 blocks + 3x3 refinement conv, trained with a "
    "smooth-AP ranking loss on multi-view object renders (trains)",
)
class MEF:
    """Train a backbone with MEF; resumable from ``workdir``. ``stop_after`` (not a config key) ends
    this call after that many steps (after a checkpoint); the next call continues."""

    trains = True

    def fit(self, backbone, cfg: DictConfig, workdir: Path, stop_after: Optional[int] = None):
        device = start_run(cfg)
        workdir = Path(workdir)
        tuner, _, pairs, loop, step_fn = build(backbone, cfg, workdir, device)
        fresh = loop.checkpointer.latest() is None
        main = dist.is_main()  # ranks > 0 of a multi-rank run train and write nothing
        report: Dict[str, Any] = {}
        if pairs and fresh and main:
            report["before"] = pair_correspondence(tuner, pairs)
        log.info(
            "mef: %d training steps x batch %d on %s, device %s",
            loop.total_steps,
            int(cfg.method.optim.batch_size or 1),
            cfg.method.data.dataset,
            device,
        )
        history = loop.run(step_fn, stop_after=stop_after)
        if main:
            write_json(workdir / "history.json", history)
        if pairs and main:
            report["after"] = pair_correspondence(tuner, pairs)
            write_json(workdir / "eval_pairs.json", report)
        stride = cfg.method.export_stride
        out = tuner.finish(int(stride) if stride else None)
        if main:
            save_head(out.head, workdir / HEAD_FILE, out.stride)
        return out

    def restore(self, backbone, cfg: DictConfig, workdir: Path):
        """A cached backbone (``model.safetensors`` already loaded) with its refinement head re-attached."""
        head, stride = load_head(Path(workdir) / HEAD_FILE, backbone.embed_dim)
        return RefinedBackbone(backbone, head, stride=stride)
