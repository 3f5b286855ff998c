import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from report_fixtures import add_sweep_files, stack_run, write_report_retrieval_run, write_report_run
from stack_fixtures import write_run

from ensemble.report import cli
from ensemble.report.collect import collect
from ensemble.report.page import diversity
from ensemble.run import Run

REPO = Path(__file__).resolve().parents[1]
ALL = ["run", "leaderboard", "curves", "diversity", "stacking", "task", "tta"]


def build(run: Path, *args: str) -> str:
    """Write the report in-process; returns the page."""
    assert cli.main(["--run", str(run), *args]) == 0
    return (run / "report" / "index.html").read_text() if not args else ""


def sections(page: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)">', page)


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    run = write_report_run(tmp_path_factory.mktemp("mc") / "run")
    build(run)
    return run


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    run = write_report_run(tmp_path_factory.mktemp("ml") / "run", "multilabel", n=300, n_classes=5, seed=1)
    build(run)
    return run


def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("report")))


# ------------------------------------------------------------------ what the page shows


def test_finished_multiclass_run_has_every_section(mc):
    page = (mc / "report/index.html").read_text()
    assert sections(page) == ALL
    toc = re.search(r"<nav>(.*?)</nav>", page, re.DOTALL).group(1)
    assert re.findall(r'href="#([a-z]+)"', toc) == ALL  # the table of contents lists exactly the sections
    assert sorted(p.name for p in (mc / "report").iterdir()) == [
        "confusion.png", "curves.png", "diversity.png", "greedy.png", "index.html", "leaderboard.csv",
        "leaderboard.png", "reliability.png", "stacking.png", "tta.png"]
    scores = pd.read_csv(mc / "ensemble/scores.csv").set_index("method")
    winner = scores["cv_score"].idxmin()
    single = scores.index[0]
    assert f"The winner is <strong>{winner}</strong>" in page
    gain = scores.loc[single, "cv_score"] - scores.loc[winner, "cv_score"]
    assert f"{abs(gain):.4f} {'better' if gain >= 0 else 'worse'} than the best single model ({single}" in page
    assert "Confusion and calibration" in page and "the stack&#39;s winner, greedy" in page
    assert 'href="../space.yaml"' in page and "a synthetic space for the report tests" in page
    assert "4 complete" in page and "4 folds, stratified" in page and "cpu 1.0, gpu 0.25" in page


def test_leaderboard_csv_matches_the_fold_files(mc):
    board = pd.read_csv(mc / "report/leaderboard.csv")
    assert board.columns.tolist() == ["rank", "model", "model_id", "state", "metric", "fold0", "fold1", "fold2",
                                      "fold3", "mean", "std", "best_epochs", "oof_score", "oof_tta_score",
                                      "tta_gain", "train_seconds", "predict_seconds"]
    assert board["mean"].is_monotonic_increasing and board["rank"].tolist() == [1, 2, 3, 4]  # log loss: lowest first
    for row in board.itertuples():
        metrics = [json.loads((mc / f"models/{row.model_id}/fold{f}/metrics.json").read_text()) for f in range(4)]
        best = [m["best_score"] for m in metrics]
        assert [row.fold0, row.fold1, row.fold2, row.fold3] == pytest.approx(best)
        assert row.mean == pytest.approx(np.mean(best)) and row.std == pytest.approx(np.std(best))
        assert row.train_seconds == pytest.approx(sum(r["seconds"] for m in metrics for r in m["history"]))
        assert row.best_epochs == "4 4 4 4" and row.state == "complete" and row.metric == "log_loss"
        assert row.model == f"{row.model_id.split('-')[0]} lr={json.loads((mc / f'models/{row.model_id}/config.json').read_text())['searched']['lr']}"
        scores = json.loads((mc / f"models/{row.model_id}/predict.json").read_text())["scores"]
        assert row.oof_score == pytest.approx(scores["oof log_loss"])
        if "oof_tta log_loss" in scores:  # the model with per-view predictions
            assert row.tta_gain == pytest.approx(scores["oof log_loss"] - scores["oof_tta log_loss"])
        else:
            assert np.isnan(row.tta_gain)
    assert board["predict_seconds"].isna().all()  # predict.json records no time here: blank, not 0


