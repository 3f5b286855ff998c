import numpy as np
import pytest

from ensemble.errors import UserError
from ensemble.metrics import get_metric
from ensemble.stack import select
from ensemble.stack.select import GreedySelection, cross_val_predict


def _two_class(true_class_proba, labels):
    """models x rows x 2 probabilities from each model's probability of the true class."""
    q = np.asarray(true_class_proba, dtype=float)
    proba = np.empty(q.shape + (2,))
    proba[..., 0] = np.where(labels == 0, q, 1 - q)
    proba[..., 1] = 1 - proba[..., 0]
    return proba


LABELS = np.array([0, 0, 1, 1])
HAND = _two_class([[0.9, 0.9, 0.45, 0.45],  # A: best single, strong on rows 1-2
                   [0.4, 0.4, 0.9, 0.9],  # B: strong on rows 3-4
                   [0.6, 0.6, 0.6, 0.6]], LABELS)  # C: flat
Y_HAND = np.eye(2)[LABELS]


def _ll(q12, q34):
    return -(np.log(q12) + np.log(q34)) / 2


def test_hand_case_steps():
    est = GreedySelection("log_loss", iterations=4).fit(HAND, Y_HAND)
    # step 0: A alone; 1: +B (rows at .65/.675); 2: +A (2.2/3, 1.8/3); 3: +B; 4: +A (3.5/5, 3.15/5)
    assert est.indices_.tolist() == [[0, 1, 0, 1, 0]]
    expected = [_ll(0.9, 0.45), _ll(0.65, 0.675), _ll(2.2 / 3, 1.8 / 3), _ll(0.65, 0.675), _ll(0.7, 0.63)]
    np.testing.assert_allclose(est.trajectory_, expected, rtol=1e-12)
    assert est.best_step_ == 4
    assert est.counts_.tolist() == [3, 2, 0]
    np.testing.assert_allclose(est.weights_, [0.6, 0.4, 0.0])
    assert est.score_ == pytest.approx(_ll(0.7, 0.63))


