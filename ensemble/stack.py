"""Stacking: meta-models on the stacked OOF predictions, and the stacking CLI.

    python -m ensemble.stack --run runs/NAME [--method all] [--metric log_loss] [--beta 2]

reads a run (see `ensemble.oof.load_run`), scores the best single model, the
plain mean, greedy selection (`ensemble.select`) and the meta-models below,
fits per-label thresholds for multilabel runs (`ensemble.thresholds`), and
writes `<run>/ensemble/`: scores.csv, selection.json, thresholds.json, meta/
and submission.csv. docs/stacking.md is the manual.

Meta-models (level 2) see one feature per (model, class) (plus each model's
entropy with `--extra-features`) and are trained with the SAME folds as level 1:
for fold f they fit on rows with fold != f and predict fold f, so the level-2
OOF is leak-free; test predictions are the mean of the k fold models. LightGBM
and XGBoost stop early on one inner fold of the training rows (never the
held-out fold), then refit on all training rows for that many rounds. Multiclass
is native (soft targets become weighted copies of a row, one per class with
y > 0, which is exact cross-entropy); multilabel fits one model per label.
Models are saved natively: LightGBM text, XGBoost JSON, ridge/logistic
coefficients as npz, with meta.json describing the features.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ensemble.errors import UserError
from ensemble.metrics import Metric, fbeta_name, get_metric

META_METHODS = ("lgbm", "xgb", "ridge", "logreg")
METHODS = ("greedy", "mean") + META_METHODS
_P_CLIP = 1e-7  # probabilities are clipped here before logs (features) and after ridge


# ------------------------------------------------------------------ features


def stack_features(proba: np.ndarray, task: str, kind: str = "proba", entropy: bool = False) -> np.ndarray:
    """Level-2 features (rows x features) from models x rows x classes probabilities.

    kind "proba" keeps the probabilities (trees, ridge); "logit" uses centred
    log-probabilities (multiclass) or logits (multilabel), so a linear model can
    learn a weighted geometric mean with a temperature. `entropy` appends each
    model's prediction entropy (mean binary entropy for multilabel).
    """
    n_models, n, n_classes = proba.shape
    p = np.clip(proba, _P_CLIP, 1 - _P_CLIP)
    if kind == "logit":
        feats = np.log(p)
        if task == "multiclass":
            feats -= feats.mean(axis=2, keepdims=True)
        else:
            feats -= np.log1p(-p)
    else:
        feats = np.asarray(proba, dtype=np.float64)
    blocks = [feats.transpose(1, 0, 2).reshape(n, n_models * n_classes)]
    if entropy:
        if task == "multiclass":
            ent = -(p * np.log(p)).sum(axis=2)
        else:
            ent = -(p * np.log(p) + (1 - p) * np.log1p(-p)).mean(axis=2)
        blocks.append(ent.T)
    return np.hstack(blocks)


def _expand_soft(X: np.ndarray, y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows repeated once per class with y > 0, weighted by y: exact soft-target cross-entropy.

    For multiclass the labels are class indices; for one multilabel column (y: rows)
    they are 0/1, a fractional y giving a positive and a negative copy.
    """
    if task == "multiclass":
        rows, cols = np.nonzero(y > 0)
        return X[rows], cols, y[rows, cols]
    pos, neg = np.flatnonzero(y > 0), np.flatnonzero(y < 1)
    rows = np.r_[pos, neg]
    return X[rows], np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[y[pos], 1 - y[neg]]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ one fold's meta-model
# Each class fits on one training set; `files()` gives its native files, `load` reads them back.


