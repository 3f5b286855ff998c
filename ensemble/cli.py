"""The `ensemble` console script: `ensemble tune|predict|stack|retrieve|report|status|prune|demo ...` runs the
stage's own CLI."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> (its CLI module, what it does)
    "tune": ("ensemble.tune.cli", "train every backbone x param set x fold of a space on Ray Tune"),
    "predict": ("ensemble.predict.cli", "TTA predictions of the test set and the held-out folds"),
    "stack": ("ensemble.stack.cli", "combine the out-of-fold predictions: greedy, thresholds, meta-models"),
    "retrieve": ("ensemble.retrieve.cli", "search the gallery: models' embeddings, their weighted concatenation, re-ranking"),
    "report": ("ensemble.report.cli", "one self-contained HTML page per run: leaderboard, curves, diversity, stacking"),
    "status": ("ensemble.status", "what a live or finished run has done, and what is left (reads files only)"),
    "prune": ("ensemble.prune", "free the checkpoints of models the ensemble does not use (asks for --yes)"),
    "demo": ("ensemble.demo", "the whole flow on the embedded demo digits"),
}
USAGE = "usage: ensemble {" + ",".join(COMMANDS) + "} [options]   (each takes --help)\n\n" + "\n".join(
    f"  {name:<8} {what}   (python -m {module.removesuffix('.cli')})" for name, (module, what) in COMMANDS.items())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}\n" if argv else ""
        print(f"error: {given}{USAGE}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
