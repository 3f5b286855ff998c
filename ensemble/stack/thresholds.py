"""Per-label decision thresholds that maximise F-beta (multilabel), in plain numpy.

`LabelThresholds.fit` starts from the best single global threshold and runs
greedy coordinate ascent over the labels: for one label, with every other
label's predictions held fixed, it finds the exactly best threshold, then moves
on, round and round, until every label has been searched since the last move
(the last mover itself needs no second look: its search leaves it out). So the
result is never worse than the best global threshold, and no single label can
improve it.

Both searches solve one problem: cells with scores and weights (a cell's change
in the summed F when the threshold drops past it); the best threshold t
maximises the sum of the weights of the cells with score >= t, over the t that
fall between two distinct scores (ties are never split). `_CutSearch` solves it
without sorting the cells: it cuts the score axis into buckets (a monotone
function of the score, so a tie never straddles two), sums the weights per
bucket with np.bincount and gets every bucket boundary's value from a cumulative
sum. No cut inside a bucket can beat the value above it plus the bucket's
positive weights, so only the few buckets whose bound reaches the best boundary
are sorted and scanned. Cuts within a rounding tolerance of the best are ties,
won by the highest threshold.

The weights:

- Global search: a cell's weight follows from its rank and cumulative true
  positives within its group (the image for samples-averaging, the label for
  macro, everything for micro), so only the groups are sorted. For Planet's
  mean per-image F2 that is 40k sorts of 17 scores (packed with the truth into
  integer keys), not one sort of 688k cells. Within a tie block the ranks may
  follow any order: a group's changes over the whole block telescope.
- Per-label search, samples-averaging: an image's weight is F_i(label on) -
  F_i(label off), from its counts with the label left out. The counts
  (n_true, tp, n_pred) are small integers, kept as one integer code per image,
  and F is read from a table over all codes (`_FTable`) instead of computed.
- Per-label search, micro and macro: the label's rows in score order (sorted
  once), weighted from the label's cumulative true positives.

Predictions are `proba >= threshold`; F-beta counts 0/0 as 0 like scikit-learn.
"""

from __future__ import annotations

import numpy as np

from ensemble.errors import UserError
from ensemble.metrics import AVERAGES, fbeta_binary, fbeta_from_counts

_TOL = 1e-12  # a label moves only when the score improves by more than rounding; closer cuts are ties
_MAX_PASSES = 100  # coordinate ascent converges in a few passes; this only bounds a pathological case
_CELLS_PER_BUCKET = 8  # _CutSearch's bucket size on average
_MAX_BUCKETS = 1 << 16
_MAX_TABLE = 1 << 20  # _FTable's most entries


def best_global_threshold(y_true, proba, beta: float = 2.0, average: str = "samples") -> tuple[float, float]:
    """The single threshold for all labels that maximises F-beta, found exactly; returns (threshold, score)."""
    y_bin, proba = _validate(y_true, proba, beta, average)
    return _global_search(y_bin, proba, beta, average)


def _global_search(y_bin, proba, beta, average, ranked=None) -> tuple[float, float]:
    """best_global_threshold on checked inputs: each cell's weight from its group's counts, then one cut search.

    Lowering the threshold past a cell switches it on, which changes its group's F by an amount known
    from that group's counts at that moment: the cell's rank and cumulative true positives within
    the group, from a sort of the group alone. `ranked`: `_rank_labels`' result, where the caller
    has it (micro and macro)."""
    n, m = proba.shape
    if average == "samples":  # groups are images
        scores, gains = _image_gains(y_bin, proba, beta)
        threshold, total = _CutSearch(scores.ravel()).best(gains.ravel(), _TOL * n)
        return threshold, total / n
    scores, hits = _rank_labels(proba.T, y_bin.T) if ranked is None else ranked  # groups are labels (macro)
    if average == "micro":  # one group: merge the labels' sorted runs (a stable sort finds and merges them)
        order = np.argsort(-scores.ravel(), kind="stable")
        scores, hits = scores.ravel()[order][None], hits.ravel()[order][None]
    tp = np.cumsum(hits, axis=1)
    n_true = hits.sum(axis=1, keepdims=True)
    rank = np.arange(1, scores.shape[1] + 1)
    gains = fbeta_from_counts(tp, n_true, rank, beta) - fbeta_from_counts(tp - hits, n_true, rank - 1, beta)
    threshold, total = _CutSearch(scores.ravel()).best(gains.ravel(), _TOL * len(scores))
    return threshold, total / len(scores)


