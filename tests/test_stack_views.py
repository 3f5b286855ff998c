"""Weighted TTA views as stacking members (`predict --per-view` files): rows `<method>+views`, scored
under the same folds as everything else, beside the rows without them."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stack_fixtures import copy_run, make_predictions, write_multilabel_run, write_run

from ensemble.errors import UserError
from ensemble.predict.outputs import _long  # predict's own writer of the long per-view files
from ensemble.stack import cli as stack
from ensemble.stack.core import stack_run
from ensemble.stack.oof import load_run

REPO = Path(__file__).resolve().parents[1]


def add_views(run: Path, model_id: str, views: dict) -> None:
    """oof_views.parquet, test_views.parquet and predict.json's views for one model, as predict --per-view
    writes them; `views`: name -> (OOF rows x classes in folds.csv order, test rows x classes)."""
    d = run / "models" / model_id
    classes = json.loads((d / "config.json").read_text())["classes"]
    folds = pd.read_csv(run / "folds.csv", dtype={"id": str})
    test_ids = pd.read_parquet(d / "test.parquet")[["id"]]
    names = list(views)
    oof = np.stack([oof for oof, _ in views.values()], axis=1)  # rows x views x classes
    test = np.stack([test for _, test in views.values()], axis=1).astype(np.float32)
    _long(folds[["id", "fold"]], oof, names, classes).to_parquet(d / "oof_views.parquet", index=False)
    _long(test_ids, test, names, classes).to_parquet(d / "test_views.parquet", index=False)
    (d / "predict.json").write_text(json.dumps({"tta": ",".join(names), "views": names, "merge": "mean"}))


def noise(rng, shape) -> np.ndarray:
    """Probabilities independent of the truth (rows sum to 1)."""
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])


def args(**kw) -> Namespace:
    """stack_run's flags, as the CLI's defaults, with --smoke."""
    namespace = stack.parse_args(["--run", "unused", "--smoke"])
    return Namespace(**{**vars(namespace), **kw})


def scores(rows) -> dict:
    return {r.method: r for r in rows}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """400 rows, 4 folds, 4 classes, 4 models; no per-view files."""
    return write_run(tmp_path_factory.mktemp("views") / "run", n=400, n_test=30, k=4, n_classes=4, seed=0)


def _own(run: Path, model_id: str):
    """A model's merged OOF (folds.csv order) and test predictions: its identity view."""
    d = load_run(run)
    m = d.model_ids.index(model_id)
    return d.oof[m], d.test[m]


def test_without_view_files_every_row_is_as_before(base_run, tmp_path):
    """No per-view files: the rows of the stack without views, nothing else; and adding view files leaves
    those rows, selection.json's keys and the meta-models bit-identical (the views only add rows)."""
    run = copy_run(base_run, tmp_path)
    before, winner, *_ = stack_run(run, args(method="all"))
    assert [r.method for r in before][1:] == ["mean", "greedy", "lgbm", "xgb", "ridge", "logreg"]
    assert load_run(run).view_ids == [] and load_run(run).view_oof is None
    stack.main(["--run", str(run), "--smoke", "--method", "greedy"])
    selection = json.loads((run / "ensemble/selection.json").read_text())
    assert "views" not in selection

    rng = np.random.default_rng(5)
    own_oof, own_test = _own(run, "vit-d4")
    add_views(run, "vit-d4", {"orig": (own_oof, own_test), "noise": (noise(rng, own_oof.shape),
                                                                        noise(rng, own_test.shape))})
    after, *_ = stack_run(run, args(method="all"))
    with_views = scores(after)
    for row in before:
        twin = with_views[row.method]
        assert (twin.cv_score, twin.in_sample_score) == (row.cv_score, row.in_sample_score), row.method
        np.testing.assert_array_equal(twin.oof, row.oof)
        np.testing.assert_array_equal(twin.test, row.test)
    assert [r.method for r in after][1:] == ["mean", "greedy", "greedy+views", "lgbm", "lgbm+views", "xgb",
                                             "xgb+views", "ridge", "ridge+views", "logreg", "logreg+views"]
    stack.main(["--run", str(run), "--smoke", "--method", "greedy"])
    selection_after = json.loads((run / "ensemble/selection.json").read_text())
    assert {k: v for k, v in selection_after.items() if k != "views"} == selection


