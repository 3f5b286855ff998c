"""What to predict: every check before Ray starts, and one frozen job per (model, fold, split).

A job holds run-relative paths (weights, decoded cache) and the run's location (an
absolute directory or a URI); each process resolves them once against its own copy
of the run (`Run.on_node`), so nothing depends on the working directory of the
process that reads it (a Ray worker runs in the raylet's directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.data import views as views_mod
from ensemble.data.manifest import Target, encode_targets, read_manifest
from ensemble.errors import UserError
from ensemble.run import Run, stage_of, stage_size
from ensemble.run.layout import EMB_FILES, PREDICT_FILES

SMOKE_ROWS = 16  # --smoke: held-out rows per fold, and twice as many test rows
# A classification model's embeddings (--embeddings; float16, L2-normalised, ids beside each): held-out rows by
# their own fold's model (rows x dims), test rows as the mean of the k fold models' (rows x dims).


@dataclass(frozen=True)
class Job:
    """One fold model over one image list: everything a predictor needs, as plain values."""

    key: tuple  # (model_id, fold, "oof" | "test" | "query" | "gallery")
    run: str  # the run's location: an absolute directory or a URI
    weights: str  # run-relative
    cache: str | None  # run-relative decoded cache, or None
    cache_n: int
    cache_rows: tuple | None  # the held-out rows' rows in the sweep-wide cache
    backbone: str
    n_classes: int
    dropout: float
    drop_path: float
    task: str
    image_size: int
    preprocess: str
    tta: str
    n_views: int
    merge: str
    per_view: bool
    amp: bool
    mean: tuple
    std: tuple
    on_bad_image: str
    embedding_dim: int = 0  # a retrieval model's: the job outputs embeddings, not probabilities
    embeddings: bool = False  # a classification model's (--embeddings): also its pooled pre-logit features
    batch: int = 32  # images per loader batch: one forward pass of at most forward_batch images


@dataclass
class ModelPlan:
    """One model to predict: a job per (fold, split) with the image paths it covers."""

    model_id: str
    config: dict
    out_dir: Path  # models/<id>/, or predict-smoke/<id>/ under --smoke (Run.predict_dir)
    oof: pd.DataFrame  # oof.parquet (its first rows per fold under --smoke): ids, order, no-TTA scores
    y_true: np.ndarray  # oof's rows, encoded from folds.csv (retrieval: their identity labels)
    fold_ids: dict[int, list[str]] = field(default_factory=dict)  # held-out ids per fold, in job row order
    test_ids: list[str] | None = None
    query_ids: list[str] | None = None  # retrieval
    gallery_ids: list[str] | None = None
    jobs: dict[tuple, Job] = field(default_factory=dict)  # (fold, "oof" | "test") -> job
    paths: dict[tuple, list[str]] = field(default_factory=dict)  # (fold, split) -> absolute image paths


def plan_run(run: Run, *, tta=None, merge="mean", models=None, per_view=False, force=False,
             smoke=False, embeddings=False) -> tuple[list[ModelPlan], dict[str, str]]:
    """Validate the run, views, checkpoints and images; return the models to predict and those skipped (id -> why).

    `embeddings`: classification models also write emb/oof.npy and emb/test.npy. A model that has them
    keeps them: it writes them again whenever it is predicted again, flag or not (never stale files)."""
    run.check()
    configs = run.configs()
    complete = [m for m in configs if run.model_state(m) == "complete"]
    unknown = sorted(set(models or []) - set(complete))
    if unknown:
        raise UserError(f"--models: {unknown} are not complete models of {run.show()}; complete: {complete}.")
    complete = [m for m in complete if not models or m in models]
    if not complete:
        raise UserError(f"{run.show()}: no complete model (one with oof.parquet, written when all its folds are "
                        "trained); finish the sweep first (python -m ensemble.tune ... --resume).")
    folds = read_run_folds(run, configs[complete[0]])
    skipped, todo = {}, []
    for model_id in complete:
        config = configs[model_id]
        spec = tta or config["data"].get("tta") or "orig"
        n_views = views_mod.count_views(spec)  # an unknown view: the registry's UserError
        if config["task"] == "retrieval" and (per_view or merge != "mean"):
            raise UserError(f"{model_id} is a retrieval model: its TTA views' embeddings are averaged, then "
                            "L2-normalised; drop --per-view and --merge.")
        out_dir = run.predict_dir(model_id, smoke)
        emb = config["task"] != "retrieval" and (embeddings or run.exists(out_dir / _emb_files(["oof"])[0]))
        why = None if force or smoke else outputs_done(run, out_dir, config, spec, merge, per_view, emb)
        if not why and emb and not force and not smoke and run.weights_pruned(model_id):
            why = outputs_done(run, out_dir, config, spec, merge, per_view)  # only the embeddings are missing
            why = why and f"{why}; no embeddings: its weights were pruned (python -m ensemble.prune)"
        if why:
            skipped[model_id] = why
            continue
        todo.append((config, out_dir, spec, n_views, emb))
    freed = [config["model_id"] for config, *_ in todo if run.weights_pruned(config["model_id"])]
    if freed:  # before any manifest is read; suggest the models asked for that keep their weights, else all of them
        keep = [m for m in complete if not run.weights_pruned(m)] or \
            [m for m in configs if run.model_state(m) == "complete" and not run.weights_pruned(m)]
        raise _pruned_error(run, freed, keep)
    manifests = {}
    plans = [_plan_model(run, config, folds, out_dir, spec, merge, per_view, n_views, smoke, manifests, emb)
             for config, out_dir, spec, n_views, emb in todo]
    check_checkpoints(run, plans)
    return plans, skipped


def _pruned_error(run: Run, freed: list[str], keep: list[str]) -> UserError:
    """Models whose checkpoints `python -m ensemble.prune` freed: their predictions are kept, never made again."""
    one = len(freed) == 1
    where = run.show(run.model_dir(freed[0]) / "status.json") if one else run.show(run.models_dir)
    names = f"model {freed[0]}" if one else f"models {', '.join(freed)}"
    instead = f"leave {'it' if one else 'them'} out with --models {','.join(keep)}" if keep else \
        "no complete model of this run has its weights any more, so there is nothing left to predict"
    return UserError(f"{where}: the weights of {names} were pruned (python -m ensemble.prune), so "
                     f"{'it' if one else 'they'} cannot be predicted again; {'its' if one else 'their'} predictions "
                     f"so far are kept for stack and report: {instead}.")


def read_run_folds(run: Run, config: dict) -> pd.DataFrame:
    """folds.csv indexed by id, its folds checked against the models' k (the same check as the stack's)."""
    folds = pd.read_csv(run.folds_file, dtype={"id": str}, keep_default_na=False)
    run.check_folds(pd.to_numeric(folds["fold"], errors="coerce"), config["k"])
    return folds.set_index("id")


def _emb_files(sets) -> list[str]:
    """The emb/ files (.npy + .ids.parquet) of these sets."""
    return [name for name in EMB_FILES if name.split("/")[1].split(".")[0] in sets]


def outputs_done(run: Run, model_dir: Path, config: dict, spec: str, merge: str, per_view: bool,
                 embeddings: bool = False) -> str | None:
    """Why a model's outputs can be kept, or None when it must be predicted.

    Complete means predict.json (written last) and every file it vouches for; with
    --per-view, the per-view files too; with --embeddings (classification), emb/ and a
    predict.json that says so. Other views or merge: kept, with a note."""
    needed = ["oof_tta.parquet"] + (["test.parquet"] if config["data"].get("test_manifest") else [])
    if config["task"] == "retrieval":
        sets = ["oof"] + (["query", "gallery"] if config["data"].get("query_manifest") else [])
        needed = _emb_files(sets)
    if per_view:
        needed += ["oof_views.parquet"] + (["test_views.parquet"] if config["data"].get("test_manifest") else [])
    if embeddings and config["task"] != "retrieval":
        needed += _emb_files(["oof"] + (["test"] if config["data"].get("test_manifest") else []))
    # run.exists asks the URI of a URI run: its .npy embeddings are not among the pulled artifacts.
    if not (model_dir / "predict.json").exists() or not all(run.exists(model_dir / name) for name in needed):
        return None
    done = json.loads((model_dir / "predict.json").read_text())
    if embeddings and config["task"] != "retrieval" and not done.get("embeddings"):
        return None
    if (done.get("tta"), done.get("merge")) != (spec, merge):
        return (f"outputs kept from tta {done.get('tta')!r}, merge {done.get('merge')!r} (asked {spec!r}, {merge!r}); "
                "--force redoes them")
    return "outputs complete"


def _plan_model(run: Run, config: dict, folds: pd.DataFrame, out_dir: Path, spec: str, merge: str, per_view: bool,
                n_views: int, smoke: bool, manifests: dict, embeddings: bool = False) -> ModelPlan:
    model_id = config["model_id"]
    oof = pd.read_parquet(run.model_dir(model_id) / "oof.parquet")
    if smoke:
        oof = oof.groupby("fold", sort=False).head(SMOKE_ROWS).reset_index(drop=True)
    missing = oof["id"][~oof["id"].isin(folds.index)]
    if len(missing):
        raise UserError(f"{run.show(run.model_dir(model_id) / 'oof.parquet')}: {len(missing)} id(s) not in "
                        f"folds.csv (first: {missing.head(5).tolist()}); the model was trained on another folds.csv: "
                        "restore the run's own folds.csv.")
    retrieval = config["task"] == "retrieval"
    y_true = folds.loc[oof["id"], config["target"]["column"]].to_numpy() if retrieval else \
        encode_targets(folds.loc[oof["id"]], config["target"], config["classes"])
    plan = ModelPlan(model_id, config, out_dir, oof, y_true)
    train, others = _manifests(config, manifests)
    image_of = train.frame.set_index("id")["image"]
    folds = folds[folds.index.isin(image_of.index)]  # a round's manifest may hold other rows of folds.csv
    all_paths = [str(train.root / p) for p in image_of.loc[folds.index]]  # the sweep's cache holds these
    for split, manifest in others.items():  # test, or query + gallery
        setattr(plan, f"{split}_ids", manifest.ids[: 2 * SMOKE_ROWS if smoke else None].tolist())
    for k in range(config["k"]):
        weights = run.fold_dir(model_id, k) / "weights.pt"
        run.pull(weights)
        if not weights.exists():
            raise UserError(f"{run.show(weights)}: checkpoint missing, so fold {k} of {model_id} cannot be predicted. "
                            "Resume the sweep to train it, or leave the model out with --models.")
        plan.fold_ids[k] = oof["id"][oof["fold"] == k].tolist()
        splits = {"oof": [str(train.root / p) for p in image_of.loc[plan.fold_ids[k]]]}
        for split, manifest in others.items():
            splits[split] = manifest.image_paths[: len(getattr(plan, f"{split}_ids"))]
        preprocess, size = _best_stage(run, config, k)
        for split, paths in splits.items():
            cache, cache_n, cache_rows = None, 0, None
            if config["data"].get("cache", True) and not smoke:
                from ensemble.data.loader import cache_path

                # Held-out rows: the training's cache of all folds.csv images, at their rows there.
                listed = all_paths if split == "oof" else paths
                cache = run.rel(cache_path(run.cache_dir, listed, size, preprocess))
                cache_n = len(listed)
                cache_rows = tuple(folds.index.get_indexer(plan.fold_ids[k]).tolist()) if split == "oof" else None
            plan.jobs[k, split] = _job(config, (model_id, k, split), run, run.rel(weights), cache, cache_n, cache_rows,
                                       preprocess, size, spec, n_views, merge, per_view, embeddings)
            plan.paths[k, split] = paths
    return plan


def _job(config: dict, key: tuple, run: Run, weights: str, cache, cache_n, cache_rows, preprocess: str, size: int,
         spec: str, n_views: int, merge: str, per_view: bool, embeddings: bool = False) -> Job:
    params, data = config["params"], config["data"]
    return Job(key=key, run=run.location, weights=weights, cache=cache, cache_n=cache_n, cache_rows=cache_rows,
               backbone=config["backbone"], n_classes=len(config["classes"]), dropout=params.get("dropout", 0.0),
               drop_path=params.get("drop_path", 0.0), task=config["task"], image_size=size,
               preprocess=preprocess, tta=spec, n_views=n_views, merge=merge, per_view=per_view,
               amp=params.get("amp", True), mean=tuple(data["normalize"]["mean"]), std=tuple(data["normalize"]["std"]),
               on_bad_image=data.get("on_bad_image", "raise"),
               embedding_dim=params["embedding_dim"] if config["task"] == "retrieval" else 0,
               embeddings=embeddings and config["task"] != "retrieval")


def _manifests(config: dict, seen: dict):
    """The training manifest and the others to predict ({"test": ...} or {"query": ..., "gallery": ...}),
    every image checked to exist; read once per run."""
    data = config["data"]
    splits = ("test", "query", "gallery")
    key = (data["manifest"], data["root"], *(data.get(f"{s}_manifest") for s in splits))
    if key not in seen:
        train = read_manifest(data["manifest"], data["root"], target=Target(**config["target"]),
                              classes=config["classes"], check_images="exists")
        # Their image paths are relative to the space's root, as the training images are.
        others = {s: read_manifest(data[f"{s}_manifest"], data["root"], require_target=False, check_images="exists")
                  for s in splits if data.get(f"{s}_manifest")}
        if "query" in others:
            _check_query_gallery(others["query"], others["gallery"])
        seen[key] = (train, others)
    return seen[key]


def _check_query_gallery(query, gallery) -> None:
    """Queries and gallery items are different images: an id in both would find itself."""
    both = sorted(set(query.ids) & set(gallery.ids))
    if both:
        raise UserError(f"{len(both)} id(s) are in both {query.path} and {gallery.path} (first: {both[:5]}); a query "
                        "must not be in the gallery it searches (it would find itself): give them distinct ids, or "
                        "drop the duplicates from one of the two.")


def _best_stage(run: Run, config: dict, fold: int) -> tuple[str, int]:
    """The preprocessing and image size of the stage the fold's best epoch came from (a stage may override
    data.preprocess and the image size)."""
    best = (run.read_metrics(config["model_id"], fold) or {}).get("best_epoch")
    stage = stage_of(config, best - 1)[1] if best else config["stages"][-1]
    return stage.get("preprocess") or config["data"]["preprocess"], stage_size(config, stage)


def build_model(job: Job):
    """The job's architecture with fresh weights (on the current torch device context); retrieval: no head."""
    from ensemble.models import EmbeddingNet, create_model

    if job.embedding_dim:
        return EmbeddingNet(create_model(job.backbone, 0, dropout=job.dropout, drop_path=job.drop_path),
                            job.embedding_dim, 0)
    return create_model(job.backbone, job.n_classes, dropout=job.dropout, drop_path=job.drop_path)


