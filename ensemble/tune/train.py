"""Train one fold of one model: epochs in stages, a checkpoint every epoch, best-epoch OOF.

No Ray here. The sweep's fold tasks (`ensemble.tune.trial`) call `train_until`,
which trains a fold through its epochs; `train_fold` runs the same code in a
plain loop for debugging. Everything a fold needs to continue lives in its
folder, so a resumed fold equals an uninterrupted one:

  models/<model_id>/fold<k>/
    last.pt        model + optimizer + history after the last finished epoch
    weights.pt     the best epoch's state_dict
    oof.parquet    the best epoch's held-out predictions: id, fold, one column per class
                 (retrieval: id, fold only; predict writes the held-out embeddings)
    metrics.json   per-epoch history, best epoch, monitored metric, complete flag

Every random draw of epoch e is seeded from (seed, fold, e), so restarting at
epoch e from last.pt replays exactly what an uninterrupted run would do.

A retrieval model (task: retrieval) trains an embedding net (`ensemble.models.EmbeddingNet`)
as a classifier of its training folds' identities, through the space's head (softmax,
ArcFace, CosFace, sub-center ArcFace); each epoch it is scored by retrieval on the
held-out fold, whose identities it never saw: every held-out image queries the rest.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import timm.loss
import timm.optim
import timm.scheduler
import torch

from ensemble.data.loader import DecodedCache, ImageDataset, cache_path, create_loader, normalize_batch
from ensemble.data.manifest import Target, encode_targets, read_manifest
from ensemble.errors import UserError
from ensemble.io import atomic_path, write_json, write_parquet
from ensemble.metrics import METRICS, is_better, task_metrics
from ensemble.models import create_embedding_model, create_model, frozen_bn_eval, set_backbone_frozen
from ensemble.run import Run, stage_of, stage_size, total_epochs


@dataclass
class FoldResult:
    model_id: str
    fold: int
    best_epoch: int
    best_score: float
    metric: str
    epochs: int
    complete: bool


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def pseudo_labels(logits: np.ndarray, task: str, pseudo: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rows kept, their targets) from an earlier model's logits, per the round's `pseudo` settings.

    Temperature divides the logits (< 1 sharpens); a row's confidence is its top probability
    (multilabel: that of its least sure label); rows below min_confidence, unreadable rows (NaN)
    and, with max_per_class, all but the most confident rows of each predicted class are dropped;
    hard labels are the argmax one-hot (multilabel: p > 0.5)."""
    z = torch.as_tensor(logits, dtype=torch.float64) / pseudo["temperature"]
    if task == "multilabel":
        proba = torch.sigmoid(z).numpy()
        confidence = np.maximum(proba, 1 - proba).min(1)
        hard = (proba > 0.5).astype(np.float32)
    else:
        proba = torch.softmax(z, -1).numpy()
        confidence = proba.max(1)
        hard = np.eye(proba.shape[1], dtype=np.float32)[np.nan_to_num(proba, nan=0).argmax(1)]
    keep = ~np.isnan(confidence) & (confidence >= pseudo["min_confidence"])
    if pseudo.get("max_per_class"):
        label = hard.argmax(1)
        order = np.lexsort((np.arange(len(confidence)), -np.nan_to_num(confidence, nan=-1)))  # most confident first
        taken = np.zeros(len(keep), bool)
        for c in np.unique(label[keep]):
            taken[[i for i in order if keep[i] and label[i] == c][: pseudo["max_per_class"]]] = True
        keep = taken
    rows = np.flatnonzero(keep)
    targets = hard if pseudo["labels"] == "hard" else proba.astype(np.float32)
    return rows, targets[rows]


