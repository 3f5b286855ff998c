"""The `ensemble` console script: help, unknown commands, and each stage's own --help, as a user types them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ensemble import cli

ENSEMBLE = str(Path(sys.executable).parent / "ensemble")


def test_help_exits_0_and_lists_the_stages(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ensemble {tune,predict,stack,retrieve,report,status,prune,demo}") and "python -m ensemble.predict" in out


def test_no_or_an_unknown_command_is_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["tuen"]) == 2
    assert "unknown command 'tuen'" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["tune", "predict", "stack", "retrieve", "report", "status", "prune"])
def test_each_stage_help_from_the_console_script(stage):
    proc = subprocess.run([ENSEMBLE, stage, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"usage: python -m ensemble.{stage}" in proc.stdout, proc.stderr


def test_a_wrong_path_creates_nothing(tmp_path):
    """A tired user's typo: one line, exit 2, and no empty runs/ directory left behind by any stage."""
    (tmp_path / "space.yaml").write_text("data: {manifest: missing.csv, target: {form: label}}\nbackbones: [test_resnet]\n")
    for args in (["predict", "--run", "runs/nope"], ["stack", "--run", "runs/nope"], ["retrieve", "--run", "runs/nope"],
                 ["tune", "--space", "space.yaml", "--name", "x"]):
        proc = subprocess.run([ENSEMBLE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, \
            (args, proc.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"], args
