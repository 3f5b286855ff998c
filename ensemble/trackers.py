"""Experiment trackers: `python -m ensemble.tune --logger tensorboard|wandb|mlflow` (repeatable).

  tune     Ray Tune's own logger callbacks: one tracker run per model, its searched params as
           config / params, each epoch's folds' mean metric and every fold's score
  stack    `python -m ensemble.stack` logs every method's CV score (scores.csv) as a run "stack"
  report   `python -m ensemble.report` logs each model's CV score and the kept models as a run "report"

Everything stays on this machine unless the user asks otherwise, so a sweep works with
no network: TensorBoard's event files are in <run>/tune (where Tune writes them
anyway), W&B runs offline into <run>/wandb (WANDB_MODE=online logs live instead),
MLflow writes to a local store <run>/mlruns (MLFLOW_TRACKING_URI points elsewhere).
The choice is kept in <run>/trackers.json: a resume, the stack and the report log to
the same places without the flag. Syncing: README "Experiment trackers".
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from ensemble.errors import UserError
from ensemble.io import write_json

TRACKERS = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}  # name -> the module it needs
PROJECT = "ensemble"  # the W&B project; the run's name is the group (WANDB_PROJECT overrides)
LOCAL_MLRUNS = "mlruns"  # trackers.json's name for the run's own MLflow store


def check_installed(names: list[str]) -> None:
    """Before anything is written: every asked tracker can be imported."""
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise UserError(f"--logger {' '.join(missing)} needs {', '.join(TRACKERS[n] for n in missing)}: "
                        "pip install 'ensemble[trackers]'. Nothing was written.")


def settings(names: list[str], run_dir: Path, run_name: str) -> dict:
    """Where each tracker writes, for this run (the content of trackers.json)."""
    out = {}  # paths relative to the run (a moved run logs where it is now), resolved by `read`
    if "tensorboard" in names:
        out["tensorboard"] = {"logdir": "tune"}
    if "wandb" in names:
        out["wandb"] = {"project": os.environ.get("WANDB_PROJECT", PROJECT), "group": run_name,
                        "dir": ".", "mode": os.environ.get("WANDB_MODE", "offline")}
    if "mlflow" in names:
        out["mlflow"] = {"tracking_uri": os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_MLRUNS, "experiment": run_name}
    return out


def remember(names: list[str], run_dir: Path, run_name: str) -> dict:
    """trackers.json: the ones kept from earlier launches plus `names`; returns them all, resolved."""
    kept = _stored(run_dir)
    kept.update({k: v for k, v in settings(names, run_dir, run_name).items() if k not in kept})
    if kept:
        write_json(kept, run_dir / "trackers.json")
    return read(run_dir)


def read(run_dir: Path) -> dict:
    """trackers.json with its paths resolved against the run directory where it is now."""
    kept, run_dir = _stored(run_dir), Path(run_dir).resolve()
    if "tensorboard" in kept:
        kept["tensorboard"]["logdir"] = str(run_dir / kept["tensorboard"]["logdir"])
    if "wandb" in kept:
        kept["wandb"]["dir"] = str(run_dir / kept["wandb"]["dir"])
    if kept.get("mlflow", {}).get("tracking_uri") == LOCAL_MLRUNS:
        kept["mlflow"]["tracking_uri"] = (run_dir / "mlruns").as_uri()
    return kept


def _stored(run_dir: Path) -> dict:
    try:
        kept = json.loads((Path(run_dir) / "trackers.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in kept.items() if k in TRACKERS and isinstance(v, dict)} if isinstance(kept, dict) else {}


def where(kept: dict) -> list[str]:
    """What a person runs to see the trackers' files (TensorBoard's hint is the sweep's own line)."""
    lines = []
    if "wandb" in kept and kept["wandb"]["mode"] == "offline":
        lines.append(f"W&B runs (offline): {kept['wandb']['dir']}/wandb; upload with: "
                     f"wandb sync {kept['wandb']['dir']}/wandb/offline-run-*")
    if "mlflow" in kept and kept["mlflow"]["tracking_uri"].startswith("file:"):
        lines.append(f"MLflow runs: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri "
                     f"{kept['mlflow']['tracking_uri']}")
    return lines


