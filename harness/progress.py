"""How far a running stage is: a small JSON file in the configuration's work directory.

A stage that runs as a Ray task (evaluation, benchmark) rewrites ``progress.json`` as it
goes; the reproduce driver polls it for its status board and ``segrepro runs`` reads it to show
a live run's stage. A file rather than a Ray actor or queue: the work directory already has
to be on storage every node sees (the preflight checks it), a file needs no actor to outlive
or clean up, a task that dies leaves nothing to drain, and a second process can read it.
Each stage writes its own ``token``, so a late write of an earlier stage is never taken for
the current one. Bottom floor: imports only the standard library and ``harness.atomic``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from harness.atomic import write_json

PROGRESS_FILE = "progress.json"
WRITE_INTERVAL_S = 0.5


class ProgressFile:
    """``report(done, total)``: rewrites ``path`` at most every ``WRITE_INTERVAL_S`` (and at the
    last step), with the stage's ``token`` and ``unit``."""

    def __init__(self, path: str | os.PathLike, token: str, unit: str):
        self.path, self.token, self.unit = Path(path), token, unit
        self.written = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.written < WRITE_INTERVAL_S:
            return
        self.written = now
        write_json(self.path, {"token": self.token, "done": done, "total": total, "unit": self.unit,
                               "updated": time.time()})


def read_progress(path: str | os.PathLike, token: str | None = None) -> dict | None:
    """The record in ``path`` (of the stage ``token`` when given), or None."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # not written yet
        return None
    if not isinstance(record, dict) or (token is not None and record.get("token") != token):
        return None
    return record


def stage_token(stage: str) -> str:
    """What a stage's progress file carries: its name and when it started, so that no earlier
    stage's write is taken for it."""
    return f"{stage} {time.time():.6f}"


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def eta_s(elapsed_s: float, done: int, total: int) -> float | None:
    """Seconds left at the pace so far, ``elapsed_s`` counted from the start of the stage (its
    start-up included); None before the first step."""
    return elapsed_s / done * (total - done) if done > 0 else None
