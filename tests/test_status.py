"""`python -m ensemble.status`: a finished run, each model state from its files, a live sweep, a URI run, not a run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack_fixtures import write_run
from sweep_fixtures import small_space

from ensemble import status
from ensemble.run import Run

REPO = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0  # the first epoch's start in the synthetic runs
EPOCH_SECONDS = 10.0
MODELS = {"resnet-a1": (2.0, 1.0, 1.0), "effnet-b2": (1.9, 1.0, 0.7), "vit-d4": (1.2, 1.2, 1.0)}


def write_folds(run: Path, model_id: str, losses: list[list[float]], epochs: int = 3, complete: bool = True,
                start: float = T0) -> None:
    """config.json gets what a sweep writes (stages, mode, searched); fold<k>/metrics.json a history per fold:
    `losses[k]` the log_loss of each finished epoch, every fold's epoch e running [start + 10 e, start + 10 e + 10)."""
    model_dir = run / "models" / model_id
    config = json.loads((model_dir / "config.json").read_text())
    config.update(stages=[{"epochs": epochs}], mode="min", searched={"lr": 0.003})
    (model_dir / "config.json").write_text(json.dumps(config))
    for fold, curve in enumerate(losses):
        history = [{"epoch": e + 1, "train_loss": 1.0, "loss": loss, "log_loss": loss, "accuracy": 0.5,
                    "started": start + EPOCH_SECONDS * e, "seconds": EPOCH_SECONDS} for e, loss in enumerate(curve)]
        best = min(range(len(curve)), key=curve.__getitem__) if curve else None
        metrics = {"model_id": model_id, "fold": fold, "metric": "log_loss", "mode": "min", "epochs": len(curve),
                   "complete": complete, "stopped": None, "history": history,
                   "best_epoch": None if best is None else best + 1, "best_score": None if best is None else curve[best]}
        (model_dir / f"fold{fold}").mkdir(parents=True, exist_ok=True)
        (model_dir / f"fold{fold}" / "metrics.json").write_text(json.dumps(metrics))


def finished_run(root: Path) -> Path:
    """Three complete models (2 folds x 3 epochs), two predicted, stacked (the winner: logreg) and reported."""
    run = write_run(root, "multiclass", n=60, n_test=10, k=2, n_classes=3, models=MODELS)
    for model_id in MODELS:
        write_folds(run, model_id, [[0.9, 0.6, 0.7], [0.8, 0.5, 0.55]])
    (run / "models" / "vit-d4" / "predict.json").unlink()
    (run / "ensemble").mkdir()
    (run / "ensemble" / "scores.csv").write_text(
        "method,metric,cv_score,in_sample_score,cv_score_thresholded,in_sample_score_thresholded\n"
        "best_single:resnet-a1,log_loss,0.52,0.52,,\nmean,log_loss,0.50,0.50,,\ngreedy,log_loss,0.47,0.45,,\n"
        "logreg,log_loss,0.44,0.40,,\nlgbm,log_loss,0.46,0.30,,\n")
    (run / "report").mkdir()
    (run / "report" / "index.html").write_text("<html></html>")
    return run


