"""The `ensemble` console script: `ensemble tune|predict|stack|demo ...` runs `python -m ensemble.<command>`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"tune": "ensemble.tune", "predict": "ensemble.predict", "stack": "ensemble.stack", "demo": "ensemble.demo"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: ensemble {{{','.join(COMMANDS)}}} [options]   (each takes --help)", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
