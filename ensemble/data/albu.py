"""Albumentations pipelines as train-time augmentation: checked once, seeded per sample, picklable.

A space's `augment` may be, instead of a chain of named views, an albumentations
pipeline in the library's own serialised form: the mapping `A.to_dict(transform)`
writes and `A.from_dict` reads (``{"__version__": ..., "transform": {...}}``),
inline or as a .json/.yaml file. The pipeline gets the preprocessed uint8 RGB
image and must give one back (the loader resizes it and normalises whole
batches itself), so `check_pipeline` refuses Normalize, ToFloat or ToTensorV2.

albumentations is imported only when a pipeline is used (`import
ensemble.data.loader` does not import it): `pip install 'ensemble[albumentations]'`.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ensemble.errors import UserError

INSTALL = "pip install 'ensemble[albumentations]'"
FILE_SUFFIXES = (".json", ".yaml", ".yml")
EXAMPLE = "{'__version__': '2.0.8', 'transform': {'__class_fullname__': 'Compose', 'p': 1.0, 'transforms': [...]}}"


@functools.lru_cache(maxsize=1)
def _albumentations():
    # albumentations asks PyPI for a newer version at import (up to 2 s offline, in every DataLoader worker).
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations
    except ImportError as e:
        raise UserError(f"An albumentations pipeline needs albumentations, which is not installed ({e}): "
                        f"{INSTALL}") from None
    return albumentations


def is_pipeline_file(value: Any) -> bool:
    """A string naming a .json/.yaml/.yml file: view specs never end so (op names have no dots)."""
    return isinstance(value, str) and value.lower().endswith(FILE_SUFFIXES)


def read_pipeline(path: str | os.PathLike) -> dict:
    """The mapping a pipeline file holds (JSON, or YAML as `A.save(..., data_format="yaml")` writes)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"the albumentations pipeline file {path} does not exist") from None
    except OSError as e:
        raise UserError(f"the albumentations pipeline file {path} cannot be read: {e.strerror or e}") from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise UserError(f"{path} is not valid {kind}: {str(e).splitlines()[0]}") from None


def check_pipeline(pipeline: Any) -> dict:
    """The pipeline as plain JSON values (tuples become lists, so it freezes to YAML and compares equal
    once read back), after checking albumentations builds it and each transform keeps a uint8 RGB image.

    Raises:
        UserError: the reason, for the caller to prefix with the file and key.
    """
    if not (isinstance(pipeline, dict) and "transform" in pipeline and set(pipeline) <= {"__version__", "transform"}):
        found = f"keys {list(pipeline)}" if isinstance(pipeline, dict) else repr(pipeline)
        raise UserError(f"an albumentations pipeline is the mapping A.to_dict writes, {EXAMPLE}; found {found}")
    pipeline = json.loads(json.dumps(pipeline))
    compose = _build(pipeline)
    offender = _offender(compose)
    if offender:
        raise UserError(offender)
    return pipeline


def _build(pipeline: dict):
    """A.from_dict(pipeline) as an A.Compose, every failure a UserError with albumentations' own reason."""
    A = _albumentations()
    from albumentations.core.serialization import SERIALIZABLE_REGISTRY, register_additional_transforms

    register_additional_transforms()  # ToTensorV2 and the like, as from_dict does
    _check_names(pipeline["transform"], "transform", SERIALIZABLE_REGISTRY, A.__version__)
    written = pipeline.get("__version__")
    hint = f" (written by albumentations {written}; {A.__version__} is installed)" if written not in (
        None, A.__version__) else ""
    try:
        transform = A.from_dict(pipeline)
    except Exception as e:  # pydantic's ValidationError (as a ValueError), a TypeError, ...
        where, name, e = _first_failure(pipeline["transform"], "transform", A) or ("transform", "", e)
        reason = "; ".join(line.strip() for line in str(e).splitlines()
                           if line.strip() and not line.strip().startswith("For further information"))
        raise UserError(f"'{where}'{f' ({name})' if name else ''}: albumentations {A.__version__} cannot build it"
                        f"{hint}: {type(e).__name__}: {reason}") from None
    for leaf in _leaves(transform, A):
        if getattr(leaf, "invalid_args", None):  # albumentations only warns, and drops them
            raise UserError(f"{type(leaf).__name__} has no argument(s) {leaf.invalid_args} in albumentations "
                            f"{A.__version__}{hint}: fix or remove them (albumentations itself only warns)")
    return transform if isinstance(transform, A.Compose) else A.Compose([transform])


