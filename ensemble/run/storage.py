"""Runs stored at a URI (s3://, gs://, hdfs://, file://, anything pyarrow.fs opens).

Every stage reads and writes a run as a local directory (`ensemble.run.Run`).
With `--storage URI` the run lives at the URI and the processes that touch it
copy files to and from it, so the nodes of a cluster need no shared file system:

  fold task      works in its node's mirror (`$ENSEMBLE_CACHE_DIR/runs/`, default
                 `~/.cache/ensemble/runs/`): makes its fold directory equal to the
                 URI's (the last.pt it continues from), then pushes the fold's
                 files after every epoch, metrics.json last, so a reader never
                 sees an epoch whose checkpoint is not there yet
  predict actor  pulls the weights (and keeps the decoded-image cache) in its
                 node's mirror
  driver, trial  work in a private scratch directory (`ensemble.run.open_run`): they pull the
                 small artifacts (json, yaml, csv, parquet; never checkpoints or
                 caches) and push exactly the files they write

Only a fold task writes into its fold's directory of the node mirror, and only
from the URI's copy or its own training, so nothing on the node can roll a file
back. Each push goes to a temporary name and is moved into place: a crash never
leaves a truncated artifact at the URI. No torch and no Ray here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ARTIFACTS = (".json", ".yaml", ".csv", ".parquet")  # what drivers and trials pull: no checkpoints, no caches


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(location: str | os.PathLike, name: str) -> str | Path:
    """`location`/`name` for a directory or a URI (a URI's query, e.g. ?endpoint_override=..., stays last)."""
    if not is_uri(location):
        return Path(location) / name
    parts = urlsplit(str(location))
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def split(location: str | os.PathLike) -> tuple[str, str]:
    """(parent, name): the inverse of `join`, for the command that resumes a run."""
    if not is_uri(location):
        return str(Path(location).parent), Path(location).name
    parts = urlsplit(str(location))
    parent, name = parts.path.rstrip("/").rsplit("/", 1)
    return urlunsplit(parts._replace(path=parent)), name


def cache_root() -> Path:
    """$ENSEMBLE_CACHE_DIR, else ~/.cache/ensemble: this node's run mirrors and measured GPU memory."""
    env = os.environ.get("ENSEMBLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ensemble"


def mirror_root() -> Path:
    return cache_root() / "runs"


class RunStore:
    """A run at `uri` and a local directory that mirrors part of it: this node's mirror unless `local` is given."""

    def __init__(self, uri: str, local: Path | None = None):
        from pyarrow import fs

        self.uri = str(uri).rstrip("/")
        try:
            self.fs, self.base = fs.FileSystem.from_uri(self.uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with its own message
            from ensemble.errors import UserError

            raise UserError(f"storage {uri}: pyarrow cannot open it ({exc}). Use a directory, or a URI such as "
                            "s3://bucket/runs, gs://bucket/runs or file:///shared/runs.") from exc
        self.base = self.base.rstrip("/")
        digest = hashlib.sha1(self.uri.encode()).hexdigest()[:10]
        self.local = local or mirror_root() / f"{Path(self.base).name or 'run'}-{digest}"

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r} <-> {str(self.local)!r})"

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}".rstrip("/") if rel else self.base

    def exists(self, rel: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self._remote(rel)).type != fs.FileType.NotFound

    # ----------------------------------------------------------------- pull

    def pull(self, rel: str = "", *, only: tuple[str, ...] | None = None, exact: bool = False) -> bool:
        """Copy the file or directory `rel` from the URI into the local directory; False if the URI has none.

        `only`: file name endings to copy (e.g. ARTIFACTS). Files whose size and
        modification time match the local copy are not copied again, so polling
        costs one listing. `exact`: also delete local files under `rel` that the
        URI does not have (a fold directory before training continues from it)."""
        files = self._list(rel)
        if exact:
            keep = {Path(f.path).relative_to(self.base) for f in files or []}
            root = self.local / rel
            for path in [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []:
                if path.relative_to(self.local) not in keep:
                    path.unlink()
        if files is None:
            return False
        for f in files:
            local = self.local / Path(f.path).relative_to(self.base)
            if (only is None or f.path.endswith(only)) and not _same(local, f):
                self._download(f.path, local, f.mtime_ns)
        return True

    def sizes(self, rel: str) -> dict[str, int]:
        """Base-relative path -> bytes of every file at the URI under `rel` (one listing, nothing downloaded)."""
        return {Path(f.path).relative_to(self.base).as_posix(): f.size for f in self._list(rel) or []}

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

    def read_json(self, rel: str) -> dict | None:
        """A JSON file at the URI, read into memory (nothing written locally); None if absent."""
        import json

        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(self._remote(rel)) as src:
            return json.loads(src.read())

    # ----------------------------------------------------------------- push

    def delete(self, rel: str) -> None:
        """Remove the file or directory `rel` at the URI (a relaunch that replaces a plan), if there."""
        from pyarrow import fs

        info = self.fs.get_file_info(self._remote(rel))
        if info.type == fs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == fs.FileType.File:
            self.fs.delete_file(info.path)

    def push(self, *rels: str) -> None:
        """Upload local files (relative paths), in the order given, each atomically; missing ones, and
        ones the URI holds in this version already, are skipped."""
        for rel in rels:
            local = self.local / rel
            remote = self._remote(rel)
            if not local.is_file() or _same(local, self.fs.get_file_info(remote)):
                continue
            parent = remote.rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{Path(rel).name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(local, "rb") as src, self.fs.open_output_stream(tmp) as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                self.fs.move(tmp, remote)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.delete_file(tmp)
                raise
            # The local copy is now the URI's version: a later pull does not fetch it back.
            mtime = self.fs.get_file_info(remote).mtime_ns
            if mtime is not None:
                os.utime(local, ns=(mtime, mtime))


def _same(local: Path, remote) -> bool:
    """The local file is the URI's version (same size, and the mtime pull/push gave it)."""
    if not local.exists() or remote.mtime_ns is None:
        return False
    stat = local.stat()
    return stat.st_size == remote.size and stat.st_mtime_ns == remote.mtime_ns
