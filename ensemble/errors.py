"""One error type for bad user input; every CLI turns it into one line and exit code 2."""

from __future__ import annotations

import errno
import functools
import shlex
import sys
from typing import Callable

# A full, read-only or over-quota disk: the user's to fix, and the same command continues afterwards.
DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)


class UserError(ValueError):
    """Bad input from the user: a manifest, a space file, a run directory, a flag.

    The message names the file, row or key, what was found and what would be
    accepted (and for a sweep, the command that resumes it). CLIs print it as
    one line and exit with code 2; it is never an internal invariant.
    """


class RunFailed(RuntimeError):
    """A run stopped by something other than bad input (a trial failed after its retries, an actor
    died); what finished is kept, and the message says how to continue. CLIs exit with code 1."""


class Interrupted(Exception):
    """Ctrl-C (or SIGINT) stopped a command; what was complete is kept. CLIs exit with code 130."""


def disk_error(exc: OSError) -> UserError:
    """A disk that refused a write, as one message naming the file and what to do."""
    where = f"{exc.filename}: " if exc.filename else ""
    return UserError(f"{where}{exc.strerror or exc}. Free some space (or make the directory writable), then run the "
                     "same command again: what was complete is kept, and nothing half-written is used.")


def command_line(prog: str, argv: list[str] | None = None) -> str:
    """The command as the user typed it (`argv` default: sys.argv[1:]), shell-quoted: for run.lock and messages."""
    return " ".join([prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def cli_main(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorate a CLI's main(argv): UserError (and a full or read-only disk) -> one line on stderr and 2;
    RunFailed -> one line and 1; Ctrl-C -> one line and 130."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                raise
            print(f"error: {disk_error(exc)}", file=sys.stderr)
            return 2
        except RunFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except Interrupted as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:  # Ctrl-C: no traceback; every file is written whole, so a rerun continues
            print("error: interrupted: what was complete is kept; run the same command again to continue (a sweep: "
                  "with --resume).", file=sys.stderr)
            return 130

    return run


def format_rows(rows, limit: int = 5) -> str:
    """'rows 3, 7, 9 (3 rows)' with only the first `limit` shown.

    Row numbers are 1-based data rows as a spreadsheet shows them after the header.
    """
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:limit])
    more = ", ..." if len(rows) > limit else ""
    noun = "row" if len(rows) == 1 else "rows"
    return f"{noun} {shown}{more} ({len(rows)} {noun})"
