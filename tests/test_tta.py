"""The maths of TTA (ensemble.tta.tta): merging views and naming them, on hand-checkable and random logits."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.errors import UserError
from ensemble.predict import tta


def test_merge_views_by_hand():
    logits = np.log(np.array([[[1.0, 3.0], [3.0, 1.0]]]))  # 1 row, 2 views: probabilities (.25, .75), (.75, .25)
    np.testing.assert_allclose(tta.merge_views(logits, "multiclass", "mean"), [[0.5, 0.5]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(tta.merge_views(logits, "multiclass", "gmean"), [[0.5, 0.5]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(tta.merge_views(logits, "multiclass", "logits"), [[0.5, 0.5]], rtol=0, atol=1e-15)
    z = np.array([[[0.0], [np.log(3.0)]]])  # multilabel: sigmoids 0.5 and 0.75
    np.testing.assert_allclose(tta.merge_views(z, "multilabel", "mean"), [[0.625]], rtol=1e-15)
    np.testing.assert_allclose(tta.merge_views(z, "multilabel", "gmean"), [[np.sqrt(0.375)]], rtol=1e-15)
    np.testing.assert_allclose(tta.merge_views(z, "multilabel", "logits"), [[1 / (1 + 1 / np.sqrt(3))]], rtol=1e-15)


def test_merge_views_properties_on_random_logits():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3, size=(50, 8, 6))
    for task in ("multiclass", "multilabel"):
        single = tta.activate(z[:, :1], task)[:, 0]
        for how in tta.MERGES:
            # identical views merge to the single view: exactly for mean and logits ((a + a) / 2 == a)
            same = tta.merge_views(np.repeat(z[:, :1], 4, axis=1), task, how)
            if how == "gmean":
                np.testing.assert_allclose(same, single, rtol=1e-12)
            else:
                np.testing.assert_array_equal(same, single)
            p = tta.merge_views(z, task, how)
            assert p.shape == (50, 6) and np.all((p >= 0) & (p <= 1))
            if task == "multiclass":
                np.testing.assert_allclose(p.sum(1), 1, rtol=1e-12)
        np.testing.assert_allclose(tta.merge_views(z, task, "mean"), tta.activate(z, task).mean(1), rtol=1e-12)
    # multiclass: the renormalised geometric mean of softmaxes is the softmax of the mean logits
    np.testing.assert_allclose(tta.merge_views(z, "multiclass", "gmean"), tta.merge_views(z, "multiclass", "logits"),
                               rtol=1e-12)
    assert not np.allclose(tta.merge_views(z, "multilabel", "gmean"), tta.merge_views(z, "multilabel", "logits"))
    with pytest.raises(UserError, match="'merge' parameter must be one of"):
        tta.merge_views(z, "multiclass", "median")


def test_view_names_expand_fivecrop():
    assert tta.view_names("orig,hflip") == ["orig", "hflip"]
    ten = tta.view_names("fivecrop,fivecrop+hflip")
    assert len(ten) == 10 and ten[0] == "fivecrop#0" and ten[-1] == "fivecrop+hflip#4"
    assert len(tta.view_names("fivecrop+hflip")) == 5  # the flipped crops only
