"""Launch a sweep: check everything, write the run's plan once, train every model on Ray Tune.

  plan_sweep   everything that can be checked before the first write: the space against the run,
               the data (every image), the folds, normalisation statistics, each model's config
  write_plan   space.yaml, folds.csv and models/<id>/config.json: the run's frozen plan
  run_sweep    lock the run, plan it, check the resources against the cluster, write the plan,
               train the models still to train (`ensemble.tune.trial`), write leaderboard.csv

How folds become a unit (docs/design.md has the measurements behind it): one Ray
Tune trial per *model* (backbone + param set). The trial holds no CPU; it submits
one Ray task per fold with the space's per-fold resources (`gpu: 0.5` packs two
folds on a GPU) and reports the folds' mean metric to Tune each epoch, so ASHA and
early stopping decide per param set, and the Ray scheduler fills every CPU/GPU of
the cluster with the folds of all models in flight.

Resume does not depend on Tune's experiment state (which breaks when a run
directory moves): every fold continues from its own `last.pt`, and finished or
pruned models are recognised from their own files (`ensemble.run`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble import trackers
from ensemble.cluster import start_ray
from ensemble.data import folds as folds_mod
from ensemble.data.manifest import ImageChecks, Manifest, Target, read_manifest
from ensemble.errors import Interrupted, RunFailed, UserError
from ensemble.io import write_csv
from ensemble.run import Run, is_uri, locked, open_run, total_epochs
from ensemble.tune import spaces
from ensemble.tune.progress import leaderboard, print_leaderboard


class SweepFailed(RunFailed):
    """Models failed after their retries; the finished ones are kept and --resume continues."""


# --------------------------------------------------------------------------- plan: checks, no writes


@dataclass
class SweepPlan:
    """What a launch will write and train, built before anything is written."""

    space: spaces.Space
    folds: pd.DataFrame  # folds.csv: id, fold, the target column (+ group)
    configs: list[dict]  # one per model, as in models/<id>/config.json
    searched: dict[str, dict]  # model_id -> its searched params (for the display and the leaderboard)
    restart: bool = False  # an earlier launch wrote a plan but trained nothing: it is replaced
    grown: list[str] = field(default_factory=list)  # what a resumed space adds to the run (spaces.check_frozen)
    checks: ImageChecks | None = None  # the images that decoded: saved with the plan, so a relaunch skips them


def plan_sweep(space: spaces.Space, run: Run, *, resume: bool, smoke: bool) -> SweepPlan:
    """Check the space against the run, read and check the data, make the folds and the model configs."""
    restart, grown = _check_relaunch(space, run, resume)
    checks = ImageChecks(run.image_checks_file)
    manifest, target = _read_training_manifest(space, checks)
    added = {r: _round_manifest(space, item, target, manifest.classes, f"rounds[{r - 2}].manifest", checks)
             for r, item in enumerate(space.rounds or [], 2) if item.manifest}
    folds = _folds_frame(space, manifest, target, run, smoke, reuse=not restart,
                         also={i for m in added.values() for i in m.frame["id"]})
    folds = _round_rows(space, folds, target, added)
    for r, item in enumerate(space.rounds or [], 2):  # what rounds pseudo-label exists and decodes: checked now,
        if item.pseudo and item.pseudo["from"] != "test":  # not after the earlier rounds have trained
            with _named(space, f"rounds[{r - 2}].pseudo.from"):
                read_manifest(item.pseudo["from"], space.root_path, require_target=False, checks=checks,
                              check_images=space.data.check_images, on_bad_image=space.data.on_bad_image)
    configs, searched, stats = [], {}, {}
    for spec in spaces.resolve_models(space):
        searched[spec.model_id] = spec.searched
        existing = run.model_dir(spec.model_id) / "config.json"
        if existing.exists() and not restart:
            configs.append(run.read_config(spec.model_id))
        else:
            configs.append(_model_config(space, spec, manifest, target, folds, stats))
    return SweepPlan(space, folds, configs, searched, restart, grown, checks)


def _check_relaunch(space: spaces.Space, run: Run, resume: bool) -> tuple[bool, list[str]]:
    """(whether an existing plan is replaced, what the space adds to it); raises when the run holds
    trained epochs it would lose."""
    if not run.space_file.exists():
        if resume:
            raise UserError(f"--resume: {run.show()} holds no sweep (no space.yaml). Drop --resume to start it.")
        return False, []
    try:
        grown = spaces.check_frozen(space, run.dir)
        changed = None
    except UserError as exc:
        changed = exc
    if resume and changed is None:
        if grown:
            print(f"Growing {run.show()}: {'; '.join(grown)}. Its models are kept as they are.")
        return False, grown
    trained = run.trained_epochs()
    if trained and not resume:
        raise UserError(f"{run.show()} already holds a sweep ({trained} fold-epoch(s) trained). Continue it with "
                        "--resume, or start another with --name NEW_NAME."
                        + (" (Its space differs from this one, so --resume would refuse it.)" if changed else ""))
    if trained:
        raise UserError(f"{changed} (Only a run in which no fold has finished an epoch may start again with "
                        f"another space; this one has {trained} fold-epoch(s) trained.)")
    print(f"note: {run.show()} holds a sweep in which no fold has finished an epoch; starting it again"
          + (" with the space as it is now." if changed or grown else "."))
    return True, []


def _read_training_manifest(space: spaces.Space, checks: ImageChecks) -> tuple[Manifest, Target]:
    data = space.data
    target = Target(**data.target)  # resolved against the manifest's header when the space was loaded
    manifest = read_manifest(space.manifest_path, space.root_path, target=target, classes=data.classes,
                             check_images=data.check_images, on_bad_image=data.on_bad_image, checks=checks)
    return manifest, target


def _folds_frame(space: spaces.Space, manifest: Manifest, target: Target, run: Run, smoke: bool,
                 reuse: bool, also: set = frozenset()) -> pd.DataFrame:
    """folds.csv: made once per sweep, reused on resume (its rows define the sweep's training set);
    `also`: the ids of the rounds' manifests, which may be in it too."""
    if reuse and run.folds_file.exists():
        frame = pd.read_csv(run.folds_file, dtype=str, keep_default_na=False)
        missing = sorted(set(frame["id"]) - set(manifest.frame["id"]) - also)
        if missing:
            raise UserError(f"{run.show(run.folds_file)}: {len(missing)} ids are no longer in the manifest "
                            f"{manifest.path} (first: {missing[:5]}); the data changed since the sweep started: "
                            "use a new --name.")
        frame["fold"] = frame["fold"].astype(int)
        return frame
    frame = manifest.frame
    max_rows = space.smoke.max_rows if smoke else None
    if max_rows and len(frame) > max_rows:
        frame = frame.sample(n=max_rows, random_state=space.seed).reset_index(drop=True)
    sub = manifest.subset(manifest.frame["id"].isin(frame["id"]))
    fold = _split(space, sub, target, f"{space.path}: 'folds.k' {space.folds.k} does not fit {manifest.path}")
    columns = ["id", target.column] + (["group"] if "group" in sub.frame else [])
    out = sub.frame[columns].copy()
    out.insert(1, "fold", fold)
    return out


def _split(space: spaces.Space, rows: Manifest, target: Target, context: str) -> np.ndarray:
    """Each row's fold by the space's strategy; a retrieval space holds out whole identities per fold (its
    held-out identities are new to the fold's model). `context` starts the message when it cannot."""
    if space.task == "retrieval":
        y = groups = pd.factorize(rows.frame[target.column])[0]
    else:
        y, groups = rows.targets(), rows.groups
        y = y if target.task == "multilabel" else y.argmax(1)
    try:
        return folds_mod.make_folds(y, space.folds.k, space.folds.strategy, space.folds.seed, groups=groups,
                                    classes=rows.classes)
    except UserError as exc:
        raise UserError(f"{context}: {exc}") from None


def _round_rows(space: spaces.Space, folds: pd.DataFrame, target: Target, added: dict) -> pd.DataFrame:
    """folds.csv with the rows that rounds' manifests (`added`: round -> Manifest) add, appended: a row keeps
    its fold once it has one, a known group's new rows join its fold, and the other new rows get folds by
    the space's strategy."""
    for r, manifest in added.items():
        new = manifest.subset(~manifest.frame["id"].isin(folds["id"]))
        if not len(new.frame):
            continue
        fold = np.full(len(new.frame), -1)
        if "group" in space.folds.strategy and "group" in folds:
            fold_of = dict(zip(folds["group"].astype(str), folds["fold"].astype(int)))
            fold = new.frame["group"].astype(str).map(fold_of).fillna(-1).astype(int).to_numpy()
        unknown = fold < 0
        if unknown.any():
            fold[unknown] = _split(space, new.subset(unknown), target,
                                   f"{space.path}: rounds[{r - 2}]: the {int(unknown.sum())} rows {manifest.path} adds "
                                   f"cannot be split into {space.folds.k} folds")
        rows = new.frame[[c for c in folds.columns if c != "fold"]].copy()
        rows.insert(1, "fold", fold)
        folds = pd.concat([folds, rows], ignore_index=True)
    return folds


def _round_manifest(space: spaces.Space, item, target: Target, classes: list[str], key: str,
                    checks: ImageChecks) -> Manifest:
    """A round's manifest, checked as the first round's (its labels must be the first round's classes)."""
    data = space.data  # image paths are relative to the space's root, as the first round's are
    with _named(space, key):
        return read_manifest(item.manifest, space.root_path, target=target, classes=classes,
                             check_images=data.check_images, on_bad_image=data.on_bad_image, checks=checks)


@contextlib.contextmanager
def _named(space: spaces.Space, key: str):
    """A data error of a round, prefixed with the space file and the key that named the file."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"{space.path}: '{key}': {exc}") from None


def _model_config(space: spaces.Space, spec, manifest: Manifest, target: Target, folds: pd.DataFrame,
                  stats: dict) -> dict:
    """Everything a fold task needs to rebuild this model (written as models/<id>/config.json).

    A round's model (spec.round > 1) adds its round, the model it starts from (`init_from`, the same
    backbone and params one round earlier, or the round given) and its pseudo-label and hard-example
    settings; its stages and manifest are the round's."""
    config = _base_config(space, spec, manifest, target, folds, stats)
    if spec.round == 1:
        return config
    item = space.rounds[spec.round - 2]
    base_id = spec.model_id.removesuffix(f"-r{spec.round}")  # spaces.round_id, undone
    parent = spaces.round_id(base_id, spaces.parent_round(spec.round, item.init))
    if item.manifest:
        config["data"]["manifest"] = item.manifest
    pseudo = item.pseudo and dict(item.pseudo, model=parent, manifest=str(
        space.test_manifest_path if item.pseudo["from"] == "test" else item.pseudo["from"]))
    return config | {"round": spec.round, "stages": [dict(s) for s in item.stages],
                     "init_from": None if item.init == "scratch" else parent, "pseudo": pseudo,
                     "hard_examples": item.hard_examples and dict(item.hard_examples)}


