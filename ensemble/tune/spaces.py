"""Named sweep spaces: load, resolve and freeze `tune_spaces/NAME.yaml`.

`load_space` parses a space file, checks it key by key against the schema
(`ensemble.tune.schema`), then settles the keys that depend on other keys or on
the data (`_resolve`), giving a `Space` with every default filled; `resolve_models`
turns a space into a fixed list of models (one backbone + one param set each),
sampling the searched params once with numpy draws that match Ray Tune's own;
`freeze_space` / `check_frozen` keep a resumed sweep on exactly the space it
started with.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

import ensemble
from ensemble.data import albu
from ensemble.data.demo_data import VARIANTS, demo_manifest
from ensemble.data.manifest import FORMS, read_columns, resolve_target
from ensemble.errors import UserError
from ensemble.io import write_text
from ensemble.metrics import DEFAULT_METRIC, METRICS, task_metrics
from ensemble.tune.schema import OMIT, RETRIEVAL_PARAMS, SCHEMA, _timm, check_keys

SIGNIFICANT_DIGITS = 4  # sampled floats are rounded, so ids and logs stay readable and stable
REPO_SPACES = Path(ensemble.__file__).resolve().parent.parent / "tune_spaces"
# Keys a resumed run may change: they decide where folds run, never what they compute.
UNCHECKED = ("description", "resources", "max_concurrent")
# Keys a resumed run may grow: they add models, while the run's models keep their ids (check_frozen).
GROWABLE = ("backbones", "search", "num_samples", "rounds", "weights")



# --------------------------------------------------------------------------- keys that depend on other keys

DEMO_COLUMNS = {"multiclass": ("id", "image", "label"), "multilabel": ("id", "image", "tags"),
                "grouped": ("id", "image", "label", "group"), "retrieval": ("id", "image", "label"),
                "test": ("id", "image"), "query": ("id", "image", "label"), "gallery": ("id", "image", "label")}


def _resolve(raw: dict, given: dict, file: str, folder: Path) -> dict:
    def fail(message):
        raise UserError(f"{file}: {message}")

    data, folds, params = raw["data"], raw["folds"], raw["params"]
    for key in ("manifest", "test_manifest", "query_manifest", "gallery_manifest", "root"):
        data[key] = _resolve_path(data[key], f"data.{key}", folder, fail)
    data["augment"] = _resolve_augment(data["augment"], "data.augment", folder, fail)
    if data["root"] is None and not data["manifest"].startswith("demo:"):
        data["root"] = str(Path(data["manifest"]).parent)
    columns = _manifest_columns(data["manifest"], fail)
    data["target"] = _resolve_target(data, columns, fail)
    task = raw["task"] = _resolve_task(raw["task"], data, fail)

    default = {"multilabel": "multilabel", "retrieval": "group"}.get(task, "stratified")
    folds["strategy"] = folds["strategy"] or default
    if task == "retrieval" and folds["strategy"] != "group":
        fail(f"'folds.strategy' {folds['strategy']} does not fit retrieval: its folds hold out whole identities "
             "(groups of the label column), as the test set does; use 'group' or drop the key.")
    if (folds["strategy"], task) in (("multilabel", "multiclass"), ("stratified", "multilabel")):
        fail(f"'folds.strategy' {folds['strategy']} does not fit a {task} target; "
             f"use {'multilabel' if task == 'multilabel' else 'stratified'!r}.")
    if "group" in folds["strategy"] and task != "retrieval" and columns is not None and "group" not in columns:
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
    if task != "retrieval":
        given_keys = set(given.get("params") or {}) | set(raw["search"])
        if given_keys & set(RETRIEVAL_PARAMS):
            fail(f"{sorted(given_keys & set(RETRIEVAL_PARAMS))} are retrieval params; this space's task is {task}.")
        params = {k: v for k, v in params.items() if k not in RETRIEVAL_PARAMS}
    raw["params"] = {k: v for k, v in params.items() if k not in raw["search"]}  # the fixed ones
    if task == "multiclass" and params["pos_weight"] is not None:
        fail("'params.pos_weight' is for multilabel targets (data.target.form: tags); set it to null.")

    stages = raw["stages"] or [{"epochs": raw["epochs"] or 10, "freeze": False, "lr_scale": 1.0,
                                "augment": None, "preprocess": None, "image_size": None}]
    total = sum(stage["epochs"] for stage in stages)
    if raw["epochs"] not in (None, total):
        fail(f"'epochs' is {raw['epochs']} but the stages add up to {total}; drop 'epochs'.")
    for i, stage in enumerate(stages):
        stage["augment"] = _resolve_augment(stage["augment"], f"stages[{i}].augment", folder, fail)
        for key in ("augment", "preprocess"):
            stage[key] = stage[key] or data[key]
    raw["stages"], raw["epochs"] = stages, total
    raw["rounds"] = [_resolve_round(r, item, set(written or ()), raw, folder, fail)
                     for r, (item, written) in enumerate(zip(raw["rounds"] or [], given.get("rounds") or []), 2)] or None

    metric = raw["metric"] = raw["metric"] or DEFAULT_METRIC[task]
    if metric not in task_metrics(task):
        needs = "a multilabel target (data.target.form: tags)" if METRICS[metric].tasks == ("multilabel",) else \
            f"task: {' or '.join(METRICS[metric].tasks)}"
        fail(f"'metric' {metric} needs {needs}; for this {task} space use one of {task_metrics(task)}.")
    mode = METRICS[metric].mode
    if raw["mode"] not in (None, mode):
        fail(f"'mode' {raw['mode']} would pick the worst {metric}; use {mode!r} or drop 'mode'.")
    raw["mode"] = mode
    if raw["scheduler"]["type"] == "asha" and raw["scheduler"]["grace_period"] > total:
        fail(f"'scheduler.grace_period' {raw['scheduler']['grace_period']} is more than the {total} epochs.")
    return raw


def _resolve_round(r: int, item: dict, written: set, raw: dict, folder: Path, fail: Callable) -> dict:
    """rounds[r - 2]: its stages filled in (like the base space's), its paths resolved, its init checked;
    `written`: the keys the file gives."""
    where, data = f"rounds[{r - 2}]", raw["data"]
    if raw["task"] == "retrieval":
        fail(f"'{where}': rounds are for classification spaces; a retrieval space trains its models once.")
    init, hard = item["init"], item["hard_examples"]
    item["augment"] = _resolve_augment(item["augment"], f"{where}.augment", folder, fail)
    for i, stage in enumerate(item["stages"] or []):
        stage["augment"] = _resolve_augment(stage["augment"], f"{where}.stages[{i}].augment", folder, fail)
    if hard:
        hard["augment"] = _resolve_augment(hard["augment"], f"{where}.hard_examples.augment", folder, fail)
    if isinstance(init, int) and init >= r:
        fail(f"'{where}.init': {init} is not an earlier round; this is round {r} (the base space is round 1).")
    if hard and init == "scratch":
        fail(f"'{where}': hard_examples fine-tune the earlier round's fold models; set init: previous (or a round).")
    one_stage = {"epochs": item["epochs"], "lr_scale": item["lr_scale"], "augment": item["augment"],
                 "image_size": item["image_size"]}
    if hard:
        one_stage = {"epochs": hard["epochs"], "lr_scale": hard["lr_scale"],
                     "augment": hard["augment"] or item["augment"], "image_size": item["image_size"]}
    stages = item["stages"] if item["stages"] and not hard else \
        [dict(one_stage, epochs=one_stage["epochs"] or raw["epochs"], freeze=False, preprocess=None)]
    stages = [dict(stage, **{key: stage[key] or data[key] for key in ("augment", "preprocess")}) for stage in stages]
    # What a file gives twice (a frozen space.yaml writes the resolved stages and their epochs: those agree).
    both = sorted(written & ({"lr_scale", "stages"} if hard else {"lr_scale", "augment", "image_size"}
                             if "stages" in written else set()))
    if hard and "stages" in written and [dict(st, **{k: st[k] or data[k] for k in ("augment", "preprocess")})
                                        for st in item["stages"]] == stages:
        both.remove("stages")  # a frozen round
    if "epochs" in written and item["epochs"] != sum(stage["epochs"] for stage in stages) and (hard or item["stages"]):
        both.append("epochs")
    if both:
        fail(f"'{where}': {both} {'with hard_examples, which set their own epochs and lr_scale' if hard else 'with stages'}"
             "; keep one (a stage has epochs, lr_scale, augment and image_size).")
    if item["pseudo"] and item["pseudo"]["max_per_class"] and raw["task"] == "multilabel":
        fail(f"'{where}.pseudo.max_per_class' is for single-label targets; a multilabel row has no one class.")
    pseudo = item["pseudo"]
    if pseudo:
        if pseudo["from"] == "test" and not data["test_manifest"]:
            fail(f"'{where}.pseudo.from': test, but the space has no data.test_manifest; set one, or give a manifest "
                 "of unlabelled images.")
        if pseudo["from"] != "test":
            pseudo["from"] = _resolve_path(pseudo["from"], f"{where}.pseudo.from", folder, fail)
    manifest = _resolve_path(item["manifest"], f"{where}.manifest", folder, fail)
    return {"manifest": manifest, "init": init, "stages": stages, "epochs": sum(s["epochs"] for s in stages),
            "pseudo": pseudo, "hard_examples": hard}


def parent_round(r: int, init) -> int:
    """The round whose fold models a round-r model starts from (init) and takes pseudo-labels from."""
    return init if isinstance(init, int) else r - 1


def _resolve_task(task: str | None, data: dict, fail: Callable) -> str:
    """The task from the target unless given; retrieval needs identity labels and query + gallery sets, no test set."""
    form = data["target"]["form"]
    inferred = "multilabel" if form == "tags" else "multiclass"
    if task == "retrieval":
        if form != "label":
            fail(f"task retrieval needs an identity 'label' column (data.target.form: label); found form {form!r}.")
        if data["test_manifest"]:
            fail("'data.test_manifest' is for classification; a retrieval space sets data.query_manifest and "
                 "data.gallery_manifest instead.")
        if bool(data["query_manifest"]) != bool(data["gallery_manifest"]):
            fail("'data.query_manifest' and 'data.gallery_manifest' go together: set both (or neither, to train "
                 "and score on the folds alone).")
        return task
    if data["query_manifest"] or data["gallery_manifest"]:
        fail(f"'data.query_manifest' / 'data.gallery_manifest' are for task: retrieval; this space's task is {task or inferred}.")
    if task not in (None, inferred):
        fail(f"'task' {task} does not fit the target (data.target.form {form}); use {inferred!r} or drop 'task'.")
    return inferred


def _resolve_path(value: str | None, key: str, folder: Path, fail: Callable) -> str | None:
    """A relative path is relative to the space file's folder; demo:* names are kept."""
    if value is None or not value.startswith("demo:"):
        return value and str((folder / Path(value).expanduser()).resolve())
    allowed = {"data.manifest": VARIANTS, "data.test_manifest": ("test",), "data.query_manifest": ("query",),
               "data.gallery_manifest": ("gallery",)}.get(key, ())
    if value[5:] not in allowed:
        fail(f"'{key}' {value!r} is no embedded demo data; use a file path or one of {[f'demo:{v}' for v in allowed]}.")
    return value


def _resolve_augment(value: Any, key: str, folder: Path, fail: Callable) -> Any:
    """An albumentations pipeline file's mapping in place of its path (relative to the space file's folder).

    The frozen space and every model's config.json then hold the pipeline itself: a run never reads the
    file again (it may move or go), and an edited file is a changed space on resume, as any edited key is."""
    if not albu.is_pipeline_file(value):
        return value
    try:
        return albu.check_pipeline(albu.read_pipeline(_resolve_path(value, key, folder, fail)))
    except UserError as e:
        fail(f"'{key}': {str(e).rstrip('.')}.")


def _manifest_columns(manifest: str, fail: Callable) -> tuple[str, ...] | None:
    """The manifest's columns from its header alone; None while it does not exist (it may be made later).

    A file that exists but cannot be read (a PNG named .csv, an Excel workbook) is an
    error here, never taken for a missing one."""
    if manifest.startswith("demo:"):
        return DEMO_COLUMNS[manifest[5:]]
    try:
        Path(manifest).stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        fail(f"'data.manifest': {manifest}: cannot be read: {e.strerror or e}.")
    try:
        return read_columns(manifest)
    except UserError as e:
        fail(f"'data.manifest': {e}")


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
    task: str  # multiclass | multilabel | retrieval
    data: Section  # manifest, root, test_manifest, target {form, column, maybe_weight}, classes, on_bad_image,
    #                check_images, preprocess, augment, tta, normalize, cache
    folds: Section  # k, strategy, seed
    backbones: list[str]
    weights: Section  # backbone -> absolute weight file path
    pretrained: bool
    params: Section  # every param not in `search`, defaults filled
    search: Section  # searched param -> {domain: args}
    epochs: int  # the stages' sum
    stages: list[Section]  # epochs, freeze, lr_scale, augment, preprocess, image_size: always at least one
    rounds: list[Section] | None  # round 2, 3, ...: manifest, init, stages, epochs, pseudo, hard_examples
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
    def manifest_path(self) -> Path:
        """The training manifest (demo:* data is exported on first use)."""
        return _data_path(self.data.manifest)

    @property
    def test_manifest_path(self) -> Path | None:
        return _data_path(self.data.test_manifest) if self.data.test_manifest else None

    @property
    def query_manifest_path(self) -> Path | None:
        return _data_path(self.data.query_manifest) if self.data.query_manifest else None

    @property
    def gallery_manifest_path(self) -> Path | None:
        return _data_path(self.data.gallery_manifest) if self.data.gallery_manifest else None

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
    raw = _resolve(check_keys(given, file), given, file, path.parent)
    return _space(path.stem, path, raw)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One model: a backbone and one param set, trained on every fold."""

    model_id: str
    backbone: str
    params: dict  # space.params + this model's searched values
    searched: dict = field(default_factory=dict)  # the searched values alone
    round: int = 1  # the base space is round 1; rounds[i] is round i + 2


def round_id(base_id: str, r: int) -> str:
    """A round's model: its round-1 model's id with the round appended (round 1 keeps the bare id)."""
    return base_id if r == 1 else f"{base_id}-r{r}"


def model_id(backbone: str, params: dict) -> str:
    """`<backbone>-<8 hex of the sha1 of the params' canonical JSON>`."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{backbone}-{digest[:8]}"


def _rng(seed: int, backbone: str, key: str) -> np.random.RandomState:
    # One stream per (backbone, param): adding a backbone or a searched param leaves the other draws alone.
    digest = hashlib.sha1(f"{seed}/{backbone}/{key}".encode()).digest()
    return np.random.RandomState(int.from_bytes(digest[:4], "little"))


def _plain(value):
    value = value.item() if hasattr(value, "item") else value  # numpy scalar -> Python
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if isinstance(value, float) else value


def sample(kind: str, args: list, rng: np.random.RandomState):
    """One draw from a search domain, as Ray Tune's `tune.<kind>(*args).sample(random_state=rng)` draws it
    (tests/test_spaces.py checks they agree), with numpy alone: a space resolves without Ray."""
    if kind == "choice":
        return args[int(rng.choice(np.arange(len(args)), size=1)[0])]
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1], size=1)[0])
    if kind == "loguniform":
        return float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]), size=1))[0])
    if kind == "quniform":
        low, high, q = args
        value = rng.uniform(np.ceil(low / q) * q, np.floor(high / q) * q, size=1)[0]
        return float(np.round(value / q) * q)
    if kind == "randint":
        return int(rng.randint(args[0], args[1], size=1)[0])
    raise ValueError(f"no sampler for {kind!r}")


