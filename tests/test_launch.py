"""Planning a sweep without Ray: every check before the first write, and the CLI's one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ensemble.errors import UserError
from ensemble.tune import launch, spaces

REPO = Path(__file__).resolve().parent.parent


def digits(tmp_path: Path, demo_dir: Path, per_class: int, name: str = "digits.csv") -> tuple[Path, pd.DataFrame]:
    """A manifest of `per_class` demo digits per label, its images copied beside it (tests may damage them)."""
    frame = pd.read_csv(demo_dir / "multiclass.csv").groupby("label").head(per_class).reset_index(drop=True)
    (tmp_path / "images").mkdir(exist_ok=True)
    for image in frame["image"]:
        shutil.copy(demo_dir / image, tmp_path / image)
    manifest = tmp_path / name
    frame.to_csv(manifest, index=False)
    return manifest, frame


def write_space(tmp_path: Path, manifest: Path, data: dict | None = None, **keys) -> Path:
    space = {"data": {"manifest": str(manifest), "tta": "orig", **(data or {})},
             "folds": {"k": 2, "strategy": "stratified"}, "backbones": ["test_resnet"],
             "params": {"image_size": 32}, "epochs": 1, **keys}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


# --------------------------------------------------------------------------- on_bad_image + normalize: dataset


@pytest.fixture
def corrupt(tmp_path, demo_dir):
    """A manifest of 60 digits whose 4th image is a truncated PNG."""
    manifest, frame = digits(tmp_path, demo_dir, per_class=6)
    victim = tmp_path / frame["image"][3]
    victim.write_bytes(victim.read_bytes()[:60])
    return manifest, victim


def test_skip_leaves_a_corrupt_image_out_of_the_dataset_statistics(tmp_path, corrupt, capsys):
    manifest, _ = corrupt
    data = {"on_bad_image": "skip", "normalize": "dataset", "check_images": "decode"}
    space = spaces.load_space(str(write_space(tmp_path, manifest, data)))
    [config] = launch.prepare_run(space, tmp_path / "run")
    written = json.loads(next((tmp_path / "run" / "models").glob("*/config.json")).read_text())
    norm = written["data"]["normalize"]
    assert norm == config["data"]["normalize"] and set(norm) == {"mean", "std"}
    assert all(math.isfinite(v) and 0 < v < 1 for v in norm["mean"] + norm["std"]), norm
    assert "row 4 (1 row)" in capsys.readouterr().err  # the data check's note names the skipped row


@pytest.mark.parametrize("check, named", [("decode", "{manifest}: an unreadable or corrupt image at row 4 (1 row)"),
                                          ("exists", "{victim}: unreadable or corrupt image")])
def test_raise_names_the_corrupt_image_and_writes_nothing(tmp_path, corrupt, check, named):
    """decode: the data check names the manifest row; exists: the statistics pass names the image file."""
    manifest, victim = corrupt
    data = {"on_bad_image": "raise", "normalize": "dataset", "check_images": check}
    space = spaces.load_space(str(write_space(tmp_path, manifest, data)))
    with pytest.raises(UserError) as caught:
        launch.prepare_run(space, tmp_path / "run")
    assert named.format(manifest=manifest.resolve(), victim=victim.resolve()) in str(caught.value)
    assert not (tmp_path / "run" / "space.yaml").exists() and not (tmp_path / "run" / "models").exists()


# --------------------------------------------------------------------------- folds


def test_k_above_the_smallest_class_names_label_manifest_and_key(tmp_path, demo_dir):
    manifest, frame = digits(tmp_path, demo_dir, per_class=4)
    frame = frame[(frame["label"] != "seven") | ~frame["label"].duplicated()]  # one 'seven' left
    frame.to_csv(manifest, index=False)
    space = spaces.load_space(str(write_space(tmp_path, manifest, {"check_images": "exists", "normalize": "backbone"},
                                              folds={"k": 3, "strategy": "stratified"})))
    with pytest.raises(UserError) as caught:
        launch.prepare_run(space, tmp_path / "run")
    message = str(caught.value)
    assert "'folds.k' 3" in message and str(manifest.resolve()) in message, message
    assert "class 'seven' has only 1 row, k=3" in message, message


# --------------------------------------------------------------------------- the CLI, as a user types it


def sweep_cli(tmp_path: Path, space: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemble.tune", "--space", str(space),
                           "--storage", str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, storage: Path, *expected: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not storage.exists() or not any(storage.iterdir()), list(storage.iterdir())  # no run directory


def test_cli_header_only_manifest_is_one_line_naming_it(tmp_path, demo_dir):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("id,image,label\n")
    done = sweep_cli(tmp_path, write_space(tmp_path, manifest))
    assert_one_line_error(done, tmp_path / "runs", f"{manifest.resolve()}: no data rows",
                          "one row per image")


def test_cli_png_named_csv_is_one_line_saying_what_it_is(tmp_path, demo_dir):
    manifest = tmp_path / "digits.csv"
    shutil.copy(next((demo_dir / "images").glob("*.png")), manifest)
    done = sweep_cli(tmp_path, write_space(tmp_path, manifest))
    assert_one_line_error(done, tmp_path / "runs", f"{manifest.resolve()}: cannot be read as CSV",
                          "looks like a PNG image", "'data.manifest'")
    assert "does not exist" not in done.stderr
