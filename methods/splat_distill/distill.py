"""One Splat-and-Distill training step: teacher features -> lift -> splat -> blend -> student loss.

For each example (2 context views + 1 target view of one scene):

1. the teacher (EMA of the student: a LoRA copy whose A and B are averaged separately, LoRA dropout
   active, as the official trainer; or a plain merged copy) embeds both context views (last-layer
   normed patch tokens);
2. the features are upsampled to image resolution (mask-aware on the official corner-aligned grid,
   zero where all four neighbours are excluded; or plain bilinear);
3. the frozen reconstructor predicts one Gaussian per context pixel; each Gaussian carries its
   pixel's full-width feature (lifting = assignment);
4. :func:`bench.splat.rasterize` splats them into the target camera (``lift.feature_covariance: official``:
   the footprint of the official LUDVIG-style feature splat, variances as scales; ``true_covariance``: the
   reconstructor's covariances); pixels with alpha below
   ``alpha_threshold`` are uncovered (``lift.coverage=rgb``: the official trainer's rule instead, a
   pixel is uncovered where the splatted RGB colours are exactly 0);
5. semantic blending with the target-view segment mean over all segment pixels:
   ``a * F + (1 - a) * mean_segment(F)``;
6. bilinear downscale to the student's patch grid; uncovered cells (nearest-downscaled mask) have
   student and target features set to zero and still count in the mean (official), or leave the loss
   (``lift.uncovered: mask``);
7. the student embeds the target view (both backbones see the image resized to the floor multiple of
   the patch size); loss = DINO-head cross-entropy (or an ablation loss).

Every official rule is the default; every other choice is a named deviation (methods/splat_distill/official.py,
docs/methods/splat_distill.md).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError, choice
from bench.distributed import all_reduce_sum, autocast, global_mean_weight, initialized, pooled_rows, weighted_means
from bench.train import EMA

from .adapt import Adapter, plain_state
from .features import (
    MASKS,
    UPSAMPLE_GRIDS,
    UPSAMPLERS,
    grid_scale,
    segment_blend,
    slic_masks,
    to_patch_grid,
    to_patch_grid_nearest,
    upsample,
)
from .head import LOSSES, DINOHead, collapse_stats, distill_loss
from .reconstruct import FEATURE_COVARIANCES, build_reconstructor

HEAD_COS_POINTS = 512  # covered cells of a step's global batch the collapse cosine is measured on

COVERAGE = ("alpha", "rgb")  # a target pixel is covered: alpha > alpha_threshold | its RGB render is not 0


EMA_KINDS = ("lora_factors", "merged")
RESIZES = ("official", "backbone")
UNCOVERED = ("zero_fill", "mask")
BLEND_SEGMENTS = ("all", "covered")
ALL_EXCLUDED = ("zero", "bilinear")
RENDER_BASES = ("auto", "features", "patches")


class Distiller:
    """Student (backbone + DINO head, adapted by LoRA or fully), EMA teacher and reconstructor.

    ``backbone`` is adapted in place (its ``.model`` gets LoRA layers until :meth:`finish`).
    ``cfg`` is ``cfg.method`` (see ``bench/conf/method/splat_distill.yaml``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        cfg: Mapping[str, Any],
        device: str | torch.device = "cpu",
        reconstructor: Optional[nn.Module] = None,
    ):
        self.cfg, self.device = cfg, torch.device(device)
        lift, head, teacher, a = cfg["lift"], cfg["head"], cfg["teacher"], cfg["adapter"]
        self.loss_kind = choice("method.loss", cfg["loss"], LOSSES)
        self._lift_rules(lift)  # every lift choice is checked here, once, before any training step
        self.backbone = backbone.to(self.device)
        self.ema_kind = choice("method.teacher.ema", teacher["ema"], EMA_KINDS)
        if self.ema_kind == "merged":  # the teacher is a plain copy; the EMA averages the effective weights
            self.teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
        self.adapter = Adapter(
            self.backbone.model,
            str(a["mode"]),
            int(a["r"]),
            float(a["alpha"]),
            float(a["dropout"]),
            a["target_modules"],
        )
        if self.ema_kind == "lora_factors":  # official: the teacher is a copy of the LoRA student
            self.teacher = copy.deepcopy(self.backbone).eval().requires_grad_(False)
        self.teacher_dropout = bool(teacher["dropout"])
        self.initial_weights = self.adapter.adapted_weights()  # for the relative-weight-change diagnostic
        self.head = DINOHead(
            backbone.embed_dim,
            int(head["prototypes"]),
            int(head["hidden_dim"]),
            int(head["bottleneck_dim"]),
            train_gain=bool(head["train_gain"]),
            prototype_init=str(head["prototype_init"]),
        ).to(self.device)
        self.temps = float(head["student_temp"]), float(head["teacher_temp"])
        self.teacher_head = copy.deepcopy(self.head)
        momentum = 1.0 if teacher["frozen"] else float(teacher["momentum"])
        self.ema = EMA(
            nn.ModuleDict({"backbone": self.teacher.model, "head": self.teacher_head}), momentum, int(teacher["every"])
        )
        self.teacher_head.eval()
        self.reconstructor = (
            reconstructor if reconstructor is not None else build_reconstructor(cfg["reconstructor"])
        ).to(self.device)
        size = cfg["data"]["size"]
        if hasattr(self.reconstructor, "check_size") and size is not None:
            self.reconstructor.check_size(*(int(s) for s in size))  # MVSplat: fail before training starts
        self.student = nn.ModuleDict({"backbone": self.backbone.model, "head": self.head})
        self.timings: Dict[str, float] = defaultdict(float)
        self.profile = False
        self.precision = "32"  # or "bf16-mixed": autocast of the teacher and student backbones
        self.grad_average = "global"  # several ranks: "global" pooled mean (= one process) | "local" mean
        self.token_chunk = 4096  # DINO cross-entropy over at most this many tokens at a time (memory; same numbers)
        self.accumulate = 1  # micro-batches per step (method.optim.accumulate)
        self.deviations: Dict[str, Any] = {}  # named deviations of this run (e.g. SLIC masks), for the record
        self.slic_on_step = 0  # examples whose SLIC segments were computed inside the step (not by the loader)

    def _lift_rules(self, lift: Mapping[str, Any]) -> None:
        """The ``method.lift`` choices as attributes, each checked against its choices (one-line errors)."""
        self.coverage = choice("method.lift.coverage", lift["coverage"], COVERAGE)
        self.mask_source = choice("method.lift.masks", lift["masks"], MASKS)
        self.resize = choice("method.lift.resize", lift["resize"], RESIZES)
        self.upsample_mode = choice("method.lift.upsample", lift["upsample"], UPSAMPLERS)
        self.upsample_grid = choice("method.lift.upsample_grid", lift["upsample_grid"], UPSAMPLE_GRIDS)
        self.all_excluded = choice("method.lift.all_excluded", lift["all_excluded"], ALL_EXCLUDED)
        self.uncovered = choice("method.lift.uncovered", lift["uncovered"], UNCOVERED)
        self.blend_segments = choice("method.lift.blend_segments", lift["blend_segments"], BLEND_SEGMENTS)
        self.render_basis = choice("method.lift.render_basis", lift["render_basis"], RENDER_BASES)
        self.feature_covariance = choice(
            "method.lift.feature_covariance", lift["feature_covariance"], FEATURE_COVARIANCES
        )
        self.slic = int(lift["slic_segments"]), float(lift["slic_compactness"])
        self.alpha_threshold = float(lift["alpha_threshold"])
        self.normalize_alpha, self.blending = bool(lift["normalize_alpha"]), bool(lift["blending"])
        self.blend_alpha = float(lift["blend_alpha"])

    # -- parameters / state ------------------------------------------------------------------------
    def parameters(self) -> List[nn.Parameter]:
        return self.adapter.parameters() + [p for p in self.head.parameters() if p.requires_grad]

    def update_teacher(self, step: int) -> None:
        """EMA step. ``teacher.ema: lora_factors`` (official ``DinoV2.update_teacher``: every teacher
        parameter, LoRA A and B separately) averages the student's trainable parameters by name;
        ``merged`` averages the student's effective weights ``W + BA`` into a plain teacher."""
        if self.ema_kind == "merged":
            source = {f"backbone.{k}": v for k, v in self.adapter.effective_state().items()}
        else:
            source = {f"backbone.{k}": v for k, v in self.backbone.model.named_parameters() if v.requires_grad}
        source.update({f"head.{k}": v for k, v in self.head.named_parameters() if v.requires_grad})
        self.ema.update(step, source)

    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher features; with ``teacher.dropout`` (official: Lightning runs the whole wrapper,
        teacher included, in train mode) the teacher's LoRA dropout is active, norm layers stay in eval."""
        if self.teacher_dropout:
            self.teacher.train()
            for m in self.teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        else:
            self.teacher.eval()
        try:
            return self.teacher(self.backbone_input(images))
        finally:
            self.teacher.eval()

    def backbone_input(self, images: torch.Tensor) -> torch.Tensor:
        """``lift.resize: official`` (``DinoV2.extract_features``): resize to the floor multiple of the
        patch size, bilinear without antialiasing; ``backbone``: leave it to the backbone's own rule."""
        if self.resize == "backbone" or getattr(self.backbone, "resize_mode", "resize") == "pad":
            return images
        p = int(self.backbone.patch_size)
        H, W = images.shape[-2:]
        size = (max(p, H - H % p), max(p, W - W % p))
        if size == (H, W):
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)

    def student_grid(self, H: int, W: int) -> Tuple[int, int]:
        if self.resize == "official" and getattr(self.backbone, "resize_mode", "resize") != "pad":
            p = int(self.backbone.patch_size)
            return max(1, H // p), max(1, W // p)
        return self.backbone.grid_size(H, W)

    def finish(self, export: str = "student") -> nn.Module:
        """Merge LoRA into the student and return the backbone (plain timm weights), in eval mode.

        ``export="teacher"`` copies the EMA teacher's weights into it instead."""
        self.adapter.merge()
        if export == "teacher":
            self.backbone.model.load_state_dict(plain_state(self.teacher.model), strict=True)
        elif export != "student":
            raise BenchError(f"method.export='{export}' is not a choice", "use student or teacher")
        return self.backbone.eval()

    @contextmanager
    def _timed(self, name: str):
        if not self.profile:
            yield
            return
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CUDA runs async
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.timings[name] += time.perf_counter() - t0

    # -- targets -----------------------------------------------------------------------------------
    def needs_slic(self, views: Mapping[str, torch.Tensor]) -> bool:
        """Whether the example's segment masks are SLIC superpixels (``masks: slic``, or ``auto`` without
        instance maps)."""
        return self.mask_source == "slic" or (self.mask_source == "auto" and views.get("instance") is None)

    def prepare(self, views: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Host-side work of one example, run where the example is loaded (a loader worker): the SLIC
        segments when they are needed, as ``views["segments"]`` (the same function of the same images
        as computing them in the step, so the numbers do not change)."""
        if self.needs_slic(views) and "segments" not in views:
            views["segments"] = slic_masks(views["images"], *self.slic)
        return views

    def masks(self, views: Mapping[str, torch.Tensor]) -> torch.Tensor:
        source = self.mask_source
        if source == "instance" or (source == "auto" and views.get("instance") is not None):
            if views.get("instance") is None:
                raise BenchError(
                    "method.lift.masks=instance but the scenes have no instance maps",
                    "use method.lift.masks=slic (or auto)",
                )
            return views["instance"]
        if views.get("segments") is not None:  # computed by the loader (:meth:`prepare`)
            return views["segments"]
        self.slic_on_step += 1  # callers that bypass the loader: SLIC on the calling thread
        return slic_masks(views["images"], *self.slic)

    @torch.no_grad()
    def targets(self, examples: List[Mapping[str, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Splatted teacher targets on the student grid ``[B,C,h,w]`` and their validity ``[B,h,w]``.

        Each example holds 3 views: context 0, context 1, target.

        Everything between the teacher's patch features and the target grid (upsampling with fixed
        masks, splatting with fixed geometry, blending, downscaling) is linear in the features. When
        the two context views have fewer patches ``2hw`` than channels ``C`` (small images, wide CNN
        features), ``render_basis: auto`` therefore splats the upsampling weights (a one-hot basis over
        the ``2hw`` patches) instead of the ``C`` channels and contracts with the patch features at
        the end: the same targets (up to float rounding), ``C / 2hw`` times fewer splatted channels.
        """
        H, W = examples[0]["images"].shape[-2:]
        mode, ugrid, excluded, basis = self.upsample_mode, self.upsample_grid, self.all_excluded, self.render_basis
        with self._timed("teacher"), autocast(self.precision, self.device):
            feats = self.teacher_forward(torch.cat([ex["images"][:2] for ex in examples]))  # [2B,C,h,w]
        feats = feats.float()  # lifting, splatting and blending stay float32
        scale = grid_scale(self.teacher, (H, W)) if ugrid == "centres" else None
        up_kw = {"grid": ugrid, "all_excluded": excluded}
        _, C, h, w = feats.shape
        use_basis = basis == "patches" or (basis == "auto" and 2 * h * w < C)
        with self._timed("masks"):
            masks = [self.masks(ex) for ex in examples]  # each [3,H,W]
        if use_basis:
            eye = torch.eye(2 * h * w, device=feats.device, dtype=feats.dtype)
            eye = eye.reshape(2 * h * w, 2, h, w).permute(1, 0, 2, 3)  # [2,2hw,h,w] one-hot
        grid = self.student_grid(H, W)
        out, valid = [], []
        for i, ex in enumerate(examples):
            with self._timed("reconstruct"):
                gs = self.reconstructor({k: v[:2] for k, v in ex.items()})
            with self._timed("upsample"):
                # one example's context views at a time (the official code loops per image): the full-
                # resolution [2, C, H, W] maps of one example live at once, not those of the whole batch
                src = upsample(
                    eye if use_basis else feats[2 * i : 2 * i + 2], masks[i][:2], (H, W), mode, scale, **up_kw
                )
            with self._timed("splat"):
                render, covered = self._splat_target(gs, src, ex, W, H)
            with self._timed("blend"):
                t, ok = self._student_target(
                    render, covered, masks[i][2:3], grid, feats[2 * i : 2 * i + 2] if use_basis else None
                )
                out.append(t)
                valid.append(ok)
        return torch.cat(out), torch.cat(valid)

    def _splat_target(self, gs, src: torch.Tensor, ex: Mapping[str, torch.Tensor], W: int, H: int):
        """Splat the context views' maps ``src`` into the target view: ``(render [1,D,H,W], covered [1,H,W])``.

        ``coverage: rgb`` (the official trainer) counts a pixel uncovered where the RGB render is 0; the colours
        ride along the features in one pass when both use the true covariances.
        """
        rgb_rule = self.coverage == "rgb"  # the official trainer: uncovered where the RGB render is 0
        one_pass = rgb_rule and self.feature_covariance == "true_covariance"  # colours ride along the features
        cam = (ex["w2c"][2:3], ex["K"][2:3], W, H)
        if one_pass:
            src = torch.cat([src, gs.colors(ex["images"][:2], ex["w2c"][2]).to(src.dtype)], 1)
        render, alpha, _ = gs.splat(src, *cam, covariance=self.feature_covariance)
        render = render.permute(0, 3, 1, 2)  # [1,D,H,W]
        if one_pass:
            render, rgb = render[:, :-3], render[:, -3:]
        elif rgb_rule:  # official: the RGB render (MVSplat's decoder) splats the true covariances
            rgb = gs.splat(gs.colors(ex["images"][:2], ex["w2c"][2]).to(src.dtype), *cam)[0]
            rgb = rgb.permute(0, 3, 1, 2)
        if rgb_rule:
            covered = (rgb != 0).any(1)  # [1,H,W]
        else:
            covered = alpha > self.alpha_threshold  # [1,H,W]
        if self.normalize_alpha:
            render = render / alpha.clamp_min(1e-6)[:, None]
        return render, covered

    def _student_target(self, render, covered, target_mask, grid, basis_feats: Optional[torch.Tensor]):
        """Blend a splatted render over the target view's segments and bring it to the student grid:
        ``(target [1,C,h,w], valid [1,h,w])``. ``basis_feats``: the context views' patch features ``[2,C,h,w]``
        to contract a splatted patch basis with (None when the channels were splatted)."""
        padded = getattr(self.backbone, "resize_mode", "resize") == "pad"
        if self.blending:  # official: segment means over every segment pixel
            render = segment_blend(
                render, target_mask, self.blend_alpha, covered if self.blend_segments == "covered" else None
            )
        t = to_patch_grid(render, grid, self.backbone.patch_size, padded)
        if basis_feats is not None:  # contract the patch basis with the context views' patch features
            C = basis_feats.shape[1]
            t = torch.einsum("bkyx,kc->bcyx", t, basis_feats.permute(0, 2, 3, 1).reshape(-1, C))
        if self.uncovered == "zero_fill":  # official: nearest-downscaled "nothing rendered" mask
            miss = to_patch_grid_nearest((~covered)[:, None].to(render.dtype), grid, self.backbone.patch_size, padded)
            return t, miss[:, 0] < 0.5
        cov = to_patch_grid(covered[:, None].to(render.dtype), grid, self.backbone.patch_size, padded)
        return t, cov[:, 0] > 0.999

    # -- loss --------------------------------------------------------------------------------------
    def loss(self, examples: List[Mapping[str, torch.Tensor]], accumulate: int = 1):
        """Loss of one batch of examples; returns ``(loss, extra floats to log)``.

        ``accumulate > 1`` (``method.optim.accumulate``) splits the batch into that many consecutive
        micro-batches: all their targets first (no gradient), then per micro-batch the student forward and
        a backward of its share ``n_k / N`` of the batch's masked mean (``n_k`` its loss cells); the last
        share is returned for the training loop's backward. The gradient is the unsplit batch's, up to
        float rounding (with LoRA dropout the micro-batches draw other dropout masks)."""
        examples = [{k: v.to(self.device, non_blocking=True) for k, v in ex.items()} for ex in examples]
        accumulate = max(int(accumulate), 1)
        if accumulate == 1:
            if examples:
                target, valid = self.targets(examples)
                loss, extra, n = self._student_loss(examples, target, valid)
            else:  # an epoch's smaller last step left this rank nothing: it still joins every collective
                loss, extra, n = self._empty_loss()
            if self.grad_average == "global":  # several ranks: each rank's share of the pooled global mean
                loss = loss * global_mean_weight(n)
            return loss, extra
        # ``accumulate`` consecutive micro-batches, as even as possible (a smaller last step's share may leave
        # some empty: they add nothing but join the collectives, so every rank runs the same sequence of them)
        cut = [k * len(examples) // accumulate for k in range(accumulate + 1)]
        parts = [examples[cut[k] : cut[k + 1]] for k in range(accumulate)]
        targets = [self.targets(p) if p else None for p in parts]
        counts = [self._cells(t[1]) if t is not None else torch.zeros((), device=self.device) for t in targets]
        total = sum(counts)
        weight = global_mean_weight(total) if self.grad_average == "global" else 1.0
        sizes = [len(p) for p in parts]
        if initialized():  # the logged means weigh micro-batch k by its examples on all ranks
            sizes = [int(x) for x in all_reduce_sum(torch.tensor(sizes, device=self.device)).tolist()]
        done, sums = None, defaultdict(float)
        for k, (p, t) in enumerate(zip(parts, targets)):
            loss, extra, n = self._student_loss(p, *t) if p else self._empty_loss()
            part = loss * (n / total.clamp_min(1.0)) * weight
            for key, v in extra.items():
                sums[key] += v * sizes[k] / sum(sizes)
            if k < accumulate - 1:
                with self._timed("backward"):
                    part.backward()
                done = part.detach() if done is None else done + part.detach()
            else:
                out = part + done
        return out, dict(sums)

    def _empty_loss(self):
        """:meth:`_student_loss` of a rank (or micro-batch) without examples: a zero loss that reaches no
        parameter (its gradients count as 0 in the all-reduce), nothing added to the pooled means, and the same
        collectives in the same order (the logged means, the collapse sums, the pooled cells of the cosine)."""
        zero = torch.zeros((), device=self.device, requires_grad=True)
        dino = self.loss_kind == "dino"
        extra = weighted_means({**({"kl": (0.0, 0.0)} if dino else {}), "coverage": (0.0, 0.0)})
        if dino:
            K = int(self.head.prototypes.shape[0])
            extra.update(
                collapse_stats(all_reduce_sum(torch.zeros(4 * K + 2, dtype=torch.float64, device=self.device)).cpu())
            )
            none = torch.zeros(0, int(self.backbone.embed_dim), device=self.device)
            extra["head_cos"] = self.head.embedding_cosine(pooled_rows(none, HEAD_COS_POINTS), HEAD_COS_POINTS)
        return zero, extra, torch.zeros((), device=self.device)

    def _cells(self, valid: torch.Tensor) -> torch.Tensor:
        """Loss cells of a micro-batch: every cell (``uncovered: zero_fill``) or the valid ones."""
        if self.uncovered == "zero_fill":
            return torch.tensor(float(valid.numel()), device=valid.device)
        return valid.sum().float()

    def _student_loss(self, examples, target: torch.Tensor, valid: torch.Tensor):
        """``(masked-mean loss, extra floats, loss cells)`` of the student on ``examples``' targets."""
        with self._timed("student"):
            self.adapter.train()
            with autocast(self.precision, self.device):
                student = self.backbone(self.backbone_input(torch.stack([ex["images"][2] for ex in examples])))
            student = student.float()
            if student.shape != target.shape:
                raise RuntimeError(f"student grid {tuple(student.shape)} != target grid {tuple(target.shape)}")
            covered = valid
            embedded = student.detach().permute(0, 2, 3, 1)[covered]  # [N,C] covered cells
            if self.uncovered == "zero_fill":
                # official: both sides zeroed where nothing was rendered, the loss averages every cell
                keep = valid[:, None]
                student, target = student * keep.to(student.dtype), target * keep.to(target.dtype)
                valid = torch.ones_like(valid)
        with self._timed("loss"):
            loss, extra = distill_loss(
                self.loss_kind,
                student,
                target,
                valid,
                self.head,
                self.teacher_head,
                *self.temps,
                token_chunk=self.token_chunk,
                diag_valid=covered,
            )
        # the logged diagnostics are the global batch's (the numbers one process with the whole batch logs):
        # means over cells pooled over the ranks, the collapse cosine on the pooled batch's sampled cells,
        # prototype usage and teacher/student agreement from the prototype sums of every rank's cells
        counts = extra.pop("collapse", None)
        n_valid = float(valid.sum())
        extra = weighted_means(
            {
                **{k: (v, n_valid) for k, v in extra.items()},  # kl: a mean over the valid cells
                "coverage": (float(covered.float().mean()), float(covered.numel())),
            }
        )
        if counts is not None:
            extra.update(collapse_stats(all_reduce_sum(counts).cpu()))
        if self.loss_kind == "dino":
            extra["head_cos"] = self.head.embedding_cosine(pooled_rows(embedded, HEAD_COS_POINTS), HEAD_COS_POINTS)
        return loss, extra, valid.sum()
