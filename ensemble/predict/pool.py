"""The Predictor actors and the pool that feeds them (the one module of predict that Ray pickles from).

A work item is (job, image list, start, stop). Predictor actors, one per GPU or GPU
fraction (else one per CPU share), take items from `ray.util.ActorPool` and keep the
checkpoint and the data loader they work with resident. All views of a batch go
through the model in one forward pass.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from ensemble.errors import DISK_ERRORS, RunFailed, UserError, disk_error
from ensemble.predict.plan import Job, build_model, load_weights
from ensemble.predict.tta import activate, merge_embeddings, merge_views
from ensemble.run import Run
from ensemble.tune.trial import import_without_wandb

ACTOR_RESTARTS = 2  # per actor; a third death ends the run (PredictFailed, exit 1; rerun to resume)


class PredictFailed(RunFailed):
    """A predictor actor died (e.g. out of memory); finished models are kept and a rerun resumes."""


def resolve_actors(cluster: dict, gpus_per_actor: float | None = None, cpus_per_actor: float | None = None,
                   free: dict | None = None, nodes: list[dict] | None = None) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each) filling a cluster: one per GPU or GPU fraction, else one per CPU share.

    Shares come from the cluster's totals, or per node with `nodes` (each node's resources:
    GPU actors share out the CPUs of the node they run on); with `free` (what is not held
    now) the count is capped to what fits at once, but is at least 1 (it waits for room).
    """
    gpus = cluster.get("GPU", 0)
    gpu = (1.0 if gpus else 0.0) if gpus_per_actor is None else float(gpus_per_actor)
    if gpu < 0 or (gpu > 1 and not gpu.is_integer()):
        raise UserError(f"--gpus-per-actor must be 0 (CPU actors), a fraction in (0, 1] or a whole number. Got {gpu:g} instead.")
    if gpu and not gpus:
        raise UserError(f"--gpus-per-actor {gpu:g}, but the Ray cluster has no GPU ({cluster}); drop it for CPU actors.")

    def fits(res: dict, cpu: float) -> int:  # actors of (cpu, gpu) that fit in `res`
        counts = [math.floor(res.get("CPU", 0) / cpu + 1e-9)] if cpu else []
        return min(counts + [math.floor(res.get("GPU", 0) / gpu + 1e-9)] if gpu else counts)

    nodes = [n for n in nodes or [cluster] if not gpu or n.get("GPU", 0) >= gpu]
    cpu = cpus_per_actor or (1.0 if not gpu else None)
    if cpu is None:  # GPU actors share out the CPUs of their node: the smallest share fits on every GPU node
        cpu = min(math.floor(n.get("CPU", 0) / max(fits(n, 0), 1) * 100) / 100 for n in nodes)
    n = sum(fits(node, cpu) for node in nodes) if cpu > 0 else 0
    if n < 1:
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
        self.runs: dict[str, Run] = {}  # location -> the run in this node's mirror (opened once per actor)

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "cpus": self.cpus,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def _torch(self):
        import cv2
        import torch

        if self.device is None:  # torch is imported on the first item: placing actors stays cheap
            import_without_wandb("ensemble.models")  # timm, for build_model
            if self.cpus is not None:  # threads = this actor's CPU share (None: leave the process's setting)
                torch.set_num_threads(max(1, int(self.cpus)))
                cv2.setNumThreads(max(1, int(self.cpus)))
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch

    def predict(self, job: Job, paths: list[str], start: int, stop: int) -> dict:
        """Rows start..stop of `paths`: "merged" probabilities (retrieval: embeddings), "views" with job.per_view,
        and "emb" with job.embeddings (the pooled pre-logit features, views averaged, L2-normalised)."""
        torch = self._torch()
        from ensemble.data.loader import normalize_batch

        began, loads = time.perf_counter(), self.loads
        model, loader = self._model(job), self._loader(job, paths)
        loader.sampler.rows = range(start, stop)
        chunks, embedded, seen, skipped = [], [], [], []
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=job.amp and self.device.type == "cuda"):
            for x, _, index, bad in loader:
                skipped += bad  # unreadable images under on_bad_image: skip
                if x is None:
                    continue
                n, v = x.shape[:2]  # N x V x 3 x S x S uint8: all views of the batch in one forward pass
                x = normalize_batch(x.to(self.device, non_blocking=True).flatten(0, 1), job.mean, job.std)
                if job.embeddings:  # one forward: the logits are computed from the same features
                    feats = model.forward_features(x)
                    embedded.append(model.forward_head(feats, pre_logits=True).float().view(n, v, -1).cpu().numpy())
                    out = model.forward_head(feats)
                else:
                    out = model.embed(x) if job.embedding_dim else model(x)
                chunks.append(out.float().view(n, v, -1).cpu().numpy())
                seen.append(index.numpy())
        rows = np.concatenate(seen or [np.zeros(0, int)])
        assert np.array_equal(np.sort(np.concatenate([rows, skipped])), np.arange(start, stop)), \
            "the loader lost rows"
        width = job.embedding_dim or job.n_classes
        logits = np.concatenate(chunks) if chunks else np.zeros((0, job.n_views, width), np.float32)
        if job.embedding_dim and not np.isfinite(logits).all():  # NaN stays for unreadable images only
            raise UserError(f"{job.key[0]} fold {job.key[1]}: its weights.pt gives NaN or infinite embeddings (the "
                            "model diverged): retrain it with a lower lr, or leave it out with --models.")
        outputs = {"merged": merge_embeddings(logits) if job.embedding_dim else merge_views(logits, job.task, job.merge)}
        if job.per_view:
            outputs["views"] = activate(logits, job.task)
        if job.embeddings:
            dim = getattr(model, "head_hidden_size", None) or model.num_features  # timm: the pre-logits width
            outputs["emb"] = merge_embeddings(np.concatenate(embedded) if embedded else
                                              np.zeros((0, job.n_views, dim), np.float32))
        out = {"key": job.key, "start": start, "loads": self.loads - loads}
        for name, values in outputs.items():  # rows of skipped images stay NaN: write_outputs fills them
            out[name] = np.full((stop - start, *values.shape[1:]), np.nan, np.float32)
            out[name][rows - start] = values
        out["seconds"] = time.perf_counter() - began
        return out

    def _run(self, job: Job) -> Run:
        if job.run not in self.runs:
            self.runs[job.run] = Run.on_node(job.run)
        return self.runs[job.run]

    def _model(self, job: Job):
        self._torch()  # the device
        run = self._run(job)
        weights = run.path(job.weights)
        arch = (job.backbone, job.n_classes, job.embedding_dim, job.dropout, job.drop_path)
        if self.model is None or self.model[0] != arch:  # built once per architecture; a new fold swaps weights only
            self.model, self.weights = (arch, build_model(job).to(self.device).eval()), None
        if self.weights != weights:
            run.pull(weights)  # a URI run: the URI's version into this node's mirror (one request when current)
            self.model[1].load_state_dict(load_weights(job, weights, map_location=self.device))
            self.weights, self.loads = weights, self.loads + 1
        return self.model[1]

    def _loader(self, job: Job, paths: list[str]):
        """A DataLoader per image list, reused by its shards: its workers persist, only the rows change."""
        torch = self._torch()
        from ensemble.data.loader import DecodedCache, ImageDataset, collate, loader_workers

        cache_file = self._run(job).path(job.cache) if job.cache else None
        key = (tuple(paths), cache_file, job.image_size, job.preprocess, job.tta, job.batch, job.on_bad_image)
        if self.loader is None or self.loader[0] != key:
            cache = DecodedCache(cache_file, job.cache_n, job.image_size) if cache_file else None
            dataset = ImageDataset(paths, None, job.image_size, preprocess=job.preprocess, views=job.tta,
                                   cache=cache, cache_rows=job.cache_rows, on_bad_image=job.on_bad_image)
            # On a CPU the forward pass uses every thread of the actor's share: a decoding worker would only
            # compete with it (1 actor x 2 CPUs, scripts/bench_predict.py: 364 images/s with one, 467-485
            # without). On a GPU, workers decode while it computes.
            cuda = self.device.type == "cuda"
            workers = loader_workers(self.cpus or 1, dataset.batch_bytes(job.batch)) if cuda else 0
            self.loader = key, torch.utils.data.DataLoader(
                dataset, batch_size=job.batch, sampler=_Rows(), num_workers=workers, collate_fn=collate,
                worker_init_fn=_one_thread if workers else None, persistent_workers=workers > 0,
                pin_memory=cuda)
        return self.loader[1]


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

    cv2.setNumThreads(0)  # 0, not 1: 1 hangs in a forked worker (ensemble.data.loader._worker_init)
    torch.set_num_threads(1)


