import sys

import numpy as np
import pytest

from ensemble.errors import UserError
from ensemble.retrieve.search import l2_normalize, search, top_k


def _brute(queries, gallery, k, exclude=None):
    """Every score, then a stable sort: descending score, ties by the lower gallery index."""
    s = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        s[rows, exclude[rows]] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)
    kk = min(k, s.shape[1] - (exclude is not None))
    idx = order[:, :kk]
    return np.take_along_axis(s, idx, axis=1), idx


def _integer_rows(rng, n, d=6):
    """Small integers: every dot product is exact in float32 whatever the summation order, and ties are common."""
    return rng.integers(-2, 3, (n, d)).astype(np.float32)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64, None])
def test_equals_brute_force_for_any_chunking(chunk_rows):
    rng = np.random.default_rng(0)
    q, g = _integer_rows(rng, 37), _integer_rows(rng, 101)  # chunks smaller than k and not dividing n
    scores, idx = search(q, g, 10, chunk_rows=chunk_rows, backend="numpy")
    want_s, want_i = _brute(q, g, 10)
    assert scores.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (37, 10)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(scores, want_s)


def test_tiny_memory_budget_gives_tiny_chunks_and_the_same_result():
    rng = np.random.default_rng(1)
    q, g = _integer_rows(rng, 50), _integer_rows(rng, 300)
    np.testing.assert_array_equal(search(q, g, 5, memory_mb=0.01, backend="numpy")[1], _brute(q, g, 5)[1])


def test_random_unit_vectors_match_float64_brute_force():
    rng = np.random.default_rng(2)
    q = l2_normalize(rng.standard_normal((80, 32)))
    g = l2_normalize(rng.standard_normal((500, 32)))
    scores, idx = search(q, g, 10, chunk_rows=64, backend="numpy")
    want_s, want_i = _brute(q, g, 10)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    exact = q.astype(np.float64) @ g.astype(np.float64).T
    # the same items up to float32 rounding: each returned item's exact score is the wanted one
    np.testing.assert_allclose(np.take_along_axis(exact, idx, axis=1), want_s, atol=1e-5)
    assert (idx == want_i).mean() > 0.99


def test_float16_memmap_gallery_and_queries(tmp_path):
    rng = np.random.default_rng(3)
    g = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float16, shape=(203, 6))
    g[:] = _integer_rows(rng, 203)
    g.flush()
    q = np.lib.format.open_memmap(tmp_path / "q.npy", mode="w+", dtype=np.float16, shape=(31, 6))
    q[:] = _integer_rows(rng, 31)
    q.flush()
    before = np.array(g)
    for mode in ("r", "r+", "c"):
        g_map, q_map = np.load(tmp_path / "g.npy", mmap_mode=mode), np.load(tmp_path / "q.npy", mmap_mode=mode)
        scores, idx = search(q_map, g_map, 10, chunk_rows=16, backend="numpy")
        want_s, want_i = _brute(np.array(q_map), np.array(g_map), 10)
        np.testing.assert_array_equal(idx, want_i)
        np.testing.assert_array_equal(scores, want_s)
        np.testing.assert_array_equal(np.array(g_map), before)  # pages handed back, data intact


def test_exclude_leaves_one_row_out():
    rng = np.random.default_rng(4)
    g = _integer_rows(rng, 60)
    exclude = np.arange(60)
    exclude[::7] = -1  # these queries may find themselves
    scores, idx = search(g, g, 8, exclude=exclude, chunk_rows=9, backend="numpy")
    want_s, want_i = _brute(g, g, 8, exclude)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(scores, want_s)
    rows = np.flatnonzero(exclude >= 0)
    assert not (idx[rows] == rows[:, None]).any()


def test_k_larger_than_gallery():
    rng = np.random.default_rng(5)
    q, g = _integer_rows(rng, 4), _integer_rows(rng, 7)
    _, idx = search(q, g, 50, backend="numpy")
    assert idx.shape == (4, 7)
    np.testing.assert_array_equal(idx, _brute(q, g, 50)[1])
    assert search(g, g, 50, exclude=np.arange(7), backend="numpy")[1].shape == (7, 6)
    assert search(g[:1], g[:1], 3, exclude=np.array([0]), backend="numpy")[1].shape == (1, 0)