def _image_gains(y_bin, proba, beta) -> tuple[np.ndarray, np.ndarray]:
    """Samples-averaging: each image's scores, best first, and each one's change in the image's F.

    An image's counts with its top k scores on are the code of its (n_true, 0, 0) plus the steps of
    those k cells; F of each prefix, differenced along the row, gives each cell's change."""
    m = proba.shape[1]
    scores, step = _sort_rows(proba, y_bin)
    step *= m + 1  # a cell switched on adds 1 to n_pred and, if true, 1 to tp (`_FTable.code`)
    step += 1
    on = np.cumsum(step, axis=1, out=step)  # tp and n_pred's part of the code
    n_true = (on[:, -1] - m) // (m + 1)
    f = _FTable(beta, int(n_true.max()), m)
    on += f.code(n_true, 0, 0)[:, None]
    f_on = f(on)
    gains = np.empty_like(f_on)
    gains[:, 0] = f_on[:, 0]  # F with nothing on is 0
    np.subtract(f_on[:, 1:], f_on[:, :-1], out=gains[:, 1:])
    return scores, gains


def _sort_rows(proba, y_bin) -> tuple[np.ndarray, np.ndarray]:
    """Each row's scores, best first, and its 0/1 truth in the same order as integers (ties in any order).

    Scores in [0, 2) (probabilities) sort as their bit patterns, shifted left one place to carry
    the truth in the lowest bit, and complemented to sort best first: one sort of integers."""
    bits = proba.view(np.uint64)
    if bits.max() < np.uint64(1 << 62):  # sign bit and the exponent's top bit clear
        keys = bits << np.uint64(1)
        keys |= y_bin
        np.invert(keys, out=keys)
        keys.sort(axis=1)
        np.invert(keys, out=keys)
        scores = (keys >> np.uint64(1)).view(np.float64)
        keys &= np.uint64(1)
        return scores, keys.view(np.intp)
    order = np.argsort(-proba, axis=1)
    return np.take_along_axis(proba, order, axis=1), np.take_along_axis(y_bin, order, axis=1).astype(np.intp)


def _rank_labels(columns, y_cols) -> tuple[np.ndarray, np.ndarray]:
    """Each label's scores, best first, and their 0/1 truth in the same order (labels x rows)."""
    order = np.argsort(-columns, axis=1)
    return np.take_along_axis(columns, order, axis=1), np.take_along_axis(y_cols, order, axis=1)