def test_a_noise_view_gets_no_weight(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path)
    rng = np.random.default_rng(1)
    own_oof, own_test = _own(run, "resnet-a1")
    add_views(run, "resnet-a1", {"orig": (own_oof, own_test),
                                 "noise": (noise(rng, own_oof.shape), noise(rng, own_test.shape))})
    d = load_run(run)
    assert d.view_ids == ["resnet-a1@orig", "resnet-a1@noise"] and d.view_oof.shape == (2, 400, 4)
    assert d.no_views == {m: "no per-view files" for m in ("convnext-c3", "effnet-b2", "vit-d4")}
    assert load_run(run, tta=False).view_ids == d.view_ids  # --no-tta: the views are members still

    stack.main(["--run", str(run), "--smoke", "--method", "greedy"])
    out = capsys.readouterr().out
    assert "no view members from 3 model(s): convnext-c3 (no per-view files);" in out
    assert "4 models (+2 TTA-view members)" in out
    assert "view weighting, cv log_loss vs the same method without views (+ = better): greedy+views " in out
    by = pd.read_csv(run / "ensemble/scores.csv").set_index("method")
    views = json.loads((run / "ensemble/selection.json").read_text())["views"]
    assert views["weights"]["resnet-a1@noise"] == 0 and "resnet-a1@noise" not in views["picks"]
    assert all(w["resnet-a1@noise"] == 0 for w in views["cv_weights"].values())
    assert sum(views["weights"].values()) == pytest.approx(1.0)
    assert set(views["weights"]) == set(d.model_ids + d.view_ids)
    assert views["cv_score"] == pytest.approx(by.loc["greedy+views", "cv_score"], rel=1e-12)
    assert np.isfinite(by.loc["greedy+views", ["cv_score", "in_sample_score"]].to_numpy(float)).all()


def test_a_better_view_wins_under_cv(base_run, tmp_path):
    """A view sharper than the merged prediction (the merge averaged it with worse views)."""
    run = copy_run(base_run, tmp_path)
    d = load_run(run)
    rng = np.random.default_rng(2)
    strong = {"resnet-a1": (3.5, 0.6, 1.0)}
    sharp_oof = make_predictions(d.y_true, "multiclass", strong, rng)[0]
    sharp_test = make_predictions(np.eye(4)[rng.integers(0, 4, 30)], "multiclass", strong, rng)[0]
    m = d.model_ids.index("resnet-a1")
    add_views(run, "resnet-a1", {"orig": (d.oof[m], d.test[m]), "sharp": (sharp_oof, sharp_test)})
    rows, winner, *_ = stack_run(run, args(method="greedy"))
    by = scores(rows)
    assert by["greedy+views"].cv_score < by["greedy"].cv_score - 0.02  # log loss: lower is better
    assert winner.method == "greedy+views"
    np.testing.assert_array_equal(winner.test, by["greedy+views"].test)  # the submission is its test


WEAK = {"resnet-a1": (0.5, 1.0, 1.0), "effnet-b2": (0.45, 1.0, 1.2), "vit-d4": (0.4, 1.0, 0.9)}


def test_a_view_leaking_one_folds_labels_does_not_look_good_under_cv(tmp_path):
    """A view that is the truth on fold 0 only (as if fold 0's labels leaked into it) and a random class
    elsewhere, as confident on every fold: fitted on all rows it looks like a gain; cross-validated (fold f
    is never fitted on fold f's labels, and on the other folds the view is noise) the gain is gone."""
    run = write_run(tmp_path / "run", n=400, n_test=30, k=4, n_classes=4, seed=0, models=WEAK)
    d = load_run(run)
    rng = np.random.default_rng(4)
    leak = np.eye(4)[rng.integers(0, 4, len(d.ids))]
    leak[d.folds == 0] = d.y_true[d.folds == 0]
    m = d.model_ids.index("effnet-b2")
    add_views(run, "effnet-b2", {"orig": (d.oof[m], d.test[m]), "leak": (0.92 * leak + 0.02, d.test[m])})
    by = scores(stack_run(run, args(method="logreg"))[0] + stack_run(run, args(method="greedy"))[0][2:])
    for method in ("greedy", "logreg"):
        base, views = by[method], by[method + "+views"]
        in_sample_gain = base.in_sample_score - views.in_sample_score  # log loss: a gain is a decrease
        cv_gain = base.cv_score - views.cv_score
        assert in_sample_gain > 0.01 and cv_gain < 0, (method, in_sample_gain, cv_gain)


def test_fold_f_of_a_views_row_never_sees_fold_f_labels(base_run, tmp_path):
    """Permuting fold 0's labels in folds.csv leaves fold 0's cross-validated +views predictions unchanged."""
    run = copy_run(base_run, tmp_path)
    rng = np.random.default_rng(6)
    own_oof, own_test = _own(run, "resnet-a1")
    add_views(run, "resnet-a1", {"orig": (own_oof, own_test), "noise": (noise(rng, own_oof.shape),
                                                                          noise(rng, own_test.shape))})
    before = scores(stack_run(run, args(method="logreg"))[0] + stack_run(run, args(method="greedy"))[0][2:])
    folds = pd.read_csv(run / "folds.csv", dtype={"id": str})
    fold0 = folds["fold"] == 0
    folds.loc[fold0, "label"] = rng.permutation(folds.loc[fold0, "label"].to_numpy())
    folds.to_csv(run / "folds.csv", index=False)
    after = scores(stack_run(run, args(method="logreg"))[0] + stack_run(run, args(method="greedy"))[0][2:])
    held = load_run(run).folds == 0
    for method in ("greedy+views", "logreg+views"):
        np.testing.assert_array_equal(after[method].oof[held], before[method].oof[held])
        assert not np.array_equal(after[method].oof[~held], before[method].oof[~held])