def _base_config(space: spaces.Space, spec, manifest: Manifest, target: Target, folds: pd.DataFrame,
                 stats: dict) -> dict:
    data = dict(space.data, manifest=str(manifest.path), root=str(manifest.root),
                normalize=_normalization(space, spec, manifest, folds, stats),
                **{key: str(getattr(space, f"{key}_path")) if space.data[key] else None
                   for key in ("test_manifest", "query_manifest", "gallery_manifest")})
    return {
        "model_id": spec.model_id, "backbone": spec.backbone, "params": spec.params, "searched": spec.searched,
        "task": space.task, "classes": manifest.classes, "target": target.to_dict(),
        "k": space.folds.k, "folds": dict(space.folds), "data": data, "stages": [dict(s) for s in space.stages],
        "metric": space.metric, "mode": space.mode, "seed": space.seed,
        "pretrained": space.pretrained, "weights": space.weights.get(spec.backbone),
        "resources": dict(space.resources), "space": space.name,
    }


def _normalization(space: spaces.Space, spec, manifest: Manifest, folds: pd.DataFrame, stats: dict) -> dict:
    norm = space.data.normalize
    if isinstance(norm, dict):
        return {"mean": list(norm["mean"]), "std": list(norm["std"])}
    if norm == "dataset":
        size = spec.params["image_size"]
        if size not in stats:  # one pass per image size, shared by the models
            stats[size] = _dataset_normalization(space, manifest, folds, size)
        return stats[size]
    from ensemble.models import backbone_normalization

    mean, std = backbone_normalization(spec.backbone)
    return {"mean": list(mean), "std": list(std)}


