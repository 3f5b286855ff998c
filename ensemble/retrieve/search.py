"""Exact cosine k-nearest neighbours of L2-normalised rows, in bounded memory.

`search(queries, gallery, k)` reads the gallery in chunks (it may be a float16 np.memmap
larger than memory): each chunk is converted to float32 once and multiplied with every
chunk of queries. Of each score block only the entries that can still enter a query's
running top-k are kept: those above the query's current k-th score and, when that leaves
many (the first chunk), within the block's own top-k (np.partition, first on a column
sample: a cheap lower bound). These few candidates are merged with the running top-k by
an exact sort on (score descending, gallery index ascending), so ties go to the lower
gallery index whatever the chunk sizes. Keeping candidates by a threshold instead of an
argpartition of every block makes the selection cost a few percent of the matrix product.

A memmapped chunk's pages are handed back to the kernel once used (madvise DONTNEED: they
stay in the page cache, out of this process's RSS), so a 1 GB gallery is searched in about
`memory_mb` of working memory. `backend="faiss"` does the per-chunk top-k with
faiss.IndexFlatIP instead (same results up to exactly tied scores).

`l2_normalize` makes unit rows and names the rows that cannot be (zero or not finite).
"""

from __future__ import annotations

import mmap

import numpy as np

from ensemble.errors import UserError

BACKENDS = ("auto", "numpy", "faiss")
_CANDIDATES_PER_ROW = 8  # per unit of k: more candidates than this in a block -> bound by the block's own top-k


