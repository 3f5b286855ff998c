"""Greedy ensemble selection on a run's OOF predictions, step by step.

    python scripts/select_ensemble.py --run runs/NAME --metric log_loss --iterations 50

Prints the score after each step (the model added and the ensemble's score),
the kept models with their weights, and the honest score under
cross-validation over the run's folds (select on k-1 folds, score the held-out
one). Writes nothing: `python -m ensemble.stack --method greedy` writes
selection.json.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ensemble.errors import cli_main
from ensemble.metrics import get_metric
from ensemble.stack.oof import load_run
from ensemble.stack.select import GreedySelection, cross_val_predict


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/)")
    p.add_argument("--metric", default="log_loss", help="log_loss | accuracy | f2 | fbeta | map")
    p.add_argument("--beta", type=float, default=2.0, help="beta for --metric fbeta")
    p.add_argument("--iterations", type=int, default=50, help="forward steps after the initial models")
    p.add_argument("--init-size", type=int, default=1, help="start from the best N models")
    p.add_argument("--bagging", type=int, default=0, help="number of random model subsets (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tta", action="store_true", help="use oof.parquet even where oof_tta.parquet exists")
    p.add_argument("--skip-incomplete", action="store_true", help="leave out models with missing outputs")
    p.add_argument("--smoke", action="store_true", help="quick: at most 5 iterations")
    run(p.parse_args(argv))
    return 0


def run(args) -> None:
    metric = get_metric(args.metric, beta=args.beta)
    data = load_run(args.run, tta=not args.no_tta, skip_incomplete=args.skip_incomplete)
    for model_id, why in data.skipped.items():
        print(f"skipped {model_id}: {why}")
    iterations = min(args.iterations, 5) if args.smoke else args.iterations
    selector = GreedySelection(metric, data.task, iterations=iterations, init_size=args.init_size,
                               bagging=args.bagging, random_state=args.seed)
    selector.fit(data.oof, data.y_true)
    singles = [metric(data.y_true, p, data.task) for p in data.oof]
    best = int(np.argmin([metric.sign() * s for s in singles]))
    print(f"{len(data.model_ids)} models, {len(data.ids)} OOF rows, metric {metric.name} ({metric.mode})")
    print(f"best single: {data.model_ids[best]} {singles[best]:.6f}")
    if args.bagging:
        print(f"{args.bagging} bags; score of the summed bags after each step:")
        for step, score in enumerate(selector.trajectory_):
            print(f"  step {step:>3}  {score:.6f}")
    else:
        width = max(len(m) for m in data.model_ids)
        for step, (i, score) in enumerate(zip(selector.indices_[0], selector.trajectory_)):
            kind = "init" if step < selector.init_size else "add "
            print(f"  step {step:>3}  {kind} {data.model_ids[i]:<{width}}  {score:.6f}")
        print(f"kept the first {selector.best_step_ + 1} picks (best score on the trajectory)")
    print("weights:")
    for i in np.argsort(-selector.weights_, kind="stable"):
        if selector.counts_[i]:
            print(f"  {data.model_ids[i]:<40} {selector.weights_[i]:.4f}  ({selector.counts_[i]} picks)")
    cv_pred, _ = cross_val_predict(selector, data.oof, data.y_true, data.folds)
    cv = metric(data.y_true, cv_pred, data.task)
    print(f"in-sample {metric.name}: {selector.score_:.6f}   cross-validated over {len(np.unique(data.folds))} "
          f"folds: {cv:.6f}   (best single {singles[best]:.6f})")


if __name__ == "__main__":
    sys.exit(main())