def run_pool(actors: list, items: list, sizes: dict, progress: bool, on_model_done) -> dict:
    """Every item through the pool; `on_model_done(model_id, arrays)` as soon as all of a model's items are back.

    `sizes[(model_id, fold, split)]` is the number of rows of that image list; arrays are keyed
    (fold, split, "merged" | "views"), and "seconds" is the actors' time spent on the model."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    left: dict[str, int] = {}
    for job, *_ in items:
        left[job.key[0]] = left.get(job.key[0], 0) + 1
    results, images, loads, seconds = {}, 0, 0, {}
    pool = ActorPool(actors)
    for item in items:
        pool.submit(lambda actor, it: actor.predict.remote(*it), item)
    # A bar on a terminal; in a log, its carriage returns would only clutter: a line per model is enough there.
    with tqdm(total=sum(e - s for *_, s, e in items), unit="img", disable=not progress or not sys.stderr.isatty(),
              desc="predict") as bar:
        while pool.has_next():
            try:
                res = pool.get_next_unordered()
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, UserError):  # e.g. a corrupt image, named by its path
                    raise UserError(str(cause)) from None
                if isinstance(cause, OSError) and cause.errno in DISK_ERRORS:  # e.g. its decoded cache
                    raise disk_error(cause) from None
                raise
            except ray.exceptions.RayActorError as exc:
                raise PredictFailed(f"a predictor actor died more than {ACTOR_RESTARTS} times ({exc}); the models "
                                    "written so far are complete: rerun the same command to predict the rest.") from None
            model_id, fold, split = res["key"]
            for name in [name for name in ("merged", "views", "emb") if name in res]:
                arr = results.setdefault((model_id, fold, split, name),
                                         np.empty((sizes[res["key"]], *res[name].shape[1:]), np.float32))
                arr[res["start"]: res["start"] + len(res[name])] = res[name]
            loads += res["loads"]
            seconds[model_id] = seconds.get(model_id, 0.0) + res["seconds"]
            bar.update(len(res["merged"]))
            images += len(res["merged"])
            left[model_id] -= 1
            if not left[model_id]:
                mine = {k[1:]: results.pop(k) for k in [k for k in results if k[0] == model_id]}
                mine["seconds"] = seconds.pop(model_id)  # the actors' time on this model, summed
                bar.write(on_model_done(model_id, mine))
    return {"images": images, "loads": loads}
