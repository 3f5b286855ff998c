import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ensemble import meta, stack
from ensemble.data import encode_targets
from ensemble.errors import UserError
from ensemble.metrics import log_loss
from ensemble.oof import load_run
from stack_fixtures import write_noise_run, write_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("mc") / "run", "multiclass", n=400, n_test=30, k=4, n_classes=4,
                     seed=0, tta=("resnet-a1",))


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("ml") / "run", "multilabel", n=300, n_test=20, k=4, n_classes=5, seed=1)


@pytest.fixture(scope="module")
def mc_data(mc_run):
    return load_run(mc_run)


# ------------------------------------------------------------------ loading


def test_load_aligns_rows_by_id_and_prefers_tta(mc_run, mc_data):
    d = mc_data
    assert d.model_ids == ["convnext-c3", "effnet-b2", "resnet-a1", "vit-d4"]
    assert d.oof.shape == (4, 400, 4) and d.test.shape == (4, 30, 4)
    assert d.sources["resnet-a1"] == "oof_tta.parquet" and d.sources["vit-d4"] == "oof.parquet"
    folds = pd.read_csv(mc_run / "folds.csv", dtype={"id": str})
    assert d.ids.tolist() == folds["id"].tolist() and d.folds.tolist() == folds["fold"].tolist()
    np.testing.assert_array_equal(d.y_true, encode_targets(folds, {"form": "label", "column": "label"}, d.classes))
    oof = pd.read_parquet(mc_run / "models/vit-d4/oof.parquet").set_index("id")  # written shuffled
    np.testing.assert_allclose(d.oof[3], oof.loc[d.ids, d.classes].to_numpy(), rtol=1e-12)
    assert load_run(mc_run, tta=False).sources["resnet-a1"] == "oof.parquet"


def test_attribute_targets_are_soft_rows(tmp_path):
    d = load_run(write_run(tmp_path / "attr", form="attribute", n=120, n_classes=5, seed=2))
    np.testing.assert_allclose(d.y_true.sum(axis=1), 1.0)
    assert ((d.y_true > 0) & (d.y_true < 1)).any()  # 'm' rows


def _copy(run, tmp_path):
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def _edit(run, model, name, fn):
    path = run / "models" / model / name
    frame = fn(pd.read_parquet(path))
    frame.to_parquet(path, index=False)


def _set_cell(frame, row, column, value):
    frame = frame.copy()
    frame.loc[row, column] = value
    return frame


