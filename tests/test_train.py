"""Training one fold (ensemble.tune.train), no Ray: a resumed fold equals an uninterrupted one."""

from __future__ import annotations

import json

import pandas as pd
from sweep_fixtures import read_metrics, small_space

from ensemble.tune import launch, spaces
from ensemble.tune.train import FoldTrainer, train_fold, train_until


def test_fold_resumed_from_checkpoint_equals_uninterrupted(tmp_path, demo_dir):
    space = spaces.load_space(str(small_space(tmp_path, demo_dir, rows=160)))
    configs = {}
    for name in ("straight", "resumed"):
        configs[name] = launch.prepare_run(space, tmp_path / name, resume=False, smoke=False)[0]
    straight = train_fold(configs["straight"], 0, tmp_path / "straight")
    assert straight.complete and straight.epochs == 2
    train_until(configs["resumed"], 0, tmp_path / "resumed", 1)  # a crash after epoch 1 ...
    trainer = FoldTrainer(configs["resumed"], 0, tmp_path / "resumed")
    assert trainer.restore() and trainer.epoch == 1  # ... resumes at epoch 2, not 0
    trainer.train_epoch()
    model_id = configs["straight"]["model_id"]
    a = pd.read_parquet(tmp_path / "straight" / "models" / model_id / "fold0" / "oof.parquet")
    b = pd.read_parquet(tmp_path / "resumed" / "models" / model_id / "fold0" / "oof.parquet")
    pd.testing.assert_frame_equal(a, b)
    history = read_metrics(tmp_path / "resumed", model_id, 0)["history"]
    assert [row["epoch"] for row in history] == [1, 2]


def test_the_amp_loss_scale_carries_over_epochs_and_through_last_pt(tmp_path, demo_dir):
    """GradScaler's loss scale belongs to the fold: it continues from epoch to epoch and through a resume (on a GPU
    a fresh scaler every epoch would skip its first steps again). Here a CPU scaler that doubles every step."""
    import torch

    space = spaces.load_space(str(small_space(tmp_path, demo_dir, rows=160)))
    config = launch.prepare_run(space, tmp_path / "run", resume=False, smoke=False)[0]

    def trainer() -> FoldTrainer:
        fold = FoldTrainer(config, 0, tmp_path / "run")
        fold.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
        return fold

    first = trainer()
    first.train_epoch()
    after_one = first.scaler.get_scale()
    first.train_epoch()
    assert 1.0 < after_one < first.scaler.get_scale()
    resumed = trainer()
    assert resumed.restore() and resumed.scaler.get_scale() == first.scaler.get_scale()


def test_a_metrics_file_lagging_behind_last_pt_is_rewritten_on_restore(tmp_path, demo_dir):
    """A crash between saving last.pt and metrics.json: the fold resumes at the checkpoint's epoch and its
    metrics.json catches up, even when no epoch is left to train (else the trial would wait forever)."""
    space = spaces.load_space(str(small_space(tmp_path, demo_dir, rows=160)))
    config = launch.prepare_run(space, tmp_path / "run", resume=False, smoke=False)[0]
    train_until(config, 0, tmp_path / "run", 1)
    path = tmp_path / "run" / "models" / config["model_id"] / "fold0" / "metrics.json"
    lagging = path.read_text()
    train_until(config, 0, tmp_path / "run", 2)
    done = json.loads(path.read_text())
    path.write_text(lagging)  # last.pt says 2 epochs, metrics.json says 1
    pushed = []
    row = train_until(config, 0, tmp_path / "run", 2, after_epoch=lambda: pushed.append(1))
    assert row["epoch"] == 2 and pushed == [1]  # restored, nothing trained, the caught-up files pushed
    assert json.loads(path.read_text()) == done


# --------------------------------------------------------------------------- sweeps on the session cluster
