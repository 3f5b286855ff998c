"""The stacking stage: combine a run's out-of-fold predictions (`python -m ensemble.stack --run runs/NAME`).

  oof         aligned OOF/test matrices of a run, checked against folds.csv (load_run)
  select      greedy (Caruana) ensemble selection                (plain numpy)
  thresholds  per-label F-beta thresholds                         (plain numpy)
  meta_models one fold's LightGBM / XGBoost / ridge / logistic model and its features
  meta        fit_meta: meta-models trained on the level-1 folds; their files (meta_files, load_meta)
  core        every method scored the same way; ensemble/ written as one set
  cli         the command line                                  (python -m ensemble.stack)

docs/stacking.md is the manual.
"""
