"""Growing a run: added models and rounds on the same folds, warm starts, fold-safe pseudo-labels, hard examples."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sweep_fixtures import kill_mid_training, oof, small_space
from test_spaces import load, load_error

from ensemble.errors import UserError
from ensemble.models import create_model
from ensemble.run import Run
from ensemble.tune import launch
from ensemble.tune.spaces import apply_smoke, check_frozen, freeze_space, load_space, resolve_models
from ensemble.tune.train import FoldTrainer, pseudo_labels, train_fold

REPO = Path(__file__).resolve().parent.parent
ROUND = {"init": "previous", "epochs": 1}


# --------------------------------------------------------------------------- the space


def test_rounds_resolve_to_one_model_per_base_model_and_round(tmp_path):
    space = load(tmp_path, {"search": {"lr": {"grid": [0.1, 0.01]}}, "data": {"test_manifest": "demo:test"},
                            "rounds": [dict(ROUND, pseudo={"from": "test"}), {"init": 1, "stages": [{"epochs": 2}]}]})
    base = resolve_models(load(tmp_path, {"search": {"lr": {"grid": [0.1, 0.01]}}}))
    models = resolve_models(space)
    assert [m.model_id for m in models[:2]] == [m.model_id for m in base]  # round 1 keeps the ids it had
    assert [m.model_id for m in models[2:]] == [f"{m.model_id}-r{r}" for r in (2, 3) for m in base]
    assert [m.round for m in models] == [1, 1, 2, 2, 3, 3]
    first, second = space.rounds
    assert first.stages[0].epochs == 1 and first.pseudo == {"from": "test", "labels": "soft", "min_confidence": 0.0,
                                                            "temperature": 1.0, "max_per_class": None, "weight": 1.0}
    assert second.epochs == 2 and second.pseudo is None and second.hard_examples is None


@pytest.mark.parametrize("rounds,says", [
    ([{"init": 2}], "'rounds[0].init': 2 is not an earlier round; this is round 2"),
    ([{"hard_examples": {"top": 0.2}}], "hard_examples fine-tune the earlier round's fold models; set init"),
    ([{"pseudo": {"from": "test"}}], "'rounds[0].pseudo.from': test, but the space has no data.test_manifest"),
    ([{"epochs": 1, "stages": [{"epochs": 5}]}], "'rounds[0]': ['epochs'] with stages; keep one"),
    ([{"lr_scale": 0.5, "stages": [{"epochs": 5}]}], "'rounds[0]': ['lr_scale'] with stages; keep one"),
    ([{"init": "previous", "stages": [{"epochs": 7}], "hard_examples": {}}],
     "'rounds[0]': ['stages'] with hard_examples, which set their own epochs and lr_scale"),
    ([{"init": "warm"}], "'rounds[0].init' must be 'scratch', 'previous' or the number of an earlier round"),
    ([{"pseudo": {"labels": "fuzzy"}}], "'rounds[0].pseudo.labels' must be one of ['soft', 'hard']"),
])
def test_bad_rounds_are_named(tmp_path, rounds, says):
    assert says in load_error(tmp_path, {"rounds": rounds})


def test_multilabel_pseudo_labels_have_no_max_per_class(tmp_path):
    base = {"data": {"manifest": "demo:multilabel", "test_manifest": "demo:test"}, "backbones": ["test_resnet"]}
    says = "'rounds[0].pseudo.max_per_class' is for single-label targets"
    assert says in load_error(tmp_path, {"rounds": [{"pseudo": {"max_per_class": 5}}]}, base=base)


@pytest.mark.parametrize("item,says", [
    ({"init": "previous", "pseudo": {"from": "nowhere.csv"}}, "'rounds[0].pseudo.from': "),
    ({"manifest": "missing.csv"}, "'rounds[0].manifest': "),
])
def test_a_rounds_missing_file_is_refused_before_anything_is_written(tmp_path, demo_dir, item, says):
    path = small_space(tmp_path, demo_dir, rows=60, rounds=[item])
    with pytest.raises(UserError, match=re.escape(f"{path}: {says}") + r".*\.csv: file not found\."):
        launch.run_sweep(load_space(str(path)), tmp_path / "runs" / "r", verbose=0)
    assert not (tmp_path / "runs").exists()


def test_smoke_shrinks_every_round():
    smoke = apply_smoke(load_space("demo_rounds"))
    assert [stage["image_size"] for stage in smoke.raw["stages"]] == [None, None]  # all at smoke.image_size
    assert [(r.epochs, r.manifest, r.stages[0]["image_size"]) for r in smoke.rounds] == [(1, None, None)] * 3


def test_a_retrieval_space_has_no_rounds(tmp_path):
    base = {"task": "retrieval", "data": {"manifest": "demo:retrieval"}, "backbones": ["test_resnet"]}
    assert "rounds are for classification spaces" in load_error(tmp_path, {"rounds": [ROUND]}, base=base)


# --------------------------------------------------------------------------- growing


def test_a_run_grows_by_backbones_values_samples_and_rounds(tmp_path):
    run = tmp_path / "run"
    freeze_space(load(tmp_path, {"search": {"lr": {"grid": [0.1]}}}, name="a"), run)
    grown = load(tmp_path, {"backbones": ["test_resnet", "test_efficientnet"], "search": {"lr": {"grid": [0.1, 0.01]}},
                            "rounds": [ROUND]}, name="a")
    assert check_frozen(grown, run) == ["backbones: +['test_efficientnet']", "search.lr.grid: +[0.01]",
                                        "rounds: +1 round(s)"]
    freeze_space(grown, run, check_frozen(grown, run))
    text = (run / "space.yaml").read_text()
    assert "# grown " in text and "backbones: +['test_efficientnet']; search.lr.grid: +[0.01]" in text
    assert load_space(str(run / "space.yaml")).raw == grown.raw and check_frozen(grown, run) == []


@pytest.mark.parametrize("changes,says", [
    ({"backbones": ["test_efficientnet"]}, "which would change or drop 4 of its models (test_resnet-"),
    ({"search": {"lr": {"grid": [0.01, 0.1]}}, "backbones": ["test_resnet"]}, None),  # reordered: same models
    ({"params": {"batch_size": 8}}, "params.batch_size: 32 -> 8"),
    ({"rounds": [{"init": "previous", "epochs": 3}]},
     "changed: rounds[0].stages[0].epochs: 1 -> 3; rounds[0].epochs: 1 -> 3. Rounds may be added after the last one"),
    ({"weights": {"test_resnet": "w.pth"}, "pretrained": True}, "weights.test_resnet: (absent) -> '"),
])
def test_growing_never_changes_a_model_the_run_has(tmp_path, changes, says):
    run = tmp_path / "run"
    (tmp_path / "w.pth").write_bytes(b"")
    freeze_space(load(tmp_path, {"search": {"lr": {"grid": [0.1, 0.01]}}, "rounds": [ROUND]}, name="a"), run)
    changed = load(tmp_path, {"search": {"lr": {"grid": [0.1, 0.01]}}, "rounds": [ROUND], **changes}, name="a")
    if says is None:
        assert check_frozen(changed, run)  # grown nothing, only reordered: allowed, no model changes
        return
    with pytest.raises(UserError, match="A run keeps its space") as info:
        check_frozen(changed, run)
    assert says in str(info.value)


@pytest.mark.slow
def test_growth_that_would_redraw_samples_is_refused(tmp_path):
    search = {"lr": {"choice": [0.1, 0.01]}, "dropout": {"uniform": [0.0, 0.5]}, "drop_path": {"grid": [0.0, 0.1]}}
    sampled = {"search": search, "num_samples": 6}
    freeze_space(load(tmp_path, sampled, name="a"), tmp_path / "run")
    more = load(tmp_path, dict(sampled, num_samples=7), name="a")
    assert check_frozen(more, tmp_path / "run") == ["num_samples: 6 -> 7"]  # the first draws stay
    for changed in ({"lr": {"choice": [0.1, 0.01, 0.001, 0.0001]}},  # other lr draws
                    {"drop_path": {"grid": [0.0, 0.1, 0.2]}}):  # the samples paired with other grid values
        with pytest.raises(UserError, match="which would change or drop"):
            check_frozen(load(tmp_path, dict(sampled, search=search | changed), name="a"), tmp_path / "run")


@pytest.mark.slow
def test_a_round_manifest_adds_rows_that_get_folds_and_every_stage_runs(tmp_path, demo_dir):
    path = small_space(tmp_path, demo_dir, rows=60, epochs=1)
    launch.prepare_run(load_space(str(path)), tmp_path / "alone")  # the same space without rounds
    stage2 = tmp_path / "stage2.csv"  # rows 20-59 again and 40 new ones
    pd.read_csv(demo_dir / "multiclass.csv").iloc[20:100].to_csv(stage2, index=False)
    doc = yaml.safe_load(path.read_text())
    doc["rounds"] = [{"manifest": str(stage2), "epochs": 1}]
    path.write_text(yaml.safe_dump(doc))
    run_dir = tmp_path / "run"
    configs = launch.prepare_run(load_space(str(path)), run_dir)
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"id": str})
    alone = pd.read_csv(tmp_path / "alone" / "folds.csv", dtype={"id": str})
    assert len(folds) == 100 and folds["id"].is_unique and folds.head(60).equals(alone)  # old rows keep their folds
    assert folds.tail(40)["fold"].value_counts().to_dict() == {0: 20, 1: 20}  # the new rows, stratified
    assert configs[1]["data"]["manifest"] == str(stage2) and configs[1]["round"] == 2 and configs[1]["init_from"] is None
    for config in configs:  # each model trains on its own manifest's rows, and is finalised as the sweep does
        for fold in range(2):
            train_fold(config, fold, run_dir)
        Run(run_dir).finalize_model(config)
    assert [len(pd.read_parquet(run_dir / "models" / c["model_id"] / "oof.parquet")) for c in configs] == [60, 80]
    out = {}
    for stage in ("predict", "stack", "report"):
        proc = subprocess.run([sys.executable, "-m", f"ensemble.{stage}", "--run", str(run_dir),
                               *(["--method", "greedy"] if stage == "stack" else [])],  # 2 folds: no meta-models
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        out[stage] = proc.stdout
    assert "stacking the 40 rows every model trained on: 60 rows of folds.csv are in some rounds' manifests only" \
        in out["stack"]
    scores = pd.read_csv(run_dir / "ensemble" / "scores.csv")
    assert {"mean", "greedy"} <= set(scores["method"])


def test_a_round_manifests_rows_of_a_known_group_join_that_groups_fold(tmp_path, demo_dir):
    grouped = pd.read_csv(demo_dir / "grouped.csv")
    grouped.head(120).to_csv(tmp_path / "stage1.csv", index=False)
    grouped.iloc[60:240].to_csv(tmp_path / "stage2.csv", index=False)
    path = small_space(tmp_path, demo_dir, folds={"k": 3, "strategy": "group", "seed": 0},
                       rounds=[{"manifest": str(tmp_path / "stage2.csv"), "epochs": 1}])
    doc = yaml.safe_load(path.read_text())
    doc["data"]["manifest"] = str(tmp_path / "stage1.csv")
    path.write_text(yaml.safe_dump(doc))
    launch.prepare_run(load_space(str(path)), tmp_path / "run")
    folds = pd.read_csv(tmp_path / "run" / "folds.csv", dtype=str)
    assert len(folds) == 240 and (folds.groupby("group")["fold"].nunique() == 1).all()  # no group in two folds
    assert set(folds["fold"]) == {"0", "1", "2"}


# --------------------------------------------------------------------------- pseudo-labels


def test_pseudo_labels_follow_their_settings():
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [np.nan, np.nan]]))
    settings = {"temperature": 1.0, "min_confidence": 0.0, "max_per_class": None, "labels": "soft"}
    rows, targets = pseudo_labels(logits, "multiclass", settings)
    assert rows.tolist() == [0, 1, 2, 3] and np.allclose(targets, np.exp(logits[:4]))  # the unreadable row is out
    rows, targets = pseudo_labels(logits, "multiclass", dict(settings, min_confidence=0.65, labels="hard"))
    assert rows.tolist() == [0, 2, 3] and targets.tolist() == [[1, 0], [0, 1], [0, 1]]
    rows, _ = pseudo_labels(logits, "multiclass", dict(settings, max_per_class=1))
    assert rows.tolist() == [0, 2]  # the most confident row of each predicted class
    rows, targets = pseudo_labels(logits, "multiclass", dict(settings, temperature=0.5))
    assert np.allclose(targets[0], [0.81 / 0.82, 0.01 / 0.82])  # sharper: p^2, renormalised
    rows, targets = pseudo_labels(np.array([[3.0, -3.0], [0.1, 4.0]]), "multilabel", dict(settings, min_confidence=0.9))
    assert rows.tolist() == [0] and np.allclose(targets, [[1 / (1 + np.exp(-3)), 1 / (1 + np.exp(3))]])


def _accuracy(run_dir: Path, model_id: str, fold: int, manifest: Path) -> float:
    frame = pd.read_parquet(run_dir / "models" / model_id / f"fold{fold}" / "oof.parquet")
    truth = pd.read_csv(manifest, dtype={"id": str}).set_index("id")["label"]
    classes = [c for c in frame.columns if c not in ("id", "fold")]
    return float((np.array(classes)[frame[classes].to_numpy().argmax(1)] == truth.loc[frame["id"]].to_numpy()).mean())


@pytest.mark.slow
def test_fold_safe_pseudo_labels_keep_a_shuffled_fold_at_chance_while_ensemble_ones_leak(tmp_path, demo_dir):
    """Fold 0's labels are shuffled (nothing in its images predicts them) and the 'test set' is fold 0's
    images again. The fold-1 and fold-2 models of round 1 learn fold 0's shuffled labels; pseudo-labels
    from the all-folds ensemble carry them into round 2's fold-0 model, whose CV then reads far above
    chance. The fold-safe pseudo-labels come from round 1's fold-0 model, which never saw them."""
    path = small_space(tmp_path, demo_dir, rows=300, epochs=20, folds={"k": 3, "strategy": "kfold", "seed": 0},
                       params={"lr": 1e-2, "batch_size": 25, "image_size": 16, "scheduler": "none"})
    doc = yaml.safe_load(path.read_text())
    doc["data"].update(augment="orig", normalize={"mean": [0.1, 0.1, 0.1], "std": [0.3, 0.3, 0.3]})
    doc["metric"] = "accuracy"  # the best epoch by accuracy: late enough to have learnt the training rows' labels
    test_csv = tmp_path / "fold0_again.csv"
    doc["rounds"] = [{"init": "scratch", "epochs": 20, "pseudo": {"from": str(test_csv), "labels": "hard"}}]
    path.write_text(yaml.safe_dump(doc))
    first = pd.read_csv(doc["data"]["manifest"]).head(1)  # a stand-in, checked at launch: filled once folds exist
    first.assign(id="x").drop(columns="label").to_csv(test_csv, index=False)
    safe = tmp_path / "safe"
    configs = launch.prepare_run(load_space(str(path)), safe)
    manifest = Path(doc["data"]["manifest"])
    frame = pd.read_csv(manifest, dtype={"id": str})
    folds = pd.read_csv(safe / "folds.csv", dtype={"id": str}).set_index("id")["fold"]
    in_fold0 = (folds.loc[frame["id"]] == 0).to_numpy()
    rng = np.random.default_rng(0)
    frame.loc[in_fold0, "label"] = rng.permutation(frame.loc[in_fold0, "label"].to_numpy())  # unlearnable labels
    frame.to_csv(manifest, index=False)
    frame[in_fold0].assign(id="t" + frame[in_fold0]["id"]).drop(columns="label").to_csv(test_csv, index=False)

    base, round2 = configs
    for fold in range(3):
        train_fold(base, fold, safe)
    leaky = tmp_path / "leaky"
    shutil.copytree(safe, leaky)
    # The leaky variant: round 2's fold-0 pseudo-labels from the mean of all three fold models.
    test = pd.read_csv(test_csv, dtype={"id": str})
    trainer = FoldTrainer(base, 0, leaky)
    mean = 0
    for fold in range(3):
        model = create_model(base["backbone"], len(base["classes"]))
        model.load_state_dict(torch.load(leaky / "models" / base["model_id"] / f"fold{fold}" / "weights.pt"))
        logits = trainer._predict_logits(model, [str(demo_dir / p) for p in test["image"]], base)
        mean = mean + torch.softmax(torch.as_tensor(logits), -1).numpy() / 3
    rows, targets = pseudo_labels(np.log(mean), "multiclass", round2["pseudo"])
    out = leaky / "models" / round2["model_id"] / "fold0"
    out.mkdir(parents=True)
    pd.concat([pd.DataFrame({"id": test["id"][rows], "row": rows}).reset_index(drop=True),
               pd.DataFrame(targets, columns=base["classes"])], axis=1).to_parquet(out / "pseudo.parquet")

    for run_dir in (safe, leaky):
        train_fold(round2, 0, run_dir)
    chance_like = _accuracy(safe, round2["model_id"], 0, manifest)
    leaked = _accuracy(leaky, round2["model_id"], 0, manifest)
    fitted = _accuracy(safe, base["model_id"], 1, manifest)  # a round-1 model on its own held-out fold: real digits
    print(f"fold 0 (shuffled labels) accuracy: fold-safe {chance_like:.2f}, ensemble {leaked:.2f}; fold 1: {fitted:.2f}")
    assert leaked >= chance_like + 0.3, (leaked, chance_like, fitted)
    assert chance_like <= 0.35, chance_like


