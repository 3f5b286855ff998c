"""TTA inference on a Ray actor pool: `python -m ensemble.predict --run runs/NAME`.

For every complete model of a run (one with oof.parquet) it writes, atomically:

  models/<model_id>/oof_tta.parquet   oof.parquet's ids, order and columns; each held-out row
                                      predicted with TTA by its own fold's model
  models/<model_id>/test.parquet      id + classes: the mean of the k fold models' TTA
                                      predictions, in the test manifest's order
  models/<model_id>/predict.json      the views and merge rule used (+ *_views.parquet with --per-view)

A work item is (fold checkpoint, shard of images). Predictor actors, one per GPU
or GPU fraction (else one per CPU share), take items from `ray.util.ActorPool`
and keep the checkpoint they work with resident. All views of a batch go through
the model in one forward pass of at most `forward_batch` images. Each model's
outputs are computed fully in memory, then written; models whose outputs exist
are skipped, so an interrupted run resumes. docs/predict.md is the manual.

`--run` may be a URI (`ensemble.storage`): the run's configs, OOF files and best
weights are pulled into this node's mirror, an actor on another node pulls the
weights it needs into its own, and the outputs are pushed back.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble import views as views_mod
from ensemble.artifacts import read_metrics, stage_of
from ensemble.data import Target, encode_targets, read_manifest
from ensemble.errors import RunFailed, UserError, cli_main
from ensemble.io import write_csv, write_json, write_parquet
from ensemble.storage import ARTIFACTS, RunStore, open_run

MERGES = ("mean", "gmean", "logits")
OUTPUT_FILES = ("oof_tta.parquet", "test.parquet", "oof_views.parquet", "test_views.parquet", "predict.json",
                "submission.csv")
CPU_FORWARD_BATCH = 32  # ENV.md: 32-64 images per forward is this CPU's sweet spot; bigger batches are slower
ACTOR_RESTARTS = 2  # per actor; a third death ends the run (PredictFailed, exit 1; rerun to resume)
SMOKE_ROWS = 16  # --smoke: held-out rows per fold, and twice as many test rows


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.predict", description=__doc__.splitlines()[0])
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
                submission=args.submission, threshold=args.threshold)
    return 0


class PredictFailed(RunFailed):
    """A predictor actor died (e.g. out of memory); finished models are kept and a rerun resumes."""


# --------------------------------------------------------------------------- plan: what to predict


@dataclass
class ModelPlan:
    """One model to predict: a job per (fold, split) with the image paths it covers."""

    model_id: str
    config: dict
    out_dir: Path
    oof: pd.DataFrame  # oof.parquet (its first rows per fold under --smoke): ids, order, no-TTA scores
    y_true: np.ndarray  # oof's rows, encoded from folds.csv
    fold_ids: dict[int, list[str]] = field(default_factory=dict)  # held-out ids per fold, in job row order
    test_ids: list[str] | None = None
    jobs: dict[tuple, dict] = field(default_factory=dict)  # (fold, "oof" | "test") -> job
    paths: dict[tuple, list[str]] = field(default_factory=dict)  # (fold, split) -> image paths


def plan_run(run_dir, *, tta=None, merge="mean", models=None, per_view=False, force=False,
             smoke=False, store=None) -> tuple[list[ModelPlan], dict[str, str]]:
    """Validate the run, views, checkpoints and images; return the models to predict and those skipped (id -> why).

    `store`: the run is at a URI and `run_dir` its scratch copy; the weights to check are pulled here."""
    run_dir = Path(run_dir)
    if not (run_dir / "folds.csv").exists() or not (run_dir / "models").is_dir():
        raise UserError(f"{run_dir}: not a run directory (needs folds.csv and models/); pass the directory the sweep wrote.")
    configs = {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "models").glob("*/config.json"))}
    complete = [m for m in configs if (run_dir / "models" / m / "oof.parquet").exists()]
    unknown = sorted(set(models or []) - set(complete))
    if unknown:
        raise UserError(f"--models: {unknown} are not complete models of {run_dir}; complete: {complete}.")
    complete = [m for m in complete if not models or m in models]
    if not complete:
        raise UserError(f"{run_dir}: no complete model (one with oof.parquet, written when all its folds are trained); "
                        "finish the sweep first (python -m ensemble.tune ... --resume).")
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"id": str}).set_index("id")
    out_root = run_dir / ("predict-smoke" if smoke else "models")
    plans, skipped, manifests = [], {}, {}
    for model_id in complete:
        config = configs[model_id]
        spec = tta or config["data"].get("tta") or "orig"
        n_views = views_mod.count_views(spec)  # an unknown view: the registry's UserError
        why = None if force or smoke else _done(out_root / model_id, config, spec, merge)
        if why:
            skipped[model_id] = why
            continue
        oof = pd.read_parquet(run_dir / "models" / model_id / "oof.parquet")
        if smoke:
            oof = oof.groupby("fold", sort=False).head(SMOKE_ROWS).reset_index(drop=True)
        plan = ModelPlan(model_id, config, out_root / model_id, oof,
                         encode_targets(folds.loc[oof["id"]], config["target"], config["classes"]))
        base = _base_job(config, spec, merge, per_view, n_views)
        train, test = _manifests(config, manifests)
        image_of = train.frame.set_index("id")["image"]
        all_paths = [str(train.root / p) for p in image_of.loc[folds.index]]  # the sweep's cache holds these
        for k in range(config["k"]):
            weights = run_dir / "models" / model_id / f"fold{k}" / "weights.pt"
            if store:
                store.pull(weights.relative_to(run_dir).as_posix())
            if not weights.exists():
                raise UserError(f"{weights}: checkpoint missing, so fold {k} of {model_id} cannot be predicted. "
                                "Resume the sweep to train it, or leave the model out with --models.")
            plan.fold_ids[k] = oof["id"][oof["fold"] == k].tolist()
            splits = {"oof": [str(train.root / p) for p in image_of.loc[plan.fold_ids[k]]]}
            if test is not None:
                plan.test_ids = test.ids[: 2 * SMOKE_ROWS if smoke else None].tolist()
                splits["test"] = test.image_paths[: len(plan.test_ids)]
            preprocess = _preprocess(run_dir, config, k)
            for split, paths in splits.items():
                cache = {"cache": None, "cache_n": 0, "cache_rows": None}
                if config["data"].get("cache", True) and not smoke:
                    from ensemble.loader import cache_path

                    # Held-out rows: the training's cache of all folds.csv images, at their rows there.
                    listed = all_paths if split == "oof" else paths
                    cache = {"cache": str(cache_path(run_dir / "cache", listed, config["params"]["image_size"], preprocess)),
                             "cache_n": len(listed),
                             "cache_rows": folds.index.get_indexer(plan.fold_ids[k]).tolist() if split == "oof" else None}
                plan.jobs[k, split] = dict(base, key=(model_id, k, split), weights=str(weights), preprocess=preprocess,
                                           **cache)
                plan.paths[k, split] = paths
        plans.append(plan)
    check_checkpoints(plans)
    return plans, skipped


def _done(out_dir: Path, config: dict, spec: str, merge: str) -> str | None:
    """Why a model's outputs can be kept (they exist), or None when it must be predicted."""
    needed = ["oof_tta.parquet"] + (["test.parquet"] if config["data"].get("test_manifest") else [])
    if not all((out_dir / name).exists() for name in needed):
        return None
    done = json.loads((out_dir / "predict.json").read_text()) if (out_dir / "predict.json").exists() else {}
    if done and (done["tta"], done["merge"]) != (spec, merge):
        return f"outputs kept from tta {done['tta']!r}, merge {done['merge']!r} (asked {spec!r}, {merge!r}); --force redoes them"
    return "outputs complete"


