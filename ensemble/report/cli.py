"""The report stage's command line: `python -m ensemble.report --run runs/NAME [--out DIR]`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ensemble import trackers
from ensemble.errors import UserError, cli_main, command_line
from ensemble.report.collect import collect
from ensemble.report.page import render
from ensemble.run import Run, locked, open_run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.report",
                                description="One self-contained HTML page of a run: leaderboard, learning curves, "
                                            "model diversity, stacking, per-task diagnostics, TTA.")
    p.add_argument("--run", required=True, help="run directory (folds.csv, models/), or its URI (s3://..., file://...)")
    p.add_argument("--out", help="where to write the report directory [<run>/report]")
    return p.parse_args(argv)


def report(args: argparse.Namespace, command: str = "python -m ensemble.report") -> str:
    """Write the report of `args.run` (index.html, PNGs, leaderboard.csv) as one directory; returns where it is."""
    with open_run(args.run) as run:
        if not run.store:
            run.check()  # not a run: said before anything is created
        out = Path(args.out).expanduser().resolve() if args.out else run.report_dir
        if args.out:
            _check_out(run, out)
        # A report outside the run is a local directory of its own: nothing to upload for a URI run.
        target = run if out.parent == run.dir and not (run.store and args.out) else Run(out.parent)
        target.check_writable()
        with locked(run, command):
            run.pull_artifacts()  # the small files, into a scratch copy of a URI run
            run.check()
            space_href = None  # a relative link, which holds while the report stays where it was written
            if run.space_file.exists() and (target is run or not run.store):
                space_href = Path(os.path.relpath(run.space_file, out)).as_posix()
            content = collect(run)
            files = render(content, space_href)  # everything in memory before anything is written
            target.write_set(out, files)
            where = target.show(out)
            logged = trackers.log_stage(run.dir, "report", *_scores(content))
    print(f"wrote {where}/index.html")
    for line in logged:
        print(line)
    return where


def _scores(content) -> tuple[dict, dict]:
    """What the report logs to the run's trackers: each model's CV mean (and with TTA), the stack's winner."""
    metrics = {f"cv/{m.label}": m.mean for m in content.models if m.mean is not None}
    metrics |= {f"tta/{m.label}": m.tta_score for m in content.models if m.tta_score is not None}
    params = {"metric": content.metric, "models": len(content.models)}
    if content.stacking:
        metrics["stack/winner"] = content.stacking.winner_score
        params["winner"] = content.stacking.winner
    return metrics, params


def _check_out(run: Run, out: Path) -> None:
    """--out is replaced whole: never let that be the run, a folder holding it, or a folder that is not an
    earlier report (<run>/report is the report stage's own)."""
    if out == run.dir or run.dir.is_relative_to(out):
        raise UserError(f"--out {out}: would replace the run directory itself; pass a new directory, e.g. "
                        f"{run.dir / 'report'} (the default).")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "index.html").exists()):
        raise UserError(f"--out {out}: exists and is not a report directory (no index.html), and the report "
                        "replaces it whole; pass a new directory or an earlier report's.")


@cli_main
def main(argv=None) -> int:
    report(parse_args(argv), command_line("python -m ensemble.report", argv))
    return 0
