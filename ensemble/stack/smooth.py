"""Neighbour smoothing of the stack's winner: near-duplicate images should get near-equal predictions.

The State Farm winners blended each test prediction with those of its nearest test images
(the frames of one driver are near-duplicates). After the stack has chosen its winner,
`neighbour_smoothing` tries the same on the winner's probabilities:

    p'_i = p_i + a * (m_i - p_i),   m_i = sum_j w_ij p_j / sum_j w_ij,   w_ij = max(cos(e_i, e_j), 0)

over the k most similar other rows j of the same set, by the embeddings of the best single
model that has them (`python -m ensemble.predict --embeddings`: emb/oof.npy, emb/test.npy).
The weights are the clipped cosines, not a softmax of them: a softmax needs a temperature,
one more thing to choose on few rows. A multiclass p' is a convex combination of rows that
sum to 1, so it sums to 1 too.

(k, a) come from the grid GRID_K x GRID_A, chosen under cross-validation without a leak:
a held-out row's neighbours are searched among its own fold's rows only (as a test row's are
among the test rows), so a row is never smoothed with a prediction made for another fold;
fold f's (k, a) is the best on the smoothed rows of the folds != f and is applied to fold f;
the cv_score is the metric over all rows of these fold-wise choices. The test set gets the
(k, a) best on all folds. Rows without an embedding (zero: an unreadable image, on_bad_image:
skip) are never neighbours and are left as they are, as are rows whose neighbours all have
cosine <= 0.

The search is the exact top-k of `ensemble.retrieve.search`. Plain numpy; no Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ensemble.errors import UserError
from ensemble.retrieve.search import l2_normalize, search

if TYPE_CHECKING:
    from ensemble.metrics import Metric
    from ensemble.run import Run
    from ensemble.stack.core import MethodResult
    from ensemble.stack.oof import StackData

GRID_K = (1, 2, 3, 5, 10)  # neighbours
GRID_A = (0.1, 0.25, 0.5, 0.75)  # weight of the neighbours' mean
NO_EMBEDDINGS = "note: no model has embeddings: run predict with --embeddings to try neighbour smoothing"


# ------------------------------------------------------------------ the algorithm (plain numpy)


def find_neighbours(emb: np.ndarray, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows of its own group, by cosine: (indices, weights), rows x k.

    Weights are max(cosine, 0). Missing neighbours (a small group, or a row without an
    embedding: zero or not finite, which is never anyone's neighbour either) are index -1, weight 0."""
    emb = np.asarray(emb, dtype=np.float32)
    groups = np.asarray(groups)
    index = np.full((len(emb), k), -1, dtype=np.int64)
    weight = np.zeros((len(emb), k))
    valid = np.isfinite(emb).all(axis=1) & emb.any(axis=1)
    for g in np.unique(groups):
        rows = np.flatnonzero((groups == g) & valid)
        if len(rows) < 2:
            continue
        unit = l2_normalize(emb[rows])  # stored float16: make them unit again
        sims, cols = search(unit, unit, k, exclude=np.arange(len(rows)), backend="auto")  # faiss when installed
        found = cols >= 0
        index[rows, :cols.shape[1]] = np.where(found, rows[np.maximum(cols, 0)], -1)
        weight[rows, :cols.shape[1]] = np.where(found, np.maximum(sims, 0), 0)
    return index, weight


