"""Everything the report shows, read from a run's files into plain dataclasses (no plotting, no HTML).

`collect(run)` reads folds.csv, space.yaml, every model's config.json, fold
metrics.json, predict.json, OOF parquets, the stack's ensemble/ and the retrieve
stage's retrieval/. Every input is optional: what is missing stays None (or
empty), and the page leaves out the sections that need it. A file that exists
but cannot be read is a UserError naming it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.errors import UserError
from ensemble.metrics import METRICS
from ensemble.run import Run
from ensemble.status import model_state, tune_errors
from ensemble.tune.progress import model_label

RECALL_KS = tuple(range(1, 11))  # the recall@k curve of a retrieval run
CURVE_MODELS = 12  # learning curves and retrieval curves: the best N models, or the page would be unreadable
DIVERSITY_ROWS = 20_000  # rows correlated per model: plenty for a correlation, and 200 models of Planet fit in memory


@dataclass
class RunInfo:
    """The run section: what was searched, on which data, with what resources and how long."""

    name: str
    rows: int
    space: str | None = None
    description: str | None = None
    task: str | None = None
    classes: list[str] = field(default_factory=list)
    k: int | None = None
    strategy: str | None = None
    groups: int | None = None  # distinct values of folds.csv's 'group' column
    resources: dict | None = None
    wall_seconds: float | None = None  # first epoch started .. last epoch ended, over every fold


@dataclass
class ModelRow:
    """One model of the leaderboard: fold scores, TTA, timings, and its per-fold histories."""

    model_id: str
    label: str
    state: str  # complete | pruned | failed | interrupted | todo (ensemble.status.model_state)
    fold_scores: list[float | None]
    best_epochs: list[int | None]
    histories: list[list[dict]]  # per fold: metrics.json "history" rows
    mean: float | None = None
    std: float | None = None
    oof_score: float | None = None  # predict.json: training-time OOF ...
    tta_score: float | None = None  # ... and with test-time augmentation
    tta_gain: float | None = None  # positive: TTA is better, whatever the metric's direction
    train_seconds: float | None = None
    predict_seconds: float | None = None
    view_scores: dict[str, float] = field(default_factory=dict)  # oof_views.parquet: score of each TTA view
    start: str | None = None  # a later round's model: the model it started from (or took pseudo-labels from)


@dataclass
class Stacking:
    """ensemble/scores.csv and selection.json, with the winner named as the stack chose it."""

    scores: pd.DataFrame
    metric: str
    mode: str
    key: str  # the column the winner was chosen by: cv_score, or cv_score_thresholded (F-beta multilabel)
    winner: str
    winner_score: float
    best_single: tuple[str, float] | None  # (method, score)
    mean_score: float | None
    selection: dict | None = None


@dataclass
class Outcome:
    """The OOF probabilities the task figures are drawn from, and where they came from."""

    source: str  # where the probabilities come from, as the page says it (a file relative to the run, or a blend)
    y_true: np.ndarray  # rows x classes
    proba: np.ndarray
    thresholds: np.ndarray | None = None  # multilabel: per label
    threshold_source: str | None = None
    beta: float = 2.0


@dataclass
class Retrieval:
    """Recall@k curves: per model from its held-out embeddings, per method from retrieval/scores.csv."""

    curves: dict[str, list[float]]  # model label -> recall@1..10 (leave-one-out within each fold)
    methods: pd.DataFrame | None = None


@dataclass
class Report:
    """What the page shows; the models are in leaderboard order (best first)."""

    run: RunInfo
    metric: str | None = None
    mode: str = "min"
    models: list[ModelRow] = field(default_factory=list)
    y_true: np.ndarray | None = None  # classification: rows x classes in folds.csv order
    # Complete models' OOF as the diversity section correlates it: multiclass, the probability of each row's
    # true class (where models disagree on hard images); multilabel, every cell. At most DIVERSITY_ROWS rows.
    oof_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    stacking: Stacking | None = None
    outcome: Outcome | None = None
    retrieval: Retrieval | None = None


# ------------------------------------------------------------------ reading files


@contextlib.contextmanager
def _reading(run: Run, path: Path):
    """A JSON file read here or through a `Run` helper that cannot be parsed: one message naming it."""
    try:
        yield
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{run.show(path)}: cannot be read as JSON ({exc}); rerun the stage that writes it, or "
                        "delete the file, then run the report again.") from None


def _json(run: Run, path: Path) -> dict | None:
    if not path.exists():
        return None
    with _reading(run, path):
        return json.loads(path.read_text())


def _table(run: Run, path: Path, **kw) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, **kw)
    except (OSError, ValueError) as exc:
        raise UserError(f"{run.show(path)}: cannot be read ({exc}); rerun the stage that writes it, or delete "
                        "the file, then run the report again.") from None


def _aligned(run: Run, path: Path, ids: pd.Index, classes: list[str]) -> np.ndarray | None:
    """A parquet's class columns as rows x classes in folds.csv order (None if the file is absent)."""
    frame = _table(run, path)
    if frame is None:
        return None
    missing = [c for c in ["id", *classes] if c not in frame.columns]
    if missing:
        raise UserError(f"{run.show(path)}: missing column(s) {missing[:5]}; it needs id and one column per class "
                        "as config.json lists them. Rerun the stage that writes it.")
    if frame["id"].duplicated().any():
        raise UserError(f"{run.show(path)}: duplicate ids; every training id needs exactly one row. Rerun the stage "
                        "that writes it.")
    values = frame.set_index(frame["id"].astype(str))[classes].reindex(ids).to_numpy(np.float64)
    if np.isnan(values).any():
        raise UserError(f"{run.show(path)}: its ids do not cover folds.csv ({int(np.isnan(values).any(1).sum())} "
                        "rows missing); every training id needs one row. Rerun the stage that writes it.")
    return values