def _base_job(config: dict, spec: str, merge: str, per_view: bool, n_views: int) -> dict:
    """What a predictor needs besides the checkpoint and the images: plain values, cheap to ship."""
    params, data = config["params"], config["data"]
    return {"backbone": config["backbone"], "n_classes": len(config["classes"]), "dropout": params.get("dropout", 0.0),
            "drop_path": params.get("drop_path", 0.0), "task": config["task"], "image_size": params["image_size"],
            "tta": spec, "n_views": n_views, "merge": merge, "per_view": per_view, "amp": params.get("amp", True),
            "mean": data["normalize"]["mean"], "std": data["normalize"]["std"],
            "on_bad_image": data.get("on_bad_image", "raise")}


def _manifests(config: dict, seen: dict):
    """The training and test manifests, every image checked to exist; read once per run."""
    data = config["data"]
    key = (data["manifest"], data["root"], data.get("test_manifest"))
    if key not in seen:
        train = read_manifest(data["manifest"], data["root"], target=Target(**config["target"]),
                              classes=config["classes"], check_images="exists")
        # Test image paths are relative to the space's root, as the training images are.
        test = read_manifest(data["test_manifest"], data["root"], require_target=False,
                             check_images="exists") if data.get("test_manifest") else None
        seen[key] = (train, test)
    return seen[key]