class _Booster:
    """LightGBM or XGBoost: native multiclass, or one binary booster per label."""

    def __init__(self, method: str, task: str, n_classes: int, max_rounds: int, seed: int):
        self.method, self.task, self.n_classes, self.max_rounds, self.seed = method, task, n_classes, max_rounds, seed
        self.boosters: list = []

    def _params(self) -> dict:
        multi = self.task == "multiclass"
        if self.method == "lgbm":
            return {"objective": "multiclass" if multi else "binary", **({"num_class": self.n_classes} if multi else {}),
                    "learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 20, "feature_fraction": 0.8,
                    "lambda_l2": 1.0, "verbose": -1, "seed": self.seed, "deterministic": True, "num_threads": 1}
        return {"objective": "multi:softprob" if multi else "binary:logistic",
                **({"num_class": self.n_classes} if multi else {}), "eta": 0.1, "max_depth": 3,
                "min_child_weight": 1.0, "subsample": 0.8, "colsample_bytree": 0.8, "lambda": 1.0,
                "tree_method": "hist", "nthread": 1, "seed": self.seed}

    def _train_one(self, X, y, X_val, y_val):
        import lightgbm as lgb
        import xgboost as xgb

        Xt, yt, wt = _expand_soft(X, y, self.task)
        Xv, yv, wv = _expand_soft(X_val, y_val, self.task)
        params = self._params()
        if self.method == "lgbm":
            train = lgb.Dataset(Xt, yt, weight=wt, free_raw_data=False)
            valid = lgb.Dataset(Xv, yv, weight=wv, reference=train)
            probe = lgb.train(params, train, self.max_rounds, valid_sets=[valid],
                              callbacks=[lgb.early_stopping(20, verbose=False)])
            rounds = max(1, probe.best_iteration)
            Xa, ya, wa = _expand_soft(np.vstack([X, X_val]), np.concatenate([y, y_val]), self.task)
            return lgb.train(params, lgb.Dataset(Xa, ya, weight=wa), rounds)
        train, valid = xgb.DMatrix(Xt, yt, weight=wt), xgb.DMatrix(Xv, yv, weight=wv)
        probe = xgb.train(params, train, self.max_rounds, evals=[(valid, "valid")],
                          early_stopping_rounds=20, verbose_eval=False)
        Xa, ya, wa = _expand_soft(np.vstack([X, X_val]), np.concatenate([y, y_val]), self.task)
        return xgb.train(params, xgb.DMatrix(Xa, ya, weight=wa), probe.best_iteration + 1)

    def fit(self, X, y, X_val, y_val) -> "_Booster":
        """Early-stop on (X_val, y_val), then refit on both for the best number of rounds."""
        if self.task == "multiclass":
            self.boosters = [self._train_one(X, y, X_val, y_val)]
        else:
            self.boosters = [self._train_one(X, y[:, j], X_val, y_val[:, j]) for j in range(self.n_classes)]
        return self

    def predict(self, X) -> np.ndarray:
        if self.method == "xgb":
            import xgboost as xgb

            X = xgb.DMatrix(X)
        out = [np.asarray(b.predict(X), dtype=np.float64) for b in self.boosters]
        return out[0].reshape(-1, self.n_classes) if self.task == "multiclass" else np.column_stack(out)

    def files(self) -> dict[str, bytes]:
        ext = "txt" if self.method == "lgbm" else "json"
        dump = (lambda b: b.model_to_string().encode()) if self.method == "lgbm" else (lambda b: bytes(b.save_raw("json")))
        return {f"booster{j}.{ext}": dump(b) for j, b in enumerate(self.boosters)}

    def load(self, folder: Path, n_boosters: int) -> "_Booster":
        import lightgbm as lgb
        import xgboost as xgb

        self.boosters = []
        for j in range(n_boosters):
            if self.method == "lgbm":
                self.boosters.append(lgb.Booster(model_file=str(folder / f"booster{j}.txt")))
            else:
                b = xgb.Booster()
                b.load_model(str(folder / f"booster{j}.json"))
                self.boosters.append(b)
        return self


