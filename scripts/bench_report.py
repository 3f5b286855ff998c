"""Benchmark of the report stage on a big finished sweep.

    python scripts/bench_report.py            # 50 models x 5 folds, 5,000 rows x 10 classes (~1 min, most of it setup)
    python scripts/bench_report.py --smoke    # 12 models, 1,000 rows: seconds

A synthetic multiclass run (tests/report_fixtures.py: fold metrics.json with
10-epoch histories, predict.json, per-view TTA for 5 models, long timm-style
backbone names and three searched params), stacked by the real
`python -m ensemble.stack --method greedy --smoke`; then the report is built
in-process (collect + figures + page + the directory swap) and, once more, as
the command a user runs (imports included). Target: < 30 s on 2 CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the seeded run generators

from report_fixtures import add_predict_files, add_sweep_files, stack_run  # noqa: E402
from stack_fixtures import write_run  # noqa: E402

TARGET_SECONDS = 30.0
BACKBONES = ["convnext_small.fb_in22k_ft_in1k", "efficientnet_b3.ra2_in1k", "resnet50.a1_in1k",
             "vit_base_patch16_224.augreg2_in21k_ft_in1k", "regnety_040.ra3_in1k"]


def make_run(root: Path, n_models: int, rows: int, classes: int, folds: int, epochs: int) -> Path:
    models = {f"m{m:02d}-x": (0.8 + 1.4 * (m % 7) / 6, 1.0 + 0.1 * (m % 3), 0.7 + 0.1 * (m % 5))
              for m in range(n_models)}
    run = write_run(root / "run", "multiclass", n=rows, n_test=200, k=folds, n_classes=classes, models=models, seed=0)
    add_sweep_files(run, epochs=epochs)
    for m, path in enumerate(sorted(run.glob("models/*/config.json"))):  # long labels, as real sweeps have
        config = json.loads(path.read_text())
        config["backbone"] = BACKBONES[m % len(BACKBONES)]
        config["searched"] = {"lr": [3e-4, 1e-3, 3e-3][m % 3], "drop_path": [0.0, 0.1][m % 2],
                              "image_size": [224, 288, 384][m % 3]}
        path.write_text(json.dumps(config))
    add_predict_files(run, views_for=tuple(sorted(models))[:5])
    stack_run(run, "greedy")
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="12 models, 1,000 rows")
    args = p.parse_args(argv)
    n_models, rows = (12, 1000) if args.smoke else (50, 5000)
    classes, folds, epochs = 10, 5, 10
    from ensemble.report import cli  # imports matplotlib and jinja2 once, outside the timing

    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the stack's and the report's own summaries
            run = make_run(Path(tmp), n_models, rows, classes, folds, epochs)
            setup = time.perf_counter() - start
            start = time.perf_counter()
            assert cli.main(["--run", str(run)]) == 0
            build = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ensemble.report", "--run", str(run)], cwd=REPO, check=True,
                       capture_output=True)
        command = time.perf_counter() - start
        report = run / "report"
        size = sum(p.stat().st_size for p in report.iterdir())
        pngs = len(list(report.glob("*.png")))
    print(f"setup (run + stack) {setup:.1f} s; report: {pngs} figures, {size / 1e6:.1f} MB in report/")
    print(f"report of {n_models} models x {folds} folds, {rows:,} rows x {classes} classes, {epochs}-epoch histories: "
          f"build {build:.1f} s in-process, {command:.1f} s as the command; target {TARGET_SECONDS:.0f} s: "
          f"{command / TARGET_SECONDS:.2f}x of target ({'ok' if command < TARGET_SECONDS else 'TOO SLOW'})")


if __name__ == "__main__":
    main()
