"""Synthetic run directories for the stacking tests: folds.csv + models/*/{config.json, oof.parquet, test.parquet}.

Each model's predictions are a noisy, per-class-weighted view of the truth, so
models differ in quality, are complementary (each is strong on different
classes) and some are over- or under-confident: averaging, selection and
stacking all have something to gain. `write_specialist_run` is the multilabel
F2 case where reading probabilities at 0.5 ranks the methods wrongly.
Everything is derived from `seed`; config.json names the metric the sweep
monitored (log_loss for multiclass, f2 for multilabel, as the sweep's defaults).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.metrics import DEFAULT_METRIC

# (signal, noise, temperature) per model; the signal is modulated per class, so models are complementary.
MODELS = {
    "resnet-a1": (2.0, 1.0, 1.0),
    "effnet-b2": (1.9, 1.0, 0.7),  # over-confident
    "convnext-c3": (1.7, 1.1, 1.4),  # under-confident
    "vit-d4": (1.2, 1.2, 1.0),  # weak
}


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_truth(task: str, n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """0/1 truth rows: one class per row (multiclass) or labels with decreasing prevalence (multilabel)."""
    if task == "multiclass":
        return np.eye(n_classes)[rng.integers(0, n_classes, n)]
    prevalence = np.linspace(0.6, 0.08, n_classes)
    y = rng.random((n, n_classes)) < prevalence
    y[~y.any(axis=1), 0] = True  # every image has at least one tag, as in Planet
    return y.astype(float)


def make_predictions(y: np.ndarray, task: str, models: dict, rng: np.random.Generator) -> np.ndarray:
    """models x rows x classes probabilities derived from noisy views of y.

    All models see the same noisy evidence (hard images are hard for every
    backbone) through their own per-class strengths, plus their own noise, so
    combining helps but cannot reach a perfect score.
    """
    n, n_classes = y.shape
    evidence = (2 * y - 1) + 0.7 * rng.standard_normal((n, n_classes))
    out = []
    for m, (signal, noise, temperature) in enumerate(models.values()):
        strength = signal * (1 + 0.5 * np.cos(np.arange(n_classes) * 1.7 + m * 2.1))
        z = (strength * evidence + noise * rng.standard_normal((n, n_classes))) / temperature
        out.append(_softmax(z) if task == "multiclass" else 1 / (1 + np.exp(-(z - 1.0))))
    return np.array(out)


def make_rare_truth(task: str, n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Multilabel 0/1 rows with every label at a 15% rate, and at least one tag per row (a random one)."""
    assert task == "multilabel"
    y = rng.random((n, n_classes)) < 0.15
    empty = np.flatnonzero(~y.any(axis=1))
    y[empty, rng.integers(0, n_classes, len(empty))] = True
    return y.astype(float)


def make_specialist_predictions(y: np.ndarray, task: str, models: dict, rng: np.random.Generator) -> np.ndarray:
    """Multilabel probabilities where model m knows only labels j with j % n_models == m (pure noise elsewhere).

    `models` maps id -> (signal, noise, bias); the bias pushes every probability up, as an
    over-confident network's would. Their mean, read at 0.5, predicts many tags (F2 rewards
    recall); a per-label calibrated blend (logreg) finds each label's expert, but its honest
    probabilities for rare labels rarely reach 0.5: it loses at 0.5 and wins with thresholds.
    """
    assert task == "multilabel"
    n, n_labels = y.shape
    out = []
    for m, (signal, noise, bias) in enumerate(models.values()):
        expert = np.arange(n_labels) % len(models) == m
        z = np.where(expert, signal * (2 * y - 1), 0.0) + noise * rng.standard_normal((n, n_labels))
        out.append(1 / (1 + np.exp(-(z + bias))))
    return np.array(out)


SPECIALISTS = {"resnet-a1": (0.8, 1.0, 1.0), "effnet-b2": (0.8, 1.0, 1.0), "convnext-c3": (0.8, 1.0, 1.0)}


