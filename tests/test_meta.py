import numpy as np
import pytest
from stack_fixtures import write_multiclass_run, write_multilabel_run, write_noise_run

from ensemble.errors import UserError
from ensemble.metrics import log_loss
from ensemble.stack import meta
from ensemble.stack.oof import load_run


@pytest.fixture(scope="module")
def mc_data(tmp_path_factory):
    return load_run(write_multiclass_run(tmp_path_factory.mktemp("mc") / "run"))


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory):
    return load_run(write_multilabel_run(tmp_path_factory.mktemp("ml") / "run"))


@pytest.mark.parametrize("method", meta.META_METHODS)
def test_meta_model_folds_never_see_their_own_rows(method, mc_data):
    """Permuting fold 0's labels cannot change fold 0's level-2 predictions."""
    d = mc_data
    base = meta.fit_meta(method, d.oof, d.y_true, d.folds, d.test, d.task, smoke=True)
    y = d.y_true.copy()
    held = d.folds == 0
    y[held] = y[held][np.random.default_rng(0).permutation(held.sum())]
    moved = meta.fit_meta(method, d.oof, y, d.folds, d.test, d.task, smoke=True)
    np.testing.assert_array_equal(base.oof[held], moved.oof[held])
    assert not np.array_equal(base.oof[~held], moved.oof[~held])  # the test can fail: other folds did change


@pytest.mark.parametrize("method", meta.META_METHODS)
def test_meta_models_on_noise_score_at_chance(method, tmp_path_factory):
    d = load_run(write_noise_run(tmp_path_factory.mktemp("noise") / "run", n=800, seed=3))
    prior = d.y_true.mean(axis=0)
    chance = -(prior * np.log(prior)).sum()  # the best a model that knows only the class rates can do
    fit = meta.fit_meta(method, d.oof, d.y_true, d.folds, d.test, d.task, smoke=True)
    cv = log_loss(d.y_true, fit.oof)
    assert chance - 0.005 < cv < chance + 0.03, (cv, chance)  # a leak (e.g. early stopping on the held-out fold) lands below
    accuracy = (fit.oof.argmax(1) == d.y_true.argmax(1)).mean()
    assert abs(accuracy - prior.max()) < 0.06


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_native_formats_round_trip(task, mc_data, ml_data, tmp_path):
    d = mc_data if task == "multiclass" else ml_data
    for method in meta.META_METHODS:
        fit = meta.fit_meta(method, d.oof, d.y_true, d.folds, d.test, task, entropy=True, smoke=True)
        folder = tmp_path / method
        for rel, payload in meta.meta_files(fit, d.classes, d.model_ids).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(payload)
        suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
        assert suffixes <= {".json", ".txt", ".npz"}, suffixes  # never a pickle
        loaded = meta.load_meta(folder)
        np.testing.assert_allclose(loaded.predict(d.test), fit.test, rtol=1e-6, atol=1e-9)


def test_unknown_method_lists_the_allowed_ones(mc_data):
    d = mc_data
    with pytest.raises(UserError, match=r"'method' parameter must be one of \['lgbm', 'xgb', 'ridge', 'logreg'\]"):
        meta.fit_meta("svm", d.oof, d.y_true, d.folds, d.test, d.task)
