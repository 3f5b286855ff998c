"""The retrieve stage: a run's embeddings -> every method scored out of fold -> retrieval/ written as one set.

`load_embeddings` reads and checks each retrieval model's emb/ files (written by
predict). `retrieve_run` scores, on the held-out folds (each held-out image queries
the rest of its fold, whose identities its model never saw):
  single:<model>   each model alone
  concat_equal     every model's embedding concatenated, equal weights
  greedy_concat    weights chosen greedily (ensemble.retrieve.select), cross-validated:
                   for fold f they are chosen on the other folds
then, on the best of those, each query-expansion / re-ranking option (+qe, +dba,
+dba+qe, +k_reciprocal: fixed parameters, nothing fitted, so CV = in-sample). The
best method by CV is applied to the query and gallery sets: `submission.csv`
holds each query's top-k gallery ids. docs/retrieval.md is the manual.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ensemble.errors import UserError
from ensemble.metrics import RETRIEVAL_METRICS
from ensemble.retrieve.metrics import count_relevant, ranked_hits, retrieval_scores
from ensemble.retrieve.rerank import alpha_qe, dba, k_reciprocal
from ensemble.retrieve.search import search
from ensemble.retrieve.select import GreedyConcat, combine, fold_scores, pool_scores
from ensemble.run import Run

OPTIONS = ("qe", "dba", "dba+qe", "k_reciprocal")
FOLD_MERGES = ("mean", "concat")
RERANK_MAX_ITEMS = 20_000  # k-reciprocal re-ranking holds dense (queries + gallery)^2 matrices


@dataclass
class RetrievalData:
    """Every retrieval model's embeddings, aligned on folds.csv's rows (unit rows, float32 for the OOF)."""

    model_ids: list[str]
    ids: np.ndarray  # folds.csv's ids with an embedding in every model
    labels: np.ndarray  # their identities
    folds: np.ndarray
    oof: list[np.ndarray]  # per model: rows x dims
    query_ids: np.ndarray | None = None
    gallery_ids: np.ndarray | None = None
    query: list[np.ndarray] = field(default_factory=list)  # per model: folds x queries x dims (float16, mapped)
    gallery: list[np.ndarray] = field(default_factory=list)
    query_labels: np.ndarray | None = None  # answer keys, when the manifests carry the label column
    gallery_labels: np.ndarray | None = None
    dropped: int = 0  # held-out rows without an embedding in some model (unreadable images)
    metric: str = "digix"


# ------------------------------------------------------------------ loading and checks


def load_embeddings(run: Run, models: list[str] | None = None) -> RetrievalData:
    """Check and read the emb/ files of the run's complete retrieval models (every model, or `models`)."""
    run.check()
    configs = run.configs()
    retrieval = [m for m, c in configs.items() if c["task"] == "retrieval" and run.model_state(m) == "complete"]
    if not retrieval:
        tasks = sorted({c["task"] for c in configs.values()})
        raise UserError(f"{run.show()}: no complete retrieval model (tasks here: {tasks}); python -m ensemble.retrieve "
                        "reads runs of a space with task: retrieval (classification runs: python -m ensemble.stack).")
    unknown = sorted(set(models or []) - set(retrieval))
    if unknown:
        raise UserError(f"--models: {unknown} are not complete retrieval models of {run.show()}; complete: {retrieval}.")
    model_ids = [m for m in retrieval if not models or m in models]
    missing = [m for m in model_ids if not (run.model_dir(m) / "predict.json").exists()]
    if missing:
        raise UserError(f"{run.show()}: {len(missing)} model(s) have no embeddings yet ({missing[:3]}): run "
                        f"python -m ensemble.predict --run {run.show()} first.")
    config = configs[model_ids[0]]
    folds = pd.read_csv(run.folds_file, dtype=str, keep_default_na=False).set_index("id")
    data = RetrievalData(model_ids, folds.index.to_numpy(), folds[config["target"]["column"]].to_numpy(),
                         folds["fold"].astype(int).to_numpy(), [], metric=config["metric"])
    keep = np.ones(len(folds), bool)
    for model_id in model_ids:
        emb, ids = _read_set(run, model_id, "oof", configs[model_id])
        _same_ids(run, model_id, "oof", ids["id"], folds.index, ordered=False)
        emb = np.asarray(emb, dtype=np.float32)[pd.Index(ids["id"]).get_indexer(folds.index)]
        keep &= emb.any(axis=1)  # an all-zero row: an unreadable image (on_bad_image: skip)
        data.oof.append(emb)
    data.dropped = int((~keep).sum())
    data.ids, data.labels, data.folds = data.ids[keep], data.labels[keep], data.folds[keep]
    data.oof = [emb[keep] for emb in data.oof]
    _check_dims(run, model_ids, data.oof)
    if config["data"].get("query_manifest"):
        for split in ("query", "gallery"):
            sets = [_read_set(run, m, split, configs[m]) for m in model_ids]
            for m, (_, ids) in zip(model_ids, sets):
                _same_ids(run, m, split, ids["id"], sets[0][1]["id"], ordered=True)
            setattr(data, f"{split}_ids", sets[0][1]["id"].to_numpy())
            setattr(data, split, [emb for emb, _ in sets])
        data.query_labels, data.gallery_labels = _answer_keys(config, data.query_ids, data.gallery_ids)
    return data


