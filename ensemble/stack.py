"""The stacking CLI: every combiner of a run's OOF predictions, scored the same honest way.

    python -m ensemble.stack --run runs/NAME [--method all] [--metric log_loss] [--beta 2]

reads a run (see `ensemble.oof.load_run`), scores the best single model, the
plain mean, greedy selection (`ensemble.select`) and the meta-models
(`ensemble.meta`), fits per-label thresholds for multilabel runs
(`ensemble.thresholds`), and writes `<run>/ensemble/`: scores.csv,
selection.json, thresholds.json, meta/ and submission.csv. Every method's
cv_score comes from predictions made for fold f without fold f's labels.
docs/stacking.md is the manual.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.errors import cli_main
from ensemble.meta import META_METHODS, fit_meta, meta_files
from ensemble.metrics import Metric, fbeta_name, get_metric

METHODS = ("greedy", "mean") + META_METHODS


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
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/), or its URI (s3://..., file://...)")
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
    from ensemble.storage import ARTIFACTS, open_run

    with open_run(args.run) as (run_dir, store):
        if store:  # the prediction files, into a scratch copy of the run
            store.pull(only=ARTIFACTS)
        rows, winner, metric, data, files = _stack(args, run_dir)
        _write(run_dir / "ensemble", files)  # everything was built in memory first
        if store:
            store.push(*(f"ensemble/{rel}" for rel in files))
        _print_summary(rows, winner, metric, data, f"{args.run}/ensemble" if store else run_dir / "ensemble")
    return rows


def _stack(args, run_dir: Path):
    from ensemble.oof import load_run

    metric = get_metric(args.metric, beta=args.beta, average=args.average)
    data = load_run(run_dir, tta=not args.no_tta, skip_incomplete=args.skip_incomplete)
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
    return rows, winner, metric, data, files


def _print_summary(rows, winner, metric, data, out: Path | str) -> None:
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


@cli_main
def main(argv=None) -> int:
    stack(_parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
