"""The command line's error boundary: what a failure that escaped a command shows and its exit
code. A user-caused failure (bad input, a bad dataset file met during a run, an unusable
store) is one message naming the file or value and what to do, exit 2; anything else is one
line saying it is segrepro's own failure, exit 1. Either way the full traceback goes to the
log (``harness.logs.log_file``) and, with ``--debug``, to the screen.
"""
from __future__ import annotations

import sys
import traceback

from harness.config import InputError

USER_ERROR = 2
INTERNAL_ERROR = 1
# SQLite's own words for a store it cannot open or write (sqlite3 and SQLAlchemy both carry them)
_STORE_PROBLEMS = ("unable to open database file", "readonly database", "disk i/o error", "database disk image is "
                   "malformed", "file is not a database", "database or disk is full")


def _causes(exc: BaseException):
    """``exc`` and what it wraps: Python's cause/context chain, a Ray task error's cause, and the
    per-rank failures of a Ray Train worker group."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())


def _store_problem(exc: BaseException) -> str | None:
    for e in _causes(exc):
        text = str(e).lower()
        for problem in _STORE_PROBLEMS:
            if problem in text:
                return problem
    return None


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, the one message) of a failure that reached the command line."""
    for e in _causes(exc):
        if isinstance(e, InputError) and type(e).__module__.startswith("harness"):
            return USER_ERROR, str(e)
    problem = _store_problem(exc)
    if problem is not None:
        return USER_ERROR, (f"the MLflow store cannot be used: {problem}; check that the store file and its "
                            f"directory exist, are writable and hold an MLflow store (or pass another "
                            f"--tracking-uri / --run-dir)")
    first = str(exc).strip().splitlines()
    return INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {first[0] if first else ''}"


def _refusal(exc: BaseException) -> bool:
    """Bad input refused where it was found: the message is all there is (its traceback, still
    logged, names no further cause)."""
    chained = exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__)
    return isinstance(exc, InputError) and not chained


def report(exc: BaseException, run_dir, argv: list[str], debug: bool) -> int:
    """Show ``exc`` as the boundary does; its exit code."""
    from harness.logs import write_failure

    code, message = classify(exc)
    log = write_failure(run_dir, argv, exc)
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"segrepro: error: {message}", file=sys.stderr)
    if log is not None and not _refusal(exc):
        print(f"segrepro: full traceback in {log}" + ("" if debug else " (--debug prints it here)"),
              file=sys.stderr)
    return code