def _drop_view(frame):
    return frame[frame["view"] != "noise"]


def _nan_cell(frame):
    frame = frame.copy()
    frame.loc[frame.index[7], "cls2"] = np.nan
    return frame


@pytest.mark.parametrize("edit, message", [
    (_drop_view, r"vit-d4/oof_views.parquet: views differ from predict.json's \['orig', 'noise'\]: "
                 r"missing \['noise'\], unexpected \[\]"),
    (_nan_cell, r"vit-d4/oof_views.parquet \(view '(orig|noise)'\): NaN or inf at 1 id \(img\d+\) in column\(s\) "
                r"\['cls2'\]"),
    (lambda f: f.drop(columns="view"), r"vit-d4/oof_views.parquet: missing column\(s\) \['view'\]"),
    (lambda f: pd.concat([f, f.iloc[:1]]), r"vit-d4/oof_views.parquet: duplicate ids 1 id \(img\d+\); each id "
                                           r"appears once per view"),
])
def test_a_corrupt_per_view_file_is_one_error_naming_it(base_run, tmp_path, capsys, edit, message):
    run = copy_run(base_run, tmp_path)
    rng = np.random.default_rng(4)
    own_oof, own_test = _own(run, "vit-d4")
    add_views(run, "vit-d4", {"orig": (own_oof, own_test), "noise": (noise(rng, own_oof.shape),
                                                                        noise(rng, own_test.shape))})
    path = run / "models/vit-d4/oof_views.parquet"
    edit(pd.read_parquet(path)).to_parquet(path, index=False)
    with pytest.raises(UserError, match=message):
        load_run(run)
    assert stack.main(["--run", str(run), "--method", "mean"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "oof_views.parquet" in err
    assert not (run / "ensemble").exists()


def test_views_of_an_incomplete_model_are_skipped_with_it(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    for model_id in ("resnet-a1", "vit-d4"):
        own_oof, own_test = _own(run, model_id)
        add_views(run, model_id, {"orig": (own_oof, own_test), "hflip": (own_oof, own_test)})
    (run / "models/vit-d4/test.parquet").unlink()
    with pytest.raises(UserError, match="1 incomplete model"):
        load_run(run)
    d = load_run(run, skip_incomplete=True)
    assert d.view_ids == ["resnet-a1@orig", "resnet-a1@hflip"] and "vit-d4" in d.skipped
    assert d.no_views == {"convnext-c3": "no per-view files", "effnet-b2": "no per-view files"}
    (run / "models/resnet-a1/test_views.parquet").unlink()  # one of the two: no view members, said why
    d = load_run(run, skip_incomplete=True)
    assert d.view_ids == [] and d.no_views == {}  # no model has views: nothing changes, nothing said


def test_multilabel_f2_views_rows_are_thresholded(tmp_path):
    run = write_multilabel_run(tmp_path / "run")
    d = load_run(run)
    m = d.model_ids.index("resnet-a1")
    add_views(run, "resnet-a1", {"orig": (d.oof[m], d.test[m]), "hflip": (d.oof[m] ** 1.3, d.test[m] ** 1.3)})
    stack.main(["--run", str(run), "--method", "greedy", "--smoke"])
    by = pd.read_csv(run / "ensemble/scores.csv").set_index("method")
    assert by.index.tolist()[1:] == ["mean", "greedy", "greedy+views", "thresholds", "global_threshold"]
    assert by.loc[["greedy", "greedy+views"], "cv_score_thresholded"].notna().all()
    assert (by["metric"] == "f2").all()


def test_cli_subprocess_writes_the_views_rows(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    for model_id in ("resnet-a1", "effnet-b2"):
        own_oof, own_test = _own(run, model_id)
        add_views(run, model_id, {"orig": (own_oof, own_test), "hflip": (own_oof ** 1.1 / (own_oof ** 1.1).sum(
            axis=1, keepdims=True), own_test)})
    proc = subprocess.run([sys.executable, "-m", "ensemble.stack", "--run", str(run), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    methods = pd.read_csv(run / "ensemble/scores.csv")["method"].tolist()
    assert {"greedy+views", "lgbm+views", "xgb+views", "ridge+views", "logreg+views"} <= set(methods)
    assert "view weighting, cv log_loss vs the same method without views (+ = better): greedy+views " in proc.stdout
    spec = json.loads((run / "ensemble/meta/logreg+views/meta.json").read_text())
    assert spec["model_ids"][-4:] == ["effnet-b2@orig", "effnet-b2@hflip", "resnet-a1@orig", "resnet-a1@hflip"]
