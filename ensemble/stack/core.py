"""Every combiner of a run's OOF predictions, scored the same honest way, and ensemble/ written as one set.

`stack_run` reads a run (`ensemble.stack.oof.load_run`), scores the best single
model, the plain mean, greedy selection (`ensemble.stack.select`) and the
meta-models (`ensemble.stack.meta`), fits per-label thresholds for multilabel runs
(`ensemble.stack.thresholds`); the CLI writes `<run>/ensemble/` (`Run.write_set`):
scores.csv, selection.json, thresholds.json, meta/ and submission.csv. Every
method's cv_score comes from predictions made for fold f without fold f's labels.

When models have per-view predictions (`predict --per-view`), each TTA view is
also a member, and greedy and the meta-models run a second time over the merged
and view members together: rows `greedy+views`, `lgbm+views`, ... beside the
rows without them, so view weighting's honest effect is on the table either way.

When a multilabel run is judged by F-beta, every method is also scored after
its own per-label thresholds (fitted on folds != f, applied to fold f), and the
winner is chosen on that: the submission is thresholded, and a calibrated
meta-model read at 0.5 looks far worse than it is once thresholded.
docs/stacking.md is the manual.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ensemble.metrics import Metric, fbeta_name, get_metric
from ensemble.run import Run
from ensemble.stack.meta import META_METHODS, fit_meta, meta_files

METHODS = ("greedy", "mean") + META_METHODS
VIEWS = "+views"  # the suffix of a method fitted over the merged models and their TTA views (issue 11)
SCORE_COLUMNS = ["method", "metric", "cv_score", "in_sample_score", "cv_score_thresholded",
                 "in_sample_score_thresholded"]  # scores.csv; the last two only for F-beta on multilabel


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
    # F-beta runs (multilabel): after the method's own per-label thresholds, fold-wise / fitted on all rows
    cv_score_thresholded: float | None = None
    in_sample_score_thresholded: float | None = None
    fitted_thresholds: tuple | None = field(default=None, repr=False)  # (cross_val_thresholds, LabelThresholds)


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
    """Score every method; returns the rows and the files to write under ensemble/ (path -> bytes).

    With TTA-view members (`data.view_ids`), greedy and each meta-model also run over the merged and
    view members together, as `<method>+views`, right after the row without them."""
    rows, files = [_best_single(data, metric)], {}
    y, task = data.y_true, data.task
    mean_oof = data.oof.mean(axis=0)
    score = metric(y, mean_oof, task)
    rows.append(MethodResult("mean", metric.name, score, score, mean_oof, data.test.mean(axis=0)))
    member_sets, selection = _member_sets(data), {}
    for method in methods:
        if method == "mean":
            continue
        for suffix, members, oof, test in member_sets:
            start = time.perf_counter()
            if method == "greedy":
                row, doc = _greedy(method + suffix, data, members, oof, test, metric, args)
                # selection.json keeps its keys for the merged members; view weighting goes under "views"
                selection.update({"views": doc} if suffix else doc)
                files["selection.json"] = _json(selection)
            else:
                fit = fit_meta(method, oof, y, data.folds, test, task, args.extra_features, args.smoke, args.seed)
                row = MethodResult(method + suffix, metric.name, metric(y, fit.oof, task),
                                   metric(y, fit.in_sample, task), fit.oof, fit.test)
                files.update({f"meta/{row.method}/{k}": v for k, v in meta_files(fit, data.classes, members).items()})
            row.seconds = time.perf_counter() - start
            rows.append(row)
    return rows, files


def _member_sets(data) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """(row suffix, member names, OOF, test) to fit on: the merged models, and with TTA-view members
    all of them together (the same rows and folds, so `+views` is cross-validated like the rest)."""
    sets = [("", data.model_ids, data.oof, data.test)]
    if data.view_ids:
        sets.append((VIEWS, data.model_ids + data.view_ids, np.concatenate([data.oof, data.view_oof]),
                     np.concatenate([data.test, data.view_test])))
    return sets


def _greedy(name: str, data, members: list[str], oof: np.ndarray, test: np.ndarray, metric: Metric,
            args) -> tuple[MethodResult, dict]:
    """Greedy selection over `members` (in sample, and selected on folds != f for fold f); its row and
    its selection.json document."""
    from ensemble.stack.select import GreedySelection, cross_val_predict

    y, task = data.y_true, data.task
    selector = GreedySelection(metric, task, iterations=10 if args.smoke else args.iterations,
                               init_size=min(args.init_size, len(members)), bagging=args.bagging,
                               random_state=args.seed).fit(oof, y)
    cv_oof, fold_weights = cross_val_predict(selector, oof, y, data.folds)
    row = MethodResult(name, metric.name, metric(y, cv_oof, task), selector.score_, cv_oof, selector.predict(test))
    doc = {"metric": metric.name, "iterations": selector.iterations, "init_size": selector.init_size,
           "bagging": selector.bagging, "weights": dict(zip(members, selector.weights_.tolist())),
           "counts": dict(zip(members, selector.counts_.tolist())),
           "trajectory": selector.trajectory_, "picks": [members[i] for i in selector.indices_[0]],
           "best_step": selector.best_step_, "cv_score": row.cv_score, "in_sample_score": row.in_sample_score,
           "cv_weights": {str(f): dict(zip(members, w.tolist())) for f, w in fold_weights.items()}}
    return row, doc


# ------------------------------------------------------------------ thresholds (multilabel)


def _fit_thresholds(data, oof: np.ndarray, beta: float, average: str) -> tuple[dict, object]:
    """Per-label thresholds on one method's honest OOF: fold-wise (fit on folds != f, apply to fold f),
    and fitted on all of it (what the test set gets)."""
    from ensemble.stack.thresholds import LabelThresholds, cross_val_thresholds

    cv = cross_val_thresholds(data.y_true, oof, data.folds, beta, average)
    return cv, LabelThresholds(beta, average).fit(data.y_true, oof)


def score_thresholded(rows: list[MethodResult], data, beta: float, average: str) -> None:
    """Give every method its F-beta after its own thresholds: a calibrated method read at 0.5
    under-predicts (F2 wants recall), so comparing methods at 0.5 would pick the wrong one."""
    for row in rows:
        start = time.perf_counter()
        row.fitted_thresholds = _fit_thresholds(data, row.oof, beta, average)
        row.cv_score_thresholded = row.fitted_thresholds[0]["score"]
        row.in_sample_score_thresholded = row.fitted_thresholds[1].score_
        row.seconds += time.perf_counter() - start


def choose_winner(rows: list[MethodResult], metric: Metric) -> MethodResult:
    """The best CV score, after thresholds when the rows have them; the first on ties."""
    if rows[0].cv_score_thresholded is not None:
        return max(rows, key=lambda r: r.cv_score_thresholded)
    return min(rows, key=lambda r: metric.sign() * r.cv_score)


def _threshold_rows(data, winner: MethodResult, beta: float,
                    average: str) -> tuple[list[MethodResult], dict, np.ndarray]:
    """Per-label and global thresholds on the winner's honest OOF; returns rows, thresholds.json, test 0/1."""
    from ensemble.metrics import fbeta

    start = time.perf_counter()
    name = fbeta_name(beta, average)
    cv, est = winner.fitted_thresholds or _fit_thresholds(data, winner.oof, beta, average)
    rows = [MethodResult("thresholds", name, cv["score"], est.score_),
            MethodResult("global_threshold", name, cv["global_score"], est.global_score_)]
    rows[0].seconds = time.perf_counter() - start
    chosen_by = "cv_score" if winner.cv_score_thresholded is None else "cv_score_thresholded"
    doc = {"fitted_on": winner.method, "chosen_by": chosen_by, "beta": beta, "average": average,
           "thresholds": dict(zip(data.classes, est.thresholds_.tolist())),
           "global_threshold": est.global_threshold_, "cv_score": cv["score"], "in_sample_score": est.score_,
           "global_cv_score": cv["global_score"], "global_in_sample_score": est.global_score_,
           "at_0.5": fbeta(data.y_true, winner.oof, "multilabel", beta, average), "passes": est.n_passes_,
           "cv_thresholds": {str(f): dict(zip(data.classes, t)) for f, t in cv["thresholds"].items()}}
    return rows, {"thresholds.json": _json(doc)}, est.predict(winner.test)