def resolve_models(space: Space) -> list[ModelSpec]:
    """Every model of the sweep, ordered by backbone, then sample, then grid combination.

    As in Ray Tune with `grid_search` and `num_samples`, each backbone gets
    num_samples x (grid combinations) models and each draws its own sampled
    values once, from `space.seed`. A repeated param set (a `choice` drawn
    twice) is kept once. Each round adds one model per base model (`round_id`).
    """
    search = space.search
    grid_keys = sorted(k for k, domain in search.items() if "grid" in domain)
    sampled_keys = sorted(set(search) - set(grid_keys))
    combos = list(itertools.product(*(search[k]["grid"] for k in grid_keys)))
    n = space.num_samples * len(combos)
    models: dict[str, ModelSpec] = {}
    for backbone in space.backbones:
        draws = {}
        for key in sampled_keys:
            (kind, args), = search[key].items()
            rng = _rng(space.seed, backbone, key)
            draws[key] = [_plain(sample(kind, args, rng)) for _ in range(n)]
        for i in range(n):
            searched = dict(zip(grid_keys, combos[i % len(combos)])) | {k: draws[k][i] for k in sampled_keys}
            params = {**space.raw["params"], **searched}
            key = model_id(backbone, params)
            models.setdefault(key, ModelSpec(key, backbone, params, searched))
    base = list(models.values())
    return base + [ModelSpec(round_id(m.model_id, r), m.backbone, m.params, m.searched, r)
                   for r in range(2, 2 + len(space.rounds or [])) for m in base]


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
    # Every stage at smoke.image_size (a stage's own size is dropped).
    raw["stages"] = [dict(stage, epochs=smoke["epochs"], image_size=None) for stage in raw["stages"][:2]]
    raw["epochs"] = sum(stage["epochs"] for stage in raw["stages"])
    for item in raw["rounds"] or []:
        item["stages"] = [dict(stage, epochs=smoke["epochs"], image_size=None) for stage in item["stages"][:2]]
        item["epochs"] = sum(stage["epochs"] for stage in item["stages"])
        item["manifest"] = None  # smoke.max_rows of the first round's data, every round
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


