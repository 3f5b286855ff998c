"""Ensembles of embeddings: weighted concatenation, weights chosen greedily on out-of-fold retrieval.

Concatenating unit embeddings `e_m` scaled by `sqrt(w_m / sum(w))` gives a unit vector whose
cosine with another such vector is the weighted mean of the models' cosines, so a weight is
exactly how much a model's similarity counts. Greedy selection (Caruana et al. 2004, with
replacement) adds, one step at a time, the model whose added weight most improves the pooled
leave-one-out score of the folds it is fitted on; the best prefix of its trajectory is kept.
"""

from __future__ import annotations

import numpy as np

from ensemble.errors import UserError
from ensemble.retrieve.metrics import leave_one_out


def combine(embeddings: list[np.ndarray], weights, dtype=np.float32, chunk: int = 65_536) -> np.ndarray:
    """The weighted concatenation of unit embeddings (rows x sum of the used models' dims, unit rows)."""
    weights = np.asarray(weights, dtype=np.float64)
    used = np.flatnonzero(weights > 0)
    scale = np.sqrt(weights[used] / weights[used].sum())
    out = np.empty((len(embeddings[0]), sum(embeddings[m].shape[1] for m in used)), dtype)
    start = 0
    for m, s in zip(used, scale):  # a model and a row chunk at a time: no float32 copy of a whole gallery
        width = embeddings[m].shape[1]
        for r in range(0, len(out), chunk):
            out[r:r + chunk, start:start + width] = np.asarray(embeddings[m][r:r + chunk], np.float32) * np.float32(s)
        start += width
    return out


def fold_scores(embeddings: np.ndarray, labels: np.ndarray, folds: np.ndarray, which=None) -> dict:
    """Leave-one-out retrieval inside each fold (`which`: those folds only), pooled over all their queries.

    Each held-out image queries the other held-out images of its fold: its identities are new
    to the fold's model, as the test's are. Returns the metrics plus 'queries' and 'no_relevant'."""
    return pool_scores([leave_one_out(embeddings[folds == f], labels[folds == f])
                        for f in (np.unique(folds) if which is None else which)])


def pool_scores(parts: list[dict]) -> dict:
    """Per-fold score dicts as one: each metric averaged over all the folds' scored queries
    (a fold without any, all its identities single, adds only to no_relevant)."""
    scored = [p for p in parts if p["queries"]]
    queries = np.array([p["queries"] for p in scored], dtype=np.float64)
    pooled = {key: float(np.dot(queries, [p[key] for p in scored]) / queries.sum()) if scored else float("nan")
              for key in parts[0] if key not in ("queries", "no_relevant")}
    return pooled | {"queries": int(queries.sum()), "no_relevant": int(sum(p["no_relevant"] for p in parts))}


class GreedyConcat:
    """Greedy weights for concatenating models' embeddings, judged by pooled leave-one-out `metric`.

    Attributes after `fit`: `weights_` (picks per model), `trajectory_` (score after each pick),
    `picks_` (model index per step, the kept prefix), `score_`.
    """

    def __init__(self, metric: str = "digix", max_iterations: int = 10):
        self.metric, self.max_iterations = metric, max_iterations

    def fit(self, embeddings: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, which=None,
            cache: dict | None = None) -> "GreedyConcat":
        """Fit on the folds `which` (default all). `cache`: a dict shared between fits on the same data:
        a fold's leave-one-out scores depend only on (weights, fold), so fits for other folds reuse them."""
        which = list(np.unique(folds) if which is None else which)
        cache = {} if cache is None else cache

        def score(counts: np.ndarray) -> float:
            parts = []
            for f in which:
                key = (tuple(counts), f)
                if key not in cache:  # only this fold's rows are combined and searched
                    rows = folds == f
                    cache[key] = leave_one_out(combine([e[rows] for e in embeddings], counts), labels[rows])
                parts.append(cache[key])
            return pool_scores(parts)[self.metric]

        counts = np.zeros(len(embeddings))
        picks, trajectory = [], []
        for _ in range(self.max_iterations):
            trials = []
            for m in range(len(embeddings)):
                counts[m] += 1
                trials.append(score(counts))
                counts[m] -= 1
            if np.isnan(trials).all():
                raise UserError(f"greedy concatenation: no held-out image of folds {which} has another image of its "
                                "identity in its fold, so there is nothing to choose weights by.")
            best = int(np.nanargmax(trials))  # ties: the lower index, as numpy's argmax
            counts[best] += 1
            picks.append(best)
            trajectory.append(float(trials[best]))
        keep = int(np.nanargmax(trajectory)) + 1  # the best prefix: later picks that did not help are dropped
        self.picks_, self.trajectory_ = picks[:keep], trajectory
        self.weights_ = np.bincount(self.picks_, minlength=len(embeddings)).astype(np.float64)
        self.score_ = trajectory[keep - 1]
        return self
