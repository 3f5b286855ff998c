"""`python -m ensemble.status --run runs/NAME [--json]`: where a run stands, live or finished.

  /data/runs/demo: 4 model(s) x 3 folds, log_loss (lower is better)
  lock      held by python -m ensemble.tune --space demo (pid 4242 on vm, since 2026-11-30 10:33:01), heartbeat 5 s ago
    test_efficientnet lr=0.003  fold-epochs 9/9  log_loss 0.1617 (best 0.1617)  0:14  complete  [test_efficientnet-52929935]
    test_efficientnet lr=0.01   fold-epochs 9/9  log_loss 0.1655 (best 0.1655)  0:14  complete  [test_efficientnet-605f3bc0]
    test_resnet lr=0.003        fold-epochs 4/9  log_loss 0.2466 (best 0.2466)  0:11  ETA 0:14  training  [test_resnet-52929935]
    test_resnet lr=0.01         fold-epochs 0/9  todo  [test_resnet-605f3bc0]
  sweep     22/36 fold-epochs: 2 complete, 1 training, 1 todo; 0:31 elapsed, ETA 0:20
  predict   0 of 2 complete model(s) predicted: python -m ensemble.predict --run /data/runs/demo
  stack     todo: python -m ensemble.stack --run /data/runs/demo
  report    todo

One line per model, as the sweep itself shows them (`ensemble.tune.progress`). It only
reads files: it never takes run.lock and never writes into the run, so it is safe while a
sweep trains. A URI run is read from a private scratch copy of its small files (configs,
fold metrics, status, predict.json, scores and selections).

A model's state, from its own files and run.lock:

  complete     models/<id>/oof.parquet: every fold finished (an early stop is noted)
  pruned       status.json says {"state": "pruned"} (stopped by ASHA, or by the prune command)
  training     a live sweep holds run.lock (its process runs, or its heartbeat is fresh) and a fold of
               the model has finished an epoch or is in one (fold<k>/running.json; not at a URI,
               where only finished epochs are uploaded)
  todo         nothing trained yet (under a live sweep: waiting for a slot)
  failed       no live sweep, the model started and did not finish, and Ray Tune recorded an error
               for its trial in the last launch that ran it (tune/attempt-N/<trial>/error.txt; a
               local run only: a URI run keeps Tune's files in a scratch copy that is removed)
  interrupted  the same without such a record: the launch was stopped (Ctrl-C) or crashed, or the
               error record is not there to read; `python -m ensemble.tune ... --resume` continues it

While the sweep lives, a model whose trial raised is still 'training': Tune may retry it.

The current score is the mean over folds of the last epoch every fold has finished
(what the sweep reports to Tune), the best is the best of those means. Elapsed is the
time the model's epochs were running (from each epoch's `started` and `seconds`, so
the pauses between launches do not count), and the ETA is that pace applied to the
fold-epochs left.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ensemble.errors import cli_main
from ensemble.metrics import METRICS
from ensemble.run import Run, open_run, total_epochs
from ensemble.run.layout import OOF_FILE
from ensemble.run.lock import _describe, _stale
from ensemble.tune.progress import _clock, eta, label_width, model_label, model_line

# What status reads of a URI run (file name endings): small JSON and CSV files, never checkpoints.
STATUS_FILES = ("folds.csv", "config.json", "status.json", "metrics.json", "running.json", "predict.json",
                "scores.csv", "selection.json")
FINISHED = ("complete", "pruned")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # absent, or removed or replaced as we read it
        return None


# --------------------------------------------------------------------------- the lock


def read_lock(run: Run, now: float) -> dict | None:
    """run.lock's holder, with `live` (its process may still run) and `heartbeat_age` in seconds; None if free."""
    holder = run.store.read_json(run.rel(run.lock_file)) if run.store else _read_json(run.lock_file)
    if holder is None:
        return None
    why = _stale(holder)  # the rule a second launch uses to take the lock over
    return dict(holder, live=why is None, stale=why, heartbeat_age=now - float(holder.get("heartbeat", now)))


