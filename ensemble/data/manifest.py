"""Manifests, validation, decoding and the training/inference data loader.

A manifest is a CSV or Parquet file with `id`, `image` (a path relative to a
root directory) and exactly one target form:

  label      multiclass, one class name per row                  ("cat")
  tags       multilabel, space-separated tags                    ("clear primary water")
  attribute  FashionAI-style strings, one char per class: y = 1, n = 0, m = "maybe"
             with a soft weight; rows are renormalised to sum to 1 ("nnmynn")

plus an optional `group` (subject/driver) for group k-fold. Test manifests have
no target. `read_manifest` validates everything up front and raises one
`UserError` per problem naming the file, the rows and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ensemble.data.jpeg import with_blank_scans
from ensemble.errors import UserError, format_rows
from ensemble.io import write_parquet

# We report unreadable images ourselves, naming the manifest row; OpenCV's own stderr lines only confuse.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

FORMS = ("label", "tags", "attribute")
BAD_IMAGE_POLICIES = ("raise", "skip")  # what training does with an image that fails to decode


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Which column holds the target and how to read it."""

    form: str  # one of FORMS
    column: str
    maybe_weight: float = 0.5  # weight of 'm' in attribute strings, before renormalising

    @property
    def task(self) -> str:
        return "multilabel" if self.form == "tags" else "multiclass"

    def to_dict(self) -> dict:
        return {"form": self.form, "column": self.column, "maybe_weight": self.maybe_weight}


def resolve_target(columns, form: str | None = None, column: str | None = None, maybe_weight: float = 0.5,
                   source: str = "manifest") -> Target:
    """Pick the target form from explicit settings or from the columns present."""
    if form is not None and form not in FORMS:
        raise UserError(f"The 'target.form' parameter must be one of {list(FORMS)}. Got {form!r} instead.")
    if form == "attribute" or (form is None and column is not None and column not in ("label", "tags")):
        if column is None:
            raise UserError("target form 'attribute' needs 'target.column': the column holding strings like 'nnmynn'.")
        form = "attribute"
    found = [c for c in ("label", "tags") if c in columns]
    if form is None:
        if len(found) != 1:
            what = "both 'label' and 'tags'" if found else "neither 'label' nor 'tags'"
            raise UserError(
                f"{source} has {what}; a training manifest needs exactly one target form: "
                "'label' (multiclass), 'tags' (multilabel) or an attribute-string column "
                "named with target.column (FashionAI 'nnmynn' strings)."
            )
        form = found[0]
    column = column or form
    if not 0.0 <= maybe_weight <= 1.0:
        raise UserError(f"maybe_weight must be in [0, 1]. Got {maybe_weight!r} instead.")
    return Target(form=form, column=column, maybe_weight=float(maybe_weight))


def infer_classes(values: pd.Series, target: Target) -> list[str]:
    """Class names in a stable (sorted) order; attribute strings get c0..c{L-1}."""
    if target.form == "label":
        return sorted(values.astype(str).unique())
    if target.form == "tags":
        return sorted({t for tags in values.astype(str) for t in tags.split()})
    return [f"c{i}" for i in range(len(str(values.iloc[0])))]


def encode_targets(frame: pd.DataFrame, target: Target | dict, classes: list[str]) -> np.ndarray:
    """Target matrix (rows x classes, float32): one-hot, multi-hot or soft rows.

    Assumes a validated frame (see `read_manifest`); works on folds.csv too.
    """
    if isinstance(target, dict):
        target = Target(**target)
    values = frame[target.column].astype(str)
    if target.form == "label":
        index = pd.Index(classes).get_indexer(values)
        assert (index >= 0).all(), "unknown label in a validated frame"
        return np.eye(len(classes), dtype=np.float32)[index]
    if target.form == "tags":
        # One vectorised pass: pandas' str.get_dummies splits on the separator.
        dummies = values.str.get_dummies(sep=" ")
        return dummies.reindex(columns=classes, fill_value=0).to_numpy(np.float32)
    chars = np.array([list(s) for s in values])
    soft = (chars == "y").astype(np.float32) + target.maybe_weight * (chars == "m")
    return soft / soft.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- manifests


