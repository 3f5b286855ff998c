"""TTA prediction on a real tiny sweep: view merging, outputs, skip-and-resume, placement, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from ensemble.errors import UserError
from ensemble.predict import cli, plan, pool, predict_run
from ensemble.predict.outputs import write_submission
from ensemble.run import Run, open_run

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = ("oof_tta.parquet", "test.parquet")


# --------------------------------------------------------------------------- a real tiny sweep, once per module


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, demo_dir, ray_cluster):
    """A finished sweep (2 models x 2 folds of test_resnet, 160 digits, 1 epoch), never predicted."""
    from ensemble.tune import launch, spaces

    tmp = tmp_path_factory.mktemp("predict")
    pd.read_csv(demo_dir / "multiclass.csv").head(160).to_csv(tmp / "small.csv", index=False)
    space = {"data": {"manifest": str(tmp / "small.csv"), "root": str(demo_dir), "test_manifest": "demo:test",
                      "preprocess": "pad", "augment": "shift:0.1", "tta": "orig", "normalize": "dataset"},
             "folds": {"k": 2, "strategy": "stratified", "seed": 0}, "backbones": ["test_resnet"],
             "params": {"lr": 3.0e-3, "batch_size": 32, "image_size": 32}, "epochs": 1, "metric": "log_loss",
             "search": {"weight_decay": {"grid": [0.0, 0.05]}}, "resources": {"cpu": 1}}
    (tmp / "space.yaml").write_text(yaml.safe_dump(space))
    launch.run_sweep(spaces.load_space(str(tmp / "space.yaml")), tmp / "run", verbose=0)
    return tmp / "run"


def copy_run(pristine: Path, dest: Path) -> Path:
    return Path(shutil.copytree(pristine, dest / "run"))


def model_ids(run: Path) -> list[str]:
    return sorted(p.parent.name for p in (run / "models").glob("*/config.json"))


@pytest.fixture(scope="module")
def actors(ray_cluster):
    """Two CPU predictor actors shared by the tests below (each new pool pays the torch + timm imports).

    They hold 1 of the cluster's 2 CPUs, so the pools other tests make must fit in the other one.
    """
    handles, _ = pool.create_pool(2, 0.5, 0)
    yield handles
    for a in handles:
        ray_cluster.kill(a)


@pytest.fixture(scope="module")
def predicted(pristine, tmp_path_factory, actors):
    """The run predicted through the pool with 'orig,hflip' and per-view outputs."""
    run = copy_run(pristine, tmp_path_factory.mktemp("predicted"))
    summary = predict_run(run, tta="orig,hflip", per_view=True, gpus_per_actor=0, shard_size=300,
                                  progress=False, actors=actors)
    return run, summary


# --------------------------------------------------------------------------- a real model, in process


def test_hflip_tta_of_flip_invariant_input_equals_no_tta(pristine, tmp_path, demo_dir):
    """Mirror-symmetric images at the model's size: 'orig,hflip' must equal 'orig'; asymmetric ones must not."""
    test = pd.read_csv(demo_dir / "test.csv").head(40)
    sym, asym = [], []
    for i, rel in enumerate(test["image"]):
        img = cv2.resize(cv2.imread(str(demo_dir / rel)), (32, 32))  # the model's size: no resize after this
        asym.append(str(tmp_path / f"a{i}.png"))
        cv2.imwrite(asym[-1], img)
        img[:, 16:] = img[:, :16][:, ::-1]
        sym.append(str(tmp_path / f"s{i}.png"))
        cv2.imwrite(sym[-1], img)
    model = plan.plan_run(Run(pristine), tta="orig,hflip", per_view=True, models=model_ids(pristine)[:1], force=True)[0][0]
    job = dataclasses.replace(model.jobs[1, "test"], cache=None, batch=8)
    plain = dataclasses.replace(job, tta="orig", n_views=1, batch=16)
    predictor = pool.Predictor(cpus=None)

    out = predictor.predict(job, sym, 0, len(sym))
    np.testing.assert_array_equal(out["views"][:, 0], out["views"][:, 1])  # bit-identical inputs, one forward
    np.testing.assert_allclose(out["merged"], predictor.predict(plain, sym, 0, len(sym))["merged"], rtol=0, atol=1e-6)

    out = predictor.predict(job, asym, 0, len(asym))
    assert np.abs(out["views"][:, 0] - out["views"][:, 1]).max() > 1e-4  # the flip really happened
    np.testing.assert_allclose(out["merged"], out["views"].astype(np.float64).mean(1), rtol=0, atol=1e-7)
    np.testing.assert_allclose(out["views"][:, 0], predictor.predict(plain, asym, 0, len(asym))["merged"], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- through the actor pool


def test_one_decoded_cache_serves_every_fold_model_and_the_held_out_predictions(predicted, pristine):
    """2 models x 2 folds decode each training image once, into one cache of all folds.csv images; predict
    reads the held-out rows from it and adds one cache for the test images."""
    def caches(run):
        return sorted(p for p in (run / "cache").glob("decoded-*.npy") if not p.name.endswith(".filled.npy"))

    trained = caches(pristine)
    assert len(trained) == 1
    n = len(pd.read_csv(pristine / "folds.csv"))
    assert np.load(trained[0], mmap_mode="r").shape[0] == n
    assert np.load(trained[0].with_suffix(".filled.npy")).all()  # every row decoded, by some fold
    after = caches(predicted[0])
    assert len(after) == 2 and trained[0].name in {p.name for p in after}


def test_outputs_match_the_contract(predicted, pristine):
    run, summary = predicted
    assert summary["predicted"] == model_ids(run) and summary["actors"] == 2 and summary["gpus"] == 0
    assert summary["images"] == 2 * (160 + 2 * 1000) and summary["loads"] >= 4  # per model: OOF rows + k x test rows
    test_ids = pd.read_csv(Path(json.loads((run / "models" / model_ids(run)[0] / "config.json").read_text())
                                ["data"]["test_manifest"]), dtype=str)["id"]
    for model_id in model_ids(run):
        d = run / "models" / model_id
        oof, tta, views = (pd.read_parquet(d / f) for f in ("oof.parquet", "oof_tta.parquet", "oof_views.parquet"))
        assert list(tta.columns) == list(oof.columns)  # id, fold, classes
        pd.testing.assert_frame_equal(tta[["id", "fold"]], oof[["id", "fold"]])
        classes = list(oof.columns[2:])
        orig = views[views["view"] == "orig"][classes].to_numpy()
        hflip = views[views["view"] == "hflip"][classes].to_numpy()
        # the orig view is what training wrote: each held-out row by its own fold's model, same order
        np.testing.assert_allclose(orig, oof[classes].to_numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(tta[classes].to_numpy(), (orig.astype(np.float64) + hflip) / 2, rtol=0, atol=1e-7)
        test = pd.read_parquet(d / "test.parquet")
        assert list(test.columns) == ["id"] + classes and test["id"].tolist() == test_ids.tolist()
        np.testing.assert_allclose(test[classes].sum(axis=1), 1, atol=1e-5)
        tv = pd.read_parquet(d / "test_views.parquet")  # test = mean over folds of the merged views
        merged = (tv[tv["view"] == "orig"][classes].to_numpy(np.float64) + tv[tv["view"] == "hflip"][classes].to_numpy()) / 2
        np.testing.assert_allclose(test[classes].to_numpy(), merged, rtol=0, atol=1e-6)
        meta = json.loads((d / "predict.json").read_text())
        assert meta["tta"] == "orig,hflip" and meta["views"] == ["orig", "hflip"] and meta["merge"] == "mean"
        assert meta["seconds"] > 0  # the actors' time on the model: the report's predict time
        assert {"oof log_loss", "oof_tta log_loss", "view orig", "view hflip"} <= set(summary["scores"][model_id])
    from ensemble.stack.oof import load_run

    assert set(load_run(run).sources.values()) == {"oof_tta.parquet"}  # the stacking stage takes them as they are


def test_complete_models_are_skipped_and_an_interrupted_one_resumes(predicted, actors, capsys):
    run, _ = predicted
    first, second = (run / "models" / m for m in model_ids(run))
    stamps = {p: p.stat().st_mtime_ns for p in (run / "models").rglob("*.parquet")}
    again = predict_run(run, tta="orig,hflip", gpus_per_actor=0, progress=False)
    assert again["predicted"] == [] and set(again["skipped"]) == set(model_ids(run))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    kept = predict_run(run, tta="orig", gpus_per_actor=0, progress=False)  # other settings: kept, and said so
    assert kept["predicted"] == [] and "--force" in capsys.readouterr().out

    before = pd.read_parquet(second / "oof_tta.parquet")
    (second / "oof_tta.parquet").unlink()  # killed between its two writes, with a temp file left behind
    (second / ".oof_tta.parquet.x1y2.tmp").write_bytes(b"partial")
    resumed = predict_run(run, tta="orig,hflip", gpus_per_actor=0, progress=False, actors=actors)
    assert resumed["predicted"] == [second.name] and list(resumed["skipped"]) == [first.name]
    pd.testing.assert_frame_equal(pd.read_parquet(second / "oof_tta.parquet"), before, check_exact=False, rtol=1e-6)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.parent == first)


def test_smoke_and_submission(pristine, tmp_path, ray_cluster, capsys):
    run = copy_run(pristine, tmp_path)
    assert cli.main(["--run", str(run), "--smoke", "--submission", "--gpus-per-actor", "0", "--no-progress",
                         "--tta", "fivecrop,fivecrop+hflip", "--merge", "gmean"]) == 0
    for model_id in model_ids(run):
        smoke = run / "predict-smoke" / model_id
        assert len(pd.read_parquet(smoke / "oof_tta.parquet")) == 2 * plan.SMOKE_ROWS
        assert len(json.loads((smoke / "predict.json").read_text())["views"]) == 10
        sub = pd.read_csv(smoke / "submission.csv")
        assert len(sub) == 2 * plan.SMOKE_ROWS and sub.columns[0] == "id"
        assert not any((run / "models" / model_id / f).exists() for f in OUTPUTS)  # the real outputs stay untouched


def test_predict_submission_and_stack_on_a_uri_run(pristine, tmp_path, actors, monkeypatch, capsys):
    """A run stored at a URI: outputs land at the URI; this machine's mirror never fetches training checkpoints."""
    from ensemble.stack import cli as stack

    remote = copy_run(pristine, tmp_path / "bucket")
    uri = remote.as_uri()
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "mirror"))
    summary = predict_run(uri, gpus_per_actor=0, progress=False, actors=actors)
    assert sorted(summary["predicted"]) == model_ids(remote)
    for model_id in model_ids(remote):
        assert all((remote / "models" / model_id / f).is_file() for f in OUTPUTS)
    assert cli.main(["--run", uri, "--submission", "--gpus-per-actor", "0", "--no-progress"]) == 0
    assert "skipped" in capsys.readouterr().out  # complete at the URI: nothing predicted again
    assert all((remote / "models" / m / "submission.csv").is_file() for m in model_ids(remote))
    stack.main(["--run", uri, "--method", "greedy", "--smoke"])
    assert set(pd.read_csv(remote / "ensemble" / "scores.csv")["method"]) >= {"mean", "greedy"}
    assert (remote / "ensemble" / "submission.csv").is_file()