def _sweep_is_live(lock: dict | None) -> bool:
    return bool(lock and lock["live"] and "ensemble.tune" in str(lock.get("command", "")))


# --------------------------------------------------------------------------- models


def tune_errors(run: Run) -> dict[str, str]:
    """model_id -> the error.txt Ray Tune wrote for its trial in the last launch (attempt) that ran it."""
    errors = {}
    attempts = [p for p in run.tune_dir.glob("attempt-*") if p.name.split("-")[-1].isdigit()]
    for attempt in sorted(attempts, key=lambda p: int(p.name.split("-")[-1])):
        for params in attempt.glob("*/params.json"):
            model_id = (_read_json(params) or {}).get("model_id")
            error = params.parent / "error.txt"
            errors[model_id] = run.show(error) if error.exists() else None  # a later launch replaces it
    return {model_id: path for model_id, path in errors.items() if model_id and path}


def _active_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) spans: time when at least one epoch was running."""
    total, reach = 0.0, -np.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _spans(folds: list[dict], live: bool, now: float) -> list[tuple[float, float]]:
    spans = [(row["started"], row["started"] + row["seconds"])
             for f in folds for row in (f["metrics"] or {}).get("history", []) if "started" in row and "seconds" in row]
    if live:  # the epochs in progress, so far
        spans += [(f["running"]["started"], now) for f in folds if f["running"] and "started" in f["running"]]
    return spans


def _scores(folds: list[dict], metric: str, mode: str) -> tuple[int, float | None, float | None]:
    """(last epoch every fold finished, the folds' mean at it, the best such mean so far)."""
    epoch = min((f["metrics"] or {}).get("epochs", 0) for f in folds)
    try:
        means = [float(np.mean([f["metrics"]["history"][e][metric] for f in folds])) for e in range(epoch)]
    except (KeyError, IndexError, TypeError):  # a history without this metric: no score to show
        return epoch, None, None
    if not means:
        return epoch, None, None
    return epoch, means[-1], (min if mode == "min" else max)(means)


def model_state(run: Run, config: dict, live: bool, errors: dict[str, str]) -> str:
    """complete / pruned / training / failed / interrupted / todo (the module docstring says how each is told);
    `live`: a sweep holds the run now; `errors`: tune_errors(run). The report uses this rule too."""
    model_id = config["model_id"]
    # At a URI, exists() asks the URI: the scratch copy holds no oof.parquet (status pulls small files only).
    state = "complete" if run.exists(run.model_dir(model_id) / OOF_FILE) else run.model_state(model_id)
    started = any((run.read_metrics(model_id, f) or {}).get("epochs", 0) or
                  (run.fold_dir(model_id, f) / "running.json").exists() for f in range(config["k"]))
    if state == "todo" and started:
        state = "training" if live else "failed" if model_id in errors else "interrupted"
    return state


def model_status(run: Run, config: dict, live: bool, errors: dict[str, str],
                 now: float) -> tuple[dict, list[tuple[float, float]]]:
    """One model's state, progress, scores and times (module docstring), and the spans its epochs ran."""
    model_id, k, metric = config["model_id"], config["k"], config["metric"]
    mode = config.get("mode") or METRICS[metric].mode
    epochs = total_epochs(config)
    folds = [{"fold": f, "metrics": run.read_metrics(model_id, f),
              "running": _read_json(run.fold_dir(model_id, f) / "running.json")} for f in range(k)]
    done = sum(min((f["metrics"] or {}).get("epochs", 0), epochs) for f in folds)
    state = model_state(run, config, live, errors)
    epoch, score, best = _scores(folds, metric, mode)
    spans = _spans(folds, state == "training", now)
    elapsed = _active_seconds(spans) if spans else None
    total = done if state in FINISHED else k * epochs  # a model that stopped early has nothing left
    label = model_label(config.get("backbone", model_id), config.get("searched") or {}, config.get("round", 1))
    return {
        "model_id": model_id, "label": label, "state": state,
        "stopped": next((f["metrics"].get("stopped") for f in folds if f["metrics"] and f["metrics"].get("stopped")),
                        None),
        "error": errors.get(model_id) if state == "failed" else None,
        "fold_epochs": done, "total_fold_epochs": k * epochs, "left_fold_epochs": total - done,
        "epoch": epoch, "metric": metric, "score": score, "best": best, "elapsed": elapsed,
        "eta": eta(elapsed, done, total) if state == "training" and elapsed is not None else None,
        "predicted": (run.predict_dir(model_id) / "predict.json").exists(),
        "folds": [{"fold": f["fold"], "epochs": (f["metrics"] or {}).get("epochs", 0),
                   "complete": bool((f["metrics"] or {}).get("complete")), "running": f["running"]} for f in folds],
    }, spans


# --------------------------------------------------------------------------- later stages


def _stack(run: Run, command: str | None) -> dict:
    """ensemble/scores.csv's winner, chosen as the stack chose it (ensemble.stack.core.choose_winner)."""
    import pandas as pd

    path = run.ensemble_dir / "scores.csv"
    if not path.exists():
        return {"state": "todo", "command": command}
    scores = pd.read_csv(path)
    methods = scores[~scores["method"].isin(("thresholds", "global_threshold"))]  # rows about the winner only
    if methods.get("cv_score_thresholded", pd.Series(dtype=float)).notna().any():
        key, mode = "cv_score_thresholded", "max"  # a multilabel F-beta run: ranked after each method's thresholds
    else:
        # F-beta variants (f1_macro, ...) are not registered names: every one of them is higher-is-better.
        key, mode = "cv_score", getattr(METRICS.get(methods["metric"].iloc[0]), "mode", "max")
    winner = methods.loc[methods[key].idxmin() if mode == "min" else methods[key].idxmax()]
    return {"state": "done", "winner": winner["method"], "metric": winner["metric"], "score_by": key,
            "cv_score": float(winner[key]), "path": run.show(path)}


def _retrieve(run: Run, command: str | None) -> dict:
    """retrieval/selection.json's winner."""
    selection = _read_json(run.retrieval_dir / "selection.json")
    if selection is None:
        return {"state": "todo", "command": command}
    metric = selection.get("metric")
    return {"state": "done", "winner": selection.get("winner"), "metric": metric,
            "cv_score": (selection.get("cv") or {}).get(metric), "path": run.show(run.retrieval_dir)}


def stages(run: Run, task: str | None, models: list[dict]) -> dict:
    """predict, stack or retrieve (whichever the task uses), report."""
    where = run.show()
    complete = [m for m in models if m["state"] == "complete"]
    then = (lambda stage: f"python -m ensemble.{stage} --run {where}") if complete else (lambda stage: None)
    report = run.report_dir / "index.html"
    return {
        "predict": {"done": sum(m["predicted"] for m in complete), "models": len(complete),
                    "command": then("predict")},
        "stack": _stack(run, then("stack")) if task and task != "retrieval" else None,
        "retrieve": _retrieve(run, then("retrieve")) if task == "retrieval" else None,
        "report": {"state": "done", "path": run.show(report)} if run.exists(report) else {"state": "todo"},
    }


# --------------------------------------------------------------------------- the whole run


def run_status(run: Run, now: float | None = None) -> dict:
    """Everything `python -m ensemble.status` prints, as a JSON-able dict; reads files only."""
    now = time.time() if now is None else now
    run.pull("", only=STATUS_FILES)  # a URI run: its small files into the scratch copy (a directory: nothing)
    lock = read_lock(run, now)
    if lock is None:  # a sweep that holds the lock may still be planning: no folds.csv yet
        run.check()
    live = _sweep_is_live(lock)
    configs = list(run.configs().values())
    errors = tune_errors(run) if not live else {}
    models, spans = [], []
    for config in configs:
        model, model_spans = model_status(run, config, live, errors, now)
        models.append(model)
        spans += model_spans
    done = sum(m["fold_epochs"] for m in models)
    total = done + sum(m["left_fold_epochs"] for m in models)
    elapsed = _active_seconds(spans) if spans else None
    first = configs[0] if configs else {}
    task, metric = first.get("task"), first.get("metric")
    return {
        "run": run.show(), "task": task, "metric": metric,
        "mode": (first.get("mode") or METRICS[metric].mode) if metric else None, "k": first.get("k"),
        "lock": lock, "models": models,
        "sweep": {"live": live, "fold_epochs": done, "total_fold_epochs": total, "elapsed": elapsed,
                  "eta": eta(elapsed, done, total) if live and elapsed is not None else None,
                  "states": dict(Counter(m["state"] for m in models))},
        **stages(run, task, models),
    }


# --------------------------------------------------------------------------- text


def format_status(doc: dict) -> str:
    """The lines `python -m ensemble.status` prints (the module docstring shows them)."""
    models = doc["models"]
    head = f"{doc['run']}: {len(models)} model(s)"
    if doc["metric"]:
        head += f" x {doc['k']} folds, {doc['metric']} ({'lower' if doc['mode'] == 'min' else 'higher'} is better)"
    lines = [head, f"{'lock':<9} {_lock_text(doc['lock'])}"]
    width = label_width([m["label"] for m in models]) if models else 20
    for m in models:
        state = m["state"] + (f" ({m['stopped']})" if m["stopped"] else "")
        lines.append("  " + model_line(m["label"], width, m["fold_epochs"], m["total_fold_epochs"], m["metric"],
                                       m["score"], m["best"], m["elapsed"], state) + f"  [{m['model_id']}]"
                     + (f"  error: {m['error']}" if m["error"] else ""))
    lines.append(f"{'sweep':<9} {_sweep_text(doc['sweep'], models)}")
    predict = doc["predict"]
    text = f"{predict['done']} of {predict['models']} complete model(s) predicted"
    if predict["done"] < predict["models"]:
        text += f": {predict['command']}"
    lines.append(f"{'predict':<9} {text}")
    for stage in ("stack", "retrieve"):
        if doc[stage] is not None:
            lines.append(f"{stage:<9} {_stage_text(doc[stage])}")
    report = doc["report"]
    lines.append(f"{'report':<9} {report['path'] if report['state'] == 'done' else 'todo'}")
    return "\n".join(lines)


def _lock_text(lock: dict | None) -> str:
    if lock is None:
        return "free: no launch is running"
    beat = f", heartbeat {max(lock['heartbeat_age'], 0):.0f} s ago" if "heartbeat" in lock else ""
    if lock["live"]:
        return f"held by {_describe(lock)}{beat}"
    return f"stale: {_describe(lock)}{beat}; {lock['stale']}: the next launch takes it over"


def _sweep_text(sweep: dict, models: list[dict]) -> str:
    if not models:
        return "no models yet (the launch is still planning)" if sweep["live"] else "no models"
    counts = ", ".join(f"{n} {state}" for state, n in sweep["states"].items())
    text = f"{sweep['fold_epochs']}/{sweep['total_fold_epochs']} fold-epochs: {counts}"
    if sweep["elapsed"] is not None:
        text += f"; {_clock(sweep['elapsed'])} elapsed"
    if sweep["eta"] is not None:
        text += f", ETA {_clock(sweep['eta'])}"
    if not sweep["live"] and any(m["state"] in ("failed", "interrupted") for m in models):
        text += "; continue with the sweep's command and --resume"
    return text


def _stage_text(stage: dict) -> str:
    if stage["state"] == "todo":
        return f"todo: {stage['command']}" if stage["command"] else "todo"
    score = "" if stage["cv_score"] is None else f": cv {stage['metric']} {stage['cv_score']:.5f}"
    if stage.get("score_by") == "cv_score_thresholded":
        score += " after its own per-label thresholds"
    return f"winner {stage['winner']}{score} ({stage['path']})"


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.status",
                                description="Where a run stands: each model's state, progress, scores and ETA, the "
                                            "later stages and who holds run.lock. Reads files only: safe while a "
                                            "sweep runs.")
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/), or its URI (s3://..., file://...)")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    with open_run(args.run) as run:
        doc = run_status(run)
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
