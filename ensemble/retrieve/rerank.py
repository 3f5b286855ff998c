"""Query expansion and re-ranking on top of `search`: alpha-QE, DBA and k-reciprocal re-ranking.

alpha_qe      q' = normalise(q + sum_{j<n} max(s_j, 0)^alpha g_j) over the query's top-n
              results (Radenovic et al. 2018): a query moves towards what it already found.
dba           the same on the gallery side (database-side augmentation): every gallery row
              moves towards its top-n gallery neighbours; then search the new gallery.
k_reciprocal  Zhong et al. 2017: the Jaccard distance of k-reciprocal neighbour sets, mixed
              with the original distance. The pairwise parts are sparse here (neighbour sets,
              an inverted index), but the final query x gallery distances are dense, one
              chunk of queries at a time, and it costs O(N^2 d): for galleries up to
              `max_items` (20,000 by default) only.

alpha_qe and dba read the gallery a chunk of rows at a time, so they work on a float16
np.memmap; their output is a new float32 array of the queries' (or gallery's) shape.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from ensemble.errors import UserError
from ensemble.retrieve.search import _drop_pages, l2_normalize, search, top_k

_CELLS = 1 << 22  # cells of a dense block (rows x gallery, rows x n x dims): 16-32 MB


def alpha_qe(queries, gallery, indices, scores, n: int = 3, alpha: float = 3.0) -> np.ndarray:
    """Alpha query expansion: each query plus its top-n results weighted by max(score, 0)^alpha, L2-normalised.

    Args:
        indices, scores: `search(queries, gallery, k)`'s output (k >= n; index -1 is ignored).
    """
    indices = np.asarray(indices)[:, :n]
    scores = np.asarray(scores, dtype=np.float32)[:, :n]
    if len(indices) != len(queries) or scores.shape != indices.shape:
        raise UserError(f"indices and scores must be one row per query ({len(queries)}), of one shape; got "
                        f"{indices.shape} and {scores.shape}.")
    weights = np.where(indices >= 0, np.maximum(scores, 0) ** np.float32(alpha), 0).astype(np.float32)
    d = queries.shape[1]
    out = np.empty((len(queries), d), dtype=np.float32)
    rows = max(1, _CELLS // max(1, indices.shape[1] * d))
    for s in range(0, len(queries), rows):
        idx = indices[s:s + rows]
        neighbours = np.asarray(gallery[np.where(idx >= 0, idx, 0).ravel()], dtype=np.float32)
        out[s:s + rows] = np.einsum("qn,qnd->qd", weights[s:s + rows], neighbours.reshape(len(idx), -1, d))
        out[s:s + rows] += np.asarray(queries[s:s + rows], dtype=np.float32)
        _drop_pages(gallery)  # random rows of a memmap: let the kernel take the pages back
        _drop_pages(queries)
    return l2_normalize(out, "the expanded queries")


def dba(gallery, n: int = 3, alpha: float = 3.0, exclude_self: bool = True, memory_mb: float = 256) -> np.ndarray:
    """Database-side augmentation: every gallery row plus its top-n gallery neighbours weighted by
    max(similarity, 0)^alpha, L2-normalised (float32).

    Args:
        exclude_self: the neighbours are the n most similar *other* rows. With False a row is
            usually its own first neighbour and so counts twice (alpha_qe with the gallery as queries).
        memory_mb: working memory of the neighbour search.
    """
    exclude = np.arange(len(gallery)) if exclude_self else None
    scores, indices = search(gallery, gallery, n, exclude=exclude, memory_mb=memory_mb)
    return alpha_qe(gallery, gallery, indices, scores, n=n, alpha=alpha)


def k_reciprocal(queries, gallery, k: int = 10, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 same_set: bool = False, max_items: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking (Zhong et al. 2017) of L2-normalised rows; the top-k by the final distance.

    Follows the authors' `re_ranking` (person-re-ranking, reused by Kaggle landmark solutions):
    original distance 2 - 2 cos divided by its row's maximum over all items; V[i] the
    Gaussian weights exp(-dist) on i's k1-reciprocal set, expanded by the k1/2-reciprocal set
    of any member that shares more than 2/3 of it, normalised to sum 1; local query expansion
    (V[i] = mean of V over i's k2 nearest); Jaccard distance 1 - sum(min) / sum(max); final =
    jaccard * (1 - lambda) + original * lambda. Queries and gallery are ranked together (one
    item set), as in the original; V is kept in float32, not float16.

    Args:
        same_set: the queries are the gallery rows (leave-one-out): a row is never its own result.
        max_items: the most items (queries + gallery, or the rows when same_set) accepted.

    Returns:
        (-final distance as float32, gallery indices int64), queries x min(k, gallery - same_set),
        best first, ties by the lower index.
    """
    gallery, queries = l2_normalize(gallery, "gallery"), l2_normalize(queries, "queries")  # exactly unit, finite
    if same_set and (queries.shape != gallery.shape or not np.array_equal(queries, gallery)):
        raise UserError(f"same_set=True needs the queries to be the gallery rows; got shapes {queries.shape} and "
                        f"{gallery.shape} that differ (or hold different values).")
    feat = gallery if same_set else np.concatenate([queries, gallery])
    n, nq = len(feat), len(queries)
    if n > max_items:
        raise UserError(f"k_reciprocal re-ranking is for small galleries: it compares every item with every other "
                        f"(O(N^2)); got {n} items ({'rows' if same_set else 'queries + gallery'}), max_items="
                        f"{max_items}. Use alpha_qe / dba on large galleries, or raise max_items.")
    if min(k, k1, k2) < 1:
        raise UserError(f"k, k1 and k2 must be >= 1; got k={k}, k1={k1}, k2={k2}.")
    _, rank = search(feat, feat, max(k1 + 1, k2), backend="numpy")  # a row is (almost always) its own first
    row_max = np.maximum(2 + 2 * search(-feat, feat, 1, backend="numpy")[0][:, 0].astype(np.float64), 1e-12)
    V = _reciprocal_weights(feat, rank, k1, row_max)
    if k2 != 1:  # local query expansion: the mean of V over each item's k2 nearest (itself included)
        r2 = rank[:, :k2]
        A = sparse.csr_matrix((np.full(r2.size, 1 / r2.shape[1]), (np.repeat(np.arange(n), r2.shape[1]), r2.ravel())),
                              shape=(n, n))
        V = (A @ V).tocsr()
    first = 0 if same_set else nq
    return _final_top_k(feat, V, first, nq, row_max, k, lambda_value, same_set)