def test_an_actor_pulls_its_weights_from_the_uri_into_its_node_mirror(pristine, tmp_path, monkeypatch):
    """A job of a URI run names paths inside the run; the actor resolves them in its node's mirror and
    replaces a stale copy there (a fold retrained since) with the URI's version."""
    import torch

    from ensemble.run.storage import RunStore

    uri = pristine.as_uri()
    with open_run(uri) as run:
        run.pull_artifacts()
        plans, _ = plan.plan_run(run)
    job = dataclasses.replace(plans[0].jobs[1, "oof"], cache=None)
    assert job.run == uri and not Path(job.weights).is_absolute()
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "node2"))
    stale = RunStore(uri).local / job.weights
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older checkpoint")
    actor = pool.Predictor(cpus=1)
    model = actor._model(job)
    assert actor.weights == stale
    expected = torch.load(pristine / job.weights, weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.cpu(), expected[name].cpu()), name


def test_a_killed_actor_is_restarted_and_its_work_retried(predicted, pristine, tmp_path, ray_cluster):
    """SIGKILL a predictor's process just before the run: Ray restarts it, retries its items, and the
    outputs equal those of the undisturbed run."""
    import os
    import signal

    actors, infos = pool.create_pool(1, 0.5, 0)
    try:
        os.kill(infos[0]["pid"], signal.SIGKILL)
        run = copy_run(pristine, tmp_path)
        summary = predict_run(run, tta="orig,hflip", gpus_per_actor=0, shard_size=300, progress=False,
                                      actors=actors)
        assert sorted(summary["predicted"]) == model_ids(run)
        assert ray_cluster.get(actors[0].info.remote())["pid"] != infos[0]["pid"]  # a new process
        for model_id in model_ids(run):
            pd.testing.assert_frame_equal(pd.read_parquet(run / "models" / model_id / "oof_tta.parquet"),
                                          pd.read_parquet(predicted[0] / "models" / model_id / "oof_tta.parquet"),
                                          check_exact=False, rtol=1e-5)
    finally:
        for a in actors:
            ray_cluster.kill(a)


