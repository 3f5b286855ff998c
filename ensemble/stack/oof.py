"""Load a run's out-of-fold and test predictions into aligned arrays for stacking.

`load_run(run)` reads the run's folds.csv and every model directory
(config.json, oof_tta.parquet or oof.parquet, test.parquet) and returns a
`StackData`: models x rows x classes arrays in folds.csv's row order, the
ground truth encoded from folds.csv, and the fold of every row.

Everything is checked before anything is used, and each problem is one
UserError naming the file and the ids, columns or models at fault: ids that
differ from folds.csv (and so between models), OOF rows whose fold disagrees
with folds.csv, NaN/inf, values outside [0, 1], multiclass rows not summing to
1 (within 1e-3; accepted rows are renormalised exactly, as the metrics would),
class columns that differ between models. A model with missing files or a
missing fold is incomplete: the error lists all of them, and
`skip_incomplete=True` leaves them out instead.

A complete model with per-view files (`predict --per-view`: oof_views.parquet
and test_views.parquet, long with a `view` column, and the views listed in
predict.json) also gives one member per TTA view, `<model_id>@<view>`, checked
the same way; they are kept apart (`view_ids`, `view_oof`, `view_test`) so the
merged members stack exactly as without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.errors import UserError
from ensemble.run import Run

ROW_SUM_TOL = 1e-3


@dataclass
class StackData:
    """Aligned level-1 predictions of one run (rows in folds.csv order)."""

    run: Run
    task: str
    classes: list[str]
    target: dict
    model_ids: list[str]
    ids: np.ndarray  # training ids, folds.csv order
    folds: np.ndarray  # fold of each training row
    y_true: np.ndarray  # rows x classes, from ensemble.data.encode_targets
    oof: np.ndarray  # models x rows x classes
    test_ids: np.ndarray
    test: np.ndarray  # models x test rows x classes
    sources: dict[str, str] = field(default_factory=dict)  # model_id -> the OOF file used
    skipped: dict[str, str] = field(default_factory=dict)  # model_id -> why it was left out
    metric: str = "log_loss"  # the metric the sweep monitored (config.json): the stack's default
    # TTA views as extra members (`predict --per-view`), kept apart so the fields above mean what they always did
    view_ids: list[str] = field(default_factory=list)  # '<model_id>@<view>', model by model in predict.json's order
    view_oof: np.ndarray | None = None  # view members x rows x classes
    view_test: np.ndarray | None = None  # view members x test rows x classes
    no_views: dict[str, str] = field(default_factory=dict)  # model_id -> why it has no view members


def _some(values, noun: str = "id") -> str:
    """'3 ids (a, b, c)' with the first 5 shown."""
    values = [str(v) for v in values]
    shown = ", ".join(values[:5]) + (", ..." if len(values) > 5 else "")
    return f"{len(values)} {noun}{'' if len(values) == 1 else 's'} ({shown})"


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({exc}); the train stage writes it, rerun it for this model.") from exc
    missing = [k for k in ("task", "classes", "target") if k not in config]
    if missing:
        raise UserError(f"{path}: missing key(s) {missing}; a model config needs task, classes, k and target.")
    if config["task"] == "retrieval":
        run_dir = path.parent.parent.parent
        raise UserError(f"{run_dir} is a retrieval run: its models output embeddings, not probabilities to stack; "
                        f"combine them with python -m ensemble.retrieve --run {run_dir}.")
    if config["task"] not in ("multiclass", "multilabel"):
        raise UserError(f"{path}: 'task' must be one of ['multiclass', 'multilabel']. Got {config['task']!r} instead.")
    if not isinstance(config["target"], dict) or "column" not in config["target"] or "form" not in config["target"]:
        raise UserError(f"{path}: 'target' must be an object with 'form' and 'column'. Got {config['target']!r} instead.")
    return config


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be read as Parquet ({exc}); rerun the stage that writes it.") from exc


def _read_folds(run: Run, target: dict, classes: list[str]) -> pd.DataFrame:
    from ensemble.data import manifest as data

    path = run.folds_file
    frame = data.read_table(path)
    needed = ["id", "fold", target["column"]]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}. "
                        f"folds.csv needs id, fold and the target column {target['column']!r}.")
    frame = frame.reset_index(drop=True)
    data.check_ids(frame, path)
    fold = pd.to_numeric(frame["fold"], errors="coerce")
    bad = ~np.isfinite(fold.to_numpy(dtype=float)) | (fold % 1 != 0)
    if bad.any():
        from ensemble.errors import format_rows

        raise UserError(f"{path}: 'fold' is not an integer at {format_rows(np.flatnonzero(bad) + 1)}; "
                        "folds are 0..k-1 as the folds stage writes them.")
    frame["fold"] = fold.astype(np.int64)
    data.check_targets(frame, data.Target(**_target_fields(target)), classes, path)
    return frame


def _target_fields(target: dict) -> dict:
    return {k: target[k] for k in ("form", "column", "maybe_weight") if k in target}


def _encode(frame: pd.DataFrame, target: dict, classes: list[str]) -> np.ndarray:
    from ensemble.data.manifest import encode_targets

    return np.asarray(encode_targets(frame, _target_fields(target), classes), dtype=np.float64)


def _check_values(path: Path | str, frame: pd.DataFrame, classes: list[str], task: str) -> np.ndarray:
    """The class columns as floats, after the NaN / range / row-sum checks."""
    try:
        values = frame[classes].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: class columns must be numeric probabilities ({exc}).") from exc
    ids = frame["id"].to_numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        cols = [c for c, b in zip(classes, bad.any(axis=0)) if b]
        raise UserError(f"{path}: NaN or inf at {_some(ids[bad.any(axis=1)])} in column(s) {cols[:5]}; "
                        "every cell must be a finite probability: rerun the prediction for this model.")
    bad = (values < 0) | (values > 1)
    if bad.any():
        raise UserError(f"{path}: values outside [0, 1] at {_some(ids[bad.any(axis=1)])}; expected probabilities "
                        f"({'softmax' if task == 'multiclass' else 'sigmoid'} outputs), not logits.")
    if task == "multiclass":
        sums = values.sum(axis=1)
        bad = np.abs(sums - 1) > ROW_SUM_TOL
        if bad.any():
            raise UserError(f"{path}: multiclass rows must sum to 1 (within {ROW_SUM_TOL}); {_some(ids[bad])} "
                            f"sum to e.g. {sums[bad][0]:.6g}. Write softmax probabilities over all classes.")
        values = values / sums[:, None]
    return values


def _check_columns(path: Path, frame: pd.DataFrame, keys: list[str], classes: list[str], ref: str) -> None:
    found = [c for c in frame.columns if c not in keys]
    missing = [c for c in classes if c not in found]
    extra = [c for c in found if c not in classes]
    absent_keys = [k for k in keys if k not in frame.columns]
    if absent_keys:
        raise UserError(f"{path}: missing column(s) {absent_keys}; it needs {keys} + one column per class.")
    if missing or extra:
        raise UserError(f"{path}: class columns differ from {ref}: missing {missing[:5]}, unexpected {extra[:5]}. "
                        "Every model must predict the same classes, with columns named exactly as the classes.")
    duplicated = frame.duplicated([k for k in keys if k != "fold"])  # id, and view in the per-view files
    if duplicated.any():
        per = " per view" if "view" in keys else ""
        raise UserError(f"{path}: duplicate ids {_some(frame['id'][duplicated].unique())}; each id appears once{per}.")


def _model_files(model_dir: Path, tta: bool) -> tuple[Path | None, list[str]]:
    """The OOF file to use and what is missing (empty when complete).

    predict writes predict.json last: without it, the parquets beside it may mix two predictions."""
    missing = [] if (model_dir / "predict.json").exists() else ["predict.json (rerun python -m ensemble.predict)"]
    use_tta = tta and (model_dir / "oof_tta.parquet").exists()
    oof = model_dir / ("oof_tta.parquet" if use_tta else "oof.parquet")
    if not oof.exists():
        note = " (oof_tta.parquet exists, but --no-tta refuses it)" if (model_dir / "oof_tta.parquet").exists() else ""
        missing.append(f"oof.parquet{note}")
    if not (model_dir / "test.parquet").exists():
        missing.append("test.parquet")
    return (oof if oof.exists() else None), missing


def _read_oof(path: Path, index: pd.Index, folds: np.ndarray, classes: list[str], task: str,
              class_ref: str) -> np.ndarray | str:
    """Rows x classes in folds.csv order, or why the model is incomplete (whole folds missing)."""
    oof = _read_parquet(path)
    _check_columns(path, oof, ["id", "fold"], classes, class_ref)
    return _align_oof(path, oof, index, folds, classes, task)


def _align_oof(path: Path | str, oof: pd.DataFrame, index: pd.Index, folds: np.ndarray, classes: list[str],
               task: str) -> np.ndarray | str:
    """`oof`'s class columns in folds.csv order after the id, fold and value checks (`path` names it in errors)."""
    if index.name == "shared":  # rows outside the members' shared rows are not stacked
        oof = oof[oof["id"].astype(str).isin(index)]
    oof_ids = oof["id"].astype(str).to_numpy(dtype=object)
    pos = index.get_indexer(oof_ids)
    if (pos < 0).any():
        raise UserError(f"{path}: {_some(oof_ids[pos < 0])} not in folds.csv; OOF ids must be the training "
                        "ids of folds.csv (was it written for another run?).")
    absent = np.ones(len(index), dtype=bool)
    absent[pos] = False
    if absent.any():
        missing_folds = np.unique(folds[absent])
        if not np.isin(folds[~absent], missing_folds).any():
            return f"{Path(path).name} has no rows for fold(s) {missing_folds.tolist()}"
        raise UserError(f"{path}: ids differ from folds.csv and the other models: {_some(index[absent])} "
                        "of folds.csv are missing; every training id needs exactly one OOF row.")
    wrong = pd.to_numeric(oof["fold"], errors="coerce").to_numpy() != folds[pos]
    if wrong.any():
        raise UserError(f"{path}: the fold of {_some(oof_ids[wrong])} differs from folds.csv; OOF rows must "
                        "come from the model that held that id out (rerun with the run's folds.csv).")
    values = np.empty((len(index), len(classes)))
    values[pos] = _check_values(path, oof, classes, task)
    return values


