"""One fold's meta-model (level 2) and its features: LightGBM, XGBoost, ridge, logistic.

`create_meta_model(method, ...)` returns an unfitted model for one fold;
`ensemble.stack.meta.fit_meta` trains one per fold and pools their predictions.

- lgbm / xgb: trees on one feature per (model, class) probability (+ each
  model's entropy with `--extra-features`), boosting from the models' mean
  rescaled on the training rows (a temperature, or Platt per label), so they
  learn corrections to a calibrated blend. Multiclass is native (softmax);
  multilabel fits one booster per label.
- ridge / logreg: a calibrated weighted blend. Multiclass: one weight per
  model shared by the classes (each (row, class) pair is a sample: every
  model's probability or logit for that class, plus a per-class bias);
  multilabel: per label, one weight per model on that label's column. With a
  few thousand rows a full (models x classes) x classes matrix overfits.

Soft targets become weighted copies of a row (exact cross-entropy). Each model
saves itself natively (`files()`: LightGBM text, XGBoost JSON, coefficients as
npz) and reads those files back (`load(folder)`). No pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ensemble.errors import UserError

META_METHODS = ("lgbm", "xgb", "ridge", "logreg")
# The boosters' threads: every CPU this process may use (8,000 rows x 6 models x 10 classes, 2 CPUs: 1.7x
# faster than one thread, the same predictions; docs/benchmarks.md).
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_P_CLIP = 1e-7  # probabilities are clipped here before logs and logits


# ------------------------------------------------------------------ features


def stack_features(proba: np.ndarray, task: str, entropy: bool = False) -> np.ndarray:
    """Rows x (models * classes) probabilities, plus each model's entropy with `entropy` (trees' input)."""
    n_models, n, n_classes = proba.shape
    blocks = [np.asarray(proba, dtype=np.float64).transpose(1, 0, 2).reshape(n, n_models * n_classes)]
    if entropy:
        blocks.append(_entropy(proba, task).T)
    return np.hstack(blocks)


def per_class_features(proba: np.ndarray, task: str, values: str, entropy: bool = False) -> np.ndarray:
    """Rows x classes x models: each model's probability ("proba") or logit ("logit") for that class.

    With `entropy`, each model's prediction entropy follows (the same for every class).
    The linear meta-models fit one weight per model, shared by the classes.
    """
    p = np.clip(proba, _P_CLIP, 1 - _P_CLIP)
    feats = np.log(p) - np.log1p(-p) if values == "logit" else np.asarray(proba, dtype=np.float64)
    feats = feats.transpose(1, 2, 0)
    if entropy:
        ent = np.broadcast_to(_entropy(proba, task).T[:, None, :], feats.shape)
        feats = np.concatenate([feats, ent], axis=2)
    return feats


def base_margin(proba: np.ndarray, task: str) -> np.ndarray:
    """The plain mean of the models as a raw score: log-probabilities (multiclass) or logits (multilabel).

    Boosters start from it (LightGBM init_score, XGBoost base_margin), so their
    trees learn corrections to the blend, and early stopping at 0 rounds is the blend.
    """
    mean = np.clip(np.asarray(proba, dtype=np.float64).mean(axis=0), _P_CLIP, 1 - _P_CLIP)
    return np.log(mean) if task == "multiclass" else np.log(mean) - np.log1p(-mean)


def _entropy(proba: np.ndarray, task: str) -> np.ndarray:
    """models x rows: prediction entropy (mean binary entropy per label for multilabel)."""
    p = np.clip(proba, _P_CLIP, 1 - _P_CLIP)
    if task == "multiclass":
        return -(p * np.log(p)).sum(axis=2)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p)).mean(axis=2)


def _soft_rows(y: np.ndarray, binary: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, weights): a row once per class with y > 0, weighted by y (exact soft cross-entropy).

    Multiclass (y: rows x classes): labels are class indices. Binary (y: rows): labels 0/1,
    a fractional y giving a positive and a negative copy. Hard labels keep each row once.
    """
    if not binary:
        rows, cols = np.nonzero(y > 0)
        return rows, cols, y[rows, cols]
    pos, neg = np.flatnonzero(y > 0), np.flatnonzero(y < 1)
    return np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[y[pos], 1 - y[neg]]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