def test_multilabel_submission_has_tags(tmp_path):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_id": "m", "k": 2, "task": "multilabel", "classes": ["a", "b", "c"],
                                                   "target": {"form": "tags", "column": "tags"}}))
    pd.DataFrame({"id": ["x", "y"], "a": [0.9, 0.1], "b": [0.6, 0.2], "c": [0.1, 0.3]}).to_parquet(model / "test.parquet")
    sub = pd.read_csv(write_submission(Run(tmp_path), "m"))
    assert sub.to_dict("list") == {"id": ["x", "y"], "tags": ["a b", "c"]}  # 'y': nothing >= 0.5, so its top tag


def test_fractional_gpu_actors_are_placed_two_per_logical_gpu(ray_cluster):
    assert pool.resolve_actors(ray_cluster.cluster_resources(), gpus_per_actor=0.5) == (8, 0.25, 0.5)
    # 8 x 0.125 CPU: they fit beside the shared CPU actors (1 CPU)
    n, cpus, gpus = pool.resolve_actors(ray_cluster.cluster_resources(), gpus_per_actor=0.5, cpus_per_actor=0.125)
    assert (n, cpus, gpus) == (8, 0.125, 0.5)
    actors, info = pool.create_pool(n, cpus, gpus)
    try:
        assert ray_cluster.available_resources().get("GPU", 0.0) == 0.0  # all 4 held at once, by 8 live actors
        assert len({i["pid"] for i in info}) == 8
        assert sorted(g for i in info for g in i["gpu_ids"]) == ["0", "0", "1", "1", "2", "2", "3", "3"]
        assert sorted(i["cuda_visible_devices"] for i in info) == ["0", "0", "1", "1", "2", "2", "3", "3"]
    finally:
        for a in actors:
            ray_cluster.kill(a)