def _read_test(path: Path, classes: list[str], task: str, class_ref: str, test_ids, test_ref) -> tuple:
    """(ids, rows x classes) of test.parquet, aligned to the first model's test ids when given."""
    test = _read_parquet(path)
    _check_columns(path, test, ["id"], classes, class_ref)
    return _align_test(path, test, classes, task, test_ids, test_ref)


def _align_test(path: Path | str, test: pd.DataFrame, classes: list[str], task: str, test_ids, test_ref) -> tuple:
    """(ids, rows x classes) of `test` after the value checks, in `test_ids`' order when given."""
    t_ids = test["id"].astype(str).to_numpy(dtype=object)
    if test_ids is None:
        return t_ids, _check_values(path, test, classes, task)
    pos = pd.Index(test_ids).get_indexer(t_ids)
    extra, absent = t_ids[pos < 0], np.setdiff1d(test_ids, t_ids)
    if len(extra) or len(absent):
        parts = [f"{_some(extra)} unexpected"] * bool(len(extra)) + [f"{_some(absent)} missing"] * bool(len(absent))
        raise UserError(f"{path}: test ids differ from {test_ref}: {', '.join(parts)}; all models must predict "
                        "the same test ids.")
    values = np.empty((len(test_ids), len(classes)))
    values[pos] = _check_values(path, test, classes, task)
    return test_ids, values


