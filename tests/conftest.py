"""Shared fixtures: the embedded demo data (exported once per session) and one Ray cluster."""

from __future__ import annotations

import os
import tempfile

import pytest

# Never let a test reach for the model hub (no network here, and it would hang ~50 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Mirrors of URI runs (ensemble.storage) go to a temporary directory, never the user's cache; set
# before Ray starts, so that its workers inherit it.
os.environ.setdefault("ENSEMBLE_CACHE_DIR", tempfile.mkdtemp(prefix="ensemble-test-cache-"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo images + manifests, exported once into a session tmp dir."""
    from ensemble import datasets

    root = tmp_path_factory.mktemp("demo-data")
    os.environ["ENSEMBLE_DATA_DIR"] = str(root)
    datasets.export_demo_data(root)
    return root


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session: 2 CPUs and 4 logical GPUs (no real GPU needed)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
