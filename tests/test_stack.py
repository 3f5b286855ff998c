import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stack_fixtures import copy_run, write_multiclass_run, write_multilabel_run, write_run, write_specialist_run

from ensemble.stack import cli as stack
from ensemble.stack import meta
from ensemble.stack.oof import load_run
from ensemble.stack.thresholds import cross_val_thresholds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory):
    return write_multiclass_run(tmp_path_factory.mktemp("mc") / "run")


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    return write_multilabel_run(tmp_path_factory.mktemp("ml") / "run")


def test_cli_multiclass_end_to_end(mc_run, tmp_path, capsys):
    run = copy_run(mc_run, tmp_path)
    stack.main(["--run", str(run), "--smoke"])
    out = capsys.readouterr().out
    assert "winner: " in out and "better than best_single:" in out
    scores = pd.read_csv(run / "ensemble/scores.csv")
    assert scores.columns.tolist() == ["method", "metric", "cv_score", "in_sample_score", "cv_score_thresholded",
                                       "in_sample_score_thresholded"]
    assert scores["cv_score_thresholded"].isna().all()  # log loss has no thresholds
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
    """No --metric: the run's config.json says f2, so the stack ranks by F2 (not log loss)."""
    run = copy_run(ml_run, tmp_path)
    assert json.loads((run / "models/vit-d4/config.json").read_text())["metric"] == "f2"
    stack.main(["--run", str(run), "--method", "logreg", "--smoke"])
    assert "thresholds on " in capsys.readouterr().out
    by = pd.read_csv(run / "ensemble/scores.csv").set_index("method")
    assert (by["metric"] == "f2").all()
    assert by.loc[["mean", "logreg"], "cv_score_thresholded"].notna().all()
    assert by.loc["thresholds", "in_sample_score"] >= by.loc["global_threshold", "in_sample_score"] - 1e-12
    doc = json.loads((run / "ensemble/thresholds.json").read_text())
    assert set(doc["thresholds"]) == {f"cls{c}" for c in range(5)} and doc["beta"] == 2.0
    sub = pd.read_csv(run / "ensemble/submission.csv", keep_default_na=False)
    assert sub.columns.tolist() == ["id", "tags"]
    assert set(" ".join(sub["tags"]).split()) <= set(doc["thresholds"])
    assert not (run / "ensemble/selection.json").exists()  # greedy was not asked for


def test_cli_defaults_to_the_metric_the_sweep_monitored(tmp_path):
    run = write_run(tmp_path / "run", n=120, k=3, seed=4, metric="accuracy")
    stack.main(["--run", str(run), "--method", "mean"])
    assert (pd.read_csv(run / "ensemble/scores.csv")["metric"] == "accuracy").all()
    stack.main(["--run", str(run), "--method", "mean", "--metric", "log_loss"])  # the flag still wins
    assert (pd.read_csv(run / "ensemble/scores.csv")["metric"] == "log_loss").all()


def test_f2_methods_are_ranked_after_their_own_thresholds(tmp_path, capsys):
    """Specialist models, over-confident upwards: their mean read at 0.5 predicts many tags and scores
    F2 0.57; logreg's calibrated probabilities rarely reach 0.5 (0.50), but thresholded fold-wise it
    scores 0.68 to the mean's 0.60. Ranking at 0.5 picked the mean; logreg must win and be submitted."""
    run = write_specialist_run(tmp_path / "run")
    stack.main(["--run", str(run), "--method", "logreg", "--smoke"])  # no --metric: config.json says f2
    out = capsys.readouterr().out
    doc = json.loads((run / "ensemble/thresholds.json").read_text())
    assert "winner: logreg" in out and doc["fitted_on"] == "logreg"
    d = load_run(run)
    test_proba = meta.load_meta(run / "ensemble/meta/logreg").predict(d.test)  # logreg's saved fold models
    tags = test_proba >= np.array([doc["thresholds"][c] for c in d.classes])
    sub = pd.read_csv(run / "ensemble/submission.csv", keep_default_na=False)
    assert sub["tags"].tolist() == [" ".join(np.array(d.classes)[row]) for row in tags]

    by = pd.read_csv(run / "ensemble/scores.csv").set_index("method")
    assert (by["metric"] == "f2").all()
    assert by.loc["logreg", "cv_score"] < by.loc["mean", "cv_score"] - 0.05  # at 0.5 the mean looks better...
    assert by.loc["logreg", "cv_score_thresholded"] > by.loc["mean", "cv_score_thresholded"] + 0.05  # ...it is not
    assert by["cv_score_thresholded"].idxmax() == "logreg" and "chosen by cv_score_thresholded" in out
    # The protocol: thresholds fitted on folds != f of the method's honest OOF, applied to fold f.
    mean_cv = cross_val_thresholds(d.y_true, d.oof.mean(axis=0), d.folds)["score"]
    assert by.loc["mean", "cv_score_thresholded"] == pytest.approx(mean_cv, abs=1e-12)
    assert by.loc["thresholds", "cv_score"] == pytest.approx(by.loc["logreg", "cv_score_thresholded"], abs=1e-12)


def test_cli_rejects_bad_flags(mc_run, capsys):
    assert stack.main(["--run", str(mc_run), "--metric", "auc"]) == 2
    assert "'metric' parameter must be one of ['accuracy', 'f2', 'fbeta', 'log_loss', 'map']" in capsys.readouterr().err


def _stack_cli(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemble.stack", "--run", str(run), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_full_or_read_only_disk_leaves_the_previous_stack_whole(mc_run, small_disk):
    """ensemble/ is built beside the old one and swapped in: a disk that fills up mid-write leaves the old stack
    complete (no mix of two stacks, no temporary directory), a read-only one is refused before any fitting."""
    disk = small_disk("16m")
    run = Path(shutil.copytree(mc_run, disk / "run"))
    first = _stack_cli(run, "--method", "greedy", "--smoke")
    assert first.returncode == 0, first.stderr
    before = _tree(run / "ensemble")
    small_disk.fill(disk, leave=64_000)  # the writability check passes; the meta-models' files do not fit
    full = _stack_cli(run, "--method", "all", "--smoke")
    assert full.returncode == 2 and full.stderr.count("\n") == 1 and "Traceback" not in full.stderr, full.stderr
    assert "No space left on device" in full.stderr and "ensemble/ is unchanged" in full.stderr
    assert _tree(run / "ensemble") == before
    assert sorted(p.name for p in run.iterdir()) == sorted([p.name for p in mc_run.iterdir()] + ["ensemble"])
    (disk / ".filler").unlink()
    small_disk.read_only(disk)
    ro = _stack_cli(run, "--method", "all", "--smoke")
    assert ro.returncode == 2 and "cannot write here (Read-only file system)" in ro.stderr, ro.stderr
    assert _tree(run / "ensemble") == before
