"""Run identity: the one definition of "the same work", so that results are reused exactly
when they would come out the same and never otherwise.

- Training: the hash of what changes the trained weights (model, data settings, optimisation,
  recipe, seed, backbone weights' SHA-256 and precision, all in the resolved config) and the
  training split's content fingerprint. A description, logging/eval/checkpoint interval, loader
  process count, evaluation or benchmark setting never changes it.
- Evaluation: (training identity, checkpoint SHA-256, evaluation protocol, validation split).
- Benchmark: (training identity, benchmark settings, device); the settings cover both of its
  modes: inference (batch, precision, warm-up, repeats, window, stride, test scale) and training
  steps (crop, per-worker batch, precision), so a result of another mode set is not reused.
- A reproduction of one configuration: (training identity, both evaluation protocols, the
  validation split, benchmark settings, device): a finished one with the same key is skipped.

Bottom floor: imports only the config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from harness.config import Config

# Settings of the resolved config that do not change the trained weights. Everything else of
# model, data and optim (and the recipe name) is the training identity.
NOT_TRAINING = {"data": ("num_workers", "test_scale"),
                "optim": ("eval_interval", "checkpoint_interval", "log_interval")}
TRAINING_SECTIONS = ("model", "data", "optim", "recipe")


def _digest(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def training_settings(cfg: Config | dict) -> dict:
    """The part of a resolved config (or its dict) that the trained weights depend on."""
    d = cfg.to_dict() if isinstance(cfg, Config) else cfg
    out = {k: d.get(k) for k in TRAINING_SECTIONS}
    for section, keys in NOT_TRAINING.items():
        out[section] = {k: v for k, v in (out[section] or {}).items() if k not in keys}
    return out


def training_id(cfg: Config, train_fingerprint: str) -> str:
    """16 hex digits naming the weights this config trains on this training split."""
    return _digest({"settings": training_settings(cfg), "train_split": train_fingerprint})


def eval_key(training: str, checkpoint_sha256: str, protocol: dict, val_fingerprint: str) -> str:
    return _digest({"training": training, "checkpoint": checkpoint_sha256, "protocol": protocol,
                    "val_split": val_fingerprint})


def bench_settings(cfg: Config, workers: int) -> dict:
    """What the benchmark stage's figures depend on besides the weights' architecture and the
    device, for ``cfg`` trained by ``workers`` workers."""
    return {**dataclasses.asdict(cfg.bench), "window": cfg.eval.window, "stride": cfg.eval.stride,
            "test_scale": cfg.data.test_scale,
            "train": {"crop": cfg.data.crop_size, "batch_size": cfg.optim.batch_size // workers,
                      "precision": cfg.optim.amp}}


def bench_key(training: str, bench: dict, device: str) -> str:
    return _digest({"training": training, "bench": bench, "device": device})


def run_key(training: str, protocols: list[dict], val_fingerprint: str, bench: dict, device: str) -> str:
    return _digest({"training": training, "protocols": protocols, "val_split": val_fingerprint,
                    "bench": bench, "device": device})
