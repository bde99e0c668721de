"""Iteration-based training of one configuration (shared/reference/segmenter.md §3): the loop
every worker runs, Ray Train (DDP: NCCL on GPUs, gloo on CPU) around it, and the
``segrepro train`` command (``add_arguments`` / ``run``).

The loop talks to whatever runs it through a ``Session`` (rank, world size, the latest
checkpoint, reporting), so it runs under Ray Train (``RaySession``) or directly in this
process (``LocalSession``, world size 1).

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

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import weights
from harness.config import Config, InputError, load_config
from harness.data import ADE20K, IGNORE_INDEX, DataError, build_train_transform, loader_generator, seed_worker
from harness.evaluate import Protocol, all_reduce_confusion, evaluate_dataset, model_predictor
from harness.models import build_model, load_backbone_weights, save_model_checkpoint
from harness.schedule import build_optimizer
from harness.tracking import flatten, init_tag

MODEL_FILE = "checkpoint.pth"
RNG_FILE = "rng_rank{rank}.pt"
CONFIG_FILE = "config.json"
# Settings a run may change when it resumes: they do not alter the trained weights.
RESUMABLE_CHANGES = {"data": ("num_workers", "test_scale"),
                     "optim": ("eval_interval", "checkpoint_interval", "log_interval")}
RESULT_FILE = "train_result.json"
MLFLOW_RUN_FILE = "mlflow_run_id"
RAY_RUN_NAME = "train"
MAX_FAILURES = 3
# Test hooks, read by every worker (train() forwards SEGREPRO_* variables to Ray workers):
# TRACE_ENV names a file that gets one JSON line per rank and iteration; KILL_ENV is
# "RANK:ITERATION:MARKER": that rank SIGKILLs itself before that iteration unless MARKER exists.
TRACE_ENV = "SEGREPRO_TRAIN_TRACE"
KILL_ENV = "SEGREPRO_TRAIN_KILL"

Progress = Callable[[dict], None]


# ---------------------------------------------------------------- sessions

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
            dest = self.dir / f"iter_{metrics['iteration']:07d}"
            tmp = self.dir / f".{dest.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)


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


# ---------------------------------------------------------------- pieces of the loop

def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, average: str) -> torch.Tensor:
    """Cross-entropy with ignore 255, averaged over labelled pixels (reference
    ``CrossEntropyLoss(ignore_index=255)``) or over all pixels (MMSeg ``avg_non_ignore=False``:
    ignored pixels count in the denominator with loss 0)."""
    total = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (label != IGNORE_INDEX).sum() if average == "labelled" else torch.tensor(label.numel())
    # a crop with no labelled pixel contributes 0 instead of NaN
    return total / count.clamp(min=1).to(total.device)


def _train_transform(cfg: Config):
    d = cfg.data
    if d.augmentation == "paddlevit":
        kwargs = {"scale_range": d.ratio_range}
    else:
        kwargs = {"scale": d.train_scale, "ratio_range": d.ratio_range, "cat_max_ratio": d.cat_max_ratio}
    return build_train_transform(d.augmentation, d.crop_size, cfg.mean, cfg.std, **kwargs)


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's items of one epoch: a permutation of the whole split drawn from
    (seed, epoch) only, dealt round-robin to the ranks (DistributedSampler without padding)."""
    order = torch.randperm(n, generator=loader_generator(seed, epoch)).tolist()
    usable = n - n % world_size
    return order[rank:usable:world_size]


def _loader(dataset: ADE20K, cfg: Config, epoch: int, position: int, per_rank: int, iters_per_epoch: int,
            rank: int, world_size: int) -> torch.utils.data.DataLoader:
    """Batches ``position..iters_per_epoch-1`` of ``epoch`` (resuming skips consumed batches)."""
    idx = epoch_indices(len(dataset), cfg.optim.seed, epoch, rank, world_size)
    idx = idx[position * per_rank:iters_per_epoch * per_rank]
    workers = cfg.data.num_workers
    # the generator keeps the loader off the global torch RNG (its worker seeds come from it)
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=[(epoch, i) for i in idx], num_workers=workers,
        worker_init_fn=seed_worker, generator=loader_generator(cfg.optim.seed, epoch, rank),
        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=False)


