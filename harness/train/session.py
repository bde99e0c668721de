"""What the training loop needs from whatever runs it: rank, world size, device, the checkpoint
to resume from, reporting, and the hooks to call after every iteration. ``RaySession`` inside a
Ray Train worker, ``LocalSession`` in this process (world size 1)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch

from harness.atomic import atomic_dir
from harness.train.checkpoint import MODEL_FILE, newest


class Hook(Protocol):
    """Code that runs inside the loop on every rank, for tests and ``gpu-check``: tracing,
    and stopping a process the way a lost node stops. ``train()`` sends hooks to the Ray
    workers, so a hook must pickle."""

    def on_iteration(self, rank: int, iteration: int, start: int, loss: float, checkpointed: bool) -> None:
        """``iteration`` is finished, its report made and, when ``checkpointed``, its checkpoint
        persisted; ``start`` is the iteration this process's run resumed from (0: the start)."""


class Session:
    """What the loop needs from whatever runs it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    hooks: Sequence[Hook] = ()

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Called by every rank the same number of times; persists ``checkpoint_dir``."""
        raise NotImplementedError

    def on_iteration(self, iteration: int, start: int, loss: float, checkpointed: bool) -> None:
        for hook in self.hooks:
            hook.on_iteration(self.rank, iteration, start, loss, checkpointed)


class LocalSession(Session):
    """One process: checkpoints go to ``run_dir/checkpoints/iter_NNNNNNN``."""

    def __init__(self, run_dir: str | os.PathLike, device: str | torch.device = "cpu", hooks: Sequence[Hook] = ()):
        self.dir = Path(run_dir) / "checkpoints"
        self.device = torch.device(device)
        self.hooks = tuple(hooks)
        self.reports: list[dict] = []

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("iter_*") if (p / MODEL_FILE).is_file())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = newest(self.dir.glob("iter_*"))
        yield found.path if found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            with atomic_dir(self.dir / f"iter_{metrics['iteration']:07d}") as tmp:
                shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)


class RaySession(Session):
    """Inside a Ray Train worker: ``ray.train.get_checkpoint`` / ``ray.train.report``.

    ``resume_from`` is the checkpoint the driver chose before this fit; a checkpoint Ray holds
    was reported within this fit (each attempt has a Ray run of its own), so it is newer."""

    def __init__(self, resume_from: str | os.PathLike | None = None, hooks: Sequence[Hook] = ()):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.resume_from = Path(resume_from) if resume_from else None
        self.hooks = tuple(hooks)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield self.resume_from
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
