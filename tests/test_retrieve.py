"""The retrieve stage on synthetic runs (tests/retrieve_fixtures.py): methods, honesty of the CV, the CLI, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from retrieve_fixtures import MODELS, write_retrieval_run

from ensemble.io import write_npy
from ensemble.retrieve.core import load_embeddings, merge_folds, score_methods
from ensemble.retrieve.select import GreedyConcat, combine, fold_scores
from ensemble.run import Run


def retrieve_cli(*args, cwd=None):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "ensemble.retrieve", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_retrieval_run(tmp_path_factory.mktemp("retrieval") / "run")


# ------------------------------------------------------------------ the maths


def test_weighted_concatenation_is_the_weighted_mean_of_cosines():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((5, d)) for d in (4, 6))
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    both = combine([a, b], [1, 3])
    assert np.allclose(np.linalg.norm(both, axis=1), 1, atol=1e-6)
    assert np.allclose(both @ both.T, 0.25 * (a @ a.T) + 0.75 * (b @ b.T), atol=1e-6)
    assert combine([a, b], [0, 2]).shape == (5, 6)  # an unused model adds no columns


def test_merge_folds_mean_and_concat():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((3, 7, 4)).astype(np.float32)
    mean = merge_folds(emb, "mean", chunk=3)  # chunks that do not divide the rows
    expected = emb.sum(0) / np.linalg.norm(emb.sum(0), axis=1, keepdims=True)
    assert mean.dtype == np.float16 and np.allclose(mean, expected, atol=2e-3)
    unit = emb / np.linalg.norm(emb, axis=2, keepdims=True)
    concat = merge_folds(unit, "concat").astype(np.float32)
    assert concat.shape == (7, 12)
    assert np.allclose(concat @ concat.T, np.mean([u @ u.T for u in unit], axis=0), atol=3e-3)


def test_fold_scores_pool_queries_and_count_singletons():
    # Fold 0: two identities of two images each, perfectly separated; fold 1: one pair plus a singleton.
    emb = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1], [1, 0], [1, 0.02], [0, 1]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array(["a", "a", "b", "b", "c", "c", "d"])
    folds = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = fold_scores(emb, labels, folds)
    assert scores["queries"] == 6 and scores["no_relevant"] == 1  # "d" has no other image in its fold
    assert scores["top1"] == 1.0 and scores["map@10"] == 1.0


def test_greedy_weights_for_a_fold_never_look_at_that_fold(run_dir):
    data = load_embeddings(Run(run_dir))
    fit = GreedyConcat("digix", 4).fit(data.oof, data.labels, data.folds, which=[1, 2])
    labels = data.labels.copy()
    held = data.folds == 0
    labels[held] = np.random.default_rng(0).permutation(labels[held])  # fold 0's labels scrambled
    again = GreedyConcat("digix", 4).fit(data.oof, labels, data.folds, which=[1, 2])
    assert np.array_equal(fit.weights_, again.weights_) and fit.trajectory_ == again.trajectory_


def test_methods_concatenation_beats_the_best_single_model(run_dir):
    data = load_embeddings(Run(run_dir))
    rows = score_methods(data, "digix", options=("qe",), iterations=4)
    names = [r.name for r in rows]
    assert names[:len(MODELS)] == [f"single:{m}" for m in MODELS]
    assert names[len(MODELS):] == ["concat_equal", "greedy_concat", f"{max(rows[:-1], key=lambda r: r.cv['digix']).name}+qe"]
    best_single = max(r.cv["digix"] for r in rows[:len(MODELS)])
    greedy = rows[len(MODELS) + 1]
    assert greedy.cv["digix"] > best_single  # cross-validated, and still better
    assert greedy.in_sample["digix"] >= greedy.cv["digix"] - 1e-9
    assert greedy.weights[list(MODELS).index("net-c")] <= greedy.weights.max()


# ------------------------------------------------------------------ the command


def test_cli_writes_scores_selection_and_submission(run_dir):
    proc = retrieve_cli("--run", run_dir, "--k", 5, "--iterations", 4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = run_dir / "retrieval"
    scores = pd.read_csv(out / "scores.csv")
    for prefix in ("cv", "in_sample", "holdout"):
        assert {f"{prefix}_{m}" for m in ("digix", "map@10", "top1", "recall@5", "recall@10")} <= set(scores.columns)
    assert {"single:net-a", "concat_equal", "greedy_concat"} <= set(scores["method"])
    assert any(m.endswith("+k_reciprocal") for m in scores["method"])
    selection = json.loads((out / "selection.json").read_text())
    winner = scores.loc[scores["cv_digix"].idxmax(), "method"]
    assert selection["winner"] == winner and selection["fold_merge"] == "concat"
    sub = pd.read_csv(out / "submission.csv")
    query = pd.read_csv(run_dir / "query.csv")
    gallery = set(pd.read_csv(run_dir / "gallery.csv")["id"])
    assert sub["id"].tolist() == query["id"].tolist()
    ranked = sub["gallery_ids"].str.split()
    assert (ranked.str.len() == 5).all() and all(set(r) <= gallery and len(set(r)) == 5 for r in ranked)
    assert f"winner: {winner}" in proc.stdout and "hold-out digix" in proc.stdout


def test_cli_without_query_sets_scores_only(tmp_path):
    run_dir = write_retrieval_run(tmp_path / "run", query_gallery=False)
    proc = retrieve_cli("--run", run_dir, "--option", "none", "--smoke")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run_dir / "retrieval").iterdir()) == ["scores.csv", "selection.json"]


# ------------------------------------------------------------------ bad input: one message, exit 2, nothing written


def _fresh(tmp_path, **kw):
    return write_retrieval_run(tmp_path / "run", **kw)


def _fails(run_dir, *needles):
    proc = retrieve_cli("--run", run_dir, "--smoke")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert not (run_dir / "retrieval").exists()


def test_not_a_run_and_a_classification_run(tmp_path):
    _fails(tmp_path, "not a run directory")
    run_dir = _fresh(tmp_path)
    for config in run_dir.glob("models/*/config.json"):
        config.write_text(config.read_text().replace('"retrieval"', '"multiclass"'))
    _fails(run_dir, "no complete retrieval model", "ensemble.stack")


def test_missing_embeddings_say_to_run_predict(tmp_path):
    run_dir = _fresh(tmp_path)
    (run_dir / "models" / "net-b" / "predict.json").unlink()
    _fails(run_dir, "net-b", "python -m ensemble.predict --run")


def test_nan_embeddings_are_named(tmp_path):
    run_dir = _fresh(tmp_path)
    path = run_dir / "models" / "net-a" / "emb" / "oof.npy"
    emb = np.load(path)
    emb[7] = np.nan
    write_npy(emb, path)
    _fails(run_dir, "net-a/emb/oof.npy", "rows [7]", "NaN")


def test_mismatched_dims_and_ids_are_named(tmp_path):
    run_dir = _fresh(tmp_path)
    path = run_dir / "models" / "net-b" / "emb" / "gallery.npy"
    write_npy(np.load(path)[:, :, :8], path)
    _fails(run_dir, "net-b/emb/gallery.npy", "embedding_dim 16")
    run_dir = _fresh(tmp_path / "again")
    ids = run_dir / "models" / "net-c" / "emb" / "query.ids.parquet"
    frame = pd.read_parquet(ids)
    frame.loc[0, "id"] = "somebody-else"
    frame.to_parquet(ids, index=False)
    _fails(run_dir, "net-c/emb/query.ids.parquet", "do not match")


def test_bad_options(tmp_path):
    proc = retrieve_cli("--run", tmp_path, "--k", 0)
    assert proc.returncode == 2 and "--k" in proc.stderr and "Traceback" not in proc.stderr


def test_identities_with_one_image_are_counted_not_scored(tmp_path):
    _fails(_fresh(tmp_path, per_id=1), "no held-out image has another image of its identity", "nothing to score")
    run_dir = _fresh(tmp_path / "mixed")
    folds = pd.read_csv(run_dir / "folds.csv")
    alone = folds.groupby("label").head(1).head(2)  # two identities keep one image each, in their folds
    lonely = folds[~folds["label"].isin(alone["label"]) | folds["id"].isin(alone["id"])]
    lonely.to_csv(run_dir / "folds.csv", index=False)
    for model_dir in (run_dir / "models").iterdir():
        ids = pd.read_parquet(model_dir / "emb" / "oof.ids.parquet")
        keep = ids["id"].isin(lonely["id"]).to_numpy()
        write_npy(np.load(model_dir / "emb" / "oof.npy")[keep], model_dir / "emb" / "oof.npy")
        ids[keep].to_parquet(model_dir / "emb" / "oof.ids.parquet", index=False)
    proc = retrieve_cli("--run", run_dir, "--smoke", "--option", "none")
    assert proc.returncode == 0, proc.stderr
    assert "note: 2 held-out image(s) are the only one of their identity in their fold" in proc.stdout
    assert (pd.read_csv(run_dir / "retrieval" / "scores.csv")["no_relevant"] == 2).all()


def test_zero_norm_embeddings_are_named_unless_predict_counted_them_unreadable(tmp_path):
    run_dir = _fresh(tmp_path)
    path = run_dir / "models" / "net-b" / "emb" / "gallery.npy"
    emb = np.load(path)
    emb[:, 3] = 0
    write_npy(emb, path)
    _fails(run_dir, "net-b/emb/gallery.npy", "rows [3] are all zero")
    run_dir = _fresh(tmp_path / "skipped")
    path = run_dir / "models" / "net-a" / "emb" / "oof.npy"
    emb = np.load(path)
    emb[5] = 0  # an unreadable held-out image under on_bad_image: skip, as predict writes it
    write_npy(emb, path)
    (path.parents[1] / "predict.json").write_text(json.dumps({"unreadable": {"oof": 1, "query": 0, "gallery": 0}}))
    proc = retrieve_cli("--run", run_dir, "--smoke", "--option", "none")
    assert proc.returncode == 0, proc.stderr
    assert "note: 1 held-out row(s) without an embedding (unreadable images) are left out" in proc.stdout


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_full_or_read_only_disk_leaves_the_previous_retrieval_whole(tmp_path, small_disk):
    disk = small_disk("16m")
    run_dir = write_retrieval_run(disk / "run")
    first = retrieve_cli("--run", run_dir, "--smoke", "--option", "none")
    assert first.returncode == 0, first.stderr
    before = _tree(run_dir / "retrieval")
    small_disk.fill(disk, leave=4096)  # the writability check passes; the new files do not fit
    full = retrieve_cli("--run", run_dir, "--smoke")
    assert full.returncode == 2 and full.stderr.count("\n") == 1 and "Traceback" not in full.stderr, full.stderr
    assert "No space left on device" in full.stderr and "retrieval/ is unchanged" in full.stderr
    assert _tree(run_dir / "retrieval") == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".retrieval")]  # no temporary directory left
    (disk / ".filler").unlink()
    small_disk.read_only(disk)
    ro = retrieve_cli("--run", run_dir, "--smoke")
    assert ro.returncode == 2 and "Read-only file system" in ro.stderr, ro.stderr
    assert _tree(run_dir / "retrieval") == before


def test_a_run_in_use_by_another_command_is_refused(tmp_path):
    import socket
    import time

    run_dir = _fresh(tmp_path)
    holder = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the run
    try:
        (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                      "command": "python -m ensemble.predict --run x",
                                                      "started": time.time(), "heartbeat": time.time()}))
        _fails(run_dir, "this run is in use by python -m ensemble.predict")
    finally:
        holder.kill()


def test_a_file_uri_run_is_retrieved_and_written_at_the_uri(tmp_path):
    run_dir = write_retrieval_run(tmp_path / "bucket" / "run")
    env_cache = {"ENSEMBLE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "ensemble.retrieve", "--run", run_dir.as_uri(), "--smoke"],
                          capture_output=True, text=True, env=dict(os.environ, **env_cache), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (run_dir / "retrieval").iterdir()) == ["scores.csv", "selection.json",
                                                                        "submission.csv"]


def test_an_option_on_greedy_weights_is_scored_with_each_folds_own_weights(run_dir):
    """Greedy weights are fitted: an option applied on top must score fold f with the weights chosen without f,
    so 'greedy + no option' reproduces greedy's own CV exactly (not its in-sample score)."""
    from ensemble.retrieve.core import _greedy, option_scores

    data = load_embeddings(Run(run_dir))
    greedy = _greedy(data, "digix", 4)
    assert set(greedy.fold_weights) == set(np.unique(data.folds))
    again = option_scores(data, greedy.fold_weights, None)
    assert again == pytest.approx(greedy.cv)
    assert option_scores(data, {f: greedy.weights for f in greedy.fold_weights}, None) == pytest.approx(greedy.in_sample)


