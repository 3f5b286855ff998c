import numpy as np
import pytest

from ensemble.errors import UserError
from ensemble.retrieve.metrics import (
    METRIC_NAMES,
    count_relevant,
    leave_one_out,
    map_at_k,
    ranked_hits,
    retrieval_scores,
)


def _row(*ranks, k=10):
    """A hits row of length k with hits at the given 1-based ranks."""
    row = np.zeros(k, dtype=bool)
    row[[r - 1 for r in ranks]] = True
    return row


def test_map_divides_by_min_relevant_k_not_by_hits():
    # 4 right answers, found at ranks 1 and 3: (P@1 + P@3) / min(4, 10) = (1 + 2/3) / 4 = 5/12.
    # Dividing by the 2 hits found would give 5/6: a ranking that misses half the answers scores high.
    scores = retrieval_scores(_row(1, 3)[None], np.array([4]))
    assert scores["map@10"] == pytest.approx(5 / 12)
    # 15 right answers, 10 hits in the top 10: min(15, 10) = 10, so a perfect top 10 is 1.
    assert retrieval_scores(np.ones((1, 10), bool), np.array([15]))["map@10"] == pytest.approx(1.0)


def test_map_at_k_ignores_duplicate_predictions():
    # [7, 7, 3, 5] -> [7, 3, 5] (the second 7 takes no rank): hits at ranks 2 and 3:
    # (1/2 + 2/3) / min(2, 3) = 7/12. Without the dedupe the top 3 would be [7, 7, 3]: 1/6.
    assert map_at_k([[7, 7, 3, 5]], [{3, 5}], k=3) == pytest.approx(7 / 12)
    # a repeated hit counts once: [3, 3, 5] -> [3, 5]: (1 + 1) / 2 = 1 (counted twice it would be 1.5)
    assert map_at_k([[3, 3, 5]], [{3, 5}], k=3) == pytest.approx(1.0)


