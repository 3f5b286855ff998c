import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from ensemble.errors import UserError
from ensemble.metrics import METRICS, accuracy, average_precision, fbeta, fbeta_binary, get_metric, log_loss


def _multiclass(n=200, c=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    proba = rng.dirichlet(np.ones(c), n)
    return np.eye(c)[labels], proba, labels


def _multilabel(n=200, c=6, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(float)
    y[:5] = 0  # rows without labels: 0/0 cases
    proba = np.round(np.clip(0.3 * y + 0.7 * rng.random((n, c)), 0, 1), 2)  # rounded: tied scores
    return y, proba


def test_log_loss_matches_sklearn_and_hand_value():
    y, proba, labels = _multiclass()
    assert log_loss(y, proba) == pytest.approx(skm.log_loss(labels, proba, labels=range(5)), rel=1e-12)
    # hand case: -(ln 0.8 + ln 0.5) / 2
    assert log_loss([[1, 0], [0, 1]], [[0.8, 0.2], [0.5, 0.5]]) == pytest.approx(-(np.log(0.8) + np.log(0.5)) / 2)


def test_log_loss_clips_and_renormalises_like_kaggle():
    # a zero probability on the true class costs -ln(1e-15), not inf
    assert log_loss([[1, 0]], [[0.0, 1.0]]) == pytest.approx(-np.log(1e-15), rel=1e-6)
    # rows are renormalised: halving a row changes nothing
    y, proba, _ = _multiclass(50)
    assert log_loss(y, 0.5 * proba) == pytest.approx(log_loss(y, proba), rel=1e-12)


def test_log_loss_soft_targets_is_cross_entropy():
    y = np.array([[0.5, 0.25, 0.25], [0.0, 0.2, 0.8]])
    p = np.array([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    expected = -np.mean([(y[i] * np.log(p[i])).sum() for i in range(2)])
    assert log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_multilabel_log_loss_is_mean_binary_log_loss():
    y, p = _multilabel()
    p = np.clip(p, 0.01, 0.99)
    expected = np.mean([skm.log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(y.shape[1])])
    assert log_loss(y, p, "multilabel") == pytest.approx(expected, rel=1e-12)


def test_accuracy_both_tasks():
    y, proba, labels = _multiclass()
    assert accuracy(y, proba) == skm.accuracy_score(labels, proba.argmax(1))
    ym, pm = _multilabel()
    assert accuracy(ym, pm, "multilabel") == skm.accuracy_score(ym.astype(int), (pm >= 0.5).astype(int))


@pytest.mark.parametrize("average", ["samples", "micro", "macro"])
@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_fbeta_matches_sklearn(average, beta):
    y, p = _multilabel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for thr in (0.3, 0.5, np.linspace(0.2, 0.7, 6)):
            expected = skm.fbeta_score(y.astype(int), (p >= thr).astype(int), beta=beta, average=average)
            assert fbeta(y, p, "multilabel", beta, average, thr) == pytest.approx(expected, abs=1e-12)


def test_fbeta_multiclass_uses_argmax():
    y, proba, labels = _multiclass()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = skm.fbeta_score(labels, proba.argmax(1), beta=2, average="macro", labels=range(5))
    assert fbeta(y, proba, "multiclass", 2.0, "macro") == pytest.approx(expected, abs=1e-12)
    # one label per row: samples-averaged F equals accuracy
    assert fbeta(y, proba, "multiclass") == pytest.approx(accuracy(y, proba))


def test_fbeta_hand_case():
    # image 1: tp=1, fn=1, fp=0 -> F2 = 5*1 / (4*2 + 1) = 5/9; image 2: nothing true, nothing predicted -> 0
    assert fbeta_binary([[1, 1], [0, 0]], [[1, 0], [0, 0]], 2.0) == pytest.approx((5 / 9 + 0) / 2)


def test_map_matches_sklearn_with_ties():
    y, p = _multilabel()
    expected = np.mean([skm.average_precision_score(y[:, j], p[:, j]) for j in range(y.shape[1])])
    assert average_precision(y, p, "multilabel") == pytest.approx(expected, abs=1e-12)
    yc, pc, labels = _multiclass()
    expected = np.mean([skm.average_precision_score(labels == c, pc[:, c]) for c in range(5)])
    assert average_precision(yc, pc) == pytest.approx(expected, abs=1e-12)


def test_registry_and_modes():
    assert {"log_loss", "accuracy", "f2", "fbeta", "map"} <= set(METRICS)
    assert get_metric("log_loss").mode == "min" and get_metric("map").mode == "max"
    assert get_metric("log_loss").is_better(0.1, 0.2) and get_metric("accuracy").is_better(0.9, 0.8)
    assert get_metric("fbeta", beta=1).name == "f1" and get_metric("f2", average="micro").name == "f2_micro"
    y, p = _multilabel()
    assert get_metric("fbeta", beta=1)(y, p, "multilabel") == pytest.approx(fbeta(y, p, "multilabel", 1.0))


def test_unknown_metric_lists_allowed_names():
    with pytest.raises(UserError, match=r"must be one of \['accuracy', 'f2', 'fbeta', 'log_loss', 'map'\]. Got 'auc'"):
        get_metric("auc")
    with pytest.raises(UserError, match="average"):
        get_metric("f2", average="weighted")
    with pytest.raises(UserError, match="shape"):
        log_loss(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(UserError, match="task"):
        accuracy(np.ones((3, 2)), np.ones((3, 2)), "regression")