# ------------------------------------------------------------------ files


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


def stack_run(run: Run, args):
    """Score every method on the run's OOF predictions; returns (rows, winner, metric, data, files), nothing written."""
    from ensemble.stack.oof import load_run

    data = load_run(run, tta=not args.no_tta, skip_incomplete=args.skip_incomplete)
    name = args.metric or data.metric
    metric = get_metric(name, beta=args.beta, average=args.average)
    beta = 2.0 if name == "f2" else args.beta  # an F-beta metric's thresholds optimise that metric
    for model_id, why in data.skipped.items():
        print(f"skipped {model_id}: {why}")
    if data.no_views:  # only said when other models have view members
        print(f"no view members from {len(data.no_views)} model(s): "
              + "; ".join(f"{m} ({why})" for m, why in data.no_views.items()))
    methods = list(METHODS) if args.method == "all" else [args.method]
    rows, files = run_methods(data, methods, metric, args)
    if data.task == "multilabel" and name in ("f2", "fbeta"):
        score_thresholded(rows, data, beta, args.average)
    winner = choose_winner(rows, metric)
    winner = _smooth(data, rows, files, winner, metric, data.run, beta, args.average)
    test_pred = None
    if data.task == "multilabel":  # the submission is tags: thresholds are fitted on the winner either way
        extra, more, test_pred = _threshold_rows(data, winner, beta, args.average)
        rows += extra
        files.update(more)
    files["scores.csv"] = _scores_csv(rows)
    files["submission.csv"] = _submission(data, winner, test_pred)
    return rows, winner, metric, data, files


