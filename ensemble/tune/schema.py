"""The schema of a space file: every key's default and check.

`check_keys` checks a parsed YAML mapping against SCHEMA, key by key, and fills
the defaults; every complaint is one UserError naming the space file, the key,
what was found and what would be accepted. What depends on several keys or on
the data (relative paths, the target form read from the manifest's header, the
fold strategy, the metric and its mode, the stages) is settled by
`ensemble.tune.spaces`, which builds a `Space` from the result.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

from ensemble.data import albu, views
from ensemble.data.folds import STRATEGIES
from ensemble.data.manifest import BAD_IMAGE_POLICIES, FORMS
from ensemble.errors import UserError
from ensemble.heads import HEADS
from ensemble.metrics import METRICS

# timm.scheduler.create_scheduler_v2's names (timm has no function that lists them).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "rsqrt", "constant", "none")
DOMAINS = {"grid": "[v1, v2, ...]", "choice": "[v1, v2, ...]", "uniform": "[low, high]", "loguniform": "[low, high]",
           "quniform": "[low, high, q]", "randint": "[low, high) (high excluded, as in Ray)"}
REQUIRED, OMIT = object(), object()  # defaults: the key must be given / stays absent unless given


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
        if isinstance(value, dict) or albu.is_pipeline_file(value):  # a pipeline is random: it can only augment
            raise _Invalid(f"the {role} takes named views only, such as 'orig,hflip' (ops: {sorted(views.VIEWS)}); "
                           "an albumentations pipeline is train-time augmentation: give it as 'augment'")
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


def _augment(value):
    """A view chain, or an albumentations pipeline: inline (checked here) or a .json/.yaml file
    (read and checked by `ensemble.tune.spaces`, which resolves its path against the space file's folder)."""
    if albu.is_pipeline_file(value):
        return value
    if isinstance(value, dict):
        try:
            return albu.check_pipeline(value)
        except UserError as e:
            raise _Invalid(str(e)) from None
    if not isinstance(value, str):
        raise ValueError("a view chain such as 'hflip+rotate:10', an albumentations pipeline (the mapping "
                         "A.to_dict writes) or a .json/.yaml file holding one")
    return _view_spec("augment")(value)


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
    if value == "auto":  # measured at launch (ensemble.tune.packing)
        return value
    try:
        value = _number(float, 0)(value)
    except ValueError:
        raise ValueError("a number >= 0, or auto (measured at launch)") from None
    if value > 1 and not value.is_integer():
        raise ValueError("a number >= 0: a fraction below 1 (0.5 packs two workers on a GPU) or whole GPUs; "
                         "or auto (measured at launch)")
    return value


@functools.lru_cache(maxsize=1)
def _timm():
    import timm  # 3 s: only when a space is loaded, not on `import ensemble.tune.spaces`
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
    # Retrieval only (task: retrieval); dropped from other tasks' params, so their model ids stay as they were.
    "embedding_dim": Rule(512, _number(int, 2)),  # the neck: linear + batch norm to this width
    "head": Rule("softmax", _one_of(*HEADS)),  # the training head over the embedding (ensemble.heads)
    "scale": Rule(30.0, _positive),  # margin heads: logits = scale * cosine
    "margin": Rule(0.3, _number(float, 0, 1)),  # arcface / subcenter: angle added; cosface: cosine subtracted
    "subcenters": Rule(3, _number(int, 1)),  # subcenter: sub-centres per identity
}
RETRIEVAL_PARAMS = ("embedding_dim", "head", "scale", "margin", "subcenters")
TASKS = ("multiclass", "multilabel", "retrieval")
STAGE = {
    "epochs": Rule(REQUIRED, _number(int, 1), "an integer >= 1"),
    "freeze": Rule(False, _bool),
    "lr_scale": Rule(1.0, _positive),
    "augment": Rule(None, _optional(_augment)),  # null: data.augment
    "preprocess": Rule(None, _optional(_view_spec("preprocess"))),  # null: data.preprocess
    "image_size": Rule(None, _optional(_number(int, 8))),  # null: params.image_size (progressive resizing)
}


