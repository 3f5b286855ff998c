"""Shared fixtures: the embedded demo data (exported once per session) and one Ray cluster."""

from __future__ import annotations

import os
import tempfile

import pytest

# Never let a test reach for the model hub (no network here, and it would hang ~50 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Mirrors of URI runs (ensemble.run.storage) and gpu: auto's measurements go to a temporary directory,
# never the user's cache, one per pytest process (`make test` runs two); set before Ray starts, so that
# its workers inherit it.
os.environ["ENSEMBLE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ensemble-test-cache-")


def pytest_collection_modifyitems(items):
    """The README's tests first: together they take a quarter of the suite, and `make test`'s two workers
    start from this order (xdist's worksteal: the first half to one, the second to the other, then each
    takes from the other's end when it runs out), so no long test is left to run alone at the end."""
    items.sort(key=lambda item: item.path.name != "test_readme.py")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo images + manifests, exported once into a session tmp dir."""
    from ensemble.data import demo_data as datasets

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


@pytest.fixture
def small_disk(tmp_path):
    """A real small file system (tmpfs) to fill up or remount read-only: `disk(size)` mounts one and returns
    its path; `disk.fill(path, leave)` leaves `leave` bytes free; `disk.read_only(path)` remounts it ro.

    Mounting needs root with CAP_SYS_ADMIN (CI runs as root); elsewhere the test is skipped, saying why."""
    import subprocess

    mounted = []

    class Disk:
        def __call__(self, size: str = "64m"):
            path = tmp_path / f"disk{len(mounted)}"
            path.mkdir()
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                  capture_output=True, text=True)
            if proc.returncode:
                if os.environ.get("CI"):
                    pytest.fail(f"cannot mount a tmpfs for the full-disk tests: {proc.stderr.strip()}")
                pytest.skip(f"needs root to mount a tmpfs ({proc.stderr.strip()})")
            mounted.append(path)
            return path

        @staticmethod
        def fill(path, leave: int) -> None:
            free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
            with open(path / ".filler", "wb") as f:
                f.write(b"\0" * max(0, free - leave))

        @staticmethod
        def read_only(path) -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    yield Disk()
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