def snapshot(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def status_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command exactly as a user types it."""
    return subprocess.run([sys.executable, "-m", "ensemble.status", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


# --------------------------------------------------------------------------- files only


def test_a_finished_run_shows_complete_models_and_every_stage(tmp_path, capsys):
    run = finished_run(tmp_path / "run")
    before = snapshot(tmp_path)
    assert status.main(["--run", str(run)]) == 0
    text = capsys.readouterr().out
    assert snapshot(tmp_path) == before  # read only
    lines = text.splitlines()
    assert lines[0] == f"{run}: 3 model(s) x 2 folds, log_loss (lower is better)"
    assert lines[1] == "lock      free: no launch is running"
    # The folds' mean per epoch is 0.85, 0.55, 0.625: the current score is the last, the best the lowest.
    resnet = next(line for line in lines if "[resnet-a1]" in line)
    assert resnet == "  resnet lr=0.003       fold-epochs 6/6  log_loss 0.6250 (best 0.5500)  0:30  complete  [resnet-a1]"
    assert "sweep     18/18 fold-epochs: 3 complete; 0:30 elapsed" in text
    assert "predict   2 of 3 complete model(s) predicted: python -m ensemble.predict --run" in text
    assert f"stack     winner logreg: cv log_loss 0.44000 ({run / 'ensemble' / 'scores.csv'})" in text
    assert f"report    {run / 'report' / 'index.html'}" in text and "retrieve" not in text and "ETA" not in text

    assert status.main(["--run", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["state"] for m in doc["models"]] == ["complete"] * 3  # sorted by model id
    assert doc["lock"] is None and doc["sweep"]["states"] == {"complete": 3} and doc["retrieve"] is None
    assert doc["predict"]["done"] == 2 and doc["stack"]["winner"] == "logreg" and doc["report"]["state"] == "done"
    m = doc["models"][0]
    assert (m["fold_epochs"], m["epoch"], m["elapsed"], m["eta"]) == (6, 3, 30.0, None)
    assert m["score"] == pytest.approx(0.625) and m["best"] == pytest.approx(0.55)


def test_each_model_state_from_its_files_and_the_lock(tmp_path):
    """training under a live sweep (with its ETA), pruned, failed (Tune's error.txt), interrupted, todo."""
    run_dir = write_run(tmp_path / "run", "multiclass", n=40, n_test=5, k=2, n_classes=3,
                        models={m: (1.0, 1.0, 1.0) for m in ("a", "b", "c", "d", "e")})
    for model_id in "abcde":
        (run_dir / "models" / model_id / "oof.parquet").unlink()  # none finished
    write_folds(run_dir, "a", [[0.9, 0.7], [0.8]], epochs=4, complete=False)
    (run_dir / "models" / "a" / "fold1" / "running.json").write_text(
        json.dumps({"pid": os.getpid(), "epoch": 1, "started": T0 + 10}))
    write_folds(run_dir, "b", [[0.9], [0.8]], epochs=4, complete=False)
    (run_dir / "models" / "b" / "status.json").write_text('{"state": "pruned", "epoch": 1}')
    write_folds(run_dir, "c", [[0.9], []], epochs=4, complete=False)
    trial = run_dir / "tune" / "attempt-1" / "run_model_0_model_id=c"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text('{"model_id": "c"}')
    (trial / "error.txt").write_text("Failure # 1\nValueError: bad image\n")
    write_folds(run_dir, "d", [[0.9], [0.8]], epochs=4, complete=False)
    write_folds(run_dir, "e", [[], []], epochs=4, complete=False)
    run = Run(run_dir)

    now = T0 + 25  # a: fold 0 has finished 2 epochs, fold 1 one epoch and is 15 s into its second
    # No launch holds the lock: what started and did not finish failed (c: Tune's error.txt) or was interrupted.
    doc = status.run_status(run, now)
    states = {m["model_id"]: m["state"] for m in doc["models"]}
    assert states == {"a": "interrupted", "b": "pruned", "c": "failed", "d": "interrupted", "e": "todo"}
    c = next(m for m in doc["models"] if m["model_id"] == "c")
    assert c["error"] == str(trial / "error.txt") and "error: " + str(trial / "error.txt") in status.format_status(doc)
    assert doc["sweep"]["eta"] is None and "--resume" in status.format_status(doc)

    # A live sweep holds the lock (this process, on this host): a's folds are training.
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "command": "python -m ensemble.tune --space x",
            "started": T0 - 5, "heartbeat": now - 4}
    (run_dir / "run.lock").write_text(json.dumps(lock))
    doc = status.run_status(run, now)
    states = {m["model_id"]: m["state"] for m in doc["models"]}
    assert states == {"a": "training", "b": "pruned", "c": "training", "d": "training", "e": "todo"}
    a = doc["models"][0]
    # 3 fold-epochs in the 25 s its epochs ran (0-20 s and fold 1's second epoch 10-25 s): 5 more take 41.7 s.
    assert (a["fold_epochs"], a["epoch"], a["elapsed"]) == (3, 1, 25.0) and a["eta"] == pytest.approx(25 / 3 * 5)
    assert a["score"] == pytest.approx(0.85) and a["folds"][1]["running"]["epoch"] == 1
    assert doc["lock"]["live"] and doc["lock"]["heartbeat_age"] == pytest.approx(4.0)
    text = status.format_status(doc)
    assert "lock      held by python -m ensemble.tune --space x (pid" in text and "heartbeat 4 s ago" in text
    line = next(line for line in text.splitlines() if "[a]" in line)
    assert "fold-epochs 3/8  log_loss 0.8500 (best 0.8500)  0:25  ETA 0:42  training" in line

    # Its process is gone: the lock is stale, nothing is training any more.
    (run_dir / "run.lock").write_text(json.dumps(dict(lock, pid=dead_pid())))
    doc = status.run_status(run, now)
    assert not doc["lock"]["live"] and doc["models"][0]["state"] == "interrupted"
    assert "the next launch takes it over" in status.format_status(doc)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_not_a_run_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        proc = status_cli("--run", where)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.strip().splitlines() == [(f"error: {where}: not a run directory (needs folds.csv and "
                                                     "models/); pass the directory the sweep wrote, e.g. runs/<name>.")]


def test_a_uri_run_is_read_from_a_scratch_copy(tmp_path):
    run = finished_run(tmp_path / "bucket" / "run")
    lock = {"host": "another-host", "pid": 1, "command": "python -m ensemble.predict --run x",
            "started": time.time() - 60, "heartbeat": time.time() - 3}
    (run / "run.lock").write_text(json.dumps(lock))
    before = snapshot(tmp_path)
    proc = status_cli("--run", run.as_uri(), "--json")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path) == before
    doc = json.loads(proc.stdout)
    assert doc["run"] == run.as_uri() and [m["state"] for m in doc["models"]] == ["complete"] * 3
    assert doc["predict"]["done"] == 2 and doc["stack"]["winner"] == "logreg"
    assert doc["report"]["path"] == f"{run.as_uri()}/report/index.html"
    assert doc["lock"]["live"] and doc["lock"]["host"] == "another-host" and not doc["sweep"]["live"]
    assert doc["models"][0]["score"] == pytest.approx(0.625)
    missing = status_cli("--run", (tmp_path / "bucket" / "nothing").as_uri())
    assert missing.returncode == 2 and "not a run directory" in missing.stderr