def _mode(metric: str) -> str:
    return METRICS[metric].mode if metric in METRICS else "max"  # F-beta variants (f1_macro, ...) are gains


# ------------------------------------------------------------------ the run and its models


def _state(run: Run, config: dict, errors: dict[str, str]) -> str:
    """The status command's rule (ensemble.status.model_state); no sweep runs while the report holds the lock."""
    with _reading(run, run.model_dir(config["model_id"]) / "status.json"):
        return model_state(run, config, live=False, errors=errors)


def _model_row(run: Run, config: dict, errors: dict[str, str]) -> ModelRow:
    model_id, k, metric = config["model_id"], int(config["k"]), config.get("metric")
    folds = []
    for f in range(k):
        with _reading(run, run.fold_dir(model_id, f) / "metrics.json"):
            folds.append(run.read_metrics(model_id, f) or {})
    scores = [m.get("best_score") for m in folds]
    known = [s for s in scores if s is not None]
    histories = [m.get("history") or [] for m in folds]
    seconds = [row.get("seconds") or 0.0 for h in histories for row in h]
    row = ModelRow(model_id, model_label(config.get("backbone", model_id), config.get("searched") or {}, config.get("round", 1)),
                   _state(run, config, errors), scores, [m.get("best_epoch") for m in folds], histories,
                   mean=float(np.mean(known)) if known else None,
                   std=float(np.std(known)) if len(known) > 1 else None,  # as the sweep's leaderboard.csv
                   train_seconds=float(sum(seconds)) if seconds else None,
                   start=config.get("init_from") or (config.get("pseudo") or {}).get("model"))
    predict = _json(run, run.model_dir(model_id) / "predict.json") or {}
    found = predict.get("scores") or {}
    row.oof_score, row.tta_score = found.get(f"oof {metric}"), found.get(f"oof_tta {metric}")
    if row.oof_score is not None and row.tta_score is not None:
        sign = 1.0 if _mode(metric) == "min" else -1.0
        row.tta_gain = sign * (row.oof_score - row.tta_score)
    row.predict_seconds = predict.get("seconds")
    return row


