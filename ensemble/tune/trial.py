"""One Ray Tune trial = one model (backbone + param set) = its k folds, trained as Ray tasks.

Kept free of torch and timm on purpose: a trial process only submits its fold
tasks and reads their metrics.json files, so it starts in about a second and
uses no CPU share of its own (the fold tasks hold the resources).

Each fold is one long task (all epochs: model, data and worker stay warm), and
the trial reports epoch e to Tune once every fold has finished epoch e, with the
folds' mean metric. ASHA and early stopping therefore decide per param set; when
they stop a model, its fold tasks are cancelled together.

With URI storage (`ensemble.run.storage`) a fold task works in its node's mirror:
it makes its fold directory equal to the URI's, then pushes its files after
every epoch. The trial works in a private scratch directory: it pulls the
folds' metrics.json while it waits and pushes what it writes at the end.
"""

from __future__ import annotations

import os

import numpy as np

from ensemble.metrics import is_better
from ensemble.run import Run, open_run, total_epochs

POLL_SECONDS = 0.5


def _fold_task(config: dict, fold: int, location: str, epochs: int) -> dict:
    train_until = import_without_wandb().train_until  # torch + timm: imported in the fold worker only

    run = Run.on_node(location)  # the directory itself, or this node's mirror of a URI run
    after_epoch = None
    if run.store:  # the fold's checkpoint from the URI, and every epoch back to it
        run.pull(run.folds_file)
        run.pull(run.fold_dir(config["model_id"], fold), exact=True)  # never a stale local checkpoint
        for parent in {config.get("init_from"), (config.get("pseudo") or {}).get("model")} - {None}:
            run.pull(run.model_dir(parent) / "config.json")  # a round starts from its earlier round's same fold
            for name in ("weights.pt", "metrics.json"):
                run.pull(run.fold_dir(parent, fold) / name)
        after_epoch = lambda: run.push_fold(config["model_id"], fold)  # noqa: E731
    return train_until(config, fold, run, epochs, cpus=config["resources"].get("cpu", 1), after_epoch=after_epoch)


def import_without_wandb(module: str = "ensemble.tune.train"):
    """Import `module` (torch + timm: ~4 s for training) without timm's optional wandb import.

    timm imports wandb whenever it is installed (the `ensemble[trackers]` extra), for a
    logging helper no fold or TTA actor uses: 0.6 s of every such worker's start here.
    Trackers log from Tune's driver, so hiding it from this one import costs nothing.
    """
    import importlib
    import sys

    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError, which timm catches
    try:
        return importlib.import_module(module)
    finally:
        if hide:
            del sys.modules["wandb"]


def _warm_up() -> None:
    import_without_wandb()


def warm_up_workers(resources: dict, slots: int) -> list:
    """Import torch and timm in `slots` CPU workers while Tune starts its trials.

    CPU workers are reused by the fold tasks that follow, so the sweep's first
    epochs do not wait for the imports. GPU fold workers are never reused
    (max_calls=1), so there is nothing to warm for them.
    """
    import ray

    if resources.get("gpu", 0):
        return []
    warm = ray.remote(_warm_up).options(num_cpus=resources.get("cpu", 1), scheduling_strategy="DEFAULT",
                                        runtime_env={"env_vars": _trial_env_vars()})
    return [warm.remote() for _ in range(slots)]


def _trial_env_vars() -> dict:
    """The env_vars Ray Tune gives trial processes, which their fold tasks inherit.

    Ray reuses a worker only for tasks of the same runtime_env, so the warm-up tasks
    must carry the same env_vars as the fold tasks the trials submit. This mirrors
    Tune's (internal) rule; if Tune changes it, warm-up only loses its effect.
    """
    try:
        from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE
    except ImportError:
        return {}
    return {**DEFAULT_ENV_VARS, **{k: os.environ[k] for k in ENV_VARS_TO_PROPAGATE if k in os.environ}}


def fold_task(resources: dict):
    """The remote fold task with one fold's resources (`gpu: 0.5` packs two folds on a GPU)."""
    import ray

    gpu = resources.get("gpu", 0)
    # A GPU worker keeps the CUDA context of the device it started on: never reuse it for another.
    return ray.remote(max_calls=1 if gpu else 0)(_fold_task).options(
        num_cpus=resources.get("cpu", 1), num_gpus=gpu,
        scheduling_strategy="DEFAULT",  # not captured by this trial's placement group
        max_retries=2,  # a killed worker: the task reruns and continues from the fold's last.pt
    )