ERRORS = {
    "extra id": (lambda r: _edit(r, "vit-d4", "oof.parquet", lambda f: _set_cell(f, 0, "id", "intruder")),
                 r"models/vit-d4/oof.parquet: 1 id \(intruder\) not in folds.csv"),
    "missing ids": (lambda r: _edit(r, "vit-d4", "oof.parquet", lambda f: f.iloc[3:]),
                    r"vit-d4/oof.parquet: ids differ from folds.csv and the other models: 3 ids \(img"),
    "NaN": (lambda r: _edit(r, "effnet-b2", "oof.parquet", lambda f: _set_cell(f, 5, "cls2", np.nan)),
            r"effnet-b2/oof.parquet: NaN or inf at 1 id \(img\d+\) in column\(s\) \['cls2'\]"),
    "inf in test": (lambda r: _edit(r, "effnet-b2", "test.parquet", lambda f: _set_cell(f, 0, "cls0", np.inf)),
                    r"effnet-b2/test.parquet: NaN or inf at 1 id \(test0000\)"),
    "row sum": (lambda r: _edit(r, "convnext-c3", "oof.parquet",
                                lambda f: f.assign(cls0=f["cls0"] + np.where(np.arange(len(f)) < 2, 0.01, 0))),
                r"convnext-c3/oof.parquet: multiclass rows must sum to 1 \(within 0.001\); 2 ids"),
    "logits": (lambda r: _edit(r, "convnext-c3", "test.parquet", lambda f: _set_cell(f, 1, "cls1", 3.5)),
               r"values outside \[0, 1\] at 1 id \(test0001\)"),
    "class columns": (lambda r: _edit(r, "vit-d4", "oof.parquet", lambda f: f.rename(columns={"cls3": "cls_3"})),
                      r"vit-d4/oof.parquet: class columns differ from models/convnext-c3/config.json: missing \['cls3'\], "
                      r"unexpected \['cls_3'\]"),
    "config classes": (lambda r: (r / "models/vit-d4/config.json").write_text(json.dumps(
        {**json.loads((r / "models/vit-d4/config.json").read_text()), "classes": ["cls0", "cls1", "cls2", "dog"]})),
        r"vit-d4/config.json: classes differ from models/convnext-c3: missing \['cls3'\], unexpected \['dog'\]"),
    "fold mismatch": (lambda r: _edit(r, "effnet-b2", "oof.parquet", lambda f: f.assign(fold=(f["fold"] + 1) % 4)),
                      r"effnet-b2/oof.parquet: the fold of 400 ids .* differs from folds.csv"),
    "test ids": (lambda r: _edit(r, "vit-d4", "test.parquet", lambda f: _set_cell(f, 0, "id", "other")),
                 r"vit-d4/test.parquet: test ids differ from .*convnext-c3/test.parquet: 1 id \(other\) unexpected, "
                 r"1 id \(test0000\) missing"),
    "folds.csv fold missing": (lambda r: pd.read_csv(r / "folds.csv").assign(fold=lambda f: f["fold"].clip(upper=2))
                               .to_csv(r / "folds.csv", index=False),
                               r"folds.csv: folds \[0, 1, 2\] but the models were trained with k=4 .*missing \[3\]"),
    "duplicate id": (lambda r: _edit(r, "vit-d4", "oof.parquet", lambda f: _set_cell(f, 1, "id", f.loc[0, "id"])),
                     r"vit-d4/oof.parquet: duplicate ids 1 id"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_runs_are_one_clear_error_and_write_nothing(case, mc_run, tmp_path, capsys):
    run = _copy(mc_run, tmp_path)
    corrupt, message = ERRORS[case]
    corrupt(run)
    with pytest.raises(UserError, match=message):
        load_run(run)
    assert stack.main(["--run", str(run), "--method", "mean"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (run / "ensemble").exists()


def test_incomplete_models_are_listed_and_skipped_only_on_request(mc_run, tmp_path):
    run = _copy(mc_run, tmp_path)
    _edit(run, "vit-d4", "oof.parquet", lambda f: f[f["fold"] != 2])  # fold 2 not finished
    (run / "models/effnet-b2/test.parquet").unlink()
    with pytest.raises(UserError, match=r"2 incomplete model\(s\): effnet-b2: test.parquet missing; vit-d4: "
                                        r"oof.parquet has no rows for fold\(s\) \[2\]\. .* --skip-incomplete"):
        load_run(run)
    d = load_run(run, skip_incomplete=True)
    assert d.model_ids == ["convnext-c3", "resnet-a1"] and set(d.skipped) == {"effnet-b2", "vit-d4"}


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ensemble.stack", "--run", str(tmp_path / "nope"), "--smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


# ------------------------------------------------------------------ meta-models


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
def test_native_formats_round_trip(task, mc_data, ml_run, tmp_path):
    d = mc_data if task == "multiclass" else load_run(ml_run)
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


# ------------------------------------------------------------------ the CLI


def test_cli_multiclass_end_to_end(mc_run, tmp_path, capsys):
    run = _copy(mc_run, tmp_path)
    stack.main(["--run", str(run), "--smoke"])
    out = capsys.readouterr().out
    assert "winner: " in out and "better than best_single:" in out
    scores = pd.read_csv(run / "ensemble/scores.csv")
    assert scores.columns.tolist() == ["method", "metric", "cv_score", "in_sample_score"]
    assert scores["method"].tolist()[1:] == ["mean", "greedy", "lgbm", "xgb", "ridge", "logreg"]
    assert scores["method"][0].startswith("best_single:") and (scores["metric"] == "log_loss").all()
    by = scores.set_index("method")
    assert by.loc["greedy", "in_sample_score"] <= scores["in_sample_score"][0] + 1e-12
    assert by.filter(like="lgbm", axis=0)["cv_score"].iloc[0] < scores["cv_score"][0]  # stacking helps here
    selection = json.loads((run / "ensemble/selection.json").read_text())
    assert set(selection["weights"]) == set(load_run(run).model_ids)
    assert sum(selection["weights"].values()) == pytest.approx(1.0) and len(selection["trajectory"]) == 11
    sub = pd.read_csv(run / "ensemble/submission.csv")
    assert sub.columns.tolist() == ["id", "cls0", "cls1", "cls2", "cls3"] and len(sub) == 30
    np.testing.assert_allclose(sub.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-6)
    assert (run / "ensemble/meta/lgbm/fold0/booster0.txt").exists()
    assert (run / "ensemble/meta/xgb/fold3/booster0.json").exists()
    assert (run / "ensemble/meta/logreg/fold0/coef.npz").exists()


def test_cli_multilabel_thresholds_and_tags(ml_run, tmp_path, capsys):
    run = _copy(ml_run, tmp_path)
    stack.main(["--run", str(run), "--method", "logreg", "--smoke"])
    assert "thresholds on " in capsys.readouterr().out
    by = pd.read_csv(run / "ensemble/scores.csv").set_index("method")
    assert by.loc["thresholds", "metric"] == "f2"
    assert by.loc["thresholds", "in_sample_score"] >= by.loc["global_threshold", "in_sample_score"] - 1e-12
    doc = json.loads((run / "ensemble/thresholds.json").read_text())
    assert set(doc["thresholds"]) == {f"cls{c}" for c in range(5)} and doc["beta"] == 2.0
    sub = pd.read_csv(run / "ensemble/submission.csv", keep_default_na=False)
    assert sub.columns.tolist() == ["id", "tags"]
    assert set(" ".join(sub["tags"]).split()) <= set(doc["thresholds"])
    assert not (run / "ensemble/selection.json").exists()  # greedy was not asked for


def test_cli_rejects_bad_flags(mc_run, capsys):
    assert stack.main(["--run", str(mc_run), "--metric", "auc"]) == 2
    assert "'metric' parameter must be one of ['accuracy', 'f2', 'fbeta', 'log_loss', 'map']" in capsys.readouterr().err