def _preprocess(run_dir: Path, config: dict, fold: int) -> str:
    """The preprocessing of the stage the fold's best epoch came from (a stage may override data.preprocess)."""
    best = (read_metrics(run_dir, config["model_id"], fold) or {}).get("best_epoch")
    stage = stage_of(config, best - 1)[1] if best else config["stages"][-1]
    return stage.get("preprocess") or config["data"]["preprocess"]


def check_checkpoints(plans: list[ModelPlan]) -> None:
    """Every weights.pt must fit its config (backbone, classes): compared on torch's meta device, no compute."""
    if not plans:
        return
    import torch

    from ensemble.models import create_model

    for plan in plans:
        job = plan.jobs[0, "oof"]
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in _build(create_model, job).state_dict().items()}
        for k in range(plan.config["k"]):
            path = plan.jobs[k, "oof"]["weights"]
            try:
                found = {key: tuple(v.shape) for key, v in torch.load(path, weights_only=True, mmap=True).items()}
            except Exception as exc:  # noqa: BLE001 - unpickling and zip errors come in many types
                raise UserError(f"{path}: not a readable state_dict ({type(exc).__name__}: {exc}); restore it or "
                                "retrain the fold.") from None
            wrong = [f"{key} is {found[key]} in the checkpoint, {shape} in the model" for key, shape in expected.items()
                     if found.get(key, shape) != shape]
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            if wrong or missing or extra:
                details = wrong[:2] + [f"missing keys {missing[:3]}"] * bool(missing) + [f"unexpected keys {extra[:3]}"] * bool(extra)
                raise UserError(
                    f"{path}: does not fit models/{plan.model_id}/config.json (backbone {job['backbone']!r}, "
                    f"{job['n_classes']} classes): {'; '.join(details)}. It comes from another space or run (classes or "
                    "backbone differ): restore this model's own weights.pt or retrain it.")


def _build(create_model, job: dict):
    return create_model(job["backbone"], job["n_classes"], dropout=job["dropout"], drop_path=job["drop_path"])


# --------------------------------------------------------------------------- the actor pool


