"""--logger tensorboard|wandb|mlflow: a real sweep, stack and report logging to all three offline, each
tracker's files read back; and the refusals (a tracker not installed, a run at a URI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sweep_fixtures import small_space

from ensemble import trackers
from ensemble.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def tfevents_scalars(folder: Path) -> dict[str, float]:
    """{tag: last value} of the TensorBoard event files under `folder` (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in folder.rglob("events.out.tfevents*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length  # length, its crc, the data, its crc
            out.update({v.tag: v.simple_value for v in event.summary.value})
    return out


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline run file (a LevelDB-style log after a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2

    data, records, chunks, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B writes one or the other


def wandb_run(folder: Path) -> dict:
    """An offline W&B run: its name, group, config and every logged key's last value."""
    out = {"config": {}, "history": {}}
    for record in wandb_records(next(folder.glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["group"] = record.run.display_name, record.run.run_group
            out["config"].update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "history":
            out["history"].update({_key(i): json.loads(i.value_json) for i in record.history.item})
    return out


@pytest.mark.slow
def test_sweep_stack_and_report_log_to_tensorboard_wandb_and_mlflow_offline(tmp_path, demo_dir, monkeypatch):
    path = small_space(tmp_path, demo_dir, rows=150, epochs=2, folds={"k": 3, "strategy": "stratified", "seed": 0},
                       search={"weight_decay": {"grid": [0.0, 0.05]}})
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "tracked"
    sweep = run("ensemble.tune", "--space", path, "--storage", runs, "--name", "tracked",
                "--logger", "tensorboard", "--logger", "wandb", "--logger", "mlflow")
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert f"Curves per model: tensorboard --logdir {run_dir / 'tune'}" in sweep.stdout
    assert f"upload with: wandb sync {run_dir}/wandb/offline-run-*" in sweep.stdout
    assert f"mlflow ui --backend-store-uri {(run_dir / 'mlruns').as_uri()}" in sweep.stdout
    assert set(json.loads((run_dir / "trackers.json").read_text())) == {"tensorboard", "wandb", "mlflow"}
    for stage in ("predict", "stack", "report"):
        done = run(f"ensemble.{stage}", "--run", run_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        if stage != "predict":
            assert sum(f"logged the {stage} scores to" in line for line in done.stdout.splitlines()) == 3, done.stdout
    leaderboard = pd.read_csv(run_dir / "leaderboard.csv")
    scores = pd.read_csv(run_dir / "ensemble" / "scores.csv")

    # TensorBoard: Tune's per-trial files, and the stack's and the report's
    per_trial = [tfevents_scalars(d) for d in (run_dir / "tune" / "attempt-1").iterdir() if d.is_dir()]
    assert len(per_trial) == 2 and all("ray/tune/fold2_log_loss" in s for s in per_trial)
    stack_tb = tfevents_scalars(run_dir / "tune" / "stack")
    assert stack_tb["stack/greedy"] == pytest.approx(scores.set_index("method").loc["greedy", "cv_score"], rel=1e-6)
    assert len(tfevents_scalars(run_dir / "tune" / "report")) >= 2

    # W&B: one offline run per model (its searched params as config, the folds' scores per epoch), stack, report
    offline = {r["name"]: r for r in map(wandb_run, (run_dir / "wandb").glob("offline-run-*"))}
    assert len(offline) == 4 and {r["group"] for r in offline.values()} == {"tracked"}
    models = [r for name, r in offline.items() if name not in ("stack", "report")]
    assert sorted(r["config"]["params"]["weight_decay"] for r in models) == [0.0, 0.05]
    for r in models:
        row = leaderboard.set_index("model_id").loc[r["config"]["model_id"]]
        assert r["history"]["epoch"] == 2 and r["history"]["fold1_log_loss"] > 0
        assert {"fold0_log_loss", "fold1_log_loss", "fold2_log_loss"} <= set(r["history"]) and row["state"] == "complete"
    assert offline["stack"]["history"]["greedy"] == pytest.approx(
        scores.set_index("method").loc["greedy", "cv_score"], rel=1e-9)
    assert offline["report"]["config"]["metric"] == "log_loss"

    # MLflow: the local file store, read with MLflow's own client
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    client = mlflow.MlflowClient((run_dir / "mlruns").as_uri())
    found = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    by_name = {r.info.run_name: r for r in found}
    assert {"stack", "report"} <= set(by_name) and len(by_name) == 4
    trials = [r for name, r in by_name.items() if name not in ("stack", "report")]
    assert sorted(float(r.data.params["params/weight_decay"]) for r in trials) == [0.0, 0.05]
    assert all("fold2_log_loss" in r.data.metrics for r in trials)
    assert by_name["stack"].data.metrics["greedy"] == pytest.approx(
        scores.set_index("method").loc["greedy", "cv_score"], rel=1e-9)
    assert by_name["stack"].data.params["winner"] in set(scores["method"])


def test_a_tracker_that_is_not_installed_is_named_with_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^--logger wandb needs wandb: pip install 'ensemble\[trackers\]'\. "
                                        r"Nothing was written\.$"):
        trackers.check_installed(["tensorboard", "wandb"])


def test_a_run_at_a_uri_refuses_loggers_before_writing(tmp_path, demo_dir):
    path = small_space(tmp_path, demo_dir, rows=60, epochs=1)
    uri = (tmp_path / "bucket").as_uri()
    done = run("ensemble.tune", "--space", path, "--storage", uri, "--name", "u", "--logger", "mlflow")
    assert done.returncode == 2 and done.stderr.startswith("error: --logger needs a local run directory"), done.stderr
    assert not (tmp_path / "bucket").exists()


def test_trackers_json_keeps_earlier_launches_choices_relative_to_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "r"
    run.mkdir()
    first = trackers.remember(["mlflow"], run, "r")
    again = trackers.remember(["tensorboard"], run, "r")
    assert set(again) == {"mlflow", "tensorboard"} and again["mlflow"] == first["mlflow"]
    assert trackers.remember([], run, "r") == again  # a resume without --logger logs where it did
    assert first["mlflow"]["tracking_uri"] == (run / "mlruns").resolve().as_uri()
    moved = run.rename(tmp_path / "moved")  # a moved run logs where it is now
    assert trackers.read(moved)["tensorboard"]["logdir"] == str((moved / "tune").resolve())
    assert trackers.read(moved)["mlflow"]["tracking_uri"] == (moved / "mlruns").resolve().as_uri()


def test_a_tracker_that_fails_after_the_outputs_are_written_is_a_note(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers.remember(["mlflow", "tensorboard"], tmp_path, "r")
    (tmp_path / "mlruns").write_text("not a directory")  # MLflow cannot make its store here
    lines = trackers.log_stage(tmp_path, "stack", {"greedy+views": 0.5})
    assert sorted(lines)[0] == f"logged the stack scores to tensorboard: {(tmp_path / 'tune' / 'stack').resolve()}"
    assert sorted(lines)[1].startswith("note: could not log the stack scores to mlflow (") and \
        sorted(lines)[1].endswith("; the stack outputs are written"), lines