def _read_set(run: Run, model_id: str, name: str, config: dict) -> tuple[np.ndarray, pd.DataFrame]:
    """One emb/<name>.npy (memory-mapped) and its ids, checked: shape, ids, no NaN or infinite value."""
    path = run.model_dir(model_id) / "emb" / f"{name}.npy"
    ids_path = path.with_name(f"{name}.ids.parquet")
    redo = f"rerun python -m ensemble.predict --run {run.show()} --models {model_id} --force"
    try:
        emb = np.load(path, mmap_mode="r")
        ids = pd.read_parquet(ids_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{run.show(path)}: cannot be read ({exc}); {redo}.") from None
    want_ndim = 2 if name == "oof" else 3
    dim = config["params"]["embedding_dim"]
    if emb.ndim != want_ndim or emb.shape[-1] != dim or emb.shape[-2] != len(ids) or \
            (want_ndim == 3 and emb.shape[0] != config["k"]):
        expected = f"{'' if want_ndim == 2 else str(config['k']) + ' folds x '}{len(ids)} rows x {dim} dims"
        raise UserError(f"{run.show(path)}: shape {emb.shape}, expected {expected} (its ids file lists {len(ids)} "
                        f"rows, config.json says embedding_dim {dim}); {redo}.")
    flat = emb.reshape(-1, dim)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1)) % len(ids)
    if len(bad):
        raise UserError(f"{run.show(path)}: rows {sorted(set(bad.tolist()))[:5]} hold NaN or infinite values "
                        f"(a corrupt file or a diverged model); {redo}, or retrain the model.")
    # predict stores unreadable images (on_bad_image: skip) as zero rows and counts them; any other zero row is damage.
    zero = sorted(set((np.flatnonzero(~flat.any(axis=1)) % len(ids)).tolist()))
    unreadable = json.loads((run.model_dir(model_id) / "predict.json").read_text()).get("unreadable", {}).get(name, 0)
    if len(zero) > unreadable:
        raise UserError(f"{run.show(path)}: rows {zero[:5]} are all zero (no direction to search with), more than "
                        f"the {unreadable} unreadable image(s) predict.json counts; {redo}.")
    return emb, ids


def _same_ids(run: Run, model_id: str, name: str, ids: pd.Series, expected, ordered: bool) -> None:
    ok = list(ids) == list(expected) if ordered else (len(ids) == len(expected) and set(ids) == set(expected))
    if not ok:
        extra, lacking = sorted(set(ids) - set(expected)), sorted(set(expected) - set(ids))
        raise UserError(f"{run.show(run.model_dir(model_id) / 'emb' / f'{name}.ids.parquet')}: its ids do not match "
                        f"{'the other models' if name != 'oof' else 'folds.csv'} ({len(extra)} extra, e.g. {extra[:3]}; "
                        f"{len(lacking)} missing, e.g. {lacking[:3]}{'; or another order' if ordered else ''}); rerun "
                        f"python -m ensemble.predict --run {run.show()} --models {model_id} --force.")


def _check_dims(run: Run, model_ids: list[str], oof: list[np.ndarray]) -> None:
    if len({len(e) for e in oof}) != 1:
        raise UserError(f"{run.show()}: the models' OOF embeddings have different row counts "
                        f"{dict(zip(model_ids, (len(e) for e in oof)))}; rerun predict with --force.")


