"""What the command line shows and where the rest goes: third-party chatter kept quiet unless
``--verbose``, the full traceback of a failure written to a log file (shown on screen only
with ``--debug``), and the version string. The error boundary itself is ``harness.cli.main``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

VERBOSE_ENV = "SEGREPRO_VERBOSE"  # SEGREPRO_* reach the Ray workers too (harness.raylib)
LOG_NAME = "segrepro.log"
# third-party loggers whose INFO lines (store creation, migrations, cluster start) say nothing a
# user acts on
QUIET_LOGGERS = ("mlflow", "alembic", "ray", "ray.train", "ray.data", "ray.tune")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure(verbose_flag: bool) -> None:
    """Quiet by default: the loggers above at WARNING (MLflow sets its own level when imported,
    from MLFLOW_LOGGING_LEVEL), Ray's start-up line off (``ray_logging_level``), and a warning
    that still shows is one line."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _show_warnings_in_one_line()


def ray_logging_level() -> int:
    """``ray.init(logging_level=...)``: Ray resets its logger's level there."""
    return logging.INFO if verbose() else logging.WARNING


def _fallback_dir() -> Path:
    from harness.data.fingerprint import cache_dir

    return cache_dir() / "logs"


def log_file(run_dir: str | os.PathLike | None) -> Path:
    """The run's log, ``RUN_DIR/segrepro.log``, where the run directory exists; else one under the
    user's cache (``~/.cache/segrepro/logs/segrepro.log``, or ``$SEGREPRO_CACHE/logs``)."""
    if run_dir is not None and Path(run_dir).is_dir():
        return Path(run_dir) / LOG_NAME
    return _fallback_dir() / LOG_NAME


def write_failure(run_dir, argv: list[str], exc: BaseException) -> Path | None:
    """Append the command and ``exc``'s full traceback to the log; the file written, or None
    where neither place is writable."""
    text = (f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: segrepro {' '.join(argv)}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for path in dict.fromkeys((log_file(run_dir), _fallback_dir() / LOG_NAME)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def version() -> str:
    """``segrepro VERSION`` and, from a git checkout, ``(commit SHORT[, modified])``."""
    import importlib.metadata

    try:
        text = f"segrepro {importlib.metadata.version('segrepro')}"
    except importlib.metadata.PackageNotFoundError:
        text = "segrepro (not installed)"
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            text += f" (commit {commit}{', modified' if dirty else ''})"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return text


def _show_warnings_in_one_line() -> None:
    """A warning that reaches the screen is one line, without the source line Python echoes
    beneath it."""
    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"segrepro: warning: {message} ({category.__name__}, {Path(filename).name}:{lineno})",
              file=file or sys.stderr)

    warnings.showwarning = one_line