@pytest.mark.parametrize("chunk_rows", [1, 2, None])
def test_ties_go_to_the_lower_index(chunk_rows):
    g = np.array([[0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [0, 1, 0, 0], [1, 0, 0, 0],
                  [1, 0, 0, 0]], dtype=np.float32)
    q = np.array([[1, 0, 0, 0]], dtype=np.float32)
    # scores: .5 1 .5 0 1 1 -> the three 1s in index order, then the .5s in index order
    scores, idx = search(q, g, 5, chunk_rows=chunk_rows, backend="numpy")
    assert idx.tolist() == [[1, 4, 5, 0, 2]]
    assert scores.tolist() == [[1, 1, 1, 0.5, 0.5]]
    assert search(q, g, 2, chunk_rows=chunk_rows, backend="numpy")[1].tolist() == [[1, 4]]  # a tie across the cut
    assert search(q, g, 4, chunk_rows=chunk_rows, backend="numpy")[1].tolist() == [[1, 4, 5, 0]]


def test_worst_gallery_order_and_non_finite_rows():
    # gallery sorted by rising similarity: every chunk beats the running top-k (the partition fallback)
    rng = np.random.default_rng(6)
    q = l2_normalize(rng.standard_normal((5, 8)))
    g = l2_normalize(rng.standard_normal((400, 8)))
    g = g[np.argsort(g @ q[0])]
    np.testing.assert_array_equal(search(q, g, 10, chunk_rows=50, backend="numpy")[1], _brute(q, g, 10)[1])
    # NaN gallery rows (many per chunk) are never returned; a NaN query is padded with -1
    g[::3] = np.nan
    q[2] = np.nan
    scores, idx = search(q, g, 10, chunk_rows=50, backend="numpy")
    ok = ~np.isnan(g).any(axis=1)
    want = np.flatnonzero(ok)[_brute(q[[0, 1, 3, 4]], g[ok], 10)[1]]
    np.testing.assert_array_equal(idx[[0, 1, 3, 4]], want)
    assert idx[2].tolist() == [-1] * 10 and np.isneginf(scores[2]).all()


def test_top_k_of_a_dense_matrix():
    s = np.array([[0.1, 0.9, 0.9, 0.3], [0.5, 0.2, 0.5, 0.5]])
    scores, idx = top_k(s.copy(), 3)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 3]]
    np.testing.assert_allclose(scores, [[0.9, 0.9, 0.3], [0.5, 0.5, 0.5]])
    assert top_k(s.copy(), 2, exclude=np.array([1, -1]))[1].tolist() == [[2, 3], [0, 2]]


def test_bad_arguments_are_user_errors():
    g = np.eye(3, dtype=np.float32)
    with pytest.raises(UserError, match="same number of dims"):
        search(np.ones((2, 4)), g, 1)
    with pytest.raises(UserError, match="2-D array"):
        search(np.ones(3), g, 1)
    with pytest.raises(UserError, match="k must be a positive integer"):
        search(g, g, 0)
    with pytest.raises(UserError, match=r"'backend' parameter of search must be one of \['auto', 'numpy', 'faiss'\]"):
        search(g, g, 1, backend="annoy")
    with pytest.raises(UserError, match="query 1 has 3"):
        search(g, g, 1, exclude=np.array([0, 3, -1]))


def test_faiss_missing_is_a_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    g = np.eye(3, dtype=np.float32)
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        search(g, g, 1, backend="faiss")
    assert search(g, g, 1, backend="auto")[1].tolist() == [[0], [1], [2]]


def test_faiss_backend_equals_numpy():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    q = l2_normalize(rng.standard_normal((120, 32)))
    g = l2_normalize(rng.standard_normal((700, 32)))
    exact = q.astype(np.float64) @ g.astype(np.float64).T
    for exclude in (None, np.arange(120)):
        s_np, i_np = search(q, g, 10, exclude=exclude, chunk_rows=100, backend="numpy")
        s_fs, i_fs = search(q, g, 10, exclude=exclude, chunk_rows=100, backend="faiss")
        np.testing.assert_allclose(s_fs, s_np, atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(exact, i_fs, 1), np.take_along_axis(exact, i_np, 1), atol=1e-5)
        assert (i_fs == i_np).mean() > 0.99
    # exact ties: the same integer case as numpy, ties by the lower index
    g = _integer_rows(np.random.default_rng(0), 101)
    q = _integer_rows(np.random.default_rng(1), 37)
    np.testing.assert_array_equal(search(q, g, 10, backend="faiss")[0], _brute(q, g, 10)[0])


def test_l2_normalize():
    x = l2_normalize(np.array([[3, 4], [0, 2]], dtype=np.float16))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.6, 0.8], [0, 1]], rtol=1e-6)
    bad = np.ones((20, 3))
    bad[3] = 0
    bad[17, 1] = np.nan
    with pytest.raises(UserError, match=r"rows \[3, 17\] \(0-based\) of gallery are zero or not finite"):
        l2_normalize(bad, "gallery")
    bad[5, 0] = np.inf
    with pytest.raises(UserError, match=r"rows \[3, 5, 17\]"):
        l2_normalize(bad)
    with pytest.raises(UserError, match="2-D"):
        l2_normalize(np.ones(4))
    np.testing.assert_allclose(l2_normalize(np.array([[3e30, 4e30]], dtype=np.float32)), [[0.6, 0.8]], rtol=1e-6)


def test_bench_script_quick_runs():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_retrieve.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SUMMARY: search is" in out.stdout and "identical top-10 lists" in out.stdout
