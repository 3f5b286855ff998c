"""Meta-models (level 2) trained with the level-1 folds: `fit_meta`, and their files (`meta_files`, `load_meta`).

They are trained with the SAME folds as level 1: for fold f they fit on rows
with fold != f (one of those folds is the inner fold for early stopping or
tuning, then they refit on all of them) and predict fold f, so the level-2 OOF
is leak-free; test predictions are the mean of the k fold models (`fit_meta`).
The models themselves (lgbm, xgb, ridge, logreg) and their features are in
`ensemble.stack.meta_models`.

Models are saved natively: LightGBM text, XGBoost JSON, coefficients as npz,
with meta.json describing the features (`meta_files`); `load_meta` reads them
back. No pickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ensemble.errors import UserError
from ensemble.stack.meta_models import META_METHODS, create_meta_model, feature_spec

__all__ = ["META_METHODS", "LoadedMeta", "MetaFit", "create_meta_model", "fit_meta", "load_meta", "meta_files"]


# ------------------------------------------------------------------ level-2 cross-validation


@dataclass
class MetaFit:
    """A meta-model fitted fold-wise: level-2 OOF, test and in-sample predictions, the fold models."""

    method: str
    oof: np.ndarray
    test: np.ndarray
    in_sample: np.ndarray
    fold_models: dict = field(default_factory=dict)  # fold -> fitted model
    constant: dict = field(default_factory=dict)  # fold -> {label index: probability} (labels absent in training)
    spec: dict = field(default_factory=dict)


def fit_meta(method: str, oof: np.ndarray, y_true: np.ndarray, folds: np.ndarray, test: np.ndarray, task: str,
             entropy: bool = False, smoke: bool = False, seed: int = 0) -> MetaFit:
    """Train `method` with the level-1 folds: fold f's model never sees fold f's rows.

    oof, test: models x rows x classes level-1 probabilities; y_true: rows x classes.
    """
    fold_values = np.unique(folds)
    if len(fold_values) < 3:
        raise UserError(f"{method} needs at least 3 folds (one held out, one inner fold for early stopping or "
                        f"tuning); folds.csv has {len(fold_values)}.")
    n_classes = y_true.shape[1]
    result = MetaFit(method, np.zeros_like(y_true, dtype=np.float64), np.zeros((test.shape[1], n_classes)),
                     np.zeros_like(y_true, dtype=np.float64))
    # BLAS on one thread (ridge / logistic are small problems); the boosters thread themselves (meta_models).
    with threadpool_limits(1, user_api="blas"):
        for i, f in enumerate(fold_values):
            inner = fold_values[(i + 1) % len(fold_values)]  # early stopping / tuning rows: another training fold
            train, valid, held = (folds != f) & (folds != inner), folds == inner, folds == f
            constant = {}
            if task == "multilabel":  # a label that never (or always) occurs in the training rows: smoothed rate
                seen = y_true[~held]
                rate = (seen.sum(axis=0) + 0.5) / (len(seen) + 1)
                constant = {int(j): float(rate[j]) for j in np.flatnonzero(seen.min(axis=0) == seen.max(axis=0))}
            model = create_meta_model(method, task, n_classes, smoke, seed, entropy)
            model.fit(oof[:, train], y_true[train], oof[:, valid], y_true[valid])
            result.fold_models[f.item()] = model
            result.constant[f.item()] = constant
            result.oof[held] = _predict_fold(model, constant, oof[:, held])
            result.test += _predict_fold(model, constant, test) / len(fold_values)
            result.in_sample += _predict_fold(model, constant, oof) / len(fold_values)
    result.spec = {"method": method, "task": task, "n_classes": n_classes, "entropy": entropy,
                   "features": feature_spec(method, entropy), "folds": [f.item() for f in fold_values],
                   "constant_labels": {str(f): c for f, c in result.constant.items()}}
    return result


def _predict_fold(model, constant: dict, proba: np.ndarray) -> np.ndarray:
    pred = model.predict(proba)
    for j, p in constant.items():
        pred[:, j] = p
    return pred


def load_meta(folder) -> "LoadedMeta":
    """Read meta/<method>/ back (native files only) into something that predicts."""
    folder = Path(folder)
    spec = json.loads((folder / "meta.json").read_text())
    models = {}
    for f in spec["folds"]:
        model = create_meta_model(spec["method"], spec["task"], spec["n_classes"], entropy=spec["entropy"])
        models[f] = model.load(folder / f"fold{f}")
    return LoadedMeta(spec, models)


@dataclass
class LoadedMeta:
    """A meta-model read back from meta/<method>/: the spec (meta.json) and the fold models."""

    spec: dict
    fold_models: dict

    def predict(self, proba: np.ndarray) -> np.ndarray:
        """Mean of the fold models' predictions for models x rows x classes level-1 probabilities."""
        constant = self.spec["constant_labels"]
        preds = [_predict_fold(m, {int(j): p for j, p in constant[str(f)].items()}, proba)
                 for f, m in self.fold_models.items()]
        return np.mean(preds, axis=0)


def meta_files(fit: MetaFit, classes: list[str], model_ids: list[str]) -> dict[str, bytes]:
    """meta/<method>/ as {relative path: bytes}: meta.json plus each fold's native model files."""
    spec = {**fit.spec, "classes": classes, "model_ids": model_ids}
    files = {"meta.json": (json.dumps(spec, indent=2) + "\n").encode()}
    for f, model in fit.fold_models.items():
        files.update({f"fold{f}/{name}": data for name, data in model.files().items()})
    return files