def resolve_actors(cluster: dict, gpus_per_actor: float | None = None, cpus_per_actor: float | None = None,
                   free: dict | None = None) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each) filling a cluster: one per GPU or GPU fraction, else one per CPU share.

    Shares come from the cluster's totals; with `free` (what is not held now) the count is
    capped to what fits at once, but is at least 1 (it waits for room).
    """
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    gpu = (1.0 if gpus else 0.0) if gpus_per_actor is None else float(gpus_per_actor)
    if gpu < 0 or (gpu > 1 and not gpu.is_integer()):
        raise UserError(f"--gpus-per-actor must be 0 (CPU actors), a fraction in (0, 1] or a whole number. Got {gpu:g} instead.")
    if gpu and not gpus:
        raise UserError(f"--gpus-per-actor {gpu:g}, but the Ray cluster has no GPU ({cluster}); drop it for CPU actors.")

    def fits(res: dict, cpu: float) -> int:  # actors of (cpu, gpu) that fit in `res`
        counts = [math.floor(res.get("CPU", 0) / cpu + 1e-9)] if cpu else []
        return min(counts + [math.floor(res.get("GPU", 0) / gpu + 1e-9)] if gpu else counts)

    cpu = cpus_per_actor or (1.0 if not gpu else None)
    if cpu is None:  # GPU actors share the CPUs out
        cpu = math.floor(cpus / max(fits(cluster, 0), 1) * 100) / 100
    n = fits(cluster, cpu)
    if n < 1 or cpu <= 0:
        raise UserError(f"an actor needs {cpu:g} CPU and {gpu:g} GPU, more than the Ray cluster has ({cluster}); "
                        "lower --cpus-per-actor / --gpus-per-actor.")
    return (max(1, min(n, fits(free, cpu))) if free is not None else n), cpu, gpu


def create_pool(n: int, cpus: float, gpus: float, timeout: float = 120.0) -> tuple[list, list[dict]]:
    """Start `n` Predictor actors and wait until every one is placed; returns (actors, their info())."""
    import ray

    # DEFAULT scheduling: never captured by a caller's placement group (e.g. a Tune trial's).
    # An actor that dies (a killed process, a lost node) is restarted by Ray and its work item retried:
    # predict() is a pure function of its arguments, and the model reloads on the next item.
    remote = ray.remote(Predictor).options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy="DEFAULT",
                                           max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    actors = [remote.remote(cpus) for _ in range(n)]
    refs = [a.info.remote() for a in actors]
    _, pending = ray.wait(refs, num_returns=n, timeout=timeout)
    if pending:
        for a in actors:
            ray.kill(a)
        raise UserError(f"only {n - len(pending)} of {n} predictor actors ({cpus:g} CPU, {gpus:g} GPU each) were placed "
                        f"within {timeout:g} s: the cluster is busy; retry, or lower --cpus-per-actor.")
    return actors, ray.get(refs)


class Predictor:
    """Predicts shards of images with TTA, keeping the last model and data loader resident. A Ray actor, or plain."""

    def __init__(self, cpus: float | None = 1.0):
        self.cpus, self.model, self.weights, self.loader, self.loads, self.device = cpus, None, None, None, 0, None

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "cpus": self.cpus,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def _torch(self):
        import cv2
        import torch

        if self.device is None:  # torch is imported on the first item: placing actors stays cheap
            if self.cpus is not None:  # threads = this actor's CPU share (None: leave the process's setting)
                torch.set_num_threads(max(1, int(self.cpus)))
                cv2.setNumThreads(max(1, int(self.cpus)))
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch

    def predict(self, job: dict, paths: list[str], start: int, stop: int) -> dict:
        """Rows start..stop of `paths`: merged probabilities (and each view's with job['per_view'])."""
        torch = self._torch()
        from ensemble.loader import normalize_batch

        began, loads = time.perf_counter(), self.loads
        job = self._localize(job) if job.get("storage") else job
        model, loader = self._model(job), self._loader(job, paths)
        loader.sampler.rows = range(start, stop)
        chunks, seen, skipped = [], [], []
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=job["amp"] and self.device.type == "cuda"):
            for x, _, index, bad in loader:
                skipped += bad  # unreadable images under on_bad_image: skip
                if x is None:
                    continue
                n, v = x.shape[:2]  # N x V x 3 x S x S uint8: all views of the batch in one forward pass
                x = normalize_batch(x.to(self.device, non_blocking=True).flatten(0, 1), job["mean"], job["std"])
                chunks.append(model(x).float().view(n, v, -1).cpu().numpy())
                seen.append(index.numpy())
        rows = np.concatenate(seen or [np.zeros(0, int)])
        assert np.array_equal(np.sort(np.concatenate([rows, skipped])), np.arange(start, stop)), \
            "the loader lost rows"
        logits = np.concatenate(chunks) if chunks else np.zeros((0, job["n_views"], job["n_classes"]), np.float32)
        outputs = {"proba": merge_views(logits, job["task"], job["merge"])}
        if job["per_view"]:
            outputs["views"] = activate(logits, job["task"])
        out = {"key": job["key"], "start": start, "loads": self.loads - loads}
        for name, values in outputs.items():  # rows of skipped images stay NaN: write_outputs fills them
            out[name] = np.full((stop - start, *values.shape[1:]), np.nan, np.float32)
            out[name][rows - start] = values
        out["seconds"] = time.perf_counter() - began
        return out

    def _localize(self, job: dict) -> dict:
        """A job of a run at a URI: its paths in this node's mirror, the weights pulled there when not loaded."""
        store = _node_store(job["storage"])
        weights = str(store.local / job["weights"])
        if self.weights != weights:  # the URI's version (one metadata request when the copy is current)
            store.pull(job["weights"])
        return dict(job, weights=weights, cache=job["cache"] and str(store.local / job["cache"]), storage=None)

    def _model(self, job: dict):
        torch = self._torch()
        arch = (job["backbone"], job["n_classes"], job["dropout"], job["drop_path"])
        if self.model is None or self.model[0] != arch:  # built once per architecture; a new fold swaps weights only
            from ensemble.models import create_model

            self.model, self.weights = (arch, _build(create_model, job).to(self.device).eval()), None
        if self.weights != job["weights"]:
            self.model[1].load_state_dict(torch.load(job["weights"], map_location=self.device, weights_only=True))
            self.weights, self.loads = job["weights"], self.loads + 1
        return self.model[1]

    def _loader(self, job: dict, paths: list[str]):
        """A DataLoader per image list, reused by its shards: its workers persist, only the rows change."""
        torch = self._torch()
        from ensemble.loader import DecodedCache, ImageDataset, collate, loader_workers

        key = (tuple(paths), job["cache"], job["image_size"], job["preprocess"], job["tta"], job["batch"],
               job["on_bad_image"])
        if self.loader is None or self.loader[0] != key:
            cache = DecodedCache(job["cache"], job["cache_n"], job["image_size"]) if job["cache"] else None
            dataset = ImageDataset(paths, None, job["image_size"], preprocess=job["preprocess"], views=job["tta"],
                                   cache=cache, cache_rows=job["cache_rows"], on_bad_image=job["on_bad_image"])
            # On a CPU the forward pass uses every thread of the actor's share: a decoding worker would only
            # compete with it (1 actor x 2 CPUs, scripts/bench_predict.py: 364 images/s with one, 467-485
            # without). On a GPU, workers decode while it computes.
            workers = loader_workers(self.cpus or 1) if self.device.type == "cuda" else 0
            self.loader = key, torch.utils.data.DataLoader(
                dataset, batch_size=job["batch"], sampler=_Rows(), num_workers=workers, collate_fn=collate,
                worker_init_fn=_one_thread if workers else None, persistent_workers=workers > 0,
                pin_memory=self.device.type == "cuda")
        return self.loader[1]