def load_weights(job: Job, path, map_location=None) -> dict:
    """A checkpoint's state_dict as the job's model takes it (a retrieval model's without its training head)."""
    import torch

    from ensemble.models import without_head

    state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    return without_head(state) if job.embedding_dim else state


def check_checkpoints(run: Run, plans: list[ModelPlan]) -> None:
    """Every weights.pt must fit its config (backbone, classes): compared on torch's meta device, no compute."""
    if not plans:
        return
    import torch

    for plan in plans:
        job = plan.jobs[0, "oof"]
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(job).state_dict().items()}
        for k in range(plan.config["k"]):
            path = run.path(plan.jobs[k, "oof"].weights)
            try:
                found = {key: tuple(v.shape) for key, v in load_weights(job, path).items()}
            except Exception as exc:  # noqa: BLE001 - unpickling and zip errors come in many types
                raise UserError(f"{run.show(path)}: not a readable state_dict ({type(exc).__name__}: {exc}); restore "
                                "it or retrain the fold.") from None
            wrong = [f"{key} is {found[key]} in the checkpoint, {shape} in the model" for key, shape in expected.items()
                     if found.get(key, shape) != shape]
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            if wrong or missing or extra:
                details = wrong[:2] + [f"missing keys {missing[:3]}"] * bool(missing) + [f"unexpected keys {extra[:3]}"] * bool(extra)
                raise UserError(
                    f"{run.show(path)}: does not fit {run.rel(run.model_dir(plan.model_id) / 'config.json')} (backbone {job.backbone!r}, "
                    f"{job.n_classes} classes): {'; '.join(details)}. It comes from another space or run (classes or "
                    "backbone differ): restore this model's own weights.pt or retrain it.")


__all__ = ["Job", "ModelPlan", "PREDICT_FILES", "build_model", "check_checkpoints", "outputs_done", "plan_run",
           "read_run_folds"]
