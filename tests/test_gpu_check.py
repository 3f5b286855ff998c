"""scripts/gpu_check.py's CPU-safe parts (no GPU here): the same training, resume, TTA and memory code paths, tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# What a GPU machine of this project lacks (../shared/ENV.md): the script must run without them.
BLOCKER = """
import importlib.util, runpy, sys
BLOCK = {"ray", "lightgbm", "xgboost", "mlxtend", "iterstrat", "faiss", "albumentations", "wandb"}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Blocker())
found = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] in BLOCK else found(name, *a, **k)
sys.argv = ["scripts/gpu_check.py", *sys.argv[1:]]
runpy.run_path("scripts/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_runs_its_cpu_safe_parts_without_ray_or_the_boosters(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "--device", "cpu", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == [] and "all checks passed" in proc.stdout
    assert len(report["train"]["train_loss"]) == 2 and report["train"]["amp"] is False
    assert report["tta"]["8_views_images_per_s"] > 0 and report["tta"]["plain_loop_images_per_s"] > 0
    assert {"test_resnet@32px/batch2/amp=True", "test_efficientnet@32px/batch2/amp=True"} <= set(report["memory"])
    assert report["ray"] == {"skipped": "Ray is not installed"}
    assert "skipped demo_albumentations.yaml: " in proc.stdout  # its pipeline needs albumentations


def test_a_part_that_raises_is_recorded_and_the_other_parts_still_run(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "--device", "cpu", "--smoke", "--out", str(tmp_path),
                           "--backbone", "no_such_backbone"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "no_such_backbone" in report["train"]["error"] and report["tta"] == {"skipped": "no trained fold"}
    assert "test_resnet@32px/batch2/amp=True" in report["memory"] and report["ray"]["skipped"]
    assert len(report["failures"]) == 1 and "part 'train' ran" in report["failures"][0]
    assert "Traceback" in proc.stderr and "1 check(s) failed" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run in full")
def test_gpu_check_without_a_gpu_says_how_to_run_on_a_cpu():
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cuda"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device; use --device cpu --smoke" in proc.stderr
