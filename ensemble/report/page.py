"""The report's files: index.html (self-contained), one PNG per figure, leaderboard.csv.

`render(report, space_href)` decides which sections the collected inputs
support, draws their figures and fills `templates/report.html.j2`. The page
embeds every figure as a data: URI (one file to mail or archive) and links
each to its PNG beside it (to open full size). No JavaScript and no external
URL: the page opens offline, from a laptop or a bucket.
"""

from __future__ import annotations

import base64
import math

import jinja2
import numpy as np
import pandas as pd

from ensemble.report import figures
from ensemble.report.collect import CURVE_MODELS, RECALL_KS, Report

TTA_MODELS = 20  # models in the TTA figure


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def _signed(value, digits: int = 4) -> str:
    return "" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def _clock(seconds) -> str:
    """'1:02:03' or '2:03' (minutes:seconds); blank when unknown."""
    if seconds is None or math.isnan(seconds):
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _epochs(best_epochs: str) -> str:
    """'10 10 10 10 10' -> '10' (every fold's best epoch the same): a narrower leaderboard."""
    parts = str(best_epochs).split()
    return parts[0] if parts and len(set(parts)) == 1 else str(best_epochs)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("ensemble.report"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, signed=_signed, clock=_clock, epochs=_epochs)
    return env


# ------------------------------------------------------------------ the leaderboard table


def leaderboard_table(report: Report) -> pd.DataFrame:
    """One row per model, best first: what leaderboard.csv holds and the page's table shows."""
    k = max((len(m.fold_scores) for m in report.models), default=0)
    rows = []
    for rank, m in enumerate(report.models, 1):
        rows.append({"rank": rank, "model": m.label, "model_id": m.model_id, "state": m.state, "metric": report.metric,
                     **{f"fold{f}": (m.fold_scores[f] if f < len(m.fold_scores) else None) for f in range(k)},
                     "mean": m.mean, "std": m.std,
                     "best_epochs": " ".join("-" if e is None else str(e) for e in m.best_epochs),
                     "oof_score": m.oof_score, "oof_tta_score": m.tta_score, "tta_gain": m.tta_gain,
                     "train_seconds": m.train_seconds, "predict_seconds": m.predict_seconds})
    if any(m.start for m in report.models):  # rounds: each model against the one it grew from
        means = {m.model_id: m.mean for m in report.models}
        sign = 1.0 if report.mode == "min" else -1.0
        for row, m in zip(rows, report.models):
            before = means.get(m.start)
            row |= {"start": m.start, "round_gain": None if before is None or m.mean is None
                    else sign * (before - m.mean)}
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ sections


def _leaderboard_section(report: Report, board: pd.DataFrame, files: dict) -> dict | None:
    if board.empty:
        return None
    files["leaderboard.csv"] = board.to_csv(index=False).encode()
    scored = [m for m in report.models if m.mean is not None]
    if scored:
        files["leaderboard.png"] = figures.leaderboard([m.label for m in scored], [m.fold_scores for m in scored],
                                                       report.metric, report.mode)
    return {"rows": board.to_dict("records"), "k": sum(c.startswith("fold") for c in board.columns),
            "predicted": bool(board["oof_score"].notna().any()),
            "predict_times": bool(board["predict_seconds"].notna().any()), "rounds": "start" in board,
            "labels": {m.model_id: m.label for m in report.models}}


def _run_section(report: Report, space_href: str | None) -> dict:
    info = report.run
    states: dict[str, list[str]] = {}
    for m in report.models:
        states.setdefault(m.state, []).append(m.label)
    order = ["complete", "training", "todo", "pruned", "interrupted", "failed"]
    return {"info": info, "space_href": space_href, "states": sorted(states.items(), key=lambda s: order.index(s[0]))}


def _curves_section(report: Report, files: dict) -> dict | None:
    models = [m for m in report.models if any(m.histories)]
    if not models or not report.metric:
        return None
    shown = models[:CURVE_MODELS]
    files["curves.png"] = figures.learning_curves([m.label for m in shown], [m.histories for m in shown],
                                                  report.metric)
    return {"shown": len(shown), "total": len(models)}