@functools.lru_cache(maxsize=8)
def _node_store(uri: str) -> RunStore:
    """One RunStore per URI per actor process: opening the file system (an S3 region lookup, say)
    is not repeated for every shard."""
    return RunStore(uri)


class _Rows:
    """A sampler whose rows are set per shard: the DataLoader reads it anew on every pass."""

    rows = range(0)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def _one_thread(_):
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- merging views


def view_names(spec: str) -> list[str]:
    """A name per view image: the chain, plus #i for each image of an expanding op ('fivecrop#0' ...)."""
    names = []
    for chain in views_mod.parse_views(spec):
        n = views_mod.count_views(chain)
        names += [chain] if n == 1 else [f"{chain}#{i}" for i in range(n)]
    return names


def activate(logits: np.ndarray, task: str) -> np.ndarray:
    """Softmax over the last axis (multiclass) or a sigmoid per label (multilabel), in float64."""
    from scipy import special

    z = np.asarray(logits, dtype=np.float64)
    return special.softmax(z, axis=-1) if task == "multiclass" else special.expit(z)


def merge_views(logits: np.ndarray, task: str, how: str = "mean") -> np.ndarray:
    """N x V x C logits -> N x C probabilities.

    mean: the views' probabilities averaged. gmean: their geometric mean, rows
    renormalised to sum to 1 for multiclass (where it equals `logits`: log-softmax
    is the logits minus a per-row constant). logits: the activation of the mean logits.
    """
    from scipy import special

    z = np.asarray(logits, dtype=np.float64)
    if how == "mean":
        return activate(z, task).mean(axis=1)
    if how == "logits":
        return activate(z.mean(axis=1), task)
    if how == "gmean":
        p = np.exp((special.log_softmax(z, axis=-1) if task == "multiclass" else special.log_expit(z)).mean(axis=1))
        return p / p.sum(axis=-1, keepdims=True) if task == "multiclass" else p
    raise UserError(f"The 'merge' parameter must be one of {list(MERGES)}. Got {how!r} instead.")