class _Linear:
    """Ridge (a linear blend of probabilities) or logistic regression, on standardised features.

    Ridge picks its L2 strength by generalised cross-validation (RidgeCV) on all
    training rows; logistic regression picks C on the inner fold, then refits
    on all training rows.
    """

    C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)

    def __init__(self, method: str, task: str, n_classes: int, seed: int):
        self.method, self.task, self.n_classes, self.seed = method, task, n_classes, seed

    def fit(self, X, y, X_val, y_val) -> "_Linear":
        from sklearn.linear_model import RidgeCV

        from ensemble.metrics import log_loss

        n_fit = len(X)
        X, y = np.vstack([X, X_val]), np.concatenate([y, y_val])
        self.mean = X.mean(axis=0)
        self.scale = X.std(axis=0)
        self.scale[self.scale == 0] = 1.0
        Z = (X - self.mean) / self.scale
        if self.method == "ridge":
            model = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(Z, y)
            self.coef, self.intercept = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
            self.C = float(model.alpha_)
            return self
        losses = []
        for C in self.C_GRID:
            self._fit_logreg(Z[:n_fit], y[:n_fit], C)
            losses.append(log_loss(y[n_fit:], self.predict(X[n_fit:]), self.task))
        self.C = self.C_GRID[int(np.argmin(losses))]
        self._fit_logreg(Z, y, self.C)
        return self

    def _fit_logreg(self, Z, y, C) -> None:
        from sklearn.linear_model import LogisticRegression

        self.coef = np.zeros((self.n_classes, Z.shape[1]))
        self.intercept = np.zeros(self.n_classes)
        for j in [None] if self.task == "multiclass" else range(self.n_classes):
            Ze, labels, weight = _expand_soft(Z, y if j is None else y[:, j], self.task)
            if len(np.unique(labels)) < 2:  # one class only in these rows: a constant at its smoothed rate
                rate = (y[:, j].sum() + 0.5) / (len(y) + 1) if j is not None else 1.0
                if j is not None:
                    self.intercept[j] = np.log(rate / (1 - rate))
                else:
                    self.intercept[:] = -20.0
                    self.intercept[int(labels[0])] = 0.0
                continue
            model = LogisticRegression(C=C, max_iter=2000, random_state=self.seed).fit(Ze, labels, sample_weight=weight)
            if j is None:  # multiclass: map the classes seen in these rows back to all classes
                seen = model.classes_.astype(int)
                coef = model.coef_ if len(seen) > 2 else np.vstack([np.zeros_like(model.coef_), model.coef_])
                icpt = model.intercept_ if len(seen) > 2 else np.r_[0.0, model.intercept_]
                self.intercept[:] = icpt.min() - 20.0  # classes never seen in training: ~e^-20
                self.coef[seen], self.intercept[seen] = coef, icpt
            else:
                self.coef[j], self.intercept[j] = model.coef_[0], model.intercept_[0]

    def predict(self, X) -> np.ndarray:
        z = ((X - self.mean) / self.scale) @ self.coef.T + self.intercept
        if self.method == "logreg":
            return _softmax(z) if self.task == "multiclass" else 1 / (1 + np.exp(-z))
        if self.task == "multilabel":
            return np.clip(z, _P_CLIP, 1 - _P_CLIP)
        z = np.clip(z, 1e-3, 1.0)  # ridge is a regression: keep every class possible, then renormalise
        return z / z.sum(axis=1, keepdims=True)

    def files(self) -> dict[str, bytes]:
        import io

        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept, C=self.C)
        return {"coef.npz": buf.getvalue()}

    def load(self, folder: Path, n_boosters: int = 0) -> "_Linear":
        with np.load(folder / "coef.npz") as npz:
            self.mean, self.scale, self.coef, self.intercept = (npz[k] for k in ("mean", "scale", "coef", "intercept"))
            self.C = float(npz["C"])
        return self


def create_meta_model(method: str, task: str, n_classes: int, smoke: bool = False, seed: int = 0):
    """An unfitted one-fold meta-model: 'lgbm', 'xgb', 'ridge' or 'logreg'."""
    if method in ("lgbm", "xgb"):
        return _Booster(method, task, n_classes, max_rounds=60 if smoke else 1000, seed=seed)
    if method in ("ridge", "logreg"):
        return _Linear(method, task, n_classes, seed)
    raise UserError(f"The 'method' parameter must be one of {list(META_METHODS)}. Got {method!r} instead.")


def _feature_kind(method: str) -> str:
    return "logit" if method == "logreg" else "proba"


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
    """Train `method` with the level-1 folds: fold f's model never sees fold f's rows."""
    kind = _feature_kind(method)
    X, X_test = stack_features(oof, task, kind, entropy), stack_features(test, task, kind, entropy)
    n_classes = y_true.shape[1]
    fold_values = np.unique(folds)
    if len(fold_values) < 3:
        raise UserError(f"{method} needs at least 3 folds (one held out, one inner fold for early stopping or "
                        f"tuning); folds.csv has "
                        f"{len(fold_values)}.")
    result = MetaFit(method, np.zeros_like(y_true), np.zeros((len(X_test), n_classes)), np.zeros_like(y_true))
    with threadpool_limits(1):  # small problems: threads cost more than they give (LightGBM/XGBoost use 1 too)
        for i, f in enumerate(fold_values):
            _fit_fold(result, method, i, fold_values, X, X_test, y_true, folds, task, smoke, seed)
    result.spec = {"method": method, "task": task, "features": {"kind": kind, "entropy": entropy},
                   "folds": [f.item() for f in fold_values],
                   "boosters_per_fold": (1 if task == "multiclass" else n_classes) if method in ("lgbm", "xgb") else 0,
                   "constant_labels": {str(f): c for f, c in result.constant.items()}}
    return result


