"""The retrieve stage's command line: `python -m ensemble.retrieve --run runs/NAME [--k 10] [--option auto]`."""

from __future__ import annotations

import argparse
import json

from ensemble.errors import UserError, cli_main, command_line
from ensemble.metrics import RETRIEVAL_METRICS
from ensemble.retrieve.core import (
    FOLD_MERGES,
    OPTIONS,
    applied_option,
    holdout_scores,
    load_embeddings,
    score_methods,
    scores_table,
    submission,
)
from ensemble.run import locked, open_run

FOLD_MERGE = "concat"  # docs/design.md: beat the mean for all 6 models measured (scripts/measure_fold_merge.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.retrieve",
                                description="Search a retrieval run's gallery for its queries: every model, their "
                                            "weighted concatenation and each re-ranking option scored out of fold; "
                                            "the best one writes retrieval/submission.csv.")
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/), or its URI")
    p.add_argument("--k", type=int, default=10, help="gallery ids per query in submission.csv [10]")
    p.add_argument("--metric", choices=RETRIEVAL_METRICS, help="what picks the method [the metric the sweep monitored]")
    p.add_argument("--option", default="auto", choices=("auto", "none") + OPTIONS,
                   help="query expansion / re-ranking: auto = whichever scores best out of fold (or none)")
    p.add_argument("--fold-merge", default=FOLD_MERGE, choices=FOLD_MERGES,
                   help="how the k fold models' query/gallery embeddings combine: concat (k times the dims) "
                        "or mean (smaller, for huge galleries) [concat]")
    p.add_argument("--expand", type=int, default=3, help="neighbours for alpha-QE and DBA [3]")
    p.add_argument("--alpha", type=float, default=3.0, help="alpha-QE / DBA weight exponent [3]")
    p.add_argument("--iterations", type=int, default=10, help="greedy concatenation steps [10]")
    p.add_argument("--models", nargs="+", help="only these model ids")
    p.add_argument("--smoke", action="store_true", help="quick: 2 greedy steps, no k-reciprocal re-ranking")
    args = p.parse_args(argv)
    if args.k < 1 or args.expand < 1 or args.iterations < 1:
        raise UserError(f"--k, --expand and --iterations must be >= 1; got {args.k}, {args.expand}, {args.iterations}.")
    if not args.alpha >= 0:
        raise UserError(f"--alpha must be >= 0 (similarity ** alpha weighs the neighbours); got {args.alpha}.")
    return args


def retrieve(args: argparse.Namespace, command: str = "python -m ensemble.retrieve") -> list:
    """Score every method, write retrieval/ (scores.csv, selection.json, submission.csv), print the summary."""
    with open_run(args.run) as run:
        if not run.store:
            run.check()
        run.check_writable()
        with locked(run, command):
            run.pull_artifacts()
            data = load_embeddings(run, args.models)
            metric = args.metric or data.metric
            options = OPTIONS if args.option == "auto" else () if args.option == "none" else (args.option,)
            if args.smoke:
                options = tuple(o for o in options if o != "k_reciprocal")
            kw = {"expand": args.expand, "alpha": args.alpha}
            rows = score_methods(data, metric, options, 2 if args.smoke else args.iterations, **kw)
            winner = max(rows, key=lambda r: r.cv[metric])
            files = {}
            if data.query_ids is not None:
                if data.query_labels is not None:
                    for r in rows:
                        r.holdout = holdout_scores(data, r, args.fold_merge, **kw)
                files["submission.csv"] = submission(data, winner, args.fold_merge, args.k, **kw).to_csv(
                    index=False).encode()
            n_test = len(data.query_ids) + len(data.gallery_ids) if data.query_ids is not None else 0
            selection = {"winner": winner.name, "metric": metric, "option": applied_option(winner, n_test),
                         "fold_merge": args.fold_merge,
                         "k": args.k, "weights": dict(zip(data.model_ids, winner.weights.tolist())),
                         "trajectory": next((r.trajectory for r in rows if r.name == "greedy_concat"), []),
                         "cv": winner.cv, "holdout": winner.holdout}
            files["selection.json"] = (json.dumps(selection, indent=2) + "\n").encode()
            files["scores.csv"] = scores_table(rows, data.model_ids).to_csv(index=False).encode()
            run.write_set(run.retrieval_dir, files)
            print_summary(rows, winner, metric, data, run.show(run.retrieval_dir))
    return rows


def print_summary(rows, winner, metric, data, out) -> None:
    holdout = data.query_labels is not None and data.query_ids is not None
    print(f"{len(data.model_ids)} model(s), {len(data.ids)} held-out rows in {len(set(data.folds))} folds"
          + (f", {len(data.query_ids)} queries x {len(data.gallery_ids)} gallery" if data.query_ids is not None else ""))
    if data.dropped:
        print(f"note: {data.dropped} held-out row(s) without an embedding (unreadable images) are left out")
    no_rel = rows[0].cv["no_relevant"]
    if no_rel:
        print(f"note: {no_rel} held-out image(s) are the only one of their identity in their fold: no right answer, "
              "so they are not scored (they still sit in the gallery)")
    head = f"{'method':<40} {'cv top1':>8} {'cv map@10':>9} {'cv digix':>8} {'cv r@10':>8}"
    print(head + (f" {'hold-out ' + metric:>16}" if holdout else "") + f" {'seconds':>8}")
    for r in rows:
        extra = f" {r.holdout[metric]:>16.4f}" if holdout else ""
        print(f"{r.name:<40} {r.cv['top1']:>8.4f} {r.cv['map@10']:>9.4f} {r.cv['digix']:>8.4f} "
              f"{r.cv['recall@10']:>8.4f}{extra} {r.seconds:>8.1f}")
    single = max((r for r in rows if r.name.startswith("single:")), key=lambda r: r.cv[metric])
    print(f"winner: {winner.name} with cv {metric} {winner.cv[metric]:.4f}, "
          f"{winner.cv[metric] - single.cv[metric]:+.4f} over the best single model ({single.name[7:]})")
    print(f"wrote {out}/ (scores.csv, selection.json{', submission.csv' if data.query_ids is not None else ''})")


@cli_main
def main(argv=None) -> int:
    retrieve(parse_args(argv), command_line("python -m ensemble.retrieve", argv))
    return 0