VIEW_FILES = ("oof_views.parquet", "test_views.parquet")


def _listed_views(model_dir: Path) -> tuple[list[str], str]:
    """predict.json's views when the model has both per-view files, else ([], why it has no view members)."""
    present = [name for name in VIEW_FILES if (model_dir / name).exists()]
    if not present:
        return [], "no per-view files"
    if len(present) == 1:
        return [], f"{present[0]} without {next(n for n in VIEW_FILES if n not in present)}"
    path = model_dir / "predict.json"
    try:
        meta = json.loads(path.read_text())
        views = meta.get("views")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({exc}); rerun python -m ensemble.predict for this "
                        "model.") from exc
    if meta.get("per_view") is False:  # predicted again without --per-view: the files are an older prediction's
        return [], "predicted without --per-view (its per-view files are older)"
    if not views:
        return [], "predict.json lists no views"
    return [str(v) for v in views], ""


def _read_views(run: Run, model_dir: Path, views: list[str], index: pd.Index, folds: np.ndarray, classes: list[str],
                task: str, class_ref: str, test_ids, test_ref) -> tuple[np.ndarray, np.ndarray]:
    """(views x rows x classes, views x test rows x classes) from oof_views/test_views.parquet (long: one row
    per id and view), each view checked like a model's own OOF and test files."""
    redo = f"rerun python -m ensemble.predict --run {run.show()} --per-view --force --models {model_dir.name}"
    out = []
    for name, keys in zip(VIEW_FILES, (["id", "fold", "view"], ["id", "view"])):
        path = model_dir / name
        frame = _read_parquet(path)
        _check_columns(path, frame, keys, classes, class_ref)
        frame["view"] = frame["view"].astype(str)
        found = frame["view"].unique().tolist()
        missing, extra = [v for v in views if v not in found], [v for v in found if v not in views]
        if missing or extra:
            raise UserError(f"{path}: views differ from predict.json's {views}: missing {missing[:5]}, unexpected "
                            f"{extra[:5]}; the per-view files are from another prediction: {redo}.")
        parts = dict(tuple(frame.groupby("view", sort=False)))
        values = []
        for view in views:
            label = f"{path} (view {view!r})"
            if name == "oof_views.parquet":
                value = _align_oof(label, parts[view], index, folds, classes, task)
                if isinstance(value, str):
                    raise UserError(f"{model_dir}/{value}, though the model's own OOF file has them; {redo}.")
            else:
                value = _align_test(label, parts[view], classes, task, test_ids, test_ref)[1]
            values.append(value)
        out.append(np.stack(values))
    return out[0], out[1]


