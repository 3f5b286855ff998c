"""The sweep on a real Ray cluster: artifacts, exact resume after SIGKILL, retries, placement, two nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sweep_fixtures import kill_mid_training, oof, read_metrics, small_space, with_small_dev_shm

from ensemble.run import Run
from ensemble.tune import launch as tune
from ensemble.tune import spaces
from ensemble.tune.train import train_until

REPO = Path(__file__).resolve().parent.parent


def cli(*args, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """The sweep CLI in its own session (process group), so a kill takes Ray's helpers with it."""
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "ensemble.tune", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


# --------------------------------------------------------------------------- no Ray: the trial function


@pytest.mark.slow
def test_sweep_artifacts_and_resume_skips_finished_models(tmp_path, demo_dir, ray_cluster):
    space = spaces.load_space(str(small_space(tmp_path, demo_dir, search={"weight_decay": {"grid": [0.0, 0.05]}})))
    run_dir = tmp_path / "runs" / "s"
    board = tune.run_sweep(space, run_dir, verbose=0)
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"id": str})
    assert len(board) == 2 and set(board["state"]) == {"complete"}  # one row per model
    assert pd.read_csv(run_dir / "leaderboard.csv")["model_id"].tolist() == board["model_id"].tolist()
    assert sorted(board["model"]) == ["test_resnet weight_decay=0", "test_resnet weight_decay=0.05"]
    outputs = oof(run_dir)
    assert len(outputs) == 2
    for model_id, frame in outputs.items():
        # every training id exactly once, in folds.csv order, each predicted by its own fold's model
        assert frame["id"].tolist() == folds["id"].tolist()
        assert (frame["fold"].to_numpy() == folds["fold"].to_numpy()).all()
        np.testing.assert_allclose(frame.drop(columns=["id", "fold"]).sum(axis=1), 1, atol=1e-4)
        config = json.loads((run_dir / "models" / model_id / "config.json").read_text())
        assert config["k"] == 2 and config["backbone"] == "test_resnet"
        for k in range(2):
            fold_dir = run_dir / "models" / model_id / f"fold{k}"
            assert {"weights.pt", "last.pt", "oof.parquet", "metrics.json"} <= {p.name for p in fold_dir.iterdir()}
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "models").rglob("last.pt")}
    again = tune.run_sweep(space, run_dir, resume=True, verbose=0)
    assert again.equals(board)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing retrained


