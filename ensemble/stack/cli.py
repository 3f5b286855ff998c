"""The stacking stage's command line: `python -m ensemble.stack --run runs/NAME [--method all] [--metric ...]`."""

from __future__ import annotations

import argparse

from ensemble import trackers
from ensemble.errors import cli_main, command_line
from ensemble.metrics import PROBABILITY_METRICS
from ensemble.run import locked, open_run
from ensemble.stack.core import METHODS, MethodResult, print_summary, stack_run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.stack",
                                description="Combine a run's out-of-fold predictions: greedy selection, thresholds, "
                                            "meta-models, each scored under cross-validation.")
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/), or its URI (s3://..., file://...)")
    p.add_argument("--method", default="all", choices=METHODS + ("all",),
                   help="what to fit besides the baselines (greedy and the meta-models also run as <method>+views "
                        "where models have predict --per-view files)")
    p.add_argument("--metric", help=f"{' | '.join(PROBABILITY_METRICS)} [the metric the sweep monitored]; with f2/fbeta "
                                    "a multilabel run ranks every method after its own per-label thresholds")
    p.add_argument("--beta", type=float, default=2.0, help="F-beta's beta for thresholds (and --metric fbeta)")
    p.add_argument("--average", default="samples", help="F-beta averaging: samples | micro | macro")
    p.add_argument("--iterations", type=int, default=50, help="greedy forward steps")
    p.add_argument("--init-size", type=int, default=1, help="greedy: start from the best N models")
    p.add_argument("--bagging", type=int, default=0, help="greedy: number of random model subsets (0 = off)")
    p.add_argument("--extra-features", action="store_true", help="meta-models also see each model's entropy")
    p.add_argument("--no-tta", action="store_true", help="use oof.parquet even where oof_tta.parquet exists "
                                                          "(per-view files still give the +views rows)")
    p.add_argument("--skip-incomplete", action="store_true", help="leave out models with missing outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="quick: 10 greedy steps, at most 60 boosting rounds")
    return p.parse_args(argv)


def stack(args: argparse.Namespace, command: str = "python -m ensemble.stack") -> list[MethodResult]:
    """Stack the run of `args.run`, write its ensemble/ and print the summary; returns the scores' rows."""
    with open_run(args.run) as run:
        if not run.store:
            run.check()  # not a run: said before anything is created
        run.check_writable()  # before minutes of fitting, not after
        with locked(run, command):
            run.pull_artifacts()  # the prediction files, into a scratch copy of a URI run
            rows, winner, metric, data, files = stack_run(run, args)
            run.write_set(run.ensemble_dir, files)  # everything was built in memory first
            print_summary(rows, winner, metric, data, run.show(run.ensemble_dir))
            scores = {r.method: r.cv_score if r.cv_score_thresholded is None else r.cv_score_thresholded for r in rows}
            for line in trackers.log_stage(run.dir, "stack", scores, {"metric": metric.name, "winner": winner.method}):
                print(line)
    return rows


@cli_main
def main(argv=None) -> int:
    stack(parse_args(argv), command_line("python -m ensemble.stack", argv))
    return 0