class MaybeSection(dict):
    """A section that may be left out (null): off unless given, every default filled when given."""


def _init(value):
    if value in ("scratch", "previous") or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError("'scratch', 'previous' or the number of an earlier round (the base space is round 1)")


# A round (rounds[i] is round i + 2): the same models (backbone x param set) trained again on the same folds.
ROUND = {
    "manifest": Rule(None, _optional(_string)),  # null: data.manifest; new rows get folds, old rows keep theirs
    "init": Rule("scratch", _init),  # previous: each fold model starts from the earlier round's same fold
    "epochs": Rule(None, _optional(_number(int, 1))),  # one stage of these (null: the base space's epochs)
    "lr_scale": Rule(1.0, _positive),
    "augment": Rule(None, _optional(_augment)),
    "image_size": Rule(None, _optional(_number(int, 8))),
    "stages": [STAGE],  # or stages of their own (then not epochs / lr_scale / augment / image_size)
    "pseudo": MaybeSection({
        "from": Rule("test", _string),  # test (data.test_manifest) or a manifest of unlabelled images
        "labels": Rule("soft", _one_of("soft", "hard")),
        "min_confidence": Rule(0.0, _number(float, 0, 1)),  # a row's top probability (multilabel: least sure label)
        "temperature": Rule(1.0, _positive),  # < 1 sharpens the soft labels
        "max_per_class": Rule(None, _optional(_number(int, 1))),  # the most confident rows of each predicted class
        "weight": Rule(1.0, _positive),  # a pseudo row's weight in the loss (a labelled row's is 1)
    }),
    "hard_examples": MaybeSection({  # fine-tune on the training rows the previous round's fold model predicts worst
        "top": Rule(0.2, _number(float, 0, 1, lo_open=True)),
        "augment": Rule(None, _optional(_augment)),  # null: the round's (or data's) augment
        "epochs": Rule(2, _number(int, 1)),
        "lr_scale": Rule(0.1, _positive),
    }),
}
# A dict is a section, a one-item list a list of sections, a Rule one value.
SCHEMA = {
    "description": Rule("", _string),
    "task": Rule(None, _optional(_one_of(*TASKS))),  # null: from the target (tags: multilabel, else multiclass)
    "data": {
        "manifest": Rule(REQUIRED, _string, "a CSV/Parquet path, or demo:multiclass / demo:multilabel / demo:grouped"),
        "root": Rule(None, _optional(_string)),
        "test_manifest": Rule(None, _optional(_string)),
        "query_manifest": Rule(None, _optional(_string)),  # retrieval: the queries (id, image)
        "gallery_manifest": Rule(None, _optional(_string)),  # retrieval: what they search (id, image)
        "target": {"form": Rule(None, _optional(_one_of(*FORMS))), "column": Rule(None, _optional(_string)),
                   "maybe_weight": Rule(0.5, _number(float, 0, 1))},
        "classes": Rule(None, _optional(_strings)),
        "on_bad_image": Rule("raise", _one_of(*BAD_IMAGE_POLICIES)),
        "check_images": Rule("decode", _one_of("decode", "exists", "none")),
        "preprocess": Rule("pad", _view_spec("preprocess")),
        "augment": Rule("hflip", _augment),  # or an albumentations pipeline (ensemble.data.albu)
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
    "rounds": [ROUND],
    "metric": Rule(None, _optional(_one_of(*(m for m in METRICS if METRICS[m].tasks)))),
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


def check_keys(given: dict, file: str) -> dict:
    """A parsed space file (`file` as messages name it) checked key by key, every default filled in."""
    return _walk(SCHEMA, given, "", file)


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
        if isinstance(rule, MaybeSection):
            out[key] = None if value is None else _walk(rule, value, here, file)
        elif isinstance(rule, dict):
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