@dataclass
class Manifest:
    """A validated manifest: the frame, where its images live, and its encoded targets."""

    path: Path
    root: Path
    frame: pd.DataFrame
    target: Target | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def task(self) -> str | None:
        return self.target.task if self.target else None

    @property
    def ids(self) -> np.ndarray:
        return self.frame["id"].to_numpy()

    @property
    def image_paths(self) -> list[str]:
        return [str(self.root / p) for p in self.frame["image"]]

    @property
    def groups(self) -> np.ndarray | None:
        return self.frame["group"].to_numpy() if "group" in self.frame else None

    def targets(self) -> np.ndarray:
        assert self.target is not None, "a test manifest has no targets"
        return encode_targets(self.frame, self.target, self.classes)

    def subset(self, mask) -> "Manifest":
        return Manifest(self.path, self.root, self.frame[mask].reset_index(drop=True), self.target, self.classes)


PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar")  # pandas decompresses these itself
# What a file that is not CSV text most likely is, from its first bytes, and what to do instead.
_NOT_CSV = {
    b"PAR1": ("a Parquet file", "name it .parquet"),
    b"PK\x03\x04": ("a ZIP archive (an Excel .xlsx workbook?)", "export it as CSV UTF-8"),
    b"\xd0\xcf\x11\xe0": ("an Excel .xls workbook", "export it as CSV UTF-8"),
    b"\xff\xfe": ("UTF-16 text", "save it as CSV UTF-8"),
    b"\xfe\xff": ("UTF-16 text", "save it as CSV UTF-8"),
    b"\x89PNG": ("a PNG image", "point data.manifest at the CSV/Parquet file that lists the images"),
    b"\xff\xd8\xff": ("a JPEG image", "point data.manifest at the CSV/Parquet file that lists the images"),
    b"GIF8": ("a GIF image", "point data.manifest at the CSV/Parquet file that lists the images"),
    b"%PDF": ("a PDF document", "give the CSV/Parquet manifest"),
    b"\x1f\x8b": ("a gzip archive", "name it .csv.gz"),
}


def _sniff(head: bytes) -> tuple[str, str] | None:
    """(what the file looks like, the fix) when its first bytes are not plain text; None for text."""
    for magic, found in _NOT_CSV.items():
        if head.startswith(magic):
            return found
    return ("binary data", "give the CSV/Parquet manifest") if b"\x00" in head else None