def test_unreadable_query_and_gallery_images_are_left_out_of_every_option(tmp_path):
    run_dir = _fresh(tmp_path)
    for model_dir in (run_dir / "models").iterdir():  # as predict stores unreadable images: zero rows, counted
        for name, row in (("query", 2), ("gallery", 7)):
            path = model_dir / "emb" / f"{name}.npy"
            emb = np.load(path)
            emb[:, row] = 0
            write_npy(emb, path)
        (model_dir / "predict.json").write_text(json.dumps({"unreadable": {"oof": 0, "query": 1, "gallery": 1}}))
    for option in ("qe", "dba", "dba+qe", "k_reciprocal"):
        proc = retrieve_cli("--run", run_dir, "--iterations", 2, "--option", option, "--k", 5)
        assert proc.returncode == 0, (option, proc.stdout + proc.stderr)
        assert "1 query image(s) have no embedding" in proc.stdout
        sub = pd.read_csv(run_dir / "retrieval" / "submission.csv", keep_default_na=False)
        gallery = pd.read_csv(run_dir / "gallery.csv")["id"]
        assert sub["gallery_ids"][2] == "" and (sub["gallery_ids"].drop(2).str.split().str.len() == 5).all()
        assert not sub["gallery_ids"].str.contains(gallery[7]).any()  # never found


@pytest.mark.parametrize("option", [None, "qe", "dba", "dba+qe", "k_reciprocal"])
def test_search_with_each_option_skips_zero_rows(option):
    from ensemble.retrieve.core import search_with

    rng = np.random.default_rng(3)
    q, g = (rng.standard_normal((n, 8)).astype(np.float32) for n in (6, 30))
    q, g = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, g))
    q[4], g[11] = 0, 0
    indices = search_with(q, g, 5, option, same_set=False)
    assert indices.shape == (6, 5) and (indices[4] == -1).all()
    assert (np.delete(indices, 4, axis=0) >= 0).all() and not (indices == 11).any()