def _agree_on_error(error: str | None, device: torch.device) -> None:
    """Every rank learns whether any rank hit a bad dataset file, and all raise the same
    ``DataError`` together: a rank that raised alone would leave the others waiting in the next
    collective, and Ray Train would retry a failure that repeats identically."""
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag)
        if flag.item():
            messages = [None] * dist.get_world_size()
            dist.all_gather_object(messages, error)
            error = next(m for m in messages if m is not None)
    if error is not None:
        raise DataError(error)


def _batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[dict]:
    """The loader's batches, the ranks agreeing after every fetch that none failed (one tiny
    all-reduce per iteration, negligible beside a step)."""
    it = iter(loader)
    while True:
        error = None
        try:
            batch = next(it)
        except StopIteration:  # every rank holds the same number of batches
            return
        except DataError as e:
            error = str(e)
        _agree_on_error(error, device)
        yield batch


def precision(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype (None: fp32) and gradient scaler of ``cfg.optim.amp``; CPUs train in fp32."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.amp) if device.type == "cuda" else None
    return amp, torch.amp.GradScaler("cuda") if amp is torch.float16 else None


def train_step(net: torch.nn.Module, model: torch.nn.Module, batch: dict, optimizer, scheduler, scaler,
               amp: torch.dtype | None, cfg: Config, device: torch.device) -> float:
    """One iteration: forward, loss, backward, (clip,) update, schedule; returns the loss.
    ``net`` is ``model`` or its DDP wrapper."""
    o = cfg.optim
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = net(image)
    loss = segmentation_loss(logits, label, o.loss_average)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if o.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return loss.item()


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


def _all_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _format_eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_progress(record: dict) -> str:
    line = (f"iter {record['iteration']}/{record['total']}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.3e}  eta {_format_eta(record['eta_s'])}")
    if "val/mIoU" in record:
        line += f"  val mIoU {record['val/mIoU']:.2f}  mAcc {record['val/mAcc']:.2f}  aAcc {record['val/aAcc']:.2f}"
    return line


def _maybe_kill(rank: int, iteration: int) -> None:
    """Test hook (KILL_ENV): die like a lost node, once, before the given iteration."""
    spec = os.environ.get(KILL_ENV)
    if spec:
        r, it, marker = spec.split(":", 2)
        if int(r) == rank and int(it) == iteration and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def _trace(rank: int, iteration: int, start: int, loss: float) -> None:
    """Test hook (TRACE_ENV): one line per rank and finished iteration; ``start`` tells attempts apart."""
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"rank": rank, "iteration": iteration, "start": start, "pid": os.getpid(),
                                "loss": loss}) + "\n")


class _MlflowLogger:
    """Metrics of rank 0 to one MLflow run (names are a contract with reports/)."""

    def __init__(self, tracking: dict | None):
        self.client = self.run_id = None
        if tracking:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking["uri"]), tracking["run_id"]

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


@dataclass
class _State:
    iteration: int = 0
    epoch: int = 0
    position: int = 0
    val: dict = field(default_factory=dict)


