"""The run directory: the one module that knows its layout (no torch, no Ray).

  <run>/space.yaml                       the resolved space, frozen at the first launch
  <run>/folds.csv                        id, fold, the target column(s)
  <run>/run.lock                         host + pid of the live launch (ensemble.run.lock)
  <run>/leaderboard.csv                  one row per model: params by name, per-fold and mean scores
  <run>/tune/attempt-N/                  Ray Tune's experiment dir of each launch
  <run>/cache/                           decoded uint8 images per (size, preprocess); image_checks.parquet: the
                                         training images that decoded (never pushed: a URI run keeps it in
                                         this node's mirror)
  <run>/models/<model_id>/config.json    everything needed to rebuild the model
  <run>/models/<model_id>/status.json    {"state": "pruned"} when a scheduler stopped it; {"state": "complete",
                                         "weights": "pruned", ...} when python -m ensemble.prune freed its checkpoints
  <run>/models/<model_id>/oof.parquet    all k folds' held-out rows (when complete)
  <run>/models/<model_id>/fold<k>/       last.pt, weights.pt, oof.parquet, metrics.json
  <run>/models/<model_id>/oof_tta.parquet, test.parquet, predict.json   (predict; predict.json last)
  <run>/models/<model_id>/emb/           (predict, retrieval runs) oof/query/gallery .npy + .ids.parquet
  <run>/ensemble/                        (stack) written as one directory, swapped in at the end
  <run>/retrieval/                       (retrieve) scores.csv, selection.json, submission.csv: the same way
  <run>/report/                          (report) index.html, its PNGs, leaderboard.csv: the same way

A `Run` is that layout at a location (a directory, or a URI with a local working
copy): path helpers, listing and reading models, and the checks every stage
shares. `pull` and `push` copy files to and from a URI and do nothing for a
local directory, so stages read and write `run.dir` the same way in both cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from ensemble.errors import UserError
from ensemble.io import write_json, write_parquet
from ensemble.run import storage
from ensemble.run.storage import ARTIFACTS, RunStore

MODELS, ENSEMBLE = "models", "ensemble"
SPACE_FILE, FOLDS_FILE, LOCK_FILE, LEADERBOARD_FILE = "space.yaml", "folds.csv", "run.lock", "leaderboard.csv"
STATUS_FILE, CONFIG_FILE, OOF_FILE = "status.json", "config.json", "oof.parquet"
# Push order: metrics.json last. A round's fold also keeps what it trains on (made once, from the earlier round).
FOLD_FILES = ("pseudo.parquet", "hard_examples.json", "weights.pt", "oof.parquet", "last.pt", "metrics.json")
CHECKPOINT_FILES = ("weights.pt", "last.pt")  # a fold's large files: weights to predict again, last to resume
# A retrieval model's embeddings (float16, L2-normalised): held-out rows by their own fold's model (rows x dims);
# query and gallery sets by every fold model (folds x rows x dims). Each .npy has its ids beside it.
EMB_SETS = ("oof", "query", "gallery", "test")  # retrieval: oof, query, gallery; classification (--embeddings): oof, test
EMB_FILES = tuple(f"emb/{name}{ext}" for name in EMB_SETS for ext in (".npy", ".ids.parquet"))
PREDICT_FILES = ("oof_tta.parquet", "test.parquet", "oof_views.parquet", "test_views.parquet", "submission.csv",
                 *EMB_FILES, "predict.json")  # predict.json last: its presence marks a complete set


def total_epochs(config: dict) -> int:
    """A model's epochs over all its stages (config.json's `stages`)."""
    return sum(stage["epochs"] for stage in config["stages"])


def stage_size(config: dict, stage: dict) -> int:
    """A stage's image size: its own `image_size` (progressive resizing), else the model's params."""
    return stage.get("image_size") or config["params"]["image_size"]


def stage_of(config: dict, epoch: int) -> tuple[int, dict, int]:
    """(stage index, stage, epoch index inside the stage) of a 0-based global epoch."""
    start = 0
    for i, stage in enumerate(config["stages"]):
        if epoch < start + stage["epochs"]:
            return i, stage, epoch - start
        start += stage["epochs"]
    raise IndexError(f"epoch {epoch} is past the last stage")


class Run:
    """A run at `location` (a directory or a URI), worked on in the local directory `dir`.

    `location` is what crosses process boundaries: an absolute path, or the URI.
    For a URI, `dir` is a private scratch directory (`open_run`) or this node's
    mirror (`Run.on_node`), and `pull`/`push` move files between it and the URI.
    """

    def __init__(self, location: str | os.PathLike, store: RunStore | None = None):
        self.store = store
        self.location = store.uri if store else str(Path(location).expanduser().resolve())
        self.dir = store.local if store else Path(self.location)

    @classmethod
    def on_node(cls, location: str) -> "Run":
        """The run in this node's persistent mirror (fold tasks, predict actors); the directory itself when local."""
        return cls(location, RunStore(location) if storage.is_uri(location) else None)

    def __repr__(self) -> str:
        return f"Run({self.location!r})" + (f" in {str(self.dir)!r}" if self.store else "")

    # ----------------------------------------------------------------- paths

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    @property
    def space_file(self) -> Path:
        return self.dir / SPACE_FILE

    @property
    def folds_file(self) -> Path:
        return self.dir / FOLDS_FILE

    @property
    def lock_file(self) -> Path:
        return self.dir / LOCK_FILE

    @property
    def leaderboard_file(self) -> Path:
        return self.dir / LEADERBOARD_FILE

    @property
    def models_dir(self) -> Path:
        return self.dir / MODELS

    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"

    @property
    def image_checks_file(self) -> Path:
        """Which training images decoded (ensemble.data.manifest.ImageChecks); never pushed. A URI run keeps
        it in this node's mirror, since a driver's scratch copy is removed after each launch."""
        node = Run.on_node(self.location) if self.store else self
        return node.cache_dir / "image_checks.parquet"

    @property
    def tune_dir(self) -> Path:
        return self.dir / "tune"

    @property
    def ensemble_dir(self) -> Path:
        return self.dir / ENSEMBLE

    @property
    def retrieval_dir(self) -> Path:
        return self.dir / "retrieval"

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    def model_dir(self, model_id: str) -> Path:
        return self.dir / MODELS / model_id

    def fold_dir(self, model_id: str, fold: int) -> Path:
        return self.dir / MODELS / model_id / f"fold{fold}"

    def predict_dir(self, model_id: str, smoke: bool = False) -> Path:
        """Where predict writes a model's outputs: beside its OOF, or apart under --smoke (partial outputs)."""
        return self.dir / "predict-smoke" / model_id if smoke else self.model_dir(model_id)

    def rel(self, path: str | os.PathLike) -> str:
        """`path` relative to the run, in URI form ('models/m/fold0/last.pt')."""
        path = Path(path)
        return (path.relative_to(self.dir) if path.is_absolute() else path).as_posix()

    def show(self, path: str | os.PathLike = "") -> str:
        """Where `path` is, as a user finds it: under the directory, or the URI (its query string last)."""
        rel = self.rel(path) if str(path) else ""
        if self.store:
            return storage.join(self.location, rel) if rel else self.location
        return str(self.dir / rel) if rel else self.location

    # ----------------------------------------------------------------- sync with a URI (local: nothing to do)

    def pull(self, path: str | os.PathLike = "", *, only: tuple[str, ...] | None = None, exact: bool = False) -> bool:
        """Copy `path` (file or directory) from the URI into `dir`; True if the run has it."""
        if self.store:
            return self.store.pull(self.rel(path) if str(path) else "", only=only, exact=exact)
        return self.path(self.rel(path)).exists() if str(path) else self.dir.exists()

    def pull_artifacts(self, path: str | os.PathLike = "") -> None:
        """The small files under `path` (json, yaml, csv, parquet; never checkpoints or caches)."""
        self.pull(path, only=ARTIFACTS)

    def push(self, *paths: str | os.PathLike) -> None:
        """Upload these files to the URI, in the order given, each atomically; missing ones are skipped."""
        if self.store:
            self.store.push(*(self.rel(p) for p in paths))

    def exists(self, path: str | os.PathLike) -> bool:
        """Whether the run holds `path`: at the URI (not the local copy) for a URI run."""
        return self.store.exists(self.rel(path)) if self.store else self.path(self.rel(path)).exists()

    def file_sizes(self, path: str | os.PathLike) -> dict[str, int]:
        """Run-relative path -> bytes of every file under `path`: listed at the URI for a URI run (nothing
        downloaded); hidden files (a write in progress) left out."""
        if self.store:
            return self.store.sizes(self.rel(path))
        root = self.path(self.rel(path))
        files = root.rglob("*") if root.is_dir() else [root]
        return {self.rel(p): p.stat().st_size for p in files if p.is_file() and not p.name.startswith(".")}

    # ----------------------------------------------------------------- models

    def model_ids(self) -> list[str]:
        """Every model directory holding a config.json, sorted."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.models_dir.glob(f"*/{CONFIG_FILE}") if not p.parent.name.startswith("."))

    def read_config(self, model_id: str) -> dict:
        path = self.model_dir(model_id) / CONFIG_FILE
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{self.show(path)}: cannot be read as JSON ({exc}); the sweep writes it: rerun the "
                            "sweep with --resume, or delete this model's directory.") from None
        missing = [key for key in ("model_id", "task", "classes", "target", "k") if key not in config]
        if missing:
            raise UserError(f"{self.show(path)}: missing key(s) {missing}; it was not written by this version's "
                            "sweep: rerun the sweep with --resume, or delete this model's directory.")
        return config

    def configs(self) -> dict[str, dict]:
        return {model_id: self.read_config(model_id) for model_id in self.model_ids()}

    def write_config(self, config: dict) -> Path:
        path = self.model_dir(config["model_id"]) / CONFIG_FILE
        write_json(config, path)
        return path

    def read_metrics(self, model_id: str, fold: int) -> dict | None:
        path = self.fold_dir(model_id, fold) / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def model_state(self, model_id: str) -> str:
        """'complete', 'pruned' or 'todo', from the model's own files (not from Tune's state).

        A model whose checkpoints `python -m ensemble.prune` freed stays 'complete': its predictions are."""
        if (self.model_dir(model_id) / OOF_FILE).exists():
            return "complete"
        return "pruned" if self.read_status(model_id).get("state") == "pruned" else "todo"

    def read_status(self, model_id: str) -> dict:
        """models/<id>/status.json, or {} when the model has none (neither pruned nor freed)."""
        path = self.model_dir(model_id) / STATUS_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def weights_pruned(self, model_id: str) -> bool:
        """Whether `python -m ensemble.prune` freed this model's weights.pt: it cannot be predicted again."""
        return self.read_status(model_id).get("weights") == "pruned"

    def trained_epochs(self) -> int:
        """Fold-epochs finished so far, over every model (0: nothing trained, the space may still change)."""
        return sum(json.loads(p.read_text()).get("epochs", 0) for p in self.models_dir.glob("*/fold*/metrics.json")) \
            if self.models_dir.is_dir() else 0

    def remove(self, *paths: str | os.PathLike) -> None:
        """Delete these files or directories here and, for a URI run, at the URI."""
        for path in paths:
            local = self.path(self.rel(path))
            if local.is_dir():
                shutil.rmtree(local)
            else:
                local.unlink(missing_ok=True)
            if self.store:
                self.store.delete(self.rel(path))

    def mark_pruned(self, model_id: str, epoch: int | None) -> None:
        path = self.model_dir(model_id) / STATUS_FILE
        write_json({"state": "pruned", "epoch": epoch}, path)
        self.push(path)

    def mark_weights_pruned(self, model_id: str, **details) -> None:
        """Record that a complete model's checkpoints are (about to be) freed; its predictions stay."""
        path = self.model_dir(model_id) / STATUS_FILE
        write_json({**self.read_status(model_id), "state": "complete", "weights": "pruned", **details}, path)
        self.push(path)

    def mark_complete(self, model_id: str, fold: int, stopped: str | None = None) -> None:
        """Mark a fold complete: all epochs done, or the whole model stopped early."""
        metrics = self.read_metrics(model_id, fold)
        metrics.update(complete=True, stopped=stopped)
        write_json(metrics, self.fold_dir(model_id, fold) / "metrics.json")

    def shared_ids(self, configs) -> set[str] | None:
        """The folds.csv ids that every model of `configs` trains on; None when that is all of them.

        A round may train on another manifest (e.g. a competition's stage-2 data): its new rows
        have folds in folds.csv, but the models of other rounds never saw them."""
        from ensemble.data.manifest import read_table

        manifests = {(config.get("data") or {}).get("manifest") for config in configs} - {None}
        if len(manifests) < 2:
            return None
        return set.intersection(*(set(read_table(Path(m))["id"].astype(str)) for m in manifests))

    def finalize_model(self, config: dict) -> Path:
        """When all k folds are complete: the model's oof.parquet (each of its training ids once) and config.json."""
        model_id = config["model_id"]
        parts = [pd.read_parquet(self.fold_dir(model_id, f) / OOF_FILE) for f in range(config["k"])]
        oof = pd.concat(parts, ignore_index=True)
        folds = pd.read_csv(self.folds_file, dtype={"id": str})
        folds = folds[folds["id"].isin(oof["id"])]  # the rows of its own manifest (a round's may be other rows)
        assert len(oof) == len(folds), "OOF rows must be folds.csv rows, each once"
        oof = oof.set_index("id").loc[folds["id"]].reset_index()
        self.write_config(config)
        write_parquet(oof, self.model_dir(model_id) / OOF_FILE)
        return self.model_dir(model_id)

    def push_fold(self, model_id: str, fold: int) -> None:
        self.push(*(self.fold_dir(model_id, fold) / name for name in FOLD_FILES))

    def push_model(self, model_id: str, k: int) -> None:
        """What mark_complete and finalize_model wrote: fold metrics, then the model's config and OOF."""
        self.push(*(self.fold_dir(model_id, f) / "metrics.json" for f in range(k)),
                  self.model_dir(model_id) / CONFIG_FILE, self.model_dir(model_id) / OOF_FILE)

    # ----------------------------------------------------------------- checks every stage shares

    def check(self) -> None:
        """A run directory at all: folds.csv and models/ (what the sweep writes first)."""
        if not self.folds_file.exists() or not self.models_dir.is_dir():
            raise UserError(f"{self.show()}: not a run directory (needs folds.csv and models/); pass the "
                            "directory the sweep wrote, e.g. runs/<name>.")

    def check_folds(self, folds: pd.Series, k: int) -> None:
        """folds.csv's folds must be exactly 0..k-1, the folds the models were trained on."""
        found, expected = set(pd.unique(folds).tolist()), set(range(int(k)))
        if found != expected:
            raise UserError(f"{self.show(self.folds_file)}: folds {sorted(found)} but the models were trained with "
                            f"k={k} (folds 0..{int(k) - 1}): missing {sorted(expected - found)}, unexpected "
                            f"{sorted(found - expected)}. Use the folds.csv the sweep wrote.")

    def write_set(self, out: Path, files: dict[str, bytes]) -> None:
        """Write a stage's directory (ensemble/, retrieval/, report/) as one set: built beside it, then swapped
        in, so it is never a mix of two runs of the stage; `files`: relative path -> bytes.

        A URI has no directory rename: the old directory is deleted there, then the files are uploaded,
        scores.csv last (its presence marks a complete stack)."""
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel, payload in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(payload)
            if out.exists():
                out.rename(old)
            tmp.rename(out)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not out.exists():
                old.rename(out)
            raise UserError(f"{self.show(out)}: cannot write it ({exc.strerror or exc}); {out.name}/ is unchanged. "
                            "Free some space or fix the permissions, then run the same command again.") from None
        shutil.rmtree(old, ignore_errors=True)
        if self.store:
            self.store.delete(self.rel(out))
            self.push(*(out / rel for rel in sorted(files, key=lambda rel: rel == "scores.csv")))

    def check_writable(self) -> None:
        """Fail now, naming the directory, rather than after minutes of work when a write fails."""
        if self.store:
            return  # a URI is written through its own client: its errors name the URI
        where = next(p for p in (self.dir, *self.dir.parents) if p.exists())  # creates nothing
        probe = where / f".write-check-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise UserError(f"{where}: cannot write here ({exc.strerror or exc}); free some space or fix the "
                            "permissions, then run the same command again. Nothing was changed.") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()


@contextlib.contextmanager
def open_run(location: str | os.PathLike) -> Iterator[Run]:
    """A `Run` for a driver: the directory itself, or for a URI a private scratch directory (removed
    afterwards) that `pull` fills and `push` uploads from."""
    if not storage.is_uri(location):
        yield Run(location)
        return
    scratch = Path(tempfile.mkdtemp(prefix="ensemble-run-"))
    try:
        store = RunStore(str(location), local=scratch)
        try:
            store.exists("")
        except OSError as exc:  # no such bucket, no credentials, no network
            raise UserError(f"storage {location}: {exc}. Check the bucket name and the credentials "
                            "(environment variables, instance role, or the URI's options).") from exc
        yield Run(location, store)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
