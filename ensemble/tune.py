"""The sweep: `python -m ensemble.tune --space NAME` trains every backbone x param set x fold on Ray.

How folds become a unit (docs/design.md has the measurements behind it):
one Ray Tune trial per *model* (backbone + param set), see `ensemble.trial`.
The trial holds no CPU; it submits one Ray task per fold with the space's
per-fold resources (`gpu: 0.5` packs two folds on a GPU) and reports the
folds' mean metric to Tune each epoch. So ASHA and early stopping decide per
param set, never leaving a model with some folds pruned, and the Ray scheduler
fills every CPU/GPU of the cluster with the folds of all models in flight. CPU
task workers are reused between tasks, so the torch and timm imports are paid
once per worker, not once per trial.

Resume does not depend on Tune's experiment state (which breaks when a run
directory moves): every fold continues from its own `last.pt`, and finished or
pruned models are recognised from `models/<model_id>/`.

`--storage` is a directory every node sees, or a URI (s3://, gs://, file://...):
then every process works in a local mirror and copies files to and from the
URI (`ensemble.storage`), so nodes need no shared file system.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble import datasets, folds as folds_mod, spaces, storage
from ensemble.artifacts import model_state, read_metrics, total_epochs
from ensemble.data import Target, read_manifest, resolve_target
from ensemble.errors import RunFailed, UserError, cli_main
from ensemble.io import write_csv, write_json
from ensemble.storage import ARTIFACTS, open_run
from ensemble.trial import pruned_callback, run_model, warm_up_workers


# --------------------------------------------------------------------------- launch-time preparation


def prepare_run(space: spaces.Space, run_dir: Path, *, resume: bool, smoke: bool) -> list[dict]:
    """Validate data, write folds.csv and every model's config.json once; return the model configs."""
    if resume:
        if not (run_dir / "space.yaml").exists():
            raise UserError(f"--resume: {run_dir} holds no sweep (no space.yaml). Drop --resume to start it.")
        spaces.check_frozen(space, run_dir)
    elif (run_dir / "space.yaml").exists():
        raise UserError(
            f"{run_dir} already holds a sweep. Continue it with --resume, or start another with --name NEW_NAME.")
    manifest, target = _read_training_manifest(space)
    frame = _folds_frame(space, manifest, target, run_dir, smoke)
    spaces.freeze_space(space, run_dir)
    configs = []
    for spec in spaces.resolve_models(space):
        config = _model_config(space, spec, manifest, target, frame, run_dir)
        path = run_dir / "models" / spec.model_id / "config.json"
        if not path.exists():
            write_json(config, path)
        configs.append(json.loads(path.read_text()))
    return configs


def _read_training_manifest(space: spaces.Space):
    data = space.raw["data"]
    target_cfg = data.get("target") or {}
    manifest_path = _data_path(data["manifest"], space)
    frame_columns = read_manifest(manifest_path, check_images="none", require_target=False).frame.columns
    target = resolve_target(frame_columns, form=target_cfg.get("form"), column=target_cfg.get("column"),
                            maybe_weight=target_cfg.get("maybe_weight", 0.5), source=str(manifest_path))
    root = _data_path(data["root"], space) if data.get("root") else None
    manifest = read_manifest(manifest_path, root, target=target, classes=data.get("classes"),
                             check_images=data.get("check_images", "decode"),
                             on_bad_image=data.get("on_bad_image", "raise"))
    return manifest, target


def _data_path(value: str, space: spaces.Space) -> Path:
    if str(value).startswith("demo:"):
        return datasets.demo_manifest(str(value).split(":", 1)[1])
    path = Path(value).expanduser()
    return path if path.is_absolute() else (Path(space.path).parent / path).resolve()


def _folds_frame(space, manifest, target: Target, run_dir: Path, smoke: bool) -> pd.DataFrame:
    """folds.csv: made once per sweep, reused on resume (its rows define the sweep's training set)."""
    path = run_dir / "folds.csv"
    if path.exists():
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = sorted(set(frame["id"]) - set(manifest.frame["id"]))
        if missing:
            raise UserError(f"{path}: {len(missing)} ids are no longer in the manifest {manifest.path} "
                            f"(first: {missing[:5]}); the data changed since the sweep started: use a new --name.")
        frame["fold"] = frame["fold"].astype(int)
        return frame
    frame = manifest.frame
    max_rows = space.raw.get("smoke", {}).get("max_rows") if smoke else None
    if max_rows and len(frame) > max_rows:
        frame = frame.sample(n=max_rows, random_state=space.raw["seed"]).reset_index(drop=True)
    sub = manifest.subset(manifest.frame["id"].isin(frame["id"]))
    cfg = space.raw["folds"]
    y = sub.targets()
    fold = folds_mod.make_folds(y if target.task == "multilabel" else y.argmax(1), cfg["k"], cfg["strategy"],
                                cfg["seed"], groups=sub.groups)
    columns = ["id", target.column] + (["group"] if "group" in sub.frame else [])
    out = sub.frame[columns].copy()
    out.insert(1, "fold", fold)
    write_csv(out, path)
    return out


