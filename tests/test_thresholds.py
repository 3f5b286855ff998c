import warnings

import numpy as np
import pytest
from sklearn.metrics import fbeta_score

from ensemble.errors import UserError
from ensemble.metrics import fbeta_binary
from ensemble.stack import thresholds as thresholds_module
from ensemble.stack.thresholds import LabelThresholds, best_global_threshold, cross_val_thresholds

AVERAGES = ["samples", "micro", "macro"]


def _data(n=80, c=5, seed=0, decimals=2):
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < np.linspace(0.5, 0.1, c)
    p = np.round(np.clip(0.35 * y + 0.65 * rng.random((n, c)), 0, 1), decimals)  # rounding makes ties
    return y, p


def _candidates(p):
    return np.r_[np.unique(p), np.inf]


def _edge_cases():
    rng = np.random.default_rng(5)
    p = np.round(rng.random((30, 3)), 1)
    yield np.array([[1, 0, 1]]), np.array([[0.3, 0.6, 0.3]])  # a single row, tied
    yield np.zeros((30, 3), dtype=int), p  # nothing true: F is 0 everywhere
    yield np.ones((30, 3), dtype=int), p  # everything true
    yield (rng.random((30, 3)) < 0.4), np.full((30, 3), 0.5)  # one score for all
    yield (rng.random((40, 1)) < 0.4), np.round(rng.random((40, 1)), 1)  # one label


@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (3.0, -1.0), (1e3, 500.0)])  # probabilities, then any scores
def test_global_threshold_is_exact(average, seed, scale, shift):
    y, p = _data(seed=seed)
    p = p * scale + shift
    thr, score = best_global_threshold(y, p, 2.0, average)
    brute = max(fbeta_binary(y, p >= t, 2.0, average) for t in _candidates(p))
    assert score == pytest.approx(brute, abs=1e-12)
    assert fbeta_binary(y, p >= thr, 2.0, average) == pytest.approx(score, abs=1e-12)


@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("case", range(5))
def test_global_threshold_is_exact_on_edge_cases(average, case):
    y, p = list(_edge_cases())[case]
    thr, score = best_global_threshold(y, p, 2.0, average)
    brute = max(fbeta_binary(y, p >= t, 2.0, average) for t in _candidates(p))
    assert score == pytest.approx(brute, abs=1e-12)
    assert fbeta_binary(y, p >= thr, 2.0, average) == pytest.approx(score, abs=1e-12)
    est = LabelThresholds(2.0, average).fit(y, p)
    assert est.score(y, p) == pytest.approx(est.score_, abs=1e-12) and est.score_ >= score - 1e-12


@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("seed, n, c", [(0, 80, 5), (1, 80, 5), (2, 3000, 3)])  # 3000 rows: buckets of several rows
def test_per_label_search_is_a_coordinate_optimum(average, seed, n, c):
    y, p = _data(n=n, c=c, seed=seed)
    est = LabelThresholds(2.0, average).fit(y, p)
    assert est.score(y, p) == pytest.approx(est.score_, abs=1e-12)
    assert est.score_ >= est.global_score_ - 1e-12
    assert all(b >= a - 1e-12 for a, b in zip(est.trajectory_, est.trajectory_[1:]))  # passes never lose
    for j in range(p.shape[1]):  # no single label can do better by brute force over every cut
        for t in _candidates(p[:, j]):
            thresholds = est.thresholds_.copy()
            thresholds[j] = t
            assert fbeta_binary(y, p >= thresholds, 2.0, average) <= est.score_ + 1e-12


@pytest.mark.parametrize("n", [1, 2, 9, 200, 3000])
@pytest.mark.parametrize("spread", ["ties", "continuous", "one_score", "too_close", "too_far"])
def test_cut_search_finds_the_best_cut_and_breaks_ties_upwards(n, spread):
    rng = np.random.default_rng(n)
    scores = {
        "ties": np.round(rng.random(n), 2),
        "continuous": rng.random(n),
        "one_score": np.full(n, 0.25),
        "too_close": 5e-324 * rng.integers(0, 3, n),  # a bucket scale would overflow: one bucket
        "too_far": np.where(rng.random(n) < 0.5, -1e308, 1e308) * rng.random(n),  # the span overflows
    }[spread]
    # weights on a 1/8 grid, many exactly 0: every sum is exact, so ties are exact and must go to the top
    weights = rng.integers(-6, 3, n) / 8 * (rng.random(n) < 0.7)
    search = thresholds_module._CutSearch(scores)
    threshold, value = search.best(weights, 1e-9)
    cuts = np.r_[np.inf, np.unique(scores)[::-1]]  # every set a threshold can pick, highest threshold first
    values = np.array([weights[scores >= t].sum() for t in cuts])
    best = int(np.argmax(values))  # the first: the highest threshold among the best
    assert value == values[best]
    np.testing.assert_array_equal(scores >= threshold, scores >= cuts[best])


