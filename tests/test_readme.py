"""Every command the README shows in a ```sh block runs exactly as typed, as a subprocess, and its library
example (```python) runs too. The commands of each run (runs/mine, runs/tracked, ...) run in the README's order
in a scratch directory whose tune_spaces/demo.yaml is a smaller copy of the shipped demo space (find_space looks in
./tune_spaces first), with the demo data of this session: the same commands, in minutes instead of the full
demo's. A README command that this file does not know how to check is a failure, so the two stay in sync."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# What each command must print (besides exiting 0), by the start of the command line.
EXPECT = {
    "python -m ensemble.tune --space demo_albumentations --name albu": "Leaderboard (log_loss",
    "python -m ensemble.tune --space demo --name tracked --smoke --logger": "upload with: wandb sync",
    "python -m ensemble.predict --run runs/tracked": "predicted 2 model(s)",
    "python -m ensemble.stack --run runs/tracked --method greedy": "logged the stack scores to mlflow",
    "python -m ensemble.tune --space demo_retrieval": "Leaderboard (digix",
    "python -m ensemble.predict --run runs/demo_retrieval": "oof_tta digix",
    "python -m ensemble.retrieve --run runs/demo_retrieval": "winner: ",
    "python -m ensemble.report --run runs/mine": "index.html",
    "python -m ensemble.tune --space demo_plus --name mine --resume": "4 model(s) already complete, not run again",
    "python -m ensemble.tune --space demo_rounds": "vs r3",
    "python -m ensemble.predict --run runs/demo_rounds --per-view --embeddings": "predicted 8 model(s)",
    "python -m ensemble.stack --run runs/demo_rounds": "neighbour smoothing of ",
    "python -m ensemble.report --run runs/demo_rounds": "index.html",
    "python -m ensemble.status --run runs/mine": "fold-epochs",
    "python -m ensemble.prune --run runs/mine --keep selected --yes": "freed",
    "python -m ensemble.prune --run runs/mine --keep selected": "nothing deleted",
    "python -m ensemble.tune --space demo --name mine --resume": "Nothing to train",
    "python -m ensemble.tune": "Leaderboard (log_loss",
    "python -m ensemble.predict --run runs/mine --per-view": "view rotate:5",
    "python -m ensemble.predict": "predicted 4 model(s)",
    "python -m ensemble.stack": "winner:",
    "python scripts/select_ensemble.py": "cross-validated over 3",
    "ensemble stack": "greedy ",
    "ensemble predict --run runs/mine": "predicted 2 model(s)",
    "ensemble --help": "usage: ensemble {tune,predict,stack,retrieve,report,status,prune,demo}",
}


def readme_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def readme_commands() -> list[str]:
    return [line for block in readme_blocks("sh") for line in block.splitlines() if line.strip()]


def test_the_readme_shows_commands_and_each_has_a_check():
    commands = readme_commands()
    assert len(commands) >= 6
    for command in commands:
        assert any(command.startswith(prefix) for prefix in EXPECT), f"no check for the README command {command!r}"


def small_demo(cwd: Path, demo_dir: Path) -> None:
    """tune_spaces/demo.yaml: the shipped demo space on 300 training and 200 test digits, 2 epochs; demo_plus.yaml
    the same with demo_plus's backbones, demo_albumentations.yaml with its pipeline; demo_rounds.yaml the shipped rounds on the same data, 1 epoch a stage."""
    space = yaml.safe_load((REPO / "tune_spaces" / "demo.yaml").read_text())
    pd.read_csv(demo_dir / "multiclass.csv").head(300).to_csv(cwd / "train.csv", index=False)
    pd.read_csv(demo_dir / "test.csv").head(200).to_csv(cwd / "test.csv", index=False)
    space["data"].update(manifest="../train.csv", test_manifest="../test.csv", root=str(demo_dir))
    space["epochs"] = 2
    (cwd / "tune_spaces").mkdir()
    (cwd / "tune_spaces" / "demo.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    plus = dict(space, backbones=yaml.safe_load((REPO / "tune_spaces" / "demo_plus.yaml").read_text())["backbones"])
    (cwd / "tune_spaces" / "demo_plus.yaml").write_text(yaml.safe_dump(plus, sort_keys=False))
    albu = yaml.safe_load((REPO / "tune_spaces" / "demo_albumentations.yaml").read_text())
    albu["data"] = dict(space["data"], augment=albu["data"]["augment"])
    albu["epochs"] = 2
    (cwd / "tune_spaces" / "demo_albumentations.yaml").write_text(yaml.safe_dump(albu, sort_keys=False))
    rounds = yaml.safe_load((REPO / "tune_spaces" / "demo_rounds.yaml").read_text())
    rounds["data"] = space["data"]
    rounds["stages"] = [dict(stage, epochs=1) for stage in rounds["stages"]]
    for item in rounds["rounds"]:
        item.get("hard_examples", item)["epochs"] = 1
    (cwd / "tune_spaces" / "demo_rounds.yaml").write_text(yaml.safe_dump(rounds, sort_keys=False))


def small_demo_retrieval(cwd: Path, demo_dir: Path) -> None:
    """tune_spaces/demo_retrieval.yaml: the shipped space on 600 training digits, 2 epochs (query/gallery as shipped)."""
    space = yaml.safe_load((REPO / "tune_spaces" / "demo_retrieval.yaml").read_text())
    pd.read_csv(demo_dir / "retrieval.csv").sample(600, random_state=0).to_csv(cwd / "retrieval.csv", index=False)
    space["data"].update(manifest="../retrieval.csv", root=str(demo_dir))
    space["epochs"] = 2
    (cwd / "tune_spaces" / "demo_retrieval.yaml").write_text(yaml.safe_dump(space, sort_keys=False))


def run_of(text: str) -> str:
    """The run a README command (or the library example) works on: runs/NAME, --name NAME, or the sweep's space
    (its default name); the main run `mine` for the rest (`ensemble --help`)."""
    for pattern in (r"runs/([\w.-]+)", r"--name ([\w.-]+)", r"--space ([\w.-]+)"):
        if found := re.search(pattern, text):
            return found.group(1)
    return "mine"


def by_run() -> dict[str, list[str]]:
    """The README's commands grouped by the run they work on, each group in the README's order."""
    groups: dict[str, list[str]] = {}
    for command in readme_commands():
        groups.setdefault(run_of(command), []).append(command)
    return groups


def test_the_commands_group_into_the_readmes_runs():
    groups = by_run()
    assert {"mine", "albu", "tracked", "demo_rounds", "demo_retrieval"} <= set(groups)
    assert groups["mine"][0] == "python -m ensemble.tune --space demo --name mine"  # the run is made first
    assert all(run_of(block) == "mine" for block in readme_blocks("python"))


@pytest.mark.parametrize("run", list(by_run()))
def test_every_readme_command_runs_as_typed(run, tmp_path, demo_dir):
    """The commands of one run, in the README's order, in a scratch directory of their own (the runs are
    independent, so two pytest workers can take them); the library example runs after the main run's."""
    small_demo(tmp_path, demo_dir)
    small_demo_retrieval(tmp_path, demo_dir)
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ["PATH"], ENSEMBLE_DATA_DIR=str(demo_dir),
               RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    for command in by_run()[run]:
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command}\n{out[-4000:]}"
        assert "Traceback" not in out, f"{command}\n{out[-4000:]}"
        expected = next(marker for prefix, marker in EXPECT.items() if command.startswith(prefix))
        assert expected in out, f"{command}: expected {expected!r} in\n{out[-4000:]}"
    for block in [b for b in readme_blocks("python") if run_of(b) == run]:  # the library example, on the run made
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{block}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