def _reciprocal_sets(rank: np.ndarray, width: int) -> np.ndarray:
    """Items x width booleans: rank[i, a] is among i's `width` nearest and i among its."""
    r = rank[:, :width]
    return (r[r] == np.arange(len(r))[:, None, None]).any(axis=2)


def _reciprocal_weights(feat, rank, k1: int, row_max) -> sparse.csr_matrix:
    """The sparse V: Gaussian weights on each item's expanded k1-reciprocal set, rows summing to 1."""
    n = len(feat)
    R, half = rank[:, :k1 + 1], int(np.around(k1 / 2)) + 1  # np.around as the original: banker's rounding
    K = _reciprocal_sets(rank, k1 + 1)
    H = _reciprocal_sets(rank, half)
    Rh = rank[:, :half]
    h_size = H.sum(axis=1)
    pairs = [np.stack([np.repeat(np.arange(n), R.shape[1])[K.ravel()], R[K]])]
    step = max(1, _CELLS // (R.shape[1] ** 2 * Rh.shape[1]))
    for s in range(0, n, step):
        Rc, Kc = R[s:s + step], K[s:s + step]
        cand = Rh[Rc]  # rows x a x b: member a's half-reciprocal candidates
        in_set = ((cand[..., None] == Rc[:, None, None, :]) & Kc[:, None, None, :]).any(axis=3)
        shared = (in_set & H[Rc]).sum(axis=2)
        accept = Kc & (shared > 2 / 3 * h_size[Rc])
        rows, a = np.nonzero(accept)
        members = Rc[rows, a]
        keep = H[members]
        pairs.append(np.stack([np.repeat(rows + s, Rh.shape[1])[keep.ravel()], Rh[members][keep]]))
    i, j = np.divmod(np.unique(np.array([n, 1]) @ np.concatenate(pairs, axis=1)), n)  # unique (item, member)
    dot = np.concatenate([np.einsum("ij,ij->i", feat[i[s:s + 65536]], feat[j[s:s + 65536]])
                          for s in range(0, len(i), 65536)]) if len(i) else np.zeros(0)
    w = np.exp(-np.maximum(2 - 2 * dot.astype(np.float64), 0) / row_max[i])
    w /= np.bincount(i, weights=w, minlength=n)[i]
    return sparse.csr_matrix((w, (i, j)), shape=(n, n))


def _final_top_k(feat, V, first: int, nq: int, row_max, k: int, lambda_value: float, same_set: bool):
    """Jaccard + original distance of queries (rows :nq) to gallery (rows first:), top-k per query."""
    Vg = V[first:].tocsc()
    ng = Vg.shape[0]
    g_count = np.diff(Vg.indptr)
    Vq = V[:nq].tocoo()
    per_row = np.bincount(Vq.row, weights=g_count[Vq.col], minlength=nq)  # (query entry, gallery entry) pairs
    step = max(1, min(_CELLS // ng, _CELLS // max(1, int(per_row.max(initial=1)))))
    Vq = V[:nq].tocsr()
    out_s, out_i = [], []
    for s in range(0, nq, step):
        rows = min(step, nq - s)
        block = Vq[s:s + rows].tocoo()
        starts, cnt = Vg.indptr[block.col], g_count[block.col]
        entry = np.repeat(np.arange(len(cnt)), cnt)
        pos = starts[entry] + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        m = np.minimum(block.data[entry], Vg.data[pos])
        inter = np.bincount(block.row[entry] * ng + Vg.indices[pos], weights=m, minlength=rows * ng).reshape(rows, ng)
        jaccard = 1 - inter / (2 - inter)  # rows of V sum to 1: sum(max) = 2 - sum(min)
        cos = (feat[s:s + rows] @ feat[first:].T).astype(np.float64)
        original = np.maximum(2 - 2 * cos, 0) / row_max[s:s + rows, None]
        final = jaccard * (1 - lambda_value) + original * lambda_value
        exclude = np.arange(s, s + rows) if same_set else None
        scores, idx = top_k(-final, k, exclude=exclude)
        out_s.append(scores)
        out_i.append(idx)
    return np.concatenate(out_s), np.concatenate(out_i)
