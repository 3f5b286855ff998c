"""The retrieve stage: a run's embeddings -> every method scored out of fold -> retrieval/ written as one set.

`load_embeddings` reads and checks each retrieval model's emb/ files (written by
predict). `score_methods` scores, on the held-out folds (each held-out image queries
the rest of its fold, whose identities its model never saw):
  single:<model>   each model alone
  concat_equal     every model's embedding concatenated, equal weights
  greedy_concat    weights chosen greedily (ensemble.retrieve.select), cross-validated:
                   for fold f they are chosen on the other folds
then, on the best of those, each query-expansion / re-ranking option (+qe, +dba,
+dba+qe, +k_reciprocal: fixed parameters; on greedy weights, fold f's CV score uses the
weights chosen without fold f, as greedy_concat's own does). The
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
from ensemble.retrieve.metrics import count_relevant, leave_one_out, ranked_hits, retrieval_scores
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
    merged: dict = field(default_factory=dict)  # (split, model index, fold merge) -> merged query/gallery rows


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
    if not keep.any():
        raise UserError(f"{run.show()}: no held-out row has an embedding in every model (all rows zero); rerun "
                        f"python -m ensemble.predict --run {run.show()} --force.")
    data.ids, data.labels, data.folds = data.ids[keep], data.labels[keep], data.folds[keep]
    data.oof = [emb[keep] for emb in data.oof]
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
    run.pull(path)  # a URI run: the embeddings are not among the artifacts pulled up front
    run.pull(ids_path)
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
    bad, zero = _bad_rows(emb.reshape(-1, dim))
    bad = bad % len(ids)
    if len(bad):
        raise UserError(f"{run.show(path)}: rows {sorted(set(bad.tolist()))[:5]} hold NaN or infinite values "
                        f"(a corrupt file or a diverged model); {redo}, or retrain the model.")
    # predict stores unreadable images (on_bad_image: skip) as zero rows and counts them; any other zero row is damage.
    zero = sorted(set((zero % len(ids)).tolist()))
    unreadable = json.loads((run.model_dir(model_id) / "predict.json").read_text()).get("unreadable", {}).get(name, 0)
    if len(zero) > unreadable:
        raise UserError(f"{run.show(path)}: rows {zero[:5]} are all zero (no direction to search with), more than "
                        f"the {unreadable} unreadable image(s) predict.json counts; {redo}.")
    return emb, ids


def _bad_rows(flat: np.ndarray, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a NaN or infinite value, all-zero rows), read `chunk` rows at a time (a mapped file stays mapped)."""
    bad, zero = [], []
    for start in range(0, len(flat), chunk):
        part = np.asarray(flat[start:start + chunk])
        bad.append(np.flatnonzero(~np.isfinite(part).all(axis=1)) + start)
        zero.append(np.flatnonzero(~part.any(axis=1)) + start)
    return np.concatenate(bad or [np.zeros(0, int)]), np.concatenate(zero or [np.zeros(0, int)])


def _same_ids(run: Run, model_id: str, name: str, ids: pd.Series, expected, ordered: bool) -> None:
    ok = list(ids) == list(expected) if ordered else (len(ids) == len(expected) and set(ids) == set(expected))
    if not ok:
        extra, lacking = sorted(set(ids) - set(expected)), sorted(set(expected) - set(ids))
        raise UserError(f"{run.show(run.model_dir(model_id) / 'emb' / f'{name}.ids.parquet')}: its ids do not match "
                        f"{'the other models' if name != 'oof' else 'folds.csv'} ({len(extra)} extra, e.g. {extra[:3]}; "
                        f"{len(lacking)} missing, e.g. {lacking[:3]}{'; or another order' if ordered else ''}); rerun "
                        f"python -m ensemble.predict --run {run.show()} --models {model_id} --force.")


