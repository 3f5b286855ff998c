"""Benchmark of exact cosine search (`ensemble.retrieve.search.search`) against the usual baselines.

    python scripts/bench_retrieve.py           # the full benchmark (a few minutes)
    python scripts/bench_retrieve.py --quick   # small shapes, seconds

1. 10,000 queries x 100,000 gallery x 512 dims, float16 unit rows; each query is a gallery
   row plus noise (a planted near-duplicate). `search` (k=10) against scikit-learn's
   NearestNeighbors: ball_tree (what the DIGIX 2020 write-up used; far too slow in 512
   dims to run on all queries, so timed on a random subset and extrapolated), brute force
   (euclidean on unit float32 rows, its fastest exact path, and metric="cosine") on all
   queries, and a one-query-at-a-time numpy loop (subset, extrapolated). The baselines get
   float32 copies (their conversion is not timed); `search` gets the float16 rows.
2. Agreement: the top-10 indices of `search` against brute force, on the same float32 rows.
3. Memory: a 1,000,000 x 512 float16 gallery memmapped from disk (1 GB), searched by 1,000
   queries in a child process, so that its peak RSS (ru_maxrss) is the search's own.

Targets: >= 20x ball_tree, >= 1.0x brute force, peak RSS < 2 GB. The data are synthetic (seeded).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble.retrieve.search import l2_normalize, search  # noqa: E402 (after the sys.path line)

K = 10


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def unit_rows(rng, n: int, d: int, chunk: int = 65536) -> np.ndarray:
    """n random unit rows, float16, built a chunk at a time."""
    out = np.empty((n, d), dtype=np.float16)
    for s in range(0, n, chunk):
        out[s:s + chunk] = l2_normalize(rng.standard_normal((min(chunk, n - s), d), dtype=np.float32))
    return out


def planted_queries(rng, gallery, n: int, noise: float = 0.5, take_all: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n queries, each a random gallery row (all rows in order: take_all) plus noise of norm ~`noise`
    (cosine ~0.9 to it), and those rows."""
    rows = np.arange(n) if take_all else np.sort(rng.choice(len(gallery), n, replace=False))
    d = gallery.shape[1]
    q = np.asarray(gallery[rows], dtype=np.float32) + noise / np.sqrt(d) * rng.standard_normal((n, d), dtype=np.float32)
    return l2_normalize(q).astype(np.float16), rows


def numpy_loop(queries: np.ndarray, gallery32: np.ndarray) -> np.ndarray:
    """One query at a time: a matrix-vector product, argpartition, sort."""
    out = np.empty((len(queries), K), dtype=np.int64)
    for i, q in enumerate(queries):
        s = gallery32 @ q
        top = np.argpartition(-s, K)[:K]
        out[i] = top[np.argsort(-s[top], kind="stable")]
    return out


def agreement(ours: np.ndarray, theirs: np.ndarray, q32: np.ndarray, g32: np.ndarray) -> str:
    """Share of queries with the identical top-10 list, and how far apart the scores are where not."""
    same = (ours == theirs).all(axis=1)
    text = f"{same.mean():.4%} identical top-{K} lists ({int(same.sum())}/{len(same)})"
    diff = np.flatnonzero(~same)
    if len(diff):
        qd = q32[diff].astype(np.float64)
        s_ours = np.einsum("qd,qkd->qk", qd, g32[ours[diff]].astype(np.float64))
        s_theirs = np.einsum("qd,qkd->qk", qd, g32[theirs[diff]].astype(np.float64))
        gap = np.abs(np.sort(s_ours, axis=1) - np.sort(s_theirs, axis=1)).max()
        text += f"; where they differ, the exact (float64) sorted scores differ by at most {gap:.1e} (near-ties)"
    return text


