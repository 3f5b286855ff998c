"""Named sweep spaces: load, validate, resolve and freeze `tune_spaces/NAME.yaml`.

`load_space` checks every key against the schema table (SCHEMA) and fills the
defaults; `resolve_models` turns a space into a fixed list of models (one
backbone + one param set each), sampling the searched params once with Ray
Tune's own domains; `freeze_space` / `check_frozen` keep a resumed sweep on
exactly the space it started with.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

import ensemble
from ensemble import views
from ensemble.data import BAD_IMAGE_POLICIES, FORMS, resolve_target
from ensemble.datasets import VARIANTS, demo_manifest
from ensemble.errors import UserError
from ensemble.io import write_text

STRATEGIES = ("stratified", "group", "stratified_group", "multilabel", "kfold")
# timm.scheduler.create_scheduler_v2's names (timm has no function that lists them).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "rsqrt", "constant", "none")
METRICS = ("loss", "log_loss", "accuracy", "f2", "map")
TASK_METRICS = {"multiclass": ("loss", "log_loss", "accuracy"), "multilabel": METRICS}
DEFAULT_METRIC = {"multiclass": "log_loss", "multilabel": "f2"}
DEMO_COLUMNS = {"multiclass": ("id", "image", "label"), "multilabel": ("id", "image", "tags"),
                "grouped": ("id", "image", "label", "group"), "test": ("id", "image")}
DOMAINS = {"grid": "[v1, v2, ...]", "choice": "[v1, v2, ...]", "uniform": "[low, high]", "loguniform": "[low, high]",
           "quniform": "[low, high, q]", "randint": "[low, high) (high excluded, as in Ray)"}
SIGNIFICANT_DIGITS = 4  # sampled floats are rounded, so ids and logs stay readable and stable
REPO_SPACES = Path(ensemble.__file__).resolve().parent.parent / "tune_spaces"
REQUIRED, OMIT = object(), object()  # defaults: the key must be given / stays absent unless given
# Keys a resumed run may change: they decide where folds run, never what they compute.
UNCHECKED = ("description", "resources", "max_concurrent")


# --------------------------------------------------------------------------- value checks
# A check returns the normalised value or raises ValueError(<what it accepts>);
# _Invalid carries a whole complaint instead.


class _Invalid(ValueError):
    pass


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string: take the number meant
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def _number(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    noun = "an integer" if kind is int else "a number"
    accepted = (f"{noun} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}" if hi is not None
                else f"{noun} {'>' if lo_open else '>='} {lo}" if lo is not None else noun)

    def check(value):
        value = _as_number(value)
        if value is None or (kind is int and not float(value).is_integer()):
            raise ValueError(accepted)
        value = kind(value)
        if (lo is not None and (value < lo or lo_open and value == lo)) or \
                (hi is not None and (value > hi or hi_open and value == hi)):
            raise ValueError(accepted)
        return value
    check.kind = kind.__name__  # which search domains fit the param
    return check


def _one_of(*choices):
    def check(value):
        if not any(value is c or isinstance(value, str) and value == c for c in choices):
            raise ValueError(f"one of {list(choices)}")
        return value
    return check


def _typed(kind: type, accepted: str):
    def check(value):
        if not isinstance(value, kind):
            raise ValueError(accepted)
        return value
    return check


def _optional(inner):
    def check(value):
        try:
            return None if value is None else inner(value)
        except _Invalid:
            raise
        except ValueError as e:
            raise ValueError(f"null or {e}") from None
    check.kind = getattr(inner, "kind", None)
    return check


def _strings(value, accepted="a non-empty list of distinct strings"):
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
            and len(set(value)) == len(value)):
        raise ValueError(accepted)
    return value


def _view_spec(role: str):
    """A views.py spec; preprocess and augment are one chain ('+' only), tta a list of chains."""
    def check(value):
        if not isinstance(value, str):
            raise ValueError(f"a view spec such as 'orig,hflip' (ops: {sorted(views.VIEWS)})")
        try:
            chains = views.parse_views(value)
        except UserError as e:
            raise _Invalid(str(e).rstrip(".")) from None
        if role != "tta" and len(chains) != 1:
            raise _Invalid(f"the {role} is one chain of ops joined by '+'; {value!r} has {len(chains)}")
        return value
    return check


def _normalize(value):
    if value in ("backbone", "dataset"):
        return value
    if isinstance(value, dict) and set(value) == {"mean", "std"} and \
            all(isinstance(v, list) and len(v) == 3 for v in value.values()):
        unit, positive = _number(float, 0, 1), _number(float, 0, lo_open=True)
        with contextlib.suppress(ValueError):
            return {"mean": [unit(v) for v in value["mean"]], "std": [positive(v) for v in value["std"]]}
    raise ValueError("'backbone', 'dataset' or {mean: [r, g, b], std: [r, g, b]} on the 0-1 scale")


def _gpu(value):
    value = _number(float, 0)(value)
    if value > 1 and not value.is_integer():
        raise ValueError("a number >= 0: a fraction below 1 (0.5 packs two workers on a GPU) or whole GPUs")
    return value


@functools.lru_cache(maxsize=1)
def _timm():
    import timm  # 3 s: only when a space is loaded, not on `import ensemble.spaces`
    import timm.optim
    return timm


def _timm_model(name):
    timm = _timm()
    if not isinstance(name, str):
        raise ValueError("a timm model name")
    # is_model ignores the pretrained tag ('resnet50.bogus'): a tagged name must be a listed one.
    if timm.is_model(name) and ("." not in name or name in timm.list_pretrained()):
        return name
    close = difflib.get_close_matches(name, timm.list_pretrained() if "." in name else timm.list_models(), 5, 0.5)
    raise _Invalid(f"Unknown backbone {name!r}: timm {timm.__version__} has no such model. "
                   f"Did you mean one of {close}? (timm.list_models('*part*') lists the names)")


def _backbones(value):
    return [_timm_model(name) for name in _strings(value, "a non-empty list of distinct timm model names")]


def _optimizer(value):
    known = _timm().optim.list_optimizers()
    if value not in known:
        close = difflib.get_close_matches(str(value), known, 3) or ["adamw", "sgd"]
        raise ValueError(f"a timm optimizer name (timm.optim.list_optimizers(), e.g. {close})")
    return value


def _weights(value):
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise ValueError("a mapping of backbone -> local .safetensors or .pth file")
    return value


def _domain(key: str, check: Callable):
    """A `search` value: exactly one Ray Tune domain whose values the param accepts."""
    def parse(value):
        if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAINS):
            raise ValueError("exactly one of " + ", ".join(f"{{{kind}: {form}}}" for kind, form in DOMAINS.items()))
        (kind, args), = value.items()
        if kind in ("grid", "choice"):
            if not (isinstance(args, list) and args):
                raise _Invalid(f"{kind} needs a non-empty list of values; found {args!r}")
            try:
                return {kind: [check(a) for a in args]}
            except ValueError as e:
                raise _Invalid(f"every {kind} value must be {e}; found {args!r}") from None
        fits = {"float": ("uniform", "loguniform", "quniform", "randint"), "int": ("randint",)}
        fits = fits.get(getattr(check, "kind", None), ())
        if kind not in fits:
            raise _Invalid(f"{kind} does not fit '{key}'; use one of {[*fits, 'choice', 'grid']}")
        nums = [_as_number(a) for a in args] if isinstance(args, list) else []
        if len(nums) != (3 if kind == "quniform" else 2) or None in nums or \
                kind == "randint" and not all(float(n).is_integer() for n in nums):
            raise _Invalid(f"{kind} needs {DOMAINS[kind]}; found {args!r}")
        if nums[0] >= nums[1] or kind == "loguniform" and nums[0] <= 0 or kind == "quniform" and nums[2] <= 0:
            need = {"loguniform": "0 < low < high", "quniform": "low < high and q > 0"}.get(kind, "low < high")
            raise _Invalid(f"{kind} needs {need}; found {nums}")
        try:
            check(nums[0]), check(nums[1] - 1 if kind == "randint" else nums[1])
        except ValueError as e:
            raise _Invalid(f"{kind} {args!r} leaves the values '{key}' accepts: {e}") from None
        return {kind: [int(n) if kind == "randint" else float(n) for n in nums]}
    return parse


# --------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Rule:
    default: Any
    check: Callable[[Any], Any]
    help: str = ""  # shown when a REQUIRED key is missing


_string, _bool = _typed(str, "a string"), _typed(bool, "true or false")
_positive = _number(float, 0, lo_open=True)
PARAMS = {
    "lr": Rule(1e-3, _positive),
    "batch_size": Rule(32, _number(int, 1)),
    "dropout": Rule(0.0, _number(float, 0, 1, hi_open=True)),
    "drop_path": Rule(0.0, _number(float, 0, 1, hi_open=True)),
    "optimizer": Rule("adamw", _optimizer),
    "weight_decay": Rule(0.01, _number(float, 0)),
    "momentum": Rule(0.9, _number(float, 0, 1)),
    "scheduler": Rule("cosine", _one_of(*SCHEDULERS)),
    "warmup_epochs": Rule(0, _number(int, 0)),
    "label_smoothing": Rule(0.0, _number(float, 0, 1, hi_open=True)),
    "pos_weight": Rule(None, _one_of(None, "auto")),
    "image_size": Rule(224, _number(int, 8)),
    "amp": Rule(True, _bool),
}
STAGE = {
    "epochs": Rule(REQUIRED, _number(int, 1), "an integer >= 1"),
    "freeze": Rule(False, _bool),
    "lr_scale": Rule(1.0, _positive),
    "augment": Rule(None, _optional(_view_spec("augment"))),  # null: data.augment
    "preprocess": Rule(None, _optional(_view_spec("preprocess"))),  # null: data.preprocess
}
# A dict is a section, a one-item list a list of sections, a Rule one value.
SCHEMA = {
    "description": Rule("", _string),
    "data": {
        "manifest": Rule(REQUIRED, _string, "a CSV/Parquet path, or demo:multiclass / demo:multilabel / demo:grouped"),
        "root": Rule(None, _optional(_string)),
        "test_manifest": Rule(None, _optional(_string)),
        "target": {"form": Rule(None, _optional(_one_of(*FORMS))), "column": Rule(None, _optional(_string)),
                   "maybe_weight": Rule(0.5, _number(float, 0, 1))},
        "classes": Rule(None, _optional(_strings)),
        "on_bad_image": Rule("raise", _one_of(*BAD_IMAGE_POLICIES)),
        "check_images": Rule("decode", _one_of("decode", "exists", "none")),
        "preprocess": Rule("pad", _view_spec("preprocess")),
        "augment": Rule("hflip", _view_spec("augment")),
        "tta": Rule("orig,hflip", _view_spec("tta")),
        "normalize": Rule("backbone", _normalize),
        "cache": Rule(True, _bool),
    },
    "folds": {"k": Rule(5, _number(int, 2)), "strategy": Rule(None, _optional(_one_of(*STRATEGIES))),
              "seed": Rule(0, _number(int))},
    "backbones": Rule(REQUIRED, _backbones, "a non-empty list of timm model names"),
    "weights": Rule({}, _weights),
    "pretrained": Rule(False, _bool),
    "params": PARAMS,
    "search": {key: Rule(OMIT, _domain(key, rule.check)) for key, rule in PARAMS.items()},
    "epochs": Rule(None, _optional(_number(int, 1))),  # resolved: the stages' sum (10 without stages)
    "stages": [STAGE],
    "metric": Rule(None, _optional(_one_of(*METRICS))),
    "mode": Rule(None, _optional(_one_of("min", "max"))),
    "scheduler": {"type": Rule("none", _one_of("none", "asha")), "grace_period": Rule(1, _number(int, 1)),
                  "reduction_factor": Rule(2.0, _number(float, 1, lo_open=True))},
    "early_stopping": {"patience": Rule(0, _number(int, 0))},
    "num_samples": Rule(1, _number(int, 1)),
    "max_failures": Rule(2, _number(int, 0)),
    "resources": {"cpu": Rule(1.0, _positive), "gpu": Rule(0.0, _gpu)},
    "max_concurrent": Rule(None, _optional(_number(int, 1))),
    "seed": Rule(0, _number(int)),
    "smoke": {"backbone": Rule("test_resnet", _timm_model), "image_size": Rule(32, _number(int, 8)),
              "epochs": Rule(1, _number(int, 1)), "max_rows": Rule(400, _optional(_number(int, 1))),
              "batch_size": Rule(16, _number(int, 1))},
}


def _walk(schema: dict, given: Any, path: str, file: str) -> dict:
    """Check `given` against a schema section; return it with every default filled in."""
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise UserError(f"{file}: '{path}' must be a mapping with keys {list(schema)}; found {given!r}.")
    for key in given:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), 1)
            homes = [name for name, sub in schema.items() if isinstance(sub, dict) and key in sub]
            hint = f" Did you mean {close[0]!r}?" if close else f" It belongs in {' or '.join(homes)}." if homes else ""
            raise UserError(f"{file}: unknown key {key!r} {f'in {path!r}' if path else 'at top level'}.{hint} "
                            f"Allowed: {list(schema)}.")
    out = {}
    for key, rule in schema.items():
        here, value = f"{path}.{key}" if path else key, given.get(key)
        if isinstance(rule, dict):
            out[key] = _walk(rule, value, here, file)
        elif isinstance(rule, list):
            if value is not None and not (isinstance(value, list) and value):
                raise UserError(f"{file}: '{here}' must be a non-empty list of mappings; found {value!r}.")
            out[key] = value and [_walk(rule[0], item, f"{here}[{i}]", file) for i, item in enumerate(value)]
        elif key not in given:
            if rule.default is REQUIRED:
                raise UserError(f"{file}: missing required key '{here}': {rule.help}.")
            if rule.default is not OMIT:
                out[key] = copy.deepcopy(rule.default)
        else:
            try:
                out[key] = rule.check(value)
            except _Invalid as e:
                text = str(e).rstrip(".") + ("" if str(e).endswith("?") else ".")
                raise UserError(f"{file}: '{here}': {text}") from None
            except ValueError as e:
                raise UserError(f"{file}: '{here}' must be {e}; found {value!r}.") from None
    return out


# --------------------------------------------------------------------------- keys that depend on other keys


def _resolve(raw: dict, given: dict, file: str, folder: Path) -> dict:
    def fail(message):
        raise UserError(f"{file}: {message}")

    data, folds, params = raw["data"], raw["folds"], raw["params"]
    for key in ("manifest", "test_manifest", "root"):
        data[key] = _resolve_path(data[key], f"data.{key}", folder, fail)
    if data["root"] is None and not data["manifest"].startswith("demo:"):
        data["root"] = str(Path(data["manifest"]).parent)
    columns = _manifest_columns(data["manifest"])
    data["target"] = _resolve_target(data, columns, fail)
    task = "multilabel" if data["target"]["form"] == "tags" else "multiclass"

    folds["strategy"] = folds["strategy"] or ("multilabel" if task == "multilabel" else "stratified")
    if (folds["strategy"], task) in (("multilabel", "multiclass"), ("stratified", "multilabel")):
        fail(f"'folds.strategy' {folds['strategy']} does not fit a {task} target; "
             f"use {'multilabel' if task == 'multilabel' else 'stratified'!r}.")
    if "group" in folds["strategy"] and columns is not None and "group" not in columns:
        fail(f"'folds.strategy' {folds['strategy']} needs a 'group' column; {data['manifest']} has {list(columns)}"
             f"{' (demo:grouped has one)' if data['manifest'].startswith('demo:') else ''}.")

    for key, path in raw["weights"].items():
        if key not in raw["backbones"]:
            fail(f"'weights.{key}': {key!r} is not one of the backbones {raw['backbones']}.")
        raw["weights"][key] = _resolve_path(path, f"weights.{key}", folder, fail)
        if Path(path).suffix not in (".safetensors", ".pth", ".pt") or not Path(raw["weights"][key]).is_file():
            fail(f"'weights.{key}' must be an existing .safetensors or .pth file; found {raw['weights'][key]!r}.")
    if raw["weights"] and not raw["pretrained"]:
        fail("'weights' are given but 'pretrained' is false; set pretrained: true to load them.")
    if set(given.get("params") or {}) & set(raw["search"]):
        fail(f"{sorted(set(given['params']) & set(raw['search']))} in both 'params' and 'search'; keep one.")
    raw["params"] = {k: v for k, v in params.items() if k not in raw["search"]}  # the fixed ones
    if task == "multiclass" and params["pos_weight"] is not None:
        fail("'params.pos_weight' is for multilabel targets (data.target.form: tags); set it to null.")

    stages = raw["stages"] or [{"epochs": raw["epochs"] or 10, "freeze": False, "lr_scale": 1.0,
                                "augment": None, "preprocess": None}]
    total = sum(stage["epochs"] for stage in stages)
    if raw["epochs"] not in (None, total):
        fail(f"'epochs' is {raw['epochs']} but the stages add up to {total}; drop 'epochs'.")
    for stage in stages:
        for key in ("augment", "preprocess"):
            stage[key] = stage[key] or data[key]
    raw["stages"], raw["epochs"] = stages, total

    metric = raw["metric"] = raw["metric"] or DEFAULT_METRIC[task]
    if metric not in TASK_METRICS[task]:
        fail(f"'metric' {metric} needs a multilabel target (data.target.form: tags); "
             f"for this {task} target use one of {list(TASK_METRICS[task])}.")
    mode = "min" if metric in ("loss", "log_loss") else "max"
    if raw["mode"] not in (None, mode):
        fail(f"'mode' {raw['mode']} would pick the worst {metric}; use {mode!r} or drop 'mode'.")
    raw["mode"] = mode
    if raw["scheduler"]["type"] == "asha" and raw["scheduler"]["grace_period"] > total:
        fail(f"'scheduler.grace_period' {raw['scheduler']['grace_period']} is more than the {total} epochs.")
    return raw


def _resolve_path(value: str | None, key: str, folder: Path, fail: Callable) -> str | None:
    """A relative path is relative to the space file's folder; demo:* names are kept."""
    if value is None or not value.startswith("demo:"):
        return value and str((folder / Path(value).expanduser()).resolve())
    allowed = {"data.manifest": VARIANTS, "data.test_manifest": ("test",)}.get(key, ())
    if value[5:] not in allowed:
        fail(f"'{key}' {value!r} is no embedded demo data; use a file path or one of {[f'demo:{v}' for v in allowed]}.")
    return value


