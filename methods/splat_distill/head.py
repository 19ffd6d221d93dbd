"""The DINO projection head and the distillation losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError

LOSSES = ("dino", "cosine", "direct")
PROTOTYPE_INITS = ("linear", "trunc_normal")  # method.head.prototype_init


class DINOHead(nn.Module):
    """DINO head: 3-layer MLP (GELU) -> bottleneck -> L2-normalise -> weight-normed linear to prototypes.

    The last layer is weight-normed: prototype ``k`` is ``g_k * V_k / ||V_k||`` with a per-prototype
    gain ``g`` (``gain``, shape ``[K, 1]``) that starts at 1, so the logits are
    ``g_k * <x_n, V_k / ||V_k||>``. In the official trainer (Splat-and-Distill
    ``src/model/vit/dinov2.py``: ``weight_norm(nn.Linear(..., bias=False))`` with ``weight_g`` filled
    with 1; ``src/model/model_wrapper.py`` trains every parameter whose name contains ``student``) the
    gain **trains** in the student and follows the EMA in the teacher: a learned per-prototype inverse
    temperature. ``train_gain=False`` fixes it at 1 (DINO's ``norm_last_layer``; the logits are then
    cosines). Applied per pixel to ``[B, C, h, w]`` maps, returns ``[B, K, h, w]``.

    ``prototype_init``: ``linear`` (official: ``DINOHead.__init__`` runs ``self.apply(self._init_weights)``
    (trunc-normal 0.02) over the MLP and only then creates the last layer, which keeps ``nn.Linear``'s
    default, kaiming-uniform with ``a = sqrt(5)``: U(-1/sqrt(bottleneck), 1/sqrt(bottleneck))) |
    ``trunc_normal`` (std 0.02, as the MLP).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        train_gain: bool = True,
        prototype_init: str = "trunc_normal",
    ):
        super().__init__()
        if prototype_init not in PROTOTYPE_INITS:
            raise BenchError(
                f"method.head.prototype_init='{prototype_init}' is not a choice", f"use one of {PROTOTYPE_INITS}"
            )
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        self.gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=bool(train_gain))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if prototype_init == "linear":  # official: the last layer is built after apply(_init_weights)
            nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))  # = nn.Linear(bottleneck, K)'s default
        else:
            nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.permute(0, 2, 3, 1)  # [B,h,w,C]
        x = F.normalize(self.mlp(x), dim=-1)
        logits = x @ (self.gain * F.normalize(self.prototypes, dim=-1)).t()  # [B,h,w,K]
        return logits.permute(0, 3, 1, 2)

    @torch.no_grad()
    def embedding_cosine(self, feats: torch.Tensor, max_points: int = 512) -> float:
        """Mean pairwise cosine of the head's bottleneck embeddings of ``feats`` (``[B,C,h,w]`` maps or
        ``[N,C]`` vectors; collapse diagnostic: 1 = every pixel maps to the same direction). At most
        ``max_points`` pixels (evenly spaced) are used."""
        x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]) if feats.ndim == 4 else feats
        if x.shape[0] > max_points:
            x = x[torch.linspace(0, x.shape[0] - 1, max_points).long()]
        z = F.normalize(self.mlp(x), dim=-1)
        n = z.shape[0]
        if n < 2:
            return float("nan")
        sim = z @ z.t()
        return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B,h,w]`` over ``valid [B,h,w]`` (0 when nothing is valid, keeping the graph)."""
    w = valid.to(x.dtype)
    return (x * w).sum() / w.sum().clamp_min(1.0)


def dino_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_temp: float = 1.0, teacher_temp: float = 1.0
) -> torch.Tensor:
    """Per-pixel ``-sum_k p_teacher log p_student`` ``[B,h,w]``; teacher detached, no centering."""
    p_t = F.softmax(teacher_logits.detach() / teacher_temp, dim=1)
    return -(p_t * F.log_softmax(student_logits / student_temp, dim=1)).sum(dim=1)


COLLAPSE_KEYS = (
    "student_usage_entropy",
    "teacher_usage_entropy",
    "student_argmax_entropy",
    "teacher_argmax_entropy",
    "agreement",
)


@torch.no_grad()
def collapse_counts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    student_temp: float = 1.0,
    teacher_temp: float = 1.0,
) -> torch.Tensor:
    """Sums over the ``valid [B,h,w]`` cells of the logits ``[B,K,h,w]`` that the collapse diagnostics
    need, as one float64 vector (sums add over ranks, so one all-reduce gives the global batch's):
    ``[sum p_student (K), sum p_teacher (K), argmax histogram of student (K), of teacher (K),
    cells where both argmaxes agree, cells]`` with ``p = softmax(logits / temp)`` over the K prototypes."""
    K = student_logits.shape[1]
    keep = valid.bool()
    w = keep.to(student_logits.dtype)
    # the softmax sums contract with the mask (no copy of the logits per cell: K can be 65536)
    ps = torch.einsum("bkhw,bhw->k", F.softmax(student_logits.detach() / student_temp, dim=1), w)
    pt = torch.einsum("bkhw,bhw->k", F.softmax(teacher_logits.detach() / teacher_temp, dim=1), w)
    a_s, a_t = student_logits.argmax(1)[keep], teacher_logits.argmax(1)[keep]
    hs, ht = torch.bincount(a_s, minlength=K), torch.bincount(a_t, minlength=K)
    tail = torch.tensor([float((a_s == a_t).sum()), float(keep.sum())], device=ps.device)
    return torch.cat([ps.double(), pt.double(), hs.double(), ht.double(), tail.double()])


def entropy(weights: torch.Tensor) -> float:
    """Entropy (nats) of the distribution proportional to the non-negative ``weights`` (0 log 0 = 0);
    nan when they sum to 0. Uniform over K: ``log K``; everything on one prototype: 0."""
    total = float(weights.sum())
    if total <= 0:
        return float("nan")
    p = weights.double() / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def collapse_stats(counts: torch.Tensor) -> dict:
    """The collapse diagnostics from :func:`collapse_counts`'s sums (one rank's or summed over ranks):

    * ``*_usage_entropy``: entropy of the batch-mean softmax over prototypes (nats; ``log K`` = every
      prototype used equally on average -- also what K uniform per-cell outputs give);
    * ``*_argmax_entropy``: entropy of the histogram of each cell's most likely prototype (0 = every
      cell picks the same prototype: collapse; ``log K`` at most);
    * ``agreement``: fraction of cells where the student's and the teacher's argmax prototypes agree.
    """
    K = (counts.numel() - 2) // 4
    ps, pt, hs, ht = (counts[i * K : (i + 1) * K] for i in range(4))
    agree, n = float(counts[-2]), float(counts[-1])
    return {
        "student_usage_entropy": entropy(ps),
        "teacher_usage_entropy": entropy(pt),
        "student_argmax_entropy": entropy(hs),
        "teacher_argmax_entropy": entropy(ht),
        "agreement": agree / n if n > 0 else float("nan"),
    }


def distill_loss(
    kind: str,
    student_feats: torch.Tensor,
    target_feats: torch.Tensor,
    valid: torch.Tensor,
    student_head: nn.Module | None = None,
    teacher_head: nn.Module | None = None,
    student_temp: float = 1.0,
    teacher_temp: float = 1.0,
    token_chunk: int = 0,
    diag_valid: torch.Tensor | None = None,
):
    """Loss between student features and splatted teacher targets, both ``[B,C,h,w]``, on ``valid``.

    ``dino``: cross-entropy through the DINO heads (the method). Ablations: ``cosine`` (1 - cos on
    the backbone features) and ``direct`` (mean squared error on the backbone features).
    Returns ``(loss, extra)`` where ``extra`` holds floats to log (the KL part of the cross-entropy) and,
    for ``dino``, ``collapse``: the :func:`collapse_counts` sums of the batch (a tensor; the caller reduces
    them over ranks and turns them into floats with :func:`collapse_stats`), over the cells ``diag_valid``
    (default ``valid``; the trainer passes the covered cells, so zero-filled uncovered cells, which all map
    to the head's output for a zero vector, do not count as collapse).
    ``token_chunk > 0``: the DINO cross-entropy over more tokens than that is computed in chunks of
    tokens (:func:`chunked_dino_loss`; the same value, gradient and collapse sums up to float rounding).
    """
    target_feats = target_feats.detach()
    if kind == "dino" and token_chunk and student_feats[:, 0].numel() > token_chunk:
        return chunked_dino_loss(
            student_feats,
            target_feats,
            valid,
            student_head,
            teacher_head,
            student_temp,
            teacher_temp,
            token_chunk,
            valid if diag_valid is None else diag_valid,
        )
    if kind == "dino":
        s_logits = student_head(student_feats)
        with torch.no_grad():
            t_logits = teacher_head(target_feats)
        ce = dino_cross_entropy(s_logits, t_logits, student_temp, teacher_temp)
        with torch.no_grad():
            p_t = F.log_softmax(t_logits / teacher_temp, dim=1)
            entropy = -(p_t.exp() * p_t).sum(dim=1)
            kl = masked_mean(ce.detach() - entropy, valid)
            cells = valid if diag_valid is None else diag_valid
            counts = collapse_counts(s_logits, t_logits, cells, student_temp, teacher_temp)
        return masked_mean(ce, valid), {"kl": float(kl), "collapse": counts}
    if kind == "cosine":
        return masked_mean(1.0 - F.cosine_similarity(student_feats, target_feats, dim=1), valid), {}
    if kind == "direct":
        return masked_mean(((student_feats - target_feats) ** 2).mean(dim=1), valid), {}
    raise ValueError(f"unknown loss '{kind}' (use one of {LOSSES})")


def chunked_dino_loss(
    student_feats: torch.Tensor,
    target_feats: torch.Tensor,
    valid: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    student_temp: float,
    teacher_temp: float,
    chunk: int,
    diag_valid: torch.Tensor | None = None,
):
    """The ``dino`` branch of :func:`distill_loss` over ``chunk`` tokens at a time.

    Memory: the batched form holds ``[B, K, h, w]`` float32 logits (and their softmaxes) of every token at
    once (K = 65,536 prototypes: ~9 GB per tensor at 14 x 2,542 tokens). Here each chunk runs under
    activation checkpointing (``torch.utils.checkpoint``, non-reentrant): its logits are freed after the
    forward and recomputed in the backward, so at most one chunk's logits live at a time. The loss is the
    same masked mean (sum of per-token cross-entropies on ``valid`` over their count)."""
    from torch.utils.checkpoint import checkpoint

    C = student_feats.shape[1]
    s = student_feats.permute(0, 2, 3, 1).reshape(-1, C)
    t = target_feats.permute(0, 2, 3, 1).reshape(-1, C)
    w = valid.reshape(-1).to(s.dtype)
    cells = (valid if diag_valid is None else diag_valid).reshape(-1)

    def token_ce(s_part: torch.Tensor, t_part: torch.Tensor, c_part: torch.Tensor):
        s_logits = student_head(s_part.t()[None, :, :, None])  # [1,K,n,1]: the head's pixel layout
        with torch.no_grad():
            t_logits = teacher_head(t_part.t()[None, :, :, None])
            p_t = F.log_softmax(t_logits / teacher_temp, dim=1)
            entropy = -(p_t.exp() * p_t).sum(dim=1).reshape(-1)
            counts = collapse_counts(s_logits, t_logits, c_part[None, :, None], student_temp, teacher_temp)
        return dino_cross_entropy(s_logits, t_logits, student_temp, teacher_temp).reshape(-1), entropy, counts

    total, kl, counts = s.new_zeros(()), s.new_zeros(()), None
    for i in range(0, s.shape[0], chunk):
        sl = slice(i, i + chunk)
        ce, entropy, c = checkpoint(token_ce, s[sl], t[sl], cells[sl], use_reentrant=False)
        total = total + (ce * w[sl]).sum()
        kl = kl + ((ce.detach() - entropy) * w[sl]).sum()
        counts = c if counts is None else counts + c  # the collapse sums add over chunks (as over ranks)
    n = w.sum().clamp_min(1.0)
    return total / n, {"kl": float(kl / n), "collapse": counts}