def _answer_keys(config: dict, query_ids, gallery_ids) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The query and gallery labels when both manifests have the label column (a labelled hold-out set)."""
    from pathlib import Path

    from ensemble.data.manifest import read_table

    column = config["target"]["column"]
    frames = [read_table(Path(config["data"][f"{s}_manifest"])) for s in ("query", "gallery")]
    if not all(column in f for f in frames):
        return None, None
    return tuple(f.set_index("id").loc[ids, column].astype(str).str.strip().to_numpy()
                 for f, ids in zip(frames, (query_ids, gallery_ids)))


# ------------------------------------------------------------------ searching with an option


def search_with(queries: np.ndarray, gallery: np.ndarray, k: int, option: str | None, *, same_set: bool,
                expand: int = 3, alpha: float = 3.0, backend: str = "numpy") -> np.ndarray:
    """Top-k gallery indices per query, after an option (None, 'qe', 'dba', 'dba+qe', 'k_reciprocal').

    same_set: the queries are the gallery's rows (leave-one-out): a row never finds itself.
    backend: of the final search ("auto": faiss when installed)."""
    exclude = np.arange(len(queries)) if same_set else None
    if option == "k_reciprocal":
        return k_reciprocal(queries, gallery, k=k, same_set=same_set, max_items=RERANK_MAX_ITEMS)[1]
    if option in ("dba", "dba+qe"):
        gallery = dba(gallery, n=expand, alpha=alpha)
    if option in ("qe", "dba+qe"):
        scores, indices = search(queries, gallery, expand, exclude=exclude)
        queries = alpha_qe(queries, gallery, indices, scores, n=expand, alpha=alpha)
    return search(queries, gallery, k, exclude=exclude, backend=backend)[1]


def option_scores(emb: np.ndarray, labels: np.ndarray, folds: np.ndarray, option: str | None, **kw) -> dict:
    """An option's leave-one-out scores inside each fold, pooled over all queries."""
    parts = []
    for f in np.unique(folds):
        rows = folds == f
        indices = search_with(emb[rows], emb[rows], 10, option, same_set=True, **kw)
        hits = ranked_hits(labels[rows], labels[rows], indices)
        parts.append(retrieval_scores(hits, count_relevant(labels[rows], labels[rows], exclude_self=True)))
    return pool_scores(parts)


# ------------------------------------------------------------------ the methods


@dataclass
class Method:
    """One row of scores.csv and what the test search needs to repeat it."""

    name: str
    cv: dict
    in_sample: dict
    weights: np.ndarray  # per model
    option: str | None = None
    seconds: float = 0.0
    holdout: dict | None = None
    trajectory: list = field(default_factory=list)


def score_methods(data: RetrievalData, metric: str, options=OPTIONS, iterations: int = 10, **kw) -> list[Method]:
    """Every model alone, the equal and the greedy concatenation, then each option on the best of them."""
    n = len(data.model_ids)
    print(f"scoring {n} model(s){', their concatenations' if n > 1 else ''} and {len(options)} option(s) on "
          f"{len(np.unique(data.folds))} held-out folds ({len(data.ids)} images) ...", flush=True)
    rows = []
    for m, model_id in enumerate(data.model_ids):
        began = time.perf_counter()
        scores = fold_scores(data.oof[m], data.labels, data.folds)
        if not scores["queries"]:
            raise UserError(f"no held-out image has another image of its identity in its fold ({scores['no_relevant']} "
                            "images, each alone): there is nothing to score. Retrieval folds need at least two images "
                            "per identity.")
        rows.append(Method(f"single:{model_id}", scores, scores, np.eye(n)[m], seconds=time.perf_counter() - began))
    if n > 1:
        began = time.perf_counter()
        scores = fold_scores(combine(data.oof, np.ones(n)), data.labels, data.folds)
        rows.append(Method("concat_equal", scores, scores, np.ones(n), seconds=time.perf_counter() - began))
        rows.append(_greedy(data, metric, iterations))
    base = max(rows, key=lambda r: r.cv[metric])
    emb = combine(data.oof, base.weights)
    for option in options:
        if option == "k_reciprocal" and max(np.bincount(data.folds)) > RERANK_MAX_ITEMS:
            print(f"skipped +k_reciprocal: a fold holds more than {RERANK_MAX_ITEMS} rows (dense re-ranking)")
            continue
        began = time.perf_counter()
        scores = option_scores(emb, data.labels, data.folds, option, **kw)
        rows.append(Method(f"{base.name}+{option}", scores, scores, base.weights, option,
                           seconds=time.perf_counter() - began))
    return rows


