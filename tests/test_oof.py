import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stack_fixtures import copy_run, write_multiclass_run, write_run

from ensemble.data.manifest import encode_targets
from ensemble.errors import UserError
from ensemble.stack import cli as stack
from ensemble.stack.oof import load_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory):
    return write_multiclass_run(tmp_path_factory.mktemp("mc") / "run")


def test_load_aligns_rows_by_id_and_prefers_tta(mc_run):
    d = load_run(mc_run)
    assert d.model_ids == ["convnext-c3", "effnet-b2", "resnet-a1", "vit-d4"]
    assert d.oof.shape == (4, 400, 4) and d.test.shape == (4, 30, 4)
    assert d.sources["resnet-a1"] == "oof_tta.parquet" and d.sources["vit-d4"] == "oof.parquet"
    folds = pd.read_csv(mc_run / "folds.csv", dtype={"id": str})
    assert d.ids.tolist() == folds["id"].tolist() and d.folds.tolist() == folds["fold"].tolist()
    np.testing.assert_array_equal(d.y_true, encode_targets(folds, {"form": "label", "column": "label"}, d.classes))
    oof = pd.read_parquet(mc_run / "models/vit-d4/oof.parquet").set_index("id")  # written shuffled
    np.testing.assert_allclose(d.oof[3], oof.loc[d.ids, d.classes].to_numpy(), rtol=1e-12)
    assert load_run(mc_run, tta=False).sources["resnet-a1"] == "oof.parquet"
    assert d.metric == "log_loss"  # config.json's: the stack's default metric


def test_attribute_targets_are_soft_rows(tmp_path):
    d = load_run(write_run(tmp_path / "attr", form="attribute", n=120, n_classes=5, seed=2))
    np.testing.assert_allclose(d.y_true.sum(axis=1), 1.0)
    assert ((d.y_true > 0) & (d.y_true < 1)).any()  # 'm' rows


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
    run = copy_run(mc_run, tmp_path)
    corrupt, message = ERRORS[case]
    corrupt(run)
    with pytest.raises(UserError, match=message):
        load_run(run)
    assert stack.main(["--run", str(run), "--method", "mean"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (run / "ensemble").exists()


def test_incomplete_models_are_listed_and_skipped_only_on_request(mc_run, tmp_path):
    run = copy_run(mc_run, tmp_path)
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
