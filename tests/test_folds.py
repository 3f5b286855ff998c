"""ensemble.data.folds on the real demo manifests (MNIST digits), plus small hand cases."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import ensemble.data.folds as folds_module
from ensemble.data.demo_data import demo_manifest
from ensemble.data.folds import STRATEGIES, fold_summary, make_folds
from ensemble.errors import UserError

K = 5


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The three labelled demo manifests, exported once into a temporary data dir."""
    root = tmp_path_factory.mktemp("ensemble_data")
    frames = {v: pd.read_csv(demo_manifest(v, root=root)) for v in ("multiclass", "multilabel", "grouped")}
    # Guard: stratification tests mean nothing on a single class.
    assert frames["multiclass"]["label"].nunique() == 10, (
        "the demo manifest must hold the 10 digits, got "
        f"{frames['multiclass']['label'].value_counts().to_dict()} (see ensemble/data/demo_data.py)"
    )
    return frames


def class_indices(labels: pd.Series) -> np.ndarray:
    return np.unique(labels.to_numpy(), return_inverse=True)[1]


def multi_hot(tags: pd.Series) -> np.ndarray:
    return tags.str.get_dummies(sep=" ").to_numpy()


def inputs(demo: dict[str, pd.DataFrame], strategy: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(y, groups) from the manifest that fits the strategy."""
    if strategy == "multilabel":
        return multi_hot(demo["multilabel"]["tags"]), None
    if strategy in ("group", "stratified_group"):
        grouped = demo["grouped"]
        return class_indices(grouped["label"]), grouped["group"].to_numpy()
    return class_indices(demo["multiclass"]["label"]), None


def partition(folds: np.ndarray) -> np.ndarray:
    """Folds renumbered by first appearance: equal iff the same rows are held out together."""
    _, first = np.unique(folds, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[folds]


def spread(y: np.ndarray, folds: np.ndarray) -> float:
    """Mean over labels of the std across folds of the label's positive fraction."""
    return float(pd.DataFrame(y).groupby(folds).mean().std(ddof=0).mean())


# --- every strategy on the demo manifests -------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_row_gets_one_fold_and_no_fold_is_empty(demo, strategy):
    y, groups = inputs(demo, strategy)
    folds = make_folds(y, K, strategy, seed=0, groups=groups)
    assert folds.shape == (len(y),) and folds.dtype == np.int64
    assert folds.min() >= 0 and folds.max() < K
    assert (np.bincount(folds, minlength=K) > 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_folds_other_seed_other_folds(demo, strategy):
    y, groups = inputs(demo, strategy)
    first = make_folds(y, K, strategy, seed=0, groups=groups)
    np.testing.assert_array_equal(make_folds(y, K, strategy, seed=0, groups=groups), first)
    for seed in (1, 2):
        other = make_folds(y, K, strategy, seed=seed, groups=groups)
        # Different rows held out together, not only the same folds renumbered.
        assert not np.array_equal(partition(other), partition(first)), seed


@pytest.mark.parametrize("strategy", ["group", "stratified_group"])
def test_no_group_appears_in_two_folds(demo, strategy):
    y, groups = inputs(demo, strategy)
    for seed in range(3):
        folds = make_folds(y, K, strategy, seed=seed, groups=groups)
        folds_per_group = pd.Series(folds).groupby(groups).nunique()
        assert (folds_per_group == 1).all()
        assert len(folds_per_group) == 12


def test_stratified_class_counts_within_one_of_ideal(demo):
    y, _ = inputs(demo, "stratified")
    for seed in range(3):
        counts = fold_summary(y, make_folds(y, K, "stratified", seed=seed)).drop(columns="rows")
        ideal = np.bincount(y) / K
        assert (np.abs(counts.to_numpy() - ideal) <= 1).all()


def test_multilabel_spread_at_least_twice_better_than_random_kfold(demo):
    y, _ = inputs(demo, "multilabel")
    seeds = range(3)
    stratified = np.mean([spread(y, make_folds(y, K, "multilabel", seed)) for seed in seeds])
    random = np.mean([spread(y, make_folds(y, K, "kfold", seed)) for seed in seeds])
    assert 2 * stratified <= random, (stratified, random)


# --- hand cases ----------------------------------------------------------------------------


def test_stratified_group_keeps_classes_apart_exactly():
    # Four single-class groups, two per class: each of 2 folds must get one group of each class.
    groups = np.repeat(["a", "b", "c", "d"], 4)
    y = np.repeat([0, 0, 1, 1], 4)
    for seed in range(10):
        summary = fold_summary(y, make_folds(y, 2, "stratified_group", seed, groups))
        assert summary[[0, 1]].to_numpy().tolist() == [[4, 4], [4, 4]], seed


def test_stratified_group_balances_classes_better_than_group():
    # The demo's writers are hash-random mixtures of digits, so every group split is
    # about equally balanced there; here each of 20 groups has a skewed class mix.
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 60, size=20)
    groups = np.repeat(np.arange(20), sizes)
    y = np.concatenate([rng.choice(4, size=n, p=rng.dirichlet(np.full(4, 0.5))) for n in sizes])
    mean_spread = {
        s: np.mean([spread(np.eye(4)[y], make_folds(y, 4, s, seed, groups)) for seed in range(5)])
        for s in ("group", "stratified_group")
    }
    assert mean_spread["stratified_group"] < 2 / 3 * mean_spread["group"], mean_spread


def test_group_fallback_matches_sklearn_group_shuffle(demo, monkeypatch):
    # The path for scikit-learn < 1.6 must give exactly GroupKFold(shuffle=True)'s folds.
    y, groups = inputs(demo, "group")
    library = [make_folds(y, K, "group", seed, groups) for seed in range(3)]
    monkeypatch.setattr(folds_module, "_GROUP_KFOLD_SHUFFLES", False)
    for seed, expected in enumerate(library):
        np.testing.assert_array_equal(make_folds(y, K, "group", seed, groups), expected)


def test_soft_rows_are_stratified_by_argmax():
    rng = np.random.default_rng(0)
    soft = rng.dirichlet(np.ones(3), size=60)
    for strategy in ("stratified", "stratified_group"):
        groups = np.arange(60) % 10
        np.testing.assert_array_equal(
            make_folds(soft, 3, strategy, 7, groups), make_folds(soft.argmax(axis=1), 3, strategy, 7, groups)
        )


def test_multilabel_binarises_at_half():
    rng = np.random.default_rng(0)
    proba = rng.random((60, 4))
    np.testing.assert_array_equal(
        make_folds(proba, 3, "multilabel", 7), make_folds((proba >= 0.5).astype(int), 3, "multilabel", 7)
    )


def test_fold_summary_counts():
    folds = np.array([0, 0, 1, 1, 1])
    summary = fold_summary(np.array(["cat", "dog", "dog", "dog", "cat"]), folds)
    assert summary.to_dict("index") == {0: {"rows": 2, "cat": 1, "dog": 1}, 1: {"rows": 3, "cat": 1, "dog": 2}}
    multi_hot_y = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 1]])
    summary = fold_summary(multi_hot_y, folds, columns=["even", "loop"])
    assert summary.to_dict("index") == {0: {"rows": 2, "even": 2, "loop": 1}, 1: {"rows": 3, "even": 1, "loop": 2}}


