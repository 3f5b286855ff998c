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
    """The single threshold for all labels that maximises F-beta, found exactly; returns (threshold, score)."""
    y_bin, proba = _validate(y_true, proba, beta, average)
    return _global_search(y_bin, proba, beta, average, _sorted_cells(proba))


def _sorted_cells(proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every cell's flat index, best first; each label's rows, best first: rows x labels) from one sort.

    Ties may come in any order: only cuts between distinct scores are ever taken (`_valid_cuts`),
    and every score below sums over whole tie blocks. The labels' orders are the global order
    grouped by label, a stable sort of small integers (numpy's radix sort)."""
    n, m = proba.shape
    order = np.argsort(-proba.ravel())
    label = (order % m).astype(np.int16 if m < 2 ** 15 else np.int64)
    by_label = order[np.argsort(label, kind="stable")] // m
    return order, by_label.reshape(m, n).T


def _global_search(y_bin, proba, beta, average, cells) -> tuple[float, float]:
    """best_global_threshold on checked inputs and `_sorted_cells(proba)`.

    Lowering the threshold past a cell switches it on, which changes one group's F (the cell's
    image for samples, its label for macro, everything for micro) by an amount known from that
    group's counts at that moment: its rank and cumulative true positives within the group (a
    row's sort for samples, the label orders for macro). A cumulative sum over the global order
    then scores every cut. Within a tie block the ranks may follow another order than the global
    one, but a group's changes over a whole block telescope to the same sum."""
    order, by_label = cells
    scores = proba.ravel()[order]
    if average == "micro":
        hits = y_bin.ravel()[order]
        tp = np.cumsum(hits)
        rank = np.arange(1, len(order) + 1)
        n_true = y_bin.sum()
        delta = fbeta_from_counts(tp, n_true, rank, beta) - fbeta_from_counts(tp - hits, n_true, rank - 1, beta)
        n_groups = 1
    else:
        axis = 1 if average == "samples" else 0
        within = np.argsort(-proba, axis=1) if axis == 1 else by_label
        size = proba.shape[axis]
        ranks = np.arange(1, size + 1).reshape((1, size) if axis == 1 else (size, 1))
        rank = np.empty(proba.shape, dtype=np.int64)
        np.put_along_axis(rank, within, np.broadcast_to(ranks, proba.shape), axis=axis)
        tp = np.empty(proba.shape, dtype=np.int64)
        np.put_along_axis(tp, within, np.cumsum(np.take_along_axis(y_bin, within, axis=axis), axis=axis), axis=axis)
        n_true = y_bin.sum(axis=axis, keepdims=True)
        delta = (fbeta_from_counts(tp, n_true, rank, beta)
                 - fbeta_from_counts(tp - y_bin, n_true, rank - 1, beta)).ravel()[order]
        n_groups = proba.shape[1 - axis]
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


class _Counts:
    """Per-image and per-label counts of the current predictions, updated one label at a time."""

    def __init__(self, y_bin: np.ndarray, pred: np.ndarray):
        self.y, self.pred = y_bin, pred  # pred is updated in place
        hit = pred & y_bin
        self.tp_row, self.pred_row, self.true_row = hit.sum(axis=1), pred.sum(axis=1), y_bin.sum(axis=1)
        self.tp_col, self.pred_col, self.true_col = hit.sum(axis=0), pred.sum(axis=0), y_bin.sum(axis=0)

    def set_label(self, j: int, new: np.ndarray) -> None:
        d_pred = new.astype(np.int64) - self.pred[:, j]
        d_tp = d_pred * self.y[:, j]
        self.tp_row += d_tp
        self.pred_row += d_pred
        self.tp_col[j] += d_tp.sum()
        self.pred_col[j] += d_pred.sum()
        self.pred[:, j] = new

    def score(self, beta: float, average: str) -> float:
        """F-beta of the current predictions (fbeta_binary's, from the counts)."""
        if average == "samples":
            return float(fbeta_from_counts(self.tp_row, self.true_row, self.pred_row, beta).mean())
        if average == "macro":
            return float(fbeta_from_counts(self.tp_col, self.true_col, self.pred_col, beta).mean())
        return float(fbeta_from_counts(self.tp_col.sum(), self.true_col.sum(), self.pred_col.sum(), beta))

    def label_totals(self, j: int, order: np.ndarray, beta: float, average: str) -> np.ndarray:
        """Score for k = 0..n: label j on for its top-k rows, every other label as it is."""
        y_j, on_j = self.y[:, j], self.pred[:, j]
        n = len(y_j)
        if average == "samples":
            tp_rest = self.tp_row - (on_j & y_j)
            pred_rest = self.pred_row - on_j
            f_off = fbeta_from_counts(tp_rest, self.true_row, pred_rest, beta)
            gain = fbeta_from_counts(tp_rest + y_j, self.true_row, pred_rest + 1, beta) - f_off
            return (f_off.sum() + np.r_[0.0, np.cumsum(gain[order])]) / n
        tp_cum = np.r_[0, np.cumsum(y_j[order])]
        k = np.arange(n + 1)
        if average == "micro":
            tp_rest = self.tp_col.sum() - self.tp_col[j]
            pred_rest = self.pred_col.sum() - self.pred_col[j]
            return fbeta_from_counts(tp_rest + tp_cum, self.true_col.sum(), pred_rest + k, beta)
        per_label = fbeta_from_counts(self.tp_col, self.true_col, self.pred_col, beta)
        rest = per_label.sum() - per_label[j]
        return (rest + fbeta_from_counts(tp_cum, self.true_col[j], k, beta)) / len(per_label)


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
        cells = _sorted_cells(proba)  # the one sort: the global search's order, and each label's
        self.global_threshold_, self.global_score_ = _global_search(y_bin, proba, self.beta, self.average, cells)
        thresholds = np.full(proba.shape[1], self.global_threshold_)
        pred = proba >= thresholds
        orders = cells[1]
        sorted_desc = np.take_along_axis(proba, orders, axis=0)
        invalid = np.zeros((len(proba) + 1, proba.shape[1]), dtype=bool)  # cuts that would split a tie
        invalid[1:-1] = sorted_desc[:-1] == sorted_desc[1:]
        counts = _Counts(y_bin, pred)
        self.trajectory_ = [counts.score(self.beta, self.average)]
        for _ in range(_MAX_PASSES):
            moved = False
            for j in range(proba.shape[1]):
                totals = counts.label_totals(j, orders[:, j], self.beta, self.average)
                totals[invalid[:, j]] = -np.inf
                k, current = int(np.argmax(totals)), int(counts.pred_col[j])
                if totals[k] > totals[current] + _TOL:
                    thresholds[j] = _cut_threshold(sorted_desc[:, j], k)
                    counts.set_label(j, proba[:, j] >= thresholds[j])
                    moved = True
            self.trajectory_.append(counts.score(self.beta, self.average))
            if not moved:
                break
        self.thresholds_ = thresholds
        self.score_ = self.trajectory_[-1]
        self.n_passes_ = len(self.trajectory_) - 1
        return self

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
