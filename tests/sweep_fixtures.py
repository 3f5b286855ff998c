"""A tiny but real sweep for the tests of the tune package: a space over the first demo digits, and readers."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ensemble.run import Run


def read_metrics(run, model_id, fold):
    return Run(run).read_metrics(model_id, fold)


def small_space(tmp_path: Path, demo_dir: Path, rows: int = 240, **overrides) -> Path:
    """A space over the first `rows` demo digits: a tiny but real sweep."""
    frame = pd.read_csv(demo_dir / "multiclass.csv").head(rows)
    manifest = tmp_path / f"small{rows}.csv"
    frame.to_csv(manifest, index=False)
    space = {
        "data": {"manifest": str(manifest), "root": str(demo_dir), "test_manifest": "demo:test",
                 "preprocess": "pad", "augment": "shift:0.1", "tta": "orig", "normalize": "dataset"},
        "folds": {"k": 2, "strategy": "stratified", "seed": 0},
        "backbones": ["test_resnet"],
        "params": {"lr": 3.0e-3, "batch_size": 32, "image_size": 32},
        "epochs": 2,
        "metric": "log_loss",
        "resources": {"cpu": 1},
        "max_failures": 1,
    }
    for key, value in overrides.items():
        space[key] = value
    path = tmp_path / f"space{rows}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def oof(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.parent.name: pd.read_parquet(p) for p in sorted((run_dir / "models").glob("*/oof.parquet"))}


def kill_mid_training(proc, root: Path, pattern: str, timeout: float = 240) -> None:
    """SIGKILL `proc`'s process group once a fold whose metrics.json matches root/pattern has finished an epoch
    while not all of them are complete (or after `timeout`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        progress = [json.loads(p.read_text()) for p in root.glob(pattern)]
        if any(m["epochs"] >= 1 for m in progress) and not all(m["complete"] for m in progress):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


MOUNTED = "small /dev/shm mounted"


def with_small_dev_shm(argv: list[str], size: str = "512k", **kwargs) -> subprocess.CompletedProcess:
    """Run `argv` with a `size` tmpfs on /dev/shm, in a private mount namespace (root only: skipped elsewhere,
    a failure in CI, which runs as root)."""
    script = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && echo {MOUNTED} >&2 && exec {shlex.join(argv)}"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, **kwargs)
    if MOUNTED not in proc.stderr:  # unshare or mount refused: not root
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a small /dev/shm: {proc.stderr.strip()}")
        pytest.skip(f"needs root to mount a private /dev/shm ({proc.stderr.strip()})")
    return proc
