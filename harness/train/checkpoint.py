"""Training checkpoints: what one holds, writing it, reading it back, and whether a run may
resume from it.

Checkpoint directory (one per checkpoint iteration):
- ``checkpoint.pth`` (rank 0): a segrepro model checkpoint (``load_checkpoint`` reads it) that
  also holds ``optimizer``, ``scheduler``, ``scaler``, ``iteration`` and ``loader`` (epoch and
  position within it);
- ``rng_rank{R}.pt`` (every rank): that rank's torch, CUDA, NumPy and Python RNG states as
  tensors and lists, so ``torch.load(weights_only=True)`` reads every file;
- ``state.json`` (rank 0): the iteration, the world size that wrote it and the resolved
  config: what choosing a checkpoint to resume from needs, cheap to read.
A checkpoint is usable when every file a resume reads is there and loads (``verify``); the
newest usable one is where a run resumes (``newest``), wherever it was written.
The sampler order is a function of (seed, epoch) and augmentation of (seed, epoch, image), so a
resumed run skips exactly the consumed batches and continues with the same losses.
"""
from __future__ import annotations

import json
import pickle
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from harness.atomic import atomic_path, write_json
from harness.config import Config, InputError
from harness.identity import training_settings
from harness.models import save_model_checkpoint
from harness.tracking import flatten


MODEL_FILE = "checkpoint.pth"
RNG_FILE = "rng_rank{rank}.pt"
STATE_FILE = "state.json"


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


def save(directory: Path, rank: int, world_size: int, model, cfg: Config, optimizer, scheduler,
         scaler: torch.amp.GradScaler, state: TrainState, iters_per_epoch: int) -> None:
    if rank == 0:
        save_model_checkpoint(
            directory / MODEL_FILE, model, cfg, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), iteration=state.iteration,
            loader={"epoch": state.epoch, "position": state.position, "iters_per_epoch": iters_per_epoch},
            val=state.val)
        write_json(directory / STATE_FILE, {"iteration": state.iteration, "world_size": world_size,
                                            "config": cfg.to_dict()})
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
    if ckpt.get("scaler"):  # empty: written without loss scaling (a disabled scaler's state)
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


class Unusable(Exception):
    """A checkpoint directory a run cannot resume from; the message names the file and why."""


@dataclass(frozen=True)
class Saved:
    """A usable checkpoint: its directory and what its ``state.json`` says."""
    path: Path
    iteration: int
    config: dict


def _state(directory: Path) -> dict:
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
        return {"iteration": int(state["iteration"]), "world_size": int(state["world_size"]),
                "config": dict(state["config"])}
    except FileNotFoundError:
        raise Unusable(f"{path}: missing") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise Unusable(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def verify(directory: str | Path) -> Saved:
    """``directory`` as a ``Saved`` checkpoint when its state, model file and every rank's RNG
    file are there and load (memory-mapped: no tensor data is read); ``Unusable`` otherwise."""
    directory = Path(directory)
    state = _state(directory)
    files = [directory / MODEL_FILE] + [directory / RNG_FILE.format(rank=r) for r in range(state["world_size"])]
    for path in files:
        try:
            torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except FileNotFoundError:
            raise Unusable(f"{path}: missing") from None
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise Unusable(f"{path}: unreadable ({e})") from None
    return Saved(directory, state["iteration"], state["config"])


def _skipped(e: Unusable) -> None:
    print(f"segrepro: skipped an unusable checkpoint: {e}", file=sys.stderr, flush=True)


def newest(directories: Iterable[Path]) -> Saved | None:
    """The usable checkpoint of the highest iteration among ``directories`` (a later directory
    name wins a tie), or None. Each one passed over on the way (unusable, or of unknown
    iteration) is named on stderr in one line with the bad file."""
    order = []
    for d in directories:
        try:
            order.append((_state(d)["iteration"], str(d), d))
        except Unusable as e:
            _skipped(e)
    for _, _, d in sorted(order, reverse=True):
        try:
            return verify(d)
        except Unusable as e:
            _skipped(e)
    return None
