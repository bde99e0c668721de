"""Hooks the training tests give ``train()`` / ``LocalSession``: a trace of every iteration, and
SIGKILLs that stop a worker or the driver the way a lost machine stops them.

Pickled by value: Ray workers unpickle them without importing this module (``tests`` is no
installed package)."""
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Trace:
    """One JSON line per rank and finished iteration in ``path``; ``start`` and ``pid`` tell
    attempts apart."""
    path: str

    def on_iteration(self, rank: int, iteration: int, start: int, loss: float, checkpointed: bool) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": rank, "iteration": iteration, "start": start, "pid": os.getpid(),
                                "loss": loss, "checkpointed": checkpointed}) + "\n")


@dataclass(frozen=True)
class KillRank:
    """``rank`` SIGKILLs itself after iteration ``after``, once: unless ``marker`` exists."""
    rank: int
    after: int
    marker: str

    def on_iteration(self, rank: int, iteration: int, start: int, loss: float, checkpointed: bool) -> None:
        if rank == self.rank and iteration == self.after and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class KillDriver:
    """Once the checkpoint of iteration ``after`` is persisted, rank 0 SIGKILLs the driver
    process ``pid`` and then itself: nothing of the attempt runs on, and whether Ray's
    controller recorded that checkpoint before dying is left to chance."""
    pid: int
    after: int

    def on_iteration(self, rank: int, iteration: int, start: int, loss: float, checkpointed: bool) -> None:
        if rank == 0 and iteration == self.after and checkpointed:
            os.kill(self.pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