def _model_config(space, spec, manifest, target: Target, frame: pd.DataFrame, run_dir: Path) -> dict:
    """Everything a fold task needs to rebuild this model (written as models/<id>/config.json)."""
    raw = space.raw
    data = dict(raw["data"])
    data.update(manifest=str(manifest.path), root=str(manifest.root),
                normalize=_normalization(raw, spec, manifest, frame))
    if data.get("test_manifest"):
        data["test_manifest"] = str(_data_path(data["test_manifest"], space))
    stages = raw.get("stages") or [{"epochs": raw["epochs"]}]
    return {
        "model_id": spec.model_id, "backbone": spec.backbone, "params": spec.params,
        "task": target.task, "classes": manifest.classes, "target": target.to_dict(),
        "k": raw["folds"]["k"], "folds": raw["folds"], "data": data, "stages": stages,
        "metric": raw["metric"], "mode": raw["mode"], "seed": raw["seed"],
        "pretrained": raw.get("pretrained", False), "weights": (raw.get("weights") or {}).get(spec.backbone),
        "resources": raw["resources"], "space": space.name,
    }


def _normalization(raw: dict, spec, manifest, frame: pd.DataFrame) -> dict:
    norm = raw["data"].get("normalize", "backbone")
    if isinstance(norm, dict):
        return {"mean": list(norm["mean"]), "std": list(norm["std"])}
    if norm == "dataset":
        return _dataset_normalization(manifest, frame, raw, spec.params["image_size"])
    from ensemble.models import backbone_normalization

    mean, std = backbone_normalization(spec.backbone)
    return {"mean": list(mean), "std": list(std)}


def _dataset_normalization(manifest, frame, raw, size: int, sample: int = 512) -> dict:
    from ensemble.loader import ImageDataset, compute_normalization

    rng = np.random.default_rng(raw["seed"])
    ids = set(frame["id"])
    paths = [p for p, i in zip(manifest.image_paths, manifest.frame["id"]) if i in ids]
    picked = [paths[i] for i in sorted(rng.choice(len(paths), min(sample, len(paths)), replace=False))]
    dataset = ImageDataset(picked, None, size, preprocess=raw["data"].get("preprocess", "pad"))
    mean, std = compute_normalization(np.stack([dataset.load(i) for i in range(len(picked))]))
    return {"mean": list(mean), "std": list(std)}


# --------------------------------------------------------------------------- driver


def fold_slots(cluster: dict, resources: dict) -> int:
    """How many folds the cluster runs at once with the space's per-fold resources."""
    slots = math.floor(cluster.get("CPU", 1) / resources.get("cpu", 1) + 1e-9)
    if resources.get("gpu", 0):
        slots = min(slots, math.floor(cluster.get("GPU", 0) / resources["gpu"] + 1e-9))
    if slots < 1:
        raise UserError(f"one fold needs {resources} but the Ray cluster has {cluster}: lower resources in the "
                        "space file, or pass --gpus-per-trial / join a bigger cluster with --address.")
    return slots


def concurrency(slots: int, k: int) -> int:
    """Models in flight: enough folds to fill every slot, plus one model to fill the gaps."""
    return math.ceil(slots / k) + 1


def run_sweep(space: spaces.Space, run: str | Path, *, resume: bool = False, smoke: bool = False,
              max_concurrent: int | None = None, address: str | None = None, verbose: int = 1) -> pd.DataFrame:
    """Launch (or resume) a sweep in `run` (a directory or a URI) and return its leaderboard."""
    with open_run(run) as (run_dir, store):
        run_dir = run_dir.resolve()
        if store:
            store.pull(only=ARTIFACTS)
        configs = prepare_run(space, run_dir, resume=resume, smoke=smoke)
        if store:
            store.push("space.yaml", "folds.csv", *(f"models/{c['model_id']}/config.json" for c in configs))
        states = {c["model_id"]: model_state(run_dir, c) for c in configs}
        todo = [c["model_id"] for c in configs if states[c["model_id"]] == "todo"]
        for state in ("complete", "pruned"):
            skipped = [m for m, s in states.items() if s == state]
            if skipped:
                print(f"{len(skipped)} model(s) already {state}, not run again: {', '.join(skipped)}")
        if todo:
            errors = _tune(space, configs, todo, run_dir, store, max_concurrent, address, verbose)
            if store:
                store.pull(only=ARTIFACTS)  # what the trials wrote, for the leaderboard
            if errors:
                parent, name = storage.split(run)
                resume_cmd = f"python -m ensemble.tune --space {space.path} --storage {parent} --name {name} --resume"
                raise SweepFailed(f"{len(errors)} model(s) failed after retries: " + "; ".join(errors)
                                  + f". Fix the cause, then resume with: {resume_cmd}")
        return leaderboard(run_dir, configs)


