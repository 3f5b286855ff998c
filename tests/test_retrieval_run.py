"""A real retrieval run: train embeddings on unseen-identity folds, predict them through the pool, retrieve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ensemble.tune import launch, spaces
from ensemble.tune.train import FoldTrainer, train_fold, train_until

pytestmark = pytest.mark.slow
METRICS = ("digix", "map@10", "top1", "recall@5", "recall@10")


def retrieval_space(tmp: Path, demo_dir: Path, rows: int = 210, heads=("softmax", "arcface"), epochs: int = 2) -> Path:
    """The first `rows` training digits 0-6 (identities), 2 folds grouped by digit; query/gallery: digits 7-9."""
    pd.read_csv(demo_dir / "retrieval.csv").head(rows).to_csv(tmp / "train.csv", index=False)
    for name in ("query", "gallery"):
        pd.read_csv(demo_dir / f"{name}.csv").head(30 if name == "query" else 60).to_csv(tmp / f"{name}.csv", index=False)
    space = {"task": "retrieval",
             "data": {"manifest": str(tmp / "train.csv"), "root": str(demo_dir), "query_manifest": str(tmp / "query.csv"),
                      "gallery_manifest": str(tmp / "gallery.csv"), "augment": "shift:0.1", "tta": "orig,rotate:5",
                      "normalize": "dataset"},
             "folds": {"k": 2, "seed": 0}, "backbones": ["test_resnet"],
             "params": {"lr": 3.0e-3, "batch_size": 32, "image_size": 32, "embedding_dim": 32, "scale": 16.0},
             "search": {"head": {"grid": list(heads)}}, "epochs": epochs, "resources": {"cpu": 1}}
    (tmp / "space.yaml").write_text(yaml.safe_dump(space))
    return tmp / "space.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir, ray_cluster):
    tmp = tmp_path_factory.mktemp("retrieval-run")
    launch.run_sweep(spaces.load_space(str(retrieval_space(tmp, demo_dir))), tmp / "run", verbose=0)
    return tmp / "run"


def cli(stage: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run([sys.executable, "-m", f"ensemble.{stage}", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_training_scores_held_out_identities_by_retrieval(trained):
    folds = pd.read_csv(trained / "folds.csv", dtype=str)
    per_fold = folds.groupby("fold")["label"].agg(set)
    assert not per_fold.iloc[0] & per_fold.iloc[1]  # whole identities per fold
    for config in trained.glob("models/*/config.json"):
        model_dir = config.parent
        assert json.loads(config.read_text())["task"] == "retrieval"
        for fold in (0, 1):
            metrics = json.loads((model_dir / f"fold{fold}" / "metrics.json").read_text())
            assert metrics["metric"] == "digix" and metrics["complete"]
            for row in metrics["history"]:
                assert all(0 <= row[m] <= 1 for m in METRICS) and row["loss"] is None
                assert row["digix"] == pytest.approx(0.5 * row["top1"] + 0.5 * row["map@10"])
            weights = torch.load(model_dir / f"fold{fold}" / "weights.pt", weights_only=True)
            train_ids = len(set(folds["label"]) - per_fold.iloc[fold])  # the head knows the training identities only
            assert weights["neck.0.weight"].shape == (32, weights["neck.0.weight"].shape[1])
            assert any(k.startswith("head.") and v.shape[0] in (train_ids, 3 * train_ids) for k, v in weights.items())
        oof = pd.read_parquet(model_dir / "oof.parquet")
        assert list(oof.columns) == ["id", "fold"] and sorted(oof["id"]) == sorted(folds["id"])


def test_a_resumed_retrieval_fold_equals_an_uninterrupted_one(tmp_path, demo_dir):
    space = spaces.load_space(str(retrieval_space(tmp_path, demo_dir, rows=120, heads=("subcenter",))))
    configs = {name: launch.prepare_run(space, tmp_path / name, resume=False, smoke=False)[0]
               for name in ("straight", "resumed")}
    train_fold(configs["straight"], 1, tmp_path / "straight")
    train_until(configs["resumed"], 1, tmp_path / "resumed", 1)
    trainer = FoldTrainer(configs["resumed"], 1, tmp_path / "resumed")
    assert trainer.restore() and trainer.epoch == 1
    trainer.train_epoch()
    model_id = configs["straight"]["model_id"]
    a, b = (torch.load(tmp_path / n / "models" / model_id / "fold1" / "weights.pt", weights_only=True)
            for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_predict_writes_unit_float16_embeddings_and_retrieve_uses_them(trained, tmp_path):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    proc = cli("predict", "--run", run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "oof_tta digix" in proc.stdout
    query = pd.read_csv(trained.parent / "query.csv")
    gallery = pd.read_csv(trained.parent / "gallery.csv")
    for model_dir in sorted(run.glob("models/*/")):
        emb = model_dir / "emb"
        oof = np.load(emb / "oof.npy", mmap_mode="r")
        assert oof.dtype == np.float16 and oof.shape == (210, 32)
        assert np.allclose(np.linalg.norm(oof.astype(np.float32), axis=1), 1, atol=2e-3)
        ids = pd.read_parquet(emb / "oof.ids.parquet")
        assert ids["id"].tolist() == pd.read_parquet(model_dir / "oof.parquet")["id"].tolist()
        for name, manifest in (("query", query), ("gallery", gallery)):
            stacked = np.load(emb / f"{name}.npy", mmap_mode="r")
            assert stacked.shape == (2, len(manifest), 32)  # one embedding per fold model
            assert pd.read_parquet(emb / f"{name}.ids.parquet")["id"].tolist() == manifest["id"].tolist()
        scores = json.loads((model_dir / "predict.json").read_text())["scores"]
        assert set(scores) == {"oof digix", "oof_tta digix"}
    again = cli("predict", "--run", run)
    assert again.returncode == 0 and again.stdout.count("outputs complete") == 2
    refused = cli("predict", "--run", run, "--submission")
    assert refused.returncode == 2 and "python -m ensemble.retrieve" in refused.stderr
    stacked = cli("stack", "--run", run)
    assert stacked.returncode == 2 and "is a retrieval run" in stacked.stderr
    found = cli("retrieve", "--run", run, "--k", 5)
    assert found.returncode == 0, found.stdout + found.stderr
    assert "winner:" in found.stdout and "hold-out digix" in found.stdout
    sub = pd.read_csv(run / "retrieval" / "submission.csv")
    assert sub["id"].tolist() == query["id"].tolist()
    assert sub["gallery_ids"].str.split().map(lambda r: len(r) == 5 and set(r) <= set(gallery["id"])).all()


def test_a_query_also_in_the_gallery_is_refused_before_anything_runs(trained, tmp_path):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    gallery = pd.read_csv(trained.parent / "gallery.csv")
    query = pd.read_csv(trained.parent / "query.csv")
    both = tmp_path / "gallery.csv"
    pd.concat([gallery, query.head(2)]).to_csv(both, index=False)
    for config in run.glob("models/*/config.json"):
        doc = json.loads(config.read_text())
        doc["data"]["gallery_manifest"] = str(both)
        config.write_text(json.dumps(doc))
    proc = cli("predict", "--run", run)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "2 id(s) are in both" in proc.stderr and query["id"][0] in proc.stderr
    assert not list(run.glob("models/*/emb"))