# --- errors --------------------------------------------------------------------------------

LABELS = np.array(["one"] * 6 + ["three"] * 3)
GROUPS = np.array(["w0", "w1", "w2"] * 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(strategy="strat"),
            "The 'strategy' parameter must be one of "
            "['kfold', 'stratified', 'group', 'stratified_group', 'multilabel']. Got 'strat' instead.",
        ),
        (dict(k=1), "The 'k' parameter (number of folds) must be an integer >= 2. Got 1 instead."),
        (dict(k=2.5), "must be an integer >= 2. Got 2.5 instead."),
        (dict(k=10), "Got k=10 for 9 rows instead. Use k<=9"),
        (dict(strategy="group"), "The 'groups' parameter is required for strategy 'group'"),
        (dict(strategy="stratified_group"), "required for strategy 'stratified_group'"),
        (
            dict(strategy="group", k=5, groups=GROUPS),
            "k=5 but the manifest has only 3 groups. Use k<=3",
        ),
        (
            dict(strategy="stratified", k=4),
            "for strategy 'stratified': class 'three' has only 3 rows, k=4. Use k<=3, or strategy 'kfold'.",
        ),
        (
            dict(strategy="stratified_group", k=3, y=np.array(["one"] * 8 + ["three"]), groups=GROUPS),
            "class 'three' has only 1 row, k=3. Merge or drop that class, or strategy 'group'.",
        ),
        (dict(strategy="multilabel"), "The 'y' parameter must be 2-D (n rows, one 0/1 column per label)"),
        (
            dict(strategy="group", groups=np.array(["w0", None, "w1", np.nan, "w2", "w0", "w1", "w2", "w0"], object)),
            "The 'groups' parameter has missing values in rows 2, 4 (2 rows)",
        ),
        (dict(strategy="group", groups=GROUPS[:5]), "one group id per row of y (9 rows). Got shape (5,) instead."),
        (dict(seed=-1), "The 'seed' parameter must be an integer in [0, 2**32). Got -1 instead."),
    ],
)
def test_bad_input_raises_user_error(kwargs, message):
    args = dict(y=LABELS, k=2, strategy="stratified", seed=0, groups=None) | kwargs
    with pytest.raises(UserError, match=re.escape(message)):
        make_folds(**args)


def test_group_error_names_the_fix():
    with pytest.raises(UserError) as caught:
        make_folds(LABELS, 2, "group", 0)
    assert "Pass groups, or use strategy 'stratified' or 'kfold'" in str(caught.value)


def test_class_count_error_names_the_class_not_its_index():
    y = np.array([0] * 6 + [1] * 3 + [2])  # class indices, as a manifest's encoded targets give them
    with pytest.raises(UserError, match=re.escape("class 'seven' has only 1 row, k=3. Merge or drop that class")):
        make_folds(y, 3, "stratified", 0, classes=["one", "six", "seven"])
    soft = np.eye(3)[[0] * 7 + [1] * 3] * 0.8 + 0.1  # soft rows are stratified by argmax: the name follows
    with pytest.raises(UserError, match=re.escape("class 'six' has only 3 rows, k=4")):
        make_folds(soft, 4, "stratified", 0, classes=["one", "six", "seven"])
    with pytest.raises(UserError, match=re.escape("class 2 has only 1 row")):  # no names: the index
        make_folds(y, 3, "stratified", 0)