def test_f_lookup_table_and_computed_f_agree(monkeypatch):
    y, p = _data(n=300, c=6, seed=6)
    fitted = LabelThresholds().fit(y, p)
    monkeypatch.setattr(thresholds_module, "_MAX_TABLE", 0)  # no table: codes decoded, F computed
    computed = LabelThresholds().fit(y, p)
    np.testing.assert_array_equal(fitted.thresholds_, computed.thresholds_)
    assert fitted.global_threshold_ == computed.global_threshold_
    assert fitted.trajectory_ == computed.trajectory_


def test_beats_the_grid_loop_public_kernels_used():
    # anokas-style: start at 0.2, for each label try 0.01..0.99 with sklearn's samples-averaged F2
    y, p = _data(n=300, c=6, seed=3, decimals=3)
    thresholds = np.full(6, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(6):
            best_t, best = thresholds[j], -1.0
            for t in np.arange(1, 100) / 100:
                thresholds[j] = t
                score = fbeta_score(y, p > thresholds, beta=2, average="samples")
                if score > best:
                    best_t, best = t, score
            thresholds[j] = best_t
        grid = fbeta_score(y, p > thresholds, beta=2, average="samples")
    est = LabelThresholds().fit(y, p)
    assert est.score_ >= grid - 1e-12


def test_hand_case():
    # one label, scores 0.9 (pos), 0.8 (neg), 0.3 (pos), 0.1 (neg); micro F2 per cut k:
    # k=1: tp1 -> 5/(4*2+1)=0.556; k=2: 5/(8+2)=0.5; k=3: 10/(8+3)=0.909; k=4: 10/(8+4)=0.833
    y = np.array([[1], [0], [1], [0]])
    p = np.array([[0.9], [0.8], [0.3], [0.1]])
    thr, score = best_global_threshold(y, p, 2.0, "micro")
    assert score == pytest.approx(10 / 11)
    assert thr == pytest.approx(0.2)  # midpoint between 0.3 and 0.1
    est = LabelThresholds(2.0, "micro").fit(y, p)
    np.testing.assert_allclose(est.thresholds_, [0.2])
    assert est.predict(np.array([[0.25], [0.15]])).ravel().tolist() == [True, False]


def test_label_never_worth_predicting_gets_threshold_above_one():
    y = np.array([[1, 0], [1, 0], [0, 0]])
    p = np.array([[0.9, 0.9], [0.8, 0.8], [0.1, 0.7]])
    est = LabelThresholds(2.0, "micro").fit(y, p)
    assert est.thresholds_[1] > 1.0 and not est.predict(p)[:, 1].any()


def test_cross_validation_is_out_of_fold():
    y, p = _data(n=200, seed=4)
    folds = np.arange(200) % 4
    cv = cross_val_thresholds(y, p, folds)
    assert set(cv["thresholds"]) == {0, 1, 2, 3}
    # fold 0's predictions come from thresholds fitted without fold 0
    est = LabelThresholds().fit(y[folds != 0], p[folds != 0])
    np.testing.assert_array_equal(cv["pred"][folds == 0], est.predict(p[folds == 0]))
    assert cv["score"] == pytest.approx(fbeta_binary(y, cv["pred"], 2.0, "samples"))
    assert cv["score"] <= LabelThresholds().fit(y, p).score_ + 1e-12


def test_errors():
    y, p = _data()
    with pytest.raises(UserError, match=r"'average' parameter must be one of \['samples', 'micro', 'macro'\]"):
        LabelThresholds(average="weighted").fit(y, p)
    with pytest.raises(UserError, match="beta"):
        LabelThresholds(beta=0).fit(y, p)
    with pytest.raises(UserError, match="same shape|one shape"):
        LabelThresholds().fit(y[:, :2], p)
    with pytest.raises(UserError, match="NaN"):
        LabelThresholds().fit(y, np.where(p > 0.5, np.nan, p))
    with pytest.raises(UserError, match="not fitted"):
        LabelThresholds().predict(p)
