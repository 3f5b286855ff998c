"""Against a cluster started the way a user starts one: `ray start --head` in one directory, a second node with
(logical) GPUs from another, then `ensemble tune|predict|stack --address auto` with a relative run path from a
third. Ray's workers run in the raylet's directory, not the user's: every path must be resolved before it
crosses a process boundary."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
ENSEMBLE = str(Path(sys.executable).parent / "ensemble")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_start_cluster(tmp_path):
    """`ray start --head` + a node with 2 logical GPUs, each from its own directory; stopped afterwards."""
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    procs = []
    try:
        for name, args in (("head", ["--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard=false",
                                     "--disable-usage-stats"]),
                           ("node2", ["--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--num-gpus", "2"])):
            cwd = tmp_path / name
            cwd.mkdir()
            procs.append(subprocess.Popen([RAY, "start", *args, "--block"], cwd=cwd, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            if name == "head":
                _wait_for_port(port)
        # The second node registers: a driver waits (up to 60 s) until the cluster has both, not a fixed sleep.
        wait = (f"import ray, time; ray.init(address='127.0.0.1:{port}', log_to_driver=False); end = time.time() + 60\n"
                "while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() < end: time.sleep(0.2)\n"
                "print(len([n for n in ray.nodes() if n['Alive']]))")
        nodes = subprocess.run([sys.executable, "-c", wait], env=env, capture_output=True, text=True, timeout=120)
        assert nodes.stdout.split()[-1:] == ["2"], nodes.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):  # the whole group: `ray start`, its raylet, GCS and workers (a graceful stop: 30 s)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    leftovers = subprocess.run(["pgrep", "-f", f"[:=]{port}( |$)"], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes of the ray start cluster left running: {leftovers}"


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"ray start --head did not listen on {port}")


def test_tune_predict_stack_with_a_relative_run_on_a_ray_start_cluster(tmp_path, demo_dir, ray_start_cluster):
    user = tmp_path / "user"
    user.mkdir()
    pd.read_csv(demo_dir / "multiclass.csv").head(150).to_csv(user / "small.csv", index=False)
    (user / "space.yaml").write_text(yaml.safe_dump({
        "data": {"manifest": "small.csv", "root": str(demo_dir), "test_manifest": "demo:test", "tta": "orig,hflip"},
        "folds": {"k": 3}, "backbones": ["test_resnet"], "params": {"image_size": 32, "batch_size": 32},
        "epochs": 1, "resources": {"cpu": 0.5}}))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS=ray_start_cluster)

    def ensemble(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([ENSEMBLE, *args], cwd=user, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    ensemble("tune", "--space", "space.yaml", "--storage", "runs", "--name", "c", "--address", "auto")
    predicted = ensemble("predict", "--run", "runs/c", "--address", "auto", "--no-progress")
    assert "predicted 1 model(s)" in predicted.stdout and "1 GPU" in predicted.stdout  # actors on the GPU node
    stacked = ensemble("stack", "--run", "runs/c", "--method", "greedy")
    assert "winner:" in stacked.stdout
    run = user / "runs" / "c"
    model = next((run / "models").iterdir())
    assert (model / "predict.json").is_file() and len(pd.read_parquet(model / "test.parquet")) == 1000
    assert (run / "ensemble" / "submission.csv").is_file()
    assert not [p for p in (tmp_path / "head").rglob("*") if "runs" in p.parts]  # nothing landed beside the raylet