class FoldTrainer:
    """The state of one fold in training; `restore` continues from its last.pt."""

    def __init__(self, config: dict, fold: int, run: Run | str | os.PathLike, *, cpus: float = 1.0,
                 device: str | None = None):
        self.config, self.fold = config, fold
        self.run = run if isinstance(run, Run) else Run(run)
        self.dir = self.run.fold_dir(config["model_id"], fold)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cpus = cpus
        # Threads = this fold's CPU share: 2 cores shared by 4 processes x N threads crawl.
        torch.set_num_threads(max(1, int(cpus)))
        cv2.setNumThreads(max(1, int(cpus)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.params = config["params"]
        self.retrieval = config["task"] == "retrieval"
        self._load_rows()
        torch.manual_seed(_seed(config["seed"], fold, 10_000))
        kwargs = dict(pretrained=config.get("pretrained", False), weights=config.get("weights"),
                      dropout=self.params["dropout"], drop_path=self.params["drop_path"])
        if self.retrieval:
            self.model = create_embedding_model(config["backbone"], len(self.train_classes), self.params, **kwargs)
        else:
            self.model = create_model(config["backbone"], len(config["classes"]), **kwargs)
        self.model.to(self.device)
        # AMP's loss scale lives as long as the fold (and in last.pt): a fresh scaler every epoch would start
        # again at 2^16 and skip the optimizer steps it takes to come back down, every epoch.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and self.params.get("amp", True))
        self.w_train = None  # per-row loss weights, when pseudo-labelled rows train too
        if config.get("init_from") and not (self.dir / "last.pt").exists():  # a round's model: this fold's model
            self.model.load_state_dict(self._parent_weights(config["init_from"]))  # of the earlier round, no other
        if config.get("hard_examples"):
            self._keep_hard_examples()
        if config.get("pseudo"):
            self._add_pseudo_rows()
        self._soft_ce = timm.loss.SoftTargetCrossEntropy()
        self.epoch, self.history, self.best = 0, [], None
        self._stage_index = None
        self.skipped_ids: set[str] = set()

    # ----------------------------------------------------------------- data

    def _load_rows(self) -> None:
        data = self.config["data"]
        target = Target(**self.config["target"])
        # Validated once at launch: here only the rows of folds.csv, in its order.
        manifest = read_manifest(data["manifest"], data["root"], target=target, classes=self.config["classes"],
                                 check_images="none")
        folds = pd.read_csv(self.run.folds_file, dtype={"id": str})
        folds = folds[folds["id"].isin(manifest.frame["id"])]  # a round's manifest may hold other rows
        frame = manifest.frame.set_index("id").loc[folds["id"]].reset_index()
        paths = [str(Path(data["root"]) / p) for p in frame["image"]]
        is_valid = folds["fold"].to_numpy() == self.fold
        self.paths = paths  # folds.csv's rows of this manifest: one decoded cache for all folds and models
        self.train_rows, self.valid_rows = np.flatnonzero(~is_valid), np.flatnonzero(is_valid)
        if self.retrieval:  # identity codes: the head classifies this fold's training identities only
            labels = frame[target.column].astype(str).to_numpy()
            self.train_classes, self.y_train = np.unique(labels[~is_valid], return_inverse=True)
            self.y_valid = np.unique(labels, return_inverse=True)[1][is_valid]  # compared for equality only
        else:
            y = encode_targets(frame, target, self.config["classes"])
            self.y_train, self.y_valid = y[~is_valid], y[is_valid]
        self.train_ids, self.valid_ids = frame["id"][~is_valid].tolist(), frame["id"][is_valid].tolist()
        self.mean, self.std = data["normalize"]["mean"], data["normalize"]["std"]

    def _dataset(self, rows: np.ndarray, y, stage: dict, train: bool) -> ImageDataset:
        data, size = self.config["data"], stage_size(self.config, stage)
        preprocess = stage.get("preprocess", data["preprocess"])
        cache = None
        if data.get("cache", True):  # keyed by all of folds.csv's images: shared by every fold and model
            cache = DecodedCache(cache_path(self.run.cache_dir, self.paths, size, preprocess), len(self.paths), size)
        return ImageDataset([self.paths[i] for i in rows], y, size, preprocess=preprocess, cache=cache, cache_rows=rows,
                            augment=stage.get("augment", data["augment"]) if train else None,
                            on_bad_image=data.get("on_bad_image", "raise"), seed=self.config["seed"])

    # ----------------------------------------------------------------- optimisation

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training logits; a margin head needs the labels (the margin applies to the true identity)."""
        return self.model(x, y.long()) if self.retrieval else self.model(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.retrieval:
            return torch.nn.functional.cross_entropy(logits, y.long(), label_smoothing=self.params["label_smoothing"])
        if self.config["task"] == "multilabel":
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=self._pos_weight)
        smoothing = self.params["label_smoothing"]
        if smoothing:
            y = y * (1 - smoothing) + smoothing / y.shape[1]
        # Soft targets (FashionAI's 'maybe') and one-hot alike: cross-entropy against the target rows.
        return self._soft_ce(logits, y)

    def _weighted_loss(self, logits: torch.Tensor, y: torch.Tensor, weight: np.ndarray) -> torch.Tensor:
        w = torch.as_tensor(weight, dtype=torch.float32, device=logits.device)
        if self.config["task"] == "multilabel":
            rows = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y, pos_weight=self._pos_weight, reduction="none").mean(-1)
        else:
            smoothing = self.params["label_smoothing"]
            y = y * (1 - smoothing) + smoothing / y.shape[1] if smoothing else y
            rows = -(y * torch.log_softmax(logits.float(), -1)).sum(-1)
        return (rows * w).sum() / w.sum()

    @property
    def _pos_weight(self) -> torch.Tensor | None:
        if self.params.get("pos_weight") != "auto":
            return None
        pos = self.y_train.sum(0)
        return torch.as_tensor((len(self.y_train) - pos) / np.maximum(pos, 1), dtype=torch.float32, device=self.device)

    def _enter_stage(self, index: int, stage: dict) -> None:
        """New optimizer and scheduler at each stage boundary (and on restore)."""
        set_backbone_frozen(self.model, stage.get("freeze", False))
        lr = self.params["lr"] * stage.get("lr_scale", 1.0)
        self.optimizer = timm.optim.create_optimizer_v2(
            self.model, opt=self.params["optimizer"], lr=lr, weight_decay=self.params["weight_decay"],
            momentum=self.params["momentum"])
        self.scheduler = None
        if self.params["scheduler"] not in (None, "none"):
            self.scheduler, _ = timm.scheduler.create_scheduler_v2(
                self.optimizer, sched=self.params["scheduler"], num_epochs=stage["epochs"],
                warmup_epochs=min(self.params["warmup_epochs"], max(stage["epochs"] - 1, 0)))
        self._stage_index = index

    # ----------------------------------------------------------------- rounds

    def _parent_weights(self, model_id: str) -> dict:
        """This fold's best weights in an earlier round's model (never another fold's: that would leak)."""
        path = self.run.fold_dir(model_id, self.fold) / "weights.pt"
        metrics = self.run.read_metrics(model_id, self.fold) or {}
        if not (path.exists() and metrics.get("complete")):
            raise RuntimeError(f"{self.config['model_id']} fold {self.fold} starts from {model_id} fold {self.fold}, "
                               f"which is not complete{'' if path.exists() else ' (no weights.pt: pruned?)'}")
        return torch.load(path, map_location=self.device, weights_only=True)

    def _predict_logits(self, model, paths: list[str], config: dict) -> np.ndarray:
        """Logits of `paths` by `model` (an earlier round's), plain view at that model's last stage (NaN: unreadable)."""
        stage = config["stages"][-1]
        dataset = ImageDataset(paths, None, stage_size(config, stage), preprocess=stage.get("preprocess"),
                               on_bad_image="skip")
        out = np.full((len(paths), len(config["classes"])), np.nan, np.float32)
        model.eval()
        with torch.no_grad():
            for x, _, index, _ in create_loader(dataset, self.params["batch_size"] * 2, cpus=self.cpus):
                if x is not None:
                    out[index.numpy()] = model(normalize_batch(x.to(self.device), self.mean, self.std)).float().cpu()
        return out

    def _keep_hard_examples(self) -> None:
        """Train on the training rows the earlier round's fold model (this model's start) predicts worst.

        Chosen once, from the start weights, and kept in the fold's hard_examples.json: a resumed
        fold fine-tunes on the same rows."""
        path = self.dir / "hard_examples.json"
        if not path.exists():
            logits = torch.as_tensor(self._predict_logits(self.model, [self.paths[i] for i in self.train_rows],
                                                          self.config))
            y = torch.as_tensor(self.y_train, dtype=torch.float32)
            if self.config["task"] == "multilabel":
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)
            else:
                loss = -(y * torch.log_softmax(logits, -1)).sum(-1)
            n = max(1, round(self.config["hard_examples"]["top"] * len(loss)))
            worst = np.sort(np.argsort(-np.nan_to_num(loss.numpy(), nan=-np.inf), kind="stable")[:n])
            write_json({"from": self.config["init_from"], "top": self.config["hard_examples"]["top"],
                        "ids": [self.train_ids[i] for i in worst]}, path)
        keep = np.isin(self.train_ids, json.loads(path.read_text())["ids"])
        self.train_rows, self.y_train = self.train_rows[keep], self.y_train[keep]
        self.train_ids = [i for i, k in zip(self.train_ids, keep) if k]

    def _add_pseudo_rows(self) -> None:
        """Pseudo-labelled rows from the earlier round's model of *this fold* (`pseudo_labels`).

        Fold k's model never saw fold k's labels, so neither do its pseudo-labels: the held-out
        fold stays honest. Made once and kept in the fold's pseudo.parquet (resume reads it). The
        source's images join `paths` whole (one decoded cache for every fold); the kept ones train."""
        pseudo = self.config["pseudo"]
        source = read_manifest(pseudo["manifest"], self.config["data"]["root"], require_target=False,
                               check_images="none")  # relative to the space's root, as predict reads it
        paths = source.image_paths
        path = self.dir / "pseudo.parquet"
        if not path.exists():
            parent_config = self.run.read_config(pseudo["model"])
            model = create_model(parent_config["backbone"], len(self.config["classes"]), pretrained=False)
            model.load_state_dict(self._parent_weights(pseudo["model"]))
            logits = self._predict_logits(model.to(self.device), paths, parent_config)
            rows, targets = pseudo_labels(logits, self.config["task"], pseudo)
            frame = pd.DataFrame(targets, columns=self.config["classes"])
            frame.insert(0, "row", rows)
            frame.insert(0, "id", source.frame["id"].to_numpy()[rows])
            write_parquet(frame, path)
        frame = pd.read_parquet(path)
        rows, ids = frame["row"].to_numpy(), source.frame["id"].to_numpy()
        if len(rows) and (rows.max() >= len(ids) or (ids[rows] != frame["id"].to_numpy()).any()):
            raise UserError(f"{pseudo['manifest']} changed since this fold's pseudo-labels were made ({path}): "
                            "restore it, or start the round again under a new --name.")
        start = len(self.paths)
        self.paths = self.paths + [str(p) for p in paths]
        self.train_rows = np.concatenate([self.train_rows, start + frame["row"].to_numpy()])
        self.y_train = np.concatenate([self.y_train, frame[self.config["classes"]].to_numpy(np.float32)])
        self.train_ids = self.train_ids + [f"pseudo:{i}" for i in frame["id"]]
        self.w_train = np.ones(len(self.train_rows), np.float32)
        self.w_train[len(self.train_rows) - len(frame):] = pseudo["weight"]

    # ----------------------------------------------------------------- checkpoints

    def restore(self) -> bool:
        """Continue from last.pt when it exists; True if something was restored."""
        path = self.dir / "last.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        self.skipped_ids = set(state["skipped_ids"])
        if (self.run.read_metrics(self.config["model_id"], self.fold) or {}).get("epochs", -1) < self.epoch:
            # A crash between last.pt and metrics.json: make metrics.json tell the epoch the checkpoint holds.
            self._write_metrics(complete=self.epoch >= total_epochs(self.config))
        if self.epoch < total_epochs(self.config):
            index, stage, _ = stage_of(self.config, self.epoch)
            self._enter_stage(index, stage)
            if state["stage"] == index:  # mid-stage: the optimizer's moments continue too
                self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when saved without AMP (a CPU run): the scaler starts fresh
            self.scaler.load_state_dict(state["scaler"])
        return True

    def _save(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "stage": self._stage_index, "history": self.history, "best": self.best,
                 "skipped_ids": sorted(self.skipped_ids), "scaler": self.scaler.state_dict()}
        with atomic_path(self.dir / "last.pt") as tmp:
            torch.save(state, tmp)

    def _write_metrics(self, complete: bool, stopped: str | None = None) -> None:
        write_json({
            "model_id": self.config["model_id"], "fold": self.fold, "metric": self.config["metric"],
            "mode": self.config["mode"], "best_epoch": self.best["epoch"] if self.best else None,
            "best_score": self.best["score"] if self.best else None, "epochs": self.epoch,
            "complete": complete, "stopped": stopped, "history": self.history,
            "skipped_ids": sorted(self.skipped_ids),
        }, self.dir / "metrics.json")

    # ----------------------------------------------------------------- epochs

    def train_epoch(self) -> dict:
        """Train epoch `self.epoch`, evaluate the held-out fold, checkpoint; returns its metrics."""
        start, started = time.perf_counter(), time.time()
        # Who is training what, right now: for `ps`-style monitoring (and the worker-kill test).
        write_json({"pid": os.getpid(), "epoch": self.epoch, "started": started}, self.dir / "running.json")
        index, stage, stage_epoch = stage_of(self.config, self.epoch)
        if index != self._stage_index:
            self._enter_stage(index, stage)
        if self.scheduler is not None:
            self.scheduler.step(stage_epoch)
        seed = _seed(self.config["seed"], self.fold, self.epoch)
        torch.manual_seed(seed)
        dataset = self._dataset(self.train_rows, self.y_train, stage, train=True)
        dataset.epoch = self.epoch
        loader = create_loader(dataset, self.params["batch_size"], shuffle=True, cpus=self.cpus, seed=seed,
                               drop_last=len(dataset) > self.params["batch_size"])
        use_amp = self.scaler.is_enabled()
        self.model.train()
        frozen_bn_eval(self.model)
        total, count = 0.0, 0
        for x, y, index, skipped in loader:
            self.skipped_ids.update(self.train_ids[i] for i in skipped)
            if x is None:
                continue
            x, y = normalize_batch(x.to(self.device), self.mean, self.std), y.to(self.device)
            with torch.autocast(self.device.type, enabled=use_amp):
                logits = self._forward(x, y)
                if self.w_train is None:
                    loss = self._loss(logits, y)
                else:  # pseudo-labelled rows weigh pseudo.weight, labelled rows 1
                    loss = self._weighted_loss(logits, y, self.w_train[index.numpy()])
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total, count = total + loss.item() * len(x), count + len(x)
        proba, valid_loss = self.predict_valid(stage)
        self.epoch += 1
        row = {"epoch": self.epoch, "train_loss": total / max(count, 1), "loss": valid_loss,
               "lr": self.optimizer.param_groups[0]["lr"], "started": started, "seconds": time.perf_counter() - start,
               # The device Ray assigned this fold (CUDA_VISIBLE_DEVICES) and its share of it, for placement checks.
               "device": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "gpu": self.config["resources"].get("gpu", 0)}
        row.update(self.score(proba))
        self.history.append(row)
        score = row[self.config["metric"]]
        if self.best is None or is_better(score, self.best["score"], self.config["mode"]):
            self.best = {"epoch": self.epoch, "score": score}
            self._write_best(proba)
        self._save()
        self._write_metrics(complete=self.epoch >= total_epochs(self.config))
        (self.dir / "running.json").unlink(missing_ok=True)
        return row

    @torch.no_grad()
    def predict_valid(self, stage: dict) -> tuple[np.ndarray, float | None]:
        """The held-out fold's probabilities and loss (retrieval: its L2-normalised embeddings, no loss)."""
        if self.retrieval:
            return self._embed_valid(stage), None
        dataset = self._dataset(self.valid_rows, self.y_valid, stage, train=False)
        loader = create_loader(dataset, self.params["batch_size"] * 2, cpus=self.cpus)
        self.model.eval()
        outputs, losses = [], []
        for x, y, index, skipped in loader:
            self.skipped_ids.update(self.valid_ids[i] for i in skipped)
            if x is None:
                continue
            logits = self.model(normalize_batch(x.to(self.device), self.mean, self.std)).float()
            losses.append(self._loss(logits, y.to(self.device)).item() * len(x))
            outputs.append((index, logits.cpu()))
        proba = np.full(self.y_valid.shape, np.nan, dtype=np.float32)
        for index, logits in outputs:
            act = torch.sigmoid(logits) if self.config["task"] == "multilabel" else torch.softmax(logits, -1)
            proba[index.numpy()] = act.numpy()
        return proba, sum(losses) / max(sum(len(o[0]) for o in outputs), 1)

    def _embed_valid(self, stage: dict) -> np.ndarray:
        dataset = self._dataset(self.valid_rows, None, stage, train=False)
        loader = create_loader(dataset, self.params["batch_size"] * 2, cpus=self.cpus)
        self.model.eval()
        emb = np.full((len(self.valid_rows), self.params["embedding_dim"]), np.nan, dtype=np.float32)
        for x, _, index, skipped in loader:
            self.skipped_ids.update(self.valid_ids[i] for i in skipped)
            if x is not None:
                e = self.model.embed(normalize_batch(x.to(self.device), self.mean, self.std)).float()
                emb[index.numpy()] = torch.nn.functional.normalize(e, dim=1).cpu().numpy()
        return emb

    def score(self, proba: np.ndarray) -> dict:
        """Every metric a sweep of this task may monitor (ensemble.metrics.task_metrics)."""
        ok = ~np.isnan(proba).any(axis=1)  # rows skipped as unreadable images are not scored
        task = self.config["task"]
        if self.retrieval:  # one leave-one-out search gives every retrieval metric
            from ensemble.retrieve.metrics import leave_one_out

            scores = leave_one_out(proba[ok], self.y_valid[ok])
            return {name: float(scores[name]) for name in task_metrics(task)} | {"no_relevant": scores["no_relevant"]}
        return {name: float(METRICS[name](self.y_valid[ok], proba[ok], task)) for name in task_metrics(task)}

    def _write_best(self, proba: np.ndarray) -> None:
        with atomic_path(self.dir / "weights.pt") as tmp:
            torch.save(self.model.state_dict(), tmp)
        if self.retrieval:  # the held-out ids only: predict embeds them (with TTA) from weights.pt
            write_parquet(pd.DataFrame({"id": self.valid_ids, "fold": self.fold}), self.dir / "oof.parquet")
            return
        # Rows of unreadable images (on_bad_image: skip, listed in metrics.json): the training prior,
        # so that every id keeps a prediction for the stacking layer.
        proba = np.where(np.isnan(proba), self.y_train.mean(axis=0), proba)
        oof = pd.DataFrame(proba, columns=self.config["classes"])
        oof.insert(0, "fold", self.fold)
        oof.insert(0, "id", self.valid_ids)
        write_parquet(oof, self.dir / "oof.parquet")



def train_until(config: dict, fold: int, run: Run | str | os.PathLike, epoch: int, *, cpus: float = 1.0,
                after_epoch: Callable[[], None] | None = None) -> dict:
    """Bring a fold to `epoch` finished epochs (from its checkpoint); return that epoch's metrics.

    The sweep's fold task: one call trains a fold through all its epochs, so the
    model, data and worker process stay warm between epochs. `after_epoch` runs
    once each epoch's files are written (URI storage uploads them)."""
    trainer = FoldTrainer(config, fold, run, cpus=cpus)
    if trainer.restore() and after_epoch:
        after_epoch()  # the restored epoch's files, e.g. a metrics.json that lagged behind last.pt
    while trainer.epoch < epoch:
        trainer.train_epoch()
        if after_epoch:
            after_epoch()
    return dict(trainer.history[epoch - 1], fold=fold)


def train_fold(config: dict, fold: int, run: Run | str | os.PathLike, *, cpus: float = 1.0) -> FoldResult:
    """All epochs of one fold in this process (no Ray): the debugging path."""
    trainer = FoldTrainer(config, fold, run, cpus=cpus)
    trainer.restore()
    while trainer.epoch < total_epochs(config):
        trainer.train_epoch()
    trainer.run.mark_complete(config["model_id"], fold)
    return FoldResult(config["model_id"], fold, trainer.best["epoch"], trainer.best["score"], config["metric"],
                      trainer.epoch, True)
