"""Runs stored at a URI (s3://, gs://, hdfs://, file://, anything pyarrow.fs opens).

Every stage reads and writes a run as a local directory (ensemble.artifacts). With
`--storage URI` the run lives at the URI, and each process that touches it, on
any node, works in a local mirror (`$ENSEMBLE_CACHE_DIR/runs/`, default
`~/.cache/ensemble/runs/`) and copies the files it needs:

  driver     pulls the run without checkpoints before preparing or resuming it;
             pushes space.yaml, folds.csv, the configs and the pruned marks
  fold task  pulls its fold directory (the last.pt it continues from) and
             folds.csv; pushes the fold after every epoch, metrics.json last,
             so a reader never sees an epoch whose checkpoint is not there yet
  trial      pulls its folds' metrics.json while it waits; pushes what
             mark_complete and finalize_model write

Each file is uploaded under a temporary name and moved into place, so a crash
never leaves a truncated artifact at the URI. No torch and no Ray here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

CHECKPOINTS = (".pt",)  # pull(exclude=CHECKPOINTS): what the driver and the stacking layer read
FOLD_FILES = ("weights.pt", "oof.parquet", "last.pt", "metrics.json")  # push order: metrics.json last


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def mirror_root() -> Path:
    env = os.environ.get("ENSEMBLE_CACHE_DIR")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ensemble"
    return base / "runs"


class RunStore:
    """A run at `uri` and its local mirror directory on this node."""

    def __init__(self, uri: str):
        from pyarrow import fs

        self.uri = uri.rstrip("/")
        try:
            self.fs, self.base = fs.FileSystem.from_uri(self.uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with its own message
            from ensemble.errors import UserError

            raise UserError(f"storage {uri}: pyarrow cannot open it ({exc}). Use a directory, or a URI such as "
                            "s3://bucket/runs, gs://bucket/runs or file:///shared/runs.") from exc
        digest = hashlib.sha1(self.uri.encode()).hexdigest()[:10]
        self.local = mirror_root() / f"{Path(self.base).name or 'run'}-{digest}"

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r} <-> {str(self.local)!r})"

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}".rstrip("/") if rel else self.base

    # ----------------------------------------------------------------- pull

    def pull(self, rel: str = "", *, exclude: tuple[str, ...] = ()) -> bool:
        """Copy the file or directory `rel` from the URI into the mirror; False if the URI has none.

        Files whose name ends with one of `exclude` are left out. Files whose size and
        modification time match the mirror's copy are not copied again, so polling a
        directory costs one listing."""
        files = self._list(rel)
        if files is None:
            return False
        for f in files:
            local = self.local / Path(f.path).relative_to(self.base)
            if not f.path.endswith(tuple(exclude)) and not _same(local, f):
                self._download(f.path, local, f.mtime_ns)
        return True

    def _list(self, rel: str) -> list | None:
        from pyarrow import fs

        info = self.fs.get_file_info(self._remote(rel))
        if info.type == fs.FileType.NotFound:
            return None
        if info.type == fs.FileType.File:
            return [info]
        return [f for f in self.fs.get_file_info(fs.FileSelector(info.path, recursive=True))
                if f.type == fs.FileType.File and not Path(f.path).name.startswith(".")]

    def _download(self, remote: str, local: Path, mtime_ns: int | None) -> None:
        from ensemble.io import atomic_path

        with atomic_path(local) as tmp:
            with self.fs.open_input_stream(remote) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            if mtime_ns is not None:
                os.utime(tmp, ns=(mtime_ns, mtime_ns))

    # ----------------------------------------------------------------- push

    def push(self, *rels: str) -> None:
        """Upload mirror files (relative paths), in the order given, each atomically; missing ones are skipped."""
        for rel in rels:
            local = self.local / rel
            if not local.is_file():
                continue
            remote = self._remote(rel)
            parent = remote.rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{Path(rel).name}.{uuid.uuid4().hex[:8]}.tmp"
            with open(local, "rb") as src, self.fs.open_output_stream(tmp) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            self.fs.move(tmp, remote)
            # The mirror's copy now matches the URI's: a later pull does not fetch it back.
            mtime = self.fs.get_file_info(remote).mtime_ns
            if mtime is not None:
                os.utime(local, ns=(mtime, mtime))

    def clear_mirror(self) -> None:
        """Forget this node's copy (it is only a cache of the URI)."""
        shutil.rmtree(self.local, ignore_errors=True)

    def push_changed(self, rel: str, *, exclude: tuple[str, ...] = ()) -> None:
        """Upload every mirror file under `rel` that the URI lacks or holds in another version."""
        local_root = self.local / rel
        if not local_root.exists():
            return
        remote = {Path(f.path).relative_to(self.base).as_posix(): f for f in self._list(rel) or []}
        changed = [p.relative_to(self.local).as_posix() for p in sorted(local_root.rglob("*"))
                   if p.is_file() and not p.name.startswith(".") and not p.name.endswith(tuple(exclude))]
        self.push(*(r for r in changed if r not in remote or not _same(self.local / r, remote[r])))

    def push_fold(self, model_id: str, fold: int) -> None:
        self.push(*(f"models/{model_id}/fold{fold}/{name}" for name in FOLD_FILES))

    def push_model(self, model_id: str, k: int) -> None:
        """What mark_complete and finalize_model wrote: fold metrics, then the model's OOF and config."""
        self.push(*(f"models/{model_id}/fold{f}/metrics.json" for f in range(k)),
                  f"models/{model_id}/config.json", f"models/{model_id}/oof.parquet")


def _same(local: Path, remote) -> bool:
    """The mirror's file is the URI's version (same size, and the mtime pull/push gave it)."""
    if not local.exists() or remote.mtime_ns is None:
        return False
    stat = local.stat()
    return stat.st_size == remote.size and stat.st_mtime_ns == remote.mtime_ns


def open_run(location: str | os.PathLike) -> tuple[Path, RunStore | None]:
    """(local run directory, store): the directory itself, or a URI's mirror and its store."""
    if is_uri(location):
        store = RunStore(str(location))
        return store.local, store
    return Path(location), None