def _fit_fold(result: MetaFit, method, i, fold_values, X, X_test, y_true, folds, task, smoke, seed) -> None:
    """Fit fold `fold_values[i]`'s model on the other folds and add its predictions to `result`."""
    f = fold_values[i]
    inner = fold_values[(i + 1) % len(fold_values)]  # early-stopping / tuning rows: another training fold
    train, valid, held = (folds != f) & (folds != inner), folds == inner, folds == f
    constant = {}
    if task == "multilabel":  # a label that never (or always) occurs in the training rows gets its smoothed rate
        seen = y_true[~held]
        rate = (seen.sum(axis=0) + 0.5) / (len(seen) + 1)
        constant = {int(j): float(rate[j]) for j in np.flatnonzero(seen.min(axis=0) == seen.max(axis=0))}
    model = create_meta_model(method, task, y_true.shape[1], smoke, seed).fit(X[train], y_true[train], X[valid], y_true[valid])
    result.fold_models[f.item()] = model
    result.constant[f.item()] = constant
    result.oof[held] = _predict_fold(model, constant, X[held])
    result.test += _predict_fold(model, constant, X_test) / len(fold_values)
    result.in_sample += _predict_fold(model, constant, X) / len(fold_values)


def _predict_fold(model, constant: dict, X: np.ndarray) -> np.ndarray:
    pred = model.predict(X)
    for j, p in constant.items():
        pred[:, j] = p
    return pred


def load_meta(folder) -> "LoadedMeta":
    """Read meta/<method>/ back (native files only) into something that predicts."""
    folder = Path(folder)
    spec = json.loads((folder / "meta.json").read_text())
    models = {}
    for f in spec["folds"]:
        model = create_meta_model(spec["method"], spec["task"], len(spec["classes"]))
        models[f] = model.load(folder / f"fold{f}", spec["boosters_per_fold"])
    return LoadedMeta(spec, models)


@dataclass
class LoadedMeta:
    spec: dict
    fold_models: dict

    def predict(self, proba: np.ndarray) -> np.ndarray:
        """Mean of the fold models' predictions for models x rows x classes level-1 probabilities."""
        feats = self.spec["features"]
        X = stack_features(proba, self.spec["task"], feats["kind"], feats["entropy"])
        constant = self.spec["constant_labels"]
        preds = [_predict_fold(m, {int(j): p for j, p in constant[str(f)].items()}, X) for f, m in self.fold_models.items()]
        return np.mean(preds, axis=0)


def meta_files(fit: MetaFit, classes: list[str], model_ids: list[str]) -> dict[str, bytes]:
    """meta/<method>/ as {relative path: bytes}: meta.json plus each fold's native model files."""
    spec = {**fit.spec, "classes": classes, "model_ids": model_ids}
    files = {"meta.json": (json.dumps(spec, indent=2) + "\n").encode()}
    for f, model in fit.fold_models.items():
        files.update({f"fold{f}/{name}": data for name, data in model.files().items()})
    return files


# ------------------------------------------------------------------ the run-level pipeline


@dataclass
class MethodResult:
    """One row of scores.csv and what produced it."""

    method: str
    metric: str
    cv_score: float
    in_sample_score: float
    oof: np.ndarray | None = None  # honest (cross-validated) OOF probabilities
    test: np.ndarray | None = None
    seconds: float = 0.0


def _best_single(data, metric: Metric) -> MethodResult:
    """The best model in-sample; its CV score picks the best model on folds != f for each fold f."""
    def best(rows):
        scores = [metric.sign() * metric(data.y_true[rows], p[rows], data.task) for p in data.oof]
        return int(np.argmin(scores))  # first best: lowest index on ties

    cv = np.zeros_like(data.y_true)
    for f in np.unique(data.folds):
        cv[data.folds == f] = data.oof[best(data.folds != f)][data.folds == f]
    i = best(slice(None))
    return MethodResult(f"best_single:{data.model_ids[i]}", metric.name, metric(data.y_true, cv, data.task),
                        metric(data.y_true, data.oof[i], data.task), cv, data.test[i])


