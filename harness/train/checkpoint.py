"""Training checkpoints: what one holds, writing it, reading it back, and whether a run may
resume from it.

Checkpoint directory (one per checkpoint iteration):
- ``checkpoint.pth`` (rank 0): a segrepro model checkpoint (``load_checkpoint`` reads it) that
  also holds ``optimizer``, ``scheduler``, ``scaler``, ``iteration`` and ``loader`` (epoch and
  position within it);
- ``rng_rank{R}.pt`` (every rank): that rank's torch, CUDA, NumPy and Python RNG states as
  tensors and lists, so ``torch.load(weights_only=True)`` reads every file;
- ``config.json`` (rank 0): the resolved config, for the driver's resume check.
The sampler order is a function of (seed, epoch) and augmentation of (seed, epoch, image), so a
resumed run skips exactly the consumed batches and continues with the same losses.
"""
from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.atomic import atomic_path
from harness.config import Config, InputError
from harness.identity import training_settings
from harness.models import save_model_checkpoint
from harness.tracking import flatten


MODEL_FILE = "checkpoint.pth"
RNG_FILE = "rng_rank{rank}.pt"
CONFIG_FILE = "config.json"


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    iteration: int = 0
    epoch: int = 0
    position: int = 0
    val: dict = field(default_factory=dict)


def save(directory: Path, rank: int, model, cfg: Config, optimizer, scheduler, scaler, state: TrainState,
          iters_per_epoch: int) -> None:
    if rank == 0:
        save_model_checkpoint(
            directory / MODEL_FILE, model, cfg, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None, iteration=state.iteration,
            loader={"epoch": state.epoch, "position": state.position, "iters_per_epoch": iters_per_epoch},
            val=state.val)
        (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
    with atomic_path(directory / RNG_FILE.format(rank=rank)) as tmp:
        torch.save(rng_state(), tmp)


def check_resumable(saved: dict, cfg: Config, where: Path) -> None:
    """A run resumes only with the model, data and schedule it was started with (evaluation,
    benchmark, logging and loader-process settings may change)."""

    old, now = flatten(training_settings(saved)), flatten(training_settings(cfg))
    changed = [f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    if changed:
        raise InputError(f"{where}: the run in this directory was trained with different model, data or "
                         f"schedule settings ({'; '.join(changed)}); use a new run directory")


def restore(directory: Path, rank: int, model, cfg: Config, optimizer, scheduler, scaler) -> TrainState:
    ckpt = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    check_resumable(ckpt["config"], cfg, directory / MODEL_FILE)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    loader = ckpt["loader"]
    state = TrainState(ckpt["iteration"], loader["epoch"], loader["position"], ckpt.get("val") or {})
    rng_path = directory / RNG_FILE.format(rank=rank)
    if rng_path.is_file():
        set_rng_state(torch.load(rng_path, weights_only=True))
    else:  # more ranks than the run that wrote the checkpoint
        warnings.warn(f"{rng_path} missing: rank {rank} reseeds its RNGs; the run continues but not bit for bit")
        seed_everything(cfg.optim.seed + 1000 * rank + state.iteration)
    return state
