"""The sweep's display (ensemble.tune.progress): a line per model, in place on a terminal, a line per change in a log."""

from __future__ import annotations

import io
import json

import pandas as pd

from ensemble.run import Run
from ensemble.tune.progress import SweepProgress, leaderboard, model_label, print_leaderboard


def configs(k: int = 3, epochs: int = 2) -> list[dict]:
    return [{"model_id": f"test_resnet-{i}", "backbone": "test_resnet", "k": k, "stages": [{"epochs": epochs}],
             "metric": "log_loss", "mode": "min", "searched": {"lr": lr}} for i, lr in enumerate((0.003, 0.01))]


def test_model_label_names_the_searched_params():
    assert model_label("test_resnet", {"lr": 0.003, "dropout": 0.5}) == "test_resnet dropout=0.5 lr=0.003"
    assert model_label("resnet18", {}) == "resnet18"
    assert model_label("b", {"lr": 1 / 3}) == "b lr=0.3333"


def test_a_log_gets_one_line_per_change():
    out = io.StringIO()
    progress = SweepProgress(configs(), {c["model_id"]: c["searched"] for c in configs()}, "log_loss", "min",
                             stream=out, tty=False)
    progress.started("test_resnet-0")
    progress.result("test_resnet-0", 1, 0.9)
    progress.tick()  # nothing between events in a log
    progress.result("test_resnet-0", 2, 0.95)  # the last epoch: its line is the 'complete' line below
    progress.ended("test_resnet-0", "complete")
    lines = out.getvalue().splitlines()
    assert lines[0] == "Sweep: 2 model(s) x 3 folds, 12 fold-epochs (log_loss, lower is better)"
    assert len(lines) == 4 and all(line.startswith("[") for line in lines[1:])
    assert "test_resnet lr=0.003" in lines[2] and "fold-epochs 3/6" in lines[2] and "log_loss 0.9000 (best 0.9000)" in lines[2]
    assert "ETA" in lines[2] and lines[2].endswith("training")
    assert "fold-epochs 6/6  log_loss 0.9500 (best 0.9000)" in lines[3] and lines[3].endswith("complete")
    assert "\x1b[" not in out.getvalue()


def test_a_terminal_gets_the_block_redrawn_in_place(tmp_path):
    run = Run(tmp_path)
    out = io.StringIO()
    progress = SweepProgress(configs(), {c["model_id"]: c["searched"] for c in configs()}, "log_loss", "min",
                             run=run, stream=out, tty=True)
    progress.started("test_resnet-1")
    fold = run.fold_dir("test_resnet-1", 0)
    fold.mkdir(parents=True)
    (fold / "metrics.json").write_text(json.dumps({"epochs": 1}))  # a fold finished an epoch: seen between reports
    progress.last_tick = 0
    progress.tick()
    frames = out.getvalue().split("\x1b[3F")  # 2 models + the footer: the cursor goes back 3 lines per redraw
    assert len(frames) == 2 and frames[0].count("\x1b[2K") == 3
    assert "test_resnet lr=0.01" in frames[-1] and "fold-epochs 1/6" in frames[-1] and "waiting" in frames[-1]
    assert "1/12 fold-epochs" in frames[-1]


def test_leaderboard_one_row_per_model_best_first(tmp_path):
    run = Run(tmp_path)
    for i, scores in enumerate(([0.5, 0.7, 0.6], [0.4, 0.45, 0.5])):
        for f, score in enumerate(scores):
            fold = run.fold_dir(f"test_resnet-{i}", f)
            fold.mkdir(parents=True)
            (fold / "metrics.json").write_text(json.dumps({"best_score": score, "best_epoch": 2, "epochs": 2}))
    board = leaderboard(run, configs())
    assert board["model"].tolist() == ["test_resnet lr=0.01", "test_resnet lr=0.003"]
    assert board.loc[0, "mean"] == pd.Series([0.4, 0.45, 0.5]).mean() and board.loc[0, "best_epochs"] == "2 2 2"
    assert set(board["state"]) == {"todo"} and list(board["lr"]) == [0.01, 0.003]
    out = io.StringIO()
    print_leaderboard(board, "runs/x/leaderboard.csv", out)
    text = out.getvalue()
    assert "  1. test_resnet lr=0.01   0.4500 ± 0.0408    folds 0.4000 0.4500 0.5000  best epochs 2 2 2" in text
