"""What a person watching a sweep sees: one line per model, then the leaderboard.

  test_resnet lr=0.003        fold-epochs 6/9  log_loss 0.4121 (best 0.3980)  0:42  ETA 0:21  training

On a terminal the block is redrawn in place; in a log file (stdout not a terminal)
a line is printed each time a model changes (an epoch reported by every fold, a
model finished, pruned or failed), so a 4-model demo stays within a screen.
`leaderboard` is the final table, one row per model with its searched params by
name, written to <run>/leaderboard.csv.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ensemble.run import Run, total_epochs


def model_label(backbone: str, searched: dict, round: int = 1) -> str:
    """'test_resnet lr=0.003': the backbone and the searched params by name (the fixed ones are the space's);
    a later round's model ends in its round ('test_resnet lr=0.003 r2')."""
    return " ".join([backbone, *(f"{k}={_short(v)}" for k, v in sorted(searched.items()))] + [f"r{round}"] * (round > 1))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def label_width(labels) -> int:
    """The column the model labels are padded to: 20 to 48 characters."""
    return min(max(max(len(label) for label in labels), 20), 48)


def eta(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left at the pace so far (`done` of `total` fold-epochs in `elapsed`); None before the first
    fold-epoch and after the last."""
    return elapsed / done * (total - done) if 0 < done < total else None


def model_line(label: str, width: int, fold_epochs: int, total: int, metric: str, score: float | None,
               best: float | None, elapsed: float | None, state: str) -> str:
    """One model's line, as the sweep shows it and `python -m ensemble.status` prints it (module docstring)."""
    parts = [f"{label:<{width}}", f"fold-epochs {fold_epochs:>{len(str(total))}}/{total}"]
    if score is not None:
        parts.append(f"{metric} {score:.4f} (best {best:.4f})")
    if elapsed is not None:
        parts.append(_clock(elapsed))
        left = eta(elapsed, fold_epochs, total) if state == "training" else None
        if left is not None:
            parts.append(f"ETA {_clock(left)}")
    parts.append(state)
    return "  ".join(parts)


@dataclass
class _Model:
    label: str
    k: int
    epochs: int
    state: str = "waiting"  # waiting | training | complete | pruned | stopped early | failed | retrying
    fold_epochs: int = 0
    score: float | None = None
    best: float | None = None
    started: float | None = None
    ended: float | None = None
    folds_dir: object = field(default=None, repr=False)  # Run, for fold progress between epoch reports

    @property
    def total(self) -> int:
        return self.k * self.epochs


class SweepProgress:
    """The compact display of a sweep; `callback()` plugs it into Ray Tune."""

    def __init__(self, configs: list[dict], searched: dict[str, dict], metric: str, mode: str,
                 run: Run | None = None, stream=None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.metric, self.mode, self.run = metric, mode, run
        self.models = {c["model_id"]: _Model(model_label(c["backbone"], searched.get(c["model_id"], {}), c.get("round", 1)), c["k"],
                                             total_epochs(c)) for c in configs}
        self.began, self.drawn, self.last_tick = time.time(), 0, 0.0
        self.width = label_width(m.label for m in self.models.values())
        slots = sum(m.total for m in self.models.values())
        rounds = sorted({c.get("round", 1) for c in configs})
        what = f"Round {rounds[0]}" if rounds != [1] and len(rounds) == 1 else "Sweep"
        self._print(f"{what}: {len(self.models)} model(s) x {configs[0]['k']} folds, {slots} fold-epochs "
                    f"({metric}, {'lower' if mode == 'min' else 'higher'} is better)")

    # ----------------------------------------------------------------- events

    def started(self, model_id: str) -> None:
        m = self.models[model_id]
        if m.started is None:
            m.started = time.time()
        m.state = "training"
        self._changed(model_id)

    def result(self, model_id: str, epoch: int, score: float) -> None:
        m = self.models[model_id]
        m.fold_epochs = max(m.fold_epochs, epoch * m.k)
        m.score = score
        if m.best is None or (score < m.best if self.mode == "min" else score > m.best):
            m.best = score
        if epoch < m.epochs or self.tty:  # the last epoch's line is the 'complete' line that follows
            self._changed(model_id)

    def ended(self, model_id: str, state: str) -> None:
        m = self.models[model_id]
        m.state, m.ended = state, time.time()
        if state == "complete":
            m.fold_epochs = m.total
        self._changed(model_id)

    def tick(self) -> None:
        """Between events: fold progress from the folds' metrics.json (local runs), the clock (terminal)."""
        now = time.time()
        if not self.tty or now - self.last_tick < 1.0:
            return
        self.last_tick = now
        if self.run is not None and not self.run.store:
            for model_id, m in self.models.items():
                if m.state == "training":
                    m.fold_epochs = max(m.fold_epochs, self._fold_epochs(model_id, m.k))
        self._redraw()

    def _fold_epochs(self, model_id: str, k: int) -> int:
        done = 0
        for f in range(k):
            try:
                done += json.loads((self.run.fold_dir(model_id, f) / "metrics.json").read_text())["epochs"]
            except (OSError, ValueError, KeyError):
                pass
        return done

    # ----------------------------------------------------------------- drawing

    def line(self, model_id: str) -> str:
        m = self.models[model_id]
        elapsed = (m.ended or time.time()) - m.started if m.started else None
        return model_line(m.label, self.width, m.fold_epochs, m.total, self.metric, m.score, m.best, elapsed, m.state)

    def footer(self) -> str:
        done = sum(m.fold_epochs for m in self.models.values())
        total = sum(m.total for m in self.models.values())
        elapsed = time.time() - self.began
        left = eta(elapsed, done, total)
        return f"{done}/{total} fold-epochs, {_clock(elapsed)} elapsed" + (f", ETA {_clock(left)}" if left is not None else "")

    def _changed(self, model_id: str) -> None:
        if self.tty:
            self._redraw()
        else:
            self._print(f"[{_clock(time.time() - self.began):>5}] {self.line(model_id)}")

    def _redraw(self) -> None:
        lines = [self.line(m) for m in self.models] + [self.footer()]
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.stream.flush()
        self.drawn = len(lines)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    # ----------------------------------------------------------------- Ray Tune

    def callback(self):
        """A Ray Tune callback that feeds this display (runs in the driver)."""
        from ray import tune

        progress = self

        class Progress(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                progress.started(trial.config["model_id"])

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if progress.metric in result and "epoch" in result:
                    progress.result(trial.config["model_id"], int(result["epoch"]), float(result[progress.metric]))

            def on_trial_complete(self, iteration, trials, trial, **info):
                model_id = trial.config["model_id"]
                m = progress.models[model_id]
                last = trial.last_result or {}
                done = last.get("epoch", 0) >= m.epochs
                state = "complete" if done else "stopped early" if last.get("stopped_early") else "pruned"
                progress.ended(model_id, state)

            def on_trial_recover(self, iteration, trials, trial, **info):
                progress.models[trial.config["model_id"]].state = "retrying"
                progress._changed(trial.config["model_id"])

            def on_trial_error(self, iteration, trials, trial, **info):
                progress.ended(trial.config["model_id"], "failed")

            def on_step_end(self, iteration, trials, **info):
                progress.tick()

        return Progress()


# --------------------------------------------------------------------------- the leaderboard


def leaderboard(run: Run, configs: list[dict]) -> pd.DataFrame:
    """One row per model: backbone, searched params by name, state, the monitored metric per fold, mean and std."""
    rows = []
    for config in configs:
        model_id, k, metric = config["model_id"], config["k"], config["metric"]
        folds = [run.read_metrics(model_id, f) or {} for f in range(k)]
        scores = [m.get("best_score") for m in folds]
        known = [s for s in scores if s is not None]
        searched = config.get("searched") or {}
        row = {"model": model_label(config["backbone"], searched, config.get("round", 1)), "model_id": model_id,
               "backbone": config["backbone"], **searched, "state": run.model_state(model_id), "metric": metric,
               "mean": float(np.mean(known)) if known else None,
               "std": float(np.std(known)) if len(known) > 1 else None,
               **{f"fold{f}": s for f, s in enumerate(scores)},
               "best_epochs": " ".join(str(m.get("best_epoch", "-")) for m in folds),
               "epochs": total_epochs(config)}
        if any(c.get("round", 1) > 1 for c in configs):  # what each round is worth: against the model it grew from
            start = config.get("init_from") or (config.get("pseudo") or {}).get("model")
            row |= {"round": config.get("round", 1), "start": start or "", "gain": None}
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    ascending = configs[0]["mode"] == "min"
    if "round" in board:  # gain > 0: better than the model it started from (or took pseudo-labels from)
        means = board.set_index("model_id")["mean"]
        board["gain"] = [(means.get(f, np.nan) - m) * (1 if ascending else -1) if f else np.nan
                         for f, m in zip(board["start"], board["mean"])]
    return board.sort_values("mean", ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def print_leaderboard(board: pd.DataFrame, where: str, stream=None) -> None:
    """The leaderboard as a few readable lines, best first."""
    stream = stream or sys.stdout
    if board.empty:
        print("No models.", file=stream)
        return
    metric = board["metric"].iloc[0]
    k = sum(c.startswith("fold") for c in board.columns)
    width = max(20, min(48, board["model"].str.len().max()))
    round_of = dict(zip(board["model_id"], board["round"])) if "round" in board else {}  # a gain's start has a row
    print(f"\nLeaderboard ({metric}, mean ± std over {k} folds, best first):", file=stream)
    for rank, row in enumerate(board.itertuples(index=False), 1):
        score = "-" if pd.isna(row.mean) else f"{row.mean:.4f}" + ("" if pd.isna(row.std) else f" ± {row.std:.4f}")
        folds = " ".join("-" if pd.isna(getattr(row, f"fold{f}")) else f"{getattr(row, f'fold{f}'):.4f}"
                         for f in range(k))
        gain = "" if pd.isna(getattr(row, "gain", np.nan)) else f"  {row.gain:+.4f} vs r{round_of[row.start]}"
        print(f"{rank:>3}. {row.model:<{width}}  {score:<17}  folds {folds}  best epochs {row.best_epochs}  "
              f"{row.state}{gain}  [{row.model_id}]", file=stream)
    print(f"Wrote {where}", file=stream)
