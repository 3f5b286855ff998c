"""A model's prediction files, written as one complete set: predict.json last, removed first.

  oof_tta.parquet   oof.parquet's ids, order and columns; each held-out row predicted with TTA
                    by its own fold's model
  test.parquet      id + classes: the mean of the k fold models' TTA predictions, in the test
                    manifest's order
  predict.json      the views and merge rule used, the OOF scores, the actors' seconds; its presence marks the set
                    complete (a crash mid-write leaves no predict.json, so the model is redone)
  oof_views.parquet, test_views.parquet   with --per-view
  submission.csv    with --submission
  emb/oof.npy, emb/test.npy   with --embeddings (see below)

A retrieval model's set is its embeddings instead (`write_embeddings`), float16 and
L2-normalised, each .npy with a parquet of its row ids beside it:
  emb/oof.npy       rows x dims: each held-out row by its own fold's model (TTA views averaged)
  emb/query.npy, emb/gallery.npy   folds x rows x dims: every fold model's embedding of each
                    row (the retrieve stage merges the k folds: see docs/design.md)
  predict.json      as above; its scores are the held-out folds' leave-one-out retrieval scores

A classification model predicted with --embeddings writes the same kind of files beside its
parquets (the timm model's pooled pre-logit features, from the forward pass that gives the logits):
  emb/oof.npy       rows x dims, as for retrieval
  emb/test.npy      rows x dims: the mean of the k fold models' L2-normalised embeddings, normalised again
                    (the neighbour smoothing of the stack compares test rows with it: ensemble.stack.smooth)
Unreadable images (on_bad_image: skip) are zero rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ensemble.errors import UserError
from ensemble.io import write_csv, write_json, write_npy, write_parquet
from ensemble.metrics import METRICS
from ensemble.predict.plan import ModelPlan
from ensemble.predict.tta import merge_embeddings, view_names
from ensemble.run import Run
from ensemble.run.layout import PREDICT_FILES


def write_outputs(run: Run, plan: ModelPlan, results: dict) -> dict[str, float]:
    """Write one model's files, each atomically, predict.json last; return OOF scores (without TTA, with it, per view)."""
    config, classes, k = plan.config, plan.config["classes"], plan.config["k"]
    order = pd.Index([i for f in range(k) for i in plan.fold_ids[f]]).get_indexer(plan.oof["id"])
    oof_tta = plan.oof[["id", "fold"]].copy()
    # Unreadable images (on_bad_image: skip) came back NaN: a held-out row keeps its training-time OOF
    # value (itself the prior for an image that never decoded), a test row gets the model's mean OOF.
    proba = np.concatenate([results[f, "oof", "merged"] for f in range(k)])[order]
    unreadable = {"oof": int(np.isnan(proba).any(1).sum())}
    oof_tta[classes] = np.where(np.isnan(proba), plan.oof[classes].to_numpy(), proba)
    files = {"oof_tta.parquet": oof_tta}
    if plan.test_ids is not None:  # the mean of the k fold models
        mean = np.mean([results[f, "test", "merged"] for f in range(k)], axis=0, dtype=np.float64)
        unreadable["test"] = int(np.isnan(mean).any(1).sum())
        mean = np.where(np.isnan(mean), plan.oof[classes].to_numpy().mean(0), mean)
        test = pd.DataFrame(mean, columns=classes)
        files["test.parquet"] = pd.concat([pd.DataFrame({"id": plan.test_ids}), test.astype(np.float32)], axis=1)
    if any(unreadable.values()):
        print(f"{plan.model_id}: unreadable images filled in (on_bad_image: skip): {unreadable}")
    metric, task = METRICS[config["metric"]], config["task"]
    scores = {f"oof {metric.name}": metric(plan.y_true, plan.oof[classes].to_numpy(), task),
              f"oof_tta {metric.name}": metric(plan.y_true, oof_tta[classes].to_numpy(), task)}
    job = plan.jobs[0, "oof"]
    names = view_names(job.tta)
    if job.per_view:
        per_view = np.concatenate([results[f, "oof", "views"] for f in range(k)])[order]  # rows x V x C
        per_view = np.where(np.isnan(per_view), oof_tta[classes].to_numpy()[:, None], per_view)
        scores.update({f"view {name}": metric(plan.y_true, per_view[:, v], task) for v, name in enumerate(names)})
        files["oof_views.parquet"] = _long(oof_tta[["id", "fold"]], per_view, names, classes)
        if plan.test_ids is not None:
            mean = np.mean([results[f, "test", "views"] for f in range(k)], axis=0, dtype=np.float64)
            mean = np.where(np.isnan(mean), test.to_numpy()[:, None], mean)
            files["test_views.parquet"] = _long(pd.DataFrame({"id": plan.test_ids}), mean.astype(np.float32), names, classes)
    emb_sets = _classifier_embeddings(plan, results, order) if job.embeddings else {}
    invalidate(run, plan.out_dir)
    for name, frame in files.items():
        write_parquet(frame, plan.out_dir / name)
    _write_emb_sets(plan.out_dir, emb_sets)
    extra = {"embeddings": True, "embedding_dim": emb_sets["oof"][0].shape[1]} if emb_sets else {}
    write_json({"tta": job.tta, "views": names, "per_view": job.per_view, "merge": job.merge,
                "forward_batch": job.batch * len(names),
                **extra, "scores": scores, "unreadable": unreadable, "seconds": results.get("seconds")},
               plan.out_dir / "predict.json")
    return scores