class _CutSearch:
    """The best cut of fixed scores for any weights: max over t of weights[scores >= t].sum(), exactly.

    The score axis is cut into `n_buckets` buckets numbered from the top; a score's bucket is a
    monotone function of it (the floor of an affine map), so a bucket boundary never splits a tie.
    `slot` holds twice each score's bucket."""

    def __init__(self, scores: np.ndarray):
        self.scores = scores
        self.top, self.bottom = scores.max(), scores.min()
        self.n_buckets = int(min(max(len(scores) // _CELLS_PER_BUCKET, 1), _MAX_BUCKETS))
        span = float(self.top) - float(self.bottom)
        scale = (2 * self.n_buckets - 1) / span if span > 0 else 0.0  # below 2 x n_buckets after rounding
        if 0 < scale < np.inf:  # else one bucket: all scores equal, or too far apart or too close to scale
            at = np.subtract(self.top, scores)
            at *= scale
            self.slot = at.astype(np.intp)  # 2 x bucket: bincount's key, + 1 for a positive weight
            self.slot &= -2
        else:
            self.slot = np.zeros(len(scores), dtype=np.intp)

    def best(self, weights: np.ndarray, tol: float) -> tuple[float, float]:
        """(threshold, value) of the best cut; the empty cut (value 0) counts. Values within tol of the
        best are ties, won by the highest threshold."""
        split = np.bincount(self.slot + (weights > 0), weights, 2 * self.n_buckets)
        neg, pos = split[0::2], split[1::2]
        ends = np.cumsum(neg + pos)  # value with buckets 0..b on
        starts = np.concatenate(([0.0], ends[:-1]))
        best_end = max(ends.max(), 0.0)
        # a bucket's inner cuts reach at most its start plus its positive weights; keep the buckets that
        # could tie the best boundary, with room for the rounding of these sums
        rounding = 4 * np.finfo(float).eps * (len(weights) + self.n_buckets) * (pos.sum() - neg.sum())
        keep = starts + pos >= best_end - tol - rounding
        inside = np.flatnonzero(np.repeat(keep, 2)[self.slot])  # the cells in kept buckets
        inside = inside[np.argsort(-self.scores[inside])]  # the candidate buckets, each in score order
        slot, score, cum = self.slot[inside], self.scores[inside], np.cumsum(weights[inside])
        first = np.diff(slot, prepend=-2) != 0  # each candidate bucket's top cell
        offset = starts[slot[first] // 2] - (cum - weights[inside])[first]
        values = cum + offset[np.cumsum(first) - 1]  # value with the bucket on down to this cell
        inner = np.zeros(len(inside), dtype=bool)  # the next cell is in the same bucket, with a lower score
        inner[:-1] = ~first[1:] & (score[1:] < score[:-1])
        values[~inner] = -np.inf
        best = max(best_end, values.max(initial=-np.inf))
        near = best - tol
        if 0.0 >= near:
            return float(np.nextafter(max(self.top, 1.0), np.inf)), 0.0
        b = int(np.argmax(ends >= near)) if best_end >= near else self.n_buckets
        if values.max(initial=-np.inf) >= near:
            i = int(np.argmax(values >= near))
            if slot[i] <= 2 * b:  # an inner cut of bucket b or above comes before boundary b
                return _midpoint(score[i], score[i + 1]), float(values[i])
        below = np.where(self.slot > 2 * b, self.scores, -np.inf).max()  # (where= reductions are slow)
        if below == -np.inf:
            return float(min(self.bottom, 0.0)), float(ends[b])
        return _midpoint(self.scores[self.slot == 2 * b].min(), below), float(ends[b])  # bucket b is not empty


class _FTable:
    """F-beta of small integer counts, looked up by a code for (n_true, tp, n_pred).

    Holds fbeta_from_counts' values; one that would be too large is not built, and codes are then
    decoded and F computed."""

    def __init__(self, beta: float, max_true: int, max_pred: int):
        self.beta = beta
        self.shape = (max_true + 1, max_true + 1, max_pred + 1)
        size = self.shape[0] * self.shape[1] * self.shape[2]
        self.table = self.decoded(np.arange(size)) if size <= _MAX_TABLE else None

    def code(self, n_true, tp, n_pred):
        """The counts' code: n_pred in the units, tp in steps of max_pred + 1, n_true above both."""
        return (n_true * self.shape[1] + tp) * self.shape[2] + n_pred

    def decoded(self, code):
        n_true, rest = np.divmod(code, self.shape[1] * self.shape[2])
        tp, n_pred = np.divmod(rest, self.shape[2])
        return fbeta_from_counts(tp, n_true, n_pred, self.beta)

    def __call__(self, code):
        return self.decoded(code) if self.table is None else np.take(self.table, code)


def _midpoint(hi: float, lo: float) -> float:
    """A threshold t with lo < t <= hi: the midpoint where it lies strictly above lo."""
    mid = (hi + lo) / 2
    return float(mid if lo < mid <= hi else hi)


def _validate(y_true, proba, beta, average) -> tuple[np.ndarray, np.ndarray]:
    if average not in AVERAGES:
        raise UserError(f"The 'average' parameter must be one of {list(AVERAGES)}. Got {average!r} instead.")
    if not beta > 0:
        raise UserError(f"The 'beta' parameter must be > 0. Got {beta!r} instead.")
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or y_true.shape != proba.shape or proba.size == 0:
        raise UserError(f"y_true and proba must be non-empty rows x labels of one shape; got {y_true.shape} and {proba.shape}.")
    if not (np.isfinite(proba.min()) and np.isfinite(proba.max())):  # NaN propagates
        raise UserError("proba holds NaN or inf; thresholds need finite scores.")
    return y_true >= 0.5, proba


class _ImageGains:
    """Samples-averaging: each image's counts as an `_FTable` code, updated one label at a time.

    `on` and `step` are labels x rows: the predictions, and the code's change when the label goes on."""

    def __init__(self, y_cols: np.ndarray, on: np.ndarray, beta: float):
        n_true = y_cols.sum(axis=0)
        self.f = _FTable(beta, int(n_true.max()), len(y_cols))
        self.on = on
        width = self.f.shape[2]  # tp's unit in a code
        self.step = y_cols * np.min_scalar_type(width + 1).type(width)  # one byte each, up to 254 labels
        self.step += 1
        self.code = self.f.code(n_true, (on & y_cols).sum(axis=0), on.sum(axis=0))
        self.f_now = self.f(self.code)

    def gains(self, j: int) -> tuple[np.ndarray, float]:
        """Each image's change in F when label j goes from off to on, every other label as it is; and
        their total over the images where label j is on now."""
        off = self.code - self.step[j] * self.on[j]
        f_off = self.f(off)
        off += self.step[j]
        return self.f(off) - f_off, float(self.f_now.sum() - f_off.sum())

    def set_label(self, j: int, new: np.ndarray) -> None:
        self.code += self.step[j] * (new.astype(np.intp) - self.on[j])
        self.on[j] = new
        self.f_now = self.f(self.code)

    def score(self) -> float:
        return float(self.f_now.mean())


class _RankedGains:
    """Micro and macro: per-label counts; a label's rows weighted in score order (`hits`: their truth)."""

    def __init__(self, y_cols: np.ndarray, on: np.ndarray, beta: float, average: str, hits: np.ndarray):
        self.y, self.beta, self.average, self.hits = y_cols, beta, average, hits
        self.tp, self.pred, self.true = (on & y_cols).sum(axis=1), on.sum(axis=1), y_cols.sum(axis=1)

    def gains(self, j: int) -> tuple[np.ndarray, float]:
        """The change in F as label j's k-th row in score order goes on; and their total over the rows on now."""
        k = np.arange(self.hits.shape[1] + 1)
        tp = np.r_[0, np.cumsum(self.hits[j])]
        if self.average == "micro":
            rest_tp, rest_pred = self.tp.sum() - self.tp[j], self.pred.sum() - self.pred[j]
            totals = fbeta_from_counts(rest_tp + tp, self.true.sum(), rest_pred + k, self.beta)
        else:
            totals = fbeta_from_counts(tp, self.true[j], k, self.beta)
        return np.diff(totals), float(totals[self.pred[j]] - totals[0])

    def set_label(self, j: int, new: np.ndarray) -> None:
        self.tp[j], self.pred[j] = np.count_nonzero(new & self.y[j]), np.count_nonzero(new)

    def score(self) -> float:
        """F-beta of the current predictions (fbeta_binary's, from the counts)."""
        if self.average == "macro":
            return float(fbeta_from_counts(self.tp, self.true, self.pred, self.beta).mean())
        return float(fbeta_from_counts(self.tp.sum(), self.true.sum(), self.pred.sum(), self.beta))


class LabelThresholds:
    """Per-label thresholds maximising F-beta by coordinate ascent with an exact per-label search.

    Args:
        beta: F-beta's beta (2 = recall weighs 4x precision, the Planet metric).
        average: "samples" (mean of per-image F), "micro" or "macro".

    Fitted attributes: `thresholds_` (one per label), `score_` (in-sample F),
    `global_threshold_` and `global_score_` (the best single threshold, the
    starting point), `trajectory_` (the starting score, then the score after
    each pass over the labels), `n_passes_`. The last pass stops as soon as
    every label has been searched since the last move, part-way or at its end.
    """

    def __init__(self, beta: float = 2.0, average: str = "samples"):
        self.beta = beta
        self.average = average

    def fit(self, y_true, proba) -> "LabelThresholds":
        y_bin, proba = _validate(y_true, proba, self.beta, self.average)
        n, m = proba.shape
        columns, y_cols = np.ascontiguousarray(proba.T), np.ascontiguousarray(y_bin.T)
        if self.average == "samples":  # each label's rows in their own order
            self.global_threshold_, self.global_score_ = _global_search(y_bin, proba, self.beta, self.average)
            on = columns >= self.global_threshold_
            counts = _ImageGains(y_cols, on, self.beta)
            searches = [_CutSearch(col) for col in columns]
        else:  # each label's rows in score order
            ranked = _rank_labels(columns, y_cols)
            self.global_threshold_, self.global_score_ = _global_search(y_bin, proba, self.beta, self.average, ranked)
            on = columns >= self.global_threshold_
            counts = _RankedGains(y_cols, on, self.beta, self.average, ranked[1])
            searches = [_CutSearch(scores) for scores in ranked[0]]
        thresholds = np.full(m, self.global_threshold_)
        tol = _TOL * {"samples": n, "macro": m, "micro": 1}[self.average]
        self.trajectory_ = [counts.score()]
        settled = 0  # labels searched in a row without moving; all of them: no label can move
        while settled < m and len(self.trajectory_) <= _MAX_PASSES:
            for j, search in enumerate(searches):
                gains, current = counts.gains(j)
                threshold, best = search.best(gains, tol)
                if best > current + tol:
                    thresholds[j] = threshold
                    counts.set_label(j, columns[j] >= threshold)
                    settled = 1  # label j is at its best: its gains leave it out, only others' moves change them
                else:
                    settled += 1
                if settled == m:
                    break
            self.trajectory_.append(counts.score())
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
