"""The prediction stage: TTA on a Ray actor pool (`python -m ensemble.predict --run runs/NAME`).

For every complete model of a run (one with oof.parquet) it writes, as one complete set
(ensemble.predict.outputs): oof_tta.parquet (each held-out row predicted with TTA by its
own fold's model), test.parquet (the mean of the k fold models), predict.json last; with
--embeddings also emb/oof.npy and emb/test.npy (pre-logit features, for the stack's smoothing).

  plan     every check before Ray starts; one frozen Job per (model, fold, split)
  tta      view names, activations, the merge of views               (plain numpy)
  pool     the Predictor actors and the ActorPool that feeds them
  outputs  a model's files, predict.json last; submission.csv
  core     predict_run: plan -> pool -> outputs
  cli      the command line                                       (python -m ensemble.predict)

`--run` may be a URI (ensemble.run.storage): the run's configs, OOF files and best
weights are pulled into this node's mirror, an actor on another node pulls the
weights it needs into its own, and the outputs are pushed back. docs/predict.md is
the manual.
"""

from ensemble.predict.core import predict_run

__all__ = ["predict_run"]