def _classifier_embeddings(plan: ModelPlan, results: dict, order: np.ndarray) -> dict:
    """emb/ sets of a classification model: name -> (embeddings, ids frame); unreadable rows stay NaN.

    Test rows: the k fold models' L2-normalised embeddings averaged, then normalised again (merge_embeddings
    over the folds). Fold models fine-tuned from one pretrained backbone share most of their feature space;
    where they do not, the cross terms of the mean's dot products are near 0 in many dims, so its cosine
    is still about the mean of the k models' cosines, at 1/k of the folds x rows x dims file."""
    k = plan.config["k"]
    sets = {"oof": (np.concatenate([results[f, "oof", "emb"] for f in range(k)])[order], plan.oof[["id", "fold"]])}
    if plan.test_ids is not None:
        per_fold = np.stack([results[f, "test", "emb"] for f in range(k)], axis=1)  # rows x folds x dims
        sets["test"] = (merge_embeddings(per_fold), pd.DataFrame({"id": plan.test_ids}))
    return sets


def _write_emb_sets(out_dir, sets: dict) -> None:
    """emb/<name>.npy (float16, NaN rows as zeros) and emb/<name>.ids.parquet for each set, each atomically."""
    for name, (emb, ids) in sets.items():
        write_npy(np.nan_to_num(emb).astype(np.float16), out_dir / "emb" / f"{name}.npy")
        write_parquet(ids, out_dir / "emb" / f"{name}.ids.parquet")


