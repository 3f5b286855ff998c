"""Free the disk of the models an ensemble does not use: `python -m ensemble.prune --run DIR --keep selected`.

A model's fold checkpoints are most of a run's disk: weights.pt (the best epoch, what predict loads)
and last.pt (the point a sweep resumes from). `--keep` says whose weights.pt stay:

  selected  the models with weight > 0 in the stack's greedy selection (ensemble/selection.json) and,
            for a retrieval run, in retrieval/selection.json; a complete model neither file mentions
            (stacked before it was complete) is kept
  top:N     the N best complete models by leaderboard.csv's mean (config.json's mode: min or max)
  all       every model's

last.pt of a complete model is freed whatever --keep says: all its folds are trained, so nothing
resumes from it. Everything else stays: the predictions (oof.parquet, oof_tta.parquet, test.parquet,
predict.json, emb/) and each fold's oof.parquet and metrics.json, so stack, retrieve and report work
as before, and a sweep's --resume still sees the model complete (its oof.parquet; every fold's
metrics.json says complete) and never trains it again. A model whose weights are freed is marked in
models/<id>/status.json ({"state": "complete", "weights": "pruned", ...}); predict keeps its
predictions and refuses to make them again, naming the reason. Models that are not complete
(training, stopped by the scheduler) are never touched.

Without --yes the plan is printed and nothing is deleted. The run's lock is held throughout, so a
prune never races a sweep or predict; a second prune with the same --keep frees nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import pandas as pd

from ensemble.errors import UserError, cli_main, command_line
from ensemble.metrics import METRICS
from ensemble.run import Run, locked, open_run
from ensemble.run.layout import CHECKPOINT_FILES
from ensemble.tune.progress import model_label

SELECTION = "selection.json"  # written by the stack (ensemble/) and by retrieve (retrieval/)


@dataclass(frozen=True)
class Keep:
    """A parsed --keep: 'selected', 'all', or 'top' with its n."""

    kind: str
    n: int = 0

    def __str__(self) -> str:
        return f"top:{self.n}" if self.kind == "top" else self.kind


def parse_keep(text: str) -> Keep:
    if text in ("selected", "all"):
        return Keep(text)
    kind, _, n = text.partition(":")
    if kind == "top" and n.isascii() and n.isdigit() and int(n) >= 1:
        return Keep("top", int(n))
    raise UserError(f"The 'keep' parameter of prune must be one of selected, top:N (N >= 1, e.g. top:5), all. "
                    f"Got {text!r} instead.")


@dataclass
class ModelPrune:
    """What the prune does to one model: the files --yes deletes (run-relative path -> bytes)."""

    model_id: str
    label: str
    state: str  # Run.model_state: complete | pruned | todo
    keep_weights: bool
    action: str = ""  # what the plan says it does
    files: dict[str, int] = field(default_factory=dict)
    note: str = ""  # why it is kept although --keep does not name it

    @property
    def size(self) -> int:
        return sum(self.files.values())


# --------------------------------------------------------------------------- which weights stay


def kept_models(run: Run, keep: Keep, configs: dict[str, dict], complete: list[str]) -> tuple[set[str], dict]:
    """The complete models whose weights.pt stay, and a note for those kept although --keep does not name them."""
    if keep.kind == "all":
        return set(complete), {}
    if keep.kind == "selected":
        weights = _selection_weights(run)
        unseen = [m for m in complete if m not in weights]
        note = "not in any selection.json (stacked before it was complete): kept; stack again to weigh it"
        return {m for m, w in weights.items() if w > 0} | set(unseen), dict.fromkeys(unseen, note)
    scores = _leaderboard_means(run, complete)
    config = configs[complete[0]]
    mode = config.get("mode") or getattr(METRICS.get(config.get("metric")), "mode", None)
    if mode not in ("min", "max"):
        raise UserError(f"{run.show(run.model_dir(complete[0]) / 'config.json')}: no 'mode' (min or max), so "
                        "--keep top:N cannot tell the best models; use --keep selected or --keep all.")
    best = scores.sort_values(ascending=mode == "min", kind="stable").index[:keep.n]
    unranked = [m for m in complete if m not in scores.index]
    return set(best) | set(unranked), dict.fromkeys(unranked, "no mean score in leaderboard.csv: kept")


def _selection_weights(run: Run) -> dict[str, float]:
    """Model id -> its largest weight in ensemble/selection.json and retrieval/selection.json."""
    paths = [d / SELECTION for d in (run.ensemble_dir, run.retrieval_dir) if (d / SELECTION).exists()]
    if not paths:
        raise UserError(f"{run.show(run.ensemble_dir / SELECTION)}: not found, so --keep selected does not know "
                        f"which models the ensemble uses: run python -m ensemble.stack --run {run.location} first "
                        "(python -m ensemble.retrieve for a retrieval run), or use --keep top:N.")
    weights: dict[str, float] = {}
    for path in paths:
        try:
            found = json.loads(path.read_text())["weights"]
            for model_id, w in found.items():
                weights[model_id] = max(weights.get(model_id, 0.0), float(w))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{run.show(path)}: no 'weights' of model id -> number ({type(exc).__name__}: {exc}); "
                            "run the stack (or retrieve) again to rewrite it.") from None
    return weights


def _leaderboard_means(run: Run, complete: list[str]) -> pd.Series:
    """model_id -> mean score of the complete models leaderboard.csv ranks."""
    path = run.leaderboard_file
    if not path.exists():
        raise UserError(f"{run.show(path)}: not found, so --keep top:N cannot rank the models (the sweep writes it "
                        "at the end of every launch: resume the sweep to write it), or use --keep selected.")
    board = pd.read_csv(path, dtype={"model_id": str})
    if not {"model_id", "mean"} <= set(board.columns):
        raise UserError(f"{run.show(path)}: needs the columns model_id and mean, found {list(board.columns)}; "
                        "resume the sweep to write it again.")
    means = board.drop_duplicates("model_id", keep="last").set_index("model_id")["mean"]
    means = pd.to_numeric(means, errors="coerce").dropna()
    return means[means.index.isin(complete)]


# --------------------------------------------------------------------------- the plan, then the deletions


def plan_prune(run: Run, keep: Keep) -> list[ModelPrune]:
    """What a prune with `keep` frees, model by model; reads the run, writes nothing."""
    configs = run.configs()
    states = {m: run.model_state(m) for m in configs}
    complete = [m for m, state in states.items() if state == "complete"]
    kept, notes = kept_models(run, keep, configs, complete) if complete else (set(), {})
    sizes = run.file_sizes(run.models_dir)  # one listing, at the URI for a URI run
    plan = []
    for model_id, config in configs.items():
        label = model_label(config.get("backbone", model_id), config.get("searched") or {}, config.get("round", 1))
        item = ModelPrune(model_id, label, states[model_id], model_id in kept or model_id not in complete,
                          note=notes.get(model_id, ""))
        unfinished = [f for f in range(config["k"]) if not (run.read_metrics(model_id, f) or {}).get("complete")]
        if item.state != "complete":
            item.action = "not touched: " + ("stopped by the scheduler" if item.state == "pruned" else "not complete")
        elif unfinished:  # a complete model's folds all are; a resume would train these folds again
            item.action = f"not touched: fold(s) {unfinished} not complete in their metrics.json"
        else:
            weights, last = CHECKPOINT_FILES
            names = (last,) if item.keep_weights else (weights, last)
            paths = [run.rel(run.fold_dir(model_id, f) / name) for f in range(config["k"]) for name in names]
            item.files = {p: sizes[p] for p in paths if p in sizes}
            item.action = _action(item, run.weights_pruned(model_id))
        plan.append(item)
    return plan


def apply_prune(run: Run, plan: list[ModelPrune], command: str) -> None:
    """Delete the plan's files, here and at the URI; a model losing its weights is marked first, so a crash
    midway leaves it marked (predict refuses it by name) and the same prune finishes the job."""
    for item in plan:
        if not item.files:
            continue
        if not item.keep_weights:
            before = run.read_status(item.model_id).get("freed_bytes", 0)
            run.mark_weights_pruned(item.model_id, pruned_by=command, freed_bytes=before + item.size,
                                    pruned_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        run.remove(*item.files)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _action(item: ModelPrune, pruned_before: bool) -> str:
    files = f" ({len(item.files)} files)" if item.files else ""
    if not item.keep_weights:
        return f"frees weights.pt + last.pt{files}" if item.files else "weights already pruned"
    if pruned_before:  # kept now, freed by an earlier prune with another --keep
        return "its weights.pt were freed by an earlier prune" + (f"; frees last.pt{files}" if files else "")
    return f"keeps weights.pt, frees last.pt{files}" if item.files else "keeps weights.pt"


def print_plan(run: Run, keep: Keep, plan: list[ModelPrune]) -> None:
    rule = {"selected": "weight > 0 in ensemble/ or retrieval/selection.json", "all": "every model's weights.pt",
            "top": f"the {keep.n} best complete model(s) of leaderboard.csv"}[keep.kind]
    print(f"Prune {run.show()} with --keep {keep} ({rule}); last.pt of every complete model is freed, "
          "predictions are kept:")
    width = [max([len(getattr(i, key)) for i in plan] + [5]) for key in ("model_id", "label", "state")]
    for item in plan:
        size = _size(item.size) if item.files else "-"
        note = f"  [{item.note}]" if item.note else ""
        print(f"  {item.model_id:<{width[0]}}  {item.label:<{width[1]}}  {item.state:<{width[2]}}  {size:>9}  "
              f"{item.action}{note}")
    files = sum(len(i.files) for i in plan)
    print(f"total: {_size(sum(i.size for i in plan))} in {files} file(s) of "
          f"{sum(bool(i.files) for i in plan)} model(s)")


def prune(args: argparse.Namespace, command: str = "python -m ensemble.prune") -> list[ModelPrune]:
    """Plan the prune of `args.run`, print it, and with `args.yes` delete its files; returns the plan."""
    keep = parse_keep(args.keep)  # before the run is opened: a typo changes nothing
    with open_run(args.run) as run:
        if not run.store:
            run.check()
        elif not (run.exists(run.folds_file) and run.exists(run.models_dir)):
            run.check()  # looked up at the URI: the scratch copy is still empty, so this names the URI
        run.check_writable()
        with locked(run, command):
            run.pull_artifacts()  # configs, status.json, metrics.json, selection.json, leaderboard.csv
            plan = plan_prune(run, keep)
            print_plan(run, keep, plan)
            total = sum(item.size for item in plan)
            if not any(item.files for item in plan):
                print("nothing to free: no complete model holds a checkpoint that this --keep frees.")
            elif not args.yes:
                print(f"nothing deleted: add --yes to free {_size(total)}")
            else:
                apply_prune(run, plan, command)
                gone = ", ".join(i.model_id for i in plan if i.files and not i.keep_weights)
                print(f"freed {_size(total)}. Stack and report work as before"
                      + (f"; predict cannot run {gone} again (their predictions are kept)." if gone else "."))
    return plan


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.prune",
                                description="Free the checkpoints of the models the ensemble does not use; every "
                                            "prediction file stays, and --resume does not train them again.")
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/), or its URI (s3://..., file://...)")
    p.add_argument("--keep", required=True, metavar="selected|top:N|all",
                   help="whose weights.pt stay: the stack's selection (weight > 0), the N best of leaderboard.csv, "
                        "or all (last.pt of complete models is freed in every case)")
    p.add_argument("--yes", action="store_true", help="delete; without it the plan is printed and nothing deleted")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    prune(parse_args(argv), command_line("python -m ensemble.prune", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