def _manifest_columns(manifest: str) -> tuple[str, ...] | None:
    """The manifest's columns from its header alone; None while it does not exist."""
    if manifest.startswith("demo:"):
        return DEMO_COLUMNS[manifest[5:]]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        if Path(manifest).suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq
            return tuple(pq.read_schema(manifest).names)
        with open(manifest, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            return tuple(next(csv.reader(f)))
    return None


def _resolve_target(data: dict, columns: tuple[str, ...] | None, fail: Callable) -> dict:
    form, column, maybe_weight = data["target"].values()
    if form is None and column is None and columns is None:
        fail(f"cannot infer 'data.target': {data['manifest']} does not exist (yet). "
             f"Set data.target.form ({' / '.join(FORMS)}) or create the manifest.")
    try:
        target = resolve_target(columns or (), form, column, maybe_weight, source=data["manifest"])
    except UserError as e:
        fail(f"'data.target': {e}")
    if columns is not None and target.column not in columns:
        fail(f"'data.target.column' {target.column!r} is not a column of {data['manifest']}: {list(columns)}.")
    return target.to_dict()


# --------------------------------------------------------------------------- the space


class Section(dict):
    """A resolved section of a space: a dict whose keys read as attributes too (`space.folds.k`)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _section(value):
    if isinstance(value, dict):
        return Section({k: _section(v) for k, v in value.items()})
    return [_section(v) for v in value] if isinstance(value, list) else value


@dataclass(frozen=True)
class Space:
    """A validated space, every default resolved; `raw` holds the same as plain nested dicts."""

    name: str
    path: Path
    description: str
    data: Section  # manifest, root, test_manifest, target {form, column, maybe_weight}, classes, on_bad_image,
    #                check_images, preprocess, augment, tta, normalize, cache
    folds: Section  # k, strategy, seed
    backbones: list[str]
    weights: Section  # backbone -> absolute weight file path
    pretrained: bool
    params: Section  # every param not in `search`, defaults filled
    search: Section  # searched param -> {domain: args}
    epochs: int  # the stages' sum
    stages: list[Section]  # epochs, freeze, lr_scale, augment, preprocess: always at least one
    metric: str
    mode: str
    scheduler: Section  # type, grace_period, reduction_factor
    early_stopping: Section  # patience
    num_samples: int
    max_failures: int
    resources: Section  # cpu, gpu
    max_concurrent: int | None
    seed: int
    smoke: Section  # backbone, image_size, epochs, max_rows, batch_size
    raw: dict = field(repr=False)

    @property
    def task(self) -> str:
        return "multilabel" if self.data.target.form == "tags" else "multiclass"

    @property
    def manifest_path(self) -> Path:
        """The training manifest (demo:* data is exported on first use)."""
        return _data_path(self.data.manifest)

    @property
    def test_manifest_path(self) -> Path | None:
        return _data_path(self.data.test_manifest) if self.data.test_manifest else None

    @property
    def root_path(self) -> Path:
        return Path(self.data.root) if self.data.root else self.manifest_path.parent


def _data_path(value: str) -> Path:
    return demo_manifest(value[5:]) if value.startswith("demo:") else Path(value)


def _space(name: str, path: Path, raw: dict) -> Space:
    return Space(name=name, path=Path(path), raw=raw, **{k: _section(v) for k, v in raw.items()})


def find_space(name_or_path: str) -> Path:
    """An existing .yaml path, else ./tune_spaces/NAME.yaml, else the repo's tune_spaces/NAME.yaml."""
    given = Path(name_or_path).expanduser()
    if given.suffix in (".yaml", ".yml") and given.is_file():
        return given
    name = given.stem if given.suffix in (".yaml", ".yml") else str(name_or_path)
    folders = list(dict.fromkeys([Path.cwd() / "tune_spaces", REPO_SPACES]))
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    available = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
    close = difflib.get_close_matches(name, available, 1, 0.4)
    raise UserError(f"No space {name_or_path!r}: not a .yaml file, nor NAME.yaml in {[str(f) for f in folders]}."
                    f"{f' Did you mean {close[0]!r}?' if close else ''} Available spaces: {available}.")


def load_space(name_or_path: str) -> Space:
    """Find, parse and validate a space file and fill its defaults."""
    path = find_space(name_or_path).resolve()
    file = str(path)
    with contextlib.suppress(ValueError):
        file = str(path.relative_to(Path.cwd()))  # messages name the file as the user sees it
    try:
        given = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise UserError(f"{file}:{mark.line + 1}: YAML syntax error at line {mark.line + 1}, column "
                        f"{mark.column + 1}: {e.problem or e.context}.") from None
    except yaml.YAMLError as e:
        raise UserError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(given, dict):
        raise UserError(f"{file}: a space file is a mapping with keys {list(SCHEMA)}; found {given!r}.")
    raw = _resolve(_walk(SCHEMA, given, "", file), given, file, path.parent)
    return _space(path.stem, path, raw)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One model: a backbone and one param set, trained on every fold."""

    model_id: str
    backbone: str
    params: dict  # space.params + this model's searched values
    searched: dict = field(default_factory=dict)  # the searched values alone


def model_id(backbone: str, params: dict) -> str:
    """`<backbone>-<8 hex of the sha1 of the params' canonical JSON>`."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{backbone}-{digest[:8]}"


def _rng(seed: int, backbone: str, key: str):
    import numpy as np
    # One stream per (backbone, param): adding a backbone or a searched param leaves the other draws alone.
    digest = hashlib.sha1(f"{seed}/{backbone}/{key}".encode()).digest()
    return np.random.RandomState(int.from_bytes(digest[:4], "little"))


def _plain(value):
    value = value.item() if hasattr(value, "item") else value  # numpy scalar -> Python
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if isinstance(value, float) else value


def resolve_models(space: Space) -> list[ModelSpec]:
    """Every model of the sweep, ordered by backbone, then sample, then grid combination.

    As in Ray Tune with `grid_search` and `num_samples`, each backbone gets
    num_samples x (grid combinations) models and each draws its own sampled
    values, from Ray Tune's domains, once, from `space.seed`. A repeated
    param set (a `choice` drawn twice) is kept once.
    """
    from ray import tune  # here only: sampling is the one thing this module needs Ray for

    search = space.raw["search"]
    grid_keys = sorted(k for k, domain in search.items() if "grid" in domain)
    sampled_keys = sorted(set(search) - set(grid_keys))
    combos = list(itertools.product(*(search[k]["grid"] for k in grid_keys)))
    n = space.num_samples * len(combos)
    models: dict[str, ModelSpec] = {}
    for backbone in space.backbones:
        draws = {}
        for key in sampled_keys:
            (kind, args), = search[key].items()
            domain = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
            rng = _rng(space.seed, backbone, key)
            draws[key] = [_plain(domain.sample(random_state=rng)) for _ in range(n)]
        for i in range(n):
            searched = dict(zip(grid_keys, combos[i % len(combos)])) | {k: draws[k][i] for k in sampled_keys}
            params = {**space.raw["params"], **searched}
            key = model_id(backbone, params)
            models.setdefault(key, ModelSpec(key, backbone, params, searched))
    return list(models.values())


@functools.lru_cache(maxsize=None)
def _n_params(backbone: str) -> int:
    import torch
    with torch.device("meta"):  # no memory and no weights: pnasnet5large counts in 0.15 s
        return sum(p.numel() for p in _timm().create_model(backbone, num_classes=0).parameters())


def apply_smoke(space: Space) -> Space:
    """The space shrunk to run in seconds, per its `smoke` section; smoke.max_rows is the caller's to apply."""
    raw, smoke = copy.deepcopy(space.raw), space.raw["smoke"]
    stand_in = smoke["backbone"]
    raw["backbones"] = list(dict.fromkeys(
        stand_in if _n_params(b) > _n_params(stand_in) else b for b in raw["backbones"]))
    raw["weights"], raw["pretrained"] = {}, False  # smoke runs stay offline: they test the pipeline
    raw["params"].update(image_size=smoke["image_size"], batch_size=smoke["batch_size"])  # search's are dropped
    raw["stages"] = [dict(stage, epochs=smoke["epochs"]) for stage in raw["stages"][:2]]
    raw["epochs"] = sum(stage["epochs"] for stage in raw["stages"])
    raw["scheduler"]["grace_period"] = min(raw["scheduler"]["grace_period"], raw["epochs"])
    raw["folds"]["k"], raw["num_samples"] = min(raw["folds"]["k"], 3), 1
    raw["search"] = {k: {"grid": d["grid"][:1]} if "grid" in d else d
                     for k, d in raw["search"].items() if k not in ("image_size", "batch_size")}
    return _space(space.name, space.path, raw)


def with_resources(space: Space, *, cpu: float | None = None, gpu: float | None = None) -> Space:
    """The space with resources.cpu / resources.gpu overridden (e.g. by a CLI flag), checked as in a file."""
    raw = copy.deepcopy(space.raw)
    for key, value in (("cpu", cpu), ("gpu", gpu)):
        if value is not None:
            try:
                raw["resources"][key] = SCHEMA["resources"][key].check(value)
            except ValueError as e:
                raise UserError(f"The resources.{key} override must be {e}; found {value!r}.") from None
    return _space(space.name, space.path, raw)


# --------------------------------------------------------------------------- freezing


def freeze_space(space: Space, run_dir: Path) -> None:
    """Write run_dir/space.yaml (the resolved space) atomically, unless it exists."""
    target = Path(run_dir) / "space.yaml"
    if not target.exists():
        header = (f"# Space {space.name!r} ({space.path}), resolved and frozen at this run's first launch.\n"
                  "# A resumed run must use the same space (the description aside). This file loads as a space.\n")
        write_text(header + yaml.safe_dump(space.raw, sort_keys=False), target)


def _diff(old: Any, new: Any, path: str = ""):
    """(key path, old, new) for every differing leaf; lists of mappings are compared item by item."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _diff(old.get(key, OMIT), new.get(key, OMIT), f"{path}.{key}" if path else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and \
            any(isinstance(v, dict) for v in old + new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from _diff(a, b, f"{path}[{i}]")
    elif old != new or isinstance(old, bool) != isinstance(new, bool):  # True == 1 in Python
        yield path, old, new


def _fmt(value: Any) -> str:
    if value is OMIT:
        return "(absent)"
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def check_frozen(space: Space, run_dir: Path) -> None:
    """Raise a UserError naming every changed key when run_dir/space.yaml differs from `space`."""
    frozen_path = Path(run_dir) / "space.yaml"
    if not frozen_path.exists():
        return
    try:
        frozen = yaml.safe_load(frozen_path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{frozen_path}: the frozen space cannot be read ({e}); use a new --name.") from None
    changes = [f"{key}: {_fmt(old)} -> {_fmt(new)}" for key, old, new in _diff(frozen, space.raw)
               if key.split(".")[0] not in UNCHECKED]
    if changes:
        raise UserError(f"{frozen_path}: this run started with a different space than {space.name!r} is now; "
                        f"changed: {'; '.join(changes)}. A run keeps its space: use a new --name, "
                        "or restore the old space file.")