def _greedy(data: RetrievalData, metric: str, iterations: int) -> Method:
    """Greedy weights, cross-validated: fold f's queries are scored with weights chosen on the other folds."""
    began = time.perf_counter()
    folds = np.unique(data.folds)
    parts = []
    for f in folds:
        weights = GreedyConcat(metric, iterations).fit(data.oof, data.labels, data.folds,
                                                       which=[g for g in folds if g != f]).weights_
        parts.append(fold_scores(combine(data.oof, weights), data.labels, data.folds, which=[f]))
    cv = pool_scores(parts)
    full = GreedyConcat(metric, iterations).fit(data.oof, data.labels, data.folds)
    in_sample = fold_scores(combine(data.oof, full.weights_), data.labels, data.folds)
    return Method("greedy_concat", cv, in_sample, full.weights_, seconds=time.perf_counter() - began,
                  trajectory=full.trajectory_)


# ------------------------------------------------------------------ the test search


def merge_folds(emb: np.ndarray, how: str, chunk: int = 65_536) -> np.ndarray:
    """folds x rows x dims -> rows x dims' (float16, unit rows), `chunk` rows at a time (bounded memory).

    mean: the normalised mean of the k fold models' embeddings; concat: their concatenation
    (cosine = the mean of the fold models' cosines). docs/design.md says which is the default and why."""
    k, n, d = emb.shape
    out = np.empty((n, d if how == "mean" else k * d), np.float16)
    for s in range(0, n, chunk):
        part = np.asarray(emb[:, s:s + chunk], dtype=np.float32)
        part = part.sum(0) if how == "mean" else np.concatenate(list(part), axis=1)
        norm = np.linalg.norm(part, axis=1, keepdims=True)
        out[s:s + chunk] = np.divide(part, norm, out=np.zeros_like(part), where=norm > 0)
    return out


def merged_sets(data: RetrievalData, method: Method, fold_merge: str) -> tuple[np.ndarray, np.ndarray]:
    """The query and gallery embeddings for a method: fold models merged, then the models weighted."""
    q = [merge_folds(e, fold_merge) for e in data.query]
    g = [merge_folds(e, fold_merge) for e in data.gallery]
    return combine(q, method.weights, np.float16), combine(g, method.weights, np.float16)


def holdout_scores(data: RetrievalData, method: Method, fold_merge: str, k: int, **kw) -> dict:
    """A method's scores on the labelled query/gallery sets (the demo's unseen digits, a user's labelled split)."""
    q, g = merged_sets(data, method, fold_merge)
    indices = search_with(q, g, k, method.option, same_set=False, backend="auto", **kw)
    hits = ranked_hits(data.query_labels, data.gallery_labels, indices)
    return retrieval_scores(hits, count_relevant(data.query_labels, data.gallery_labels))


def submission(data: RetrievalData, method: Method, fold_merge: str, k: int, **kw) -> pd.DataFrame:
    """Each query's top-k gallery ids, best first, space-separated."""
    q, g = merged_sets(data, method, fold_merge)
    option = method.option if method.option != "k_reciprocal" or len(q) + len(g) <= RERANK_MAX_ITEMS else None
    if option != method.option:
        print(f"note: {method.name} is applied without k-reciprocal re-ranking: query + gallery hold "
              f"{len(q) + len(g)} rows, more than its dense limit {RERANK_MAX_ITEMS}")
    indices = search_with(q, g, k, option, same_set=False, backend="auto", **kw)
    return pd.DataFrame({"id": data.query_ids, "gallery_ids": [" ".join(data.gallery_ids[i]) for i in indices]})


def scores_table(rows: list[Method], model_ids: list[str]) -> pd.DataFrame:
    """scores.csv: a row per method; cv_ and in_sample_ columns per metric (holdout_ with labelled test sets)."""
    table = []
    for r in rows:
        row = {"method": r.name}
        for prefix, scores in (("cv", r.cv), ("in_sample", r.in_sample), ("holdout", r.holdout)):
            if scores is not None:
                row.update({f"{prefix}_{m}": scores[m] for m in RETRIEVAL_METRICS})
        row["queries"], row["no_relevant"] = r.cv["queries"], r.cv["no_relevant"]
        row["weights"] = json.dumps({m: float(w) for m, w in zip(model_ids, r.weights) if w})
        row["seconds"] = round(r.seconds, 2)
        table.append(row)
    return pd.DataFrame(table)
