import numpy as np
import pytest

from ensemble.errors import UserError
from ensemble.retrieve.metrics import count_relevant, ranked_hits, retrieval_scores
from ensemble.retrieve.rerank import alpha_qe, dba, k_reciprocal
from ensemble.retrieve.search import l2_normalize, search


def _clusters(seed, noise, n_clusters=10, per_cluster=12, n_queries=40, d=32):
    """Unit rows around random centres: gallery `per_cluster` per centre, queries from random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    g_labels, q_labels = np.repeat(np.arange(n_clusters), per_cluster), rng.integers(0, n_clusters, n_queries)
    g = l2_normalize(centres[g_labels] + noise * rng.standard_normal((len(g_labels), d)))
    q = l2_normalize(centres[q_labels] + noise * rng.standard_normal((n_queries, d)))
    return q, g, q_labels, g_labels


def _map(indices, q_labels, g_labels):
    return retrieval_scores(ranked_hits(q_labels, g_labels, indices), count_relevant(q_labels, g_labels))["map@10"]


def test_alpha_qe_hand_case():
    gallery = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    indices = np.array([[1, 2, -1], [0, 1, -1]])
    scores = np.array([[0.5, -0.3, 0.9], [1.0, 0.5, 0.7]], dtype=np.float32)
    out = alpha_qe(queries, gallery, indices, scores, n=3, alpha=3.0)
    # q0: weights .5^3 = 1/8, 0 (negative score), 0 (padding) -> (1, 1/8) ~ (8, 1) / sqrt(65)
    # q1: (0, 1) + 1 (1, 0) + 1/8 (0, 1) = (1, 9/8) ~ (8, 9) / sqrt(145)
    np.testing.assert_allclose(out, [[8 / 65 ** 0.5, 1 / 65 ** 0.5], [8 / 145 ** 0.5, 9 / 145 ** 0.5]], rtol=1e-6)
    # n=1: q1 uses only its first neighbour: (1, 1) / sqrt(2)
    np.testing.assert_allclose(alpha_qe(queries, gallery, indices, scores, n=1)[1], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)


def test_dba_hand_case():
    g = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    # cosines: 01 .6, 02 0, 12 .8; top-1 other neighbour, alpha 1:
    # row 0: + .6 (.6, .8) = (1.36, .48); row 1: + .8 (0, 1) = (.6, 1.6); row 2: + .8 (.6, .8) = (.48, 1.64)
    want = np.array([[1.36, 0.48], [0.6, 1.6], [0.48, 1.64]])
    out = dba(g, n=1, alpha=1.0)
    np.testing.assert_allclose(out, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
    # exclude_self=False: each row is its own first neighbour, so it moves nowhere
    np.testing.assert_allclose(dba(g, n=1, alpha=1.0, exclude_self=False), g, rtol=1e-6)


def test_dba_shapes_normalised_and_memmap(tmp_path):
    _, g, _, _ = _clusters(0, 1.0)
    path = tmp_path / "g.npy"
    np.save(path, g.astype(np.float16))
    out = dba(np.load(path, mmap_mode="r"), n=3)
    assert out.shape == g.shape and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(out, dba(g, n=3), atol=2e-3)  # float16 storage, same augmentation


def test_k_reciprocal_keeps_a_perfect_ranking_perfect():
    q, g, ql, gl = _clusters(1, 0.1)
    assert _map(search(q, g, 10)[1], ql, gl) == 1.0
    scores, idx = k_reciprocal(q, g, k=10, k1=12, k2=3)
    assert _map(idx, ql, gl) == 1.0
    assert scores.dtype == np.float32 and idx.shape == (len(q), 10)
    assert (np.diff(scores, axis=1) <= 0).all()  # negated distances, best first


@pytest.mark.parametrize("seed", range(3))
def test_k_reciprocal_improves_map_where_search_errs(seed):
    q, g, ql, gl = _clusters(seed, 1.5)
    plain = _map(search(q, g, 10)[1], ql, gl)
    assert plain < 0.9  # a case where plain search makes errors
    assert _map(k_reciprocal(q, g, k=10, k1=10, k2=3)[1], ql, gl) >= plain


def test_k_reciprocal_same_set_never_returns_self():
    _, g, _, _ = _clusters(2, 1.0)
    _, idx = k_reciprocal(g, g, k=10, k1=10, k2=3, same_set=True)
    assert idx.shape == (len(g), 10)
    assert not (idx == np.arange(len(g))[:, None]).any()
    small = g[:5]
    assert k_reciprocal(small, small, k=10, k1=3, k2=2, same_set=True)[1].shape == (5, 4)
    with pytest.raises(UserError, match="same_set=True needs the queries to be the gallery rows"):
        k_reciprocal(g[::-1], g, same_set=True)


def test_k_reciprocal_is_for_small_galleries():
    q, g, _, _ = _clusters(0, 1.0)
    with pytest.raises(UserError, match=r"for small galleries.*got 160 items \(queries \+ gallery\), max_items=100"):
        k_reciprocal(q, g, max_items=100)
    with pytest.raises(UserError, match="got 120 items"):
        k_reciprocal(g, g, same_set=True, max_items=100)


def _re_ranking_reference(prob, gal, k1, k2, lambda_value):
    """The authors' `re_ranking` (layumi/Person_reID / zhunzhong07 person-re-ranking), ported line by line
    to numpy, with V in float64 instead of float16 and a stable argsort; returns query x gallery distances."""
    query_num = prob.shape[0]
    feat = np.concatenate([prob, gal]).astype(np.float64)
    all_num = len(feat)
    sq = (feat ** 2).sum(1, keepdims=True)
    original_dist = sq + sq.T - 2 * feat @ feat.T
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist)
    initial_rank = np.argsort(original_dist, kind="stable")
    half = int(np.around(k1 / 2)) + 1
    for i in range(all_num):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        k_reciprocal_index = forward[np.where(backward == i)[0]]
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            c_forward = initial_rank[candidate, :half]
            c_backward = initial_rank[c_forward, :half]
            c_index = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_index, k_reciprocal_index)) > 2 / 3 * len(c_index):
                expansion = np.append(expansion, c_index)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V = np.stack([V[initial_rank[i, :k2]].mean(axis=0) for i in range(all_num)])
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist)
    for i in range(query_num):
        temp_min = np.zeros(all_num)
        for j in np.where(V[i] != 0)[0]:
            temp_min[inv_index[j]] += np.minimum(V[i, j], V[inv_index[j], j])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:, query_num:]


@pytest.mark.parametrize("k1, k2, lambda_value", [(8, 3, 0.3), (20, 6, 0.3), (5, 1, 0.5)])
def test_k_reciprocal_equals_the_reference_implementation(k1, k2, lambda_value):
    q, g, _, _ = _clusters(3, 0.8, n_clusters=6, per_cluster=12, n_queries=25, d=16)
    want = _re_ranking_reference(q, g, k1, k2, lambda_value)
    scores, idx = k_reciprocal(q, g, k=10, k1=k1, k2=k2, lambda_value=lambda_value)
    np.testing.assert_array_equal(idx, np.argsort(want, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(-scores, np.take_along_axis(want, idx, axis=1), atol=1e-6)