def _run_info(run: Run, folds: pd.DataFrame, configs: dict[str, dict], models: list[ModelRow]) -> RunInfo:
    info = RunInfo(name=Path(run.location).name or run.location, rows=len(folds))
    if run.space_file.exists():
        import yaml

        try:
            space = yaml.safe_load(run.space_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"{run.show(run.space_file)}: cannot be read as YAML ({exc}); the sweep writes it at "
                            "its first launch: restore it, or delete it to leave the space out of the report.") from None
        info.description = space.get("description") if isinstance(space, dict) else None
    if configs:
        config = next(iter(configs.values()))
        info.space, info.task, info.classes = config.get("space"), config["task"], list(config["classes"])
        info.k, info.resources = int(config["k"]), config.get("resources")
        info.strategy = (config.get("folds") or {}).get("strategy")
    if "group" in folds.columns:
        info.groups = int(folds["group"].nunique())
    spans = [(r["started"], r["started"] + (r.get("seconds") or 0.0))
             for m in models for h in m.histories for r in h if r.get("started") is not None]
    if spans:
        info.wall_seconds = max(end for _, end in spans) - min(start for start, _ in spans)
    return info


def _ranked(models: list[ModelRow], mode: str) -> list[ModelRow]:
    """Best mean first; models without a score last, in id order."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(models, key=lambda m: (m.mean is None, sign * (m.mean or 0.0), m.model_id))


# ------------------------------------------------------------------ per-section inputs


def _view_scores(run: Run, model: ModelRow, config: dict, folds: pd.DataFrame, y_true: np.ndarray) -> None:
    """Score each TTA view of oof_views.parquet (long: id, fold, view, classes) with the run's metric."""
    path = run.model_dir(model.model_id) / "oof_views.parquet"
    frame = _table(run, path)
    if frame is None or config["metric"] not in METRICS:
        return
    classes, ids = config["classes"], pd.Index(folds["id"])
    if "view" not in frame.columns:
        raise UserError(f"{run.show(path)}: no 'view' column; rerun python -m ensemble.predict --per-view.")
    metric = METRICS[config["metric"]]
    for view, part in frame.groupby("view", sort=False):
        proba = part.set_index(part["id"].astype(str))[classes].reindex(ids).to_numpy(np.float64)
        if np.isnan(proba).any():
            raise UserError(f"{run.show(path)}: view {view!r} does not cover folds.csv; rerun python -m "
                            "ensemble.predict --per-view for this model.")
        model.view_scores[str(view)] = float(metric(y_true, proba, config["task"]))


def _stacking(run: Run) -> Stacking | None:
    path = run.ensemble_dir / "scores.csv"
    scores = _table(run, path)
    if scores is None or scores.empty:
        return None
    missing = [c for c in ("method", "metric", "cv_score", "in_sample_score") if c not in scores.columns]
    if missing:
        raise UserError(f"{run.show(path)}: missing column(s) {missing}; it was not written by this version's "
                        "stack: rerun python -m ensemble.stack.")
    selection = _json(run, run.ensemble_dir / "selection.json")
    methods = scores[~scores["method"].isin(["thresholds", "global_threshold"])]  # not combiners: the winner's cut
    metric = str(methods["metric"].iloc[0])
    thresholded = "cv_score_thresholded" in methods and methods["cv_score_thresholded"].notna().all()
    key, mode = ("cv_score_thresholded", "max") if thresholded else ("cv_score", _mode(metric))
    sign = 1.0 if mode == "min" else -1.0
    best = methods.iloc[int(np.argmin(sign * methods[key].to_numpy()))]  # first on ties, as the stack chose
    single = methods[methods["method"].str.startswith("best_single:")]
    mean = methods[methods["method"] == "mean"]
    return Stacking(scores, metric, mode, key, str(best["method"]), float(best[key]),
                    (str(single["method"].iloc[0]), float(single[key].iloc[0])) if len(single) else None,
                    float(mean[key].iloc[0]) if len(mean) else None, selection)