def load_run(run: Run | str, tta: bool = True, skip_incomplete: bool = False) -> StackData:
    """Read and check every model's OOF and test predictions of `run`; see the module docstring."""
    run = run if isinstance(run, Run) else Run(run)
    run.check()
    model_dirs = sorted(p for p in run.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    configs = {}
    for d in model_dirs:
        if (d / "config.json").exists():
            configs[d.name] = _read_config(d / "config.json")
    if not configs:
        raise UserError(f"{run.show(run.models_dir)}: no model directories with a config.json; run the sweep first.")
    ref_id = next(iter(configs))
    ref = configs[ref_id]
    for model_id, config in configs.items():
        for key in ("task", "target"):
            if config[key] != ref[key]:
                raise UserError(f"{run.show(run.model_dir(model_id) / 'config.json')}: {key} {config[key]!r} differs from "
                                f"{run.rel(run.model_dir(ref_id))} ({ref[key]!r}); a run stacks models of one task and target.")
        a, b = set(map(str, config["classes"])), set(map(str, ref["classes"]))
        if a != b:  # the same names in another order are fine: columns are read by name
            raise UserError(f"{run.show(run.model_dir(model_id) / 'config.json')}: classes differ from {run.rel(run.model_dir(ref_id))}: "
                            f"missing {sorted(b - a)[:5]}, unexpected {sorted(a - b)[:5]}; every model must "
                            "predict the same classes.")
    task, target, classes = ref["task"], ref["target"], [str(c) for c in ref["classes"]]
    folds_frame = _read_folds(run, target, classes)
    shared = run.shared_ids(configs.values())
    if shared is not None:  # rounds on other manifests: the rows every member predicts
        kept = folds_frame["id"].astype(str).isin(shared)
        print(f"stacking the {int(kept.sum())} rows every model trained on: {int((~kept).sum())} rows of folds.csv are "
              "in some rounds' manifests only")
        folds_frame = folds_frame[kept].reset_index(drop=True)
    ids = folds_frame["id"].to_numpy(dtype=object)
    folds = folds_frame["fold"].to_numpy()
    if "k" in ref:
        run.check_folds(folds_frame["fold"], ref["k"])
    index = pd.Index(ids, name="shared" if shared is not None else None)
    incomplete = {d.name: "config.json missing" for d in model_dirs if d.name not in configs}
    oof_list, test_list, sources, test_ids, test_ref = [], [], {}, None, None
    view_ids, view_oof, view_test, no_views = [], [], [], {}
    class_ref = run.rel(run.model_dir(ref_id) / "config.json")
    for model_id in configs:
        model_dir = run.model_dir(model_id)
        oof_path, missing = _model_files(model_dir, tta)
        if missing:
            incomplete[model_id] = ", ".join(missing) + " missing"
            continue
        values = _read_oof(oof_path, index, folds, classes, task, class_ref)
        if isinstance(values, str):  # a fold not written yet
            incomplete[model_id] = values
            continue
        t_ids, t_values = _read_test(model_dir / "test.parquet", classes, task, class_ref, test_ids, test_ref)
        if test_ids is None:
            test_ids, test_ref = t_ids, model_dir / "test.parquet"
        oof_list.append(values)
        test_list.append(t_values)
        sources[model_id] = oof_path.name
        views, why = _listed_views(model_dir)
        if not views:
            no_views[model_id] = why
            continue
        v_oof, v_test = _read_views(run, model_dir, views, index, folds, classes, task, class_ref, test_ids,
                                    test_ref)
        view_ids += [f"{model_id}@{v}" for v in views]
        view_oof.append(v_oof)
        view_test.append(v_test)

    skipped = {}
    if incomplete:
        listing = "; ".join(f"{m}: {why}" for m, why in incomplete.items())
        if not skip_incomplete:
            raise UserError(f"{run.show(run.models_dir)}: {len(incomplete)} incomplete model(s): {listing}. Finish them "
                            "(rerun the sweep/predict stage) or pass --skip-incomplete to stack without them.")
        skipped = incomplete
    if not oof_list:
        raise UserError(f"{run.show(run.models_dir)}: no complete model to stack ({len(incomplete)} incomplete).")
    return StackData(
        run=run, task=task, classes=classes, target=target, model_ids=list(sources), ids=ids, folds=folds,
        y_true=_encode(folds_frame, target, classes), oof=np.stack(oof_list), test_ids=test_ids,
        test=np.stack(test_list), sources=sources, skipped=skipped, metric=ref.get("metric", "log_loss"),
        view_ids=view_ids, view_oof=np.concatenate(view_oof) if view_ids else None,
        view_test=np.concatenate(view_test) if view_ids else None, no_views=no_views if view_ids else {},
    )
