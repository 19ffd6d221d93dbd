"""MEF's correspondence ranking loss (a smooth-AP objective with a temperature-controlled sigmoid).

Facts (qq456cvb/3DCorrEnhance ``finetune.py`` ``FinetuneDINO.training_step``, ``utils/functions.py``
``sigmoid``): for two views of one object, ``S`` sampled foreground pixels of view 1 and ``T`` of view
2 carry unit descriptors ``d1 [S,C]``, ``d2 [T,C]`` and object-frame 3D points ``p1``, ``p2``.
``sim = d1 d2^T``; a pair ``(s, t)`` is *positive* when ``|p1_s - p2_t| < pos_thresh`` (5e-3 in
units of the normalised object, whose largest bounding-box side is 1) and, for the row ``s`` of a
positive, ``t'`` is *negative* when ``|p1_s - p2_t'| > neg_thresh`` (0.1). With
``sig(x) = 1 / (1 + exp(clamp(-x / temp, -50, 50)))`` and ``temp = 0.01``, each positive ``(s, t)``
with similarity ``q = sim[s, t]`` scores two soft average precisions

* ``ap1 = r1 / (r1 + sum_neg sig(sim[s, t'] - 1))`` with ``r1 = 1 + sig(q - 1)`` (rank against a
  perfect match),
* ``ap2 = r2 / (r2 + sum_neg sig(sim[s, t'] - q))`` with ``r2 = 1 + sig(1 - q)`` (negatives ranked
  above the positive itself),

and the loss is ``mean(1 - (ap1 + ap2) / 2)`` over all positives of the batch (rows are view-1 points
only, as in the official code). The ``-50..50`` clamp of the exponent is the official one.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

POS_THRESH = 5e-3
NEG_THRESH = 0.1
TEMPERATURE = 0.01


def temp_sigmoid(x: Tensor, temp: float = TEMPERATURE) -> Tensor:
    """``1 / (1 + exp(clamp(-x / temp, -50, 50)))`` (the official temperature sigmoid)."""
    return 1.0 / (1.0 + torch.exp(torch.clamp(-x / temp, min=-50.0, max=50.0)))


def ap_terms(
    desc1: Tensor,
    desc2: Tensor,
    pts1: Tensor,
    pts2: Tensor,
    pos_thresh: float = POS_THRESH,
    neg_thresh: float = NEG_THRESH,
    temp: float = TEMPERATURE,
) -> Tensor:
    """The soft AP ``(ap1 + ap2) / 2`` of every positive pair ``[P]`` (module docstring) for batched unit
    descriptors ``desc1 [B,S,C]``, ``desc2 [B,T,C]`` and object points ``pts1 [B,S,3]``, ``pts2 [B,T,3]``."""
    dist = torch.cdist(pts1.float(), pts2.float())  # [B,S,T]
    sim = torch.bmm(desc1, desc2.transpose(-1, -2))  # [B,S,T]
    b, s, t = torch.nonzero(dist < pos_thresh, as_tuple=True)
    q = sim[b, s, t]  # [P]
    rows = sim[b, s]  # [P,T]
    neg = (dist[b, s] > neg_thresh).to(sim.dtype)  # [P,T]
    r1 = temp_sigmoid(q - 1.0, temp) + 1.0
    ap1 = r1 / (r1 + (temp_sigmoid(rows - 1.0, temp) * neg).sum(-1))
    r2 = temp_sigmoid(1.0 - q, temp) + 1.0
    ap2 = r2 / (r2 + (temp_sigmoid(rows - q[:, None], temp) * neg).sum(-1))
    return (ap1 + ap2) / 2


def ranking_loss(
    desc1: Tensor,
    desc2: Tensor,
    pts1: Tensor,
    pts2: Tensor,
    pos_thresh: float = POS_THRESH,
    neg_thresh: float = NEG_THRESH,
    temp: float = TEMPERATURE,
) -> Tuple[Tensor, Dict[str, float]]:
    """``mean(1 - ap)`` over the positives (:func:`ap_terms`); ``(loss, {"positives", "ap"})``."""
    return reduce_terms([ap_terms(desc1, desc2, pts1, pts2, pos_thresh, neg_thresh, temp)], desc1)


def reduce_terms(terms, anchor: Tensor) -> Tuple[Tensor, Dict[str, float]]:
    """The loss over the positives of several pairs (the official batched mean). Without any positive
    the loss is ``0 * anchor.sum()`` -- a zero that keeps the graph, so the step changes nothing --
    where the official mean of an empty set would be NaN."""
    ap = torch.cat([t.reshape(-1) for t in terms])
    if ap.numel() == 0:
        return anchor.sum() * 0.0, {"positives": 0.0, "ap": float("nan")}
    return (1.0 - ap).mean(), {"positives": float(ap.numel()), "ap": float(ap.detach().mean())}