def _dataset_normalization(space: spaces.Space, manifest: Manifest, folds: pd.DataFrame, size: int,
                           sample: int = 512) -> dict:
    """The training images' own mean and std, from a seeded sample (unreadable images left out under skip)."""
    from ensemble.data.loader import ImageDataset, compute_normalization
    from ensemble.data.manifest import BadImageError

    rng = np.random.default_rng(space.seed)
    ids = set(folds["id"])
    paths = [p for p, i in zip(manifest.image_paths, manifest.frame["id"]) if i in ids]
    picked = [paths[i] for i in sorted(rng.choice(len(paths), min(sample, len(paths)), replace=False))]
    dataset = ImageDataset(picked, None, size, preprocess=space.data.preprocess)
    images = []
    for i in range(len(picked)):
        try:
            images.append(dataset.load(i))
        except BadImageError:
            if space.data.on_bad_image == "raise":
                raise
    if not images:
        raise UserError(f"{manifest.path}: none of the {len(picked)} images sampled for 'normalize: dataset' "
                        "decodes; fix the images, or give data.normalize explicitly.")
    mean, std = compute_normalization(np.stack(images))
    return {"mean": list(mean), "std": list(std)}


def write_plan(plan: SweepPlan, run: Run) -> None:
    """space.yaml, folds.csv and every model's config.json, each once (replaced only on a restart); the image
    checks' cache, which stays on this node (never pushed)."""
    if plan.restart:
        run.remove(run.space_file, run.folds_file, run.models_dir)  # a plan that trained nothing
    spaces.freeze_space(plan.space, run.dir, plan.grown)
    if not run.folds_file.exists() or _rows(run.folds_file) < len(plan.folds):  # a round's manifest added rows
        write_csv(plan.folds, run.folds_file)
    written = []
    for config in plan.configs:
        if not (run.model_dir(config["model_id"]) / "config.json").exists():
            written.append(run.write_config(config))
    run.push(run.space_file, run.folds_file, *written)
    if plan.checks:
        plan.checks.save()