def l2_normalize(x, what: str = "embeddings") -> np.ndarray:
    """Rows divided by their L2 norm (float32); a zero or non-finite row is a UserError naming it."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UserError(f"{what} must be a 2-D array (rows x dims); got shape {x.shape}.")
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)  # float64: no overflow for large finite values
    bad = np.flatnonzero(~(np.isfinite(sq) & (sq > 0)))
    if len(bad):
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UserError(f"rows {bad[:10].tolist()}{more} (0-based) of {what} are zero or not finite; a cosine "
                        "search needs every row finite with a non-zero norm: drop or fix those rows.")
    return x / np.sqrt(sq).astype(np.float32)[:, None]


def search(queries, gallery, k: int, *, exclude=None, chunk_rows: int | None = None, memory_mb: float = 256,
           backend: str = "numpy") -> tuple[np.ndarray, np.ndarray]:
    """The k gallery rows most similar (dot product) to each query row, best first.

    Args:
        queries, gallery: L2-normalised rows (float16 or float32; the gallery may be an
            np.memmap, read a chunk at a time).
        k: neighbours per query; fewer when the gallery is smaller.
        exclude: one gallery row per query never to return (-1: none), e.g.
            np.arange(n) when the queries are the gallery (leave-one-out).
        chunk_rows: rows per query chunk and per gallery chunk; by default sized so that a
            block of scores and the converted gallery chunk fit in `memory_mb`.
        backend: "numpy", "faiss" (needs `pip install faiss-cpu`) or "auto" (faiss if importable).
            numpy by default: faiss runs its own OpenMP threads, which in a fold worker holding
            one CPU would compete with torch's; the retrieve stage's gallery search asks for auto.

    Returns:
        (scores float32, indices int64), both queries x min(k, n_gallery - (exclude given)),
        sorted by descending score, ties by ascending gallery index (faiss: except a tie at
        the k-th place, which faiss may break either way). A query that matches nothing (a
        NaN row) is padded with score -inf and index -1.
    """
    queries, gallery = _matrix(queries, "queries"), _matrix(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise UserError(f"queries and gallery must have the same number of dims; got {queries.shape[1]} and "
                        f"{gallery.shape[1]}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"k must be a positive integer; got {k!r}.")
    if backend not in BACKENDS:
        raise UserError(f"The 'backend' parameter of search must be one of {list(BACKENDS)}. Got {backend!r} instead.")
    bad_chunk = chunk_rows is not None and (not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1)
    if not memory_mb > 0 or bad_chunk:
        raise UserError(f"memory_mb must be > 0 and chunk_rows a positive integer or None; got {memory_mb!r} and "
                        f"{chunk_rows!r}.")
    nq, ng, d = len(queries), len(gallery), gallery.shape[1]
    exclude = _exclude(exclude, nq, ng)
    kk = max(0, min(int(k), ng - (exclude is not None)))
    best_s = np.full((nq, kk), -np.inf, dtype=np.float32)
    best_i = np.full((nq, kk), -1, dtype=np.int64)
    if kk == 0 or nq == 0:
        return best_s, best_i
    faiss = _faiss(backend)
    qc, gc = _chunk_sizes(nq, ng, d, chunk_rows, memory_mb)
    for gs in range(0, ng, gc):
        g_rows = gallery[gs:gs + gc]
        g = np.ascontiguousarray(g_rows, dtype=np.float32)
        if faiss is not None:
            index = faiss.IndexFlatIP(d)
            index.add(g)
        for qs in range(0, nq, qc):
            q_rows = queries[qs:qs + qc]
            q = np.ascontiguousarray(q_rows, dtype=np.float32)
            ex = None if exclude is None else exclude[qs:qs + qc] - gs
            t = best_s[qs:qs + qc, -1]
            if faiss is None:
                rows, cols, scores = _block_candidates(q @ g.T, t, kk, ex)
            else:
                rows, cols, scores = _faiss_candidates(index, q, len(g), t, kk, ex)
            _drop_pages(q_rows)
            if len(rows):
                best_s[qs:qs + qc], best_i[qs:qs + qc] = _merge(best_s[qs:qs + qc], best_i[qs:qs + qc],
                                                                rows, scores, cols + gs)
        _drop_pages(g_rows)
    return best_s, best_i


def top_k(scores: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k highest entries of a dense score matrix (one query chunk): (scores float32, columns
    int64), by descending score, ties by ascending column; `exclude` as in `search`. Overwrites `scores`."""
    scores = np.asarray(scores, dtype=np.float32)
    kk = max(0, min(k, scores.shape[1] - (exclude is not None)))
    best_s = np.full((len(scores), kk), -np.inf, dtype=np.float32)
    best_i = np.full((len(scores), kk), -1, dtype=np.int64)
    if kk:
        rows, cols, s = _block_candidates(scores, best_s[:, -1], kk, exclude)
        best_s, best_i = _merge(best_s, best_i, rows, s, cols)
    return best_s, best_i


