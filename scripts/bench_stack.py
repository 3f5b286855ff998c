"""Benchmark of the stacking layer: thresholds, greedy selection, meta-model fits.

    python scripts/bench_stack.py            # the full benchmark (~5 min, most of it the baseline loop)
    python scripts/bench_stack.py --smoke    # small shapes, seconds

1. Per-label F2 thresholds on a Planet-shaped matrix (40,479 x 17, Planet's
   label rates): the exact coordinate-ascent search against the loop public
   Planet kernels ran (start at 0.2; for each label, for each of 0.01..0.99,
   `sklearn.metrics.fbeta_score(..., average='samples')` on the whole matrix;
   one pass). Targets (issue 12): >= 1000x faster, F2 >= the loop's.
2. Greedy selection on 200 models x 20,000 rows x 10 classes, 50 iterations,
   log loss and accuracy (target <= 0.5 s for log loss, the same picks as before).
3. Each meta-model's fit time (all k fold models) on an 8,000-row, 6-model run,
   with its CV log loss against the best single model and greedy, and the whole
   `python -m ensemble.stack --method all` on such a run (target <= 15 s).

The data are synthetic (seeded): no Planet images or predictions ship here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the seeded run generator

from ensemble.metrics import fbeta_binary, get_metric, log_loss  # noqa: E402
from ensemble.stack import cli as stack  # noqa: E402
from ensemble.stack import meta  # noqa: E402
from ensemble.stack.select import GreedySelection, cross_val_predict  # noqa: E402
from ensemble.stack.thresholds import LabelThresholds  # noqa: E402

# Planet: Understanding the Amazon from Space, train_v2.csv label rates (40,479 images).
PLANET_RATES = [0.927, 0.702, 0.303, 0.201, 0.183, 0.179, 0.112, 0.090, 0.067, 0.052, 0.021, 0.0084,
                0.0084, 0.0082, 0.0052, 0.0025, 0.0024]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def planet_like(n: int, n_labels: int = 17, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """0/1 truth with Planet's label rates and sigmoid scores from a noisy model."""
    rng = np.random.default_rng(seed)
    rates = np.array(PLANET_RATES[:n_labels])
    y = rng.random((n, n_labels)) < rates
    z = np.log(rates / (1 - rates)) + 2.5 * (y - rates) + 1.0 * rng.standard_normal(y.shape)
    return y.astype(np.int64), 1 / (1 + np.exp(-z))


def kernel_loop(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """The public-kernel way: one pass, per label, per candidate threshold, sklearn's F2 on everything."""
    from sklearn.metrics import fbeta_score

    thresholds = np.full(proba.shape[1], 0.2)
    for j in range(proba.shape[1]):
        best_t, best = thresholds[j], -1.0
        for t in np.arange(1, 100) / 100:
            thresholds[j] = t
            score = fbeta_score(y, proba > thresholds, beta=2, average="samples")
            if score > best:
                best_t, best = t, score
        thresholds[j] = best_t
    return thresholds


def bench_thresholds(n: int, n_labels: int) -> None:
    y, proba = planet_like(n, n_labels)
    print(f"\n1. per-label F2 thresholds, {n:,} x {y.shape[1]} (samples-averaged F2)")
    est, t_exact = _timed(lambda: LabelThresholds(2.0, "samples").fit(y, proba))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about images with no true and no predicted tag
        loop_thr, t_loop = _timed(lambda: kernel_loop(y, proba))
    loop_f2 = fbeta_binary(y, proba > loop_thr, 2.0, "samples")
    print(f"   exact search (LabelThresholds): {t_exact:8.3f} s   F2 {est.score_:.5f}   ({est.n_passes_} passes)")
    print(f"   kernel loop ({n_labels} x 99 sklearn):  {t_loop:8.3f} s   F2 {loop_f2:.5f}")
    print(f"   speed-up {t_loop / t_exact:,.0f}x (target >= 1000x); F2 gain {est.score_ - loop_f2:+.5f} (target >= 0)")
    print(f"   best single global threshold {est.global_threshold_:.4f}: F2 {est.global_score_:.5f}; at 0.5: "
          f"{fbeta_binary(y, proba >= 0.5, 2.0, 'samples'):.5f}")
    for average in ("micro", "macro"):
        other, t = _timed(lambda: LabelThresholds(2.0, average).fit(y, proba))
        print(f"   exact search, {average}-averaged: {t:.3f} s, F2 {other.score_:.5f} (global {other.global_score_:.5f})")


def bench_greedy(n_models: int, n: int, n_classes: int, iterations: int) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, n_classes, n)
    y = np.eye(n_classes, dtype=np.float32)[labels]
    # float32 like predictions a model writes; every model sees the same noisy evidence (hard rows are
    # hard for all) with its own strength and noise, so the ensemble cannot become perfect
    evidence = 2 * y - 1 + 1.2 * rng.standard_normal(y.shape, dtype=np.float32)
    z = evidence[None] * rng.uniform(0.5, 2.0, (n_models, 1, 1)).astype(np.float32)
    z += rng.standard_normal((n_models, n, n_classes), dtype=np.float32)
    np.exp(z, out=z)
    z /= z.sum(axis=2, keepdims=True)
    print(f"\n2. greedy selection, {n_models} models x {n:,} rows x {n_classes} classes, {iterations} iterations")
    for metric in ("log_loss", "accuracy"):
        for dtype in (np.float32, np.float64):
            proba = z if dtype == np.float32 else z.astype(np.float64)
            est, t = _timed(lambda p=proba: GreedySelection(metric, iterations=iterations).fit(p, y))
            m = get_metric(metric)
            best = min(m.sign() * m(y, p) for p in proba) * m.sign()
            target = " (target <= 0.5 s)" if metric == "log_loss" else ""
            print(f"   {metric:<9} {np.dtype(dtype).name}: {t:6.2f} s{target}   score {est.score_:.5f} "
                  f"(best single {best:.5f}), {np.count_nonzero(est.counts_)} models kept")
            del proba
    # reference: one iteration scored the plain way, one metric call per candidate
    total = z[0].astype(np.float64)
    _, t_one = _timed(lambda: [log_loss(y, (total + z[m]) / 2) for m in range(n_models)])
    print(f"   reference: one metric call per candidate costs {t_one:.2f} s per iteration "
          f"(~{t_one * iterations:.0f} s for {iterations})")