def _check_names(node: Any, where: str, registry: dict, version: str) -> None:
    name = node.get("__class_fullname__") if isinstance(node, dict) else None
    if not isinstance(name, str):
        raise UserError(f"'{where}' must be a transform, a mapping with '__class_fullname__' (e.g. 'HorizontalFlip')"
                        f" and its arguments; found {node!r}")
    short = name.rsplit(".", 1)[-1] if name.startswith("albumentations.") else name
    if short == "Lambda":
        raise UserError(f"'{where}': Lambda holds Python functions, which a pipeline written as data cannot; "
                        "use named views with an op of your own instead (ensemble.data.views.register_view)")
    if short not in registry:
        close = difflib.get_close_matches(short, list(registry), 3)
        raise UserError(f"'{where}': albumentations {version} has no transform {name!r}."
                        f"{f' Did you mean {close}?' if close else ''}")
    children = node.get("transforms")
    if children is not None:
        if not isinstance(children, list):
            raise UserError(f"'{where}.transforms' must be a list of transforms; found {children!r}")
        for i, child in enumerate(children):
            _check_names(child, f"{where}.transforms[{i}]", registry, version)


def _first_failure(node: dict, where: str, A) -> tuple[str, str, Exception] | None:
    """(path, transform name, error) of the innermost transform A.from_dict cannot build: its error alone
    does not say which one it was."""
    for i, child in enumerate(node.get("transforms") or []):
        failure = _first_failure(child, f"{where}.transforms[{i}]", A)
        if failure:
            return failure
    try:
        A.from_dict({"transform": node})
    except Exception as e:
        return where, node["__class_fullname__"], e
    return None


def _leaves(transform, A) -> list:
    if isinstance(transform, A.BaseCompose):
        return [leaf for child in transform.transforms for leaf in _leaves(child, A)]
    return [transform]


def _offender(compose) -> str | None:
    """Why the pipeline does not keep a uint8 HxWx3 image: the first transform that does not, each run
    alone (forced) on a 64 x 64 probe; None when all do.

    A transform that raises on the probe is let through: it may need a larger image (a RandomCrop)
    than the probe, and any real failure comes with albumentations' own message at the first batch."""
    A = _albumentations()
    probe = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for leaf in _leaves(compose, A):
        try:
            out = leaf(image=probe.copy(), force_apply=True)["image"]
        except Exception:
            continue
        if not _is_image(out):
            name = type(leaf).__name__
            return (f"{name} turns a uint8 HxWx3 image into {_describe(out)}, but the pipeline must give back a "
                    f"uint8 HxWx3 RGB image (the loader resizes it and normalises whole batches itself, per "
                    f"data.normalize): remove {name}")
    return None


def _is_image(out: Any) -> bool:
    return isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def _describe(out: Any) -> str:
    shape = tuple(getattr(out, "shape", ()))
    return f"{type(out).__name__} {getattr(out, 'dtype', '')} {shape}".replace("  ", " ")


class Pipeline:
    """A train-time augmentation from an albumentations pipeline, called as `Augmentation` is.

    Picklable (DataLoader workers hold it): it pickles as its dict and is built again on the other side.
    """

    def __init__(self, pipeline: dict):
        self.pipeline = pipeline
        self.compose = _build(pipeline)
        self._py_random = random.Random()

    def __reduce__(self):
        return Pipeline, (self.pipeline,)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One augmented image; the same `rng` state always gives the same output, in any process.

        Every transform draws from `rng` (numpy; the noise transforms seed OpenCV's RNG from it) and
        from one `random.Random` seeded from it (albumentations decides whether a transform fires with
        Python's random): ~9 us a sample, where `set_random_seed` would build two generators per
        transform (~50 us for three).
        """
        self._py_random.seed(int(rng.integers(2**63)))
        self.compose.set_random_state(rng, self._py_random)
        out = self.compose(image=img)["image"]
        if not _is_image(out):
            reason = _offender(self.compose) or f"remove the transform that makes {_describe(out)}"
            raise ValueError(f"The albumentations pipeline returned {_describe(out)}, not the uint8 HxWx3 RGB "
                             f"image: {reason}.")
        return np.ascontiguousarray(out)


def create_pipeline(pipeline: dict | str | os.PathLike) -> Pipeline:
    """A `Pipeline` from the A.to_dict mapping or a .json/.yaml file of it, checked as a space's is."""
    return Pipeline(check_pipeline(read_pipeline(pipeline) if isinstance(pipeline, (str, os.PathLike)) else pipeline))