# --------------------------------------------------------------------------- run: pool -> merge -> write


def predict_run(run, *, tta=None, merge="mean", gpus_per_actor=None, cpus_per_actor=None, forward_batch=None,
                shard_size=512, models=None, per_view=False, force=False, smoke=False, address=None,
                progress=True, actors=None, submission=False, threshold=0.5) -> dict:
    """Predict every complete model of a run (a directory or a URI; see the module docstring).

    Everything is validated before Ray starts. `actors`: Predictor actors from `create_pool`
    to use (and leave running); default: a pool made for this call, filling the cluster.
    `submission`: also write each model's submission.csv. Returns a summary dict.
    """
    if merge not in MERGES:
        raise UserError(f"The 'merge' parameter must be one of {list(MERGES)}. Got {merge!r} instead.")
    if tta is not None and views_mod.count_views(tta) == 5 and "fivecrop" in tta and "hflip" in tta:
        print("note: 'fivecrop+hflip' is the 5 flipped crops; the 10-view set is 'fivecrop,fivecrop+hflip'.")
    with open_run(run) as (run_dir, store):
        if store:
            store.pull(only=ARTIFACTS)  # plan_run pulls the weights of the models it will predict
        plans, skipped = plan_run(run_dir, tta=tta, merge=merge, models=models, per_view=per_view, force=force,
                                  smoke=smoke, store=store)
        for model_id, why in skipped.items():
            print(f"skipped {model_id}: {why}")
        out = Path(run_dir) / ("predict-smoke" if smoke else "models")
        summary = {"out": out, "skipped": skipped, "scores": {}, "models": [p.model_id for p in plans] + list(skipped),
                   "predicted": [p.model_id for p in plans]}

        def written(model_id: str) -> None:  # with URI storage, each model's outputs go up as soon as written
            if store:
                store.push(*(f"{out.relative_to(run_dir).as_posix()}/{model_id}/{name}" for name in OUTPUT_FILES))

        if plans:
            summary.update(_predict(plans, run_dir, store, gpus_per_actor, cpus_per_actor, forward_batch,
                                    shard_size, address, progress, actors, written))
        for model_id in summary["models"] if submission else []:
            print(f"wrote {write_submission(run_dir, model_id, out / model_id, threshold)}")
            written(model_id)
        return summary