# --------------------------------------------------------------------------- on Ray


def _files(run_dir: Path, model_ids) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for m in model_ids
            for p in sorted((run_dir / "models" / m).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_finished_run_grows_by_a_backbone_without_touching_its_models(tmp_path, demo_dir, ray_cluster):
    path = small_space(tmp_path, demo_dir, rows=120, epochs=1)
    run_dir = tmp_path / "run"
    launch.run_sweep(load_space(str(path)), run_dir, verbose=0)
    (old_id,) = [m.model_id for m in resolve_models(load_space(str(path)))]
    before, folds = _files(run_dir, [old_id]), (run_dir / "folds.csv").read_bytes()
    doc = yaml.safe_load(path.read_text())
    doc["backbones"] = ["test_resnet", "test_efficientnet"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match="already holds a sweep"):  # growing is a resume
        launch.run_sweep(load_space(str(path)), run_dir, verbose=0)
    board = launch.run_sweep(load_space(str(path)), run_dir, resume=True, verbose=0)
    assert _files(run_dir, [old_id]) == before and (run_dir / "folds.csv").read_bytes() == folds
    assert sorted(board["state"]) == ["complete", "complete"] and len(board) == 2
    assert "# grown " in (run_dir / "space.yaml").read_text()


def cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ensemble.tune", *args], cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_two_rounds_resume_after_sigkill_mid_round_two_with_identical_oof(tmp_path, demo_dir, ray_cluster):
    path = small_space(tmp_path, demo_dir, rows=120, epochs=1)
    doc = yaml.safe_load(path.read_text())
    doc["rounds"] = [{"init": "previous", "epochs": 3, "lr_scale": 0.5,
                      "pseudo": {"from": "test", "max_per_class": 20, "weight": 0.5}}]
    path.write_text(yaml.safe_dump(doc))
    storage = tmp_path / "killed"
    proc = cli("--space", str(path), "--storage", str(storage), "--name", "run", "-v", "0")
    kill_mid_training(proc, storage, "run/models/*-r2/fold*/metrics.json", 300)  # mid round 2
    resumed = subprocess.run([sys.executable, "-m", "ensemble.tune", "--space", str(path), "--storage", str(storage),
                              "--name", "run", "--resume"], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 model(s) already complete, not run again" in resumed.stdout and "r2" in resumed.stdout
    assert "vs r1" in resumed.stdout  # the leaderboard shows what round 2 did to its model

    straight = tmp_path / "straight" / "run"
    launch.run_sweep(load_space(str(path)), straight, verbose=0)
    a, b = oof(storage / "run"), oof(straight)
    assert len(a) == 2 and a.keys() == b.keys()
    for model_id in a:
        pd.testing.assert_frame_equal(a[model_id], b[model_id])
    round2 = next((storage / "run" / "models").glob("*-r2"))
    pseudo = [pd.read_parquet(round2 / f"fold{fold}" / "pseudo.parquet") for fold in range(2)]
    test_ids = set(pd.read_csv(demo_dir / "test.csv", dtype={"id": str})["id"])
    for frame in pseudo:  # at most 20 per predicted class, from the test set
        assert 0 < len(frame) <= 200 and set(frame["id"]) <= test_ids
    assert not pseudo[0].equals(pseudo[1])  # each fold's from its own round-1 model
    board = pd.read_csv(storage / "run" / "leaderboard.csv")
    assert sorted(board["round"]) == [1, 2] and board["gain"].notna().sum() == 1


@pytest.mark.slow
def test_rounds_at_a_uri_pull_their_start_and_push_what_they_train_on(tmp_path, demo_dir, ray_cluster):
    """A fold task works in its node's mirror: it pulls the earlier round's fold and pushes its pseudo rows
    and hard examples with its checkpoints, so another machine resumes from the URI alone."""
    path = small_space(tmp_path, demo_dir, rows=80, epochs=1)
    doc = yaml.safe_load(path.read_text())
    doc["rounds"] = [{"init": "previous", "epochs": 1, "pseudo": {"from": "test", "max_per_class": 5}},
                     {"init": "previous", "hard_examples": {"top": 0.5, "epochs": 1}}]
    path.write_text(yaml.safe_dump(doc))
    uri = (tmp_path / "bucket" / "run").as_uri()
    board = launch.run_sweep(load_space(str(path)), uri, verbose=0)
    assert sorted(board["round"]) == [1, 2, 3] and set(board["state"]) == {"complete"}
    remote = tmp_path / "bucket" / "run" / "models"
    for fold in range(2):
        assert len(pd.read_parquet(next(remote.glob("*-r2")) / f"fold{fold}" / "pseudo.parquet")) > 0
        assert json.loads((next(remote.glob("*-r3")) / f"fold{fold}" / "hard_examples.json").read_text())["ids"]


@pytest.mark.slow
def test_pseudo_rows_are_made_once_and_a_changed_source_is_refused(tmp_path, demo_dir):
    source = tmp_path / "unlabelled.csv"
    pd.read_csv(demo_dir / "test.csv").head(50).to_csv(source, index=False)
    path = small_space(tmp_path, demo_dir, rows=80, epochs=1,
                       rounds=[{"init": "previous", "epochs": 1, "pseudo": {"from": str(source)}}])
    base, second = launch.prepare_run(load_space(str(path)), tmp_path / "run")
    train_fold(base, 0, tmp_path / "run")
    made = FoldTrainer(second, 0, tmp_path / "run")
    pseudo = tmp_path / "run" / "models" / second["model_id"] / "fold0" / "pseudo.parquet"
    assert len(made.train_ids) == 40 + 50 and made.w_train.tolist() == [1.0] * 90  # weight 1 by default
    again = FoldTrainer(second, 0, tmp_path / "run")  # read back, not made again
    assert again.train_ids == made.train_ids and np.array_equal(again.y_train, made.y_train)
    pd.read_csv(source).iloc[::-1].to_csv(source, index=False)  # the source changed under the round
    with pytest.raises(UserError, match=f"changed since this fold's pseudo-labels were made \\({pseudo}\\)"):
        FoldTrainer(second, 0, tmp_path / "run")


@pytest.mark.slow
def test_hard_examples_fine_tune_on_the_worst_training_rows(tmp_path, demo_dir):
    path = small_space(tmp_path, demo_dir, rows=80, epochs=1)
    doc = yaml.safe_load(path.read_text())
    doc["rounds"] = [{"init": "previous", "hard_examples": {"top": 0.25, "epochs": 1}}]
    path.write_text(yaml.safe_dump(doc))
    base, hard = launch.prepare_run(load_space(str(path)), tmp_path / "run")
    train_fold(base, 0, tmp_path / "run")
    trainer = FoldTrainer(hard, 0, tmp_path / "run")
    chosen = json.loads((tmp_path / "run" / "models" / hard["model_id"] / "fold0" / "hard_examples.json").read_text())
    assert chosen["from"] == base["model_id"] and len(chosen["ids"]) == len(trainer.train_ids) == 10
    folds = pd.read_csv(tmp_path / "run" / "folds.csv", dtype={"id": str}).set_index("id")["fold"]
    assert (folds.loc[chosen["ids"]] == 1).all()  # training rows of fold 0's model only
    # Worst: the rows whose loss under the start weights is highest.
    start = FoldTrainer(base, 0, tmp_path / "run")
    start.model.load_state_dict(torch.load(tmp_path / "run" / "models" / base["model_id"] / "fold0" / "weights.pt"))
    logits = torch.as_tensor(start._predict_logits(start.model, [start.paths[i] for i in start.train_rows], base))
    loss = -(torch.as_tensor(start.y_train) * torch.log_softmax(logits, -1)).sum(-1).numpy()
    assert set(chosen["ids"]) == {start.train_ids[i] for i in np.argsort(-loss)[:10]}
    with pytest.raises(RuntimeError, match="fold 1, which is not complete"):
        FoldTrainer(hard, 1, tmp_path / "run")  # fold 1 of round 1 never trained