def test_hand_case_keeps_the_best_prefix():
    # with 3 iterations the last step (+B) is worse than step 2: the ensemble stops at A, B, A
    est = GreedySelection("log_loss", iterations=3).fit(HAND, Y_HAND)
    assert est.best_step_ == 2
    np.testing.assert_allclose(est.weights_, [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(est.predict(HAND), np.tensordot([2 / 3, 1 / 3, 0], HAND, axes=1))


def test_sorted_initialisation():
    est = GreedySelection("log_loss", iterations=0, init_size=2).fit(HAND, Y_HAND)
    # A is best alone; B and C tie mathematically (ln .4 + ln .9 = 2 ln .6), so whichever rounds lower is 2nd
    assert est.indices_[0, 0] == 0 and est.indices_.shape == (1, 2)


def test_ties_go_to_the_lowest_index():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    good = np.eye(3)[labels] * 0.6 + 0.4 / 3
    proba = np.stack([rng.dirichlet(np.ones(3), 60), good, good.copy(), good.copy()])
    est = GreedySelection("log_loss", iterations=3).fit(proba, np.eye(3)[labels])
    assert set(est.indices_.ravel().tolist()) == {1}  # never 2 or 3, their exact copies


def _random_models(n_models=8, n=300, c=4, seed=0, task="multiclass", decimals=None):
    rng = np.random.default_rng(seed)
    if task == "multiclass":
        y = np.eye(c)[rng.integers(0, c, n)]
        z = y[None] * rng.uniform(0.5, 2.5, (n_models, 1, c)) + rng.normal(size=(n_models, n, c))
        proba = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    else:
        y = (rng.random((n, c)) < 0.3).astype(float)
        proba = 1 / (1 + np.exp(-(y[None] * rng.uniform(0.5, 2.5, (n_models, 1, c)) - 1 + rng.normal(size=(n_models, n, c)))))
    if decimals is not None:
        proba = np.round(proba, decimals)
    return proba, y


@pytest.mark.parametrize("metric,task", [("log_loss", "multiclass"), ("accuracy", "multiclass"), ("map", "multiclass"),
                                         ("log_loss", "multilabel"), ("f2", "multilabel"), ("accuracy", "multilabel")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worse_than_best_single_and_trajectory_is_exact(metric, task, seed):
    proba, y = _random_models(seed=seed, task=task)
    m = get_metric(metric)
    est = GreedySelection(metric, task, iterations=15).fit(proba, y)
    best_single = min(m.sign() * m(y, p, task) for p in proba)
    assert m.sign() * est.score_ <= best_single + 1e-12
    for step in (0, 5, len(est.trajectory_) - 1):
        picks = est.indices_[0, : step + 1]
        assert est.trajectory_[step] == pytest.approx(m(y, proba[picks].mean(axis=0), task), abs=1e-12)


@pytest.mark.parametrize("case", ["hard", "soft", "unnormalised", "float32", "multilabel", "accuracy_ties"])
def test_vectorised_scorers_equal_one_metric_call_per_candidate(case):
    task = "multilabel" if case == "multilabel" else "multiclass"
    proba, y = _random_models(seed=5, task=task, decimals=1 if case == "accuracy_ties" else None)
    if case == "soft":
        y = 0.7 * y + 0.3 * np.random.default_rng(1).dirichlet(np.ones(4), len(y))
    if case == "unnormalised":
        proba = proba * np.random.default_rng(2).uniform(0.999, 1.001, proba.shape[:2])[..., None]
    if case == "float32":
        proba = proba.astype(np.float32)
    if case == "accuracy_ties":
        proba[3] = proba[1]
    metric = get_metric("accuracy" if case == "accuracy_ties" else "log_loss")
    fast = select._make_scorer(metric, task, proba, y)
    slow = select._generic(metric, task, proba, y)
    assert fast is not slow
    models = np.arange(len(proba))
    for total, n_picks in [(np.zeros(y.shape), 0), (proba[1] + proba[3].astype(float), 2)]:
        tol = 1e-12 if case == "accuracy_ties" else 1e-6  # log loss candidates are compared in float32
        np.testing.assert_allclose(fast(total, n_picks, models), slow(total, n_picks, models), atol=tol)


def test_bagging_is_seeded_and_sums_bag_counts():
    proba, y = _random_models(n_models=10, seed=3)
    a = GreedySelection(iterations=5, bagging=4, random_state=7).fit(proba, y)
    b = GreedySelection(iterations=5, bagging=4, random_state=7).fit(proba, y)
    np.testing.assert_array_equal(a.counts_, b.counts_)
    assert a.indices_.shape == (4, 6)
    assert a.counts_.sum() == 4 * (a.best_step_ + 1)
    assert a.score_ == pytest.approx(min(a.trajectory_))  # log loss: the kept step is the best one
    assert len(a.trajectory_) == 6 and a.weights_.sum() == pytest.approx(1.0)


def test_cross_val_predict_selects_without_the_held_out_fold():
    proba, y = _random_models(seed=4)
    folds = np.arange(len(y)) % 3
    pred, weights = cross_val_predict(GreedySelection(iterations=8), proba, y, folds)
    assert set(weights) == {0, 1, 2}
    ref = GreedySelection(iterations=8).fit(proba[:, folds != 1], y[folds != 1])
    np.testing.assert_allclose(weights[1], ref.weights_)
    np.testing.assert_allclose(pred[folds == 1], ref.predict(proba[:, folds == 1]))


def test_errors_name_the_parameter():
    proba, y = _random_models()
    with pytest.raises(UserError, match=r"must be one of \['accuracy', 'f2', 'fbeta', 'log_loss', 'map'\]. Got 'auc'"):
        GreedySelection("auc").fit(proba, y)
    with pytest.raises(UserError, match="'init_size' parameter of GreedySelection must be <= the number of models"):
        GreedySelection(init_size=99).fit(proba, y)
    with pytest.raises(UserError, match="'iterations' parameter"):
        GreedySelection(iterations=-1).fit(proba, y)
    with pytest.raises(UserError, match="shape"):
        GreedySelection().fit(proba[0], y)
    with pytest.raises(UserError, match="NaN"):
        GreedySelection().fit(np.where(proba > 0.9, np.nan, proba), y)
    with pytest.raises(UserError, match="not fitted"):
        GreedySelection().predict(proba)


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_select_ensemble_script_smoke(tmp_path, capsys):
    from stack_fixtures import write_run

    run = write_run(tmp_path / "run", n=200, seed=5)
    _script("select_ensemble").main(["--run", str(run), "--metric", "log_loss", "--iterations", "50", "--smoke"])
    out = capsys.readouterr().out
    assert out.count("  step ") == 6 and "weights:" in out and "cross-validated over 4 folds" in out
    assert _script("select_ensemble").main(["--run", str(tmp_path / "missing")]) == 2


def test_bench_stack_smoke(capsys):
    _script("bench_stack").main(["--smoke"])
    out = capsys.readouterr().out
    assert "speed-up" in out and "log_loss  float32" in out and "python -m ensemble.stack" in out
