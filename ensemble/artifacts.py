"""The artifact layout every stage reads and writes (docs/design.md), and nothing heavier.

No torch and no Ray here: the sweep's trial processes, the stacking layer and
the tests read run directories through these helpers.

  <run>/folds.csv                            id, fold, the target column(s)
  <run>/models/<model_id>/config.json        everything needed to rebuild the model
  <run>/models/<model_id>/oof.parquet        all k folds' held-out rows (when complete)
  <run>/models/<model_id>/status.json        {"state": "pruned"} when a scheduler stopped it
  <run>/models/<model_id>/fold<k>/           last.pt, weights.pt, oof.parquet, metrics.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ensemble.io import write_json, write_parquet

STATUS_FILE = "status.json"


def fold_dir(run_dir: Path, model_id: str, fold: int) -> Path:
    return Path(run_dir) / "models" / model_id / f"fold{fold}"


def read_metrics(run_dir: Path, model_id: str, fold: int) -> dict | None:
    path = fold_dir(run_dir, model_id, fold) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def total_epochs(config: dict) -> int:
    return sum(stage["epochs"] for stage in config["stages"])


def is_better(score: float, best: float, mode: str) -> bool:
    """`score` strictly better than `best` for a monitored metric with this mode ('min' or 'max')."""
    return score < best if mode == "min" else score > best


def stage_of(config: dict, epoch: int) -> tuple[int, dict, int]:
    """(stage index, stage, epoch index inside the stage) of a 0-based global epoch."""
    start = 0
    for i, stage in enumerate(config["stages"]):
        if epoch < start + stage["epochs"]:
            return i, stage, epoch - start
        start += stage["epochs"]
    raise IndexError(f"epoch {epoch} is past the last stage")


def mark_complete(run_dir: str | os.PathLike, model_id: str, fold: int, stopped: str | None = None) -> None:
    """Mark a fold complete: all epochs done, or the whole model stopped early."""
    metrics = read_metrics(Path(run_dir), model_id, fold)
    metrics.update(complete=True, stopped=stopped)
    write_json(metrics, fold_dir(Path(run_dir), model_id, fold) / "metrics.json")


def finalize_model(config: dict, run_dir: str | os.PathLike) -> Path:
    """When all k folds are complete: the model's oof.parquet (every training id once) and config.json."""
    model_dir = Path(run_dir) / "models" / config["model_id"]
    parts = [pd.read_parquet(fold_dir(run_dir, config["model_id"], f) / "oof.parquet") for f in range(config["k"])]
    oof = pd.concat(parts, ignore_index=True)
    folds = pd.read_csv(Path(run_dir) / "folds.csv", dtype={"id": str})
    assert len(oof) == len(folds) and set(oof["id"]) == set(folds["id"]), "OOF rows must cover folds.csv exactly"
    oof = oof.set_index("id").loc[folds["id"]].reset_index()
    write_json(config, model_dir / "config.json")
    write_parquet(oof, model_dir / "oof.parquet")
    return model_dir


def model_state(run_dir: Path, config: dict) -> str:
    """'complete', 'pruned' or 'todo', from the model's own artifacts (not from Tune's state)."""
    model_dir = Path(run_dir) / "models" / config["model_id"]
    if (model_dir / "oof.parquet").exists():
        return "complete"
    status = model_dir / STATUS_FILE
    if status.exists() and json.loads(status.read_text()).get("state") == "pruned":
        return "pruned"
    return "todo"