def test_resume_refuses_a_changed_space_once_an_epoch_is_trained(tmp_path, demo_dir):
    path = small_space(tmp_path, demo_dir)
    run_dir = tmp_path / "runs" / "changed"
    config = tune.prepare_run(spaces.load_space(str(path)), run_dir, resume=False, smoke=False)[0]
    train_until(config, 0, run_dir, 1)  # one fold-epoch trained: the run keeps its space from now on
    text = path.read_text().replace("epochs: 2", "epochs: 3")
    path.write_text(text)
    code = subprocess.run([sys.executable, "-m", "ensemble.tune", "--space", str(path), "--storage",
                           str(run_dir.parent), "--name", "changed", "--resume"], cwd=REPO,
                          capture_output=True, text=True)
    assert code.returncode == 2
    assert "epochs" in code.stderr and "2 -> 3" in code.stderr and "Traceback" not in code.stderr
    assert "1 fold-epoch(s) trained" in code.stderr
    again = subprocess.run([sys.executable, "-m", "ensemble.tune", "--space", str(path), "--storage",
                            str(run_dir.parent), "--name", "changed"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_equals_uninterrupted(tmp_path, demo_dir, ray_cluster):
    path = small_space(tmp_path, demo_dir, rows=600, epochs=4)
    storage = tmp_path / "killed"
    proc = cli("--space", str(path), "--storage", str(storage), "--name", "run", "-v", "0")
    run_dir = storage / "run"
    deadline = time.time() + 240
    kill_mid_training(proc, run_dir, "models/*/fold*/metrics.json")  # a fold has finished an epoch, the sweep has not
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == proc.pid  # left behind by the kill
    before = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("models/*/fold*/metrics.json")}
    assert before and not all(m["complete"] for m in before.values())

    moved = tmp_path / "moved"  # the run directory moves (another disk or machine): resume still works
    shutil.copytree(storage, moved)
    resumed = cli("--space", str(path), "--storage", str(moved), "--name", "run", "--resume", "-v", "0")
    lock = moved / "run" / "run.lock"
    while not (lock.exists() and json.loads(lock.read_text() or "{}").get("pid") == resumed.pid):
        assert resumed.poll() is None and time.time() < deadline + 120
        time.sleep(0.05)
    # A second launch on the run while the first works is refused, naming the holder; it trains nothing.
    os.killpg(resumed.pid, signal.SIGSTOP)  # the holder pauses: it cannot finish before the second one looks
    second = subprocess.run([sys.executable, "-m", "ensemble.tune", "--space", str(path), "--storage", str(moved),
                             "--name", "run", "--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    os.killpg(resumed.pid, signal.SIGCONT)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"this run is in use by python -m ensemble.tune --space {path}" in second.stderr
    assert f"(pid {resumed.pid} on " in second.stderr and "Traceback" not in second.stderr
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out
    assert f"process {proc.pid} is gone" in out and not (moved / "run" / "run.lock").exists()  # taken over, released
    after = {p.parent.name: json.loads(p.read_text()) for p in (moved / "run").glob("models/*/fold*/metrics.json")}
    for fold, metrics in before.items():  # finished epochs were kept, not trained again
        assert after[fold]["history"][: metrics["epochs"]] == metrics["history"]
    assert all(m["complete"] and m["epochs"] == 4 for m in after.values())

    straight = tmp_path / "straight" / "run"
    tune.run_sweep(spaces.load_space(str(path)), straight, verbose=0)
    a, b = oof(moved / "run"), oof(straight)
    assert a.keys() == b.keys()
    for model_id in a:
        pd.testing.assert_frame_equal(a[model_id], b[model_id])


@pytest.mark.slow
def test_killed_fold_worker_is_retried_from_its_checkpoint(tmp_path, demo_dir, ray_cluster):
    path = small_space(tmp_path, demo_dir, rows=600, epochs=3)
    run_dir = tmp_path / "runs" / "w"
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(board=tune.run_sweep(spaces.load_space(str(path)), run_dir, verbose=0)))
    thread.start()
    killed = None
    deadline = time.time() + 200
    while killed is None and time.time() < deadline:
        for running in run_dir.glob("models/*/fold0/running.json"):
            state = json.loads(running.read_text())
            if state["epoch"] >= 1:  # mid-epoch 2: the worker holds an epoch's checkpoint already
                os.kill(state["pid"], signal.SIGKILL)
                killed = state
                break
        time.sleep(0.1)
    thread.join(timeout=300)
    assert killed is not None
    assert set(result["board"]["state"]) == {"complete"}
    metrics = read_metrics(run_dir, result["board"]["model_id"][0], 0)
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]


@pytest.mark.slow
def test_a_raising_trial_is_retried_from_its_checkpoints(tmp_path, demo_dir, ray_cluster):
    """An image vanishes mid-sweep (a network share's hiccup): the fold raises, Tune retries the trial
    (max_failures), and once the file is back the folds continue from their last epoch, not from 0."""
    path = small_space(tmp_path, demo_dir, rows=600, epochs=3, max_failures=50)
    text = path.read_text().replace("normalize: dataset", "normalize: dataset\n  cache: false")  # decode every epoch
    path.write_text(text)
    run_dir = tmp_path / "runs" / "raise"
    image = demo_dir / pd.read_csv(demo_dir / "multiclass.csv")["image"][0]
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(board=tune.run_sweep(spaces.load_space(str(path)), run_dir, verbose=0)))
    thread.start()
    hidden, errors = image.with_suffix(".away"), []
    try:
        deadline = time.time() + 200
        while time.time() < deadline and not any(m["epochs"] >= 1 for m in _metrics(run_dir)):
            time.sleep(0.1)
        before = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("models/*/fold*/metrics.json")}
        image.rename(hidden)
        while time.time() < deadline and not errors:  # Tune records the trial's failure, then retries it
            errors = list((run_dir / "tune").rglob("error.txt"))
            time.sleep(0.1)
    finally:
        hidden.rename(image)
    thread.join(timeout=300)
    assert errors and image.name in errors[0].read_text()
    assert set(result["board"]["state"]) == {"complete"}
    for p in run_dir.glob("models/*/fold*/metrics.json"):
        history = json.loads(p.read_text())["history"]
        assert [row["epoch"] for row in history] == [1, 2, 3]
        done = before.get(p.parent.name, {"history": []})["history"]
        assert history[: len(done)] == done  # epochs finished before the fault were not trained again


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in run_dir.glob("models/*/fold*/metrics.json")]


