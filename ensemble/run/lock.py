"""One writer per run: `run.lock` records the host and pid of the process that holds it.

A second launch on the same run (another `--name` with the same name, a `--resume`
while the first still trains, a predict or stack while the sweep writes) is refused
with a message naming the holder. The holder refreshes the lock every
HEARTBEAT_SECONDS; a lock whose process is gone (same host: its pid no longer
runs; another host: no heartbeat for STALE_SECONDS) is taken over with a note.

The lock lives where the run lives, a URI included. On a local file system it is
created with O_EXCL (atomic); at a URI it is written, then read back after a
moment to see who won (object stores have no exclusive create).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator

from ensemble.errors import UserError
from ensemble.io import write_json

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale(holder: dict) -> str | None:
    """Why the holder is gone, or None while it may still be running."""
    if holder.get("host") == socket.gethostname():
        return None if _alive(int(holder.get("pid", -1))) else f"process {holder.get('pid')} is gone"
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"no heartbeat for {age:.0f} s" if age > STALE_SECONDS else None


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"{holder.get('command', 'a process')} (pid {holder.get('pid')} on {holder.get('host')}, since {started})"


class RunLock:
    """Held while a stage writes into a run; re-entrant in one process (demo: sweep, predict, stack)."""

    _held: dict[str, int] = {}  # lock path -> depth, in this process

    def __init__(self, run, command: str):
        self.run, self.command = run, command
        self.path = run.lock_file
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        if self.run.store:
            return self.run.store.read_json(self.run.rel(self.path))
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a crashed holder: treat as stale below

    def _me(self) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command, "started": now,
                "heartbeat": now}

    def _write(self, doc: dict, exclusive: bool) -> bool:
        if self.run.store:
            write_json(doc, self.path)
            self.run.push(self.path)
            if not exclusive:
                return True
            time.sleep(0.5)  # another launch that wrote at the same moment shows up by now
            theirs = self._read() or {}
            return (theirs.get("host"), theirs.get("pid")) == (doc["host"], doc["pid"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not exclusive:
            write_json(doc, self.path)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        return True

    def acquire(self) -> None:
        key = str(self.path)
        if RunLock._held.get(key):
            RunLock._held[key] += 1
            return
        me = self._me()
        for _ in range(3):
            holder = self._read()
            if holder is None:
                if self._write(me, exclusive=True):
                    break
                continue  # someone created it meanwhile: look at who
            if (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):
                break
            why = _stale(holder) if holder else "the lock file is unreadable"
            if why is None:
                raise UserError(
                    f"{self.run.show(self.path)}: this run is in use by {_describe(holder)}. Wait for it to "
                    f"finish (or stop it), then run the command again; to work on a copy instead, use another "
                    "--name. If that process is really gone, delete the lock file.")
            print(f"note: taking over {self.run.show(self.path)} from {_describe(holder) if holder else 'a crashed process'}: "
                  f"{why}.", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                if not self.run.store:
                    self.path.unlink()
            if self.run.store and self._write(me, exclusive=True):
                break
        else:
            raise UserError(f"{self.run.show(self.path)}: another process took this run's lock at the same time; "
                            "run the command again when it has finished.")
        RunLock._held[key] = 1
        self._thread = threading.Thread(target=self._beat, args=(me,), daemon=True, name="run-lock-heartbeat")
        self._thread.start()

    def _beat(self, me: dict) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                self._write(dict(me, heartbeat=time.time()), exclusive=False)

    def release(self) -> None:
        key = str(self.path)
        RunLock._held[key] -= 1
        if RunLock._held[key]:
            return
        del RunLock._held[key]
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.run.remove(self.path)  # here and, for a URI run, at the URI


@contextlib.contextmanager
def locked(run, command: str) -> Iterator[None]:
    """Hold `run`'s lock for the block (see the module docstring)."""
    lock = RunLock(run, command)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
