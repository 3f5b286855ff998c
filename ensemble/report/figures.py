"""The report's figures: each a function of plain arrays that returns PNG bytes (matplotlib, Agg).

Figures are drawn on their own `Figure` with an Agg canvas, never through
pyplot, so building a report leaves no global plotting state behind. Every
figure uses constrained layout (no overlapping text), labelled axes, a title,
and truncated model labels; callers cap how many models or labels one figure
holds (`MAX_PANELS`).
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100  # figures are at most ~1,200 px wide, as wide as the page shows them: sharp enough, small files
MAX_PANELS = 24  # labels per small-multiples figure (multilabel)
LABEL_CHARS = 56  # a timm backbone without its tag and three searched params
FOLD_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")


def short(label: str, chars: int = LABEL_CHARS) -> str:
    """`label` in at most `chars` characters: a long model label first loses its backbone's pretrained tag
    ('resnet50.a1_in1k lr=0.001' -> 'resnet50 lr=0.001': the searched params are what tell models apart),
    then its end, with an ellipsis."""
    if len(label) <= chars:
        return label
    head, _, params = label.partition(" ")
    label = " ".join(part for part in (head.split(".")[0], params) if part)
    return label if len(label) <= chars else label[:chars - 1] + "…"


def better(mode: str) -> str:
    return "lower is better" if mode == "min" else "higher is better"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = min(cols, n)
    return -(-n // cols), cols


# ------------------------------------------------------------------ leaderboard and learning curves


def leaderboard(labels: list[str], fold_scores: list[list[float]], metric: str, mode: str) -> bytes:
    """Each model's fold scores (dots) and mean ± std (bar), best at the top."""
    n = len(labels)
    fig = _figure(11.5, max(2.5, 1.4 + 0.27 * n))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    for row, scores in zip(y, fold_scores):
        scores = np.asarray([s for s in scores if s is not None], dtype=float)
        ax.scatter(scores, np.full(len(scores), row), s=12, color="#9ab8d8", zorder=2)
        ax.errorbar(scores.mean(), row, xerr=scores.std() if len(scores) > 1 else None, fmt="o", color="#1f4e79",
                    capsize=3, zorder=3)
    ax.set_yticks(y, [f"{i + 1}. {short(label, 64)}" for i, label in enumerate(labels)], fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"{metric} per fold ({better(mode)})")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Leaderboard: fold scores (light dots), mean ± std (dark), {n} models")
    return _png(fig)


