"""predict_run: plan -> actor pool -> each model's outputs written as soon as its shards are back."""

from __future__ import annotations

import math
import time

from ensemble.cluster import start_ray
from ensemble.data import views as views_mod
from ensemble.predict.outputs import push_outputs, write_embeddings, write_outputs, write_submission
from ensemble.predict.plan import ModelPlan, plan_run
from ensemble.predict.pool import create_pool, resolve_actors, run_pool
from ensemble.predict.tta import check_merge
from ensemble.run import Run, locked, open_run

CPU_FORWARD_BATCH = 32  # ENV.md: 32-64 images per forward is this CPU's sweet spot; bigger batches are slower


def predict_run(location, *, tta=None, merge="mean", gpus_per_actor=None, cpus_per_actor=None, forward_batch=None,
                shard_size=512, models=None, per_view=False, force=False, smoke=False, address=None,
                progress=True, actors=None, submission=False, threshold=0.5, embeddings=False,
                command: str = "python -m ensemble.predict") -> dict:
    """Predict every complete model of a run (a directory or a URI; see ensemble.predict).

    Everything is validated before Ray starts. `actors`: Predictor actors from `create_pool`
    to use (and leave running); default: a pool made for this call, filling the cluster.
    `submission`: also write each model's submission.csv. `embeddings`: classification models also
    write emb/oof.npy and emb/test.npy (ensemble.predict.outputs). Returns a summary dict.
    """
    check_merge(merge)
    if tta is not None and views_mod.count_views(tta) == 5 and "fivecrop" in tta and "hflip" in tta:
        print("note: 'fivecrop+hflip' is the 5 flipped crops; the 10-view set is 'fivecrop,fivecrop+hflip'.")
    with open_run(location) as run:
        if not run.store:
            run.check()  # not a run: said before anything is created
        run.check_writable()
        with locked(run, command):
            run.pull_artifacts()  # plan_run pulls the weights of the models it will predict
            plans, skipped = plan_run(run, tta=tta, merge=merge, models=models, per_view=per_view, force=force,
                                      smoke=smoke, embeddings=embeddings)
            for model_id, why in skipped.items():
                print(f"skipped {model_id}: {why}")
            summary = {"skipped": skipped, "scores": {}, "models": [p.model_id for p in plans] + list(skipped),
                       "predicted": [p.model_id for p in plans]}
            if plans:
                summary.update(_predict(run, plans, gpus_per_actor, cpus_per_actor, forward_batch, shard_size,
                                        address, progress, actors))
            for model_id in summary["models"] if submission else []:
                out_dir = run.predict_dir(model_id, smoke)
                print(f"wrote {run.show(write_submission(run, model_id, out_dir, threshold))}")
                push_outputs(run, out_dir)
            return summary


def _predict(run: Run, plans: list[ModelPlan], gpus_per_actor, cpus_per_actor, forward_batch, shard_size, address,
             progress, actors) -> dict:
    """The models' shards through a pool of Predictor actors; each model's outputs written as it completes."""
    import dataclasses

    import ray

    start_ray(address, verbose=1)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    n, cpus, gpus = resolve_actors(ray.cluster_resources(), gpus_per_actor, cpus_per_actor, ray.available_resources(),
                                   nodes)
    n = len(actors) if actors else n
    # Small enough shards that every actor gets ~8 (no actor is left alone with a long tail), but <= shard_size.
    total = sum(len(paths) for plan in plans for paths in plan.paths.values())
    shard_size = min(shard_size, max(CPU_FORWARD_BATCH, math.ceil(total / (8 * n))))
    items, refs, sizes = [], {}, {}
    for plan in plans:  # checkpoint-major: an actor keeps the model it has loaded for the following shards
        cap = forward_batch or (max(64, 2 * plan.config["params"]["batch_size"]) if gpus else CPU_FORWARD_BATCH)
        for key, job in plan.jobs.items():
            job = plan.jobs[key] = dataclasses.replace(job, batch=max(1, cap // job.n_views))  # one forward <= cap
            paths = plan.paths[key]
            sizes[job.key] = len(paths)
            if job.cache and not run.store:  # created here, once, so that actors never race to create the same file
                from ensemble.data.loader import DecodedCache

                DecodedCache(run.path(job.cache), job.cache_n, job.image_size)
            if tuple(paths) not in refs:
                refs[tuple(paths)] = ray.put(paths)  # each image list is shipped once
            step = max(1, shard_size // job.batch) * job.batch  # whole batches: no small forward mid-list
            items += [(job, refs[tuple(paths)], s, min(s + step, len(paths))) for s in range(0, len(paths), step)]
    if gpus:  # the actors' DataLoader workers hand batches over in /dev/shm; their own note goes to their logs
        from ensemble.data.loader import batch_bytes, loader_workers

        loader_workers(cpus, max(batch_bytes(j.batch, j.image_size, j.n_views) for p in plans for j in p.jobs.values()))
    plan_of = {p.model_id: p for p in plans}
    scores = {}

    def done(model_id: str, results: dict) -> str:
        plan = plan_of[model_id]
        write = write_embeddings if plan.config["task"] == "retrieval" else write_outputs
        scores[model_id] = write(run, plan, results)
        push_outputs(run, plan.out_dir)
        return f"{model_id}: " + ", ".join(f"{k} {v:.5f}" for k, v in scores[model_id].items())

    began = time.perf_counter()
    own = actors is None
    actors = create_pool(min(n, len(items)), cpus, gpus)[0] if own else actors
    try:
        summary = dict(run_pool(actors, items, sizes, progress, done), actors=len(actors), cpus=cpus, gpus=gpus)
    finally:
        for a in actors if own else []:
            ray.kill(a)
    summary["scores"] = scores
    summary["seconds"] = seconds = time.perf_counter() - began
    print(f"predicted {len(plans)} model(s): {summary['images']} images in {seconds:.1f} s ({summary['images'] / seconds:.0f}"
          f" images/s, actor start included) on {len(actors)} actor(s) of {cpus:g} CPU / {gpus:g} GPU; "
          f"{summary['loads']} checkpoint loads")
    return summary
