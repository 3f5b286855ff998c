"""Neighbour smoothing of the stack's winner (ensemble.stack.smooth): synthetic runs with emb/ files.

The end-to-end case (predict --embeddings on a real tiny run, then the smoothing on its files) is
in tests/test_predict.py, which holds the trained sweep it needs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ensemble.metrics import get_metric
from ensemble.run import Run
from ensemble.stack.core import MethodResult
from ensemble.stack.oof import StackData
from ensemble.stack.smooth import NO_EMBEDDINGS, find_neighbours, neighbour_mean, neighbour_smoothing

LOG_LOSS = get_metric("log_loss")
C = 5


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _noisy(y: np.ndarray, task: str, rng, signal=2.0, noise=1.5) -> np.ndarray:
    z = signal * (2 * y - 1) + noise * rng.standard_normal(y.shape)
    return _softmax(z) if task == "multiclass" else 1 / (1 + np.exp(-z))


def _write_emb(model_dir, name: str, ids, emb, rng, folds=None) -> None:
    """emb/<name>.npy and its ids as predict writes them (float16), rows in a shuffled order: read by id."""
    order = rng.permutation(len(ids))
    (model_dir / "emb").mkdir(parents=True, exist_ok=True)
    np.save(model_dir / "emb" / f"{name}.npy", np.asarray(emb, np.float16)[order])
    frame = pd.DataFrame({"id": np.asarray(ids)[order]})
    if folds is not None:
        frame["fold"] = np.asarray(folds)[order]
    frame.to_parquet(model_dir / "emb" / f"{name}.ids.parquet")


def make_data(tmp_path, y, oof, folds, test, oof_emb=None, test_emb=None, task="multiclass", models=("m0",),
              with_emb=None, seed=0) -> StackData:
    """A StackData over a run directory whose models' emb/ files hold `oof_emb` / `test_emb`.

    `oof`, `test`: models x rows x classes. `with_emb`: the models that have embeddings [all]."""
    rng = np.random.default_rng(seed)
    oof, test = np.asarray(oof), np.asarray(test)
    ids = np.array([f"r{i}" for i in range(len(y))], dtype=object)
    test_ids = np.array([f"t{i}" for i in range(test.shape[1])], dtype=object)
    for model_id in models:
        model_dir = tmp_path / "models" / model_id
        model_dir.mkdir(parents=True)
        has = with_emb is None or model_id in with_emb
        (model_dir / "predict.json").write_text(json.dumps({"tta": "orig", "embeddings": True} if has else {"tta": "orig"}))
        if has:
            _write_emb(model_dir, "oof", ids, oof_emb, rng, folds)
            _write_emb(model_dir, "test", test_ids, test_emb, rng)
    return StackData(run=Run(tmp_path), task=task, classes=[f"c{j}" for j in range(y.shape[1])],
                     target={"form": "label", "column": "label"}, model_ids=list(models), ids=ids,
                     folds=np.asarray(folds), y_true=y, oof=np.asarray(oof), test_ids=test_ids, test=np.asarray(test))


def winner_of(data: StackData, metric=LOG_LOSS, m: int = 0) -> MethodResult:
    score = metric(data.y_true, data.oof[m], data.task)
    return MethodResult("mean", metric.name, score, score, data.oof[m], data.test[m])


def clustered(task: str, rng, n_clusters=150, size=8, dims=32):
    """Clusters of near-duplicate rows sharing their labels (one driver's frames), spread over 3 folds."""
    cluster = np.repeat(np.arange(n_clusters), size)
    centres = rng.standard_normal((n_clusters, dims))
    if task == "multiclass":
        y = np.eye(C)[rng.integers(0, C, n_clusters)][cluster]
    else:
        y = (rng.random((n_clusters, C)) < 0.4).astype(float)[cluster]
    emb = centres[cluster] + 0.3 * rng.standard_normal((len(cluster), dims))
    return y, emb, rng.integers(0, 3, len(cluster))


# --------------------------------------------------------------------------- the numpy pieces, by hand


def test_neighbours_and_their_weighted_mean_by_hand():
    emb = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0], [0, 0]], dtype=float)  # row 4: no embedding
    groups = np.array([0, 0, 0, 0, 0])
    index, weight = find_neighbours(emb, groups, 3)
    np.testing.assert_array_equal(index[0], [1, 2, 3])  # cosines 0.8, 0, -1
    np.testing.assert_allclose(weight[0], [0.8, 0, 0], atol=1e-6)  # max(cos, 0)
    np.testing.assert_array_equal(index[4], [-1, -1, -1])
    assert not (index == 4).any()  # a zero row is nobody's neighbour
    proba = np.array([[1.0, 0], [0.5, 0.5], [0, 1], [0.2, 0.8], [0.9, 0.1]])
    mean = neighbour_mean(proba, index, weight, 2)
    np.testing.assert_allclose(mean[0], proba[1])  # row 2 weighs 0
    np.testing.assert_allclose(mean[1], (0.8 * proba[0] + 0.6 * proba[2]) / 1.4)
    np.testing.assert_array_equal(mean[4], proba[4])  # no neighbour: its own row
    index, _ = find_neighbours(emb, np.array([0, 1, 0, 1, 0]), 3)  # groups: never across them
    assert index[0].tolist() == [2, -1, -1] and index[1].tolist() == [3, -1, -1]