def write_embeddings(run: Run, plan: ModelPlan, results: dict) -> dict[str, float]:
    """A retrieval model's emb/ files, each atomically, predict.json last; returns the OOF retrieval scores
    (mean over folds: at training's best epoch without TTA, and of these embeddings)."""
    from ensemble.retrieve.metrics import leave_one_out

    k, metric, labels = plan.config["k"], plan.config["metric"], plan.y_true
    order = pd.Index([i for f in range(k) for i in plan.fold_ids[f]]).get_indexer(plan.oof["id"])
    oof = np.concatenate([results[f, "oof", "merged"] for f in range(k)])[order]
    ok = np.isfinite(oof).all(axis=1)  # rows of unreadable images are NaN: not scored (as in training)
    is_fold = [(plan.oof["fold"].to_numpy() == f) & ok for f in range(k)]
    trained = [(run.read_metrics(plan.model_id, f) or {}).get("best_score") for f in range(k)]
    scores = {f"oof {metric}": float(np.mean(trained)) if None not in trained else float("nan"),
              f"oof_tta {metric}": float(np.mean([leave_one_out(oof[rows], labels[rows])[metric] for rows in is_fold]))}
    sets = {"oof": (oof, plan.oof[["id", "fold"]])}
    for split in ("query", "gallery"):
        if getattr(plan, f"{split}_ids") is not None:
            stacked = np.stack([results[f, split, "merged"] for f in range(k)])  # folds x rows x dims
            sets[split] = (stacked, pd.DataFrame({"id": getattr(plan, f"{split}_ids")}))
    unreadable = {name: _empty_rows(emb) for name, (emb, _) in sets.items()}
    if any(unreadable.values()):
        print(f"{plan.model_id}: rows without an embedding (unreadable images, on_bad_image: skip): {unreadable}")
    invalidate(run, plan.out_dir)
    _write_emb_sets(plan.out_dir, sets)
    job = plan.jobs[0, "oof"]
    write_json({"tta": job.tta, "views": view_names(job.tta), "merge": job.merge, "forward_batch": job.batch * job.n_views,
                "embedding_dim": job.embedding_dim, "scores": scores, "unreadable": unreadable,
                "seconds": results.get("seconds")}, plan.out_dir / "predict.json")
    return scores


def _empty_rows(emb: np.ndarray) -> int:
    """Rows (of any fold, for folds x rows x dims) with no embedding: NaN (an unreadable image) or all zero."""
    bad = ~np.isfinite(emb).all(-1) | ~emb.any(-1)
    return int(bad.reshape(-1, bad.shape[-1]).any(0).sum())


def invalidate(run: Run, out_dir) -> None:
    """Remove predict.json, here and at the URI, before any file of a new set is written."""
    run.remove(out_dir / "predict.json")


def push_outputs(run: Run, out_dir) -> None:
    """A model's outputs to the URI (nothing for a local run), predict.json last."""
    run.push(*(out_dir / name for name in PREDICT_FILES))


def _long(keys: pd.DataFrame, per_view: np.ndarray, names: list[str], classes: list[str]) -> pd.DataFrame:
    """Rows x V x C probabilities as one row per (row, view): the key columns, view, classes."""
    frame = keys.loc[keys.index.repeat(len(names))].reset_index(drop=True)
    frame["view"] = np.tile(names, len(keys))
    frame[classes] = per_view.reshape(-1, len(classes))
    return frame


def write_submission(run: Run, model_id: str, out_dir=None, threshold: float = 0.5):
    """A Kaggle-style CSV of one model's test.parquet: id + class probabilities, or space-separated tags (multilabel)."""
    config = run.read_config(model_id)
    if config["task"] == "retrieval":
        raise UserError(f"{model_id} is a retrieval model: its submission (each query's gallery ids) is written by "
                        f"python -m ensemble.retrieve --run {run.show()}; drop --submission.")
    out_dir = out_dir or run.model_dir(model_id)
    if not (out_dir / "test.parquet").exists():
        raise UserError(f"{run.show(out_dir / 'test.parquet')} missing: the space has no test_manifest, or predict "
                        "has not run.")
    test = pd.read_parquet(out_dir / "test.parquet")
    if config["task"] == "multilabel":
        classes = np.array(config["classes"])
        p = test[list(classes)].to_numpy()
        hit = p >= threshold
        hit[np.arange(len(p)), p.argmax(1)] |= ~hit.any(1)  # never an empty row: at least the likeliest tag
        test = pd.DataFrame({"id": test["id"], config["target"]["column"]: [" ".join(classes[h]) for h in hit]})
    write_csv(test, out_dir / "submission.csv")
    return out_dir / "submission.csv"
