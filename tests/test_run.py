"""The run directory (ensemble.run): its layout helpers, the checks stages share, and the one-writer lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ensemble.errors import UserError
from ensemble.run import Run, locked, open_run
from ensemble.run import lock as lock_mod

REPO = Path(__file__).resolve().parents[1]
S3 = "s3://bucket/runs/x?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


def test_a_local_run_is_absolute_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Run("runs/demo")
    assert run.location == str(tmp_path / "runs" / "demo") and run.dir == tmp_path / "runs" / "demo"
    assert run.fold_dir("m", 2) == tmp_path / "runs/demo/models/m/fold2"
    assert run.rel(run.fold_dir("m", 2) / "last.pt") == "models/m/fold2/last.pt"
    assert run.show(run.folds_file) == str(tmp_path / "runs/demo/folds.csv")
    assert run.predict_dir("m", smoke=True) == tmp_path / "runs/demo/predict-smoke/m"
    assert not run.pull() and run.push(run.folds_file) is None  # local: nothing to copy


def test_a_uri_run_shows_paths_with_the_query_string_last(tmp_path, monkeypatch):
    from ensemble.run.storage import RunStore

    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "cache"))
    run = Run(S3, RunStore(S3, local=tmp_path / "scratch"))
    assert run.show(run.model_dir("m")) == \
        "s3://bucket/runs/x/models/m?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    assert run.show() == S3


def test_check_folds_names_the_file_and_the_missing_fold(tmp_path):
    run = Run(tmp_path)
    run.check_folds(pd.Series([0, 1, 2, 1]), 3)
    with pytest.raises(UserError, match=r"folds.csv: folds \[0, 2\] but the models were trained with k=3 .*"
                                        r"missing \[1\]"):
        run.check_folds(pd.Series([0, 2, 2]), 3)


def test_check_run_and_writable(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        Run(tmp_path / "nothing").check()
    Run(tmp_path / "new" / "run").check_writable()  # probes the nearest existing parent, creates nothing
    assert list(tmp_path.iterdir()) == []


def test_open_run_on_a_directory_is_the_directory(tmp_path):
    with open_run(tmp_path / "r") as run:
        assert run.dir == tmp_path / "r" and run.store is None


# --------------------------------------------------------------------------- the lock


HOLD = """
import sys, time
from ensemble.run import Run, locked
with locked(Run(sys.argv[1]), "python -m ensemble.tune --space demo"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_while_the_first_lives_then_takes_over_a_dead_lock(tmp_path, capsys):
    run = Run(tmp_path / "run")
    holder = hold_lock(run.dir)
    try:
        with pytest.raises(UserError) as info:
            with locked(run, "python -m ensemble.predict --run runs/run"):
                pass
        message = str(info.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "python -m ensemble.tune" in message
        assert "Wait for it to finish" in message and "--name" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run.dir / "run.lock").read_text())["pid"] == holder.pid  # a SIGKILL leaves it behind
    with locked(run, "python -m ensemble.predict --run runs/run"):
        assert json.loads((run.dir / "run.lock").read_text())["pid"] == os.getpid()
    assert f"taking over {run.dir / 'run.lock'}" in capsys.readouterr().err
    assert not (run.dir / "run.lock").exists()  # released


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    run = Run(tmp_path / "run")
    with locked(run, "demo"):
        with locked(run, "sweep"):
            assert (run.dir / "run.lock").exists()
        assert (run.dir / "run.lock").exists()
    assert not (run.dir / "run.lock").exists()


def test_a_lock_from_another_host_is_stale_without_heartbeats(tmp_path, monkeypatch, capsys):
    run = Run(tmp_path / "run")
    run.dir.mkdir()
    old = {"host": "other-node", "pid": 1, "command": "python -m ensemble.tune", "started": time.time() - 999,
           "heartbeat": time.time() - 5}
    (run.dir / "run.lock").write_text(json.dumps(old))
    with pytest.raises(UserError, match="in use by python -m ensemble.tune \\(pid 1 on other-node"):
        with locked(run, "x"):
            pass
    old["heartbeat"] = time.time() - lock_mod.STALE_SECONDS - 1
    (run.dir / "run.lock").write_text(json.dumps(old))
    with locked(run, "x"):
        pass
    assert "no heartbeat for" in capsys.readouterr().err


def test_a_uri_run_is_locked_at_the_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "cache"))
    uri = (tmp_path / "bucket" / "run").as_uri()
    holder = hold_lock_uri(uri)
    try:
        with open_run(uri) as run:
            with pytest.raises(UserError, match=f"run.lock: this run is in use by .*pid {holder.pid}"):
                with locked(run, "x"):
                    pass
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait()


HOLD_URI = """
import sys, time
from ensemble.run import locked, open_run
with open_run(sys.argv[1]) as run, locked(run, "python -m ensemble.tune --space demo"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock_uri(uri: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_URI, uri], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
