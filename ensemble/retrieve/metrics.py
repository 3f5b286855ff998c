"""Retrieval metrics: top-1, mAP@k, recall@k and the DIGIX 2020 score, vectorised over queries.

A ranking is a matrix of gallery indices (queries x k, best first, -1 for padding);
`ranked_hits` turns it into hits (the gallery item has the query's label) and
`count_relevant` counts each query's right answers in the gallery. From those two:

  top1      the first result is a hit.
  map@k     per query sum_{i<=k} precision@i * hit_i / min(n_relevant, k), the Kaggle
            Google-Landmark-Retrieval convention: a query with 3 right answers that
            finds 1 at rank 1 scores 1/3, not 1.
  digix     0.5 * top1 + 0.5 * map@10 (the DIGIX 2020 image retrieval score).
  recall@k  at least one hit in the first k results.

Queries with no relevant gallery item are left out of every mean: they have no right
answer, so no ranking can score on them. They are only counted ("no_relevant"), and the
caller reports that count; "queries" is how many were scored. With no scorable query the
means are NaN.
"""

from __future__ import annotations

import numpy as np

from ensemble.errors import UserError
from ensemble.retrieve.search import search

METRIC_NAMES = ("digix", "map@10", "top1", "recall@5", "recall@10")  # all higher-is-better


def ranked_hits(query_labels, gallery_labels, indices) -> np.ndarray:
    """Queries x k booleans: gallery item `indices[q, i]` has the label of query q (-1, padding, never does)."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    indices = np.asarray(indices)
    if indices.ndim != 2 or len(indices) != len(query_labels):
        raise UserError(f"indices must be queries x k with one row per query label ({len(query_labels)}); "
                        f"got shape {indices.shape}.")
    if not len(gallery_labels):
        return np.zeros(indices.shape, dtype=bool)
    valid = indices >= 0
    return (gallery_labels[np.where(valid, indices, 0)] == query_labels[:, None]) & valid


def count_relevant(query_labels, gallery_labels, exclude_self: bool = False) -> np.ndarray:
    """How many gallery items share each query's label (int64, one per query).

    Args:
        exclude_self: the queries are the gallery rows themselves (leave-one-out), so each
            query's own row is not counted.
    """
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    if exclude_self and len(query_labels) != len(gallery_labels):
        raise UserError(f"exclude_self needs the queries to be the gallery rows; got {len(query_labels)} query "
                        f"labels and {len(gallery_labels)} gallery labels.")
    if not len(gallery_labels):
        return np.zeros(len(query_labels), dtype=np.int64)
    values, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.minimum(np.searchsorted(values, query_labels), len(values) - 1)
    n = np.where(values[pos] == query_labels, counts[pos], 0).astype(np.int64)
    return np.maximum(n - 1, 0) if exclude_self else n


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def retrieval_scores(hits, n_relevant, map_k: int = 10, recall_ks=(5, 10)) -> dict:
    """Every retrieval metric of a ranking; see the module docstring.

    Args:
        hits: queries x ranks booleans (`ranked_hits`); fewer than `map_k` columns is fine
            (a small gallery): the missing ranks count as misses.
        n_relevant: right answers per query (`count_relevant`).

    Returns:
        {"top1", f"map@{map_k}", "digix", f"recall@{k}" for each k, "queries", "no_relevant"}.
    """
    hits = np.asarray(hits, dtype=bool)
    n_relevant = np.asarray(n_relevant)
    if hits.ndim != 2 or n_relevant.shape != (len(hits),):
        raise UserError(f"hits must be queries x ranks and n_relevant one count per query; got shapes "
                        f"{hits.shape} and {n_relevant.shape}.")
    scored = n_relevant > 0
    hits, n_relevant = hits[scored], n_relevant[scored]
    top = hits[:, :map_k]
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision * top).sum(axis=1) / np.minimum(n_relevant, map_k)
    top1 = _mean(hits[:, 0]) if hits.shape[1] else (0.0 if len(hits) else float("nan"))
    mean_ap = _mean(ap)
    scores = {"top1": top1, f"map@{map_k}": mean_ap, "digix": 0.5 * top1 + 0.5 * mean_ap}
    scores |= {f"recall@{k}": _mean(hits[:, :k].any(axis=1)) for k in recall_ks}
    return scores | {"queries": int(scored.sum()), "no_relevant": int((~scored).sum())}


def map_at_k(predicted, relevant, k: int = 10) -> float:
    """mAP@k from lists: `predicted[q]` the ids returned for query q (best first), `relevant[q]` its right ids.

    The list-based reference of `retrieval_scores`: a repeated prediction counts once, at its
    first rank (later copies neither hit nor take a rank); the denominator is
    min(len(relevant[q]), k); queries with no relevant id are left out (NaN if none is left).
    """
    if len(predicted) != len(relevant):
        raise UserError(f"predicted and relevant need one entry per query; got {len(predicted)} and {len(relevant)}.")
    hits = np.zeros((len(predicted), k), dtype=bool)
    for q, (pred, rel) in enumerate(zip(predicted, relevant)):
        unique = list(dict.fromkeys(pred))[:k]  # first occurrences, in order
        hits[q, :len(unique)] = [p in rel for p in unique]
    n_relevant = np.array([len(set(rel)) for rel in relevant], dtype=np.int64)
    return retrieval_scores(hits, n_relevant, map_k=k, recall_ks=())[f"map@{k}"]


def leave_one_out(embeddings, labels, k: int = 10) -> dict:
    """Every row queries all the other rows (never itself); returns `retrieval_scores` of that search.

    Rows should be L2-normalised (cosine = dot product). A row that is not finite never
    matches: as a query it scores as a miss. mAP is at `k`, recall at 5 and 10 where <= k.
    """
    labels = np.asarray(labels)
    if len(labels) != len(embeddings):
        raise UserError(f"leave_one_out needs one label per embedding row; got {len(labels)} labels for "
                        f"{len(embeddings)} rows.")
    n = len(labels)
    _, indices = search(embeddings, embeddings, k, exclude=np.arange(n))
    hits = ranked_hits(labels, labels, indices)
    return retrieval_scores(hits, count_relevant(labels, labels, exclude_self=True), map_k=k,
                            recall_ks=tuple(r for r in (5, 10) if r <= k))
