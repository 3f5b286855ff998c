"""`make demo`'s program end to end (--smoke: small data, 1 epoch): data, views, sweep, TTA, stacking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ensemble import demo

REPO = Path(__file__).resolve().parents[1]


def run_demo(storage: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemble.demo", "--smoke", "--storage", str(storage)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_runs_end_to_end_then_resumes(tmp_path, demo_dir):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "demo-smoke"
    assert (run / "views.png").stat().st_size > 1000
    assert "Leaderboard" in first.stdout and "winner:" in first.stdout
    models = sorted(p.parent.name for p in (run / "models").glob("*/oof_tta.parquet"))
    assert len(models) == 2 and all((run / "models" / m / "test.parquet").is_file() for m in models)
    scores = pd.read_csv(run / "ensemble" / "scores.csv")
    assert {"mean", "greedy", "lgbm", "xgb", "ridge", "logreg"} <= set(scores["method"])
    assert len(pd.read_csv(run / "ensemble" / "submission.csv")) == 1000
    page = run / "report" / "index.html"
    assert page.is_file() and first.stdout.rstrip().splitlines()[-1].endswith(f"{page.name}")  # the path, last
    # Run again: the sweep resumes (nothing to train) and prediction skips the finished models.
    again = run_demo(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 model(s) already complete" in again.stdout and again.stdout.count("skipped") >= 2
    # The shipped demo space changed since (simulated by editing the run's frozen copy): start afresh.
    frozen = run / "space.yaml"
    assert demo._same_space(run, smoke=True) and "k: 3" in frozen.read_text()
    frozen.write_text(frozen.read_text().replace("k: 3", "k: 4"))
    assert not demo._same_space(run, smoke=True)
