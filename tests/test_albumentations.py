"""Albumentations pipelines as augment: checked at space load, seeded per sample in any process, frozen, resumed."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sweep_fixtures import kill_mid_training, oof, small_space

from ensemble.data import albu
from ensemble.data.loader import ImageDataset, collate, create_loader
from ensemble.errors import UserError
from ensemble.tune import spaces

REPO = Path(__file__).resolve().parent.parent
# A.to_dict's form, written out: every draw of these three shows in a 32 px digit.
PIPELINE = {"__version__": "2.0.8", "transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": [
    {"__class_fullname__": "Affine", "rotate": [-15, 15], "translate_percent": [-0.1, 0.1], "p": 1.0},
    {"__class_fullname__": "RandomBrightnessContrast", "p": 0.5},
    {"__class_fullname__": "GaussNoise", "std_range": [0.02, 0.1], "p": 0.5},
]}}


# The dev extra has albumentations; without it, only the tests of its absence run.
needs_albumentations = pytest.mark.skipif(importlib.util.find_spec("albumentations") is None,
                                          reason="pip install 'ensemble[albumentations]'")


def with_transform(*transforms: dict) -> dict:
    pipeline = copy.deepcopy(PIPELINE)
    pipeline["transform"]["transforms"] += list(transforms)
    return pipeline


def write_space(folder: Path, data: dict | None = None, **top) -> Path:
    doc = {"data": {"manifest": "demo:multiclass", **(data or {})}, "backbones": ["test_resnet"], **top}
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load_error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        spaces.load_space(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message  # names the file, one line
    return message


def cli(*args) -> subprocess.Popen:
    """The sweep CLI in its own session (process group), so a kill takes Ray's helpers with it."""
    return subprocess.Popen([sys.executable, "-m", "ensemble.tune", *args], cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def demo_paths(demo_dir: Path, n: int = 8) -> tuple[list[str], np.ndarray]:
    frame = pd.read_csv(demo_dir / "multiclass.csv").head(n)
    return [str(demo_dir / p) for p in frame["image"]], np.zeros((n, 1), np.float32)


# --------------------------------------------------------------------------- the space


@needs_albumentations
def test_a_pipeline_inline_or_in_a_file_loads_as_the_same_mapping(tmp_path):
    inline = spaces.load_space(str(write_space(tmp_path, {"augment": PIPELINE})))
    assert inline.raw["data"]["augment"] == PIPELINE and inline.stages[0].augment == PIPELINE  # stages inherit it
    (tmp_path / "augs").mkdir()
    (tmp_path / "augs" / "digits.json").write_text(json.dumps(PIPELINE))
    (tmp_path / "augs" / "digits.yml").write_text(yaml.safe_dump(PIPELINE))
    for name in ("augs/digits.json", "augs/digits.yml"):  # relative to the space file's folder, as manifests are
        space = spaces.load_space(str(write_space(tmp_path, {"augment": name}, stages=[
            {"epochs": 1}, {"epochs": 1, "augment": "hflip"}, {"epochs": 1, "augment": name}])))
        assert space.raw["data"]["augment"] == PIPELINE  # the mapping itself, not the path: see _resolve_augment
        assert [s["augment"] for s in space.raw["stages"]] == [PIPELINE, "hflip", PIPELINE]
    assert spaces.load_space("demo_albumentations").data.tta == "orig,rotate:-5,rotate:5"  # the shipped example


@needs_albumentations
def test_tuples_from_a_to_dict_load_as_lists(tmp_path):
    import albumentations as A

    written = A.to_dict(A.Compose([A.Affine(rotate=(-10, 10), p=1.0)]))
    assert isinstance(written["transform"]["transforms"][0]["rotate"], tuple)
    assert albu.check_pipeline(written)["transform"]["transforms"][0]["rotate"] == [-10.0, 10.0]


@needs_albumentations
@pytest.mark.parametrize("augment,key,message", [
    (with_transform({"__class_fullname__": "Affin", "p": 1.0}), "data.augment",
     "'transform.transforms[3]': albumentations 2.0.8 has no transform 'Affin'. Did you mean ['Affine'"),
    (with_transform({"__class_fullname__": "Affine", "rotate": "a lot", "p": 1.0}), "data.augment",
     "'transform.transforms[3]' (Affine): albumentations 2.0.8 cannot build it: ValueError: 2 validation errors"),
    (with_transform({"__class_fullname__": "Affine", "rotation": 10, "p": 1.0}), "data.augment",
     "Affine has no argument(s) ['rotation'] in albumentations 2.0.8"),
    (with_transform({"__class_fullname__": "Normalize", "p": 1.0}), "data.augment",
     "Normalize turns a uint8 HxWx3 image into ndarray float32 (64, 64, 3), but the pipeline must give back a "
     "uint8 HxWx3 RGB image (the loader resizes it and normalises whole batches itself, per data.normalize): "
     "remove Normalize."),
    (with_transform({"__class_fullname__": "OneOf", "p": 1.0, "transforms": [
        {"__class_fullname__": "HorizontalFlip", "p": 1.0}, {"__class_fullname__": "ToTensorV2", "p": 1.0}]}),
     "data.augment", "ToTensorV2 turns a uint8 HxWx3 image into Tensor torch.uint8 (3, 64, 64)"),
    (with_transform({"__class_fullname__": "Lambda", "p": 1.0}), "data.augment",
     "'transform.transforms[3]': Lambda holds Python functions, which a pipeline written as data cannot"),
    ({"transforms": []}, "data.augment", "an albumentations pipeline is the mapping A.to_dict writes"),
    ("augs/missing.json", "data.augment", "the albumentations pipeline file {folder}/augs/missing.json does not exist."),
    (7, "data.augment", "must be a view chain such as 'hflip+rotate:10', an albumentations pipeline"),
])
def test_a_bad_pipeline_is_one_message_naming_file_key_and_reason(tmp_path, augment, key, message):
    text = load_error(write_space(tmp_path, {"augment": augment}))
    assert f"'{key}'" in text and message.format(folder=tmp_path) in text, text


@needs_albumentations
def test_a_bad_pipeline_file_or_stage_names_its_key(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(with_transform({"__class_fullname__": "ToFloat", "p": 1.0})))
    text = load_error(write_space(tmp_path, stages=[{"epochs": 1}, {"epochs": 1, "augment": "bad.yaml"}]))
    assert "'stages[1].augment': ToFloat turns a uint8 HxWx3 image into ndarray float32" in text
    (tmp_path / "broken.json").write_text("{'single': quotes}")
    text = load_error(write_space(tmp_path, {"augment": "broken.json"}))
    assert f"'data.augment': {tmp_path}/broken.json is not valid JSON: Expecting property name" in text


@needs_albumentations
@pytest.mark.parametrize("key", ["tta", "preprocess"])
@needs_albumentations
def test_a_pipeline_is_train_time_only(tmp_path, key):
    for value in (PIPELINE, "augs/digits.json"):
        text = load_error(write_space(tmp_path, {key: value}))
        assert f"'data.{key}': the {key} takes named views only" in text
        assert "an albumentations pipeline is train-time augmentation: give it as 'augment'" in text


@needs_albumentations
def test_a_frozen_pipeline_resumes_and_an_edited_one_is_refused(tmp_path):
    (tmp_path / "digits.json").write_text(json.dumps(PIPELINE))
    path = write_space(tmp_path, {"augment": "digits.json"}, stages=[{"epochs": 1}, {"epochs": 1}])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spaces.freeze_space(spaces.load_space(str(path)), run_dir)
    frozen = (run_dir / "space.yaml").read_text()
    assert "&id" not in frozen and "*id" not in frozen  # written out in full where stages share it
    assert spaces.check_frozen(spaces.load_space(str(path)), run_dir) == []  # the same space resumes
    assert spaces.load_space(str(run_dir / "space.yaml")).raw == spaces.load_space(str(path)).raw  # it loads

    (tmp_path / "digits.json").unlink()  # the run holds the pipeline itself, so its file may go ...
    assert json.loads(json.dumps(spaces.load_space(str(run_dir / "space.yaml")).raw["data"]["augment"])) == PIPELINE
    edited = copy.deepcopy(PIPELINE)
    edited["transform"]["transforms"][0]["rotate"] = [-30, 30]
    (tmp_path / "digits.json").write_text(json.dumps(edited))  # ... but an edited one is a changed space
    with pytest.raises(UserError) as info:
        spaces.check_frozen(spaces.load_space(str(path)), run_dir)
    assert "changed: data.augment.transform.transforms[0].rotate: [-15, 15] -> [-30, 30]" in str(info.value)


# --------------------------------------------------------------------------- the loader


@needs_albumentations
def test_same_seed_epoch_and_index_give_the_same_image_in_any_instance(demo_dir):
    paths, y = demo_paths(demo_dir)
    first, second = ImageDataset(paths, y, 32, augment=PIPELINE), ImageDataset(paths, y, 32, augment=PIPELINE)
    images = [first[i][0] for i in range(len(paths))]
    assert all(img.dtype == np.uint8 and img.shape == (32, 32, 3) for img in images)
    assert all(np.array_equal(a, second[i][0]) for i, a in enumerate(images))
    assert all(np.array_equal(a, first[i][0]) for i, a in enumerate(images))  # called again: no state carried
    revived = pickle.loads(pickle.dumps(first))
    assert all(np.array_equal(a, revived[i][0]) for i, a in enumerate(images))
    plain = ImageDataset(paths, y, 32)
    assert sum(not np.array_equal(a, plain[i][0]) for i, a in enumerate(images)) >= len(paths) - 1  # it augments
    first.epoch = 1
    assert all(not np.array_equal(a, first[i][0]) for i, a in enumerate(images))  # another epoch, other draws
    other_seed = ImageDataset(paths, y, 32, augment=PIPELINE, seed=1)
    assert all(not np.array_equal(a, other_seed[i][0]) for i, a in enumerate(images))


@needs_albumentations
def test_a_spawned_loader_worker_gives_the_same_batches(demo_dir):
    """A fresh process (pickled dataset, albumentations imported anew, OpenCV's RNG untouched) draws the same."""
    paths, y = demo_paths(demo_dir)
    dataset = ImageDataset(paths, y, 32, augment=PIPELINE)
    dataset.epoch = 2
    here = [b[0] for b in create_loader(dataset, 4)]
    spawned = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate,
                                          multiprocessing_context="spawn")
    assert all(torch.equal(a, b[0]) for a, b in zip(here, spawned, strict=True))