def _predict(plans, run_dir, store, gpus_per_actor, cpus_per_actor, forward_batch, shard_size, address, progress,
             actors, written) -> dict:
    """The models' shards through a pool of Predictor actors; each model's outputs written as it completes."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # As the sweep: a fresh local cluster unless --address or RAY_ADDRESS says otherwise.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=False)
    n, cpus, gpus = resolve_actors(ray.cluster_resources(), gpus_per_actor, cpus_per_actor, ray.available_resources())
    n = len(actors) if actors else n
    # Small enough shards that every actor gets ~8 (no actor is left alone with a long tail), but <= shard_size.
    total = sum(len(paths) for plan in plans for paths in plan.paths.values())
    shard_size = min(shard_size, max(CPU_FORWARD_BATCH, math.ceil(total / (8 * n))))
    items, refs = [], {}
    for plan in plans:  # checkpoint-major: an actor keeps the model it has loaded for the following shards
        cap = forward_batch or (max(64, 2 * plan.config["params"]["batch_size"]) if gpus else CPU_FORWARD_BATCH)
        for key, job in plan.jobs.items():
            paths = plan.paths[key]
            job["batch"] = max(1, cap // job["n_views"])  # images per loader batch: one forward of <= cap images
            if store:  # an actor resolves these in its node's mirror of the run
                job.update(storage=store.uri, weights=Path(job["weights"]).relative_to(run_dir).as_posix(),
                           cache=job["cache"] and Path(job["cache"]).relative_to(run_dir).as_posix())
            elif job["cache"]:  # created here, once, so that actors never race to create the same file
                from ensemble.loader import DecodedCache

                DecodedCache(job["cache"], job["cache_n"], job["image_size"])
            list_key = tuple(paths)
            if list_key not in refs:
                refs[list_key] = ray.put(paths)  # each image list is shipped once
            step = max(1, shard_size // job["batch"]) * job["batch"]  # whole batches: no small forward mid-list
            items += [(job, refs[list_key], s, min(s + step, len(paths))) for s in range(0, len(paths), step)]
    began = time.perf_counter()
    own = actors is None
    actors = create_pool(min(n, len(items)), cpus, gpus)[0] if own else actors
    try:
        summary = dict(_run_pool(actors, items, plans, progress, written), actors=len(actors), cpus=cpus, gpus=gpus)
    finally:
        for a in actors if own else []:
            ray.kill(a)
    summary["seconds"] = seconds = time.perf_counter() - began
    print(f"predicted {len(plans)} model(s): {summary['images']} images in {seconds:.1f} s ({summary['images'] / seconds:.0f}"
          f" images/s, actor start included) on {len(actors)} actor(s) of {cpus:g} CPU / {gpus:g} GPU; "
          f"{summary['loads']} checkpoint loads")
    return summary


def _run_pool(actors: list, items: list, plans: list[ModelPlan], progress: bool, written=None) -> dict:
    """Every shard through the pool; each model is written as soon as all its shards are back."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    plan_of = {p.model_id: p for p in plans}
    left = {p.model_id: sum(1 for job, *_ in items if job["key"][0] == p.model_id) for p in plans}
    results, scores, images, loads = {}, {}, 0, 0
    pool = ActorPool(actors)
    for item in items:
        pool.submit(lambda actor, it: actor.predict.remote(*it), item)
    with tqdm(total=sum(e - s for *_, s, e in items), unit="img", disable=not progress, desc="predict") as bar:
        while pool.has_next():
            try:
                res = pool.get_next_unordered()
            except ray.exceptions.RayTaskError as exc:
                if isinstance(getattr(exc, "cause", None), UserError):  # e.g. a corrupt image, named by its path
                    raise UserError(str(exc.cause)) from None
                raise
            except ray.exceptions.RayActorError as exc:
                raise PredictFailed(f"a predictor actor died more than {ACTOR_RESTARTS} times ({exc}); the models "
                                    "written so far are complete: rerun the same command to predict the rest.") from None
            model_id, fold, split = res["key"]
            for name in ("proba", "views") if "views" in res else ("proba",):
                rows = len(plan_of[model_id].paths[fold, split])
                arr = results.setdefault((model_id, fold, split, name), np.empty((rows, *res[name].shape[1:]), np.float32))
                arr[res["start"]: res["start"] + len(res[name])] = res[name]
            loads += res["loads"]
            bar.update(len(res["proba"]))
            images += len(res["proba"])
            left[model_id] -= 1
            if not left[model_id]:
                mine = {k[1:]: results.pop(k) for k in [k for k in results if k[0] == model_id]}
                scores[model_id] = write_outputs(plan_of[model_id], mine)
                if written:
                    written(model_id)
                bar.write(f"{model_id}: " + ", ".join(f"{k} {v:.5f}" for k, v in scores[model_id].items()))
    return {"images": images, "loads": loads, "scores": scores}


