"""Synthetic retrieval runs: folds.csv + models/*/{config.json, oof.parquet, predict.json, emb/*} as predict writes them.

Identities are random unit centres; a model's embedding of an image is its identity's
centre plus noise that is shared by every model (hard images are hard for all) and its
own, with per-identity strengths that differ between models, so concatenating models
helps without being perfect. The query and gallery sets hold identities no fold has
(as in DIGIX); their manifests carry the label column as an answer key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.io import write_npy

MODELS = {"net-a": 0.9, "net-b": 1.0, "net-c": 1.6}  # model id -> own-noise scale (net-c is weak)


def _embed(centres, identity, shared, noise, rng, strength):
    x = centres[identity] * strength[identity][:, None] + shared + noise * rng.standard_normal(shared.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_retrieval_run(run_dir: Path, *, seed: int = 0, n_ids: int = 45, per_id: int = 4, k: int = 3, dim: int = 16,
                        models: dict = MODELS, query_gallery: bool = True, labelled: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    run_dir = Path(run_dir)
    n_test_ids = 12
    centres = rng.standard_normal((n_ids + n_test_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    identity = np.repeat(np.arange(n_ids), per_id)
    ids = np.array([f"i{i:04d}" for i in range(len(identity))])
    fold = rng.permutation(n_ids)[identity] % k  # whole identities per fold
    labels = np.array([f"p{c:03d}" for c in identity])
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "fold": fold, "label": labels}).to_csv(run_dir / "folds.csv", index=False)
    shared = 0.45 * rng.standard_normal((len(ids), dim))
    # The test sets: 1 query + 4 gallery images per unseen identity.
    test_identity = np.repeat(np.arange(n_ids, n_ids + n_test_ids), 5)
    is_query = np.tile([True, False, False, False, False], n_test_ids)
    test_ids = np.array([f"t{i:04d}" for i in range(len(test_identity))])
    test_shared = 0.45 * rng.standard_normal((len(test_ids), dim))
    data = {"manifest": str(run_dir / "train.csv"), "root": str(run_dir), "tta": "orig"}
    if query_gallery:
        for name, rows in (("query", is_query), ("gallery", ~is_query)):
            frame = pd.DataFrame({"id": test_ids[rows], "image": [f"{i}.png" for i in test_ids[rows]]})
            if labelled:
                frame["label"] = [f"p{c:03d}" for c in test_identity[rows]]
            frame.to_csv(run_dir / f"{name}.csv", index=False)
            data[f"{name}_manifest"] = str(run_dir / f"{name}.csv")
    for m, (model_id, noise) in enumerate(models.items()):
        strength = 0.8 + 0.6 * np.cos(np.arange(n_ids + n_test_ids) * 1.3 + m * 2.0) ** 2
        out = run_dir / "models" / model_id
        (out / "emb").mkdir(parents=True, exist_ok=True)
        config = {"model_id": model_id, "backbone": model_id, "task": "retrieval", "k": k, "metric": "digix",
                  "mode": "max", "target": {"form": "label", "column": "label", "maybe_weight": 0.5},
                  "classes": sorted(set(labels)), "params": {"embedding_dim": dim}, "data": data}
        (out / "config.json").write_text(json.dumps(config))
        pd.DataFrame({"id": ids, "fold": fold}).to_parquet(out / "oof.parquet", index=False)
        write_npy(_embed(centres, identity, shared, noise, rng, strength), out / "emb" / "oof.npy")
        pd.DataFrame({"id": ids, "fold": fold}).to_parquet(out / "emb" / "oof.ids.parquet", index=False)
        if query_gallery:
            for name, rows in (("query", is_query), ("gallery", ~is_query)):
                per_fold = np.stack([_embed(centres, test_identity[rows], test_shared[rows], noise, rng, strength)
                                     for _ in range(k)])
                write_npy(per_fold, out / "emb" / f"{name}.npy")
                pd.DataFrame({"id": test_ids[rows]}).to_parquet(out / "emb" / f"{name}.ids.parquet", index=False)
        (out / "predict.json").write_text(json.dumps({"tta": "orig", "merge": "mean", "scores": {}}))
    return run_dir
