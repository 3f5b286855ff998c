"""Atomic artifact writes: a crash never leaves a truncated file a later stage reads as complete."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

PROC_STATUS = "/proc/self/status"  # where Linux >= 4.7 reports the umask
_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success.

    mkstemp creates the file 0600 whatever the umask; it is given the mode an ordinary
    `open` would (0666 less the umask) before the rename, so a team sharing a run
    directory can read each other's results when their umask allows it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with contextlib.suppress(OSError):  # a mount that refuses chmod keeps 0600: no worse than before
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where /proc/self/status reports it.

    os.umask can only read the mask by setting another one, and a thread that creates a
    file in between gets the wrong mode; that dance is left to systems without /proc.
    """
    with contextlib.suppress(OSError, ValueError):
        with open(PROC_STATUS) as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return _umask_by_setting()


@functools.lru_cache(maxsize=1)
def _umask_by_setting() -> int:
    # Once per process, under a lock (two threads doing this at once could leave 0o077 set for good);
    # a file another thread creates in the instant the mask is 0o077 is at worst less readable.
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    """An array as .npy (np.load(path, mmap_mode='r') maps it without reading it)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.save given a path would append '.npy' to the temp name
            np.save(f, array)