def main_bench(nq: int, ng: int, d: int, subset: int, seed: int = 0) -> dict:
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    print(f"data: {nq:,} queries x {ng:,} gallery x {d} dims, float16 unit rows, planted near-duplicates")
    gallery = unit_rows(rng, ng, d)
    queries, planted = planted_queries(rng, gallery, nq)
    g32, q32 = l2_normalize(gallery), l2_normalize(queries)  # the baselines' float32 copies
    sub = np.sort(rng.choice(nq, min(subset, nq), replace=False))

    (_, i16), t_ours = _timed(lambda: search(queries, gallery, K, backend="numpy"))
    print(f"search (numpy, float16 input):        {t_ours:8.2f} s  ({nq / t_ours:,.0f} queries/s); planted match "
          f"ranked first for {(i16[:, 0] == planted).mean():.2%}")
    (_, i32), t_ours32 = _timed(lambda: search(q32, g32, K, backend="numpy"))
    print(f"search (numpy, float32 input):        {t_ours32:8.2f} s")

    try:
        import faiss  # noqa: F401 (optional: timed only when installed)
    except ImportError:
        print("search (faiss backend):               not timed (faiss not installed: pip install faiss-cpu)")
    else:
        (_, i_faiss), t_faiss = _timed(lambda: search(q32, g32, K, backend="faiss"))
        print(f"search (faiss backend, float32 input): {t_faiss:8.2f} s; vs numpy: {agreement(i_faiss, i32, q32, g32)}")

    brute = NearestNeighbors(n_neighbors=K, algorithm="brute", metric="euclidean")
    (_, i_brute), t_brute = _timed(lambda: brute.fit(g32).kneighbors(q32))
    print(f"sklearn brute, euclidean on unit rows: {t_brute:8.2f} s  (all {nq:,} queries)")
    cosine = NearestNeighbors(n_neighbors=K, algorithm="brute", metric="cosine")
    (_, i_cos), t_cos = _timed(lambda: cosine.fit(g32).kneighbors(q32))
    print(f"sklearn brute, metric='cosine':        {t_cos:8.2f} s  (all {nq:,} queries)")

    tree = NearestNeighbors(n_neighbors=K, algorithm="ball_tree")
    _, t_build = _timed(lambda: tree.fit(g32))
    (_, i_tree), t_tree = _timed(lambda: tree.kneighbors(q32[sub]))
    t_tree_all = t_build + t_tree / len(sub) * nq
    print(f"sklearn ball_tree: build {t_build:.2f} s + {t_tree:.2f} s for {len(sub)} queries "
          f"({t_tree / len(sub) * 1000:.1f} ms/query) -> {t_tree_all:,.0f} s for all {nq:,} "
          f"(EXTRAPOLATED from {len(sub)} queries)")

    loop_rows = sub
    i_loop, t_loop = _timed(lambda: numpy_loop(q32[loop_rows], g32))
    t_loop_all = t_loop / len(loop_rows) * nq
    print(f"numpy one query at a time: {t_loop:.2f} s for {len(loop_rows)} queries "
          f"({t_loop / len(loop_rows) * 1000:.1f} ms/query) -> {t_loop_all:,.0f} s for all {nq:,} "
          f"(EXTRAPOLATED from {len(loop_rows)} queries; float32 gallery, its conversion not timed)")

    print("agreement of search (float32 input) with:")
    print(f"  sklearn brute euclidean: {agreement(i32, i_brute, q32, g32)}")
    print(f"  sklearn brute cosine:    {agreement(i32, i_cos, q32, g32)}")
    print(f"  ball_tree ({len(sub)} queries): {agreement(i32[sub], i_tree, q32[sub], g32)}")
    print(f"  numpy loop ({len(loop_rows)} queries): {agreement(i32[loop_rows], i_loop, q32[loop_rows], g32)}")
    print(f"  search float16 vs float32 input: {agreement(i16, i32, q32, g32)}")
    return {"ours": t_ours, "brute": min(t_brute, t_cos), "ball_tree": t_tree_all, "loop": t_loop_all}