def _block_candidates(block: np.ndarray, t: np.ndarray, kk: int, ex) -> tuple:
    """(rows, cols, scores) of the block entries that may enter the running top-kk: a superset, never a miss.

    An entry must beat the row's current k-th score strictly (it comes later, so a tie loses
    to the lower index) and be within the block's own top-kk, hence >= the block's k-th score,
    itself >= the k-th score of any column sample."""
    n = block.shape[1]
    block[np.isnan(block)] = -np.inf  # a NaN row matches nothing (np.partition would sort it above every score)
    if ex is not None:
        r = np.flatnonzero((ex >= 0) & (ex < n))
        block[r, ex[r]] = -np.inf
    keep = block > t[:, None]
    limit = _CANDIDATES_PER_ROW * kk * len(block)
    if n > kk and np.count_nonzero(keep) > limit:
        for width in sorted({min(n, max(kk + 1, n // 16)), n}):
            kth = np.partition(block[:, :width], width - kk, axis=1)[:, width - kk]
            kth[np.isnan(kth)] = -np.inf  # NaN sorts last: no bound from such a sample
            keep &= block >= kth[:, None]
            if np.count_nonzero(keep) <= limit:
                break
    flat = np.flatnonzero(keep)  # far faster than a 2-D np.nonzero on a mostly-False mask
    rows, cols = np.divmod(flat, n)
    return rows, cols, block.ravel()[flat]


def _faiss_candidates(index, q: np.ndarray, n: int, t: np.ndarray, kk: int, ex) -> tuple:
    """The same from faiss: the chunk's top-kk (one more when a row may be excluded), above the k-th score."""
    scores, cols = index.search(q, min(kk + (ex is not None), n))
    bad = cols < 0
    if ex is not None:
        bad |= cols == ex[:, None]
    scores[bad] = -np.inf
    rows, j = np.nonzero(scores > t[:, None])
    return rows, cols[rows, j].astype(np.int64), scores[rows, j]


def _merge(best_s, best_i, rows, scores, indices) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-kk of its running top-kk plus its candidates, by (score desc, index asc)."""
    r, kk = best_s.shape
    all_rows = np.concatenate([np.repeat(np.arange(r), kk), rows])
    all_s = np.concatenate([best_s.ravel(), scores])
    all_i = np.concatenate([best_i.ravel(), indices])
    order = np.lexsort((all_i, -all_s, all_rows))
    counts = np.bincount(all_rows, minlength=r)
    take = order[(np.cumsum(counts) - counts)[:, None] + np.arange(kk)]
    return all_s[take], all_i[take]


def _chunk_sizes(nq: int, ng: int, d: int, chunk_rows, memory_mb: float) -> tuple[int, int]:
    """Query and gallery rows per block: a quarter of the budget for the float32 gallery chunk (and its
    float16 pages while read), the rest for the score block with its masks and a partition copy."""
    if chunk_rows is not None:
        return min(int(chunk_rows), nq), min(int(chunk_rows), ng)
    budget = int(memory_mb * 2**20)
    gc = max(1, min(ng, budget // 4 // (6 * d)))
    qc = max(1, min(nq, (budget - 6 * d * gc) // (10 * gc + 4 * d)))
    return qc, gc


def _drop_pages(chunk) -> None:
    """Hand a memmap chunk's pages back to the kernel once used: they stay in the page cache but
    leave this process's RSS. Only shared mappings (not mode 'c', whose changes would be lost)."""
    mm = getattr(chunk, "_mmap", None)
    if mm is None or getattr(chunk, "mode", "c") == "c" or not hasattr(mmap, "MADV_DONTNEED") or not chunk.size:
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
        start = chunk.ctypes.data - base
        lo = start - start % mmap.PAGESIZE  # madvise wants a page-aligned start; the pages before are done with
        mm.madvise(mmap.MADV_DONTNEED, lo, min(start + chunk.nbytes, len(mm)) - lo)
    except (OSError, ValueError, TypeError):  # a closed map or an odd view: only memory use is at stake
        pass


def _matrix(x, what: str):
    if not isinstance(x, np.ndarray):  # keep an np.memmap as it is: it is read a chunk at a time
        x = np.asarray(x)
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"{what} must be a 2-D array of numbers (rows x dims); got shape {x.shape} of {x.dtype}.")
    return x


def _exclude(exclude, nq: int, ng: int):
    if exclude is None:
        return None
    exclude = np.asarray(exclude)
    if exclude.shape != (nq,) or not np.issubdtype(exclude.dtype, np.integer):
        raise UserError(f"exclude must hold one integer gallery row per query ({nq}); got shape {exclude.shape} "
                        f"of {exclude.dtype}.")
    bad = np.flatnonzero((exclude < -1) | (exclude >= ng))
    if len(bad):
        raise UserError(f"exclude must be a gallery row (0..{ng - 1}) or -1 for none; query {int(bad[0])} has "
                        f"{int(exclude[bad[0]])}.")
    return exclude.astype(np.int64)


def _faiss(backend: str):
    """The faiss module for this backend, or None for numpy."""
    if backend == "numpy":
        return None
    try:
        import faiss
    except ImportError:
        if backend == "faiss":
            raise UserError("backend='faiss' needs the faiss package: pip install faiss-cpu "
                            "(or use backend='numpy', the same results).") from None
        return None
    return faiss