@pytest.mark.slow
def test_fractional_gpus_pack_two_folds_per_gpu(tmp_path, demo_dir, ray_cluster):
    """4 logical GPUs, gpu: 0.5 per fold: 8 folds run at once, two per device."""
    path = small_space(tmp_path, demo_dir, rows=160, epochs=1, folds={"k": 8, "strategy": "kfold", "seed": 0},
                       resources={"cpu": 0.25, "gpu": 0.5})
    run_dir = tmp_path / "runs" / "gpu"
    import threading

    thread = threading.Thread(target=tune.run_sweep, args=(spaces.load_space(str(path)), run_dir), kwargs={"verbose": 0})
    thread.start()
    free_gpus = []
    while thread.is_alive():  # Ray's own accounting: how many of the 4 GPUs are handed out right now
        free_gpus.append(ray_cluster.available_resources().get("GPU", 0.0))
        time.sleep(0.05)
    thread.join()
    assert min(free_gpus) == 0.0  # all 4 GPUs held at once, by 8 folds of 0.5
    model_id = next((run_dir / "models").iterdir()).name
    runs = [read_metrics(run_dir, model_id, k)["history"][0] for k in range(8)]
    assert sorted(r["device"] for r in runs) == ["0", "0", "1", "1", "2", "2", "3", "3"]


@pytest.mark.slow
def test_a_small_dev_shm_is_said_at_launch(tmp_path, demo_dir):
    """A fold's own note on /dev/shm goes to its Ray worker's log: the launch says it on the console. A real
    512 KiB /dev/shm, folds of 2 CPUs (1 DataLoader worker wanted, 0 fit); the sweep still trains."""
    path = small_space(tmp_path, demo_dir, rows=120, epochs=1, resources={"cpu": 2})
    proc = with_small_dev_shm([sys.executable, "-m", "ensemble.tune", "--space", str(path), "--storage",
                               str(tmp_path / "runs"), "--name", "shm"], cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = [line for line in proc.stderr.splitlines() if line.startswith("note: /dev/shm")]
    assert len(note) == 1 and "a 2-CPU share" in note[0] and "holds 0 DataLoader worker(s)" in note[0], proc.stderr
    assert "not 1: decoding is slower" in note[0] and "--shm-size" in note[0]
    assert (tmp_path / "runs" / "shm" / "leaderboard.csv").exists()


@pytest.mark.slow
def test_two_node_cluster_with_uri_storage(tmp_path, demo_dir):
    """--address joins a two-node cluster; folds land on the node with the GPUs; the nodes share no run
    directory: each works in its own mirror (ENSEMBLE_CACHE_DIR) and the run lives at a file:// URI."""
    from ray.cluster_utils import Cluster

    mirrors = {name: tmp_path / f"mirror-{name}" for name in ("head", "gpu", "fresh")}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "env_vars": {"ENSEMBLE_CACHE_DIR": str(mirrors["head"])}})
    try:
        cluster.add_node(num_cpus=1, num_gpus=2, env_vars={"ENSEMBLE_CACHE_DIR": str(mirrors["gpu"])})
        path = small_space(tmp_path, demo_dir, rows=160, epochs=2, resources={"cpu": 0.5, "gpu": 0.5})
        uri = (tmp_path / "bucket" / "runs").as_uri()
        args = ("--space", str(path), "--storage", uri, "--name", "two", "--address", cluster.address, "-v", "0")
        proc = cli(*args, env=dict(os.environ, ENSEMBLE_CACHE_DIR=str(mirrors["head"])))
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert "Leaderboard (" in out and f"models in {uri}/two/models/" in out
        remote = tmp_path / "bucket" / "runs" / "two"
        model_id = next((remote / "models").iterdir()).name
        devices = {read_metrics(remote, model_id, k)["history"][-1]["device"] for k in range(2)}
        assert devices <= {"0", "1"} and devices
        assert [p.name for p in remote.rglob("*.tmp")] == []
        for k in range(2):  # the folds trained in the GPU node's mirror and uploaded every file
            for name in ("last.pt", "weights.pt", "oof.parquet", "metrics.json"):
                assert (remote / "models" / model_id / f"fold{k}" / name).is_file()
            assert list((mirrors["gpu"] / "runs").glob(f"two-*/models/{model_id}/fold{k}/last.pt"))
        # Driver and trials work in scratch directories they remove; only fold tasks keep a mirror.
        assert list(mirrors["head"].rglob("*.pt")) == []
        assert not (remote / "models" / model_id / "status.json").exists()  # complete, not marked pruned
        oof_remote = pd.read_parquet(remote / "models" / model_id / "oof.parquet")
        assert len(oof_remote) == len(pd.read_csv(remote / "folds.csv"))
        # Another machine (an empty mirror) resumes from the URI alone: nothing to train.
        again = cli(*args, "--resume", env=dict(os.environ, ENSEMBLE_CACHE_DIR=str(mirrors["fresh"])))
        out, _ = again.communicate(timeout=300)
        assert again.returncode == 0 and "1 model(s) already complete" in out, out
    finally:
        cluster.shutdown()


