"""Ctrl-C for long commands (``reproduce``, ``train``): the first SIGINT stops the work within
seconds, the second exits at once.

The first SIGINT sets a flag that the drivers read (a stage that fails after it was requested
counts as killed, not failed) and disconnects from Ray in a background thread: that stops every
Ray task, actor and Train worker of this driver (and, for the local Ray that segrepro started,
Ray's own processes), so the threads waiting on them return promptly. The driver then marks its
runs KILLED and prints how to resume.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

_requested = threading.Event()


class Interrupted(Exception):
    """Raised by a driver that noticed the interrupt between two steps."""


def requested() -> bool:
    return _requested.is_set()


def wait(seconds: float) -> bool:
    """Whether an interrupt arrives within ``seconds``: a failure that coincides with Ctrl-C (a
    terminal sends SIGINT to Ray's processes too, which may fail a stage before the driver's own
    handler has run) counts as the interrupt."""
    return _requested.wait(seconds)


def check() -> None:
    if _requested.is_set():
        raise Interrupted("interrupted")


def _stop_ray() -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()


def _handler(signum, frame) -> None:
    if _requested.is_set():
        print("\nsegrepro: interrupted again, exiting now", file=sys.stderr, flush=True)
        os._exit(130)
    _requested.set()
    print("\nsegrepro: interrupted: stopping the running stages (Ctrl-C again to exit at once)",
          file=sys.stderr, flush=True)
    threading.Thread(target=_stop_ray, name="segrepro-stop-ray", daemon=True).start()


@contextlib.contextmanager
def handling_sigint() -> Iterator[None]:
    """Within the block, SIGINT stops the work (see the module docstring); outside it, Python's
    default (KeyboardInterrupt) applies again."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; a caller thread keeps the default
        return
    _requested.clear()
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
