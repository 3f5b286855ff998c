"""Greedy ensemble selection (Caruana et al., 2004) in plain numpy.

Forward selection with replacement: start from the best `init_size` models,
then at each iteration add the one model (possibly already chosen) whose
addition gives the best ensemble score; the ensemble is the average of the
picks, so integer pick counts become weights. The kept ensemble is the best
prefix of the picks (the first best score on the trajectory), so in-sample it
is never worse than the best single model. Optional bagging (Caruana's
"bagged selection") runs the selection on random subsets of the models and
sums the bags' picks step by step, keeping the best step of the sum; it damps
overfitting when there are many models (with a handful, a bag may hold only
weak ones, and the best-single guarantee no longer holds).

Every candidate of an iteration is scored at once, vectorised over models:
for multiclass log loss only the entries where y_true > 0 matter (one per row
for hard labels; compared in float32, whose error is far below any difference
that matters), for accuracy the true class against the row maximum (exact
argmax semantics); other metrics (F-beta, mAP) fall back to one metric call
per candidate. Ties go to the lowest model index. The scores on the
trajectory are always the exact (float64) metric of the ensemble.

Selection is fitted on the OOF predictions it is scored on, so its in-sample
score is optimistic; `cross_val_predict` gives the honest one (select on k-1
folds, predict the held-out fold).
"""

from __future__ import annotations

import numpy as np

from ensemble.errors import UserError
from ensemble.metrics import EPS, TASKS, Metric, get_metric

_CHUNK_CELLS = 1 << 19  # cells per vectorised block: big enough for numpy, small enough for the cache


