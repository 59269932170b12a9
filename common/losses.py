"""Metric-learning losses on L2-normalised embeddings: margin heads and batch-hard triplet.

``train.loss`` names one loss or a ``+``-joined pair:

* ``arcface``   - additive angular margin: the target logit is ``s * cos(theta + m)``.
* ``subcenter`` - ArcFace with ``k`` centres per class (the closest centre counts), robust to
  noisy labels and to several looks of one whale.
* ``cosface``   - additive cosine margin: the target logit is ``s * (cos(theta) - m)``.
* ``triplet``   - batch-hard triplet on PK batches (``triplet_margin``; ``null`` = soft margin).

``ce_weight > 0`` adds a plain classification cross-entropy on the scaled cosines of the same
head (label smoothing ``label_smoothing``). ``class_weights: true`` weights every head
cross-entropy by inverse class frequency ** 0.5 (normalised to mean 1) against imbalance, as in
the Google Landmark Retrieval 2020 winner. The head's weights are trained with the model, at
``lr * head_lr_mult`` (see common/training.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError

MARGIN_HEADS = ("arcface", "subcenter", "cosface")
LOSSES = MARGIN_HEADS + ("triplet",)


class MarginHead(nn.Module):
    """Cosine classifier with an angular (ArcFace), sub-centre ArcFace or cosine (CosFace) margin.

    ``forward(emb, labels)`` returns the logits with the margin applied to each row's target
    class; ``cosine(emb)`` the plain class cosines (max over sub-centres).
    """

    def __init__(self, emb_dim: int, n_classes: int, kind: str = "arcface", s: float = 30.0,
                 m: float = 0.5, k: int = 1):
        super().__init__()
        if kind not in MARGIN_HEADS:
            raise ConfigError(f"unknown margin head {kind!r}; expected one of {MARGIN_HEADS}")
        self.kind, self.s, self.m, self.n_classes = kind, float(s), float(m), int(n_classes)
        self.k = int(k) if kind == "subcenter" else 1
        self.weight = nn.Parameter(torch.empty(self.n_classes * self.k, emb_dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb), F.normalize(self.weight))
        if self.k > 1:
            cos = cos.view(-1, self.n_classes, self.k).amax(dim=2)
        return cos.clamp(-1.0, 1.0)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb)
        target = cos.gather(1, labels[:, None])
        if self.kind == "cosface":
            with_margin = target - self.m
        else:
            sin = torch.sqrt((1.0 - target * target).clamp_min(1e-7))
            phi = target * math.cos(self.m) - sin * math.sin(self.m)
            # past theta = pi - m, cos(theta + m) stops falling: continue linearly instead
            with_margin = torch.where(target > math.cos(math.pi - self.m), phi,
                                      target - math.sin(math.pi - self.m) * self.m)
        return self.s * cos.scatter(1, labels[:, None], with_margin)


def pairwise_distance(emb: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix of L2-normalised rows: ``sqrt(2 - 2 cos)``."""
    cos = emb @ emb.t()
    return torch.sqrt((2.0 - 2.0 * cos).clamp_min(1e-12))


def hardest_pairs(dist: torch.Tensor, labels: torch.Tensor):
    """For each anchor: ``(hardest positive index, hardest negative index, valid mask)``.

    The hardest positive is the farthest other image of the same label, the hardest negative the
    closest image of another label; anchors lacking either are not valid.

    >>> d = torch.tensor([[0., 1., 3., 2.], [1., 0., 2., 5.], [3., 2., 0., 4.], [2., 5., 4., 0.]])
    >>> pos, neg, ok = hardest_pairs(d, torch.tensor([0, 0, 0, 1]))
    >>> pos[ok].tolist(), neg[ok].tolist(), ok.tolist()
    ([2, 2, 0], [3, 3, 3], [True, True, True, False])
    """
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos_mask, neg_mask = same & ~eye, ~same
    pos = dist.masked_fill(~pos_mask, float("-inf")).argmax(dim=1)
    neg = dist.masked_fill(~neg_mask, float("inf")).argmin(dim=1)
    return pos, neg, pos_mask.any(dim=1) & neg_mask.any(dim=1)


def batch_hard_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017): mean over valid anchors of
    ``relu(d(a, p_hard) - d(a, n_hard) + margin)``, or ``softplus(d_ap - d_an)`` when margin is None."""
    dist = pairwise_distance(emb)
    pos, neg, ok = hardest_pairs(dist.detach(), labels)
    if not ok.any():
        return emb.sum() * 0.0
    rows = torch.arange(len(labels), device=emb.device)
    gap = dist[rows, pos] - dist[rows, neg]
    loss = F.softplus(gap) if margin is None else F.relu(gap + float(margin))
    return loss[ok].mean()


def class_weights(counts, power: float = 0.5) -> torch.Tensor:
    """Per-class weights ``count ** -power`` scaled to mean 1.

    >>> [round(w, 4) for w in class_weights([1, 4, 16]).tolist()]
    [1.7143, 0.8571, 0.4286]
    """
    w = torch.as_tensor(counts, dtype=torch.float32).clamp_min(1).pow(-power)
    return w / w.mean()


class MetricLoss(nn.Module):
    """The configured training loss; ``forward(emb, labels) -> (total, {part: float})``.

    ``self.head`` is the margin head (or a plain cosine head when only ``ce_weight`` needs one),
    else None.
    """

    def __init__(self, train_cfg: dict, emb_dim: int, n_classes: int, counts=None):
        super().__init__()
        parts = [p.strip() for p in str(train_cfg["loss"]).split("+") if p.strip()]
        bad = [p for p in parts if p not in LOSSES]
        if not parts or bad or sum(p in MARGIN_HEADS for p in parts) > 1:
            raise ConfigError(f"train.loss {train_cfg['loss']!r} must be one of {LOSSES} or one margin "
                             f"head + triplet, e.g. 'arcface+triplet'")
        self.margin_kind = next((p for p in parts if p in MARGIN_HEADS), None)
        self.use_triplet = "triplet" in parts
        self.triplet_margin = train_cfg["triplet_margin"]
        self.triplet_weight = float(train_cfg["triplet_weight"])
        self.ce_weight = float(train_cfg["ce_weight"] or 0.0)
        self.label_smoothing = float(train_cfg["label_smoothing"] or 0.0)
        self.head = None
        if self.margin_kind or self.ce_weight > 0:
            kind = self.margin_kind or "cosface"
            m = {"arcface": train_cfg["arcface_m"], "subcenter": train_cfg["arcface_m"],
                 "cosface": train_cfg["cosface_m"]}[kind] if self.margin_kind else 0.0
            self.head = MarginHead(emb_dim, n_classes, kind, s=float(train_cfg["arcface_s"]),
                                   m=float(m), k=int(train_cfg["subcenter_k"]))
        weights = class_weights(counts) if counts is not None and train_cfg["class_weights"] else None
        self.register_buffer("weight", weights, persistent=False)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor):
        emb = emb.float()
        parts: dict[str, torch.Tensor] = {}
        if self.margin_kind:
            parts[self.margin_kind] = F.cross_entropy(self.head(emb, labels), labels, weight=self.weight)
        if self.ce_weight > 0:
            logits = self.head.s * self.head.cosine(emb)
            parts["ce"] = self.ce_weight * F.cross_entropy(logits, labels, weight=self.weight,
                                                           label_smoothing=self.label_smoothing)
        if self.use_triplet:
            parts["triplet"] = self.triplet_weight * batch_hard_triplet(emb, labels, self.triplet_margin)
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}