def neighbour_mean(proba: np.ndarray, index: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """The weighted mean of each row's first k neighbours' rows of `proba`; a row whose weights
    sum to 0 (no neighbour) gets its own row, so smoothing leaves it exactly as it is."""
    num = np.zeros(proba.shape)
    for j in range(min(k, index.shape[1])):  # a column at a time: never rows x k x classes in memory
        num += weight[:, j, None] * proba[np.maximum(index[:, j], 0)]
    den = weight[:, :k].sum(axis=1)
    mean = np.array(proba, dtype=np.float64)
    has = den > 0
    mean[has] = num[has] / den[has, None]
    return mean


def smooth(proba: np.ndarray, mean: np.ndarray, a: float) -> np.ndarray:
    """(1 - a) p + a m, written so that a row with m == p stays bit-identical."""
    return proba + a * (mean - proba)


@dataclass
class SmoothingFit:
    """The cross-validated choice of (k, a) on one set of OOF probabilities."""

    grid: list  # [(k, a), ...] in the order ties are broken: smaller k, then smaller a first
    scores: np.ndarray  # grid x (folds + 1): column i the score on the folds != folds[i], the last on all rows
    folds: list  # the fold ids, in the columns' order
    fold_choice: dict  # fold -> (k, a), chosen on the other folds
    choice: tuple  # (k, a) chosen on all rows: what the test set gets
    cv_oof: np.ndarray  # fold f's rows smoothed with fold f's choice
    cv_score: float
    in_sample_score: float  # the best grid point on all rows


def cross_val_smoothing(y_true: np.ndarray, proba: np.ndarray, folds: np.ndarray, index: np.ndarray,
                        weight: np.ndarray, metric: Metric, task: str, ks=GRID_K, alphas=GRID_A) -> SmoothingFit:
    """Score every (k, a) on the rows of each fold's complement and on all rows; see the module docstring.

    `index`, `weight`: from `find_neighbours` with the folds as groups, so that fold f's smoothed
    rows depend on fold f's predictions only."""
    fold_ids = np.unique(folds).tolist()
    grid = [(k, a) for k in ks for a in alphas]
    scores = np.empty((len(grid), len(fold_ids) + 1))
    others = [folds != f for f in fold_ids]
    for i, (k, a) in enumerate(grid):
        if i == 0 or k != grid[i - 1][0]:
            mean = neighbour_mean(proba, index, weight, k)
        smoothed = smooth(proba, mean, a)
        scores[i, :-1] = [metric(y_true[rows], smoothed[rows], task) for rows in others]
        scores[i, -1] = metric(y_true, smoothed, task)
    lower = np.nan_to_num(metric.sign() * scores, nan=np.inf)  # a NaN score (e.g. no positive row) never wins
    best = np.argmin(lower, axis=0)  # the first best: grid order breaks ties
    cv_oof = np.array(proba, dtype=np.float64)
    for f, i in zip(fold_ids, best[:-1]):
        k, a = grid[i]
        rows = folds == f
        cv_oof[rows] = smooth(proba, neighbour_mean(proba, index, weight, k), a)[rows]
    return SmoothingFit(grid, scores, fold_ids, {f: grid[i] for f, i in zip(fold_ids, best[:-1])}, grid[best[-1]],
                        cv_oof, metric(y_true, cv_oof, task), float(scores[best[-1], -1]))


# ------------------------------------------------------------------ the stack's step


def neighbour_smoothing(data: StackData, winner: MethodResult, metric: Metric,
                        run: Run) -> tuple[MethodResult | None, dict[str, bytes], str]:
    """Smooth the winner's OOF and test probabilities with each row's nearest neighbours.

    Returns (the row for scores.csv, named "<winner>+smooth", or None when no model has
    embeddings; {"smoothing.json": bytes}; one line to print). The row's cv_score is honest
    (see the module docstring): use its test predictions as the submission only when that
    cv_score beats the winner's; report the row either way."""
    from ensemble.stack.core import MethodResult

    start = time.perf_counter()
    found = _best_embeddings(data, metric, run)
    if found is None:
        return None, {}, NO_EMBEDDINGS
    model_id, oof_emb, test_emb = found
    kmax = max(GRID_K)
    index, weight = find_neighbours(oof_emb, data.folds, kmax)
    fit = cross_val_smoothing(data.y_true, winner.oof, data.folds, index, weight, metric, data.task)
    test_index, test_weight = find_neighbours(test_emb, np.zeros(len(test_emb), int), kmax)
    k, a = fit.choice
    test = smooth(winner.test, neighbour_mean(winner.test, test_index, test_weight, k), a)
    row = MethodResult(f"{winner.method}+smooth", metric.name, fit.cv_score, fit.in_sample_score, fit.cv_oof, test)
    row.seconds = time.perf_counter() - start
    better = metric.sign() * (fit.cv_score - winner.cv_score) < 0
    doc = {"method": winner.method, "embedding_model": model_id, "metric": metric.name,
           "weights": "max(cosine, 0)", "neighbours_within": "own fold (OOF), the test rows (test)",
           "cv_score": fit.cv_score, "cv_score_without": winner.cv_score,
           "in_sample_score": fit.in_sample_score, "in_sample_score_without": metric(data.y_true, winner.oof, data.task),
           "used": bool(better), "k": k, "a": a,
           "fold_choice": {str(f): {"k": fk, "a": fa} for f, (fk, fa) in fit.fold_choice.items()},
           "rows_without_neighbours": {"oof": int((weight.sum(1) == 0).sum()),
                                       "test": int((test_weight.sum(1) == 0).sum())},
           "grid": [{"k": gk, "a": ga, "all": fit.scores[i, -1],
                     "other_folds": {str(f): fit.scores[i, j] for j, f in enumerate(fit.folds)}}
                    for i, (gk, ga) in enumerate(fit.grid)]}
    files = {"smoothing.json": (json.dumps(doc, indent=2) + "\n").encode()}
    gain = metric.sign() * (winner.cv_score - fit.cv_score)
    verdict = f"better: the submission is {row.method}" if better else \
        f"not better: the submission stays {winner.method}"
    line = (f"neighbour smoothing of {winner.method} (embeddings of {model_id}; k={k}, a={a:g} on all folds): cv "
            f"{metric.name} {fit.cv_score:.5f} vs {winner.cv_score:.5f} without ({gain:+.5f}), {verdict}")
    return row, files, line


def _best_embeddings(data: StackData, metric: Metric, run: Run) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(model id, OOF rows x dims in data.ids order, test rows x dims in data.test_ids order) of the best
    single model (in-sample OOF score) whose predict.json vouches for embeddings; None when none has."""
    scores = [metric.sign() * metric(data.y_true, p, data.task) for p in data.oof]
    for i in np.argsort(scores, kind="stable"):
        model_id = data.model_ids[i]
        sets = _read_embeddings(run, model_id, {"oof": data.ids, "test": data.test_ids})
        if sets is not None:
            return model_id, sets["oof"], sets["test"]
    return None


def _read_embeddings(run: Run, model_id: str, want: dict) -> dict | None:
    """name -> rows x dims float32 in the order of want[name]'s ids; None when the model has no embeddings."""
    model_dir = run.model_dir(model_id)
    meta = model_dir / "predict.json"
    if not meta.exists() or not json.loads(meta.read_text()).get("embeddings"):
        return None
    redo = (f"rerun python -m ensemble.predict --run {run.show()} --models {model_id} --embeddings --force "
            f"(or delete {run.show(model_dir / 'emb')} to stack without smoothing)")
    out = {}
    for name, ids in want.items():
        path = model_dir / "emb" / f"{name}.npy"
        ids_path = path.with_name(f"{name}.ids.parquet")
        if not (run.pull(path) and run.pull(ids_path)):  # a URI run: .npy files are not among the artifacts
            return None
        try:
            emb = np.load(path)
            emb_ids = pd.read_parquet(ids_path)["id"].astype(str).to_numpy()
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{run.show(path)}: cannot be read ({exc}); {redo}.") from None
        if emb.ndim != 2 or len(emb) != len(emb_ids):
            raise UserError(f"{run.show(path)}: shape {emb.shape}, expected rows x dims with {len(emb_ids)} rows (its "
                            f"ids file); {redo}.")
        pos = pd.Index(emb_ids).get_indexer(np.asarray(ids, dtype=str))
        if (pos < 0).any():
            missing = np.asarray(ids)[pos < 0]
            raise UserError(f"{run.show(ids_path)}: {len(missing)} id(s) of the stacked predictions have no "
                            f"embedding (first: {missing[:5].tolist()}); the embeddings come from another "
                            f"prediction: {redo}.")
        out[name] = emb[pos].astype(np.float32)
    if out["oof"].shape[1] != out["test"].shape[1]:
        raise UserError(f"{run.show(model_dir / 'emb')}: oof.npy has {out['oof'].shape[1]} dims, test.npy "
                        f"{out['test'].shape[1]}; {redo}.")
    return out


__all__ = ["GRID_A", "GRID_K", "SmoothingFit", "cross_val_smoothing", "find_neighbours", "neighbour_mean",
           "neighbour_smoothing", "smooth"]