# ------------------------------------------------------------------ one fold's meta-model
# One instance is one fold's model. It takes level-1 probabilities (models x rows x classes):
# fit(train, y, inner fold, y) -> self, predict(proba), files() (native files as bytes),
# load(folder) (the same files read back).


class _Booster:
    """LightGBM or XGBoost on the stacked probabilities, boosting from the models' mean.

    Native multiclass (softmax), or one binary booster per label. Early stopping
    on the inner fold picks the number of rounds; the model is then refit on
    all training rows (training + inner fold) for that many rounds.
    """

    def __init__(self, method: str, task: str, n_classes: int, max_rounds: int, seed: int, entropy: bool):
        self.method, self.task, self.n_classes = method, task, n_classes
        self.max_rounds, self.seed, self.entropy = max_rounds, seed, entropy
        self.boosters: list = []

    def _params(self) -> dict:
        multi = self.task == "multiclass"
        if self.method == "lgbm":
            return {"objective": "multiclass" if multi else "binary", **({"num_class": self.n_classes} if multi else {}),
                    "learning_rate": 0.05, "num_leaves": 7, "min_data_in_leaf": 20, "feature_fraction": 0.8,
                    "lambda_l2": 1.0, "verbose": -1, "seed": self.seed, "deterministic": True, "num_threads": _CPUS}
        return {"objective": "multi:softprob" if multi else "binary:logistic",
                **({"num_class": self.n_classes} if multi else {}), "eta": 0.05, "max_depth": 3,
                "min_child_weight": 1.0, "subsample": 0.8, "colsample_bytree": 0.8, "lambda": 1.0,
                "tree_method": "hist", "nthread": _CPUS, "seed": self.seed}

    def _data(self, X, y, base):
        """The library's dataset for (X, y), soft targets expanded, starting from `base`."""
        import lightgbm as lgb
        import xgboost as xgb

        rows, labels, weight = _soft_rows(y, binary=self.task == "multilabel")
        if self.method == "lgbm":
            return lgb.Dataset(X[rows], labels, weight=weight, init_score=base[rows], free_raw_data=False)
        return xgb.DMatrix(X[rows], labels, weight=weight, base_margin=base[rows])

    def _train_one(self, X, y, base, n_fit: int):
        """Early-stop on rows n_fit: (the inner fold), then refit on all rows for the best round count."""
        import lightgbm as lgb
        import xgboost as xgb

        params, fit, valid, both = self._params(), slice(0, n_fit), slice(n_fit, None), slice(None)
        if self.method == "lgbm":
            train = self._data(X[fit], y[fit], base[fit])
            probe = lgb.train(params, train, self.max_rounds, valid_sets=[self._data(X[valid], y[valid], base[valid])],
                              callbacks=[lgb.early_stopping(20, verbose=False)])
            return lgb.train(params, self._data(X, y, base), max(1, probe.best_iteration))
        probe = xgb.train(params, self._data(X[fit], y[fit], base[fit]), self.max_rounds,
                          evals=[(self._data(X[valid], y[valid], base[valid]), "valid")],
                          early_stopping_rounds=20, verbose_eval=False)
        return xgb.train(params, self._data(X[both], y[both], base[both]), probe.best_iteration + 1)

    def fit(self, proba, y, proba_val, y_val) -> "_Booster":
        both = np.concatenate([proba, proba_val], axis=1)
        X, y = stack_features(both, self.task, self.entropy), np.concatenate([y, y_val])
        self.scale = _fit_base_scale(base_margin(both, self.task), y, self.task)
        base = self._base(both)
        n_fit = proba.shape[1]
        if self.task == "multiclass":
            self.boosters = [self._train_one(X, y, base, n_fit)]
        else:
            self.boosters = [self._train_one(X, y[:, j], base[:, j], n_fit) for j in range(self.n_classes)]
        return self

    def _base(self, proba) -> np.ndarray:
        """The models' mean as a raw score, scaled as fitted: temperature (multiclass) or Platt (per label)."""
        a, b = self.scale
        return base_margin(proba, self.task) * a + b

    def predict(self, proba) -> np.ndarray:
        X, base = stack_features(proba, self.task, self.entropy), self._base(proba)
        if self.task == "multiclass":
            return _softmax(self._raw(self.boosters[0], X, base))
        return _sigmoid(np.column_stack([self._raw(b, X, base[:, j]) for j, b in enumerate(self.boosters)]))

    def _raw(self, booster, X, base) -> np.ndarray:
        if self.method == "lgbm":
            return base + booster.predict(X, raw_score=True)
        import xgboost as xgb

        return booster.predict(xgb.DMatrix(X, base_margin=base), output_margin=True).astype(np.float64)

    def files(self) -> dict[str, bytes]:
        scale = {"base_scale": self.scale[0].tolist(), "base_bias": self.scale[1].tolist()}
        files = {"base.json": (json.dumps(scale) + "\n").encode()}
        if self.method == "lgbm":
            return {**files, **{f"booster{j}.txt": b.model_to_string().encode() for j, b in enumerate(self.boosters)}}
        return {**files, **{f"booster{j}.json": bytes(b.save_raw("json")) for j, b in enumerate(self.boosters)}}

    def load(self, folder: Path) -> "_Booster":
        import lightgbm as lgb
        import xgboost as xgb

        scale = json.loads((folder / "base.json").read_text())
        self.scale = (np.array(scale["base_scale"]), np.array(scale["base_bias"]))
        self.boosters = []
        for j in range(1 if self.task == "multiclass" else self.n_classes):
            if self.method == "lgbm":
                self.boosters.append(lgb.Booster(model_file=str(folder / f"booster{j}.txt")))
            else:
                booster = xgb.Booster()
                booster.load_model(str(folder / f"booster{j}.json"))
                self.boosters.append(booster)
        return self


