"""The maths of test-time augmentation: view names, activations and the merge of views (plain numpy)."""

from __future__ import annotations

import numpy as np
from scipy import special

from ensemble.data import views as views_mod
from ensemble.errors import UserError

MERGES = ("mean", "gmean", "logits")


def check_merge(how: str) -> str:
    if how not in MERGES:
        raise UserError(f"The 'merge' parameter must be one of {list(MERGES)}. Got {how!r} instead.")
    return how


def view_names(spec: str) -> list[str]:
    """A name per view image: the chain, plus #i for each image of an expanding op ('fivecrop#0' ...)."""
    names = []
    for chain in views_mod.parse_views(spec):
        n = views_mod.count_views(chain)
        names += [chain] if n == 1 else [f"{chain}#{i}" for i in range(n)]
    return names


def activate(logits: np.ndarray, task: str) -> np.ndarray:
    """Softmax over the last axis (multiclass) or a sigmoid per label (multilabel), in float64."""
    z = np.asarray(logits, dtype=np.float64)
    return special.softmax(z, axis=-1) if task == "multiclass" else special.expit(z)


def merge_views(logits: np.ndarray, task: str, how: str = "mean") -> np.ndarray:
    """N x V x C logits -> N x C probabilities.

    mean: the views' probabilities averaged. gmean: their geometric mean, rows
    renormalised to sum to 1 for multiclass (where it equals `logits`: log-softmax
    is the logits minus a per-row constant). logits: the activation of the mean logits.
    """
    z = np.asarray(logits, dtype=np.float64)
    if check_merge(how) == "mean":
        return activate(z, task).mean(axis=1)
    if how == "logits":
        return activate(z.mean(axis=1), task)
    p = np.exp((special.log_softmax(z, axis=-1) if task == "multiclass" else special.log_expit(z)).mean(axis=1))
    return p / p.sum(axis=-1, keepdims=True) if task == "multiclass" else p


def merge_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """N x V x D embeddings -> N x D: the views' mean, then L2-normalised (float32).

    A row whose mean is zero or not finite stays as it is (zero or NaN): the retrieve
    stage names such rows instead of searching with them."""
    mean = np.asarray(embeddings, dtype=np.float64).mean(axis=1)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return np.divide(mean, norm, out=mean.copy(), where=norm > 0).astype(np.float32)