def test_gpu_actors_say_at_start_when_dev_shm_caps_their_loader_workers(pristine, tmp_path, actors, monkeypatch, capsys):
    """GPU actors decode in DataLoader workers, whose note on /dev/shm goes to the actor's log: the driver says it
    on the console. (A 512 KiB /dev/shm as the driver sees it; the actors given are CPU ones, which use no workers.)"""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2 ** 19) if str(p) == "/dev/shm" else real(p))
    predict_run(copy_run(pristine, tmp_path), tta="orig,hflip", gpus_per_actor=0.5, cpus_per_actor=2, progress=False,
                actors=actors)
    err = capsys.readouterr().err
    assert "note: /dev/shm has 0.5 MiB free; a 2-CPU share" in err and "not 1: decoding is slower" in err, err


def test_resolve_actors():
    assert pool.resolve_actors({"CPU": 2}) == (2, 1.0, 0.0)  # CPU actors when there is no GPU
    assert pool.resolve_actors({"CPU": 2}, cpus_per_actor=2) == (1, 2, 0.0)
    assert pool.resolve_actors({"CPU": 8, "GPU": 2}) == (2, 4.0, 1.0)
    assert pool.resolve_actors({"CPU": 2}, free={"CPU": 1.0}) == (1, 1.0, 0.0)  # what fits now, at least one
    assert pool.resolve_actors({"CPU": 2}, free={"CPU": 0.0}) == (1, 1.0, 0.0)
    assert pool.resolve_actors({"CPU": 2, "GPU": 4}, free={"CPU": 2.0, "GPU": 1.0}) == (1, 0.5, 1.0)
    with pytest.raises(UserError, match="no GPU"):
        pool.resolve_actors({"CPU": 2}, gpus_per_actor=0.5)
    with pytest.raises(UserError, match="fraction"):
        pool.resolve_actors({"CPU": 2, "GPU": 4}, gpus_per_actor=1.5)


