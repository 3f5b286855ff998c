"""Named sweep spaces: load, validate, resolve and freeze `tune_spaces/NAME.yaml`.

A space names one sweep's data, folds, backbones and params (fixed and
searched). `load_space` checks every key against the schema table below and
fills the defaults; `resolve_models` turns a space into a fixed list of models
(one backbone + one param set each), sampling the searched params once with
Ray Tune's own domains; `freeze_space` / `check_frozen` keep a resumed sweep
on exactly the space it started with.

    space = load_space("demo")
    for model in resolve_models(space):
        ...  # model.model_id, model.backbone, model.params
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
from collections.abc import Mapping
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
# timm.scheduler.create_scheduler_v2's names (timm has no list function for them).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "rsqrt", "constant", "none")
METRICS = ("loss", "log_loss", "accuracy", "f2", "map")
TASK_METRICS = {"multiclass": ("loss", "log_loss", "accuracy"), "multilabel": METRICS}
DEFAULT_METRIC = {"multiclass": "log_loss", "multilabel": "f2"}
DEMO_COLUMNS = {"multiclass": ("id", "image", "label"), "multilabel": ("id", "image", "tags"),
                "grouped": ("id", "image", "label", "group"), "test": ("id", "image")}
DOMAINS = {"grid": "[v1, v2, ...]", "choice": "[v1, v2, ...]", "uniform": "[low, high]",
           "loguniform": "[low, high]", "quniform": "[low, high, q]", "randint": "[low, high) (high excluded, as in Ray)"}
SIGNIFICANT_DIGITS = 4  # sampled floats are rounded so model ids and logs stay readable and stable
REPO_SPACES = Path(ensemble.__file__).resolve().parent.parent / "tune_spaces"
REQUIRED, OMIT = object(), object()  # Rule defaults: the key must be given / stays absent when not given
_UNCHECKED = ("description",)  # keys a resumed run may change


# --------------------------------------------------------------------------- value checks
# A check returns the normalised value or raises ValueError(<what is accepted>);
# _Invalid carries a complete complaint instead.


class _Invalid(ValueError):
    pass


def _as_number(value: Any) -> float | int | None:
    # YAML 1.1 reads `1e-4` (no dot) as a string: accept it as the number everyone means.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _number(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    noun = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        accepted = f"{noun} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    else:
        accepted = f"{noun} {'>' if lo_open else '>='} {lo}" if lo is not None else noun

    def check(value):
        value = _as_number(value)
        if value is None or (kind is int and not float(value).is_integer()):
            raise ValueError(accepted)
        value = kind(value)
        if lo is not None and (value < lo or (lo_open and value == lo)) or \
                hi is not None and (value > hi or (hi_open and value == hi)):
            raise ValueError(accepted)
        return value

    check.kind = kind.__name__
    return check


def _one_of(*choices):
    def check(value):
        if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
            raise ValueError(f"one of {list(choices)}")
        return value
    return check


def _optional(inner):
    def check(value):
        if value is None:
            return None
        try:
            return inner(value)
        except _Invalid:
            raise
        except ValueError as e:
            raise ValueError(f"null or {e}") from None
    check.kind = getattr(inner, "kind", None)
    return check


def _boolean(value):
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _string(value):
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _text(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a non-empty string")
    return value


def _strings(value, what="a non-empty list of distinct strings"):
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
            and len(set(value)) == len(value)):
        raise ValueError(what)
    return list(value)


def _view_spec(role: str):
    """data.preprocess / augment are one chain of ops; tta is a list of chains."""
    def check(value):
        if not isinstance(value, str):
            raise ValueError("a view spec string such as 'orig,hflip' (ops: " + ", ".join(sorted(views.VIEWS)) + ")")
        try:
            chains = views.parse_views(value)
        except UserError as e:
            raise _Invalid(str(e)) from None
        if role != "tta" and len(chains) != 1:
            raise _Invalid(f"the {role} is one chain of ops joined by '+'; {value!r} has {len(chains)} chains")
        return value
    return check


def _normalize(value):
    accepted = "'backbone', 'dataset' or {mean: [r, g, b], std: [r, g, b]} on the 0-1 scale, std > 0"
    if value in ("backbone", "dataset"):
        return value
    unit, positive = _number(float, 0, 1), _number(float, 0, lo_open=True)
    if not (isinstance(value, dict) and set(value) == {"mean", "std"}
            and all(isinstance(v, list) and len(v) == 3 for v in value.values())):
        raise ValueError(accepted)
    try:
        return {"mean": [unit(v) for v in value["mean"]], "std": [positive(v) for v in value["std"]]}
    except ValueError:
        raise ValueError(accepted) from None


def _gpu(value):
    value = _number(float, 0)(value)
    if value > 1 and not value.is_integer():
        raise ValueError("a number >= 0: a fraction below 1 (0.5 packs two workers on a GPU) or whole GPUs")
    return value


@functools.lru_cache(maxsize=1)
def _timm():
    import timm  # 3-4 s: only when a space is loaded, never on `import ensemble.spaces`
    import timm.optim
    return timm


def _timm_model(name):
    timm = _timm()
    if not isinstance(name, str):
        raise ValueError("a timm model name")
    # is_model ignores a pretrained tag ('resnet50.bogus'), so tagged names must be listed pretrained.
    if timm.is_model(name) and ("." not in name or name in timm.list_pretrained()):
        return name
    pool = timm.list_pretrained() if "." in name else timm.list_models()
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
    raise _Invalid(f"Unknown backbone {name!r}: timm {timm.__version__} has no such model. "
                   f"Did you mean one of {close}? (timm.list_models('*part*') lists names)")


def _backbones(value):
    return [_timm_model(name) for name in _strings(value, "a non-empty list of distinct timm model names")]


def _optimizer(value):
    known = _timm().optim.list_optimizers()
    if value not in known:
        close = difflib.get_close_matches(str(value), known, n=3)
        raise ValueError(f"a timm optimizer name (timm.optim.list_optimizers(), e.g. {close or ['adamw', 'sgd']})")
    return value


def _weights(value):
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise ValueError("a mapping of backbone name -> local .safetensors or .pth file")
    return dict(value)


def _domain(key: str, check: Callable):
    """A `search` value: exactly one Ray Tune domain, with values the param accepts."""
    accepted = "exactly one of " + ", ".join(f"{{{kind}: {form}}}" for kind, form in DOMAINS.items())

    def parse(value):
        if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAINS):
            raise ValueError(accepted)
        (kind, args), = value.items()
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise _Invalid(f"{kind} needs a non-empty list of values; found {args!r}")
            try:
                return {kind: [check(a) for a in args]}
            except ValueError as e:
                raise _Invalid(f"every {kind} value must be {e}; found {args!r}") from None
        allowed = {"float": ("uniform", "loguniform", "quniform", "randint"), "int": ("randint",)}
        fits = allowed.get(getattr(check, "kind", None), ())
        if kind not in fits:
            raise _Invalid(f"{kind} does not fit '{key}'; use one of {list(fits) + ['choice', 'grid']}")
        numbers = [_as_number(a) for a in args] if isinstance(args, list) else []
        if len(numbers) != (3 if kind == "quniform" else 2) or None in numbers \
                or (kind == "randint" and not all(float(n).is_integer() for n in numbers)):
            raise _Invalid(f"{kind} needs {DOMAINS[kind]}; found {args!r}")
        low, high = numbers[:2]
        if low >= high or (kind == "loguniform" and low <= 0) or (kind == "quniform" and numbers[2] <= 0):
            need = "0 < low < high" if kind == "loguniform" else "low < high" + (" and q > 0" if kind == "quniform" else "")
            raise _Invalid(f"{kind} needs {need}; found {args!r}")
        try:
            check(low), check(high - 1 if kind == "randint" else high)
        except ValueError as e:
            raise _Invalid(f"{kind} range {args!r} leaves what '{key}' accepts: {e}") from None
        return {kind: [int(n) for n in numbers] if kind == "randint" else [float(n) for n in numbers]}
    return parse


# --------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Rule:
    default: Any
    check: Callable[[Any], Any]
    help: str = ""  # shown when a REQUIRED key is missing


PARAMS = {
    "lr": Rule(1e-3, _number(float, 0, lo_open=True)),
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
    "amp": Rule(True, _boolean),
}
STAGE = {
    "epochs": Rule(REQUIRED, _number(int, 1), "an integer >= 1"),
    "freeze": Rule(False, _boolean),
    "lr_scale": Rule(1.0, _number(float, 0, lo_open=True)),
    "augment": Rule(None, _optional(_view_spec("augment"))),  # null: data.augment
    "preprocess": Rule(None, _optional(_view_spec("preprocess"))),  # null: data.preprocess
}
# A dict is a section, a one-item list a list of sections, a Rule one value.
SCHEMA = {
    "description": Rule("", _string),
    "data": {
        "manifest": Rule(REQUIRED, _text, "a CSV/Parquet path, or demo:multiclass / demo:multilabel / demo:grouped"),
        "root": Rule(None, _optional(_text)),
        "test_manifest": Rule(None, _optional(_text)),
        "target": {"form": Rule(None, _optional(_one_of(*FORMS))), "column": Rule(None, _optional(_text)),
                   "maybe_weight": Rule(0.5, _number(float, 0, 1))},
        "classes": Rule(None, _optional(_strings)),
        "on_bad_image": Rule("raise", _one_of(*BAD_IMAGE_POLICIES)),
        "check_images": Rule("decode", _one_of("decode", "exists", "none")),
        "preprocess": Rule("pad", _view_spec("preprocess")),
        "augment": Rule("hflip", _view_spec("augment")),
        "tta": Rule("orig,hflip", _view_spec("tta")),
        "normalize": Rule("backbone", _normalize),
        "cache": Rule(True, _boolean),
    },
    "folds": {"k": Rule(5, _number(int, 2)), "strategy": Rule(None, _optional(_one_of(*STRATEGIES))),
              "seed": Rule(0, _number(int))},
    "backbones": Rule(REQUIRED, _backbones, "a non-empty list of timm model names"),
    "weights": Rule({}, _weights),
    "pretrained": Rule(False, _boolean),
    "params": PARAMS,
    "search": {key: Rule(OMIT, _domain(key, rule.check)) for key, rule in PARAMS.items()},
    "epochs": Rule(None, _optional(_number(int, 1))),  # resolved: 10, or the stages' sum
    "stages": [STAGE],
    "metric": Rule(None, _optional(_one_of(*METRICS))),
    "mode": Rule(None, _optional(_one_of("min", "max"))),
    "scheduler": {"type": Rule("none", _one_of("none", "asha")), "grace_period": Rule(1, _number(int, 1)),
                  "reduction_factor": Rule(2.0, _number(float, 1, lo_open=True))},
    "early_stopping": {"patience": Rule(0, _number(int, 0))},
    "num_samples": Rule(1, _number(int, 1)),
    "max_failures": Rule(2, _number(int, 0)),
    "resources": {"cpu": Rule(1.0, _number(float, 0, lo_open=True)), "gpu": Rule(0.0, _gpu)},
    "max_concurrent": Rule(None, _optional(_number(int, 1))),
    "seed": Rule(0, _number(int)),
    "smoke": {"backbone": Rule("test_resnet", _timm_model), "image_size": Rule(32, _number(int, 8)),
              "epochs": Rule(1, _number(int, 1)), "max_rows": Rule(400, _optional(_number(int, 1))),
              "batch_size": Rule(16, _number(int, 1))},
}


def _walk(schema: dict, given: Any, path: str, file: str) -> dict:
    """Check `given` against a schema section; return it with every default filled in."""
    where = f"in '{path}'" if path else "at top level"
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise UserError(f"{file}: '{path}' must be a mapping with keys {list(schema)}; found {given!r}.")
    for key in given:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{file}: unknown key {key!r} {where}.{hint} Allowed: {list(schema)}.")
    out = {}
    for key, rule in schema.items():
        here, value = f"{path}.{key}" if path else key, given.get(key)
        if isinstance(rule, dict):
            out[key] = _walk(rule, value, here, file)
        elif isinstance(rule, list):
            if value is not None and not (isinstance(value, list) and value):
                raise UserError(f"{file}: '{here}' must be a non-empty list of mappings with keys {list(rule[0])}; "
                                f"found {value!r}.")
            out[key] = None if value is None else [_walk(rule[0], v, f"{here}[{i}]", file) for i, v in enumerate(value)]
        elif key not in given:
            if rule.default is REQUIRED:
                raise UserError(f"{file}: missing required key '{here}': {rule.help}.")
            if rule.default is not OMIT:
                out[key] = copy.deepcopy(rule.default)
        else:
            try:
                out[key] = rule.check(value)
            except _Invalid as e:
                raise UserError(f"{file}: '{here}': {e}.") from None
            except ValueError as e:
                raise UserError(f"{file}: '{here}' must be {e}; found {value!r}.") from None
    return out


# --------------------------------------------------------------------------- cross-key rules


def _resolve(raw: dict, given: dict, file: str, folder: Path) -> dict:
    """Resolve paths and defaults that depend on other keys, and check keys against each other."""
    data = raw["data"]
    for key in ("manifest", "test_manifest", "root"):
        data[key] = _resolve_path(data[key], key, folder, file)
    if data["root"] is None and not data["manifest"].startswith("demo:"):
        data["root"] = str(Path(data["manifest"]).parent)
    columns = _manifest_columns(data["manifest"])
    data["target"] = _resolve_target(data, columns, file)
    task = "multilabel" if data["target"]["form"] == "tags" else "multiclass"

    folds = raw["folds"]
    folds["strategy"] = folds["strategy"] or ("multilabel" if task == "multilabel" else "stratified")
    if (folds["strategy"], task) in (("multilabel", "multiclass"), ("stratified", "multilabel")):
        fit = "multilabel" if task == "multilabel" else "stratified"
        raise UserError(f"{file}: 'folds.strategy' {folds['strategy']} does not fit a {task} target "
                        f"(data.target.form: {data['target']['form']}); use {fit!r}.")
    if "group" in folds["strategy"] and columns is not None and "group" not in columns:
        demo = " (demo:grouped has one)" if data["manifest"].startswith("demo:") else ""
        raise UserError(f"{file}: 'folds.strategy' {folds['strategy']} needs a 'group' column in the manifest "
                        f"{data['manifest']}{demo}; its columns are {list(columns)}.")

    for key, path in raw["weights"].items():
        if key not in raw["backbones"]:
            raise UserError(f"{file}: 'weights.{key}': {key!r} is not in backbones {raw['backbones']}.")
        raw["weights"][key] = _resolve_path(path, f"weights.{key}", folder, file)
        if Path(path).suffix not in (".safetensors", ".pth", ".pt") or not Path(raw["weights"][key]).is_file():
            raise UserError(f"{file}: 'weights.{key}' must be an existing .safetensors or .pth file; "
                            f"found {raw['weights'][key]!r}.")
    if raw["weights"] and not raw["pretrained"]:
        raise UserError(f"{file}: 'weights' are given but 'pretrained' is false; set pretrained: true to load them.")

    both = sorted(set(given.get("params") or {}) & set(raw["search"]))
    if both:
        raise UserError(f"{file}: {both} in both 'params' and 'search': a param is either fixed or searched.")
    if task == "multiclass" and raw["params"]["pos_weight"] is not None:
        raise UserError(f"{file}: 'params.pos_weight' applies to multilabel targets (tags); set it to null.")

    user_stages = raw["stages"]
    stages = user_stages or [{"epochs": raw["epochs"] or 10, "freeze": False, "lr_scale": 1.0,
                              "augment": None, "preprocess": None}]
    total = sum(stage["epochs"] for stage in stages)
    if user_stages and raw["epochs"] not in (None, total):
        raise UserError(f"{file}: 'epochs' is {raw['epochs']} but the stages add up to {total}; drop 'epochs'.")
    for stage in stages:
        stage["augment"] = stage["augment"] or data["augment"]
        stage["preprocess"] = stage["preprocess"] or data["preprocess"]
    raw["stages"], raw["epochs"] = stages, total

    raw["metric"] = raw["metric"] or DEFAULT_METRIC[task]
    if raw["metric"] not in TASK_METRICS[task]:
        raise UserError(f"{file}: 'metric' {raw['metric']} needs a multilabel target (data.target.form: tags); "
                        f"for a {task} target use one of {list(TASK_METRICS[task])}.")
    mode = "min" if raw["metric"] in ("loss", "log_loss") else "max"
    if raw["mode"] not in (None, mode):
        raise UserError(f"{file}: 'mode' {raw['mode']} would pick the worst {raw['metric']}; use {mode!r} or drop it.")
    raw["mode"] = mode
    if raw["scheduler"]["type"] == "asha" and raw["scheduler"]["grace_period"] > total:
        raise UserError(f"{file}: 'scheduler.grace_period' {raw['scheduler']['grace_period']} is more than "
                        f"the {total} epochs; use 1..{total}.")
    return raw


def _resolve_path(value: str | None, key: str, folder: Path, file: str) -> str | None:
    """Relative paths are relative to the space file's folder; demo:* names stay as they are."""
    if value is None or not value.startswith("demo:"):
        return None if value is None else str((folder / Path(value).expanduser()).resolve())
    allowed = {"manifest": VARIANTS, "test_manifest": ("test",)}.get(key, ())
    if value[5:] not in allowed:
        raise UserError(f"{file}: '{key if '.' in key else 'data.' + key}' {value!r} is not embedded demo data; "
                        f"use one of {[f'demo:{v}' for v in allowed]} or a file path.")
    return value


