"""Synthetic runs for the report tests: the stack fixtures' runs plus what a sweep and predict also write.

`write_report_run` starts from `stack_fixtures.write_run` (folds.csv, config.json,
oof.parquet, test.parquet) and adds space.yaml, the sweep's fields in config.json
(backbone, searched params, folds strategy, resources, space), fold metrics.json
with per-epoch histories whose best score is the model's real score on that fold,
predict.json with OOF and TTA-OOF scores, and for some models oof_views.parquet
(per-view TTA predictions) with oof_tta.parquet their mean. `stack_run` runs the
real stacking CLI in-process. Everything derives from `seed`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from stack_fixtures import write_run

from ensemble.data.manifest import encode_targets
from ensemble.metrics import METRICS

VIEWS = ("orig", "flip", "rotate:5")
T0 = 1_790_000_000.0  # when the synthetic sweep started (seconds since the epoch)


def _truth(run: Path, config: dict) -> tuple[pd.DataFrame, np.ndarray]:
    folds = pd.read_csv(run / "folds.csv", dtype=str, keep_default_na=False)
    return folds, np.asarray(encode_targets(folds, config["target"], config["classes"]), dtype=np.float64)


def _aligned(path: Path, folds: pd.DataFrame, classes: list[str]) -> np.ndarray:
    frame = pd.read_parquet(path)
    return frame.set_index("id").loc[folds["id"], classes].to_numpy(np.float64)


def add_sweep_files(run: Path, epochs: int = 4, seed: int = 0, lrs=(0.003, 0.01)) -> None:
    """config.json's sweep fields, and every fold's metrics.json: a history improving to the fold's real score."""
    rng = np.random.default_rng(seed)
    run = Path(run)
    (run / "space.yaml").write_text("description: a synthetic space for the report tests\nmetric: log_loss\n")
    clock = T0
    for m, config_path in enumerate(sorted(run.glob("models/*/config.json"))):
        config = json.loads(config_path.read_text())
        metric = METRICS[config["metric"]]
        config.update(searched={"lr": lrs[m % len(lrs)]}, mode=metric.mode, space="synthetic",
                      folds={"k": config["k"], "strategy": "stratified", "seed": 0},
                      resources={"cpu": 1.0, "gpu": 0.25})
        config_path.write_text(json.dumps(config, indent=2))
        for f, best in enumerate(_fold_scores(run, config)):
            # A worse start that approaches the best score; the last epoch is the best.
            start = best * 2.5 if metric.mode == "min" else best * 0.6
            history = []
            for e in range(1, epochs + 1):
                share = (epochs - e) / max(epochs - 1, 1)
                seconds = float(rng.uniform(2.0, 4.0))
                score = best + (start - best) * share ** 1.5
                loss = None if config["task"] == "retrieval" else score  # retrieval folds have no validation loss
                history.append({"epoch": e, "train_loss": 1.5 * share + 0.2 + 0.02 * f, "loss": loss,
                                "lr": 0.001, "started": clock, "seconds": seconds, "device": "",
                                config["metric"]: score})
                clock += seconds
            doc = {"model_id": config["model_id"], "fold": f, "metric": config["metric"], "mode": metric.mode,
                   "best_epoch": epochs, "best_score": best, "epochs": epochs, "complete": True, "stopped": None,
                   "history": history, "skipped_ids": []}
            (config_path.parent / f"fold{f}").mkdir(exist_ok=True)
            (config_path.parent / f"fold{f}" / "metrics.json").write_text(json.dumps(doc))


