"""Average or concatenate the k fold models' embeddings of a query/gallery set? Measured on a labelled one.

For each retrieval model of a run whose query and gallery manifests carry labels (the demo's unseen
digits 7-9), every query and gallery image queries all the others (leave-one-out over their union, so
hundreds of queries instead of the 60 of the query set), with the embeddings of:
  fold f     one fold model alone (the mean over f of its score is shown)
  mean       the k fold models' embeddings averaged, then L2-normalised (k times smaller)
  concat     their concatenation (cosine = the mean of the fold models' cosines)

    python scripts/measure_fold_merge.py --run runs/demo_retrieval
"""

from __future__ import annotations

import argparse

import numpy as np

from ensemble.retrieve.core import load_embeddings, merge_folds
from ensemble.retrieve.metrics import leave_one_out
from ensemble.run import Run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--metric", default="digix")
    args = p.parse_args()
    data = load_embeddings(Run(args.run))
    if data.query_labels is None:
        raise SystemExit("this run's query and gallery manifests have no label column: nothing to measure on")
    labels = np.concatenate([data.query_labels, data.gallery_labels])
    print(f"{len(labels)} labelled query + gallery images, leave-one-out, {args.metric}")
    print(f"{'model':<32} {'one fold (mean)':>15} {'mean':>8} {'concat':>8}")
    wins = {"mean": 0, "concat": 0}
    for model_id, q, g in zip(data.model_ids, data.query, data.gallery):
        both = np.concatenate([np.asarray(q, np.float32), np.asarray(g, np.float32)], axis=1)  # folds x rows x dims
        single = np.mean([leave_one_out(fold, labels)[args.metric] for fold in both])
        scores = {how: leave_one_out(merge_folds(both, how).astype(np.float32), labels)[args.metric]
                  for how in ("mean", "concat")}
        wins[max(scores, key=scores.get)] += 1
        print(f"{model_id:<32} {single:>15.4f} {scores['mean']:>8.4f} {scores['concat']:>8.4f}")
    print(f"better: mean for {wins['mean']} model(s), concat for {wins['concat']}")


if __name__ == "__main__":
    main()
