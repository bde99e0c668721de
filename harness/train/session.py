"""What the training loop needs from whatever runs it: rank, world size, device, the latest
checkpoint and reporting. ``RaySession`` inside a Ray Train worker, ``LocalSession`` in this
process (world size 1)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

from harness.atomic import atomic_dir
from harness.train.checkpoint import MODEL_FILE


class Session:
    """What the loop needs from whatever runs it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Called by every rank the same number of times; persists ``checkpoint_dir``."""
        raise NotImplementedError


class LocalSession(Session):
    """One process: checkpoints go to ``run_dir/checkpoints/iter_NNNNNNN``."""

    def __init__(self, run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
        self.dir = Path(run_dir) / "checkpoints"
        self.device = torch.device(device)
        self.reports: list[dict] = []

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("iter_*") if (p / MODEL_FILE).is_file())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            with atomic_dir(self.dir / f"iter_{metrics['iteration']:07d}") as tmp:
                shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)


class RaySession(Session):
    """Inside a Ray Train worker: ``ray.train.get_checkpoint`` / ``ray.train.report``."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