def write_run(root, task: str = "multiclass", n: int = 400, n_test: int = 50, k: int = 4, n_classes: int = 4,
              models: dict | None = None, seed: int = 0, form: str | None = None, tta: tuple = (),
              shuffle: bool = True, metric: str | None = None, truth=make_truth,
              predictions=make_predictions) -> Path:
    """Write a complete fake run under `root` and return its path.

    form: "label" (multiclass default), "attribute" (multiclass, 'nnynn' strings with some 'm')
    or "tags" (multilabel). tta: model ids that also get an oof_tta.parquet (slightly better).
    metric: what config.json says the sweep monitored (default: the task's default metric).
    truth, predictions: the generators (`make_truth`, `make_predictions` or their alternatives).
    """
    models = MODELS if models is None else models
    form = form or ("tags" if task == "multilabel" else "label")
    rng = np.random.default_rng(seed)
    run = Path(root)
    classes = [f"cls{c}" for c in range(n_classes)] if form != "attribute" else [f"c{c}" for c in range(n_classes)]
    y = truth(task, n, n_classes, rng)
    ids = np.array([f"img{i:05d}" for i in range(n)])
    folds = rng.permutation(n) % k
    column = {"label": "label", "tags": "tags", "attribute": "collar"}[form]
    if form == "label":
        target = np.array(classes)[y.argmax(axis=1)]
    elif form == "tags":
        target = [" ".join(np.array(classes)[row > 0]) for row in y]
    else:
        chars = np.where(y > 0, "y", "n").astype(object)
        maybe = (rng.random((n, n_classes)) < 0.1) & (y == 0)
        chars[maybe] = "m"
        target = ["".join(row) for row in chars]
    run.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "fold": folds, column: target}).to_csv(run / "folds.csv", index=False)
    oof = predictions(y, task, models, rng)
    test = predictions(truth(task, n_test, n_classes, rng), task, models, rng)
    test_ids = np.array([f"test{i:04d}" for i in range(n_test)])
    for m, model_id in enumerate(models):
        d = run / "models" / model_id
        d.mkdir(parents=True, exist_ok=True)
        config = {"model_id": model_id, "backbone": model_id.split("-")[0], "task": task, "classes": classes,
                  "k": k, "target": {"form": form, "column": column, "maybe_weight": 0.5},
                  "metric": metric or DEFAULT_METRIC[task]}
        (d / "config.json").write_text(json.dumps(config, indent=2))
        order = rng.permutation(n) if shuffle else np.arange(n)  # OOF files come in any row order
        frame = pd.DataFrame(oof[m][order], columns=classes)
        frame.insert(0, "fold", folds[order])
        frame.insert(0, "id", ids[order])
        frame.to_parquet(d / "oof.parquet", index=False)
        if model_id in tta:
            sharper = predictions(y, task, {model_id: models[model_id]}, np.random.default_rng(seed + 99))[0]
            tta_frame = frame.copy()
            tta_frame[classes] = (0.5 * oof[m] + 0.5 * sharper)[order]
            tta_frame.to_parquet(d / "oof_tta.parquet", index=False)
        t = pd.DataFrame(test[m], columns=classes)
        t.insert(0, "id", test_ids)
        t.to_parquet(d / "test.parquet", index=False)
        (d / "predict.json").write_text('{"tta": "orig", "merge": "mean"}\n')  # predict writes it last
    return run


def write_noise_run(root, n: int = 800, k: int = 4, n_classes: int = 4, n_models: int = 3, seed: int = 0) -> Path:
    """A multiclass run whose OOF predictions are pure noise (independent of the truth)."""
    run = write_run(root, "multiclass", n=n, k=k, n_classes=n_classes, seed=seed,
                    models={f"noise-{m}": (0.0, 1.0, 1.0) for m in range(n_models)})
    return run


def write_specialist_run(root, n: int = 600, n_test: int = 40, k: int = 3, n_classes: int = 6, seed: int = 0) -> Path:
    """A multilabel F2 run of 3 specialists (`make_specialist_predictions`): the mean wins at 0.5,
    logreg after each method's own thresholds."""
    return write_run(root, "multilabel", n=n, n_test=n_test, k=k, n_classes=n_classes, models=SPECIALISTS, seed=seed,
                     truth=make_rare_truth, predictions=make_specialist_predictions)


def write_multiclass_run(root) -> Path:
    """The shared multiclass run of the stack tests: 400 rows, 4 folds, 4 classes, resnet-a1 with TTA."""
    return write_run(root, "multiclass", n=400, n_test=30, k=4, n_classes=4, seed=0, tta=("resnet-a1",))


def write_multilabel_run(root) -> Path:
    """The shared multilabel run of the stack tests: 300 rows, 4 folds, 5 labels, metric f2."""
    return write_run(root, "multilabel", n=300, n_test=20, k=4, n_classes=5, seed=1)


def copy_run(run, tmp_path) -> Path:
    """A copy of `run` under tmp_path/run, for a test that edits or stacks it."""
    import shutil

    return Path(shutil.copytree(run, Path(tmp_path) / "run"))
