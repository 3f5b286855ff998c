"""The prediction stage's command line: `python -m ensemble.predict --run runs/NAME [--tta ...]`."""

from __future__ import annotations

import argparse

from ensemble.errors import cli_main, command_line
from ensemble.predict.core import CPU_FORWARD_BATCH, predict_run
from ensemble.predict.tta import MERGES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.predict",
                                description="TTA predictions of the test set and every held-out fold, on a Ray actor pool.")
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/), or its URI (s3://..., file://...)")
    p.add_argument("--tta", help="views, e.g. 'orig,hflip' or 'fivecrop,fivecrop+hflip' [each model's data.tta]")
    p.add_argument("--merge", default="mean", choices=MERGES, help="mean of probabilities | geometric mean | mean of logits")
    p.add_argument("--gpus-per-actor", type=float, help="e.g. 0.5 for two actors per GPU; 0: CPU actors [1 with GPUs]")
    p.add_argument("--cpus-per-actor", type=float, help="= the actor's torch threads [1; GPU actors: CPUs / actors]")
    p.add_argument("--forward-batch", type=int, help=f"images per forward, views included [{CPU_FORWARD_BATCH} on CPU, "
                                                     "2 x batch_size (>= 64) on GPU]")
    p.add_argument("--shard-size", type=int, default=512, help="images per work item, at most [512; fewer to give each actor ~8]")
    p.add_argument("--models", help="comma-separated model ids [every complete model]")
    p.add_argument("--per-view", action="store_true", help="also write each view's predictions and score them")
    p.add_argument("--embeddings", action="store_true",
                   help="classification: also write emb/oof.npy and emb/test.npy (pre-logit features) for the stack's "
                        "neighbour smoothing")
    p.add_argument("--submission", action="store_true", help="write models/<id>/submission.csv from test.parquet")
    p.add_argument("--threshold", type=float, default=0.5, help="multilabel submission: tags with p >= this [0.5]")
    p.add_argument("--force", action="store_true", help="predict again where the outputs exist")
    p.add_argument("--address", help="join an existing Ray cluster, e.g. 'auto'")
    p.add_argument("--smoke", action="store_true", help="a few rows per fold, written under <run>/predict-smoke/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    predict_run(args.run, tta=args.tta, merge=args.merge, gpus_per_actor=args.gpus_per_actor,
                cpus_per_actor=args.cpus_per_actor, forward_batch=args.forward_batch, shard_size=args.shard_size,
                models=args.models.split(",") if args.models else None, per_view=args.per_view, force=args.force,
                smoke=args.smoke, address=args.address, progress=not args.no_progress,
                submission=args.submission, threshold=args.threshold, embeddings=args.embeddings,
                command=command_line("python -m ensemble.predict", argv))
    return 0
