"""Sweep efficiency: N equal fold-trainings on Ray Tune vs the ideal and vs a plain loop, same run.

    python scripts/bench_sweep.py [--rows 4000] [--epochs 5] [--k 4] [--models 2]

N = models x k equal trials (one trial = one backbone x fold x param set) of a
real tiny timm model (test_resnet, 32 px) on the embedded demo digits, 1 CPU each.
  (b) sequential  every trial in a plain Python loop in this process (imports warm)
  (a) ideal       sum of the single-trial times / concurrent slots (the CPUs)
      sweep       `run_sweep` makespan on a local Ray cluster (ray.init excluded)
      per-fold    the design alternative: plain Ray Tune, one trial per fold
                  ({"cpu": 1}, no shared workers), same trials (skip with --no-per-fold)
Prints efficiency = ideal / makespan (issue 12: target >= 0.92 with ~15 s trials on 2 CPUs)
and the speed-up over the sequential loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml


def write_space(folder: Path, rows: int, epochs: int, k: int, models: int) -> Path:
    from ensemble.data import demo_data as datasets

    manifest = datasets.demo_manifest("multiclass")
    frame = pd.read_csv(manifest).head(rows)
    frame.to_csv(folder / "bench.csv", index=False)
    space = {
        "data": {"manifest": str(folder / "bench.csv"), "root": str(manifest.parent), "preprocess": "pad",
                 "augment": "rotate:10+shift:0.1", "normalize": {"mean": [0.13] * 3, "std": [0.31] * 3}},
        "folds": {"k": k, "strategy": "stratified", "seed": 0},
        "backbones": ["test_resnet"],
        "params": {"lr": 3.0e-3, "batch_size": 32, "image_size": 32},
        "search": {"weight_decay": {"grid": [round(0.01 * (i + 1), 3) for i in range(models)]}},
        "epochs": epochs,
        "metric": "log_loss",
        "resources": {"cpu": 1},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _train_one_fold(tune_config: dict) -> None:
    from ray import tune

    from ensemble.tune.train import train_fold

    result = train_fold(tune_config["config"], tune_config["fold"], tune_config["run_dir"], cpus=1)
    tune.report({"log_loss": result.best_score})


def time_per_fold_trials(space, run_dir: Path) -> float:
    """The alternative design: every fold its own Tune trial with 1 CPU (a fresh worker each)."""
    from ray import tune as ray_tune

    from ensemble.tune import launch as tune

    configs = tune.prepare_run(space, run_dir, resume=False, smoke=False)
    trials = [{"config": c, "fold": f, "run_dir": str(run_dir)} for c in configs for f in range(c["k"])]
    # A grid over indices, mapped to the trials in the closure: param_space stays small.
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(lambda c: _train_one_fold(trials[c["trial"]]), {"cpu": 1}),
        param_space={"trial": ray_tune.grid_search(list(range(len(trials))))},
        run_config=ray_tune.RunConfig(storage_path=str(run_dir / "tune"), name="per_fold", verbose=0))
    start = time.perf_counter()
    tuner.fit()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--no-per-fold", action="store_true", help="skip the one-trial-per-fold comparison")
    parser.add_argument("--keep", help="keep the runs in this directory (each fold's metrics.json has per-epoch "
                                       "start times and durations) [a temporary directory, removed]")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from ensemble.tune import launch as tune
    from ensemble.tune import spaces
    from ensemble.tune.train import train_fold

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        space = spaces.load_space(str(write_space(folder, args.rows, args.epochs, args.k, args.models)))
        # (b) the plain loop: the same trials one after another, 1 thread each like a 1-CPU trial.
        torch.set_num_threads(1)
        configs = tune.prepare_run(space, folder / "loop", resume=False, smoke=False)
        single = []
        for config in configs:
            for fold in range(config["k"]):
                start = time.perf_counter()
                train_fold(config, fold, folder / "loop", cpus=1)
                single.append(time.perf_counter() - start)
                print(f"  loop trial {len(single)}: {single[-1]:.1f} s", flush=True)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        tune.run_sweep(space, folder / "sweep", verbose=0)
        makespan = time.perf_counter() - start
        per_fold = None if args.no_per_fold else time_per_fold_trials(space, folder / "per_fold")
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    ideal = sum(single) / args.cpus
    print(f"{len(single)} trials (test_resnet, 32 px, {args.rows} rows, k={args.k}, {args.epochs} epochs), "
          f"{args.cpus} CPUs, 1 CPU per trial")
    print(f"single-trial time: mean {sum(single) / len(single):.1f} s (min {min(single):.1f}, max {max(single):.1f})")
    print(f"sequential loop  : {sum(single):.1f} s")
    print(f"ideal makespan   : {ideal:.1f} s")
    print(f"sweep makespan   : {makespan:.1f} s")
    print(f"efficiency (ideal / makespan): {ideal / makespan:.3f}  (target >= 0.92)")
    print(f"speed-up over the sequential loop: {sum(single) / makespan:.2f}x")
    if per_fold:
        print(f"one plain Tune trial per fold: makespan {per_fold:.1f} s, efficiency {ideal / per_fold:.3f}")


if __name__ == "__main__":
    main()
