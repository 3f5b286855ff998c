"""Vectorised metrics for class probabilities, shared by training and stacking.

Every metric takes `y_true` (rows x classes: one-hot, soft or multi-hot, as
`ensemble.data.encode_targets` returns it) and `proba` of the same shape, plus
the task, because the same name means different things for the two tasks:

  log_loss  multiclass: cross-entropy against the y_true rows, probabilities
            clipped to [1e-15, 1 - 1e-15] and renormalised per row (Kaggle's
            rule); multilabel: mean binary log loss over all cells.
  accuracy  multiclass: argmax(proba) == argmax(y_true); multilabel: exact
            match of all labels at threshold 0.5 (scikit-learn's subset accuracy).
  f2/fbeta  F-beta of binary predictions: multilabel at threshold 0.5 (or the
            thresholds given), multiclass the argmax one-hot; averaged over
            samples (Planet's mean of per-image F2), micro or macro, with
            0/0 counted as 0 as scikit-learn does.
  map       mean over classes of average precision (scikit-learn's step-wise
            definition, ties grouped); classes with no positive row are left out.

Retrieval runs (task 'retrieval') monitor retrieval scores instead: `fn(labels,
embeddings, "retrieval")`, every row querying the other rows of its set
(leave-one-out, `ensemble.retrieve.metrics`): digix = 0.5 top1 + 0.5 map@10,
map@10, top1, recall@5, recall@10.

`get_metric(name)` returns a `Metric` from the registry `METRICS`; an unknown
name is a UserError that lists the allowed ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ensemble.errors import UserError

TASKS = ("multiclass", "multilabel")  # the tasks whose models output class probabilities
AVERAGES = ("samples", "micro", "macro")
EPS = 1e-15


def _check(y_true: np.ndarray, proba: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise UserError(f"The 'task' parameter must be one of {list(TASKS)}. Got {task!r} instead.")
    y_true = np.asarray(y_true, dtype=np.float64)
    proba = np.asarray(proba, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != proba.shape:
        raise UserError(f"y_true and proba must both be rows x classes of one shape; got {y_true.shape} and {proba.shape}.")
    return y_true, proba


def log_loss(y_true, proba, task: str = "multiclass", eps: float = EPS) -> float:
    """Clipped log loss (lower is better); see the module docstring."""
    y_true, proba = _check(y_true, proba, task)
    p = np.clip(proba, eps, 1 - eps)
    if task == "multiclass":
        p /= p.sum(axis=1, keepdims=True)
        return float(-(y_true * np.log(p)).sum(axis=1).mean())
    return float(-(y_true * np.log(p) + (1 - y_true) * np.log1p(-p)).mean())


def accuracy(y_true, proba, task: str = "multiclass") -> float:
    """Argmax accuracy (multiclass) or exact-match accuracy at 0.5 (multilabel)."""
    y_true, proba = _check(y_true, proba, task)
    if task == "multiclass":
        return float((proba.argmax(axis=1) == y_true.argmax(axis=1)).mean())
    return float(((proba >= 0.5) == (y_true >= 0.5)).all(axis=1).mean())


def fbeta_from_counts(tp, n_true, n_pred, beta: float) -> np.ndarray:
    """F-beta = (1 + b^2) tp / (b^2 n_true + n_pred), with 0/0 -> 0 (scikit-learn's convention)."""
    b2 = beta * beta
    tp = np.asarray(tp, dtype=np.float64)
    denom = b2 * np.asarray(n_true, dtype=np.float64) + np.asarray(n_pred, dtype=np.float64)
    return np.divide((1 + b2) * tp, denom, out=np.zeros(np.broadcast(tp, denom).shape), where=denom > 0)


def fbeta_binary(y_bin: np.ndarray, pred_bin: np.ndarray, beta: float = 2.0, average: str = "samples") -> float:
    """F-beta of two 0/1 matrices (rows x labels) averaged over samples, micro or macro."""
    if average not in AVERAGES:
        raise UserError(f"The 'average' parameter must be one of {list(AVERAGES)}. Got {average!r} instead.")
    y_bin = np.asarray(y_bin, dtype=bool)
    pred_bin = np.asarray(pred_bin, dtype=bool)
    tp = y_bin & pred_bin
    if average == "samples":
        return float(fbeta_from_counts(tp.sum(1), y_bin.sum(1), pred_bin.sum(1), beta).mean())
    if average == "macro":
        return float(fbeta_from_counts(tp.sum(0), y_bin.sum(0), pred_bin.sum(0), beta).mean())
    return float(fbeta_from_counts(tp.sum(), y_bin.sum(), pred_bin.sum(), beta))


def binarize(y_true, proba, task: str, thresholds=0.5) -> tuple[np.ndarray, np.ndarray]:
    """0/1 truth and predictions: argmax one-hot (multiclass) or `proba >= thresholds` (multilabel)."""
    y_true, proba = _check(y_true, proba, task)
    if task == "multiclass":
        eye = np.eye(y_true.shape[1], dtype=bool)
        return eye[y_true.argmax(axis=1)], eye[proba.argmax(axis=1)]
    return y_true >= 0.5, proba >= np.asarray(thresholds, dtype=np.float64)


def fbeta(y_true, proba, task: str = "multiclass", beta: float = 2.0, average: str = "samples",
          thresholds=0.5) -> float:
    """F-beta after binarising (threshold 0.5 or per-label `thresholds` for multilabel)."""
    y_bin, pred_bin = binarize(y_true, proba, task, thresholds)
    return fbeta_binary(y_bin, pred_bin, beta, average)


def average_precision(y_true, proba, task: str = "multiclass") -> float:
    """Mean over classes of average precision; classes without positives are left out."""
    y_bin, _ = binarize(y_true, proba, task)
    proba = np.asarray(proba, dtype=np.float64)
    order = np.argsort(-proba, axis=0, kind="stable")
    scores = np.take_along_axis(proba, order, axis=0)
    hits = np.take_along_axis(y_bin, order, axis=0).astype(np.float64)
    tp = hits.cumsum(axis=0)
    precision = tp / np.arange(1, len(proba) + 1)[:, None]
    n_pos = hits.sum(axis=0)
    aps = []
    for c in np.flatnonzero(n_pos > 0):
        # Tied scores form one cut: take precision and recall at the last row of each tie group.
        ends = np.append(np.flatnonzero(np.diff(scores[:, c]) != 0), len(proba) - 1)
        recall_steps = np.diff(tp[ends, c], prepend=0.0) / n_pos[c]
        aps.append(float((recall_steps * precision[ends, c]).sum()))
    return float(np.mean(aps)) if aps else 0.0


def is_better(score: float, best: float, mode: str) -> bool:
    """`score` strictly better than `best` for a metric with this mode ('min' or 'max')."""
    return score < best if mode == "min" else score > best


@dataclass(frozen=True)
class Metric:
    """A named metric: `fn(y_true, proba, task)` and whether lower or higher is better."""

    name: str
    mode: str  # "min" | "max"
    fn: Callable[..., float] = field(repr=False)
    tasks: tuple[str, ...] = TASKS  # the tasks a sweep may monitor it for (every fold scores them all)

    def __call__(self, y_true, proba, task: str = "multiclass") -> float:
        return self.fn(y_true, proba, task)

    def is_better(self, a: float, b: float) -> bool:
        """True when score `a` is strictly better than `b`."""
        return is_better(a, b, self.mode)

    def sign(self) -> float:
        """+1 for losses, -1 for gains: `sign() * score` is always lower-is-better."""
        return 1.0 if self.mode == "min" else -1.0


def _fbeta_metric(name: str, beta: float, average: str, thresholds, tasks: tuple[str, ...] = ()) -> Metric:
    def fn(y_true, proba, task="multiclass"):
        return fbeta(y_true, proba, task, beta=beta, average=average, thresholds=thresholds)

    return Metric(name, "max", fn, tasks)


def _retrieval_metric(name: str) -> Metric:
    def fn(labels, embeddings, task="retrieval"):
        from ensemble.retrieve.metrics import leave_one_out

        return leave_one_out(embeddings, labels)[name]

    return Metric(name, "max", fn, ("retrieval",))


RETRIEVAL_METRICS = ("digix", "map@10", "top1", "recall@5", "recall@10")

# The one registry of metric names: spaces (`metric:`), training, predict and stack all read it.
METRICS: dict[str, Metric] = {
    "log_loss": Metric("log_loss", "min", log_loss),
    "accuracy": Metric("accuracy", "max", accuracy),
    "f2": _fbeta_metric("f2", 2.0, "samples", 0.5, ("multilabel",)),
    "fbeta": _fbeta_metric("fbeta", 2.0, "samples", 0.5),  # stack only: it needs --beta
    "map": Metric("map", "max", average_precision, ("multilabel",)),
    **{name: _retrieval_metric(name) for name in RETRIEVAL_METRICS},
}
DEFAULT_METRIC = {"multiclass": "log_loss", "multilabel": "f2", "retrieval": "digix"}
# The metrics of class probabilities (what `get_metric` and the stacking layer take).
PROBABILITY_METRICS = tuple(name for name, m in METRICS.items() if "retrieval" not in m.tasks)


def task_metrics(task: str) -> list[str]:
    """The metrics a sweep of this task may monitor; every fold's metrics.json holds all of them."""
    return [name for name, metric in METRICS.items() if task in metric.tasks]


def fbeta_name(beta: float, average: str = "samples") -> str:
    """'f2' for samples-averaged F2, else e.g. 'f1_macro'."""
    name = f"f{beta:g}"
    return name if average == "samples" else f"{name}_{average}"


def get_metric(name: str, beta: float = 2.0, average: str = "samples", thresholds=0.5) -> Metric:
    """The registered metric `name`; 'fbeta' takes `beta`, both F metrics `average` and `thresholds`."""
    if name not in PROBABILITY_METRICS:
        raise UserError(f"The 'metric' parameter must be one of {sorted(PROBABILITY_METRICS)}. Got {name!r} instead."
                        + (" (a retrieval metric: python -m ensemble.retrieve scores those)" if name in METRICS else ""))
    if average not in AVERAGES:
        raise UserError(f"The 'average' parameter must be one of {list(AVERAGES)}. Got {average!r} instead.")
    if name in ("f2", "fbeta"):
        beta = 2.0 if name == "f2" else float(beta)
        if not beta > 0:
            raise UserError(f"The 'beta' parameter must be > 0. Got {beta!r} instead.")
        return _fbeta_metric(fbeta_name(beta, average), beta, average, thresholds)
    return METRICS[name]