# --------------------------------------------------------------------------- the stack's step


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_clustered_rows_are_smoothed_and_it_is_chosen(tmp_path, task):
    rng = np.random.default_rng(0)
    y, emb, folds = clustered(task, rng)
    y_test, test_emb, _ = clustered(task, rng, n_clusters=40)
    data = make_data(tmp_path, y, [_noisy(y, task, rng)], folds, [_noisy(y_test, task, rng)], emb, test_emb, task)
    winner = winner_of(data)
    row, files, line = neighbour_smoothing(data, winner, LOG_LOSS, data.run)
    assert row.method == "mean+smooth" and row.cv_score < 0.95 * winner.cv_score, (row.cv_score, winner.cv_score)
    assert row.in_sample_score <= row.cv_score + 1e-12  # the best grid point on all rows
    assert "the submission is mean+smooth" in line
    doc = json.loads(files["smoothing.json"])
    assert doc["used"] and doc["embedding_model"] == "m0" and doc["cv_score_without"] == winner.cv_score
    assert set(doc["fold_choice"]) == {"0", "1", "2"} and len(doc["grid"]) == 20
    assert LOG_LOSS(y_test, row.test, task) < LOG_LOSS(y_test, winner.test, task)  # the test rows gain too
    if task == "multiclass":
        np.testing.assert_allclose(row.oof.sum(1), 1, atol=1e-12)
        np.testing.assert_allclose(row.test.sum(1), 1, atol=1e-12)
    assert ((row.oof >= 0) & (row.oof <= 1)).all()


def test_random_embeddings_do_not_help_and_the_row_says_so(tmp_path):
    """Calibrated predictions, neighbours unrelated to the labels: any smoothing can only hurt."""
    rng = np.random.default_rng(1)
    n = 2000
    p = rng.dirichlet(np.full(C, 0.5), n)
    y = np.eye(C)[[rng.choice(C, p=row) for row in p]]
    data = make_data(tmp_path, y, [p], rng.integers(0, 3, n), [rng.dirichlet(np.ones(C), 50)],
                     rng.standard_normal((n, 32)), rng.standard_normal((50, 32)))
    winner = winner_of(data)
    row, files, line = neighbour_smoothing(data, winner, LOG_LOSS, data.run)
    assert row.cv_score > winner.cv_score  # reported honestly; the caller keeps the winner
    assert "not better: the submission stays mean" in line
    assert not json.loads(files["smoothing.json"])["used"]


