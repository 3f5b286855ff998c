"""Runs at a URI: the rules of ensemble.run.storage, on file:// URIs (pyarrow's LocalFileSystem) and one
unreachable s3:// endpoint (pyarrow's real S3 client, refused connection)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble.errors import UserError
from ensemble.run import Run, open_run, storage
from ensemble.run.storage import ARTIFACTS, RunStore

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE_S3 = "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "cache"))
    return RunStore((tmp_path / "bucket" / "run").as_uri())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_join_and_split_keep_a_uri_query_last():
    assert storage.join(UNREACHABLE_S3, "demo") == \
        "s3://bucket/runs/demo?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    assert storage.split(storage.join(UNREACHABLE_S3, "demo")) == (UNREACHABLE_S3, "demo")
    assert storage.join("runs", "demo") == Path("runs/demo") and storage.split("runs/demo") == ("runs", "demo")
    assert storage.join("file:///srv/runs/", "x") == "file:///srv/runs/x"


def test_node_mirror_is_under_the_cache_dir_and_differs_per_uri(store, tmp_path):
    assert store.local.parent == tmp_path / "cache" / "runs" and store.local.name.startswith("run-")
    assert RunStore((tmp_path / "bucket" / "other").as_uri()).local != store.local


def test_open_run_gives_a_private_scratch_dir_and_removes_it(store, tmp_path):
    with open_run(tmp_path / "plain") as run:
        assert (run.dir, run.store, run.location) == (tmp_path / "plain", None, str(tmp_path / "plain"))
    with open_run(store.uri) as run:
        assert run.location == store.uri and run.dir == run.store.local != store.local and run.dir.is_dir()
    assert not run.dir.exists()


def test_push_then_pull_artifacts_only(store, tmp_path):
    remote = tmp_path / "bucket" / "run"
    write(store.local / "folds.csv", "id,fold\n")
    for name in ("weights.pt", "last.pt", "metrics.json", "oof.parquet"):
        write(store.local / "models/m/fold0" / name, name)
    write(store.local / "cache/decoded.npy", "pixels")
    store.push("folds.csv", "missing.json")  # a missing file is skipped
    Run(store.uri, store).push_fold("m", 0)
    assert files(remote) == ["folds.csv", "models/m/fold0/last.pt", "models/m/fold0/metrics.json",
                             "models/m/fold0/oof.parquet", "models/m/fold0/weights.pt"]  # no .tmp left behind
    with open_run(store.uri) as run:
        assert run.pull(only=ARTIFACTS)
        assert files(run.dir) == ["folds.csv", "models/m/fold0/metrics.json", "models/m/fold0/oof.parquet"]
        assert run.pull("models/m/fold0/last.pt") and (run.dir / "models/m/fold0/last.pt").read_text() == "last.pt"
        assert not run.pull("models/other")


def test_pull_copies_changed_files_only_and_push_skips_current_ones(store, tmp_path):
    remote = tmp_path / "bucket" / "run" / "models/m/fold0/metrics.json"
    local = write(store.local / "models/m/fold0/metrics.json", '{"epochs": 1}')
    store.push("models/m/fold0/metrics.json")
    stamp = local.stat().st_mtime_ns
    store.pull("models/m")
    assert local.stat().st_mtime_ns == stamp  # the same version: not downloaded again
    before = remote.stat().st_ino
    store.push("models/m/fold0/metrics.json")  # the URI holds this version: nothing uploaded
    assert remote.stat().st_ino == before
    remote.write_text('{"epochs": 22}')  # another node pushed a newer epoch
    store.pull("models/m")
    assert json.loads(local.read_text()) == {"epochs": 22} == store.read_json("models/m/fold0/metrics.json")


def test_exact_pull_deletes_local_files_the_uri_does_not_have(store, tmp_path):
    """A fold directory left in a node's mirror by an earlier run at the same URI must not be resumed from."""
    stale = write(store.local / "models/m/fold0/last.pt", "old run")
    write(store.local / "models/m/fold1/last.pt", "other fold")
    assert not store.pull("models/m/fold0", exact=True)
    assert not stale.exists() and (store.local / "models/m/fold1/last.pt").exists()
    write(tmp_path / "bucket/run/models/m/fold0/metrics.json", "{}")
    write(store.local / "models/m/fold0/last.pt", "crashed before its push")
    assert store.pull("models/m/fold0", exact=True)
    assert files(store.local / "models/m/fold0") == ["metrics.json"]


def test_unopenable_uri():
    with pytest.raises(UserError, match="nosuch://bucket/run.*pyarrow cannot open it"):
        RunStore("nosuch://bucket/run")


def test_unreachable_storage_is_a_clear_error_with_exit_2(tmp_path):
    """pyarrow's real S3 client against a closed port: one line naming the URI and what to check."""
    space = write(tmp_path / "space.yaml", "data: {manifest: demo:multiclass}\nbackbones: [test_resnet]\n"
                  "params: {image_size: 32}\nepochs: 1\n")
    proc = subprocess.run([sys.executable, "-m", "ensemble.tune", "--space", str(space), "--storage", UNREACHABLE_S3,
                           "--name", "x"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "s3://bucket/runs/x?endpoint_override" in proc.stderr and "credentials" in proc.stderr
    assert "Traceback" not in proc.stderr
