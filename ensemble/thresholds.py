"""Per-label decision thresholds that maximise F-beta (multilabel), in plain numpy.

`LabelThresholds.fit` starts from the best single global threshold and runs
greedy coordinate ascent over the labels: for one label, with every other
label's predictions held fixed, it finds the exactly best threshold, then moves
on; passes repeat until no label improves. So the result is never worse than the
best global threshold.

The exact search for one label sorts that label's scores once; predicting the
top k rows positive is the only thing a threshold can do, so it scores every
k at once with cumulative sums and keeps the best k that falls between two
distinct scores (the threshold is the midpoint). For samples-averaging (Planet's
mean per-image F2) each image contributes F_i(label on) - F_i(label off),
computed from that image's counts with the label under search left out; micro
and macro work from the label's cumulative true-positive count. No Python
loop over candidate thresholds.

Predictions are `proba >= threshold`; F-beta counts 0/0 as 0 like scikit-learn.
"""

from __future__ import annotations

import numpy as np

from ensemble.errors import UserError
from ensemble.metrics import AVERAGES, fbeta_binary, fbeta_from_counts

_TOL = 1e-12  # a label moves only when the score improves by more than rounding
_MAX_PASSES = 100  # coordinate ascent converges in a few passes; this only bounds a pathological case


def _cut_threshold(sorted_desc: np.ndarray, k: int) -> float:
    """A threshold that makes exactly the top-k of `sorted_desc` positive under `>=`."""
    if k == 0:
        return float(np.nextafter(max(sorted_desc[0], 1.0), np.inf))
    if k == len(sorted_desc):
        return float(min(sorted_desc[-1], 0.0))
    hi, lo = sorted_desc[k - 1], sorted_desc[k]
    mid = (hi + lo) / 2
    return float(mid if lo < mid <= hi else hi)


def _valid_cuts(sorted_desc: np.ndarray) -> np.ndarray:
    """Mask over k = 0..n: True where a threshold can separate the top k (no tie split)."""
    valid = np.ones(len(sorted_desc) + 1, dtype=bool)
    valid[1:-1] = sorted_desc[:-1] != sorted_desc[1:]
    return valid


def best_global_threshold(y_true, proba, beta: float = 2.0, average: str = "samples") -> tuple[float, float]:
    """The single threshold for all labels that maximises F-beta, found exactly; returns (threshold, score).

    All cells are sorted once; lowering the threshold past a cell switches it on,
    which changes one group's F (the cell's image for samples, its label for
    macro, everything for micro) by an amount known from that group's counts
    at that moment, so a cumulative sum scores every cut.
    """
    y_bin, proba = _validate(y_true, proba, beta, average)
    n, n_labels = proba.shape
    flat = proba.ravel()
    order = np.argsort(-flat, kind="stable")
    scores = flat[order]
    hits = y_bin.ravel()[order]
    if average == "samples":
        group, n_groups, n_true = order // n_labels, n, y_bin.sum(axis=1)
    elif average == "macro":
        group, n_groups, n_true = order % n_labels, n_labels, y_bin.sum(axis=0)
    else:
        group, n_groups, n_true = np.zeros(len(order), dtype=np.int64), 1, np.array([y_bin.sum()])
    # Rank and true-positive count of each cell within its group, in the global order.
    by_group = np.argsort(group, kind="stable")
    g_sorted = group[by_group]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    first = np.repeat(starts, sizes)
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_group] = np.arange(len(order)) - first + 1
    h = hits[by_group].astype(np.int64)
    tp_cum = np.cumsum(h)
    tp = np.empty(len(order), dtype=np.int64)
    tp[by_group] = tp_cum - np.repeat(np.r_[0, tp_cum][starts], sizes)
    t = n_true[group]
    delta = fbeta_from_counts(tp, t, rank, beta) - fbeta_from_counts(tp - hits, t, rank - 1, beta)
    total = np.r_[0.0, np.cumsum(delta)] / n_groups
    total[~_valid_cuts(scores)] = -np.inf
    k = int(np.argmax(total))
    return _cut_threshold(scores, k), float(total[k])


def _validate(y_true, proba, beta, average) -> tuple[np.ndarray, np.ndarray]:
    if average not in AVERAGES:
        raise UserError(f"The 'average' parameter must be one of {list(AVERAGES)}. Got {average!r} instead.")
    if not beta > 0:
        raise UserError(f"The 'beta' parameter must be > 0. Got {beta!r} instead.")
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or y_true.shape != proba.shape or len(proba) == 0:
        raise UserError(f"y_true and proba must be non-empty rows x labels of one shape; got {y_true.shape} and {proba.shape}.")
    if not np.isfinite(proba).all():
        raise UserError("proba holds NaN or inf; thresholds need finite scores.")
    return y_true >= 0.5, proba