def _smooth(data, rows: list[MethodResult], files: dict, winner: MethodResult, metric: Metric, run: Run, beta: float,
            average: str) -> MethodResult:
    """The winner smoothed over its test rows' nearest neighbours (`ensemble.stack.smooth`), when a model has
    embeddings: always a row of scores.csv, the winner only when its CV score is better."""
    from ensemble.stack.smooth import neighbour_smoothing

    smoothed, more, line = neighbour_smoothing(data, winner, metric, run)
    if smoothed is None or winner.cv_score_thresholded is None:
        print(line)
    if smoothed is None:
        return winner
    rows.append(smoothed)
    files.update(more)
    if winner.cv_score_thresholded is None:
        return smoothed if choose_winner([winner, smoothed], metric) is smoothed else winner
    # F-beta multilabel: judged after its own thresholds, as every other method was
    score_thresholded([smoothed], data, beta, average)
    used = choose_winner([winner, smoothed], metric) is smoothed
    doc = json.loads(more["smoothing.json"]) | {"used": used, "chosen_by": "cv_score_thresholded",
                                                "cv_score_thresholded": smoothed.cv_score_thresholded,
                                                "cv_score_thresholded_without": winner.cv_score_thresholded}
    files["smoothing.json"] = _json(doc)
    print(f"neighbour smoothing of {winner.method}: cv {metric.name} after thresholds "
          f"{smoothed.cv_score_thresholded:.5f} vs {winner.cv_score_thresholded:.5f} without, "
          + (f"better: the submission is {smoothed.method}" if used else f"not better: the submission stays {winner.method}"))
    return smoothed if used else winner


def _scores_csv(rows: list[MethodResult]) -> bytes:
    """One row per method; the thresholded columns are empty unless the run is judged by F-beta."""
    import pandas as pd

    table = pd.DataFrame([[getattr(r, c) for c in SCORE_COLUMNS] for r in rows], columns=SCORE_COLUMNS)
    return table.to_csv(index=False).encode()


def print_summary(rows, winner, metric, data, out: Path | str) -> None:
    """The scores table, the winner against the best single model and the mean, the thresholds' gain."""
    thresholded = winner.cv_score_thresholded is not None
    views = f" (+{len(data.view_ids)} TTA-view members)" if data.view_ids else ""
    print(f"{len(data.model_ids)} models{views}, {len(data.ids)} OOF rows, {len(data.test_ids)} test rows, "
          f"task {data.task}")
    extra = f" {'cv_thr':>10} {'in_s_thr':>10}" if thresholded else ""
    print(f"{'method':<32} {'metric':<10} {'cv_score':>10} {'in_sample':>10}{extra} {'seconds':>8}")
    for r in rows:
        extra = f" {_num(r.cv_score_thresholded)} {_num(r.in_sample_score_thresholded)}" if thresholded else ""
        print(f"{r.method:<32} {r.metric:<10} {r.cv_score:>10.5f} {r.in_sample_score:>10.5f}{extra} {r.seconds:>8.1f}")
    key, sign = ("cv_score_thresholded", -1.0) if thresholded else ("cv_score", metric.sign())
    single, mean, best = getattr(rows[0], key), getattr(rows[1], key), getattr(winner, key)
    how = f" after its own per-label thresholds ({winner.cv_score:.5f} at 0.5; chosen by {key})" if thresholded else ""
    print(f"winner: {winner.method} with cv {metric.name} {best:.5f}{how}, {sign * (single - best):+.5f} better "
          f"than {rows[0].method} ({single:.5f}) and {sign * (mean - best):+.5f} better than the mean ({mean:.5f})")
    by_method = {r.method: r for r in rows}
    gains = [f"{r.method} {sign * (getattr(by_method[r.method[:-len(VIEWS)]], key) - getattr(r, key)):+.5f}"
             for r in rows if r.method.endswith(VIEWS)]
    if gains:
        after = " after thresholds" if thresholded else ""
        print(f"view weighting, cv {metric.name}{after} vs the same method without views (+ = better): "
              f"{', '.join(gains)}")
    if data.task == "multilabel":
        t, g = rows[-2], rows[-1]
        print(f"thresholds on {winner.method}: cv {t.metric} {t.cv_score:.5f} per label vs {g.cv_score:.5f} "
              f"with one global threshold ({t.cv_score - g.cv_score:+.5f})")
    print(f"wrote {out}/ (scores.csv, submission.csv, ...)")


def _num(value: float | None) -> str:
    return f"{'':>10}" if value is None else f"{value:>10.5f}"
