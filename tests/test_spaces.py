"""Space files: every shipped space loads; models resolve deterministically; bad keys get clear errors."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import yaml

from ensemble.errors import UserError
from ensemble.metrics import task_metrics
from ensemble.tune import spaces
from ensemble.tune.spaces import (
    apply_smoke,
    check_frozen,
    find_space,
    freeze_space,
    load_space,
    model_id,
    resolve_models,
)

SHIPPED = Path(spaces.__file__).resolve().parents[2] / "tune_spaces"
BASE = {"data": {"manifest": "demo:multiclass"}, "backbones": ["test_resnet"]}


def write_space(tmp_path: Path, changes: dict | None = None, name: str = "s", base: dict = BASE) -> Path:
    """A space file: BASE with `changes` merged in one level deep (None deletes a key)."""
    doc = copy.deepcopy(base)
    for key, value in (changes or {}).items():
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load(tmp_path: Path, changes: dict | None = None, name: str = "s", base: dict = BASE) -> spaces.Space:
    return load_space(str(write_space(tmp_path, changes, name, base)))


def load_error(tmp_path: Path, changes: dict, base: dict = BASE) -> str:
    path = write_space(tmp_path, changes, base=base)
    with pytest.raises(UserError) as info:
        load_space(str(path))
    message = str(info.value)
    assert message.startswith(str(path)), message  # every message names the file
    return message


# --------------------------------------------------------------------------- shipped spaces


@pytest.mark.parametrize("name,n_models,k,metric", [
    ("demo", 4, 3, "log_loss"),
    ("demo_albumentations", 4, 3, "log_loss"),
    ("demo_plus", 6, 3, "log_loss"),
    ("demo_rounds", 8, 3, "log_loss"),
    ("pnasnet_kfold", 1, 5, "log_loss"),
    ("driver_groupkfold", 6, 5, "log_loss"),
    ("fashionai_attributes", 2, 5, "accuracy"),
    ("planet_multilabel", 6, 5, "f2"),
    ("demo_retrieval", 4, 3, "digix"),
    ("digix_retrieval", 2, 5, "digix"),
])
def test_shipped_space_loads_and_resolves(name, n_models, k, metric):
    space = load_space(name)
    models = resolve_models(space)
    assert (space.name, space.path) == (name, SHIPPED / f"{name}.yaml")
    assert (len(models), space.folds.k, space.metric) == (n_models, k, metric)
    assert len({m.model_id for m in models}) == n_models
    assert space.description  # every shipped space says what it is


def test_every_shipped_space_is_tested():
    assert sorted(p.stem for p in SHIPPED.glob("*.yaml")) == sorted(
        ["demo", "demo_albumentations", "demo_plus", "demo_rounds", "pnasnet_kfold", "driver_groupkfold", "fashionai_attributes",
         "planet_multilabel", "demo_retrieval", "digix_retrieval"])


def test_shipped_spaces_other_than_demo_document_their_manifest():
    for path in SHIPPED.glob("*.yaml"):
        if not path.stem.startswith("demo"):
            header = path.read_text().split("description:")[0]
            assert "Data you supply" in header and "pd." in header, path.name  # how to build the manifest


def test_demo_space_resolved_fields():
    space = load_space("demo")
    assert space.backbones == ["test_resnet", "test_efficientnet"]
    assert dict(space.folds) == {"k": 3, "strategy": "stratified", "seed": 0}
    assert space.task == "multiclass" and space.mode == "min"
    assert space.data.target == {"form": "label", "column": "label", "maybe_weight": 0.5}
    assert space.data.root is None and space.data.test_manifest == "demo:test"
    assert space.params.image_size == 32 and space.params["optimizer"] == "adamw"
    assert space.epochs == 3 and len(space.stages) == 1
    assert dict(space.stages[0]) == {"epochs": 3, "freeze": False, "lr_scale": 1.0,
                                     "augment": "rotate:10+shift:0.1", "preprocess": "pad", "image_size": None}
    assert dict(space.resources) == {"cpu": 1.0, "gpu": 0.0} and space.max_concurrent is None


def test_demo_models_are_deterministic_with_the_documented_id():
    first, second = resolve_models(load_space("demo")), resolve_models(load_space("demo"))
    assert first == second
    fixed = dict(load_space("demo").params)
    ids = []
    for lr in (3.0e-3, 1.0e-2):  # the searched lr grid: one model per backbone x value
        params = dict(fixed, lr=lr)
        digest = hashlib.sha1(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]
        ids += [f"test_resnet-{digest}", f"test_efficientnet-{digest}"]
    assert sorted(m.model_id for m in first) == sorted(ids)
    assert {m.searched["lr"] for m in first} == {3.0e-3, 1.0e-2}
    assert all(m.params == dict(fixed, lr=m.searched["lr"]) for m in first)


def test_planet_sampled_values_come_from_ray_domains():
    from ray import tune

    space = load_space("planet_multilabel")
    models = resolve_models(space)
    assert [m.backbone for m in models] == ["densenet201"] * 2 + ["resnet152"] * 2 + ["inception_v3"] * 2
    rng = spaces._rng(0, "densenet201", "lr")
    expected = [float(f"{tune.loguniform(1e-5, 1e-3).sample(random_state=rng):.4g}") for _ in range(2)]
    assert [m.params["lr"] for m in models[:2]] == expected
    assert all(m.params["dropout"] in (0.2, 0.5) and m.params["pos_weight"] == "auto" for m in models)


# --------------------------------------------------------------------------- sampling and grids


SEARCH = {"backbones": ["test_resnet", "test_efficientnet"], "num_samples": 3,
          "search": {"batch_size": {"grid": [8, 16]}, "dropout": {"grid": [0.0, 0.5]},
                     "lr": {"loguniform": [1.0e-5, 1.0e-3]}, "warmup_epochs": {"randint": [0, 3]},
                     "weight_decay": {"quniform": [0.0, 0.1, 0.02]}}}


def test_grid_times_num_samples_per_backbone(tmp_path):
    models = resolve_models(load(tmp_path, SEARCH))
    assert len(models) == 2 * 3 * 2 * 2 == len({m.model_id for m in models})
    first = [m for m in models if m.backbone == "test_resnet"]
    # order: sample, then grid combination (keys sorted: batch_size, dropout)
    grid = [(m.params["batch_size"], m.params["dropout"]) for m in first[:4]]
    assert grid == [(8, 0.0), (8, 0.5), (16, 0.0), (16, 0.5)]
    for m in models:
        assert 1e-5 <= m.params["lr"] <= 1e-3 and m.params["lr"] == float(f"{m.params['lr']:.4g}")
        assert m.params["warmup_epochs"] in (0, 1, 2) and isinstance(m.params["warmup_epochs"], int)
        assert round(m.params["weight_decay"] / 0.02, 6).is_integer()
        assert set(m.searched) == {"batch_size", "dropout", "lr", "warmup_epochs", "weight_decay"}
        assert m.model_id == model_id(m.backbone, m.params)


def test_same_seed_same_models_other_seed_other_samples(tmp_path):
    same = [resolve_models(load(tmp_path, SEARCH, name=n)) for n in ("a", "b")]
    assert same[0] == same[1]
    other = resolve_models(load(tmp_path, {**SEARCH, "seed": 1}, name="c"))
    assert [m.params["lr"] for m in other] != [m.params["lr"] for m in same[0]]
    # grid-only spaces do not depend on the seed at all
    grid = {"search": {"dropout": {"grid": [0.1, 0.2]}}}
    ids = [[m.model_id for m in resolve_models(load(tmp_path, {**grid, "seed": s}, f"g{s}"))] for s in (0, 1)]
    assert ids[0] == ids[1] and len(ids[0]) == 2


def test_description_and_unrelated_keys_keep_model_ids(tmp_path):
    base = [m.model_id for m in resolve_models(load(tmp_path, SEARCH, name="a"))]
    changed = {**SEARCH, "description": "another text", "max_failures": 5, "folds": {"k": 3}}
    assert [m.model_id for m in resolve_models(load(tmp_path, changed, name="b"))] == base


def test_repeated_choice_draws_are_kept_once(tmp_path):
    choice = {"optimizer": {"choice": ["sgd", "adamw"]}}
    models = resolve_models(load(tmp_path, {"num_samples": 20, "search": choice}))
    assert sorted(m.params["optimizer"] for m in models) == ["adamw", "sgd"]


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-4 as the string "1e-4"
    path = tmp_path / "s.yaml"
    path.write_text("data: {manifest: 'demo:multiclass'}\nbackbones: [test_resnet]\nparams: {lr: 1e-4}\n"
                    "search: {weight_decay: {loguniform: [1e-5, 1e-2]}}\n")
    space = load_space(str(path))
    assert space.params.lr == 1e-4 and space.search.weight_decay == {"loguniform": [1e-5, 1e-2]}


# --------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize("changes,expected", [
    ({"param": {"lr": 0.1}},
     "unknown key 'param' at top level. Did you mean 'params'? Allowed: ['description', 'task', 'data',"),
    ({"params": {"lrr": 0.1}}, "unknown key 'lrr' in 'params'. Did you mean 'lr'?"),
    ({"folds": {"kk": 3}}, "unknown key 'kk' in 'folds'. Did you mean 'k'?"),
    ({"lr": 0.1}, "unknown key 'lr' at top level. It belongs in params or search. Allowed:"),
    ({"stages": [{"epochs": 1, "frozen": True}]}, "unknown key 'frozen' in 'stages[0]'. Did you mean 'freeze'?"),
    ({"search": {"lrr": {"choice": [0.1]}}}, "unknown key 'lrr' in 'search'. Did you mean 'lr'?"),
    ({"params": {"batch_size": "big"}}, "'params.batch_size' must be an integer >= 1; found 'big'."),
    ({"params": {"batch_size": 8.5}}, "'params.batch_size' must be an integer >= 1; found 8.5."),
    ({"params": {"amp": "yes"}}, "'params.amp' must be true or false; found 'yes'."),
    ({"params": {"lr": 0}}, "'params.lr' must be a number > 0; found 0."),
    ({"params": {"dropout": 1.0}}, "'params.dropout' must be a number in [0, 1); found 1.0."),
    ({"folds": {"k": 1}}, "'folds.k' must be an integer >= 2; found 1."),
    ({"folds": {"strategy": "random"}}, "'folds.strategy' must be null or one of ['kfold', 'stratified', 'group',"),
    ({"epochs": 0}, "'epochs' must be null or an integer >= 1; found 0."),
    ({"stages": [{"epochs": 0}]}, "'stages[0].epochs' must be an integer >= 1; found 0."),
    ({"stages": [{"freeze": True}]}, "missing required key 'stages[0].epochs'"),
    ({"stages": []}, "'stages' must be a non-empty list of mappings; found []."),
    ({"resources": {"gpu": -1}}, "'resources.gpu' must be a number >= 0, or auto (measured at launch); found -1."),
    ({"resources": {"gpu": 1.5}}, "'resources.gpu' must be a number >= 0: a fraction below 1"),
    ({"resources": {"cpu": 0}}, "'resources.cpu' must be a number > 0; found 0."),
    ({"max_concurrent": 0}, "'max_concurrent' must be null or an integer >= 1; found 0."),
    ({"data": {"on_bad_image": "ignore"}}, "'data.on_bad_image' must be one of ['raise', 'skip']; found 'ignore'."),
    ({"data": {"normalize": {"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}}},
     "'data.normalize' must be 'backbone', 'dataset' or {mean"),
    ({"data": {"normalize": {"mean": [120, 110, 100], "std": [60, 60, 60]}}}, "on the 0-1 scale"),
    ({"data": {"tta": "orig,flip2"}}, "'data.tta': Unknown view op 'flip2'"),
    ({"data": {"augment": "hflip,vflip"}},
     "'data.augment': the augment is one chain of ops joined by '+'; 'hflip,vflip' has 2"),
    ({"data": "demo:multiclass"}, "'data' must be a mapping with keys ['manifest',"),
    ({"data": {"manifest": "demo:digits"}},
     "'data.manifest' 'demo:digits' is no embedded demo data; use a file path or one of ['demo:multiclass',"),
    ({"data": {"test_manifest": "demo:multiclass"}}, "one of ['demo:test']"),
    ({"data": None}, "missing required key 'data.manifest': a CSV/Parquet path, or demo:multiclass"),
    ({"backbones": None}, "missing required key 'backbones': a non-empty list of timm model names."),
    ({"backbones": []}, "'backbones' must be a non-empty list of distinct timm model names; found []."),
    ({"backbones": ["test_resnet", "test_resnet"]}, "'backbones' must be a non-empty list of distinct"),
    ({"backbones": ["pnasnet5"]},
     "'backbones': Unknown backbone 'pnasnet5': timm 1.0.31 has no such model. "
     "Did you mean one of ['pnasnet5large',"),
    ({"backbones": ["resnet50.bogus"]}, "Unknown backbone 'resnet50.bogus'"),
    ({"smoke": {"backbone": "test_resnett"}}, "'smoke.backbone': Unknown backbone 'test_resnett'"),
    ({"params": {"optimizer": "adamm"}},
     "'params.optimizer' must be a timm optimizer name (timm.optim.list_optimizers(), e.g. ['adam',"),
    ({"params": {"scheduler": "cosin"}}, "'params.scheduler' must be one of ['cosine',"),
    ({"params": {"pos_weight": 2}}, "'params.pos_weight' must be one of [None, 'auto']; found 2."),
])
def test_bad_values_name_file_key_found_and_accepted(tmp_path, changes, expected):
    assert expected in load_error(tmp_path, changes)


@pytest.mark.parametrize("search,expected", [
    ({"lr": {"loguniform": [0, 1e-3]}}, "'search.lr': loguniform needs 0 < low < high; found [0, 0.001]."),
    ({"lr": {"uniform": [1e-3, 1e-4]}}, "'search.lr': uniform needs low < high; found [0.001, 0.0001]."),
    ({"lr": {"uniform": [1e-4]}}, "'search.lr': uniform needs [low, high]; found [0.0001]."),
    ({"weight_decay": {"quniform": [0.0, 0.1, 0]}}, "quniform needs low < high and q > 0"),
    ({"dropout": {"uniform": [0.1, 1.5]}},
     "'search.dropout': uniform [0.1, 1.5] leaves the values 'dropout' accepts: a number in [0, 1)."),
    ({"dropout": {"choice": [0.3, 1.5]}},
     "'search.dropout': every choice value must be a number in [0, 1); found [0.3, 1.5]."),
    ({"dropout": {"grid": []}}, "'search.dropout': grid needs a non-empty list of values; found []."),
    ({"optimizer": {"grid": ["sgd", "adamm"]}}, "'search.optimizer': every grid value must be a timm optimizer name"),
    ({"batch_size": {"uniform": [8, 64]}},
     "'search.batch_size': uniform does not fit 'batch_size'; use one of ['randint', 'choice', 'grid']."),
    ({"optimizer": {"uniform": [0, 1]}}, "uniform does not fit 'optimizer'; use one of ['choice', 'grid']."),
    ({"batch_size": {"randint": [8.5, 64]}}, "randint needs [low, high) (high excluded, as in Ray)"),
    ({"lr": {"normal": [0, 1]}},
     "'search.lr' must be exactly one of {grid: [v1, v2, ...]}, {choice: [v1, v2, ...]}, {uniform: [low, high]}"),
    ({"lr": {"uniform": [1e-5, 1e-3], "choice": [1e-4]}}, "'search.lr' must be exactly one of"),
    ({"lr": 1e-4}, "'search.lr' must be exactly one of"),
])
def test_bad_search_domains(tmp_path, search, expected):
    assert expected in load_error(tmp_path, {"search": search})


def test_cross_key_errors(tmp_path):
    weight_file = tmp_path / "w.safetensors"
    weight_file.write_bytes(b"x")
    cases = [
        ({"params": {"lr": 0.1}, "search": {"lr": {"choice": [0.1]}}}, "['lr'] in both 'params' and 'search'"),
        ({"metric": "f2"}, "'metric' f2 needs a multilabel target (data.target.form: tags); for this multiclass "
                           "space use one of ['log_loss', 'accuracy']."),
        ({"metric": "map"}, "'metric' map needs a multilabel target"),
        ({"mode": "max"}, "'mode' max would pick the worst log_loss; use 'min' or drop 'mode'."),
        ({"weights": {"resnet50": "w.safetensors"}, "pretrained": True},
         "'weights.resnet50': 'resnet50' is not one of the backbones ['test_resnet']."),
        ({"weights": {"test_resnet": "missing.pth"}, "pretrained": True},
         "'weights.test_resnet' must be an existing .safetensors or .pth file; found"),
        ({"weights": {"test_resnet": "w.safetensors"}}, "'weights' are given but 'pretrained' is false"),
        ({"folds": {"strategy": "group"}}, "'folds.strategy' group needs a 'group' column; demo:multiclass has "
                                           "['id', 'image', 'label'] (demo:grouped has one)."),
        ({"folds": {"strategy": "multilabel"}},
         "'folds.strategy' multilabel does not fit a multiclass target; use 'stratified'."),
        ({"params": {"pos_weight": "auto"}}, "'params.pos_weight' is for multilabel targets"),
        ({"epochs": 5, "stages": [{"epochs": 1}, {"epochs": 2}]},
         "'epochs' is 5 but the stages add up to 3; drop 'epochs'."),
        ({"scheduler": {"type": "asha", "grace_period": 4}, "epochs": 3},
         "'scheduler.grace_period' 4 is more than the 3 epochs."),
        ({"data": {"manifest": "nowhere.csv"}}, "cannot infer 'data.target': "),
    ]
    for changes, expected in cases:
        assert expected in load_error(tmp_path, changes), changes


RETRIEVAL = {"task": "retrieval", "data": {"manifest": "demo:retrieval", "query_manifest": "demo:query",
                                           "gallery_manifest": "demo:gallery"}, "backbones": ["test_resnet"]}


def test_a_retrieval_space_resolves_its_sets_folds_metric_and_params(tmp_path):
    space = load(tmp_path, {"search": {"head": {"grid": ["arcface", "cosface"]}}}, base=RETRIEVAL)
    assert (space.task, space.folds.strategy, space.metric, space.mode) == ("retrieval", "group", "digix", "max")
    assert space.query_manifest_path.name == "query.csv" and space.gallery_manifest_path.name == "gallery.csv"
    models = resolve_models(space)
    assert [m.params["head"] for m in models] == ["arcface", "cosface"]
    assert models[0].params["embedding_dim"] == 512 and models[0].params["margin"] == 0.3
    classify = load(tmp_path, name="c")  # other tasks' params (and so their model ids) have no retrieval keys
    assert "embedding_dim" not in classify.params and classify.task == "multiclass"


def test_retrieval_cross_key_errors(tmp_path):
    cases = [
        ({"folds": {"strategy": "stratified"}}, "'folds.strategy' stratified does not fit retrieval"),
        ({"data": {"manifest": "demo:multilabel"}}, "task retrieval needs an identity 'label' column"),
        ({"data": {"test_manifest": "demo:test"}}, "a retrieval space sets data.query_manifest and data.gallery_manifest"),
        ({"data": {"manifest": "demo:retrieval", "query_manifest": "demo:query"}},
         "'data.query_manifest' and 'data.gallery_manifest' go together"),
        ({"metric": "log_loss"}, "'metric' log_loss needs task: multiclass or multilabel; for this retrieval space use "
                                 "one of ['digix', 'map@10', 'top1', 'recall@5', 'recall@10']."),
        ({"params": {"head": "triplet"}}, "'params.head' must be one of ['softmax', 'arcface', 'cosface', 'subcenter']"),
        ({"data": {"query_manifest": "demo:gallery"}}, "'data.query_manifest' 'demo:gallery' is no embedded demo data"),
    ]
    for changes, expected in cases:
        base = copy.deepcopy(RETRIEVAL)
        if "data" in changes:
            base["data"] = {k: v for k, v in base["data"].items() if k not in ("query_manifest", "gallery_manifest")
                            or "manifest" not in changes["data"] or k in changes["data"]}
        assert expected in load_error(tmp_path, changes, base=base), changes
    assert "are retrieval params; this space's task is multiclass" in load_error(tmp_path, {"params": {"margin": 0.2}})
    assert "'data.query_manifest' / 'data.gallery_manifest' are for task: retrieval" in load_error(
        tmp_path, {"data": {"manifest": "demo:multiclass", "query_manifest": "demo:query"}})


def test_a_run_frozen_before_task_existed_still_resumes(tmp_path):
    space = load(tmp_path)
    run_dir = tmp_path / "run"
    freeze_space(space, run_dir)
    frozen = yaml.safe_load((run_dir / "space.yaml").read_text())
    del frozen["task"], frozen["data"]["query_manifest"], frozen["data"]["gallery_manifest"]
    (run_dir / "space.yaml").write_text(yaml.safe_dump(frozen))
    check_frozen(space, run_dir)  # no complaint about keys this version added


def test_a_manifest_that_exists_but_cannot_be_read_is_not_called_missing(tmp_path):
    assert "nowhere.csv does not exist (yet)" in load_error(tmp_path, {"data": {"manifest": "nowhere.csv"}})
    (tmp_path / "digits.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    message = load_error(tmp_path, {"data": {"manifest": "digits.csv"}})
    assert f"s.yaml: 'data.manifest': {tmp_path.resolve() / 'digits.csv'}: cannot be read as CSV" in message
    assert "looks like a PNG image" in message and "does not exist" not in message
    (tmp_path / "digits.csv").write_text("\n")
    assert "digits.csv: no header line, only blank lines" in load_error(tmp_path, {"data": {"manifest": "digits.csv"}})
    # With the target form given, a missing manifest may still be created before the sweep starts.
    later = load(tmp_path, {"data": {"manifest": "later.csv", "target": {"form": "label"}}})
    assert later.data.target.column == "label"


def test_metric_fits_the_task(tmp_path):
    multilabel = {"data": {"manifest": "demo:multilabel"}, "backbones": ["test_resnet"]}
    for metric in task_metrics("multilabel"):  # log_loss and the others all fit multilabel
        assert load(tmp_path, {"metric": metric}, base=multilabel).metric == metric
    # One registry (ensemble.metrics): a space may not name a metric that training, predict or stack lack.
    assert "'metric' must be null or one of ['log_loss', 'accuracy', 'f2', 'map', 'digix', 'map@10', 'top1', " \
        "'recall@5', 'recall@10']; found 'loss'." in \
        load_error(tmp_path, {"metric": "loss"})
    space = load(tmp_path, base=multilabel)
    assert (space.metric, space.mode, space.folds.strategy, space.task) == ("f2", "max", "multilabel", "multilabel")
    assert "'folds.strategy' stratified does not fit a multilabel target; use 'multilabel'." in \
        load_error(tmp_path, {"folds": {"strategy": "stratified"}}, base=multilabel)
    assert load(tmp_path, {"metric": "accuracy"}).mode == "max"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  manifest: demo:multiclass\nbackbones: [test_resnet\nepochs: 2\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:4: YAML syntax error at line 4")):
        load_space(str(path))
    path.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="a space file is a mapping with keys"):
        load_space(str(path))


def test_tagged_backbone_names_are_valid(tmp_path):
    assert load(tmp_path, {"backbones": ["resnet50.a1_in1k"]}).backbones == ["resnet50.a1_in1k"]


# --------------------------------------------------------------------------- data paths and targets


def test_paths_are_relative_to_the_space_file_and_target_is_inferred(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("id,image,tags\na,a.png,clear water\n")
    weights = tmp_path / "weights" / "w.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    folder = tmp_path / "spaces"
    folder.mkdir()
    path = write_space(folder, {"data": {"manifest": "../data/train.csv", "test_manifest": "../data/test.csv"},
                                "weights": {"test_resnet": "../weights/w.pth"}, "pretrained": True})
    space = load_space(str(path))
    assert space.data.manifest == str(data / "train.csv") and space.data.root == str(data)
    assert space.data.test_manifest == str(data / "test.csv")  # need not exist yet
    assert space.manifest_path == data / "train.csv" and space.root_path == data
    assert space.weights == {"test_resnet": str(weights)}
    assert space.data.target == {"form": "tags", "column": "tags", "maybe_weight": 0.5}
    assert (space.metric, space.folds.strategy) == ("f2", "multilabel")


def test_attribute_target_and_missing_column(tmp_path):
    (tmp_path / "fa.csv").write_text("id,image,attr\na,a.png,nnmynn\n")
    space = load(tmp_path, {"data": {"manifest": "fa.csv", "target": {"column": "attr"}}})
    assert space.data.target == {"form": "attribute", "column": "attr", "maybe_weight": 0.5}
    assert space.task == "multiclass"
    message = load_error(tmp_path, {"data": {"manifest": "fa.csv", "target": {"form": "label", "column": "label"}}})
    assert "'data.target.column' 'label' is not a column of" in message and "['id', 'image', 'attr']" in message


# --------------------------------------------------------------------------- finding spaces


def test_find_space_by_path_cwd_and_repo(tmp_path, monkeypatch):
    path = write_space(tmp_path, name="mine")
    assert find_space(str(path)) == path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tune_spaces").mkdir()
    local = write_space(tmp_path / "tune_spaces", name="demo")  # ./tune_spaces wins over the repo's
    assert find_space("demo") == tmp_path / "tune_spaces" / "demo.yaml" == local.absolute()
    assert find_space("planet_multilabel") == SHIPPED / "planet_multilabel.yaml"
    assert find_space("planet_multilabel.yaml") == SHIPPED / "planet_multilabel.yaml"


def test_unknown_space_lists_available_and_nearest():
    with pytest.raises(UserError) as info:
        find_space("planet_multilable")
    message = str(info.value)
    assert "No space 'planet_multilable'" in message and "Did you mean 'planet_multilabel'?" in message
    assert "Available spaces: ['demo', 'demo_albumentations', 'demo_plus', 'demo_retrieval', 'demo_rounds', 'digix_retrieval', " \
           "'driver_groupkfold', 'fashionai_attributes', 'planet_multilabel', 'pnasnet_kfold']" in message


# --------------------------------------------------------------------------- freezing


def test_freeze_round_trips_and_never_overwrites(tmp_path):
    space = load_space("planet_multilabel")
    freeze_space(space, tmp_path / "run")
    frozen = tmp_path / "run" / "space.yaml"
    text = frozen.read_text()
    assert text.startswith("# Space 'planet_multilabel'") and not list((tmp_path / "run").glob(".*tmp"))
    again = load_space(str(frozen))  # the frozen file is itself a valid space, already resolved
    assert again.raw == space.raw and resolve_models(again) == resolve_models(space)
    freeze_space(load_space("demo"), tmp_path / "run")
    assert frozen.read_text() == text
    check_frozen(space, tmp_path / "run")  # unchanged: no error
    check_frozen(space, tmp_path / "elsewhere")  # nothing frozen yet: no error


def test_check_frozen_names_every_changed_key(tmp_path):
    freeze_space(load(tmp_path, name="a"), tmp_path / "run")
    changed = load(tmp_path, {"params": {"lr": 1e-4}, "folds": {"k": 3}, "description": "new",
                              "stages": [{"epochs": 1, "freeze": True}]}, name="a")
    with pytest.raises(UserError) as info:
        check_frozen(changed, tmp_path / "run")
    message = str(info.value)
    assert message == (
        f"{tmp_path / 'run' / 'space.yaml'}: this run started with a different space than 'a' is now; changed: "
        "folds.k: 5 -> 3; params.lr: 0.001 -> 0.0001; epochs: 10 -> 1; stages[0].epochs: 10 -> 1; "
        "stages[0].freeze: false -> true. A run keeps its space (it may only grow, by backbones, grid/choice values, "
        "samples or rounds that leave every model it has as it is): use a new --name, or restore the old space file.")
    two_stages = load(tmp_path, {"stages": [{"epochs": 4}, {"epochs": 6}]}, name="a")
    with pytest.raises(UserError, match=re.escape("stages: [{'epochs': 10, 'freeze': False, 'lr_scale': 1.0, "
                                                  "'augment': 'hflip', 'preprocess': 'pad', 'image_size': None}] -> "
                                                  "[{'epochs': 4,")):
        check_frozen(two_stages, tmp_path / "run")
    only_description = load(tmp_path, {"description": "new"}, name="a")
    check_frozen(only_description, tmp_path / "run")


def test_check_frozen_reports_added_and_removed_keys(tmp_path):
    freeze_space(load(tmp_path, name="a"), tmp_path / "run")
    searched = load(tmp_path, {"search": {"lr": {"choice": [0.1, 0.01]}}}, name="a")
    with pytest.raises(UserError, match=re.escape("search.lr: (absent) -> {'choice': [0.1, 0.01]}")):
        check_frozen(searched, tmp_path / "run")


# --------------------------------------------------------------------------- smoke


def test_apply_smoke_shrinks_a_big_space():
    space = load_space("pnasnet_kfold")
    smoke = apply_smoke(space)
    assert smoke.backbones == ["test_resnet"] and smoke.pretrained is False and smoke.weights == {}
    assert (smoke.params.image_size, smoke.params.batch_size) == (32, 16)
    assert [s.epochs for s in smoke.stages] == [1, 1] and smoke.stages[0].freeze and smoke.epochs == 2
    assert smoke.folds.k == 3 and smoke.smoke.max_rows == 400
    assert smoke.params.lr == space.params.lr and smoke.raw["params"]["dropout"] == 0.5
    assert space.params.image_size == 331  # the original is untouched


def test_apply_smoke_keeps_small_backbones_and_first_grid_values(tmp_path):
    changes = {**SEARCH, "backbones": ["test_efficientnet", "resnet18", "test_resnet"],
               "search": {**SEARCH["search"], "image_size": {"grid": [64, 128]}},
               "stages": [{"epochs": 2}, {"epochs": 3}, {"epochs": 4}], "folds": {"k": 2},
               "scheduler": {"type": "asha", "grace_period": 5}}
    smoke = apply_smoke(load(tmp_path, changes))
    assert smoke.backbones == ["test_efficientnet", "test_resnet"]  # resnet18 is bigger than the stand-in
    assert smoke.search == {"dropout": {"grid": [0.0]}, "lr": {"loguniform": [1e-5, 1e-3]},
                            "warmup_epochs": {"randint": [0, 3]}, "weight_decay": {"quniform": [0.0, 0.1, 0.02]}}
    assert smoke.num_samples == 1 and smoke.folds.k == 2 and smoke.epochs == 2 and smoke.scheduler.grace_period == 2
    models = resolve_models(smoke)
    assert len(models) == 2 and all(m.params["image_size"] == 32 for m in models)


def test_demo_smoke_keeps_its_tiny_backbones():
    assert apply_smoke(load_space("demo")).backbones == ["test_resnet", "test_efficientnet"]


# --------------------------------------------------------------------------- the objects


def test_space_and_models_pickle_and_sections_read_as_attributes():
    space = load_space("driver_groupkfold")
    assert pickle.loads(pickle.dumps(space)) == space
    assert pickle.loads(pickle.dumps(resolve_models(space))) == resolve_models(space)
    assert space.data.target.form == space.raw["data"]["target"]["form"] == "label"
    assert space.resources.gpu == 0.5 and space.stages[0].lr_scale == 10.0
    with pytest.raises(AttributeError):
        space.folds.kk


def test_with_resources_overrides_and_checks():
    space = load_space("pnasnet_kfold")
    shared = spaces.with_resources(space, gpu=0.5)
    assert dict(shared.resources) == {"cpu": 2.0, "gpu": 0.5} == shared.raw["resources"]
    assert space.resources.gpu == 1.0 and spaces.with_resources(space) == space
    with pytest.raises(UserError, match=re.escape("The resources.gpu override must be a number >= 0: a fraction")):
        spaces.with_resources(space, gpu=1.5)
    with pytest.raises(UserError, match=re.escape("The resources.cpu override must be a number > 0; found 0.")):
        spaces.with_resources(space, cpu=0)


def test_numpy_sampling_draws_what_ray_tune_draws():
    """spaces samples with numpy alone (no Ray import to resolve a space); the draws equal Ray Tune's domains'."""
    from ray import tune

    cases = [("choice", [0.1, "a", 3]), ("uniform", [0.0, 0.5]), ("loguniform", [1e-5, 1e-1]),
             ("quniform", [0.1, 0.9, 0.1]), ("randint", [8, 64])]
    for kind, args in cases:
        ours, theirs = spaces._rng(0, "test_resnet", kind), spaces._rng(0, "test_resnet", kind)
        domain = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
        for _ in range(20):
            assert spaces.sample(kind, args, ours) == domain.sample(random_state=theirs), kind