def bench_meta(n: int, n_models: int, n_classes: int, n_labels: int, smoke: bool) -> None:
    from stack_fixtures import make_predictions, make_truth, write_run

    rng = np.random.default_rng(2)
    specs = {f"model{m}": (2.2 - 0.2 * m, 1.0 + 0.05 * m, [1.0, 0.7, 1.4][m % 3]) for m in range(n_models)}
    for task, labels in (("multiclass", n_classes), ("multilabel", n_labels)):
        y = make_truth(task, n, labels, rng)
        oof = make_predictions(y, task, specs, rng)
        test = oof[:, :500]
        folds = rng.permutation(n) % 5
        singles = [log_loss(y, p, task) for p in oof]
        greedy, t_greedy = _timed(lambda: cross_val_predict(GreedySelection("log_loss", task), oof, y, folds)[0])
        print(f"\n3. meta-models, {task}: {n:,} rows x {n_models} models x {labels} classes, 5 folds "
              f"(best single CV log loss {min(singles):.4f}, greedy {log_loss(y, greedy, task):.4f} in {t_greedy:.2f} s)")
        for method in meta.META_METHODS:
            fit, t = _timed(lambda: meta.fit_meta(method, oof, y, folds, test, task, smoke=smoke))
            print(f"   {method:<7} fit {t:6.2f} s   CV log loss {log_loss(y, fit.oof, task):.4f}")
    with tempfile.TemporaryDirectory() as tmp:  # the whole stage on a run of the same shape
        run = write_run(Path(tmp) / "run", "multiclass", n=n, n_test=n // 5, k=5, n_classes=n_classes, seed=3,
                        models=specs)
        args = stack.parse_args(["--run", str(run)] + (["--smoke"] if smoke else []))
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            rows, t = _timed(lambda: stack.stack(args))
        winner = min(rows, key=lambda r: r.cv_score)
        print(f"   python -m ensemble.stack --method all on a {n:,}-row, {n_models}-model, {n_classes}-class run: {t:.1f} s "
              f"(target <= 15 s at 8,000 x 6 x 10) "
              f"(winner {winner.method} {winner.cv_score:.4f} vs {rows[0].method} {rows[0].cv_score:.4f})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small shapes: checks the script runs")
    args = p.parse_args(argv)
    import os

    print(f"numpy {np.__version__}; {'smoke shapes' if args.smoke else 'full shapes'}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start (timings scale with other work on the machine)")
    bench_thresholds(*((2_000, 4) if args.smoke else (40_479, 17)))
    bench_greedy(*((20, 2_000, 10, 10) if args.smoke else (200, 20_000, 10, 50)))
    bench_meta(*((600, 4, 5, 4) if args.smoke else (8_000, 6, 10, 17)), smoke=args.smoke)


if __name__ == "__main__":
    main()