def run_model(tune_config: dict) -> None:
    """The Tune trainable: train every fold of one model, report the folds' mean metric per epoch."""
    with open_run(tune_config["run"]) as run:  # a URI run: a private scratch copy of what the trial reads
        run.pull(run.folds_file)
        run.pull_artifacts(run.model_dir(tune_config["model_id"]))
        _train_model(tune_config, run)


def _train_model(tune_config: dict, run: Run) -> None:
    import ray
    from ray import tune

    model_id = tune_config["model_id"]
    config = run.read_config(model_id)
    # Resources come from this launch, not config.json: a resumed sweep may run on other hardware.
    config["resources"] = tune_config["resources"]
    k, epochs, metric, mode = config["k"], total_epochs(config), config["metric"], config["mode"]
    patience = (tune_config.get("early_stopping") or {}).get("patience", 0)

    task = fold_task(config["resources"])
    pending = {}
    for fold in range(k):
        m = run.read_metrics(model_id, fold)
        if not (m and m["complete"]):
            pending[fold] = task.remote(config, fold, run.location, epochs)
    best, since_best = None, 0
    try:
        for epoch in range(1, epochs + 1):
            rows = _wait_for_epoch(run, model_id, k, epoch, pending)
            score = float(np.mean([r[metric] for r in rows]))
            if best is None or is_better(score, best, mode):
                best, since_best = score, 0
            else:
                since_best += 1
            stop = bool(patience) and since_best >= patience and epoch < epochs
            if stop or epoch == epochs:
                if stop:
                    _cancel(pending, wait=30.0)  # the folds' last writes land before they are marked complete
                else:  # let the tasks return normally: a warm worker is worth keeping
                    ray.get(list(pending.values()))
                    pending.clear()
                run.pull_artifacts(run.model_dir(model_id))  # the folds' oof.parquet (a URI run)
                for fold in range(k):
                    run.mark_complete(model_id, fold, stopped=f"early stop after epoch {epoch}" if stop else None)
                run.finalize_model(config)
                run.push_model(model_id, k)
            tune.report({metric: score, "epoch": epoch, "stopped_early": stop,
                         **{f"fold{f}_{metric}": r[metric] for f, r in enumerate(rows)}})
            if stop:
                return
    finally:
        _cancel(pending)  # stopped by the scheduler (ASHA) or failing: no orphaned fold tasks


def _wait_for_epoch(run: Run, model_id: str, k: int, epoch: int, pending: dict) -> list[dict]:
    """Block until every fold has finished `epoch`; a failed fold task raises here."""
    import ray

    while True:
        for f in range(k if run.store else 0):
            run.pull(run.fold_dir(model_id, f) / "metrics.json")
        metrics = [run.read_metrics(model_id, f) for f in range(k)]
        if all(m is not None and m["epochs"] >= epoch for m in metrics):
            return [m["history"][epoch - 1] for m in metrics]
        refs = list(pending.values())
        if not refs:
            raise RuntimeError(f"{model_id}: no fold is training, yet epoch {epoch} is missing")
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_SECONDS)
        for ref in done:
            ray.get(ref)  # re-raises the fold's exception: Tune retries the trial from the checkpoints
        for fold in [f for f, ref in pending.items() if ref in done]:
            del pending[fold]  # finished: its metrics.json holds every epoch


def _cancel(pending: dict, wait: float = 0.0) -> None:
    """Cancel the fold tasks; with `wait`, give them that many seconds to end."""
    import ray

    refs = list(pending.values())
    for ref in refs:
        # Not force: the task gets a KeyboardInterrupt and its worker process survives, warm.
        # Checkpoints are written atomically, so an interrupted save leaves the last good one.
        ray.cancel(ref)
    if refs and wait:
        ray.wait(refs, num_returns=len(refs), timeout=wait)
    pending.clear()


def pruned_callback(run: Run):
    """A Tune callback (in the driver) that records models the scheduler stopped, so --resume does not retrain them."""
    from ray import tune

    class MarkPruned(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            model_id = trial.config["model_id"]
            if not run.exists(run.model_dir(model_id) / "oof.parquet"):
                run.mark_pruned(model_id, (trial.last_result or {}).get("epoch"))

    return MarkPruned()
