"""Runs at a URI: the mirror's pull/push rules, on file:// URIs (pyarrow's LocalFileSystem)."""

from __future__ import annotations

import os

import pytest

from ensemble.errors import UserError
from ensemble.storage import CHECKPOINTS, RunStore, open_run


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "cache"))
    return RunStore((tmp_path / "bucket" / "run").as_uri())


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_mirror_is_under_the_cache_dir_and_differs_per_uri(store, tmp_path):
    assert store.local.parent == tmp_path / "cache" / "runs" and store.local.name.startswith("run-")
    assert RunStore((tmp_path / "bucket" / "other").as_uri()).local != store.local
    assert open_run(tmp_path / "plain") == (tmp_path / "plain", None)
    assert open_run(store.uri)[0] == store.local


def test_push_then_pull_into_an_empty_mirror(store, tmp_path):
    remote = tmp_path / "bucket" / "run"
    write(store.local / "folds.csv", "id,fold\n")
    for name in ("weights.pt", "last.pt", "metrics.json", "oof.parquet"):
        write(store.local / "models/m/fold0" / name, name)
    store.push("folds.csv", "missing.json")  # a missing file is skipped
    store.push_fold("m", 0)
    assert (remote / "folds.csv").read_text() == "id,fold\n"
    assert sorted(p.name for p in (remote / "models/m/fold0").iterdir()) == \
        ["last.pt", "metrics.json", "oof.parquet", "weights.pt"]  # no temporary file left behind
    store.clear_mirror()
    assert not store.local.exists()
    assert store.pull(exclude=CHECKPOINTS)
    assert sorted(p.relative_to(store.local).as_posix() for p in store.local.rglob("*") if p.is_file()) == \
        ["folds.csv", "models/m/fold0/metrics.json", "models/m/fold0/oof.parquet"]
    assert store.pull("models/m/fold0/last.pt") and (store.local / "models/m/fold0/last.pt").read_text() == "last.pt"
    assert not store.pull("models/other")


def test_pull_copies_only_changed_files(store, tmp_path):
    remote = tmp_path / "bucket" / "run" / "models/m/fold0/metrics.json"
    write(store.local / "models/m/fold0/metrics.json", '{"epochs": 1}')
    store.push("models/m/fold0/metrics.json")
    local = store.local / "models/m/fold0/metrics.json"
    stamp = local.stat().st_mtime_ns
    store.pull("models/m")
    assert local.stat().st_mtime_ns == stamp  # same version: not downloaded again
    remote.write_text('{"epochs": 2}')  # another node pushed a newer epoch
    store.pull("models/m")
    assert local.read_text() == '{"epochs": 2}'


def test_push_changed_uploads_new_and_modified_files_only(store, tmp_path):
    write(store.local / "ensemble/scores.csv", "a")
    write(store.local / "ensemble/meta/lgbm.txt", "b")
    store.push_changed("ensemble")
    remote = tmp_path / "bucket" / "run" / "ensemble"
    assert (remote / "meta/lgbm.txt").read_text() == "b"
    os.utime(remote / "scores.csv", ns=(1, 1))  # a marker: re-uploading would reset it
    store.pull("ensemble")  # the mirror takes the URI's stamp
    write(store.local / "ensemble/meta/lgbm.txt", "changed")
    store.push_changed("ensemble")
    assert (remote / "meta/lgbm.txt").read_text() == "changed"
    assert (remote / "scores.csv").stat().st_mtime_ns == 1


def test_unopenable_uri(tmp_path):
    with pytest.raises(UserError, match="nosuch://bucket/run.*pyarrow cannot open it"):
        RunStore("nosuch://bucket/run")