def write_outputs(plan: ModelPlan, results: dict) -> dict[str, float]:
    """Write one model's files, each atomically; return OOF scores (without TTA, with it, per view)."""
    from ensemble.metrics import METRICS

    config, classes, k = plan.config, plan.config["classes"], plan.config["k"]
    order = pd.Index([i for f in range(k) for i in plan.fold_ids[f]]).get_indexer(plan.oof["id"])
    oof_tta = plan.oof[["id", "fold"]].copy()
    # Unreadable images (on_bad_image: skip) came back NaN: a held-out row keeps its training-time OOF
    # value (itself the prior for an image that never decoded), a test row gets the model's mean OOF.
    proba = np.concatenate([results[f, "oof", "proba"] for f in range(k)])[order]
    unreadable = {"oof": int(np.isnan(proba).any(1).sum())}
    oof_tta[classes] = np.where(np.isnan(proba), plan.oof[classes].to_numpy(), proba)
    files = {"oof_tta.parquet": oof_tta}
    if plan.test_ids is not None:  # the mean of the k fold models
        mean = np.mean([results[f, "test", "proba"] for f in range(k)], axis=0, dtype=np.float64)
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
    names = view_names(job["tta"])
    if job["per_view"]:
        per_view = np.concatenate([results[f, "oof", "views"] for f in range(k)])[order]  # rows x V x C
        per_view = np.where(np.isnan(per_view), oof_tta[classes].to_numpy()[:, None], per_view)
        scores.update({f"view {name}": metric(plan.y_true, per_view[:, v], task) for v, name in enumerate(names)})
        files["oof_views.parquet"] = _long(oof_tta[["id", "fold"]], per_view, names, classes)
        if plan.test_ids is not None:
            mean = np.mean([results[f, "test", "views"] for f in range(k)], axis=0, dtype=np.float64)
            mean = np.where(np.isnan(mean), test.to_numpy()[:, None], mean)
            files["test_views.parquet"] = _long(pd.DataFrame({"id": plan.test_ids}), mean.astype(np.float32), names, classes)
    for name, frame in files.items():
        write_parquet(frame, plan.out_dir / name)
    write_json({"tta": job["tta"], "views": names, "merge": job["merge"], "forward_batch": job["batch"] * len(names),
                "scores": scores, "unreadable": unreadable}, plan.out_dir / "predict.json")
    return scores


def _long(keys: pd.DataFrame, per_view: np.ndarray, names: list[str], classes: list[str]) -> pd.DataFrame:
    """Rows x V x C probabilities as one row per (row, view): the key columns, view, classes."""
    frame = keys.loc[keys.index.repeat(len(names))].reset_index(drop=True)
    frame["view"] = np.tile(names, len(keys))
    frame[classes] = per_view.reshape(-1, len(classes))
    return frame


def write_submission(run_dir, model_id: str, out_dir=None, threshold: float = 0.5) -> Path:
    """A Kaggle-style CSV of one model's test.parquet: id + class probabilities, or space-separated tags (multilabel)."""
    config = json.loads((Path(run_dir) / "models" / model_id / "config.json").read_text())
    out_dir = Path(out_dir or Path(run_dir) / "models" / model_id)
    if not (out_dir / "test.parquet").exists():
        raise UserError(f"{out_dir / 'test.parquet'} missing: the space has no test_manifest, or predict has not run.")
    test = pd.read_parquet(out_dir / "test.parquet")
    if config["task"] == "multilabel":
        classes = np.array(config["classes"])
        p = test[list(classes)].to_numpy()
        hit = p >= threshold
        hit[np.arange(len(p)), p.argmax(1)] |= ~hit.any(1)  # never an empty row: at least the likeliest tag
        test = pd.DataFrame({"id": test["id"], config["target"]["column"]: [" ".join(classes[h]) for h in hit]})
    write_csv(test, out_dir / "submission.csv")
    return out_dir / "submission.csv"


if __name__ == "__main__":
    sys.exit(main())