def _manifest_columns(manifest: str) -> tuple[str, ...] | None:
    """The manifest's columns, from its header only; None while the file does not exist."""
    if manifest.startswith("demo:"):
        return DEMO_COLUMNS[manifest[5:]]
    path = Path(manifest)
    with contextlib.suppress(OSError, ValueError, ImportError):
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq
            return tuple(pq.read_schema(path).names)
        with path.open(newline="") as f:
            return tuple(next(csv.reader(f), ()))
    return None


def _resolve_target(data: dict, columns: tuple[str, ...] | None, file: str) -> dict:
    given = data["target"]
    if given["form"] is None and given["column"] is None and columns is None:
        raise UserError(f"{file}: cannot infer 'data.target': the manifest {data['manifest']} does not exist (yet). "
                        f"Set data.target.form ({' / '.join(FORMS)}) or create the manifest.")
    try:
        target = resolve_target(columns or (), given["form"], given["column"], given["maybe_weight"],
                                source=data["manifest"])
    except UserError as e:
        raise UserError(f"{file}: 'data.target': {e}") from None
    if columns is not None and target.column not in columns:
        raise UserError(f"{file}: 'data.target.column' {target.column!r} is not a column of {data['manifest']}; "
                        f"its columns are {list(columns)}.")
    return target.to_dict()


