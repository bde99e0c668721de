"""The lock of a run directory: one live process owns it.

An OS file lock (``flock`` on ``RUN_DIR/.segrepro.lock``) held for the life of the process: the
kernel releases it when the process dies, however it dies, so a lock never outlives its
holder and needs no cleanup. The file also names the holder (PID, host, command, start time)
for the message a second process gets.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from harness.config import InputError

LOCK_FILE = ".segrepro.lock"


class RunDirBusy(InputError):
    """Another live process holds the run directory."""


def holder(run_dir: str | os.PathLike) -> dict | None:
    """Who holds ``run_dir`` now (``pid``, ``host``, ``command``, ``since``), or None when no
    live process does."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # written between our open and the holder's write
        return {}


def describe(info: dict) -> str:
    return (f"PID {info.get('pid', '?')} on {info.get('host', '?')} "
            f"({info.get('command', 'segrepro')}, since {info.get('since', '?')})")


class RunLock:
    """``with RunLock(run_dir, "reproduce"):`` holds ``run_dir`` or raises ``RunDirBusy``
    (exit 2) at once, naming the holder."""

    def __init__(self, run_dir: str | os.PathLike, command: str):
        self.run_dir = Path(run_dir)
        self.command = command
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> "RunLock":
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        # O_CLOEXEC is Python's default: the lock is not inherited by the processes Ray spawns
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(f"--run-dir {self.run_dir}: in use by {describe(_read(path))}; wait for it to "
                             f"finish or stop it, or choose another --run-dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "argv": sys.argv, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, InputError) and self.created:
            # refused input leaves no trace: a run directory this call created and nothing wrote
            # into goes again (removed while still held, so no other process is using it)
            if [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                (self.run_dir / LOCK_FILE).unlink()
                self.run_dir.rmdir()
        self.release()
