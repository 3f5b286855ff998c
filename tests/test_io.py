"""Atomic writes: artifacts get the mode the umask gives any new file, not mkstemp's 0600."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Runs in a fresh process: the umask is process-wide, and changing it here would race Ray's threads.
WRITE = """
import os, stat, sys
os.umask(int(sys.argv[1], 8))
from ensemble import io
if sys.argv[3] == "no-proc":  # a system without /proc/self/status: the os.umask fallback
    io.PROC_STATUS = "/nonexistent/status"
io.write_json({"auc": 0.9}, sys.argv[2])
print(oct(stat.S_IMODE(os.stat(sys.argv[2]).st_mode)))
"""


@pytest.mark.parametrize("how", ["proc", "no-proc"])
@pytest.mark.parametrize("umask, mode", [(0o022, "0o644"), (0o002, "0o664"), (0o077, "0o600")])
def test_written_files_follow_the_umask(tmp_path, umask, mode, how):
    target = tmp_path / "run" / "metrics.json"
    done = subprocess.run([sys.executable, "-c", WRITE, f"{umask:o}", str(target), how], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == mode
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_umask_is_read_without_changing_it(monkeypatch):
    from ensemble import io

    monkeypatch.setattr(io, "_umask_by_setting", lambda: pytest.fail("the os.umask fallback ran on Linux"))
    assert io.current_umask() == int(Path("/proc/self/status").read_text().split("Umask:")[1].split()[0], 8)


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    from ensemble.io import atomic_path

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