def learning_curves(labels: list[str], histories: list[list[list[dict]]], metric: str) -> bytes:
    """One panel per model: the validation metric (solid, left axis) and the training loss (dashed, right axis)
    per epoch, one colour per fold."""
    rows, cols = _grid(len(labels), 3)
    fig = _figure(4.2 * cols, 2.9 * rows + 0.6)
    for i, (label, folds) in enumerate(zip(labels, histories)):
        ax = fig.add_subplot(rows, cols, i + 1)
        loss_ax = ax.twinx()
        for f, history in enumerate(folds):
            epochs = [r["epoch"] for r in history]
            color = FOLD_COLORS[f % len(FOLD_COLORS)]
            ax.plot(epochs, [r.get(metric) for r in history], color=color, lw=1.6, marker="o", ms=2.5)
            loss_ax.plot(epochs, [r.get("train_loss") for r in history], color=color, lw=1, ls="--", alpha=0.7)
        backbone, _, params = label.partition(" ")  # two lines: the params are what tell panels apart
        ax.set_title(f"{i + 1}. {short(backbone, 44)}\n{short(params, 52)}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=9)
        ax.set_ylabel(f"validation {metric}", fontsize=9)
        loss_ax.set_ylabel("train loss (dashed)", fontsize=9, color="#555555")
        for axis in (ax, loss_ax):
            axis.tick_params(labelsize=8)
            axis.yaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
        ax.grid(alpha=0.3)
    k = max(len(folds) for folds in histories)
    handles = [ax.plot([], [], color=FOLD_COLORS[f % len(FOLD_COLORS)], lw=1.6)[0] for f in range(k)]
    handles += [ax.plot([], [], color="black", lw=1.6)[0], ax.plot([], [], color="black", lw=1, ls="--")[0]]
    names = [f"fold {f}" for f in range(k)] + [f"validation {metric} (left axis)", "train loss (right axis)"]
    fig.legend(handles, names, loc="outside upper center", ncols=min(k + 2, 8), fontsize=9)
    return _png(fig)


# ------------------------------------------------------------------ diversity and stacking


def correlation_heatmap(labels: list[str], ranks: list[int], corr: np.ndarray) -> bytes:
    """Pairwise OOF correlation, rows and columns already in clustering order. Up to 15 models the axes name
    them; beyond, 6-point names would be unreadable, so they show leaderboard ranks (the page's table maps them)."""
    n = len(labels)
    side = min(13.0, 4.5 + 0.22 * n)
    fig = _figure(side + 2.0, side)
    ax = fig.add_subplot()
    low = max(-1.0, float(np.floor(corr.min() * 20) / 20))  # the colours span the correlations found, not -1..1
    image = ax.imshow(corr, cmap="viridis", vmin=min(low, 0.95), vmax=1.0)
    named = n <= 15
    names = [f"#{r} {short(label, 32)}" if named else str(r) for r, label in zip(ranks, labels)]
    size = 8 if n <= 30 else 7
    ax.set_xticks(range(n), names, rotation=90, fontsize=size)
    ax.set_yticks(range(n), names, fontsize=size)
    if n <= 10:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if corr[i, j] < (low + 1) / 2 else "black")
    if not named:
        ax.set_xlabel("model (leaderboard rank)")
        ax.set_ylabel("model (leaderboard rank)")
    fig.colorbar(image, ax=ax, shrink=0.7, label="Pearson correlation of OOF predictions")
    ax.set_title(f"OOF correlation, {n} models (clustered)", fontsize=11)
    return _png(fig)


def stacking_scores(methods: list[str], cv: np.ndarray, in_sample: np.ndarray, metric: str, mode: str,
                    winner: str) -> bytes:
    """Each method's cross-validated score (filled) and in-sample score (open), joined by a line."""
    n = len(methods)
    fig = _figure(9, max(2.5, 1.3 + 0.42 * n))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    for row, a, b in zip(y, cv, in_sample):
        ax.plot([a, b], [row, row], color="#bbbbbb", lw=1.5, zorder=1)
    ax.scatter(in_sample, y, s=40, facecolors="white", edgecolors="#1f4e79", label="in-sample", zorder=2)
    ax.scatter(cv, y, s=40, color="#1f4e79", label="cross-validated (honest)", zorder=3)
    names = [("★ " if m == winner else "") + short(m, 40) for m in methods]
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"{metric} ({better(mode)})")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    ax.set_title("Stacking: every method's score (★ winner)")
    return _png(fig)


def greedy_trajectory(trajectory: list[float], best_step: int | None, metric: str, mode: str) -> bytes:
    """The in-sample score after each greedy pick, the kept step marked."""
    fig = _figure(9, 3.4)
    ax = fig.add_subplot()
    steps = np.arange(1, len(trajectory) + 1)
    ax.plot(steps, trajectory, marker="o", ms=3, color="#1f4e79")
    if best_step is not None and 1 <= best_step <= len(trajectory):
        ax.axvline(best_step, color="#d62728", ls="--", lw=1)
        ax.annotate(f"kept: step {best_step}", (best_step, trajectory[best_step - 1]), xytext=(8, 12),
                    textcoords="offset points", fontsize=8, color="#d62728")
    ax.set_xlabel("greedy step (models picked, with replacement)")
    ax.set_ylabel(f"in-sample {metric}")
    ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.grid(alpha=0.3)
    ax.set_title(f"Greedy selection: score after each pick ({better(mode)})")
    return _png(fig)