def test_query_without_relevant_item_is_excluded_and_counted():
    # query labels a, b, z; gallery a, a, b, c: z has no right answer
    q, g = np.array(["a", "b", "z"]), np.array(["a", "a", "b", "c"])
    n_relevant = count_relevant(q, g)
    assert n_relevant.tolist() == [2, 1, 0]
    indices = np.array([[0, 2, 1], [3, 2, 0], [0, 1, 2]])
    hits = ranked_hits(q, g, indices)
    assert hits.tolist() == [[True, False, True], [False, True, False], [False, False, False]]
    s = retrieval_scores(hits, n_relevant)
    # a: (1 + 2/3) / 2 = 5/6; b: (1/2) / 1 = 1/2; z left out of the means
    assert s["map@10"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert s["top1"] == pytest.approx(0.5)
    assert (s["queries"], s["no_relevant"]) == (2, 1)
    # the list-based reference agrees and leaves z out too
    assert map_at_k([[0, 2, 1], [3, 2, 0], [0, 1, 2]], [{0, 1}, {2}, set()]) == pytest.approx(2 / 3)


def test_no_scorable_query_gives_nan_means():
    s = retrieval_scores(np.zeros((2, 3), bool), np.array([0, 0]))
    assert np.isnan(s["map@10"]) and np.isnan(s["top1"]) and np.isnan(s["digix"]) and np.isnan(s["recall@5"])
    assert (s["queries"], s["no_relevant"]) == (0, 2)
    assert np.isnan(map_at_k([[1, 2]], [set()]))


def test_fewer_gallery_items_than_k():
    # a 3-item gallery: hits has 3 columns; hits at ranks 2 and 3 of 2 relevant: (1/2 + 2/3) / 2 = 7/12
    s = retrieval_scores(_row(2, 3, k=3)[None], np.array([2]))
    assert s["map@10"] == pytest.approx(7 / 12)
    assert (s["top1"], s["recall@5"], s["recall@10"]) == (0.0, 1.0, 1.0)


def test_top1_recall_digix_exact():
    hits = np.stack([_row(1),      # 1 relevant:  AP 1,               top1 1, r@5 1, r@10 1
                     _row(7),      # 2 relevant:  AP (1/7) / 2 = 1/14, top1 0, r@5 0, r@10 1
                     _row(),       # 5 relevant:  AP 0,               all 0
                     _row(2, 3)])  # 2 relevant:  AP (1/2 + 2/3) / 2 = 7/12, r@5 1, r@10 1
    s = retrieval_scores(hits, np.array([1, 2, 5, 2]))
    # map = (1 + 1/14 + 0 + 7/12) / 4 = (84 + 6 + 49) / 84 / 4 = 139/336
    assert s["map@10"] == pytest.approx(139 / 336)
    assert s["top1"] == pytest.approx(1 / 4)
    assert s["digix"] == pytest.approx(0.5 / 4 + 0.5 * 139 / 336)  # = 223/672
    assert (s["recall@5"], s["recall@10"]) == (0.5, 0.75)
    assert set(METRIC_NAMES) <= set(s)


def test_map_k_names_the_key_and_truncates():
    # map@3 of hits at ranks 1 and 5 with 2 relevant: only rank 1 counts: 1 / min(2, 3) = 1/2
    s = retrieval_scores(_row(1, 5)[None], np.array([2]), map_k=3, recall_ks=(1,))
    assert s["map@3"] == pytest.approx(0.5) and s["recall@1"] == 1.0 and "map@10" not in s


def test_ranked_hits_padding_never_hits():
    hits = ranked_hits(np.array([0, 1]), np.array([1, 0, 0]), np.array([[1, -1, 2], [-1, -1, 0]]))
    assert hits.tolist() == [[True, False, True], [False, False, True]]


def test_count_relevant_exclude_self():
    labels = np.array([3, 1, 3, 3, 7])
    assert count_relevant(labels, labels).tolist() == [3, 1, 3, 3, 1]
    assert count_relevant(labels, labels, exclude_self=True).tolist() == [2, 0, 2, 2, 0]
    assert count_relevant(np.array([9, 1]), labels).tolist() == [0, 1]
    with pytest.raises(UserError, match="exclude_self"):
        count_relevant(labels[:2], labels, exclude_self=True)


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_scores_equal_list_reference(seed):
    rng = np.random.default_rng(seed)
    nq, ng, k = 60, 40, 10
    q_labels, g_labels = rng.integers(0, 8, nq), rng.integers(0, 10, ng)
    indices = np.array([rng.permutation(ng)[:k] for _ in range(nq)])
    indices[rng.random((nq, k)) < 0.1] = -1  # some padding
    indices = -np.sort(-indices, axis=1)      # padding at the end of each row, as search returns it
    hits = ranked_hits(q_labels, g_labels, indices)
    fast = retrieval_scores(hits, count_relevant(q_labels, g_labels))["map@10"]
    predicted = [[int(i) for i in row if i >= 0] for row in indices]
    relevant = [set(np.flatnonzero(g_labels == label).tolist()) for label in q_labels]
    assert fast == pytest.approx(map_at_k(predicted, relevant, k=k), abs=1e-12)
    assert 0 <= fast <= 1


def test_leave_one_out_hand_case():
    # a=(1,0) b=(.8,.6) c=(0,1) d=(-.6,.8), labels 0 1 0 1; cosines ab .8 ac 0 ad -.6 bc .6 bd 0 cd .8
    # a: b c d -> hits 0 1 0 -> AP 1/2    b: a c d -> 0 0 1 -> 1/3
    # c: d b a -> 0 0 1      -> 1/3       d: c b a -> 0 1 0 -> 1/2
    emb = np.array([[1, 0], [0.8, 0.6], [0, 1], [-0.6, 0.8]], dtype=np.float32)
    s = leave_one_out(emb, np.array([0, 1, 0, 1]))
    assert s["map@10"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)  # 5/12
    assert s["top1"] == 0.0 and s["recall@5"] == 1.0
    assert s["digix"] == pytest.approx(5 / 24)
    assert (s["queries"], s["no_relevant"]) == (4, 0)
    # labels 0 0 1 2: a and b find each other first; c and d have no other row of their label
    s = leave_one_out(emb, np.array([0, 0, 1, 2]))
    assert (s["map@10"], s["top1"], s["queries"], s["no_relevant"]) == (1.0, 1.0, 2, 2)


def test_leave_one_out_needs_one_label_per_row():
    with pytest.raises(UserError, match="one label per embedding row"):
        leave_one_out(np.eye(3, dtype=np.float32), [0, 1])