def freeze_space(space: Space, run_dir: Path, grown: list[str] | None = None) -> None:
    """Write run_dir/space.yaml (the resolved space) atomically, unless it exists; `grown` (what
    `check_frozen` returned) rewrites it as the grown space, with a history line of what was added."""
    target = Path(run_dir) / "space.yaml"
    if target.exists() and not grown:
        return
    header = (f"# Space {space.name!r} ({space.path}), resolved and frozen at this run's first launch.\n"
              "# A resumed run must use the same space (the description aside), or grow it: added backbones,\n"
              "# grid/choice values, samples and rounds (docs/design.md). This file loads as a space.\n")
    if target.exists():
        old = [line for line in target.read_text().splitlines(keepends=True) if line.startswith("# ")]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        header = "".join(old) + f"# grown {stamp} from {space.path}: {'; '.join(grown)}\n"
    write_text(header + yaml.dump(space.raw, Dumper=_PlainDumper, sort_keys=False), target)


class _PlainDumper(yaml.SafeDumper):
    """safe_dump without anchors: a pipeline that stages share with data.augment is written out in each."""

    def ignore_aliases(self, data):
        return True


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


def _change(key: str, old: Any, new: Any) -> str:
    """'key: old -> new', or 'key: +[added]' for a list that grew at its end ('rounds: +1 round')."""
    if isinstance(old, list) and isinstance(new, list) and len(new) > len(old) and new[:len(old)] == old:
        added = new[len(old):]
        return f"{key}: +{len(added)} round(s)" if key == "rounds" else f"{key}: +{_fmt(added)}"
    if key == "rounds" and not old and new:
        return f"rounds: +{len(new)} round(s)"
    return f"{key}: {_fmt(old)} -> {_fmt(new)}"