# --------------------------------------------------------------------------- the space


class Section(Mapping):
    """A read-only mapping with attribute access: `space.folds.k == space.folds["k"]`."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping):
        object.__setattr__(self, "_items", {k: _frozen(v) for k, v in items.items()})

    def __getitem__(self, key):
        return self._items[key]

    def __getattr__(self, key):
        if key.startswith("_"):  # copy/pickle probe dunders before _items exists
            raise AttributeError(key)
        try:
            return self._items[key]
        except KeyError:
            raise AttributeError(f"no key {key!r}; keys: {list(self._items)}") from None

    def __setattr__(self, key, value):
        raise AttributeError("a Section is read-only; change the space file instead")

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"Section({self._items!r})"

    def __reduce__(self):  # picklable, so a Space can travel to Ray workers
        return Section, (self._items,)


def _frozen(value):
    if isinstance(value, dict):
        return Section(value)
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Space:
    """A validated space with every default resolved; `raw` is the same as plain nested dicts."""

    name: str
    path: Path
    description: str
    data: Section  # manifest, root, test_manifest, target{form,column,maybe_weight}, classes, ... cache
    folds: Section  # k, strategy, seed
    backbones: tuple[str, ...]
    weights: Section  # backbone -> absolute weight file path
    pretrained: bool
    params: Section  # the fixed params, defaults filled
    search: Section  # param -> {domain: args}, only the searched ones
    epochs: int  # the stages' sum
    stages: tuple[Section, ...]  # epochs, freeze, lr_scale, augment, preprocess (always filled)
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
        """The training manifest (exports the demo data on first use)."""
        return _data_path(self.data.manifest)

    @property
    def test_manifest_path(self) -> Path | None:
        return _data_path(self.data.test_manifest) if self.data.test_manifest else None

    @property
    def root_path(self) -> Path:
        return Path(self.data.root) if self.data.root else self.manifest_path.parent


def _data_path(value: str) -> Path:
    return demo_manifest(value[5:]) if value.startswith("demo:") else Path(value)


def _space_from_raw(name: str, path: Path, raw: dict) -> Space:
    return Space(name=name, path=Path(path), raw=raw, **{k: _frozen(v) for k, v in raw.items()})


@dataclass(frozen=True)
class ModelSpec:
    """One model: a backbone and one param set, trained on every fold."""

    model_id: str
    backbone: str
    params: dict  # space.params + this model's searched values
    searched: dict = field(default_factory=dict)  # only the searched (sampled or grid) values


def _display(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def _space_dirs() -> list[Path]:
    return list(dict.fromkeys([Path.cwd() / "tune_spaces", REPO_SPACES]))


def find_space(name_or_path: str) -> Path:
    """An existing .yaml path, else ./tune_spaces/NAME.yaml, else the repo's tune_spaces/NAME.yaml."""
    given = Path(name_or_path).expanduser()
    if given.suffix in (".yaml", ".yml") and given.is_file():
        return given
    name = given.stem if given.suffix in (".yaml", ".yml") else str(name_or_path)
    for folder in _space_dirs():
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    available = sorted({p.stem for folder in _space_dirs() for p in folder.glob("*.yaml")})
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"No space {name_or_path!r}: not a .yaml file, nor NAME.yaml in "
                    f"{[str(d) for d in _space_dirs()]}.{hint} Available spaces: {available}.")