class GreedySelection:
    """Caruana-style forward selection with replacement over models' probabilities.

    Args:
        metric: a name from `ensemble.metrics.METRICS` or a `Metric`.
        task: "multiclass" or "multilabel".
        iterations: forward steps after the initial models.
        init_size: how many of the best single models start the ensemble.
        bagging: 0 for plain selection, else the number of random model subsets.
        bag_fraction: share of the models in each bag.
        random_state: seed for the bags.

    Fitted attributes (one row per bag; a single row without bagging):
        indices_: model index picked at each step (init picks first).
        trajectory_: score after each step (with bagging: of all bags' picks so far, summed).
        best_step_: the first step with the best score; the picks up to it are kept.
        counts_, weights_: picks per model up to best_step_, and counts_ / counts_.sum().
        score_: the score of the weighted ensemble on the data it was fitted on.
    """

    def __init__(self, metric: str | Metric = "log_loss", task: str = "multiclass", iterations: int = 50,
                 init_size: int = 1, bagging: int = 0, bag_fraction: float = 0.5, random_state: int = 0):
        self.metric = metric
        self.task = task
        self.iterations = iterations
        self.init_size = init_size
        self.bagging = bagging
        self.bag_fraction = bag_fraction
        self.random_state = random_state

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in
                ("metric", "task", "iterations", "init_size", "bagging", "bag_fraction", "random_state")}

    def _validate(self, proba, y_true) -> tuple[np.ndarray, np.ndarray]:
        self.metric_ = self.metric if isinstance(self.metric, Metric) else get_metric(self.metric)
        if self.task not in TASKS:
            raise UserError(f"The 'task' parameter of GreedySelection must be one of {list(TASKS)}. Got {self.task!r} instead.")
        for name, low in (("iterations", 0), ("init_size", 1), ("bagging", 0)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < low:
                raise UserError(f"The '{name}' parameter of GreedySelection must be an int >= {low}. Got {value!r} instead.")
        if not 0 < self.bag_fraction <= 1:
            raise UserError(f"The 'bag_fraction' parameter of GreedySelection must be in (0, 1]. Got {self.bag_fraction!r} instead.")
        proba = np.asarray(proba)
        if proba.dtype not in (np.float32, np.float64):
            proba = proba.astype(np.float64)
        y_true = np.asarray(y_true, dtype=np.float64)
        if proba.ndim != 3 or y_true.ndim != 2 or proba.shape[1:] != y_true.shape:
            raise UserError("GreedySelection.fit needs proba of shape (models, rows, classes) and y_true (rows, classes); "
                            f"got {proba.shape} and {y_true.shape}.")
        if self.init_size > proba.shape[0]:
            raise UserError(f"The 'init_size' parameter of GreedySelection must be <= the number of models "
                            f"({proba.shape[0]}). Got {self.init_size} instead.")
        if not np.isfinite(proba).all():
            raise UserError("GreedySelection.fit: proba holds NaN or inf.")
        return proba, y_true

    def fit(self, proba, y_true) -> "GreedySelection":
        """Select from `proba` (models x rows x classes) against `y_true` (rows x classes)."""
        proba, y_true = self._validate(proba, y_true)
        n_models = proba.shape[0]
        scorer = _make_scorer(self.metric_, self.task, proba, y_true)
        if self.bagging == 0:
            bags = [np.arange(n_models)]
        else:
            rng = np.random.default_rng(self.random_state)
            size = max(self.init_size, int(round(self.bag_fraction * n_models)))
            bags = [np.sort(rng.choice(n_models, size=size, replace=False)) for _ in range(self.bagging)]
        picks, trajectories = zip(*(self._hillclimb(scorer, proba, y_true, bag) for bag in bags))
        self.indices_ = np.array(picks)
        if len(bags) == 1:
            self.trajectory_ = list(trajectories[0])
        else:  # the ensemble is the bags summed: score that after each step
            self.trajectory_ = [self._score_counts(proba, y_true, self.indices_[:, : t + 1].ravel())
                                for t in range(self.indices_.shape[1])]
        self.best_step_ = int(np.argmin(self.metric_.sign() * np.asarray(self.trajectory_)))  # first best
        self.counts_ = np.bincount(self.indices_[:, : self.best_step_ + 1].ravel(), minlength=n_models)
        self.weights_ = self.counts_ / self.counts_.sum()
        self.score_ = self.metric_(y_true, self.predict(proba), self.task)
        return self

    def _hillclimb(self, scorer, proba, y_true, bag) -> tuple[list[int], list[float]]:
        """Picks and the exact score after each pick, within the models of `bag`."""
        total = np.zeros(proba.shape[1:], dtype=np.float64)
        single = self.metric_.sign() * scorer(total, 0, bag)
        picks = [int(i) for i in bag[np.argsort(single, kind="stable")[: self.init_size]]]
        for i in picks:
            total += proba[i]
        trajectory = [self._score_counts(proba, y_true, picks[: s + 1]) for s in range(len(picks))]
        for _ in range(self.iterations):
            scores = self.metric_.sign() * scorer(total, len(picks), bag)
            best = int(bag[int(np.argmin(scores))])  # argmin takes the first: the lowest index wins ties
            picks.append(best)
            total += proba[best]
            trajectory.append(float(self.metric_(y_true, total / len(picks), self.task)))
        return picks, trajectory

    def _score_counts(self, proba, y_true, picks) -> float:
        used, counts = np.unique(np.asarray(picks), return_counts=True)
        return float(self.metric_(y_true, np.tensordot(counts / counts.sum(), proba[used], axes=1), self.task))

    def predict(self, proba) -> np.ndarray:
        """The weighted average of `proba` (models x rows x classes) with the fitted weights."""
        if not hasattr(self, "weights_"):
            raise UserError("This GreedySelection instance is not fitted yet; call fit(proba, y_true) first.")
        proba = np.asarray(proba)
        if proba.ndim != 3 or proba.shape[0] != len(self.weights_):
            raise UserError(f"predict needs proba of shape ({len(self.weights_)}, rows, classes); got {proba.shape}.")
        out = np.zeros(proba.shape[1:], dtype=np.float64)
        for i in np.flatnonzero(self.weights_):  # the few models kept, without copying the others
            out += self.weights_[i] * proba[i]
        return out


# ------------------------------------------------------------------ vectorised candidate scorers
# A scorer(total, n_picks, models) returns the metric of (total + proba[m]) / (n_picks + 1)
# for every m in `models`, as an array.


def _chunks(models: np.ndarray, cells_per_model: int):
    """(where in the output, which models) blocks; a slice when the models are consecutive (a view, not a copy)."""
    step = max(1, _CHUNK_CELLS // max(1, cells_per_model))
    consecutive = len(models) > 0 and models[-1] - models[0] + 1 == len(models)
    for a in range(0, len(models), step):
        block = models[a: a + step]
        yield slice(a, a + step), (slice(int(block[0]), int(block[-1]) + 1) if consecutive else block)


def _make_scorer(metric: Metric, task: str, proba: np.ndarray, y_true: np.ndarray):
    base = metric.name
    if base == "log_loss" and task == "multiclass":
        return _multiclass_log_loss(proba, y_true)
    if base == "log_loss":
        return _multilabel_log_loss(proba, y_true)
    if base == "accuracy" and task == "multiclass":
        return _multiclass_accuracy(proba, y_true)
    return _generic(metric, task, proba, y_true)


def _multiclass_log_loss(proba, y_true):
    # Cross-entropy only reads the cells where y_true > 0: gather them once (one per row for hard labels).
    # Candidates are compared in float32: the log is the whole cost and runs 2.5x faster, and float32's
    # 6e-8 relative error is far below any score difference that matters. Reported scores are exact.
    rows, cols = np.nonzero(y_true > 0)
    dtype = np.dtype(np.float32)
    weight = (y_true[rows, cols] / len(y_true)).astype(dtype)
    uniform = np.all(weight == weight[0])  # hard labels: a plain mean
    weight_total = float(weight.sum(dtype=np.float64))  # 1 when y_true rows sum to 1
    n_models, n_rows, n_classes = proba.shape
    # Row-major: numpy's gather comes out column-major, and a block of models would be a strided read.
    gathered = np.ascontiguousarray(proba.reshape(n_models, -1)[:, rows * n_classes + cols], dtype=dtype)
    row_sums = proba @ np.ones(n_classes, proba.dtype)  # 5x a sum over the short last axis
    # Kaggle renormalises rows; skip the division when every row already sums to 1 (< 1e-6 effect).
    renorm = np.ascontiguousarray(row_sums[:, rows], dtype=dtype) if np.abs(row_sums - 1).max() > 1e-6 else None

    buffer = np.empty(_CHUNK_CELLS + len(rows), dtype=dtype)  # one block's cells, reused: no page faults

    def score(total, n_picks, models):
        out = np.empty(len(models))
        t_cells = total[rows, cols].astype(dtype)
        t_sums = total.sum(axis=1)[rows].astype(dtype) if renorm is not None else None
        # log(sum / (n + 1)) = log(sum) - log(n + 1): skip the division, clip at eps * (n + 1).
        # Only the lower clip matters: values near 1 change the loss by < 1e-15.
        scale = 1.0 if renorm is not None else n_picks + 1.0
        floor = dtype.type(EPS * scale)
        for where, idx in _chunks(models, len(rows)):
            block = gathered[idx]
            v = buffer[: block.size].reshape(block.shape)
            np.add(t_cells, block, out=v)
            if renorm is not None:
                v /= t_sums + renorm[idx]
            if v.min() < floor:  # rare: a candidate that gives a true class (almost) nothing
                np.maximum(v, floor, out=v)
            np.log(v, out=v)
            mean_log = np.einsum("ij->i", v, dtype=np.float64) * weight[0] if uniform else \
                np.einsum("ij,j->i", v, weight, dtype=np.float64)  # summed in float64 either way
            out[where] = np.log(scale) * weight_total - mean_log
        return out

    return score


def _multilabel_log_loss(proba, y_true):
    positive = y_true >= 0.5
    hard = np.array_equal(y_true, positive)
    denom = y_true.size

    def score(total, n_picks, models):
        out = np.empty(len(models))
        for where, idx in _chunks(models, y_true.size):
            v = (total + proba[idx]) / (n_picks + 1)
            np.clip(v, EPS, 1 - EPS, out=v)
            v = v.astype(np.float32)  # as for multiclass: compare in float32, report exactly
            if hard:  # one log per cell instead of two
                ll = np.log(np.where(positive, v, 1 - v)).sum(axis=(1, 2), dtype=np.float64)
            else:
                ll = (y_true * np.log(v) + (1 - y_true) * np.log1p(-v)).sum(axis=(1, 2), dtype=np.float64)
            out[where] = -ll / denom
        return out

    return score


def _multiclass_accuracy(proba, y_true):
    # np.argmax picks the first maximum, so a row is right iff its true class y beats every
    # class before y strictly and every class after y or equally. With rows grouped by y those
    # are two contiguous class ranges: one max each, no tie pass. Layout models x classes x rows
    # makes the max over classes an elementwise maximum of contiguous row vectors.
    label = y_true.argmax(axis=1)
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(y_true.shape[1] + 1))
    by_class = np.ascontiguousarray(proba[:, order].transpose(0, 2, 1))

    def score(total, n_picks, models):
        out = np.zeros(len(models))
        total_t = np.ascontiguousarray(total[order].T, dtype=proba.dtype)  # float32 input: float32 work
        for where, idx in _chunks(models, proba.shape[1] * proba.shape[2]):
            cand = total_t + by_class[idx]
            cand /= proba.dtype.type(n_picks + 1)  # as the metric sees the mean: dividing can merge or split ties
            hits = np.zeros(len(cand), dtype=np.int64)
            for y, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                if a == b:
                    continue
                val = cand[:, y, a:b]
                right = np.ones(val.shape, dtype=bool)
                if y > 0:
                    right &= val > cand[:, :y, a:b].max(axis=1)
                if y < cand.shape[1] - 1:
                    right &= val >= cand[:, y + 1:, a:b].max(axis=1)
                hits += right.sum(axis=1)
            out[where] = hits / len(label)
        return out

    return score


def _generic(metric, task, proba, y_true):
    def score(total, n_picks, models):
        return np.array([metric(y_true, (total + proba[m]) / (n_picks + 1), task) for m in models])

    return score


# ------------------------------------------------------------------ cross-validation


def cross_val_predict(selector: GreedySelection, proba, y_true, folds) -> tuple[np.ndarray, dict]:
    """Honest predictions: for each fold f, select on rows with fold != f and predict fold f.

    Returns the pooled held-out predictions (rows x classes) and {fold: weights}.
    """
    proba = np.asarray(proba)
    y_true = np.asarray(y_true, dtype=np.float64)
    folds = np.asarray(folds)
    pred = np.zeros(proba.shape[1:], dtype=np.float64)
    weights = {}
    for f in np.unique(folds):
        train, held = folds != f, folds == f
        est = GreedySelection(**selector.get_params()).fit(proba[:, train], y_true[train])
        pred[held] = est.predict(proba[:, held])
        weights[f.item()] = est.weights_
    return pred, weights