def memory_child(gallery_path: str, queries_path: str) -> None:
    """In a fresh process: search the memmapped gallery; print time and peak RSS as JSON."""
    gallery = np.load(gallery_path, mmap_mode="r")
    queries, planted = np.load(queries_path), np.load(queries_path.replace(".npy", ".rows.npy"))
    rss_before = _rss_mb()
    (_, idx), t = _timed(lambda: search(queries, gallery, K, backend="numpy"))
    hwm = [line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")]
    print(json.dumps({"seconds": t, "peak_rss_mb": _rss_mb(), "rss_before_mb": rss_before,
                      "vmhwm_mb": int(hwm[0]) / 1024 if hwm else float("nan"),
                      "planted_first": float((idx[:, 0] == planted).mean())}))


def memory_check(ng: int, d: int, nq: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as tmp:
        gallery_path, queries_path = Path(tmp) / "gallery.npy", Path(tmp) / "queries.npy"
        _, t_write = _timed(lambda: _write_gallery(gallery_path, queries_path, np.random.default_rng(2), ng, d, nq))
        print(f"memory check: {ng:,} x {d} float16 gallery memmapped from disk "
              f"({gallery_path.stat().st_size / 2**30:.2f} GiB, written in {t_write:.1f} s), {nq:,} queries, "
              "in a child process:")
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(gallery_path), str(queries_path)],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  search: {res['seconds']:.2f} s, peak RSS (ru_maxrss) {res['peak_rss_mb']:,.0f} MB (before the search: "
          f"{res['rss_before_mb']:,.0f} MB; /proc VmHWM {res['vmhwm_mb']:,.0f} MB); planted match first for "
          f"{res['planted_first']:.2%}")
    return res["peak_rss_mb"], f"{ng:,} x {d}"


def _write_gallery(gallery_path: Path, queries_path: Path, rng, ng: int, d: int, nq: int, chunk: int = 16384) -> None:
    """A float16 .npy gallery written a chunk at a time, and `nq` planted queries taken from the chunks as
    they are written: nothing here maps the file, so this process stays small (a child's ru_maxrss
    starts at its parent's RSS)."""
    planted = np.sort(rng.choice(ng, nq, replace=False))
    rows = []
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": (ng, d)}
    with open(gallery_path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for s in range(0, ng, chunk):
            block = unit_rows(rng, min(chunk, ng - s), d)
            block.tofile(f)
            rows.append(block[planted[(planted >= s) & (planted < s + chunk)] - s])
    queries, _ = planted_queries(rng, np.concatenate(rows), nq, take_all=True)
    np.save(queries_path, queries)
    np.save(str(queries_path).replace(".npy", ".rows.npy"), planted)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test in seconds")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0
    # The memory check first: a child's ru_maxrss starts at its parent's RSS when it is spawned (Linux keeps
    # the high-water mark across exec), so spawn it while this process is still small.
    if args.quick:
        rss, shape = memory_check(ng=50_000, d=512, nq=100)
        times = main_bench(nq=500, ng=5000, d=64, subset=50)
    else:
        rss, shape = memory_check(ng=1_000_000, d=512, nq=1000)
        times = main_bench(nq=10_000, ng=100_000, d=512, subset=100)
    vs_tree, vs_brute, vs_loop = (times[b] / times["ours"] for b in ("ball_tree", "brute", "loop"))
    ok = vs_tree >= 20 and vs_brute >= 1.0 and rss < 2048
    verdict = ("targets apply to the full run only (--quick)" if args.quick
               else "all targets met" if ok else "TARGET MISSED")
    print(f"SUMMARY: search is {vs_tree:,.1f}x ball_tree (target >= 20x; extrapolated), {vs_brute:.2f}x sklearn brute "
          f"(faster of euclidean/cosine; target >= 1.0x), {vs_loop:,.1f}x the one-query numpy loop (extrapolated); "
          f"{shape} memmap peak RSS {rss:,.0f} MB (target < 2048 MB) -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