def test_the_oof_search_never_crosses_folds(tmp_path):
    """Every row's nearest neighbour is its duplicate in the other fold, the weak prediction's twin carrying
    the truth: a search across folds would gain a lot from it, the fold-wise one must not."""
    rng = np.random.default_rng(2)
    pairs = 600
    y = np.eye(C)[rng.integers(0, C, pairs)]
    e = rng.standard_normal((pairs, 32))
    weak, strong = _noisy(y, "multiclass", rng, 0.25, 1.0), _noisy(y, "multiclass", rng, 1.5, 0.25)
    first = rng.integers(0, 2, pairs)
    folds = np.concatenate([first, 1 - first])
    emb, y2, oof = np.concatenate([e, e]), np.concatenate([y, y]), np.concatenate([weak, strong])
    data = make_data(tmp_path, y2, [oof], folds, [oof[:50]], emb, emb[:50])
    winner = winner_of(data)
    row, _, _ = neighbour_smoothing(data, winner, LOG_LOSS, data.run)
    assert row.cv_score >= winner.cv_score, (row.cv_score, winner.cv_score)

    from ensemble.stack.smooth import cross_val_smoothing

    index, _ = find_neighbours(emb, folds, 10)
    assert (folds[index] == folds[:, None]).all()  # every neighbour from the row's own fold
    index, weight = find_neighbours(emb, np.zeros(len(emb)), 10)  # the leak, on purpose: all rows as one set
    leaked = cross_val_smoothing(y2, oof, folds, index, weight, LOG_LOSS, "multiclass")
    assert leaked.cv_score < winner.cv_score - 0.1  # what a crossing search would have claimed


def test_rows_without_an_embedding_are_left_as_they_are(tmp_path):
    rng = np.random.default_rng(3)
    y, emb, folds = clustered("multiclass", rng)
    y_test, test_emb, _ = clustered("multiclass", rng, n_clusters=40)
    zero, zero_test = rng.choice(len(y), 30, replace=False), rng.choice(len(y_test), 10, replace=False)
    emb[zero], test_emb[zero_test] = 0, 0  # unreadable images: predict writes zero rows
    data = make_data(tmp_path, y, [_noisy(y, "multiclass", rng)], folds, [_noisy(y_test, "multiclass", rng)],
                     emb, test_emb)
    winner = winner_of(data)
    row, files, _ = neighbour_smoothing(data, winner, LOG_LOSS, data.run)
    np.testing.assert_array_equal(row.oof[zero], winner.oof[zero])
    np.testing.assert_array_equal(row.test[zero_test], winner.test[zero_test])
    others = np.setdiff1d(np.arange(len(y)), zero)
    assert (row.oof[others] != winner.oof[others]).any(axis=1).mean() > 0.9  # the rest were smoothed
    assert json.loads(files["smoothing.json"])["rows_without_neighbours"] == {"oof": 30, "test": 10}
    index, _ = find_neighbours(emb, folds, 10)
    assert not np.isin(index, zero).any()


def test_embeddings_of_the_best_model_that_has_them_or_a_note(tmp_path):
    rng = np.random.default_rng(4)
    y, emb, folds = clustered("multiclass", rng, n_clusters=30)
    good, bad = _noisy(y, "multiclass", rng, 3.0, 1.0), _noisy(y, "multiclass", rng, 0.5, 1.0)
    test = np.stack([good[:20], bad[:20]])
    data = make_data(tmp_path / "a", y, [bad, good], folds, test, emb, emb[:20], models=("weak", "strong"))
    row, files, _ = neighbour_smoothing(data, winner_of(data), LOG_LOSS, data.run)
    assert json.loads(files["smoothing.json"])["embedding_model"] == "strong"  # the best single model
    data = make_data(tmp_path / "b", y, [bad, good], folds, test, emb, emb[:20], models=("weak", "strong"),
                     with_emb=("weak",))
    row, files, _ = neighbour_smoothing(data, winner_of(data), LOG_LOSS, data.run)
    assert json.loads(files["smoothing.json"])["embedding_model"] == "weak"  # the best one that has them
    data = make_data(tmp_path / "c", y, [bad, good], folds, test, models=("weak", "strong"), with_emb=())
    assert neighbour_smoothing(data, winner_of(data), LOG_LOSS, data.run) == (None, {}, NO_EMBEDDINGS)