def _stack_input(run: Run, model_id: str) -> Path:
    """The OOF file the stack reads for a model: with TTA where predict wrote one."""
    tta = run.model_dir(model_id) / "oof_tta.parquet"
    return tta if tta.exists() else run.model_dir(model_id) / "oof.parquet"


def _winner_oof(run: Run, report: Report, ids: pd.Index) -> tuple[str, np.ndarray] | None:
    """The stack winner's OOF rebuilt from the models' files, for best_single, mean and greedy (its in-sample
    weights); None for a meta-model, whose predictions the stack does not keep."""
    s = report.stacking
    if s is None:
        return None
    weights = (s.selection or {}).get("weights") or {}
    if s.winner.startswith("best_single:"):
        weights = {s.winner.split(":", 1)[1]: 1.0}
    elif s.winner == "mean":  # the stack's models: selection.json's, else every predicted model
        predicted = [m.model_id for m in report.models if (run.model_dir(m.model_id) / "predict.json").exists()]
        weights = dict.fromkeys(weights or predicted, 1.0)
    elif s.winner != "greedy":
        return None
    used = {m: w for m, w in weights.items() if w > 0}
    if not used or not all(_stack_input(run, m).exists() for m in used):
        return None
    total = sum(used.values())
    proba = sum(w / total * _aligned(run, _stack_input(run, m), ids, report.run.classes) for m, w in used.items())
    if len(used) == 1:
        return f"{run.rel(_stack_input(run, next(iter(used))))} (the stack's winner, {s.winner})", proba
    how = "the mean" if s.winner == "mean" else "a blend with selection.json's in-sample weights"
    return f"the stack's winner, {s.winner}: {how} of {len(used)} models' OOF", proba


def _outcome(run: Run, report: Report, ids: pd.Index) -> Outcome | None:
    """The OOF the task figures show: the ensemble's (ensemble/oof.parquet, or the stack winner rebuilt), else the
    best complete model's (TTA if predicted)."""
    classes = report.run.classes
    found = None
    if (run.ensemble_dir / "oof.parquet").exists():
        found = "ensemble/oof.parquet", _aligned(run, run.ensemble_dir / "oof.parquet", ids, classes)
    found = found or _winner_oof(run, report, ids)
    best = next((m for m in report.models if m.state == "complete"), None)
    if found is None and best is not None:
        path = _stack_input(run, best.model_id)
        why = f"; the stack's winner, {report.stacking.winner}, keeps no OOF predictions" if report.stacking else ""
        found = f"{run.rel(path)} (the best single model{why})", _aligned(run, path, ids, classes)
    if found is None:
        return None
    outcome = Outcome(found[0], report.y_true, found[1])
    if report.run.task == "multilabel":
        doc = _json(run, run.ensemble_dir / "thresholds.json")
        if doc and "thresholds" in doc:
            outcome.thresholds = np.array([doc["thresholds"].get(c, 0.5) for c in classes], dtype=float)
            outcome.threshold_source = f"ensemble/thresholds.json (fitted on {doc.get('fitted_on', '?')}'s OOF)"
            outcome.beta = float(doc.get("beta", 2.0))
        else:
            outcome.thresholds, outcome.threshold_source = np.full(len(classes), 0.5), "0.5 (no ensemble/thresholds.json)"
    return outcome