def test_unopenable_storage_uri_is_a_clear_error(tmp_path, demo_dir):
    path = small_space(tmp_path, demo_dir)
    proc = subprocess.run([sys.executable, "-m", "ensemble.tune", "--space", str(path), "--storage", "nosuch://x/y"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nosuch://x/y" in proc.stderr and "pyarrow cannot open it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_smoke_flag_runs_pnasnet_space_with_stand_in(tmp_path, demo_dir):
    """--smoke on the real pnasnet recipe: only the data it needs is missing, and the message says so."""
    proc = subprocess.run([sys.executable, "-m", "ensemble.tune", "--space", "pnasnet_kfold", "--smoke",
                           "--storage", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stand-in backbone 'test_resnet'" in proc.stdout
    assert "data/driver/train.csv: file not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_asha_prunes_a_param_set_as_a_whole_and_resume_skips_it(tmp_path, demo_dir, ray_cluster):
    """Two models one after the other; ASHA stops the one that cannot learn (lr 1e-7) at a rung."""
    # Eight epochs: the stop decided after epoch 1 or 2 reaches the fold tasks (which run ahead of the
    # trial's reports) long before they could finish; with 3 epochs a fast machine sometimes finished one.
    path = small_space(tmp_path, demo_dir, epochs=8, max_concurrent=1, params={"batch_size": 32, "image_size": 32},
                       search={"lr": {"grid": [3.0e-3, 1.0e-7]}},
                       scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    run_dir = tmp_path / "runs" / "asha"
    board = tune.run_sweep(spaces.load_space(str(path)), run_dir, verbose=0)
    states = board.groupby("model_id")["state"].first()
    assert sorted(states) == ["complete", "pruned"]
    pruned = states[states == "pruned"].index[0]
    assert json.loads((run_dir / "models" / pruned / "status.json").read_text())["state"] == "pruned"
    assert not (run_dir / "models" / pruned / "oof.parquet").exists()
    # Both folds of the pruned model were stopped together (one may be an epoch ahead of the other
    # when the trial's report of the slower fold triggers the stop): the param set is one unit.
    folds = [read_metrics(run_dir, pruned, k) for k in range(2)]
    assert not any(m["complete"] for m in folds) and max(m["epochs"] for m in folds) < 8, folds
    again = tune.run_sweep(spaces.load_space(str(path)), run_dir, resume=True, verbose=0)
    assert again.groupby("model_id")["state"].first().to_dict() == states.to_dict()


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemble.tune", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_a_launch_the_cluster_cannot_run_writes_nothing_and_the_corrected_command_runs(tmp_path, demo_dir):
    """--gpus-per-trial 1 (or auto) on a CPU-only cluster: refused before the first write, so the same command without it
    starts the run; the compact display names the searched params, one line per change."""
    path = small_space(tmp_path, demo_dir, rows=120, epochs=2, search={"lr": {"grid": [0.003, 0.01]}},
                       params={"batch_size": 32, "image_size": 32})
    storage = tmp_path / "runs"
    bad = run_cli("--space", path, "--storage", storage, "--name", "g", "--gpus-per-trial", "1")
    assert bad.returncode == 2 and bad.stderr.startswith("error: one fold needs") and bad.stderr.count("\n") == 1, \
        bad.stdout + bad.stderr
    assert "Nothing was written" in bad.stderr and not storage.exists()  # not even the runs/ it would have made
    auto = run_cli("--space", path, "--storage", storage, "--name", "g", "--gpus-per-trial", "auto")
    assert auto.returncode == 2 and auto.stderr == (
        "error: resources.gpu: auto measures each model's training memory on a GPU, and this Ray cluster has none. "
        "Give resources.gpu a number (0 trains on CPUs), or join a GPU cluster with --address. Nothing was written.\n")
    assert not storage.exists()
    good = run_cli("--space", path, "--storage", storage, "--name", "g")
    assert good.returncode == 0, good.stdout + good.stderr
    lines = good.stdout.splitlines()
    assert len(lines) <= 40, good.stdout  # not a terminal: a line per change, no Ray Tune tables
    assert lines[0].startswith("Sweep: 2 model(s) x 2 folds, 8 fold-epochs (log_loss, lower is better)")
    progress = [line for line in lines if line.startswith("[")]
    assert any("test_resnet lr=0.003" in line and "fold-epochs 2/4" in line for line in progress), good.stdout
    assert any("test_resnet lr=0.01" in line and "complete" in line for line in progress), good.stdout
    assert "Trial status" not in good.stdout and "Logical resource usage" not in good.stdout + good.stderr
    assert f"tensorboard --logdir {storage / 'g' / 'tune'}" in good.stdout and "/tmp/ray/session" not in good.stdout
    board = pd.read_csv(storage / "g" / "leaderboard.csv")
    assert sorted(board["model"]) == ["test_resnet lr=0.003", "test_resnet lr=0.01"]
    assert set(board["state"]) == {"complete"} and {"fold0", "fold1", "mean", "std", "lr"} <= set(board.columns)
    assert "Leaderboard (log_loss, mean ± std over 2 folds, best first):" in good.stdout
    again = run_cli("--space", path, "--storage", storage, "--name", "g", "--resume")
    assert again.returncode == 0 and "Nothing to train" in again.stdout and "Sweep finished" not in again.stdout


def test_a_run_that_trained_nothing_starts_again_with_a_changed_space(tmp_path, demo_dir, capsys):
    path = small_space(tmp_path, demo_dir, rows=120, epochs=1)
    run_dir = tmp_path / "runs" / "r"
    tune.prepare_run(spaces.load_space(str(path)), run_dir)  # a launch that wrote its plan, then died
    path.write_text(path.read_text().replace("epochs: 1", "epochs: 2"))
    configs = tune.prepare_run(spaces.load_space(str(path)), run_dir)
    assert "no fold has finished an epoch; starting it again with the space as it is now" in capsys.readouterr().out
    assert configs[0]["stages"][0]["epochs"] == 2 and "epochs: 2" in (run_dir / "space.yaml").read_text()
    assert Run(run_dir).model_ids() == [configs[0]["model_id"]]  # the old plan's models are gone


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_with_the_command_that_continues_it(tmp_path, demo_dir):
    path = small_space(tmp_path, demo_dir, rows=300, epochs=3)
    storage = tmp_path / "runs"
    proc = cli("--space", str(path), "--storage", str(storage), "--name", "c")
    deadline = time.time() + 240
    while not list((storage / "c").glob("models/*/fold*/metrics.json")):  # Tune runs, a fold has an epoch
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    resume = f"python -m ensemble.tune --space {path} --storage {storage} --name c --resume"
    assert proc.returncode == 130, out
    assert f"error: interrupted: 1 model(s) not finished; every finished epoch is kept. Continue with: {resume}" in out
    assert "Traceback" not in out and "Tuner.restore" not in out and not (storage / "c" / "run.lock").exists()
    again = subprocess.run([sys.executable, *resume.split()[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Leaderboard (" in again.stdout, again.stdout + again.stderr
    assert set(pd.read_csv(storage / "c" / "leaderboard.csv")["state"]) == {"complete"}