# --------------------------------------------------------------------------- a live sweep


@pytest.mark.slow
def test_status_of_a_live_sweep_then_of_the_finished_run(tmp_path, demo_dir):
    # ~20 s of epochs on 2 CPUs (300 rows x 6 epochs take 4 s): long enough for a 1 s status call to see it train.
    space = small_space(tmp_path, demo_dir, rows=1200, epochs=8)
    run_dir = tmp_path / "runs" / "live"
    sweep = subprocess.Popen([sys.executable, "-m", "ensemble.tune", "--space", str(space), "--storage",
                              str(tmp_path / "runs"), "--name", "live"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline, seen = time.time() + 120, None
        while seen is None:
            assert sweep.poll() is None, f"the sweep ended before status saw it train:\n{sweep.stdout.read()}"
            assert time.time() < deadline, "status never showed a model training"
            proc = status_cli("--run", run_dir)
            # A score shows once every fold has finished an epoch (before that: fold-epochs and the ETA only).
            scored = r"fold-epochs +[1-9]\d*/16  log_loss \d\.\d{4} \(best \d\.\d{4}\)  \d+:\d\d  ETA \d+:\d\d  training  \["
            if any(re.search(scored, line) for line in proc.stdout.splitlines()):
                seen = proc
            time.sleep(0.5)
        assert seen.returncode == 0, seen.stderr
        assert f"lock      held by python -m ensemble.tune --space {space}" in seen.stdout
        out, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, out
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    done = status_cli("--run", run_dir, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["lock"] is None and doc["models"] and {m["state"] for m in doc["models"]} == {"complete"}
    assert all(m["fold_epochs"] == 16 and m["eta"] is None for m in doc["models"])
    assert doc["stack"]["state"] == "todo" and doc["predict"]["done"] == 0