def run_methods(data, methods, metric: Metric, args) -> tuple[list[MethodResult], dict]:
    """Score every method; returns the rows and the files to write under ensemble/ (path -> bytes)."""
    from ensemble.select import GreedySelection, cross_val_predict

    rows, files = [_best_single(data, metric)], {}
    y, task = data.y_true, data.task
    mean_oof = data.oof.mean(axis=0)
    score = metric(y, mean_oof, task)
    rows.append(MethodResult("mean", metric.name, score, score, mean_oof, data.test.mean(axis=0)))
    for method in methods:
        if method == "mean":
            continue
        start = time.perf_counter()
        if method == "greedy":
            selector = GreedySelection(metric, task, iterations=10 if args.smoke else args.iterations,
                                       init_size=min(args.init_size, len(data.model_ids)), bagging=args.bagging,
                                       random_state=args.seed).fit(data.oof, y)
            cv_oof, fold_weights = cross_val_predict(selector, data.oof, y, data.folds)
            row = MethodResult("greedy", metric.name, metric(y, cv_oof, task), selector.score_, cv_oof,
                               selector.predict(data.test))
            files["selection.json"] = _json({
                "metric": metric.name, "iterations": selector.iterations, "init_size": selector.init_size,
                "bagging": selector.bagging, "weights": dict(zip(data.model_ids, selector.weights_.tolist())),
                "counts": dict(zip(data.model_ids, selector.counts_.tolist())),
                "trajectory": selector.trajectory_, "picks": [data.model_ids[i] for i in selector.indices_[0]],
                "best_step": selector.best_step_, "cv_score": row.cv_score,
                "in_sample_score": row.in_sample_score,
                "cv_weights": {str(f): dict(zip(data.model_ids, w.tolist())) for f, w in fold_weights.items()}})
        else:
            fit = fit_meta(method, data.oof, y, data.folds, data.test, task, args.extra_features, args.smoke, args.seed)
            row = MethodResult(method, metric.name, metric(y, fit.oof, task), metric(y, fit.in_sample, task),
                               fit.oof, fit.test)
            files.update({f"meta/{method}/{k}": v for k, v in meta_files(fit, data.classes, data.model_ids).items()})
        row.seconds = time.perf_counter() - start
        rows.append(row)
    return rows, files


def _threshold_rows(data, winner: MethodResult, args) -> tuple[list[MethodResult], dict, np.ndarray]:
    """Per-label and global thresholds on the winner's honest OOF; returns rows, thresholds.json, test 0/1."""
    from ensemble.metrics import fbeta
    from ensemble.thresholds import LabelThresholds, cross_val_thresholds

    start = time.perf_counter()
    name = fbeta_name(args.beta, args.average)
    cv = cross_val_thresholds(data.y_true, winner.oof, data.folds, args.beta, args.average)
    est = LabelThresholds(args.beta, args.average).fit(data.y_true, winner.oof)
    rows = [MethodResult("thresholds", name, cv["score"], est.score_),
            MethodResult("global_threshold", name, cv["global_score"], est.global_score_)]
    rows[0].seconds = time.perf_counter() - start
    doc = {"fitted_on": winner.method, "beta": args.beta, "average": args.average,
           "thresholds": dict(zip(data.classes, est.thresholds_.tolist())),
           "global_threshold": est.global_threshold_, "cv_score": cv["score"], "in_sample_score": est.score_,
           "global_cv_score": cv["global_score"], "global_in_sample_score": est.global_score_,
           "at_0.5": fbeta(data.y_true, winner.oof, "multilabel", args.beta, args.average), "passes": est.n_passes_,
           "cv_thresholds": {str(f): dict(zip(data.classes, t)) for f, t in cv["thresholds"].items()}}
    return rows, {"thresholds.json": _json(doc)}, est.predict(winner.test)


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _submission(data, winner: MethodResult, test_pred: np.ndarray | None) -> bytes:
    import pandas as pd

    if data.task == "multiclass":
        frame = pd.DataFrame(winner.test, columns=data.classes)
        frame.insert(0, "id", data.test_ids)
    else:  # the manifest's own form: space-separated tags
        classes = np.array(data.classes)
        tags = [" ".join(classes[row]) for row in test_pred]
        frame = pd.DataFrame({"id": data.test_ids, data.target["column"]: tags})
    return frame.to_csv(index=False).encode()