# ------------------------------------------------------------------ multiclass


def confusion_matrix(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> bytes:
    """Row-normalised confusion matrix of argmax predictions (each row: where that class's images went)."""
    n = len(classes)
    truth, pred = y_true.argmax(1), proba.argmax(1)
    counts = np.zeros((n, n))
    np.add.at(counts, (truth, pred), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(12.0, 3.5 + 0.35 * n)
    fig = _figure(side + 1.4, side)
    ax = fig.add_subplot()
    image = ax.imshow(share * 100, cmap="Blues", vmin=0, vmax=100)
    names = [short(c, 18) for c in classes]
    size = 8 if n <= 20 else 6
    ax.set_xticks(range(n), names, rotation=45 if n <= 20 else 90, ha="right" if n <= 20 else "center",
                  rotation_mode="anchor" if n <= 20 else "default", fontsize=size)
    ax.set_yticks(range(n), names, fontsize=size)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if share[i, j] >= 0.005:  # rounds to at least 1%: a blank cell reads as "almost none"
                    ax.text(j, i, f"{share[i, j] * 100:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, shrink=0.7, label="% of the true class's rows")
    ax.set_title("Confusion matrix (out-of-fold predictions)")
    return _png(fig)


def reliability(y_true: np.ndarray, proba: np.ndarray, bins: int = 10) -> bytes:
    """Confidence (top probability) against accuracy in 10 bins, with how many rows fall in each bin."""
    confidence, correct = proba.max(1), proba.argmax(1) == y_true.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    accuracy = np.bincount(which, weights=correct, minlength=bins) / np.maximum(count, 1)
    mean_conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1)
    ece = float(np.sum(count * np.abs(accuracy - mean_conf)) / max(count.sum(), 1))
    fig = _figure(6.5, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    centres = (edges[:-1] + edges[1:]) / 2
    top.bar(centres[count > 0], accuracy[count > 0], width=1 / bins * 0.9, color="#1f77b4", label="accuracy")
    top.plot([0, 1], [0, 1], ls="--", color="#555555", lw=1, label="perfect calibration")
    top.set_ylabel("accuracy (share correct)")
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    top.set_title(f"Reliability diagram (OOF): expected calibration error {ece:.3f}")
    bottom.bar(centres, count, width=1 / bins * 0.9, color="#aaaaaa")
    bottom.set_xlabel("confidence (top predicted probability)")
    bottom.set_ylabel("rows")
    bottom.set_xlim(0, 1)
    bottom.yaxis.set_major_locator(MaxNLocator(3, integer=True))
    return _png(fig)


# ------------------------------------------------------------------ multilabel


def threshold_curves(y_true: np.ndarray, proba: np.ndarray, classes: list[str], thresholds: np.ndarray,
                     beta: float) -> bytes:
    """Per label: F-beta of that label alone against the threshold, the chosen threshold marked."""
    from ensemble.metrics import fbeta_from_counts

    grid = np.linspace(0, 1, 101)
    positive = y_true >= 0.5
    n_true = positive.sum(0)
    rows, cols = _grid(len(classes), 4)
    fig = _figure(3.2 * cols, 2.5 * rows + 0.4)
    for j, label in enumerate(classes):
        pred = proba[:, j][None, :] >= grid[:, None]  # thresholds x rows
        tp = (pred & positive[:, j][None, :]).sum(1)
        score = fbeta_from_counts(tp, n_true[j], pred.sum(1), beta)
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.plot(grid, score, color="#1f4e79")
        ax.axvline(thresholds[j], color="#d62728", ls="--", lw=1)
        ax.set_title(short(f"{label}: t = {thresholds[j]:.2f}", 30), fontsize=9)
        ax.set_xlabel("threshold", fontsize=8)
        ax.set_ylabel(f"F{beta:g}", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Per-label F{beta:g} against the threshold (dashed red: the chosen threshold)", fontsize=11)
    return _png(fig)


def label_histograms(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> bytes:
    """Per label: the predicted probabilities of its positive and negative rows, each as % of its own rows."""
    edges = np.linspace(0, 1, 21)
    rows, cols = _grid(len(classes), 4)
    fig = _figure(3.2 * cols, 2.5 * rows + 0.7)
    for j, label in enumerate(classes):
        ax = fig.add_subplot(rows, cols, j + 1)
        for mask, color, name in ((y_true[:, j] < 0.5, "#7f7f7f", "negatives"), (y_true[:, j] >= 0.5, "#d62728",
                                                                                  "positives")):
            if mask.any():
                ax.hist(proba[mask, j], bins=edges, weights=np.full(mask.sum(), 100 / mask.sum()), color=color,
                        alpha=0.55, label=name)
        ax.set_title(short(f"{label} ({int((y_true[:, j] >= 0.5).sum())} positive)", 30), fontsize=9)
        ax.set_xlabel("predicted probability", fontsize=8)
        ax.set_ylabel("% of rows", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper center", ncols=2, fontsize=9)
    return _png(fig)


# ------------------------------------------------------------------ retrieval and TTA


def recall_curves(curves: dict[str, list[float]], ks: tuple[int, ...], methods: dict[str, dict[int, float]]) -> bytes:
    """Recall@k per model (lines, k = 1..10) and per retrieve method (markers at the k it scored)."""
    fig = _figure(9, 5.2)
    ax = fig.add_subplot()
    for i, (label, values) in enumerate(curves.items()):
        ax.plot(ks, values, marker="o", ms=3, lw=1.4, label=short(label, 40), color=FOLD_COLORS[i % 10])
    markers = "sD^vP*X"
    for i, (name, points) in enumerate(methods.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], ls=":", marker=markers[i % len(markers)], ms=6, lw=1.2,
                color=FOLD_COLORS[(len(curves) + i) % 10], label=f"retrieve: {short(name, 30)}")
    ax.set_xlabel("k (results looked at)")
    ax.set_ylabel("recall@k (share of queries with a hit)")
    ax.set_xticks(ks)
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    ax.set_title("Recall@k on the held-out folds (leave-one-out)")
    return _png(fig)


def tta_views(labels: list[str], view_scores: list[dict[str, float]], merged: list[float | None],
              plain: list[float], metric: str, mode: str) -> bytes:
    """Per model: how each TTA view alone (dots) and the merged views (black diamond) change the OOF score
    against the model's training-time OOF without TTA (the zero line). Differences, not scores: models'
    scores differ far more than their views do, and on one shared axis the views would collapse to a dot."""
    n = len(labels)
    views = list(dict.fromkeys(v for scores in view_scores for v in scores))
    fig = _figure(10, max(3.2, 2.0 + 0.36 * n))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    ax.axvline(0, color="#555555", lw=1, ls="--", label="no TTA (training-time OOF)")
    for v, view in enumerate(views):
        xs = [(s[view] - base, row) for s, base, row in zip(view_scores, plain, y) if view in s]
        ax.scatter([x for x, _ in xs], [r for _, r in xs], s=30, color=FOLD_COLORS[v % 10], label=short(view, 24),
                   zorder=2)
    kept = [(m - base, row) for m, base, row in zip(merged, plain, y) if m is not None]
    if kept:
        ax.scatter([x for x, _ in kept], [r for _, r in kept], marker="D", s=40, color="black",
                   label="TTA (merged views)", zorder=3)
    ax.set_yticks(y, [short(label, 64) for label in labels], fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"change in OOF {metric} against no TTA ({'negative' if mode == 'min' else 'positive'} is better)")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(views) + 2, 6), fontsize=8)
    ax.set_title("TTA: each view alone and merged, against no TTA")
    return _png(fig)