def _table_kind(path: Path) -> str:
    """'Parquet' or 'CSV', after checking that `path` is a file that may hold one (pandas' own
    errors for a PNG or an .xlsx named .csv are codec errors that do not say what is wrong)."""
    if not path.exists():
        raise UserError(f"{path}: file not found.")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; a manifest is a CSV or Parquet file.")
    kind = "Parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "CSV"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise UserError(f"{path}: cannot be read: {exc.strerror or exc}.") from None
    if not head:
        raise UserError(f"{path}: the file is empty (0 bytes); a manifest is CSV text with a header line "
                        "such as 'id,image,label' and one row per image, or a Parquet file.")
    found = _sniff(head)
    if kind == "Parquet" and not head.startswith(b"PAR1"):
        what, _ = found or ("text (CSV?)", "")
        raise UserError(f"{path}: cannot be read as Parquet: it looks like {what}, not a Parquet file "
                        f"(which starts with 'PAR1'). Name a CSV file .csv, or write it with DataFrame.to_parquet.")
    if kind == "CSV" and found and path.suffix.lower() not in COMPRESSED_SUFFIXES:
        what, fix = found
        raise UserError(f"{path}: cannot be read as CSV: it looks like {what} (first bytes {head[:8]!r}), "
                        f"not CSV text; {fix}.")
    return kind


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet file as strings (ids like '007' must stay '007')."""
    kind = _table_kind(path)
    try:
        if kind == "Parquet":
            return pd.read_parquet(path).astype({c: "string" for c in ("id", "image")}, errors="ignore")
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise UserError(f"{path}: cannot be read as {kind}: {exc}") from exc


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> UserError:
    return UserError(f"{path}: cannot be read as CSV: it is not UTF-8 text ({exc.reason}); "
                     "save it as CSV UTF-8 (Excel: Save As > CSV UTF-8).")


def read_columns(path: str | os.PathLike) -> tuple[str, ...]:
    """The column names from the header alone: a space file is checked without reading its data."""
    path = Path(path)
    kind = _table_kind(path)
    try:
        if kind == "Parquet":
            import pyarrow.parquet as pq

            return tuple(pq.read_schema(path).names)
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            header = next((row for row in csv.reader(f) if any(cell.strip() for cell in row)), None)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except (OSError, ValueError, csv.Error) as exc:
        raise UserError(f"{path}: cannot be read as {kind}: {exc}") from None
    if header is None:
        raise UserError(f"{path}: no header line, only blank lines; a CSV manifest starts with a header "
                        "such as 'id,image,label'.")
    return tuple(header)


def read_manifest(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    target: Target | None = None,
    classes: list[str] | None = None,
    require_target: bool = True,
    check_images: str = "decode",
    on_bad_image: str = "raise",
    checks: ImageChecks | None = None,
) -> Manifest:
    """Read and validate a manifest; raise one UserError naming the rows at fault.

    Args:
        path: CSV or Parquet file.
        root: directory the `image` paths are relative to; default: the manifest's folder.
        target: how to read the target; default: inferred from the columns.
        classes: the allowed class names (e.g. from a space file); default: inferred.
        require_target: False for test manifests (id + image only).
        check_images: "decode" (every image must decode), "exists" or "none".
        on_bad_image: "raise": an image that does not decode is an error; "skip": a note on
            stderr names them, and training leaves them out (the space's data.on_bad_image).
        checks: the images that decoded before (a run's `ImageChecks`): unchanged files are not decoded again.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    frame = read_table(path)
    _require_columns(frame, ["id", "image"], path)
    if frame.empty:  # a header alone would fail far later, e.g. in numpy on an empty target matrix
        raise UserError(f"{path}: no data rows, only the header {list(frame.columns)}; "
                        "a manifest needs one row per image.")
    if require_target:
        target = target or resolve_target(frame.columns, source=str(path))
        _require_columns(frame, [target.column], path)
    else:
        target = None
    frame = frame.reset_index(drop=True)
    frame["id"] = frame["id"].astype(str)
    check_ids(frame, path)
    if "group" in frame:
        _fail_rows(frame["group"].astype(str).str.strip() == "", path, "empty 'group'",
                   "give every row a group (subject/driver) or drop the column")
    if target is not None:
        classes = check_targets(frame, target, classes, path)
    _check_image_paths(frame, root, path, check_images, on_bad_image, checks or ImageChecks())
    return Manifest(path=path, root=root, frame=frame, target=target, classes=list(classes or []))


def _require_columns(frame: pd.DataFrame, needed: list[str], path: Path) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {missing}; found {list(frame.columns)}. "
            "A manifest needs 'id', 'image' (path relative to the root) and one target column."
        )


def _fail_rows(mask, path: Path, problem: str, fix: str) -> None:
    rows = np.flatnonzero(np.asarray(mask)) + 1
    if len(rows):
        raise UserError(f"{path}: {problem} at {format_rows(rows)}; {fix}.")


def check_ids(frame: pd.DataFrame, path: Path) -> None:
    """One UserError naming the rows with an empty or a duplicate id."""
    _fail_rows(frame["id"].str.strip() == "", path, "empty 'id'", "every row needs a unique id")
    _fail_rows(frame["id"].duplicated(keep="first"), path, "duplicate 'id'",
               "ids must be unique (the later duplicates are listed)")


def check_targets(frame: pd.DataFrame, target: Target, classes: list[str] | None, path: Path) -> list[str]:
    """Strip the target column and check it (empty, unknown class, malformed attribute string); return the classes."""
    values = frame[target.column].astype(str).str.strip()
    frame[target.column] = values
    _fail_rows(values == "", path, f"empty '{target.column}'",
               "every training row needs a target" + (" (at least one tag)" if target.form == "tags" else ""))
    if target.form == "attribute":
        lengths = values.str.len()
        expected = len(classes) if classes else int(lengths.mode().iloc[0])
        _fail_rows(lengths != expected, path, f"'{target.column}' of a length other than {expected}",
                   f"attribute strings need one character per class ({expected})")
        _fail_rows(~values.str.fullmatch(r"[ynm]+"), path, f"'{target.column}' with characters other than y/n/m",
                   "use y (yes), n (no) and m (maybe), e.g. 'nnmynn'")
        _fail_rows(~values.str.contains(r"[ym]"), path, f"'{target.column}' without any y or m",
                   "each row needs at least one positive ('y') or 'maybe' ('m') class")
    classes = classes or infer_classes(values, target)
    if target.form != "attribute":
        known = set(classes)
        if target.form == "label":
            unknown = ~values.isin(known)
        else:
            unknown = values.map(lambda s: not set(s.split()) <= known)
        _fail_rows(unknown, path, f"'{target.column}' not among the classes {classes[:20]}",
                   "fix the label or add it to the space's classes")
    return classes


def _check_image_paths(frame: pd.DataFrame, root: Path, path: Path, check_images: str, on_bad_image: str,
                       checks: ImageChecks) -> None:
    if check_images not in ("decode", "exists", "none"):
        raise UserError(f"The 'check_images' parameter must be one of ['decode', 'exists', 'none']. Got {check_images!r} instead.")
    if check_images == "none":
        return
    root_real = os.path.realpath(root)
    resolved = [os.path.realpath(os.path.join(root_real, p)) for p in frame["image"]]
    escapes = [not r.startswith(root_real + os.sep) for r in resolved]
    _fail_rows(escapes, path, f"an 'image' path escaping the root {root}",
               "image paths must be relative to the root and stay inside it (no '..' or absolute paths)")
    stats = [_stat_file(r) for r in resolved]
    _fail_rows([st is None for st in stats], path, f"an 'image' file missing under {root}",
               "check the root directory and the paths")
    if check_images == "decode":
        bad = checks.bad(resolved, stats)
        if on_bad_image == "skip" and any(bad):
            rows = np.flatnonzero(bad) + 1
            print(f"note: {path}: an unreadable or corrupt image at {format_rows(rows)} "
                  f"(ids {frame['id'].iloc[rows[:5] - 1].tolist()}); on_bad_image: skip leaves them out of training, "
                  "and their predictions are the class prior", file=sys.stderr)
            return
        _fail_rows(bad, path, "an unreadable or corrupt image",
                   "re-download or remove these files (or set data.on_bad_image: skip)")


def _stat_file(path: str) -> os.stat_result | None:
    """The file's stat, or None when it is missing or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


# --------------------------------------------------------------------------- image checks


class ImageChecks:
    """The image files that decoded, keyed by (resolved path, size, mtime_ns, ctime_ns) and kept in `path`
    (a run's cache/image_checks.parquet), so a relaunch decodes only the files that are new or changed.
    The ctime catches a replacement of the same size whose mtime was kept (`cp -p`, `rsync -a`): no tool
    sets it back, and otherwise only metadata changes move it (chmod, rename, a new hard link: one more check).

    Only files that decoded are kept: a bad image is decoded, and reported, again at every launch.
    A missing, unreadable or corrupt cache file counts as empty: everything is checked again.
    `save` writes the file; a launch calls it with the plan's other files, so a launch that fails
    its checks writes nothing.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.good = _read_checks(self.path)  # resolved path -> (size, mtime_ns, ctime_ns) when it decoded
        self.decoded = 0  # files this object decoded (the benchmark and the tests count them)
        self._changed = False

    def bad(self, paths: list[str], stats: list[os.stat_result]) -> list[bool]:
        """Whether each file fails to decode; a file unchanged since it last decoded is not decoded again."""
        keys = [(st.st_size, st.st_mtime_ns, st.st_ctime_ns) for st in stats]
        todo = [i for i, (p, key) in enumerate(zip(paths, keys)) if self.good.get(p) != key]
        bad = [False] * len(paths)
        for i, failed in zip(todo, _decode_failures([paths[i] for i in todo])):
            bad[i] = failed
            if failed:  # a bad file is never kept as good
                self._changed |= self.good.pop(paths[i], None) is not None
            else:  # keyed by the stat taken before the decode: a file written since is checked again next time
                self.good[paths[i]] = keys[i]
                self._changed = True
        self.decoded += len(todo)
        return bad

    def save(self) -> None:
        """Write the cache (atomically) when this launch changed it; no path: nothing to write."""
        if self.path is None or not self._changed:
            return
        paths = list(self.good)
        keys = np.array(list(self.good.values()), np.int64).reshape(-1, len(_CHECK_KEYS))
        frame = pd.DataFrame({"path": paths, **dict(zip(_CHECK_KEYS, keys.T))})
        with contextlib.suppress(OSError):  # a cache that cannot be written costs the next launch a full check
            write_parquet(frame, self.path)
        self._changed = False


_CHECK_KEYS = ("size", "mtime_ns", "ctime_ns")


def _read_checks(path: Path | None) -> dict[str, tuple[int, int, int]]:
    if path is None or not path.is_file():
        return {}
    try:  # a cache of an earlier release (no ctime_ns column) fails here too: everything is checked once
        frame = pd.read_parquet(path, columns=["path", *_CHECK_KEYS])
        return dict(zip(frame["path"].astype(str), zip(*(frame[k].astype(np.int64).tolist() for k in _CHECK_KEYS))))
    except Exception:  # any damage (pyarrow raises several kinds): the cache is only ever a shortcut
        return {}


# Threads, not processes: cv2 decodes and file reads release the GIL, so a thread per CPU keeps the CPUs busy
# (2 CPUs, scripts/bench_data.py --check: threads matched or beat a forked 2-process pool), with no worker
# start-up and no fork of a launch process that may already run Ray's or OpenCV's threads. Chunks of 64 keep
# the pool's cost per task small. Ray tasks could spread a first check over a cluster, but one 2-CPU node
# already checks 100k photos in about 11 s, and a resume decodes only what changed.
_CHECK_WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_CHECK_CHUNK = 64


def _decode_failures(paths: list[str]) -> list[bool]:
    """Whether each file fails to decode (`_decodes`), on a thread per CPU."""
    if not paths:
        return []
    chunks = [paths[i:i + _CHECK_CHUNK] for i in range(0, len(paths), _CHECK_CHUNK)]
    with ThreadPoolExecutor(max_workers=min(_CHECK_WORKERS, len(chunks))) as pool:
        return [not ok for done in pool.map(_decode_chunk, chunks) for ok in done]


def _decode_chunk(paths: list[str]) -> list[bool]:
    return [_decodes(p) for p in paths]


def _decodes(path: str) -> bool:
    """Whether `path` decodes as training will decode it (`_imread`), at a fraction of the cost for a JPEG.

    A JPEG is decoded at 1/8 scale, and a sequential one with blank scans (`ensemble.data.jpeg`):
    libjpeg parses every marker segment, where a full decode's refusals come from (damaged entropy-coded
    data only makes it warn), and decodes a tenth to a fifteenth of the bytes: 0.15-0.18 ms per 640x480 photo
    at quality 90 against ~1 ms for a full decode (scripts/bench_data.py --check). A progressive JPEG gains ~10%.
    It refuses the same files as a full decode (tests/test_validation.py), and one it refuses is decoded in
    full before it counts as bad, so the check never refuses a file that training reads. PNG and the rest: in
    full, as before (a reduced decode of a PNG inflates the whole file anyway and is no faster).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return False
    if data[:2] == b"\xff\xd8" and _jpeg_decodes_reduced(data):
        return True
    return _imdecode(data) is not None  # PNG and the rest; a JPEG the reduced decode refused, confirmed in full


def _jpeg_decodes_reduced(data: bytes) -> bool:
    if not _has_jpeg_end(data):
        return False
    try:
        blank = with_blank_scans(data)  # None: progressive, or not cleanly parsed: the file itself, reduced
    except Exception:  # a damaged header the parse did not foresee: the file itself
        blank = None
    try:  # in colour: a grey decode skips the chroma upsampling, which refuses fractional sampling factors
        small = cv2.imdecode(np.frombuffer(data if blank is None else blank, np.uint8), cv2.IMREAD_REDUCED_COLOR_8)
    except cv2.error:
        return False
    # OpenCV refuses a full decode over its pixel limit (2^30 unless OPENCV_IO_MAX_IMAGE_PIXELS says otherwise),
    # which a 1/8 decode stays under: a picture that may be over 2^26 pixels is decoded in full, under OpenCV's rule.
    return small is not None and small.shape[0] * small.shape[1] * 64 <= 1 << 26


# --------------------------------------------------------------------------- decoding


# OpenCV >= 4.10 decodes straight to RGB: no separate full-size colour conversion per image.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _imread(path: str) -> np.ndarray | None:
    """RGB image or None."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return _imdecode(data)


def _has_jpeg_end(data: bytes) -> bool:
    """False for a JPEG without its end marker: OpenCV would decode a truncated file into a picture
    with a grey bottom, silently."""
    return data[:2] != b"\xff\xd8" or b"\xff\xd9" in data[-64:]


def _imdecode(data: bytes) -> np.ndarray | None:
    """An encoded image as RGB, or None when it does not decode (a truncated JPEG included)."""
    if not _has_jpeg_end(data):
        return None
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if img is not None and _IMREAD_RGB is None else img
    except cv2.error:
        return None


def decode_image(path: str) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; raises `BadImageError` when it cannot be decoded."""
    img = _imread(path)
    if img is None:
        raise BadImageError(path)
    return img


class BadImageError(UserError):
    def __init__(self, path: str):
        super().__init__(f"{path}: unreadable or corrupt image; fix or remove it, or set on_bad_image: skip.")
        self.path = path