def _write(out: Path, files: dict[str, bytes]) -> None:
    from ensemble.io import atomic_path

    for rel, payload in files.items():
        with atomic_path(out / rel) as tmp:
            tmp.write_bytes(payload)


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/)")
    p.add_argument("--method", default="all", choices=METHODS + ("all",), help="what to fit besides the baselines")
    p.add_argument("--metric", default="log_loss", help="log_loss | accuracy | f2 | fbeta | map")
    p.add_argument("--beta", type=float, default=2.0, help="F-beta's beta for thresholds (and --metric fbeta)")
    p.add_argument("--average", default="samples", help="F-beta averaging: samples | micro | macro")
    p.add_argument("--iterations", type=int, default=50, help="greedy forward steps")
    p.add_argument("--init-size", type=int, default=1, help="greedy: start from the best N models")
    p.add_argument("--bagging", type=int, default=0, help="greedy: number of random model subsets (0 = off)")
    p.add_argument("--extra-features", action="store_true", help="meta-models also see each model's entropy")
    p.add_argument("--no-tta", action="store_true", help="use oof.parquet even where oof_tta.parquet exists")
    p.add_argument("--skip-incomplete", action="store_true", help="leave out models with missing outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="quick: 10 greedy steps, at most 60 boosting rounds")
    return p.parse_args(argv)


def stack(args: argparse.Namespace) -> list[MethodResult]:
    from ensemble.oof import load_run

    metric = get_metric(args.metric, beta=args.beta, average=args.average)
    data = load_run(args.run, tta=not args.no_tta, skip_incomplete=args.skip_incomplete)
    for model_id, why in data.skipped.items():
        print(f"skipped {model_id}: {why}")
    methods = list(METHODS) if args.method == "all" else [args.method]
    rows, files = run_methods(data, methods, metric, args)
    winner = min(rows, key=lambda r: metric.sign() * r.cv_score)
    test_pred = None
    if data.task == "multilabel":
        extra, more, test_pred = _threshold_rows(data, winner, args)
        rows += extra
        files.update(more)
    import pandas as pd

    table = pd.DataFrame([(r.method, r.metric, r.cv_score, r.in_sample_score) for r in rows],
                         columns=["method", "metric", "cv_score", "in_sample_score"])
    files["scores.csv"] = table.to_csv(index=False).encode()
    files["submission.csv"] = _submission(data, winner, test_pred)
    _write(Path(args.run) / "ensemble", files)  # everything was built in memory first
    _print_summary(rows, winner, metric, data, Path(args.run) / "ensemble")
    return rows


def _print_summary(rows, winner, metric, data, out: Path) -> None:
    print(f"{len(data.model_ids)} models, {len(data.ids)} OOF rows, {len(data.test_ids)} test rows, task {data.task}")
    print(f"{'method':<32} {'metric':<10} {'cv_score':>10} {'in_sample':>10} {'seconds':>8}")
    for r in rows:
        print(f"{r.method:<32} {r.metric:<10} {r.cv_score:>10.5f} {r.in_sample_score:>10.5f} {r.seconds:>8.1f}")
    single = rows[0]
    gain = metric.sign() * (single.cv_score - winner.cv_score)
    print(f"winner: {winner.method} with cv {metric.name} {winner.cv_score:.5f}, {gain:+.5f} better than "
          f"{single.method} ({single.cv_score:.5f}) and {metric.sign() * (rows[1].cv_score - winner.cv_score):+.5f} "
          f"better than the mean ({rows[1].cv_score:.5f})")
    if data.task == "multilabel":
        t, g = rows[-2], rows[-1]
        print(f"thresholds on {winner.method}: cv {t.metric} {t.cv_score:.5f} per label vs {g.cv_score:.5f} "
              f"with one global threshold ({t.cv_score - g.cv_score:+.5f})")
    print(f"wrote {out}/ (scores.csv, submission.csv, ...)")


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        stack(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":
    main()