@needs_albumentations
def test_a_pipeline_that_returns_no_uint8_image_is_refused_by_the_loader(demo_dir):
    paths, y = demo_paths(demo_dir, 2)
    normalize = with_transform({"__class_fullname__": "Normalize", "p": 1.0})
    with pytest.raises(UserError, match="remove Normalize"):
        ImageDataset(paths, y, 32, augment=normalize)
    unchecked = albu.Pipeline(normalize)  # built without the check: the first image says the same
    with pytest.raises(ValueError, match=r"returned ndarray float32 \(32, 32, 3\), not the uint8 HxWx3 RGB image: "
                                         "Normalize turns .* remove Normalize"):
        unchecked(ImageDataset(paths, y, 32)[0][0], np.random.default_rng(0))


def test_albumentations_is_imported_only_when_a_pipeline_is_used():
    code = ("import sys, ensemble.data.loader, ensemble.tune.spaces, ensemble.tune.train; "
            "assert 'albumentations' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_without_albumentations_a_pipeline_says_which_extra_to_install(tmp_path):
    path = write_space(tmp_path, {"augment": PIPELINE})
    code = ("import sys; sys.modules['albumentations'] = None  # import albumentations now raises ImportError\n"
            f"from ensemble.tune.cli import main; sys.exit(main(['--space', {str(path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {path}: 'data.augment': An albumentations pipeline needs albumentations")
    assert "pip install 'ensemble[albumentations]'" in proc.stderr


# --------------------------------------------------------------------------- a real sweep


@needs_albumentations
@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_equals_uninterrupted(tmp_path, demo_dir, ray_cluster):
    from ensemble.tune import launch as tune

    path = small_space(tmp_path, demo_dir, rows=240, epochs=3)
    space = yaml.safe_load(path.read_text())
    space["data"]["augment"] = PIPELINE
    path.write_text(yaml.safe_dump(space))
    storage = tmp_path / "killed"
    proc = cli("--space", str(path), "--storage", str(storage), "--name", "run", "-v", "0")
    run_dir = storage / "run"
    kill_mid_training(proc, run_dir, "models/*/fold*/metrics.json")
    before = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("models/*/fold*/metrics.json")}
    assert before and not all(m["complete"] for m in before.values())
    config = json.loads(next(run_dir.glob("models/*/config.json")).read_text())
    assert config["data"]["augment"] == PIPELINE and config["stages"][0]["augment"] == PIPELINE

    resumed = cli("--space", str(path), "--storage", str(storage), "--name", "run", "--resume", "-v", "0")
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out
    after = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("models/*/fold*/metrics.json")}
    for fold, metrics in before.items():  # finished epochs were kept, not trained again
        assert after[fold]["history"][: metrics["epochs"]] == metrics["history"]
    assert all(m["complete"] and m["epochs"] == 3 for m in after.values())

    straight = tmp_path / "straight" / "run"
    tune.run_sweep(spaces.load_space(str(path)), straight, verbose=0)
    a, b = oof(run_dir), oof(straight)
    assert a.keys() == b.keys()
    for model_id in a:
        pd.testing.assert_frame_equal(a[model_id], b[model_id])