def _fit_base_scale(raw: np.ndarray, y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) so that raw * a + b is calibrated on these rows: one temperature for multiclass
    (b = 0), a Platt scaling per label for multilabel. When the mean is miscalibrated (or the
    models are noise) the trees then start from a sensible point, not from an overconfident one."""
    if task == "multiclass":
        from scipy.optimize import minimize_scalar

        def loss(t):
            z = raw * t
            z = z - z.max(axis=1, keepdims=True)
            return -(y * (z - np.log(np.exp(z).sum(axis=1, keepdims=True)))).sum(axis=1).mean()

        t = minimize_scalar(loss, bounds=(0.0, 10.0), method="bounded").x
        return np.array([t]), np.zeros(raw.shape[1])
    a, b = np.ones(raw.shape[1]), np.zeros(raw.shape[1])
    from sklearn.linear_model import LogisticRegression

    for j in range(raw.shape[1]):
        rows, labels, weight = _soft_rows(y[:, j], binary=True)
        if len(np.unique(labels)) == 2:
            model = LogisticRegression(C=1e4).fit(raw[rows, j:j + 1], labels, sample_weight=weight)
            a[j], b[j] = model.coef_[0, 0], model.intercept_[0]
    return a, b


class _Linear:
    """Ridge or logistic regression with one weight per model, shared by the classes.

    Each (row, class) pair is a sample whose features are every model's value
    for that class (logits for logistic regression, probabilities for ridge)
    plus, for multiclass, a one-hot of the class (a bias per class); the target
    is y_true for that cell. Multiclass fits one model over all classes and
    renormalises the rows; multilabel fits one model per label. A full
    (models x classes) x classes coefficient matrix overfits the few thousand
    rows a stacker usually has; this is the weighted blend with a calibration.
    Ridge picks its L2 strength by generalised CV (RidgeCV); logistic regression
    picks C on the inner fold, then refits on all training rows.
    """

    C_GRID = (0.01, 0.1, 1.0, 10.0)
    RIDGE_FLOOR = 1e-4  # ridge is a regression: clip its outputs here so every class stays possible

    def __init__(self, method: str, task: str, n_classes: int, seed: int, entropy: bool):
        self.method, self.task, self.n_classes, self.seed, self.entropy = method, task, n_classes, seed, entropy

    def _design(self, proba) -> list[np.ndarray]:
        """One design matrix per fitted model: [all (row, class) pairs] for multiclass, [rows] per label."""
        feats = per_class_features(proba, self.task, "logit" if self.method == "logreg" else "proba", self.entropy)
        n, n_classes, _ = feats.shape
        if self.task == "multilabel":
            return [feats[:, j] for j in range(n_classes)]
        return [np.hstack([feats.reshape(n * n_classes, -1), np.tile(np.eye(n_classes), (n, 1))])]

    def fit(self, proba, y, proba_val, y_val) -> "_Linear":
        from ensemble.metrics import log_loss

        designs = self._design(np.concatenate([proba, proba_val], axis=1))
        y_all = np.concatenate([y, y_val])
        targets = [y_all.reshape(-1)] if self.task == "multiclass" else list(y_all.T)
        self.mean = np.array([d.mean(axis=0) for d in designs])
        self.scale = np.array([d.std(axis=0) for d in designs])
        self.scale[self.scale == 0] = 1.0
        Z = [(d - m) / s for d, m, s in zip(designs, self.mean, self.scale)]
        if self.method == "ridge":
            from sklearn.linear_model import RidgeCV

            models = [RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(z, t) for z, t in zip(Z, targets)]
            self.coef = np.array([m.coef_ for m in models])
            self.intercept = np.array([m.intercept_ for m in models])
            self.C = np.array([m.alpha_ for m in models])
            return self
        n_fit = proba.shape[1] * (self.n_classes if self.task == "multiclass" else 1)  # design rows before the inner fold
        losses = []
        for C in self.C_GRID:
            self._fit_logreg([z[:n_fit] for z in Z], [t[:n_fit] for t in targets], C)
            losses.append(log_loss(y_val, self.predict(proba_val), self.task))
        self.C = np.array([self.C_GRID[int(np.argmin(losses))]])
        self._fit_logreg(Z, targets, float(self.C[0]))
        return self

    def _fit_logreg(self, Z, targets, C) -> None:
        from sklearn.linear_model import LogisticRegression

        coef, intercept = [], []
        for z, t in zip(Z, targets):
            rows, labels, weight = _soft_rows(t, binary=True)
            if len(np.unique(labels)) < 2:  # a label that never (or always) occurs: its smoothed rate
                rate = (t.sum() + 0.5) / (len(t) + 1)
                coef.append(np.zeros(z.shape[1]))
                intercept.append(np.log(rate / (1 - rate)))
                continue
            model = LogisticRegression(C=C, max_iter=1000, random_state=self.seed)
            model.fit(z[rows], labels, sample_weight=weight)
            coef.append(model.coef_[0])
            intercept.append(model.intercept_[0])
        self.coef, self.intercept = np.array(coef), np.array(intercept)

    def predict(self, proba) -> np.ndarray:
        z = np.column_stack([((d - m) / s) @ c + b for d, m, s, c, b in
                             zip(self._design(proba), self.mean, self.scale, self.coef, self.intercept)])
        if self.method == "logreg":
            p = _sigmoid(z)
        else:
            p = np.clip(z, self.RIDGE_FLOOR, 1 - self.RIDGE_FLOOR)
        if self.task == "multilabel":
            return p
        p = p.reshape(proba.shape[1], self.n_classes)
        return p / p.sum(axis=1, keepdims=True)

    def files(self) -> dict[str, bytes]:
        import io

        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept, C=self.C)
        return {"coef.npz": buf.getvalue()}

    def load(self, folder: Path) -> "_Linear":
        with np.load(folder / "coef.npz") as npz:
            self.mean, self.scale, self.coef, self.intercept, self.C = (
                npz[k] for k in ("mean", "scale", "coef", "intercept", "C"))
        return self


def create_meta_model(method: str, task: str, n_classes: int, smoke: bool = False, seed: int = 0,
                      entropy: bool = False):
    """An unfitted one-fold meta-model: 'lgbm', 'xgb', 'ridge' or 'logreg'."""
    if method in ("lgbm", "xgb"):
        return _Booster(method, task, n_classes, 60 if smoke else 1000, seed, entropy)
    if method in ("ridge", "logreg"):
        return _Linear(method, task, n_classes, seed, entropy)
    raise UserError(f"The 'method' parameter must be one of {list(META_METHODS)}. Got {method!r} instead.")


def feature_spec(method: str, entropy: bool) -> dict:
    """What the method's features are, for meta.json (a reader rebuilds them from this)."""
    if method in ("lgbm", "xgb"):
        return {"layout": "stacked", "values": "proba", "entropy": entropy, "base_margin": "mean"}
    return {"layout": "per_class", "values": "logit" if method == "logreg" else "proba", "entropy": entropy}
