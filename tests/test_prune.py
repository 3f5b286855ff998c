"""python -m ensemble.prune on a synthetic stacked run (no Ray): the plan, what --yes frees and keeps, --keep
selected | top:N | all, a file:// run, bad input, the lock; predict's message for a pruned model; a real
tiny sweep whose --resume does not train a pruned model again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from stack_fixtures import MODELS, write_run

from ensemble.errors import UserError
from ensemble.predict.plan import plan_run
from ensemble.run import Run
from ensemble.stack.cli import parse_args, stack

REPO = Path(__file__).resolve().parents[1]
K = 3
WEIGHTS, LAST = 150_000, 250_000  # bytes of each fold's fake weights.pt and last.pt
MEANS = {"resnet-a1": 0.50, "effnet-b2": 0.40, "convnext-c3": 0.60, "vit-d4": 0.90}  # log_loss: lower is better
STACK = ["--method", "greedy", "--smoke", "--skip-incomplete"]
PREDICTIONS = ("oof.parquet", "oof_tta.parquet", "test.parquet", "predict.json", "metrics.json")


def write_fold(model_dir: Path, fold: int, oof: pd.DataFrame | None, complete: bool) -> None:
    d = model_dir / f"fold{fold}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "weights.pt").write_bytes(b"w" * WEIGHTS)
    (d / "last.pt").write_bytes(b"l" * LAST)
    (d / "metrics.json").write_text(json.dumps({"fold": fold, "epochs": 2, "complete": complete, "best_epoch": 1,
                                                "best_score": 0.5, "history": []}))
    if oof is not None:
        oof[oof["fold"] == fold].to_parquet(d / "oof.parquet", index=False)


@pytest.fixture(scope="module")
def stacked(tmp_path_factory) -> Path:
    """4 complete, predicted models with fake checkpoints, one stopped by ASHA, one still training; stacked."""
    run = write_run(tmp_path_factory.mktemp("prune") / "run", "multiclass", n=240, n_test=20, k=K, n_classes=4,
                    seed=0, tta=tuple(MODELS))
    for i, model_id in enumerate(MODELS):
        d = run / "models" / model_id
        config = json.loads((d / "config.json").read_text())
        config.update(mode="min", searched={"lr": 0.001 * (i + 1)}, data={"tta": "orig", "test_manifest": "test.csv"})
        (d / "config.json").write_text(json.dumps(config))
        oof = pd.read_parquet(d / "oof.parquet")
        for f in range(K):
            write_fold(d, f, oof, complete=True)
    for model_id, state in (("asha-e5", "pruned"), ("todo-f6", None)):
        d = run / "models" / model_id
        d.mkdir()
        config = dict(json.loads((run / "models/resnet-a1/config.json").read_text()), model_id=model_id)
        (d / "config.json").write_text(json.dumps(config))
        for f in range(K if state else 1):
            write_fold(d, f, None, complete=False)
        if state:
            (d / "status.json").write_text(json.dumps({"state": "pruned", "epoch": 1}))
    rows = [{"model": model_id.split("-")[0], "model_id": model_id, "metric": "log_loss", "mean": mean, "std": 0.01}
            for model_id, mean in MEANS.items()]
    pd.DataFrame(rows[::-1]).to_csv(run / "leaderboard.csv", index=False)  # not in rank order
    stack(parse_args(["--run", str(run), *STACK]))
    return run


@pytest.fixture
def run(stacked, tmp_path) -> Path:
    return Path(shutil.copytree(stacked, tmp_path / "run"))


def prune(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemble.prune", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != "run.lock"}


def selection(run: Path) -> dict[str, float]:
    return json.loads((run / "ensemble/selection.json").read_text())["weights"]


def checkpoints(model_ids, names=("weights.pt", "last.pt")) -> set[str]:
    return {f"models/{m}/fold{f}/{name}" for m in model_ids for f in range(K) for name in names}


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------- --keep selected


def test_dry_run_prints_the_plan_and_deletes_nothing(run):
    used = [m for m, w in selection(run).items() if w > 0]
    unused = [m for m in MODELS if m not in used]
    assert used and unused  # the greedy selection leaves a model out
    before = snapshot(run)
    out = prune("--run", run, "--keep", "selected")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    total = len(unused) * K * (WEIGHTS + LAST) + len(used) * K * LAST
    assert out.stdout.strip().endswith(f"nothing deleted: add --yes to free {mb(total)}"), out.stdout
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
    assert set(lines) == set(MODELS) | {"asha-e5", "todo-f6"}
    for m in unused:
        assert f"frees weights.pt + last.pt ({2 * K} files)" in lines[m] and mb(K * (WEIGHTS + LAST)) in lines[m]
    for m in used:
        assert f"keeps weights.pt, frees last.pt ({K} files)" in lines[m] and mb(K * LAST) in lines[m]
    assert "pruned" in lines["asha-e5"] and "not touched: stopped by the scheduler" in lines["asha-e5"]
    assert "todo" in lines["todo-f6"] and "not touched: not complete" in lines["todo-f6"]
    assert f"total: {mb(total)} in {K * (2 * len(unused) + len(used))} file(s)" in out.stdout
    assert snapshot(run) == before and not (run / "run.lock").exists()


def test_yes_frees_exactly_the_unused_checkpoints_keeps_the_predictions_and_stack_still_runs(run, capsys):
    weights = selection(run)
    unused = [m for m, w in weights.items() if w == 0]
    before = snapshot(run)
    out = prune("--run", run, "--keep", "selected", "--yes")
    assert out.returncode == 0, out.stderr
    assert f"predict cannot run {', '.join(unused)} again" in out.stdout
    after = snapshot(run)
    gone = set(before) - set(after)
    assert gone == checkpoints(unused) | checkpoints([m for m in MODELS if m not in unused], ["last.pt"])
    changed = {p for p in after if p in before and after[p] != before[p]}
    added = set(after) - set(before)
    assert not changed and added == {f"models/{m}/status.json" for m in unused}
    assert all(after[p] == before[p] for p in before if Path(p).name in PREDICTIONS)  # every prediction, unchanged
    r = Run(run)
    for m in unused:
        status = r.read_status(m)
        assert status["state"] == "complete" and status["weights"] == "pruned"
        assert status["freed_bytes"] == K * (WEIGHTS + LAST) and "--keep selected --yes" in status["pruned_by"]
        assert r.model_state(m) == "complete" and r.weights_pruned(m)
    assert r.model_state("asha-e5") == "pruned" and r.model_state("todo-f6") == "todo"
    # Idempotent: the same prune again frees nothing.
    again = prune("--run", run, "--keep", "selected", "--yes")
    assert again.returncode == 0 and "nothing to free" in again.stdout and "total: 0.0 MB in 0 file(s)" in again.stdout
    assert snapshot(run) == after
    # The stack reads only predictions: it runs as before, with the same selection.
    stack(parse_args(["--run", str(run), *STACK]))
    assert selection(run) == weights
    capsys.readouterr()


def test_predict_names_a_pruned_model_instead_of_a_missing_checkpoint(run):
    unused = sorted(m for m, w in selection(run).items() if w == 0)
    kept = [m for m in MODELS if m not in unused]
    assert prune("--run", run, "--keep", "selected", "--yes").returncode == 0
    plans, skipped = plan_run(Run(run))  # predictions complete: skipped as before
    assert plans == [] and set(skipped) == set(MODELS)
    with pytest.raises(UserError) as err:
        plan_run(Run(run), force=True)
    message = str(err.value)
    names = f"model {unused[0]}" if len(unused) == 1 else f"models {', '.join(unused)}"
    assert f"the weights of {names} were pruned (python -m ensemble.prune)" in message
    assert "cannot be predicted again" in message and f"--models {','.join(kept)}" in message
    assert "checkpoint missing" not in message
    (run / "models" / unused[0] / "predict.json").unlink()  # an incomplete prediction set: refused as well
    with pytest.raises(UserError, match=f"model {unused[0]} were pruned .* cannot be predicted again"):
        plan_run(Run(run), models=[unused[0]])


# --------------------------------------------------------------------------- --keep top:N and all


def test_top_n_keeps_the_best_by_the_leaderboard(run):
    before = snapshot(run)
    out = prune("--run", run, "--keep", "top:2", "--yes")
    assert out.returncode == 0, out.stderr
    best, rest = ["effnet-b2", "resnet-a1"], ["convnext-c3", "vit-d4"]  # lowest mean log_loss first
    assert set(before) - set(snapshot(run)) == checkpoints(rest) | checkpoints(best, ["last.pt"])
    assert [m for m in MODELS if Run(run).weights_pruned(m)] == rest
    assert prune("--run", run, "--keep", "top:2", "--yes").stdout.count("nothing to free") == 1
    top3 = prune("--run", run, "--keep", "top:3")  # convnext-c3 is now kept, but its weights are gone for good
    assert top3.returncode == 0 and "nothing to free" in top3.stdout
    line = next(line for line in top3.stdout.splitlines() if "convnext-c3" in line)
    assert "its weights.pt were freed by an earlier prune" in line


def test_keep_all_frees_only_the_resume_points(stacked, tmp_path):
    run = Path(shutil.copytree(stacked, tmp_path / "all"))
    before = snapshot(run)
    out = prune("--run", run, "--keep", "all", "--yes")
    assert out.returncode == 0, out.stderr
    assert set(before) - set(snapshot(run)) == checkpoints(MODELS, ["last.pt"])
    assert not any((run / "models" / m / "status.json").exists() for m in MODELS)  # weights kept: nothing to mark
    assert (run / "models/asha-e5/fold0/last.pt").exists() and (run / "models/todo-f6/fold0/last.pt").exists()


# --------------------------------------------------------------------------- a URI run


def test_a_file_uri_run_is_pruned_at_the_uri(stacked, tmp_path):
    bucket = Path(shutil.copytree(stacked, tmp_path / "bucket" / "run"))
    env = {**os.environ, "ENSEMBLE_CACHE_DIR": str(tmp_path / "cache")}
    before = snapshot(bucket)
    dry = prune("--run", bucket.as_uri(), "--keep", "top:1", env=env)
    assert dry.returncode == 0 and f"add --yes to free {mb(3 * K * (WEIGHTS + LAST) + K * LAST)}" in dry.stdout, \
        dry.stdout + dry.stderr
    assert snapshot(bucket) == before
    out = prune("--run", bucket.as_uri(), "--keep", "top:1", "--yes", env=env)
    assert out.returncode == 0, out.stderr
    rest = ["resnet-a1", "convnext-c3", "vit-d4"]
    assert set(before) - set(snapshot(bucket)) == checkpoints(rest) | checkpoints(["effnet-b2"], ["last.pt"])
    assert all(json.loads((bucket / "models" / m / "status.json").read_text())["weights"] == "pruned" for m in rest)
    assert not (bucket / "run.lock").exists() and not list(bucket.rglob("*.tmp"))
    again = prune("--run", bucket.as_uri(), "--keep", "top:1", "--yes", env=env)
    assert again.returncode == 0 and "nothing to free" in again.stdout


# --------------------------------------------------------------------------- refused: nothing written or deleted


@pytest.mark.parametrize("keep, message", [
    ("some", "The 'keep' parameter of prune must be one of selected, top:N (N >= 1, e.g. top:5), all. Got 'some'"),
    ("top:0", "Got 'top:0' instead"),
    ("top:x", "Got 'top:x' instead"),
    ("selected", "ensemble/selection.json: not found"),  # after its ensemble/ is removed
    ("top:2", "leaderboard.csv: not found"),  # after it is removed
])
def test_bad_keep_values_and_missing_inputs_are_one_line_and_change_nothing(run, keep, message):
    if keep == "selected":
        shutil.rmtree(run / "ensemble")
    if keep == "top:2":
        (run / "leaderboard.csv").unlink()
    before = snapshot(run)
    out = prune("--run", run, "--keep", keep, "--yes")
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: ") and message in out.stderr
    if keep == "selected":
        assert "python -m ensemble.stack" in out.stderr and "top:N" in out.stderr
    assert snapshot(run) == before and not (run / "run.lock").exists()


def test_not_a_run_is_refused_and_nothing_is_created(tmp_path):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        out = prune("--run", where, "--keep", "all", "--yes")
        assert out.returncode == 2 and "not a run directory" in out.stderr and out.stderr.count("\n") == 1
    assert list((tmp_path / "empty").iterdir()) == [] and not (tmp_path / "missing").exists()


HOLD = """
import sys
from ensemble.run import Run, locked
with locked(Run(sys.argv[1]), "python -m ensemble.tune --space demo --resume"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_run_locked_by_a_live_sweep_is_refused(run):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        out = prune("--run", run, "--keep", "selected", "--yes")
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "this run is in use by python -m ensemble.tune --space demo --resume" in out.stderr
        assert f"pid {holder.pid}" in out.stderr and snapshot(run) == before
    finally:
        holder.communicate("", timeout=30)
    assert not (run / "run.lock").exists()


# --------------------------------------------------------------------------- a real tiny sweep: --resume


def test_resume_does_not_train_a_pruned_model_again(tmp_path, demo_dir, capsys):
    """Two real models (2 folds, 1 epoch, no Ray): prune one, then the sweep's --resume has nothing to train."""
    from sweep_fixtures import small_space

    from ensemble.tune import launch, spaces
    from ensemble.tune.train import train_until

    space = spaces.load_space(str(small_space(tmp_path, demo_dir, rows=120, epochs=1,
                                              search={"weight_decay": {"grid": [0.0, 0.05]}})))
    run_dir = tmp_path / "runs" / "r"
    run = Run(run_dir)
    for config in launch.prepare_run(space, run_dir):
        for fold in range(config["k"]):
            train_until(config, fold, run_dir, 1)
            run.mark_complete(config["model_id"], fold)
        run.finalize_model(config)
    board = launch.run_sweep(space, run_dir, resume=True, verbose=0)  # no model to train: writes the leaderboard
    best, worst = board["model_id"].tolist()
    out = prune("--run", run_dir, "--keep", "top:1", "--yes")
    assert out.returncode == 0, out.stderr
    assert not list((run_dir / "models" / worst).rglob("*.pt")) and not list(run_dir.glob(f"models/{best}/*/last.pt"))
    capsys.readouterr()
    again = launch.run_sweep(space, run_dir, resume=True, verbose=0)
    assert "Nothing to train" in capsys.readouterr().out
    assert again.equals(board) and set(again["state"]) == {"complete"}
    assert not list((run_dir / "models" / worst).rglob("*.pt"))  # not trained again
    assert len(list(run_dir.glob(f"models/{best}/*/weights.pt"))) == 2
    with pytest.raises(UserError, match=f"model {worst} were pruned .* --models {best}"):
        plan_run(run, force=True)