def _read_frozen(path: Path) -> dict:
    try:
        frozen = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: the frozen space cannot be read ({e}); use a new --name.") from None
    if isinstance(frozen, dict):  # keys added since: a run frozen before them has their defaults
        if "task" not in frozen:
            frozen["task"] = "multilabel" if (frozen.get("data") or {}).get("target", {}).get("form") == "tags" \
                else "multiclass"
        for key in ("query_manifest", "gallery_manifest"):
            (frozen.get("data") or {}).setdefault(key, None)
        frozen.setdefault("rounds", None)
        for stage in frozen.get("stages") or []:
            stage.setdefault("image_size", None)
    return frozen


def check_frozen(space: Space, run_dir: Path) -> list[str]:
    """What `space` adds to the run's frozen space.yaml (empty when equal); raise a UserError naming
    every changed key when it changes anything else.

    A run grows, it never changes: added backbones, grid/choice values, samples and rounds
    train on the same folds, while every model the run already has keeps its id and files."""
    frozen_path = Path(run_dir) / "space.yaml"
    if not frozen_path.exists():
        return []
    frozen = _read_frozen(frozen_path)
    changes = [(key, _change(key, old, new)) for key, old, new in _diff(frozen, space.raw)
               if key.split(".")[0].split("[")[0] not in UNCHECKED]
    fixed = [text for key, text in changes if key.split(".")[0].split("[")[0] not in GROWABLE]
    fail = f"{frozen_path}: this run started with a different space than {space.name!r} is now; changed: "
    keep = ("A run keeps its space (it may only grow, by backbones, grid/choice values, samples or rounds that "
            "leave every model it has as it is): use a new --name, or restore the old space file.")
    if fixed:
        raise UserError(f"{fail}{'; '.join(text for _, text in changes)}. {keep}")
    grown = [text for _, text in changes]
    if not grown:
        return []
    old_rounds, new_rounds = frozen.get("rounds") or [], space.raw["rounds"] or []
    if new_rounds[:len(old_rounds)] != old_rounds:
        i = next(i for i, (a, b) in enumerate(zip(old_rounds + [None], new_rounds + [None])) if a != b)
        inner = [_change(key, a, b) for key, a, b in _diff(old_rounds[i], new_rounds[i] if i < len(new_rounds) else {},
                                                              f"rounds[{i}]")]
        raise UserError(f"{fail}{'; '.join(inner)}. Rounds may be added after the last one, never changed or "
                        f"removed. {keep}")
    old_backbones = frozen.get("backbones") or []
    for backbone in set(frozen.get("weights") or {}) | set(space.raw["weights"]):
        old, new = (frozen.get("weights") or {}).get(backbone), space.raw["weights"].get(backbone)
        if old != new and backbone in old_backbones:  # a model the run has would start from other weights
            raise UserError(f"{fail}weights.{backbone}: {_fmt(old)} -> {_fmt(new)}. {keep}")
    new_ids = {m.model_id for m in resolve_models(space)}
    lost = [m.model_id for m in resolve_models(_space(space.name, frozen_path, frozen)) if m.model_id not in new_ids]
    if lost:
        raise UserError(f"{fail}{'; '.join(grown)}, which would change or drop {len(lost)} of its models "
                        f"({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}). {keep}")
    return grown