# --------------------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _fails(run: Path, capsys, *args) -> str:
    code = cli.main(["--run", str(run), "--gpus-per-actor", "0", "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not [p for p in run.rglob("*") if p.name in OUTPUTS or p.name.endswith(".tmp")]  # nothing half-written
    return err


def test_missing_checkpoint(pristine, tmp_path, capsys):
    run = copy_run(pristine, tmp_path)
    (run / "models" / model_ids(run)[1] / "fold1" / "weights.pt").unlink()
    assert "fold1/weights.pt: checkpoint missing" in _fails(run, capsys)


def test_checkpoint_from_another_space(pristine, tmp_path, capsys):
    import torch

    from ensemble.models import create_model

    run = copy_run(pristine, tmp_path)
    torch.save(create_model("test_resnet", 4).state_dict(), run / "models" / model_ids(run)[1] / "fold0" / "weights.pt")
    err = _fails(run, capsys)
    assert "fold0/weights.pt: does not fit" in err and "10 classes" in err and "(4, " in err


def test_test_manifest_missing_images(pristine, tmp_path, demo_dir, capsys):
    run = copy_run(pristine, tmp_path)
    test = pd.read_csv(demo_dir / "test.csv")
    test.loc[2, "image"] = "images/nope.png"
    test.to_csv(tmp_path / "test.csv", index=False)
    for model_id in model_ids(run):
        path = run / "models" / model_id / "config.json"
        config = json.loads(path.read_text())
        config["data"]["test_manifest"] = str(tmp_path / "test.csv")
        path.write_text(json.dumps(config))
    err = _fails(run, capsys)
    assert "test.csv: an 'image' file missing" in err and "row 3 " in err


def test_unknown_view_from_the_command_line(pristine, tmp_path):
    run = copy_run(pristine, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ensemble.predict", "--run", str(run), "--tta", "orig,flip2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: Unknown view op 'flip2'") and "Did you mean 'hflip'" in proc.stderr
    assert not [p for p in run.rglob("*") if p.name in OUTPUTS]


# --------------------------------------------------------------------------- defects found by trying it as a user


def test_a_folds_file_that_lost_a_fold_is_one_clear_error(pristine, tmp_path, capsys):
    run = copy_run(pristine, tmp_path)
    folds = pd.read_csv(run / "folds.csv", dtype=str)
    folds[folds["fold"] != "1"].to_csv(run / "folds.csv", index=False)
    err = _fails(run, capsys)
    assert "folds.csv: folds [0] but the models were trained with k=2 (folds 0..1): missing [1]" in err


def test_per_view_on_a_finished_run_computes_the_per_view_files(predicted, tmp_path, actors):
    run = copy_run(predicted[0], tmp_path)
    for d in (run / "models").iterdir():
        for name in ("oof_views.parquet", "test_views.parquet"):
            (d / name).unlink()
    summary = predict_run(run, tta="orig,hflip", per_view=True, gpus_per_actor=0, progress=False, actors=actors)
    assert sorted(summary["predicted"]) == model_ids(run)
    assert all((run / "models" / m / "oof_views.parquet").is_file() for m in model_ids(run))


def test_parquets_without_predict_json_are_not_a_complete_model(predicted, tmp_path, actors):
    """predict writes predict.json last: outputs without it (a crash mid-set) are predicted again, and the stack
    refuses them meanwhile."""
    from ensemble.stack.oof import load_run

    run = copy_run(predicted[0], tmp_path)
    first = model_ids(run)[0]
    (run / "models" / first / "predict.json").unlink()
    with pytest.raises(UserError, match=f"{first}: predict.json \\(rerun python -m ensemble.predict\\) missing"):
        load_run(run)
    summary = predict_run(run, tta="orig,hflip", gpus_per_actor=0, progress=False, actors=actors)
    assert summary["predicted"] == [first] and (run / "models" / first / "predict.json").is_file()


def _cli_fails(run: Path, *args) -> str:
    proc = subprocess.run([sys.executable, "-m", "ensemble.predict", "--run", str(run), "--gpus-per-actor", "0",
                           "--no-progress", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, \
        proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stderr


def test_a_full_or_read_only_disk_is_one_clear_error_and_leaves_no_half_set(pristine, small_disk):
    disk = small_disk("48m")
    run = Path(shutil.copytree(pristine, disk / "run"))
    small_disk.fill(disk, leave=200_000)  # room for the check and a first file, not for a model's whole set
    err = _cli_fails(run, "--force")
    assert "No space left on device" in err and "run the same command again" in err
    for model_id in model_ids(run):  # whatever was written, no model claims a complete set
        assert not (run / "models" / model_id / "predict.json").exists()
    assert not [p for p in run.rglob("*.tmp")]
    (disk / ".filler").unlink()
    small_disk.read_only(disk)
    err = _cli_fails(run)
    assert f"{run}: cannot write here (Read-only file system)" in err and "Nothing was changed" in err


def test_embeddings_of_a_classification_model_and_their_smoothing(predicted, tmp_path, actors):
    """--embeddings: emb/oof.npy (each held-out row by its own fold's model) and emb/test.npy (the folds' mean),
    unit rows, from the forward pass that gives the same probabilities; a rerun without the flag keeps them."""
    from ensemble.metrics import get_metric
    from ensemble.stack.core import MethodResult
    from ensemble.stack.oof import load_run
    from ensemble.stack.smooth import neighbour_smoothing

    run = copy_run(predicted[0], tmp_path)
    first = model_ids(run)[0]
    d = run / "models" / first
    summary = predict_run(run, tta="orig,hflip", per_view=True, gpus_per_actor=0, progress=False, actors=actors,
                          models=[first], embeddings=True)
    assert summary["predicted"] == [first]  # predicted before without embeddings: done again
    oof, test = np.load(d / "emb" / "oof.npy"), np.load(d / "emb" / "test.npy")
    tta = pd.read_parquet(d / "oof_tta.parquet")
    assert oof.dtype == np.float16 and oof.shape == (len(tta), 96) and test.shape == (1000, 96)  # test_resnet: 96
    np.testing.assert_allclose(np.linalg.norm(oof.astype(np.float32), axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(test.astype(np.float32), axis=1), 1, atol=2e-3)
    pd.testing.assert_frame_equal(pd.read_parquet(d / "emb" / "oof.ids.parquet"), tta[["id", "fold"]])
    assert pd.read_parquet(d / "emb" / "test.ids.parquet")["id"].tolist() == pd.read_parquet(d / "test.parquet")["id"].tolist()
    pd.testing.assert_frame_equal(tta, pd.read_parquet(predicted[0] / "models" / first / "oof_tta.parquet"),
                                  check_exact=False, rtol=1e-5)  # the same logits, from the same features
    meta = json.loads((d / "predict.json").read_text())
    assert meta["embeddings"] is True and meta["embedding_dim"] == 96
    stamp = (d / "emb" / "oof.npy").stat().st_mtime_ns
    again = predict_run(run, tta="orig,hflip", per_view=True, gpus_per_actor=0, progress=False, models=[first])
    assert again["predicted"] == [] and (d / "emb" / "oof.npy").stat().st_mtime_ns == stamp
    forced = predict_run(run, tta="orig,hflip", per_view=True, gpus_per_actor=0, progress=False, actors=actors,
                         models=[first], force=True)  # predicted again: its embeddings too, never left stale
    assert forced["predicted"] == [first] and (d / "emb" / "oof.npy").stat().st_mtime_ns != stamp
    assert json.loads((d / "predict.json").read_text())["embeddings"] is True
    assert cli.parse_args(["--run", str(run), "--embeddings"]).embeddings

    data, metric = load_run(run), get_metric("log_loss")
    mean = data.oof.mean(0)
    winner = MethodResult("mean", "log_loss", metric(data.y_true, mean), 0.0, mean, data.test.mean(0))
    row, files, line = neighbour_smoothing(data, winner, metric, data.run)
    assert json.loads(files["smoothing.json"])["embedding_model"] == first and row.test.shape == data.test[0].shape
    assert "neighbour smoothing of mean" in line
