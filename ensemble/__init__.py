"""ensemble: image-model ensembles on Ray, from manifest to stacked submission.

Packages in reading order (the flow of docs/design.md):

  data     manifests, folds, views, the loader and its decoded cache, the demo data
  models   create_model over timm: local weights, freezing the backbone; retrieval's EmbeddingNet
  heads    softmax, ArcFace, CosFace, sub-center ArcFace heads for training embeddings
  metrics  log loss, accuracy, F-beta, mAP, retrieval scores: the one registry of metric names
  run      the run directory every stage reads and writes: layout, storage (a URI), lock
  tune     the sweep: spaces, launch, one trial per model, train one fold  (python -m ensemble.tune)
  predict  TTA on a Ray actor pool                                         (python -m ensemble.predict)
  stack    OOF loading, greedy selection, thresholds, meta-models          (python -m ensemble.stack)
  retrieve exact kNN, retrieval metrics, QE / re-ranking, embedding concat (python -m ensemble.retrieve)
  report   one self-contained HTML page per run                            (python -m ensemble.report)
  status   a live or finished run's progress, from its files alone        (python -m ensemble.status)
  prune    free the checkpoints of models the ensemble does not use       (python -m ensemble.prune)
  demo     the end-to-end demo behind `make demo`                          (python -m ensemble.demo)

Use it as a library: the names below are importable from `ensemble` directly; each is
loaded on first use, so `import ensemble` stays cheap (torch only when a name needs it).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {  # name -> module that defines it
    "read_manifest": "ensemble.data.manifest", "Manifest": "ensemble.data.manifest", "Target": "ensemble.data.manifest",
    "make_folds": "ensemble.data.folds",
    "register_view": "ensemble.data.views", "apply_views": "ensemble.data.views",
    "create_model": "ensemble.models",
    "get_metric": "ensemble.metrics", "METRICS": "ensemble.metrics",
    "Run": "ensemble.run", "open_run": "ensemble.run",
    "load_space": "ensemble.tune.spaces", "resolve_models": "ensemble.tune.spaces", "run_sweep": "ensemble.tune.launch",
    "train_fold": "ensemble.tune.train",
    "predict_run": "ensemble.predict.core", "merge_views": "ensemble.predict.tta",
    "load_run": "ensemble.stack.oof", "GreedySelection": "ensemble.stack.select",
    "LabelThresholds": "ensemble.stack.thresholds", "fit_meta": "ensemble.stack.meta",
    "create_head": "ensemble.heads", "search": "ensemble.retrieve.search",
    "leave_one_out": "ensemble.retrieve.metrics", "map_at_k": "ensemble.retrieve.metrics",
    "load_embeddings": "ensemble.retrieve.core", "GreedyConcat": "ensemble.retrieve.select",
    "UserError": "ensemble.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ensemble' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