def diversity(report: Report) -> dict | None:
    """Correlation of the complete models' OOF predictions (`Report.oof_vectors`), in hierarchical-clustering
    order, and the most and least alike pairs; None below two models."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    models = [m for m in report.models if m.model_id in report.oof_vectors]
    if len(models) < 2:
        return None
    vectors = np.stack([report.oof_vectors[m.model_id] for m in models]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(vectors), nan=0.0)  # a constant model correlates with nothing
    np.fill_diagonal(corr, 1.0)
    order = leaves_list(linkage(squareform(1 - corr, checks=False), "average")) if len(models) > 2 else [0, 1]
    corr, models = corr[np.ix_(order, order)], [models[i] for i in order]
    labels = [m.label for m in models]
    upper = np.triu_indices(len(models), 1)
    (low, a, b), (high, c, d) = min(zip(corr[upper], *upper)), max(zip(corr[upper], *upper))
    rank = {m.model_id: r for r, m in enumerate(report.models, 1)}
    return {"labels": labels, "ranks": [rank[m.model_id] for m in models], "corr": corr, "n": len(models),
            "least": (labels[a], labels[b], low), "most": (labels[c], labels[d], high)}


def _diversity_section(report: Report, files: dict) -> dict | None:
    found = diversity(report)
    if found is None:
        return None
    files["diversity.png"] = figures.correlation_heatmap(found["labels"], found["ranks"], found["corr"])
    return found


def _stacking_section(report: Report, files: dict) -> dict | None:
    s = report.stacking
    if s is None:
        return None
    in_key = s.key.replace("cv_", "in_sample_")
    rows = s.scores[(s.scores["metric"] == s.metric) & s.scores[s.key].notna()]
    thresholded = s.key != "cv_score"
    files["stacking.png"] = figures.stacking_scores(rows["method"].tolist(), rows[s.key].to_numpy(float),
                                                    rows[in_key].to_numpy(float),
                                                    f"{s.metric} after per-label thresholds" if thresholded else s.metric,
                                                    s.mode, s.winner)
    sign = 1.0 if s.mode == "min" else -1.0
    single = s.best_single if s.best_single and s.best_single[0] != s.winner else None
    mean = s.mean_score if s.winner != "mean" else None
    out = {"s": s, "thresholded": thresholded, "table": s.scores.to_dict("records"),
           "columns": [c for c in s.scores.columns if s.scores[c].notna().any()],
           "vs_single": sign * (single[1] - s.winner_score) if single else None,
           "vs_mean": sign * (mean - s.winner_score) if mean is not None else None,
           "single_label": _label_of(report, single[0].split(":", 1)[1]) if single else None, "weights": []}
    if s.selection and s.selection.get("trajectory"):
        files["greedy.png"] = figures.greedy_trajectory(s.selection["trajectory"], s.selection.get("best_step"),
                                                        s.selection.get("metric", s.metric), s.mode)
        labels = {m.model_id: m.label for m in report.models}
        counts = s.selection.get("counts") or {}
        out["weights"] = sorted(((labels.get(i, i), i, w, counts.get(i)) for i, w in s.selection["weights"].items()
                                 if w > 0), key=lambda row: -row[2])
    return out


def _label_of(report: Report, model_id: str) -> str | None:
    return next((m.label for m in report.models if m.model_id == model_id), None)


def _task_section(report: Report, files: dict) -> dict | None:
    """Multiclass: confusion and reliability; multilabel: thresholds and histograms; retrieval: recall@k."""
    if report.run.task == "retrieval":
        return _retrieval_section(report, files) if report.retrieval else None
    outcome = report.outcome
    if outcome is None:
        return None
    classes = report.run.classes
    if report.run.task == "multiclass":
        files["confusion.png"] = figures.confusion_matrix(outcome.y_true, outcome.proba, classes)
        files["reliability.png"] = figures.reliability(outcome.y_true, outcome.proba)
        return {"kind": "multiclass", "source": outcome.source}
    keep = np.sort(np.argsort(-(outcome.y_true >= 0.5).sum(0), kind="stable")[:figures.MAX_PANELS])  # most frequent
    shown = [classes[j] for j in keep]
    files["thresholds.png"] = figures.threshold_curves(outcome.y_true[:, keep], outcome.proba[:, keep], shown,
                                                       outcome.thresholds[keep], outcome.beta)
    files["histograms.png"] = figures.label_histograms(outcome.y_true[:, keep], outcome.proba[:, keep], shown)
    return {"kind": "multilabel", "source": outcome.source, "threshold_source": outcome.threshold_source,
            "beta": outcome.beta, "shown": len(shown), "total": len(classes)}


def _retrieval_section(report: Report, files: dict) -> dict:
    """Each model's recall@k curve, and the retrieve stage's combined methods at the k it scored."""
    r = report.retrieval
    methods, table = {}, None
    if r.methods is not None:
        for row in r.methods.to_dict("records"):
            if str(row["method"]).startswith("single:"):
                continue  # the model's own curve, drawn in full
            points = {k: row[c] for k, c in ((1, "cv_top1"), *((k, f"cv_recall@{k}") for k in RECALL_KS))
                      if c in row and pd.notna(row[c])}
            if points:
                methods[str(row["method"])] = points
        table = r.methods[[c for c in r.methods.columns if c == "method" or c.startswith("cv_")]]
    files["recall.png"] = figures.recall_curves(r.curves, RECALL_KS, methods)
    return {"kind": "retrieval", "curves": len(r.curves), "cap": CURVE_MODELS,
            "table": None if table is None else table.to_dict("records"),
            "columns": [] if table is None else list(table.columns)}


def _tta_section(report: Report, files: dict) -> dict | None:
    models = [m for m in report.models if m.view_scores and m.oof_score is not None]  # predict writes both
    if not models:
        return None
    shown = models[:TTA_MODELS]
    files["tta.png"] = figures.tta_views([m.label for m in shown], [m.view_scores for m in shown],
                                         [m.tta_score for m in shown], [m.oof_score for m in shown], report.metric,
                                         report.mode)
    return {"shown": len(shown), "total": len(models)}


# ------------------------------------------------------------------ the page


SECTIONS = (("run", "Run"), ("leaderboard", "Leaderboard"), ("curves", "Learning curves"),
            ("diversity", "Diversity"), ("stacking", "Stacking"), ("task", None), ("tta", "Test-time augmentation"))
TASK_TITLES = {"multiclass": "Confusion and calibration", "multilabel": "Thresholds per label",
               "retrieval": "Retrieval: recall@k"}


def render(report: Report, space_href: str | None) -> dict[str, bytes]:
    """Every file of report/ (relative path -> bytes): index.html, the figures' PNGs, leaderboard.csv.

    space_href: the link from index.html to the run's space.yaml (None: no such file)."""
    files: dict[str, bytes] = {}
    sections = {"run": _run_section(report, space_href),
                "leaderboard": _leaderboard_section(report, leaderboard_table(report), files),
                "curves": _curves_section(report, files), "diversity": _diversity_section(report, files),
                "stacking": _stacking_section(report, files), "task": _task_section(report, files),
                "tta": _tta_section(report, files)}
    task_title = TASK_TITLES.get(report.run.task or "", "")
    toc = [(key, title or task_title) for key, title in SECTIONS if sections[key] is not None]
    images = {name: base64.b64encode(data).decode("ascii") for name, data in files.items() if name.endswith(".png")}
    html = _environment().get_template("report.html.j2").render(
        report=report, toc=toc, sections=sections, images=images, metric=report.metric or "",
        direction=figures.better(report.mode), task_title=task_title)
    files["index.html"] = html.encode("utf-8")
    return files