def _rows(path: Path) -> int:
    return len(pd.read_csv(path, usecols=["id"]))


def prepare_run(space: spaces.Space, location: str | Path, *, resume: bool = False, smoke: bool = False) -> list[dict]:
    """Plan and write a local run without training it (`train_fold` then trains a fold in this process)."""
    run = Run(location)
    run.check_writable()
    plan = plan_sweep(space, run, resume=resume, smoke=smoke)
    write_plan(plan, run)
    return plan.configs


# --------------------------------------------------------------------------- the cluster


def fold_slots(cluster: dict, resources: dict) -> int:
    """How many folds the cluster runs at once with the space's per-fold resources."""
    slots = math.floor(cluster.get("CPU", 1) / resources.get("cpu", 1) + 1e-9)
    if resources.get("gpu", 0):
        slots = min(slots, math.floor(cluster.get("GPU", 0) / resources["gpu"] + 1e-9))
    if slots < 1:
        have = {k: v for k, v in cluster.items() if k in ("CPU", "GPU")}
        raise UserError(f"one fold needs {dict(resources)} but the Ray cluster has {have}: lower resources in the "
                        "space file or --gpus-per-trial, or join a bigger cluster with --address. Nothing was written.")
    return slots


def model_resources(space: spaces.Space, todo: list[dict]) -> dict[str, dict]:
    """{model_id: one fold's resources}: the space's, with `gpu: auto` replaced by the model's measured fraction."""
    if space.resources["gpu"] != "auto":
        return {c["model_id"]: dict(space.resources) for c in todo}
    from ensemble.tune import packing

    gpu = packing.fractions(todo, cpus=space.resources["cpu"])
    return {model_id: dict(space.resources, gpu=fraction) for model_id, fraction in gpu.items()}


def note_shared_memory(todo: list[dict], cpus: float) -> None:
    """Say at launch when this node's /dev/shm holds fewer DataLoader workers than a fold's CPUs want: the fold's
    own note (`loader_workers`) goes to its Ray worker's log, which the console does not show."""
    from ensemble.data.loader import batch_bytes, loader_workers
    from ensemble.run.layout import stage_size

    largest = max(batch_bytes(2 * c["params"]["batch_size"], stage_size(c, stage),
                              classes=1 if c["task"] == "retrieval" else len(c["classes"]))  # retrieval: no targets
                  for c in todo for stage in c["stages"])  # a fold's largest batches: its validation's
    loader_workers(cpus, largest)