def load_space(name_or_path: str) -> Space:
    """Read, validate and fill the defaults of a space file (see the module docstring)."""
    path = find_space(name_or_path)
    file = _display(path)
    try:
        given = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise UserError(f"{file}:{mark.line + 1}: YAML syntax error: {e.problem or e.context} "
                        f"(line {mark.line + 1}, column {mark.column + 1}).") from None
    except yaml.YAMLError as e:
        raise UserError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(given, dict):
        raise UserError(f"{file}: a space file is a mapping with keys {list(SCHEMA)}; found {given!r}.")
    raw = _resolve(_walk(SCHEMA, given, "", file), given, file, path.parent)
    return _space_from_raw(path.stem, path, raw)


# --------------------------------------------------------------------------- models


def model_id(backbone: str, params: dict) -> str:
    """`<backbone>-<8 hex of the sha1 of the params' canonical JSON>`."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return f"{backbone}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _rng(seed: int, backbone: str, key: str):
    import numpy as np
    # One stream per (backbone, param): adding a backbone or a searched param leaves the others' draws alone.
    digest = hashlib.sha1(f"{seed}/{backbone}/{key}".encode()).digest()
    return np.random.RandomState(int.from_bytes(digest[:4], "little"))


def _plain(value):
    value = value.item() if hasattr(value, "item") else value  # numpy scalar -> Python
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if isinstance(value, float) else value


def resolve_models(space: Space) -> list[ModelSpec]:
    """Every model of the sweep, in a fixed order: backbone, then sample, then grid combination.

    Like Ray Tune's `num_samples` with `grid_search`: each backbone gets
    num_samples x (grid combinations) models, and every model draws its own
    sampled values. Values come from Ray Tune's domains, drawn once from
    `space.seed`, so the same space always gives the same models and ids.
    A repeated param set (e.g. a `choice` drawn twice) is kept once.
    """
    from ray import tune  # here only: nothing else in this module needs Ray

    search = space.raw["search"]
    grid_keys = sorted(k for k, domain in search.items() if "grid" in domain)
    sampled_keys = sorted(k for k in search if k not in grid_keys)
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
    with torch.device("meta"):  # no memory, no weights: pnasnet5large counts in ~0.15 s
        model = _timm().create_model(backbone, pretrained=False, num_classes=0)
    return sum(p.numel() for p in model.parameters())


def apply_smoke(space: Space) -> Space:
    """The same space, shrunk to run in seconds (see the `smoke` section); max_rows is left to the caller."""
    raw, smoke = copy.deepcopy(space.raw), space.raw["smoke"]
    stand_in = smoke["backbone"]
    raw["backbones"] = list(dict.fromkeys(
        stand_in if _n_params(b) > _n_params(stand_in) else b for b in raw["backbones"]))
    raw["weights"], raw["pretrained"] = {}, False  # smoke runs are offline and test the pipeline, not weights
    raw["params"].update(image_size=smoke["image_size"], batch_size=smoke["batch_size"])
    raw["stages"] = [dict(stage, epochs=smoke["epochs"]) for stage in raw["stages"][:2]]
    raw["epochs"] = sum(stage["epochs"] for stage in raw["stages"])
    raw["scheduler"]["grace_period"] = min(raw["scheduler"]["grace_period"], raw["epochs"])
    raw["folds"]["k"] = min(raw["folds"]["k"], 3)
    raw["num_samples"] = 1
    raw["search"] = {k: {"grid": d["grid"][:1]} if "grid" in d else d
                     for k, d in raw["search"].items() if k not in ("image_size", "batch_size")}
    return _space_from_raw(space.name, space.path, raw)


# --------------------------------------------------------------------------- freezing


def freeze_space(space: Space, run_dir: Path) -> None:
    """Write run_dir/space.yaml (the resolved space) atomically, unless it exists."""
    target = Path(run_dir) / "space.yaml"
    if target.exists():
        return
    header = (f"# The resolved space {space.name!r} from {space.path}, frozen at the first launch of this run.\n"
              "# A resumed run must use the same space (descriptions aside); this file loads as a space too.\n")
    write_text(header + yaml.safe_dump(space.raw, sort_keys=False), target)


def _diff(old: Any, new: Any, path: str = ""):
    """(key path, old, new) for every leaf that differs; lists of mappings are compared item by item."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _diff(old.get(key, OMIT), new.get(key, OMIT), f"{path}.{key}" if path else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and \
            any(isinstance(v, dict) for v in old):
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
               if key.split(".")[0] not in _UNCHECKED]
    if changes:
        raise UserError(f"{frozen_path}: run started with a different space {space.name!r}; changed: "
                        f"{'; '.join(changes)}. A run keeps the space it started with: "
                        "use a new --name, or restore the old space file.")