def tune_callbacks(kept: dict) -> list:
    """Ray Tune's logger callbacks for the kept trackers."""
    callbacks = []
    if "tensorboard" in kept:
        from ray.tune.logger import TBXLoggerCallback  # Tune adds it by itself too; named here, not twice

        callbacks.append(TBXLoggerCallback())
    if "wandb" in kept:
        w = kept["wandb"]
        callbacks.append(_wandb_callback()(project=w["project"], group=w["group"], dir=w["dir"], mode=w["mode"]))
    if "mlflow" in kept:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        m = kept["mlflow"]
        _allow_file_store(m)
        callbacks.append(MLflowLoggerCallback(tracking_uri=m["tracking_uri"], experiment_name=m["experiment"]))
    return callbacks


def _wandb_callback():
    from ray.air.integrations.wandb import WandbLoggerCallback

    class Wandb(WandbLoggerCallback):
        """Ray's W&B callback, which asks for an API key even offline, where W&B itself needs none."""

        def setup(self, *args, **kwargs):
            if self.kwargs.get("mode") != "offline":
                super().setup(*args, **kwargs)

    return Wandb


def log_stage(run_dir: Path, stage: str, metrics: dict[str, float], params: dict | None = None) -> list[str]:
    """Log a stage's scores (stack, report) as one tracker run named `stage`; returns a line to print per
    tracker. A tracker that fails (no network, a server down, a package gone) gives a note, not an error."""
    kept, lines = read(run_dir), []
    metrics = {_key(k): float(v) for k, v in metrics.items()}
    params = {_key(k): v for k, v in (params or {}).items()}
    for name in kept:  # the stage's own outputs are written already: a tracker that fails is a note
        try:
            lines.append(f"logged the {stage} scores to {_LOGGERS[name](kept[name], stage, metrics, params)}")
        except Exception as exc:  # noqa: BLE001 (network, server, package: whatever the tracker raises)
            reason = (str(exc).splitlines() or [""])[0][:200]
            lines.append(f"note: could not log the {stage} scores to {name} ({type(exc).__name__}: {reason}); "
                         f"the {stage} outputs are written")
    return lines


def _log_tensorboard(settings: dict, stage: str, metrics: dict, params: dict) -> str:
    from tensorboardX import SummaryWriter

    logdir = Path(settings["logdir"]) / stage
    with SummaryWriter(str(logdir)) as writer:
        for key, value in metrics.items():
            writer.add_scalar(f"{stage}/{key}", value, 0)
    return f"tensorboard: {logdir}"


def _log_wandb(w: dict, stage: str, metrics: dict, params: dict) -> str:
    import wandb

    run = wandb.init(project=w["project"], group=w["group"], name=stage, job_type=stage, dir=w["dir"],
                     mode=w["mode"], config=params, reinit="create_new", settings=wandb.Settings(silent=True))
    run.log(metrics)
    run.finish()
    return f"wandb ({w['mode']}): {Path(run.dir).parent if w['mode'] == 'offline' else run.url}"


def _log_mlflow(m: dict, stage: str, metrics: dict, params: dict) -> str:
    import mlflow

    _allow_file_store(m)
    mlflow.set_tracking_uri(m["tracking_uri"])
    mlflow.set_experiment(m["experiment"])
    with mlflow.start_run(run_name=stage):
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
    return f"mlflow: {m['tracking_uri']} (experiment {m['experiment']!r}, run {stage!r})"


_LOGGERS = {"tensorboard": _log_tensorboard, "wandb": _log_wandb, "mlflow": _log_mlflow}


def _allow_file_store(settings: dict) -> None:
    """MLflow 3 refuses its local file store unless asked: a local store is the point offline."""
    if settings["tracking_uri"].startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _key(name: str) -> str:
    """A metric or param name every tracker accepts (MLflow refuses '+', as in 'greedy+views')."""
    return re.sub(r"[^\w.\-/ ]", "_", str(name))