def concurrency(slots: int, k: int) -> int:
    """Models in flight: enough folds to fill every slot, plus one model to fill the gaps."""
    return math.ceil(slots / k) + 1


# --------------------------------------------------------------------------- the sweep


def run_sweep(space: spaces.Space, location: str | Path, *, resume: bool = False, smoke: bool = False,
              max_concurrent: int | None = None, address: str | None = None, verbose: int = 1,
              command: str = "python -m ensemble.tune", loggers: list[str] = ()) -> pd.DataFrame:
    """Launch (or resume) a sweep in `location` (a directory or a URI); return its leaderboard.
    `loggers`: experiment trackers to log to as well (ensemble.trackers)."""
    if loggers and is_uri(location):
        raise UserError("--logger needs a local run directory (its files go inside the run); for a run at a URI, "
                        "log from a local copy. Nothing was written.")
    with open_run(location) as run, _remove_if_empty(run):
        run.check_writable()
        with locked(run, command):
            return _sweep(space, run, location, resume, smoke, max_concurrent, address, verbose, list(loggers))


def _sweep(space, run: Run, location, resume, smoke, max_concurrent, address, verbose, loggers) -> pd.DataFrame:
    """The locked part of run_sweep: plan, check the cluster, write the plan, train, leaderboard."""
    run.pull_artifacts()
    trackers.check_installed(sorted(set(loggers) | set(trackers.read(run.dir))))  # a resume logs where it did
    plan = plan_sweep(space, run, resume=resume, smoke=smoke)
    states = {c["model_id"]: run.model_state(c["model_id"]) for c in plan.configs}
    todo = [c for c in plan.configs if states[c["model_id"]] == "todo"]
    if todo:  # the cluster can run a fold: checked before anything is written
        start_ray(address, verbose)
        import ray

        resources = model_resources(space, todo)
        slots = min(fold_slots(ray.cluster_resources(), r) for r in resources.values())
        from ensemble.tune.trial import warm_up_workers

        warm_up_workers(space.resources, slots)  # torch + timm imports overlap the writes and Tune's start
        note_shared_memory(todo, space.resources["cpu"])
    write_plan(plan, run)
    tracked = trackers.remember(loggers, run.dir, run.dir.name) if not run.store else {}
    for state in ("complete", "pruned"):
        done = [m for m, s in states.items() if s == state]
        if done:
            print(f"{len(done)} model(s) already {state}, not run again: {', '.join(done)}")
    errors, began, orphans = [], time.perf_counter(), []
    for r in sorted({c.get("round", 1) for c in todo}):  # a round starts from the one before: in order
        batch, orphans = _startable([c for c in todo if c.get("round", 1) == r], run, orphans)
        if batch:
            errors = _tune(space, plan, batch, run, resources, slots, max_concurrent, verbose, tracked)
            run.pull_artifacts()  # what the trials wrote, for the leaderboard (and the next round)
        if errors or any(run.model_state(c["model_id"]) == "todo" for c in batch):  # failed or interrupted
            break
    if not todo:
        print("Nothing to train: every model of this run is complete or pruned.")
    board = leaderboard(run, plan.configs)  # written whatever happened next: it shows what is done
    write_csv(board, run.leaderboard_file)
    run.push(run.leaderboard_file)
    if errors:
        raise SweepFailed(f"{len(errors)} model(s) failed after retries: " + "; ".join(errors)
                          + f". Fix the cause, then resume with: {resume_command(space, location)}")
    unfinished = [c["model_id"] for c in todo if run.model_state(c["model_id"]) == "todo" and c not in orphans]
    if unfinished:  # Tune ends gracefully on Ctrl-C: its run "finishes" with these models still to train
        raise Interrupted(f"interrupted: {len(unfinished)} model(s) not finished; every finished epoch is kept. "
                          f"Continue with: {resume_command(space, location)}")
    if todo:
        print(f"Sweep finished in {time.perf_counter() - began:.0f} s: {len(todo) - len(orphans)} model(s) trained "
              "(complete, pruned or stopped early)" + (f", {len(orphans)} left out (above)." if orphans else "."))
        if not run.store:  # Tune's event files are in the run (for a URI run, in a scratch copy it removes)
            print(f"Curves per model: tensorboard --logdir {run.tune_dir}")
        for line in trackers.where(tracked):
            print(line)
    return board