def _save(directory: Path, rank: int, model, cfg: Config, optimizer, scheduler, scaler, state: _State,
          iters_per_epoch: int) -> None:
    if rank == 0:
        save_model_checkpoint(
            directory / MODEL_FILE, model, cfg, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None, iteration=state.iteration,
            loader={"epoch": state.epoch, "position": state.position, "iters_per_epoch": iters_per_epoch},
            val=state.val)
        (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
    path = directory / RNG_FILE.format(rank=rank)
    torch.save(rng_state(), path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)


def check_resumable(saved: dict, cfg: Config, where: Path) -> None:
    """A run resumes only with the model, data and schedule it was started with (evaluation,
    benchmark, logging and loader-process settings may change)."""

    def training(d: dict) -> dict:
        out = {k: d.get(k) for k in ("model", "data", "optim", "recipe")}
        for section, keys in RESUMABLE_CHANGES.items():
            out[section] = {k: v for k, v in (out[section] or {}).items() if k not in keys}
        return out

    old, now = flatten(training(saved)), flatten(training(cfg.to_dict()))
    changed = [f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    if changed:
        raise InputError(f"{where}: the run in this directory was trained with different model, data or "
                         f"schedule settings ({'; '.join(changed)}); use a new run directory")


def _restore(directory: Path, rank: int, model, cfg: Config, optimizer, scheduler, scaler) -> _State:
    ckpt = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    check_resumable(ckpt["config"], cfg, directory / MODEL_FILE)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    loader = ckpt["loader"]
    state = _State(ckpt["iteration"], loader["epoch"], loader["position"], ckpt.get("val") or {})
    rng_path = directory / RNG_FILE.format(rank=rank)
    if rng_path.is_file():
        set_rng_state(torch.load(rng_path, weights_only=True))
    else:  # more ranks than the run that wrote the checkpoint
        warnings.warn(f"{rng_path} missing: rank {rank} reseeds its RNGs; the run continues but not bit for bit")
        seed_everything(cfg.optim.seed + 1000 * rank + state.iteration)
    return state


def _load_backbone(model, cfg: Config, path: Path) -> None:
    """The ImageNet encoder weights, checked to be the very file the driver resolved (a node
    may hold another file at the same path)."""
    if not path.is_file():
        raise InputError(f"{path}: backbone weights not found on {socket.gethostname()}; put the Hugging Face "
                         f"cache (or --backbone-dir) on storage every node sees")
    digest = weights.sha256_file(path)
    if cfg.model.init_sha256 and digest != cfg.model.init_sha256:
        raise InputError(f"{path} on {socket.gethostname()}: SHA-256 {digest} is not the {cfg.model.init_sha256} "
                         f"the run was resolved with")
    load_backbone_weights(model, path, cfg.model.backbone)


def _validate(model, cfg: Config, val_set: ADE20K, device: torch.device) -> dict:
    model.eval()
    predict = model_predictor(model, cfg, Protocol.during_training(cfg), device)
    cm, error = None, None
    try:
        cm = evaluate_dataset(predict, val_set, cfg.model.n_cls, progress=False)
    except DataError as e:
        error = str(e)
    _agree_on_error(error, device)
    cm = all_reduce_confusion(cm)
    model.train()
    out = cm.compute(cfg.eval.bookkeeping)
    return {"val/mIoU": out["mIoU"], "val/mAcc": out["mAcc"], "val/aAcc": out["aAcc"]}


# ---------------------------------------------------------------- the loop

def train_loop(cfg: Config, data_root: str | os.PathLike, session: Session, *,
               backbone_weights: str | os.PathLike | None = None, tracking: dict | None = None,
               progress: Progress | None = None, stop_after: int | None = None) -> dict:
    """Train ``cfg`` from the session's latest checkpoint (or from the start) to
    ``cfg.optim.iterations``, or only to ``stop_after`` (checkpointed there, as if stopped).

    Returns ``{"iterations", "start_iteration", "metrics", "val"}`` (rank 0's view).
    ``progress`` (rank 0) and ``session.report`` (every rank) get a record every log,
    checkpoint and eval interval.
    """
    o = cfg.optim
    rank, world, device = session.rank, session.world_size, session.device
    if o.batch_size % world:
        raise InputError(f"optim.batch_size {o.batch_size} is not divisible by {world} workers")
    per_rank = o.batch_size // world
    train_set = ADE20K(data_root, "training", _train_transform(cfg), seed=o.seed)
    val_set = ADE20K(data_root, "validation").shard(rank, world)
    iters_per_epoch = len(train_set) // world // per_rank
    if iters_per_epoch == 0:
        raise InputError(f"{data_root}: {len(train_set)} training images are fewer than one global batch "
                         f"({o.batch_size})")

    if cfg.model.init == "pretrained" and not backbone_weights:
        raise InputError(weights.missing_message(cfg))
    # The same seed on every rank: identical initial weights (DDP broadcasts rank 0's anyway).
    seed_everything(o.seed)
    model = build_model(cfg.model)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    amp, scaler = precision(cfg, device)
    seed_everything(o.seed + rank)  # dropout / drop-path differ across ranks
    with session.latest_checkpoint() as ckpt_dir:
        state = _restore(ckpt_dir, rank, model, cfg, optimizer, scheduler, scaler) if ckpt_dir else _State()
    if ckpt_dir is None and backbone_weights and rank == 0:
        # rank 0 alone needs the file: DDP broadcasts its parameters to the other ranks
        _load_backbone(model, cfg, Path(backbone_weights))
    start = state.iteration
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    end = o.iterations if stop_after is None else min(stop_after, o.iterations)
    mlflow = _MlflowLogger(tracking if rank == 0 else None)
    window_loss, window_n = 0.0, 0
    # ETA from the time of training iterations, data loading included, evaluation excluded
    train_time, tick = 0.0, time.perf_counter()
    metrics: dict = {}
    model.train()
    while state.iteration < end:
        loader = _loader(train_set, cfg, state.epoch, state.position, per_rank, iters_per_epoch, rank, world)
        for batch in _batches(loader, device):
            _maybe_kill(rank, state.iteration + 1)
            lr = optimizer.param_groups[0]["lr"]
            loss_value = train_step(net, model, batch, optimizer, scheduler, scaler, amp, cfg, device)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{cfg.name}: loss is {loss_value} at iteration {state.iteration + 1}")
            state.iteration += 1
            state.position += 1
            if state.position == iters_per_epoch:
                state.epoch, state.position = state.epoch + 1, 0
            now = time.perf_counter()
            train_time, tick = train_time + now - tick, now
            window_loss, window_n = window_loss + loss_value, window_n + 1
            _trace(rank, state.iteration, start, loss_value)

            t = state.iteration
            do_eval = t % o.eval_interval == 0 or t == o.iterations
            do_ckpt = t % o.checkpoint_interval == 0 or t == end
            if not (do_eval or do_ckpt or t % o.log_interval == 0):
                continue
            (mean_loss,) = _all_mean([window_loss / window_n], device)
            window_loss, window_n = 0.0, 0
            done = t - start
            metrics = {"iteration": t, "total": o.iterations, "epoch": state.epoch, "loss": mean_loss, "lr": lr,
                       "eta_s": train_time / done * (o.iterations - t), "elapsed_s": train_time}
            if device.type == "cuda":  # the CUDA allocator peak of this rank so far (for gpu-check)
                metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if do_eval:
                state.val = _validate(model, cfg, val_set, device)
                metrics.update(state.val)
            if rank == 0:
                mlflow.log({"train/loss": mean_loss, "train/lr": lr, **(state.val if do_eval else {})}, step=t)
                if progress is not None:
                    progress(dict(metrics))
            if do_ckpt:
                with tempfile.TemporaryDirectory(prefix="segrepro-ckpt-") as tmp:
                    _save(Path(tmp), rank, model, cfg, optimizer, scheduler, scaler, state, iters_per_epoch)
                    session.report(metrics, Path(tmp))
            else:
                session.report(metrics, None)
            tick = time.perf_counter()
            if t == end:
                break
    return {"iterations": state.iteration, "start_iteration": start, "metrics": metrics, "val": state.val}


def _ray_worker(config: dict) -> dict:
    queue = config["queue"]
    session = RaySession()
    progress = queue.put if session.rank == 0 else None
    try:
        return train_loop(config["cfg"], config["data_root"], session, backbone_weights=config["backbone_weights"],
                          tracking=config["tracking"], progress=progress)
    except DataError as e:  # every rank gets here together; returning keeps Ray Train from retrying
        return {"data_error": str(e)}


# ---------------------------------------------------------------- driver

def _check_inputs(cfg: Config, data_root, workers: int, gpus_per_worker: float) -> None:
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if gpus_per_worker < 0:
        raise InputError(f"--gpus-per-worker must not be negative, got {gpus_per_worker}")
    if cfg.optim.batch_size % workers:
        raise InputError(f"{cfg.name}: global batch {cfg.optim.batch_size} is not divisible by {workers} workers")
    if cfg.optim.amp != "fp32" and gpus_per_worker == 0:
        # a CPU run would train in fp32 and record another precision beside its figures
        raise InputError(f"{cfg.name}: --amp {cfg.optim.amp} needs CUDA workers (--gpus-per-worker > 0); "
                         f"CPU workers train in fp32")
    for split in ("training", "validation"):
        try:
            ADE20K(data_root, split)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--data-root {data_root}: {e}") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mlflow_run(cfg: Config, run_dir: Path, tracking_uri: str | None, run_id: str | None) -> tuple[dict | None, bool]:
    """(tracking dict for the workers, whether this call created the run and so ends it).

    A given run id belongs to the caller (who logs its parameters); otherwise one run per run
    directory is created (and reused on resume) with every config value as a parameter."""
    if not (tracking_uri or run_id):
        return None, False
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    uri = tracking_uri or mlflow.get_tracking_uri()
    if run_id:
        return {"uri": uri, "run_id": run_id}, False
    client = MlflowClient(uri)
    saved = run_dir / MLFLOW_RUN_FILE
    if saved.is_file():
        return {"uri": uri, "run_id": saved.read_text().strip()}, True
    exp = client.get_experiment_by_name("segrepro")
    exp_id = exp.experiment_id if exp else client.create_experiment("segrepro")
    run = client.create_run(exp_id, run_name=f"train-{cfg.name}-{cfg.recipe}-{cfg.profile}",
                            tags={"segrepro.config": cfg.name, "segrepro.recipe": cfg.recipe,
                                  "segrepro.profile": cfg.profile, "segrepro.config_hash": cfg.config_hash(),
                                  "segrepro.stage": "train", "segrepro.init": init_tag(cfg)})
    params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in _flat(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.log_batch(run.info.run_id, tags=[RunTag("segrepro.run_dir", str(run_dir))])
    saved.write_text(run.info.run_id)
    return {"uri": uri, "run_id": run.info.run_id}, True


def _drain(queue, stop: threading.Event, callback: Progress) -> None:
    from ray.util.queue import Empty

    while True:
        try:
            callback(queue.get(timeout=0.5))
        except Empty:
            if stop.is_set():
                return


def _print_progress(record: dict) -> None:
    print(format_progress(record), file=sys.stderr, flush=True)


def train(cfg: Config, data_root: str | os.PathLike, run_dir: str | os.PathLike, workers: int = 1,
          gpus_per_worker: float = 0, address: str | None = None, resume: bool = True,
          backbone_weights: str | os.PathLike | None = None, backbone_dir: str | os.PathLike | None = None,
          from_scratch: bool = False, tracking_uri: str | None = None,
          mlflow_run_id: str | None = None, progress_callback: Progress | None = None,
          max_failures: int = MAX_FAILURES) -> dict:
    """Train ``cfg`` with Ray Train on ``workers`` DDP workers; return the outcome.

    ``run_dir`` holds the Ray storage (checkpoints), the MLflow run id and ``train_result.json``.
    ``resume`` continues the run already in ``run_dir`` from its latest checkpoint; without it
    an existing run is an error. The encoder starts from the config's ImageNet checkpoint
    (``backbone_weights``, else the Hugging Face cache, else ``backbone_dir``: harness/weights.py),
    or from random init with ``from_scratch``; the choice and the file's SHA-256 become part of
    the resolved config. A worker that dies is restarted from the last checkpoint up to
    ``max_failures`` times. Progress records (iteration, total, loss, lr, eta_s, and val/* at
    evaluations) go to ``progress_callback``, or are printed to stderr.

    Result: ``checkpoint`` (final checkpoint.pth), ``iterations``, ``metrics`` (last train
    record), ``val`` (last validation), ``wall_time_s``, ``run_dir``, ``config``,
    ``config_hash``, ``mlflow_run_id``.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from harness.raylib import ensure_ray

    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    _check_inputs(cfg, data_root, workers, gpus_per_worker)
    cfg, found = weights.resolve(cfg, backbone_dir, backbone_weights, from_scratch)
    storage = run_dir / "ray"
    if (storage / RAY_RUN_NAME).exists():
        if not resume:
            raise InputError(f"--run-dir {run_dir} already holds a training run; pass --resume to continue it "
                             f"or choose another --run-dir")
        saved = sorted((storage / RAY_RUN_NAME).glob(f"checkpoint_*/{CONFIG_FILE}"))
        if saved:  # Ray names checkpoint directories by time
            check_resumable(json.loads(saved[-1].read_text()), cfg, saved[-1].parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking, owns_run = _mlflow_run(cfg, run_dir, tracking_uri, mlflow_run_id)

    ensure_ray(address)
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(queue, stop, progress_callback or _print_progress), daemon=True)
    drainer.start()
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg, "data_root": str(Path(data_root).resolve()), "queue": queue,
                           "backbone_weights": str(found.path) if found else None,
                           "tracking": tracking},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # the test hooks and the experiments directory reach workers started after ray.init
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("SEGREPRO_")}}),
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        data_error = (result.return_value or {}).get("data_error")
        status = "FAILED" if data_error else "FINISHED"
    finally:
        stop.set()
        drainer.join()
        if owns_run:
            from mlflow import MlflowClient

            MlflowClient(tracking["uri"]).set_terminated(tracking["run_id"], status)
        queue.shutdown(force=True)  # drained: the thread exits only on an empty queue
    if data_error:
        raise DataError(f"{cfg.name}: training stopped on a bad dataset file: {data_error}")
    out = dict(result.return_value or {})
    out.update(checkpoint=str(Path(result.checkpoint.path) / MODEL_FILE), wall_time_s=time.perf_counter() - started,
               run_dir=str(run_dir), config=cfg.name, recipe=cfg.recipe, profile=cfg.profile,
               config_hash=cfg.config_hash(), mlflow_run_id=tracking["run_id"] if tracking else None,
               init=weights.describe(cfg), init_sha256=cfg.model.init_sha256, amp=cfg.optim.amp,
               backbone_file=str(found.path) if found else None)
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, run_dir / RESULT_FILE)
    return out


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="zoo configuration name or YAML path")
    parser.add_argument("--data-root", required=True, help="directory holding ADEChallengeData2016 (or that directory)")
    parser.add_argument("--profile", help="run profile (smoke, full); default: the config's")
    parser.add_argument("--recipe", help="named recipe (reference, mmseg, paddlevit)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks); must divide the global batch")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (0: CPU workers on gloo)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    parser.add_argument("--run-dir", help="run directory (default runs/train/CONFIG-RECIPE-PROFILE)")
    add_init_arguments(parser)
    parser.add_argument("--backbone-weights", help="an explicit ImageNet checkpoint file of the config's backbone "
                                                   "(default: the Hugging Face cache, then --backbone-dir)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (metrics train/loss, train/lr, val/mIoU)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the encoder starts and the training precision: shared by train and reproduce."""
    parser.add_argument("--backbone-dir", help="directory of ImageNet checkpoints named by timm tag or model name "
                                               "(TAG.safetensors, BACKBONE.pth, ...), searched after the Hugging Face cache")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train the encoder from random init instead of the ImageNet checkpoint (recorded with the run)")
    parser.add_argument("--amp", choices=["fp32", "fp16", "bf16"],
                        help="training precision (default: the recipe's, fp32 for every source; mixed precision on CUDA only)")


def precision_overrides(args: argparse.Namespace) -> dict | None:
    return {"optim": {"amp": args.amp}} if getattr(args, "amp", None) else None


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, recipe=args.recipe, profile=args.profile, overrides=precision_overrides(args))
    run_dir = args.run_dir or Path("runs") / "train" / f"{cfg.name}-{cfg.recipe}-{cfg.profile}"
    requested = cfg.model.init
    cfg, found = weights.resolve(cfg, args.backbone_dir, args.backbone_weights, args.from_scratch)
    if not args.json:
        print(f"{cfg.name} ({cfg.recipe} recipe, {cfg.profile} profile): {cfg.optim.iterations} iterations at "
              f"global batch {cfg.optim.batch_size} in {cfg.optim.amp} on {args.workers} worker(s); "
              f"run directory {run_dir}\n  encoder init: {weights.describe(cfg, found, requested)}", file=sys.stderr)
    out = train(cfg, args.data_root, run_dir, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                address=args.address, resume=args.resume, backbone_weights=found.path if found else None,
                tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        val = out.get("val") or {}
        miou = f", val mIoU {val['val/mIoU']:.2f}" if val else ""
        print(f"{cfg.name}: {out['iterations']} iterations in {out['wall_time_s']:.0f} s{miou}\n"
              f"  encoder init: {out['init']}, precision {out['amp']}\n"
              f"  checkpoint {out['checkpoint']}")
    return 0