def _fold_scores(run: Path, config: dict) -> list[float]:
    """The model's real score on each held-out fold (retrieval: leave-one-out within the fold)."""
    folds, y = _truth(run, config) if config["task"] != "retrieval" else (
        pd.read_csv(run / "folds.csv", dtype=str, keep_default_na=False), None)
    fold = folds["fold"].astype(int).to_numpy()
    model_dir = run / "models" / config["model_id"]
    if config["task"] == "retrieval":
        from ensemble.retrieve.select import fold_scores

        emb = np.load(model_dir / "emb" / "oof.npy").astype(np.float32)  # the fixture's rows are folds.csv's order
        labels = folds[config["target"]["column"]].to_numpy()
        return [fold_scores(emb, labels, fold, which=[f])[config["metric"]] for f in range(config["k"])]
    proba = _aligned(model_dir / "oof.parquet", folds, config["classes"])
    metric = METRICS[config["metric"]]
    return [metric(y[fold == f], proba[fold == f], config["task"]) for f in range(config["k"])]


def add_predict_files(run: Path, views_for: tuple[str, ...] = (), seed: int = 0) -> None:
    """predict.json with scores for every model; per-view OOF (and oof_tta.parquet, their mean) for `views_for`."""
    rng = np.random.default_rng(seed + 1)
    for config_path in sorted(Path(run).glob("models/*/config.json")):
        config = json.loads(config_path.read_text())
        model_dir, classes, task = config_path.parent, config["classes"], config["task"]
        metric = METRICS[config["metric"]]
        folds, y = _truth(run, config)
        oof = _aligned(model_dir / "oof.parquet", folds, classes)
        scores = {f"oof {metric.name}": metric(y, oof, task)}
        keys = pd.DataFrame({"id": folds["id"], "fold": folds["fold"].astype(int)})
        if config["model_id"] in views_for:
            per_view = []
            for _ in VIEWS:
                noisy = np.clip(oof * np.exp(0.3 * rng.standard_normal(oof.shape)), 1e-6, 1 - 1e-6)
                per_view.append(noisy / noisy.sum(1, keepdims=True) if task == "multiclass" else noisy)
            long = pd.concat([keys.assign(view=v, **dict(zip(classes, p.T))) for v, p in zip(VIEWS, per_view)])
            long.to_parquet(model_dir / "oof_views.parquet", index=False)
            merged = np.mean(per_view, axis=0)
            keys.assign(**dict(zip(classes, merged.T))).to_parquet(model_dir / "oof_tta.parquet", index=False)
            scores.update({f"view {v}": metric(y, p, task) for v, p in zip(VIEWS, per_view)})
        if (model_dir / "oof_tta.parquet").exists():
            scores[f"oof_tta {metric.name}"] = metric(y, _aligned(model_dir / "oof_tta.parquet", folds, classes), task)
        (model_dir / "predict.json").write_text(json.dumps({"tta": ",".join(VIEWS), "merge": "mean",
                                                            "scores": scores}))


def stack_run(run: Path, method: str = "greedy") -> None:
    """The real stacking CLI, in-process (quick: --smoke)."""
    from ensemble.stack.cli import parse_args, stack

    stack(parse_args(["--run", str(run), "--method", method, "--smoke"]))


def write_report_run(root, task: str = "multiclass", stacked: bool = True, n: int = 400, k: int = 4,
                     n_classes: int = 4, models: dict | None = None, seed: int = 0, epochs: int = 4) -> Path:
    """A finished run of `task`: sweep files, predict files (views for the first model), and the stack."""
    run = write_run(root, task, n=n, n_test=30, k=k, n_classes=n_classes, models=models, seed=seed)
    add_sweep_files(run, epochs=epochs, seed=seed)
    first = min(p.name for p in (run / "models").iterdir())
    add_predict_files(run, views_for=(first,), seed=seed)
    if stacked:
        stack_run(run)
    return run


def write_report_retrieval_run(root, retrieved: bool = True) -> Path:
    """`retrieve_fixtures.write_retrieval_run` plus fold histories, and the real retrieve stage (--smoke)."""
    from retrieve_fixtures import write_retrieval_run

    from ensemble.retrieve.cli import parse_args, retrieve

    run = write_retrieval_run(Path(root))
    add_sweep_files(run)
    if retrieved:
        retrieve(parse_args(["--run", str(run), "--smoke"]))
    return run