def _tune(space, configs: list[dict], todo: list[str], run_dir: Path, store, max_concurrent, address,
          verbose: int) -> list[str]:
    """One Ray Tune run over the models still to train; returns an error line per model that failed."""
    import ray
    from ray import tune

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # A fresh local cluster unless told otherwise: never join a stray one by accident.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=verbose > 1)
    raw = space.raw
    slots = fold_slots(ray.cluster_resources(), raw["resources"])
    limit = max_concurrent or raw.get("max_concurrent") or concurrency(slots, raw["folds"]["k"])
    warm_up_workers(raw["resources"], slots)
    scheduler = None
    if (raw.get("scheduler") or {}).get("type", "none") == "asha":
        sched = raw["scheduler"]
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch", max_t=total_epochs(configs[0]), grace_period=sched.get("grace_period", 1),
            reduction_factor=sched.get("reduction_factor", 2))
    attempt = len(list((run_dir / "tune").glob("attempt-*"))) + 1 if (run_dir / "tune").exists() else 1
    tuner = tune.Tuner(
        # The trial only waits on its folds: it holds no CPU (a token byte of memory, since Tune
        # needs some request), so k folds x cpu fill the slots exactly, e.g. 8 x 0.25 on 2 CPUs.
        tune.with_resources(run_model, {"memory": 1}),
        param_space={"run_dir": str(run_dir), "storage": store and store.uri,
                     "early_stopping": raw.get("early_stopping"),
                     "resources": dict(raw["resources"]), "model_id": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(metric=raw["metric"], mode=raw["mode"], scheduler=scheduler,
                                    max_concurrent_trials=limit, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"attempt-{attempt}", storage_path=str(run_dir / "tune"), verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=raw.get("max_failures", 2)),
            callbacks=[pruned_callback(run_dir, store)]),
    )
    results = tuner.fit()
    return [f"{r.config['model_id']}: {str(r.error).splitlines()[-1][:300]}" for r in results if r.error]


class SweepFailed(RunFailed):
    """Models failed after their retries; the finished ones are kept and --resume continues."""


def leaderboard(run_dir: Path, configs: list[dict]) -> pd.DataFrame:
    """One row per fold of every model: best epoch and monitored metric; plus the model's state."""
    rows = []
    for config in configs:
        state = model_state(run_dir, config)
        for f in range(config["k"]):
            m = read_metrics(run_dir, config["model_id"], f) or {}
            rows.append({"model": config["model_id"], "fold": f, "state": state,
                         "best_epoch": m.get("best_epoch"), config["metric"]: m.get("best_score")})
    return pd.DataFrame(rows)


def print_leaderboard(board: pd.DataFrame, metric: str, mode: str, run: str | Path) -> None:
    per_model = board.groupby(["model", "state"], as_index=False)[metric].mean()
    per_model = per_model.sort_values(metric, ascending=mode == "min")
    print("\nLeaderboard (mean over folds):")
    print(per_model.to_string(index=False))
    print("\nPer fold:")
    print(board.to_string(index=False))
    where = run if storage.is_uri(run) else Path(run).resolve()
    print(f"\nArtifacts: {where}/models/<model_id>/ (oof.parquet, config.json, fold*/weights.pt)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.tune", description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True, help="a name in tune_spaces/ or a path to a .yaml file")
    p.add_argument("--storage", default="runs",
                   help="directory holding runs, or a URI pyarrow opens (s3://bucket/runs, gs://..., file://...) [runs]")
    p.add_argument("--name", help="run name [the space name, with -smoke under --smoke]")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch, small images: a quick end-to-end check")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per fold worker (overrides resources.gpu)")
    p.add_argument("--max-concurrent", type=int, help="models in flight at once [from the cluster size]")
    p.add_argument("--address", help="join an existing Ray cluster, e.g. 'auto'")
    p.add_argument("-v", "--verbose", type=int, default=1, help="Tune progress verbosity 0-3 [1]")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    space = spaces.load_space(args.space)
    if args.smoke:
        stand_in = space.raw.get("smoke", {}).get("backbone")
        space = spaces.apply_smoke(space)
        if stand_in and space.raw["backbones"] == [stand_in]:
            print(f"--smoke: training the tiny stand-in backbone {stand_in!r} instead of the space's backbones.")
    if args.gpus_per_trial is not None:
        space = spaces.with_resources(space, gpu=args.gpus_per_trial)
    name = args.name or (space.name + ("-smoke" if args.smoke else ""))
    run = storage.join(args.storage, name)
    start = time.perf_counter()
    board = run_sweep(space, run, resume=args.resume, smoke=args.smoke,
                      max_concurrent=args.max_concurrent, address=args.address, verbose=args.verbose)
    print_leaderboard(board, space.raw["metric"], space.raw["mode"], run)
    print(f"Sweep finished in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