class LabelThresholds:
    """Per-label thresholds maximising F-beta by coordinate ascent with an exact per-label search.

    Args:
        beta: F-beta's beta (2 = recall weighs 4x precision, the Planet metric).
        average: "samples" (mean of per-image F), "micro" or "macro".

    Fitted attributes: `thresholds_` (one per label), `score_` (in-sample F),
    `global_threshold_` and `global_score_` (the best single threshold, the
    starting point), `trajectory_` (score after each pass), `n_passes_`.
    """

    def __init__(self, beta: float = 2.0, average: str = "samples"):
        self.beta = beta
        self.average = average

    def fit(self, y_true, proba) -> "LabelThresholds":
        y_bin, proba = _validate(y_true, proba, self.beta, self.average)
        self.global_threshold_, self.global_score_ = best_global_threshold(y_bin, proba, self.beta, self.average)
        thresholds = np.full(proba.shape[1], self.global_threshold_)
        pred = proba >= thresholds
        self.trajectory_ = [fbeta_binary(y_bin, pred, self.beta, self.average)]
        for _ in range(_MAX_PASSES):
            moved = False
            for j in range(proba.shape[1]):
                order = np.argsort(-proba[:, j], kind="stable")
                sorted_desc = proba[order, j]
                totals = self._label_totals(y_bin, pred, j, order)
                current = int(pred[:, j].sum())
                totals[~_valid_cuts(sorted_desc)] = -np.inf
                k = int(np.argmax(totals))
                if totals[k] > totals[current] + _TOL:
                    thresholds[j] = _cut_threshold(sorted_desc, k)
                    pred[:, j] = proba[:, j] >= thresholds[j]
                    moved = True
            self.trajectory_.append(fbeta_binary(y_bin, pred, self.beta, self.average))
            if not moved:
                break
        self.thresholds_ = thresholds
        self.score_ = self.trajectory_[-1]
        self.n_passes_ = len(self.trajectory_) - 1
        return self

    def _label_totals(self, y_bin, pred, j, order) -> np.ndarray:
        """Score for k = 0..n rows of label j on (top k by score), all other labels as in `pred`."""
        beta, n, n_labels = self.beta, len(pred), pred.shape[1]
        y_j = y_bin[:, j]
        if self.average == "samples":
            tp_rest = (pred & y_bin).sum(axis=1) - (pred[:, j] & y_j)
            pred_rest = pred.sum(axis=1) - pred[:, j]
            n_true = y_bin.sum(axis=1)
            f_off = fbeta_from_counts(tp_rest, n_true, pred_rest, beta)
            gain = fbeta_from_counts(tp_rest + y_j, n_true, pred_rest + 1, beta) - f_off
            return (f_off.sum() + np.r_[0.0, np.cumsum(gain[order])]) / n
        tp_cum = np.r_[0, np.cumsum(y_j[order])]
        k = np.arange(n + 1)
        if self.average == "micro":
            tp_rest = (pred & y_bin).sum() - (pred[:, j] & y_j).sum()
            pred_rest = pred.sum() - pred[:, j].sum()
            return fbeta_from_counts(tp_rest + tp_cum, y_bin.sum(), pred_rest + k, beta)
        per_label = fbeta_from_counts((pred & y_bin).sum(axis=0), y_bin.sum(axis=0), pred.sum(axis=0), beta)
        rest = per_label.sum() - per_label[j]
        return (rest + fbeta_from_counts(tp_cum, y_j.sum(), k, beta)) / n_labels

    def predict(self, proba) -> np.ndarray:
        """0/1 predictions (rows x labels) at the fitted thresholds."""
        if not hasattr(self, "thresholds_"):
            raise UserError("This LabelThresholds instance is not fitted yet; call fit(y_true, proba) first.")
        return np.asarray(proba) >= self.thresholds_

    def score(self, y_true, proba) -> float:
        """F-beta of `predict(proba)` against y_true."""
        return fbeta_binary(np.asarray(y_true) >= 0.5, self.predict(proba), self.beta, self.average)


def cross_val_thresholds(y_true, proba, folds, beta: float = 2.0, average: str = "samples") -> dict:
    """Honest F-beta of per-label and global thresholds: fit on folds != f, predict fold f.

    Returns {"pred": pooled 0/1 predictions with per-label thresholds,
    "global_pred": the same with one global threshold, "score", "global_score",
    "thresholds": per-fold threshold vectors}.
    """
    y_bin, proba = _validate(y_true, proba, beta, average)
    folds = np.asarray(folds)
    pred = np.zeros(proba.shape, dtype=bool)
    global_pred = np.zeros(proba.shape, dtype=bool)
    per_fold = {}
    for f in np.unique(folds):
        train, held = folds != f, folds == f
        est = LabelThresholds(beta, average).fit(y_bin[train], proba[train])
        pred[held] = est.predict(proba[held])
        global_pred[held] = proba[held] >= est.global_threshold_
        per_fold[f.item()] = est.thresholds_.tolist()
    return {
        "pred": pred,
        "global_pred": global_pred,
        "score": fbeta_binary(y_bin, pred, beta, average),
        "global_score": fbeta_binary(y_bin, global_pred, beta, average),
        "thresholds": per_fold,
    }