def _answer_keys(config: dict, query_ids, gallery_ids) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The query and gallery labels when both manifests have the label column for every id (a labelled hold-out
    set); else (None, None): the answer keys are optional, their absence only skips the hold-out scores."""
    from pathlib import Path

    from ensemble.data.manifest import read_table

    column = config["target"]["column"]
    keys = []
    for split, ids in (("query", query_ids), ("gallery", gallery_ids)):
        try:
            frame = read_table(Path(config["data"][f"{split}_manifest"]))
        except (UserError, OSError):  # e.g. the manifests stayed on the machine that trained
            return None, None
        if column not in frame:
            return None, None
        labels = frame.set_index("id")[column].reindex(ids).astype(str).str.strip()
        if labels.isin(["", "nan"]).any():  # unlabelled rows: no full answer key
            return None, None
        keys.append(labels.to_numpy())
    return keys[0], keys[1]


# ------------------------------------------------------------------ searching with an option


def search_with(queries: np.ndarray, gallery: np.ndarray, k: int, option: str | None, *, same_set: bool,
                expand: int = 3, alpha: float = 3.0, backend: str = "numpy") -> np.ndarray:
    """Top-k gallery indices per query, after an option (None, 'qe', 'dba', 'dba+qe', 'k_reciprocal').

    same_set: the queries are the gallery's rows (leave-one-out): a row never finds itself.
    backend: of the final search ("auto": faiss when installed)."""
    if not same_set:  # zero rows (unreadable images) have no direction: never searched with nor found
        q_ok, g_ok = np.flatnonzero(queries.any(axis=1)), np.flatnonzero(gallery.any(axis=1))
        if len(q_ok) < len(queries) or len(g_ok) < len(gallery):
            found = search_with(queries[q_ok], gallery[g_ok], k, option, same_set=False, expand=expand, alpha=alpha,
                                backend=backend)
            out = np.full((len(queries), found.shape[1]), -1, np.int64)
            out[q_ok] = np.where(found >= 0, g_ok[found], -1)
            return out
    exclude = np.arange(len(queries)) if same_set else None
    if option == "k_reciprocal":
        return k_reciprocal(queries, gallery, k=k, same_set=same_set, max_items=RERANK_MAX_ITEMS)[1]
    if option in ("dba", "dba+qe"):
        gallery = dba(gallery, n=expand, alpha=alpha)
    if option in ("qe", "dba+qe"):
        scores, indices = search(queries, gallery, expand, exclude=exclude)
        queries = alpha_qe(queries, gallery, indices, scores, n=expand, alpha=alpha)
    return search(queries, gallery, k, exclude=exclude, backend=backend)[1]


def option_scores(data: RetrievalData, weights: dict, option: str | None, **kw) -> dict:
    """An option's leave-one-out scores inside each fold, pooled over all queries; fold f's embedding is the
    concatenation with `weights[f]` (for greedy weights: those chosen without fold f)."""
    parts = []
    for f in np.unique(data.folds):
        rows = data.folds == f
        emb, labels = combine([e[rows] for e in data.oof], weights[f]), data.labels[rows]
        indices = search_with(emb, emb, 10, option, same_set=True, **kw)
        hits = ranked_hits(labels, labels, indices)
        parts.append(retrieval_scores(hits, count_relevant(labels, labels, exclude_self=True)))
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
    fold_weights: dict | None = None  # fold -> the weights its CV score used (greedy: chosen without that fold)

    def weights_for(self, fold) -> np.ndarray:
        return self.weights if self.fold_weights is None else self.fold_weights[fold]


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
    folds = np.unique(data.folds)
    for option in options:
        if option == "k_reciprocal" and max(np.bincount(data.folds)) > RERANK_MAX_ITEMS:
            print(f"skipped +k_reciprocal: a fold holds more than {RERANK_MAX_ITEMS} rows (dense re-ranking)")
            continue
        began = time.perf_counter()
        # The option fits nothing, but greedy weights do: its CV uses the weights chosen without each fold.
        cv = option_scores(data, {f: base.weights_for(f) for f in folds}, option, **kw)
        in_sample = cv if base.fold_weights is None else option_scores(data, {f: base.weights for f in folds},
                                                                         option, **kw)
        rows.append(Method(f"{base.name}+{option}", cv, in_sample, base.weights, option,
                           seconds=time.perf_counter() - began, fold_weights=base.fold_weights))
    return rows


def _greedy(data: RetrievalData, metric: str, iterations: int) -> Method:
    """Greedy weights, cross-validated: fold f's queries are scored with weights chosen on the other folds."""
    began = time.perf_counter()
    folds = np.unique(data.folds)
    cache, fold_weights, parts = {}, {}, []  # one cache: the fits share their (weights, fold) scores
    for f in folds:
        fold_weights[f] = GreedyConcat(metric, iterations).fit(data.oof, data.labels, data.folds,
                                                               which=[g for g in folds if g != f], cache=cache).weights_
        rows = data.folds == f
        parts.append(leave_one_out(combine([e[rows] for e in data.oof], fold_weights[f]), data.labels[rows]))
    full = GreedyConcat(metric, iterations).fit(data.oof, data.labels, data.folds, cache=cache)
    in_sample = fold_scores(combine(data.oof, full.weights_), data.labels, data.folds)
    return Method("greedy_concat", pool_scores(parts), in_sample, full.weights_, seconds=time.perf_counter() - began,
                  trajectory=full.trajectory_, fold_weights=fold_weights)


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
    """The query and gallery embeddings for a method: each used model's fold embeddings merged (once per
    model, kept for the next method), then the models weighted (float16)."""
    used = np.flatnonzero(method.weights > 0)
    sets = []
    for split in ("query", "gallery"):
        merged = []
        for m in used:
            key = (split, m, fold_merge)
            if key not in data.merged:
                data.merged[key] = merge_folds(getattr(data, split)[m], fold_merge)
            merged.append(data.merged[key])
        sets.append(combine(merged, method.weights[used], np.float16))
    return sets[0], sets[1]


def applied_option(method: Method, n_rows: int) -> str | None:
    """The option the query/gallery search applies: k-reciprocal re-ranking only within its dense limit."""
    return None if method.option == "k_reciprocal" and n_rows > RERANK_MAX_ITEMS else method.option


def holdout_scores(data: RetrievalData, method: Method, fold_merge: str, **kw) -> dict:
    """A method's scores on the labelled query/gallery sets (the demo's unseen digits, a user's labelled split)."""
    q, g = merged_sets(data, method, fold_merge)
    indices = search_with(q, g, 10, applied_option(method, len(q) + len(g)), same_set=False, backend="auto", **kw)
    hits = ranked_hits(data.query_labels, data.gallery_labels, indices)
    return retrieval_scores(hits, count_relevant(data.query_labels, data.gallery_labels))


def submission(data: RetrievalData, method: Method, fold_merge: str, k: int, **kw) -> pd.DataFrame:
    """Each query's top-k gallery ids, best first, space-separated."""
    q, g = merged_sets(data, method, fold_merge)
    option = applied_option(method, len(q) + len(g))
    if option != method.option:
        print(f"note: {method.name} is applied without k-reciprocal re-ranking: query + gallery hold "
              f"{len(q) + len(g)} rows, more than its dense limit {RERANK_MAX_ITEMS}")
    indices = search_with(q, g, k, option, same_set=False, backend="auto", **kw)
    blank = int((indices < 0).all(axis=1).sum())
    if blank:
        print(f"note: {blank} query image(s) have no embedding (unreadable): their rows in submission.csv are empty")
    return pd.DataFrame({"id": data.query_ids, "gallery_ids": [" ".join(data.gallery_ids[i[i >= 0]]) for i in indices]})


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
