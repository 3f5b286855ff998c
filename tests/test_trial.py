"""One trial's fold tasks (ensemble.tune.trial) on a URI run: a fold continues on a machine that has nothing local."""

from __future__ import annotations

import shutil

import pandas as pd
from sweep_fixtures import read_metrics, small_space

from ensemble.tune import launch, spaces
from ensemble.tune.train import train_fold


def test_fold_resumes_from_a_uri_checkpoint_in_an_empty_mirror(tmp_path, demo_dir, monkeypatch):
    """A fold task trains epoch 1 on one machine; another machine, with nothing local, continues it
    from the URI to the same result as an uninterrupted fold."""
    from ensemble.run.storage import RunStore
    from ensemble.tune.trial import _fold_task

    space = spaces.load_space(str(small_space(tmp_path, demo_dir, rows=160)))
    config = launch.prepare_run(space, tmp_path / "straight", resume=False, smoke=False)[0]
    straight = train_fold(config, 0, tmp_path / "straight")
    uri = (tmp_path / "bucket" / "run").as_uri()
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "machine-a"))
    launch.prepare_run(space, RunStore(uri).local, resume=False, smoke=False)
    RunStore(uri).push("folds.csv")
    _fold_task(config, 0, uri, 1)  # a crash after epoch 1 ...
    remote = tmp_path / "bucket" / "run"
    first = read_metrics(remote, config["model_id"], 0)["history"]
    shutil.rmtree(tmp_path / "machine-a")
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "machine-b"))
    stale = RunStore(uri).local / "models" / config["model_id"] / "fold0" / "last.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a checkpoint left by an earlier run at this URI")  # replaced, not loaded
    row = _fold_task(config, 0, uri, 2)  # ... continues elsewhere at epoch 2
    assert row["epoch"] == 2 and straight.epochs == 2
    history = read_metrics(remote, config["model_id"], 0)["history"]
    assert [r["epoch"] for r in history] == [1, 2] and history[:1] == first  # epoch 1 came from the URI
    a = pd.read_parquet(tmp_path / "straight" / "models" / config["model_id"] / "fold0" / "oof.parquet")
    b = pd.read_parquet(remote / "models" / config["model_id"] / "fold0" / "oof.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_fold_workers_and_tta_actors_import_timm_without_its_wandb_hook():
    """timm imports wandb when it is installed (0.6 s a worker); a TTA actor's first item and a fold
    worker's import hide it from timm only: wandb is not loaded, and stays importable for the trackers."""
    import importlib.util
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (the ensemble[trackers] extra)")
    code = ("import sys; from ensemble.predict.pool import Predictor; Predictor(1.0)._torch();"
            "print('timm' in sys.modules, 'wandb' in sys.modules);"
            "from ensemble.tune.trial import import_without_wandb; import_without_wandb();"
            "import timm.utils.summary as s; print('wandb' in sys.modules, hasattr(s, 'wandb'));"
            "import wandb; print('wandb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "False", "False", "True"]