def _startable(configs: list[dict], run: Run, orphans: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the round's models whose earlier-round models are complete, every model left out so far):
    a model whose start or pseudo-labels would come from a pruned model is not trained."""
    ready = []
    for config in configs:
        needs = {config.get("init_from"), (config.get("pseudo") or {}).get("model")} - {None}
        missing = [m for m in sorted(needs) if run.model_state(m) != "complete" or run.weights_pruned(m)]
        if missing:
            state = "its checkpoints were freed by prune" if run.weights_pruned(missing[0]) else run.model_state(missing[0])
            print(f"{config['model_id']} not trained: it needs the fold weights of {missing[0]} ({state}).")
            orphans = orphans + [config]
        else:
            ready.append(config)
    return ready, orphans


@contextlib.contextmanager
def _remove_if_empty(run: Run):
    """A launch that fails before writing anything leaves no empty directory behind (nor the parents it made)."""
    made = [p for p in (run.dir, *run.dir.parents) if not p.exists()]
    try:
        yield
    finally:
        for path in made if not run.store else []:
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty; innermost first


def resume_command(space: spaces.Space, location: str | Path) -> str:
    from ensemble.run import split

    parent, name = split(location)
    return f"python -m ensemble.tune --space {space.path} --storage {parent} --name {name} --resume"


def _tune(space: spaces.Space, plan: SweepPlan, todo: list[dict], run: Run, resources: dict[str, dict], slots: int,
          max_concurrent: int | None, verbose: int, tracked: dict) -> list[str]:
    """One Ray Tune run over the models still to train; returns an error line per model that failed."""
    from ray import tune

    from ensemble.tune.progress import SweepProgress
    from ensemble.tune.trial import pruned_callback, run_model

    limit = max_concurrent or space.max_concurrent or concurrency(slots, space.folds.k)
    scheduler = None
    if space.scheduler.type == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch", max_t=total_epochs(todo[0]),  # a round may train fewer epochs than the grace period
            grace_period=min(space.scheduler.grace_period, total_epochs(todo[0])),
            reduction_factor=space.scheduler.reduction_factor)
    attempt = len(list(run.tune_dir.glob("attempt-*"))) + 1 if run.tune_dir.exists() else 1
    if verbose < 2:  # Ray Tune's new output prints its header and a TensorBoard hint even at verbose=0
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # ... and its warnings on Ctrl-C advise Tuner.restore(...), not our --resume (said by run_sweep).
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
    callbacks = [pruned_callback(run), *trackers.tune_callbacks(tracked)]
    searched = {c["model_id"]: plan.searched[c["model_id"]] for c in todo}  # small dicts: Tune pickles them
    shares = {c["model_id"]: resources[c["model_id"]] for c in todo}
    if verbose >= 1:
        callbacks.append(SweepProgress(todo, plan.searched, space.metric, space.mode, run).callback())
    tuner = tune.Tuner(
        # The trial only waits on its folds: it holds no CPU (a token byte of memory, since Tune
        # needs some request), so k folds x cpu fill the slots exactly, e.g. 8 x 0.25 on 2 CPUs.
        tune.with_resources(run_model, {"memory": 1}),
        param_space={"run": run.location, "early_stopping": dict(space.early_stopping),
                     "model_id": tune.grid_search([c["model_id"] for c in todo]),
                     # per model: what trackers log as its config, and its fold resources (gpu: auto differs)
                     "params": tune.sample_from(lambda spec: searched[spec.config.model_id]),
                     "resources": tune.sample_from(lambda spec: shares[spec.config.model_id])},
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=scheduler,
                                    max_concurrent_trials=limit, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"attempt-{attempt}", storage_path=str(run.tune_dir), verbose=max(0, verbose - 1),
            failure_config=tune.FailureConfig(max_failures=space.max_failures), callbacks=callbacks),
    )
    results = tuner.fit()
    return [f"{r.config['model_id']}: {str(r.error).splitlines()[-1][:300]}" for r in results if r.error]


__all__ = ["SweepFailed", "SweepPlan", "concurrency", "fold_slots", "plan_sweep", "prepare_run", "print_leaderboard",
           "run_sweep", "write_plan"]
