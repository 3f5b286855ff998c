"""Classification heads for training retrieval embeddings: softmax, ArcFace, CosFace, sub-center ArcFace.

A head sits on top of the embedding during training only; retrieval then searches the
(normalised) embeddings themselves. Every head returns logits, and the loss is plain
cross-entropy over them: `F.cross_entropy(head(emb, labels), labels)`. The margin heads
put a margin on the target class only when `labels` are given, so evaluation without
labels gets the unbiased `scale * cos`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ensemble.errors import UserError

HEADS = ("softmax", "arcface", "cosface", "subcenter")


class MarginHead(nn.Module):
    """Logits for metric learning: a linear layer or a cosine classifier with an angular margin.

    Args:
        in_features: Embedding size.
        n_classes: Number of training classes (identities).
        kind: One of HEADS. "arcface" adds `margin` to the target angle (Deng et al. 2019),
            "cosface" subtracts `margin` from the target cosine (Wang et al. 2018),
            "subcenter" is ArcFace over the best of `subcenters` centres per class
            (Deng et al. 2020), "softmax" is a plain `nn.Linear`.
        scale: Multiplies the cosines; ignored by "softmax".
        margin: Radians for arcface/subcenter, a cosine for cosface; ignored by "softmax".
        subcenters: Centres per class, "subcenter" only.
    """

    def __init__(self, in_features: int, n_classes: int, kind: str = "arcface", scale: float = 30.0,
                 margin: float = 0.5, subcenters: int = 3):
        super().__init__()
        if kind not in HEADS:
            raise UserError(f"The 'head' parameter must be one of {list(HEADS)}. Got {kind!r} instead.")
        self.kind, self.n_classes = kind, n_classes
        self.scale, self.margin = float(scale), float(margin)
        self.subcenters = subcenters if kind == "subcenter" else 1
        if kind == "softmax":
            self.fc = nn.Linear(in_features, n_classes)
            return
        # Rows c*K .. c*K+K-1 are class c's sub-centres (K = 1 except for "subcenter").
        self.weight = nn.Parameter(torch.empty(n_classes * self.subcenters, in_features))
        nn.init.xavier_uniform_(self.weight)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n_classes={self.n_classes}, scale={self.scale}, margin={self.margin}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits (N, n_classes) for embeddings (N, in_features).

        Args:
            embeddings: The model's embeddings, any float dtype.
            labels: int64 class indices (N,); with them, the target logit carries the margin.
        """
        # Float32 even under AMP: autocast would round the cosines to half precision (bfloat16 steps
        # by ~0.002 near 1), which sqrt(1 - cos^2) magnifies into a sine off by up to ~0.06 for the
        # well-trained targets the margin acts on. The cast also lets float16 embeddings meet the
        # float32 weights.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.float()
            if self.kind == "softmax":
                return F.linear(x, self.fc.weight.float(), self.fc.bias.float())
            cos = F.linear(F.normalize(x), F.normalize(self.weight.float()))
            if self.subcenters > 1:
                cos = cos.view(-1, self.n_classes, self.subcenters).amax(dim=2)
            if labels is None:
                return self.scale * cos
            target = F.one_hot(labels.long(), self.n_classes).bool()
            return self.scale * torch.where(target, self._with_margin(cos), cos)

    def _with_margin(self, cos: torch.Tensor) -> torch.Tensor:
        """The target cosine with the margin, for every entry (the caller keeps only the targets)."""
        if self.kind == "cosface":
            return cos - self.margin
        m = self.margin
        sin = torch.sqrt((1.0 - cos * cos).clamp(0, 1))
        phi = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
        # Past theta = pi - m, cos(theta + m) would rise again and reward a worse angle; insightface's
        # easy_margin=False continues it by a line that keeps decreasing instead.
        return torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)


def create_head(kind: str, in_features: int, n_classes: int, *, scale: float = 30.0, margin: float = 0.5,
                subcenters: int = 3) -> MarginHead:
    """A MarginHead of `kind` (one of HEADS); see MarginHead for the arguments."""
    return MarginHead(in_features, n_classes, kind=kind, scale=scale, margin=margin, subcenters=subcenters)