def _retrieval(run: Run, report: Report, folds: pd.DataFrame, column: str) -> Retrieval | None:
    """Recall@1..10 of each of the best models' held-out embeddings: each row queries its own fold's rows."""
    from ensemble.retrieve.metrics import count_relevant, ranked_hits, retrieval_scores
    from ensemble.retrieve.search import search

    labels = folds.set_index("id")[column]
    curves = {}
    for model in report.models:
        if len(curves) == CURVE_MODELS:
            break
        emb_dir = run.model_dir(model.model_id) / "emb"
        for name in ("oof.npy", "oof.ids.parquet"):  # a URI run: only these, not the query and gallery sets
            run.pull(emb_dir / name)
        ids = _table(run, emb_dir / "oof.ids.parquet")
        if ids is None or not (emb_dir / "oof.npy").exists():
            continue
        try:
            emb = np.load(emb_dir / "oof.npy")
        except (OSError, ValueError) as exc:
            raise UserError(f"{run.show(emb_dir / 'oof.npy')}: cannot be read ({exc}); rerun python -m "
                            "ensemble.predict for this model.") from None
        y = labels.reindex(ids["id"].astype(str)).to_numpy()
        hits, relevant = [], []
        for f in np.unique(ids["fold"]):
            rows = np.flatnonzero(ids["fold"].to_numpy() == f)
            _, index = search(emb[rows], emb[rows], max(RECALL_KS), exclude=np.arange(len(rows)))
            part = ranked_hits(y[rows], y[rows], index)
            hits.append(np.pad(part, ((0, 0), (0, max(RECALL_KS) - part.shape[1]))))  # a fold smaller than 11
            relevant.append(count_relevant(y[rows], y[rows], exclude_self=True))
        scores = retrieval_scores(np.concatenate(hits), np.concatenate(relevant), recall_ks=RECALL_KS)
        curves[model.label] = [scores[f"recall@{k}"] for k in RECALL_KS]
    methods = _table(run, run.retrieval_dir / "scores.csv")
    return Retrieval(curves, methods) if curves or methods is not None else None


# ------------------------------------------------------------------ the whole report


def collect(run: Run) -> Report:
    """Read everything the page needs from `run` (already checked to be a run directory)."""
    folds = _table(run, run.folds_file, dtype=str, keep_default_na=False)
    if "id" not in folds.columns:
        raise UserError(f"{run.show(run.folds_file)}: no 'id' column; use the folds.csv the sweep wrote.")
    configs = run.configs()
    shared = run.shared_ids(configs.values())
    if shared is not None:  # rounds on other manifests: the rows every model predicts, as the stack uses
        folds = folds[folds["id"].isin(shared)].reset_index(drop=True)
    errors = tune_errors(run)
    models = [_model_row(run, config, errors) for config in configs.values()]
    first = next(iter(configs.values()), {})
    metric = first.get("metric")
    mode = first.get("mode") or (_mode(metric) if metric else "min")
    report = Report(_run_info(run, folds, configs, models), metric, mode, _ranked(models, mode))
    report.stacking = _stacking(run)
    if report.run.task in ("multiclass", "multilabel"):
        _classification(run, report, folds, configs)
    elif report.run.task == "retrieval":
        report.retrieval = _retrieval(run, report, folds, first["target"]["column"])
    return report


def _classification(run: Run, report: Report, folds: pd.DataFrame, configs: dict[str, dict]) -> None:
    """The truth, each model's OOF and per-view scores, and the OOF the task figures show."""
    from ensemble.data.manifest import encode_targets

    first, ids = next(iter(configs.values())), pd.Index(folds["id"])
    target = {key: first["target"][key] for key in ("form", "column", "maybe_weight") if key in first["target"]}
    report.y_true = np.asarray(encode_targets(folds, target, first["classes"]), dtype=np.float64)
    rows = np.unique(np.linspace(0, len(ids) - 1, min(len(ids), DIVERSITY_ROWS)).astype(int))  # evenly spread
    for model in report.models:
        _view_scores(run, model, configs[model.model_id], folds, report.y_true)
        oof = _aligned(run, run.model_dir(model.model_id) / "oof.parquet", ids, report.run.classes)
        if oof is not None:
            p_true = (oof[rows] * report.y_true[rows]).sum(1) if report.run.task == "multiclass" else oof[rows].ravel()
            report.oof_vectors[model.model_id] = p_true.astype(np.float32)
    report.outcome = _outcome(run, report, ids)