def test_page_is_self_contained_and_its_images_are_pngs(mc):
    page = (mc / "report/index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert "@import" not in page and "url(" not in page  # no fonts or styles from elsewhere
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert all(h.startswith("#") or re.fullmatch(r"[\w.]+\.(png|csv)|\.\./space\.yaml", h) for h in hrefs), hrefs
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(re.findall(r"<img ", page)) == len(list((mc / "report").glob("*.png"))) == 8
    linked = re.findall(r'<a href="([\w.]+\.png)"><img', page)
    for data, name in zip(images, linked):
        png = base64.b64decode(data)
        assert png == (mc / "report" / name).read_bytes()  # embedded and saved beside: the same figure
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200


def test_sections_follow_their_inputs(tmp_path):
    """Each section appears exactly when its inputs exist; built up one stage's files at a time."""
    full = write_report_run(tmp_path / "full", stacked=False)
    run = tmp_path / "run"

    def page_after(keep) -> str:
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(full, run, ignore=lambda d, names: [n for n in names if Path(d, n).is_file()
                                                            and not keep(Path(d, n).relative_to(full))])
        return build(run)

    bare = page_after(lambda p: p.parts[0] in ("folds.csv", "space.yaml"))
    assert sections(bare) == ["run"] and "leaderboard.csv" not in bare and "none yet" in bare
    assert sorted(p.name for p in (run / "report").iterdir()) == ["index.html"]
    configs = page_after(lambda p: p.name in ("folds.csv", "config.json"))
    assert sections(configs) == ["run", "leaderboard"] and "4 todo" in configs
    page = page_after(lambda p: p.name in ("folds.csv", "config.json", "metrics.json"))
    assert sections(page) == ["run", "leaderboard", "curves"] and "Sweep wall time" in page
    def one_oof(p: Path) -> bool:
        return p.name != "oof_views.parquet" and (p.name != "oof.parquet" or "resnet-a1" in str(p))

    assert sections(page_after(one_oof)) == ["run", "leaderboard", "curves", "task"]  # one model: no diversity
    page = page_after(lambda p: p.name != "oof_views.parquet")
    assert sections(page) == ["run", "leaderboard", "curves", "diversity", "task"]
    assert "(the best single model)" in page  # no stack: the figures show the best model's OOF
    assert sections(page_after(lambda p: True)) == ["run", "leaderboard", "curves", "diversity", "task", "tta"]
    stack_run(run)
    assert sections(build(run)) == ALL


def test_model_states(tmp_path):
    run = write_run(tmp_path / "run", n=120, k=3, seed=2)
    add_sweep_files(run, epochs=2)
    (run / "models/effnet-b2/oof.parquet").unlink()
    (run / "models/effnet-b2/status.json").write_text('{"state": "pruned", "epoch": 1}')
    (run / "models/convnext-c3/oof.parquet").unlink()
    (run / "models/convnext-c3/fold1/running.json").write_text('{"pid": 1, "epoch": 1}')
    (run / "models/vit-d4/oof.parquet").unlink()
    error = run / "tune/attempt-1/run_model_00003/error.txt"  # where Ray Tune records a trial's failure
    error.parent.mkdir(parents=True)
    (error.parent / "params.json").write_text('{"model_id": "vit-d4"}')
    error.write_text("RuntimeError: out of memory")
    page = build(run)  # the status command's rule: started, not complete, no sweep running
    assert "1 complete</span> · <span class=\"state-pruned\">1 pruned" in page and "1 interrupted" in page
    states = pd.read_csv(run / "report/leaderboard.csv").set_index("model_id")["state"].to_dict()
    assert states == {"resnet-a1": "complete", "effnet-b2": "pruned", "convnext-c3": "interrupted", "vit-d4": "failed"}
    assert "diversity" not in sections(page)  # one complete model


def test_learning_curves_show_the_best_twelve(tmp_path):
    models = {f"net{m:02d}-x": (0.5 + 0.1 * m, 1.0, 1.0) for m in range(14)}
    run = write_run(tmp_path / "run", n=80, k=2, n_classes=3, models=models, seed=3)
    add_sweep_files(run, epochs=2)
    page = build(run)
    assert "Showing the best 12 of 14 models" in page
    assert len(pd.read_csv(run / "report/leaderboard.csv")) == 14  # the leaderboard keeps every model


def test_diversity_names_the_most_and_least_alike_pair(mc):
    report = collect(Run(mc))
    found = diversity(report)
    folds = pd.read_csv(mc / "folds.csv")
    ids = list(report.oof_vectors)
    oof = {m: pd.read_parquet(mc / f"models/{m}/oof.parquet").set_index("id").loc[folds["id"]] for m in ids}
    p_true = {m: oof[m].to_numpy()[np.arange(len(folds)), oof[m].columns.get_indexer(folds["label"])] for m in ids}
    pairs = {(a, b): np.corrcoef(p_true[a], p_true[b])[0, 1] for i, a in enumerate(ids) for b in ids[i + 1:]}
    labels = {m.model_id: m.label for m in report.models}
    most, least = max(pairs, key=pairs.get), min(pairs, key=pairs.get)
    assert set(found["most"][:2]) == {labels[most[0]], labels[most[1]]} and found["most"][2] == pytest.approx(pairs[most])
    assert set(found["least"][:2]) == {labels[least[0]], labels[least[1]]}
    assert np.allclose(found["corr"], found["corr"].T) and np.allclose(np.diag(found["corr"]), 1)


def test_multilabel_thresholds(ml, tmp_path):
    page = (ml / "report/index.html").read_text()
    assert sections(page) == ALL and "Thresholds per label" in page
    assert "thresholds: ensemble/thresholds.json (fitted on" in page
    assert {"thresholds.png", "histograms.png"} <= {p.name for p in (ml / "report").iterdir()}
    assert "after its own per-label thresholds" in page  # F2 on multilabel: the stack ranks after thresholds
    run = copy(ml, tmp_path)
    (run / "ensemble/thresholds.json").unlink()
    assert "thresholds: 0.5 (no ensemble/thresholds.json)" in build(run)


def test_retrieval_recall_curves_match_the_retrieve_stage(tmp_path):
    run = write_report_retrieval_run(tmp_path / "run")
    page = build(run)
    assert sections(page) == ["run", "leaderboard", "curves", "task"] and "Retrieval: recall@k" in page
    assert (run / "report/recall.png").exists() and "45 identities" in page
    report = collect(Run(run))
    scores = pd.read_csv(run / "retrieval/scores.csv").set_index("method")
    for model in report.models:  # the leave-one-out within each fold is the retrieve stage's own protocol
        curve = report.retrieval.curves[model.label]
        row = scores.loc[f"single:{model.model_id}"]
        assert [curve[0], curve[4], curve[9]] == pytest.approx([row["cv_top1"], row["cv_recall@5"],
                                                                row["cv_recall@10"]])
        assert curve == sorted(curve)  # recall@k never falls with k


# ------------------------------------------------------------------ the command line


def _report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemble.report", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_writes_the_report_and_replaces_the_old_one(mc, tmp_path):
    run = copy(mc, tmp_path)
    (run / "report").mkdir()
    (run / "report/stale.png").write_bytes(b"old")
    proc = _report_cli("--run", str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"wrote {run / 'report'}/index.html"
    assert not (run / "report/stale.png").exists() and (run / "report/index.html").exists()
    assert not list(run.glob(".report*"))  # no temporary directory left behind
    assert not (run / "run.lock").exists()  # the lock was released


def test_cli_rejects_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    proc = _report_cli("--run", str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: {tmp_path}: not a run directory (needs folds.csv and models/)")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # nothing written


def test_a_broken_input_file_is_one_message_and_keeps_the_old_report(mc, tmp_path, capsys):
    run = copy(mc, tmp_path)
    build(run)
    before = (run / "report/index.html").read_bytes()
    bad = run / "models/resnet-a1/fold2/metrics.json"
    bad.write_text('{"best_score": 0.3,')
    assert cli.main(["--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {bad}: cannot be read as JSON")
    assert (run / "report/index.html").read_bytes() == before and not (run / "run.lock").exists()


def test_out_elsewhere_links_back_to_the_run(mc, tmp_path):
    out = tmp_path / "shared" / "report-mc"
    build(mc, "--out", str(out))
    page = (out / "index.html").read_text()
    href = re.search(r'href="([^"#]*space\.yaml)"', page).group(1)
    assert (out / href).resolve() == (mc / "space.yaml").resolve()
    assert (out / "leaderboard.csv").read_bytes() == (mc / "report/leaderboard.csv").read_bytes()


def test_out_never_replaces_a_directory_that_is_not_a_report(mc, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    for out in (notes, mc, mc.parent):
        assert cli.main(["--run", str(mc), "--out", str(out)]) == 2
        assert "--out" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "keep me" and (mc / "folds.csv").exists()


def test_a_run_at_a_uri(mc, tmp_path, capsys):
    """A URI run: the report is built in a scratch copy and uploaded beside the run's files."""
    run = copy(mc, tmp_path)
    assert cli.main(["--run", run.as_uri()]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {run.as_uri()}/report/index.html")
    assert sections((run / "report/index.html").read_text()) == ALL
