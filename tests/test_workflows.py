"""Two of DESIGN.md's workflows end to end on real images: sweep -> TTA prediction -> stacking.

The Planet recipe (multilabel tags, multilabel folds, BCE with per-label positive
weights, F2, per-label thresholds) and the FashionAI recipe (attribute strings
with soft "maybe" labels, a frozen-backbone round then a full fine-tune at a
lower lr). Tiny models, 32 px, few epochs, but every real code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ensemble import predict
from ensemble.run import Run
from ensemble.stack import cli as stack
from ensemble.tune import launch as tune
from ensemble.tune import spaces


def read_metrics(run, model_id, fold):
    return Run(run).read_metrics(model_id, fold)



pytestmark = pytest.mark.slow


def sweep(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    run = tmp_path / "run"
    board = tune.run_sweep(spaces.load_space(str(path)), run, verbose=0)
    assert set(board["state"]) == {"complete"}, board
    return run


def test_planet_multilabel_flow(tmp_path, demo_dir, ray_cluster, capsys):
    frame = pd.read_csv(demo_dir / "multilabel.csv").head(450)
    frame.to_csv(tmp_path / "tags.csv", index=False)
    run = sweep(tmp_path, {
        "data": {"manifest": str(tmp_path / "tags.csv"), "root": str(demo_dir), "test_manifest": "demo:test",
                 "augment": "shift:0.1", "tta": "orig,rotate:5", "normalize": "dataset"},
        "folds": {"k": 3, "strategy": "multilabel", "seed": 0}, "backbones": ["test_resnet"],
        "params": {"lr": 3.0e-3, "batch_size": 32, "image_size": 32, "pos_weight": "auto"},
        "search": {"weight_decay": {"grid": [0.0, 0.05]}},
        "epochs": 2, "metric": "f2", "resources": {"cpu": 1}})
    config = json.loads(next((run / "models").glob("*/config.json")).read_text())
    assert config["task"] == "multilabel" and config["classes"] == ["big", "even", "loop", "odd", "prime"]
    folds = pd.read_csv(run / "folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    m = read_metrics(run, config["model_id"], 0)
    assert {"f2", "map"} <= set(m["history"][0]) and m["metric"] == "f2"

    summary = predict.predict_run(run, gpus_per_actor=0, progress=False)
    assert len(summary["predicted"]) == 2
    oof_tta = pd.read_parquet(run / "models" / config["model_id"] / "oof_tta.parquet")
    p = oof_tta[config["classes"]].to_numpy()
    assert ((p > 0) & (p < 1)).all() and not np.allclose(p.sum(1), 1)  # independent sigmoids, not a softmax

    stack.main(["--run", str(run), "--method", "all", "--metric", "f2", "--smoke"])
    out = capsys.readouterr().out
    assert "thresholds on" in out
    scores = pd.read_csv(run / "ensemble" / "scores.csv").set_index("method")
    assert {"thresholds", "global_threshold", "greedy", "lgbm", "logreg"} <= set(scores.index)
    # Per-label thresholds never lose to the best single global threshold on the data they were fitted on.
    assert scores.loc["thresholds", "in_sample_score"] >= scores.loc["global_threshold", "in_sample_score"]
    fitted = json.loads((run / "ensemble" / "thresholds.json").read_text())
    assert set(fitted["thresholds"]) == set(config["classes"])
    sub = pd.read_csv(run / "ensemble" / "submission.csv", keep_default_na=False)
    assert list(sub.columns) == ["id", "tags"] and len(sub) == 1000
    assert set(" ".join(sub["tags"]).split()) <= set(config["classes"]) and (sub["tags"] != "").all()


def test_fashionai_soft_labels_and_two_rounds(tmp_path, demo_dir, ray_cluster):
    digits = pd.read_csv(demo_dir / "multiclass.csv").head(300)
    names = sorted(digits["label"].unique())
    rng = np.random.default_rng(0)

    def attribute(label: str) -> str:  # 'y' at the digit; a third of the rows also 'm'aybe a neighbour
        chars = ["n"] * len(names)
        i = names.index(label)
        chars[i] = "y"
        if rng.random() < 1 / 3:
            chars[(i + 1) % len(names)] = "m"
        return "".join(chars)

    digits.assign(label=digits["label"].map(attribute)).to_csv(tmp_path / "attr.csv", index=False)
    run = sweep(tmp_path, {
        "data": {"manifest": str(tmp_path / "attr.csv"), "root": str(demo_dir), "test_manifest": "demo:test",
                 "target": {"form": "attribute", "column": "label", "maybe_weight": 0.5},
                 "preprocess": "pad", "augment": "equalize+contrast", "tta": "orig,equalize,contrast",
                 "normalize": "dataset"},
        "folds": {"k": 3, "strategy": "stratified", "seed": 0}, "backbones": ["test_resnet"],
        "params": {"lr": 1.0e-3, "batch_size": 32, "image_size": 32},
        "stages": [{"epochs": 1, "freeze": True, "lr_scale": 10}, {"epochs": 1}],
        "metric": "accuracy", "resources": {"cpu": 1}})
    model_dir = next((run / "models").glob("*/"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["target"]["form"] == "attribute" and config["classes"] == [f"c{i}" for i in range(10)]
    for k in range(3):
        history = read_metrics(run, config["model_id"], k)["history"]
        # Round 1 trains the head at 10x the lr, round 2 everything at the base lr (cosine per round).
        assert len(history) == 2 and history[0]["lr"] > 2 * history[1]["lr"]
    folds = pd.read_csv(run / "folds.csv", dtype=str, keep_default_na=False)
    assert (folds["label"].str.count("m") > 0).any()  # soft rows reached the sweep
    predict.predict_run(run, gpus_per_actor=0, progress=False)
    oof_tta = pd.read_parquet(model_dir / "oof_tta.parquet")
    np.testing.assert_allclose(oof_tta[config["classes"]].sum(axis=1), 1, atol=1e-4)
    assert json.loads((model_dir / "predict.json").read_text())["views"] == ["orig", "equalize", "contrast"]
    stack.main(["--run", str(run), "--method", "greedy", "--metric", "accuracy", "--smoke"])
    scores = pd.read_csv(run / "ensemble" / "scores.csv")
    assert (scores["metric"] == "accuracy").all() and scores["cv_score"].between(0, 1).all()


def test_unreadable_images_under_on_bad_image_skip(tmp_path, demo_dir, ray_cluster, capsys):
    """A corrupt training image and a corrupt test image with on_bad_image: skip: the sweep names them and
    trains without them, every id still gets a prediction (the class prior), and stacking runs."""
    import shutil

    train = pd.read_csv(demo_dir / "multiclass.csv").head(240)
    test = pd.read_csv(demo_dir / "test.csv").head(40)
    for image in pd.concat([train["image"], test["image"]]):
        (tmp_path / "data" / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_dir / image, tmp_path / "data" / image)
    bad_train, bad_test = train.iloc[7], test.iloc[3]
    for image in (bad_train["image"], bad_test["image"]):
        path = tmp_path / "data" / image
        path.write_bytes(path.read_bytes()[:40])  # a truncated PNG
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    run = sweep(tmp_path, {
        "data": {"manifest": str(tmp_path / "train.csv"), "root": str(tmp_path / "data"),
                 "test_manifest": str(tmp_path / "test.csv"), "on_bad_image": "skip", "augment": "shift:0.1",
                 "tta": "orig,rotate:5", "normalize": {"mean": [0.1, 0.1, 0.1], "std": [0.3, 0.3, 0.3]}},
        "folds": {"k": 3, "strategy": "stratified", "seed": 0}, "backbones": ["test_resnet"],
        "params": {"lr": 3.0e-3, "batch_size": 32, "image_size": 32}, "epochs": 1, "metric": "log_loss",
        "resources": {"cpu": 1}})
    err = capsys.readouterr().err
    assert "unreadable or corrupt image at row 8 (1 row)" in err and str(bad_train["id"]) in err
    model_dir = next((run / "models").glob("*/"))
    config = json.loads((model_dir / "config.json").read_text())
    classes = config["classes"]
    skipped = [read_metrics(run, config["model_id"], k)["skipped_ids"] for k in range(3)]
    assert all(s == [str(bad_train["id"])] for s in skipped)  # met as a training row or a held-out one
    oof = pd.read_parquet(model_dir / "oof.parquet").set_index("id")
    assert not oof[classes].isna().any().any()
    folds = pd.read_csv(run / "folds.csv", dtype={"id": str}).set_index("id")
    fold = oof.loc[str(bad_train["id"]), "fold"]
    prior = pd.get_dummies(folds["label"][folds["fold"] != fold]).reindex(columns=classes, fill_value=0).mean()
    np.testing.assert_allclose(oof.loc[str(bad_train["id"]), classes].to_numpy(float), prior.to_numpy(), atol=1e-6)

    predict.predict_run(run, gpus_per_actor=0, progress=False)
    assert json.loads((model_dir / "predict.json").read_text())["unreadable"] == {"oof": 1, "test": 1}
    oof_tta = pd.read_parquet(model_dir / "oof_tta.parquet").set_index("id")
    np.testing.assert_allclose(oof_tta.loc[str(bad_train["id"]), classes].to_numpy(float),
                               oof.loc[str(bad_train["id"]), classes].to_numpy(float), atol=1e-6)
    test_pred = pd.read_parquet(model_dir / "test.parquet").set_index("id")
    assert len(test_pred) == 40 and not test_pred.isna().any().any()
    np.testing.assert_allclose(test_pred.loc[str(bad_test["id"])].to_numpy(float),
                               oof[classes].to_numpy(float).mean(0), atol=1e-6)
    assert stack.main(["--run", str(run), "--method", "greedy", "--smoke"]) == 0
